//! Event replication between relay replicas through Firestore.
//!
//! The mechanism (chosen for being simple to reason about and idempotent):
//! - **Publish**: the writer sends every event a client gave this replica to
//!   the `<prefix>events` collection (document id = event id, fields `json`
//!   and `written_at`, a server-assigned commit timestamp) *before* writing it
//!   locally and answering `OK`. An event whose Firestore write fails is not
//!   stored and gets `OK false "error: ..."`, so nothing acknowledged is
//!   missing from Firestore.
//! - **Follow**: each replica holds a Firestore Listen stream on the
//!   collection (no polling: an idle log costs nothing), verifies each event
//!   that arrives and applies it through its own writer (same NIP-01/09/62
//!   rules, live fan-out to its subscribers). Applying is idempotent: its own
//!   events come back as duplicates. The cursor is the `read_time` of the
//!   last consistent snapshot whose documents are all applied, saved in the
//!   data directory; Firestore documents that resuming a listen at a
//!   `read_time` delivers every document changed after it, so a replica that
//!   was down, or whose stream broke, resumes without a gap. (The earlier
//!   follower read in `written_at` order, a field commits do not become
//!   visible in: two commits in one millisecond could leave one behind it.)
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
    Firestore, FirestoreError, LISTEN_IDLE_TIMEOUT, ascending, field_filter, field_string, field_timestamp, run_query,
    string_value,
};
use crate::ingest::{Ingest, SharedLog};
use crate::refusal::{Refusal, RefusalKind};

pub mod log_document;
pub mod snapshot;
use log_document::Entry;

/// Where a replica saves its position in the shared log (see [`Cursor`]).
const CURSOR_FILE: &str = "replication-cursor.json";

const COLLECTION: &str = "events";
/// Firestore's limit of writes per commit.
const MAX_WRITES_PER_COMMIT: usize = 500;
/// Bytes of documents per commit: Firestore refuses requests over 10 MiB.
const MAX_BYTES_PER_COMMIT: usize = 8 * 1024 * 1024;
/// What one log document adds to its events' JSON in a commit request, at most.
const WRITE_OVERHEAD_BYTES: usize = 512;

/// Splits batch documents of these sizes, in order, into consecutive ranges
/// that each fit one commit.
fn commit_chunks(sizes: impl Iterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    log_document::chunks(sizes.map(|s| s + WRITE_OVERHEAD_BYTES), MAX_WRITES_PER_COMMIT, MAX_BYTES_PER_COMMIT)
}
/// Documents read per page of a query (an author's documents).
const PAGE: i32 = 500;
/// Most log documents a retraction looks for one event in.
const MAX_COPIES: i32 = 10;
/// The id of the one target on a Listen stream.
const LISTEN_TARGET: i32 = 1;
/// Longest wait for Firestore to accept a Listen stream.
const LISTEN_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Events handed to the writer before the follower waits for them.
const MAX_APPLYING: usize = 500;
/// Where a replica records the log's events its policy kept out.
const SKIPPED_FILE: &str = "replication-skipped.txt";
/// Most such events recorded (about 6.5 MB); beyond, new ones are not.
const MAX_SKIPPED: usize = 100_000;

/// The ids recorded in `path` (one hex id per line).
fn load_skipped(path: &Path) -> std::collections::BTreeSet<[u8; 32]> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut id = [0u8; 32];
            hex::decode_to_slice(l.trim(), &mut id).ok().map(|_| id)
        })
        .take(MAX_SKIPPED)
        .collect()
}

/// How long a replicated event refused for now is retried in place.
const ADMISSION_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// Longest wait before reconnecting a failing Listen stream.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// Longest a plugin's read of another replica's event waits on Firestore.
const FETCH_DEADLINE: Duration = Duration::from_secs(3);
/// How far before a polling follower's cursor its replica resumes.
const LEGACY_CURSOR_MARGIN_SECONDS: i64 = 60;
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

    /// Whether the event with this id is already stored here: a document
    /// delivered again (after a reconnect) then costs a lookup, not the
    /// checks and plugin calls of [`ReplicaAdmission::admit`].
    fn already_stored(&self, id: &[u8; 32]) -> bool;
}

