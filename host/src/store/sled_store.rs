//! The sled implementation of [`EventStore`]: one tree holds every event
//! record and index entry (layout in `keys`), so each batch is atomic, and
//! every batch is flushed before its outcomes are returned.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use nostr::event::Event;

use super::keys;
use super::query::{IndexEntry, MergedScan, Plan, bounds, plan};
use super::{EventStore, StoreError, StoredEvent, WriteOutcome};
use crate::event::AcceptedEvent;
use crate::filter::{Filter, filter_matches};

pub struct SledEventStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Writes read-then-write the replaceable slots; one writer at a time.
    write_lock: Mutex<()>,
}

/// A version of an addressable slot, as needed to compare and remove it.
struct SlotHolder {
    created_at: u64,
    id: [u8; 32],
    index_keys: Vec<Vec<u8>>,
}

impl SledEventStore {
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir.join("events")).cache_capacity(cache_capacity_bytes).open()?;
        let tree = db.open_tree("events")?;
        Ok(Self { db, tree, write_lock: Mutex::new(()) })
    }

    fn load(&self, id: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let Some(bytes) = self.tree.get(keys::event_key(id))? else { return Ok(None) };
        let json = String::from_utf8(bytes.to_vec()).map_err(|e| corrupt(id, e))?;
        Ok(Some(json))
    }

    fn parse(id: &[u8; 32], json: &str) -> Result<Event, StoreError> {
        serde_json::from_str(json).map_err(|e| corrupt(id, e))
    }

    fn slot_holder(&self, slot: &[u8]) -> Result<Option<SlotHolder>, StoreError> {
        let Some(id_bytes) = self.tree.get(slot)? else { return Ok(None) };
        let id: [u8; 32] = id_bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            id: hex::encode(slot),
            reason: "address slot does not hold a 32-byte id".into(),
        })?;
        let Some(json) = self.load(&id)? else { return Ok(None) };
        let event = Self::parse(&id, &json)?;
        Ok(Some(SlotHolder { created_at: event.created_at.as_secs(), id, index_keys: keys::index_keys(&event) }))
    }

    /// Candidates of a scan plan, in order, each passed to `visit` with its
    /// JSON (loaded only when needed) until `visit` returns false.
    fn scan(
        &self,
        filter: &Filter,
        prefixes: &[Vec<u8>],
        covered: bool,
        need_json: bool,
        mut visit: impl FnMut(IndexEntry, Option<String>) -> bool,
    ) -> Result<(), StoreError> {
        let iters = prefixes
            .iter()
            .map(|p| {
                let (lo, hi) = bounds(p, filter);
                self.tree.range(lo..=hi).map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
            })
            .collect();
        let mut merged = MergedScan::new(iters)?;
        while let Some(entry) = merged.next_entry()? {
            if !filter.could_match_kind(entry.kind) {
                continue;
            }
            let json = if covered && !need_json {
                None
            } else {
                let Some(json) = self.load(&entry.id)? else { continue };
                if !covered && !filter_matches(filter, &Self::parse(&entry.id, &json)?) {
                    continue;
                }
                Some(json)
            };
            if !visit(entry, json) {
                break;
            }
        }
        Ok(())
    }

    fn lookup_ids(&self, filter: &Filter, ids: &[[u8; 32]]) -> Result<Vec<StoredEvent>, StoreError> {
        let only_ids = filter.authors.is_none()
            && filter.kinds.is_none()
            && filter.tags.is_empty()
            && filter.since.is_none()
            && filter.until.is_none()
            && filter.exclude_kinds.is_empty();
        let mut out = Vec::new();
        for id in ids {
            let Some(json) = self.load(id)? else { continue };
            let event = Self::parse(id, &json)?;
            if only_ids || filter_matches(filter, &event) {
                out.push(StoredEvent { created_at: event.created_at.as_secs(), id: *id, json });
            }
        }
        out.sort_by_key(StoredEvent::order_key);
        Ok(out)
    }
}

fn corrupt(id: &[u8], reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { id: hex::encode(id), reason: reason.to_string() }
}

impl EventStore for SledEventStore {
    fn write_batch(&self, events: &[Arc<AcceptedEvent>]) -> Result<Vec<WriteOutcome>, StoreError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        let mut in_batch: HashMap<[u8; 32], ()> = HashMap::new();
        let mut slots: HashMap<Vec<u8>, Option<SlotHolder>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(events.len());
        for accepted in events {
            let event = &accepted.event;
            let id = event.id.to_bytes();
            let event_key = keys::event_key(&id);
            if in_batch.contains_key(&id) || self.tree.contains_key(&event_key)? {
                outcomes.push(WriteOutcome::Duplicate);
                continue;
            }
            let created_at = event.created_at.as_secs();
            let index_keys = keys::index_keys(event);
            let index_value = keys::index_value(event);
            if let Some(slot) = keys::address_of(event) {
                let current = match slots.remove(&slot) {
                    Some(holder) => holder,
                    None => self.slot_holder(&slot)?,
                };
                if let Some(cur) = current {
                    if (std::cmp::Reverse(cur.created_at), cur.id) <= (std::cmp::Reverse(created_at), id) {
                        slots.insert(slot, Some(cur));
                        outcomes.push(WriteOutcome::Superseded);
                        continue;
                    }
                    batch.remove(keys::event_key(&cur.id));
                    for k in &cur.index_keys {
                        batch.remove(k.as_slice());
                    }
                    in_batch.remove(&cur.id);
                }
                batch.insert(slot.as_slice(), &id[..]);
                slots.insert(slot, Some(SlotHolder { created_at, id, index_keys: index_keys.clone() }));
            }
            batch.insert(event_key, accepted.json.as_bytes());
            for k in index_keys {
                batch.insert(k, index_value.as_slice());
            }
            in_batch.insert(id, ());
            outcomes.push(WriteOutcome::Stored);
        }
        if outcomes.contains(&WriteOutcome::Stored) {
            self.tree.apply_batch(batch)?;
            self.db.flush()?;
        }
        Ok(outcomes)
    }

    fn query(&self, filter: &Filter, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 || filter.matches_nothing() {
            return Ok(Vec::new());
        }
        match plan(filter) {
            Plan::Ids(ids) => {
                let mut out = self.lookup_ids(filter, &ids)?;
                out.truncate(limit);
                Ok(out)
            }
            Plan::Scan { prefixes, covered } => {
                let mut out = Vec::with_capacity(limit.min(1024));
                self.scan(filter, &prefixes, covered, true, |entry, json| {
                    out.push(StoredEvent {
                        created_at: entry.created_at,
                        id: entry.id,
                        json: json.expect("json requested"),
                    });
                    out.len() < limit
                })?;
                Ok(out)
            }
        }
    }

    fn count(&self, filter: &Filter) -> Result<u64, StoreError> {
        if filter.matches_nothing() {
            return Ok(0);
        }
        match plan(filter) {
            Plan::Ids(ids) => Ok(self.lookup_ids(filter, &ids)?.len() as u64),
            Plan::Scan { prefixes, covered } => {
                let mut n = 0u64;
                self.scan(filter, &prefixes, covered, false, |_, _| {
                    n += 1;
                    true
                })?;
                Ok(n)
            }
        }
    }

    fn get(&self, id: &[u8; 32]) -> Result<Option<StoredEvent>, StoreError> {
        let Some(json) = self.load(id)? else { return Ok(None) };
        let event = Self::parse(id, &json)?;
        Ok(Some(StoredEvent { created_at: event.created_at.as_secs(), id: *id, json }))
    }
}
