//! Any text a client sends: message parsing, then every filter it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasm_relay::filter::{Filter, FilterLimits};
use wasm_relay::message::{ClientMessage, Parsed, parse_client_message};

fuzz_target!(|text: &str| {
    let limits = FilterLimits { max_values: 5000 };
    match parse_client_message(text) {
        Ok(Parsed::Message(ClientMessage::Req { filters, .. } | ClientMessage::Count { filters, .. })) => {
            for f in &filters {
                if let Ok(filter) = Filter::parse(f, limits) {
                    let _ = filter.matches_nothing();
                    let _ = filter.could_match_kind(1);
                    let _ = filter.without_kinds(&[443, 30443]);
                }
            }
        }
        Ok(_) | Err(_) => {}
    }
});
