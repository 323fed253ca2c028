//! `make bench ONLY=peer`: this relay beside a peer relay (rnostr, from
//! crates.io) under the same public load client (nostr-bench, from
//! crates.io), as an operator comparing relays would measure them.
//!
//! For each connection count both relays start fresh; nostr-bench then runs
//! against them interleaved, A B A B, first publishing (`event`), then
//! querying (`req --limit 10`). Everything about the relays comes from
//! outside them: CPU from `/proc/PID/stat`, peak memory from `VmHWM`, disk
//! from the data directory's allocated blocks. The peer binaries live in
//! `target/peers/bin`, installed by `make peers` (pinned versions).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{RelayProcess, bench_config, cpu_micros, disk_bytes, peak_rss};
use crate::scenarios::{keys, sign_many};
use crate::{Row, median, workspace_root};

/// Versions `make peers` installs; printed with the table.
pub const RNOSTR_VERSION: &str = "0.4.8";
pub const NOSTR_BENCH_VERSION: &str = "0.4.0";

/// Seconds each nostr-bench run keeps its connections open.
const RUN_SECONDS: u64 = 20;
/// Alternations per phase: A B A B.
const ROUNDS: usize = 2;
const CONNECTION_COUNTS: [usize; 2] = [300, 1000];

fn peer_bin(name: &str) -> PathBuf {
    workspace_root().join("target/peers/bin").join(name)
}

/// The relay under the comparison: either side.
enum Side {
    Ours(RelayProcess),
    Rnostr { child: Child, url: String, data: tempfile::TempDir },
}

impl Side {
    fn url(&self) -> &str {
        match self {
            Side::Ours(r) => &r.url,
            Side::Rnostr { url, .. } => url,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Side::Ours(r) => r.pid(),
            Side::Rnostr { child, .. } => child.id().unwrap_or(0),
        }
    }

    fn data_dir(&self) -> PathBuf {
        match self {
            Side::Ours(r) => r.data_dir(),
            Side::Rnostr { data, .. } => data.path().join("data"),
        }
    }

    /// This relay as the issue measured it: the MLS gateway loaded, rate
    /// limits off (`bench_config`).
    async fn ours() -> anyhow::Result<Self> {
        let gateway = workspace_root().join("target/plugins/mls_gateway.wasm");
        Ok(Side::Ours(RelayProcess::start(&bench_config(&[("mls-gateway", &gateway)]), |_| {}).await?))
    }

    /// rnostr with its example configuration's defaults (LMDB; auth, rate
    /// limits, count and search extensions off).
    async fn rnostr() -> anyhow::Result<Self> {
        let bin = peer_bin("rnostr");
        anyhow::ensure!(bin.exists(), "{} is missing: run `make peers`", bin.display());
        let data = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = data.path().join("rnostr.toml");
        std::fs::write(
            &config,
            format!(
                "[information]\nname = \"rnostr\"\n[data]\npath = {:?}\n[network]\nhost = \"127.0.0.1\"\nport = {port}\n\
                 [auth]\nenabled = false\n[rate_limiter]\nenabled = false\n[count]\nenabled = false\n[search]\nenabled = false\n",
                data.path().join("data").display().to_string()
            ),
        )?;
        let child = Command::new(bin)
            .arg("relay")
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok(Side::Rnostr { child, url: format!("ws://{addr}"), data });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("rnostr did not start listening on {addr}")
    }
}

/// Event `i` as nostr-bench 0.4.0 publishes it (`gen_note_event`), by the
/// author `author` (hex; nostr-bench signs each with a fresh key): kind 1,
/// its fixed content, a `p` tag to the author, one fixed `e` tag, the `t`
/// tag `nostr-bench-` and one of 1000 others. `(kind, content, tags)`, for
/// `scenarios::sign_many`.
pub(crate) fn nostr_bench_note(i: usize, author: String) -> (u16, String, Vec<Vec<String>>) {
    let tags = vec![
        vec!["p".to_string(), author],
        vec!["e".into(), "378f145897eea948952674269945e88612420db35791784abf0616b4fed56ef7".into()],
        vec!["t".into(), "nostr-bench-".into()],
        vec!["t".into(), format!("nostr-bench-{}", i % 1000)],
    ];
    (1, "This is a message from nostr-bench client".into(), tags)
}

