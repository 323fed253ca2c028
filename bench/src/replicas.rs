//! `make bench ONLY=replicas`: what replicas sharing Firestore cost and how
//! fast a new one joins, on the Firestore emulator (started here, as the
//! tests start it; it needs `gcloud` and its emulator component).
//!
//! Firestore bills document reads, writes and deletes. Each relay counts the
//! operations it causes, the way Firestore bills them, in
//! `wasm_relay_firestore_operations_total`; the figures here are differences
//! of those counters over each phase, summed over the replicas:
//! - per ingested event: 200 notes published to replica A, two replicas;
//! - per KeyPackage published and per KeyPackage request (with consumption),
//!   the MLS gateway loaded on both;
//! - at rest: one minute with nothing happening, scaled to an hour;
//! - joining: a replica started empty on a log of 100,000 events (written
//!   into the log here, as replicas write it), time until it serves all of
//!   them, replaying the log; then a replica started from that one's export
//!   (`replication.snapshot_url`), time until it serves all of them.
//!
//! The emulator's listener re-sends every document of a query on each change
//! (100 events published to a replica cost another replica 5,050 document
//! deliveries), where Firestore bills one read per document added or changed.
//! The read figures below are therefore the emulator's, an upper bound that
//! grows with the log; writes and deletes are as billed. The same quadratic
//! re-sending is why the join log is written with no replica listening.

#[path = "../../tests/harness/emulator.rs"]
#[allow(dead_code, clippy::all)]
mod emulator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::Row;
use crate::client::{Conn, RelayProcess, bench_config};
use crate::scenarios::{key_packages, keys, sign_many};
use crate::workspace_root;

const EVENTS: usize = 200;
const KEY_PACKAGES: usize = 200;
const KEY_PACKAGE_REQUESTS: usize = 100;
const JOIN_EVENTS: usize = 100_000;
const IDLE: Duration = Duration::from_secs(60);

/// Billable operations (reads, writes, deletes) a relay reports.
async fn operations(relay: &RelayProcess) -> anyhow::Result<[f64; 3]> {
    let mut ops = [0.0; 3];
    for (i, name) in ["read", "write", "delete"].into_iter().enumerate() {
        ops[i] = relay.metric(&format!("wasm_relay_firestore_operations_total{{op=\"{name}\"}}")).await?;
    }
    Ok(ops)
}

/// Operations of all `relays` together.
async fn total(relays: &[&RelayProcess]) -> anyhow::Result<[f64; 3]> {
    let mut sum = [0.0; 3];
    for r in relays {
        let ops = operations(r).await?;
        for i in 0..3 {
            sum[i] += ops[i];
        }
    }
    Ok(sum)
}

/// `after - before`, divided by `per`.
fn per(before: [f64; 3], after: [f64; 3], per: f64) -> [f64; 3] {
    [0, 1, 2].map(|i| (after[i] - before[i]) / per)
}

/// Publishes `events` (JSON) to `relay` over `connections` connections.
async fn publish_all(relay: &RelayProcess, events: Vec<String>, connections: usize) -> anyhow::Result<usize> {
    let events = Arc::new(events);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (events, url) = (events.clone(), relay.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&url).await?;
            let mut accepted = 0;
            for e in events.iter().skip(c).step_by(connections) {
                accepted += usize::from(conn.publish(e).await?);
            }
            anyhow::Ok(accepted)
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await??;
    }
    Ok(accepted)
}

/// Kind-1 events `relay` serves (NIP-45 COUNT).
async fn count_notes(relay: &RelayProcess, author: &str) -> anyhow::Result<u64> {
    let mut c = Conn::connect(&relay.url).await?;
    c.send(json!(["COUNT", "n", {"kinds": [1], "authors": [author]}]).to_string()).await?;
    loop {
        let v = c.recv().await?;
        if v[0] == "COUNT" {
            return Ok(v[2]["count"].as_u64().unwrap_or(0));
        }
    }
}

