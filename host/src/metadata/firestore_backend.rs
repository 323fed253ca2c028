//! The distributed metadata store: one Firestore collection
//! (`<prefix>kv`), one document per key, shared by every relay replica
//! configured with the same project.
//!
//! Documents: id `<hex(namespace)>.<hex(key)>` (keys may hold `/`, which
//! document ids may not), fields `ns`, `key` (strings, for prefix scans:
//! needs the composite index `ns ASC, key ASC` from `firestore.indexes.json`)
//! and `value` (bytes). `transact` is optimistic when every condition key is
//! also written (the usual compare-and-set, and how the MLS gateway uses
//! it): the conditions are read with their update times, and the writes
//! commit atomically with preconditions (`update_time` unchanged, or
//! `exists: false`), so a concurrent change makes the commit fail as a whole
//! and `transact` answer false; no locks are held, so many concurrent callers
//! do not queue. Otherwise it is a Firestore read-write transaction
//! (conditions read inside it; contention, `ABORTED`, reruns it). Reads, puts
//! and deletes are idempotent
//! and retried with backoff; a commit whose outcome is unknown (the service
//! became unreachable mid-commit) is not retried but surfaces as an error.

use async_trait::async_trait;
use firestore::gcloud_sdk::google::firestore::v1 as fs;

use super::{Condition, KvError, MetadataStore, Write, validate_key, validate_transaction, validate_value};
use crate::firestore::{
    Firestore, FirestoreError, and, ascending, bytes_value, call, field_bytes, field_filter, field_string, run_query,
    string_value,
};

const COLLECTION: &str = "kv";
/// Longest one key-value operation (retries included) waits on Firestore. A
/// plugin is waiting inside a call with its own wall-clock limit: it should
/// get an error it can act on, not be cut off as if it had hung.
const OPERATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// `op` under [`OPERATION_DEADLINE`].
async fn within_deadline<T>(op: impl std::future::Future<Output = Result<T, KvError>>) -> Result<T, KvError> {
    tokio::time::timeout(OPERATION_DEADLINE, op).await.unwrap_or_else(|_| {
        Err(KvError::Unavailable(format!("Firestore did not answer within {} s", OPERATION_DEADLINE.as_secs())))
    })
}
/// Reruns of a contended transaction before giving up.
const TRANSACTION_ATTEMPTS: u32 = 20;

pub struct FirestoreMetadataStore {
    firestore: Firestore,
}

fn kv_error(e: FirestoreError) -> KvError {
    KvError::Unavailable(e.to_string())
}

impl FirestoreMetadataStore {
    pub fn new(firestore: Firestore) -> Self {
        Self { firestore }
    }

    fn doc_id(ns: &str, key: &str) -> String {
        format!("{}.{}", hex::encode(ns), hex::encode(key))
    }

    fn doc_name(&self, ns: &str, key: &str) -> String {
        Self::document_name(&self.firestore, ns, key)
    }

    /// The full name of the document holding `key` of namespace `ns`.
    pub fn document_name(firestore: &Firestore, ns: &str, key: &str) -> String {
        firestore.document(COLLECTION, &Self::doc_id(ns, key))
    }

