//! NIP-77 on the wire, by a client that speaks raw `NEG-*` messages (the
//! `negentropy` crate's client side over the harness's WebSocket): the
//! reconciled set obeys the read rules of a REQ, limits end a session with
//! `NEG-ERR`, and bad messages cost only their sender. Reconciliation with
//! a real client library (nostr-sdk) is in `tests/mls_e2e/tests/negentropy.rs`.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{Client, TestRelay};
use negentropy::{Id, Negentropy, NegentropyStorageVector};
use nostr::key::Keys;
use nostr45::{Publish, authenticate, gift_wrap, note, now, sign};
use serde_json::{Value, json};

/// What a reconciliation ended with: the ids the relay has that the client
/// lacks, or the `NEG-ERR` text.
async fn relay_ids(client: &mut Client, sub: &str, filter: Value) -> Result<BTreeSet<String>, String> {
    reconcile(client, sub, filter, &[]).await.map(|(need, _)| need)
}

/// Reconciles `mine` (ids and times the client holds) with the relay's set
/// for `filter`: `(ids only the relay has, ids only the client has)`.
async fn reconcile(
    client: &mut Client,
    sub: &str,
    filter: Value,
    mine: &[(u64, [u8; 32])],
) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
    let mut storage = NegentropyStorageVector::new();
    for (created_at, id) in mine {
        storage.insert(*created_at, Id::from_byte_array(*id)).unwrap();
    }
    storage.seal().unwrap();
    let mut engine = Negentropy::owned(storage, 0).unwrap();
    let first = engine.initiate().unwrap();
    client.send(json!(["NEG-OPEN", sub, filter, hex::encode(first)])).await;
    let (mut need, mut have) = (BTreeSet::new(), BTreeSet::new());
    loop {
        let reply = client
            .recv_where("NEG-MSG or NEG-ERR", |v| v[1] == sub && v[0].as_str().is_some_and(|s| s.starts_with("NEG-")))
            .await;
        if reply[0] == "NEG-ERR" {
            return Err(reply[2].as_str().unwrap().to_string());
        }
        let bytes = hex::decode(reply[2].as_str().unwrap()).unwrap();
        let (mut have_ids, mut need_ids) = (Vec::new(), Vec::new());
        let next = engine.reconcile_with_ids(&bytes, &mut have_ids, &mut need_ids).unwrap();
        need.extend(need_ids.iter().map(|id| hex::encode(id.to_bytes())));
        have.extend(have_ids.iter().map(|id| hex::encode(id.to_bytes())));
        match next {
            Some(message) => client.send(json!(["NEG-MSG", sub, hex::encode(message)])).await,
            None => {
                client.send(json!(["NEG-CLOSE", sub])).await;
                return Ok((need, have));
            }
        }
    }
}

fn set(ids: &[&nostr::event::Event]) -> BTreeSet<String> {
    ids.iter().map(|e| e.id.to_hex()).collect()
}

#[tokio::test]
async fn a_reconciliation_finds_what_each_side_lacks() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let alice = Keys::generate();
    let notes: Vec<_> = (0..30).map(|i| note(&alice, &format!("note {i}"), 100 + i)).collect();
    for n in &notes {
        c.publish_ok(n).await;
    }
    let all: Vec<&_> = notes.iter().collect();
    // The client holds the first 25 and one the relay never saw.
    let extra = note(&alice, "only the client has this", 50);
    let mut mine: Vec<(u64, [u8; 32])> =
        notes[..25].iter().map(|e| (e.created_at.as_secs(), e.id.to_bytes())).collect();
    mine.push((extra.created_at.as_secs(), extra.id.to_bytes()));
    let (need, have) = reconcile(&mut c, "n1", json!({"kinds": [1]}), &mine).await.unwrap();
    assert_eq!(need, set(&all[25..]));
    assert_eq!(have, set(&[&extra]));
    // An empty client learns the whole set; a filter narrows it.
    assert_eq!(relay_ids(&mut c, "n2", json!({})).await.unwrap(), set(&all));
    let until = notes[20].created_at.as_secs();
    assert_eq!(relay_ids(&mut c, "n3", json!({"kinds": [1], "until": until})).await.unwrap(), set(&all[20..]));
    // NIP-11 lists 77.
    let (_, _, body) = relay.http_get("/", "application/nostr+json").await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["supported_nips"].as_array().unwrap().contains(&json!(77)), "{doc}");
}

