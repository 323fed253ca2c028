//! Relay processes and minimal NIP-01 clients for the load generator.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::workspace_root;

pub struct RelayProcess {
    child: Child,
    pub url: String,
    /// The config file, and the data directory unless the caller owns it.
    _dir: tempfile::TempDir,
    data_dir: std::path::PathBuf,
}

/// Configuration for a benchmarked relay: limits off, optional plugins.
pub fn bench_config(plugins: &[(&str, &Path)]) -> String {
    let mut c = String::from(
        "[limits]\nmax_connections_per_ip = 100000\n[rate_limits]\nevents_per_minute_per_ip = 0\nevents_per_minute_per_pubkey = 0\nreqs_per_minute_per_ip = 0\nreqs_per_minute_per_pubkey = 0\n[log]\nfilter = \"warn\"\n",
    );
    for (name, path) in plugins {
        c.push_str(&format!("[[plugins]]\nname = \"{name}\"\npath = {:?}\n", path.display().to_string()));
        if *name == "mls-gateway" {
            c.push_str("[plugins.settings]\nrequests_per_hour = 0\n");
        }
    }
    c
}

impl RelayProcess {
    /// The value of one series of the relay's Prometheus metrics (0 when
    /// absent).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.url.trim_start_matches("ws://").trim_end_matches('/').to_owned();
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        let prefix = format!("{series} ");
        Ok(reply.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.parse::<f64>().ok()).unwrap_or(0.0))
    }

    /// Starts the release binary with `config` on a fresh data directory
    /// (or `data` prepared beforehand).
    pub async fn start(config: &str, prepare: impl FnOnce(&Path)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        prepare(&data_dir);
        Self::start_on(config, dir, data_dir).await
    }

    /// Starts the release binary on `data_dir`, which outlives it (a
    /// restart, or a store grown between runs).
    pub async fn start_in(config: &str, data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(config, tempfile::tempdir()?, data_dir.to_path_buf()).await
    }

    async fn start_on(config: &str, dir: tempfile::TempDir, data_dir: std::path::PathBuf) -> anyhow::Result<Self> {
        let cfg = dir.path().join("relay.toml");
        std::fs::write(&cfg, config)?;
        let bin = workspace_root().join("target/release/wasm-relay");
        anyhow::ensure!(bin.exists(), "{} is missing: run `make bench`", bin.display());
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .env("WASM_RELAY_PLUGIN_RUNTIME__CACHE_DIR", workspace_root().join("target/bench/plugin-cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??.unwrap_or_default();
        let url = line.strip_prefix("wasm-relay listening on ").unwrap_or_default().to_string();
        anyhow::ensure!(!url.is_empty(), "relay did not start");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, url, _dir: dir, data_dir })
    }

    /// The relay's `--data-dir`.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.data_dir.clone()
    }

    /// SIGKILL, as a crash would end it; returns once it is gone.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resident memory in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// Peak resident memory of `pid` since it started, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// A `kB` field of `/proc/PID/status`, in bytes (0 when unreadable).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User plus system CPU time of process `pid` (or `self`), in microseconds.
pub fn cpu_micros(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `)`.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    ticks * 10_000
}

/// Bytes allocated on disk under `dir` (what `du` reports).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

pub struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Conn {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        // No Nagle: a CLOSE followed by the next REQ must not wait for a delayed ACK.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
        let mut c = Self { ws };
        c.recv().await?; // the AUTH challenge
        Ok(c)
    }

    pub async fn send(&mut self, text: String) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.recv_text().await?)?)
    }

    /// The next text message, unparsed.
    async fn recv_text(&mut self) -> anyhow::Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("connection closed"),
            }
        }
    }

    /// Publishes one event JSON and waits for its OK; returns whether accepted.
    pub async fn publish(&mut self, json: &str) -> anyhow::Result<bool> {
        self.send(format!("[\"EVENT\",{json}]")).await?;
        loop {
            let v = self.recv().await?;
            if v[0] == "OK" {
                return Ok(v[2].as_bool() == Some(true));
            }
        }
    }

    /// A REQ up to EOSE; returns the number of events, or an error for CLOSED.
    /// EVENT messages are counted, not parsed: the load generator shares the
    /// relay's two cores, and parsing ten events per REQ would cost it more
    /// than the relay spends serving them.
    pub async fn req(&mut self, sub: &str, filter: &str) -> anyhow::Result<usize> {
        self.send(format!("[\"REQ\",\"{sub}\",{filter}]")).await?;
        let mut n = 0;
        loop {
            let text = self.recv_text().await?;
            if text.starts_with("[\"EVENT\",") {
                n += 1;
                continue;
            }
            let v: Value = serde_json::from_str(&text)?;
            match v[0].as_str() {
                Some("EOSE") => {
                    self.send(format!("[\"CLOSE\",\"{sub}\"]")).await?;
                    return Ok(n);
                }
                Some("CLOSED") => anyhow::bail!("CLOSED: {}", v[2]),
                _ => {}
            }
        }
    }
}
