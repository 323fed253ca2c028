//! How events are laid out in the shared log's Firestore documents.
//!
//! A **batch document** holds the events of one publish of one replica, so
//! the log costs one write, and each following replica one read, per batch
//! rather than per event:
//! - `events`: the events' JSON, in order (never indexed: see
//!   `firestore.indexes.json`);
//! - `ids`, `pubkeys`: each event's id and author, at the same positions, so
//!   an `array-contains` query finds the document holding an event, or an
//!   author's documents (for a ban or a request to vanish);
//! - `origin`, `written_at` (a server timestamp) and, when every event is
//!   ephemeral, `expire_at` for a TTL policy.
//!
//! Its name is `b` and a hash of the ids it holds, so a retried commit
//! rewrites the same document. A batch holds at most
//! [`MAX_EVENTS_PER_DOCUMENT`] events and [`MAX_JSON_BYTES_PER_DOCUMENT`] of
//! JSON (Firestore documents hold 1 MiB at most).
//!
//! A **legacy document** (written before 2026-11-30) holds one event: `json`
//! and `pubkey`, named by the event's id. Both kinds are read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use firestore::gcloud_sdk::google::firestore::v1 as fs;
use sha2::Digest;

use crate::event::AcceptedEvent;
use crate::firestore::string_value;

/// Most events in one batch document.
pub const MAX_EVENTS_PER_DOCUMENT: usize = 500;
/// Most event JSON bytes in one batch document: Firestore's limit is 1 MiB
/// for the whole document, ids, authors and names included.
pub const MAX_JSON_BYTES_PER_DOCUMENT: usize = 900 * 1024;
/// What one event adds to a batch document beside its JSON (its id and
/// author in hex, and array overhead), at most.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

/// One event of a log document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The event's id as the document states it (`None` when unreadable: the
    /// event is then checked by its JSON alone).
    pub id: Option<[u8; 32]>,
    pub json: &'a str,
    pub pubkey: &'a str,
}

/// Splits items of these sizes, in order, into consecutive ranges of at
/// most `max_items` items and `max_bytes` bytes (an item larger than
/// `max_bytes` goes alone).
pub fn chunks(sizes: impl Iterator<Item = usize>, max_items: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes, mut end) = (0, 0, 0);
    for (i, size) in sizes.enumerate() {
        if i > start && (i - start == max_items || bytes + size > max_bytes) {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
        end = i + 1;
    }
    if end > start {
        ranges.push(start..end);
    }
    ranges
}

/// How `events` are split into batch documents.
pub fn batches(events: &[Arc<AcceptedEvent>]) -> Vec<Range<usize>> {
    chunks(
        events.iter().map(|e| e.json.len() + ENTRY_OVERHEAD_BYTES),
        MAX_EVENTS_PER_DOCUMENT,
        MAX_JSON_BYTES_PER_DOCUMENT,
    )
}

/// The document id of the batch holding `events`.
pub fn batch_id(events: &[Arc<AcceptedEvent>]) -> String {
    let mut hash = sha2::Sha256::new();
    for e in events {
        hash.update(e.event.id.as_bytes());
    }
    format!("b{}", hex::encode(&hash.finalize()[..16]))
}

/// The `events`, `ids` and `pubkeys` fields holding `entries`.
pub fn entry_fields<'a>(entries: impl Iterator<Item = (String, &'a str, &'a str)>) -> HashMap<String, fs::Value> {
    let (mut events, mut ids, mut pubkeys) = (Vec::new(), Vec::new(), Vec::new());
    for (id, json, pubkey) in entries {
        ids.push(string_value(id));
        events.push(string_value(json));
        pubkeys.push(string_value(pubkey));
    }
    [("events", events), ("ids", ids), ("pubkeys", pubkeys)]
        .into_iter()
        .map(|(field, values)| {
            (
                field.to_string(),
                fs::Value { value_type: Some(fs::value::ValueType::ArrayValue(fs::ArrayValue { values })) },
            )
        })
        .collect()
}

/// The fields of the batch document holding `events` (less `origin`,
/// `written_at` and `expire_at`, which the publisher adds).
pub fn batch_fields(events: &[Arc<AcceptedEvent>]) -> HashMap<String, fs::Value> {
    let hex: Vec<(String, String)> = events.iter().map(|e| (e.event.id.to_hex(), e.event.pubkey.to_hex())).collect();
    entry_fields(events.iter().zip(&hex).map(|(e, (id, pubkey))| (id.clone(), e.json.as_str(), pubkey.as_str())))
}

