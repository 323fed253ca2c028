//! The sled implementation of [`EventStore`]: one tree holds every event
//! record, index entry and tombstone (layout in `keys`), so each batch is
//! atomic, and every batch is flushed before its outcomes are returned.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nostr::event::Event;

use super::keys;
use super::query::{EntryStream, MergedScan, Ordered, Plan, UnionMerge, bounds, plan};
use super::{
    EventStore, ReadAccess, RemovalReason, RemovedEvent, ScanCursor, ScanPage, StoreError, StoreObserver, StoredEvent,
    Tombstone, WriteOutcome,
};
use crate::event::AcceptedEvent;
use crate::event::{GIFT_WRAP, expiration, p_tags};
use crate::filter::{Filter, filter_matches};

pub struct SledEventStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Writes read-then-write slots and tombstones; one writer at a time.
    write_lock: Mutex<()>,
    /// The serial the next stored body gets (`keys::BODY`): one more than the
    /// last one stored, found at open.
    next_serial: AtomicU64,
    /// Told what each commit stored and removed (see [`StoreObserver`]).
    observer: std::sync::OnceLock<Arc<dyn StoreObserver>>,
}

fn corrupt(id: &[u8], reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { id: hex::encode(id), reason: reason.to_string() }
}

fn parse(id: &[u8], json: &[u8]) -> Result<Event, StoreError> {
    serde_json::from_slice(json).map_err(|e| corrupt(id, e))
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// A batch being built, read through: what it writes shadows the tree, so
/// later events of a batch see the effects of earlier ones.
struct PendingBatch<'a> {
    tree: &'a sled::Tree,
    /// The next body serial, shared with the store.
    next_serial: &'a AtomicU64,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Events inserted by this batch (not yet visible to tree scans); kept
    /// only when the batch holds a request to vanish, the one reader.
    inserted: Option<Vec<Event>>,
    /// Stored events this batch removes, for the store's observer.
    removed: Vec<RemovedEvent>,
}

