//! Property: the order events arrive in does not change what a store ends up
//! serving. Replicas apply the same events in different orders (their own
//! clients' first, the shared log's as it arrives), so every rule of the
//! write path (NIP-01 replacement, NIP-09 deletion by id and by address,
//! NIP-59 deletion by a gift wrap's recipient, NIP-62 requests to vanish)
//! must reach the same state from any order. Each case writes one set of
//! events in many orders into fresh stores and compares what they serve.

use std::sync::Arc;

use nostr::event::{Event, EventBuilder, FinalizeEvent, Kind, Tag};
use nostr::key::Keys;
use nostr::types::Timestamp;
use rand::seq::SliceRandom;

use super::{EventStore, SledEventStore};
use crate::event::AcceptedEvent;

fn event(keys: &Keys, kind: u16, created_at: u64, tags: &[&[&str]]) -> Arc<AcceptedEvent> {
    let event: Event = EventBuilder::new(Kind::from(kind), format!("{kind} at {created_at}"))
        .tags(tags.iter().map(|t| Tag::parse(t.iter().copied()).expect("tag")))
        .custom_created_at(Timestamp::from(created_at))
        .finalize(keys)
        .expect("sign");
    let mut accepted = AcceptedEvent::new(event);
    accepted.vanish_request = kind == 62;
    Arc::new(accepted)
}

/// What `events`, written one batch each in this order, leave served.
fn served_after(events: &[Arc<AcceptedEvent>]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let store = SledEventStore::open(dir.path(), 8 << 20).unwrap();
    for e in events {
        store.write_batch(std::slice::from_ref(e)).unwrap();
    }
    let mut ids: Vec<String> = store
        .scan_all(None, 10_000)
        .unwrap()
        .events
        .iter()
        .map(|json| serde_json::from_str::<serde_json::Value>(json).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Writes `events` in `orders` random orders (and as given) and asserts the
/// served set never changes; names the events on failure.
fn assert_order_independent(events: &[(&str, Arc<AcceptedEvent>)], orders: usize) {
    let name = |id: &str| events.iter().find(|(_, e)| e.event.id.to_hex() == id).map_or("?", |(n, _)| n).to_owned();
    let names = |ids: &[String]| ids.iter().map(|id| name(id)).collect::<Vec<_>>();
    let in_order: Vec<Arc<AcceptedEvent>> = events.iter().map(|(_, e)| e.clone()).collect();
    let expected = served_after(&in_order);
    let mut rng = rand::rng();
    for _ in 0..orders {
        let mut shuffled: Vec<(&str, Arc<AcceptedEvent>)> = events.to_vec();
        shuffled.shuffle(&mut rng);
        let order: Vec<&str> = shuffled.iter().map(|(n, _)| *n).collect();
        let got = served_after(&shuffled.into_iter().map(|(_, e)| e).collect::<Vec<_>>());
        assert_eq!(names(&got), names(&expected), "order {order:?} serves a different set than the order given");
    }
}

#[test]
fn replaceable_versions_and_their_deletions_end_the_same_in_any_order() {
    let alice = Keys::generate();
    let (p1, p2, p3) = (event(&alice, 0, 100, &[]), event(&alice, 0, 200, &[]), event(&alice, 0, 300, &[]));
    // Deleting the newest version leaves no version: the older ones were
    // replaced by it, whenever they arrive.
    let delete_p3 = event(&alice, 5, 400, &[&["e", &p3.event.id.to_hex()]]);
    let (a1, a2) = (event(&alice, 30000, 100, &[&["d", "x"]]), event(&alice, 30000, 200, &[&["d", "x"]]));
    let pk = alice.public_key().to_hex();
    let delete_address = event(&alice, 5, 150, &[&["a", &format!("30000:{pk}:x")]]);
    assert_order_independent(
        &[
            ("p1", p1),
            ("p2", p2),
            ("p3", p3),
            ("delete p3", delete_p3),
            ("a1", a1),
            ("a2", a2),
            ("delete address until 150", delete_address),
        ],
        40,
    );
}

#[test]
fn deletions_of_deletions_and_of_requests_to_vanish_have_no_effect_in_any_order() {
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let note = event(&alice, 1, 100, &[]);
    let deletion = event(&alice, 5, 200, &[&["e", &note.event.id.to_hex()]]);
    let undo = event(&alice, 5, 300, &[&["e", &deletion.event.id.to_hex()]]);
    let bobs_note = event(&bob, 1, 100, &[]);
    let later_note = event(&bob, 1, 500, &[]);
    let vanish = event(&bob, 62, 200, &[&["relay", "ALL_RELAYS"]]);
    let unvanish = event(&bob, 5, 300, &[&["e", &vanish.event.id.to_hex()]]);
    assert_order_independent(
        &[
            ("note", note),
            ("deletion", deletion),
            ("deletion of the deletion", undo),
            ("bob's note", bobs_note),
            ("bob's later note", later_note),
            ("vanish", vanish),
            ("deletion of the vanish", unvanish),
        ],
        40,
    );
}

#[test]
fn gift_wraps_deleted_by_their_recipient_and_others_deletions_end_the_same_in_any_order() {
    let (wrapper, carol, mallory, alice) = (Keys::generate(), Keys::generate(), Keys::generate(), Keys::generate());
    let carol_hex = carol.public_key().to_hex();
    let wrap = event(&wrapper, 1059, 100, &[&["p", &carol_hex]]);
    let by_recipient = event(&carol, 5, 200, &[&["e", &wrap.event.id.to_hex()]]);
    let note = event(&alice, 1, 100, &[]);
    let by_someone_else = event(&mallory, 5, 200, &[&["e", &note.event.id.to_hex()]]);
    let vanish = event(&carol, 62, 300, &[&["relay", "ALL_RELAYS"]]);
    let wrap_after = event(&wrapper, 1059, 400, &[&["p", &carol_hex]]);
    assert_order_independent(
        &[
            ("wrap", wrap),
            ("deletion by its recipient", by_recipient),
            ("alice's note", note),
            ("mallory's deletion of it", by_someone_else),
            ("carol vanishes", vanish),
            ("a later wrap to carol", wrap_after),
        ],
        40,
    );
}