/// Whether log documents are applied as they arrive (ephemeral events are
/// then delivered to live subscribers) or again, later (they are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    Yes,
    No,
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
    /// Longest a client event's publishing may take before it is refused.
    publish_timeout: Duration,
    /// How often this replica reconciles with the log (never when `None`).
    reconcile_interval: Option<Duration>,
    /// How far back a reconciliation looks (the whole log when `None`).
    reconcile_window: Option<Duration>,
    /// Events reconciliation found missing here and stored.
    pub repaired: std::sync::atomic::AtomicU64,
    /// Set once this replica has applied the whole log as of its first
    /// consistent snapshot since it started: until then it serves a partial
    /// store, and `/ready` says so.
    caught_up: std::sync::atomic::AtomicBool,
    /// Log documents applied since start.
    pub applied: std::sync::atomic::AtomicU64,
    /// Events of the log this replica's policy kept out (`blocked:`,
    /// `restricted:`), to apply again when the operator loosens the lists;
    /// kept in `skipped_file` across restarts, at most [`MAX_SKIPPED`].
    skipped: std::sync::Mutex<std::collections::BTreeSet<[u8; 32]>>,
    skipped_file: PathBuf,
    /// What the follower applies with, for [`Replicator::reapply_skipped`].
    applier: std::sync::OnceLock<(Ingest, Arc<Fanout>, Arc<dyn ReplicaAdmission>)>,
}

/// Where a replica is in the shared event log: the `read_time` of the last
/// consistent snapshot of the log whose every document it has applied.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Cursor {
    seconds: i64,
    nanos: i32,
    /// Written by the polling follower (before 2026-11-30): the document
    /// name of the last event applied, with `seconds`/`nanos` its commit time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    /// A consistent snapshot's `read_time` (false: a polling cursor).
    #[serde(default)]
    consistent: bool,
}

/// The cursor saved at `path`, if any.
fn read_cursor(path: &Path) -> Option<Cursor> {
    let text = std::fs::read_to_string(path).ok()?;
    let saved: Cursor = serde_json::from_str(&text).ok()?;
    if saved.consistent {
        return Some(saved);
    }
    // A cursor of the polling follower (before 2026-11-30): the commit
    // time of the last event it applied. Events committed a little
    // earlier may not have been visible to it then, so resume well
    // before; what comes again is applied as a duplicate.
    Some(Cursor { seconds: saved.seconds - LEGACY_CURSOR_MARGIN_SECONDS, nanos: 0, consistent: true, ..saved })
}

