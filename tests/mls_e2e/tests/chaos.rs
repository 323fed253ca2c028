//! Three replicas sharing Firestore (the emulator) under steady load, with
//! the MLS gateway and real KeyPackages made by mdk-core, while things go
//! wrong: one replica is killed (SIGKILL) and restarted on its data, and
//! Firestore hangs for 10 seconds (every call to it stalls, through a proxy).
//! Afterwards every acknowledged event is on every replica, and no
//! KeyPackage was handed out twice.

#[path = "../../harness/emulator.rs"]
mod emulator;
#[path = "../../harness/mod.rs"]
mod harness;
mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use harness::{Client, TestRelay, plugin_path};
use nostr::{EventBuilder, Keys};
use serde_json::{Value, json};
use support::{Member, now, publish, publish_ok};

/// Replicas fail a write fast while Firestore hangs; the harness's reply
/// timeout is longer.
const PUBLISH_TIMEOUT: &str = "publish_timeout_ms = 2000\n";

/// The ids a REQ returns, or `None` when the relay refuses it (`CLOSED`):
/// during a Firestore outage the gateway cannot consult its index.
async fn req_ids_or_refused(c: &mut Client, sub: &str, filter: Value) -> Option<Vec<String>> {
    c.send(json!(["REQ", sub, filter])).await;
    let mut ids = Vec::new();
    loop {
        let v = c.recv_where(&format!("reply to {sub}"), |v| v[1] == sub).await;
        match v[0].as_str() {
            Some("EVENT") => ids.push(v[2]["id"].as_str().unwrap().to_owned()),
            Some("EOSE") => {
                c.send(json!(["CLOSE", sub])).await;
                return Some(ids);
            }
            _ => return None,
        }
    }
}

/// The load: notes from one author, and KeyPackage requests for one owner.
struct Load {
    writer: Keys,
    owner: String,
    /// Notes the relays acknowledged with `OK true`.
    acknowledged: Vec<String>,
    /// What each KeyPackage request that was answered handed out.
    handed_out: Vec<Vec<String>>,
    requests: usize,
}

impl Load {
    /// One round on every replica given: a note each, and one KeyPackage request.
    async fn round(&mut self, replicas: &[&TestRelay]) {
        for relay in replicas {
            let mut c = relay.client().await;
            let note = EventBuilder::text_note(format!("note {}", self.acknowledged.len()))
                .sign_with_keys(&self.writer)
                .unwrap();
            if publish(&mut c, &note).await.0 {
                self.acknowledged.push(note.id.to_hex());
            }
        }
        let relay = replicas[self.requests % replicas.len()];
        self.requests += 1;
        let mut c = relay.client().await;
        let filter = json!({"kinds": [30443, 443], "authors": [self.owner]});
        if let Some(ids) = req_ids_or_refused(&mut c, &format!("kp{}", self.requests), filter).await {
            self.handed_out.push(ids);
        }
    }
}

/// Polls `relay` until it serves every id in `expected` (it may serve more:
/// a write whose answer was lost in the outage may have landed).
async fn eventually_has_all(relay: &TestRelay, author: &str, expected: &[String], name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut c = relay.client().await;
    let mut n = 0;
    loop {
        n += 1;
        let got: HashSet<String> = c
            .req_ids(&format!("all{n}"), vec![json!({"authors": [author], "limit": 5000})])
            .await
            .into_iter()
            .collect();
        c.send(json!(["CLOSE", format!("all{n}")])).await;
        let missing: Vec<&String> = expected.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {name} lacks {} acknowledged events after 60 s: {missing:?}",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn three_replicas_through_a_crash_and_a_firestore_outage_lose_nothing_and_never_hand_out_a_key_package_twice() {
    let proxy = emulator::Proxy::start(emulator::emulator_host()).await;
    let config = format!(
        "{}{PUBLISH_TIMEOUT}{}",
        emulator::replica_config(&emulator::fresh_project()),
        support::gateway_config_with(
            &plugin_path("mls_gateway.wasm"),
            support::REPLICA_GATEWAY_TIMEOUT,
            &[("requests_per_hour", "0"), ("max_keypackages_per_owner", "100")],
        )
    );
    let env = [("FIRESTORE_EMULATOR_HOST", proxy.addr.as_str())];
    let a = TestRelay::start_with(Some(&config), &env).await;
    let b = TestRelay::start_with(Some(&config), &env).await;
    let mut c = TestRelay::start_with(Some(&config), &env).await;

    // Erin publishes 40 KeyPackages over the three replicas: more than the
    // requests below, so none is a last resort served again by design.
    let erin = Member::new();
    for (i, relay) in [&a, &b, &c].iter().cycle().take(40).enumerate() {
        let kp = erin.key_package_shaped(&relay.url, 443, false, Some(now() - 1000 + i as u64), |t| t);
        publish_ok(&mut relay.client().await, &kp).await;
    }
    let mut load = Load {
        writer: Keys::generate(),
        owner: erin.pubkey(),
        acknowledged: Vec::new(),
        handed_out: Vec::new(),
        requests: 0,
    };

    for _ in 0..3 {
        load.round(&[&a, &b, &c]).await;
    }
    // C dies without a word; A and B carry on; C comes back on its data.
    c.stop().await;
    for _ in 0..3 {
        load.round(&[&a, &b]).await;
    }
    let c = c.restart().await;
    for _ in 0..3 {
        load.round(&[&a, &b, &c]).await;
    }
    // Firestore hangs for 10 seconds.
    proxy.stall();
    let outage = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < outage {
        load.round(&[&a, &b, &c]).await;
    }
    proxy.restore();
    for _ in 0..5 {
        load.round(&[&a, &b, &c]).await;
    }

    let author = load.writer.public_key().to_hex();
    assert!(load.acknowledged.len() >= 30, "too little got through: {}", load.acknowledged.len());
    for (relay, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        eventually_has_all(relay, &author, &load.acknowledged, name).await;
    }
    let mut times: HashMap<&String, usize> = HashMap::new();
    for id in load.handed_out.iter().flatten() {
        *times.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "KeyPackages handed out more than once: {twice:?}");
    assert!(load.handed_out.iter().filter(|ids| !ids.is_empty()).count() >= 10, "{:?}", load.handed_out);
}
