//! Answering REQ and COUNT for KeyPackages: which ones a requester gets, and
//! consuming them atomically.

use std::collections::{BTreeMap, BTreeSet};

use wasm_relay_plugin_sdk::*;

use crate::index::{MAX_ATTEMPTS, OwnerState, Record, STALE_AFTER_SECONDS, increment};
use crate::{KIND_KEY_PACKAGE, KIND_KEY_PACKAGE_ADDRESSABLE, Settings};

/// Owners one request may ask KeyPackages of.
const MAX_OWNERS_PER_REQUEST: usize = 256;

fn refuse(kind: RefusalKind, message: String) -> ReqResult {
    ReqResult::Reject(Refusal { kind, message })
}

/// The answer to a REQ/COUNT. `Continue` whenever no KeyPackage is handed
/// out: the host never serves the managed kinds itself, so `Continue` and an
/// empty `filter-query` mean the same, and `Continue` spares the host from
/// lifting the filters back. Most requests that reach the gateway at all (a
/// feed's `#t` without `kinds`; the host does not call it for filters whose
/// kinds exclude KeyPackages) end at the first check, before any host call.
pub fn answer(ctx: &RequestContext, filters: &[Filter], settings: &Settings, now: impl Fn() -> u64) -> ReqResult {
    // Only a filter that names a KeyPackage kind asks for KeyPackages: a
    // profile view (`{"authors":[pk]}`) or a feed never sees, consumes or is
    // refused because of one.
    let reaches_kps = |f: &&Filter| {
        f.kinds.as_ref().is_some_and(|k| k.contains(&KIND_KEY_PACKAGE) || k.contains(&KIND_KEY_PACKAGE_ADDRESSABLE))
    };
    let kp_filters: Vec<&Filter> = filters.iter().filter(reaches_kps).filter(|f| names_owners(f)).collect();
    if kp_filters.is_empty() {
        return ReqResult::Continue;
    }
    let now = now();
    let mut by_owner: BTreeMap<String, Vec<&Filter>> = BTreeMap::new();
    for f in kp_filters {
        for owner in owners_asked(f) {
            by_owner.entry(owner).or_default().push(f);
        }
    }
    if by_owner.len() > MAX_OWNERS_PER_REQUEST {
        return refuse(
            RefusalKind::Invalid,
            format!("KeyPackages of at most {MAX_OWNERS_PER_REQUEST} authors can be requested at once"),
        );
    }
    // Owners without a live KeyPackage have nothing to hand out: they cost
    // no rate-limit state, so naming random keys cannot grow the store.
    let mut by_owner_with_kps = BTreeMap::new();
    for (owner, owner_filters) in by_owner {
        match OwnerState::load(&owner) {
            Ok(state) if state.records.iter().any(|r| !r.consumed && r.expires_at > now) => {
                by_owner_with_kps.insert(owner, owner_filters);
            }
            Ok(_) => {}
            Err(e) => {
                return refuse(RefusalKind::Error, format!("KeyPackage index unavailable ({e:?}); retry later"));
            }
        }
    }
    let by_owner = by_owner_with_kps;
    if by_owner.is_empty() {
        return ReqResult::Continue;
    }
    let consuming = ctx.purpose == RequestPurpose::Req;
    // An owner authenticated with NIP-42 sees its own KeyPackages without
    // consuming them or counting against the rate limit.
    let is_owner = |owner: &str| ctx.authed_pubkeys.iter().any(|k| k == owner);
    if consuming && settings.requests_per_hour > 0 {
        for owner in by_owner.keys().filter(|o| !is_owner(o)) {
            // Counted per address and per authenticated key: fresh keys
            // from one address drain no one.
            for requester in requesters(ctx) {
                let key = format!("rl/{}/{requester}/{owner}", now / 3600);
                match increment(&key) {
                    Ok(n) if n > settings.requests_per_hour => {
                        host::count("refused_rate_limited", 1);
                        // Only the KeyPackage filters are refused: a REQ that
                        // also asks for other things is served without them.
                        if !filters.iter().all(|f| reaches_kps(&f)) {
                            return ReqResult::Continue;
                        }
                        return refuse(
                            RefusalKind::RateLimited,
                            format!(
                                "more than {} KeyPackage requests for {} this hour; retry later",
                                settings.requests_per_hour,
                                short(owner)
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return refuse(
                            RefusalKind::Error,
                            format!("KeyPackage index unavailable ({e:?}); retry later"),
                        );
                    }
                }
            }
        }
    }
    let mut ids = Vec::new();
    for (owner, owner_filters) in &by_owner {
        match select(owner, owner_filters, settings, now, consuming && !is_owner(owner)) {
            Ok(selected) => ids.extend(selected),
            Err(message) => return refuse(RefusalKind::Error, message),
        }
    }
    if ids.is_empty() {
        return ReqResult::Continue;
    }
    ReqResult::FilterQuery(FilterQuery { ids, filters: filters.to_vec() })
}

/// Whether `f` can name a KeyPackage owner at all (see [`owners_asked`]).
fn names_owners(f: &Filter) -> bool {
    f.authors.is_some() || f.ids.is_some() || f.tags.iter().any(|t| t.name == "i")
}

/// Who a KeyPackage request is counted against: the connection's address,
/// and the first NIP-42 key it proved, if any.
fn requesters(ctx: &RequestContext) -> Vec<String> {
    let ip = ctx.remote_addr.rsplit_once(':').map_or(ctx.remote_addr.as_str(), |(ip, _)| ip).to_owned();
    std::iter::once(ip).chain(ctx.authed_pubkeys.first().cloned()).collect()
}

fn short(pk: &str) -> &str {
    &pk[..pk.len().min(12)]
}

/// The owners a filter asks KeyPackages of: its `authors`, or the authors of
/// the KeyPackages it names by `ids` or `#i`. A filter naming none gets none:
/// KeyPackages are handed out per owner, never in bulk.
fn owners_asked(f: &Filter) -> Vec<String> {
    if let Some(authors) = &f.authors {
        return authors.clone();
    }
    let kp_kinds = Some(vec![KIND_KEY_PACKAGE, KIND_KEY_PACKAGE_ADDRESSABLE]);
    let mut owners: Vec<String> = if let Some(ids) = &f.ids {
        ids.iter().filter_map(|id| events::get_event(id)).filter(is_key_package).map(|e| e.pubkey).collect()
    } else if let Some(refs) = f.tags.iter().find(|t| t.name == "i") {
        let lookup = Filter {
            ids: None,
            authors: None,
            kinds: kp_kinds,
            tags: vec![refs.clone()],
            since: None,
            until: None,
            limit: None,
        };
        events::query_events(&[lookup], 512).into_iter().map(|e| e.pubkey).collect()
    } else {
        vec![]
    };
    owners.sort();
    owners.dedup();
    owners
}

fn is_key_package(e: &Event) -> bool {
    e.kind == KIND_KEY_PACKAGE || e.kind == KIND_KEY_PACKAGE_ADDRESSABLE
}

/// Whether `r` (owned by `owner`) satisfies `f`, from the record where it can
/// and from the stored event for other tag conditions.
fn record_matches(f: &Filter, owner: &str, r: &Record) -> bool {
    let basic = f.kinds.as_ref().is_none_or(|k| k.contains(&r.kind))
        && f.ids.as_ref().is_none_or(|ids| ids.contains(&r.id))
        && f.authors.as_ref().is_none_or(|a| a.iter().any(|x| x == owner))
        && f.since.is_none_or(|s| r.created_at >= s)
        && f.until.is_none_or(|u| r.created_at <= u);
    if !basic {
        return false;
    }
    let mut needs_event = false;
    for t in &f.tags {
        let ok = match t.name.as_str() {
            "d" => r.d.as_ref().is_some_and(|d| t.values.contains(d)),
            "i" => t.values.iter().any(|v| r.group == format!("i:{}", v.to_ascii_lowercase())),
            _ => {
                needs_event = true;
                true
            }
        };
        if !ok {
            return false;
        }
    }
    !needs_event || events::get_event(&r.id).is_some_and(|e| f.matches(&e))
}

/// Chooses and (for an inviter's REQ) consumes `owner`'s KeyPackages for
/// `filters`: up to `per_author` distinct KeyPackages (twins count once),
/// kind 30443 preferred, newest first; the owner's last one is served
/// unconsumed. Without `consuming` (a COUNT, or the owner itself) every
/// matching live KeyPackage is listed and none is consumed.
fn select(
    owner: &str,
    filters: &[&Filter],
    settings: &Settings,
    now: u64,
    consuming: bool,
) -> Result<Vec<String>, String> {
    let mut held_events: BTreeMap<String, bool> = BTreeMap::new();
    for _ in 0..MAX_ATTEMPTS {
        let state =
            OwnerState::load(owner).map_err(|e| format!("KeyPackage index unavailable ({e:?}); retry later"))?;
        let live: Vec<&Record> = state.records.iter().filter(|r| !r.consumed && r.expires_at > now).collect();
        let matching: Vec<&Record> =
            live.iter().copied().filter(|r| filters.iter().any(|f| record_matches(f, owner, r))).collect();
        if !consuming {
            return Ok(matching.iter().map(|r| r.id.clone()).collect());
        }
        // What can really be served now: records whose event the relay holds.
        // A record whose event is gone (deleted, banned, vanished, expired by
        // the relay) is dropped, unless it is fresh: its event may still be
        // on its way to the store.
        let mut stored: BTreeSet<&str> = BTreeSet::new();
        let mut stale: Vec<&Record> = Vec::new();
        for r in &live {
            // Looked up once per request, not again on every retry.
            let held = *held_events.entry(r.id.clone()).or_insert_with(|| events::get_event(&r.id).is_some());
            if held {
                stored.insert(r.id.as_str());
            } else if now.saturating_sub(r.indexed_at) > STALE_AFTER_SECONDS {
                stale.push(r);
            }
        }
        if !stale.is_empty() {
            let _ = state.commit(stale.iter().map(|r| state.delete(&r.id)).collect());
            continue;
        }
        // One representative per KeyPackage: its 30443 if it has one.
        let mut groups: BTreeMap<&str, &Record> = BTreeMap::new();
        for r in matching.iter().filter(|r| stored.contains(r.id.as_str())) {
            let better =
                |old: &&Record| (r.kind == KIND_KEY_PACKAGE_ADDRESSABLE) && old.kind != KIND_KEY_PACKAGE_ADDRESSABLE;
            match groups.get(r.group.as_str()) {
                Some(old) if !better(old) => {}
                _ => {
                    groups.insert(&r.group, r);
                }
            }
        }
        let mut chosen: Vec<&Record> = groups.into_values().collect();
        // Newest first: the freshest KeyPackage is the likeliest to still
        // have its private key on the owner's device.
        chosen.sort_by_key(|r| (r.kind != KIND_KEY_PACKAGE_ADDRESSABLE, std::cmp::Reverse(r.created_at), r.id.clone()));
        chosen.truncate(settings.per_author);
        // The last one is the last one that can be served: phantoms and
        // KeyPackages still on their way do not count.
        let mut remaining = {
            let mut g: Vec<&str> =
                live.iter().filter(|r| stored.contains(r.id.as_str())).map(|r| r.group.as_str()).collect();
            g.sort();
            g.dedup();
            g.len()
        };
        let mut writes = Vec::new();
        let mut consumed = 0u64;
        for pick in &chosen {
            if remaining <= 1 {
                host::count("keypackages_last_resort", 1);
                break; // the last one stays available
            }
            for twin in state.records.iter().filter(|r| r.group == pick.group) {
                let mut used = twin.clone();
                used.consumed = true;
                writes.push(state.put(&used));
            }
            remaining -= 1;
            consumed += 1;
        }
        let ids: Vec<String> = chosen.iter().map(|r| r.id.clone()).collect();
        if writes.is_empty()
            || state.commit(writes).map_err(|e| format!("KeyPackage index unavailable ({e:?}); retry later"))?
        {
            host::count("keypackages_served", ids.len() as u64);
            host::count("keypackages_consumed", consumed);
            return Ok(ids);
        }
    }
    Err("the KeyPackage index is busy; retry".into())
}
