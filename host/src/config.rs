//! Relay configuration: the compiled-in defaults, the optional TOML file and
//! the environment overrides an operator sets in a container.
//!
//! Precedence, lowest first: defaults, `--config FILE`, `WASM_RELAY_*`
//! environment variables. `relay.example.toml` at the repository root documents
//! every key; a unit test keeps it in step with [`Config::default`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Environment variable prefix. `WASM_RELAY_LIMITS__MAX_LIMIT=100` sets
/// `limits.max_limit`; the short forms below cover what a container sets most.
pub const ENV_PREFIX: &str = "WASM_RELAY_";

/// Short environment names and the keys they set.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("bind", "server.bind"),
    ("public_url", "server.public_url"),
    ("client_address_header", "server.client_address_header"),
    ("data_dir", "storage.data_dir"),
    ("log", "log.filter"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    OutOfRange(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub info: RelayInfo,
    pub log: LogConfig,
    pub nips: NipConfig,
    pub negentropy: NegentropyConfig,
    pub rate_limits: RateLimits,
    pub access: AccessLists,
    pub plugin_runtime: PluginRuntimeConfig,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    pub metadata: MetadataConfig,
    pub firestore: FirestoreConfig,
    pub replication: ReplicationConfig,
    /// Plugins, loaded in this order; each is consulted in this order.
    pub plugins: Vec<PluginConfig>,
}

/// Who may read NIP-59 gift wraps (kind 1059).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GiftWrapPolicy {
    /// Only a connection authenticated (NIP-42) as a p-tagged recipient.
    RecipientOnly,
    /// Anyone.
    Open,
}

/// Switches for individual NIPs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NipConfig {
    /// Who may read gift wraps.
    pub gift_wrap_policy: GiftWrapPolicy,
    /// Seconds between sweeps that remove expired events (NIP-40).
    pub expiration_sweep_seconds: u64,
}

impl Default for NipConfig {
    fn default() -> Self {
        Self { gift_wrap_policy: GiftWrapPolicy::RecipientOnly, expiration_sweep_seconds: 60 }
    }
}

/// NIP-77 set reconciliation (`NEG-OPEN` / `NEG-MSG` / `NEG-CLOSE`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NegentropyConfig {
    /// Whether clients may reconcile; NIP-11 lists 77 only when they may.
    pub enabled: bool,
    /// The most events one session may reconcile over; a larger set is
    /// refused with `NEG-ERR "blocked: ..."` (the client narrows its filter).
    /// Also the most one client address may hold in all its sessions.
    pub max_records: usize,
    /// The most events all open sessions together may hold in memory
    /// (about 40 bytes each); beyond it a new session is refused with
    /// `rate-limited:` until others close.
    pub max_records_in_memory: usize,
    /// Bytes of one negentropy message the relay sends (before hex
    /// encoding; at least 4096, 0 for no limit).
    pub frame_size_limit: u64,
    /// Sessions one connection may have open at once.
    pub max_sessions_per_connection: usize,
    /// A session unused this long is closed (`NEG-ERR "closed: ..."`) and
    /// its records given back; checked at the connection's ping interval.
    pub idle_seconds: u64,
}

impl Default for NegentropyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_records: 1_000_000,
            max_records_in_memory: 2_000_000,
            frame_size_limit: 60_000,
            max_sessions_per_connection: 4,
            idle_seconds: 60,
        }
    }
}

/// Rate limits; 0 disables one. Each allows a burst of one minute's worth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// EVENT messages per minute from one IP address.
    pub events_per_minute_per_ip: u32,
    /// EVENT messages per minute signed by one public key.
    pub events_per_minute_per_pubkey: u32,
    /// REQ and COUNT messages per minute from one IP address.
    pub reqs_per_minute_per_ip: u32,
    /// REQ and COUNT messages per minute from one authenticated public key.
    pub reqs_per_minute_per_pubkey: u32,
    /// Extra limits for particular kinds.
    pub kinds: Vec<KindRateLimit>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            events_per_minute_per_ip: 6000,
            events_per_minute_per_pubkey: 3000,
            reqs_per_minute_per_ip: 6000,
            reqs_per_minute_per_pubkey: 6000,
            kinds: vec![],
        }
    }
}

