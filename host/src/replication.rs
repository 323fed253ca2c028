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
    Firestore, FirestoreError, ascending, call, field_filter, field_string, field_timestamp, run_query, string_value,
};
use crate::ingest::{Ingest, SharedLog};
use crate::refusal::Refusal;

const COLLECTION: &str = "events";
/// Firestore's limit of writes per commit.
const MAX_WRITES_PER_COMMIT: usize = 500;
/// Documents fetched per poll.
const PAGE: i32 = 500;
/// Ephemeral events from other replicas older than this are not delivered
/// (a replica catching up does not replay old ephemeral traffic).
const EPHEMERAL_MAX_AGE_SECONDS: i64 = 30;
/// Ephemeral documents carry `expire_at` this far ahead, for a Firestore TTL
/// policy on that field to delete them (see the operator guide).
const EPHEMERAL_TTL_SECONDS: i64 = 600;
/// Background jobs (ephemeral events, retractions) waiting for Firestore.
/// Beyond this, new ones are dropped and counted: a slow Firestore never
/// grows the relay's memory or tasks.
const BACKGROUND_QUEUE: usize = 4096;

/// The checks an event from another replica passes before it is applied:
/// the same as a client's event (limits, NIP-40, access lists and bans,
/// plugins' `on-event`), less what needs the client's connection (rate
/// limits, NIP-42 and NIP-70, which the origin replica applied).
#[async_trait]
pub trait ReplicaAdmission: Send + Sync {
    /// The event, checked, or the refusal. A refusal that may pass later
    /// ([`Refusal::retry_later`]: a failure, or a plugin with no free
    /// instance) stops the page, to be applied again; any other refusal
    /// (other rate limits were the origin replica's to give) skips the event
    /// on this replica.
    async fn admit(&self, json: &str) -> Result<Event, Refusal>;
}

/// Work published off the writer's path, by one background task.
enum Background {
    /// An ephemeral event for other replicas' live subscribers.
    Ephemeral(Arc<AcceptedEvent>),
    /// Remove documents from the shared log: an operator's ban, a NIP-09
    /// deletion or a NIP-62 request to vanish this replica applied.
    Retract(Retraction),
}

/// Which documents of the shared log to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retraction {
    /// These events, when `author` wrote them (any author when `None`).
    Events { ids: Vec<[u8; 32]>, author: Option<[u8; 32]> },
    /// Everything `author` published (up to `until`, when given).
    Author { author: [u8; 32], until: Option<u64> },
}

impl Retraction {
    /// What a stored client event asks to remove from the shared log, if
    /// anything: a deletion's `e` targets, a request to vanish's author.
    pub fn of(accepted: &AcceptedEvent) -> Option<Self> {
        let event = &accepted.event;
        let author = event.pubkey.to_bytes();
        match event.kind.as_u16() {
            5 => {
                let ids: Vec<[u8; 32]> = event
                    .tags
                    .iter()
                    .map(|t| t.as_slice())
                    .filter(|t| t.len() >= 2 && t[0] == "e")
                    .filter_map(|t| {
                        let mut id = [0u8; 32];
                        hex::decode_to_slice(&t[1], &mut id).ok().map(|_| id)
                    })
                    .collect();
                (!ids.is_empty()).then_some(Retraction::Events { ids, author: Some(author) })
            }
            62 if accepted.vanish_request => {
                Some(Retraction::Author { author, until: Some(event.created_at.as_secs()) })
            }
            _ => None,
        }
    }
}

pub struct Replicator {
    firestore: Firestore,
    background: tokio::sync::mpsc::Sender<Background>,
    /// Background jobs dropped because the queue was full.
    pub dropped_background: std::sync::atomic::AtomicU64,
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
    /// A replicator; its background publisher runs on the current Tokio runtime.
    pub fn new(firestore: Firestore, public_url: String, data_dir: &Path, poll_interval: Duration) -> Arc<Self> {
        let origin = hex::encode(rand::random::<[u8; 8]>());
        let (background, jobs) = tokio::sync::mpsc::channel(BACKGROUND_QUEUE);
        let this = Arc::new(Self {
            firestore,
            background,
            dropped_background: Default::default(),
            origin,
            public_url,
            cursor_file: data_dir.join("replication-cursor.json"),
            poll_interval,
        });
        tokio::spawn(Self::run_background(Arc::downgrade(&this), jobs));
        this
    }

