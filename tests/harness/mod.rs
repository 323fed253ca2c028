//! The integration-test harness: starts the real `wasm-relay` binary on an
//! ephemeral loopback port with a temporary data directory and hands back
//! WebSocket clients that speak NIP-01.
//!
//! It depends on no `nostr` version, so both the relay's tests (nostr 0.45,
//! helpers in `nostr45.rs`) and the MLS client tests (nostr 0.44 via
//! mdk-core) use it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected reply may take before the test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestRelay {
    child: Child,
    pub addr: String,
    pub url: String,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
    /// Every line the relay has written to stderr.
    log: Arc<Mutex<Vec<String>>>,
}

/// The workspace root (the folder holding Cargo.lock).
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        assert!(dir.pop(), "no Cargo.lock above {}", env!("CARGO_MANIFEST_DIR"));
    }
    dir
}

/// The relay binary: cargo's own path for the relay's tests, else
/// `WASM_RELAY_BIN`, else the workspace's debug build.
pub fn relay_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_wasm-relay") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("WASM_RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/wasm-relay"));
    assert!(path.exists(), "{} is missing: run `make test` (it builds the relay first)", path.display());
    path
}

/// A plugin component built by `make plugins`.
pub fn plugin_path(file: &str) -> PathBuf {
    let path = workspace_root().join("target/plugins").join(file);
    assert!(path.exists(), "{} is missing: run `make plugins` (or `make test`) first", path.display());
    path
}

/// One compiled-plugin cache for the whole test run.
fn shared_plugin_cache() -> PathBuf {
    workspace_root().join("target/test-plugin-cache")
}

impl TestRelay {
    /// A relay on a fresh temporary data directory.
    pub async fn start() -> Self {
        Self::start_with_env(&[]).await
    }

    /// A relay with extra `WASM_RELAY_*` environment settings.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with(None, env).await
    }

    /// A relay with a TOML configuration file (its data directory and bind
    /// address are still the harness's).
    pub async fn start_with_config(toml: &str) -> Self {
        Self::start_with(Some(toml), &[]).await
    }

    /// A relay started with extra `serve` arguments (`--plugin`, `--setting`).
    pub async fn start_with_args(args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut relay = Self::spawn_with(temp.path().join("data"), vec![], None, args).await;
        relay._temp = Some(temp);
        relay
    }

    pub async fn start_with(toml: Option<&str>, env: &[(&str, &str)]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        let config = toml.map(|t| {
            let path = temp.path().join("relay.toml");
            std::fs::write(&path, t).expect("write config");
            path
        });
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut relay = Self::spawn(dir, env, config).await;
        relay._temp = Some(temp);
        relay
    }

    /// The relay's process, so a test can start one that must fail.
    pub fn command(data_dir: &Path, config: Option<&Path>) -> Command {
        let mut cmd = Command::new(relay_binary());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("serve").arg("--bind").arg("127.0.0.1:0").arg("--data-dir").arg(data_dir);
        cmd.env_remove("RUST_LOG").env("WASM_RELAY_LOG", "info");
        cmd.env("WASM_RELAY_PLUGIN_RUNTIME__CACHE_DIR", shared_plugin_cache());
        cmd
    }

    async fn spawn(data_dir: PathBuf, env: Vec<(String, String)>, config: Option<PathBuf>) -> Self {
        Self::spawn_with(data_dir, env, config, &[]).await
    }

    async fn spawn_with(data_dir: PathBuf, env: Vec<(String, String)>, config: Option<PathBuf>, args: &[&str]) -> Self {
        let mut cmd = Self::command(&data_dir, config.as_deref());
        cmd.args(args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("start the wasm-relay binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[relay] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("relay did not report its address within 30 s")
            .expect("reading relay stdout")
            .expect("relay exited before listening");
        let url = line.strip_prefix("wasm-relay listening on ").expect("listening line").to_string();
        let addr = url.trim_start_matches("ws://").to_string();
        // Keep draining stdout so the relay never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr, url, data_dir, _temp: None, env, config, log }
    }

    /// Waits until the relay logs a line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "the relay never logged \"{needle}\"");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lines logged so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The temporary folder holding the data directory and config.
    pub fn temp_dir(&self) -> &Path {
        self._temp.as_ref().expect("temp dir").path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url).await
    }

    /// SIGKILLs the relay and starts it again on the same data directory.
    pub async fn crash_and_restart(mut self) -> Self {
        self.child.kill().await.expect("kill relay");
        self.restart().await
    }

    /// Sends SIGTERM and waits for the relay to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("relay still running").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the relay did not exit within 30 s of SIGTERM")
            .expect("wait for relay")
    }

    /// Starts the relay again on the same data directory (after it stopped).
    pub async fn restart(mut self) -> Self {
        let temp = self._temp.take();
        let mut next = Self::spawn(self.data_dir.clone(), std::mem::take(&mut self.env), self.config.take()).await;
        next._temp = temp;
        next
    }

    /// The relay process's resident memory, from /proc (Linux).
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("relay running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }

    /// Stops the relay (SIGKILL) and keeps its data directory.
    pub async fn stop(&mut self) {
        self.child.kill().await.expect("kill relay");
    }

    /// Plain HTTP GET on the relay's port; returns (status line, headers, body).
    pub async fn http_get(&self, path: &str, accept: &str) -> (String, String, String) {
        self.http("GET", path, &[("Accept", accept)], b"").await
    }

    /// One HTTP/1.1 request on the relay's port; returns (status line,
    /// lower-cased headers, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (String, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(&self.addr).await.expect("connect");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(REPLY_TIMEOUT, s.read_to_end(&mut buf)).await.expect("http timeout").unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").expect("http response");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
    }
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages read while waiting for something else.
    buffered: VecDeque<Value>,
    /// The NIP-42 challenge the relay sent on connect.
    pub challenge: String,
}

