//! What a plugin instance's store holds, and the host side of the imports
//! (`kv`, `events`, `host`) it may call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{events, host, kv, types};
use super::convert::{event_to_wit, filter_from_wit};
use crate::metadata::{self, MetadataStore};
use crate::store::EventStore;

/// What every instance of one loaded plugin version shares.
pub struct PluginContext {
    /// Configured name: the log tag and the key-value namespace.
    pub name: String,
    pub metadata: Arc<dyn MetadataStore>,
    pub events: Arc<dyn EventStore>,
    /// The operator's values.
    pub settings: HashMap<String, String>,
    /// Defaults the plugin declared in `info()`, known once it has answered.
    pub defaults: OnceLock<HashMap<String, String>>,
    /// The plugin's own counters (`host.count`), shared by all its versions.
    pub counters: Arc<PluginCounters>,
    /// Events other replicas stored that have not reached this one yet.
    pub missing_events: Arc<OnceLock<Arc<dyn super::EventSource>>>,
    /// Its standard output and error's share of the relay's log.
    pub output: Arc<super::guest_output::LogBudget>,
    /// Where its outbound HTTP requests may go.
    pub outbound: Arc<super::outgoing_http::OutboundPolicy>,
    /// Where `host.publish` goes, once the relay is assembled.
    pub publisher: Arc<OnceLock<Arc<dyn super::Publisher>>>,
    /// Whether it asked for `publish` and was granted it (known after `info`).
    pub may_publish: OnceLock<bool>,
}

/// Counters a plugin keeps through `host.count`, exported as Prometheus
/// metrics.
pub struct PluginCounters {
    plugin: String,
    metric: prometheus::IntCounterVec,
    names: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl PluginCounters {
    /// Most distinct counter names one plugin may create.
    const MAX_NAMES: usize = 256;

    /// Counters of the plugin configured as `plugin`, exported through `metric`
    /// (labels `plugin`, `name`).
    pub fn new(plugin: &str, metric: prometheus::IntCounterVec) -> Self {
        Self { plugin: plugin.to_owned(), metric, names: Default::default() }
    }

    pub fn add(&self, name: &str, delta: u64) {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return;
        }
        {
            let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            if !names.contains(name) {
                if names.len() >= Self::MAX_NAMES {
                    return;
                }
                names.insert(name.to_owned());
            }
        }
        self.metric.with_label_values(&[self.plugin.as_str(), name]).inc_by(delta);
    }

    /// Current value of one counter.
    pub fn get(&self, name: &str) -> u64 {
        self.metric.with_label_values(&[self.plugin.as_str(), name]).get()
    }
}

/// The data of one instance's store.
pub struct PluginState {
    pub wasi: WasiCtx,
    /// `wasi:http` state; every outgoing request is denied (see `outgoing_http`).
    pub http: wasmtime_wasi_http::WasiHttpCtx,
    pub http_hooks: super::outgoing_http::OutgoingRequests,
    pub table: ResourceTable,
    pub limits: InstanceLimits,
    pub ctx: Arc<PluginContext>,
    /// CPU time the current call has used, shared with the future that
    /// drives the call (see [`CpuMeter`]).
    pub meter: Arc<CpuMeter>,
    /// CPU time the current call may use.
    pub budget: std::time::Duration,
}

impl PluginState {
    /// Starts accounting for a new call.
    pub fn start_call(&mut self, budget: std::time::Duration) {
        self.meter.reset();
        self.budget = budget;
    }

