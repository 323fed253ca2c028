//! Key layout of the sled event tree. Everything lives in one tree so a batch
//! (event plus all its index entries) is applied atomically.
//!
//! Index keys end in `inverted created_at (8 bytes BE) ++ id (32 bytes)`, so a
//! forward scan yields newest first with ties broken by the lowest id, which
//! is NIP-01 order, and `since`/`until` become key bounds.
//!
//! Layout 3 keeps each event's JSON under a serial number given in arrival
//! order (`BODY`), and its id record (`EVENT`) holds only that serial. Ids
//! are random, so records keyed by id land in leaves all over the tree; kept
//! to 8 bytes, those leaves are small enough for the page cache to hold, while
//! the bodies are appended at the end of their range and the recent ones,
//! which clients ask for most, share leaves. Layouts 1 and 2 kept the JSON in
//! the id record itself; both kinds of record are read, so a store written by
//! an earlier release needs no migration.

use nostr::event::Event;

use crate::event::{KindClass, d_tag, expiration, kind_class};

pub const EVENT: u8 = b'E'; // id -> body serial (8 bytes BE); layouts 1-2: canonical JSON
pub const BODY: u8 = b'B'; // serial (8 bytes BE) -> canonical JSON
pub const CREATED: u8 = b'C'; // time order over everything
pub const AUTHOR: u8 = b'A'; // pubkey
/// Layout 1 also indexed `(pubkey, kind)`; layout 2 answers those filters
/// from `AUTHOR` (the kind is in every index value) and from address slots.
/// Keys of this tag left by layout 1 are removed with their events.
pub const LEGACY_AUTHOR_KIND: u8 = b'P'; // pubkey, kind
pub const KIND: u8 = b'K'; // kind
pub const TAG: u8 = b'T'; // letter, len, value
pub const ADDRESS: u8 = b'R'; // pubkey, kind, d -> slot (replaceable/addressable, see `Slot`)
pub const EXPIRATION: u8 = b'X'; // expiration, id (NIP-40 sweep)
pub const DELETED: u8 = b'D'; // id + deleter pubkey -> empty (NIP-09); one tombstone per deleter
pub const DELETED_ADDRESS: u8 = b'Z'; // address slot -> deletion created_at (NIP-09 `a`)
pub const VANISHED: u8 = b'V'; // pubkey -> request-to-vanish created_at (NIP-62)

/// Longest tag value stored in a key; longer values are indexed by this
/// prefix and the query re-checks the full value.
pub const MAX_INDEXED_TAG_VALUE: usize = 255;

/// The suffix shared by all index keys.
pub fn order_suffix(created_at: u64, id: &[u8; 32]) -> [u8; 40] {
    let mut s = [0u8; 40];
    s[..8].copy_from_slice(&(u64::MAX - created_at).to_be_bytes());
    s[8..].copy_from_slice(id);
    s
}

/// Reads `(created_at, id)` back from an index key.
pub fn parse_suffix(key: &[u8]) -> Option<(u64, [u8; 32])> {
    let s = key.len().checked_sub(40).map(|start| &key[start..])?;
    let inv = u64::from_be_bytes(s[..8].try_into().ok()?);
    let id: [u8; 32] = s[8..].try_into().ok()?;
    Some((u64::MAX - inv, id))
}

pub fn event_key(id: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(EVENT);
    k.extend_from_slice(id);
    k
}

/// What an event's id record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// Layout 3: the serial of its body (`body_key`).
    Serial(u64),
    /// Layouts 1-2: the JSON itself (never 8 bytes long: the shortest event
    /// JSON is hundreds of bytes).
    Inline(&'a [u8]),
}

impl<'a> Record<'a> {
    pub fn parse(value: &'a [u8]) -> Self {
        match <[u8; 8]>::try_from(value) {
            Ok(serial) => Record::Serial(u64::from_be_bytes(serial)),
            Err(_) => Record::Inline(value),
        }
    }
}

pub fn body_key(serial: u64) -> [u8; 9] {
    let mut k = [BODY; 9];
    k[1..].copy_from_slice(&serial.to_be_bytes());
    k
}

pub fn author_prefix(pubkey: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(73);
    k.push(AUTHOR);
    k.extend_from_slice(pubkey);
    k
}

pub fn author_kind_prefix(pubkey: &[u8; 32], kind: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(75);
    k.push(LEGACY_AUTHOR_KIND);
    k.extend_from_slice(pubkey);
    k.extend_from_slice(&kind.to_be_bytes());
    k
}

pub fn kind_prefix(kind: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(43);
    k.push(KIND);
    k.extend_from_slice(&kind.to_be_bytes());
    k
}

pub fn created_prefix() -> Vec<u8> {
    vec![CREATED]
}

