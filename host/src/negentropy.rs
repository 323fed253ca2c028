//! NIP-77 set reconciliation, the relay's side: one connection's negentropy
//! sessions and the relay-wide budget of records they hold.
//!
//! A `NEG-OPEN` builds the session's set from the store's indexes (ids and
//! times only) on the blocking pool, under the same read rules as a REQ
//! (the caller passes the filter without plugin-managed kinds and the
//! connection's [`ReadAccess`]), then answers the client's first message.
//! Each `NEG-MSG` is answered from that set, also off the async workers.
//! The protocol itself (V1, as strfry and nostr-sdk speak it) is the
//! `negentropy` crate's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use negentropy::{Id, Negentropy, NegentropyStorageVector};

use crate::config::NegentropyConfig;
use crate::filter::Filter;
use crate::refusal::Refusal;
use crate::store::{EventStore, ReadAccess};

/// The reconciliation engine of one session, owning its set.
type Engine = Negentropy<'static, NegentropyStorageVector>;

/// Records reserved from the budget at a time while a set is built.
const RESERVE_STEP: usize = 4096;

/// Records all open sessions hold, against `negentropy.max_records_in_memory`,
/// and what each client address holds, against `negentropy.max_records`:
/// one client's large sessions cost it refusals, not the relay its memory
/// nor other clients their turn (one address holds at most half of the
/// default budget, however many connections it opens).
#[derive(Debug)]
pub struct RecordBudget {
    used: AtomicUsize,
    max: usize,
    /// Records held per client address; an address leaves the map when it
    /// holds none, so the map is as large as the addresses with sessions.
    by_address: std::sync::Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
}

impl RecordBudget {
    pub fn new(max: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), max, by_address: Default::default(), max_per_address })
    }

    /// Records held by open sessions now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(self: &Arc<Self>, address: IpAddr, n: usize) -> bool {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let held = by_address.get(&address).copied().unwrap_or(0);
        if held + n > self.max_per_address {
            return false;
        }
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.checked_add(n)?;
                (after <= self.max).then_some(after)
            })
            .is_ok();
        if taken {
            by_address.insert(address, held + n);
        }
        taken
    }

    fn give_back(&self, address: IpAddr, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = by_address.get_mut(&address) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                by_address.remove(&address);
            }
        }
    }
}

/// Records taken from the budget for one address; given back when dropped.
#[derive(Debug)]
struct Reservation {
    budget: Arc<RecordBudget>,
    address: IpAddr,
    records: usize,
}

impl Reservation {
    fn grow(&mut self, n: usize) -> bool {
        let taken = self.budget.try_take(self.address, n);
        if taken {
            self.records += n;
        }
        taken
    }

    /// Gives back what is reserved beyond `records`.
    fn shrink_to(&mut self, records: usize) {
        if let Some(excess) = self.records.checked_sub(records) {
            self.budget.give_back(self.address, excess);
            self.records = records;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.address, self.records);
    }
}

/// An open session: its engine, the budget it holds, and when the client
/// last used it.
struct Session {
    engine: Engine,
    _reservation: Reservation,
    last_used: std::time::Instant,
}

/// One connection's open sessions, by subscription id.
#[derive(Default)]
pub struct Sessions {
    open: HashMap<String, Session>,
}

/// What the relay answers to a negentropy message: the next message, or why
/// the session ended.
pub type Reply = Result<Vec<u8>, Refusal>;

impl Sessions {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn contains(&self, sub_id: &str) -> bool {
        self.open.contains_key(sub_id)
    }

    /// Ends a session (`NEG-CLOSE`, a replacing `NEG-OPEN`, or an error).
    pub fn close(&mut self, sub_id: &str) {
        self.open.remove(sub_id);
    }

    /// Ends the sessions unused for `idle` or longer, giving back what
    /// they hold; returns their ids.
    pub fn close_idle(&mut self, idle: std::time::Duration) -> Vec<String> {
        let expired: Vec<String> =
            self.open.iter().filter(|(_, s)| s.last_used.elapsed() >= idle).map(|(id, _)| id.clone()).collect();
        for id in &expired {
            self.open.remove(id);
        }
        expired
    }

    /// Opens session `sub_id` over the events of `filter` that `access` may
    /// see and answers the client's first `message`. Runs on the blocking
    /// pool; on `Err` no session is open.
    pub async fn open(&mut self, sub_id: &str, opening: Opening, message: Vec<u8>) -> Reply {
        self.close(sub_id);
        let (session, reply) = tokio::task::spawn_blocking(move || opening.build_and_answer(&message))
            .await
            .map_err(|_| Refusal::error("the reconciliation failed on the relay; try again later"))??;
        self.open.insert(sub_id.to_owned(), session);
        Ok(reply)
    }

    /// Answers the client's next `message` in session `sub_id`. A session
    /// that fails is closed.
    pub async fn reconcile(&mut self, sub_id: &str, message: Vec<u8>) -> Reply {
        let Some(mut session) = self.open.remove(sub_id) else {
            return Err(Refusal::new(
                crate::refusal::RefusalKind::Closed,
                "no reconciliation is open under this id; send NEG-OPEN first",
            ));
        };
        let (mut session, reply) = tokio::task::spawn_blocking(move || {
            let reply = session.engine.reconcile(&message).map_err(protocol_refusal);
            (session, reply)
        })
        .await
        .map_err(|_| Refusal::error("the reconciliation failed on the relay; try again later"))?;
        let reply = reply?;
        session.last_used = std::time::Instant::now();
        self.open.insert(sub_id.to_owned(), session);
        Ok(reply)
    }
}