/// A limit on events of one kind, counted per IP, per author, or per value of
/// a tag (e.g. kind 445 per `h` group id: group ids are public).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KindRateLimit {
    pub kind: u16,
    pub per_minute: u32,
    /// `ip`, `pubkey` or `tag:<letter>`.
    pub per: String,
}

/// Who may write. Empty allow lists allow everyone not denied.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLists {
    /// Only these authors (64-hex public keys) may publish, when non-empty.
    pub write_allow_pubkeys: Vec<String>,
    /// These authors may not publish.
    pub write_deny_pubkeys: Vec<String>,
    /// Only these addresses or networks (CIDR) may publish, when non-empty.
    pub write_allow_ips: Vec<ipnet::IpNet>,
    /// These addresses or networks may not publish.
    pub write_deny_ips: Vec<ipnet::IpNet>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve metrics at all.
    pub enabled: bool,
    /// HTTP path of the text exposition.
    pub path: String,
    /// When set, scrapes must send `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, path: "/metrics".into(), bearer_token: None }
    }
}

/// Where plugin metadata (the key-value store) lives.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetadataBackend {
    /// Embedded, in the data directory.
    #[default]
    Sled,
    /// Firestore (see `[firestore]`), shared by every replica.
    Firestore,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    pub backend: MetadataBackend,
}

/// The Firestore database used by the Firestore metadata backend and by
/// replication. Credentials come the usual Google way (application default
/// credentials, `GOOGLE_APPLICATION_CREDENTIALS`, the metadata server);
/// `FIRESTORE_EMULATOR_HOST` points at an emulator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FirestoreConfig {
    pub project_id: String,
    pub database_id: String,
    /// Prefix of every collection this relay uses (`<prefix>kv`, `<prefix>events`).
    pub collection_prefix: String,
}

impl Default for FirestoreConfig {
    fn default() -> Self {
        Self { project_id: String::new(), database_id: "(default)".into(), collection_prefix: "wasm_relay_".into() }
    }
}

/// Several replicas behaving as one relay: every stored event is also
/// written to Firestore, and each replica applies the others' events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Needs `metadata.backend = "firestore"`.
    pub enabled: bool,
    /// First delay before a replica reconnects its Firestore listener after
    /// an error (it doubles up to 10 s). The name is from when replicas polled.
    pub poll_interval_ms: u64,
    /// Longest a client event waits for its write to the shared log (retries
    /// included) before it is refused with `OK false "error: ..."`.
    pub publish_timeout_ms: u64,
    /// How often a replica reconciles its store with the shared log: it
    /// reads every log document changed in the last `reconcile_window_s`
    /// and applies whatever it lacks (0: never).
    pub reconcile_interval_s: u64,
    /// How far back a reconciliation looks (0: the whole log). Longer than
    /// the interval, so consecutive passes overlap.
    pub reconcile_window_s: u64,
    /// Where a new replica (one that has never followed the log) loads its
    /// store from before it starts: a replica's `wasm-relay export`, at an
    /// `http(s)://` URL, a `file://` URL or a path (empty: replay the log).
    pub snapshot_url: String,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            poll_interval_ms: 200,
            publish_timeout_ms: 5000,
            reconcile_interval_s: 3600,
            reconcile_window_s: 4500,
            snapshot_url: String::new(),
        }
    }
}

/// The NIP-86 management API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Public keys (64 hex) allowed to call the management API with NIP-98
    /// authorization. Empty: the API is off.
    pub pubkeys: Vec<String>,
    /// Largest request body read, in bytes. `swapplugin` carries a whole
    /// component: raise it for JavaScript or Python plugins (12-18 MB).
    pub max_body_bytes: usize,
    /// How long reading a request body may take, in seconds.
    pub body_timeout_seconds: u64,
    /// The operator socket (`<data_dir>/admin.sock`, mode 0600): the CLI's
    /// `export`, `import` and `sync` on a serving relay, and every
    /// management method, for whoever can open the file.
    pub socket: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { pubkeys: Vec::new(), max_body_bytes: 1024 * 1024, body_timeout_seconds: 10, socket: true }
    }
}

