//! The relay's Prometheus metrics: one registry per relay, the metric
//! handles the rest of the relay updates, and the text exposition served at
//! `metrics.path`.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds`
//! histograms) under the `wasm_relay_` prefix. Per-plugin metrics carry a
//! `plugin` label (the configured name); a plugin's own counters
//! (`host.count`) appear as `wasm_relay_plugin_counter_total{plugin,name}`,
//! which is where the MLS gateway's KeyPackage figures live.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets from 50 µs to 5 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections_open: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// Connections closed because they read too slowly.
    pub slow_disconnects: IntCounter,
    /// Client messages by verb (`EVENT`, `REQ`, `COUNT`, `CLOSE`, `AUTH`, `invalid`).
    pub messages: IntCounterVec,
    /// `messages` per verb, resolved once (updated for every client message);
    /// index with `verb as usize`.
    pub messages_by_verb: [IntCounter; Verb::ALL.len()],
    /// EVENT outcomes: `stored`, `duplicate`, `ephemeral`, or the refusal prefix.
    pub events: IntCounterVec,
    /// REQ/COUNT outcomes by `purpose` (`req`, `count`) and `outcome`
    /// (`served` or the CLOSED prefix).
    pub reads: IntCounterVec,
    /// Time a REQ/COUNT spends in plugins and the store, until EOSE/COUNT.
    pub read_seconds: HistogramVec,
    /// Time from submitting an event to the writer until it is durable.
    pub write_seconds: Histogram,
    /// Events per group commit.
    pub write_batch_events: Histogram,
    /// Events delivered to live subscriptions.
    pub live_deliveries: IntCounter,
    /// Size of the event store on disk (sampled at scrape time).
    pub store_size_bytes: IntGauge,
    /// Events removed by the NIP-40 expiration sweep.
    pub expired_events: IntCounter,
    /// Plugin calls by `plugin` and `hook`.
    pub plugin_calls: IntCounterVec,
    /// Failed plugin calls by `plugin`, `hook` and `reason` (`trap`,
    /// `timeout`, `out-of-memory`, `instantiate`).
    pub plugin_failures: IntCounterVec,
    /// Plugin call latency by `plugin` and `hook`.
    pub plugin_call_seconds: HistogramVec,
    /// Plugin versions swapped in, by `plugin` and `result` (`ok`, `failed`).
    pub plugin_swaps: IntCounterVec,
    /// 1 while a plugin is disabled.
    pub plugin_disabled: IntGaugeVec,
    /// Keys and bytes in each plugin's key-value namespace (its quota's use).
    pub plugin_kv_keys: IntGaugeVec,
    pub plugin_kv_bytes: IntGaugeVec,
    /// Ids or events a plugin returned that the host refused to serve.
    pub plugin_dropped_results: IntCounterVec,
    /// A plugin's own counters (`host.count`), by `plugin` and `name`.
    pub plugin_counter: IntCounterVec,
    /// `on-stored` and `on-removed` notices a plugin never received (it fell
    /// behind, failed, or was unavailable), by `plugin` and `hook`.
    pub plugin_notices_dropped: IntCounterVec,
    /// Billable Firestore operations by `op` (`read`, `write`, `delete`), as
    /// counted by [`crate::firestore::Usage`] (brought up to date at scrape time).
    pub firestore_operations: IntCounterVec,
    /// Events a reconciliation with the shared log found missing on this
    /// replica and stored (brought up to date at scrape time): above zero,
    /// the follower missed something.
    pub replication_repaired: IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("wasm_relay_{name}"), help)
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(format!("wasm_relay_{name}"), help).buckets(buckets.to_vec())
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let r = &registry;
        let counter = |n: &str, h: &str| reg(r, IntCounter::with_opts(opts(n, h)).expect("valid metric"));
        let counter_vec =
            |n: &str, h: &str, l: &[&str]| reg(r, IntCounterVec::new(opts(n, h), l).expect("valid metric"));
        let messages = counter_vec("messages_total", "Client messages by verb", &["verb"]);
        Self {
            messages_by_verb: Verb::ALL.map(|v| messages.with_label_values(&[v.as_str()])),
            messages,
            connections_open: reg(r, IntGauge::with_opts(opts("connections", "Open WebSocket connections")).unwrap()),
            connections_total: counter("connections_total", "WebSocket connections accepted"),
            slow_disconnects: counter("slow_disconnects_total", "Connections closed for reading too slowly"),
            events: counter_vec(
                "events_total",
                "EVENT outcomes (stored, duplicate, ephemeral, or refusal prefix)",
                &["outcome"],
            ),
            reads: counter_vec(
                "reads_total",
                "REQ and COUNT outcomes (served, or the CLOSED prefix)",
                &["purpose", "outcome"],
            ),
            read_seconds: reg(
                r,
                HistogramVec::new(
                    histogram_opts("read_seconds", "REQ/COUNT time until EOSE or COUNT", LATENCY_BUCKETS),
                    &["purpose"],
                )
                .unwrap(),
            ),
            write_seconds: reg(
                r,
                Histogram::with_opts(histogram_opts(
                    "write_seconds",
                    "Time from accepting an event to it being durable",
                    LATENCY_BUCKETS,
                ))
                .unwrap(),
            ),
            write_batch_events: reg(
                r,
                Histogram::with_opts(histogram_opts(
                    "write_batch_events",
                    "Events per group commit",
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
                ))
                .unwrap(),
            ),
            live_deliveries: counter("live_deliveries_total", "Events delivered to live subscriptions"),
            store_size_bytes: reg(
                r,
                IntGauge::with_opts(opts("store_size_bytes", "Event store size on disk")).unwrap(),
            ),
            expired_events: counter("expired_events_total", "Events removed by the NIP-40 expiration sweep"),
            plugin_calls: counter_vec("plugin_calls_total", "Plugin calls", &["plugin", "hook"]),
            plugin_failures: counter_vec("plugin_failures_total", "Failed plugin calls", &["plugin", "hook", "reason"]),
            plugin_call_seconds: reg(
                r,
                HistogramVec::new(
                    histogram_opts("plugin_call_seconds", "Plugin call latency", LATENCY_BUCKETS),
                    &["plugin", "hook"],
                )
                .unwrap(),
            ),
            plugin_swaps: counter_vec("plugin_swaps_total", "Plugin versions swapped in", &["plugin", "result"]),
            plugin_disabled: reg(
                r,
                IntGaugeVec::new(
                    opts("plugin_disabled", "1 while a plugin is disabled or its circuit is open"),
                    &["plugin"],
                )
                .unwrap(),
            ),
            plugin_kv_keys: reg(
                r,
                IntGaugeVec::new(opts("plugin_kv_keys", "Keys in a plugin's key-value namespace"), &["plugin"])
                    .unwrap(),
            ),
            plugin_kv_bytes: reg(
                r,
                IntGaugeVec::new(
                    opts("plugin_kv_bytes", "Bytes (keys plus values) in a plugin's key-value namespace"),
                    &["plugin"],
                )
                .unwrap(),
            ),
            plugin_dropped_results: counter_vec(
                "plugin_dropped_results_total",
                "Plugin results the host refused to serve",
                &["plugin"],
            ),
            plugin_counter: counter_vec(
                "plugin_counter_total",
                "Counters a plugin keeps with host.count",
                &["plugin", "name"],
            ),
            plugin_notices_dropped: counter_vec(
                "plugin_notices_dropped_total",
                "on-stored and on-removed notices a plugin never received (it fell behind, failed or was unavailable)",
                &["plugin", "hook"],
            ),
            firestore_operations: counter_vec(
                "firestore_operations_total",
                "Billable Firestore operations this process caused (document reads, writes, deletes)",
                &["op"],
            ),
            replication_repaired: counter(
                "replication_repaired_total",
                "Events reconciliation with the shared log found missing here and stored",
            ),
            registry,
        }
    }

    /// Brings `firestore_operations` up to `usage`.
    pub fn sync_firestore_usage(&self, usage: &crate::firestore::Usage) {
        use std::sync::atomic::Ordering::Relaxed;
        for (op, total) in [("read", &usage.reads), ("write", &usage.writes), ("delete", &usage.deletes)] {
            let counter = self.firestore_operations.with_label_values(&[op]);
            counter.inc_by(total.load(Relaxed).saturating_sub(counter.get()));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labels() {
        let m = Metrics::new();
        m.events.with_label_values(&["stored"]).inc_by(3);
        m.plugin_counter.with_label_values(&["mls-gateway", "keypackages_served"]).inc();
        let text = m.render();
        assert!(text.contains("wasm_relay_events_total{outcome=\"stored\"} 3"), "{text}");
        assert!(text.contains("wasm_relay_plugin_counter_total{name=\"keypackages_served\",plugin=\"mls-gateway\"} 1"));
    }
}

/// The verb of a client message, as the `messages_total` label.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    Event,
    Req,
    Count,
    Close,
    Auth,
    NegOpen,
    NegMsg,
    NegClose,
    /// Not a client message this relay understands.
    Invalid,
}

impl Verb {
    pub const ALL: [Verb; 9] = [
        Verb::Event,
        Verb::Req,
        Verb::Count,
        Verb::Close,
        Verb::Auth,
        Verb::NegOpen,
        Verb::NegMsg,
        Verb::NegClose,
        Verb::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Event => "EVENT",
            Verb::Req => "REQ",
            Verb::Count => "COUNT",
            Verb::Close => "CLOSE",
            Verb::Auth => "AUTH",
            Verb::NegOpen => "NEG-OPEN",
            Verb::NegMsg => "NEG-MSG",
            Verb::NegClose => "NEG-CLOSE",
            Verb::Invalid => "invalid",
        }
    }
}