/// Waits until `relay` serves `expected` notes by `author`; returns how long it took.
async fn until_serves(relay: &RelayProcess, author: &str, expected: u64, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while count_notes(relay, author).await? < expected {
        anyhow::ensure!(start.elapsed() < limit, "the replica did not catch up within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(start.elapsed())
}

/// Waits until the relays' operation counters stop moving (the followers
/// have applied what was published).
async fn settled(relays: &[&RelayProcess]) -> anyhow::Result<[f64; 3]> {
    let mut last = total(relays).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = total(relays).await?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}

pub async fn firestore_costs() -> anyhow::Result<Vec<Row>> {
    eprintln!("starting the Firestore emulator...");
    emulator::emulator_host();
    let gateway = workspace_root().join("target/plugins/mls_gateway.wasm");
    let (config, _) = config_for(&gateway);
    let a = RelayProcess::start(&config, |_| {}).await?;
    let b = RelayProcess::start(&config, |_| {}).await?;
    let started = Instant::now();
    let both = [&a, &b];
    let mut rows = Vec::new();
    let fmt = |ops: [f64; 3]| format!("{:.2} reads, {:.2} writes, {:.2} deletes", ops[0], ops[1], ops[2]);
    let json_of = |ops: [f64; 3]| json!({"reads": ops[0], "writes": ops[1], "deletes": ops[2]});

    // Ingest.
    let writer = keys(1);
    let author = writer[0].public_key().to_hex();
    let notes: Vec<String> =
        sign_many(EVENTS, &writer, |i| (1, format!("note {i}"), vec![])).iter().map(|e| e.as_json()).collect();
    let before = settled(&both).await?;
    let accepted = publish_all(&a, notes, 20).await?;
    until_serves(&b, &author, accepted as u64, Duration::from_secs(120)).await?;
    let ingest = per(before, settled(&both).await?, accepted as f64);
    rows.push(Row {
        name: "Firestore operations per ingested event, 2 replicas (emulator reads)".into(),
        value: fmt(ingest),
        target: "bounded per event".into(),
        json: json_of(ingest),
    });

    // KeyPackages: published to A, requested (and consumed) on B.
    let owners = keys(KEY_PACKAGES / 10);
    let kps = key_packages(KEY_PACKAGES, &owners);
    let before = total(&both).await?;
    let published = publish_all(&a, kps.iter().map(|e| e.as_json()).collect(), 10).await?;
    anyhow::ensure!(published == KEY_PACKAGES, "{published} of {KEY_PACKAGES} KeyPackages accepted");
    let after_publish = settled(&both).await?;
    let kp_publish = per(before, after_publish, published as f64);
    let mut c = Conn::connect(&b.url).await?;
    for i in 0..KEY_PACKAGE_REQUESTS {
        let owner = owners[i % owners.len()].public_key().to_hex();
        c.req(&format!("kp{i}"), &format!("{{\"kinds\":[30443,443],\"authors\":[\"{owner}\"]}}")).await?;
    }
    let kp_request = per(after_publish, settled(&both).await?, KEY_PACKAGE_REQUESTS as f64);
    rows.push(Row {
        name: "Firestore operations per KeyPackage published (MLS gateway)".into(),
        value: fmt(kp_publish),
        target: "".into(),
        json: json_of(kp_publish),
    });
    rows.push(Row {
        name: "Firestore operations per KeyPackage request (consumes one)".into(),
        value: fmt(kp_request),
        target: "".into(),
        json: json_of(kp_request),
    });

    // At rest, from after the gateway's first tick (a minute after start),
    // which backfills its expiry index once: the minute measured holds one
    // ordinary tick.
    let first_tick_done = Duration::from_secs(70);
    tokio::time::sleep(first_tick_done.saturating_sub(started.elapsed())).await;
    settled(&both).await?;
    eprintln!("measuring a minute at rest...");
    let before = total(&both).await?;
    tokio::time::sleep(IDLE).await;
    let idle = per(before, total(&both).await?, IDLE.as_secs_f64() / 3600.0);
    rows.push(Row {
        name: "Firestore operations per idle hour, 2 replicas (1 min measured)".into(),
        value: fmt(idle),
        target: "near 0".into(),
        json: json_of(idle),
    });

    drop((a, b));
    let (join_config, join_project) = config_for(&gateway);
    rows.extend(join_by_replay_and_snapshot(&join_config, &join_project).await?);
    Ok(rows)
}

/// A replica's configuration on a fresh Firestore project, with the
/// gateway, and that project's id.
fn config_for(gateway: &std::path::Path) -> (String, String) {
    let project = emulator::fresh_project();
    (format!("{}{}", bench_config(&[("mls-gateway", gateway)]), emulator::replica_config(&project)), project)
}

/// Events per log document in the join log: what one publish of a replica
/// under steady load holds (its publisher takes up to 500 queued events).
const JOIN_BATCH: usize = 100;

/// Writes `events` into the shared log of `project` as a replica publishes
/// them: [`JOIN_BATCH`] events per document, 4 commits at a time.
async fn fill_log(project: &str, events: Vec<nostr::event::Event>) -> anyhow::Result<()> {
    use firestore::gcloud_sdk::google::firestore::v1 as fs;
    use wasm_relay::firestore::{Firestore, string_value};
    use wasm_relay::replication::log_document;
    let config = wasm_relay::config::FirestoreConfig { project_id: project.to_owned(), ..Default::default() };
    let firestore = Firestore::connect(&config).await?;
    let accepted: Vec<Arc<wasm_relay::event::AcceptedEvent>> =
        events.into_iter().map(|e| Arc::new(wasm_relay::event::AcceptedEvent::new(e))).collect();
    let docs: Vec<fs::Write> = accepted
        .chunks(JOIN_BATCH)
        .map(|batch| {
            let mut fields = log_document::batch_fields(batch);
            fields.insert("origin".to_string(), string_value("bench"));
            let document = fs::Document {
                name: firestore.document("events", &log_document::batch_id(batch)),
                fields,
                ..Default::default()
            };
            fs::Write { operation: Some(fs::write::Operation::Update(document)), ..Default::default() }
        })
        .collect();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for chunk in docs.chunks(8) {
        if pending.len() >= 4 {
            pending.next().await.expect("a commit")?;
        }
        let (firestore, chunk) = (firestore.clone(), chunk.to_vec());
        pending.push(async move { firestore.commit_idempotent("bench fill", chunk).await });
    }
    while let Some(done) = pending.next().await {
        done?;
    }
    Ok(())
}

/// A replica started empty on a log of [`JOIN_EVENTS`] events: time until it
/// serves every one, replaying the log; then the same from a snapshot (that
/// replica's export, loaded by `replication.snapshot_url`).
async fn join_by_replay_and_snapshot(config: &str, project: &str) -> anyhow::Result<Vec<Row>> {
    eprintln!("writing {JOIN_EVENTS} events into the shared log...");
    let joiner = keys(1);
    let author = joiner[0].public_key().to_hex();
    let events = sign_many(JOIN_EVENTS, &joiner, |i| (1, format!("join {i}"), vec![]));
    fill_log(project, events).await?;
    let dir = tempfile::tempdir()?;
    let replayed = dir.path().join("replayed");
    let start = Instant::now();
    let fresh = RelayProcess::start_in(config, &replayed).await?;
    until_serves(&fresh, &author, JOIN_EVENTS as u64, Duration::from_secs(1800)).await?;
    let replay = start.elapsed().as_secs_f64();
    fresh.kill().await?;

    let snapshot = dir.path().join("snapshot.jsonl");
    let start = Instant::now();
    let out = tokio::process::Command::new(workspace_root().join("target/release/wasm-relay"))
        .args(["export", "--data-dir"])
        .arg(&replayed)
        .arg("--output")
        .arg(&snapshot)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let export = start.elapsed().as_secs_f64();
    let with_snapshot = config.replacen(
        "[replication]\n",
        &format!("[replication]\nsnapshot_url = {:?}\n", snapshot.display().to_string()),
        1,
    );
    anyhow::ensure!(with_snapshot != config, "the configuration has no [replication] table");
    let start = Instant::now();
    let joined = RelayProcess::start_in(&with_snapshot, &dir.path().join("from-snapshot")).await?;
    until_serves(&joined, &author, JOIN_EVENTS as u64, Duration::from_secs(1800)).await?;
    let by_snapshot = start.elapsed().as_secs_f64();
    let thousands = JOIN_EVENTS / 1000;
    Ok(vec![
        Row {
            name: format!("a new replica joins a log of {thousands}k events (replay, {JOIN_BATCH} per document)"),
            value: format!("{replay:.1} s ({:.0} events/s)", JOIN_EVENTS as f64 / replay),
            target: "".into(),
            json: json!({"seconds": replay, "events": JOIN_EVENTS}),
        },
        Row {
            name: format!(
                "a new replica joins from a snapshot of {thousands}k events (file; export took {export:.1} s)"
            ),
            value: format!("{by_snapshot:.1} s ({:.0} events/s)", JOIN_EVENTS as f64 / by_snapshot),
            target: "faster than replay".into(),
            json: json!({"seconds": by_snapshot, "export_seconds": export, "events": JOIN_EVENTS}),
        },
    ])
}