/// Settings shared by every plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginRuntimeConfig {
    /// Where compiled plugins are cached, keyed by content hash. Empty: a
    /// `plugin-cache` folder in the data directory.
    pub cache_dir: PathBuf,
    /// Watch plugin files and hot-swap a plugin when its file changes.
    pub watch: bool,
    /// Past this size, the cache drops its least recently used entries that
    /// no plugin loaded by this process uses.
    pub cache_max_bytes: u64,
}

/// What a plugin does when a REQ or COUNT call into it fails.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Refuse the request with `CLOSED "error: ..."`.
    Closed,
    /// Serve the request without this plugin's answer (its managed kinds stay hidden).
    Open,
}

/// One plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Name used in logs and as the plugin's key-value namespace (a-z, 0-9, -, _).
    pub name: String,
    /// The component file (`.wasm`).
    pub path: PathBuf,
    /// CPU time one call may take before it is stopped, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Memory one plugin instance may use, in bytes, all its linear memories
    /// together.
    #[serde(default = "default_memory_limit_bytes")]
    pub memory_limit_bytes: usize,
    /// Instances of this plugin that may exist at once (each runs one call).
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// How long a call waits for a free instance before it is refused with
    /// `rate-limited:`, in milliseconds.
    #[serde(default = "default_instance_wait_ms")]
    pub instance_wait_ms: u64,
    /// Keys the plugin may keep in its key-value namespace.
    #[serde(default = "default_kv_max_keys")]
    pub kv_max_keys: u64,
    /// Bytes (keys plus values) the plugin may keep in its key-value namespace.
    #[serde(default = "default_kv_max_bytes")]
    pub kv_max_bytes: u64,
    /// What a REQ/COUNT gets when this plugin fails.
    #[serde(default = "default_failure_policy")]
    pub on_req_failure: FailurePolicy,
    /// Consecutive failed calls, each from a different client (or from the
    /// relay's own `tick`), after which the plugin's circuit opens: it is not
    /// called for `circuit_open_seconds`, then one call probes it.
    #[serde(default = "default_max_consecutive_failures")]
    pub max_consecutive_failures: u32,
    /// How long an open circuit stays open before a probe call, in seconds.
    /// Doubles after each failed probe, up to 32 times this.
    #[serde(default = "default_circuit_open_seconds")]
    pub circuit_open_seconds: u64,
    /// Failed calls one client address may cause per minute before its
    /// requests to this plugin are refused with `rate-limited:` (a client's
    /// expensive requests cost that client, not everyone).
    #[serde(default = "default_client_failures_per_minute")]
    pub client_failures_per_minute: u32,
    /// Capabilities the operator grants this plugin (contract 0.2); a plugin
    /// gets what it asked for and was granted, nothing else.
    #[serde(default)]
    pub grants: PluginGrants,
    /// Timeout of each of the plugin's outbound HTTP requests, applied to
    /// connecting, to the first byte and between bytes, in milliseconds.
    #[serde(default = "default_http_timeout_ms")]
    pub http_timeout_ms: u64,
    /// Largest response body the plugin may read from an HTTP request.
    #[serde(default = "default_http_max_response_bytes")]
    pub http_max_response_bytes: usize,
    /// `on-stored` and `on-removed` notices that may wait for this plugin
    /// (contract 0.2); past this, new ones are dropped and counted
    /// (`wasm_relay_plugin_notices_dropped_total`) rather than slow the
    /// write path.
    #[serde(default = "default_notice_queue")]
    pub notice_queue: usize,
    /// Serve the kinds the plugin manages through the ordinary read paths
    /// instead of through the plugin (a rollback switch): the plugin keeps
    /// seeing events, so taking the kinds back finds its state as it was.
    #[serde(default)]
    pub release_managed_kinds: bool,
    /// Values for the settings the plugin declares in `info()`.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, SettingValue>,
}

