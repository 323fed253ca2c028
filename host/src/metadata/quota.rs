//! Per-plugin key-value quotas: a [`MetadataStore`] in front of the real one
//! that counts one namespace's keys and bytes (key plus value) and refuses a
//! write that would take them past the plugin's quota, with `too-large` and
//! a message saying which quota is used up.
//!
//! The usage is read once when the plugin's slot is set up (one scan of its
//! namespace) and kept up to date by every write through this store. With
//! the Firestore backend each replica counts its own writes from that
//! starting point, so the quota holds per replica.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Condition, KvError, MetadataStore, Write};

/// A plugin's key-value allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuota {
    pub max_keys: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    keys: i64,
    bytes: i64,
}

pub struct QuotaStore {
    inner: Arc<dyn MetadataStore>,
    ns: String,
    quota: KvQuota,
    usage: Mutex<Usage>,
}

/// Entries read per page while counting a namespace.
const COUNT_PAGE: usize = 1000;

impl QuotaStore {
    /// Counts what namespace `ns` holds now and starts enforcing `quota`.
    pub async fn open(inner: Arc<dyn MetadataStore>, ns: &str, quota: KvQuota) -> Result<Self, KvError> {
        let mut usage = Usage::default();
        let mut after: Option<String> = None;
        loop {
            let page = inner.scan_prefix(ns, "", after.as_deref(), COUNT_PAGE).await?;
            for (k, v) in &page {
                usage.keys += 1;
                usage.bytes += (k.len() + v.len()) as i64;
            }
            if page.len() < COUNT_PAGE {
                break;
            }
            after = page.last().map(|(k, _)| k.clone());
        }
        Ok(Self { inner, ns: ns.to_owned(), quota, usage: Mutex::new(usage) })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys and bytes the namespace holds (as this store has counted them).
    pub fn used(&self) -> (u64, u64) {
        let u = *self.usage();
        (u.keys.max(0) as u64, u.bytes.max(0) as u64)
    }

    /// The change `writes` would make, from the current values of their keys.
    async fn delta(&self, ns: &str, writes: &[(&str, Option<usize>)]) -> Result<Usage, KvError> {
        let mut delta = Usage::default();
        for (key, new_len) in writes {
            let old = self.inner.get(ns, key).await?;
            let old_size = old.as_ref().map(|v| (key.len() + v.len()) as i64);
            let new_size = new_len.map(|n| (key.len() + n) as i64);
            delta.keys += i64::from(new_size.is_some()) - i64::from(old_size.is_some());
            delta.bytes += new_size.unwrap_or(0) - old_size.unwrap_or(0);
        }
        Ok(delta)
    }

    /// Takes `delta` from the allowance, or refuses if it would exceed it
    /// (writes that only shrink the namespace always pass).
    fn reserve(&self, delta: Usage) -> Result<(), KvError> {
        let mut usage = self.usage();
        let keys = usage.keys + delta.keys;
        let bytes = usage.bytes + delta.bytes;
        if delta.keys > 0 && keys > self.quota.max_keys as i64 {
            return Err(KvError::TooLarge(format!(
                "the plugin's key-value quota of {} keys is used up; delete keys first",
                self.quota.max_keys
            )));
        }
        if delta.bytes > 0 && bytes > self.quota.max_bytes as i64 {
            return Err(KvError::TooLarge(format!(
                "the plugin's key-value quota of {} bytes is used up; delete keys first",
                self.quota.max_bytes
            )));
        }
        *usage = Usage { keys, bytes };
        Ok(())
    }

    fn release(&self, delta: Usage) {
        let mut usage = self.usage();
        usage.keys -= delta.keys;
        usage.bytes -= delta.bytes;
    }

    fn check_ns(&self, ns: &str) -> Result<(), KvError> {
        if ns == self.ns {
            Ok(())
        } else {
            Err(KvError::BadKey(format!("this store serves namespace '{}' only", self.ns)))
        }
    }
}

#[async_trait]
impl MetadataStore for QuotaStore {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_ns(ns)?;
        self.inner.get(ns, key).await
    }

    async fn put(&self, ns: &str, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.check_ns(ns)?;
        super::validate_key(key)?;
        super::validate_value(&value)?;
        let delta = self.delta(ns, &[(key, Some(value.len()))]).await?;
        self.reserve(delta)?;
        let written = self.inner.put(ns, key, value).await;
        if written.is_err() {
            self.release(delta);
        }
        written
    }

    async fn delete(&self, ns: &str, key: &str) -> Result<(), KvError> {
        self.check_ns(ns)?;
        super::validate_key(key)?;
        let delta = self.delta(ns, &[(key, None)]).await?;
        self.reserve(delta)?;
        let deleted = self.inner.delete(ns, key).await;
        if deleted.is_err() {
            self.release(delta);
        }
        deleted
    }

    async fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        self.check_ns(ns)?;
        self.inner.scan_prefix(ns, prefix, start_after, limit).await
    }

    async fn transact(&self, ns: &str, conditions: Vec<Condition>, writes: Vec<Write>) -> Result<bool, KvError> {
        self.check_ns(ns)?;
        super::validate_transaction(&conditions, &writes)?;
        let sizes: Vec<(&str, Option<usize>)> =
            writes.iter().map(|w| (w.key.as_str(), w.value.as_ref().map(Vec::len))).collect();
        let delta = self.delta(ns, &sizes).await?;
        self.reserve(delta)?;
        let applied = self.inner.transact(ns, conditions, writes).await;
        if !matches!(applied, Ok(true)) {
            self.release(delta);
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::SledMetadataStore;

    #[tokio::test]
    async fn writes_past_the_quota_are_refused_and_deletes_free_room() {
        let inner: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::temporary().unwrap());
        inner.put("p", "old", b"1234".to_vec()).await.unwrap();
        let store = QuotaStore::open(inner.clone(), "p", KvQuota { max_keys: 2, max_bytes: 20 }).await.unwrap();
        assert_eq!(store.used(), (1, 7));
        store.put("p", "a", b"x".to_vec()).await.unwrap();
        let refused = store.put("p", "b", b"x".to_vec()).await.unwrap_err();
        assert!(matches!(&refused, KvError::TooLarge(m) if m.contains("2 keys")), "{refused:?}");
        // Overwriting an existing key adds no key, only bytes.
        let refused = store.put("p", "a", vec![b'y'; 30]).await.unwrap_err();
        assert!(matches!(&refused, KvError::TooLarge(m) if m.contains("20 bytes")), "{refused:?}");
        store.delete("p", "old").await.unwrap();
        let applied =
            store.transact("p", vec![], vec![Write { key: "b".into(), value: Some(b"x".to_vec()) }]).await.unwrap();
        assert!(applied);
        assert_eq!(store.used(), (2, 4));
        assert!(store.get("other", "a").await.is_err(), "one namespace only");
    }
}
