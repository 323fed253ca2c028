//! The plugin runtime: loads the configured WebAssembly components, calls
//! them at the relay's hook points, hot-swaps them when their files change,
//! and contains their failures.
//!
//! - [`bindings`]: the WIT contract as Rust types (generated).
//! - [`runtime`]: engine, compilation cache, instance pools, call limits.
//! - [`imports`]: what plugins may call (key-value store, events, log, time).
//! - [`convert`]: relay types to and from WIT types.
//!
//! Hook semantics: `on-event` runs in configuration order before an event is
//! stored; the first refusal wins. `process-req` runs for each REQ/COUNT
//! that could reach a plugin's kinds; kinds a plugin manages are never
//! served except through its answers (see [`PluginHost::managed_kinds`]).

pub mod bindings;
pub mod breaker;
pub mod convert;
pub mod imports;
pub mod runtime;

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
use crate::config::{FailurePolicy, PluginConfig};
use crate::event::AcceptedEvent;
use crate::fanout::Fanout;
use crate::filter::{Filter, any_filter_matches};
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

/// Whether a read request is a REQ or a COUNT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPurpose {
    Req,
    Count,
}

/// Where the host looks for an event a plugin named in `filter-query` that
/// is not in the local store yet (another replica stored it; replication has
/// not brought it here). Returns the event's JSON.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync {
    async fn fetch(&self, id: &[u8; 32]) -> Option<String>;
}

/// The hook a call went to, as a metric label.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    OnEvent = 0,
    ProcessReq = 1,
    Tick = 2,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::OnEvent, Hook::ProcessReq, Hook::Tick];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::OnEvent => "on-event",
            Hook::ProcessReq => "process-req",
            Hook::Tick => "tick",
        }
    }
}

/// One plugin slot's figures, kept as Prometheus metrics labelled with the
/// slot's configured name.
pub struct PluginStats {
    plugin: String,
    metrics: Arc<Metrics>,
    /// The plugin's own counters (`host.count`), shared by all its versions.
    pub counters: Arc<PluginCounters>,
    /// Per-hook call counters and latency histograms, resolved once: every
    /// plugin call updates them, so no label lookup on that path.
    calls: [prometheus::IntCounter; 3],
    call_seconds: [prometheus::Histogram; 3],
}

impl PluginStats {
    pub fn new(metrics: &Arc<Metrics>, plugin: &str) -> Self {
        let counters = Arc::new(PluginCounters::new(plugin, metrics.plugin_counter.clone()));
        metrics.plugin_disabled.with_label_values(&[plugin]).set(0);
        let calls = Hook::ALL.map(|h| metrics.plugin_calls.with_label_values(&[plugin, h.as_str()]));
        let call_seconds = Hook::ALL.map(|h| metrics.plugin_call_seconds.with_label_values(&[plugin, h.as_str()]));
        Self { plugin: plugin.to_owned(), metrics: metrics.clone(), counters, calls, call_seconds }
    }

    fn record_call(&self, hook: Hook, elapsed: Duration, failure: Option<&CallFailure>) {
        self.calls[hook as usize].inc();
        self.call_seconds[hook as usize].observe(elapsed.as_secs_f64());
        if let Some(failure) = failure {
            let labels = [self.plugin.as_str(), hook.as_str()];
            let reason = match failure {
                CallFailure::Timeout(_) => "timeout",
                CallFailure::OutOfMemory(_) => "out-of-memory",
                CallFailure::Trap(_) => "trap",
                CallFailure::Instantiate(_) => "instantiate",
                CallFailure::Busy(_) => "busy",
            };
            self.metrics.plugin_failures.with_label_values(&[labels[0], labels[1], reason]).inc();
        }
    }

    fn swapped(&self, ok: bool) {
        self.metrics.plugin_swaps.with_label_values(&[self.plugin.as_str(), if ok { "ok" } else { "failed" }]).inc();
    }