    /// Whether the current call has used up its CPU budget.
    pub fn budget_spent(&self) -> bool {
        self.meter.spent_ns() >= u64::try_from(self.budget.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The CPU time a plugin call uses: the calling thread's CPU clock, read
/// around every poll of the call's future. Time the call spends suspended
/// (waiting for storage, for a worker thread after yielding, or preempted by
/// other threads) is not on that clock, so under load a plugin is billed for
/// its own work only, never for the relay's queueing.
#[derive(Default)]
pub struct CpuMeter {
    used_ns: AtomicU64,
    /// The thread CPU clock when the current poll began; 0 between polls.
    poll_started_ns: AtomicU64,
}

impl CpuMeter {
    fn reset(&self) {
        self.used_ns.store(0, Ordering::Relaxed);
        self.poll_started_ns.store(0, Ordering::Relaxed);
    }

    /// CPU time used so far, the running poll included.
    pub fn spent_ns(&self) -> u64 {
        let used = self.used_ns.load(Ordering::Relaxed);
        match self.poll_started_ns.load(Ordering::Relaxed) {
            0 => used,
            started => used + thread_cpu_ns().saturating_sub(started),
        }
    }

    /// Polls `inner`, adding the CPU time the poll takes.
    pub fn poll<F: std::future::Future + Unpin>(
        &self,
        inner: &mut F,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let started = thread_cpu_ns().max(1);
        self.poll_started_ns.store(started, Ordering::Relaxed);
        let result = std::pin::Pin::new(inner).poll(cx);
        self.used_ns.fetch_add(thread_cpu_ns().saturating_sub(started), Ordering::Relaxed);
        self.poll_started_ns.store(0, Ordering::Relaxed);
        result
    }
}

/// CPU time consumed by the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; this clock exists on every
    // Linux and BSD the relay builds for.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Resource limits of one instance. The memory cap is the instance's total
/// across all its linear memories (a component may have several), not a cap
/// per memory.
pub struct InstanceLimits {
    memory_cap: usize,
    memory_total: usize,
}

/// A read the plugin asked the host for failed (the event store, or the
/// shared log of other replicas, could not be read). The call is abandoned
/// with this trap rather than answered "absent": a plugin must never take a
/// failure for a missing event and act on it (the MLS gateway drops index
/// entries of KeyPackages whose events are gone).
#[derive(Debug, thiserror::Error)]
#[error("the relay could not read its events: {0}")]
pub struct HostReadFailed(pub String);

/// A memory grow refused because the instance reached its memory cap.
#[derive(Debug, thiserror::Error)]
#[error("the plugin instance reached its memory limit of {0} bytes")]
pub struct MemoryCapReached(pub usize);

impl InstanceLimits {
    pub fn new(memory_cap: usize) -> Self {
        Self { memory_cap, memory_total: 0 }
    }
}

impl wasmtime::ResourceLimiter for InstanceLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if maximum.is_some_and(|max| desired > max) || self.memory_total.saturating_add(grow) > self.memory_cap {
            // A trap, not a failed grow: guests rarely handle allocation failure.
            return Err(MemoryCapReached(self.memory_cap).into());
        }
        self.memory_total += grow;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000 && maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        4
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn kv_error(e: metadata::KvError) -> kv::KvError {
    match e {
        metadata::KvError::BadKey(m) => kv::KvError::BadKey(m),
        metadata::KvError::TooLarge(m) => kv::KvError::TooLarge(m),
        metadata::KvError::Unavailable(m) => kv::KvError::Unavailable(m),
    }
}

impl types::Host for PluginState {}

impl kv::Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::KvError>> {
        let r = self.ctx.metadata.get(&self.ctx.name, &key).await.map_err(kv_error);
        Ok(r)
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        let r = self.ctx.metadata.put(&self.ctx.name, &key, value).await.map_err(kv_error);
        Ok(r)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), kv::KvError>> {
        let r = self.ctx.metadata.delete(&self.ctx.name, &key).await.map_err(kv_error);
        Ok(r)
    }

    async fn scan_prefix(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<(String, Vec<u8>)>, kv::KvError>> {
        let limit = (limit as usize).min(10_000);
        Ok(self
            .ctx
            .metadata
            .scan_prefix(&self.ctx.name, &prefix, start_after.as_deref(), limit)
            .await
            .map_err(kv_error))
    }

    async fn transact(
        &mut self,
        conditions: Vec<kv::Condition>,
        writes: Vec<kv::Write>,
    ) -> wasmtime::Result<Result<bool, kv::KvError>> {
        let conditions =
            conditions.into_iter().map(|c| metadata::Condition { key: c.key, expected: c.expected }).collect();
        let writes = writes.into_iter().map(|w| metadata::Write { key: w.key, value: w.value }).collect();
        let r = self.ctx.metadata.transact(&self.ctx.name, conditions, writes).await.map_err(kv_error);
        Ok(r)
    }
}

impl events::Host for PluginState {
    async fn get_event(&mut self, id: String) -> wasmtime::Result<Option<types::Event>> {
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(&id, &mut bytes).is_err() {
            return Ok(None);
        }
        // Events in the local store were verified when they were accepted.
        let stored = self.ctx.events.get(&bytes).map_err(|e| HostReadFailed(e.to_string()))?;
        if let Some(stored) = stored {
            let event: Option<nostr::event::Event> = serde_json::from_str(&stored.json).ok();
            return Ok(event.map(|e| event_to_wit(&e)));
        }
        // Stored by another replica, not applied here yet: a plugin must not
        // mistake it for a deleted event. It comes from outside: verify it.
        let Some(source) = self.ctx.missing_events.get() else { return Ok(None) };
        let fetched = source.fetch(&bytes).await.map_err(HostReadFailed)?;
        let event: Option<nostr::event::Event> = fetched.and_then(|j| serde_json::from_str(&j).ok());
        let event = event.filter(|e| e.id.to_bytes() == bytes && e.verify_id() && e.verify_signature());
        Ok(event.map(|e| event_to_wit(&e)))
    }

    async fn query_events(&mut self, filters: Vec<types::Filter>, limit: u32) -> wasmtime::Result<Vec<types::Event>> {
        let filters: Vec<_> = filters.iter().filter_map(|f| filter_from_wit(f).ok()).collect();
        let limit = (limit as usize).min(10_000);
        let access = crate::store::ReadAccess::trusted(crate::event::unix_now());
        let found = self.ctx.events.query_filters(&filters, limit, limit, &access);
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(plugin = %self.ctx.name, error = %e, "plugin query failed");
                return Ok(vec![]);
            }
        };
        Ok(found
            .iter()
            .take(limit)
            .filter_map(|s| serde_json::from_str(&s.json).ok())
            .map(|e| event_to_wit(&e))
            .collect())
    }
}

impl host::Host for PluginState {
    async fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        let plugin = self.ctx.name.as_str();
        // Plugins cannot flood the log with one huge line.
        let message: String = message.chars().take(2000).collect();
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }

