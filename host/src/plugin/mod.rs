//! The plugin runtime: loads the configured WebAssembly components, calls
//! them at the relay's hook points, hot-swaps them when their files change,
//! and contains their failures.
//!
//! - [`bindings`]: the WIT contract as Rust types (generated).
//! - [`runtime`]: engine, compilation cache, instance pools, call limits.
//! - [`imports`]: what plugins may call (key-value store, events, log, time).
//! - [`convert`]: relay types to and from WIT types.
//! - `outgoing_http`: `wasi:http` linked, every outgoing request denied.
//! - `notices`: `on-stored` and `on-removed`, fed by the store after each
//!   commit and delivered in batches off the write path.
//! - `hooks`: calling plugins for events and requests, checking what they
//!   return; `lifecycle`: reload, swap, watch, enable/disable, ticks;
//!   `stats`: call statistics; [`breaker`]: containing failing plugins.
//!
//! Hook semantics: `on-event` runs in configuration order before an event is
//! stored; the first refusal wins. `process-req` runs for each REQ/COUNT
//! that could reach a plugin's kinds; kinds a plugin manages are never
//! served except through its answers (see [`PluginHost::managed_kinds`]).

pub mod bindings;
pub mod breaker;
pub mod convert;
pub mod guest_output;
mod hooks;
pub mod imports;
mod lifecycle;
mod notices;
pub(crate) mod outgoing_http;
pub mod runtime;
mod stats;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use nostr::event::Event;

use self::bindings::types as wit;
use self::breaker::{Admission, Breaker, ClientFailures};
use self::convert::{event_from_wit, event_to_wit, filter_from_wit, filter_to_wit};
pub use self::imports::PluginCounters;
pub use self::runtime::{CallFailure, LoadError, LoadedPlugin, PluginRuntime};
pub use self::stats::{Hook, PluginStats};
use crate::config::{FailurePolicy, PluginConfig};
use crate::event::AcceptedEvent;
use crate::fanout::Fanout;
use crate::filter::{Filter, any_filter_matches, filter_matches_besides_search};
use crate::metadata::{KvQuota, MetadataStore, QuotaStore};
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::store::{EventStore, ReadAccess, StoredEvent};

/// Who is calling, as plugins see it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub connection_id: u64,
    pub authed_pubkeys: Vec<String>,
    /// The client's address as plugins see it, rendered once per connection
    /// rather than on every plugin call (formatting an address cost more
    /// than the rest of the request context together).
    remote_addr: String,
    /// The address failures are charged to; `None` for the relay's own
    /// calls (events from other replicas), which count toward the breaker.
    ip: Option<IpAddr>,
}

impl Caller {
    /// A connection from `remote` that has not authenticated yet.
    pub fn new(connection_id: u64, remote: SocketAddr) -> Self {
        Self { connection_id, authed_pubkeys: Vec::new(), remote_addr: remote.to_string(), ip: Some(remote.ip()) }
    }

    /// The relay itself, publishing with its own key for a plugin: plugins
    /// see connection 0 and the address `relay`.
    pub fn relay() -> Self {
        Self { connection_id: 0, authed_pubkeys: Vec::new(), remote_addr: "relay".into(), ip: None }
    }

    /// The operator bringing events in through the operator socket
    /// (`import`, `sync`): plugins see connection 0 and the address `label`.
    pub fn operator(label: &str) -> Self {
        Self { connection_id: 0, authed_pubkeys: Vec::new(), remote_addr: label.into(), ip: None }
    }

    /// The relay itself, applying an event another replica stored: plugins
    /// see connection 0 and the address `replica`.
    pub fn replica() -> Self {
        Self { connection_id: 0, authed_pubkeys: Vec::new(), remote_addr: "replica".into(), ip: None }
    }

