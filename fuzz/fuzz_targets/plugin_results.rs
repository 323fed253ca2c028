//! The host side of the WIT boundary: whatever event or filter records a
//! plugin returns, converting them never panics, and a converted event
//! round-trips.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wasm_relay::plugin::bindings::types as wit;
use wasm_relay::plugin::convert::{event_from_wit, event_to_wit, filter_from_wit};

#[derive(Arbitrary, Debug)]
struct WitEvent {
    id: String,
    pubkey: String,
    created_at: u64,
    kind: u16,
    tags: Vec<Vec<String>>,
    content: String,
    sig: String,
}

#[derive(Arbitrary, Debug)]
struct WitFilter {
    ids: Option<Vec<String>>,
    authors: Option<Vec<String>>,
    kinds: Option<Vec<u16>>,
    tags: Vec<(String, Vec<String>)>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<u64>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    event: WitEvent,
    filter: WitFilter,
}

fuzz_target!(|input: Input| {
    let e = input.event;
    let event = wit::Event {
        id: e.id,
        pubkey: e.pubkey,
        created_at: e.created_at,
        kind: e.kind,
        tags: e.tags,
        content: e.content,
        sig: e.sig,
    };
    if let Some(converted) = event_from_wit(&event) {
        let back = event_to_wit(&converted);
        assert_eq!(back.id, event.id.to_lowercase());
        assert_eq!(back.content, event.content);
    }
    let f = input.filter;
    let filter = wit::Filter {
        ids: f.ids,
        authors: f.authors,
        kinds: f.kinds,
        tags: f.tags.into_iter().map(|(name, values)| wit::TagFilter { name, values }).collect(),
        since: f.since,
        until: f.until,
        limit: f.limit,
    };
    let _ = filter_from_wit(&filter);
});