    fn queue(&self, job: Background) {
        if self.background.try_send(job).is_err() {
            let n = self.dropped_background.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "Firestore is slow: background replication work was dropped");
            }
        }
    }

    /// Removes documents from the shared log in the background (best effort:
    /// every replica also keeps the tombstones that refuse them).
    pub fn retract(&self, retraction: Retraction) {
        self.queue(Background::Retract(retraction));
    }

    /// One task publishes the ephemeral events (in batches) and applies the
    /// retractions queued, in order.
    async fn run_background(this: std::sync::Weak<Self>, mut jobs: tokio::sync::mpsc::Receiver<Background>) {
        while let Some(first) = jobs.recv().await {
            let Some(this) = this.upgrade() else { return };
            let mut ephemeral = Vec::new();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Background::Ephemeral(e) => ephemeral.push(e),
                    Background::Retract(r) => {
                        if let Err(e) = this.apply_retraction(&r).await {
                            tracing::warn!(error = %e, retraction = ?r, "removing events from the shared log failed");
                        }
                    }
                }
                if ephemeral.len() < MAX_WRITES_PER_COMMIT {
                    next = jobs.try_recv().ok();
                }
            }
            if !ephemeral.is_empty()
                && let Some(Err(e)) = this.publish_events(&ephemeral).await.into_iter().find(Result::is_err)
            {
                tracing::warn!(error = %e, events = ephemeral.len(), "ephemeral events were not replicated");
            }
        }
    }

    async fn apply_retraction(&self, retraction: &Retraction) -> Result<(), FirestoreError> {
        let doomed: Vec<String> = match retraction {
            Retraction::Events { ids, author } => {
                let mut names = Vec::new();
                for id in ids {
                    let name = self.firestore.document(COLLECTION, &hex::encode(id));
                    let wanted = match author {
                        None => true,
                        // Its author's, or a gift wrap addressed to it (NIP-59).
                        Some(author) => self.fetch(id).await.is_some_and(|json| {
                            serde_json::from_str::<Event>(&json).is_ok_and(|e| {
                                e.pubkey.to_bytes() == *author
                                    || (e.kind.as_u16() == crate::event::GIFT_WRAP
                                        && crate::event::p_tags(&e).any(|p| p == *author))
                            })
                        }),
                    };
                    if wanted {
                        names.push(name);
                    }
                }
                names
            }
            Retraction::Author { author, until } => {
                let mut names = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page = self.by_author(author, after.as_deref()).await?;
                    let full = page.len() == PAGE as usize;
                    after = page.last().map(|d| d.name.clone());
                    for doc in page {
                        let event = field_string(&doc, "json").and_then(|j| serde_json::from_str::<Event>(j).ok());
                        // A request to vanish stays: every replica must apply it.
                        let keep = event.as_ref().is_some_and(|e| {
                            e.kind.as_u16() == 62 || until.is_some_and(|u| e.created_at.as_secs() > u)
                        });
                        if !keep {
                            names.push(doc.name);
                        }
                    }
                    if !full {
                        break;
                    }
                }
                names
            }
        };
        for chunk in doomed.chunks(MAX_WRITES_PER_COMMIT) {
            let writes = chunk
                .iter()
                .map(|name| fs::Write {
                    operation: Some(fs::write::Operation::Delete(name.clone())),
                    ..Default::default()
                })
                .collect();
            self.firestore.commit_idempotent("retract events", writes).await?;
        }
        Ok(())
    }

    /// A page of the shared log's documents by `author`, after document `after`.
    async fn by_author(&self, author: &[u8; 32], after: Option<&str>) -> Result<Vec<fs::Document>, FirestoreError> {
        use fs::structured_query::field_filter::Operator;
        let query = fs::StructuredQuery {
            from: vec![fs::structured_query::CollectionSelector {
                collection_id: self.firestore.collection(COLLECTION),
                all_descendants: false,
            }],
            r#where: Some(field_filter("pubkey", Operator::Equal, string_value(hex::encode(author)))),
            order_by: vec![ascending("__name__")],
            start_at: after.map(|name| fs::Cursor {
                values: vec![fs::Value { value_type: Some(fs::value::ValueType::ReferenceValue(name.to_owned())) }],
                before: false,
            }),
            limit: Some(PAGE),
            ..Default::default()
        };
        let parent = self.firestore.documents();
        self.firestore.retry("events by author", |client| run_query(client, parent.clone(), query.clone(), None)).await
    }

    /// Writes client events to Firestore; returns, per event, `Ok` or why it
    /// could not be replicated. Called from the writer thread.
    pub async fn publish_events(&self, events: &[Arc<AcceptedEvent>]) -> Vec<Result<(), String>> {
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
        let mut fields: std::collections::HashMap<String, fs::Value> = [
            ("json".to_string(), string_value(e.json.clone())),
            ("origin".to_string(), string_value(self.origin.clone())),
            // Lets a ban or a request to vanish find an author's documents.
            ("pubkey".to_string(), string_value(e.event.pubkey.to_hex())),
        ]
        .into_iter()
        .collect();
        if kind_class(e.event.kind.as_u16()) == KindClass::Ephemeral {
            let expire_at = Timestamp { seconds: crate::event::unix_now() as i64 + EPHEMERAL_TTL_SECONDS, nanos: 0 };
            fields.insert(
                "expire_at".to_string(),
                fs::Value { value_type: Some(fs::value::ValueType::TimestampValue(expire_at)) },
            );
        }
        let document = fs::Document { name, fields, ..Default::default() };
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
    pub fn publish_ephemeral(&self, event: Arc<AcceptedEvent>) {
        self.queue(Background::Ephemeral(event));
    }

    /// Applies other replicas' events until the relay stops.
    pub fn follow(self: Arc<Self>, ingest: Ingest, fanout: Arc<Fanout>, checks: Arc<dyn ReplicaAdmission>) {
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
                        match self.apply(&ingest, &fanout, checks.as_ref(), &docs).await {
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
        checks: &dyn ReplicaAdmission,
        docs: &[fs::Document],
    ) -> Result<Cursor, String> {
        let mut pending = Vec::with_capacity(docs.len());
        let now = crate::event::unix_now() as i64;
        for doc in docs {
            let Some(json) = field_string(doc, "json") else { continue };
            let event = match checks.admit(json).await {
                Ok(event) => event,
                Err(refusal) if refusal.retry_later => {
                    // Nothing after this document is applied yet; the page is read again.
                    for rx in pending {
                        let _ = rx.await;
                    }
                    return Err(format!("a replicated event cannot be applied yet: {}", refusal.message));
                }
                Err(refusal) => {
                    tracing::info!(doc = %doc.name, refusal = ?refusal, "a replicated event is refused on this replica");
                    continue;
                }
            };
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

impl Replicator {
    /// Reads an event other replicas stored, which this one may not have
    /// applied yet (its JSON, unchecked).
    pub async fn fetch(&self, id: &[u8; 32]) -> Option<String> {
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

/// The writer's view of replication (see [`SharedLog`]).
#[async_trait]
impl SharedLog for Replicator {
    async fn publish(&self, events: &[Arc<AcceptedEvent>]) -> Vec<Result<(), String>> {
        self.publish_events(events).await
    }

    fn stored(&self, event: &AcceptedEvent) {
        if let Some(retraction) = Retraction::of(event) {
            self.retract(retraction);
        }
    }
}
