//! The Firestore connection shared by the distributed metadata store
//! ([`crate::metadata::FirestoreMetadataStore`]) and event replication
//! ([`crate::replication`]): the client, document names, value helpers, and
//! the retry policy.
//!
//! It speaks Firestore's v1 gRPC API through the `firestore` crate's
//! authenticated client (credentials the usual Google way;
//! `FIRESTORE_EMULATOR_HOST` for the emulator).

use std::time::Duration;

use firestore::gcloud_sdk::google::firestore::v1 as fs;
use firestore::gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use firestore::gcloud_sdk::tonic::{Code, Status};
use firestore::{FirestoreDb, FirestoreDbOptions};

use crate::config::FirestoreConfig;

/// One call's deadline; a Firestore call that takes longer counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A Listen stream silent this long is reopened: a connection that died
/// without a word would otherwise hang it forever. Reopening costs a read
/// per watched document (none for an unchanged log resumed at its cursor).
pub const LISTEN_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts of an idempotent call before its error surfaces.
const ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FirestoreError {
    #[error("Firestore is unreachable or failing ({0}); retried {ATTEMPTS} times")]
    Unavailable(String),
    #[error("Firestore refused the request: {0}")]
    Refused(String),
    #[error("Firestore transaction contention ({0})")]
    Contention(String),
}

impl FirestoreError {
    fn from_status(s: &Status) -> Self {
        let text = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            Code::Aborted => FirestoreError::Contention(text),
            // Cancelled: the connection under the call went away.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled => FirestoreError::Unavailable(text),
            _ => FirestoreError::Refused(text),
        }
    }

    /// Whether repeating the same request may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, FirestoreError::Refused(_))
    }
}

/// A connection to one Firestore database, with the collection names this
/// relay uses.
#[derive(Clone)]
pub struct Firestore {
    db: FirestoreDb,
    prefix: String,
    usage: std::sync::Arc<Usage>,
}

/// Billable Firestore operations this process caused, counted the way
/// Firestore bills them: a document read (a query returning nothing costs
/// one; each document a listener delivers is one), a document written, a
/// document deleted. Exported as metrics; `make bench` reads them.
#[derive(Debug, Default)]
pub struct Usage {
    pub reads: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
    pub deletes: std::sync::atomic::AtomicU64,
}

pub type Client = FirestoreClient<firestore::gcloud_sdk::GoogleAuthMiddleware>;

impl Firestore {
    pub async fn connect(config: &FirestoreConfig) -> Result<Self, FirestoreError> {
        if config.project_id.is_empty() {
            return Err(FirestoreError::Refused("firestore.project_id is not set".into()));
        }
        let mut options = FirestoreDbOptions::new(config.project_id.clone());
        options.database_id = config.database_id.clone();
        let db = FirestoreDb::with_options(options)
            .await
            .map_err(|e| FirestoreError::Unavailable(format!("connecting: {e}")))?;
        Ok(Self { db, prefix: config.collection_prefix.clone(), usage: Default::default() })
    }