/// Tag prefix; `exact` is false when the value was cut to the indexed length.
pub fn tag_prefix(letter: u8, value: &str) -> (Vec<u8>, bool) {
    let bytes = value.as_bytes();
    let n = bytes.len().min(MAX_INDEXED_TAG_VALUE);
    let mut k = Vec::with_capacity(3 + n + 40);
    k.push(TAG);
    k.push(letter);
    k.push(n as u8);
    k.extend_from_slice(&bytes[..n]);
    (k, n == bytes.len())
}

pub fn address_key(pubkey: &[u8; 32], kind: u16, d: &str) -> Vec<u8> {
    let mut k = author_kind_prefix(pubkey, kind);
    k[0] = ADDRESS;
    k.extend_from_slice(d.as_bytes());
    k
}

/// What a replaceable/addressable slot holds: its current version, or, once
/// that was removed (deleted, vanished, banned, expired), the newest version
/// it ever held. Versions older than either are superseded, whenever they
/// arrive: the state a slot ends in does not depend on arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The stored version's id.
    Held([u8; 32]),
    /// No version is stored; the newest one seen was `(created_at, id)`.
    Vacant { created_at: u64, id: [u8; 32] },
}

/// Tag of a vacant slot's value (a held slot's value is the bare id).
const VACANT_SLOT: u8 = b'v';

impl Slot {
    pub fn parse(value: &[u8]) -> Option<Self> {
        match value.len() {
            32 => Some(Slot::Held(value.try_into().ok()?)),
            41 if value[0] == VACANT_SLOT => Some(Slot::Vacant {
                created_at: u64::from_be_bytes(value[1..9].try_into().ok()?),
                id: value[9..].try_into().ok()?,
            }),
            _ => None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Slot::Held(id) => id.to_vec(),
            Slot::Vacant { created_at, id } => {
                let mut v = Vec::with_capacity(41);
                v.push(VACANT_SLOT);
                v.extend_from_slice(&created_at.to_be_bytes());
                v.extend_from_slice(id);
                v
            }
        }
    }
}

/// Whether version `(a_created_at, a_id)` wins over `(b_created_at, b_id)`
/// in a slot (NIP-01: the newest, then the lowest id).
pub fn newer_version(a: (u64, &[u8; 32]), b: (u64, &[u8; 32])) -> bool {
    (std::cmp::Reverse(a.0), a.1) < (std::cmp::Reverse(b.0), b.1)
}

pub fn expiration_key(expiration: u64, id: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(EXPIRATION);
    k.extend_from_slice(&expiration.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// Tombstone of event `id` deleted by `deleter`. Keyed by both, so one key's
/// deletion request can never overwrite or stand for another key's: only
/// the tombstone of the event's own author keeps it out.
pub fn deleted_key(id: &[u8; 32], deleter: &[u8; 32]) -> Vec<u8> {
    let mut k = event_key(id);
    k[0] = DELETED;
    k.extend_from_slice(deleter);
    k
}

/// Tombstone of a deleted address: the address slot key with another tag.
pub fn deleted_address_key(slot: &[u8]) -> Vec<u8> {
    let mut k = slot.to_vec();
    k[0] = DELETED_ADDRESS;
    k
}

pub fn vanished_key(pubkey: &[u8; 32]) -> Vec<u8> {
    let mut k = author_prefix(pubkey);
    k[0] = VANISHED;
    k
}

/// The replaceable/addressable slot of `event`, if it has one.
pub fn address_of(event: &Event) -> Option<Vec<u8>> {
    let kind = event.kind.as_u16();
    match kind_class(kind) {
        KindClass::Replaceable => Some(address_key(event.pubkey.as_bytes(), kind, "")),
        KindClass::Addressable => Some(address_key(event.pubkey.as_bytes(), kind, d_tag(event))),
        KindClass::Regular | KindClass::Ephemeral => None,
    }
}

/// What an index value tells about its event without loading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexValue {
    pub kind: u16,
    /// NIP-40 expiration.
    pub expiration: Option<u64>,
    /// The serial of its body (`body_key`), so a scan reads the body without
    /// the id record; `None` in index values of layouts 1-2.
    pub serial: Option<u64>,
}

/// The value stored with every index key, so scans can skip excluded kinds
/// and expired events without loading them, and read a match's body
/// directly: the kind (2 bytes BE) and the body serial (8 bytes BE), then
/// the NIP-40 expiration (8 bytes BE) when the event has one, or else one
/// zero byte. The lengths (11 or 18) tell it from the values of layouts 1-2:
/// the kind, then the expiration if any (2 or 10).
pub fn index_value(event: &Event, serial: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&event.kind.as_u16().to_be_bytes());
    v.extend_from_slice(&serial.to_be_bytes());
    match expiration(event) {
        Some(exp) => v.extend_from_slice(&exp.to_be_bytes()),
        None => v.push(0),
    }
    v
}

