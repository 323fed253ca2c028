//! The measurements. Each starts its own relay(s) and bounds its duration
//! and connection counts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use nostr::event::{Event, EventBuilder, FinalizeEvent, Kind, Tag};
use nostr::key::Keys;
use nostr::types::Timestamp;
use serde_json::json;
use wasm_relay::event::AcceptedEvent;
use wasm_relay::store::{EventStore, SledEventStore};

use crate::client::{Conn, RelayProcess, bench_config, rss_of};
use crate::{RUN_TIME, RUNS, Row, median, percentile_ms, workspace_root};

pub(crate) const INGEST_POOL_PER_RUN: usize = 40_000;
const QUERY_STORE_EVENTS: usize = 100_000;
const TAGS: usize = 1000;
const AUTHORS: usize = 1000;

pub(crate) fn now() -> u64 {
    Timestamp::now().as_secs()
}

/// Signs `n` events on all cores; `make(i)` builds event `i`, signed by
/// `keys[i % keys.len()]`, created `i % 10,000` seconds ago.
pub(crate) fn sign_many(
    n: usize,
    keys: &[Keys],
    make: impl Fn(usize) -> (u16, String, Vec<Vec<String>>) + Sync,
) -> Vec<Event> {
    sign_many_at(n, keys, make, |i| now() - (i % 10_000) as u64)
}

/// [`sign_many`] with `created_at(i)` as event `i`'s time.
pub(crate) fn sign_many_at(
    n: usize,
    keys: &[Keys],
    make: impl Fn(usize) -> (u16, String, Vec<Vec<String>>) + Sync,
    created_at: impl Fn(usize) -> u64 + Sync,
) -> Vec<Event> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (make, created_at) = (&make, &created_at);
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let (kind, content, tags) = make(i);
                            EventBuilder::new(Kind::from(kind), content)
                                .tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()))
                                .custom_created_at(Timestamp::from(created_at(i)))
                                .finalize(&keys[i % keys.len()])
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

pub(crate) fn keys(n: usize) -> Vec<Keys> {
    (0..n).map(|_| Keys::generate()).collect()
}

/// A note of realistic size: ~280 characters and a few tags.
pub(crate) fn note(i: usize) -> (u16, String, Vec<Vec<String>>) {
    let text =
        format!("{i}: {}", "Nostr relays carry signed notes between people who choose whom to follow. ".repeat(4));
    (1, text, vec![vec!["t".into(), format!("tag{}", i % TAGS)], vec!["client".into(), "relay-bench".into()]])
}

pub(crate) fn row(name: impl Into<String>, value: String, target: &str, json: serde_json::Value) -> Row {
    Row { name: name.into(), value, target: target.into(), json }
}