#[tokio::test]
async fn the_reconciled_set_obeys_the_read_rules_of_a_req() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let kept = note(&alice, "kept", 100);
    let deleted = note(&alice, "deleted", 90);
    let deletion = sign(&alice, 5, "", &[&["e", &deleted.id.to_hex()]], now() - 80);
    let expiring = sign(&alice, 1, "expires", &[&["expiration", &(now() + 2).to_string()]], now() - 70);
    let wrap = gift_wrap(&bob, 60);
    for e in [&kept, &deleted, &deletion, &expiring, &wrap] {
        c.publish_ok(e).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Unauthenticated: no gift wrap, no deleted or expired event (kinds a
    // plugin manages are left out too: see the nostr-sdk test).
    let anonymous = relay_ids(&mut c, "all", json!({})).await.unwrap();
    assert_eq!(anonymous, set(&[&kept, &deletion]));
    // Asking for gift wraps explicitly without authenticating is refused, as for a REQ.
    let refused = relay_ids(&mut c, "wraps", json!({"kinds": [1059]})).await.unwrap_err();
    assert!(refused.starts_with("auth-required:"), "{refused}");
    // Bob, authenticated, sees the gift wrap to him.
    let mut b = relay.client().await;
    authenticate(&mut b, &bob, &relay.url).await;
    assert_eq!(relay_ids(&mut b, "all", json!({})).await.unwrap(), set(&[&kept, &deletion, &wrap]));
}

#[tokio::test]
async fn limits_and_bad_messages_end_only_the_offending_session() {
    let relay = TestRelay::start_with_config(
        "[negentropy]\nmax_records = 10\nmax_records_in_memory = 10\nmax_sessions_per_connection = 1\n",
    )
    .await;
    let mut c = relay.client().await;
    let alice = Keys::generate();
    for i in 0..11 {
        c.publish_ok(&note(&alice, &format!("{i}"), 100 + i)).await;
    }
    // More events than one session covers.
    let too_many = relay_ids(&mut c, "big", json!({})).await.unwrap_err();
    assert!(too_many.starts_with("blocked:") && too_many.contains("more than 10"), "{too_many}");
    assert_eq!(relay_ids(&mut c, "small", json!({"limit": 10})).await.unwrap().len(), 10);

    // One session per connection: a second is refused while the first is open.
    let first = Negentropy::owned(sealed_empty(), 0).unwrap().initiate().unwrap();
    c.send(json!(["NEG-OPEN", "a", {"limit": 5}, hex::encode(&first)])).await;
    let reply = c.recv_where("NEG-MSG a", |v| v[1] == "a").await;
    assert_eq!(reply[0], "NEG-MSG");
    c.send(json!(["NEG-OPEN", "b", {"limit": 5}, hex::encode(&first)])).await;
    let reply = c.recv_where("NEG-ERR b", |v| v[1] == "b").await;
    assert_eq!(reply[0], "NEG-ERR");
    assert!(reply[2].as_str().unwrap().starts_with("blocked:"), "{reply}");
    // The open session holds 5 records of the relay's 10: another
    // connection's 6-record session waits for them.
    let mut other = relay.client().await;
    let busy = relay_ids(&mut other, "six", json!({"limit": 6})).await.unwrap_err();
    assert!(busy.starts_with("rate-limited:"), "{busy}");
    // Reopening under the same id replaces the session.
    c.send(json!(["NEG-OPEN", "a", {"limit": 5}, hex::encode(&first)])).await;
    assert_eq!(c.recv_where("NEG-MSG a", |v| v[1] == "a").await[0], "NEG-MSG");
    c.send(json!(["NEG-CLOSE", "a"])).await;

    // Not hex, not negentropy, no such session: NEG-ERR, and the
    // connection goes on.
    for (message, sub, expected) in [
        (json!(["NEG-OPEN", "x", {}, "zz"]), "x", "invalid:"),
        (json!(["NEG-OPEN", "y", {}, "ff00ff"]), "y", "invalid:"),
        (json!(["NEG-MSG", "nothing", "61"]), "nothing", "closed:"),
        (json!(["NEG-OPEN", "s", {"search": "x"}, hex::encode(&first)]), "s", "invalid:"),
    ] {
        c.send(message).await;
        let reply = c.recv_where("NEG-ERR", |v| v[1] == sub).await;
        assert_eq!(reply[0], "NEG-ERR", "{reply}");
        assert!(reply[2].as_str().unwrap().starts_with(expected), "{reply}");
    }
    assert_eq!(relay_ids(&mut c, "after", json!({"limit": 3})).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_relay_with_nip77_off_refuses_and_does_not_list_it() {
    let relay = TestRelay::start_with_config("[negentropy]\nenabled = false\n").await;
    let mut c = relay.client().await;
    let refused = relay_ids(&mut c, "n", json!({})).await.unwrap_err();
    assert!(refused.starts_with("blocked:") && refused.contains("REQ"), "{refused}");
    let (_, _, body) = relay.http_get("/", "application/nostr+json").await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(!doc["supported_nips"].as_array().unwrap().contains(&json!(77)), "{doc}");
}

fn sealed_empty() -> NegentropyStorageVector {
    let mut s = NegentropyStorageVector::new();
    s.seal().unwrap();
    s
}

#[tokio::test]
async fn an_idle_session_is_closed_and_its_records_given_back() {
    // Pings every second; sessions unused for a second are closed at the next.
    let relay = TestRelay::start_with_config(
        "[limits]\nidle_timeout_seconds = 2\n[negentropy]\nidle_seconds = 1\nmax_records = 5\nmax_records_in_memory = 5\n",
    )
    .await;
    let mut c = relay.client().await;
    let alice = Keys::generate();
    for i in 0..5 {
        c.publish_ok(&note(&alice, &format!("{i}"), 100 + i)).await;
    }
    let first = Negentropy::owned(sealed_empty(), 0).unwrap().initiate().unwrap();
    c.send(json!(["NEG-OPEN", "idle", {}, hex::encode(&first)])).await;
    assert_eq!(c.recv_where("NEG-MSG idle", |v| v[1] == "idle").await[0], "NEG-MSG");
    // While it is open it holds the whole budget.
    let mut other = relay.client().await;
    assert!(relay_ids(&mut other, "wait", json!({})).await.unwrap_err().starts_with("rate-limited:"));
    let closed = c.recv_where("NEG-ERR idle", |v| v[1] == "idle").await;
    assert_eq!(closed[0], "NEG-ERR");
    assert!(closed[2].as_str().unwrap().starts_with("closed:"), "{closed}");
    // (`other` sat unread past the connection's idle timeout: a new one asks.)
    let mut later = relay.client().await;
    assert_eq!(relay_ids(&mut later, "now", json!({})).await.unwrap().len(), 5);
}

#[tokio::test]
async fn a_flood_of_rounds_is_rate_limited_like_reqs_and_costs_only_its_sender() {
    let relay = TestRelay::start_with_config("[rate_limits]\nreqs_per_minute_per_ip = 30\n").await;
    let mut c = relay.client().await;
    c.publish_ok(&note(&Keys::generate(), "one", 10)).await;
    let first = hex::encode(Negentropy::owned(sealed_empty(), 0).unwrap().initiate().unwrap());
    c.send(json!(["NEG-OPEN", "flood", {}, first])).await;
    assert_eq!(c.recv_where("NEG-MSG", |v| v[1] == "flood").await[0], "NEG-MSG");
    // The server side answers any message on its own: replay the first one.
    let mut answered = 0;
    loop {
        c.send(json!(["NEG-MSG", "flood", first])).await;
        let reply = c.recv_where("reply", |v| v[1] == "flood").await;
        if reply[0] == "NEG-ERR" {
            assert!(reply[2].as_str().unwrap().starts_with("rate-limited:"), "{reply}");
            break;
        }
        answered += 1;
        assert!(answered < 100, "a flood of NEG-MSG rounds was never limited");
    }
    assert!(answered < 30, "{answered} rounds answered within a limit of 30 reads a minute");
    // Another address still reads.
    let mut other = Client::connect_from(&relay.url, "127.0.0.2").await;
    assert_eq!(relay_ids(&mut other, "fine", json!({})).await.unwrap().len(), 1);
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_the_reconciliation_budget() {
    // One session covers at most 5 events, and so do all of one address's
    // sessions together; the relay holds 10.
    let relay = TestRelay::start_with_config("[negentropy]\nmax_records = 5\nmax_records_in_memory = 10\n").await;
    let mut c = relay.client().await;
    let alice = Keys::generate();
    for i in 0..5 {
        c.publish_ok(&note(&alice, &format!("{i}"), 100 + i)).await;
    }
    let first = hex::encode(Negentropy::owned(sealed_empty(), 0).unwrap().initiate().unwrap());
    c.send(json!(["NEG-OPEN", "held", {}, first])).await;
    assert_eq!(c.recv_where("NEG-MSG held", |v| v[1] == "held").await[0], "NEG-MSG");
    // A second connection from the same address is over its share...
    let mut same = relay.client().await;
    let refused = relay_ids(&mut same, "more", json!({"limit": 3})).await.unwrap_err();
    assert!(refused.starts_with("rate-limited:") && refused.contains("your address"), "{refused}");
    // ...while another address has the rest of the relay's budget.
    let mut other = Client::connect_from(&relay.url, "127.0.0.2").await;
    assert_eq!(relay_ids(&mut other, "mine", json!({})).await.unwrap().len(), 5);
}