    fn set_kv_usage(&self, (keys, bytes): (u64, u64)) {
        let plugin = [self.plugin.as_str()];
        self.metrics.plugin_kv_keys.with_label_values(&plugin).set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.metrics.plugin_kv_bytes.with_label_values(&plugin).set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn set_disabled(&self, disabled: bool) {
        self.metrics.plugin_disabled.with_label_values(&[self.plugin.as_str()]).set(i64::from(disabled));
    }

    fn dropped(&self) {
        self.metrics.plugin_dropped_results.with_label_values(&[self.plugin.as_str()]).inc();
    }

    /// Calls made to this slot, every hook and version.
    pub fn calls(&self) -> u64 {
        self.calls.iter().map(prometheus::IntCounter::get).sum()
    }

    /// Calls that failed (trap, timeout, memory, instantiation).
    pub fn failures(&self) -> u64 {
        let m = &self.metrics.plugin_failures;
        let reasons = ["timeout", "out-of-memory", "trap", "instantiate"];
        Hook::ALL
            .iter()
            .flat_map(|h| reasons.iter().map(move |r| (h, r)))
            .map(|(h, r)| m.with_label_values(&[self.plugin.as_str(), h.as_str(), r]).get())
            .sum()
    }

    /// Versions swapped in since start.
    pub fn swaps(&self) -> u64 {
        self.metrics.plugin_swaps.with_label_values(&[self.plugin.as_str(), "ok"]).get()
    }
}

/// One configured plugin and the version currently serving.
/// Settings with this prefix are NIP-11 fields the plugin advertises (see
/// [`PluginHost::relay_info_additions`]).
pub const NIP11_SETTING_PREFIX: &str = "nip11.";

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

impl PluginHost {
    /// Loads every configured plugin, in order. Any failure stops start-up:
    /// an operator should learn at once that a plugin cannot load.
    pub async fn start(
        configs: &[PluginConfig],
        cache_dir: PathBuf,
        metadata: Arc<dyn MetadataStore>,
        events: Arc<dyn EventStore>,
        fanout: Arc<Fanout>,
        max_results: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let runtime = PluginRuntime::new(cache_dir)?;
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
        host.publish_managed_kinds();
        Ok(host)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
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

    /// Fields the plugins that are loaded and enabled add to the NIP-11
    /// document: each declared setting named `nip11.<field>` whose value
    /// (the operator's, else the declared default) is JSON. An empty value
    /// adds nothing, so an operator can withdraw a plugin's advertisement.
    pub fn relay_info_additions(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for slot in self.slots.iter().filter(|s| !s.disabled.load(Ordering::Relaxed)) {
            for spec in &slot.current().info.settings {
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
            let started = std::time::Instant::now();
            let result = loaded.call(move |p, s| Box::pin(async move { p.call_on_event(s, &ctx, &ev).await })).await;
            slot.record(Hook::OnEvent, started, admission, Some(caller), result.as_ref().map(|_| ()));
            match result {
                Ok(wit::Decision::Accept) => {}
                Ok(wit::Decision::Reject(r)) => return Err(Refusal::from(r)),
                Err(CallFailure::Busy(_)) => return Err(Unavailable::Busy.refusal(&slot.config.name)),
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
        // Plugins that manage kinds answer last: what they hand out can be
        // state they commit (the MLS gateway consumes KeyPackages), so every
        // other plugin's refusal must come first. Order among the rest is
        // the configured order; only which refusal wins depends on it.
        let manages = |slot: &Arc<PluginSlot>| !slot.current().info.managed_kinds.is_empty();
        let policies = self.slots.iter().enumerate().filter(|(_, s)| !manages(s));
        let serving = self.slots.iter().enumerate().filter(|(_, s)| manages(s));
        for (index, slot) in policies.chain(serving) {
            let loaded = slot.current();
            // A plugin whose kinds are released has nothing to serve: the
            // store serves them like any other kind.
            if slot.released.load(Ordering::Relaxed) || !concerns(&loaded.info, filters) {
                continue;
            }
            let managed = &loaded.info.managed_kinds;
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
                ReadPurpose::Count => wit::RequestPurpose::Count,
            };
            let ctx = caller.context(Some(sub_id), purpose);
            let wf = wit_filters.get_or_insert_with(|| filters.iter().map(filter_to_wit).collect()).clone();
            let started = std::time::Instant::now();
            let result = loaded.call(move |p, s| Box::pin(async move { p.call_process_req(s, &ctx, &wf).await })).await;
            slot.record(Hook::ProcessReq, started, admission, Some(caller), result.as_ref().map(|_| ()));
            match result {
                Ok(wit::ReqResult::Continue) => {}
                Ok(wit::ReqResult::Reject(r)) => return Err(Refusal::from(r)),
                Ok(wit::ReqResult::AddEvents(events)) => {
                    contributed.extend(self.check_added_events(index, slot, events, filters, access));
                }
                Ok(wit::ReqResult::FilterQuery(fq)) => {
                    contributed.extend(self.check_filter_query(index, slot, fq, filters, access).await);
                }
                Err(CallFailure::Busy(_)) if names_managed => {
                    return Err(Unavailable::Busy.refusal(&slot.config.name));
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
            if !any_filter_matches(filters, &event)
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
            let matches = any_filter_matches(filters, &event)
                && plugin_filters.as_ref().is_none_or(|pf| any_filter_matches(pf, &event))
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

    fn slot(&self, name: &str) -> Result<(usize, &Arc<PluginSlot>), String> {
        self.slots.iter().enumerate().find(|(_, s)| s.config.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.slots.iter().map(|s| s.config.name.as_str()).collect();
            format!(
                "no plugin named '{name}'; configured: {}",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )
        })
    }

    /// An event another replica stored, verified, if there is a source.
    async fn fetch_missing(&self, id: &[u8; 32]) -> Option<StoredEvent> {
        let json = self.missing_events.get()?.fetch(id).await?;
        let event: Event = serde_json::from_str(&json).ok()?;
        if event.id.to_bytes() != *id || !event.verify_id() || !event.verify_signature() {
            return None;
        }
        let accepted = AcceptedEvent::new(event);
        Some(StoredEvent { created_at: accepted.event.created_at.as_secs(), id: *id, json: accepted.json })
    }

    /// Loads the slot's file again and swaps it in if it changed and loads
    /// cleanly. Calls already running finish on the old version.
    pub async fn reload(&self, name: &str) -> Result<bool, String> {
        self.swap_in(name, None).await
    }

    /// Replaces the plugin's file with `wasm` and swaps it in, if it loads
    /// cleanly; otherwise the file and the serving version stay as they were.
    pub async fn swap(&self, name: &str, wasm: &[u8]) -> Result<bool, String> {
        self.swap_in(name, Some(wasm)).await
    }

    /// Stops calling a plugin until [`Self::enable`] or its file changes:
    /// events it would see are refused, requests follow its `on_req_failure`.
    pub fn disable(&self, name: &str) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.disabled.store(true, Ordering::Relaxed);
        slot.stats.set_disabled(true);
        *slot.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some("disabled by an operator".into());
        tracing::warn!(plugin = %name, "plugin disabled by an operator");
        Ok(())
    }

    /// Serves plugin `name`'s managed kinds through the ordinary read paths
    /// (`release` true) or through the plugin again (false). The plugin
    /// keeps seeing events either way, so its state stays current.
    pub fn release_managed_kinds(&self, name: &str, release: bool) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.released.store(release, Ordering::Relaxed);
        self.publish_managed_kinds();
        tracing::warn!(plugin = %name, released = release, "managed kinds changed hands by an operator");
        Ok(())
    }

    pub fn enable(&self, name: &str) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.breaker.reset();
        slot.disabled.store(false, Ordering::Relaxed);
        slot.stats.set_disabled(false);
        tracing::info!(plugin = %name, "plugin enabled by an operator");
        Ok(())
    }

    async fn swap_in(&self, name: &str, replacement: Option<&[u8]>) -> Result<bool, String> {
        let (index, slot) = self.slot(name)?;
        let _one_at_a_time = slot.reload_lock.lock().await;
        let fail = |e: String| {
            slot.stats.swapped(false);
            tracing::error!(plugin = %name, error = %e, "plugin swap failed; the previous version keeps serving");
            *slot.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            Err(e)
        };
        // A replacement is written beside the plugin's file and loaded from
        // there; only a component that loads takes the file's place.
        let mut config = slot.config.clone();
        let staged = match replacement {
            Some(bytes) => {
                let staged = staged_path(&slot.config.path);
                if let Err(e) = tokio::fs::write(&staged, bytes).await {
                    return fail(format!("cannot write {}: {e}", staged.display()));
                }
                config.path = staged.clone();
                Some(staged)
            }
            None => None,
        };
        let counters = slot.stats.counters.clone();
        let loaded = self.runtime.load(&config, slot.kv.clone(), self.events.clone(), counters).await;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                if let Some(staged) = &staged {
                    let _ = tokio::fs::remove_file(staged).await;
                }
                return fail(e.to_string());
            }
        };
        if let Some(conflict) = self.managed_conflict(Some((index, &loaded))) {
            if let Some(staged) = &staged {
                let _ = tokio::fs::remove_file(staged).await;
            }
            return fail(conflict);
        }
        if let Some(staged) = &staged
            && let Err(e) = tokio::fs::rename(staged, &slot.config.path).await
        {
            let _ = tokio::fs::remove_file(staged).await;
            return fail(format!("cannot replace {}: {e}", slot.config.path.display()));
        }
        if loaded.hash == slot.current().hash && !slot.disabled.load(Ordering::Relaxed) && !slot.breaker.is_open() {
            return Ok(false);
        }
        tracing::info!(plugin = %name, version = %loaded.info.version, hash = %loaded.hash, "plugin swapped");
        slot.current.store(Arc::new(loaded));
        slot.breaker.reset();
        slot.disabled.store(false, Ordering::Relaxed);
        slot.stats.swapped(true);
        slot.stats.set_disabled(false);
        self.publish_managed_kinds();
        Ok(true)
    }

    /// Reloads every plugin (SIGHUP).
    pub async fn reload_all(&self) {
        for slot in &self.slots {
            let _ = self.reload(&slot.config.name).await;
        }
    }

    /// Watches every plugin file and swaps a plugin shortly after its file
    /// changes (writes are debounced).
    pub fn watch_files(self: &Arc<Self>) -> anyhow::Result<()> {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let targets: Vec<(String, PathBuf)> =
            self.slots.iter().filter_map(|s| Some((s.config.name.clone(), absolute(&s.config.path)?))).collect();
        let watched = targets.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.kind.is_access() {
                return;
            }
            for path in &event.paths {
                for (name, target) in &watched {
                    if absolute(path).as_deref() == Some(target.as_path()) {
                        let _ = tx.send(name.clone());
                    }
                }
            }
        })?;
        let mut dirs: Vec<&Path> = targets.iter().filter_map(|(_, p)| p.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        }
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let a copy finish: wait until the file has been quiet briefly.
                let mut names = vec![first];
                while let Ok(Some(more)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    names.push(more);
                }
                names.sort();
                names.dedup();
                let Some(host) = host.upgrade() else { return };
                for name in names {
                    let _ = host.reload(&name).await;
                }
            }
        });
        Ok(())
    }

    /// Starts the `tick` loop of every plugin that asks for one.
    pub fn start_ticks(self: &Arc<Self>) {
        for slot in &self.slots {
            let slot = slot.clone();
            tokio::spawn(async move {
                loop {
                    let loaded = slot.current();
                    let Some(interval) = loaded.info.tick_interval_seconds else {
                        // A later version may ask for ticks.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    };
                    tokio::time::sleep(Duration::from_secs(u64::from(interval))).await;
                    let Ok(admission) = slot.admit(None) else { continue };
                    let now = crate::event::unix_now();
                    let started = std::time::Instant::now();
                    let result =
                        slot.current().call(move |p, s| Box::pin(async move { p.call_tick(s, now).await })).await;
                    slot.record(Hook::Tick, started, admission, None, result.as_ref().map(|_| ()));
                }
            });
        }
    }
}

/// Events a deletion may name and still be stored while the plugin that
/// would check it is unavailable (each is looked up in the store).
const MAX_LOOKUPS_WHILE_UNAVAILABLE: usize = 64;

/// Whether a request with `filters` concerns a plugin with `info`.
fn concerns(info: &wit::PluginInfo, filters: &[Filter]) -> bool {
    let Some(req_kinds) = &info.req_kinds else { return true };
    filters.iter().any(|f| req_kinds.iter().chain(&info.managed_kinds).any(|k| f.could_match_kind(*k)))
}

/// Where a replacement for the plugin at `path` is written before it loads.
/// The name does not end in `.wasm`, so nothing mistakes it for a plugin.
fn staged_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".incoming-{}", std::process::id()));
    path.with_file_name(name)
}

fn absolute(path: &Path) -> Option<PathBuf> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
}