    fn document(&self, ns: &str, key: &str, value: Vec<u8>) -> fs::Document {
        fs::Document {
            name: self.doc_name(ns, key),
            fields: [
                ("ns".to_string(), string_value(ns)),
                ("key".to_string(), string_value(key)),
                ("value".to_string(), bytes_value(value)),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    fn write(&self, ns: &str, w: &Write) -> fs::Write {
        let operation = match &w.value {
            Some(v) => fs::write::Operation::Update(self.document(ns, &w.key, v.clone())),
            None => fs::write::Operation::Delete(self.doc_name(ns, &w.key)),
        };
        fs::Write { operation: Some(operation), ..Default::default() }
    }

    /// The value at `name`, read inside `transaction` when given.
    async fn read(
        mut client: crate::firestore::Client,
        name: String,
        transaction: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, FirestoreError> {
        let request = fs::GetDocumentRequest {
            name,
            consistency_selector: transaction.map(fs::get_document_request::ConsistencySelector::Transaction),
            ..Default::default()
        };
        match call(client.get_document(request)).await {
            Ok(doc) => Ok(Some(field_bytes(&doc, "value").unwrap_or_default())),
            Err(FirestoreError::Refused(m)) if m == "not found" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Compare-and-set without a transaction: `Ok(false)` when a condition
    /// does not hold, at read time or at commit time.
    async fn transact_optimistic(
        &self,
        ns: &str,
        conditions: &[Condition],
        writes: &[Write],
    ) -> Result<bool, FirestoreError> {
        use fs::precondition::ConditionType;
        let mut preconditions = std::collections::HashMap::new();
        for c in conditions {
            let name = self.doc_name(ns, &c.key);
            let doc = self.firestore.get_document("read condition", &name).await?;
            let current = doc.as_ref().map(|d| field_bytes(d, "value").unwrap_or_default());
            if current != c.expected {
                return Ok(false);
            }
            let condition = match doc.and_then(|d| d.update_time) {
                Some(t) => ConditionType::UpdateTime(t),
                None => ConditionType::Exists(false),
            };
            preconditions.insert(c.key.clone(), condition);
        }
        let writes: Vec<fs::Write> = writes
            .iter()
            .map(|w| {
                let mut write = self.write(ns, w);
                write.current_document =
                    preconditions.get(&w.key).map(|c| fs::Precondition { condition_type: Some(*c) });
                write
            })
            .collect();
        let mut client = self.firestore.client();
        self.firestore.count_commit(&writes);
        let commit = fs::CommitRequest { database: self.firestore.database(), writes, ..Default::default() };
        match call(client.commit(commit)).await {
            Ok(_) => Ok(true),
            // A precondition failed: someone changed a condition key meanwhile.
            Err(FirestoreError::Refused(m))
                if m.starts_with("FailedPrecondition")
                    || m.starts_with("AlreadyExists")
                    || m.starts_with("NotFound") =>
            {
                Ok(false)
            }
            Err(FirestoreError::Refused(m)) if m == "not found" => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One attempt at a transaction: `Ok(None)` means contention (rerun).
    async fn try_transact(
        &self,
        ns: &str,
        conditions: &[Condition],
        writes: &[Write],
    ) -> Result<Option<bool>, FirestoreError> {
        let mut client = self.firestore.client();
        let database = self.firestore.database();
        let begin = fs::BeginTransactionRequest { database: database.clone(), ..Default::default() };
        let transaction = call(client.begin_transaction(begin)).await?.transaction;
        let mut holds = true;
        for c in conditions {
            self.firestore.count_reads(1);
            match Self::read(client.clone(), self.doc_name(ns, &c.key), Some(transaction.clone())).await {
                Ok(current) => {
                    if current != c.expected {
                        holds = false;
                        break;
                    }
                }
                Err(FirestoreError::Contention(_)) => return Ok(None),
                Err(e) => {
                    let rollback =
                        fs::RollbackRequest { database: database.clone(), transaction, ..Default::default() };
                    let _ = call(client.rollback(rollback)).await;
                    return Err(e);
                }
            }
        }
        if !holds {
            let rollback = fs::RollbackRequest { database, transaction, ..Default::default() };
            let _ = call(client.rollback(rollback)).await;
            return Ok(Some(false));
        }
        let commit = fs::CommitRequest {
            database,
            writes: writes.iter().map(|w| self.write(ns, w)).collect(),
            transaction,
            ..Default::default()
        };
        self.firestore.count_commit(&commit.writes);
        match call(client.commit(commit)).await {
            Ok(_) => Ok(Some(true)),
            Err(FirestoreError::Contention(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl MetadataStore for FirestoreMetadataStore {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        within_deadline(self.get_now(ns, key)).await
    }

    async fn put(&self, ns: &str, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        within_deadline(self.put_now(ns, key, value)).await
    }

    async fn delete(&self, ns: &str, key: &str) -> Result<(), KvError> {
        within_deadline(self.delete_now(ns, key)).await
    }

    async fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        within_deadline(self.scan_prefix_now(ns, prefix, start_after, limit)).await
    }

    async fn transact(&self, ns: &str, conditions: Vec<Condition>, writes: Vec<Write>) -> Result<bool, KvError> {
        within_deadline(self.transact_now(ns, conditions, writes)).await
    }
}

/// The least string greater than every string starting with `prefix`
/// (Firestore orders strings by their UTF-8 bytes, which is `str` order):
/// the prefix with its last character that has a successor replaced by it.
/// `None` for an empty prefix, or one of only `char::MAX`.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // The next scalar value, skipping the surrogate gap.
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The operations, without the deadline.
impl FirestoreMetadataStore {
    async fn get_now(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        validate_key(key)?;
        let name = self.doc_name(ns, key);
        self.firestore
            .retry("get", |client| {
                self.firestore.count_reads(1);
                Self::read(client, name.clone(), None)
            })
            .await
            .map_err(kv_error)
    }

    async fn put_now(&self, ns: &str, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        validate_key(key)?;
        validate_value(&value)?;
        let write = self.write(ns, &Write { key: key.into(), value: Some(value) });
        self.firestore.commit_idempotent("put", vec![write]).await.map_err(kv_error)
    }

    async fn delete_now(&self, ns: &str, key: &str) -> Result<(), KvError> {
        validate_key(key)?;
        let write = self.write(ns, &Write { key: key.into(), value: None });
        self.firestore.commit_idempotent("delete", vec![write]).await.map_err(kv_error)
    }

    async fn scan_prefix_now(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        use fs::structured_query::field_filter::Operator;
        let lower = match start_after {
            Some(after) if after >= prefix => field_filter("key", Operator::GreaterThan, string_value(after)),
            _ => field_filter("key", Operator::GreaterThanOrEqual, string_value(prefix)),
        };
        let mut conditions = vec![field_filter("ns", Operator::Equal, string_value(ns)), lower];
        // Without an upper bound, Firestore returns (and bills) keys past
        // the prefix up to `limit`.
        if let Some(upper) = prefix_end(prefix) {
            conditions.push(field_filter("key", Operator::LessThan, string_value(upper)));
        }
        let query = fs::StructuredQuery {
            from: vec![fs::structured_query::CollectionSelector {
                collection_id: self.firestore.collection(COLLECTION),
                all_descendants: false,
            }],
            r#where: Some(and(conditions)),
            order_by: vec![ascending("key")],
            limit: Some(i32::try_from(limit).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        let parent = self.firestore.documents();
        let docs = self
            .firestore
            .retry("scan", |client| run_query(client, parent.clone(), query.clone(), None))
            .await
            .map_err(kv_error)?;
        self.firestore.count_reads(docs.len());
        // Keys are ordered, so those with the prefix come first and together.
        Ok(docs
            .iter()
            .filter_map(|d| Some((field_string(d, "key")?.to_owned(), field_bytes(d, "value").unwrap_or_default())))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect())
    }

    async fn transact_now(&self, ns: &str, conditions: Vec<Condition>, writes: Vec<Write>) -> Result<bool, KvError> {
        validate_transaction(&conditions, &writes)?;
        if conditions.iter().all(|c| writes.iter().any(|w| w.key == c.key)) {
            return self.transact_optimistic(ns, &conditions, &writes).await.map_err(kv_error);
        }
        let mut delay = std::time::Duration::from_millis(10);
        for _ in 0..TRANSACTION_ATTEMPTS {
            match self.try_transact(ns, &conditions, &writes).await {
                Ok(Some(outcome)) => return Ok(outcome),
                // Contention: another transaction holds these documents. Rerun,
                // re-reading the conditions.
                Ok(None) | Err(FirestoreError::Contention(_)) => {}
                Err(e) => return Err(kv_error(e)),
            }
            tokio::time::sleep(delay + std::time::Duration::from_millis(rand::random::<u64>() % 20)).await;
            delay = (delay * 2).min(std::time::Duration::from_millis(500));
        }
        Err(KvError::Unavailable(format!(
            "the transaction lost to concurrent writers {TRANSACTION_ATTEMPTS} times; try again"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_the_least_string_after_all_its_extensions() {
        assert_eq!(prefix_end("kp/abc/").as_deref(), Some("kp/abc0"));
        assert_eq!(prefix_end("a").as_deref(), Some("b"));
        assert_eq!(prefix_end("").as_deref(), None);
        assert_eq!(prefix_end("x\u{10FFFF}").as_deref(), Some("y"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        for (prefix, inside) in [("kp/abc/", "kp/abc/\u{10FFFF}zz"), ("rl/", "rl/999/x")] {
            let end = prefix_end(prefix).unwrap();
            assert!(prefix < end.as_str() && inside < end.as_str());
        }
    }
}
