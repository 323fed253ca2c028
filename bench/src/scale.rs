//! `make bench ONLY=scale`: how the relay's costs grow with its store.
//!
//! One data directory grows from 100k to 1M events of a public relay's mix
//! (notes with hashtags, replies, reactions and reposts with `e`/`p` tags,
//! long-form articles; 10k authors; a month of timestamps). At each size
//! the relay starts on it and the bench reports the ingest rate, latency of
//! the typical REQ shapes at a moderate load, COUNT time, memory, disk, and
//! how long a restart after SIGKILL takes until the first REQ is answered.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wasm_relay::event::AcceptedEvent;
use wasm_relay::store::{EventStore, SledEventStore};

use crate::client::{Conn, RelayProcess, bench_config, disk_bytes, peak_rss};
use crate::scenarios::{
    FilterFn, INGEST_POOL_PER_RUN, Publish, Query, RunFigures, closed_loop, keys, now, sign_many_at,
};
use crate::{RUNS, Row, median};

const SIZES: [usize; 2] = [100_000, 1_000_000];
const AUTHORS: usize = 10_000;
const HASHTAGS: usize = 2_000;
/// Timestamps spread over the last 30 days.
const SPAN_SECONDS: u64 = 30 * 24 * 3600;
/// Readers during the latency runs: a moderate load, so the figures show
/// the cost of a query rather than the length of a queue.
const READERS: usize = 50;
/// Events are signed and stored in slices of this many.
const SLICE: usize = 50_000;

/// Event `i` of the public mix: `(kind, content, tags)`.
fn public_mix(i: usize) -> (u16, String, Vec<Vec<String>>) {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // Skewed hashtags: low numbers are far more popular.
    let tag = ((h >> 20) % HASHTAGS as u64) * ((h >> 40) % HASHTAGS as u64) / HASHTAGS as u64;
    let target = format!("{:064x}", h.wrapping_mul(31) as u128 * 0x1_0000_0001);
    let person = format!("{:064x}", (h >> 7) as u128 * 0x3_0000_0007);
    match i % 20 {
        0..=9 => (
            1,
            format!(
                "{i}: {}",
                "Relays carry signed notes between people who choose whom to follow. ".repeat(1 + i % 4)
            ),
            vec![vec!["t".into(), format!("topic{tag}")]],
        ),
        10..=11 => (
            1,
            format!("reply {i}: agreed, and the relay should say why it refused."),
            vec![
                vec!["e".into(), target, String::new(), "root".into()],
                vec!["p".into(), person],
                vec!["t".into(), format!("topic{tag}")],
            ],
        ),
        12..=17 => {
            (7, "+".into(), vec![vec!["e".into(), target], vec!["p".into(), person], vec!["k".into(), "1".into()]])
        }
        18 => (6, String::new(), vec![vec!["e".into(), target], vec!["p".into(), person]]),
        _ => (
            30023,
            format!("# Article {i}\n\n{}", "A longer piece of writing, several paragraphs of it. ".repeat(20)),
            vec![
                vec!["d".into(), format!("article-{i}")],
                vec!["title".into(), format!("Article {i}")],
                vec!["t".into(), format!("topic{tag}")],
            ],
        ),
    }
}

fn created_at(base: u64) -> impl Fn(usize) -> u64 + Sync {
    move |i| base - ((i as u64).wrapping_mul(2_654_435_761) % SPAN_SECONDS)
}

/// Adds events `from..to` of the mix to the store in `dir` (the relay must
/// not be running on it); returns their ids, a sample for `ids` queries.
fn grow_store(
    dir: &Path,
    authors: &[nostr::key::Keys],
    from: usize,
    to: usize,
    base: u64,
) -> anyhow::Result<Vec<String>> {
    let store = SledEventStore::open(dir, 256 << 20)?;
    let mut sample = Vec::new();
    let mut at = from;
    while at < to {
        let n = SLICE.min(to - at);
        let start = at;
        let events = sign_many_at(n, authors, |i| public_mix(start + i), |i| created_at(base)(start + i));
        sample.extend(events.iter().step_by(97).map(|e| e.id.to_hex()));
        let accepted: Vec<Arc<AcceptedEvent>> = events.into_iter().map(|e| Arc::new(AcceptedEvent::new(e))).collect();
        for chunk in accepted.chunks(5000) {
            store.write_batch(chunk)?;
        }
        at += n;
    }
    Ok(sample)
}

/// One COUNT to its answer; the elapsed milliseconds.
async fn count_ms(url: &str, filter: &str) -> anyhow::Result<f64> {
    let mut c = Conn::connect(url).await?;
    let started = Instant::now();
    c.send(format!("[\"COUNT\",\"n\",{filter}]")).await?;
    loop {
        let v = c.recv().await?;
        match v[0].as_str() {
            Some("COUNT") => return Ok(started.elapsed().as_secs_f64() * 1000.0),
            Some("CLOSED") => anyhow::bail!("COUNT refused: {}", v[2]),
            _ => {}
        }
    }
}

/// Time from starting the relay on `dir` to its first answered REQ.
async fn restart_seconds(config: &str, dir: &Path) -> anyhow::Result<(RelayProcess, f64)> {
    let started = Instant::now();
    let relay = RelayProcess::start_in(config, dir).await?;
    let mut c = Conn::connect(&relay.url).await?;
    c.req("r", "{\"kinds\":[1],\"limit\":10}").await?;
    Ok((relay, started.elapsed().as_secs_f64()))
}

