//! NIP-77 with rust-nostr's implementations on the other side: nostr-sdk
//! 0.44's negentropy sync (`Client::sync`, protocol V1) against the relay
//! over WebSockets, in both directions (an empty side, identical sets, a 1%
//! difference, a set larger than one negentropy frame); and `wasm-relay
//! sync` reconciling with rust-nostr's relay (`nostr-relay-builder`).

#[path = "../../harness/mod.rs"]
mod harness;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use harness::TestRelay;
use nostr_sdk::prelude::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Rate limits off: the tests publish thousands of events from one address.
const UNLIMITED: &str = "[rate_limits]\nevents_per_minute_per_ip = 0\nevents_per_minute_per_pubkey = 0\n\
                         reqs_per_minute_per_ip = 0\nreqs_per_minute_per_pubkey = 0\n";

/// `n` signed notes by a few authors, a second apart, the newest `age`
/// seconds old.
fn notes(n: usize, age: u64, tag: &str) -> Vec<Event> {
    let authors: Vec<Keys> = (0..4).map(|_| Keys::generate()).collect();
    let now = Timestamp::now().as_secs();
    (0..n)
        .map(|i| {
            EventBuilder::text_note(format!("{tag} {i}"))
                .custom_created_at(Timestamp::from(now - age - i as u64))
                .sign_with_keys(&authors[i % authors.len()])
                .expect("sign")
        })
        .collect()
}

/// Publishes `events` to the relay over a plain WebSocket, 100 in flight.
async fn seed(relay: &TestRelay, events: &[Event]) {
    let all: Vec<(String, String)> = events.iter().map(|e| (e.as_json(), e.id.to_hex())).collect();
    relay.client().await.publish_many_ok(&all).await;
}

/// A nostr-sdk client whose local database holds `local`.
async fn client_holding(url: &str, local: &[Event]) -> Client {
    let database = MemoryDatabase::with_opts(MemoryDatabaseOptions { events: true, max_events: None });
    let client = Client::builder().signer(Keys::generate()).database(database).build();
    for e in local {
        client.database().save_event(e).await.expect("save locally");
    }
    client.add_relay(url).await.expect("add relay");
    client.connect().await;
    client.wait_for_connection(WAIT).await;
    client
}

async fn sync(client: &Client, direction: SyncDirection) -> Reconciliation {
    let options = SyncOptions::default().direction(direction).initial_timeout(WAIT);
    client.sync(Filter::new(), &options).await.expect("negentropy sync").val
}

fn ids(events: &[Event]) -> HashSet<EventId> {
    events.iter().map(|e| e.id).collect()
}

/// How many events the relay serves for `{}` (a COUNT).
async fn relay_count(relay: &TestRelay) -> u64 {
    let mut c = relay.client().await;
    c.count("n", vec![json!({})]).await[2]["count"].as_u64().expect("count")
}