impl<'a> PendingBatch<'a> {
    fn new(tree: &'a sled::Tree, next_serial: &'a AtomicU64, track_inserted: bool) -> Self {
        Self {
            tree,
            next_serial,
            writes: BTreeMap::new(),
            inserted: track_inserted.then(Vec::new),
            removed: Vec::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    fn load_event(&self, id: &[u8; 32]) -> Result<Option<Event>, StoreError> {
        let Some(record) = self.get(&keys::event_key(id))? else { return Ok(None) };
        match keys::Record::parse(&record) {
            keys::Record::Inline(json) => parse(id, json).map(Some),
            keys::Record::Serial(serial) => match self.get(&keys::body_key(serial))? {
                Some(json) => parse(id, &json).map(Some),
                None => Err(corrupt(id, format!("body {serial} is missing"))),
            },
        }
    }

    fn insert_event(&mut self, accepted: &AcceptedEvent) {
        let event = &accepted.event;
        let id = event.id.to_bytes();
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let value = keys::index_value(event, serial);
        for k in keys::index_keys(event) {
            self.put(k, value.clone());
        }
        if let Some(exp) = expiration(event) {
            self.put(keys::expiration_key(exp, &id), vec![]);
        }
        if let Some(slot) = keys::address_of(event) {
            self.put(slot, id.to_vec());
        }
        self.put(keys::event_key(&id), serial.to_be_bytes().to_vec());
        self.put(keys::body_key(serial).to_vec(), accepted.json.as_bytes().to_vec());
        if let Some(inserted) = &mut self.inserted {
            inserted.push(event.clone());
        }
    }

    /// Removes an event with every key that leads to it.
    fn remove_event(&mut self, event: &Event, reason: RemovalReason) -> Result<(), StoreError> {
        let id = event.id.to_bytes();
        self.removed.push(RemovedEvent { id, pubkey: event.pubkey.to_bytes(), kind: event.kind.as_u16(), reason });
        if let Some(record) = self.get(&keys::event_key(&id))?
            && let keys::Record::Serial(serial) = keys::Record::parse(&record)
        {
            self.remove(keys::body_key(serial).to_vec());
        }
        self.remove(keys::event_key(&id));
        for k in keys::index_keys(event) {
            self.remove(k);
        }
        self.remove(keys::legacy_author_kind_key(event));
        if let Some(exp) = expiration(event) {
            self.remove(keys::expiration_key(exp, &id));
        }
        if let Some(slot) = keys::address_of(event)
            && self.get(&slot)?.as_deref() == Some(&id[..])
        {
            let vacant = keys::Slot::Vacant { created_at: event.created_at.as_secs(), id };
            self.put(slot, vacant.encode());
        }
        if let Some(inserted) = &mut self.inserted {
            inserted.retain(|e| e.id != event.id);
        }
        Ok(())
    }

    /// Ids under an index prefix with `created_at <= until`.
    fn scan_ids(&self, prefix: &[u8], until: u64) -> Result<Vec<(u16, [u8; 32])>, StoreError> {
        let mut lower = prefix.to_vec();
        lower.extend_from_slice(&(u64::MAX - until).to_be_bytes());
        let mut out = Vec::new();
        for kv in self.tree.range(lower..) {
            let (k, v) = kv?;
            if !k.starts_with(prefix) {
                break;
            }
            if let Some((_, id)) = keys::parse_suffix(&k) {
                out.push((keys::parse_index_value(&v).kind, id));
            }
        }
        Ok(out)
    }

    fn slot(&self, key: &[u8]) -> Result<Option<keys::Slot>, StoreError> {
        self.get(key)?.map(|v| keys::Slot::parse(&v).ok_or_else(|| corrupt(key, "bad slot"))).transpose()
    }

    fn vanished_at(&self, pubkey: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        Ok(self.get(&keys::vanished_key(pubkey))?.map(|v| be_u64(&v)))
    }

    /// Why `event` may not be stored because of a deletion or vanish request.
    fn tombstoned(&self, event: &Event) -> Result<Option<WriteOutcome>, StoreError> {
        let id = event.id.to_bytes();
        let author = event.pubkey.to_bytes();
        // Deletions and requests to vanish cannot be deleted (NIP-09, NIP-62),
        // whether the deletion arrives before or after them.
        let deletable = !matches!(event.kind.as_u16(), 5 | 62);
        if deletable && self.get(&keys::deleted_key(&id, &author))?.is_some() {
            return Ok(Some(WriteOutcome::Deleted));
        }
        // NIP-59: a gift wrap's recipient may delete it too.
        if event.kind.as_u16() == GIFT_WRAP {
            for p in p_tags(event) {
                if self.get(&keys::deleted_key(&id, &p))?.is_some() {
                    return Ok(Some(WriteOutcome::Deleted));
                }
            }
        }
        let created_at = event.created_at.as_secs();
        if self.vanished_at(&author)?.is_some_and(|t| created_at <= t) {
            return Ok(Some(WriteOutcome::Vanished));
        }
        if event.kind.as_u16() == GIFT_WRAP {
            for p in p_tags(event) {
                if self.vanished_at(&p)?.is_some_and(|t| created_at <= t) {
                    return Ok(Some(WriteOutcome::Vanished));
                }
            }
        }
        if let Some(slot) = keys::address_of(event)
            && self.get(&keys::deleted_address_key(&slot))?.is_some_and(|t| created_at <= be_u64(&t))
        {
            return Ok(Some(WriteOutcome::Deleted));
        }
        Ok(None)
    }

    /// NIP-09: a kind 5 removes its author's events named by `e` (and gift
    /// wraps addressed to its author, NIP-59), and the versions of its
    /// author's addresses named by `a` up to its time; the tombstones keep
    /// them from coming back.
    fn apply_deletion(&mut self, deletion: &Event) -> Result<(), StoreError> {
        let author = deletion.pubkey.to_bytes();
        let until = deletion.created_at.as_secs();
        for tag in deletion.tags.iter().map(|t| t.as_slice()) {
            match (tag.first().map(String::as_str), tag.get(1)) {
                (Some("e"), Some(value)) => {
                    let mut id = [0u8; 32];
                    if value.len() != 64 || hex::decode_to_slice(value, &mut id).is_err() {
                        continue;
                    }
                    match self.load_event(&id)? {
                        // NIP-59: relays SHOULD delete a gift wrap whose `p`
                        // tag names the signer of the deletion.
                        Some(target) if target.kind.as_u16() == GIFT_WRAP && p_tags(&target).any(|p| p == author) => {
                            self.remove_event(&target, RemovalReason::Deleted)?
                        }
                        Some(target) if target.pubkey.to_bytes() != author => continue,
                        // Deletions cannot be undone, requests to vanish not deleted.
                        Some(target) if matches!(target.kind.as_u16(), 5 | 62) => continue,
                        Some(target) => self.remove_event(&target, RemovalReason::Deleted)?,
                        None => {}
                    }
                    self.put(keys::deleted_key(&id, &author), vec![]);
                }
                (Some("a"), Some(value)) => {
                    let mut parts = value.splitn(3, ':');
                    let (Some(kind), Some(pk), d) = (parts.next(), parts.next(), parts.next().unwrap_or("")) else {
                        continue;
                    };
                    let (Ok(kind), true) = (kind.parse::<u16>(), pk == hex::encode(author)) else { continue };
                    let slot = keys::address_key(&author, kind, d);
                    let key = keys::deleted_address_key(&slot);
                    let previous = self.get(&key)?.map(|v| be_u64(&v)).unwrap_or(0);
                    self.put(key, previous.max(until).to_be_bytes().to_vec());
                    if let Some(keys::Slot::Held(id)) = self.slot(&slot)?
                        && let Some(target) = self.load_event(&id)?
                        && target.created_at.as_secs() <= until
                    {
                        self.remove_event(&target, RemovalReason::Deleted)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// NIP-62: removes everything by the requester up to its time, and the
    /// gift wraps addressed to it; the tombstone keeps them from coming back.
    fn apply_vanish(&mut self, request: &Event) -> Result<(), StoreError> {
        let pubkey = request.pubkey.to_bytes();
        let until = request.created_at.as_secs();
        let previous = self.vanished_at(&pubkey)?.unwrap_or(0);
        self.put(keys::vanished_key(&pubkey), previous.max(until).to_be_bytes().to_vec());
        let mut doomed: Vec<[u8; 32]> =
            self.scan_ids(&keys::author_prefix(&pubkey), until)?.into_iter().map(|(_, id)| id).collect();
        let (p_prefix, _) = keys::tag_prefix(b'p', &hex::encode(pubkey));
        doomed.extend(
            self.scan_ids(&p_prefix, until)?.into_iter().filter(|(kind, _)| *kind == GIFT_WRAP).map(|(_, id)| id),
        );
        for e in self.inserted.iter().flatten() {
            let mine = e.pubkey.to_bytes() == pubkey;
            let wrapped_for_me = e.kind.as_u16() == GIFT_WRAP && p_tags(e).any(|p| p == pubkey);
            if (mine || wrapped_for_me) && e.created_at.as_secs() <= until {
                doomed.push(e.id.to_bytes());
            }
        }
        let own_id = request.id.to_bytes();
        doomed.sort_unstable();
        doomed.dedup();
        for id in doomed.into_iter().filter(|id| *id != own_id) {
            if let Some(event) = self.load_event(&id)? {
                self.remove_event(&event, RemovalReason::Vanished)?;
            }
        }
        Ok(())
    }

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

impl SledEventStore {
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir.join("events")).cache_capacity(cache_capacity_bytes).open()?;
        let tree = db.open_tree("events")?;
        migrate_tombstones(&tree)?;
        db.flush()?;
        let last_serial = match tree.range(keys::body_key(0)..=keys::body_key(u64::MAX)).next_back() {
            Some(kv) => be_u64(&kv?.0[1..]),
            None => 0,
        };
        Ok(Self {
            db,
            tree,
            write_lock: Mutex::new(()),
            next_serial: AtomicU64::new(last_serial + 1),
            observer: std::sync::OnceLock::new(),
        })
    }

    fn pending(&self, track_inserted: bool) -> PendingBatch<'_> {
        PendingBatch::new(&self.tree, &self.next_serial, track_inserted)
    }

    fn load(&self, id: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let Some(record) = self.tree.get(keys::event_key(id))? else { return Ok(None) };
        self.body_of(id, &record)
    }

    /// The JSON an id record leads to (`None`: removed since the record was
    /// read).
    fn body_of(&self, id: &[u8; 32], record: &[u8]) -> Result<Option<String>, StoreError> {
        match keys::Record::parse(record) {
            keys::Record::Inline(json) => String::from_utf8(json.to_vec()).map(Some).map_err(|e| corrupt(id, e)),
            keys::Record::Serial(serial) => self.body(id, serial),
        }
    }

    /// The JSON stored under `serial` for the event `id` (`None`: removed
    /// since its index entry or id record was read).
    fn body(&self, id: &[u8; 32], serial: u64) -> Result<Option<String>, StoreError> {
        let Some(bytes) = self.tree.get(keys::body_key(serial))? else { return Ok(None) };
        String::from_utf8(bytes.to_vec()).map(Some).map_err(|e| corrupt(id, e))
    }

    /// Applies `pending` durably, then tells the observer what it stored
    /// (`stored`, in order) and removed.
    fn commit(&self, mut pending: PendingBatch<'_>, stored: &[Arc<AcceptedEvent>]) -> Result<(), StoreError> {
        let removed = std::mem::take(&mut pending.removed);
        if !pending.writes.is_empty() {
            self.tree.apply_batch(pending.into_batch())?;
            self.db.flush()?;
        }
        if let Some(observer) = self.observer.get()
            && (!stored.is_empty() || !removed.is_empty())
        {
            observer.committed(stored, &removed);
        }
        Ok(())
    }

    /// The matches of `filter`, at most `limit`, pulled one at a time in
    /// NIP-01 order. With `need_json` false, an event's JSON is read only
    /// when the index cannot decide a match on its own.
    fn cursor<'s>(
        &'s self,
        filter: &'s Filter,
        limit: usize,
        need_json: bool,
        access: &'s ReadAccess,
    ) -> Result<FilterCursor<'s>, StoreError> {
        let (source, covered) = match plan(filter) {
            Plan::Ids(ids) => (Source::Listed(self.lookup_ids(filter, &ids, access)?.into_iter()), true),
            Plan::Slots(slots) => {
                let mut ids = Vec::with_capacity(slots.len());
                for slot in &slots {
                    if let Some(bytes) = self.tree.get(slot)?
                        && let Some(keys::Slot::Held(id)) = keys::Slot::parse(&bytes)
                    {
                        ids.push(id);
                    }
                }
                (Source::Listed(self.lookup_ids(filter, &ids, access)?.into_iter()), true)
            }
            Plan::Scan { prefixes, covered } => {
                let iters = prefixes
                    .iter()
                    .map(|p| {
                        let (lo, hi) = bounds(p, filter);
                        self.tree.range(lo..=hi)
                    })
                    .collect();
                (Source::Scan(MergedScan::new(iters)?), covered)
            }
        };
        Ok(FilterCursor { store: self, filter, access, source, covered, need_json, remaining: limit })
    }

    fn lookup_ids(
        &self,
        filter: &Filter,
        ids: &[[u8; 32]],
        access: &ReadAccess,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            let Some(json) = self.load(id)? else { continue };
            let event = parse(id, json.as_bytes())?;
            if filter_matches(filter, &event) && access.can_see(&event) {
                out.push(StoredEvent { created_at: event.created_at.as_secs(), id: *id, json });
            }
        }
        out.sort_by_key(StoredEvent::order_key);
        Ok(out)
    }
}

/// Where a cursor's candidates come from.
enum Source {
    /// Index ranges, merged.
    Scan(MergedScan<sled::Iter>),
    /// Events looked up by id, already checked and ordered.
    Listed(std::vec::IntoIter<StoredEvent>),
}

/// One filter's matches, in NIP-01 order, read lazily from the index.
struct FilterCursor<'s> {
    store: &'s SledEventStore,
    filter: &'s Filter,
    access: &'s ReadAccess,
    source: Source,
    /// Every condition of the filter is decided by the index.
    covered: bool,
    need_json: bool,
    remaining: usize,
}

impl EntryStream for FilterCursor<'_> {
    type Payload = Option<String>;
    type Error = StoreError;

