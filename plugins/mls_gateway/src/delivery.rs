//! Answering REQ and COUNT for KeyPackages: which ones a requester gets, and
//! consuming them atomically.

use std::collections::BTreeMap;

use wasm_relay_plugin_sdk::v0_2::*;

use crate::counters::increment;
use crate::index::{MAX_ATTEMPTS, OwnerState, Record};
use crate::{KIND_KEY_PACKAGE, KIND_KEY_PACKAGE_ADDRESSABLE, Settings};

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
    if by_owner.len() > settings.max_authors_per_request {
        return refuse(
            RefusalKind::Invalid,
            format!("KeyPackages of at most {} authors can be requested at once", settings.max_authors_per_request),
        );
    }
    // Owners without a live KeyPackage have nothing to hand out: they cost
    // no rate-limit state, so naming random keys cannot grow the store.
    let mut by_owner_with_kps = BTreeMap::new();
    for (owner, owner_filters) in by_owner {
        match OwnerState::load(&owner) {
            Ok(state) if state.records.iter().any(|r| !r.consumed && r.expires_at > now) => {
                // Kept for the selection, which reads it only once more if
                // its first commit meets a concurrent change.
                by_owner_with_kps.insert(owner, (owner_filters, state));
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
    // Everything selected is sent: the host serves plugin answers without
    // applying `limit`s or cutting below `limits.max_limit`, so the
    // request's limits and the gateway's own cap are applied here, before
    // anything is consumed.
    let mut room = request_room(filters.iter().filter(|f| reaches_kps(f)), settings);
    let mut ids = Vec::new();
    for (owner, (owner_filters, state)) in by_owner {
        if room == 0 {
            break; // the owners left over consume nothing
        }
        let consuming = consuming && !is_owner(&owner);
        match select(state, &owner_filters, settings, now, consuming, room) {
            Ok(selected) => {
                room -= selected.len();
                ids.extend(selected);
            }
            Err(message) => return refuse(RefusalKind::Error, message),
        }
    }
    if ids.is_empty() {
        return ReqResult::Continue;
    }
    ReqResult::FilterQuery(FilterQuery { ids, filters: filters.to_vec() })
}

/// How many KeyPackages a request may get: the sum of its KeyPackage
/// filters' `limit`s (a filter without one adds no bound), at most
/// `max_keypackages_per_request`.
fn request_room<'f>(kp_filters: impl Iterator<Item = &'f Filter>, settings: &Settings) -> usize {
    let mut room = 0usize;
    for f in kp_filters {
        match f.limit {
            Some(limit) => room = room.saturating_add(limit as usize),
            None => return settings.max_per_request,
        }
    }
    room.min(settings.max_per_request)
}

/// Whether `f` can name a KeyPackage owner at all (see [`owners_asked`]).
fn names_owners(f: &Filter) -> bool {
    f.authors.is_some() || f.ids.is_some() || f.tags.iter().any(|t| t.name == "i")
}

/// Who a KeyPackage request is counted against: the connection's network
/// ([`client_network`]), and the first NIP-42 key it proved, if any.
fn requesters(ctx: &RequestContext) -> Vec<String> {
    std::iter::once(client_network(&ctx.remote_addr)).chain(ctx.authed_pubkeys.first().cloned()).collect()
}

/// The client an address belongs to, as the relay counts clients: an IPv4
/// address, or an IPv6 /64 (one subscriber's network; its 2^64 addresses
/// must not be 2^64 requesters). Anything else (`replica`) as it is.
fn client_network(remote_addr: &str) -> String {
    use std::net::{IpAddr, SocketAddr};
    let ip = remote_addr.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| remote_addr.parse::<IpAddr>());
    match ip {
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Ok(ip) => ip.to_string(),
        Err(_) => remote_addr.to_owned(),
    }
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
            search: None,
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

/// Whether `r` (owned by `owner`) may satisfy `f`, from the record where it
/// can and from the stored event for other tag conditions. Used where
/// nothing is consumed (COUNT, an owner's own view); the host checks every
/// event against the filters again.
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
        match t.name.as_str() {
            "d" if !r.d.as_ref().is_some_and(|d| t.values.contains(d)) => return false,
            "d" => {}
            // Tag values match exactly (NIP-01), as the host matches them.
            _ => needs_event = true,
        }
    }
    !needs_event || events::get_event(&r.id).is_some_and(|e| f.matches(&e))
}

/// Which device a KeyPackage belongs to (see the crate docs): its 30443
/// slot, the slot of its 30443 twin, or the legacy pool.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Device {
    Slot(String),
    LegacyPool,
}