    fn context(&self, sub_id: Option<&str>, purpose: wit::RequestPurpose) -> wit::RequestContext {
        wit::RequestContext {
            connection_id: self.connection_id,
            authed_pubkeys: self.authed_pubkeys.clone(),
            remote_addr: self.remote_addr.clone(),
            subscription_id: sub_id.map(str::to_owned),
            purpose,
        }
    }
}

/// What a read request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPurpose {
    Req,
    Count,
    /// NIP-77 `NEG-OPEN`: it reveals which events exist (ids and times),
    /// not their content, so policies see it as a COUNT (contract 0.1 and
    /// 0.2 have no other purpose for it). Plugins that manage kinds are not
    /// asked: their kinds are never part of a reconciled set.
    Reconcile,
}

/// Where the host looks for an event a plugin named in `filter-query` that
/// is not in the local store yet (another replica stored it; replication has
/// not brought it here). Returns the event's JSON, `None` when the source
/// does not hold it, and `Err` (what failed) when it could not be asked:
/// never `None` for a failure.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync {
    async fn fetch(&self, id: &[u8; 32]) -> Result<Option<String>, String>;
}

/// Publishes an event signed with the relay's own key, through the relay's
/// normal write path (`host.publish`); implemented by the assembled relay.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync {
    /// Signs and stores a `kind` event with `tags` and `content`, dated now;
    /// returns its id (hex).
    async fn publish(&self, kind: u16, tags: Vec<Vec<String>>, content: String) -> Result<String, PublishError>;
}

/// Why `host.publish` stored nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the relay has no key of its own (info.secret_key)")]
    NoRelayKey,
    #[error("refused: {0:?}")]
    Refused(Refusal),
}

/// A hook's name as the contract spells it.
pub fn hook_name(hook: wit::Hook) -> &'static str {
    match hook {
        wit::Hook::OnStored => "on-stored",
        wit::Hook::OnRemoved => "on-removed",
        wit::Hook::OnConnect => "on-connect",
        wit::Hook::OnAuth => "on-auth",
        wit::Hook::Search => "search",
    }
}

/// Settings with this prefix are NIP-11 fields the plugin advertises (see
/// [`PluginHost::relay_info_additions`]).
pub const NIP11_SETTING_PREFIX: &str = "nip11.";

/// One configured plugin and the version currently serving.
pub struct PluginSlot {
    pub config: PluginConfig,
    current: ArcSwap<LoadedPlugin>,
    /// The plugin's key-value namespace, held to its quota; every version
    /// of the plugin writes through it.
    kv: Arc<QuotaStore>,
    breaker: Breaker,
    client_failures: ClientFailures,
    /// Turned off by an operator (NIP-86 `disableplugin`).
    disabled: AtomicBool,
    /// Its managed kinds are served by the ordinary read paths, not by it
    /// (`release_managed_kinds`, NIP-86 `releasemanagedkinds`).
    released: AtomicBool,
    pub stats: PluginStats,
    last_error: Mutex<Option<String>>,
    reload_lock: tokio::sync::Mutex<()>,
}

/// A plugin's state as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub plugin_name: String,
    pub version: String,
    pub wit_version: String,
    pub hash: String,
    pub path: PathBuf,
    pub managed_kinds: Vec<u16>,
    /// Optional hooks it asked for (contract 0.2).
    pub hooks: Vec<&'static str>,
    /// Hosts it asks to reach over HTTP, and those it may (asked and granted).
    pub outbound_http_asked: Vec<String>,
    pub outbound_http_granted: Vec<String>,
    /// Whether it asks to publish with the relay's key, and may.
    pub publish_asked: bool,
    pub publish_granted: bool,
    /// Not being called: turned off by an operator, or its circuit is open.
    pub disabled: bool,
    /// Its managed kinds are served by the ordinary read paths (rollback).
    pub managed_kinds_released: bool,
    /// `"closed"`, `"open"` (not called) or `"half-open"` (probing).
    pub circuit: &'static str,
    pub last_error: Option<String>,
    pub calls: u64,
    pub failures: u64,
    pub swaps: u64,
}

