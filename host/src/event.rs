//! Incoming events: reading the JSON, checking id and signature, applying the
//! relay's limits, and classifying the kind (regular, replaceable, ephemeral,
//! addressable).

use nostr::event::Event;
use serde_json::value::RawValue;

use crate::config::Limits;
use crate::refusal::Refusal;

/// An event that passed every check, with its canonical JSON serialized once
/// (stored as is and sent as is to every subscriber).
#[derive(Debug)]
pub struct AcceptedEvent {
    pub event: Event,
    pub json: String,
    /// A NIP-62 request to vanish addressed to this relay (or all relays).
    pub vanish_request: bool,
    /// Applied from the shared log (already in Firestore), not from a client.
    pub replicated: bool,
    /// A client of this replica (this process) gave it. True for a copy from
    /// the shared log too, when this replica published it: the listener can
    /// deliver that copy before the client's own reaches the writer, and
    /// whichever is stored first does what the client's event does
    /// (clearing the shared log of what a deletion deletes).
    pub from_this_replica: bool,
}

impl AcceptedEvent {
    pub fn new(event: Event) -> Self {
        let json = event.as_json();
        Self { event, json, vanish_request: false, replicated: false, from_this_replica: true }
    }
}

/// Whether two relay URLs name the same relay: `ws`/`http` and
/// `wss`/`https` alike, case and a trailing slash ignored.
pub fn same_relay_url(a: &str, b: &str) -> bool {
    canonical_url(a) == canonical_url(b)
}

fn canonical_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/').to_ascii_lowercase();
    if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        url
    }
}

/// Whether `event` is a NIP-62 request to vanish that names the relay at
/// `public_url` (or all relays) in a `relay` or `r` tag.
pub fn is_vanish_request_for(event: &Event, public_url: &str) -> bool {
    event.kind.as_u16() == 62
        && event.tags.iter().map(|t| t.as_slice()).any(|t| {
            t.len() >= 2
                && (t[0] == "relay" || t[0] == "r")
                && (t[1] == "ALL_RELAYS" || same_relay_url(&t[1], public_url))
        })
}

/// How NIP-01 stores a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindClass {
    Regular,
    /// 0, 3, 10000-19999: newest per (pubkey, kind).
    Replaceable,
    /// 20000-29999: broadcast, never stored.
    Ephemeral,
    /// 30000-39999: newest per (pubkey, kind, `d`).
    Addressable,
}

pub fn kind_class(kind: u16) -> KindClass {
    match kind {
        0 | 3 | 10000..=19999 => KindClass::Replaceable,
        20000..=29999 => KindClass::Ephemeral,
        30000..=39999 => KindClass::Addressable,
        _ => KindClass::Regular,
    }
}

/// A refused event: the id to answer (if one could be read) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEvent {
    pub event_id: Option<String>,
    pub refusal: Refusal,
}

