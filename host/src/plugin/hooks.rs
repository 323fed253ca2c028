//! The hooks: calling plugins for an arriving event (`on-event`) and for a
//! REQ/COUNT (`process-req`), degrading when one is unavailable, and
//! checking everything a plugin returns before it is served.

use super::*;

impl PluginHost {
    /// Runs `on-event` of every plugin interested in the event's kind. `Err`
    /// is the `OK false` message.
    pub async fn on_event(&self, caller: &Caller, event: &Event) -> Result<(), Refusal> {
        let kind = event.kind.as_u16();
        let mut wit_event: Option<wit::Event> = None;
        for slot in &self.slots {
            let loaded = slot.current();
            if loaded.info.event_kinds.as_ref().is_some_and(|k| !k.contains(&kind)) {
                continue;
            }
            let admission = match slot.admit(Some(caller)) {
                Ok(admission) => admission,
                // A deletion that touches nothing the plugin manages does
                // not need it: NIP-09 keeps working while it is down.
                Err(Unavailable::CircuitOpen(_) | Unavailable::Disabled)
                    if self.deletion_spares(&loaded.info.managed_kinds, event) =>
                {
                    continue;
                }
                Err(why) => return Err(why.refusal(&slot.config.name)),
            };
            let ctx = caller.context(None, wit::RequestPurpose::Event);
            let ev = wit_event.get_or_insert_with(|| event_to_wit(event)).clone();
            let result = slot
                .timed_call(&loaded, Hook::OnEvent, admission, Some(caller), move |p, s| {
                    Box::pin(async move { p.call_on_event(s, &ctx, &ev).await })
                })
                .await;
            match result {
                Ok(wit::Decision::Accept) => {}
                Ok(wit::Decision::Reject(r)) => return Err(Refusal::from(r)),
                Err(CallFailure::Busy(_)) => return Err(Unavailable::Busy.refusal(&slot.config.name)),
                Err(CallFailure::HostUnavailable(_)) => {
                    return Err(Refusal::error(format!(
                        "plugin '{}' could not read the relay's events; the event was not stored, try again",
                        slot.config.name
                    )));
                }
                Err(failure) => {
                    return Err(Refusal::error(format!(
                        "plugin '{}' failed ({}); the event was not stored",
                        slot.config.name,
                        failure.summary()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether a plugin asks for `on-connect`: only then are a connection's
    /// upgrade headers collected.
    pub fn wants_on_connect(&self) -> bool {
        self.slots.iter().any(|s| s.wants(wit::Hook::OnConnect))
    }

    /// Runs `on-connect` of every plugin that asked for it, in configuration
    /// order, before the relay reads anything from the connection. `Err` is
    /// why it is refused. A plugin that cannot answer refuses the
    /// connection: it may be the relay's gate.
    pub async fn on_connect(&self, caller: &Caller, headers: &[(String, String)]) -> Result<(), Refusal> {
        let conn = wit::Connection {
            connection_id: caller.connection_id,
            remote_addr: caller.remote_addr.clone(),
            headers: headers.to_vec(),
        };
        for slot in self.slots.iter().filter(|s| s.wants(wit::Hook::OnConnect)) {
            let loaded = slot.current();
            let admission = slot.admit(Some(caller)).map_err(|why| why.refusal(&slot.config.name))?;
            let conn = conn.clone();
            let result = slot
                .timed_call(&loaded, Hook::OnConnect, admission, Some(caller), move |p, s| {
                    Box::pin(async move { p.call_on_connect(s, &conn).await })
                })
                .await;
            decided(&slot.config.name, result, "connection")?;
        }
        Ok(())
    }

    /// Runs `on-auth` of every plugin that asked for it once `pubkey` has
    /// proved itself with NIP-42 on `caller`'s connection. `Err` refuses the
    /// authentication.
    pub async fn on_auth(&self, caller: &Caller, pubkey: &str) -> Result<(), Refusal> {
        for slot in self.slots.iter().filter(|s| s.wants(wit::Hook::OnAuth)) {
            let loaded = slot.current();
            let admission = slot.admit(Some(caller)).map_err(|why| why.refusal(&slot.config.name))?;
            let ctx = caller.context(None, wit::RequestPurpose::Event);
            let pubkey = pubkey.to_owned();
            let result = slot
                .timed_call(&loaded, Hook::OnAuth, admission, Some(caller), move |p, s| {
                    Box::pin(async move { p.call_on_auth(s, &ctx, &pubkey).await })
                })
                .await;
            decided(&slot.config.name, result, "authentication")?;
        }
        Ok(())
    }

    /// Whether `event` is a NIP-09 deletion that names no event or address
    /// of the `managed` kinds (looked up in the store), so a plugin managing
    /// those kinds need not see it. A plugin managing nothing sees every
    /// deletion it asked for.
    fn deletion_spares(&self, managed: &[u16], event: &Event) -> bool {
        if event.kind.as_u16() != 5 || managed.is_empty() {
            return false;
        }
        // Each `e` tag is a store read on this async worker: a deletion
        // naming more than a handful waits until the plugin is back.
        if event.tags.iter().filter(|t| t.as_slice().first().is_some_and(|n| n == "e")).count()
            > MAX_LOOKUPS_WHILE_UNAVAILABLE
        {
            return false;
        }
        event.tags.iter().map(|t| t.as_slice()).all(|tag| match (tag.first().map(String::as_str), tag.get(1)) {
            (Some("e"), Some(id)) => {
                let mut bytes = [0u8; 32];
                if id.len() != 64 || hex::decode_to_slice(id, &mut bytes).is_err() {
                    return true;
                }
                match self.events.get(&bytes) {
                    Ok(Some(stored)) => serde_json::from_str::<Event>(&stored.json)
                        .is_ok_and(|target| !managed.contains(&target.kind.as_u16())),
                    Ok(None) => true,
                    Err(_) => false,
                }
            }
            (Some("a"), Some(address)) => {
                address.split(':').next().and_then(|k| k.parse::<u16>().ok()).is_none_or(|k| !managed.contains(&k))
            }
            _ => true,
        })
    }

    /// Runs `process-req` of every plugin the request could concern, those
    /// that manage kinds last. Returns
    /// the events plugins contributed (already checked against `filters`), or
    /// the `CLOSED` message.
    ///
    /// When a plugin cannot answer (it failed, is unavailable, busy, or the
    /// client has made it fail too often), a request that does not name one
    /// of its managed kinds is served without them; otherwise the plugin's
    /// `on_req_failure` decides. A plugin that manages no kinds (a policy)
    /// always follows `on_req_failure`.
    pub async fn process_req(
        &self,
        caller: &Caller,
        sub_id: &str,
        purpose: ReadPurpose,
        filters: &[Filter],
        access: &ReadAccess,
    ) -> Result<Vec<StoredEvent>, Refusal> {
        let mut contributed: Vec<StoredEvent> = Vec::new();
        let mut wit_filters: Option<Vec<wit::Filter>> = None;
        // A policy (a plugin that manages no kinds) that does not handle
        // search sees the rest of a filter with `search`, so it still rules
        // on the request. A plugin that serves kinds and does not handle
        // search never sees such a filter: the host would discard its
        // answers to it, and what it hands out it may consume.
        let mut wit_filters_without_search: Option<Vec<wit::Filter>> = None;
        let mut wit_filters_searchless: Option<Vec<wit::Filter>> = None;
        let has_search = filters.iter().any(|f| f.search.is_some());
        let searchless: Vec<Filter> =
            if has_search { filters.iter().filter(|f| f.search.is_none()).cloned().collect() } else { Vec::new() };
        // Plugins that manage kinds answer last: what they hand out can be
        // state they commit (the MLS gateway consumes KeyPackages), so every
        // other plugin's refusal must come first. Order among the rest is
        // the configured order; only which refusal wins depends on it.
        let manages = |slot: &Arc<PluginSlot>| !slot.current().info.managed_kinds.is_empty();
        let policies = self.slots.iter().enumerate().filter(|(_, s)| !manages(s));
        let serving = self.slots.iter().enumerate().filter(|(_, s)| manages(s) && purpose != ReadPurpose::Reconcile);
        for (index, slot) in policies.chain(serving) {
            let loaded = slot.current();
            // A plugin whose kinds are released has nothing to serve: the
            // store serves them like any other kind.
            if slot.released.load(Ordering::Relaxed) || !concerns(&loaded.info, filters) {
                continue;
            }
            let managed = &loaded.info.managed_kinds;
            let searches = slot.wants(wit::Hook::Search);
            if has_search
                && !searches
                && !managed.is_empty()
                && (searchless.is_empty() || !concerns(&loaded.info, &searchless))
            {
                continue;
            }
            let names_managed = managed.is_empty()
                || filters.iter().any(|f| f.kinds.as_ref().is_some_and(|k| k.iter().any(|k| managed.contains(k))));
            let degrade = |refusal: Refusal| match slot.config.on_req_failure {
                FailurePolicy::Closed if names_managed => Err(refusal),
                _ => Ok(()),
            };
            let admission = match slot.admit(Some(caller)) {
                Ok(admission) => admission,
                Err(why @ Unavailable::ClientFailures(_)) if names_managed => {
                    return Err(why.refusal(&slot.config.name));
                }
                Err(why) => {
                    degrade(why.refusal(&slot.config.name))?;
                    continue;
                }
            };
            let purpose = match purpose {
                ReadPurpose::Req => wit::RequestPurpose::Req,
                ReadPurpose::Count | ReadPurpose::Reconcile => wit::RequestPurpose::Count,
            };
            let ctx = caller.context(Some(sub_id), purpose);
            let wf = if searches || !has_search {
                wit_filters.get_or_insert_with(|| filters.iter().map(filter_to_wit).collect()).clone()
            } else if managed.is_empty() {
                wit_filters_without_search
                    .get_or_insert_with(|| {
                        filters.iter().map(filter_to_wit).map(|f| wit::Filter { search: None, ..f }).collect()
                    })
                    .clone()
            } else {
                wit_filters_searchless.get_or_insert_with(|| searchless.iter().map(filter_to_wit).collect()).clone()
            };
            let result = slot
                .timed_call(&loaded, Hook::ProcessReq, admission, Some(caller), move |p, s| {
                    Box::pin(async move { p.call_process_req(s, &ctx, &wf).await })
                })
                .await;
            match result {
                Ok(wit::ReqResult::Continue) => {}
                Ok(wit::ReqResult::Reject(r)) => return Err(Refusal::from(r)),
                Ok(wit::ReqResult::AddEvents(events)) => {
                    contributed.extend(self.check_added_events(index, slot, events, filters, searches, access));
                }
                Ok(wit::ReqResult::FilterQuery(fq)) => {
                    contributed.extend(self.check_filter_query(index, slot, fq, filters, searches, access).await);
                }
                Err(CallFailure::Busy(_)) if names_managed => {
                    return Err(Unavailable::Busy.refusal(&slot.config.name));
                }
                // What the plugin would have served depends on the read
                // that failed: refuse rather than answer without it.
                Err(CallFailure::HostUnavailable(_)) if names_managed => {
                    return Err(Refusal::error(format!(
                        "plugin '{}' could not read the relay's events; try again in a moment",
                        slot.config.name
                    )));
                }
                Err(failure) => degrade(Refusal::error(format!(
                    "plugin '{}' failed on this request ({}); try again later",
                    slot.config.name,
                    failure.summary()
                )))?,
            }
        }
        contributed.sort_by_key(StoredEvent::order_key);
        contributed.dedup_by_key(|e| e.id);
        contributed.truncate(self.max_results);
        Ok(contributed)
    }

    /// Whether plugin `index` may serve an event of `kind` (not one another
    /// plugin manages).
    fn may_serve(&self, index: usize, kind: u16) -> bool {
        self.slots.iter().enumerate().all(|(i, s)| i == index || !s.current().info.managed_kinds.contains(&kind))
    }

    fn dropped(&self, slot: &PluginSlot, what: &str, reason: &str) {
        slot.stats.dropped();
        tracing::debug!(plugin = %slot.config.name, what, reason, "plugin result not served");
    }

    fn check_added_events(
        &self,
        index: usize,
        slot: &PluginSlot,
        events: Vec<wit::Event>,
        filters: &[Filter],
        searches: bool,
        access: &ReadAccess,
    ) -> Vec<StoredEvent> {
        let mut out = Vec::new();
        for e in events.iter().take(self.max_results) {
            let Some(event) = event_from_wit(e) else {
                self.dropped(slot, &e.id, "malformed event");
                continue;
            };
            if !event.verify_id() || !event.verify_signature() {
                self.dropped(slot, &e.id, "bad id or signature");
                continue;
            }
            if !request_matches(filters, searches, &event)
                || !self.may_serve(index, event.kind.as_u16())
                || !access.can_see(&event)
            {
                self.dropped(slot, &e.id, "does not match the request");
                continue;
            }
            let accepted = AcceptedEvent::new(event);
            out.push(StoredEvent {
                created_at: accepted.event.created_at.as_secs(),
                id: accepted.event.id.to_bytes(),
                json: accepted.json,
            });
        }
        out
    }

    async fn check_filter_query(
        &self,
        index: usize,
        slot: &PluginSlot,
        fq: wit::FilterQuery,
        filters: &[Filter],
        searches: bool,
        access: &ReadAccess,
    ) -> Vec<StoredEvent> {
        let plugin_filters: Option<Vec<Filter>> =
            fq.filters.iter().map(|f| filter_from_wit(f).ok()).collect::<Option<Vec<_>>>().filter(|f| !f.is_empty());
        let mut out = Vec::new();
        for id in fq.ids.iter().take(self.max_results) {
            let mut bytes = [0u8; 32];
            if id.len() != 64 || hex::decode_to_slice(id, &mut bytes).is_err() {
                self.dropped(slot, id, "not a 64-hex id");
                continue;
            }
            let stored = match self.events.get(&bytes) {
                Ok(Some(stored)) => stored,
                Ok(None) => match self.fetch_missing(&bytes).await {
                    Some(stored) => stored,
                    None => {
                        self.dropped(slot, id, "no such stored event");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "loading a plugin-selected event failed");
                    continue;
                }
            };
            let Ok(event) = serde_json::from_str::<Event>(&stored.json) else { continue };
            let matches = request_matches(filters, searches, &event)
                && plugin_filters.as_ref().is_none_or(|pf| request_matches(pf, searches, &event))
                && self.may_serve(index, event.kind.as_u16())
                && access.can_see(&event);
            if matches {
                out.push(stored);
            } else {
                self.dropped(slot, id, "does not match the request's filters");
            }
        }
        out
    }

    /// An event another replica stored, verified, if there is a source. A
    /// failed read leaves it out of this answer (and is logged); nothing is
    /// removed because of it.
    async fn fetch_missing(&self, id: &[u8; 32]) -> Option<StoredEvent> {
        let json = match self.missing_events.get()?.fetch(id).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::warn!(id = %hex::encode(id), error = %e, "an event a plugin selected could not be read");
                return None;
            }
        };
        let event: Event = serde_json::from_str(&json).ok()?;
        if event.id.to_bytes() != *id || !event.verify_id() || !event.verify_signature() {
            return None;
        }
        let accepted = AcceptedEvent::new(event);
        Some(StoredEvent { created_at: accepted.event.created_at.as_secs(), id: *id, json: accepted.json })
    }
}

/// Events a deletion may name and still be stored while the plugin that
/// would check it is unavailable (each is looked up in the store).
const MAX_LOOKUPS_WHILE_UNAVAILABLE: usize = 64;

/// A plugin's decision on a connection or an authentication (`what`), or
/// why it could not decide.
fn decided(plugin: &str, result: Result<wit::Decision, CallFailure>, what: &str) -> Result<(), Refusal> {
    match result {
        Ok(wit::Decision::Accept) => Ok(()),
        Ok(wit::Decision::Reject(r)) => Err(Refusal::from(r)),
        Err(CallFailure::Busy(_)) => Err(Unavailable::Busy.refusal(plugin)),
        Err(failure) => Err(Refusal::error(format!(
            "plugin '{plugin}' failed ({}) while checking this {what}; try again later",
            failure.summary()
        ))),
    }
}

/// Whether `event` may answer a request with `filters`, as selected by a
/// plugin: a search plugin vouches for `search` (every other field is
/// checked); any other plugin's answers never serve a filter with `search`.
fn request_matches(filters: &[Filter], searches: bool, event: &Event) -> bool {
    if searches {
        filters.iter().any(|f| filter_matches_besides_search(f, event))
    } else {
        any_filter_matches(filters, event)
    }
}

/// Whether a request with `filters` concerns a plugin with `info`: it could
/// reach the plugin's kinds, or it searches and the plugin handles search.
fn concerns(info: &wit::PluginInfo, filters: &[Filter]) -> bool {
    let Some(req_kinds) = &info.req_kinds else { return true };
    if info.hooks.contains(&wit::Hook::Search) && filters.iter().any(|f| f.search.is_some()) {
        return true;
    }
    filters.iter().any(|f| req_kinds.iter().chain(&info.managed_kinds).any(|k| f.could_match_kind(*k)))
}
