//! The running relay's shared state and its start-up: opens the store, starts
//! the writer, binds the listener and serves until shut down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use anyhow::Context;

use crate::config::MetadataBackend;
use crate::config::{Config, GiftWrapPolicy};
use crate::fanout::{ConnId, Fanout};
use crate::ingest::Ingest;
use crate::metadata::{FirestoreMetadataStore, MetadataStore, SledMetadataStore};
use crate::metrics::Metrics;
use crate::plugin::PluginHost;
use crate::policy::Policy;
use crate::refusal::Refusal;
use crate::replication::Replicator;
use crate::store::{EventStore, SledEventStore};

/// Everything a connection needs, shared by all of them.
pub struct Relay {
    pub config: Config,
    pub store: Arc<dyn EventStore>,
    pub fanout: Arc<Fanout>,
    pub ingest: Ingest,
    pub plugins: Arc<PluginHost>,
    pub policy: Policy,
    /// The plugins' key-value store, also holding the operator's lists.
    pub metadata: Arc<dyn MetadataStore>,
    pub metrics: Arc<Metrics>,
    /// Set when replicas share events through Firestore.
    pub replicator: Option<Arc<Replicator>>,
    /// The Firestore connection, when the metadata store or replication uses it.
    pub firestore: Option<crate::firestore::Firestore>,
    /// Turns true when the relay starts shutting down; connections say
    /// goodbye and close.
    pub shutdown: watch::Sender<bool>,
    /// Turns for large store reads (streamed REQs, COUNTs) on the blocking
    /// pool: twice the cores, so a burst of them cannot starve the async
    /// workers.
    pub heavy_reads: Arc<tokio::sync::Semaphore>,
    /// Open connections, per client and in total.
    pub connections: crate::capacity::ConnectionCounter,
    /// NIP-98 events already used on the management API.
    pub admin_replays: crate::auth::SpentAuthEvents,
    /// The last `/ready` probe of the metadata store and when it ran: a
    /// probe of a shared (billed) store is reused for a while.
    pub metadata_probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// Records all open NIP-77 sessions hold.
    pub negentropy_budget: Arc<crate::negentropy::RecordBudget>,
    next_connection: AtomicU64,
}

/// `host.publish`: events signed with the relay's own key for a plugin
/// granted `publish`, through the same checks as a client's event (the
/// operator's rules, every plugin's `on-event`) and the same writer.
struct RelayPublisher {
    relay: std::sync::Weak<Relay>,
    keys: nostr::key::Keys,
}

#[async_trait::async_trait]
impl crate::plugin::Publisher for RelayPublisher {
    async fn publish(
        &self,
        kind: u16,
        tags: Vec<Vec<String>>,
        content: String,
    ) -> Result<String, crate::plugin::PublishError> {
        use crate::plugin::PublishError;
        use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
        let refused = |refusal: Refusal| PublishError::Refused(refusal);
        let Some(relay) = self.relay.upgrade() else {
            return Err(refused(Refusal::error("the relay is shutting down")));
        };
        let tags: Vec<Tag> = tags
            .into_iter()
            .map(|t| Tag::parse(t).map_err(|e| refused(Refusal::invalid(format!("bad tag: {e}")))))
            .collect::<Result<_, _>>()?;
        let event = EventBuilder::new(Kind::from(kind), content)
            .tags(tags)
            .finalize(&self.keys)
            .map_err(|e| refused(Refusal::error(format!("signing failed: {e}"))))?;
        let id = event.id.to_hex();
        let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        relay.policy.check_write(loopback, &event).map_err(refused)?;
        relay.plugins.on_event(&crate::plugin::Caller::relay(), &event).await.map_err(refused)?;
        let accepted = Arc::new(crate::event::AcceptedEvent::new(event));
        if crate::event::kind_class(kind) == crate::event::KindClass::Ephemeral {
            relay.fanout.broadcast(0, &accepted);
            return Ok(id);
        }
        let written = relay.ingest.submit(accepted).await.await;
        match written {
            Ok(Ok(crate::store::WriteOutcome::Stored | crate::store::WriteOutcome::Duplicate)) => Ok(id),
            Ok(Ok(outcome)) => Err(refused(Refusal::blocked(format!("not stored: {outcome:?}")))),
            Ok(Err(e)) => Err(refused(Refusal::error(format!("storage failed: {e}")))),
            Err(_) => Err(refused(Refusal::error("the event writer stopped"))),
        }
    }
}

