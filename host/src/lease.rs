//! Leases among replicas: which one replica runs a periodic job (a plugin's
//! `tick`, whose housekeeping works on state every replica shares). A lease
//! is one key in the shared metadata store holding its holder and expiry;
//! it is taken and renewed by compare-and-set, so two replicas never both
//! hold it (up to clock skew between them, which the expiry margin covers).
//! A replica that does not hold it reads it again only once it has expired:
//! waiting costs nothing.

use std::sync::Arc;
use std::time::Duration;

use crate::metadata::{Condition, MetadataStore, Write};

/// The metadata namespace of leases (not a valid plugin name).
pub const NAMESPACE: &str = "relay:lease";

pub struct Lease {
    store: Arc<dyn MetadataStore>,
    key: String,
    holder: String,
    duration: Duration,
    /// The lease as last read: its holder and expiry (Unix milliseconds).
    known: tokio::sync::Mutex<Option<(String, u64)>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Held {
    holder: String,
    expires_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Lease {
    /// Lease `key`, held by `holder` (this process) for `duration` at a time.
    pub fn new(store: Arc<dyn MetadataStore>, key: String, holder: String, duration: Duration) -> Self {
        Self { store, key, holder, duration, known: Default::default() }
    }

    /// Whether this replica holds the lease now, taking or renewing it when
    /// it is free, expired or its own. A store that cannot be reached
    /// answers false: the job waits rather than risk running twice.
    pub async fn hold(&self) -> bool {
        let mut known = self.known.lock().await;
        let now = now_ms();
        if let Some((holder, expires)) = &*known
            && *holder != self.holder
            && *expires > now
        {
            return false;
        }
        let current = match self.store.get(NAMESPACE, &self.key).await {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(lease = %self.key, error = %e, "reading a lease failed; the job waits");
                return false;
            }
        };
        let held: Option<Held> = current.as_deref().and_then(|v| serde_json::from_slice(v).ok());
        if let Some(held) = &held
            && held.holder != self.holder
            && held.expires_ms > now
        {
            *known = Some((held.holder.clone(), held.expires_ms));
            return false;
        }
        let renewed = Held { holder: self.holder.clone(), expires_ms: now + self.duration.as_millis() as u64 };
        let value = serde_json::to_vec(&renewed).expect("a lease serializes");
        let taken = self
            .store
            .transact(
                NAMESPACE,
                vec![Condition { key: self.key.clone(), expected: current }],
                vec![Write { key: self.key.clone(), value: Some(value) }],
            )
            .await;
        match taken {
            Ok(true) => {
                *known = Some((renewed.holder, renewed.expires_ms));
                true
            }
            // Another replica took it between the read and the write.
            Ok(false) => {
                *known = None;
                false
            }
            Err(e) => {
                tracing::warn!(lease = %self.key, error = %e, "taking a lease failed; the job waits");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_another_takes_over_after_expiry() {
        let store: Arc<dyn MetadataStore> = Arc::new(crate::metadata::SledMetadataStore::temporary().unwrap());
        let lease = |who: &str, ms| Lease::new(store.clone(), "job".into(), who.into(), Duration::from_millis(ms));
        let (a, b) = (lease("a", 300), lease("b", 300));
        assert!(a.hold().await);
        assert!(!b.hold().await, "b must not hold a's lease");
        assert!(a.hold().await, "a renews its own lease");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(b.hold().await, "b takes the expired lease");
        assert!(!a.hold().await, "a lost it");
    }
}
