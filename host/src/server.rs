//! The listener: HTTP/1.1 on one port, upgraded to WebSocket for Nostr
//! clients. Plain HTTP: the NIP-11 document or a short page at `/`, the
//! NIP-86 management API (POST `/`), `/health`, `/ready`, and the
//! Prometheus metrics at `metrics.path`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::config::Config;
use crate::connection::Connection;
use crate::relay::Relay;

type Body = Full<Bytes>;

/// How long a shutdown waits for connections to say goodbye and for their
/// pending events to be written.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections until `shutdown` turns true; then stops listening,
/// asks every connection to close (each answers its pending EVENTs first)
/// and waits for them, at most [`DRAIN_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    accept_until_shutdown(&listener, &relay, &mut shutdown).await;
    drop(listener);
    relay.shutdown.send_replace(true);
    let open = || relay.metrics.connections_open.get();
    tracing::info!(connections = open(), "stopped listening; closing connections");
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if open() > 0 {
        tracing::warn!(connections = open(), "connections still open after the drain timeout");
    }
    Ok(())
}

async fn accept_until_shutdown(listener: &TcpListener, relay: &Arc<Relay>, shutdown: &mut watch::Receiver<bool>) {
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let relay = relay.clone();
        tokio::spawn(async move {
            let handshake = std::time::Duration::from_secs(relay.config.limits.handshake_timeout_seconds);
            let service = service_fn(move |req| handle(req, relay.clone(), remote));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "http connection ended");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    // Behind a trusted proxy, the client's own address; else the peer's.
    let remote = crate::client_address::resolve(req.headers(), peer, &relay.config.server);
    let path = req.uri().path();
    // The management API answers blocked addresses too (its callers prove
    // who they are, before any body is read), so an operator can always
    // undo a block.
    if req.method() == Method::POST && path == "/" {
        return Ok(management(req, relay, remote).await);
    }
    if relay.policy.ip_blocked(remote.ip()) {
        return Ok(text(StatusCode::FORBIDDEN, "blocked: this relay does not serve your network\n"));
    }
    if is_websocket_upgrade(&req) {
        return Ok(upgrade(req, relay, remote));
    }
    if req.method() == Method::GET && relay.config.metrics.enabled && path == relay.config.metrics.path {
        return Ok(metrics(&req, &relay).await);
    }
    let wants_nip11 = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/nostr+json"));
    let response = match (req.method(), req.uri().path()) {
        (&Method::OPTIONS, _) => cors(Response::builder().status(StatusCode::NO_CONTENT)).body(Body::default()),
        (&Method::GET, "/") if wants_nip11 => {
            let plugin_fields = relay.plugins.relay_info_additions();
            let doc =
                crate::nip11::document(&relay.config, relay.policy.restricted_writes(), &plugin_fields).to_string();
            cors(Response::builder().header(header::CONTENT_TYPE, "application/nostr+json")).body(Body::from(doc))
        }
        (&Method::GET, "/") => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Body::from(landing_page(&relay))),
        (&Method::GET, "/health") => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/ready") => Ok(ready(&relay).await),
        _ => Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("not found\n")),
    };
    Ok(response.expect("static response parts"))
}

fn cors(builder: hyper::http::response::Builder) -> hyper::http::response::Builder {
    builder
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .header(header::ACCESS_CONTROL_ALLOW_HEADERS, "*")
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body))
        .expect("static response parts")
}

fn json_response(status: StatusCode, content_type: &'static str, body: serde_json::Value) -> Response<Body> {
    cors(Response::builder().status(status).header(header::CONTENT_TYPE, content_type))
        .body(Body::from(body.to_string()))
        .expect("static response parts")
}