/// Reads and checks an event from an EVENT message. On success the event's id
/// and signature are verified and it is within `limits` at time `now`.
pub fn read_event(raw: &RawValue, limits: &Limits, now: u64) -> Result<Event, RejectedEvent> {
    let event: Event = serde_json::from_str(raw.get()).map_err(|e| RejectedEvent {
        event_id: id_of_unreadable(raw),
        refusal: Refusal::invalid(format!("malformed event: {e}")),
    })?;
    let refuse =
        |message: String| RejectedEvent { event_id: Some(event.id.to_hex()), refusal: Refusal::invalid(message) };
    if !event.verify_id() {
        return Err(refuse("event id does not match the sha256 of its canonical serialization".into()));
    }
    if !event.verify_signature() {
        return Err(refuse("signature verification failed".into()));
    }
    if event.tags.len() > limits.max_event_tags {
        return Err(refuse(format!(
            "event has {} tags; at most {} are allowed",
            event.tags.len(),
            limits.max_event_tags
        )));
    }
    if event.content.len() > limits.max_content_length {
        return Err(refuse(format!(
            "content is {} bytes; at most {} are allowed",
            event.content.len(),
            limits.max_content_length
        )));
    }
    let created_at = event.created_at.as_secs();
    if created_at > now.saturating_add(limits.created_at_upper_limit) {
        return Err(refuse(format!(
            "created_at is {} s in the future; at most {} s ahead is accepted (check the clock)",
            created_at - now,
            limits.created_at_upper_limit
        )));
    }
    // NIP-59 gift wraps carry a created_at up to two days in the past on purpose.
    let lower = match event.kind.as_u16() {
        GIFT_WRAP => limits.created_at_lower_limit.saturating_add(2 * 24 * 3600),
        _ => limits.created_at_lower_limit,
    };
    if limits.created_at_lower_limit > 0 && created_at < now.saturating_sub(lower) {
        return Err(refuse(format!(
            "created_at is older than {} s, the oldest this relay accepts",
            limits.created_at_lower_limit
        )));
    }
    if let Some(exp) = expiration(&event)
        && exp <= now
    {
        return Err(refuse(format!("this event expired at {exp} (NIP-40)")));
    }
    Ok(event)
}

/// The `id` of an event that failed to parse, if it has a string one, so the
/// refusal can still be an `OK` the client can match.
fn id_of_unreadable(raw: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    match serde_json::from_str::<IdOnly>(raw.get()).ok()?.id? {
        serde_json::Value::String(s) if s.len() <= 128 => Some(s),
        _ => None,
    }
}

/// Kind of NIP-59 gift wraps, served only to their recipients by default.
pub const GIFT_WRAP: u16 = 1059;
/// Ephemeral gift wraps.
pub const EPHEMERAL_GIFT_WRAP: u16 = 21059;

/// The 32-byte keys an event p-tags.
pub fn p_tags(event: &Event) -> impl Iterator<Item = [u8; 32]> + '_ {
    event.tags.iter().filter_map(|t| {
        let t = t.as_slice();
        if t.len() < 2 || t[0] != "p" {
            return None;
        }
        let mut b = [0u8; 32];
        hex::decode_to_slice(&t[1], &mut b).ok().map(|_| b)
    })
}

/// The NIP-40 `expiration` tag's time, if the event has a readable one.
pub fn expiration(event: &Event) -> Option<u64> {
    first_tag_value(event, "expiration").and_then(|v| v.parse().ok())
}

/// The first value of the first tag named `name`.
pub fn first_tag_value<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|t| t.first().is_some_and(|n| n == name))
        .and_then(|t| t.get(1))
        .map(String::as_str)
}

