//! Event replication between relay replicas through Firestore.
//!
//! The mechanism (chosen for being simple to reason about and idempotent):
//! - **Publish**: the writer sends every event a client gave this replica to
//!   the `<prefix>events` collection (document id = event id, fields `json`
//!   and `written_at`, a server-assigned commit timestamp) *before* writing it
//!   locally and answering `OK`. An event whose Firestore write fails is not
//!   stored and gets `OK false "error: ..."`, so nothing acknowledged is
//!   missing from Firestore.
//! - **Follow**: each replica reads the collection in `(written_at, id)`
//!   order from a cursor, every `replication.poll_interval_ms`, verifies each
//!   event and applies it through its own writer (same NIP-01/09/62 rules,
//!   live fan-out to its subscribers). Applying is idempotent: its own events
//!   come back as duplicates. The cursor is saved in the data directory after
//!   each applied page, so a replica that was down resumes where it stopped
//!   and loses nothing; re-applied events are duplicates, not copies.
//! - **Fallback**: a plugin's `filter-query` may name an event another
//!   replica stored that has not arrived here yet; the host fetches it from
//!   Firestore by id (see [`crate::plugin::EventSource`]).
//!
//! Deletions (NIP-09) and requests to vanish (NIP-62) are events, so they
//! replicate and apply on every replica; NIP-40 expiry is applied by each
//! replica's own sweep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use firestore::gcloud_sdk::google::firestore::v1 as fs;
use firestore::gcloud_sdk::prost_types::Timestamp;
use nostr::event::Event;

use crate::event::{AcceptedEvent, KindClass, kind_class};
use crate::fanout::Fanout;
use crate::firestore::{
    Firestore, FirestoreError, ascending, call, field_string, field_timestamp, run_query, string_value,
};
use crate::ingest::Ingest;

const COLLECTION: &str = "events";
/// Firestore's limit of writes per commit.
const MAX_WRITES_PER_COMMIT: usize = 500;
/// Documents fetched per poll.
const PAGE: i32 = 500;
/// Ephemeral events from other replicas older than this are not delivered
/// (a replica catching up does not replay old ephemeral traffic).
const EPHEMERAL_MAX_AGE_SECONDS: i64 = 30;

/// Events a replica must not apply (the operator banned them or their author).
pub type Banned = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

pub struct Replicator {
    firestore: Firestore,
    /// This process, in the `origin` field of what it publishes, so it can
    /// tell its own ephemeral events apart (it delivered them already).
    origin: String,
    public_url: String,
    cursor_file: PathBuf,
    poll_interval: Duration,
}

/// Where a replica is in the shared event log.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Cursor {
    seconds: i64,
    nanos: i32,
    /// Full document name of the last applied event.
    name: String,
}

impl Replicator {
    pub fn new(firestore: Firestore, public_url: String, data_dir: &Path, poll_interval: Duration) -> Self {
        let origin = hex::encode(rand::random::<[u8; 8]>());
        Self { firestore, origin, public_url, cursor_file: data_dir.join("replication-cursor.json"), poll_interval }
    }

    /// Writes client events to Firestore; returns, per event, `Ok` or why it
    /// could not be replicated. Called from the writer thread.
    pub async fn publish(&self, events: &[Arc<AcceptedEvent>]) -> Vec<Result<(), String>> {
        let mut results = Vec::with_capacity(events.len());
        for chunk in events.chunks(MAX_WRITES_PER_COMMIT) {
            let writes: Vec<fs::Write> = chunk.iter().map(|e| self.write(e)).collect();
            // Writing the same document again is harmless, so retrying is safe.
            let outcome = self.firestore.commit_idempotent("publish events", writes).await;
            let outcome = outcome.map_err(|e| format!("replicating the event failed ({e})"));
            results.extend(std::iter::repeat_n(outcome, chunk.len()));
        }
        results
    }

