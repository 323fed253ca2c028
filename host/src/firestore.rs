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
        Ok(Self { db, prefix: config.collection_prefix.clone() })
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
    /// Commits `writes` atomically, retrying: only for writes whose repetition
    /// is harmless (unconditional upserts and deletes).
    pub async fn commit_idempotent(&self, what: &str, writes: Vec<fs::Write>) -> Result<(), FirestoreError> {
        let database = self.database();
        self.retry(what, |mut client| {
            let request =
                fs::CommitRequest { database: database.clone(), writes: writes.clone(), ..Default::default() };
            async move { call(client.commit(request)).await.map(|_| ()) }
        })
        .await
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
