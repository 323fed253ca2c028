//! The event store: durable storage of accepted events and the indexes that
//! answer NIP-01 filters. Protocol code talks to the [`EventStore`] trait only,
//! so the engine (today sled, see [`sled_store`]) can change underneath.

mod keys;
mod query;
pub mod sled_store;

use std::sync::Arc;

use crate::event::AcceptedEvent;
use crate::filter::Filter;

pub use sled_store::SledEventStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(#[from] sled::Error),
    #[error("stored event {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

/// What happened to one event of a written batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Stored durably (and any older replaceable version removed).
    Stored,
    /// The same event id was already stored.
    Duplicate,
    /// A replaceable/addressable event older than the stored version (NIP-01:
    /// newest `created_at` wins, then the lowest id).
    Superseded,
}

/// A stored event as served: its sort key and its canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub created_at: u64,
    pub id: [u8; 32],
    pub json: String,
}

impl StoredEvent {
    /// NIP-01 order: newest first, ties by lowest id.
    pub fn order_key(&self) -> (std::cmp::Reverse<u64>, [u8; 32]) {
        (std::cmp::Reverse(self.created_at), self.id)
    }
}

pub trait EventStore: Send + Sync + 'static {
    /// Writes `events` in one atomic batch and returns once it is durable.
    /// Outcomes are in the order of `events`.
    fn write_batch(&self, events: &[Arc<AcceptedEvent>]) -> Result<Vec<WriteOutcome>, StoreError>;

    /// Up to `limit` events matching `filter`, newest first (ties: lowest id).
    fn query(&self, filter: &Filter, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Number of stored events matching `filter`.
    fn count(&self, filter: &Filter) -> Result<u64, StoreError>;

    /// One event by id.
    fn get(&self, id: &[u8; 32]) -> Result<Option<StoredEvent>, StoreError>;

    /// Events matching any of `filters` (each with its own limit: the filter's
    /// `limit` capped at `max_limit`, else `default_limit`), deduplicated, in
    /// NIP-01 order.
    fn query_filters(
        &self,
        filters: &[Filter],
        default_limit: usize,
        max_limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut all = Vec::new();
        for filter in filters {
            let limit = filter.limit.map_or(default_limit, |l| usize::try_from(l).unwrap_or(usize::MAX)).min(max_limit);
            if limit == 0 || filter.matches_nothing() {
                continue;
            }
            all.extend(self.query(filter, limit)?);
        }
        if filters.len() > 1 {
            all.sort_by_key(StoredEvent::order_key);
            all.dedup_by_key(|e| e.id);
        }
        Ok(all)
    }
}