/// What an operator grants one plugin (`grants = { ... }` in its entry).
/// Denied by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// Hosts the plugin may send HTTP(S) requests to, each `name` (ports 80
    /// and 443) or `name:port`.
    #[serde(default)]
    pub outbound_http: Vec<String>,
    /// The plugin may ask the relay to sign and publish events with its own
    /// key (`info.secret_key`).
    #[serde(default)]
    pub publish: bool,
}

/// A plugin setting: TOML strings, numbers and booleans are all accepted and
/// handed to the plugin as text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SettingValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for SettingValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingValue::Text(s) => f.write_str(s),
            SettingValue::Integer(i) => write!(f, "{i}"),
            SettingValue::Float(x) => write!(f, "{x}"),
            SettingValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

fn default_call_timeout_ms() -> u64 {
    50
}
fn default_memory_limit_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_instances() -> usize {
    16
}
fn default_instance_wait_ms() -> u64 {
    200
}
fn default_kv_max_keys() -> u64 {
    1_000_000
}
fn default_kv_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_http_timeout_ms() -> u64 {
    5000
}
fn default_http_max_response_bytes() -> usize {
    1024 * 1024
}
fn default_notice_queue() -> usize {
    8192
}
fn default_circuit_open_seconds() -> u64 {
    10
}
fn default_client_failures_per_minute() -> u32 {
    3
}
fn default_failure_policy() -> FailurePolicy {
    FailurePolicy::Closed
}
fn default_max_consecutive_failures() -> u32 {
    20
}

impl PluginConfig {
    /// A plugin with default limits, as `--plugin NAME=PATH` gives.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            call_timeout_ms: default_call_timeout_ms(),
            memory_limit_bytes: default_memory_limit_bytes(),
            max_instances: default_max_instances(),
            instance_wait_ms: default_instance_wait_ms(),
            kv_max_keys: default_kv_max_keys(),
            kv_max_bytes: default_kv_max_bytes(),
            on_req_failure: default_failure_policy(),
            max_consecutive_failures: default_max_consecutive_failures(),
            circuit_open_seconds: default_circuit_open_seconds(),
            client_failures_per_minute: default_client_failures_per_minute(),
            grants: PluginGrants::default(),
            http_timeout_ms: default_http_timeout_ms(),
            http_max_response_bytes: default_http_max_response_bytes(),
            notice_queue: default_notice_queue(),
            release_managed_kinds: false,
            settings: Default::default(),
        }
    }
}

