//! The wasmtime side: one engine with an epoch ticker, compiling components
//! (cached on disk by content hash), checking their WIT version, and a pool
//! of ready instances per loaded plugin version so calls never queue behind
//! one lock.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use super::bindings::{PluginExports, PluginExportsPre, SUPPORTED_WIT_VERSIONS, WIT_PACKAGE, types as wit};
use super::imports::{
    CpuMeter, HostReadFailed, InstanceLimits, MemoryCapReached, PluginContext, PluginCounters, PluginState,
};
use crate::config::PluginConfig;
use crate::metadata::MetadataStore;
use crate::store::EventStore;

/// How often a running call checks its CPU budget and yields its worker.
const EPOCH_TICK: Duration = Duration::from_millis(2);
/// Longest a call may take in wall-clock time, waits in host imports included.
const MAX_CALL_WALL_TIME: Duration = Duration::from_secs(10);
/// Most host-side handles (streams, `wasi:http` header maps and bodies) one
/// instance may hold at once. They live in host memory, outside the
/// instance's memory cap, and an instance keeps them across calls; a plugin
/// uses a handful (wasmtime's default allows a million).
const MAX_HANDLES_PER_INSTANCE: usize = 4096;

/// Why loading a component failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The reason is part of the message, not a chained source, so error
    /// chains print it once.
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: std::io::Error },
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("{0}")]
    WitVersion(String),
    #[error("the component does not fit this host's plugin contract: {0}")]
    Link(String),
    #[error("info() failed: {0}")]
    Info(CallFailure),
    #[error("{0}")]
    Invalid(String),
}

/// Why one call into a plugin failed. The instance it ran on is discarded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallFailure {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("ran out of its {0}-byte memory limit")]
    OutOfMemory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// Every instance the plugin may have is busy: the call never started.
    /// This is load, not a fault of the plugin.
    #[error("is busy: {0} calls are already running")]
    Busy(usize),
    /// A read the plugin made through the host failed (see
    /// [`HostReadFailed`]); the call was abandoned. The relay's fault, not
    /// the plugin's.
    #[error("was stopped because the relay could not read its events ({0})")]
    HostUnavailable(String),
}

impl CallFailure {
    /// A few words for clients: what kind of failure, nothing internal
    /// (no trap text, backtrace or path; those go to the log).
    pub fn summary(&self) -> &'static str {
        match self {
            CallFailure::Timeout(_) => "timed out",
            CallFailure::OutOfMemory(_) => "ran out of memory",
            CallFailure::Trap(_) => "trapped",
            CallFailure::Instantiate(_) => "could not start",
            CallFailure::Busy(_) => "busy",
            CallFailure::HostUnavailable(_) => "could not read the relay's events",
        }
    }

    /// Whether the failure says something about the plugin's health (and so
    /// counts toward its circuit breaker). Being busy, or the relay
    /// failing a read, does not.
    pub fn is_fault(&self) -> bool {
        !matches!(self, CallFailure::Busy(_) | CallFailure::HostUnavailable(_))
    }
}

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: PathBuf,
    /// The cache's size cap (see [`prune_cache`]).
    pub cache_max_bytes: u64,
    /// Cache entries of components this process has loaded: never pruned.
    cache_in_use: Arc<Mutex<std::collections::HashSet<PathBuf>>>,
    /// Where `events.get-event` looks for events not (yet) in the local store.
    pub(crate) missing_events: Arc<OnceLock<Arc<dyn super::EventSource>>>,
    /// Where `host.publish` goes (set once the relay is assembled).
    pub(crate) publisher: Arc<OnceLock<Arc<dyn super::Publisher>>>,
}

