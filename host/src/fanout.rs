//! Subscription fan-out: the registry of live subscriptions of every
//! connection, and delivery of newly stored (or ephemeral) events to those
//! whose filters match.
//!
//! Each delivery carries a sequence number so a connection can drop live
//! copies of events its initial query already returned (see
//! [`Fanout::current_seq`]), and a subscription generation so a replaced or
//! closed subscription never receives events meant for its predecessor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, mpsc};

use crate::event::AcceptedEvent;
use crate::event::{EPHEMERAL_GIFT_WRAP, GIFT_WRAP, p_tags};
use crate::filter::{Filter, any_filter_matches};

pub type ConnId = u64;

/// One event for one subscription of a connection.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub sub_id: Arc<str>,
    pub generation: u64,
    /// Write sequence of the event; 0 for ephemeral events.
    pub seq: u64,
    pub event: Arc<AcceptedEvent>,
}

struct Subscription {
    sub_id: Arc<str>,
    generation: u64,
    filters: Arc<[Filter]>,
}

struct ConnectionEntry {
    tx: mpsc::Sender<Delivery>,
    /// Keys the connection proved with NIP-42 (for gift wraps).
    authed: Vec<[u8; 32]>,
    /// Woken when the connection's queue overflowed and it must close.
    overflowed: Arc<Notify>,
    subs: HashMap<Arc<str>, Subscription>,
}

pub struct Fanout {
    connections: RwLock<HashMap<ConnId, ConnectionEntry>>,
    next_seq: AtomicU64,
    /// Every write sequenced up to this has been broadcast.
    broadcast_done: AtomicU64,
    next_generation: AtomicU64,
    /// Kinds never delivered live: plugin-managed kinds are served only
    /// through their plugin's answers to a REQ.
    excluded_kinds: arc_swap::ArcSwap<Vec<u16>>,
    /// Gift wraps go only to connections authenticated as a recipient.
    gift_wraps_to_recipients_only: bool,
}

impl Fanout {
    pub fn new(gift_wraps_to_recipients_only: bool) -> Self {
        Self {
            connections: RwLock::default(),
            next_seq: AtomicU64::new(0),
            broadcast_done: AtomicU64::new(0),
            next_generation: AtomicU64::new(0),
            excluded_kinds: arc_swap::ArcSwap::from_pointee(vec![]),
            gift_wraps_to_recipients_only,
        }
    }

    /// Records the keys a connection authenticated as.
    pub fn set_authed(&self, conn: ConnId, authed: Vec<[u8; 32]>) {
        if let Some(entry) = self.connections.write().unwrap_or_else(|p| p.into_inner()).get_mut(&conn) {
            entry.authed = authed;
        }
    }

    pub fn add_connection(&self, conn: ConnId, tx: mpsc::Sender<Delivery>, overflowed: Arc<Notify>) {
        let entry = ConnectionEntry { tx, authed: vec![], overflowed, subs: HashMap::new() };
        self.connections.write().unwrap_or_else(|p| p.into_inner()).insert(conn, entry);
    }

    pub fn remove_connection(&self, conn: ConnId) {
        self.connections.write().unwrap_or_else(|p| p.into_inner()).remove(&conn);
    }

    /// Adds or replaces a subscription; returns its generation.
    pub fn subscribe(&self, conn: ConnId, sub_id: Arc<str>, filters: Arc<[Filter]>) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut conns = self.connections.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = conns.get_mut(&conn) {
            entry.subs.insert(sub_id.clone(), Subscription { sub_id, generation, filters });
        }
        generation
    }

    pub fn unsubscribe(&self, conn: ConnId, sub_id: &str) {
        let mut conns = self.connections.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = conns.get_mut(&conn) {
            entry.subs.remove(sub_id);
        }
    }

    /// Reserves `n` write sequence numbers; returns the first. Called before a
    /// batch is applied, so every event visible to a query that finished
    /// before a later [`Fanout::current_seq`] has a sequence at or below it.
    pub fn reserve_seqs(&self, n: u64) -> u64 {
        self.next_seq.fetch_add(n, Ordering::SeqCst) + 1
    }

    /// The highest sequence number reserved so far.
    pub fn current_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// Marks every write sequenced up to `seq` as broadcast (the writer calls
    /// it after each batch, in sequence order).
    pub fn mark_broadcast(&self, seq: u64) {
        self.broadcast_done.fetch_max(seq, Ordering::SeqCst);
    }

    /// The highest sequence number up to which every write was broadcast.
    pub fn broadcast_watermark(&self) -> u64 {
        self.broadcast_done.load(Ordering::SeqCst)
    }

    /// Sets the kinds never delivered live (sorted).
    pub fn set_excluded_kinds(&self, kinds: Vec<u16>) {
        self.excluded_kinds.store(Arc::new(kinds));
    }

    /// Delivers `event` to every subscription it matches. A connection whose
    /// queue is full is dropped from the registry and told to close.
    pub fn broadcast(&self, seq: u64, event: &Arc<AcceptedEvent>) {
        let kind = event.event.kind.as_u16();
        if self.excluded_kinds.load().binary_search(&kind).is_ok() {
            return;
        }
        let gift_wrap = self.gift_wraps_to_recipients_only && (kind == GIFT_WRAP || kind == EPHEMERAL_GIFT_WRAP);
        let recipients: Vec<[u8; 32]> = if gift_wrap { p_tags(&event.event).collect() } else { vec![] };
        let mut overflowed = Vec::new();
        {
            let conns = self.connections.read().unwrap_or_else(|p| p.into_inner());
            for (conn, entry) in conns.iter() {
                if gift_wrap && !entry.authed.iter().any(|a| recipients.contains(a)) {
                    continue;
                }
                for sub in entry.subs.values() {
                    if !any_filter_matches(&sub.filters, &event.event) {
                        continue;
                    }
                    let delivery =
                        Delivery { sub_id: sub.sub_id.clone(), generation: sub.generation, seq, event: event.clone() };
                    if let Err(mpsc::error::TrySendError::Full(_)) = entry.tx.try_send(delivery) {
                        entry.overflowed.notify_one();
                        overflowed.push(*conn);
                        break;
                    }
                }
            }
        }
        if !overflowed.is_empty() {
            let mut conns = self.connections.write().unwrap_or_else(|p| p.into_inner());
            for conn in overflowed {
                conns.remove(&conn);
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