impl Relay {
    /// Opens the stores, loads the plugins and starts the writer.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Self>> {
        let relay_keys = match &config.info.secret_key {
            Some(secret) => Some(
                nostr::key::Keys::parse(secret.trim())
                    .map_err(|e| anyhow::anyhow!("info.secret_key is not a secret key (64 hex or nsec): {e}"))?,
            ),
            None => None,
        };
        let data_dir = &config.storage.data_dir;
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let store: Arc<dyn EventStore> = Arc::new(
            SledEventStore::open(data_dir, config.storage.cache_capacity_bytes).context("opening the event store")?,
        );
        let firestore = match (config.metadata.backend, config.replication.enabled) {
            (MetadataBackend::Firestore, _) | (_, true) => {
                Some(crate::firestore::Firestore::connect(&config.firestore).await.context("connecting to Firestore")?)
            }
            _ => None,
        };
        let metadata: Arc<dyn MetadataStore> = match (&firestore, config.metadata.backend) {
            (Some(fs), MetadataBackend::Firestore) => Arc::new(FirestoreMetadataStore::new(fs.clone())),
            _ => Arc::new(SledMetadataStore::open(data_dir).context("opening the metadata store")?),
        };
        let replicator = match (&firestore, config.replication.enabled) {
            (Some(fs), true) => {
                Some(Replicator::new(fs.clone(), config.server.public_url.clone(), data_dir, &config.replication))
            }
            _ => None,
        };
        let metrics = Arc::new(Metrics::new());
        let fanout = Arc::new(Fanout::new(config.nips.gift_wrap_policy == GiftWrapPolicy::RecipientOnly));
        let cache_dir = if config.plugin_runtime.cache_dir.as_os_str().is_empty() {
            crate::plugin::runtime::default_cache_dir(data_dir)
        } else {
            config.plugin_runtime.cache_dir.clone()
        };
        let plugins = PluginHost::start(crate::plugin::PluginHostSetup {
            configs: &config.plugins,
            cache_dir,
            cache_max_bytes: config.plugin_runtime.cache_max_bytes,
            metadata: metadata.clone(),
            events: store.clone(),
            fanout: fanout.clone(),
            max_results: config.limits.max_limit,
            metrics: metrics.clone(),
        })
        .await?;
        if config.plugin_runtime.watch && !plugins.is_empty() {
            plugins.watch_files().context("watching plugin files")?;
        }
        // With a shared metadata store, plugin housekeeping runs on one
        // replica at a time.
        let shared_ticks = (config.metadata.backend == MetadataBackend::Firestore)
            .then(|| (metadata.clone(), hex::encode(rand::random::<[u8; 8]>())));
        plugins.start_ticks(shared_ticks);
        let ingest = Ingest::start(
            store.clone(),
            fanout.clone(),
            config.storage.max_batch_events,
            metrics.clone(),
            replicator.clone().map(|r| r as Arc<dyn crate::ingest::SharedLog>),
        )?;
        let policy = Policy::new(&config.rate_limits, &config.access);
        let lists = crate::operator_lists::load(metadata.as_ref()).await.context("loading the operator's lists")?;
        policy.update_operator_lists(|l| *l = lists);
        let connections = crate::capacity::ConnectionCounter::new(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        );
        let negentropy_budget = crate::negentropy::RecordBudget::new(
            config.negentropy.max_records_in_memory,
            config.negentropy.max_records,
        );
        let relay = Arc::new(Self {
            config,
            store,
            fanout,
            ingest,
            plugins,
            policy,
            metadata,
            metrics,
            replicator,
            firestore: firestore.clone(),
            shutdown: watch::Sender::new(false),
            heavy_reads: Arc::new(tokio::sync::Semaphore::new(
                2 * std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            )),
            connections,
            admin_replays: Default::default(),
            metadata_probe: Default::default(),
            negentropy_budget,
            next_connection: AtomicU64::new(1),
        });
        relay.start_housekeeping();
        if let Some(keys) = relay_keys {
            relay.plugins.set_publisher(Arc::new(RelayPublisher { relay: Arc::downgrade(&relay), keys }));
        }
        if let Some(replicator) = &relay.replicator {
            let source = CheckedSource { replicator: replicator.clone(), relay: Arc::downgrade(&relay) };
            relay.plugins.set_missing_event_source(Arc::new(source));
            let checks = Arc::new(ReplicaChecks { relay: Arc::downgrade(&relay) });
            replicator.clone().follow(relay.ingest.clone(), relay.fanout.clone(), checks);
        }
        if let (Some(firestore), MetadataBackend::Firestore) = (&relay.firestore, relay.config.metadata.backend) {
            relay.follow_operator_lists(firestore);
        }
        Ok(relay)
    }

    /// Background work: the NIP-40 expiration sweep and forgetting idle
    /// rate-limit keys.
    fn start_housekeeping(self: &Arc<Self>) {
        let every = std::time::Duration::from_secs(self.config.nips.expiration_sweep_seconds.max(1));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.tick().await;
            loop {
                interval.tick().await;
                let Some(relay) = weak.upgrade() else { return };
                let store = relay.store.clone();
                let now = crate::event::unix_now();
                match tokio::task::spawn_blocking(move || store.remove_expired(now)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => {
                        relay.metrics.expired_events.inc_by(n as u64);
                        tracing::info!(removed = n, "expired events removed")
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "expiration sweep failed"),
                    Err(e) => tracing::error!(error = %e, "expiration sweep panicked"),
                }
                relay.policy.forget_idle();
            }
        });
    }

    /// With a shared metadata store, other replicas' management API calls
    /// change the operator's lists: reload them every few seconds, and remove
    /// newly banned events from this replica's store.
    fn follow_operator_lists(self: &Arc<Self>, firestore: &crate::firestore::Firestore) {
        let weak = Arc::downgrade(self);
        let name = crate::metadata::FirestoreMetadataStore::document_name(
            firestore,
            crate::operator_lists::NAMESPACE,
            crate::operator_lists::VERSION_KEY,
        );
        let mut version = firestore.watch_document(name);
        tokio::spawn(async move {
            // The lists are re-read only when their version document changes
            // (nothing is read while they do not), and again after a failed read.
            let mut retry = false;
            let mut previous = match weak.upgrade() {
                Some(relay) => relay.policy.operator_lists(),
                None => return,
            };
            loop {
                if retry {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                } else if version.changed().await.is_err() {
                    return;
                }
                let Some(relay) = weak.upgrade() else { return };
                retry = false;
                match crate::operator_lists::load(relay.metadata.as_ref()).await {
                    Ok(lists) => {
                        let known = relay.policy.operator_lists().banned_events;
                        let newly_banned: Vec<String> =
                            lists.banned_events.keys().filter(|id| !known.contains_key(*id)).cloned().collect();
                        // What the lists kept out of the shared log may pass now.
                        if crate::operator_lists::loosened(&previous, &lists)
                            && let Some(replicator) = relay.replicator.clone()
                        {
                            tokio::spawn(async move { replicator.reapply_skipped().await });
                        }
                        previous = lists.clone();
                        relay.policy.update_operator_lists(|l| *l = lists);
                        for id in newly_banned {
                            let mut bytes = [0u8; 32];
                            if hex::decode_to_slice(&id, &mut bytes).is_ok() {
                                let store = relay.store.clone();
                                let _ = tokio::task::spawn_blocking(move || store.remove(&bytes)).await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reloading the operator's lists failed");
                        retry = true;
                    }
                }
            }
        });
    }

    pub fn next_connection_id(&self) -> ConnId {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// What an event from another replica must pass here (see
/// [`crate::replication::ReplicaAdmission`]).
struct ReplicaChecks {
    relay: std::sync::Weak<Relay>,
}

#[async_trait::async_trait]
impl crate::replication::ReplicaAdmission for ReplicaChecks {
    async fn admit(&self, json: &str) -> Result<nostr::event::Event, Refusal> {
        let relay = self.relay.upgrade().ok_or_else(|| Refusal::error("the relay is stopping"))?;
        let raw = serde_json::value::RawValue::from_string(json.to_owned())
            .map_err(|e| Refusal::invalid(format!("malformed event: {e}")))?;
        let event = crate::event::read_event(&raw, &relay.config.limits, crate::event::unix_now())
            .map_err(|rejected| rejected.refusal)?;
        relay.policy.check_content(&event)?;
        if !relay.plugins.is_empty() {
            relay.plugins.on_event(&crate::plugin::Caller::replica(), &event).await?;
        }
        Ok(event)
    }

    fn already_stored(&self, id: &[u8; 32]) -> bool {
        self.relay.upgrade().is_some_and(|relay| matches!(relay.store.get(id), Ok(Some(_))))
    }
}

/// Events other replicas stored, as plugins may be served them before they
/// arrive here: never one this replica's tombstones or the operator's bans
/// keep out (a deletion, a request to vanish or a ban applied here first).
struct CheckedSource {
    replicator: Arc<Replicator>,
    relay: std::sync::Weak<Relay>,
}

#[async_trait::async_trait]
impl crate::plugin::EventSource for CheckedSource {
    async fn fetch(&self, id: &[u8; 32]) -> Result<Option<String>, String> {
        let Some(json) = self.replicator.fetch(id).await.map_err(|e| e.to_string())? else { return Ok(None) };
        let Ok(event) = serde_json::from_str::<nostr::event::Event>(&json) else { return Ok(None) };
        let relay = self.relay.upgrade().ok_or("the relay is stopping")?;
        let tombstoned = relay.store.refusal_of(&event).map_err(|e| e.to_string())?.is_some();
        let kept_out = relay.policy.is_banned(&event) || tombstoned;
        Ok((!kept_out).then_some(json))
    }
}
