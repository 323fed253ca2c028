//! The running relay's shared state and its start-up: opens the store, starts
//! the writer, binds the listener and serves until shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::fanout::{ConnId, Fanout};
use crate::ingest::Ingest;
use crate::store::{EventStore, SledEventStore};

/// Everything a connection needs, shared by all of them.
pub struct Relay {
    pub config: Config,
    pub store: Arc<dyn EventStore>,
    pub fanout: Arc<Fanout>,
    pub ingest: Ingest,
    next_connection: AtomicU64,
}

impl Relay {
    pub fn open(config: Config) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.storage.data_dir)?;
        let store: Arc<dyn EventStore> =
            Arc::new(SledEventStore::open(&config.storage.data_dir, config.storage.cache_capacity_bytes)?);
        let fanout = Arc::new(Fanout::new());
        let ingest = Ingest::start(store.clone(), fanout.clone(), config.storage.max_batch_events)?;
        Ok(Arc::new(Self { config, store, fanout, ingest, next_connection: AtomicU64::new(1) }))
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
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.server.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.bind))?;
        let relay = Relay::open(config)?;
        Ok(Self { relay, listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        crate::server::serve(self.listener, self.relay, shutdown).await
    }
}
