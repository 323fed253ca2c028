//! Arbitrary filters against arbitrary (unsigned) events: parsing and
//! `filter_matches` never panic, and a filter without conditions matches.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nostr::event::Event;
use wasm_relay::filter::{Filter, FilterLimits, filter_matches};

#[derive(Arbitrary, Debug)]
struct Input {
    filter_json: String,
    id: [u8; 32],
    created_at: u64,
    kind: u16,
    tags: Vec<Vec<String>>,
    content: String,
}


/// An event with these fields and a dummy signature (matching and plugins
/// look at fields; signatures are the host's business, checked elsewhere).
fn unsigned_event(id: [u8; 32], created_at: u64, kind: u16, tags: Vec<Vec<String>>, content: String) -> Option<Event> {
    let tags: Vec<Vec<String>> = tags.into_iter().filter(|t| !t.is_empty()).collect();
    serde_json::from_value(serde_json::json!({
        "id": hex(&id),
        "pubkey": "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        "created_at": created_at,
        "kind": kind,
        "tags": tags,
        "content": content,
        "sig": "01".repeat(64),
    }))
    .ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|input: Input| {
    let Ok(value) = serde_json::from_str(&input.filter_json) else { return };
    let Ok(filter) = Filter::parse(&value, FilterLimits { max_values: 5000 }) else { return };
    let Some(event) = unsigned_event(input.id, input.created_at, input.kind, input.tags, input.content) else {
        return;
    };
    let _ = filter_matches(&filter, &event);
    if let Ok(empty) = Filter::parse(&serde_json::json!({}), FilterLimits { max_values: 5000 }) {
        assert!(filter_matches(&empty, &event), "an empty filter matches every event");
    }
});
