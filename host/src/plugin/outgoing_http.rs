//! `wasi:http` for plugins, with every outgoing request denied.
//!
//! Contract 0.1 grants plugins no network. Components built by the standard
//! JavaScript and Python toolchains (componentize-js, componentize-py) import
//! the `wasi:http` interfaces whether or not they use them, and a component
//! whose imports the host cannot satisfy does not load at all. So the host
//! links the interfaces, and the one call that would reach the network,
//! `outgoing-handler.handle`, answers `HTTP-request-denied`. A later contract
//! version grants outbound access per plugin, by operator allow-list.

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::imports::PluginState;

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
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}