/// How long a `/ready` probe of a shared metadata store is reused.
const SHARED_METADATA_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// `/ready`: 200 when this replica can serve reads: the event store answers,
/// no plugin is disabled, and (with replication) it has applied the shared
/// log as it stood when it started; otherwise 503 naming what is wrong. A shared
/// metadata store (Firestore) that does not answer leaves the relay ready but
/// `degraded`, named in the body: every replica shares it, and failing them
/// all at once would stop the reads their own stores still serve. A local
/// metadata store that does not answer is this replica's fault: 503.
async fn ready(relay: &Arc<Relay>) -> Response<Body> {
    let store = relay.store.clone();
    let store_ok = match tokio::task::spawn_blocking(move || store.get(&[0; 32])).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let shared_metadata = relay.config.metadata.backend == crate::config::MetadataBackend::Firestore;
    let metadata_ok = {
        // A probe of the shared store is a billed read: one per interval
        // however often `/ready` is asked.
        let mut last = relay.metadata_probe.lock().await;
        match &*last {
            Some((at, result)) if shared_metadata && at.elapsed() < SHARED_METADATA_PROBE_INTERVAL => result.clone(),
            _ => {
                let result = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    relay.metadata.get(crate::operator_lists::NAMESPACE, "ready-probe"),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer within 5 s".to_string()),
                };
                *last = Some((std::time::Instant::now(), result.clone()));
                result
            }
        }
    };
    let disabled: Vec<String> = relay.plugins.status().into_iter().filter(|p| p.disabled).map(|p| p.name).collect();
    let check = |r: &Result<(), String>| match r {
        Ok(()) => serde_json::json!("ok"),
        Err(e) => serde_json::json!(e),
    };
    let mut degraded = Vec::new();
    if let (Err(e), true) = (&metadata_ok, shared_metadata) {
        degraded.push(format!(
            "metadata store (Firestore): {e}; plugins' state, the operator's lists and replicated writes may fail"
        ));
    }
    // A replica still replaying the shared log serves a partial store.
    let replaying = relay.replicator.as_ref().filter(|r| !r.caught_up()).map(|r| {
        format!(
            "replaying the shared event log ({} events applied so far)",
            r.applied.load(std::sync::atomic::Ordering::Relaxed)
        )
    });
    let is_ready =
        store_ok.is_ok() && (metadata_ok.is_ok() || shared_metadata) && disabled.is_empty() && replaying.is_none();
    let body = serde_json::json!({
        "ready": is_ready,
        "event_store": check(&store_ok),
        "metadata_store": check(&metadata_ok),
        "plugins": relay.plugins.slots().len(),
        "disabled_plugins": disabled,
        "degraded": degraded,
        "replication": replaying.unwrap_or_else(|| if relay.replicator.is_some() { "following".into() } else { "off".into() }),
    });
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, "application/json", body)
}

/// The Prometheus text exposition, behind the optional bearer token.
async fn metrics(req: &Request<Incoming>, relay: &Arc<Relay>) -> Response<Body> {
    if let Some(token) = &relay.config.metrics.bearer_token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let expected = format!("Bearer {token}");
        // Constant-time comparison: the token is a secret.
        let matches = given.is_some_and(|g| {
            g.len() == expected.len() && g.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !matches {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(header::WWW_AUTHENTICATE, "Bearer")
                .body(Body::from("unauthorized: send Authorization: Bearer <metrics.bearer_token>\n"))
                .expect("static response parts");
        }
    }
    relay.plugins.refresh_usage_metrics();
    if let Some(firestore) = &relay.firestore {
        relay.metrics.sync_firestore_usage(firestore.usage());
    }
    if let Some(replicator) = &relay.replicator {
        let repaired = &relay.metrics.replication_repaired;
        repaired.inc_by(replicator.repaired.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(repaired.get()));
    }
    if let Some(size) = relay.store.size_on_disk() {
        relay.metrics.store_size_bytes.set(i64::try_from(size).unwrap_or(i64::MAX));
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
        .body(Body::from(relay.metrics.render()))
        .expect("static response parts")
}

/// NIP-86: a JSON-RPC request authorized with NIP-98. The body is read only
/// after the `Authorization` header proved an admin, only up to
/// `admin.max_body_bytes`, and only for `admin.body_timeout_seconds`: the API
/// off, a blocked address or a stranger cost the relay no body at all.
async fn management(req: Request<Incoming>, relay: Arc<Relay>, remote: SocketAddr) -> Response<Body> {
    let refuse = |status: StatusCode, message: String| {
        json_response(status, crate::admin::CONTENT_TYPE, serde_json::json!({ "error": message }))
    };
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let identity = crate::auth::RelayIdentity {
        admins: &relay.config.admin.pubkeys,
        public_url: &relay.config.server.public_url,
        spent: &relay.admin_replays,
    };
    let admin = match crate::auth::authorize_header(&identity, auth, crate::event::unix_now()) {
        Ok(admin) => admin,
        Err(e) => {
            tracing::info!(%remote, error = %e, "management API call refused");
            return refuse(StatusCode::UNAUTHORIZED, e.to_string());
        }
    };
    let limits = &relay.config.admin;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over admin.max_body_bytes ({} bytes)", limits.max_body_bytes),
        );
    }
    let read = Limited::new(req.into_body(), limits.max_body_bytes).collect();
    let body = match tokio::time::timeout(std::time::Duration::from_secs(limits.body_timeout_seconds), read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the request body: {e}")),
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {} s", limits.body_timeout_seconds),
            );
        }
    };
    if let Err(e) = crate::auth::authorize_body(&relay.admin_replays, &admin, &body) {
        tracing::info!(%remote, error = %e, "management API call refused");
        return refuse(StatusCode::UNAUTHORIZED, e.to_string());
    }
    let reply = crate::admin::handle(&relay, &admin.pubkey, &body).await;
    json_response(StatusCode::OK, crate::admin::CONTENT_TYPE, reply)
}

