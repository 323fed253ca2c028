//! Criterion micro-benchmarks of single plugin calls through the host's
//! plugin runtime: the MLS gateway's `on-event` (a kind 445 group message)
//! and `process-req` (a KeyPackage REQ for an author with none, and a COUNT),
//! and the probe plugin's plain accept, which is the runtime's own cost
//! (instance from the pool, conversion, call, return). Then one policy
//! written three times, `kind-allowlist` in Rust, JavaScript
//! (componentize-js) and Python (componentize-py): first its component's
//! size and load times, compiled and from the cache, then its `on-event`.
//! Last, the contract 0.2 hooks: each one's own cost on the contract-hooks
//! test instrument (which only counts), then the search plugin's real work:
//! `on-stored` with one note and with a full batch of 64 (it indexes them in
//! its key-value store), `on-removed`, and `process-req` for a NIP-50 search.
//!
//! Run with `make bench` (after `make plugins`) or
//! `cargo bench -p relay-bench --bench plugin_calls`.

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
use nostr::key::Keys;
use wasm_relay::config::PluginConfig;
use wasm_relay::event::AcceptedEvent;
use wasm_relay::fanout::Fanout;
use wasm_relay::filter::{Filter, FilterLimits};
use wasm_relay::metadata::{MetadataStore, SledMetadataStore};
use wasm_relay::metrics::Metrics;
use wasm_relay::plugin::{Caller, PluginHost, ReadPurpose};
use wasm_relay::store::{EventStore, ReadAccess, RemovalReason, RemovedEvent, SledEventStore};

fn plugin(file: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins").join(file);
    assert!(path.exists(), "{} is missing: run `make plugins`", path.display());
    path
}

fn host(rt: &tokio::runtime::Runtime, dir: &std::path::Path, name: &str, file: &str) -> Arc<PluginHost> {
    host_with_cache(rt, dir, &dir.join("cache"), name, file)
}

fn host_with_cache(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    cache: &std::path::Path,
    name: &str,
    file: &str,
) -> Arc<PluginHost> {
    rt.block_on(async {
        let metadata: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::open(&dir.join(name)).unwrap());
        let events: Arc<dyn EventStore> = Arc::new(SledEventStore::open(&dir.join(name), 64 << 20).unwrap());
        let mut config = PluginConfig::new(name, plugin(file));
        if name == "mls-gateway" {
            // Measure the call, not the per-requester rate limit.
            config.settings.insert("requests_per_hour".into(), wasm_relay::config::SettingValue::Integer(0));
        }
        let configs = [config];
        PluginHost::start(wasm_relay::plugin::PluginHostSetup {
            configs: &configs,
            cache_dir: cache.to_path_buf(),
            cache_max_bytes: u64::MAX,
            metadata,
            events,
            fanout: Arc::new(Fanout::new(true)),
            max_results: 5000,
            metrics: Arc::new(Metrics::new()),
        })
        .await
        .unwrap()
    })
}

fn filter(json: serde_json::Value) -> Vec<Filter> {
    vec![Filter::parse(&json, FilterLimits { max_values: 5000 }).unwrap()]
}

fn plugin_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = host(&rt, dir.path(), "mls-gateway", "mls_gateway.wasm");
    let probe = host(&rt, dir.path(), "probe", "probe.wasm");
    let caller = Caller::new(1, SocketAddr::from(([127, 0, 0, 1], 9)));
    let keys = Keys::generate();
    let group = "ab".repeat(32);
    let message = EventBuilder::new(Kind::Custom(445), "c2VhbGVk")
        .tags([Tag::parse(["h", group.as_str()]).unwrap()])
        .finalize(&keys)
        .unwrap();
    let note = EventBuilder::new(Kind::TextNote, "hello").finalize(&keys).unwrap();
    let kp_req =
        filter(serde_json::json!({"kinds": [443, 30443], "authors": [Keys::generate().public_key().to_hex()]}));
    let by_tag = filter(serde_json::json!({"#t": ["nostr"], "limit": 10}));
    let access = ReadAccess::trusted(0);

    let mut g = c.benchmark_group("plugin call");
    g.bench_function("probe on-event (accept)", |b| {
        b.to_async(&rt).iter(|| async { probe.on_event(&caller, &note).await.unwrap() })
    });
    g.bench_function("mls-gateway on-event (kind 445)", |b| {
        b.to_async(&rt).iter(|| async { gateway.on_event(&caller, &message).await.unwrap() })
    });
    g.bench_function("mls-gateway process-req (KeyPackage REQ)", |b| {
        b.to_async(&rt)
            .iter(|| async { gateway.process_req(&caller, "s", ReadPurpose::Req, &kp_req, &access).await.unwrap() })
    });
    g.bench_function("mls-gateway process-req (#t REQ, no owner named)", |b| {
        b.to_async(&rt)
            .iter(|| async { gateway.process_req(&caller, "s", ReadPurpose::Req, &by_tag, &access).await.unwrap() })
    });
    g.bench_function("mls-gateway process-req (KeyPackage COUNT)", |b| {
        b.to_async(&rt)
            .iter(|| async { gateway.process_req(&caller, "s", ReadPurpose::Count, &kp_req, &access).await.unwrap() })
    });
    g.finish();
}