/// The JSON size of one such event.
fn bench_event_json_bytes() -> usize {
    let author = keys(1);
    sign_many(1, &author, |i| nostr_bench_note(500 + i, author[0].public_key().to_hex()))
        .first()
        .map_or(0, |e| e.as_json().len())
}

/// One nostr-bench run's figures, over its steady window: the stretch in
/// which all connections were open (between its first and last two-second
/// report with every connection alive).
#[derive(Clone, Copy, Default)]
struct RunFigures {
    /// Acknowledged events (event) or answered REQs (req) per second.
    rate: f64,
    /// nostr-bench's average time to a successful answer, whole run (ms).
    avg_ms: f64,
    /// Relay CPU per answered message in the window (µs).
    cpu_us: f64,
    /// Successes over the whole run (events stored, for `event`).
    successes: u64,
}

/// Runs `nostr-bench <mode>` against `side` with `conns` connections.
async fn nostr_bench(side: &Side, mode: &str, conns: usize) -> anyhow::Result<RunFigures> {
    let bin = peer_bin("nostr-bench");
    anyhow::ensure!(bin.exists(), "{} is missing: run `make peers`", bin.display());
    let mut cmd = Command::new(bin);
    cmd.arg(mode).arg(side.url()).args([
        "-c",
        &conns.to_string(),
        "-r",
        &conns.to_string(),
        "-k",
        &RUN_SECONDS.to_string(),
        "--json",
    ]);
    if mode == "req" {
        cmd.args(["--limit", "10"]);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = side.pid();
    // (elapsed ms, alive connections, successes, relay CPU µs) per report.
    let mut reports: Vec<(f64, u64, u64, u64)> = Vec::new();
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(RUN_SECONDS + 90);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        let cpu = cpu_micros(&pid.to_string());
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        reports.push((
            v["elapsed"].as_f64().unwrap_or(0.0),
            v["connect_stats"]["alive"].as_u64().unwrap_or(0),
            successes(&v, mode),
            cpu,
        ));
        last = v;
    }
    let _ = child.kill().await;
    let full: Vec<_> = reports.iter().filter(|r| r.1 as usize == conns).collect();
    anyhow::ensure!(full.len() >= 2, "nostr-bench never had all {conns} connections open against {}", side.url());
    let (first, end) = (full[0], full[full.len() - 1]);
    let seconds = (end.0 - first.0) / 1000.0;
    let answered = end.2.saturating_sub(first.2);
    Ok(RunFigures {
        rate: answered as f64 / seconds.max(0.001),
        avg_ms: last["message_stats"]["success_time"]["avg"].as_f64().unwrap_or(0.0),
        cpu_us: end.3.saturating_sub(first.3) as f64 / (answered.max(1)) as f64,
        successes: successes(&last, mode),
    })
}

/// Successes so far in one nostr-bench report: answered REQs, or events
/// acknowledged with `OK true` (nostr-bench counts any other reply, such as
/// an `AUTH` challenge, as an error).
fn successes(report: &Value, mode: &str) -> u64 {
    let m = &report["message_stats"];
    let complete = m["complete"].as_u64().unwrap_or(0);
    if mode == "req" { complete } else { complete.saturating_sub(m["error"].as_u64().unwrap_or(0)) }
}

/// Per side at one connection count: medians of the rounds, and the
/// figures read once after the ingest runs.
#[derive(Default)]
struct SideFigures {
    ingest: Vec<RunFigures>,
    req: Vec<RunFigures>,
    peak_rss: u64,
    disk: u64,
    stored: u64,
}