/// Saves `cursor` at `path` durably (written aside, synced, renamed).
fn write_cursor(path: &Path, cursor: &Cursor) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(cursor).expect("cursor serializes"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Replicator {
    /// A replicator; its background publisher runs on the current Tokio runtime.
    pub fn new(
        firestore: Firestore,
        public_url: String,
        data_dir: &Path,
        config: &crate::config::ReplicationConfig,
    ) -> Arc<Self> {
        let seconds = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let origin = hex::encode(rand::random::<[u8; 8]>());
        let (background, jobs) = tokio::sync::mpsc::channel(BACKGROUND_QUEUE);
        let this = Arc::new(Self {
            firestore,
            background,
            dropped_background: Default::default(),
            origin,
            public_url,
            cursor_file: data_dir.join(CURSOR_FILE),
            poll_interval: Duration::from_millis(config.poll_interval_ms),
            publish_timeout: Duration::from_millis(config.publish_timeout_ms),
            reconcile_interval: seconds(config.reconcile_interval_s),
            reconcile_window: seconds(config.reconcile_window_s),
            repaired: Default::default(),
            caught_up: Default::default(),
            applied: Default::default(),
            skipped: std::sync::Mutex::new(load_skipped(&data_dir.join(SKIPPED_FILE))),
            skipped_file: data_dir.join(SKIPPED_FILE),
            applier: Default::default(),
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

    /// Removes what `retraction` names from the shared log: each log
    /// document holding such an event is rewritten without it (deleted when
    /// nothing is left), on the condition that it did not change since it
    /// was read; a conflict starts the retraction over.
    async fn apply_retraction(&self, retraction: &Retraction) -> Result<(), FirestoreError> {
        const ATTEMPTS: usize = 3;
        let mut outcome = Ok(());
        for _ in 0..ATTEMPTS {
            outcome = self.try_retraction(retraction).await;
            if outcome.is_ok() {
                break;
            }
        }
        outcome
    }

    async fn try_retraction(&self, retraction: &Retraction) -> Result<(), FirestoreError> {
        use fs::structured_query::field_filter::Operator;
        let docs: Vec<fs::Document> = match retraction {
            Retraction::Events { ids, .. } => {
                let mut docs = std::collections::BTreeMap::new();
                for id in ids {
                    for doc in self.holding(id, MAX_COPIES).await? {
                        docs.insert(doc.name.clone(), doc);
                    }
                }
                docs.into_values().collect()
            }
            Retraction::Author { author, .. } => {
                let author = string_value(hex::encode(author));
                let mut docs = Vec::new();
                // Batch documents, then legacy ones.
                for filter in [
                    field_filter("pubkeys", Operator::ArrayContains, author.clone()),
                    field_filter("pubkey", Operator::Equal, author),
                ] {
                    let mut after: Option<String> = None;
                    loop {
                        let page = self.query_log(filter.clone(), after.as_deref(), PAGE).await?;
                        let full = page.len() == PAGE as usize;
                        after = page.last().map(|d| d.name.clone());
                        docs.extend(page);
                        if !full {
                            break;
                        }
                    }
                }
                docs
            }
        };
        let doomed = |entry: &Entry| -> bool {
            let Ok(event) = serde_json::from_str::<Event>(entry.json) else { return false };
            match retraction {
                Retraction::Events { ids, author } => {
                    entry.id.is_some_and(|id| ids.contains(&id))
                        && author.is_none_or(|author| {
                            // Its author's, or a gift wrap addressed to it (NIP-59).
                            event.pubkey.to_bytes() == author
                                || (event.kind.as_u16() == crate::event::GIFT_WRAP
                                    && crate::event::p_tags(&event).any(|p| p == author))
                        })
                }
                // A request to vanish stays: every replica must apply it.
                Retraction::Author { author, until } => {
                    event.pubkey.to_bytes() == *author
                        && event.kind.as_u16() != 62
                        && until.is_none_or(|u| event.created_at.as_secs() <= u)
                }
            }
        };
        let mut writes = Vec::new();
        let mut sizes = Vec::new();
        for doc in docs {
            let entries = log_document::entries(&doc);
            let kept: Vec<&Entry> = entries.iter().filter(|e| !doomed(e)).collect();
            if kept.len() == entries.len() {
                continue;
            }
            let unchanged = doc
                .update_time
                .map(|t| fs::Precondition { condition_type: Some(fs::precondition::ConditionType::UpdateTime(t)) });
            sizes.push(kept.iter().map(|e| e.json.len() + log_document::ENTRY_OVERHEAD_BYTES).sum::<usize>());
            writes.push(if kept.is_empty() {
                fs::Write {
                    operation: Some(fs::write::Operation::Delete(doc.name)),
                    current_document: unchanged,
                    ..Default::default()
                }
            } else {
                let fields = log_document::entry_fields(
                    kept.iter().map(|e| (e.id.map(hex::encode).unwrap_or_default(), e.json, e.pubkey)),
                );
                let mask = fields.keys().cloned().collect();
                fs::Write {
                    operation: Some(fs::write::Operation::Update(fs::Document {
                        name: doc.name,
                        fields,
                        ..Default::default()
                    })),
                    update_mask: Some(fs::DocumentMask { field_paths: mask }),
                    current_document: unchanged,
                    ..Default::default()
                }
            });
        }
        for range in commit_chunks(sizes.into_iter()) {
            // A repeated commit fails its preconditions: the caller starts over.
            self.firestore.commit_idempotent("retract events", writes[range].to_vec()).await?;
        }
        Ok(())
    }

    /// A page of the shared log's documents matching `filter`, by name after `after`.
    async fn query_log(
        &self,
        filter: fs::structured_query::Filter,
        after: Option<&str>,
        limit: i32,
    ) -> Result<Vec<fs::Document>, FirestoreError> {
        let query = fs::StructuredQuery {
            from: vec![fs::structured_query::CollectionSelector {
                collection_id: self.firestore.collection(COLLECTION),
                all_descendants: false,
            }],
            r#where: Some(filter),
            order_by: vec![ascending("__name__")],
            start_at: after.map(|name| fs::Cursor {
                values: vec![fs::Value { value_type: Some(fs::value::ValueType::ReferenceValue(name.to_owned())) }],
                before: false,
            }),
            limit: Some(limit),
            ..Default::default()
        };
        let parent = self.firestore.documents();
        let docs = self
            .firestore
            .retry("read the shared log", |client| run_query(client, parent.clone(), query.clone(), None))
            .await?;
        // A query that matches nothing is billed as one read.
        self.firestore.count_reads(docs.len().max(1));
        Ok(docs)
    }

    /// A log document holding event `id`, if the log holds it.
    async fn find(&self, id: &[u8; 32]) -> Result<Option<fs::Document>, FirestoreError> {
        Ok(self.holding(id, 1).await?.into_iter().next())
    }

    /// Up to `most` log documents holding event `id` (an event published
    /// again, after its first publish timed out, can be in two batches).
    async fn holding(&self, id: &[u8; 32], most: i32) -> Result<Vec<fs::Document>, FirestoreError> {
        use fs::structured_query::field_filter::Operator;
        let hex_id = hex::encode(id);
        let filter = field_filter("ids", Operator::ArrayContains, string_value(hex_id.clone()));
        let docs = self.query_log(filter, None, most).await?;
        if !docs.is_empty() {
            return Ok(docs);
        }
        // A legacy document, named by the event's id.
        let name = self.firestore.document(COLLECTION, &hex_id);
        Ok(self.firestore.get_document("read the shared log", &name).await?.into_iter().collect())
    }

    /// Writes client events to Firestore; returns, per event, `Ok` or why it
    /// could not be replicated. The events are split into commits that fit
    /// Firestore's limits (writes and bytes per request), committed side by
    /// side, and each commit, retries included, gets `publish_timeout` at
    /// most: past it, its events are refused (a commit that still lands
    /// later comes back through the listener and is stored then).
    pub async fn publish_events(&self, events: &[Arc<AcceptedEvent>]) -> Vec<Result<(), String>> {
        let documents = log_document::batches(events);
        let sizes = documents.iter().map(|r| {
            events[r.clone()].iter().map(|e| e.json.len() + log_document::ENTRY_OVERHEAD_BYTES).sum::<usize>()
        });
        let commits = commit_chunks(sizes);
        let outcomes = futures_util::future::join_all(commits.iter().map(|docs| {
            let writes: Vec<fs::Write> =
                documents[docs.clone()].iter().map(|r| self.write(&events[r.clone()])).collect();
            // Writing the same document again is harmless, so retrying is safe.
            let commit = self.firestore.commit_idempotent("publish events", writes);
            async move {
                match tokio::time::timeout(self.publish_timeout, commit).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("replicating the event failed ({e})")),
                    Err(_) => Err(format!(
                        "replicating the event failed (Firestore did not answer within {} ms)",
                        self.publish_timeout.as_millis()
                    )),
                }
            }
        }))
        .await;
        let mut results = Vec::with_capacity(events.len());
        for (docs, outcome) in commits.into_iter().zip(outcomes) {
            let published: usize = documents[docs].iter().map(|r| r.len()).sum();
            results.extend(std::iter::repeat_n(outcome, published));
        }
        results
    }

    /// The write of one batch document holding `events`.
    fn write(&self, events: &[Arc<AcceptedEvent>]) -> fs::Write {
        let name = self.firestore.document(COLLECTION, &log_document::batch_id(events));
        let mut fields = log_document::batch_fields(events);
        fields.insert("origin".to_string(), string_value(self.origin.clone()));
        if events.iter().all(|e| kind_class(e.event.kind.as_u16()) == KindClass::Ephemeral) {
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
        read_cursor(&self.cursor_file)
    }

    fn save_cursor(&self, cursor: &Cursor) -> std::io::Result<()> {
        write_cursor(&self.cursor_file, cursor)
    }

    /// The listen target: every document of the shared log, changed after
    /// `cursor` when given (else all of them, then every later change).
    fn target(&self, cursor: Option<&Cursor>) -> fs::Target {
        use fs::target::{QueryTarget, ResumeType, TargetType, query_target};
        let query = fs::StructuredQuery {
            from: vec![fs::structured_query::CollectionSelector {
                collection_id: self.firestore.collection(COLLECTION),
                all_descendants: false,
            }],
            ..Default::default()
        };
        fs::Target {
            target_id: LISTEN_TARGET,
            target_type: Some(TargetType::Query(QueryTarget {
                parent: self.firestore.documents(),
                query_type: Some(query_target::QueryType::StructuredQuery(query)),
            })),
            resume_type: cursor.map(|c| ResumeType::ReadTime(Timestamp { seconds: c.seconds, nanos: c.nanos })),
            ..Default::default()
        }
    }

    /// Records an event of the log this replica's policy kept out.
    fn remember_skipped(&self, id: [u8; 32]) {
        let mut skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        if skipped.len() >= MAX_SKIPPED || !skipped.insert(id) {
            return;
        }
        use std::io::Write as _;
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.skipped_file)
            .and_then(|mut f| writeln!(f, "{}", hex::encode(id)));
        if let Err(e) = appended {
            tracing::warn!(error = %e, "recording an event kept out by policy failed");
        }
    }

    /// Applies again the log's events this replica's policy kept out (after
    /// the operator lifted a ban or widened an allow list): each is read
    /// from the log and checked anew; those still kept out stay recorded.
    /// Returns how many were stored.
    pub async fn reapply_skipped(&self) -> usize {
        let Some((ingest, fanout, checks)) = self.applier.get() else { return 0 };
        let ids: Vec<[u8; 32]> =
            std::mem::take(&mut *self.skipped.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        let _ = std::fs::remove_file(&self.skipped_file);
        let mut stored = 0;
        for id in ids {
            let found = self.find(&id).await;
            let entry = found.as_ref().map(|doc| {
                doc.as_ref()
                    .and_then(|doc| log_document::entries(doc).into_iter().find(|e| e.id == Some(id)).map(|e| (doc, e)))
            });
            match entry {
                Ok(Some((doc, entry))) => {
                    match self.apply_entry(doc, &entry, ingest, fanout, checks.as_ref(), Live::No).await {
                        Ok(Some(written)) => stored += usize::from(matches!(written.await, Ok(Ok(_)))),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "re-applying an event kept out by policy failed");
                            self.remember_skipped(id);
                        }
                    }
                }
                // Gone from the log (deleted, retracted): nothing to apply.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading an event kept out by policy failed");
                    self.remember_skipped(id);
                }
            }
        }
        if stored > 0 {
            tracing::info!(stored, "events kept out by the operator's lists were applied after the lists changed");
        }
        stored
    }

    /// Whether this replica has applied the whole shared log as it stood at
    /// its first consistent snapshot since start.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes an ephemeral event to the shared log, so other replicas deliver
    /// it to their live subscribers; failures are logged (ephemeral events
    /// are best effort).
    pub fn publish_ephemeral(&self, event: Arc<AcceptedEvent>) {
        self.queue(Background::Ephemeral(event));
    }

    /// Applies other replicas' events until the relay stops.
    pub fn follow(self: Arc<Self>, ingest: Ingest, fanout: Arc<Fanout>, checks: Arc<dyn ReplicaAdmission>) {
        let _ = self.applier.set((ingest.clone(), fanout.clone(), checks.clone()));
        if let Some(interval) = self.reconcile_interval {
            tokio::spawn(self.clone().reconcile_every(interval));
        }
        tokio::spawn(async move {
            let mut cursor = self.load_cursor();
            let mut backoff = self.poll_interval;
            loop {
                let before = cursor.clone();
                let mut heard = false;
                let error = self.listen(&mut cursor, &mut heard, &ingest, &fanout, checks.as_ref()).await;
                tracing::warn!(error = %error, "following the shared event log stopped; reconnecting");
                // A stream that was answered, or made progress, reconnects
                // soon; one that cannot be opened backs off.
                backoff =
                    if heard || cursor != before { self.poll_interval } else { (backoff * 2).min(MAX_RECONNECT_DELAY) };
                tokio::time::sleep(backoff).await;
            }
        });
    }

    /// One Listen stream on the shared log, from `cursor`: applies each
    /// document as it arrives and moves `cursor` (saved to disk) to every
    /// consistent snapshot once all it holds is applied. Firestore
    /// guarantees that a snapshot at `read_time` reflects every commit up to
    /// it, and that resuming at a `read_time` delivers every document
    /// changed after it, so no commit is ever skipped, whatever order the
    /// commits became visible in. Returns why the stream ended.
    async fn listen(
        &self,
        cursor: &mut Option<Cursor>,
        heard: &mut bool,
        ingest: &Ingest,
        fanout: &Fanout,
        checks: &dyn ReplicaAdmission,
    ) -> String {
        use fs::listen_response::ResponseType;
        use fs::target_change::TargetChangeType;
        use futures_util::StreamExt;
        let started = std::time::Instant::now();
        let mut responses = match self.open_listen(self.target(cursor.as_ref())).await {
            Ok(responses) => responses,
            Err(e) => return e,
        };
        tracing::info!(
            resume_at = ?cursor.as_ref().map(|c| (c.seconds, c.nanos)),
            open_ms = started.elapsed().as_millis() as u64,
            "following the shared event log"
        );
        // Events handed to the writer since the last consistent snapshot.
        let mut applying = Vec::new();
        let mut caught_up = false;
        loop {
            let response = match tokio::time::timeout(LISTEN_IDLE_TIMEOUT, responses.next()).await {
                Ok(Some(Ok(r))) => {
                    *heard = true;
                    r
                }
                Ok(Some(Err(status))) => return format!("{:?}: {}", status.code(), status.message()),
                Ok(None) => return "the stream ended".into(),
                // A connection that died without a word: resuming is cheap.
                Err(_) => return format!("nothing heard for {} s", LISTEN_IDLE_TIMEOUT.as_secs()),
            };
            match response.response_type {
                Some(ResponseType::DocumentChange(change)) => {
                    self.firestore.count_delivered();
                    let Some(doc) = change.document else { continue };
                    match self.apply(&doc, ingest, fanout, checks, Live::Yes).await {
                        Ok(written) => applying.extend(written),
                        // Not applied yet, and the cursor stays before it:
                        // the next stream delivers it again.
                        Err(e) => return e,
                    }
                    if applying.len() >= MAX_APPLYING
                        && let Err(e) = Self::applied(&mut applying).await
                    {
                        return e;
                    }
                }
                Some(ResponseType::TargetChange(change)) => {
                    let kind =
                        TargetChangeType::try_from(change.target_change_type).unwrap_or(TargetChangeType::NoChange);
                    if kind == TargetChangeType::Remove {
                        let cause = change.cause.map(|c| c.message).unwrap_or_default();
                        return format!("Firestore removed the listen target ({cause})");
                    }
                    let consistent = kind == TargetChangeType::NoChange && change.target_ids.is_empty();
                    let Some(read_time) = change.read_time.filter(|_| consistent) else { continue };
                    if let Err(e) = Self::applied(&mut applying).await {
                        return e;
                    }
                    if !caught_up {
                        caught_up = true;
                        self.caught_up.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            read_time = ?(read_time.seconds, read_time.nanos),
                            "caught up with the shared event log"
                        );
                    }
                    let next = Cursor {
                        seconds: read_time.seconds,
                        nanos: read_time.nanos,
                        consistent: true,
                        ..Default::default()
                    };
                    if cursor.as_ref() != Some(&next) {
                        if let Err(e) = self.save_cursor(&next) {
                            tracing::error!(error = %e, "saving the replication cursor failed");
                        }
                        *cursor = Some(next);
                    }
                }
                // Removals from the log need nothing here: every replica
                // keeps the tombstones of what was deleted.
                Some(ResponseType::DocumentDelete(_) | ResponseType::DocumentRemove(_) | ResponseType::Filter(_))
                | None => {}
            }
        }
    }

    /// A Listen stream on `target`.
    async fn open_listen(
        &self,
        target: fs::Target,
    ) -> Result<firestore::gcloud_sdk::tonic::Streaming<fs::ListenResponse>, String> {
        use futures_util::StreamExt;
        let request = fs::ListenRequest {
            database: self.firestore.database(),
            target_change: Some(fs::listen_request::TargetChange::AddTarget(target)),
            ..Default::default()
        };
        // The request side stays open: closing it would end the stream.
        let requests = futures_util::stream::once(async move { request }).chain(futures_util::stream::pending());
        let mut client = self.firestore.client();
        match tokio::time::timeout(LISTEN_OPEN_TIMEOUT, client.listen(requests)).await {
            Ok(Ok(responses)) => Ok(responses.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {} s", LISTEN_OPEN_TIMEOUT.as_secs())),
        }
    }

    /// Reconciles this replica with the shared log every `interval`, once it
    /// has caught up (until then its follower is replaying the log anyway).
    async fn reconcile_every(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if !self.caught_up() {
                continue;
            }
            match self.reconcile().await {
                Ok((documents, 0)) => tracing::debug!(documents, "reconciled with the shared event log"),
                Ok((documents, repaired)) => tracing::warn!(
                    documents,
                    repaired,
                    "reconciling with the shared event log found events missing here; they are stored now"
                ),
                Err(e) => tracing::warn!(error = %e, "reconciling with the shared event log failed; next time"),
            }
        }
    }

    /// One reconciliation: reads every document of the shared log changed in
    /// the last `reconcile_window` (the whole log when there is none), with
    /// a Listen target that ends once consistent, and applies every event
    /// this replica lacks (those it holds cost a lookup). This repairs what
    /// the follower could have missed (a lost cursor, a store restored from
    /// an older copy) without trusting it. Returns the documents read and
    /// the events stored.
    pub async fn reconcile(&self) -> Result<(usize, usize), String> {
        use fs::listen_response::ResponseType;
        use fs::target_change::TargetChangeType;
        use futures_util::StreamExt;
        let Some((ingest, fanout, checks)) = self.applier.get() else { return Ok((0, 0)) };
        let since = self.reconcile_window.map(|window| {
            let at = std::time::SystemTime::now() - window;
            let at = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Cursor {
                seconds: at.as_secs() as i64,
                nanos: at.subsec_nanos() as i32,
                consistent: true,
                ..Default::default()
            }
        });
        let mut target = self.target(since.as_ref());
        target.once = true;
        let mut responses = self.open_listen(target).await?;
        let (mut documents, mut applying) = (0, Vec::new());
        loop {
            let response = match tokio::time::timeout(LISTEN_IDLE_TIMEOUT, responses.next()).await {
                Ok(Some(Ok(r))) => r,
                Ok(Some(Err(status))) => return Err(format!("{:?}: {}", status.code(), status.message())),
                Ok(None) => return Err("the stream ended".into()),
                Err(_) => return Err(format!("nothing heard for {} s", LISTEN_IDLE_TIMEOUT.as_secs())),
            };
            match response.response_type {
                Some(ResponseType::DocumentChange(change)) => {
                    self.firestore.count_delivered();
                    documents += 1;
                    let Some(doc) = change.document else { continue };
                    applying.extend(self.apply(&doc, ingest, fanout, checks.as_ref(), Live::No).await?);
                }
                Some(ResponseType::TargetChange(change)) => {
                    let kind =
                        TargetChangeType::try_from(change.target_change_type).unwrap_or(TargetChangeType::NoChange);
                    let consistent = kind == TargetChangeType::NoChange && change.target_ids.is_empty();
                    if kind == TargetChangeType::Remove || (consistent && change.read_time.is_some()) {
                        break;
                    }
                }
                _ => {}
            }
        }
        let mut stored = 0;
        for rx in applying {
            match rx.await {
                Ok(Ok(crate::store::WriteOutcome::Stored)) => stored += 1,
                Ok(_) => {}
                Err(_) => return Err("the event writer stopped".into()),
            }
        }
        self.repaired.fetch_add(stored as u64, std::sync::atomic::Ordering::Relaxed);
        Ok((documents, stored))
    }

    /// Waits until every event in `applying` is written (or refused) here.
    async fn applied(
        applying: &mut Vec<tokio::sync::oneshot::Receiver<crate::ingest::WriteResult>>,
    ) -> Result<(), String> {
        for rx in applying.drain(..) {
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the event writer stopped".into()),
            }
        }
        Ok(())
    }

    /// Applies the events of one document of the shared log, returning the
    /// writes' receivers; `Err` when one cannot be applied yet (the document
    /// comes again, and what it applied is then skipped as already stored).
    async fn apply(
        &self,
        doc: &fs::Document,
        ingest: &Ingest,
        fanout: &Fanout,
        checks: &dyn ReplicaAdmission,
        live: Live,
    ) -> Result<Vec<tokio::sync::oneshot::Receiver<crate::ingest::WriteResult>>, String> {
        let mut written = Vec::new();
        for entry in log_document::entries(doc) {
            written.extend(self.apply_entry(doc, &entry, ingest, fanout, checks, live).await?);
        }
        Ok(written)
    }

    /// Applies one event of log document `doc`: checks it, delivers an
    /// ephemeral one live, hands any other to the writer (returning the
    /// write's receiver). `Err` when it cannot be applied yet.
    async fn apply_entry(
        &self,
        doc: &fs::Document,
        entry: &Entry<'_>,
        ingest: &Ingest,
        fanout: &Fanout,
        checks: &dyn ReplicaAdmission,
        live: Live,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<crate::ingest::WriteResult>>, String> {
        if entry.id.is_some_and(|id| checks.already_stored(&id)) {
            return Ok(None);
        }
        // A refusal that may pass later (a plugin busy, or its state out of
        // reach) is retried here, on the open stream, before giving up on it
        // (the stream then reopens at the cursor, which is before it).
        let mut wait = Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + ADMISSION_RETRY_WINDOW;
        let event = loop {
            match checks.admit(entry.json).await {
                Ok(event) => break event,
                Err(refusal) if refusal.retry_later && tokio::time::Instant::now() + wait < give_up => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(refusal) if refusal.retry_later => {
                    return Err(format!("a replicated event cannot be applied yet: {}", refusal.message));
                }
                Err(refusal) => {
                    tracing::info!(doc = %doc.name, refusal = ?refusal, "a replicated event is refused on this replica");
                    if let Some(id) = entry.id
                        && matches!(refusal.kind, RefusalKind::Blocked | RefusalKind::Restricted)
                    {
                        self.remember_skipped(id);
                    }
                    return Ok(None);
                }
            }
        };
        let mut accepted = AcceptedEvent::new(event);
        accepted.vanish_request = crate::event::is_vanish_request_for(&accepted.event, &self.public_url);
        accepted.replicated = true;
        accepted.from_this_replica = field_string(doc, "origin") == Some(self.origin.as_str());
        if kind_class(accepted.event.kind.as_u16()) == KindClass::Ephemeral {
            let written = field_timestamp(doc, "written_at").map_or(0, |t| t.seconds);
            if live == Live::Yes
                && !accepted.from_this_replica
                && crate::event::unix_now() as i64 - written <= EPHEMERAL_MAX_AGE_SECONDS
            {
                fanout.broadcast(0, &Arc::new(accepted));
            }
            return Ok(None);
        }
        self.applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(ingest.submit(Arc::new(accepted)).await))
    }
}

