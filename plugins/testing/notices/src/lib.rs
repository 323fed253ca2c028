//! Test instrument for the contract 0.2 hooks `on-stored` and `on-removed`.
//!
//! It counts what it receives with `host.count`, so a test reads it from the
//! relay's metrics: `stored_events` (events in `on-stored` calls),
//! `stored_calls`, and `removed_<reason>` per removed event. With the
//! setting `stall-ms`, every `on-stored` call first waits that long (a slow
//! plugin, without spending its CPU budget).

use wasm_relay_plugin_sdk::v0_2::*;

struct Notices;

impl Plugin for Notices {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "notices".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: Some(vec![]),
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![SettingSpec {
                name: "stall-ms".into(),
                default_value: "0".into(),
                description: "Wait this long in every on-stored call".into(),
            }],
            hooks: vec![Hook::OnStored, Hook::OnRemoved],
            capabilities: vec![],
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

    fn on_connect(_conn: Connection) -> Decision {
        Decision::Accept
    }

    fn on_auth(_ctx: RequestContext, _pubkey: String) -> Decision {
        Decision::Accept
    }
}

export_plugin_v0_2!(Notices);
