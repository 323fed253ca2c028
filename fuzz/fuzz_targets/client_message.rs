//! Any text a client sends: message parsing, then every filter it carries,
//! and every NIP-77 message answered by a session over a small set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use negentropy::{Id, Negentropy, NegentropyStorageVector};
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
        Ok(Parsed::Message(
            ClientMessage::NegOpen { message, .. } | ClientMessage::NegMsg { message, .. },
        )) => {
            if let Ok(bytes) = wasm_relay::negentropy::decode_message(&message, 1 << 20) {
                let mut set = NegentropyStorageVector::new();
                for i in 0..64u8 {
                    let _ = set.insert(u64::from(i) * 7, Id::from_byte_array([i; 32]));
                }
                let _ = set.seal();
                if let Ok(mut engine) = Negentropy::owned(set, 4096) {
                    let _ = engine.reconcile(&bytes);
                }
            }
        }
        Ok(_) | Err(_) => {}
    }
});