impl Replicator {
    /// Reads an event other replicas stored, which this one may not have
    /// applied yet (its JSON, unchecked): `None` when the shared log does not
    /// hold it, an error when Firestore could not say within
    /// [`FETCH_DEADLINE`] (a plugin call waits on this).
    pub async fn fetch(&self, id: &[u8; 32]) -> Result<Option<String>, FirestoreError> {
        let doc = tokio::time::timeout(FETCH_DEADLINE, self.find(id))
            .await
            .map_err(|_| FirestoreError::Unavailable(format!("no answer within {} s", FETCH_DEADLINE.as_secs())))??;
        Ok(doc.and_then(|doc| {
            log_document::entries(&doc).into_iter().find(|e| e.id == Some(*id)).map(|e| e.json.to_owned())
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stay_under_firestores_write_and_byte_limits() {
        assert_eq!(commit_chunks([100; 1001].into_iter()), vec![0..500, 500..1000, 1000..1001]);
        // Batch documents of up to 900 KiB: nine fit in 8 MiB.
        let full = log_document::MAX_JSON_BYTES_PER_DOCUMENT;
        let big = commit_chunks([full; 20].into_iter());
        assert!(big.iter().all(|r| r.len() * (full + WRITE_OVERHEAD_BYTES) <= MAX_BYTES_PER_COMMIT));
        assert_eq!(big.iter().map(|r| r.len()).sum::<usize>(), 20);
        assert_eq!(big[0], 0..9);
    }
}
