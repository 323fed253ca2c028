//! Checks on arriving events: what makes a KeyPackage broken, and the rules
//! for group messages.

use base64::Engine;
use wasm_relay_plugin_sdk::v0_2::*;

use crate::key_package::{self, Lifetime};
use crate::{Refused, Settings};

/// What the index keeps from a valid KeyPackage event.
pub struct KeyPackageFacts {
    pub d: Option<String>,
    /// KeyPackageRef (`i` tag), or a digest of the decoded content.
    pub group: String,
    pub ciphersuite: Option<String>,
    /// The `expiration` (NIP-40) tag.
    pub expires_at: Option<u64>,
    /// The MLS `Lifetime` inside the KeyPackage, when the gateway reads it
    /// (setting `read_mls_lifetime`) and can.
    pub mls_lifetime: Option<Lifetime>,
}

fn invalid(counter: &'static str, message: String) -> Refused {
    Refused { kind: RefusalKind::Invalid, message, counter }
}

fn first_value<'a>(event: &'a Event, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| event.tag_value(n))
}

/// Refuses what is broken; counts what is merely unusual.
pub fn check_key_package(event: &Event, settings: &Settings, now: u64) -> Result<KeyPackageFacts, Refused> {
    if event.content.trim().is_empty() {
        return Err(invalid("empty_content", "KeyPackage content is empty".into()));
    }
    let encoding = event.tag_value("encoding");
    let decoded = match encoding {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(event.content.trim())
            .map_err(|e| invalid("bad_content", format!("KeyPackage content is not valid base64: {e}")))?,
        Some("hex") | None => match hex::decode(event.content.trim()) {
            Ok(bytes) => bytes,
            // Some clients publish base64 without the encoding tag.
            Err(_) => base64::engine::general_purpose::STANDARD.decode(event.content.trim()).map_err(|_| {
                invalid(
                    "bad_content",
                    "KeyPackage content is neither hex nor base64 (add [\"encoding\",\"base64\"] for base64)".into(),
                )
            })?,
        },
        Some(other) => {
            return Err(invalid(
                "bad_encoding",
                format!("unknown KeyPackage encoding \"{other}\" (use \"base64\" or \"hex\")"),
            ));
        }
    };
    if decoded.is_empty() {
        return Err(invalid("empty_content", "KeyPackage content decodes to nothing".into()));
    }
    if event.tag_value("mls_protocol_version").is_none() {
        return Err(invalid("missing_version", "KeyPackage has no mls_protocol_version tag".into()));
    }
    for p in event.tags_named("p") {
        if p.get(1).is_some_and(|owner| *owner != event.pubkey) {
            return Err(invalid("owner_mismatch", "KeyPackage p tag names another key than its author".into()));
        }
    }
    let expires_at = match first_value(event, &["expiration", "exp"]) {
        Some(v) => match v.trim().parse::<u64>() {
            Ok(t) if t <= now => {
                return Err(invalid("expired", format!("KeyPackage expired at {t}, before it arrived")));
            }
            Ok(t) => Some(t),
            Err(_) => {
                return Err(invalid("bad_expiration", format!("KeyPackage expiration \"{v}\" is not a Unix time")));
            }
        },
        None => None,
    };
    let mls_lifetime = if settings.read_mls_lifetime { key_package::lifetime(&decoded) } else { None };
    match mls_lifetime {
        Some(l) if l.not_after <= now => {
            return Err(invalid(
                "expired",
                format!("the KeyPackage's MLS lifetime ended at {} (not_after), before it arrived", l.not_after),
            ));
        }
        Some(_) => {}
        None => host::count("soft_unreadable_lifetime", 1),
    }
    let ciphersuite = first_value(event, &["mls_ciphersuite", "ciphersuite"]).map(str::to_owned);
    if ciphersuite.is_none() {
        host::count("soft_missing_ciphersuite", 1);
    }
    if first_value(event, &["mls_extensions", "extensions"]).is_none() {
        host::count("soft_missing_extensions", 1);
    }
    let d = event.tag_value("d").map(str::to_owned);
    if event.kind == crate::KIND_KEY_PACKAGE_ADDRESSABLE && d.as_deref().is_none_or(str::is_empty) {
        host::count("soft_missing_d", 1);
    }
    let group = match event.tag_value("i") {
        Some(i) if !i.is_empty() => format!("i:{}", i.to_ascii_lowercase()),
        _ => {
            use sha2::Digest;
            format!("c:{}", hex::encode(sha2::Sha256::digest(&decoded)))
        }
    };
    Ok(KeyPackageFacts { d, group, ciphersuite, expires_at, mls_lifetime })
}

/// Kind 445: exactly one `h` tag of 64 hex characters, and the optional
/// per-group rate.
/// Checks a kind 445. `counted_elsewhere`: the event comes from another
/// replica, which already counted it against the group's rate.
pub fn check_group_message(
    event: &Event,
    settings: &Settings,
    now: u64,
    counted_elsewhere: bool,
) -> Result<(), Refused> {
    let h: Vec<&Vec<String>> = event.tags_named("h").collect();
    let [tag] = h.as_slice() else {
        return Err(invalid("bad_group_tag", format!("kind 445 needs exactly one h tag, found {}", h.len())));
    };
    let group = tag.get(1).map(String::as_str).unwrap_or("");
    let is_hex64 = group.len() == 64 && group.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex64 {
        return Err(invalid("bad_group_tag", "kind 445 h tag must be a 64-character hex group id".into()));
    }
    if settings.group_messages_per_minute > 0 && !counted_elsewhere {
        let key = format!("rate445/{}/{}", now / 60, group.to_ascii_lowercase());
        let n = crate::counters::increment(&key).map_err(|e| Refused {
            kind: RefusalKind::Error,
            message: format!("the relay could not check the group's rate: {e}"),
            counter: "store_error",
        })?;
        if n > settings.group_messages_per_minute {
            return Err(Refused {
                kind: RefusalKind::RateLimited,
                message: format!(
                    "more than {} messages this minute for this group; retry shortly",
                    settings.group_messages_per_minute
                ),
                counter: "group_rate",
            });
        }
    }
    Ok(())
}