impl Client {
    /// Connects and reads the relay's NIP-42 `AUTH` challenge.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await.expect("websocket connect");
        let mut c = Self { ws, buffered: VecDeque::new(), challenge: String::new() };
        let auth = c.recv().await;
        assert_eq!(auth[0], "AUTH", "the relay must open with an AUTH challenge, got {auth}");
        c.challenge = auth[1].as_str().expect("challenge string").to_string();
        c
    }

    /// Connects with extra handshake headers (e.g. the `X-Forwarded-For` a
    /// proxy in front of the relay would add).
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("request");
        for (name, value) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request.headers_mut().insert(name, value.parse().expect("header value"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("websocket connect");
        let mut c = Self { ws, buffered: VecDeque::new(), challenge: String::new() };
        let auth = c.recv().await;
        c.challenge = auth[1].as_str().expect("challenge string").to_string();
        c
    }

    /// Connects from another loopback address (e.g. `127.0.0.2`), which the
    /// relay treats as another client IP.
    pub async fn connect_from(url: &str, local_ip: &str) -> Self {
        let addr: std::net::SocketAddr = url.trim_start_matches("ws://").parse().expect("ws://ip:port");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(format!("{local_ip}:0").parse().expect("local address")).expect("bind local address");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("handshake");
        let mut c = Self { ws, buffered: VecDeque::new(), challenge: String::new() };
        let auth = c.recv().await;
        c.challenge = auth[1].as_str().expect("challenge string").to_string();
        c
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::Binary(data.into())).await.expect("send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string()).await;
    }

    async fn read_one(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(timeout, self.ws.next()).await.ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).expect("relay sent invalid JSON")),
                Some(Ok(Message::Close(frame))) => panic!("relay closed the connection: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("websocket error: {e}"),
                None => panic!("connection ended"),
            }
        }
    }

    /// Every message until the relay closes the connection (or nothing
    /// arrives for the reply timeout).
    pub async fn drain_until_closed(&mut self) -> Vec<Value> {
        let mut got: Vec<Value> = self.buffered.drain(..).collect();
        loop {
            match tokio::time::timeout(REPLY_TIMEOUT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => got.push(serde_json::from_str(&t).expect("relay sent invalid JSON")),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return got,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("the relay did not close the connection; got {got:?}"),
            }
        }
    }

    /// The next message, buffered ones first.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.buffered.pop_front() {
            return v;
        }
        self.read_one(REPLY_TIMEOUT).await.expect("no message from the relay within the timeout")
    }

    /// The first message satisfying `pred`; others are kept for later.
    pub async fn recv_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.recv_where_within(what, REPLY_TIMEOUT, pred).await
    }

    /// [`Self::recv_where`], waiting up to `wait` for each message (changes
    /// that travel between replicas take longer than a reply).
    pub async fn recv_where_within(&mut self, what: &str, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i).unwrap();
        }
        loop {
            let v = self
                .read_one(wait)
                .await
                .unwrap_or_else(|| panic!("timed out waiting for {what}; other messages: {:?}", self.buffered));
            if pred(&v) {
                return v;
            }
            self.buffered.push_back(v);
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        assert!(self.buffered.is_empty(), "unexpected buffered messages: {:?}", self.buffered);
        if let Some(v) = self.read_one(wait).await {
            panic!("expected no message, got {v}");
        }
    }

    pub async fn publish_raw(&mut self, event_json: &str, id: &str) -> (bool, String) {
        self.send_raw(&format!("[\"EVENT\",{event_json}]")).await;
        self.expect_ok(id).await
    }

    pub async fn expect_ok(&mut self, id: &str) -> (bool, String) {
        let ok = self.recv_where(&format!("OK for {id}"), |v| v[0] == "OK" && v[1] == id).await;
        (ok[2].as_bool().expect("OK flag"), ok[3].as_str().expect("OK message").to_string())
    }

    /// Publishes many `(event JSON, id)`, 100 in flight, and asserts `OK
    /// true` for each.
    pub async fn publish_many_ok(&mut self, events: &[(String, String)]) {
        for chunk in events.chunks(100) {
            for (json, _) in chunk {
                self.send_raw(&format!("[\"EVENT\",{json}]")).await;
            }
            for (_, id) in chunk {
                let (ok, why) = self.expect_ok(id).await;
                assert!(ok, "relay refused {id}: {why}");
            }
        }
    }

    /// Publishes event JSON and asserts `OK true`.
    pub async fn publish_raw_ok(&mut self, event_json: &str, id: &str) {
        let (accepted, message) = self.publish_raw(event_json, id).await;
        assert!(accepted, "relay refused {id}: {message}");
    }

    /// Sends a REQ and collects the stored events up to EOSE. Panics on CLOSED.
    pub async fn req(&mut self, sub: &str, filters: Vec<Value>) -> Vec<Value> {
        let mut msg = vec![json!("REQ"), json!(sub)];
        msg.extend(filters);
        self.send(Value::Array(msg)).await;
        let mut events = Vec::new();
        loop {
            let v = self
                .recv_where(&format!("EOSE for {sub}"), |v| {
                    v[1] == sub && (v[0] == "EVENT" || v[0] == "EOSE" || v[0] == "CLOSED")
                })
                .await;
            match v[0].as_str() {
                Some("EVENT") => events.push(v[2].clone()),
                Some("EOSE") => return events,
                _ => panic!("REQ {sub} was refused: {v}"),
            }
        }
    }

    /// The ids of a REQ's stored events, in the order received.
    pub async fn req_ids(&mut self, sub: &str, filters: Vec<Value>) -> Vec<String> {
        self.req(sub, filters).await.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    }

    /// Sends a REQ that must be refused; returns the CLOSED message.
    pub async fn req_refused(&mut self, sub: &str, filters: Vec<Value>) -> String {
        let mut msg = vec![json!("REQ"), json!(sub)];
        msg.extend(filters);
        self.send(Value::Array(msg)).await;
        let v = self.recv_where(&format!("reply to REQ {sub}"), |v| v[1] == sub).await;
        assert_eq!(v[0], "CLOSED", "expected CLOSED for {sub}, got {v}");
        v[2].as_str().unwrap().to_string()
    }

    pub async fn count(&mut self, sub: &str, filters: Vec<Value>) -> Value {
        let mut msg = vec![json!("COUNT"), json!(sub)];
        msg.extend(filters);
        self.send(Value::Array(msg)).await;
        self.recv_where(&format!("COUNT reply for {sub}"), |v| v[1] == sub).await
    }

    /// The next live event on `sub`, within `wait`.
    pub async fn next_event_within(&mut self, sub: &str, wait: Duration) -> Value {
        let v = self.recv_where_within(&format!("live EVENT on {sub}"), wait, |v| v[0] == "EVENT" && v[1] == sub).await;
        v[2].clone()
    }

    /// The next live event on `sub`.
    pub async fn next_event(&mut self, sub: &str) -> Value {
        let v = self.recv_where(&format!("live EVENT on {sub}"), |v| v[0] == "EVENT" && v[1] == sub).await;
        v[2].clone()
    }

    pub async fn notice(&mut self) -> String {
        let v = self.recv_where("NOTICE", |v| v[0] == "NOTICE").await;
        v[1].as_str().unwrap().to_string()
    }
}