fn strings<'a>(doc: &'a fs::Document, field: &str) -> Option<Vec<&'a str>> {
    let fs::value::ValueType::ArrayValue(array) = doc.fields.get(field)?.value_type.as_ref()? else { return None };
    array
        .values
        .iter()
        .map(|v| match v.value_type.as_ref() {
            Some(fs::value::ValueType::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn parse_id(hex_id: &str) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut id).ok().map(|_| id)
}

/// Whether `doc` is a batch document (else a legacy one, or not the log's).
pub fn is_batch(doc: &fs::Document) -> bool {
    doc.fields.contains_key("events")
}

/// The events `doc` holds, in order; none when it is malformed.
pub fn entries(doc: &fs::Document) -> Vec<Entry<'_>> {
    if is_batch(doc) {
        let (Some(events), Some(ids), Some(pubkeys)) =
            (strings(doc, "events"), strings(doc, "ids"), strings(doc, "pubkeys"))
        else {
            return Vec::new();
        };
        if events.len() != ids.len() || events.len() != pubkeys.len() {
            return Vec::new();
        }
        return events
            .into_iter()
            .zip(ids)
            .zip(pubkeys)
            .map(|((json, id), pubkey)| Entry { id: parse_id(id), json, pubkey })
            .collect();
    }
    let Some(json) = crate::firestore::field_string(doc, "json") else { return Vec::new() };
    let id = doc.name.rsplit('/').next().and_then(parse_id);
    let pubkey = crate::firestore::field_string(doc, "pubkey").unwrap_or_default();
    vec![Entry { id, json, pubkey }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::event::{EventBuilder, FinalizeEvent, Kind};
    use nostr::key::Keys;

    fn accepted(content: &str) -> Arc<AcceptedEvent> {
        let event = EventBuilder::new(Kind::from(1u16), content).finalize(&Keys::generate()).unwrap();
        Arc::new(AcceptedEvent::new(event))
    }

    #[test]
    fn chunks_respect_both_limits() {
        assert!(chunks(std::iter::empty(), 500, 1000).is_empty());
        assert_eq!(chunks([100; 3].into_iter(), 500, 1000), vec![0..3]);
        assert_eq!(chunks([1; 1001].into_iter(), 500, 1 << 20), vec![0..500, 500..1000, 1000..1001]);
        assert_eq!(chunks([400; 5].into_iter(), 500, 1000), vec![0..2, 2..4, 4..5]);
        // One item larger than the budget still goes, alone.
        assert_eq!(chunks([2000, 10].into_iter(), 500, 1000), vec![0..1, 1..2]);
    }

    #[test]
    fn batches_of_large_events_fit_a_firestore_document() {
        let big = accepted(&"x".repeat(200 * 1024));
        let events = vec![big; 10];
        let ranges = batches(&events);
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 10);
        for r in ranges {
            let json: usize = events[r].iter().map(|e| e.json.len() + ENTRY_OVERHEAD_BYTES).sum();
            assert!(json <= MAX_JSON_BYTES_PER_DOCUMENT);
        }
    }

    #[test]
    fn a_batch_document_reads_back_as_its_events_in_order() {
        let events = vec![accepted("one"), accepted("two"), accepted("three")];
        let doc = fs::Document {
            name: format!("x/{}", batch_id(&events)),
            fields: batch_fields(&events),
            ..Default::default()
        };
        assert!(is_batch(&doc));
        let read = entries(&doc);
        assert_eq!(read.len(), 3);
        for (entry, e) in read.iter().zip(&events) {
            assert_eq!(entry.id, Some(e.event.id.to_bytes()));
            assert_eq!(entry.json, e.json);
            assert_eq!(entry.pubkey, e.event.pubkey.to_hex());
        }
        // The same events name the same document; others another.
        assert_eq!(batch_id(&events), batch_id(&events.clone()));
        assert_ne!(batch_id(&events), batch_id(&events[..2]));
    }

    #[test]
    fn a_legacy_document_reads_as_one_event_and_a_malformed_one_as_none() {
        let e = accepted("old");
        let legacy = fs::Document {
            name: format!("projects/p/databases/d/documents/wasm_relay_events/{}", e.event.id.to_hex()),
            fields: [
                ("json".to_string(), string_value(e.json.clone())),
                ("pubkey".into(), string_value(e.event.pubkey.to_hex())),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        assert!(!is_batch(&legacy));
        assert_eq!(
            entries(&legacy),
            vec![Entry { id: Some(e.event.id.to_bytes()), json: &e.json, pubkey: &e.event.pubkey.to_hex() }]
        );
        let mut broken = fs::Document { fields: batch_fields(&[e.clone(), e]), ..Default::default() };
        broken.fields.remove("ids");
        assert!(entries(&broken).is_empty());
    }
}
