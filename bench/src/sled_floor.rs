//! `make bench ONLY=disk`: where the event store's disk space goes, and the
//! floor sled itself sets.
//!
//! The same events (the shape nostr-bench publishes) are written three
//! ways, in group commits of 300 as the relay's writer makes them under
//! load: through the event store (body plus every index key), into a bare
//! sled tree holding only the bodies, and the bodies into a plain file.
//! Each reports bytes on disk per byte of event JSON and CPU per event, so
//! what the index keys cost and what sled's log costs are told apart.

use std::sync::Arc;

use serde_json::json;
use wasm_relay::event::AcceptedEvent;
use wasm_relay::store::{EventStore, SledEventStore};

use crate::Row;
use crate::client::{cpu_micros, disk_bytes};
use crate::peer::nostr_bench_note;
use crate::scenarios::{keys, now, sign_many_at};

const EVENTS: usize = 100_000;
const BATCH: usize = 300;

/// `n` events as nostr-bench publishes them: each by its own key, all
/// created now.
fn bench_shaped(n: usize) -> Vec<Arc<AcceptedEvent>> {
    let authors = keys(n);
    sign_many_at(n, &authors, |i| nostr_bench_note(i, authors[i].public_key().to_hex()), |_| now())
        .into_iter()
        .map(|e| Arc::new(AcceptedEvent::new(e)))
        .collect()
}

/// Runs `write`, returning (disk bytes of `dir` afterwards, CPU µs per event).
fn measure(dir: &std::path::Path, write: impl FnOnce()) -> (u64, f64) {
    let cpu = cpu_micros("self");
    write();
    let used = cpu_micros("self") - cpu;
    (disk_bytes(dir), used as f64 / EVENTS as f64)
}

pub fn disk_floor() -> anyhow::Result<Vec<Row>> {
    eprintln!("signing {EVENTS} nostr-bench-shaped events...");
    let events = bench_shaped(EVENTS);
    let raw: u64 = events.iter().map(|e| e.json.len() as u64).sum();
    let store_dir = tempfile::tempdir()?;
    let (store_disk, store_cpu) = measure(store_dir.path(), || {
        let store = SledEventStore::open(store_dir.path(), 256 << 20).expect("open the store");
        for batch in events.chunks(BATCH) {
            store.write_batch(batch).expect("write a batch");
        }
    });
    let bare_dir = tempfile::tempdir()?;
    let (bare_disk, bare_cpu) = measure(bare_dir.path(), || {
        let db = sled::Config::new().path(bare_dir.path()).cache_capacity(256 << 20).open().expect("open sled");
        for batch in events.chunks(BATCH) {
            let mut b = sled::Batch::default();
            for e in batch {
                b.insert(e.event.id.as_bytes().as_slice(), e.json.as_bytes());
            }
            db.apply_batch(b).expect("apply");
            db.flush().expect("flush");
        }
    });
    let file_dir = tempfile::tempdir()?;
    let (file_disk, file_cpu) = measure(file_dir.path(), || {
        use std::io::Write;
        let mut f = std::fs::File::create(file_dir.path().join("events.jsonl")).expect("create");
        for batch in events.chunks(BATCH) {
            for e in batch {
                f.write_all(e.json.as_bytes()).and_then(|_| f.write_all(b"\n")).expect("write");
            }
            f.sync_data().expect("sync");
        }
    });
    let ratio = |d: u64| d as f64 / raw as f64;
    let row = |name: &str, disk: u64, cpu: f64| Row {
        name: format!("disk, {EVENTS} events of {} B, commits of {BATCH}: {name}", raw / EVENTS as u64),
        value: format!("{:.2}x raw JSON, {cpu:.0} µs CPU/event", ratio(disk)),
        target: String::new(),
        json: json!({"disk_over_json": ratio(disk), "disk_bytes": disk, "cpu_us_per_event": cpu, "raw_json_bytes": raw}),
    };
    Ok(vec![
        row("event store (body + index keys)", store_disk, store_cpu),
        row("bare sled tree, bodies only", bare_disk, bare_cpu),
        row("append-only file, bodies only", file_disk, file_cpu),
    ])
}
