//! The listener: HTTP/1.1 on one port, upgraded to WebSocket for Nostr
//! clients; plain GETs get the NIP-11 document or a short page.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::connection::Connection;
use crate::relay::Relay;

type Body = Full<Bytes>;

pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
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
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let relay = relay.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, relay.clone(), remote));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "http connection ended");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, relay: Arc<Relay>, remote: SocketAddr) -> Result<Response<Body>, Infallible> {
    if is_websocket_upgrade(&req) {
        return Ok(upgrade(req, relay, remote));
    }
    let wants_nip11 = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/nostr+json"));
    let response = match (req.method(), req.uri().path()) {
        (&Method::OPTIONS, _) => cors(Response::builder().status(StatusCode::NO_CONTENT)).body(Body::default()),
        (&Method::GET, "/") if wants_nip11 => {
            let doc = crate::nip11::document(&relay.config, relay.policy.restricted_writes()).to_string();
            cors(Response::builder().header(header::CONTENT_TYPE, "application/nostr+json")).body(Body::from(doc))
        }
        (&Method::GET, "/") => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Body::from(landing_page(&relay))),
        _ => Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("not found\n")),
    };
    Ok(response.expect("static response parts"))
}

fn cors(builder: hyper::http::response::Builder) -> hyper::http::response::Builder {
    builder
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .header(header::ACCESS_CONTROL_ALLOW_HEADERS, "*")
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS")
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
    let accept = derive_accept_key(key.as_bytes());
    let max_message = relay.config.limits.max_message_length;
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
                Connection::new(relay, ws, remote).run().await;
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