/// The `d` tag value that addresses an addressable event ("" when absent).
pub fn d_tag(event: &Event) -> &str {
    first_tag_value(event, "d").unwrap_or("")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
    use nostr::key::Keys;
    use nostr::types::Timestamp;

    fn signed(content: &str, tags: Vec<Vec<&str>>) -> Event {
        EventBuilder::new(Kind::from(1), content)
            .tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()))
            .custom_created_at(Timestamp::from(1_700_000_000))
            .finalize(&Keys::generate())
            .unwrap()
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn kind_classes_follow_nip01() {
        assert_eq!(kind_class(0), KindClass::Replaceable);
        assert_eq!(kind_class(1), KindClass::Regular);
        assert_eq!(kind_class(3), KindClass::Replaceable);
        assert_eq!(kind_class(443), KindClass::Regular);
        assert_eq!(kind_class(445), KindClass::Regular);
        assert_eq!(kind_class(9999), KindClass::Regular);
        assert_eq!(kind_class(10000), KindClass::Replaceable);
        assert_eq!(kind_class(19999), KindClass::Replaceable);
        assert_eq!(kind_class(20000), KindClass::Ephemeral);
        assert_eq!(kind_class(29999), KindClass::Ephemeral);
        assert_eq!(kind_class(30000), KindClass::Addressable);
        assert_eq!(kind_class(30443), KindClass::Addressable);
        assert_eq!(kind_class(39999), KindClass::Addressable);
        assert_eq!(kind_class(40000), KindClass::Regular);
    }

    #[test]
    fn canonical_id_covers_escapes() {
        // Every character NIP-01 names for escaping, plus unicode that must stay as is.
        let content = "line\nbreak \"quoted\" back\\slash \r\t\u{8}\u{c} \u{1} \u{1f} é ☃ 🎉 </script>";
        let e = signed(content, vec![vec!["t", "a\"b\\c\n"]]);
        let now = 1_700_000_000;
        let json = e.as_json();
        let read = read_event(&raw(&json), &Limits::default(), now).unwrap();
        assert_eq!(read.content, content);
        // The canonical serialization as NIP-01 spells it out.
        let canonical = format!(
            "[0,\"{}\",1700000000,1,[[\"t\",\"a\\\"b\\\\c\\n\"]],\"line\\nbreak \\\"quoted\\\" back\\\\slash \\r\\t\\b\\f \\u0001 \\u001f é ☃ 🎉 </script>\"]",
            e.pubkey.to_hex()
        );
        use sha2::Digest;
        assert_eq!(e.id.to_hex(), hex::encode(sha2::Sha256::digest(canonical.as_bytes())));
    }

    #[test]
    fn tampered_events_are_refused_with_reasons() {
        let e = signed("hi", vec![]);
        let now = 1_700_000_000;
        let mut v: serde_json::Value = serde_json::from_str(&e.as_json()).unwrap();
        v["content"] = "changed".into();
        let r = read_event(&raw(&v.to_string()), &Limits::default(), now).unwrap_err();
        assert!(
            r.refusal.kind == crate::refusal::RefusalKind::Invalid && r.refusal.message.starts_with("event id"),
            "{:?}",
            r.refusal
        );
        assert_eq!(r.event_id.as_deref(), Some(e.id.to_hex().as_str()));

        let mut v: serde_json::Value = serde_json::from_str(&e.as_json()).unwrap();
        let mut sig = e.sig.to_string();
        sig.replace_range(0..2, if &sig[0..2] == "00" { "11" } else { "00" });
        v["sig"] = sig.into();
        let r = read_event(&raw(&v.to_string()), &Limits::default(), now).unwrap_err();
        assert!(r.refusal.message.starts_with("signature"), "{:?}", r.refusal);

        let r = read_event(&raw(r#"{"id":"abc","kind":1}"#), &Limits::default(), now).unwrap_err();
        assert!(r.refusal.message.starts_with("malformed event"), "{:?}", r.refusal);
        assert_eq!(r.event_id.as_deref(), Some("abc"));
        let r = read_event(&raw("[1,2]"), &Limits::default(), now).unwrap_err();
        assert_eq!(r.event_id, None);
    }

    #[test]
    fn created_at_window_and_size_limits() {
        let e = signed("hi", vec![vec!["t", "a"], vec!["t", "b"]]);
        let json = e.as_json();
        let limits = Limits { created_at_upper_limit: 60, created_at_lower_limit: 3600, ..Limits::default() };
        assert!(
            read_event(&raw(&json), &limits, 1_700_000_000 - 61).unwrap_err().refusal.message.contains("in the future")
        );
        assert!(read_event(&raw(&json), &limits, 1_700_000_000 - 60).is_ok());
        assert!(
            read_event(&raw(&json), &limits, 1_700_000_000 + 3601).unwrap_err().refusal.message.contains("older than")
        );
        let limits = Limits { max_event_tags: 1, ..Limits::default() };
        assert!(read_event(&raw(&json), &limits, 1_700_000_000).unwrap_err().refusal.message.contains("2 tags"));
        let limits = Limits { max_content_length: 1, ..Limits::default() };
        assert!(
            read_event(&raw(&json), &limits, 1_700_000_000).unwrap_err().refusal.message.contains("content is 2 bytes")
        );
    }
}
