//! The embedded metadata store: one sled tree, keys `namespace \0 key`.

use std::ops::Bound;
use std::path::Path;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Condition, KvError, MetadataStore, Write, validate_key, validate_transaction, validate_value};

pub struct SledMetadataStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledMetadataStore {
    pub fn open(dir: &Path) -> Result<Self, sled::Error> {
        let db = sled::Config::new().path(dir.join("metadata")).open()?;
        let tree = db.open_tree("plugin-kv")?;
        Ok(Self { db, tree })
    }

    /// A store in a temporary directory (tests).
    pub fn temporary() -> Result<Self, sled::Error> {
        let db = sled::Config::new().temporary(true).open()?;
        let tree = db.open_tree("plugin-kv")?;
        Ok(Self { db, tree })
    }

    fn full_key(ns: &str, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
        k.extend_from_slice(ns.as_bytes());
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// Flushes to disk. sled's own `flush_async` can stall under concurrent
    /// callers, so the blocking flush runs on the blocking pool instead.
    async fn durable(&self) -> Result<(), KvError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(r) => r.map(|_| ()).map_err(unavailable),
            Err(e) => Err(KvError::Unavailable(format!("flush task failed: {e}"))),
        }
    }
}

fn unavailable(e: sled::Error) -> KvError {
    KvError::Unavailable(e.to_string())
}

#[async_trait]
impl MetadataStore for SledMetadataStore {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        validate_key(key)?;
        Ok(self.tree.get(Self::full_key(ns, key)).map_err(unavailable)?.map(|v| v.to_vec()))
    }

    async fn put(&self, ns: &str, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        validate_key(key)?;
        validate_value(&value)?;
        self.tree.insert(Self::full_key(ns, key), value).map_err(unavailable)?;
        self.durable().await
    }

    async fn delete(&self, ns: &str, key: &str) -> Result<(), KvError> {
        validate_key(key)?;
        self.tree.remove(Self::full_key(ns, key)).map_err(unavailable)?;
        self.durable().await
    }

    async fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let full_prefix = Self::full_key(ns, prefix);
        let start = match start_after {
            Some(after) => Bound::Excluded(Self::full_key(ns, after)),
            None => Bound::Included(full_prefix.clone()),
        };
        let mut out = Vec::new();
        for entry in self.tree.range((start, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(unavailable)?;
            if !k.starts_with(&full_prefix) {
                break;
            }
            let key = String::from_utf8_lossy(&k[ns.len() + 1..]).into_owned();
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    async fn transact(&self, ns: &str, conditions: Vec<Condition>, writes: Vec<Write>) -> Result<bool, KvError> {
        validate_transaction(&conditions, &writes)?;
        let result = self.tree.transaction(|tx| {
            for c in &conditions {
                let current = tx.get(Self::full_key(ns, &c.key))?;
                if current.as_deref() != c.expected.as_deref() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            for w in &writes {
                match &w.value {
                    Some(v) => tx.insert(Self::full_key(ns, &w.key), v.as_slice())?,
                    None => tx.remove(Self::full_key(ns, &w.key))?,
                };
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                self.durable().await?;
                Ok(true)
            }
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sled_backend_passes_the_conformance_suite() {
        let store: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::temporary().unwrap());
        crate::metadata::conformance::run_all(store).await;
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledMetadataStore::open(dir.path()).unwrap();
            s.put("ns", "k", b"v".to_vec()).await.unwrap();
        }
        let s = SledMetadataStore::open(dir.path()).unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), Some(b"v".to_vec()));
    }
}