pub async fn run_all(only: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let want = |s: &str| only.is_none_or(|o| s.contains(o));
    let mut rows = Vec::new();
    let verify_rate = schnorr_verify_rate();
    rows.push(row(
        "Schnorr verification, one core",
        format!("{verify_rate:.0} /s"),
        "(bounds ingest)",
        json!(verify_rate),
    ));
    let gateway = workspace_root().join("target/plugins/mls_gateway.wasm");
    if want("ingest") {
        eprintln!("signing the ingest pool...");
        let signers = keys(64);
        let pool: Arc<Vec<String>> =
            Arc::new(sign_many(INGEST_POOL_PER_RUN * RUNS, &signers, note).iter().map(|e| e.as_json()).collect());
        let publish = |pool: &Arc<Vec<String>>| Arc::new(Publish::new(pool.clone()));
        let ingest_row = |conns: usize, label: &str, target: &str, (rate, p50, p99): RunFigures| {
            row(
                format!("ingest, {conns} connections{label}"),
                format!("{rate:.0} ev/s p50 {p50:.1} p99 {p99:.1} ms ({:.0}%)", 100.0 * rate / verify_rate),
                target,
                json!({"events_per_s": rate, "p50_ms": p50, "p99_ms": p99, "of_verify_bound": rate / verify_rate}),
            )
        };
        let plain = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        rows.push(ingest_row(100, "", "", closed_loop(&plain, 100, publish(&pool)).await?));
        drop(plain);
        // 300 connections with and without the gateway, runs interleaved.
        let plain = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        let with_gateway = RelayProcess::start(&bench_config(&[("mls-gateway", &gateway)]), |_| {}).await?;
        let [none, gw] = interleaved([(&plain, publish(&pool)), (&with_gateway, publish(&pool))], 300).await?;
        drop((plain, with_gateway));
        let plain = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        let thousand = closed_loop(&plain, 1000, publish(&pool)).await?;
        drop(plain);
        rows.push(ingest_row(300, "", "", none));
        rows.push(ingest_row(1000, "", "", thousand));
        rows.push(ingest_row(300, " (MLS gateway loaded)", ">= 10000/s, p99 < 50 ms", gw));
        let ratio = gw.0 / none.0.max(1.0);
        rows.push(row("plugin overhead, ingest (gateway / none)", format!("{ratio:.2}"), ">= 0.90", json!(ratio)));
        // The contract 0.2 hook `on-stored`, on the search plugin. First the
        // hook itself: every stored note reaches the plugin, which indexes
        // none of them (it indexes kind 30023 only); runs interleaved.
        let search = workspace_root().join("target/plugins/search.wasm");
        let hook_only = bench_config(&[("search", &search)]) + "[plugins.settings]\nkinds = \"30023\"\n";
        let plain = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        let with_hook = RelayProcess::start(&hook_only, |_| {}).await?;
        let [none, hooked] = interleaved([(&plain, publish(&pool)), (&with_hook, publish(&pool))], 300).await?;
        drop((plain, with_hook));
        rows.push(ingest_row(300, " (on-stored plugin loaded)", "", hooked));
        let ratio = hooked.0 / none.0.max(1.0);
        rows.push(row("plugin overhead, ingest (on-stored / none)", format!("{ratio:.2}"), ">= 0.90", json!(ratio)));
        // Then real work after each OK: the search plugin indexing every
        // note, alone on the machine (it lags behind the writes, and would
        // slow a relay measured beside it), against the run above without it.
        let indexing = RelayProcess::start(&bench_config(&[("search", &search)]), |_| {}).await?;
        let indexed = closed_loop(&indexing, 300, publish(&pool)).await?;
        let counter = "wasm_relay_plugin_counter_total{name=\"indexed\",plugin=\"search\"}";
        let dropped_series = "wasm_relay_plugin_notices_dropped_total{hook=\"on-stored\",plugin=\"search\"}";
        let (seen, dropped) = (indexing.metric(counter).await?, indexing.metric(dropped_series).await?);
        drop(indexing);
        rows.push(ingest_row(300, " (search plugin indexing every note)", "", indexed));
        let ratio = indexed.0 / none.0.max(1.0);
        rows.push(row(
            "ingest with search indexing / none",
            format!("{ratio:.2} ({seen:.0} indexed, {dropped:.0} notices dropped)"),
            "",
            json!({"ratio": ratio, "indexed": seen, "dropped": dropped}),
        ));
    }
    if want("disk") {
        rows.extend(crate::sled_floor::disk_floor()?);
    }
    if want("scale") {
        rows.extend(crate::scale::growth().await?);
    }
    if want("peer") {
        rows.extend(crate::peer::compare().await?);
    }
    if want("sync") {
        rows.extend(crate::reconcile::figures().await?);
    }
    if want("replicas") {
        rows.extend(crate::replicas::firestore_costs().await?);
    }
    if want("query") {
        eprintln!("preparing a store of {QUERY_STORE_EVENTS} events...");
        let authors = keys(AUTHORS);
        let events = sign_many(QUERY_STORE_EVENTS, &authors, note);
        let ids: Arc<Vec<String>> = Arc::new(events.iter().map(|e| e.id.to_hex()).collect());
        let author_hex: Arc<Vec<String>> = Arc::new(authors.iter().map(|k| k.public_key().to_hex()).collect());
        let accepted: Vec<Arc<AcceptedEvent>> = events.into_iter().map(|e| Arc::new(AcceptedEvent::new(e))).collect();
        let template = tempfile::tempdir()?;
        {
            let store = SledEventStore::open(template.path(), 256 << 20)?;
            for chunk in accepted.chunks(5000) {
                store.write_batch(chunk)?;
            }
        }
        let plain = RelayProcess::start(&bench_config(&[]), |dir| copy_dir(template.path(), dir)).await?;
        let with_gateway =
            RelayProcess::start(&bench_config(&[("mls-gateway", &gateway)]), |dir| copy_dir(template.path(), dir))
                .await?;
        let by_tag = || -> Arc<Query> {
            Arc::new(Query(Arc::new(Box::new(|i| format!("{{\"#t\":[\"tag{}\"],\"limit\":10}}", i % TAGS)))))
        };
        let query_row = |shape: &str, label: &str, target: &str, (rate, p50, p99): RunFigures| {
            row(
                format!("REQ {shape} limit 10, 300 connections, 100k events{label}"),
                format!("{rate:.0} req/s p50 {p50:.1} p99 {p99:.1} ms"),
                target,
                json!({"reqs_per_s": rate, "p50_ms": p50, "p99_ms": p99}),
            )
        };
        // `#t` with and without the gateway, runs interleaved.
        let [none, gw] = interleaved([(&plain, by_tag()), (&with_gateway, by_tag())], 300).await?;
        drop(with_gateway);
        rows.push(query_row("#t", "", ">= 20000/s", none));
        let (a, d) = (author_hex.clone(), ids.clone());
        let shapes: Vec<(&str, FilterGen)> = vec![
            ("authors", Box::new(move |i| format!("{{\"authors\":[\"{}\"],\"limit\":10}}", a[i % a.len()]))),
            ("ids", Box::new(move |i| format!("{{\"ids\":[\"{}\"]}}", d[(i * 7919) % d.len()]))),
        ];
        for (shape, filter) in shapes {
            rows.push(query_row(shape, "", "", queries(&plain, 300, Arc::new(filter)).await?));
        }
        rows.push(query_row("#t", " (MLS gateway loaded)", "", gw));
        let ratio = gw.0 / none.0.max(1.0);
        rows.push(row("plugin overhead, REQ #t (gateway / none)", format!("{ratio:.2}"), ">= 0.90", json!(ratio)));
    }
    if want("fanout") {
        let relay = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        let rate = 20;
        let (p50, p99, delivered) = fanout(&relay, 1000, rate).await?;
        let expected = 1000 * rate as usize * RUN_TIME.as_secs() as usize;
        rows.push(row(
            format!("fan-out, 1000 subscribers, {rate} ev/s"),
            format!("p50 {p50:.1} p99 {p99:.1} ms ({delivered}/{expected} delivered)"),
            "",
            json!({"p50_ms": p50, "p99_ms": p99, "deliveries": delivered}),
        ));
    }
    if want("keypackage") {
        let relay = RelayProcess::start(&bench_config(&[("mls-gateway", &gateway)]), |_| {}).await?;
        let (rate, p50, p99) = keypackage_fetch(&relay).await?;
        rows.push(row(
            "KeyPackage fetch with consumption, 300 connections",
            format!("{rate:.0} req/s p50 {p50:.1} p99 {p99:.1} ms"),
            ">= 2000/s",
            json!({"reqs_per_s": rate, "p50_ms": p50, "p99_ms": p99}),
        ));
    }
    if want("swap") {
        let (stall, failures) = hot_swap(&gateway).await?;
        rows.push(row(
            "hot swap under REQ load: longest request, failures",
            format!("{stall:.1} ms, {failures} failed"),
            "< 50 ms, 0 failed",
            json!({"longest_ms": stall, "failures": failures}),
        ));
    }
    if want("abuse") {
        let (grown_mb, health_p99, events) = abusive_reads().await?;
        rows.push(row(
            format!("20 abusive COUNT + REQ (20 filters each), {events} events, warm cache: RSS growth, /health p99"),
            format!("{grown_mb:.0} MB, {health_p99:.1} ms"),
            "< 200 MB, < 50 ms",
            json!({"rss_growth_mb": grown_mb, "health_p99_ms": health_p99, "events": events}),
        ));
    }
    if want("idle") {
        let relay = RelayProcess::start(&bench_config(&[]), |_| {}).await?;
        let per_conn = idle_connections(&relay, 10_000).await?;
        rows.push(row(
            "memory per idle connection, 10,000 open",
            format!("{:.1} KiB ({:.0} MB total)", per_conn / 1024.0, per_conn * 10_000.0 / 1e6),
            "< 500 MB total",
            json!({"bytes_per_connection": per_conn}),
        ));
    }
    Ok(rows)
}

