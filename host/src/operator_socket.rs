//! The operator socket: `<data_dir>/admin.sock`, a Unix socket that only
//! the relay's own user can open (mode 0600). Whoever can open it is the
//! operator, so it needs no keys: it is how the CLI (`export`, `import`,
//! `sync`) works on a relay that is serving, instead of opening its store a
//! second time.
//!
//! The protocol is JSON lines. The client sends one request line,
//! `{"method": ..., "params": [...]}`; every NIP-86 method of the
//! management API ([`crate::admin`]) is accepted, plus:
//! - `export`: the relay streams the export (JSON lines: events, then
//!   tombstones), and
//! - `import`: the client streams JSON lines after the request and closes
//!   its side; each event takes the operator's write path
//!   ([`crate::intake`]), each tombstone is restored;
//! - `sync` `[url, filter, direction]`: see [`crate::sync`].
//!
//! Control lines from the relay are JSON arrays, never objects (export
//! lines are objects): `["progress", {...}]`, then one `["result", ...]`
//! or `["error", "..."]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::intake::{self, Source};
use crate::relay::Relay;
use crate::store::{Tombstone, WriteOutcome};

/// The socket of the relay serving `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Largest request line (a `swapplugin` carries a whole component in base64).
const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Import lines written at once (the ingest writer groups them into commits).
const IMPORTS_IN_FLIGHT: usize = 256;
/// Events read per export page.
const EXPORT_PAGE: usize = 1000;

/// Listens on `path` until `shutdown` turns true. A socket file left by a
/// relay that crashed is replaced (the store's lock already proved that no
/// other relay serves this data directory).
///
/// The returned task ends, the socket file removed, once `shutdown` turns
/// true: await it before the process exits, or the file may stay behind
/// (the runtime drops tasks it has not run yet).
pub fn start(
    relay: Arc<Relay>,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot create the operator socket {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let relay = relay.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_one(relay, stream).await {
                                tracing::warn!(error = %e, "operator socket request failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "operator socket accept failed"),
                },
                _ = shutdown.changed() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn serve_one(relay: Arc<Relay>, stream: UnixStream) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let n = (&mut reader).take(MAX_REQUEST_BYTES as u64).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(());
    }
    let request: Value = match serde_json::from_slice(&line) {
        Ok(v) => v,
        Err(e) => return reply(&mut write, json!(["error", format!("the request is not JSON: {e}")])).await,
    };
    let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_owned();
    let params = request.get("params").and_then(Value::as_array).cloned().unwrap_or_default();
    tracing::info!(%method, "operator socket request");
    match method.as_str() {
        "export" => export(&relay, &mut write).await,
        "import" => import(&relay, reader, &mut write).await,
        "sync" => sync(&relay, &params, &mut write).await,
        _ => {
            let answer = crate::admin::handle(&relay, "operator-socket", &line).await;
            let line = match (answer.get("result"), answer.get("error")) {
                (Some(result), _) => json!(["result", result]),
                (_, Some(error)) => json!(["error", error]),
                _ => json!(["error", "no answer"]),
            };
            reply(&mut write, line).await
        }
    }
}

async fn reply(write: &mut (impl AsyncWrite + Unpin), line: Value) -> anyhow::Result<()> {
    let mut text = line.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.flush().await?;
    Ok(())
}

/// Streams every stored event, then every tombstone. The store is read in
/// pages on the blocking pool while the relay keeps serving; tombstones come
/// last so that anything deleted while the pages were read is deleted again
/// by a restore. So a restore holds every event acknowledged before the
/// export began and none deleted before it ended.
async fn export(relay: &Arc<Relay>, write: &mut (impl AsyncWrite + Unpin)) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(4);
    let store = relay.store.clone();
    let slots = relay.heavy_reads.clone();
    let position = relay
        .replicator
        .as_ref()
        .and_then(|_| crate::replication::snapshot::log_position(&relay.config.storage.data_dir));
    let runtime = tokio::runtime::Handle::current();
    let read_pages = move || -> Result<(u64, u64), String> {
        let fail = |e: crate::store::StoreError| e.to_string();
        let mut chunk = Vec::new();
        if let Some(position) = position {
            chunk.extend_from_slice(json!({ crate::tools::LOG_POSITION: position }).to_string().as_bytes());
            chunk.push(b'\n');
        }
        let mut after = None;
        let (mut events, mut tombstones) = (0u64, 0u64);
        loop {
            // One page per turn of the large reads: the export yields to
            // clients' queries between pages.
            let page = {
                let _slot = runtime.block_on(slots.clone().acquire_owned());
                store.scan_all(after.as_ref(), EXPORT_PAGE).map_err(fail)?
            };
            for json in &page.events {
                chunk.extend_from_slice(json.as_bytes());
                chunk.push(b'\n');
            }
            events += page.events.len() as u64;
            if tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                return Err("the client left".to_owned());
            }
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        store
            .visit_tombstones(&mut |t| {
                chunk.extend_from_slice(serde_json::to_string(&t).expect("tombstones serialize").as_bytes());
                chunk.push(b'\n');
                tombstones += 1;
            })
            .map_err(fail)?;
        let _ = tx.blocking_send(Ok(chunk));
        Ok((events, tombstones))
    };
    // Its own thread, at a low priority: a backup takes what the relay's
    // clients leave of the CPU, not a share of theirs.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("export".into()).spawn(move || {
        lower_this_threads_priority();
        let _ = done_tx.send(read_pages());
    });
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(bytes) => write.write_all(&bytes).await?,
            Err(e) => return reply(write, json!(["error", e])).await,
        }
    }
    if let Err(e) = spawned {
        return reply(write, json!(["error", format!("the export could not start: {e}")])).await;
    }
    match done_rx.await {
        Ok(Ok((events, tombstones))) => {
            tracing::info!(events, tombstones, "exported through the operator socket");
            reply(write, json!(["result", {"events": events, "tombstones": tombstones}])).await
        }
        Ok(Err(e)) => reply(write, json!(["error", format!("the export failed: {e}")])).await,
        Err(e) => reply(write, json!(["error", format!("the export failed: {e}")])).await,
    }
}

