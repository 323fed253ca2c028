//! The KeyPackage index in the plugin's key-value store.
//!
//! Layout: `kp/<owner>/<event id>` holds a [`Record`]; `ver/<owner>` is a
//! counter bumped by every change to that owner's records, and every change
//! is a transaction conditioned on it, so concurrent requesters, arrivals,
//! deletions and expiry never interleave on one owner's KeyPackages.
//! `exp/<expires_at>/<owner>/<event id>` (20-digit expiry, so keys sort by
//! it) mirrors each record in the same transactions: housekeeping reads only
//! what has expired, not the whole index (a shared store bills every read).

use serde::{Deserialize, Serialize};
use wasm_relay_plugin_sdk::v0_2::*;

use crate::counters;
use crate::rules::KeyPackageFacts;
use crate::{KIND_KEY_PACKAGE_ADDRESSABLE, Refused, Settings};

/// How often a transaction on one owner is retried under contention.
pub const MAX_ATTEMPTS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub kind: u16,
    pub d: Option<String>,
    /// Twins (a 443 and a 30443 of one KeyPackage) share this.
    pub group: String,
    pub ciphersuite: Option<String>,
    pub created_at: u64,
    pub expires_at: u64,
    pub consumed: bool,
    /// When the gateway indexed it. `on-event` runs before the relay stores
    /// the event, so for a short while a fresh record has no stored event
    /// yet; only past the `index_grace_seconds` setting does a missing event
    /// mean the relay removed it.
    #[serde(default)]
    pub indexed_at: u64,
}

/// One owner's records as read, with the version they were read at.
pub struct OwnerState {
    pub owner: String,
    pub version_raw: Option<Vec<u8>>,
    pub records: Vec<Record>,
}

impl OwnerState {
    pub fn load(owner: &str) -> Result<Self, KvError> {
        let version_raw = kv::get(&version_key(owner))?;
        let records = store::scan_all(&format!("kp/{owner}/"))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<Record>(&v).ok())
            .collect();
        Ok(Self { owner: owner.to_owned(), version_raw, records })
    }

    fn next_version(&self) -> Vec<u8> {
        let v: u64 = self.version_raw.as_deref().and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()).unwrap_or(0);
        (v + 1).to_string().into_bytes()
    }

    /// Applies `writes` (record puts and deletes) if nothing changed since load.
    pub fn commit(&self, mut writes: Vec<Write>) -> Result<bool, KvError> {
        writes.push(Write { key: version_key(&self.owner), value: Some(self.next_version()) });
        kv::transact(&[Condition { key: version_key(&self.owner), expected: self.version_raw.clone() }], &writes)
    }

    /// The writes storing `r`: the record, and its expiry entry unless the
    /// record was loaded with that expiry already.
    pub fn put(&self, r: &Record) -> Vec<Write> {
        let record = Write {
            key: record_key(&self.owner, &r.id),
            value: Some(serde_json::to_vec(r).expect("record serializes")),
        };
        let indexed = self.records.iter().any(|old| old.id == r.id && old.expires_at == r.expires_at);
        if indexed {
            return vec![record];
        }
        vec![record, Write { key: expiry_key(&self.owner, r), value: Some(b"1".to_vec()) }]
    }

    /// The writes removing `r` and its expiry entry.
    pub fn delete(&self, r: &Record) -> Vec<Write> {
        vec![
            Write { key: record_key(&self.owner, &r.id), value: None },
            Write { key: expiry_key(&self.owner, r), value: None },
        ]
    }
}

fn expiry_key(owner: &str, r: &Record) -> String {
    format!("{EXPIRY_PREFIX}{:020}/{owner}/{}", r.expires_at, r.id)
}

const EXPIRY_PREFIX: &str = "exp/";

fn version_key(owner: &str) -> String {
    format!("ver/{owner}")
}

fn record_key(owner: &str, id: &str) -> String {
    format!("kp/{owner}/{id}")
}

