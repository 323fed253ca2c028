//! Test instrument for the optional hooks of contract 0.2.
//!
//! It counts what it receives with `host.count`, so a test reads it from the
//! relay's metrics: `stored_events` (events in `on-stored` calls),
//! `stored_calls`, `removed_<reason>` per removed event, `connections` and
//! `authentications`. Settings make it misbehave or refuse:
//! - `stall-ms`: every `on-stored` call first waits that long (a slow plugin,
//!   without spending its CPU budget);
//! - `refuse-header`: a connection whose upgrade request carries this header
//!   is refused with `blocked:`;
//! - `refuse-auth`: this pubkey's NIP-42 authentication is refused with
//!   `restricted:`;
//! - `publish-on-connect`: on every connection, it asks the relay to publish
//!   a kind 1 note with this content and tag `t` = `from-relay` (it asks for
//!   the capability `publish` when this is set), and counts the outcome as
//!   `published` or `publish_<error>`.

use wasm_relay_plugin_sdk::v0_2::*;

struct ContractHooks;

impl Plugin for ContractHooks {
    fn info() -> PluginInfo {
        let spec = |name: &str, default: &str, description: &str| SettingSpec {
            name: name.into(),
            default_value: default.into(),
            description: description.into(),
        };
        PluginInfo {
            name: "contract-hooks".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: Some(vec![]),
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![
                spec("stall-ms", "0", "Wait this long in every on-stored call"),
                spec("refuse-header", "", "Refuse connections whose upgrade request has this header"),
                spec("refuse-auth", "", "Refuse this pubkey's NIP-42 authentication"),
                spec("publish-on-connect", "", "Publish a note with this content on every connection"),
            ],
            hooks: vec![Hook::OnStored, Hook::OnRemoved, Hook::OnConnect, Hook::OnAuth],
            // Settings read in `info` are the operator's (defaults are not known yet).
            capabilities: if host::setting("publish-on-connect").is_some_and(|c| !c.is_empty()) {
                vec![Capability::Publish]
            } else {
                vec![]
            },
            relay_info: Nip11Contribution { supported_nips: vec![], fields: vec![] },
        }
    }

    fn on_event(_ctx: RequestContext, _event: Event) -> Decision {
        Decision::Accept
    }

    fn process_req(_ctx: RequestContext, _filters: Vec<Filter>) -> ReqResult {
        ReqResult::Continue
    }

    fn tick(_now: u64) {}

    fn on_stored(events: Vec<Event>) {
        let stall: u64 = setting_or("stall-ms", 0);
        if stall > 0 {
            std::thread::sleep(std::time::Duration::from_millis(stall));
        }
        host::count("stored_calls", 1);
        host::count("stored_events", events.len() as u64);
    }

    fn on_removed(events: Vec<RemovedEvent>) {
        for removed in events {
            let reason = match removed.reason {
                RemovalReason::Deleted => "deleted",
                RemovalReason::Expired => "expired",
                RemovalReason::Banned => "banned",
                RemovalReason::Vanished => "vanished",
                RemovalReason::Replaced => "replaced",
            };
            host::count(&format!("removed_{reason}"), 1);
        }
    }

    fn on_connect(conn: Connection) -> Decision {
        host::count("connections", 1);
        if let Some(content) = host::setting("publish-on-connect").filter(|c| !c.is_empty()) {
            let draft = EventDraft { kind: 1, tags: vec![vec!["t".into(), "from-relay".into()]], content };
            let outcome = match host::publish(&draft) {
                Ok(_) => "published",
                Err(PublishError::NotGranted) => "publish_not_granted",
                Err(PublishError::NoRelayKey) => "publish_no_relay_key",
                Err(PublishError::Refused(_)) => "publish_refused",
            };
            host::count(outcome, 1);
        }
        let refused = host::setting("refuse-header").unwrap_or_default();
        if !refused.is_empty() && conn.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(&refused)) {
            return reject(RefusalKind::Blocked, format!("connections with {refused} are not welcome"));
        }
        Decision::Accept
    }

    fn on_auth(ctx: RequestContext, pubkey: String) -> Decision {
        host::count("authentications", 1);
        if ctx.authed_pubkeys.contains(&pubkey) {
            return reject(RefusalKind::Error, "on-auth saw a pubkey already authenticated");
        }
        if host::setting("refuse-auth").is_some_and(|refused| refused == pubkey) {
            return reject(RefusalKind::Restricted, "this key may not authenticate here");
        }
        Decision::Accept
    }
}

export_plugin_v0_2!(ContractHooks);
