//! The running relay's shared state and its start-up: opens the store, starts
//! the writer, binds the listener and serves until shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use anyhow::Context;

use crate::config::{Config, GiftWrapPolicy};
use crate::fanout::{ConnId, Fanout};
use crate::ingest::Ingest;
use crate::metadata::{MetadataStore, SledMetadataStore};
use crate::metrics::Metrics;
use crate::plugin::PluginHost;
use crate::policy::Policy;
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
    /// Turns true when the relay starts shutting down; connections say
    /// goodbye and close.
    pub shutdown: watch::Sender<bool>,
    next_connection: AtomicU64,
}

impl Relay {
    /// Opens the stores, loads the plugins and starts the writer.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Self>> {
        let data_dir = &config.storage.data_dir;
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let store: Arc<dyn EventStore> = Arc::new(
            SledEventStore::open(data_dir, config.storage.cache_capacity_bytes).context("opening the event store")?,
        );
        let metadata: Arc<dyn MetadataStore> =
            Arc::new(SledMetadataStore::open(data_dir).context("opening the metadata store")?);
        let metrics = Arc::new(Metrics::new());
        let fanout = Arc::new(Fanout::new(config.nips.gift_wrap_policy == GiftWrapPolicy::RecipientOnly));
        let cache_dir = if config.plugin_runtime.cache_dir.as_os_str().is_empty() {
            crate::plugin::runtime::default_cache_dir(data_dir)
        } else {
            config.plugin_runtime.cache_dir.clone()
        };
        let plugins = PluginHost::start(
            &config.plugins,
            cache_dir,
            metadata.clone(),
            store.clone(),
            fanout.clone(),
            config.limits.max_limit,
            metrics.clone(),
        )
        .await?;
        if config.plugin_runtime.watch && !plugins.is_empty() {
            plugins.watch_files().context("watching plugin files")?;
        }
        plugins.start_ticks();
        let ingest = Ingest::start(store.clone(), fanout.clone(), config.storage.max_batch_events, metrics.clone())?;
        let policy = Policy::new(&config.rate_limits, &config.access);
        let lists = crate::admin::load_lists(metadata.as_ref()).await.context("loading the operator's lists")?;
        policy.update_operator_lists(|l| *l = lists);
        let relay = Arc::new(Self {
            config,
            store,
            fanout,
            ingest,
            plugins,
            policy,
            metadata,
            metrics,
            shutdown: watch::Sender::new(false),
            next_connection: AtomicU64::new(1),
        });
        relay.start_housekeeping();
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

    pub fn next_connection_id(&self) -> ConnId {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// A bound relay, ready to serve.
pub struct BoundRelay {
    relay: Arc<Relay>,
    listener: TcpListener,
}

impl BoundRelay {
    pub async fn bind(mut config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.server.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.bind))?;
        if config.server.public_url.is_empty() {
            config.server.public_url = format!("ws://{}", listener.local_addr()?);
        }
        let relay = Relay::open(config).await?;
        Ok(Self { relay, listener })
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        crate::server::serve(self.listener, self.relay, shutdown).await
    }
}