/// The median over rounds of one figure.
fn median_round(runs: &[RunFigures], f: fn(&RunFigures) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

pub async fn compare() -> anyhow::Result<Vec<Row>> {
    let event_bytes = bench_event_json_bytes() as f64;
    let mut rows = Vec::new();
    // PEER_CONNS=1000 runs one connection count (for iterating on a lever).
    let only: Option<usize> = std::env::var("PEER_CONNS").ok().and_then(|v| v.parse().ok());
    for conns in CONNECTION_COUNTS.into_iter().filter(|c| only.is_none_or(|o| o == *c)) {
        eprintln!(
            "peer comparison at {conns} connections: wasm-relay (MLS gateway) and rnostr {RNOSTR_VERSION}, client nostr-bench {NOSTR_BENCH_VERSION}..."
        );
        let sides = [Side::ours().await?, Side::rnostr().await?];
        let mut figures = [SideFigures::default(), SideFigures::default()];
        for _ in 0..ROUNDS {
            for (side, fig) in sides.iter().zip(figures.iter_mut()) {
                fig.ingest.push(nostr_bench(side, "event", conns).await?);
            }
        }
        for (side, fig) in sides.iter().zip(figures.iter_mut()) {
            fig.peak_rss = peak_rss(side.pid());
            fig.stored = fig.ingest.iter().map(|r| r.successes).sum();
            // Let both relays finish writing what they acknowledged.
            tokio::time::sleep(Duration::from_secs(2)).await;
            fig.disk = disk_bytes(&side.data_dir());
        }
        for _ in 0..ROUNDS {
            for (side, fig) in sides.iter().zip(figures.iter_mut()) {
                fig.req.push(nostr_bench(side, "req", conns).await?);
            }
        }
        drop(sides);
        let [ours, peer] = &figures;
        let line = |name: &str, a: f64, b: f64, unit: &str, target: &str, key: &str| {
            let ratio = a / b.max(f64::MIN_POSITIVE);
            Row {
                name: format!("vs rnostr, {conns} conns: {name}"),
                value: format!("{a:.0} / {b:.0} {unit} ({ratio:.2}x)"),
                target: target.into(),
                json: json!({ key: { "wasm_relay": a, "rnostr": b, "ratio": ratio } }),
            }
        };
        let ingest_target = if conns == 1000 { ">= 1.5x" } else { "" };
        type Pick = fn(&SideFigures) -> f64;
        let measures: [(&str, Pick, &str, &str, &str); 5] = [
            ("ingest (ours / rnostr)", |f| median_round(&f.ingest, |r| r.rate), "ev/s", ingest_target, "events_per_s"),
            ("avg OK latency", |f| median_round(&f.ingest, |r| r.avg_ms), "ms", "", "avg_ok_ms"),
            ("relay CPU per event", |f| median_round(&f.ingest, |r| r.cpu_us), "µs", "<= 1.0x", "cpu_us_per_event"),
            ("REQ limit 10", |f| median_round(&f.req, |r| r.rate), "req/s", ">= 1.5x", "reqs_per_s"),
            ("relay CPU per REQ", |f| median_round(&f.req, |r| r.cpu_us), "µs", "", "cpu_us_per_req"),
        ];
        for (name, pick, unit, target, key) in measures {
            rows.push(line(name, pick(ours), pick(peer), unit, target, key));
        }
        let mb = |b: u64| b as f64 / 1e6;
        rows.push(line("peak RSS during ingest", mb(ours.peak_rss), mb(peer.peak_rss), "MB", "<= 1.0x", "peak_rss_mb"));
        let per_event = |f: &SideFigures| f.disk as f64 / f.stored.max(1) as f64 / event_bytes;
        rows.push(Row {
            name: format!("vs rnostr, {conns} conns: disk / raw JSON ({} events)", ours.stored),
            value: format!("{:.2} / {:.2} ({event_bytes:.0} B events)", per_event(ours), per_event(peer)),
            target: "ours <= 1.5".into(),
            json: json!({ "disk_over_json": { "wasm_relay": per_event(ours), "rnostr": per_event(peer),
                "stored": { "wasm_relay": ours.stored, "rnostr": peer.stored }, "event_json_bytes": event_bytes } }),
        });
    }
    Ok(rows)
}
