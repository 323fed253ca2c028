//! The metadata store: the namespaced key-value store plugins keep their state
//! in (the `kv` interface of the WIT contract). One trait, with an embedded
//! sled backend ([`SledMetadataStore`], the default) and a distributed one on
//! Firestore ([`FirestoreMetadataStore`]) that several relay replicas share.
//! Both pass the same [`conformance`] suite. Plugins reach it through a
//! [`QuotaStore`] that holds each to its key-value quota.

mod firestore_backend;
pub mod quota;
mod sled_backend;

use async_trait::async_trait;

pub use firestore_backend::FirestoreMetadataStore;
pub use quota::{KvQuota, QuotaStore};
pub use sled_backend::SledMetadataStore;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("value too large: {0}")]
    TooLarge(String),
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
}

/// A precondition of [`MetadataStore::transact`]: `key` holds `expected`
/// (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub expected: Option<Vec<u8>>,
}

/// A write of [`MetadataStore::transact`]: `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Every operation is scoped to a namespace (a plugin's name); namespaces never
/// see each other's keys. Every successful write is durable when it returns.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    async fn put(&self, ns: &str, key: &str, value: Vec<u8>) -> Result<(), KvError>;
    async fn delete(&self, ns: &str, key: &str) -> Result<(), KvError>;
    /// Up to `limit` entries under `prefix` in ascending key order, after
    /// `start_after` when given.
    async fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError>;
    /// All writes if all conditions hold (true), else nothing (false); atomic
    /// with respect to every other operation on the same keys.
    async fn transact(&self, ns: &str, conditions: Vec<Condition>, writes: Vec<Write>) -> Result<bool, KvError>;
}

pub fn validate_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::BadKey("keys must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::BadKey(format!("key is {} bytes; at most {MAX_KEY_BYTES} are allowed", key.len())));
    }
    if key.contains('\0') {
        return Err(KvError::BadKey("keys must not contain NUL characters".into()));
    }
    Ok(())
}

pub fn validate_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::TooLarge(format!(
            "value is {} bytes; at most {MAX_VALUE_BYTES} are allowed",
            value.len()
        )));
    }
    Ok(())
}

fn validate_transaction(conditions: &[Condition], writes: &[Write]) -> Result<(), KvError> {
    for c in conditions {
        validate_key(&c.key)?;
    }
    for w in writes {
        validate_key(&w.key)?;
        if let Some(v) = &w.value {
            validate_value(v)?;
        }
    }
    Ok(())
}

#[doc(hidden)]
pub mod conformance {
    //! The behaviour every backend must show. Each backend's tests call these
    //! (the sled backend's unit tests; the Firestore backend's integration
    //! test against the emulator).
    use std::sync::Arc;

    use super::*;

    pub async fn get_put_delete(store: &dyn MetadataStore) {
        assert_eq!(store.get("a", "k").await.unwrap(), None);
        store.put("a", "k", b"v1".to_vec()).await.unwrap();
        assert_eq!(store.get("a", "k").await.unwrap(), Some(b"v1".to_vec()));
        store.put("a", "k", b"v2".to_vec()).await.unwrap();
        assert_eq!(store.get("a", "k").await.unwrap(), Some(b"v2".to_vec()));
        // Namespaces are separate.
        assert_eq!(store.get("b", "k").await.unwrap(), None);
        store.delete("a", "k").await.unwrap();
        store.delete("a", "k").await.unwrap();
        assert_eq!(store.get("a", "k").await.unwrap(), None);
        // Empty values are values.
        store.put("a", "empty", vec![]).await.unwrap();
        assert_eq!(store.get("a", "empty").await.unwrap(), Some(vec![]));
    }

    pub async fn prefix_scans_are_ordered_and_paged(store: &dyn MetadataStore) {
        for k in ["kp/b/2", "kp/a/1", "kp/b/1", "kq/x", "kp/a/10", "kp"] {
            store.put("s", k, k.as_bytes().to_vec()).await.unwrap();
        }
        store.put("other", "kp/z", vec![1]).await.unwrap();
        let keys = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let all = store.scan_prefix("s", "kp/", None, 100).await.unwrap();
        assert_eq!(keys(all.clone()), ["kp/a/1", "kp/a/10", "kp/b/1", "kp/b/2"]);
        assert_eq!(all[0].1, b"kp/a/1");
        let page = store.scan_prefix("s", "kp/", None, 2).await.unwrap();
        assert_eq!(keys(page), ["kp/a/1", "kp/a/10"]);
        let next = store.scan_prefix("s", "kp/", Some("kp/a/10"), 2).await.unwrap();
        assert_eq!(keys(next), ["kp/b/1", "kp/b/2"]);
        assert!(store.scan_prefix("s", "none/", None, 10).await.unwrap().is_empty());
        assert_eq!(store.scan_prefix("s", "kp", None, 10).await.unwrap().len(), 5);
        // Non-ASCII keys sort by bytes.
        store.put("u", "é", vec![]).await.unwrap();
        store.put("u", "z", vec![]).await.unwrap();
        assert_eq!(keys(store.scan_prefix("u", "", None, 10).await.unwrap()), ["z", "é"]);
    }