impl PluginRuntime {
    pub fn new(cache_dir: PathBuf) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // The contract (WIT 0.1.0 and 0.2.0) has no async functions, streams or
        // futures. Without the component-model-async machinery each call
        // takes the plain fiber path, which is cheaper per call.
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let ticker = engine.weak();
        std::thread::Builder::new().name("plugin-epoch".into()).spawn(move || {
            while let Some(engine) = ticker.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // What JS and Python toolchains import; requests are denied.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        super::bindings::add_to_linker(&mut linker)?;
        Ok(Self {
            engine,
            linker,
            cache_dir,
            cache_max_bytes: u64::MAX,
            cache_in_use: Default::default(),
            missing_events: Arc::new(OnceLock::new()),
            publisher: Arc::new(OnceLock::new()),
        })
    }

    /// The WIT version of `nostr-relay:plugin` the component exports, checked.
    fn wit_version(&self, component: &Component) -> Result<String, LoadError> {
        let ty = component.component_type();
        let prefix = format!("{WIT_PACKAGE}/plugin@");
        let found: Vec<String> =
            ty.exports(&self.engine).filter_map(|(name, _)| name.strip_prefix(&prefix).map(str::to_owned)).collect();
        let Some(version) = found.first() else {
            return Err(LoadError::WitVersion(format!(
                "the component does not export {WIT_PACKAGE}/plugin; build it against wit/{} of this repository",
                SUPPORTED_WIT_VERSIONS.join(" or wit/")
            )));
        };
        if !SUPPORTED_WIT_VERSIONS.contains(&version.as_str()) {
            return Err(LoadError::WitVersion(format!(
                "the component targets {WIT_PACKAGE}@{version}; this relay supports {}",
                SUPPORTED_WIT_VERSIONS.iter().map(|v| format!("@{v}")).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(version.clone())
    }

    /// Loads the plugin at `config.path`: compile, check the WIT version,
    /// instantiate once, ask `info()`, and check the settings.
    pub async fn load(
        &self,
        config: &PluginConfig,
        metadata: Arc<dyn MetadataStore>,
        events: Arc<dyn EventStore>,
        counters: Arc<PluginCounters>,
    ) -> Result<LoadedPlugin, LoadError> {
        let bytes = tokio::fs::read(&config.path)
            .await
            .map_err(|reason| LoadError::Read { path: config.path.clone(), reason })?;
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::Compile(format!(
                "{} is not a WebAssembly binary (it lacks the \\0asm header)",
                config.path.display()
            )));
        }
        // A core module's version field is 1; a component's is 0x0d (layer 1).
        if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
            return Err(LoadError::Compile(format!(
                "{} is a core WebAssembly module, not a component: build for the wasm32-wasip2 target \
                 (`cargo build --release --target wasm32-wasip2`), or wrap a core module with \
                 `wasm-tools component new`",
                config.path.display()
            )));
        }
        let hash = hex::encode(Sha256::digest(&bytes));
        let component = {
            let (hash, engine, cache_dir) = (hash.clone(), self.engine.clone(), self.cache_dir.clone());
            // Compiling takes milliseconds to seconds: keep it off the async workers.
            let (in_use, max_bytes) = (self.cache_in_use.clone(), self.cache_max_bytes);
            tokio::task::spawn_blocking(move || {
                let (component, entry) = compile(&engine, &cache_dir, &bytes, &hash)?;
                let keep = {
                    let mut in_use = in_use.lock().unwrap_or_else(|p| p.into_inner());
                    in_use.insert(entry);
                    in_use.clone()
                };
                prune_cache(&cache_dir, max_bytes, &keep);
                Ok::<_, LoadError>(component)
            })
            .await
            .map_err(|e| LoadError::Compile(e.to_string()))??
        };
        let wit_version = self.wit_version(&component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let pre = PluginExportsPre::new(&wit_version, pre).map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let ctx = Arc::new(PluginContext {
            name: config.name.clone(),
            metadata,
            events,
            settings: config.settings.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
            defaults: OnceLock::new(),
            counters,
            missing_events: self.missing_events.clone(),
            publisher: self.publisher.clone(),
            may_publish: OnceLock::new(),
            output: super::guest_output::LogBudget::new(&config.name),
            outbound: Arc::new(super::outgoing_http::OutboundPolicy::new(
                &config.name,
                Duration::from_millis(config.http_timeout_ms),
                config.http_max_response_bytes,
            )),
        });
        let limits = CallLimits {
            timeout_ms: config.call_timeout_ms,
            memory_bytes: config.memory_limit_bytes,
            instance_wait: Duration::from_millis(config.instance_wait_ms),
        };
        let mut loaded = LoadedPlugin {
            info: empty_info(),
            wit_version,
            granted_hosts: Vec::new(),
            publish_granted: false,
            hash,
            pre,
            ctx,
            limits,
            engine: self.engine.clone(),
            idle: Mutex::new(Vec::new()),
            live: Arc::new(tokio::sync::Semaphore::new(config.max_instances)),
            max_instances: config.max_instances,
        };
        // `info()` may take longer than a normal call (it runs once).
        let info = loaded
            .call_with_budget(loaded.limits.budget() * 10, |p, s| Box::pin(p.call_info(s)))
            .await
            .map_err(LoadError::Info)?;
        validate_info(&info, config)?;
        let granted = granted_hosts(&info, config);
        loaded.ctx.outbound.allow(granted.clone());
        loaded.granted_hosts = granted;
        let asks_publish = info.capabilities.iter().any(|c| matches!(c, wit::Capability::Publish));
        if asks_publish != config.grants.publish {
            tracing::warn!(
                plugin = %config.name,
                asked = asks_publish,
                granted = config.grants.publish,
                "the plugin's publish capability and its grant differ; it may publish only when both say so"
            );
        }
        let _ = loaded.ctx.may_publish.set(asks_publish && config.grants.publish);
        loaded.publish_granted = asks_publish && config.grants.publish;
        let defaults: HashMap<String, String> =
            info.settings.iter().map(|s| (s.name.clone(), s.default_value.clone())).collect();
        let _ = loaded.ctx.defaults.set(defaults);
        loaded.info = info;
        Ok(loaded)
    }
}

/// Compiles the component in `bytes`, or loads it from the cache folder where
/// an earlier compilation for this engine configuration left it; returns it
/// with its cache entry (whose modification time says when it was last used).
fn compile(engine: &Engine, cache_dir: &Path, bytes: &[u8], hash: &str) -> Result<(Component, PathBuf), LoadError> {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let cached = cache_dir.join(format!("{hash}-{:016x}.cwasm", compat.finish()));
    if cached.exists() {
        // SAFETY: the cache folder holds only what this function wrote, for
        // this engine configuration (the file name carries its hash).
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(c) => {
                let touched = std::fs::File::options()
                    .write(true)
                    .open(&cached)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                if let Err(e) = touched {
                    tracing::debug!(file = %cached.display(), error = %e, "cannot mark a cached plugin as used");
                }
                return Ok((c, cached));
            }
            Err(e) => tracing::warn!(file = %cached.display(), error = %e, "ignoring unusable cached plugin"),
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    if let Ok(serialized) = component.serialize() {
        // Write then rename, so concurrent relays never read a half-written file.
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(cache_dir)
            .and_then(|_| std::fs::write(&tmp, serialized))
            .and_then(|_| std::fs::rename(&tmp, &cached));
        if let Err(e) = written {
            tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot cache compiled plugin");
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((component, cached))
}

/// Keeps the cache folder at `max_bytes` or less: removes compiled entries
/// (`.cwasm`), least recently used first, except those in `keep`. Errors are
/// logged; a cache that cannot be pruned only costs disk.
fn prune_cache(cache_dir: &Path, max_bytes: u64, keep: &std::collections::HashSet<PathBuf>) {
    let Ok(dir) = std::fs::read_dir(cache_dir) else { return };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = dir
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    entries.sort();
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if keep.contains(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                tracing::info!(file = %path.display(), bytes = len, "dropped an unused compiled plugin from the cache");
            }
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot drop a cached plugin"),
        }
    }
}

fn empty_info() -> wit::PluginInfo {
    wit::PluginInfo {
        name: String::new(),
        version: String::new(),
        managed_kinds: vec![],
        event_kinds: None,
        req_kinds: None,
        tick_interval_seconds: None,
        settings: vec![],
        hooks: vec![],
        capabilities: vec![],
        relay_info: wit::Nip11Contribution { supported_nips: vec![], fields: vec![] },
    }
}

/// Hosts `info` asks to reach that `config` grants: the plugin's HTTP
/// allow-list. What was asked and not granted, or granted and not asked, is
/// logged: the first is a request that will be denied, the second a grant
/// that does nothing.
fn granted_hosts(info: &wit::PluginInfo, config: &PluginConfig) -> Vec<String> {
    let asked: Vec<String> = asked_hosts(info).into_iter().map(|h| h.to_ascii_lowercase()).collect();
    let granted: Vec<String> = config.grants.outbound_http.iter().map(|h| h.to_ascii_lowercase()).collect();
    let allowed: Vec<String> = asked.iter().filter(|h| granted.contains(h)).cloned().collect();
    let denied: Vec<&String> = asked.iter().filter(|h| !granted.contains(h)).collect();
    if !denied.is_empty() {
        tracing::warn!(
            plugin = %config.name,
            hosts = ?denied,
            "the plugin asks for outbound HTTP to hosts its grants do not name; requests to them are denied"
        );
    }
    let unused: Vec<&String> = granted.iter().filter(|h| !asked.contains(h)).collect();
    if !unused.is_empty() {
        tracing::warn!(plugin = %config.name, hosts = ?unused, "granted outbound HTTP hosts the plugin does not ask for");
    }
    allowed
}

/// The hosts a plugin asks to reach over HTTP.
pub fn asked_hosts(info: &wit::PluginInfo) -> Vec<String> {
    info.capabilities
        .iter()
        .flat_map(|c| match c {
            wit::Capability::OutboundHttp(hosts) => hosts.clone(),
            wit::Capability::Publish => Vec::new(),
        })
        .collect()
}

fn validate_info(info: &wit::PluginInfo, config: &PluginConfig) -> Result<(), LoadError> {
    let declared: Vec<&str> = info.settings.iter().map(|s| s.name.as_str()).collect();
    let unknown: Vec<&str> = config.settings.keys().map(String::as_str).filter(|k| !declared.contains(k)).collect();
    if !unknown.is_empty() {
        return Err(LoadError::Invalid(format!(
            "plugin '{}' does not declare the setting(s) {}; it declares: {}",
            config.name,
            unknown.join(", "),
            if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
        )));
    }
    // The part of contract 0.2 this relay does not provide yet: refused by
    // name rather than accepted and never honoured.
    if info.tick_interval_seconds == Some(0) {
        return Err(LoadError::Invalid("tick-interval-seconds must be at least 1".into()));
    }
    if !info.name.is_empty() && info.name != config.name {
        // Logs, metrics and the management API use the configured name.
        tracing::warn!(
            plugin = %config.name,
            calls_itself = %info.name,
            "the plugin is configured under another name than its info() gives"
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// CPU time one call may use, in milliseconds.
    pub timeout_ms: u64,
    /// Memory one instance may use, all its linear memories together.
    pub memory_bytes: usize,
    /// How long a call waits for an instance when all are busy.
    pub instance_wait: Duration,
}

struct Instance {
    store: Store<PluginState>,
    bindings: PluginExports,
}

/// One version of one plugin, ready to call.
pub struct LoadedPlugin {
    pub info: wit::PluginInfo,
    pub wit_version: String,
    /// Hosts it may reach over HTTP: asked for and granted.
    pub granted_hosts: Vec<String>,
    /// It may publish with the relay's key: asked for and granted.
    pub publish_granted: bool,
    /// sha256 of the component file.
    pub hash: String,
    pre: PluginExportsPre,
    ctx: Arc<PluginContext>,
    limits: CallLimits,
    engine: Engine,
    idle: Mutex<Vec<Instance>>,
    /// One permit per instance that may exist at once (idle or running), so
    /// a burst of calls cannot multiply the plugin's memory without bound.
    live: Arc<tokio::sync::Semaphore>,
    max_instances: usize,
}

pub type CallFuture<'a, R> = std::pin::Pin<Box<dyn std::future::Future<Output = wasmtime::Result<R>> + Send + 'a>>;

impl CallLimits {
    fn budget(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl LoadedPlugin {
    async fn instantiate(&self) -> Result<Instance, CallFailure> {
        let state = PluginState {
            // No preopened directories, no network, no environment; stdout
            // and stderr go to the relay's log.
            wasi: {
                use super::guest_output::{GuestOutput, Stream};
                let output = &self.ctx.output;
                WasiCtxBuilder::new()
                    .stdout(GuestOutput::new(output.clone(), Stream::Stdout))
                    .stderr(GuestOutput::new(output.clone(), Stream::Stderr))
                    .build()
            },
            http: super::outgoing_http::http_ctx(),
            http_hooks: super::outgoing_http::OutgoingRequests { policy: self.ctx.outbound.clone() },
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_HANDLES_PER_INSTANCE);
                table
            },
            limits: InstanceLimits::new(self.limits.memory_bytes),
            ctx: self.ctx.clone(),
            meter: Arc::new(CpuMeter::default()),
            budget: self.limits.budget(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // The budget is the call's own CPU time (see `CpuMeter`). Between
        // checks the guest yields, so it never hogs a worker.
        store.epoch_deadline_callback(|ctx| {
            if ctx.data().budget_spent() {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                Ok(wasmtime::UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let bindings =
            self.pre.instantiate_async(&mut store).await.map_err(|e| self.classify(e, self.limits.budget()))?;
        Ok(Instance { store, bindings })
    }

    fn checkout(&self) -> Option<Instance> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn checkin(&self, instance: Instance) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_instances {
            idle.push(instance);
        }
    }

    /// What a failed call's error means; `budget` is the CPU time it had.
    fn classify(&self, e: wasmtime::Error, budget: Duration) -> CallFailure {
        if e.chain().any(|c| c.downcast_ref::<MemoryCapReached>().is_some()) {
            return CallFailure::OutOfMemory(self.limits.memory_bytes);
        }
        if let Some(failed) = e.chain().find_map(|c| c.downcast_ref::<HostReadFailed>()) {
            return CallFailure::HostUnavailable(failed.0.clone());
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallFailure::Timeout(budget.as_millis() as u64),
            Some(trap) => CallFailure::Trap(format!("{trap}: {}", root_message(&e))),
            None => CallFailure::Trap(format!("{e:#}")),
        }
    }

    /// Runs `f` on a pooled instance with the plugin's deadline. A failed
    /// instance is dropped, never reused.
    pub async fn call<R, F>(&self, f: F) -> Result<R, CallFailure>
    where
        F: for<'a> FnOnce(&'a PluginExports, &'a mut Store<PluginState>) -> CallFuture<'a, R>,
    {
        self.call_with_budget(self.limits.budget(), f).await
    }

    /// [`Self::call`] with `factor` times the plugin's CPU budget (a call
    /// that carries a batch).
    pub async fn call_scaled<R, F>(&self, factor: u32, f: F) -> Result<R, CallFailure>
    where
        F: for<'a> FnOnce(&'a PluginExports, &'a mut Store<PluginState>) -> CallFuture<'a, R>,
    {
        self.call_with_budget(self.limits.budget() * factor.max(1), f).await
    }

    async fn call_with_budget<R, F>(&self, budget: Duration, f: F) -> Result<R, CallFailure>
    where
        F: for<'a> FnOnce(&'a PluginExports, &'a mut Store<PluginState>) -> CallFuture<'a, R>,
    {
        // Past the cap, a call waits briefly for a running one to finish,
        // then is refused as busy rather than queueing without bound.
        let permit = match tokio::time::timeout(self.limits.instance_wait, self.live.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(CallFailure::Busy(self.max_instances)),
        };
        let mut instance = match self.checkout() {
            Some(i) => i,
            None => self.instantiate().await?,
        };
        instance.store.data_mut().start_call(budget);
        instance.store.set_epoch_deadline(1);
        let wall_limit = MAX_CALL_WALL_TIME.max(budget * 2);
        let meter = instance.store.data().meter.clone();
        let result = {
            let Instance { store, bindings } = &mut instance;
            let mut call = f(bindings, store);
            let metered = std::future::poll_fn(|cx| meter.poll(&mut call, cx));
            match tokio::time::timeout(wall_limit, metered).await {
                Ok(r) => r,
                // A host import that never returns: give up on the instance.
                Err(_) => return Err(CallFailure::Timeout(wall_limit.as_millis() as u64)),
            }
        };
        let outcome = match result {
            Ok(value) => {
                self.checkin(instance);
                Ok(value)
            }
            Err(e) => Err(self.classify(e, budget)),
        };
        drop(permit);
        outcome
    }

    /// The plugin's key-value namespace and log name.
    pub fn name(&self) -> &str {
        &self.ctx.name
    }
}

fn root_message(e: &wasmtime::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

/// The default compiled-plugin cache folder for a data directory.
pub fn default_cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("plugin-cache")
}