/// Makes the calling thread yield to every normal-priority thread (Linux
/// `nice` 10 for this thread alone; it cannot be raised again, so only
/// threads of their own call it).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id changes nothing but its
    // scheduling weight.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// What an import into the running relay did.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OnlineImport {
    pub stored: u64,
    pub duplicates: u64,
    /// Older versions of replaceable events, deleted or vanished events.
    pub skipped: u64,
    /// Refused by the write path, by NIP-01 prefix.
    pub refused: std::collections::BTreeMap<String, u64>,
    pub tombstones: u64,
    /// Lines that are neither an event nor a tombstone.
    pub unreadable: u64,
}

impl OnlineImport {
    fn count(&mut self, outcome: Result<WriteOutcome, crate::refusal::Refusal>) {
        match outcome {
            Ok(WriteOutcome::Stored) => self.stored += 1,
            Ok(WriteOutcome::Duplicate) => self.duplicates += 1,
            Ok(_) => self.skipped += 1,
            Err(refusal) => *self.refused.entry(refusal.kind.prefix().to_owned()).or_default() += 1,
        }
    }
}

impl std::fmt::Display for OnlineImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let refused: u64 = self.refused.values().sum();
        write!(
            f,
            "{} stored, {} already present, {} skipped (superseded or deleted), {} refused {:?}, \
             {} tombstones, {} unreadable lines",
            self.stored, self.duplicates, self.skipped, refused, self.refused, self.tombstones, self.unreadable
        )
    }
}

