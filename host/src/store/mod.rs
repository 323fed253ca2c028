//! The event store: durable storage of accepted events and the indexes that
//! answer NIP-01 filters. Protocol code talks to the [`EventStore`] trait only,
//! so the engine (today sled, see [`sled_store`]) can change underneath.

#[cfg(test)]
mod apply_order;
pub mod keys;
mod query;
pub mod sled_store;

use std::sync::Arc;

use nostr::event::Event;

use crate::event::{AcceptedEvent, EPHEMERAL_GIFT_WRAP, GIFT_WRAP, expiration, p_tags};
use crate::filter::Filter;

pub use sled_store::SledEventStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(#[from] sled::Error),
    #[error("stored event {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

/// Who is reading, for the rules that hide stored events from some readers.
#[derive(Debug, Clone)]
pub struct ReadAccess {
    /// Events whose NIP-40 expiration is at or before this are never served.
    pub now: u64,
    pub gift_wraps: GiftWrapAccess,
}

/// Which gift wraps (kind 1059) a reader may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiftWrapAccess {
    /// All of them (policy `open`, or the relay itself).
    All,
    /// Only those p-tagging one of these keys (policy `recipient-only`).
    Recipients(Vec<[u8; 32]>),
}

impl ReadAccess {
    /// Everything that has not expired: for the relay's own use and plugins.
    pub fn trusted(now: u64) -> Self {
        Self { now, gift_wraps: GiftWrapAccess::All }
    }

    /// Whether an event with this kind and expiration might be visible
    /// without looking at its tags.
    pub fn may_see(&self, kind: u16, expiration: Option<u64>) -> Option<bool> {
        if expiration.is_some_and(|e| e <= self.now) {
            return Some(false);
        }
        match (&self.gift_wraps, kind) {
            (GiftWrapAccess::Recipients(r), GIFT_WRAP | EPHEMERAL_GIFT_WRAP) if r.is_empty() => Some(false),
            (GiftWrapAccess::Recipients(_), GIFT_WRAP | EPHEMERAL_GIFT_WRAP) => None,
            _ => Some(true),
        }
    }

    /// Whether this reader may see `event`.
    pub fn can_see(&self, event: &Event) -> bool {
        let kind = event.kind.as_u16();
        match self.may_see(kind, expiration(event)) {
            Some(decided) => decided,
            None => {
                let GiftWrapAccess::Recipients(readers) = &self.gift_wraps else { return true };
                p_tags(event).any(|p| readers.contains(&p))
            }
        }
    }
}

/// What happened to one event of a written batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Stored durably (and any older replaceable version removed).
    Stored,
    /// The same event id was already stored.
    Duplicate,
    /// A replaceable/addressable event older than the stored version (NIP-01:
    /// newest `created_at` wins, then the lowest id).
    Superseded,
    /// Its author deleted it (NIP-09), or deleted its address up to a later time.
    Deleted,
    /// Its author (or the recipient of a gift wrap) asked to vanish (NIP-62).
    Vanished,
}

/// What keeps a removed event from coming back, as exported: one JSON line
/// each, beside the events, so a migrated relay refuses what this one
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "tombstone", rename_all = "kebab-case")]
pub enum Tombstone {
    /// NIP-09: `deleter` deleted event `id` (it keeps out only `deleter`'s event).
    Deleted {
        #[serde(with = "hex32")]
        id: [u8; 32],
        #[serde(with = "hex32")]
        deleter: [u8; 32],
    },
    /// NIP-09 `a`: versions of an address up to `until` are deleted.
    DeletedAddress {
        #[serde(with = "hex32")]
        pubkey: [u8; 32],
        kind: u16,
        d: String,
        until: u64,
    },
    /// NIP-62: everything by `pubkey` (and gift wraps to it) up to `until`.
    Vanished {
        #[serde(with = "hex32")]
        pubkey: [u8; 32],
        until: u64,
    },
}

/// 32-byte values as 64 hex characters.
mod hex32 {
    pub fn serialize<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// A stored event as served: its sort key and its canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub created_at: u64,
    pub id: [u8; 32],
    pub json: String,
}

impl StoredEvent {
    /// NIP-01 order: newest first, ties by lowest id.
    pub fn order_key(&self) -> (std::cmp::Reverse<u64>, [u8; 32]) {
        (std::cmp::Reverse(self.created_at), self.id)
    }
}

/// Why the store removed a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalReason {
    /// NIP-09 (or a restored deletion tombstone).
    Deleted,
    /// NIP-40 expiration passed.
    Expired,
    /// An operator banned it.
    Banned,
    /// NIP-62 request to vanish.
    Vanished,
    /// A newer replaceable or addressable version took its place.
    Replaced,
}

/// A stored event the store removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedEvent {
    pub id: [u8; 32],
    pub pubkey: [u8; 32],
    pub kind: u16,
    pub reason: RemovalReason,
}