async fn relay_messages(relay: &TestRelay, verb: &str) -> u64 {
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    let series = format!("wasm_relay_messages_total{{verb=\"{verb}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&series)?.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::test]
async fn an_empty_side_receives_everything_in_either_direction() {
    let relay = TestRelay::start_with_config(UNLIMITED).await;
    let events = notes(300, 60, "down");
    seed(&relay, &events).await;
    // Down: an empty client learns and fetches the relay's whole set.
    let empty = client_holding(&relay.url, &[]).await;
    let down = sync(&empty, SyncDirection::Down).await;
    assert_eq!(down.remote, ids(&events));
    assert_eq!(down.received, ids(&events));
    assert!(down.local.is_empty());

    // Up: a client holding events the empty relay lacks sends them all,
    // each through the relay's checks and OK.
    let fresh = TestRelay::start_with_config(UNLIMITED).await;
    let mine = notes(300, 60, "up");
    let holder = client_holding(&fresh.url, &mine).await;
    let up = sync(&holder, SyncDirection::Up).await;
    assert_eq!(up.local, ids(&mine));
    assert_eq!(up.sent, ids(&mine));
    assert!(up.send_failures.values().all(|f| f.is_empty()), "{:?}", up.send_failures);
    assert_eq!(relay_count(&fresh).await, 300);
}

#[tokio::test]
async fn identical_sets_exchange_no_events() {
    let relay = TestRelay::start_with_config(UNLIMITED).await;
    let events = notes(1000, 60, "same");
    seed(&relay, &events).await;
    let twin = client_holding(&relay.url, &events).await;
    let both = sync(&twin, SyncDirection::Both).await;
    assert!(both.local.is_empty() && both.remote.is_empty(), "{both:?}");
    assert!(both.sent.is_empty() && both.received.is_empty());
}

#[tokio::test]
async fn a_one_percent_difference_moves_only_the_difference_both_ways() {
    let relay = TestRelay::start_with_config(UNLIMITED).await;
    let shared = notes(2000, 60, "shared");
    let relay_only = notes(20, 30, "relay only");
    let client_only = notes(20, 45, "client only");
    seed(&relay, &[shared.clone(), relay_only.clone()].concat()).await;
    let client = client_holding(&relay.url, &[shared, client_only.clone()].concat()).await;
    let both = sync(&client, SyncDirection::Both).await;
    assert_eq!(both.remote, ids(&relay_only));
    assert_eq!(both.received, ids(&relay_only));
    assert_eq!(both.local, ids(&client_only));
    assert_eq!(both.sent, ids(&client_only));
    assert_eq!(relay_count(&relay).await, 2040);
    // Reconciling again finds nothing left to move.
    let again = sync(&client, SyncDirection::Both).await;
    assert!(again.local.is_empty() && again.remote.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_set_larger_than_one_frame_takes_several_rounds() {
    // 5,000 ids are 160 KB; the relay's frames are at most 60,000 bytes.
    let relay = TestRelay::start_with_config(UNLIMITED).await;
    let events = notes(5000, 60, "large");
    seed(&relay, &events).await;
    let empty = client_holding(&relay.url, &[]).await;
    let down = sync(&empty, SyncDirection::Down).await;
    assert_eq!(down.remote.len(), 5000);
    assert_eq!(down.received, ids(&events));
    assert!(relay_messages(&relay, "NEG-MSG").await >= 1, "one frame cannot have carried every id");
}

#[tokio::test]
async fn kinds_the_mls_gateway_manages_are_never_reconciled() {
    let config = format!(
        "{UNLIMITED}\n{}",
        support::gateway_config(&harness::plugin_path("mls_gateway.wasm"), &[("requests_per_hour", "0")])
    );
    let relay = TestRelay::start_with_config(&config).await;
    let member = support::Member::new();
    let (key_package, twin) = member.key_package_pair(&relay.url);
    let note = notes(1, 60, "public");
    seed(&relay, &[key_package.clone(), twin.clone(), note[0].clone()]).await;
    let empty = client_holding(&relay.url, &[]).await;
    let down = sync(&empty, SyncDirection::Down).await;
    assert_eq!(down.remote, ids(&note), "KeyPackages are the gateway's to serve, never part of a set");
}

#[tokio::test]
async fn wasm_relay_sync_reconciles_with_rust_nostrs_relay() {
    use nostr_relay_builder::prelude::{LocalRelay, RateLimit, RelayBuilder};
    let ours = TestRelay::start_with_config(UNLIMITED).await;
    let shared = notes(200, 100, "shared");
    let theirs_only = notes(30, 50, "theirs");
    let ours_only = notes(20, 70, "ours");
    seed(&ours, &[shared.clone(), ours_only.clone()].concat()).await;
    let database = MemoryDatabase::with_opts(MemoryDatabaseOptions { events: true, max_events: None });
    for e in shared.iter().chain(&theirs_only) {
        database.save_event(e).await.expect("seed the peer");
    }
    let limits = RateLimit { max_reqs: 500, notes_per_minute: 100_000 };
    let peer = LocalRelay::new(RelayBuilder::default().database(database).rate_limit(limits));
    peer.run().await.expect("the peer relay runs");
    let peer_url = peer.url().await.to_string();

    let out = tokio::process::Command::new(harness::relay_binary())
        .args(["sync", &peer_url, "--dir", "both", "--data-dir"])
        .arg(ours.data_dir())
        .env("WASM_RELAY_LOG", "warn")
        .output()
        .await
        .expect("run wasm-relay sync");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("30 only there, 20 only here"), "{summary}");
    assert!(summary.contains("stored 30,") && summary.contains("sent 20 (accepted 20, refused 0)"), "{summary}");
    assert_eq!(relay_count(&ours).await, 250);
    let reader = client_holding(&peer_url, &[]).await;
    let theirs = reader.fetch_events(Filter::new().kind(Kind::TextNote), WAIT).await.expect("fetch from the peer");
    assert_eq!(theirs.len(), 250, "the peer received what it lacked");
}
