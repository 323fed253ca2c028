//! Rust SDK for wasm-relay plugins.
//!
//! A plugin implements [`Plugin`] and exports it with [`export_plugin!`]:
//!
//! ```ignore
//! use wasm_relay_plugin_sdk::*;
//! struct MyPlugin;
//! impl Plugin for MyPlugin { /* info, on_event, process_req, tick */ }
//! export_plugin!(MyPlugin);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the output
//! `.wasm` is a component the relay loads.
//!
//! The crate root targets contract `nostr-relay:plugin@0.1.0` (so plugins
//! written for it build unchanged); [`v0_2`] targets `@0.2.0`, with its
//! optional hooks (`on-stored`, `on-removed`, search, ...), and exports with
//! [`export_plugin_v0_2!`]. Each contract is vendored in this crate's
//! `wit/<version>` (a copy of the repository's `wit/`; a test in the relay
//! checks that they are the same). A plugin uses one of the two.

pub use v0_1::*;

/// Bindings and helpers for contract `nostr-relay:plugin@0.1.0`, also
/// re-exported at the crate root.
pub mod v0_1 {
    wit_bindgen::generate!({
        path: "wit/0.1.0",
        world: "relay-plugin",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "wasm_relay_plugin_sdk::v0_1",
    });

    /// The WIT package version these bindings build against.
    pub const WIT_VERSION: &str = "0.1.0";

    crate::contract_helpers!();
}

/// Bindings and helpers for contract `nostr-relay:plugin@0.2.0`. Export a
/// plugin with [`export_plugin_v0_2!`].
pub mod v0_2 {
    // The world is included under another name: the exported macro's
    // helper is named after the world, and 0.1's is `relay-plugin` too.
    wit_bindgen::generate!({
        inline: "
            package wasm-relay:sdk;
            world relay-plugin-v0-2 { include nostr-relay:plugin/relay-plugin@0.2.0; }
        ",
        path: "wit/0.2.0",
        world: "wasm-relay:sdk/relay-plugin-v0-2",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export_plugin_v0_2",
        default_bindings_module: "wasm_relay_plugin_sdk::v0_2",
    });

    /// The WIT package version these bindings build against.
    pub const WIT_VERSION: &str = "0.2.0";

    pub use nostr_relay::plugin::host::PublishError;

    crate::contract_helpers!();
}

/// What both contract versions' modules offer on top of their bindings.
#[doc(hidden)]
#[macro_export]
macro_rules! contract_helpers {
    () => {
        pub use exports::nostr_relay::plugin::plugin::Guest as Plugin;
        pub use nostr_relay::plugin::events;
        pub use nostr_relay::plugin::host::{self, LogLevel};
        pub use nostr_relay::plugin::kv::{self, Condition, KvError, Write};
        pub use nostr_relay::plugin::types::*;

        /// Accept the event.
        pub fn accept() -> Decision {
            Decision::Accept
        }

        /// Refuse the event with a prefix and a message.
        pub fn reject(kind: RefusalKind, message: impl Into<String>) -> Decision {
            Decision::Reject(Refusal { kind, message: message.into() })
        }

        /// Logs a line through the relay's log.
        pub fn log(level: LogLevel, message: &str) {
            host::log(level, message);
        }

        /// The operator's value for `name`, parsed, or `default` when absent or
        /// unparseable.
        pub fn setting_or<T: std::str::FromStr>(name: &str, default: T) -> T {
            host::setting(name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
        }

        /// A comma-separated list of kinds from a setting (`"1, 7,30023"`).
        pub fn setting_kinds(name: &str) -> Vec<u16> {
            host::setting(name)
                .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect())
                .unwrap_or_default()
        }

        impl Event {
            /// The first value of the first tag named `name`.
            pub fn tag_value(&self, name: &str) -> Option<&str> {
                self.tags
                    .iter()
                    .find(|t| t.first().is_some_and(|n| n == name))
                    .and_then(|t| t.get(1))
                    .map(String::as_str)
            }

            /// All tags named `name`.
            pub fn tags_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Vec<String>> + 'a {
                self.tags.iter().filter(move |t| t.first().is_some_and(|n| n == name))
            }
        }

        impl Filter {
            /// Whether this filter could match an event of `kind`.
            pub fn could_match_kind(&self, kind: u16) -> bool {
                self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
            }

            /// Whether `event` matches this filter (NIP-01 rules).
            pub fn matches(&self, event: &Event) -> bool {
                self.ids.as_ref().is_none_or(|ids| ids.contains(&event.id))
                    && self.authors.as_ref().is_none_or(|a| a.contains(&event.pubkey))
                    && self.kinds.as_ref().is_none_or(|k| k.contains(&event.kind))
                    && self.since.is_none_or(|s| event.created_at >= s)
                    && self.until.is_none_or(|u| event.created_at <= u)
                    && self.tags.iter().all(|tf| {
                        event.tags.iter().any(|t| t.len() >= 2 && t[0] == tf.name && tf.values.contains(&t[1]))
                    })
            }
        }

        /// Key-value helpers over the host store.
        pub mod store {
            use super::kv;
            pub use super::kv::{Condition, KvError, Write};

            /// Atomically replaces `key`'s `expected` value with `new` (`None`:
            /// absent / delete). Returns whether it happened.
            pub fn compare_and_swap(key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> Result<bool, KvError> {
                kv::transact(
                    &[Condition { key: key.into(), expected: expected.map(<[u8]>::to_vec) }],
                    &[Write { key: key.into(), value: new.map(<[u8]>::to_vec) }],
                )
            }

            /// Every entry under `prefix`, paging through the store.
            pub fn scan_all(prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
                let mut out: Vec<(String, Vec<u8>)> = Vec::new();
                loop {
                    let after = out.last().map(|(k, _)| k.clone());
                    let page = kv::scan_prefix(prefix, after.as_deref(), 500)?;
                    let done = page.len() < 500;
                    out.extend(page);
                    if done {
                        return Ok(out);
                    }
                }
            }
        }
    };
}
