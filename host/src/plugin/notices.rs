//! Hooks `on-stored` and `on-removed`: what each durable commit stored and
//! removed, delivered to the plugins that asked for it, off the write path.
//!
//! The store's writer hands each change to one bounded queue per plugin
//! ([`NoticeRouter`], a [`StoreObserver`]) and never waits: when a queue is
//! full, the notice is dropped and counted. A task per plugin drains its
//! queue in order and calls the plugin with batches of consecutive notices
//! of one kind, so a plugin sees an event stored before it sees it removed.
//! An unavailable or failing plugin loses the batches it could not take
//! (counted the same way); acknowledgements never wait for any of this.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::bindings::types as wit;
use super::convert::event_to_wit;
use super::{Hook, PluginSlot};
use crate::event::AcceptedEvent;
use crate::store::{RemovalReason, RemovedEvent, StoreObserver};

/// Most notices in one `on-stored` or `on-removed` call.
pub const MAX_NOTICE_BATCH: usize = 64;
/// A notice call gets one plugin call budget (`call_timeout_ms`) per this
/// many notices it carries, at least one.
pub const NOTICES_PER_BUDGET: usize = 16;

enum Notice {
    Stored(Arc<AcceptedEvent>),
    Removed(RemovedEvent),
}

/// Routes committed changes to the queues of the plugins that want them.
pub struct NoticeRouter {
    queues: Vec<(Arc<PluginSlot>, mpsc::Sender<Notice>)>,
}

impl NoticeRouter {
    /// A queue and a delivery task for each slot. Every slot gets one: a
    /// hot swap may bring a version that asks for the hooks.
    pub fn start(slots: &[Arc<PluginSlot>]) -> Arc<Self> {
        let queues = slots
            .iter()
            .map(|slot| {
                let (tx, rx) = mpsc::channel(slot.config.notice_queue.max(1));
                tokio::spawn(deliver(slot.clone(), rx));
                (slot.clone(), tx)
            })
            .collect();
        Arc::new(Self { queues })
    }
}

impl StoreObserver for NoticeRouter {
    fn wants_stored(&self) -> bool {
        self.queues.iter().any(|(slot, _)| slot.wants(wit::Hook::OnStored))
    }

    fn committed(&self, stored: &[Arc<AcceptedEvent>], removed: &[RemovedEvent]) {
        for (slot, queue) in &self.queues {
            if !stored.is_empty() && slot.wants(wit::Hook::OnStored) {
                let lost = stored.iter().filter(|e| queue.try_send(Notice::Stored((*e).clone())).is_err()).count();
                if lost > 0 {
                    slot.stats.notices_dropped(Hook::OnStored, lost);
                }
            }
            if !removed.is_empty() && slot.wants(wit::Hook::OnRemoved) {
                let lost = removed.iter().filter(|r| queue.try_send(Notice::Removed((*r).clone())).is_err()).count();
                if lost > 0 {
                    slot.stats.notices_dropped(Hook::OnRemoved, lost);
                }
            }
        }
    }
}

impl super::PluginHost {
    /// Calls `on-stored` with `stored` on every plugin that asked for it,
    /// now and in one batch each, bypassing the queues: for benchmarks of the
    /// hook itself.
    pub async fn deliver_stored_now(&self, stored: &[Arc<AcceptedEvent>]) {
        for slot in self.slots.iter().filter(|s| s.wants(wit::Hook::OnStored)) {
            let events: Vec<wit::Event> = stored.iter().map(|e| event_to_wit(&e.event)).collect();
            call(slot, Hook::OnStored, events.len(), move |p, s| {
                Box::pin(async move { p.call_on_stored(s, &events).await })
            })
            .await;
        }
    }

    /// Calls `on-removed` with `removed` on every plugin that asked for it,
    /// now, bypassing the queues (see [`Self::deliver_stored_now`]).
    pub async fn deliver_removed_now(&self, removed: &[RemovedEvent]) {
        for slot in self.slots.iter().filter(|s| s.wants(wit::Hook::OnRemoved)) {
            let events: Vec<wit::RemovedEvent> = removed.iter().map(removed_to_wit).collect();
            call(slot, Hook::OnRemoved, events.len(), move |p, s| {
                Box::pin(async move { p.call_on_removed(s, &events).await })
            })
            .await;
        }
    }
}

/// Drains one plugin's queue until the relay stops.
async fn deliver(slot: Arc<PluginSlot>, mut queue: mpsc::Receiver<Notice>) {
    let mut batch = Vec::with_capacity(MAX_NOTICE_BATCH);
    while queue.recv_many(&mut batch, MAX_NOTICE_BATCH).await > 0 {
        let mut notices = batch.drain(..).peekable();
        while let Some(first) = notices.next() {
            match first {
                Notice::Stored(event) => {
                    let mut events = vec![event_to_wit(&event.event)];
                    while let Some(Notice::Stored(next)) = notices.next_if(|n| matches!(n, Notice::Stored(_))) {
                        events.push(event_to_wit(&next.event));
                    }
                    call(&slot, Hook::OnStored, events.len(), move |p, s| {
                        Box::pin(async move { p.call_on_stored(s, &events).await })
                    })
                    .await;
                }
                Notice::Removed(removed) => {
                    let mut events = vec![removed_to_wit(&removed)];
                    while let Some(Notice::Removed(next)) = notices.next_if(|n| matches!(n, Notice::Removed(_))) {
                        events.push(removed_to_wit(&next));
                    }
                    call(&slot, Hook::OnRemoved, events.len(), move |p, s| {
                        Box::pin(async move { p.call_on_removed(s, &events).await })
                    })
                    .await;
                }
            }
        }
    }
}

/// One batch to the slot's current version, unless it is unavailable;
/// what it could not take is counted as dropped.
async fn call<F>(slot: &PluginSlot, hook: Hook, count: usize, f: F)
where
    F: for<'a> FnOnce(
        &'a super::bindings::PluginExports,
        &'a mut wasmtime::Store<super::imports::PluginState>,
    ) -> super::runtime::CallFuture<'a, ()>,
{
    let Ok(admission) = slot.admit(None) else {
        slot.stats.notices_dropped(hook, count);
        return;
    };
    let loaded = slot.current();
    let budgets = u32::try_from(count.div_ceil(NOTICES_PER_BUDGET)).unwrap_or(u32::MAX);
    if slot.timed_call_scaled(&loaded, hook, admission, None, budgets, f).await.is_err() {
        slot.stats.notices_dropped(hook, count);
    }
}

fn removed_to_wit(r: &RemovedEvent) -> wit::RemovedEvent {
    wit::RemovedEvent {
        id: hex::encode(r.id),
        pubkey: hex::encode(r.pubkey),
        kind: r.kind,
        reason: match r.reason {
            RemovalReason::Deleted => wit::RemovalReason::Deleted,
            RemovalReason::Expired => wit::RemovalReason::Expired,
            RemovalReason::Banned => wit::RemovalReason::Banned,
            RemovalReason::Vanished => wit::RemovalReason::Vanished,
            RemovalReason::Replaced => wit::RemovalReason::Replaced,
        },
    }
}