    fn next_entry(&mut self) -> Result<Option<Ordered<Option<String>>>, StoreError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let found = match &mut self.source {
            Source::Listed(events) => events.next().map(|e| (e.created_at, e.id, Some(e.json))),
            Source::Scan(merged) => loop {
                let Some(entry) = merged.next_entry()? else { break None };
                if !self.filter.could_match_kind(entry.kind) {
                    continue;
                }
                let visibility = self.access.may_see(entry.kind, entry.expiration);
                if visibility == Some(false) {
                    continue;
                }
                let decided = self.covered && visibility == Some(true);
                if decided && !self.need_json {
                    break Some((entry.created_at, entry.id, None));
                }
                // Index values written since layout 3 lead straight to the body.
                let json = match entry.serial {
                    Some(serial) => self.store.body(&entry.id, serial)?,
                    None => self.store.load(&entry.id)?,
                };
                let Some(json) = json else { continue };
                if !decided {
                    let event = parse(&entry.id, json.as_bytes())?;
                    if !filter_matches(self.filter, &event) || !self.access.can_see(&event) {
                        continue;
                    }
                }
                break Some((entry.created_at, entry.id, self.need_json.then_some(json)));
            },
        };
        if found.is_some() {
            self.remaining -= 1;
        }
        Ok(found)
    }
}