impl Default for PluginRuntimeConfig {
    fn default() -> Self {
        Self { cache_dir: PathBuf::new(), watch: true, cache_max_bytes: 512 * 1024 * 1024 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the WebSocket and HTTP server listens on. Port 0 picks a free port.
    pub bind: SocketAddr,
    /// The URL clients use to reach this relay (NIP-42 `relay` tag, NIP-62,
    /// the NIP-11 page). Empty: `ws://` and the address the relay listens on.
    pub public_url: String,
    /// Header naming the client's address when the relay runs behind a
    /// proxy (Cloud Run, a load balancer): `x-forwarded-for`. Empty (the
    /// default): the socket's peer address; the header is ignored.
    pub client_address_header: String,
    /// Which entry of that comma-separated header is the client, counted
    /// from the right: 1 (the default) is the address the nearest proxy saw.
    pub client_address_hops: usize,
    /// Peers whose header is believed (CIDR networks). Empty (the default):
    /// every peer, for a relay reachable only through its proxy.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the embedded event store.
    pub data_dir: PathBuf,
    /// sled page cache in bytes. sled counts it loosely (by the bytes a page
    /// takes in its log, not in memory): each byte here costs the process
    /// about 1.5-2 bytes. The default keeps the relay under 500 MB during
    /// ingest at 1000 connections (40 MiB: under 420 MB, with slower reads
    /// and ingest once the store is many times the cache); a large store
    /// gains from more (`make bench ONLY=peer`/`scale`, README).
    pub cache_capacity_bytes: u64,
    /// Most events written (and flushed) together in one group commit.
    pub max_batch_events: usize,
}

/// Protocol limits; advertised through NIP-11.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client message (a WebSocket text frame) in bytes.
    pub max_message_length: usize,
    /// Open subscriptions per connection.
    pub max_subscriptions: usize,
    /// Filters in one REQ or COUNT.
    pub max_filters: usize,
    /// Ceiling applied to a filter's `limit`.
    pub max_limit: usize,
    /// `limit` used when a filter has none.
    pub default_limit: usize,
    /// Longest subscription id in characters.
    pub max_subid_length: usize,
    /// Values in one filter list (`ids`, `authors`, `kinds`, `#x`).
    pub max_filter_values: usize,
    /// Tags in one event.
    pub max_event_tags: usize,
    /// Event `content` length in bytes.
    pub max_content_length: usize,
    /// How far in the past `created_at` may be, in seconds (0: no limit).
    pub created_at_lower_limit: u64,
    /// How far in the future `created_at` may be, in seconds.
    pub created_at_upper_limit: u64,
    /// EVENTs one connection may have waiting for their `OK`; reading from the
    /// connection pauses beyond this.
    pub max_pending_events_per_connection: usize,
    /// Outgoing messages queued for one connection before it is considered too
    /// slow and closed with a NOTICE.
    pub send_queue_capacity: usize,
    /// Seconds a write to a client may stay blocked (the client is not
    /// reading) before the connection is closed.
    pub write_timeout_seconds: u64,
    /// Open WebSocket connections, all clients together (HTTP 503 beyond).
    pub max_connections: usize,
    /// Open WebSocket connections from one client address (an IPv4 address
    /// or an IPv6 /64).
    pub max_connections_per_ip: usize,
    /// Keys one connection may authenticate as with NIP-42.
    pub max_auth_identities: usize,
    /// Seconds without any frame from a client (pongs to the relay's pings
    /// count) before the connection is considered dead and closed.
    pub idle_timeout_seconds: u64,
    /// Seconds a new TCP connection has to send its HTTP request headers.
    pub handshake_timeout_seconds: u64,
}

/// NIP-11 relay information.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayInfo {
    pub name: String,
    pub description: String,
    /// Operator's hex public key, if any.
    pub pubkey: Option<String>,
    pub contact: Option<String>,
    /// The relay's own secret key (64 hex or `nsec`), with which it signs
    /// what plugins granted `publish` ask it to publish. Never serialized.
    #[serde(skip_serializing)]
    pub secret_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive, overridden by `RUST_LOG`.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:7777".parse().expect("static address"),
            public_url: String::new(),
            client_address_header: String::new(),
            client_address_hops: 1,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("./data"), cache_capacity_bytes: 64 * 1024 * 1024, max_batch_events: 1024 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_length: 256 * 1024,
            max_subscriptions: 50,
            max_filters: 20,
            max_limit: 5000,
            default_limit: 500,
            max_subid_length: 64,
            max_filter_values: 5000,
            max_event_tags: 2500,
            max_content_length: 256 * 1024,
            created_at_lower_limit: 3 * 365 * 24 * 3600,
            created_at_upper_limit: 15 * 60,
            max_pending_events_per_connection: 64,
            send_queue_capacity: 4096,
            write_timeout_seconds: 30,
            max_connections: 10_000,
            max_connections_per_ip: 500,
            max_auth_identities: 8,
            idle_timeout_seconds: 300,
            handshake_timeout_seconds: 10,
        }
    }
}

impl Default for RelayInfo {
    fn default() -> Self {
        Self {
            name: "wasm-relay".into(),
            description: "A Nostr relay extended by WebAssembly plugins".into(),
            pubkey: None,
            contact: None,
            secret_key: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: LogFormat::Text }
    }
}

