//! The EVENT path's checks on arbitrary JSON: parsing, id and signature
//! verification, limits. A refusal always names the problem with a prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use wasm_relay::config::Limits;
use wasm_relay::event::read_event;

fuzz_target!(|text: &str| {
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else { return };
    match read_event(raw, &Limits::default(), 1_700_000_000) {
        Ok(event) => assert!(event.verify_id(), "an accepted event has a valid id"),
        Err(refusal) => assert!(refusal.message.starts_with("invalid:"), "{}", refusal.message),
    }
});