    async fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(crate::event::unix_now())
    }

    async fn count(&mut self, name: String, delta: u64) -> wasmtime::Result<()> {
        self.ctx.counters.add(&name, delta);
        Ok(())
    }

    async fn setting(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        let ctx = &self.ctx;
        Ok(ctx.settings.get(&name).cloned().or_else(|| ctx.defaults.get().and_then(|d| d.get(&name).cloned())))
    }

    async fn publish(&mut self, draft: types::EventDraft) -> wasmtime::Result<Result<String, host::PublishError>> {
        if self.ctx.may_publish.get() != Some(&true) {
            return Ok(Err(host::PublishError::NotGranted));
        }
        // No relay to publish through (`plugin check`, `plugin test`): as if
        // the relay had no key.
        let Some(publisher) = self.ctx.publisher.get().cloned() else {
            return Ok(Err(host::PublishError::NoRelayKey));
        };
        let published = publisher.publish(draft.kind, draft.tags, draft.content).await;
        tracing::debug!(plugin = %self.ctx.name, outcome = ?published, "a plugin published with the relay's key");
        Ok(published.map_err(|e| match e {
            super::PublishError::NoRelayKey => host::PublishError::NoRelayKey,
            super::PublishError::Refused(refusal) => {
                host::PublishError::Refused(super::convert::refusal_to_wit(&refusal))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_memory_cap_is_the_instance_total_across_memories() {
        let mut limits = InstanceLimits::new(10 << 20);
        // Two memories of 4 MiB fit; a third grow to 4 MiB does not.
        assert!(limits.memory_growing(0, 4 << 20, None).unwrap());
        assert!(limits.memory_growing(0, 4 << 20, None).unwrap());
        let refused = limits.memory_growing(0, 4 << 20, None).unwrap_err();
        assert!(refused.downcast_ref::<MemoryCapReached>().is_some());
        // Growing one of them by the 2 MiB left fits exactly.
        assert!(limits.memory_growing(4 << 20, 6 << 20, None).unwrap());
    }

    #[tokio::test]
    async fn the_cpu_meter_bills_work_not_waiting() {
        let meter = CpuMeter::default();
        // A future that waits 100 ms (pending in between)...
        let mut sleep = Box::pin(tokio::time::sleep(std::time::Duration::from_millis(100)));
        std::future::poll_fn(|cx| meter.poll(&mut sleep, cx)).await;
        let waiting = meter.spent_ns();
        // ...is billed far less than one that computes, however busy the machine.
        meter.reset();
        let mut work = Box::pin(async {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        });
        std::future::poll_fn(|cx| meter.poll(&mut work, cx)).await;
        let working = meter.spent_ns();
        assert!(working > 0 && waiting * 10 < working, "waiting billed {waiting} ns, working {working} ns");
    }
}