fn store_error(e: KvError) -> Refused {
    Refused {
        kind: RefusalKind::Error,
        message: format!("the relay's KeyPackage index is unavailable ({e:?}); retry later"),
        counter: "store_error",
    }
}

/// Indexes a KeyPackage that passed the checks.
pub fn add(event: &Event, facts: KeyPackageFacts, settings: &Settings, now: u64) -> Result<(), Refused> {
    for _ in 0..MAX_ATTEMPTS {
        let state = OwnerState::load(&event.pubkey).map_err(store_error)?;
        if state.records.iter().any(|r| r.id == event.id) {
            return Ok(()); // a re-publication never resets consumption
        }
        let mut writes = Vec::new();
        let mut kept: Vec<&Record> = state.records.iter().collect();
        if event.kind == KIND_KEY_PACKAGE_ADDRESSABLE {
            // NIP-01 replacement of the same `d` slot: newest wins, then lowest id.
            let same_slot = |r: &Record| r.kind == KIND_KEY_PACKAGE_ADDRESSABLE && r.d == facts.d;
            let newer = |r: &Record| {
                (r.created_at, std::cmp::Reverse(&r.id)) > (event.created_at, std::cmp::Reverse(&event.id))
            };
            if kept.iter().any(|r| same_slot(r) && newer(r)) {
                return Ok(()); // the relay keeps the newer one; nothing to index
            }
            // The replaced KeyPackage's 443 twin goes with it: the device
            // may have deleted its private key once the replacement was out.
            let retired: Vec<&str> =
                kept.iter().filter(|r| same_slot(r) && r.group != facts.group).map(|r| r.group.as_str()).collect();
            let gone = |r: &Record| same_slot(r) || retired.contains(&r.group.as_str());
            for old in kept.iter().filter(|r| gone(r)) {
                writes.extend(state.delete(old));
            }
            kept.retain(|r| !gone(r));
        }
        // Consumption follows the KeyPackage (its `i` group), whatever slot
        // it is re-published in: re-publishing never hands it out again.
        let consumed = state.records.iter().any(|r| r.group == facts.group && r.consumed);
        let record = Record {
            id: event.id.clone(),
            kind: event.kind,
            d: facts.d.clone(),
            consumed,
            group: facts.group.clone(),
            ciphersuite: facts.ciphersuite.clone(),
            created_at: event.created_at,
            expires_at: expiry(&facts, event.created_at.max(now), settings),
            indexed_at: now,
        };
        writes.extend(state.put(&record));
        kept.push(&record);
        if kept.len() > settings.max_per_owner {
            kept.sort_by_key(|r| (r.created_at, r.id.clone()));
            let excess = kept.len() - settings.max_per_owner;
            for old in &kept[..excess] {
                writes.extend(state.delete(old));
            }
            host::count("keypackages_pruned", excess as u64);
        }
        if state.commit(writes).map_err(store_error)? {
            host::count("keypackages_stored", 1);
            return Ok(());
        }
    }
    Err(Refused { kind: RefusalKind::Error, message: "the KeyPackage index is busy; retry".into(), counter: "busy" })
}

/// Until when a KeyPackage is served: the earliest of its `expiration` tag
/// and its MLS `not_after`, or `default_ttl` after it arrived when it has
/// neither.
fn expiry(facts: &KeyPackageFacts, arrived: u64, settings: &Settings) -> u64 {
    let mls = facts.mls_lifetime.map(|l| l.not_after);
    match (facts.expires_at, mls) {
        (Some(tag), Some(mls)) => tag.min(mls),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => arrived.saturating_add(settings.default_ttl),
    }
}