impl Config {
    /// Defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, Env::prefixed(ENV_PREFIX))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Read it ourselves so a missing file is an error, not silently skipped.
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Unreadable { path: path.into(), source })?;
            figment = figment.merge(Toml::string(&text));
        }
        let env = env.map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            match ENV_ALIASES.iter().find(|(alias, _)| *alias == key) {
                Some((_, full)) => (*full).into(),
                None => key.replace("__", ".").into(),
            }
        });
        let config: Config = figment.merge(env).extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and plugin entries (also after command-line additions).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let fail = |m: &str| Err(ConfigError::OutOfRange(m.into()));
        if self.server.client_address_hops == 0 {
            return fail("server.client_address_hops must be at least 1 (1: the last entry of the header)");
        }
        if l.default_limit > l.max_limit {
            return fail("limits.default_limit must not exceed limits.max_limit");
        }
        if l.max_filter_values < 1000 {
            return fail("limits.max_filter_values must be at least 1000 (clients send long author lists)");
        }
        if l.max_message_length < 1024 {
            return fail("limits.max_message_length must be at least 1024 bytes");
        }
        if l.max_subscriptions == 0 || l.max_filters == 0 || l.max_subid_length == 0 {
            return fail("limits.max_subscriptions, max_filters and max_subid_length must be positive");
        }
        if l.max_connections == 0 || l.max_connections_per_ip == 0 || l.max_auth_identities == 0 {
            return fail("limits.max_connections, max_connections_per_ip and max_auth_identities must be positive");
        }
        if l.max_pending_events_per_connection == 0 || l.send_queue_capacity < 16 {
            return fail(
                "limits.max_pending_events_per_connection must be positive and send_queue_capacity at least 16",
            );
        }
        let n = &self.negentropy;
        if n.frame_size_limit != 0 && n.frame_size_limit < 4096 {
            return fail("negentropy.frame_size_limit must be 0 (no limit) or at least 4096");
        }
        if n.max_sessions_per_connection == 0 || n.max_records == 0 || n.max_records_in_memory < n.max_records {
            return fail(
                "negentropy.max_sessions_per_connection and max_records must be positive, \
                 and max_records_in_memory at least max_records",
            );
        }
        if self.metadata.backend == MetadataBackend::Firestore && self.firestore.project_id.is_empty() {
            return fail("metadata.backend = \"firestore\" needs firestore.project_id");
        }
        if self.replication.enabled && self.metadata.backend != MetadataBackend::Firestore {
            return fail(
                "replication.enabled needs metadata.backend = \"firestore\" (replicas share state through it)",
            );
        }
        if self.replication.poll_interval_ms == 0 {
            return fail("replication.poll_interval_ms must be positive");
        }
        if self.replication.publish_timeout_ms == 0 {
            return fail("replication.publish_timeout_ms must be positive");
        }
        if !self.metrics.path.starts_with('/') || ["/", "/health", "/ready"].contains(&self.metrics.path.as_str()) {
            return fail("metrics.path must start with / and differ from /, /health and /ready");
        }
        if let Some(bad) = self.admin.pubkeys.iter().find(|k| k.len() != 64 || hex::decode(k).is_err()) {
            return Err(ConfigError::OutOfRange(format!("admin.pubkeys: '{bad}' is not a 64-hex public key")));
        }
        if l.write_timeout_seconds == 0 || l.idle_timeout_seconds < 2 || l.handshake_timeout_seconds == 0 {
            return fail(
                "limits.write_timeout_seconds and handshake_timeout_seconds must be positive, idle_timeout_seconds at least 2",
            );
        }
        if self.storage.max_batch_events == 0 {
            return fail("storage.max_batch_events must be positive");
        }
        for k in &self.rate_limits.kinds {
            let ok = k.per == "ip" || k.per == "pubkey" || k.per.strip_prefix("tag:").is_some_and(|l| l.len() == 1);
            if !ok || k.per_minute == 0 {
                return fail(
                    "rate_limits.kinds: `per` must be \"ip\", \"pubkey\" or \"tag:<letter>\" and per_minute positive",
                );
            }
        }
        for pk in self.access.write_allow_pubkeys.iter().chain(&self.access.write_deny_pubkeys) {
            if !crate::filter::is_hex64(pk) {
                return Err(ConfigError::OutOfRange(format!(
                    "access: \"{pk}\" is not a 64-character lowercase hex public key"
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.plugins {
            validate_plugin_name(&p.name).map_err(|e| ConfigError::OutOfRange(format!("plugins.name: {e}")))?;
            if !names.insert(p.name.as_str()) {
                return Err(ConfigError::OutOfRange(format!("plugins: the name '{}' is used twice", p.name)));
            }
            if p.call_timeout_ms == 0
                || p.memory_limit_bytes < 1024 * 1024
                || p.max_consecutive_failures == 0
                || p.max_instances == 0
                || p.circuit_open_seconds == 0
                || p.client_failures_per_minute == 0
            {
                return Err(ConfigError::OutOfRange(format!(
                    "plugin '{}': call_timeout_ms, max_instances, max_consecutive_failures, circuit_open_seconds and \
                     client_failures_per_minute must be positive, memory_limit_bytes at least 1 MiB",
                    p.name
                )));
            }
        }
        Ok(())
    }
}

/// What plugin names may be: each names the plugin's key-value namespace
/// (sled tree, Firestore document prefix) as well.
pub(crate) fn validate_plugin_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(format!("'{name}' is not a valid name (1-64 characters of a-z, 0-9, '-', '_')")) }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's test jail returns its own error type
mod tests {
    use super::*;

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay.example.toml")
    }

    #[test]
    fn example_file_documents_exactly_the_defaults() {
        let from_file = Config::load_with_env(Some(&example_path()), Env::prefixed("WASM_RELAY_TEST_NONE_")).unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn example_file_lists_every_key() {
        let example: toml::Table = std::fs::read_to_string(example_path()).unwrap().parse().unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        fn keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                let name = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(inner) => keys(inner, &format!("{name}."), out),
                    _ => out.push(name),
                }
            }
        }
        let (mut a, mut b) = (vec![], vec![]);
        keys(&example, "", &mut a);
        keys(&defaults, "", &mut b);
        // The example shows `[[plugins]]` and `[[rate_limits.kinds]]` commented
        // out; the defaults are empty lists.
        b.retain(|k| k != "plugins" && k != "rate_limits.kinds");
        // Optional keys (None) serialize to nothing; the example shows them commented out.
        a.sort();
        b.sort();
        assert_eq!(a, b, "relay.example.toml and Config::default() list different keys");
    }

    #[test]
    fn operator_guide_documents_every_key() {
        let guide =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md")).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut missing = vec![];
        for (section, table) in &defaults {
            let Some(table) = table.as_table() else { continue };
            for key in table.keys() {
                if !guide.contains(&format!("| `{section}.{key}` |")) {
                    missing.push(format!("{section}.{key}"));
                }
            }
        }
        assert!(missing.is_empty(), "docs/operator-guide.md does not document: {missing:?}");
    }

    #[test]
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                "[server]\nbind = \"127.0.0.1:9000\"\n[limits]\nmax_limit = 100\ndefault_limit = 50\n",
            )?;
            jail.set_env("WASM_RELAY_BIND", "127.0.0.1:9001");
            jail.set_env("WASM_RELAY_DATA_DIR", "/tmp/relay-data");
            jail.set_env("WASM_RELAY_LIMITS__DEFAULT_LIMIT", "10");
            let c = Config::load(Some(Path::new("relay.toml"))).unwrap();
            assert_eq!(c.server.bind.port(), 9001);
            assert_eq!(c.storage.data_dir, PathBuf::from("/tmp/relay-data"));
            assert_eq!(c.limits.max_limit, 100);
            assert_eq!(c.limits.default_limit, 10);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[limits]\nmax_limt = 3\n")?;
            let e = Config::load(Some(Path::new("a.toml"))).unwrap_err().to_string();
            assert!(e.contains("max_limt"), "{e}");
            jail.create_file("b.toml", "[limits]\ndefault_limit = 9000\n")?;
            let e = Config::load(Some(Path::new("b.toml"))).unwrap_err().to_string();
            assert!(e.contains("default_limit"), "{e}");
            let e = Config::load(Some(Path::new("missing.toml"))).unwrap_err().to_string();
            assert!(e.contains("missing.toml"), "{e}");
            Ok(())
        });
    }
}
