//! Arbitrary filters against arbitrary (unsigned) events: parsing and
//! `filter_matches` never panic, and a filter without conditions matches.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nostr::event::{Event, EventId, Kind, Tag, Tags};
use nostr::key::PublicKey;
use nostr::secp256k1::schnorr::Signature;
use nostr::types::Timestamp;
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
    // A fixed valid key: matching looks at fields, never at signatures.
    let pubkey = PublicKey::from_slice(&[
        0x79, 0xbe, 0x66, 0x7e, 0xf9, 0xdc, 0xbb, 0xac, 0x55, 0xa0, 0x62, 0x95, 0xce, 0x87, 0x0b, 0x07, 0x02, 0x9b,
        0xfc, 0xdb, 0x2d, 0xce, 0x28, 0xd9, 0x59, 0xf2, 0x81, 0x5b, 0x16, 0xf8, 0x17, 0x98,
    ])
    .expect("valid key");
    let tags: Vec<Tag> = input.tags.into_iter().filter_map(|t| Tag::parse(t).ok()).collect();
    let sig = Signature::from_slice(&[1u8; 64]).expect("64 bytes");
    let event = Event::new(
        EventId::from_byte_array(input.id),
        pubkey,
        Timestamp::from(input.created_at),
        Kind::from(input.kind),
        Tags::from_list(tags),
        input.content,
        sig,
    );
    let _ = filter_matches(&filter, &event);
    if let Ok(empty) = Filter::parse(&serde_json::json!({}), FilterLimits { max_values: 5000 }) {
        assert!(filter_matches(&empty, &event), "an empty filter matches every event");
    }
});