pub async fn growth() -> anyhow::Result<Vec<Row>> {
    let authors = keys(AUTHORS);
    let author_hex: Arc<Vec<String>> = Arc::new(authors.iter().map(|k| k.public_key().to_hex()).collect());
    let base = now();
    let data = tempfile::tempdir()?;
    let dir = data.path().to_path_buf();
    let config = bench_config(&[]);
    let mut rows = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut stored = 0;
    let mut ingest_pool_offset = 0usize;
    for size in SIZES {
        eprintln!("growing the store to {size} events...");
        // Ingest runs add their own events (from another part of the mix),
        // so the store holds a little more than `size`.
        ids.extend(grow_store(&dir, &authors, stored, size, base)?);
        stored = size;
        let (relay, _) = restart_seconds(&config, &dir).await?;
        let ids = Arc::new(ids.clone());
        let since = base - 3600;
        let shapes: [(&str, FilterFn); 4] = [
            ("authors", {
                let a = author_hex.clone();
                Arc::new(Box::new(move |i| format!("{{\"authors\":[\"{}\"],\"limit\":20}}", a[i % a.len()])))
            }),
            ("#t", Arc::new(Box::new(|i| format!("{{\"#t\":[\"topic{}\"],\"limit\":20}}", i % 200)))),
            ("ids", {
                let ids = ids.clone();
                Arc::new(Box::new(move |i| {
                    let list: Vec<String> = (0..10).map(|k| format!("\"{}\"", ids[(i * 10 + k) % ids.len()])).collect();
                    format!("{{\"ids\":[{}]}}", list.join(","))
                }))
            }),
            (
                "kinds+since",
                Arc::new(Box::new(move |i| {
                    format!("{{\"kinds\":[{}],\"since\":{since},\"limit\":50}}", [1, 7][i % 2])
                })),
            ),
        ];
        let mut latencies = serde_json::Map::new();
        for (shape, filter) in shapes {
            let (rate, p50, p99): RunFigures = closed_loop(&relay, READERS, Arc::new(Query(filter))).await?;
            rows.push(Row {
                name: format!("scale {size}: REQ {shape}, {READERS} readers"),
                value: format!("p50 {p50:.1} p99 {p99:.1} ms ({rate:.0} req/s)"),
                target: if size == SIZES[1] { "p99 <= 2x the 100k p99".into() } else { String::new() },
                json: json!({"p50_ms": p50, "p99_ms": p99, "reqs_per_s": rate}),
            });
            latencies.insert(shape.into(), json!(p99));
        }
        let mut counts = Vec::new();
        for filter in ["{\"kinds\":[7]}", "{\"#t\":[\"topic0\"]}"] {
            let mut times = Vec::new();
            for _ in 0..3 {
                times.push(count_ms(&relay.url, filter).await?);
            }
            counts.push((filter, median(times)));
        }
        rows.push(Row {
            name: format!("scale {size}: COUNT kinds 7 / #t topic0"),
            value: format!("{:.1} / {:.1} ms", counts[0].1, counts[1].1),
            target: String::new(),
            json: json!({"count_kind7_ms": counts[0].1, "count_tag_ms": counts[1].1}),
        });
        // Ingest into the store of this size: 300 writers, fresh events.
        let signers = keys(64);
        let offset = ingest_pool_offset;
        let pool: Vec<String> =
            sign_many_at(INGEST_POOL_PER_RUN * RUNS, &signers, |i| public_mix(10_000_000 + offset + i), |_| now())
                .iter()
                .map(|e| e.as_json())
                .collect();
        ingest_pool_offset += pool.len();
        let publish = Arc::new(Publish::new(Arc::new(pool)));
        let (ingest, _, ingest_p99) = closed_loop(&relay, 300, publish).await?;
        let rss = relay.rss_bytes();
        let hwm = peak_rss(relay.pid());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let disk = disk_bytes(&dir);
        relay.kill().await?;
        let (relay, restart) = restart_seconds(&config, &dir).await?;
        let mut c = Conn::connect(&relay.url).await?;
        let total = {
            c.send("[\"COUNT\",\"all\",{}]".into()).await?;
            loop {
                let v = c.recv().await?;
                if v[0] == "COUNT" {
                    break v[2]["count"].as_u64().unwrap_or(0);
                }
            }
        };
        relay.kill().await?;
        rows.push(Row {
            name: format!("scale {size}: ingest, 300 connections"),
            value: format!("{ingest:.0} ev/s p99 {ingest_p99:.1} ms"),
            target: String::new(),
            json: json!({"events_per_s": ingest, "p99_ms": ingest_p99}),
        });
        rows.push(Row {
            name: format!("scale {size}: RSS now / peak, disk ({total} events)"),
            value: format!("{:.0} / {:.0} MB, {:.0} MB", rss as f64 / 1e6, hwm as f64 / 1e6, disk as f64 / 1e6),
            target: String::new(),
            json: json!({"rss_mb": rss as f64 / 1e6, "peak_rss_mb": hwm as f64 / 1e6, "disk_mb": disk as f64 / 1e6, "events": total}),
        });
        rows.push(Row {
            name: format!("scale {size}: restart after SIGKILL to first REQ answered"),
            value: format!("{restart:.2} s"),
            target: "< 5 s".into(),
            json: json!({"restart_s": restart, "p99_by_shape_ms": latencies}),
        });
    }
    Ok(rows)
}
