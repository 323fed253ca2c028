//! `make bench ONLY=sync`: NIP-77 and the operator's tools on a serving
//! relay.
//! - Reconciling 100k events that differ by 1%: `wasm-relay sync` between
//!   two relays (time, and bytes on the wire: negentropy messages plus the
//!   events fetched), against downloading the same set with plain REQs.
//! - Export while serving: the export's rate through the operator socket,
//!   and ingest (300 connections) during it against ingest without it.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use wasm_relay::event::AcceptedEvent;
use wasm_relay::store::{EventStore, SledEventStore};

use crate::client::{Conn, RelayProcess, bench_config};
use crate::scenarios::{
    ClosedLoop, INGEST_POOL_PER_RUN, Publish, copy_dir, keys, medians, note, row, sign_many, sign_many_at,
};
use crate::{RUNS, Row, median, workspace_root};

const SET_EVENTS: usize = 100_000;
/// Events only the other relay has (1% of the set).
const DIFFERENCE: usize = SET_EVENTS / 100;

fn write_store(dir: &std::path::Path, events: &[nostr::event::Event]) -> anyhow::Result<()> {
    let store = SledEventStore::open(dir, 256 << 20)?;
    let accepted: Vec<Arc<AcceptedEvent>> = events.iter().map(|e| Arc::new(AcceptedEvent::new(e.clone()))).collect();
    for chunk in accepted.chunks(5000) {
        store.write_batch(chunk)?;
    }
    Ok(())
}

/// The release binary's `sync` against `url`, on the relay serving
/// `data_dir`: (seconds, negentropy bytes, fetched bytes, fetched events).
async fn timed_sync(url: &str, data_dir: &std::path::Path) -> anyhow::Result<(f64, u64, u64, u64)> {
    let bin = workspace_root().join("target/release/wasm-relay");
    let started = Instant::now();
    let out = tokio::process::Command::new(bin)
        .args(["sync", url, "--dir", "down", "--data-dir"])
        .arg(data_dir)
        .env("WASM_RELAY_LOG", "warn")
        .output()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "sync failed: {text}");
    // "...; N rounds, B bytes of negentropy; ... fetched F (FB bytes; ..."
    let number_before = |marker: &str| -> u64 {
        let before = text.split(marker).next().and_then(|s| s.split_whitespace().last()).unwrap_or_default();
        before.trim_start_matches('(').parse().unwrap_or(0)
    };
    let fetched = text
        .split("fetched ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok((seconds, number_before(" bytes of negentropy"), number_before(" bytes; stored"), fetched))
}

/// Every event of `url` by plain REQs (pages of 5000 by `until`): (seconds,
/// bytes received, events).
async fn timed_download(url: &str) -> anyhow::Result<(f64, u64, u64)> {
    let mut c = Conn::connect(url).await?;
    let started = Instant::now();
    let (mut bytes, mut events) = (0u64, 0u64);
    let mut until: Option<u64> = None;
    let mut seen = std::collections::HashSet::new();
    loop {
        let filter = match until {
            Some(u) => json!({"until": u, "limit": 5000}),
            None => json!({"limit": 5000}),
        };
        c.send(json!(["REQ", "all", filter]).to_string()).await?;
        let (mut page, mut oldest) = (0u64, u64::MAX);
        loop {
            let v = c.recv().await?;
            match v[0].as_str() {
                Some("EVENT") => {
                    bytes += v.to_string().len() as u64;
                    if seen.insert(v[2]["id"].as_str().unwrap_or_default().to_owned()) {
                        events += 1;
                        page += 1;
                    }
                    oldest = oldest.min(v[2]["created_at"].as_u64().unwrap_or(0));
                }
                Some("EOSE") => break,
                Some("CLOSED") => anyhow::bail!("REQ refused: {v}"),
                _ => {}
            }
        }
        if page == 0 {
            break;
        }
        // Events of the oldest second come again on the next page (counted once).
        until = Some(oldest);
    }
    Ok((started.elapsed().as_secs_f64(), bytes, events))
}

