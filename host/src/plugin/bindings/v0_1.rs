//! Host bindings generated from `nostr-relay:plugin@0.1.0` (`wit/0.1.0`), and
//! what keeps 0.1 plugins loading unchanged: conversions between its types
//! and the newest version's, and its imports served by the newest version's
//! import code.
//!
//! 0.1 differs from 0.2 only by what 0.2 added: a filter has no `search`
//! (a 0.1 plugin sees the rest of such a filter), `plugin-info` has no hooks,
//! capabilities or NIP-11 contribution (a 0.1 plugin asks for none), and
//! `host` has no `publish`.

use super::v0_2 as latest;
use crate::plugin::imports::PluginState;

wasmtime::component::bindgen!({
    path: "../wit/0.1.0",
    world: "relay-plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use nostr_relay::plugin::{events, host, kv, types};

// Arguments: newest to 0.1.

impl From<latest::types::Event> for types::Event {
    fn from(e: latest::types::Event) -> Self {
        let latest::types::Event { id, pubkey, created_at, kind, tags, content, sig } = e;
        Self { id, pubkey, created_at, kind, tags, content, sig }
    }
}

impl From<latest::types::Filter> for types::Filter {
    fn from(f: latest::types::Filter) -> Self {
        let latest::types::Filter { ids, authors, kinds, tags, since, until, limit, search: _ } = f;
        let tags = tags.into_iter().map(|t| types::TagFilter { name: t.name, values: t.values }).collect();
        Self { ids, authors, kinds, tags, since, until, limit }
    }
}

impl From<latest::types::RequestContext> for types::RequestContext {
    fn from(c: latest::types::RequestContext) -> Self {
        let purpose = match c.purpose {
            latest::types::RequestPurpose::Event => types::RequestPurpose::Event,
            latest::types::RequestPurpose::Req => types::RequestPurpose::Req,
            latest::types::RequestPurpose::Count => types::RequestPurpose::Count,
        };
        Self {
            connection_id: c.connection_id,
            authed_pubkeys: c.authed_pubkeys,
            remote_addr: c.remote_addr,
            subscription_id: c.subscription_id,
            purpose,
        }
    }
}

// Answers: 0.1 to newest.

impl From<types::Event> for latest::types::Event {
    fn from(e: types::Event) -> Self {
        let types::Event { id, pubkey, created_at, kind, tags, content, sig } = e;
        Self { id, pubkey, created_at, kind, tags, content, sig }
    }
}

impl From<types::Filter> for latest::types::Filter {
    fn from(f: types::Filter) -> Self {
        let types::Filter { ids, authors, kinds, tags, since, until, limit } = f;
        let tags = tags.into_iter().map(|t| latest::types::TagFilter { name: t.name, values: t.values }).collect();
        Self { ids, authors, kinds, tags, since, until, limit, search: None }
    }
}

impl From<types::Refusal> for latest::types::Refusal {
    fn from(r: types::Refusal) -> Self {
        use latest::types::RefusalKind as K;
        let kind = match r.kind {
            types::RefusalKind::Invalid => K::Invalid,
            types::RefusalKind::Blocked => K::Blocked,
            types::RefusalKind::RateLimited => K::RateLimited,
            types::RefusalKind::AuthRequired => K::AuthRequired,
            types::RefusalKind::Restricted => K::Restricted,
            types::RefusalKind::Error => K::Error,
        };
        Self { kind, message: r.message }
    }
}

impl From<types::Decision> for latest::types::Decision {
    fn from(d: types::Decision) -> Self {
        match d {
            types::Decision::Accept => Self::Accept,
            types::Decision::Reject(r) => Self::Reject(r.into()),
        }
    }
}

impl From<types::ReqResult> for latest::types::ReqResult {
    fn from(r: types::ReqResult) -> Self {
        match r {
            types::ReqResult::Continue => Self::Continue,
            types::ReqResult::AddEvents(events) => Self::AddEvents(events.into_iter().map(Into::into).collect()),
            types::ReqResult::FilterQuery(q) => Self::FilterQuery(latest::types::FilterQuery {
                ids: q.ids,
                filters: q.filters.into_iter().map(Into::into).collect(),
            }),
            types::ReqResult::Reject(r) => Self::Reject(r.into()),
        }
    }
}

impl From<types::PluginInfo> for latest::types::PluginInfo {
    fn from(i: types::PluginInfo) -> Self {
        let types::PluginInfo { name, version, managed_kinds, event_kinds, req_kinds, tick_interval_seconds, settings } =
            i;
        let settings = settings
            .into_iter()
            .map(|s| latest::types::SettingSpec {
                name: s.name,
                default_value: s.default_value,
                description: s.description,
            })
            .collect();
        Self {
            name,
            version,
            managed_kinds,
            event_kinds,
            req_kinds,
            tick_interval_seconds,
            settings,
            hooks: Vec::new(),
            capabilities: Vec::new(),
            relay_info: latest::types::Nip11Contribution { supported_nips: Vec::new(), fields: Vec::new() },
        }
    }
}

// Imports: a 0.1 plugin's calls, served by the newest version's code.

fn kv_error(e: latest::kv::KvError) -> kv::KvError {
    match e {
        latest::kv::KvError::BadKey(m) => kv::KvError::BadKey(m),
        latest::kv::KvError::TooLarge(m) => kv::KvError::TooLarge(m),
        latest::kv::KvError::Unavailable(m) => kv::KvError::Unavailable(m),
    }
}

impl types::Host for PluginState {}

impl kv::Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::KvError>> {
        Ok(latest::kv::Host::get(self, key).await?.map_err(kv_error))
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        Ok(latest::kv::Host::put(self, key, value).await?.map_err(kv_error))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), kv::KvError>> {
        Ok(latest::kv::Host::delete(self, key).await?.map_err(kv_error))
    }

    async fn scan_prefix(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<(String, Vec<u8>)>, kv::KvError>> {
        Ok(latest::kv::Host::scan_prefix(self, prefix, start_after, limit).await?.map_err(kv_error))
    }

    async fn transact(
        &mut self,
        conditions: Vec<kv::Condition>,
        writes: Vec<kv::Write>,
    ) -> wasmtime::Result<Result<bool, kv::KvError>> {
        let conditions =
            conditions.into_iter().map(|c| latest::kv::Condition { key: c.key, expected: c.expected }).collect();
        let writes = writes.into_iter().map(|w| latest::kv::Write { key: w.key, value: w.value }).collect();
        Ok(latest::kv::Host::transact(self, conditions, writes).await?.map_err(kv_error))
    }
}

impl events::Host for PluginState {
    async fn get_event(&mut self, id: String) -> wasmtime::Result<Option<types::Event>> {
        Ok(latest::events::Host::get_event(self, id).await?.map(Into::into))
    }

    async fn query_events(&mut self, filters: Vec<types::Filter>, limit: u32) -> wasmtime::Result<Vec<types::Event>> {
        let filters = filters.into_iter().map(Into::into).collect();
        Ok(latest::events::Host::query_events(self, filters, limit).await?.into_iter().map(Into::into).collect())
    }
}

impl host::Host for PluginState {
    async fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        use latest::host::LogLevel as L;
        let level = match level {
            host::LogLevel::Trace => L::Trace,
            host::LogLevel::Debug => L::Debug,
            host::LogLevel::Info => L::Info,
            host::LogLevel::Warn => L::Warn,
            host::LogLevel::Error => L::Error,
        };
        latest::host::Host::log(self, level, message).await
    }

    async fn now(&mut self) -> wasmtime::Result<u64> {
        latest::host::Host::now(self).await
    }

    async fn setting(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        latest::host::Host::setting(self, name).await
    }

    async fn count(&mut self, name: String, delta: u64) -> wasmtime::Result<()> {
        latest::host::Host::count(self, name, delta).await
    }
}