impl PluginSlot {
    pub fn current(&self) -> Arc<LoadedPlugin> {
        self.current.load_full()
    }

    /// Whether the current version asked for `hook`.
    pub fn wants(&self, hook: wit::Hook) -> bool {
        self.current.load().info.hooks.contains(&hook)
    }

    /// Whether it answers `search` filters now: it asked, and it is enabled.
    fn serves_search(&self) -> bool {
        self.wants(wit::Hook::Search) && !self.disabled.load(Ordering::Relaxed)
    }

    /// Whether the plugin may be called for `caller` now; `Err` says why not.
    fn admit(&self, caller: Option<&Caller>) -> Result<Admission, Unavailable> {
        if self.disabled.load(Ordering::Relaxed) {
            return Err(Unavailable::Disabled);
        }
        if let Some(wait) = caller.and_then(|c| self.client_failures.refused_for(c.ip?)) {
            return Err(Unavailable::ClientFailures(wait));
        }
        match self.breaker.admit() {
            Admission::Open(wait) => Err(Unavailable::CircuitOpen(wait)),
            admission => Ok(admission),
        }
    }

    /// Calls `loaded` (this slot's current version), timed and recorded.
    async fn timed_call<R, F>(
        &self,
        loaded: &LoadedPlugin,
        hook: Hook,
        admission: Admission,
        caller: Option<&Caller>,
        f: F,
    ) -> Result<R, CallFailure>
    where
        F: for<'a> FnOnce(
            &'a bindings::PluginExports,
            &'a mut wasmtime::Store<imports::PluginState>,
        ) -> runtime::CallFuture<'a, R>,
    {
        self.timed_call_scaled(loaded, hook, admission, caller, 1, f).await
    }

    /// [`Self::timed_call`] with `budget_factor` times the CPU budget.
    async fn timed_call_scaled<R, F>(
        &self,
        loaded: &LoadedPlugin,
        hook: Hook,
        admission: Admission,
        caller: Option<&Caller>,
        budget_factor: u32,
        f: F,
    ) -> Result<R, CallFailure>
    where
        F: for<'a> FnOnce(
            &'a bindings::PluginExports,
            &'a mut wasmtime::Store<imports::PluginState>,
        ) -> runtime::CallFuture<'a, R>,
    {
        let started = std::time::Instant::now();
        let result = loaded.call_scaled(budget_factor, f).await;
        self.record(hook, started, admission, caller, result.as_ref().map(|_| ()));
        result
    }

    /// Records a call's outcome: metrics, the breaker, the caller's tally.
    fn record(
        &self,
        hook: Hook,
        started: std::time::Instant,
        admission: Admission,
        caller: Option<&Caller>,
        result: Result<(), &CallFailure>,
    ) {
        self.stats.record_call(hook, started.elapsed(), result.err());
        let failure = match result {
            Ok(()) => {
                if self.breaker.succeeded(admission) {
                    self.stats.set_disabled(false);
                    tracing::info!(plugin = %self.config.name, "plugin answered its probe call; circuit closed");
                }
                return;
            }
            Err(failure) if !failure.is_fault() => return,
            Err(failure) => failure,
        };
        // The first failure a client causes within a minute counts toward
        // the breaker; more only cost that client.
        let counts = caller.and_then(|c| c.ip).is_none_or(|ip| self.client_failures.record(ip));
        tracing::warn!(
            plugin = %self.config.name,
            hook = hook.as_str(),
            client = caller.map(|c| c.remote_addr.as_str()),
            error = %failure,
            "plugin call failed"
        );
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.to_string());
        if let Some(open_for) = self.breaker.failed(admission, counts) {
            self.stats.set_disabled(true);
            tracing::error!(
                plugin = %self.config.name,
                seconds = open_for.as_secs_f64(),
                "plugin circuit opened after repeated failures; it is not called until a probe call succeeds"
            );
        }
    }
}