    fn write(&self, e: &AcceptedEvent) -> fs::Write {
        let name = self.firestore.document(COLLECTION, &e.event.id.to_hex());
        let document = fs::Document {
            name,
            fields: [
                ("json".to_string(), string_value(e.json.clone())),
                ("origin".to_string(), string_value(self.origin.clone())),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        use fs::document_transform::field_transform::{ServerValue, TransformType};
        fs::Write {
            operation: Some(fs::write::Operation::Update(document)),
            update_transforms: vec![fs::document_transform::FieldTransform {
                field_path: "written_at".into(),
                transform_type: Some(TransformType::SetToServerValue(ServerValue::RequestTime as i32)),
            }],
            ..Default::default()
        }
    }

    fn load_cursor(&self) -> Option<Cursor> {
        let text = std::fs::read_to_string(&self.cursor_file).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_cursor(&self, cursor: &Cursor) -> std::io::Result<()> {
        let tmp = self.cursor_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(cursor).expect("cursor serializes"))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.cursor_file)
    }

    /// The next page of the shared log after `cursor`.
    async fn page(&self, cursor: Option<&Cursor>) -> Result<Vec<fs::Document>, FirestoreError> {
        let start_at = cursor.map(|c| fs::Cursor {
            values: vec![
                fs::Value {
                    value_type: Some(fs::value::ValueType::TimestampValue(Timestamp {
                        seconds: c.seconds,
                        nanos: c.nanos,
                    })),
                },
                fs::Value { value_type: Some(fs::value::ValueType::ReferenceValue(c.name.clone())) },
            ],
            before: false,
        });
        let query = fs::StructuredQuery {
            from: vec![fs::structured_query::CollectionSelector {
                collection_id: self.firestore.collection(COLLECTION),
                all_descendants: false,
            }],
            order_by: vec![ascending("written_at"), ascending("__name__")],
            start_at,
            limit: Some(PAGE),
            ..Default::default()
        };
        let parent = self.firestore.documents();
        self.firestore.retry("follow events", |client| run_query(client, parent.clone(), query.clone(), None)).await
    }

    /// Writes an ephemeral event to the shared log, so other replicas deliver
    /// it to their live subscribers; failures are logged (ephemeral events
    /// are best effort).
    pub fn publish_ephemeral(self: &Arc<Self>, event: Arc<AcceptedEvent>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(Err(e)) = this.publish(&[event]).await.pop() {
                tracing::warn!(error = %e, "an ephemeral event was not replicated");
            }
        });
    }

    /// Applies other replicas' events until the relay stops.
    pub fn follow(self: Arc<Self>, ingest: Ingest, fanout: Arc<Fanout>, banned: Banned) {
        tokio::spawn(async move {
            let mut cursor = self.load_cursor();
            let mut backoff = self.poll_interval;
            loop {
                match self.page(cursor.as_ref()).await {
                    Ok(docs) if docs.is_empty() => {
                        backoff = self.poll_interval;
                        tokio::time::sleep(self.poll_interval).await;
                    }
                    Ok(docs) => {
                        backoff = self.poll_interval;
                        let full = docs.len() == PAGE as usize;
                        match self.apply(&ingest, &fanout, &banned, &docs).await {
                            Ok(next) => {
                                if let Err(e) = self.save_cursor(&next) {
                                    tracing::error!(error = %e, "saving the replication cursor failed");
                                }
                                cursor = Some(next);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "applying replicated events failed; retrying");
                                tokio::time::sleep(self.poll_interval).await;
                            }
                        }
                        if !full {
                            tokio::time::sleep(self.poll_interval).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading replicated events from Firestore failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
    }

    /// Applies one page; returns the cursor after it.
    async fn apply(
        &self,
        ingest: &Ingest,
        fanout: &Fanout,
        banned: &Banned,
        docs: &[fs::Document],
    ) -> Result<Cursor, String> {
        let mut pending = Vec::with_capacity(docs.len());
        let now = crate::event::unix_now() as i64;
        for doc in docs {
            let Some(json) = field_string(doc, "json") else { continue };
            let event: Event = match serde_json::from_str(json) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(doc = %doc.name, error = %e, "skipping an unreadable replicated event");
                    continue;
                }
            };
            if !event.verify_id() || !event.verify_signature() {
                tracing::warn!(doc = %doc.name, "skipping a replicated event with a bad id or signature");
                continue;
            }
            if banned(&event) {
                continue;
            }
            let mut accepted = AcceptedEvent::new(event);
            accepted.vanish_request = crate::event::is_vanish_request_for(&accepted.event, &self.public_url);
            accepted.replicated = true;
            if kind_class(accepted.event.kind.as_u16()) == KindClass::Ephemeral {
                let written = field_timestamp(doc, "written_at").map_or(0, |t| t.seconds);
                let own = field_string(doc, "origin") == Some(self.origin.as_str());
                if !own && now - written <= EPHEMERAL_MAX_AGE_SECONDS {
                    fanout.broadcast(0, &Arc::new(accepted));
                }
                continue;
            }
            pending.push(ingest.submit(Arc::new(accepted)).await);
        }
        for rx in pending {
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the event writer stopped".into()),
            }
        }
        let last = docs.last().expect("a page is not empty");
        let at = field_timestamp(last, "written_at").unwrap_or_default();
        Ok(Cursor { seconds: at.seconds, nanos: at.nanos, name: last.name.clone() })
    }
}

/// Reads events other replicas stored but this one has not applied yet.
#[async_trait]
impl crate::plugin::EventSource for Replicator {
    async fn fetch(&self, id: &[u8; 32]) -> Option<String> {
        let name = self.firestore.document(COLLECTION, &hex::encode(id));
        let doc = self
            .firestore
            .retry("fetch event", |mut client| {
                let request = fs::GetDocumentRequest { name: name.clone(), ..Default::default() };
                async move { call(client.get_document(request)).await }
            })
            .await
            .ok()?;
        field_string(&doc, "json").map(str::to_owned)
    }
}
