//! The EVENT path's checks on arbitrary JSON: parsing, id and signature
//! verification, limits. A refusal is always `invalid` and names the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use wasm_relay::config::Limits;
use wasm_relay::event::read_event;
use wasm_relay::refusal::RefusalKind;

fuzz_target!(|text: &str| {
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else { return };
    match read_event(raw, &Limits::default(), 1_700_000_000) {
        Ok(event) => assert!(event.verify_id(), "an accepted event has a valid id"),
        Err(rejected) => {
            assert_eq!(rejected.refusal.kind, RefusalKind::Invalid, "{:?}", rejected.refusal);
            assert!(!rejected.refusal.message.is_empty());
        }
    }
});
