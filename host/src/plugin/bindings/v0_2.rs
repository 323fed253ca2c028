//! Host bindings generated from `nostr-relay:plugin@0.2.0` (`wit/0.2.0`), the
//! newest contract. Its types are the ones the rest of the host works with;
//! older versions convert to and from them (see `v0_1`).

wasmtime::component::bindgen!({
    path: "../wit/0.2.0",
    world: "relay-plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use exports::nostr_relay::plugin::plugin as guest;
pub use nostr_relay::plugin::{events, host, kv, types};