/// Why a plugin is not called for a request.
#[derive(Debug, Clone, Copy)]
enum Unavailable {
    Disabled,
    CircuitOpen(Duration),
    ClientFailures(Duration),
    Busy,
}

impl Unavailable {
    fn refusal(self, plugin: &str) -> Refusal {
        match self {
            Unavailable::Disabled => Refusal::error(format!("plugin '{plugin}' is disabled by the relay operator")),
            Unavailable::CircuitOpen(wait) => Refusal::error(format!(
                "plugin '{plugin}' is unavailable after repeated failures; retry in {} s",
                wait.as_secs().max(1)
            )),
            Unavailable::ClientFailures(wait) => Refusal::rate_limited(format!(
                "your recent requests made plugin '{plugin}' fail; retry in {} s",
                wait.as_secs().max(1)
            )),
            Unavailable::Busy => Refusal::busy(format!("plugin '{plugin}' is busy; retry in a moment")),
        }
    }
}

pub struct PluginHost {
    runtime: PluginRuntime,
    slots: Vec<Arc<PluginSlot>>,
    events: Arc<dyn EventStore>,
    fanout: Arc<Fanout>,
    /// Sorted union of every loaded plugin's managed kinds.
    managed: ArcSwap<Vec<u16>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    max_results: usize,
    missing_events: std::sync::OnceLock<Arc<dyn EventSource>>,
}

/// What a [`PluginHost`] is built from.
pub struct PluginHostSetup<'a> {
    /// The `[[plugins]]` entries, in order.
    pub configs: &'a [PluginConfig],
    /// Where compiled components are cached, and the cache's size cap.
    pub cache_dir: PathBuf,
    pub cache_max_bytes: u64,
    /// Backs each plugin's key-value namespace.
    pub metadata: Arc<dyn MetadataStore>,
    /// The relay's stored events (`events` import, `filter-query` answers).
    pub events: Arc<dyn EventStore>,
    /// Told which kinds plugins manage, so live delivery skips them.
    pub fanout: Arc<Fanout>,
    /// Most events one answer may hold (`limits.max_limit`).
    pub max_results: usize,
    pub metrics: Arc<Metrics>,
}

