//! Call statistics: what each plugin's calls cost and how they ended, as
//! Prometheus metrics and the counters plugins keep.

use super::*;

/// The hook a call went to, as a metric label.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    OnEvent = 0,
    ProcessReq = 1,
    Tick = 2,
    OnStored = 3,
    OnRemoved = 4,
    OnConnect = 5,
    OnAuth = 6,
}

impl Hook {
    const ALL: [Hook; 7] =
        [Hook::OnEvent, Hook::ProcessReq, Hook::Tick, Hook::OnStored, Hook::OnRemoved, Hook::OnConnect, Hook::OnAuth];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::OnEvent => "on-event",
            Hook::ProcessReq => "process-req",
            Hook::Tick => "tick",
            Hook::OnStored => "on-stored",
            Hook::OnRemoved => "on-removed",
            Hook::OnConnect => "on-connect",
            Hook::OnAuth => "on-auth",
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
    calls: [prometheus::IntCounter; 7],
    call_seconds: [prometheus::Histogram; 7],
}

impl PluginStats {
    pub fn new(metrics: &Arc<Metrics>, plugin: &str) -> Self {
        let counters = Arc::new(PluginCounters::new(plugin, metrics.plugin_counter.clone()));
        metrics.plugin_disabled.with_label_values(&[plugin]).set(0);
        let calls = Hook::ALL.map(|h| metrics.plugin_calls.with_label_values(&[plugin, h.as_str()]));
        let call_seconds = Hook::ALL.map(|h| metrics.plugin_call_seconds.with_label_values(&[plugin, h.as_str()]));
        Self { plugin: plugin.to_owned(), metrics: metrics.clone(), counters, calls, call_seconds }
    }

    pub(super) fn record_call(&self, hook: Hook, elapsed: Duration, failure: Option<&CallFailure>) {
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
                CallFailure::HostUnavailable(_) => "host-unavailable",
            };
            self.metrics.plugin_failures.with_label_values(&[labels[0], labels[1], reason]).inc();
        }
    }

    pub(super) fn swapped(&self, ok: bool) {
        self.metrics.plugin_swaps.with_label_values(&[self.plugin.as_str(), if ok { "ok" } else { "failed" }]).inc();
    }

    pub(super) fn set_kv_usage(&self, (keys, bytes): (u64, u64)) {
        let plugin = [self.plugin.as_str()];
        self.metrics.plugin_kv_keys.with_label_values(&plugin).set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.metrics.plugin_kv_bytes.with_label_values(&plugin).set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub(super) fn set_disabled(&self, disabled: bool) {
        self.metrics.plugin_disabled.with_label_values(&[self.plugin.as_str()]).set(i64::from(disabled));
    }

    /// `count` notices for `hook` (on-stored, on-removed) never delivered.
    pub(super) fn notices_dropped(&self, hook: Hook, count: usize) {
        self.metrics
            .plugin_notices_dropped
            .with_label_values(&[self.plugin.as_str(), hook.as_str()])
            .inc_by(count as u64);
    }

    /// Notices for `hook` never delivered, since start.
    pub fn notices_dropped_total(&self, hook: Hook) -> u64 {
        self.metrics.plugin_notices_dropped.with_label_values(&[self.plugin.as_str(), hook.as_str()]).get()
    }

    pub(super) fn dropped(&self) {
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