/// Events in the store the abusive-read scenario runs against.
const ABUSE_STORE_EVENTS: usize = 1_000_000;

/// 20 connections at once each ask for a COUNT of 20 `{}` filters and a REQ
/// of 20 `{"limit":5000}` filters on a store of a million events, while
/// `/health` is polled. Returns the relay's peak RSS growth (MB), the p99
/// of `/health` (ms) and the store size.
async fn abusive_reads() -> anyhow::Result<(f64, f64, usize)> {
    eprintln!("building a store of {ABUSE_STORE_EVENTS} events...");
    let signers = keys(AUTHORS);
    let relay = RelayProcess::start(&bench_config(&[]), |dir| {
        let store = SledEventStore::open(dir, 256 << 20).expect("open the bench store");
        // Signed and written in slices, so the load generator never holds
        // the whole store in memory.
        for slice in 0..ABUSE_STORE_EVENTS / 50_000 {
            let events = sign_many(50_000, &signers, |i| note(slice * 50_000 + i));
            let accepted: Vec<Arc<AcceptedEvent>> =
                events.into_iter().map(|e| Arc::new(AcceptedEvent::new(e))).collect();
            for chunk in accepted.chunks(5000) {
                store.write_batch(chunk).expect("write the bench store");
            }
        }
    })
    .await?;
    let every = vec!["{}"; 20].join(",");
    let big = vec!["{\"limit\":5000}"; 20].join(",");
    // One pass first, so the page cache (storage.cache_capacity_bytes) is
    // warm: the growth measured is what the abuse itself costs.
    abusive_pass(&relay.url, "warm", &every, &big).await?;
    let baseline = relay.rss_bytes();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let addr = relay.url.trim_start_matches("ws://").to_owned();
    let health = {
        let (addr, done) = (addr.clone(), done.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                if health_check(&addr).await.is_ok() {
                    latencies.push(started.elapsed().as_micros() as u64);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        })
    };
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), relay.pid());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let abusers: Vec<_> = (0..20)
        .map(|i| {
            let (url, every, big) = (relay.url.clone(), every.clone(), big.clone());
            tokio::spawn(async move { abusive_pass(&url, &i.to_string(), &every, &big).await })
        })
        .collect();
    for a in abusers {
        a.await??;
    }
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    let mut latencies = health.await?;
    let grown = peak.load(Ordering::Relaxed).saturating_sub(baseline) as f64 / 1e6;
    Ok((grown, percentile_ms(&mut latencies, 0.99), ABUSE_STORE_EVENTS))
}

