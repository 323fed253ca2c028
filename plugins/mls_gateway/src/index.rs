//! The KeyPackage index in the plugin's key-value store.
//!
//! Layout: `kp/<owner>/<event id>` holds a [`Record`]; `ver/<owner>` is a
//! counter bumped by every change to that owner's records, and every change
//! is a transaction conditioned on it, so concurrent requesters, arrivals,
//! deletions and expiry never interleave on one owner's KeyPackages.

use serde::{Deserialize, Serialize};
use wasm_relay_plugin_sdk::*;

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

    pub fn put(&self, r: &Record) -> Write {
        Write { key: record_key(&self.owner, &r.id), value: Some(serde_json::to_vec(r).expect("record serializes")) }
    }

    pub fn delete(&self, id: &str) -> Write {
        Write { key: record_key(&self.owner, id), value: None }
    }
}

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
                writes.push(state.delete(&old.id));
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
        writes.push(state.put(&record));
        kept.push(&record);
        if kept.len() > settings.max_per_owner {
            kept.sort_by_key(|r| (r.created_at, r.id.clone()));
            let excess = kept.len() - settings.max_per_owner;
            for old in &kept[..excess] {
                writes.push(state.delete(&old.id));
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
        let writes = doomed.iter().map(|r| state.delete(&r.id)).collect();
        if state.commit(writes).map_err(store_error)? {
            host::count("keypackages_deleted", doomed.len() as u64);
            return Ok(());
        }
    }
    Err(Refused { kind: RefusalKind::Error, message: "the KeyPackage index is busy; retry".into(), counter: "busy" })
}

/// Entries housekeeping reads per prefix per tick: however large the index
/// grows, one tick stays well inside the plugin's CPU budget, and the next
/// tick continues where this one stopped.
const HOUSEKEEPING_ENTRIES_PER_TICK: u32 = 1000;
/// Where the KeyPackage expiry sweep continues next tick.
const SWEEP_CURSOR_KEY: &str = "hk/kp-cursor";

/// Expires KeyPackages and drops counters of past windows, a page at a time.
pub fn housekeeping(now: u64) {
    expire_page(now);
    counters::prune_windows("rl/", now / 3600, HOUSEKEEPING_ENTRIES_PER_TICK);
    counters::prune_windows("rate445/", now / 60, HOUSEKEEPING_ENTRIES_PER_TICK);
}

/// Expires the KeyPackages in the next page of the index.
fn expire_page(now: u64) {
    let cursor = kv::get(SWEEP_CURSOR_KEY).ok().flatten().and_then(|c| String::from_utf8(c).ok());
    let Ok(page) = kv::scan_prefix("kp/", cursor.as_deref(), HOUSEKEEPING_ENTRIES_PER_TICK) else { return };
    let mut owners: Vec<String> = page
        .iter()
        .filter_map(|(key, value)| {
            let record: Record = serde_json::from_slice(value).ok()?;
            if record.expires_at > now {
                return None;
            }
            key.split('/').nth(1).map(str::to_owned)
        })
        .collect();
    owners.sort();
    owners.dedup();
    for owner in owners {
        for _ in 0..MAX_ATTEMPTS {
            let Ok(state) = OwnerState::load(&owner) else { break };
            let expired: Vec<&Record> = state.records.iter().filter(|r| r.expires_at <= now).collect();
            if expired.is_empty() {
                break;
            }
            let writes = expired.iter().map(|r| state.delete(&r.id)).collect();
            if let Ok(true) = state.commit(writes) {
                host::count("keypackages_expired", expired.len() as u64);
                break;
            }
        }
    }
    let _ = match page.last() {
        Some((last, _)) if page.len() as u32 == HOUSEKEEPING_ENTRIES_PER_TICK => {
            kv::put(SWEEP_CURSOR_KEY, last.as_bytes())
        }
        // The end of the index: the next sweep starts over.
        _ => kv::delete(SWEEP_CURSOR_KEY),
    };
}
