//! The write path: one thread that takes accepted events from every
//! connection, writes them to the store in group commits (many events per
//! flush), then fans them out and answers each sender. No `OK true` is sent
//! before the batch holding its event is durable.

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

/// The result a connection receives for one submitted event.
pub type WriteResult = Result<WriteOutcome, String>;

struct Job {
    event: Arc<AcceptedEvent>,
    reply: oneshot::Sender<WriteResult>,
    submitted: std::time::Instant,
}

#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
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
        let replication = shared_log.map(|r| (r, tokio::runtime::Handle::current()));
        std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || writer_loop(rx, store.as_ref(), &fanout, max_batch, &metrics, replication.as_ref()))?;
        Ok(Self { tx })
    }

    /// Queues `event` for storage; the receiver resolves once it is durable
    /// (or refused).
    pub async fn submit(&self, event: Arc<AcceptedEvent>) -> oneshot::Receiver<WriteResult> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) =
            self.tx.send(Job { event, reply, submitted: std::time::Instant::now() }).await
        {
            let _ = job.reply.send(Err("the event writer has stopped".into()));
        }
        rx
    }
}

fn writer_loop(
    mut rx: mpsc::Receiver<Job>,
    store: &dyn EventStore,
    fanout: &Fanout,
    max_batch: usize,
    metrics: &Metrics,
    replication: Option<&(Arc<dyn SharedLog>, tokio::runtime::Handle)>,
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
        if let Some((replicator, runtime)) = replication {
            // Client events go to Firestore first; one that cannot be
            // replicated is refused and not stored here either.
            let (local, replicated): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(|j| !j.event.replicated);
            let events: Vec<Arc<AcceptedEvent>> = local.iter().map(|j| j.event.clone()).collect();
            let outcomes = if events.is_empty() { vec![] } else { runtime.block_on(replicator.publish(&events)) };
            for (job, outcome) in local.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => jobs.push(job),
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
            jobs.extend(replicated);
            if jobs.is_empty() {
                continue;
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
                        if let Some((shared_log, _)) = replication
                            && !job.event.replicated
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