/// Chooses and (for an inviter's REQ) consumes the KeyPackages of `state`'s
/// owner (as the caller read it) for `filters` by the per-device rule in the
/// crate docs, at most `room` of them. Without `consuming` (a COUNT, or the owner itself) every matching
/// live KeyPackage is listed and none is consumed.
fn select(
    state: OwnerState,
    filters: &[&Filter],
    settings: &Settings,
    now: u64,
    consuming: bool,
    room: usize,
) -> Result<Vec<String>, String> {
    // Stored events, looked up once per request, not again on every retry.
    let mut held_events: BTreeMap<String, Option<Event>> = BTreeMap::new();
    let owner = state.owner.clone();
    let owner = owner.as_str();
    let mut already_read = Some(state);
    for _ in 0..MAX_ATTEMPTS {
        let state = match already_read.take() {
            Some(state) => state,
            None => {
                OwnerState::load(owner).map_err(|e| format!("KeyPackage index unavailable ({e:?}); retry later"))?
            }
        };
        let live: Vec<&Record> = state.records.iter().filter(|r| !r.consumed && r.expires_at > now).collect();
        if !consuming {
            let mut ids: Vec<String> = live
                .iter()
                .filter(|r| filters.iter().any(|f| record_matches(f, owner, r)))
                .map(|r| r.id.clone())
                .collect();
            ids.truncate(room);
            return Ok(ids);
        }
        // What can really be served now: records whose event the relay holds.
        // A record whose event is gone (deleted, banned, vanished, expired by
        // the relay) is dropped, unless it is fresh: its event may still be
        // on its way to the store.
        let mut stored: BTreeMap<&str, &Event> = BTreeMap::new();
        let mut stale: Vec<&Record> = Vec::new();
        for r in &live {
            let held = held_events.entry(r.id.clone()).or_insert_with(|| events::get_event(&r.id));
            if held.is_none() && now.saturating_sub(r.indexed_at) > settings.index_grace {
                stale.push(r);
            }
        }
        if !stale.is_empty() {
            let _ = state.commit(stale.iter().flat_map(|r| state.delete(r)).collect());
            continue;
        }
        for r in &live {
            if let Some(Some(event)) = held_events.get(&r.id) {
                stored.insert(r.id.as_str(), event);
            }
        }
        let servable: Vec<&Record> = live.iter().copied().filter(|r| stored.contains_key(r.id.as_str())).collect();
        // Devices: each 30443 slot, and the legacy pool for 443s whose
        // KeyPackage has no 30443 twin.
        let slot_of_group: BTreeMap<&str, &str> = servable
            .iter()
            .filter(|r| r.kind == KIND_KEY_PACKAGE_ADDRESSABLE)
            .map(|r| (r.group.as_str(), r.d.as_deref().unwrap_or("")))
            .collect();
        let device_of = |r: &Record| match slot_of_group.get(r.group.as_str()) {
            Some(d) => Device::Slot((*d).to_owned()),
            None => Device::LegacyPool,
        };
        // Per device: its servable KeyPackages (twins once) and the one
        // representative of each that matches the request, 30443 preferred.
        let mut devices: BTreeMap<Device, BTreeMap<&str, Option<&Record>>> = BTreeMap::new();
        for r in &servable {
            let groups = devices.entry(device_of(r)).or_default();
            let slot = groups.entry(r.group.as_str()).or_insert(None);
            // The host serves exactly what NIP-01 matching allows: checked
            // on the stored event with the same rule.
            if !filters.iter().any(|f| f.matches(stored[r.id.as_str()])) {
                continue;
            }
            let better = match slot {
                None => true,
                Some(old) => r.kind == KIND_KEY_PACKAGE_ADDRESSABLE && old.kind != KIND_KEY_PACKAGE_ADDRESSABLE,
            };
            if better {
                *slot = Some(r);
            }
        }
        // The newest matching KeyPackage of each device: the likeliest to
        // still have its private key on that device.
        let mut picks: Vec<(&Device, &Record, usize)> = devices
            .iter()
            .filter_map(|(device, groups)| {
                let newest = groups.values().flatten().max_by_key(|r| (r.created_at, std::cmp::Reverse(&r.id)))?;
                Some((device, *newest, groups.len()))
            })
            .collect();
        // Slots before the legacy pool, newer devices first.
        picks.sort_by_key(|(device, r, _)| {
            (matches!(device, Device::LegacyPool), std::cmp::Reverse(r.created_at), r.id.clone())
        });
        picks.truncate(settings.per_author.min(room));
        let mut writes = Vec::new();
        let mut consumed = 0u64;
        for (_, pick, servable_in_device) in &picks {
            if *servable_in_device <= 1 {
                host::count("keypackages_last_resort", 1);
                continue; // the device's last one stays available
            }
            for twin in state.records.iter().filter(|r| r.group == pick.group) {
                let mut used = twin.clone();
                used.consumed = true;
                writes.extend(state.put(&used));
            }
            consumed += 1;
        }
        let ids: Vec<String> = picks.iter().map(|(_, r, _)| r.id.clone()).collect();
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

#[cfg(test)]
mod tests {
    use super::client_network;

    #[test]
    fn an_ipv6_network_is_one_client_and_ipv4_addresses_are_their_own() {
        assert_eq!(client_network("[2001:db8:1:2::1]:443"), client_network("[2001:db8:1:2:ffff::9]:1"));
        assert_ne!(client_network("[2001:db8:1:2::1]:443"), client_network("[2001:db8:1:3::1]:443"));
        assert_eq!(client_network("203.0.113.7:5000"), "203.0.113.7");
        assert_eq!(client_network("[::ffff:203.0.113.7]:5000"), "203.0.113.7");
        assert_eq!(client_network("replica"), "replica");
    }
}