/// NIP-09: a kind 5 by the owner removes the KeyPackages it names by `e`,
/// or by `a` (`30443:<owner>:<d>`, versions up to the deletion's time).
pub fn apply_deletion(event: &Event) -> Result<(), Refused> {
    let ids: Vec<&str> = event.tags_named("e").filter_map(|t| t.get(1).map(String::as_str)).collect();
    let slots: Vec<String> = event
        .tags_named("a")
        .filter_map(|t| t.get(1))
        .filter_map(|a| {
            let mut parts = a.splitn(3, ':');
            let (kind, owner, d) = (parts.next()?, parts.next()?, parts.next()?);
            (kind == "30443" && owner == event.pubkey).then(|| d.to_owned())
        })
        .collect();
    if ids.is_empty() && slots.is_empty() {
        return Ok(());
    }
    for _ in 0..MAX_ATTEMPTS {
        let state = OwnerState::load(&event.pubkey).map_err(store_error)?;
        let doomed: Vec<&Record> = state
            .records
            .iter()
            .filter(|r| {
                ids.contains(&r.id.as_str())
                    || (r.kind == KIND_KEY_PACKAGE_ADDRESSABLE
                        && r.created_at <= event.created_at
                        && slots.iter().any(|d| r.d.as_deref().unwrap_or("") == d))
            })
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let writes = doomed.iter().flat_map(|r| state.delete(r)).collect();
        if state.commit(writes).map_err(store_error)? {
            host::count("keypackages_deleted", doomed.len() as u64);
            return Ok(());
        }
    }
    Err(Refused { kind: RefusalKind::Error, message: "the KeyPackage index is busy; retry".into(), counter: "busy" })
}

/// Drops the records of KeyPackages the relay removed (hook `on-removed`):
/// deleted, expired, banned, vanished or replaced. Whatever removed them,
/// the index then counts only what can still be served, with no store read
/// per request to find out. Counted as `keypackages_removed_<reason>`.
pub fn forget_removed(removed: &[RemovedEvent]) {
    let mut owners: Vec<&str> = removed.iter().map(|r| r.pubkey.as_str()).collect();
    owners.sort_unstable();
    owners.dedup();
    for owner in owners {
        let mine: Vec<&RemovedEvent> = removed.iter().filter(|r| r.pubkey == owner).collect();
        for _ in 0..MAX_ATTEMPTS {
            let state = match OwnerState::load(owner) {
                Ok(state) => state,
                Err(e) => {
                    log(LogLevel::Warn, &format!("cannot drop removed KeyPackages of {owner}: {e:?}"));
                    break;
                }
            };
            let doomed: Vec<(&Record, &RemovedEvent)> =
                state.records.iter().filter_map(|r| mine.iter().find(|m| m.id == r.id).map(|m| (r, *m))).collect();
            if doomed.is_empty() {
                break;
            }
            let writes = doomed.iter().flat_map(|(r, _)| state.delete(r)).collect();
            match state.commit(writes) {
                Ok(true) => {
                    for (_, why) in &doomed {
                        host::count(&format!("keypackages_removed_{}", reason_name(why.reason)), 1);
                    }
                    break;
                }
                Ok(false) => continue,
                Err(e) => {
                    log(LogLevel::Warn, &format!("cannot drop removed KeyPackages of {owner}: {e:?}"));
                    break;
                }
            }
        }
    }
}

fn reason_name(reason: RemovalReason) -> &'static str {
    match reason {
        RemovalReason::Deleted => "deleted",
        RemovalReason::Expired => "expired",
        RemovalReason::Banned => "banned",
        RemovalReason::Vanished => "vanished",
        RemovalReason::Replaced => "replaced",
    }
}

/// Entries housekeeping reads per prefix per tick: however large the index
/// grows, one tick stays well inside the plugin's CPU budget, and the next
/// tick continues where this one stopped.
const HOUSEKEEPING_ENTRIES_PER_TICK: u32 = 1000;
/// Expiry entries read per page, at most: the first page holds one entry
/// (a tick with nothing due reads just that), and each next page twice as
/// many, since the sweep stops at the first entry not yet due.
const MAX_EXPIRY_PAGE: u32 = 32;
/// Where the one-time backfill of the expiry index (for records indexed
/// before it existed) continues next tick; [`BACKFILLED_KEY`] once done.
const BACKFILL_CURSOR_KEY: &str = "hk/kp-cursor";
const BACKFILLED_KEY: &str = "hk/expiry-index";