pub async fn figures() -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    eprintln!("signing {SET_EVENTS} events for the reconciliation...");
    let authors = keys(1000);
    // One event per second of the last ~28 hours: every page boundary of the
    // REQ download falls between seconds.
    let now = wasm_relay::event::unix_now();
    let events = sign_many_at(SET_EVENTS, &authors, note, |i| now - 10 - i as u64);
    let (there_dir, here_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    write_store(there_dir.path(), &events)?;
    write_store(here_dir.path(), &events[DIFFERENCE..])?;

    let (mut sync_s, mut neg_bytes, mut fetched_bytes, mut fetched) = (vec![], vec![], vec![], 0);
    let (mut req_s, mut req_bytes) = (vec![], vec![]);
    let there = RelayProcess::start(&bench_config(&[]), |dir| copy_dir(there_dir.path(), dir)).await?;
    for _ in 0..RUNS {
        let here = RelayProcess::start(&bench_config(&[]), |dir| copy_dir(here_dir.path(), dir)).await?;
        let (s, nb, fb, n) = timed_sync(&there.url, &here.data_dir()).await?;
        anyhow::ensure!(n == DIFFERENCE as u64, "the sync fetched {n} events, not the {DIFFERENCE} that differ");
        sync_s.push(s);
        neg_bytes.push(nb as f64);
        fetched_bytes.push(fb as f64);
        fetched = n;
        drop(here);
        let (s, b, n) = timed_download(&there.url).await?;
        anyhow::ensure!(n == SET_EVENTS as u64, "the REQ download got {n} events");
        req_s.push(s);
        req_bytes.push(b as f64);
    }
    drop(there);
    let (sync_s, neg, fb) = (median(sync_s), median(neg_bytes), median(fetched_bytes));
    let (req_s, req_b) = (median(req_s), median(req_bytes));
    let mb = |b: f64| b / 1e6;
    rows.push(row(
        format!("sync 100k events, 1% differ ({fetched} fetched)"),
        format!("{sync_s:.2} s, {:.2} MB ({:.2} MB negentropy)", mb(neg + fb), mb(neg)),
        "",
        json!({"seconds": sync_s, "negentropy_bytes": neg, "fetched_bytes": fb}),
    ));
    rows.push(row(
        "plain REQ download of the same 100k events",
        format!("{req_s:.2} s, {:.1} MB ({:.0}x the sync's bytes)", mb(req_b), req_b / (neg + fb).max(1.0)),
        "",
        json!({"seconds": req_s, "bytes": req_b}),
    ));

    // Export while serving: the same 100k events, ingest at 300 connections.
    eprintln!("signing the ingest pools for the export run...");
    let signers = keys(64);
    let pool = |_: ()| -> Arc<Publish> {
        Arc::new(Publish::new(Arc::new(
            sign_many(INGEST_POOL_PER_RUN * RUNS, &signers, note).iter().map(|e| e.as_json()).collect(),
        )))
    };
    let relay = RelayProcess::start(&bench_config(&[]), |dir| copy_dir(there_dir.path(), dir)).await?;
    let mut alone = ClosedLoop::connect(&relay, 300, pool(())).await?;
    let mut during = ClosedLoop::connect(&relay, 300, pool(())).await?;
    let (mut alone_runs, mut during_runs, mut export_rates) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        alone_runs.push(alone.run_once().await?);
        // Exports back to back for as long as the ingest run lasts.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let data_dir = relay.data_dir();
        let exporter = tokio::spawn(async move {
            let (mut events, started) = (0u64, Instant::now());
            while !*stop_rx.borrow() {
                events += timed_export(&data_dir).await?;
            }
            anyhow::Ok(events as f64 / started.elapsed().as_secs_f64())
        });
        during_runs.push(during.run_once().await?);
        stop_tx.send(true)?;
        export_rates.push(exporter.await??);
    }
    let (alone, during) = (medians(alone_runs), medians(during_runs));
    let export_rate = median(export_rates);
    rows.push(row(
        "export while serving (operator socket, 100k+ events)",
        format!("{export_rate:.0} ev/s"),
        "",
        json!({"events_per_s": export_rate}),
    ));
    let ratio = during.0 / alone.0.max(1.0);
    rows.push(row(
        "ingest, 300 connections, during export / without",
        format!("{ratio:.2} ({:.0} vs {:.0} ev/s, p99 {:.1} vs {:.1} ms)", during.0, alone.0, during.2, alone.2),
        "",
        json!({"ratio": ratio, "during": during.0, "alone": alone.0}),
    ));
    Ok(rows)
}

/// One export through the operator socket into a discarded file: events exported.
async fn timed_export(data_dir: &std::path::Path) -> anyhow::Result<u64> {
    let bin = workspace_root().join("target/release/wasm-relay");
    let out = tokio::process::Command::new(bin)
        .args(["export", "--output", "/dev/null", "--data-dir"])
        .arg(data_dir)
        .env("WASM_RELAY_LOG", "warn")
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "export failed: {text}");
    Ok(text
        .split("exported ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}