impl PluginHost {
    /// Loads every configured plugin, in order. Any failure stops start-up:
    /// an operator should learn at once that a plugin cannot load.
    pub async fn start(setup: PluginHostSetup<'_>) -> anyhow::Result<Arc<Self>> {
        let PluginHostSetup { configs, cache_dir, cache_max_bytes, metadata, events, fanout, max_results, metrics } =
            setup;
        let mut runtime = PluginRuntime::new(cache_dir)?;
        runtime.cache_max_bytes = cache_max_bytes;
        let mut slots = Vec::with_capacity(configs.len());
        for config in configs {
            let stats = PluginStats::new(&metrics, &config.name);
            let quota = KvQuota { max_keys: config.kv_max_keys, max_bytes: config.kv_max_bytes };
            let kv = Arc::new(
                QuotaStore::open(metadata.clone(), &config.name, quota)
                    .await
                    .map_err(|e| anyhow::anyhow!("plugin '{}': reading its key-value usage: {e}", config.name))?,
            );
            let loaded = runtime
                .load(config, kv.clone(), events.clone(), stats.counters.clone())
                .await
                .map_err(|e| anyhow::anyhow!("plugin '{}' ({}): {e}", config.name, config.path.display()))?;
            tracing::info!(
                plugin = %config.name,
                version = %loaded.info.version,
                wit = %loaded.wit_version,
                managed_kinds = ?loaded.info.managed_kinds,
                "plugin loaded"
            );
            slots.push(Arc::new(PluginSlot {
                config: config.clone(),
                current: ArcSwap::from_pointee(loaded),
                kv,
                breaker: Breaker::new(
                    config.max_consecutive_failures,
                    Duration::from_secs(config.circuit_open_seconds),
                ),
                client_failures: ClientFailures::new(config.client_failures_per_minute),
                disabled: AtomicBool::new(false),
                released: AtomicBool::new(config.release_managed_kinds),
                stats,
                last_error: Mutex::new(None),
                reload_lock: tokio::sync::Mutex::new(()),
            }));
        }
        let host = Arc::new(Self {
            runtime,
            slots,
            events,
            fanout,
            managed: ArcSwap::from_pointee(vec![]),
            watcher: Mutex::new(None),
            max_results,
            missing_events: std::sync::OnceLock::new(),
        });
        if let Some(conflict) = host.managed_conflict(None) {
            anyhow::bail!("{conflict}");
        }
        if !host.slots.is_empty() {
            host.events.observe(notices::NoticeRouter::start(&host.slots));
        }
        host.publish_managed_kinds();
        Ok(host)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Where `host.publish` sends what plugins granted `publish` ask for.
    pub fn set_publisher(&self, publisher: Arc<dyn Publisher>) {
        let _ = self.runtime.publisher.set(publisher);
    }

    /// Where to look for `filter-query` ids missing from the local store.
    pub fn set_missing_event_source(&self, source: Arc<dyn EventSource>) {
        let _ = self.runtime.missing_events.set(source.clone());
        let _ = self.missing_events.set(source);
    }

    pub fn slots(&self) -> &[Arc<PluginSlot>] {
        &self.slots
    }

    /// Kinds that ordinary read paths must not serve (sorted).
    pub fn managed_kinds(&self) -> Arc<Vec<u16>> {
        self.managed.load_full()
    }

    /// Brings the key-value usage gauges up to date (before a scrape).
    pub fn refresh_usage_metrics(&self) {
        for slot in &self.slots {
            slot.stats.set_kv_usage(slot.kv.used());
        }
    }

    pub fn status(&self) -> Vec<PluginStatus> {
        self.slots
            .iter()
            .map(|s| {
                let c = s.current();
                PluginStatus {
                    name: s.config.name.clone(),
                    plugin_name: c.info.name.clone(),
                    version: c.info.version.clone(),
                    wit_version: c.wit_version.clone(),
                    hash: c.hash.clone(),
                    path: s.config.path.clone(),
                    managed_kinds: c.info.managed_kinds.clone(),
                    hooks: c.info.hooks.iter().map(|h| hook_name(*h)).collect(),
                    outbound_http_asked: runtime::asked_hosts(&c.info),
                    outbound_http_granted: c.granted_hosts.clone(),
                    publish_asked: c.info.capabilities.iter().any(|c| matches!(c, wit::Capability::Publish)),
                    publish_granted: c.publish_granted,
                    disabled: s.disabled.load(Ordering::Relaxed) || s.breaker.is_open(),
                    managed_kinds_released: s.released.load(Ordering::Relaxed),
                    circuit: s.breaker.describe(),
                    last_error: s.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    calls: s.stats.calls(),
                    failures: s.stats.failures(),
                    swaps: s.stats.swaps(),
                }
            })
            .collect()
    }

    /// Two plugins managing one kind, counting `replacing` as the new version
    /// of its slot.
    fn managed_conflict(&self, replacing: Option<(usize, &LoadedPlugin)>) -> Option<String> {
        let mut owner: std::collections::HashMap<u16, &str> = std::collections::HashMap::new();
        let currents: Vec<_> = self.slots.iter().map(|s| s.current()).collect();
        for (i, slot) in self.slots.iter().enumerate() {
            let info = match replacing {
                Some((j, new)) if j == i => &new.info,
                _ => &currents[i].info,
            };
            for kind in &info.managed_kinds {
                if let Some(other) = owner.insert(*kind, &slot.config.name) {
                    return Some(format!(
                        "plugins '{other}' and '{}' both manage kind {kind}; a kind can have one manager",
                        slot.config.name
                    ));
                }
            }
        }
        None
    }

    /// Whether a loaded, enabled plugin answers NIP-50 `search` filters.
    pub fn serves_search(&self) -> bool {
        self.slots.iter().any(|s| s.serves_search())
    }

    /// Fields the plugins that are loaded and enabled add to the NIP-11
    /// document: what their `info` contributes (supported NIPs, fields; 50
    /// for a search plugin), and each declared setting named
    /// `nip11.<field>` whose value (the operator's, else the declared
    /// default) is JSON. An empty value adds nothing, so an operator can
    /// withdraw a plugin's advertisement.
    pub fn relay_info_additions(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for slot in self.slots.iter().filter(|s| !s.disabled.load(Ordering::Relaxed)) {
            let info = &slot.current().info;
            let mut nips = info.relay_info.supported_nips.clone();
            if info.hooks.contains(&wit::Hook::Search) {
                nips.push(50);
            }
            if !nips.is_empty() {
                out.push(("supported_nips".to_owned(), serde_json::json!(nips)));
            }
            for field in &info.relay_info.fields {
                match serde_json::from_str(&field.value_json) {
                    Ok(json) => out.push((field.name.clone(), json)),
                    Err(e) => {
                        tracing::debug!(plugin = %slot.config.name, field = %field.name, error = %e, "not JSON; not advertised")
                    }
                }
            }
            for spec in &info.settings {
                let Some(field) = spec.name.strip_prefix(NIP11_SETTING_PREFIX) else { continue };
                let value =
                    slot.config.settings.get(&spec.name).map_or_else(|| spec.default_value.clone(), |v| v.to_string());
                if value.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str(&value) {
                    Ok(json) => out.push((field.to_owned(), json)),
                    Err(e) => {
                        tracing::debug!(plugin = %slot.config.name, setting = %spec.name, error = %e, "not JSON; not advertised")
                    }
                }
            }
        }
        out
    }

    fn publish_managed_kinds(&self) {
        let mut kinds: Vec<u16> = self
            .slots
            .iter()
            .filter(|s| !s.released.load(Ordering::Relaxed))
            .flat_map(|s| s.current().info.managed_kinds.clone())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        self.fanout.set_excluded_kinds(kinds.clone());
        self.managed.store(Arc::new(kinds));
    }

    fn slot(&self, name: &str) -> Result<(usize, &Arc<PluginSlot>), String> {
        self.slots.iter().enumerate().find(|(_, s)| s.config.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.slots.iter().map(|s| s.config.name.as_str()).collect();
            format!(
                "no plugin named '{name}'; configured: {}",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )
        })
    }
}

