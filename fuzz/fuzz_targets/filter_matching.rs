//! Arbitrary filters against arbitrary (unsigned) events: parsing and
//! `filter_matches` never panic, and a filter without conditions matches.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;
use support::unsigned_event;
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