fn landing_page(relay: &Relay) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{name}</title></head><body><h1>{name}</h1><p>{desc}</p>\
         <p>This is a Nostr relay. Connect a Nostr client to <code>{url}</code>.</p></body></html>\n",
        name = esc(&relay.config.info.name),
        desc = esc(&relay.config.info.description),
        url = esc(&relay.config.server.public_url),
    )
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    req.method() == Method::GET && has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

fn upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, remote: SocketAddr) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::from("missing Sec-WebSocket-Key\n"))
            .expect("static response parts");
    };
    let permit = match relay.connections.admit(remote.ip()) {
        Ok(permit) => permit,
        Err(refused) => {
            tracing::info!(target: "wasm_relay::refused", %remote, reason = %refused, "connection refused");
            return Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .header(header::RETRY_AFTER, "5")
                .body(Body::from(format!("{refused}\n")))
                .expect("static response parts");
        }
    };
    let accept = derive_accept_key(key.as_bytes());
    let max_message = relay.config.limits.max_message_length;
    // Headers for plugins' `on-connect`, collected only when one asks.
    let headers: Vec<(String, String)> = if relay.plugins.wants_on_connect() {
        req.headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect()
    } else {
        Vec::new()
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(upgraded) => {
                // Frames up to 4x the protocol limit are read and answered with a
                // NOTICE; beyond that the connection closes with code 1009.
                let mut ws_config = WebSocketConfig::default();
                ws_config.max_message_size = Some(max_message.saturating_mul(4).max(1 << 20));
                ws_config.max_frame_size = ws_config.max_message_size;
                // Small per-connection buffers (tungstenite defaults to 128 KiB
                // each), so idle connections stay cheap; they grow with traffic.
                ws_config.read_buffer_size = 4 * 1024;
                ws_config.write_buffer_size = 16 * 1024;
                ws_config.max_write_buffer_size = 8 * 1024 * 1024;
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config)).await;
                Connection::new(relay, ws, remote).run(headers).await;
                drop(permit);
            }
            Err(e) => tracing::debug!(%remote, error = %e, "websocket upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::default())
        .expect("static response parts")
}
/// A bound relay, ready to serve.
pub struct BoundRelay {
    relay: Arc<Relay>,
    listener: TcpListener,
    /// The operator socket's listener, awaited at shutdown so that its file
    /// is gone before the process exits.
    operator_socket: Option<tokio::task::JoinHandle<()>>,
}

impl BoundRelay {
    pub async fn bind(mut config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.server.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.bind))?;
        if config.server.public_url.is_empty() {
            config.server.public_url = format!("ws://{}", listener.local_addr()?);
        }
        let relay = Relay::open(config).await?;
        let mut operator_socket = None;
        // Ready before the relay says it listens, so scripts can use it at once.
        #[cfg(unix)]
        if relay.config.admin.socket {
            let path = crate::operator_socket::path(&relay.config.storage.data_dir);
            // Without it the relay still serves; only the CLI's online
            // export, import, sync and admin are unavailable.
            match crate::operator_socket::start(relay.clone(), path, relay.shutdown.subscribe()) {
                Ok(task) => operator_socket = Some(task),
                Err(e) => tracing::warn!(error = %e, "the operator socket is off"),
            }
        }
        Ok(Self { relay, listener, operator_socket })
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true; returns once the operator
    /// socket's file is removed too.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let served = serve(self.listener, self.relay, shutdown).await;
        if let Some(task) = self.operator_socket {
            // `serve` turned the relay's shutdown on, which ends the task.
            let _ = task.await;
        }
        served
    }
}