/// One abusive client: a COUNT of `every`, then a REQ of `big`.
async fn abusive_pass(url: &str, name: &str, every: &str, big: &str) -> anyhow::Result<usize> {
    let mut c = Conn::connect(url).await?;
    c.send(format!("[\"COUNT\",\"n{name}\",{every}]")).await?;
    loop {
        let v = c.recv().await?;
        if v[0] == "COUNT" || v[0] == "CLOSED" {
            break;
        }
    }
    c.req(&format!("r{name}"), big).await
}

/// One `GET /health` on a new connection.
async fn health_check(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await?;
    anyhow::ensure!(reply.starts_with(b"HTTP/1.1 200"), "health check failed");
    Ok(())
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &dest).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.clone());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

fn schnorr_verify_rate() -> f64 {
    let e = EventBuilder::new(Kind::from(1), "x".repeat(280)).finalize(&Keys::generate()).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..100 {
            assert!(e.verify_signature());
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// One request of a closed-loop client (the next is sent when this one is
/// answered): `Some(ok)`, or `None` to end the run early.
pub(crate) trait Request: Send + Sync + 'static {
    fn send(&self, c: &mut Conn, run: usize, client: usize, i: usize) -> impl Future<Output = Option<bool>> + Send;
}

/// `conns` connections each sending `request`s back to back, one timed run
/// (`RUN_TIME`) at a time.
pub(crate) struct ClosedLoop<R> {
    clients: Vec<Conn>,
    request: Arc<R>,
    runs: usize,
}

/// One run's rate of answered requests and latency p50/p99 (ms).
pub(crate) type RunFigures = (f64, f64, f64);

impl<R: Request> ClosedLoop<R> {
    pub(crate) async fn connect(relay: &RelayProcess, conns: usize, request: Arc<R>) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(Conn::connect(&relay.url).await?);
        }
        Ok(Self { clients, request, runs: 0 })
    }

    pub(crate) async fn run_once(&mut self) -> anyhow::Result<RunFigures> {
        let run = self.runs;
        self.runs += 1;
        let deadline = Instant::now() + RUN_TIME;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (n, mut c) in self.clients.drain(..).enumerate() {
            let request = self.request.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match request.send(&mut c, run, n, i).await {
                        Some(true) => lat.push(t.elapsed().as_micros() as u64),
                        Some(false) => {}
                        None => break,
                    }
                    i += 1;
                }
                (c, lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            let (c, l) = t.await?;
            self.clients.push(c);
            lat.extend(l);
        }
        let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
        Ok((rate, percentile_ms(&mut lat, 0.5), percentile_ms(&mut lat, 0.99)))
    }
}

