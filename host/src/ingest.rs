//! The write path: one thread that takes accepted events from every
//! connection, writes them to the store in group commits (many events per
//! flush), then fans them out and answers each sender. No `OK true` is sent
//! before the batch holding its event is durable.
//!
//! With replication, a client's event first passes the publisher: a task
//! that writes batches of them to the shared log (several batches in flight)
//! and hands each published event on to the writer. The writer thread never
//! waits on Firestore, so events from other replicas are stored while a
//! publish is slow, and a publish that fails refuses only its own events.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::event::AcceptedEvent;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::store::{EventStore, WriteOutcome};

/// The log replicas share, as the writer sees it (implemented by
/// `replication::Replicator`): client events go there before they are
/// stored here, and stored deletions clear what they delete from it.
#[async_trait::async_trait]
pub trait SharedLog: Send + Sync {
    /// Publishes client events; one outcome per event, in order. An `Err`
    /// refuses its event, which is then not stored here either.
    async fn publish(&self, events: &[Arc<AcceptedEvent>]) -> Vec<Result<(), String>>;
    /// A client event of this replica was stored: a deletion or a request
    /// to vanish also clears the shared log (once, by this replica).
    fn stored(&self, event: &AcceptedEvent);
}

/// Queue depth in front of the writer; senders wait when it is full.
const QUEUE_DEPTH: usize = 16 * 1024;
/// Most client events published to the shared log in one batch.
const MAX_PUBLISH_BATCH: usize = 500;
/// Publish batches awaiting the shared log at once.
const PUBLISHES_IN_FLIGHT: usize = 4;

/// The result a connection receives for one submitted event.
pub type WriteResult = Result<WriteOutcome, String>;

struct Job {
    event: Arc<AcceptedEvent>,
    reply: oneshot::Sender<WriteResult>,
    submitted: std::time::Instant,
}

#[derive(Clone)]
pub struct Ingest {
    /// The writer's queue.
    tx: mpsc::Sender<Job>,
    /// The publisher's queue, with replication: where client events go first.
    publish: Option<mpsc::Sender<Job>>,
}

impl Ingest {
    /// Starts the writer thread. It ends when every [`Ingest`] handle is dropped.
    /// With `shared_log`, client events are written to it before the local
    /// store; must be called inside a Tokio runtime, which those writes use.
    pub fn start(
        store: Arc<dyn EventStore>,
        fanout: Arc<Fanout>,
        max_batch: usize,
        metrics: Arc<Metrics>,
        shared_log: Option<Arc<dyn SharedLog>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let publish = shared_log.as_ref().map(|log| {
            let (publish, jobs) = mpsc::channel(QUEUE_DEPTH);
            tokio::spawn(publisher(jobs, log.clone(), tx.clone()));
            publish
        });
        std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || writer_loop(rx, store.as_ref(), &fanout, max_batch, &metrics, shared_log.as_deref()))?;
        Ok(Self { tx, publish })
    }

    /// Queues `event` for storage; the receiver resolves once it is durable
    /// (or refused).
    pub async fn submit(&self, event: Arc<AcceptedEvent>) -> oneshot::Receiver<WriteResult> {
        let (reply, rx) = oneshot::channel();
        let queue = match &self.publish {
            Some(publish) if !event.replicated => publish,
            _ => &self.tx,
        };
        if let Err(mpsc::error::SendError(job)) =
            queue.send(Job { event, reply, submitted: std::time::Instant::now() }).await
        {
            let _ = job.reply.send(Err("the event writer has stopped".into()));
        }
        rx
    }
}

/// Publishes client events to the shared log in batches, then queues each
/// published one for the writer; one that could not be published is refused
/// here and never stored.
async fn publisher(mut jobs: mpsc::Receiver<Job>, shared_log: Arc<dyn SharedLog>, writer: mpsc::Sender<Job>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISHES_IN_FLIGHT));
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_PUBLISH_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let (shared_log, writer) = (shared_log.clone(), writer.clone());
        tokio::spawn(async move {
            let events: Vec<Arc<AcceptedEvent>> = batch.iter().map(|j| j.event.clone()).collect();
            let outcomes = shared_log.publish(&events).await;
            drop(permit);
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => {
                        if let Err(mpsc::error::SendError(job)) = writer.send(job).await {
                            let _ = job.reply.send(Err("the event writer has stopped".into()));
                        }
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
        });
    }
}

fn writer_loop(
    mut rx: mpsc::Receiver<Job>,
    store: &dyn EventStore,
    fanout: &Fanout,
    max_batch: usize,
    metrics: &Metrics,
    shared_log: Option<&dyn SharedLog>,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let events: Vec<Arc<AcceptedEvent>> = jobs.iter().map(|j| j.event.clone()).collect();
        let first_seq = fanout.reserve_seqs(events.len() as u64);
        metrics.write_batch_events.observe(events.len() as f64);
        match store.write_batch(&events) {
            Ok(outcomes) => {
                for (i, (job, outcome)) in jobs.drain(..).zip(outcomes).enumerate() {
                    metrics.write_seconds.observe(job.submitted.elapsed().as_secs_f64());
                    if outcome == WriteOutcome::Stored {
                        fanout.broadcast(first_seq + i as u64, &job.event);
                        if let Some(shared_log) = shared_log
                            && job.event.from_this_replica
                        {
                            shared_log.stored(&job.event);
                        }
                    }
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = jobs.len(), "writing a batch failed");
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(format!("storage failed: {e}")));
                }
            }
        }
        fanout.mark_broadcast(first_seq + events.len() as u64 - 1);
    }
}