async fn import(
    relay: &Arc<Relay>,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<()> {
    let mut summary = OnlineImport::default();
    let mut writes = FuturesUnordered::new();
    let mut lines = reader.lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() || line.starts_with("{\"log_position\"") {
            continue;
        }
        if line.contains("\"tombstone\"")
            && let Ok(tombstone) = serde_json::from_str::<Tombstone>(line)
        {
            // Events before a tombstone are written first: it must not be
            // undone by an earlier line's event, nor miss it.
            while let Some(outcome) = writes.next().await {
                summary.count(outcome);
            }
            let store = relay.store.clone();
            match tokio::task::spawn_blocking(move || store.restore_tombstones(&[tombstone])).await {
                Ok(Ok(())) => summary.tombstones += 1,
                Ok(Err(e)) => {
                    return reply(write, json!(["error", format!("restoring a tombstone failed: {e}")])).await;
                }
                Err(e) => return reply(write, json!(["error", format!("restoring a tombstone failed: {e}")])).await,
            }
            continue;
        }
        if !line.starts_with('{') {
            summary.unreadable += 1;
            continue;
        }
        let relay = relay.clone();
        let json = line.to_owned();
        writes.push(async move { intake::write(&relay, &json, Source::Import).await });
        if writes.len() >= IMPORTS_IN_FLIGHT
            && let Some(outcome) = writes.next().await
        {
            summary.count(outcome);
        }
    }
    while let Some(outcome) = writes.next().await {
        summary.count(outcome);
    }
    tracing::info!(%summary, "imported through the operator socket");
    reply(write, json!(["result", summary])).await
}

async fn sync(relay: &Arc<Relay>, params: &[Value], write: &mut (impl AsyncWrite + Unpin)) -> anyhow::Result<()> {
    let url = params.first().and_then(Value::as_str).unwrap_or_default().to_owned();
    let filter = params.get(1).cloned().unwrap_or_else(|| json!({}));
    let direction = match params.get(2).and_then(Value::as_str).unwrap_or("down") {
        "down" => crate::sync::Direction::Down,
        "up" => crate::sync::Direction::Up,
        "both" => crate::sync::Direction::Both,
        other => return reply(write, json!(["error", format!("direction '{other}': use down, up or both")])).await,
    };
    if url.is_empty() {
        return reply(write, json!(["error", "sync needs the other relay's URL (ws:// or wss://)"])).await;
    }
    // Progress goes out as it comes; the sync does not wait for the client.
    let (tx, mut rx) = mpsc::unbounded_channel::<crate::sync::SyncReport>();
    let task = {
        let relay = relay.clone();
        tokio::spawn(async move {
            let mut report = |r: &crate::sync::SyncReport| {
                let _ = tx.send(r.clone());
            };
            crate::sync::run(&relay, &url, &filter, direction, &mut report).await
        })
    };
    while let Some(progress) = rx.recv().await {
        reply(write, json!(["progress", progress])).await?;
    }
    match task.await {
        Ok(Ok(report)) => {
            tracing::info!(?report, "sync done");
            reply(write, json!(["result", report])).await
        }
        Ok(Err(e)) => reply(write, json!(["error", e.to_string()])).await,
        Err(e) => reply(write, json!(["error", format!("the sync failed: {e}")])).await,
    }
}

/// The CLI's side: a connection to the relay serving `data_dir`, if one is.
pub async fn connect(data_dir: &Path) -> Option<UnixStream> {
    UnixStream::connect(path(data_dir)).await.ok()
}

/// The CLI's side: sends `request` and hands every line of the answer to
/// `line` until the `result` (returned) or `error` (an `Err`).
pub async fn call(
    stream: UnixStream,
    request: Value,
    body: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
    line: &mut dyn FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let (read, mut write) = stream.into_split();
    reply(&mut write, request).await?;
    let sender = tokio::spawn(async move {
        if let Some(mut body) = body {
            tokio::io::copy(&mut body, &mut write).await?;
        }
        write.shutdown().await?;
        anyhow::Ok(write)
    });
    let mut lines = BufReader::new(read).lines();
    while let Some(text) = lines.next_line().await? {
        if text.starts_with('[')
            && let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(&text)
        {
            match parts.first().and_then(Value::as_str) {
                Some("result") => {
                    let _ = sender.await;
                    return Ok(parts.get(1).cloned().unwrap_or(Value::Null));
                }
                Some("error") => {
                    anyhow::bail!("{}", parts.get(1).and_then(Value::as_str).unwrap_or("the relay failed"));
                }
                _ => {}
            }
        }
        line(&text)?;
    }
    anyhow::bail!("the relay closed the operator socket before answering (see its log)")
}
