//! Host bindings generated from the WIT package `nostr-relay:plugin@0.1.0`
//! (`wit/0.1.0`). Every import is async (the metadata store may be remote)
//! and may trap; every export is called asynchronously so the epoch deadline
//! can interrupt it.

wasmtime::component::bindgen!({
    path: "../wit/0.1.0",
    world: "relay-plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use exports::nostr_relay::plugin::plugin as guest;
pub use nostr_relay::plugin::{events, host, kv, types};

/// WIT package versions this host can load.
pub const SUPPORTED_WIT_VERSIONS: &[&str] = &["0.1.0"];
/// The package every plugin must export `plugin` from.
pub const WIT_PACKAGE: &str = "nostr-relay:plugin";