/// Medians of several runs' figures.
pub(crate) fn medians(runs: Vec<RunFigures>) -> RunFigures {
    (
        median(runs.iter().map(|r| r.0).collect()),
        median(runs.iter().map(|r| r.1).collect()),
        median(runs.iter().map(|r| r.2).collect()),
    )
}

/// `RUNS` timed runs of `request` on `conns` connections: the medians.
pub(crate) async fn closed_loop<R: Request>(
    relay: &RelayProcess,
    conns: usize,
    request: Arc<R>,
) -> anyhow::Result<RunFigures> {
    let mut load = ClosedLoop::connect(relay, conns, request).await?;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(load.run_once().await?);
    }
    Ok(medians(runs))
}

/// The same load on two relays (no plugin, then the MLS gateway), their runs
/// interleaved so that drift in the machine's speed during the benchmark
/// falls on both sides of the overhead ratio alike.
async fn interleaved<R: Request>(pair: [(&RelayProcess, Arc<R>); 2], conns: usize) -> anyhow::Result<[RunFigures; 2]> {
    let [(a, ra), (b, rb)] = pair;
    let mut loads = [ClosedLoop::connect(a, conns, ra).await?, ClosedLoop::connect(b, conns, rb).await?];
    let mut runs = [Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (load, runs) in loads.iter_mut().zip(runs.iter_mut()) {
            runs.push(load.run_once().await?);
        }
    }
    let [a, b] = runs;
    Ok([medians(a), medians(b)])
}

/// Publishing pre-signed events: run `r` uses its own slice of the pool.
pub(crate) struct Publish {
    pool: Arc<Vec<String>>,
    next: Vec<AtomicU64>,
}