/// Rewrites NIP-09 tombstones of the first layout (`D id -> deleter`, which
/// any later deletion of the same id overwrote) into one key per deleter.
fn migrate_tombstones(tree: &sled::Tree) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut n = 0usize;
    for kv in tree.scan_prefix([keys::DELETED]) {
        let (k, v) = kv?;
        if k.len() == 33 && v.len() == 32 {
            let mut key = k.to_vec();
            key.extend_from_slice(&v);
            batch.insert(key, vec![]);
            batch.remove(k);
            n += 1;
        }
    }
    if n > 0 {
        tree.apply_batch(batch)?;
        tracing::info!(tombstones = n, "NIP-09 tombstones moved to the per-deleter layout");
    }
    Ok(())
}

impl EventStore for SledEventStore {
    fn write_batch(&self, events: &[Arc<AcceptedEvent>]) -> Result<Vec<WriteOutcome>, StoreError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending(events.iter().any(|e| e.vanish_request));
        let mut outcomes = Vec::with_capacity(events.len());
        for accepted in events {
            let event = &accepted.event;
            let id = event.id.to_bytes();
            if pending.get(&keys::event_key(&id))?.is_some() {
                outcomes.push(WriteOutcome::Duplicate);
                continue;
            }
            // A version older than its slot's current or newest-ever one is
            // superseded; a newer one replaces it, even when the newer one is
            // itself refused below (deleted, vanished), as it would have had
            // it arrived first.
            let slot = keys::address_of(event);
            let version = (event.created_at.as_secs(), &id);
            let (mut superseded, mut replaced) = (false, None);
            if let Some(slot) = &slot {
                match pending.slot(slot)? {
                    Some(keys::Slot::Vacant { created_at, id: newest }) => {
                        superseded = !keys::newer_version(version, (created_at, &newest));
                    }
                    Some(keys::Slot::Held(holder_id)) => match pending.load_event(&holder_id)? {
                        Some(current) if !keys::newer_version(version, (current.created_at.as_secs(), &holder_id)) => {
                            superseded = true;
                        }
                        current => replaced = current,
                    },
                    None => {}
                }
            }
            if let Some(refused) = pending.tombstoned(event)? {
                if let (false, Some(slot)) = (superseded, slot) {
                    if let Some(current) = &replaced {
                        pending.remove_event(current, RemovalReason::Replaced)?;
                    }
                    pending.put(slot, keys::Slot::Vacant { created_at: version.0, id }.encode());
                }
                outcomes.push(refused);
                continue;
            }
            if superseded {
                outcomes.push(WriteOutcome::Superseded);
                continue;
            }
            if let Some(current) = &replaced {
                pending.remove_event(current, RemovalReason::Replaced)?;
            }
            pending.insert_event(accepted);
            match event.kind.as_u16() {
                5 => pending.apply_deletion(event)?,
                62 if accepted.vanish_request => pending.apply_vanish(event)?,
                _ => {}
            }
            outcomes.push(WriteOutcome::Stored);
        }
        let stored: Vec<Arc<AcceptedEvent>> = match self.observer.get() {
            Some(observer) if observer.wants_stored() => events
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == WriteOutcome::Stored)
                .map(|(e, _)| e.clone())
                .collect(),
            _ => Vec::new(),
        };
        self.commit(pending, &stored)?;
        Ok(outcomes)
    }

    fn query(&self, filter: &Filter, limit: usize, access: &ReadAccess) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 || filter.matches_nothing() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut cursor = self.cursor(filter, limit, true, access)?;
        while let Some((created_at, id, json)) = cursor.next_entry()? {
            out.push(StoredEvent { created_at, id, json: json.expect("json requested") });
        }
        Ok(out)
    }

    fn count(&self, filter: &Filter, access: &ReadAccess) -> Result<u64, StoreError> {
        self.count_filters(std::slice::from_ref(filter), access)
    }

    fn visit_filters(
        &self,
        filters: &[Filter],
        default_limit: usize,
        max_limit: usize,
        access: &ReadAccess,
        visit: &mut dyn FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        let mut cursors = Vec::with_capacity(filters.len());
        for (i, filter) in filters.iter().enumerate() {
            let limit = filter.limit.map_or(default_limit, |l| usize::try_from(l).unwrap_or(usize::MAX)).min(max_limit);
            // A filter repeated in one request adds nothing.
            if limit == 0 || filter.matches_nothing() || filters[..i].contains(filter) {
                continue;
            }
            cursors.push(self.cursor(filter, limit, true, access)?);
        }
        let mut union = UnionMerge::new(cursors)?;
        while let Some((created_at, id, json)) = union.next()? {
            if !visit(StoredEvent { created_at, id, json: json.expect("json requested") }) {
                break;
            }
        }
        Ok(())
    }

    fn count_filters(&self, filters: &[Filter], access: &ReadAccess) -> Result<u64, StoreError> {
        let mut cursors = Vec::with_capacity(filters.len());
        for (i, filter) in filters.iter().enumerate() {
            if filter.matches_nothing() || filters[..i].contains(filter) {
                continue;
            }
            cursors.push(self.cursor(filter, usize::MAX, false, access)?);
        }
        let mut union = UnionMerge::new(cursors)?;
        let mut n = 0u64;
        while union.next()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    fn visit_refs(
        &self,
        filter: &Filter,
        access: &ReadAccess,
        visit: &mut dyn FnMut(u64, [u8; 32]) -> bool,
    ) -> Result<(), StoreError> {
        let limit = filter.limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        if limit == 0 || filter.matches_nothing() {
            return Ok(());
        }
        let mut cursor = self.cursor(filter, limit, false, access)?;
        while let Some((created_at, id, _)) = cursor.next_entry()? {
            if !visit(created_at, id) {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, id: &[u8; 32]) -> Result<Option<StoredEvent>, StoreError> {
        let Some(json) = self.load(id)? else { return Ok(None) };
        let event = parse(id, json.as_bytes())?;
        Ok(Some(StoredEvent { created_at: event.created_at.as_secs(), id: *id, json }))
    }

    fn remove(&self, id: &[u8; 32]) -> Result<bool, StoreError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending(false);
        let Some(event) = pending.load_event(id)? else { return Ok(false) };
        pending.remove_event(&event, RemovalReason::Banned)?;
        self.commit(pending, &[])?;
        Ok(true)
    }

    /// Bodies first, in serial order (contiguous in sled, so an export reads
    /// the log sequentially instead of one random leaf per event), then the
    /// id records of earlier layouts that hold their JSON inline; id records
    /// holding a serial are skipped there, at most `16 * limit` of them per
    /// page. The cursor is the last key read.
    fn scan_all(&self, after: Option<&ScanCursor>, limit: usize) -> Result<ScanPage, StoreError> {
        // The key right after the cursor's: its key with a 0 byte appended.
        let resume = |k: &[u8]| [k, &[0]].concat();
        let bodies_end = keys::body_key(u64::MAX).to_vec();
        let records = (keys::event_key(&[0; 32]), keys::event_key(&[0xff; 32]));
        let mut page = ScanPage::default();
        let mut last: Option<Vec<u8>> = None;
        let after = after.map(|c| c.0.as_slice());
        if after.is_none_or(|k| k.first() == Some(&keys::BODY)) {
            let start = after.map_or_else(|| keys::body_key(0).to_vec(), resume);
            for kv in self.tree.range(start..=bodies_end) {
                let (k, v) = kv?;
                let json = String::from_utf8(v.to_vec()).map_err(|e| corrupt(&k, e))?;
                page.events.push(json);
                if page.events.len() == limit {
                    page.next = Some(ScanCursor(k.to_vec()));
                    return Ok(page);
                }
            }
        }
        let start = after.filter(|k| k.first() == Some(&keys::EVENT)).map_or(records.0, resume);
        let mut budget = limit.saturating_mul(16);
        for kv in self.tree.range(start..=records.1) {
            let (k, v) = kv?;
            if let keys::Record::Inline(json) = keys::Record::parse(&v) {
                page.events.push(String::from_utf8(json.to_vec()).map_err(|e| corrupt(&k, e))?);
            }
            budget = budget.saturating_sub(1);
            if page.events.len() == limit || budget == 0 {
                last = Some(k.to_vec());
                break;
            }
        }
        page.next = last.map(ScanCursor);
        Ok(page)
    }

    fn refusal_of(&self, event: &Event) -> Result<Option<WriteOutcome>, StoreError> {
        self.pending(false).tombstoned(event)
    }

    fn visit_tombstones(&self, visit: &mut dyn FnMut(Tombstone)) -> Result<(), StoreError> {
        let id32 = |b: &[u8]| <[u8; 32]>::try_from(b).ok();
        for kv in self.tree.scan_prefix([keys::DELETED]) {
            let (k, _) = kv?;
            if let (Some(id), Some(deleter)) = (k.get(1..33).and_then(id32), k.get(33..65).and_then(id32)) {
                visit(Tombstone::Deleted { id, deleter });
            }
        }
        for kv in self.tree.scan_prefix([keys::DELETED_ADDRESS]) {
            let (k, v) = kv?;
            // Layout of `address_key`: tag, pubkey, kind (2 bytes), d.
            let (Some(pubkey), Some(kind)) = (k.get(1..33).and_then(id32), k.get(33..35)) else { continue };
            let d = String::from_utf8_lossy(&k[35..]).into_owned();
            let kind = u16::from_be_bytes([kind[0], kind[1]]);
            visit(Tombstone::DeletedAddress { pubkey, kind, d, until: be_u64(&v) });
        }
        for kv in self.tree.scan_prefix([keys::VANISHED]) {
            let (k, v) = kv?;
            if let Some(pubkey) = k.get(1..33).and_then(id32) {
                visit(Tombstone::Vanished { pubkey, until: be_u64(&v) });
            }
        }
        Ok(())
    }

    fn restore_tombstones(&self, tombstones: &[Tombstone]) -> Result<(), StoreError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending(false);
        let later = |pending: &PendingBatch<'_>, key: &[u8], until: u64| -> Result<Vec<u8>, StoreError> {
            let previous = pending.get(key)?.map(|v| be_u64(&v)).unwrap_or(0);
            Ok(previous.max(until).to_be_bytes().to_vec())
        };
        for t in tombstones {
            match t {
                Tombstone::Deleted { id, deleter } => {
                    if let Some(event) = pending.load_event(id)?
                        && event.pubkey.to_bytes() == *deleter
                    {
                        pending.remove_event(&event, RemovalReason::Deleted)?;
                    }
                    pending.put(keys::deleted_key(id, deleter), vec![]);
                }
                Tombstone::DeletedAddress { pubkey, kind, d, until } => {
                    let key = keys::deleted_address_key(&keys::address_key(pubkey, *kind, d));
                    let value = later(&pending, &key, *until)?;
                    pending.put(key, value);
                }
                Tombstone::Vanished { pubkey, until } => {
                    let key = keys::vanished_key(pubkey);
                    let value = later(&pending, &key, *until)?;
                    pending.put(key, value);
                }
            }
        }
        self.commit(pending, &[])
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }

    fn observe(&self, observer: Arc<dyn StoreObserver>) {
        let _ = self.observer.set(observer);
    }

    fn remove_expired(&self, now: u64) -> Result<usize, StoreError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending(false);
        let upper = keys::expiration_key(now, &[0xff; 32]);
        let mut removed = 0;
        for kv in self.tree.range(vec![keys::EXPIRATION]..=upper) {
            let (k, _) = kv?;
            let Some(id) = k.get(9..41).and_then(|b| <[u8; 32]>::try_from(b).ok()) else { continue };
            match pending.load_event(&id)? {
                Some(event) => {
                    pending.remove_event(&event, RemovalReason::Expired)?;
                    removed += 1;
                }
                None => pending.remove(k.to_vec()),
            }
            if removed >= 10_000 {
                break; // the next sweep continues
            }
        }
        self.commit(pending, &[])?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
    use nostr::key::Keys;
    use nostr::types::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::filter::{Filter, FilterLimits};

    fn note(keys: &Keys, kind: u16, created_at: u64) -> Arc<AcceptedEvent> {
        let event = EventBuilder::new(Kind::from(kind), format!("kind {kind} at {created_at}"))
            .tags([Tag::parse(["t", "layout"]).expect("tag")])
            .custom_created_at(Timestamp::from(created_at))
            .finalize(keys)
            .expect("sign");
        Arc::new(AcceptedEvent::new(event))
    }

    fn filter(v: serde_json::Value) -> Filter {
        Filter::parse(&v, FilterLimits { max_values: 100 }).expect("filter")
    }

    fn ids(events: &[StoredEvent]) -> Vec<[u8; 32]> {
        events.iter().map(|e| e.id).collect()
    }

    fn keys_with_tag(store: &SledEventStore, tag: u8) -> usize {
        store.tree.scan_prefix([tag]).count()
    }

    /// Writes `event` the way layout 1 did: a `(pubkey, kind)` index key
    /// beside today's.
    fn write_layout_1(store: &SledEventStore, accepted: &AcceptedEvent) {
        let event = &accepted.event;
        let mut batch = sled::Batch::default();
        for k in keys::index_keys(event).into_iter().chain([keys::legacy_author_kind_key(event)]) {
            batch.insert(k, keys::legacy_index_value(event));
        }
        if let Some(slot) = keys::address_of(event) {
            batch.insert(slot, event.id.as_bytes().to_vec());
        }
        batch.insert(keys::event_key(event.id.as_bytes()), accepted.json.as_bytes());
        store.tree.apply_batch(batch).expect("apply");
    }

    #[test]
    fn bodies_are_stored_by_serial_and_leave_with_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Keys::generate();
        let (a, b) = (note(&alice, 1, 100), note(&alice, 1, 200));
        {
            let store = SledEventStore::open(dir.path(), 8 << 20).unwrap();
            store.write_batch(std::slice::from_ref(&a)).unwrap();
            assert_eq!(keys_with_tag(&store, keys::BODY), 1);
        }
        // Reopened, the next serial follows the last one stored: `b` must
        // not overwrite `a`'s body.
        let store = SledEventStore::open(dir.path(), 8 << 20).unwrap();
        store.write_batch(std::slice::from_ref(&b)).unwrap();
        assert_eq!(keys_with_tag(&store, keys::BODY), 2);
        let by_author = filter(json!({"authors": [alice.public_key().to_hex()]}));
        let all = store.query(&by_author, 10, &ReadAccess::trusted(0)).unwrap();
        assert_eq!(ids(&all), vec![b.event.id.to_bytes(), a.event.id.to_bytes()]);
        // Read through the serial in the index values: each entry's own body.
        let bodies: Vec<&str> = all.iter().map(|e| e.json.as_str()).collect();
        assert_eq!(bodies, vec![b.json.as_str(), a.json.as_str()]);
        assert_eq!(store.get(a.event.id.as_bytes()).unwrap().map(|e| e.json), Some(a.json.clone()));
        assert_eq!(store.scan_all(None, 10).unwrap().events.len(), 2);
        assert!(store.remove(a.event.id.as_bytes()).unwrap());
        assert_eq!(keys_with_tag(&store, keys::BODY), 1, "the removed event's body went with it");
        assert_eq!(store.get(b.event.id.as_bytes()).unwrap().map(|e| e.json), Some(b.json.clone()));
    }

    #[test]
    fn an_export_pages_through_bodies_and_inline_records_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledEventStore::open(dir.path(), 8 << 20).unwrap();
        let alice = Keys::generate();
        let legacy: Vec<_> = (0..2).map(|i| note(&alice, 1, 10 + i)).collect();
        for e in &legacy {
            write_layout_1(&store, e);
        }
        // More id records holding a serial than one page may skip.
        let current: Vec<_> = (0..40).map(|i| note(&alice, 1, 100 + i)).collect();
        store.write_batch(&current).unwrap();
        let (mut exported, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = store.scan_all(after.as_ref(), 3).unwrap();
            assert!(page.events.len() <= 3);
            exported.extend(page.events);
            pages += 1;
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        let mut expected: Vec<String> = legacy.iter().chain(&current).map(|e| e.json.clone()).collect();
        expected.sort();
        exported.sort();
        assert_eq!(exported, expected, "every event once");
        assert!(pages > 42 / 3, "pages of at most 3");
    }

    #[test]
    fn a_store_written_by_layout_1_is_read_and_cleaned_without_migration() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledEventStore::open(dir.path(), 8 << 20).unwrap();
        let alice = Keys::generate();
        let (old_note, old_profile) = (note(&alice, 1, 100), note(&alice, 0, 100));
        write_layout_1(&store, &old_note);
        write_layout_1(&store, &old_profile);
        let new_note = note(&alice, 1, 200);
        let outcomes = store.write_batch(&[old_note.clone(), new_note.clone()]).unwrap();
        assert_eq!(outcomes, vec![WriteOutcome::Duplicate, WriteOutcome::Stored]);

        let access = ReadAccess::trusted(0);
        let by_kind = filter(json!({"authors": [alice.public_key().to_hex()], "kinds": [1]}));
        assert_eq!(
            ids(&store.query(&by_kind, 10, &access).unwrap()),
            vec![new_note.event.id.to_bytes(), old_note.event.id.to_bytes()]
        );
        let profile = filter(json!({"authors": [alice.public_key().to_hex()], "kinds": [0]}));
        assert_eq!(ids(&store.query(&profile, 10, &access).unwrap()), vec![old_profile.event.id.to_bytes()]);
        assert_eq!(store.scan_all(None, 10).unwrap().events.len(), 3);

        // A newer profile replaces the layout-1 one, with its legacy key.
        let new_profile = note(&alice, 0, 300);
        assert_eq!(store.write_batch(std::slice::from_ref(&new_profile)).unwrap(), vec![WriteOutcome::Stored]);
        assert_eq!(ids(&store.query(&profile, 10, &access).unwrap()), vec![new_profile.event.id.to_bytes()]);
        assert!(store.remove(old_note.event.id.as_bytes()).unwrap());
        assert_eq!(keys_with_tag(&store, keys::LEGACY_AUTHOR_KIND), 0, "legacy keys leave with their events");
        assert_eq!(ids(&store.query(&by_kind, 10, &access).unwrap()), vec![new_note.event.id.to_bytes()]);
    }
}
