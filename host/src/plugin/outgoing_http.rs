//! `wasi:http` for plugins: outbound requests only to the hosts the
//! operator granted, every other request denied.
//!
//! Components built by the standard JavaScript and Python toolchains
//! (componentize-js, componentize-py) import the `wasi:http` interfaces
//! whether or not they use them, and a component whose imports the host
//! cannot satisfy does not load at all. So the host always links them. The
//! one call that reaches the network, `outgoing-handler.handle`, goes out only
//! when the request's host is on the plugin's allow-list: the hosts a contract
//! 0.2 plugin asked for (`capability::outbound-http`) that the operator also
//! granted (`grants.outbound_http`). Anything else answers
//! `HTTP-request-denied`; a 0.1 plugin's list is always empty. Each request
//! has the plugin's timeouts (connect, first byte, between bytes) and a cap
//! on the response body. Waiting on the network costs the plugin no CPU
//! budget (the budget is CPU time), only wall time.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::imports::PluginState;

/// Largest header map (`fields`) a plugin may build, in bytes of its
/// in-memory form: it bounds what a plugin can hold in host memory, outside
/// its own memory cap (wasmtime's default is 128 KiB a map).
const FIELD_SIZE_LIMIT: usize = 8 * 1024;
/// Largest write into an outgoing body's stream, for the same reason.
const BODY_CHUNK_BYTES: usize = 8 * 1024;

/// The `wasi:http` state of a new instance.
pub fn http_ctx() -> WasiHttpCtx {
    let mut ctx = WasiHttpCtx::new();
    ctx.set_field_size_limit(FIELD_SIZE_LIMIT);
    ctx
}

/// Where one loaded plugin version may send requests, and their limits.
#[derive(Debug)]
pub struct OutboundPolicy {
    pub plugin: String,
    /// `host:port` entries, lowercase; set once the plugin's `info` is known
    /// (until then, and for 0.1 plugins, nothing is allowed).
    allowed: OnceLock<Vec<String>>,
    /// Connect, first-byte and between-bytes timeout, each.
    pub timeout: Duration,
    /// Largest response body a plugin may read.
    pub max_response_bytes: usize,
}

impl OutboundPolicy {
    pub fn new(plugin: &str, timeout: Duration, max_response_bytes: usize) -> Self {
        Self { plugin: plugin.to_owned(), allowed: OnceLock::new(), timeout, max_response_bytes }
    }

    /// Sets the allow-list (once): `host` or `host:port` entries.
    pub fn allow(&self, hosts: Vec<String>) {
        let _ = self.allowed.set(hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect());
    }

    /// Whether a request to `host` on `port` may go out. An entry without a
    /// port allows the scheme's default port (80, 443) only.
    pub fn allows(&self, host: &str, port: u16, default_port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed.get().is_some_and(|list| {
            list.iter().any(|entry| match entry.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => h == host && p.parse() == Ok(port),
                _ => *entry == host && port == default_port,
            })
        })
    }
}

/// The `wasi:http` hooks of a plugin instance.
#[derive(Debug)]
pub struct OutgoingRequests {
    pub policy: Arc<OutboundPolicy>,
}

/// What `send_request` resolves to: a response and the future driving its body.
type SendOutcome = Result<(hyper::http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

impl WasiHttpHooks for OutgoingRequests {
    fn send_request(
        &mut self,
        request: hyper::http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_done: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = SendOutcome> + Send> {
        let uri = request.uri();
        let https = uri.scheme_str() == Some("https");
        let default_port = if https { 443 } else { 80 };
        let allowed = uri
            .host()
            .is_some_and(|host| self.policy.allows(host, uri.port_u16().unwrap_or(default_port), default_port));
        if !allowed {
            tracing::debug!(plugin = %self.policy.plugin, uri = %uri, "a plugin's outgoing HTTP request was denied");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        tracing::debug!(plugin = %self.policy.plugin, uri = %uri, "a plugin sends an HTTP request");
        let limit = self.policy.timeout;
        let capped = |asked: Option<Duration>| Some(asked.map_or(limit, |a| a.min(limit)));
        let options = RequestOptions {
            connect_timeout: capped(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: capped(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: capped(options.and_then(|o| o.between_bytes_timeout)),
        };
        let max_bytes = self.policy.max_response_bytes;
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let response = response.map(|body| {
                http_body_util::Limited::new(body, max_bytes)
                    .map_err(move |e| match e.downcast::<Error>() {
                        Ok(inner) => *inner,
                        Err(_) => Error::HttpResponseBodySize(Some(max_bytes as u64)),
                    })
                    .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>))
        })
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        BODY_CHUNK_BYTES
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_a_port_allows_only_the_default_port() {
        let policy = OutboundPolicy::new("p", Duration::from_secs(1), 1);
        assert!(!policy.allows("api.example", 443, 443), "nothing is allowed before the list is set");
        policy.allow(vec!["API.example".into(), "127.0.0.1:8089".into()]);
        assert!(policy.allows("api.example", 443, 443));
        assert!(policy.allows("api.example", 80, 80));
        assert!(!policy.allows("api.example", 8443, 443));
        assert!(policy.allows("127.0.0.1", 8089, 80));
        assert!(!policy.allows("127.0.0.1", 8090, 80));
        assert!(!policy.allows("evil.example", 443, 443));
    }
}