impl Publish {
    /// `pool` holds `RUNS` slices of `INGEST_POOL_PER_RUN` signed events.
    pub(crate) fn new(pool: Arc<Vec<String>>) -> Self {
        Self { pool, next: (0..RUNS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Request for Publish {
    async fn send(&self, c: &mut Conn, run: usize, _: usize, _: usize) -> Option<bool> {
        let i = run * INGEST_POOL_PER_RUN + self.next[run].fetch_add(1, Ordering::Relaxed) as usize;
        let json = self.pool.get(i).filter(|_| i < (run + 1) * INGEST_POOL_PER_RUN)?;
        Some(c.publish(json).await.unwrap_or(false))
    }
}

/// Builds the filter JSON of request `i`.
pub(crate) type FilterGen = Box<dyn Fn(usize) -> String + Send + Sync>;
pub(crate) type FilterFn = Arc<FilterGen>;

/// REQ to EOSE with the filter of request `i`.
pub(crate) struct Query(pub(crate) FilterFn);

impl Request for Query {
    async fn send(&self, c: &mut Conn, _: usize, client: usize, i: usize) -> Option<bool> {
        Some(c.req("q", &(self.0)(client * 7 + i)).await.is_ok())
    }
}

/// `conns` connections issuing REQs (REQ to EOSE) back to back.
async fn queries(relay: &RelayProcess, conns: usize, filter: FilterFn) -> anyhow::Result<RunFigures> {
    closed_loop(relay, conns, Arc::new(Query(filter))).await
}

/// `subs` live subscribers; one publisher at `rate` events/s; latency from
/// publish to delivery.
async fn fanout(relay: &RelayProcess, subs: usize, rate: u64) -> anyhow::Result<(f64, f64, usize)> {
    let origin = Instant::now();
    let keys = Keys::generate();
    let total = rate as usize * RUN_TIME.as_secs() as usize;
    let events: Vec<String> = (0..total * RUNS)
        .map(|i| {
            EventBuilder::new(Kind::from(1), format!("fanout {i}"))
                .tags([Tag::parse(["t", "fanout"]).unwrap()])
                .finalize(&keys)
                .unwrap()
                .as_json()
        })
        .collect();
    let (mut p50s, mut p99s, mut counts) = (vec![], vec![], vec![]);
    for run in 0..RUNS {
        let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        // Readers give up 5 s after the publisher is done, not before.
        let done = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..subs {
            let mut c = Conn::connect(&relay.url).await?;
            c.req("live", "{\"#t\":[\"fanout\"],\"limit\":0}").await?;
            // `req` closed it after EOSE; subscribe again and keep it open.
            c.send("[\"REQ\",\"live\",{\"#t\":[\"fanout\"],\"limit\":0}]".into()).await?;
            loop {
                if c.recv().await?[0] == "EOSE" {
                    break;
                }
            }
            let (sent_at, done) = (sent_at.clone(), done.clone());
            readers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut quiet = 0;
                while lat.len() < total {
                    let v = match tokio::time::timeout(Duration::from_secs(1), c.recv()).await {
                        Ok(Ok(v)) => v,
                        Ok(Err(_)) => break,
                        Err(_) => {
                            quiet = if done.load(Ordering::Relaxed) { quiet + 1 } else { 0 };
                            if quiet >= 5 {
                                break;
                            }
                            continue;
                        }
                    };
                    if v[0] == "EVENT" {
                        let i: usize =
                            v[2]["content"].as_str().unwrap_or("").trim_start_matches("fanout ").parse().unwrap_or(0);
                        let sent = sent_at[i % total].load(Ordering::Relaxed);
                        lat.push((origin.elapsed().as_micros() as u64).saturating_sub(sent));
                    }
                }
                lat
            }));
        }
        let mut publisher = Conn::connect(&relay.url).await?;
        let interval = Duration::from_micros(1_000_000 / rate);
        let mut tick = tokio::time::interval(interval);
        for i in 0..total {
            tick.tick().await;
            sent_at[i].store(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
            publisher.publish(&events[run * total + i]).await?;
        }
        done.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for r in readers {
            lat.extend(r.await?);
        }
        counts.push(lat.len() as f64);
        p50s.push(percentile_ms(&mut lat, 0.5));
        p99s.push(percentile_ms(&mut lat, 0.99));
    }
    Ok((median(p50s), median(p99s), median(counts) as usize))
}

/// `n` KeyPackage events shaped as clients publish them, spread over
/// `owners`: legacy 443s, so one pool per owner consumed one per request
/// (30443 slots are devices, whose last KeyPackage is never consumed). The
/// MLS bytes are filler: the gateway reads only their lifetime, if any.
pub(crate) fn key_packages(n: usize, owners: &[Keys]) -> Vec<Event> {
    sign_many(n, owners, |i| {
        let content = base64::engine::general_purpose::STANDARD.encode([i as u8; 300]);
        let tags = vec![
            vec!["mls_protocol_version".into(), "1.0".into()],
            vec!["mls_ciphersuite".into(), "0x0001".into()],
            vec!["encoding".into(), "base64".into()],
            vec!["i".into(), format!("{i:064x}")],
        ];
        (443, content, tags)
    })
}

/// Owners with KeyPackages, then 300 connections fetching them.
async fn keypackage_fetch(relay: &RelayProcess) -> anyhow::Result<(f64, f64, f64)> {
    const OWNERS: usize = 1000;
    const PER_OWNER: usize = 10;
    let owners = keys(OWNERS);
    let kps = key_packages(OWNERS * PER_OWNER, &owners);
    let mut loaders = Vec::new();
    for chunk in kps.chunks(kps.len().div_ceil(50)) {
        let chunk: Vec<String> = chunk.iter().map(|e| e.as_json()).collect();
        let url = relay.url.clone();
        loaders.push(tokio::spawn(async move {
            let mut c = Conn::connect(&url).await.unwrap();
            for e in chunk {
                assert!(c.publish(&e).await.unwrap(), "KeyPackage refused");
            }
        }));
    }
    for l in loaders {
        l.await?;
    }
    let owner_hex: Arc<Vec<String>> = Arc::new(owners.iter().map(|k| k.public_key().to_hex()).collect());
    let filter: FilterFn = Arc::new(Box::new(move |i| {
        format!("{{\"kinds\":[30443,443],\"authors\":[\"{}\"]}}", owner_hex[(i * 31) % owner_hex.len()])
    }));
    queries(relay, 300, filter).await
}

/// REQ load on 100 connections while the gateway's file is replaced.
async fn hot_swap(gateway: &Path) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("mls_gateway.wasm");
    std::fs::copy(gateway, &file)?;
    let relay = RelayProcess::start(&bench_config(&[("mls-gateway", &file)]), |_| {}).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..100 {
        let mut c = Conn::connect(&relay.url).await?;
        let (stop, failures) = (stop.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut longest = 0u64;
            let mut i = n;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if c.req("q", &format!("{{\"#t\":[\"tag{}\"],\"limit\":10}}", i % TAGS)).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                longest = longest.max(t.elapsed().as_micros() as u64);
                i += 1;
            }
            longest
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut bytes = std::fs::read(gateway)?;
    bytes.extend_from_slice(&[0, 6, 5]);
    bytes.extend_from_slice(b"bench");
    let tmp = dir.path().join("next.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &file)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut longest = 0u64;
    for t in tasks {
        longest = longest.max(t.await?);
    }
    Ok((longest as f64 / 1000.0, failures.load(Ordering::Relaxed)))
}

/// Opens `n` idle connections; returns the relay's memory growth per connection.
async fn idle_connections(relay: &RelayProcess, n: usize) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = relay.rss_bytes();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::connect(&relay.url).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = relay.rss_bytes();
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}