    pub async fn transactions_check_conditions(store: &dyn MetadataStore) {
        let cond = |k: &str, v: Option<&[u8]>| Condition { key: k.into(), expected: v.map(<[u8]>::to_vec) };
        let write = |k: &str, v: Option<&[u8]>| Write { key: k.into(), value: v.map(<[u8]>::to_vec) };
        // Create-if-absent.
        assert!(store.transact("t", vec![cond("x", None)], vec![write("x", Some(b"1"))]).await.unwrap());
        assert!(!store.transact("t", vec![cond("x", None)], vec![write("x", Some(b"2"))]).await.unwrap());
        assert_eq!(store.get("t", "x").await.unwrap(), Some(b"1".to_vec()));
        // A failed condition writes nothing, even to other keys.
        assert!(!store.transact("t", vec![cond("x", Some(b"9"))], vec![write("y", Some(b"1"))]).await.unwrap());
        assert_eq!(store.get("t", "y").await.unwrap(), None);
        // Several writes and a delete, all at once.
        assert!(
            store
                .transact(
                    "t",
                    vec![cond("x", Some(b"1"))],
                    vec![write("x", None), write("y", Some(b"2")), write("z", Some(b"3"))]
                )
                .await
                .unwrap()
        );
        assert_eq!(store.get("t", "x").await.unwrap(), None);
        assert_eq!(store.get("t", "z").await.unwrap(), Some(b"3".to_vec()));
    }

    pub async fn concurrent_transactions_never_both_win(store: Arc<dyn MetadataStore>) {
        // 8 tasks each take items from a shared pool of 40 by compare-and-set;
        // every item must be taken exactly once.
        for i in 0..40 {
            store.put("pool", &format!("item/{i:02}"), b"free".to_vec()).await.unwrap();
        }
        let mut tasks = Vec::new();
        for worker in 0..8u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut taken = Vec::new();
                loop {
                    let items = store.scan_prefix("pool", "item/", None, 100).await.unwrap();
                    let Some((key, _)) = items.into_iter().find(|(_, v)| v == b"free") else { break };
                    let won = store
                        .transact(
                            "pool",
                            vec![Condition { key: key.clone(), expected: Some(b"free".to_vec()) }],
                            vec![Write { key: key.clone(), value: Some(vec![worker]) }],
                        )
                        .await
                        .unwrap();
                    if won {
                        taken.push(key);
                    }
                }
                taken
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "an item was taken twice");
        assert_eq!(all.len(), 40);
    }

    pub async fn large_values_and_bad_keys(store: &dyn MetadataStore) {
        let big = vec![7u8; MAX_VALUE_BYTES];
        store.put("l", "big", big.clone()).await.unwrap();
        assert_eq!(store.get("l", "big").await.unwrap(), Some(big));
        let too_big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(store.put("l", "k", too_big).await, Err(KvError::TooLarge(_))));
        assert!(matches!(store.put("l", "", vec![]).await, Err(KvError::BadKey(_))));
        assert!(matches!(store.get("l", "a\0b").await, Err(KvError::BadKey(_))));
        assert!(matches!(store.put("l", &"k".repeat(MAX_KEY_BYTES + 1), vec![]).await, Err(KvError::BadKey(_))));
        let bad_write = Write { key: String::new(), value: None };
        assert!(matches!(store.transact("l", vec![], vec![bad_write]).await, Err(KvError::BadKey(_))));
    }

    pub async fn run_all(store: Arc<dyn MetadataStore>) {
        get_put_delete(store.as_ref()).await;
        prefix_scans_are_ordered_and_paged(store.as_ref()).await;
        transactions_check_conditions(store.as_ref()).await;
        large_values_and_bad_keys(store.as_ref()).await;
        concurrent_transactions_never_both_win(store).await;
    }
}