    /// What this connection has cost so far.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// Counts `documents` document reads (at least one: an empty answer is billed as one).
    pub fn count_reads(&self, documents: usize) {
        self.usage.reads.fetch_add(documents.max(1) as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a listener's delivered document (one read each).
    pub fn count_delivered(&self) {
        self.usage.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the writes and deletes of a commit about to be sent.
    pub fn count_commit(&self, writes: &[fs::Write]) {
        use std::sync::atomic::Ordering::Relaxed;
        let deletes = writes.iter().filter(|w| matches!(w.operation, Some(fs::write::Operation::Delete(_)))).count();
        self.usage.deletes.fetch_add(deletes as u64, Relaxed);
        self.usage.writes.fetch_add((writes.len() - deletes) as u64, Relaxed);
    }

    pub fn client(&self) -> Client {
        self.db.client().get()
    }

    /// `projects/P/databases/D`.
    pub fn database(&self) -> String {
        self.db.get_database_path().clone()
    }

    /// `projects/P/databases/D/documents`.
    pub fn documents(&self) -> String {
        self.db.get_documents_path().clone()
    }

    /// A collection's id, with the configured prefix.
    pub fn collection(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The full name of a document.
    pub fn document(&self, collection: &str, id: &str) -> String {
        format!("{}/{}/{id}", self.documents(), self.collection(collection))
    }

    /// Runs `call` until it succeeds, fails for good, or [`ATTEMPTS`] are
    /// used, backing off exponentially. Only for idempotent calls.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, FirestoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, FirestoreError>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            match call(self.client()).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::debug!(what, attempt, error = %e, "retrying a Firestore call");
                    last = Some(e);
                    tokio::time::sleep(delay + Duration::from_millis(rand::random::<u64>() % 50)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| FirestoreError::Unavailable(what.into())))
    }
}

impl Firestore {
    /// Document `name`, or `None` when it does not exist; retried, and
    /// counted as one read per attempt.
    pub async fn get_document(&self, what: &str, name: &str) -> Result<Option<fs::Document>, FirestoreError> {
        self.retry(what, |mut client| {
            self.count_reads(1);
            let request = fs::GetDocumentRequest { name: name.to_owned(), ..Default::default() };
            async move {
                match call(client.get_document(request)).await {
                    Ok(doc) => Ok(Some(doc)),
                    Err(FirestoreError::Refused(m)) if m == "not found" => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    /// Commits `writes` atomically, retrying: only for writes whose repetition
    /// is harmless (unconditional upserts and deletes).
    pub async fn commit_idempotent(&self, what: &str, writes: Vec<fs::Write>) -> Result<(), FirestoreError> {
        let database = self.database();
        self.retry(what, |mut client| {
            self.count_commit(&writes);
            let request =
                fs::CommitRequest { database: database.clone(), writes: writes.clone(), ..Default::default() };
            async move { call(client.commit(request)).await.map(|_| ()) }
        })
        .await
    }
}

impl Firestore {
    /// The current version of document `name`, kept up to date by a Firestore
    /// listener (reconnecting after errors) for as long as the receiver
    /// lives: a change costs one read, an unchanged document nothing. `None`
    /// until the first answer and while the document does not exist; the
    /// receiver sees a change only when the document's update time changes.
    pub fn watch_document(&self, name: String) -> tokio::sync::watch::Receiver<Option<fs::Document>> {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            while !tx.is_closed() {
                let error = this.listen_document(&name, &tx).await;
                tracing::warn!(document = %name, error = %error, "watching a Firestore document stopped; reconnecting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });
        rx
    }

    /// One Listen stream on document `name`, publishing its versions to `tx`;
    /// returns why it ended.
    async fn listen_document(&self, name: &str, tx: &tokio::sync::watch::Sender<Option<fs::Document>>) -> String {
        use fs::listen_response::ResponseType;
        use futures_util::StreamExt;
        let target = fs::Target {
            target_id: 1,
            target_type: Some(fs::target::TargetType::Documents(fs::target::DocumentsTarget {
                documents: vec![name.to_owned()],
            })),
            ..Default::default()
        };
        let request = fs::ListenRequest {
            database: self.database(),
            target_change: Some(fs::listen_request::TargetChange::AddTarget(target)),
            ..Default::default()
        };
        let requests = futures_util::stream::once(async move { request }).chain(futures_util::stream::pending());
        let mut client = self.client();
        let mut responses = match tokio::time::timeout(CALL_TIMEOUT, client.listen(requests)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return format!("{:?}: {}", status.code(), status.message()),
            Err(_) => return format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        };
        let update_time = |d: &Option<fs::Document>| d.as_ref().and_then(|d| d.update_time);
        loop {
            let next = match tokio::time::timeout(LISTEN_IDLE_TIMEOUT, responses.next()).await {
                Ok(Some(Ok(r))) => r,
                Ok(Some(Err(status))) => return format!("{:?}: {}", status.code(), status.message()),
                Ok(None) => return "the stream ended".into(),
                Err(_) => return format!("nothing heard for {} s", LISTEN_IDLE_TIMEOUT.as_secs()),
            };
            let version = match next.response_type {
                Some(ResponseType::DocumentChange(change)) => {
                    self.count_delivered();
                    change.document
                }
                Some(ResponseType::DocumentDelete(_) | ResponseType::DocumentRemove(_)) => None,
                _ => continue,
            };
            tx.send_if_modified(|current| {
                let changed = update_time(current) != update_time(&version);
                *current = version;
                changed
            });
        }
    }
}

/// Awaits one gRPC call with the call deadline.
pub async fn call<T>(
    fut: impl std::future::Future<Output = Result<firestore::gcloud_sdk::tonic::Response<T>, Status>>,
) -> Result<T, FirestoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) if status.code() == Code::NotFound => Err(FirestoreError::Refused("not found".into())),
        Ok(Err(status)) => Err(FirestoreError::from_status(&status)),
        Err(_) => Err(FirestoreError::Unavailable(format!("no answer within {} s", CALL_TIMEOUT.as_secs()))),
    }
}

pub fn string_value(s: impl Into<String>) -> fs::Value {
    fs::Value { value_type: Some(fs::value::ValueType::StringValue(s.into())) }
}

pub fn bytes_value(b: Vec<u8>) -> fs::Value {
    fs::Value { value_type: Some(fs::value::ValueType::BytesValue(b)) }
}

pub fn field_string<'a>(doc: &'a fs::Document, field: &str) -> Option<&'a str> {
    match doc.fields.get(field)?.value_type.as_ref()? {
        fs::value::ValueType::StringValue(s) => Some(s),
        _ => None,
    }
}

pub fn field_bytes(doc: &fs::Document, field: &str) -> Option<Vec<u8>> {
    match doc.fields.get(field)?.value_type.as_ref()? {
        fs::value::ValueType::BytesValue(b) => Some(b.clone()),
        _ => None,
    }
}

pub fn field_timestamp(doc: &fs::Document, field: &str) -> Option<firestore::gcloud_sdk::prost_types::Timestamp> {
    match doc.fields.get(field)?.value_type.as_ref()? {
        fs::value::ValueType::TimestampValue(t) => Some(*t),
        _ => None,
    }
}

/// A `field op value` condition.
pub fn field_filter(
    field: &str,
    op: fs::structured_query::field_filter::Operator,
    value: fs::Value,
) -> fs::structured_query::Filter {
    fs::structured_query::Filter {
        filter_type: Some(fs::structured_query::filter::FilterType::FieldFilter(fs::structured_query::FieldFilter {
            field: Some(fs::structured_query::FieldReference { field_path: field.into() }),
            op: op as i32,
            value: Some(value),
        })),
    }
}

/// All of `filters`.
pub fn and(filters: Vec<fs::structured_query::Filter>) -> fs::structured_query::Filter {
    fs::structured_query::Filter {
        filter_type: Some(fs::structured_query::filter::FilterType::CompositeFilter(
            fs::structured_query::CompositeFilter {
                op: fs::structured_query::composite_filter::Operator::And as i32,
                filters,
            },
        )),
    }
}

pub fn ascending(field: &str) -> fs::structured_query::Order {
    fs::structured_query::Order {
        field: Some(fs::structured_query::FieldReference { field_path: field.into() }),
        direction: fs::structured_query::Direction::Ascending as i32,
    }
}

/// Runs a structured query under `parent` and collects its documents.
pub async fn run_query(
    mut client: Client,
    parent: String,
    query: fs::StructuredQuery,
    transaction: Option<Vec<u8>>,
) -> Result<Vec<fs::Document>, FirestoreError> {
    use futures_util::StreamExt;
    let request = fs::RunQueryRequest {
        parent,
        query_type: Some(fs::run_query_request::QueryType::StructuredQuery(query)),
        consistency_selector: transaction.map(fs::run_query_request::ConsistencySelector::Transaction),
        ..Default::default()
    };
    let mut stream = call(client.run_query(request)).await?;
    let mut docs = Vec::new();
    loop {
        match tokio::time::timeout(CALL_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(r))) => docs.extend(r.document),
            Ok(Some(Err(status))) => return Err(FirestoreError::from_status(&status)),
            Ok(None) => return Ok(docs),
            Err(_) => return Err(FirestoreError::Unavailable("query stream stalled".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    /// `firestore.indexes.json` names the collections of the default prefix
    /// and holds the composite index the key-value scans need.
    #[test]
    fn index_file_matches_the_collections() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../firestore.indexes.json");
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let prefix = crate::config::FirestoreConfig::default().collection_prefix;
        let index = &file["indexes"][0];
        assert_eq!(index["collectionGroup"], format!("{prefix}kv"));
        let fields: Vec<&str> =
            index["fields"].as_array().unwrap().iter().map(|f| f["fieldPath"].as_str().unwrap()).collect();
        assert_eq!(fields, ["ns", "key"]);
    }
}