/// Expires KeyPackages and drops counters of past windows.
pub fn housekeeping(now: u64) {
    if !matches!(kv::get(BACKFILLED_KEY), Ok(Some(_))) {
        backfill_page();
    }
    expire_due(now);
    counters::prune_windows("rl/", now / 3600, HOUSEKEEPING_ENTRIES_PER_TICK);
    counters::prune_windows("rate445/", now / 60, HOUSEKEEPING_ENTRIES_PER_TICK);
}

/// Writes expiry entries for the next page of records indexed before the
/// expiry index existed; marks the backfill done at the end of the index.
fn backfill_page() {
    let cursor = kv::get(BACKFILL_CURSOR_KEY).ok().flatten().and_then(|c| String::from_utf8(c).ok());
    let Ok(page) = kv::scan_prefix("kp/", cursor.as_deref(), HOUSEKEEPING_ENTRIES_PER_TICK) else { return };
    for (key, value) in &page {
        let (Some(owner), Ok(record)) = (key.split('/').nth(1), serde_json::from_slice::<Record>(value)) else {
            continue;
        };
        // An entry for a record deleted meanwhile is dropped by the sweep.
        let _ = kv::put(&expiry_key(owner, &record), b"1");
    }
    let _ = match page.last() {
        Some((last, _)) if page.len() as u32 == HOUSEKEEPING_ENTRIES_PER_TICK => {
            kv::put(BACKFILL_CURSOR_KEY, last.as_bytes())
        }
        _ => kv::delete(BACKFILL_CURSOR_KEY).and_then(|_| kv::put(BACKFILLED_KEY, b"1")),
    };
}

/// Deletes the KeyPackages whose expiry has come, found through the expiry
/// index in order of expiry, a page at a time, at most
/// [`HOUSEKEEPING_ENTRIES_PER_TICK`] entries per tick.
fn expire_due(now: u64) {
    let mut after: Option<String> = None;
    let (mut read, mut page_size) = (0, 1);
    while read < HOUSEKEEPING_ENTRIES_PER_TICK {
        let Ok(page) = kv::scan_prefix(EXPIRY_PREFIX, after.as_deref(), page_size) else { return };
        read += page.len() as u32;
        let due: Vec<&String> = page
            .iter()
            .map(|(key, _)| key)
            .take_while(|key| {
                key[EXPIRY_PREFIX.len()..]
                    .split('/')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|t| t <= now)
            })
            .collect();
        let mut owners: Vec<&str> = due.iter().filter_map(|key| key.split('/').nth(2)).collect();
        owners.sort();
        owners.dedup();
        for owner in owners {
            expire_owner(owner, now);
        }
        // Entries whose record is gone (or moved to another expiry) go too.
        for key in &due {
            let mut parts = key[EXPIRY_PREFIX.len()..].split('/');
            let (Some(t), Some(owner), Some(id)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let current = kv::get(&record_key(owner, id)).ok().flatten();
            let record = current.and_then(|v| serde_json::from_slice::<Record>(&v).ok());
            if record.is_none_or(|r| format!("{:020}", r.expires_at) != t) {
                let _ = kv::delete(key);
            }
        }
        if due.len() < page.len() || (page.len() as u32) < page_size {
            return;
        }
        after = page.last().map(|(key, _)| key.clone());
        page_size = (page_size * 2).min(MAX_EXPIRY_PAGE);
    }
}

/// Deletes `owner`'s expired KeyPackages (and their expiry entries).
fn expire_owner(owner: &str, now: u64) {
    for _ in 0..MAX_ATTEMPTS {
        let Ok(state) = OwnerState::load(owner) else { return };
        let expired: Vec<&Record> = state.records.iter().filter(|r| r.expires_at <= now).collect();
        if expired.is_empty() {
            return;
        }
        let writes = expired.iter().flat_map(|r| state.delete(r)).collect();
        if let Ok(true) = state.commit(writes) {
            host::count("keypackages_expired", expired.len() as u64);
            return;
        }
    }
}