/// The same policy in three languages.
const ALLOWLISTS: [(&str, &str, &str); 3] = [
    ("Rust", "kind-allowlist", "kind_allowlist.wasm"),
    ("JavaScript", "kind-allowlist-js", "kind_allowlist_js.wasm"),
    ("Python", "kind-allowlist-py", "kind_allowlist_py.wasm"),
];

/// Prints each language's component size and load times: the first load
/// compiles the component (natively, in parallel), a later one (a restart, a
/// second relay on the same cache) reads the compiled form from the cache.
fn print_load_figures(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    println!("\n{:<11} {:>10} {:>17} {:>17}", "language", "size", "first load", "cached load");
    for (language, name, file) in ALLOWLISTS {
        let size = std::fs::metadata(plugin(file)).unwrap().len();
        let cache = dir.join(format!("load-cache-{name}"));
        let started = std::time::Instant::now();
        drop(host_with_cache(rt, &dir.join("cold"), &cache, name, file));
        let first = started.elapsed();
        let started = std::time::Instant::now();
        drop(host_with_cache(rt, &dir.join("warm"), &cache, name, file));
        let cached = started.elapsed();
        println!(
            "{language:<11} {:>7.1} MB {:>15.2} s {:>14.0} ms",
            size as f64 / 1e6,
            first.as_secs_f64(),
            cached.as_secs_f64() * 1e3
        );
    }
    println!();
}

/// `on-event` of the same policy in each language, for an event it accepts.
fn allowlist_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    print_load_figures(&rt, dir.path());
    let caller = Caller::new(1, SocketAddr::from(([127, 0, 0, 1], 9)));
    let note = EventBuilder::new(Kind::TextNote, "hello").finalize(&Keys::generate()).unwrap();
    let mut g = c.benchmark_group("kind-allowlist on-event");
    for (language, name, file) in ALLOWLISTS {
        let host = host(&rt, dir.path(), name, file);
        g.bench_function(language, |b| b.to_async(&rt).iter(|| async { host.on_event(&caller, &note).await.unwrap() }));
    }
    g.finish();
}

/// The contract 0.2 hooks, each call on the search plugin.
fn contract_0_2_hooks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let search = host(&rt, dir.path(), "search", "search.wasm");
    let caller = Caller::new(1, SocketAddr::from(([127, 0, 0, 1], 9)));
    let keys = Keys::generate();
    let text = "Nostr relays carry signed notes between people who choose whom to follow";
    let notes: Vec<Arc<AcceptedEvent>> = (0..64)
        .map(|i| {
            let event = EventBuilder::new(Kind::TextNote, format!("{i}: {text}")).finalize(&keys).unwrap();
            Arc::new(AcceptedEvent::new(event))
        })
        .collect();
    let removed = [RemovedEvent {
        id: notes[0].event.id.to_bytes(),
        pubkey: keys.public_key().to_bytes(),
        kind: 1,
        reason: RemovalReason::Deleted,
    }];
    rt.block_on(search.deliver_stored_now(&notes));
    let query = filter(serde_json::json!({"search": "relays notes", "limit": 10}));
    let access = ReadAccess::trusted(0);
    let hooks = host(&rt, dir.path(), "contract-hooks", "contract_hooks.wasm");
    let mut g = c.benchmark_group("contract 0.2 hook, own cost");
    g.bench_function("on-connect", |b| {
        b.to_async(&rt).iter(|| async { hooks.on_connect(&caller, &[]).await.unwrap() })
    });
    let pubkey = keys.public_key().to_hex();
    g.bench_function("on-auth", |b| b.to_async(&rt).iter(|| async { hooks.on_auth(&caller, &pubkey).await.unwrap() }));
    g.bench_function("on-stored (1 event)", |b| b.to_async(&rt).iter(|| hooks.deliver_stored_now(&notes[..1])));
    g.bench_function("on-removed (1 event)", |b| b.to_async(&rt).iter(|| hooks.deliver_removed_now(&removed)));
    g.finish();
    let mut g = c.benchmark_group("contract 0.2 hook, search plugin");
    g.bench_function("on-stored (1 note)", |b| b.to_async(&rt).iter(|| search.deliver_stored_now(&notes[..1])));
    g.bench_function("on-stored (batch of 64 notes)", |b| b.to_async(&rt).iter(|| search.deliver_stored_now(&notes)));
    g.bench_function("on-removed (1 event, not indexed)", |b| {
        b.to_async(&rt).iter(|| search.deliver_removed_now(&removed))
    });
    g.bench_function("process-req (search, limit 10)", |b| {
        b.to_async(&rt)
            .iter(|| async { search.process_req(&caller, "s", ReadPurpose::Req, &query, &access).await.unwrap() })
    });
    g.finish();
}

criterion_group!(benches, plugin_calls, allowlist_calls, contract_0_2_hooks);
criterion_main!(benches);
