//! Example plugin: a writer policy. Events whose kind is not in the
//! `allowed-kinds` setting are refused with `blocked:`.

use wasm_relay_plugin_sdk::*;

struct KindAllowlist;

impl Plugin for KindAllowlist {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "kind-allowlist".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: None,
            // Never consulted on reads.
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![SettingSpec {
                name: "allowed-kinds".into(),
                default_value: "0,1,3,5,7".into(),
                description: "Comma-separated kinds this relay accepts".into(),
            }],
        }
    }

    fn on_event(_ctx: RequestContext, event: Event) -> Decision {
        let allowed = setting_kinds("allowed-kinds");
        if allowed.contains(&event.kind) {
            accept()
        } else {
            reject(RefusalKind::Blocked, format!("kind {} is not accepted by this relay", event.kind))
        }
    }

    fn process_req(_ctx: RequestContext, _filters: Vec<Filter>) -> ReqResult {
        ReqResult::Continue
    }

    fn tick(_now: u64) {}
}

export_plugin!(KindAllowlist);