/// Everything a `NEG-OPEN` needs to build its set, checked by the caller.
pub struct Opening {
    pub store: Arc<dyn EventStore>,
    pub budget: Arc<RecordBudget>,
    pub config: NegentropyConfig,
    /// The client's filter, without plugin-managed kinds.
    pub filter: Filter,
    pub access: ReadAccess,
    /// The client's address, whose share of the budget the set takes.
    pub address: IpAddr,
}

impl Opening {
    fn build_and_answer(self, message: &[u8]) -> Result<(Session, Vec<u8>), Refusal> {
        let max = self.config.max_records;
        let mut reservation = Reservation { budget: self.budget.clone(), address: self.address, records: 0 };
        let mut items = NegentropyStorageVector::new();
        let mut refused: Option<Refusal> = None;
        let mut seen = 0usize;
        self.store
            .visit_refs(&self.filter, &self.access, &mut |created_at, id| {
                seen += 1;
                if seen > max {
                    refused = Some(Refusal::blocked(format!(
                        "more than {max} events match this filter, the most one reconciliation covers; \
                         narrow it (since/until, kinds, authors) and reconcile in parts"
                    )));
                    return false;
                }
                if seen > reservation.records && !reservation.grow(RESERVE_STEP.min(max - reservation.records)) {
                    refused = Some(Refusal::rate_limited(
                        "the relay (or your address) is reconciling as many events as it holds at once; \
                         close other reconciliations or try again shortly",
                    ));
                    return false;
                }
                // Only `insert` after `seal` fails; the set is sealed below.
                let _ = items.insert(created_at, Id::from_byte_array(id));
                true
            })
            .map_err(|e| {
                tracing::error!(error = %e, "negentropy set failed to build");
                Refusal::error("the relay could not read its events; try again later")
            })?;
        if let Some(refusal) = refused {
            return Err(refusal);
        }
        reservation.shrink_to(seen);
        items.seal().map_err(protocol_refusal)?;
        let mut engine = Negentropy::owned(items, self.config.frame_size_limit).map_err(protocol_refusal)?;
        let reply = engine.reconcile(message).map_err(protocol_refusal)?;
        Ok((Session { engine, _reservation: reservation, last_used: std::time::Instant::now() }, reply))
    }
}

/// A message the negentropy engine could not use: the client's fault.
fn protocol_refusal(e: negentropy::Error) -> Refusal {
    Refusal::invalid(format!("negentropy message not understood: {e}"))
}

/// A hex negentropy message as bytes, or why it is not one. Its first byte
/// must name a negentropy protocol version (0x60-0x6f), checked here so a
/// message that is not negentropy costs no set to be built.
pub fn decode_message(hex_text: &str, max_bytes: usize) -> Result<Vec<u8>, Refusal> {
    if hex_text.len() / 2 > max_bytes {
        return Err(Refusal::invalid(format!("negentropy message is larger than {max_bytes} bytes")));
    }
    let bytes = hex::decode(hex_text).map_err(|e| Refusal::invalid(format!("negentropy message is not hex: {e}")))?;
    match bytes.first() {
        Some(0x60..=0x6f) => Ok(bytes),
        _ => Err(Refusal::invalid("negentropy message does not start with a protocol version (0x61 for V1)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_given_back_when_a_reservation_drops() {
        let (here, there) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let budget = RecordBudget::new(10_000, 9_000);
        let mut a = Reservation { budget: budget.clone(), address: here, records: 0 };
        assert!(a.grow(RESERVE_STEP) && a.grow(RESERVE_STEP));
        let mut same = Reservation { budget: budget.clone(), address: here, records: 0 };
        assert!(!same.grow(1000), "8192 + 1000 is more than one address may hold");
        let mut b = Reservation { budget: budget.clone(), address: there, records: 0 };
        assert!(!b.grow(RESERVE_STEP), "8192 + 4096 exceeds 10000");
        assert!(b.grow(1000), "another address takes what is left");
        drop(a);
        assert_eq!(budget.used(), 1000);
        assert!(b.grow(RESERVE_STEP));
        b.shrink_to(10);
        assert_eq!(budget.used(), 10);
        drop(b);
        drop(same);
        assert_eq!(budget.used(), 0);
        assert!(budget.by_address.lock().unwrap().is_empty(), "addresses holding nothing are forgotten");
    }

    #[test]
    fn messages_must_be_hex_and_bounded() {
        assert_eq!(decode_message("6100", 10).unwrap(), vec![0x61, 0]);
        assert!(decode_message("zz", 10).unwrap_err().message.contains("not hex"));
        assert!(decode_message("ff00", 10).unwrap_err().message.contains("protocol version"));
        assert!(decode_message("", 10).unwrap_err().message.contains("protocol version"));
        assert!(decode_message(&"00".repeat(11), 10).unwrap_err().message.contains("larger"));
    }
}