pub fn parse_index_value(v: &[u8]) -> IndexValue {
    let u64_at = |at: usize| v.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    let kind = v.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let (serial, expiration) = match v.len() {
        10 => (None, u64_at(2)),
        11 => (u64_at(2), None),
        18 => (u64_at(2), u64_at(10)),
        _ => (None, None),
    };
    // Zero means none: an event expiring at time 0 is refused on arrival,
    // and serials start at 1.
    IndexValue { kind, expiration: expiration.filter(|e| *e != 0), serial: serial.filter(|s| *s != 0) }
}

/// The index value layouts 1 and 2 wrote (no body serial), which stores
/// written by earlier releases still hold.
#[cfg(test)]
pub fn legacy_index_value(event: &Event) -> Vec<u8> {
    let mut v = event.kind.as_u16().to_be_bytes().to_vec();
    if let Some(exp) = expiration(event) {
        v.extend_from_slice(&exp.to_be_bytes());
    }
    v
}

/// The `(pubkey, kind)` key layout 1 wrote for `event`, which may still be
/// stored: removing the event removes it too.
pub fn legacy_author_kind_key(event: &Event) -> Vec<u8> {
    let mut k = author_kind_prefix(event.pubkey.as_bytes(), event.kind.as_u16());
    k.extend_from_slice(&order_suffix(event.created_at.as_secs(), event.id.as_bytes()));
    k
}

/// Every index key of `event` (not the event record or its address slot).
///
/// Each key costs the writer a sled insert that copies the leaf it lands
/// in, so there is one per way a filter is answered, and no more: time,
/// author, kind, and each distinct single-letter tag. A filter naming
/// authors and kinds reads the author's range and skips other kinds by the
/// index value (or, for replaceable kinds only, reads the address slots).
pub fn index_keys(event: &Event) -> Vec<Vec<u8>> {
    let suffix = order_suffix(event.created_at.as_secs(), event.id.as_bytes());
    let pubkey = event.pubkey.as_bytes();
    let kind = event.kind.as_u16();
    let mut keys = vec![created_prefix(), author_prefix(pubkey), kind_prefix(kind)];
    let mut seen_tags: Vec<Vec<u8>> = Vec::new();
    for tag in event.tags.iter() {
        let t = tag.as_slice();
        let (Some(name), Some(value)) = (t.first(), t.get(1)) else { continue };
        if name.len() == 1 && name.as_bytes()[0].is_ascii_alphabetic() {
            let (prefix, _) = tag_prefix(name.as_bytes()[0], value);
            if !seen_tags.contains(&prefix) {
                seen_tags.push(prefix);
            }
        }
    }
    keys.extend(seen_tags);
    for k in &mut keys {
        k.extend_from_slice(&suffix);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_orders_newest_first_then_lowest_id() {
        let a = order_suffix(200, &[1; 32]);
        let b = order_suffix(100, &[0; 32]);
        let c = order_suffix(100, &[2; 32]);
        assert!(a < b && b < c);
        assert_eq!(parse_suffix(&c), Some((100, [2; 32])));
    }

    #[test]
    fn id_records_tell_a_serial_from_inline_json() {
        assert_eq!(Record::parse(&7u64.to_be_bytes()), Record::Serial(7));
        assert_eq!(Record::parse(b"{\"id\":\"\"}"), Record::Inline(b"{\"id\":\"\"}"));
        assert!(body_key(1) < body_key(256), "bodies sort in arrival order");
    }

    #[test]
    fn index_values_of_every_layout_are_read() {
        let v = |kind: u16, expiration: Option<u64>, serial: Option<u64>| IndexValue { kind, expiration, serial };
        let mut exp = 5u16.to_be_bytes().to_vec();
        exp.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        assert_eq!(parse_index_value(&5u16.to_be_bytes()), v(5, None, None));
        assert_eq!(parse_index_value(&exp), v(5, Some(1_700_000_000), None));
        let mut with_serial = 5u16.to_be_bytes().to_vec();
        with_serial.extend_from_slice(&42u64.to_be_bytes());
        let mut both = with_serial.clone();
        with_serial.push(0);
        both.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        assert_eq!(parse_index_value(&with_serial), v(5, None, Some(42)));
        assert_eq!(parse_index_value(&both), v(5, Some(1_700_000_000), Some(42)));
    }

    #[test]
    fn tag_prefixes_do_not_collide_across_lengths() {
        let (a, _) = tag_prefix(b't', "ab");
        let (b, _) = tag_prefix(b't', "abc");
        assert!(!b.starts_with(&a));
        let long = "x".repeat(300);
        let (_, exact) = tag_prefix(b't', &long);
        assert!(!exact);
    }
}