#[cfg(test)]
mod contract_copies {
    use std::path::Path;

    /// The Rust SDK builds from its own copy of the WIT contract, so it
    /// works outside this repository: every file it vendors is the released
    /// contract's, byte for byte, and the SDK vendors the current version.
    #[test]
    fn the_sdk_vendors_the_released_contract_unchanged() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let vendored = root.join("plugins/sdk/wit");
        let mut files = 0;
        for version in std::fs::read_dir(&vendored).expect("plugins/sdk/wit") {
            let version = version.unwrap().path();
            let released = root.join("wit").join(version.file_name().unwrap());
            for file in std::fs::read_dir(&version).unwrap() {
                let file = file.unwrap().path();
                let original = released.join(file.file_name().unwrap());
                assert_eq!(
                    std::fs::read(&file).unwrap(),
                    std::fs::read(&original).unwrap_or_default(),
                    "{} differs from {}: copy the released contract, never edit the SDK's copy",
                    file.display(),
                    original.display()
                );
                files += 1;
            }
        }
        assert!(files > 0, "the SDK vendors no contract");
        let sdk = std::fs::read_to_string(root.join("plugins/sdk/src/lib.rs")).unwrap();
        let current = crate::plugin::bindings::SUPPORTED_WIT_VERSIONS.last().expect("a supported version");
        assert!(sdk.contains(&format!("path: \"wit/{current}\"")), "the SDK builds against wit/{current}");
    }
}
