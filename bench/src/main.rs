//! `make bench`: starts release builds of the relay on loopback ports and
//! measures what operators compare relays by. Prints one table and writes
//! `target/bench/results.json`. Every figure is the median of several runs.
//! Benchmarks are not tests: nothing here asserts a timing.

mod client;
mod peer;
mod reconcile;
mod replicas;
mod scale;
mod scenarios;
mod sled_floor;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

/// The relay's allocator (see `host/src/main.rs`): the `disk` scenario writes
/// through the event store in this process, and its CPU figures should be
/// what the relay pays, not glibc malloc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs per measurement; the median is reported.
pub const RUNS: usize = 3;
/// Length of one timed run.
pub const RUN_TIME: Duration = Duration::from_secs(3);

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One row of the results table.
pub struct Row {
    pub name: String,
    pub value: String,
    pub target: String,
    pub json: Value,
}

fn main() -> anyhow::Result<()> {
    // 10,000 connections need 20,000+ descriptors on one machine.
    let _ = rlimit::increase_nofile_limit(65_536);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let only: Option<String> = std::env::args().nth(1);
    let rows = rt.block_on(scenarios::run_all(only.as_deref()))?;
    println!();
    println!("{:<58} {:>34}  target", "measurement (median of 3 runs)", "result");
    println!("{}", "-".repeat(120));
    for r in &rows {
        println!("{:<58} {:>34}  {}", r.name, r.value, r.target);
    }
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let doc: Value = rows.iter().map(|r| (r.name.clone(), r.json.clone())).collect::<serde_json::Map<_, _>>().into();
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json!({ "results": doc }))?)?;
    println!("\nwritten: {}", path.display());
    Ok(())
}

/// Median of some samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The `p`-th percentile of latencies in microseconds, in milliseconds.
pub fn percentile_ms(lat: &mut [u64], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i] as f64 / 1000.0
}