/// Told, after each durable commit, what it stored and removed (stored
/// first: an event stored and removed by one commit appears in both). It
/// runs on the writer: it must only hand work off, never wait.
pub trait StoreObserver: Send + Sync {
    fn committed(&self, stored: &[Arc<AcceptedEvent>], removed: &[RemovedEvent]);
    /// Whether anyone wants stored events now; when not, the writer does
    /// not collect them (a commit's removals are always reported).
    fn wants_stored(&self) -> bool;
}

pub trait EventStore: Send + Sync + 'static {
    /// Registers the one observer of committed changes (plugins' `on-stored`
    /// and `on-removed`); later calls are ignored.
    fn observe(&self, observer: Arc<dyn StoreObserver>);

    /// Writes `events` in one atomic batch and returns once it is durable.
    /// Outcomes are in the order of `events`.
    fn write_batch(&self, events: &[Arc<AcceptedEvent>]) -> Result<Vec<WriteOutcome>, StoreError>;

    /// Up to `limit` events matching `filter` that `access` may see, newest
    /// first (ties: lowest id).
    fn query(&self, filter: &Filter, limit: usize, access: &ReadAccess) -> Result<Vec<StoredEvent>, StoreError>;

    /// Number of stored events matching `filter` that `access` may see.
    fn count(&self, filter: &Filter, access: &ReadAccess) -> Result<u64, StoreError>;

    /// Removes every event whose NIP-40 expiration is at or before `now`;
    /// returns how many.
    fn remove_expired(&self, now: u64) -> Result<usize, StoreError>;

    /// One event by id.
    fn get(&self, id: &[u8; 32]) -> Result<Option<StoredEvent>, StoreError>;

    /// Removes one event and every index entry leading to it (an operator's
    /// ban); returns whether it was stored. Durable when it returns.
    fn remove(&self, id: &[u8; 32]) -> Result<bool, StoreError>;

    /// One page of every stored event (export), from where `after` left off
    /// (`None`: the start): up to `limit` JSONs as stored, not parsed (an
    /// export does not need the event, and an import checks every line
    /// anyway), in the store's own order, and where the next page starts
    /// (`None`: this was the last). A page may be empty and still not the
    /// last. Every event stored before the first page and not removed
    /// since is in some page.
    fn scan_all(&self, after: Option<&ScanCursor>, limit: usize) -> Result<ScanPage, StoreError>;

    /// Why `event` would not be stored now (a deletion or request to vanish
    /// keeps it out), if it would not.
    fn refusal_of(&self, event: &Event) -> Result<Option<WriteOutcome>, StoreError>;

    /// Every tombstone, in key order (export).
    fn visit_tombstones(&self, visit: &mut dyn FnMut(Tombstone)) -> Result<(), StoreError>;

    /// Writes `tombstones` (import), durably. A later tombstone of the same
    /// address or key keeps the later time; a deleted event still stored by
    /// its deleter is removed.
    fn restore_tombstones(&self, tombstones: &[Tombstone]) -> Result<(), StoreError>;

    /// Bytes the store occupies on disk, if the engine knows.
    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    /// Events matching any of `filters` (each with its own limit: the filter's
    /// `limit` capped at `max_limit`, else `default_limit`), deduplicated, in
    /// NIP-01 order, handed to `visit` one at a time until it returns false.
    /// The per-filter results are merged lazily: memory does not grow with
    /// the number of filters or their limits.
    fn visit_filters(
        &self,
        filters: &[Filter],
        default_limit: usize,
        max_limit: usize,
        access: &ReadAccess,
        visit: &mut dyn FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError>;

    /// Number of distinct stored events matching any of `filters` that
    /// `access` may see, counted from the indexes (an event is read only
    /// when the index cannot decide a filter on its own, and then dropped).
    fn count_filters(&self, filters: &[Filter], access: &ReadAccess) -> Result<u64, StoreError>;

    /// `(created_at, id)` of every stored event matching `filter` (up to its
    /// `limit`, if it has one) that `access` may see, in NIP-01 order, until
    /// `visit` returns false: the set a NIP-77 session reconciles. Read from
    /// the indexes; an event is read only when they cannot decide.
    fn visit_refs(
        &self,
        filter: &Filter,
        access: &ReadAccess,
        visit: &mut dyn FnMut(u64, [u8; 32]) -> bool,
    ) -> Result<(), StoreError>;

    /// [`EventStore::visit_filters`], collected.
    fn query_filters(
        &self,
        filters: &[Filter],
        default_limit: usize,
        max_limit: usize,
        access: &ReadAccess,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut all = Vec::new();
        self.visit_filters(filters, default_limit, max_limit, access, &mut |e| {
            all.push(e);
            true
        })?;
        Ok(all)
    }
}

/// Where an export's next page starts: opaque to callers, meaningful only
/// to the store that returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanCursor(pub(crate) Vec<u8>);

/// One page of [`EventStore::scan_all`].
#[derive(Debug, Default)]
pub struct ScanPage {
    pub events: Vec<String>,
    pub next: Option<ScanCursor>,
}
