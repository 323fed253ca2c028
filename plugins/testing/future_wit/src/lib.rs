//! A component built for `nostr-relay:plugin@9.0.0`, a contract version this
//! relay does not implement: `plugin check` and the loader must name the
//! version mismatch.

wit_bindgen::generate!({ path: "wit", world: "relay-plugin" });

struct FutureWit;

impl exports::nostr_relay::plugin::plugin::Guest for FutureWit {
    fn info() -> String {
        "future-wit".into()
    }
}

export!(FutureWit);
