//! Example plugin: answers REQs with operator-pinned events (for example a
//! relay announcement) through `add-events`, whether or not they are stored.
//! The `events` setting holds a JSON array of signed events; the relay checks
//! their signatures and the client's filters before serving them.

use wasm_relay_plugin_sdk::*;

struct PinnedEvents;

fn pinned() -> Vec<Event> {
    let Some(raw) = host::setting("events") else { return vec![] };
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(&raw) else {
        log(LogLevel::Warn, "setting 'events' is not a JSON array; serving nothing");
        return vec![];
    };
    items.iter().filter_map(parse_event).collect()
}

fn parse_event(v: &serde_json::Value) -> Option<Event> {
    Some(Event {
        id: v["id"].as_str()?.into(),
        pubkey: v["pubkey"].as_str()?.into(),
        created_at: v["created_at"].as_u64()?,
        kind: u16::try_from(v["kind"].as_u64()?).ok()?,
        tags: v["tags"]
            .as_array()?
            .iter()
            .map(|t| t.as_array().map(|t| t.iter().filter_map(|s| s.as_str().map(String::from)).collect()))
            .collect::<Option<Vec<Vec<String>>>>()?,
        content: v["content"].as_str()?.into(),
        sig: v["sig"].as_str()?.into(),
    })
}

impl Plugin for PinnedEvents {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "pinned-events".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: Some(vec![]),
            req_kinds: None,
            tick_interval_seconds: None,
            settings: vec![SettingSpec {
                name: "events".into(),
                default_value: "[]".into(),
                description: "JSON array of signed events served with every matching REQ".into(),
            }],
        }
    }

    fn on_event(_ctx: RequestContext, _event: Event) -> Decision {
        accept()
    }

    fn process_req(_ctx: RequestContext, filters: Vec<Filter>) -> ReqResult {
        let matching: Vec<Event> = pinned().into_iter().filter(|e| filters.iter().any(|f| f.matches(e))).collect();
        if matching.is_empty() { ReqResult::Continue } else { ReqResult::AddEvents(matching) }
    }

    fn tick(_now: u64) {}
}

export_plugin!(PinnedEvents);
