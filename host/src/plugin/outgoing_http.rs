//! `wasi:http` for plugins, with every outgoing request denied.
//!
//! Contract 0.1 grants plugins no network. Components built by the standard
//! JavaScript and Python toolchains (componentize-js, componentize-py) import
//! the `wasi:http` interfaces whether or not they use them, and a component
//! whose imports the host cannot satisfy does not load at all. So the host
//! links the interfaces, and the one call that would reach the network,
//! `outgoing-handler.handle`, answers `HTTP-request-denied`. A later contract
//! version grants outbound access per plugin, by operator allow-list.

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::imports::PluginState;

/// Largest header map (`fields`) a plugin may build, in bytes of its
/// in-memory form. Nothing is sent, so this only bounds what a plugin can
/// hold in host memory, outside its own memory cap (wasmtime's default is
/// 128 KiB a map).
const FIELD_SIZE_LIMIT: usize = 8 * 1024;
/// Largest write into an outgoing body's stream, for the same reason.
const BODY_CHUNK_BYTES: usize = 8 * 1024;

/// The `wasi:http` state of a new instance.
pub fn http_ctx() -> WasiHttpCtx {
    let mut ctx = WasiHttpCtx::new();
    ctx.set_field_size_limit(FIELD_SIZE_LIMIT);
    ctx
}

/// The `wasi:http` hooks of a plugin instance: nothing is ever sent.
#[derive(Debug, Default)]
pub struct DenyOutgoingRequests;

/// What `send_request` resolves to: a response and the future driving its body.
type SendOutcome = Result<(hyper::http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

impl WasiHttpHooks for DenyOutgoingRequests {
    fn send_request(
        &mut self,
        request: hyper::http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _response_done: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = SendOutcome> + Send> {
        tracing::debug!(uri = %request.uri(), "a plugin's outgoing HTTP request was denied");
        Box::new(async { Err(Error::HttpRequestDenied) })
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
