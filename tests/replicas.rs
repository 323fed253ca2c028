//! Several relay replicas on one Firestore database (the emulator, started by
//! the tests) behave as one relay: the metadata store passes the shared
//! conformance suite on Firestore; events accepted by one replica are queried
//! and delivered live on the other; deletions and the operator's lists apply
//! everywhere; a replica that was down catches up without losing or
//! duplicating events; and an unreachable Firestore refuses events clearly.

#[path = "harness/emulator.rs"]
mod emulator;
mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::sync::Arc;
use std::time::Duration;

use emulator::{Proxy, emulator_host, fresh_project, replica_config};
use harness::{Client, TestRelay};
use nostr::key::Keys;
use nostr45::{Publish, note, now, sign};
use serde_json::{Value, json};
use wasm_relay::config::FirestoreConfig;
use wasm_relay::firestore::Firestore;
use wasm_relay::metadata::{FirestoreMetadataStore, MetadataStore, conformance};

/// Two replicas of one relay on a fresh Firestore project.
async fn two_replicas() -> (TestRelay, TestRelay) {
    let project = fresh_project();
    let host = emulator_host();
    let config = replica_config(&project);
    let env = [("FIRESTORE_EMULATOR_HOST", host)];
    let a = TestRelay::start_with(Some(&config), &env).await;
    let b = TestRelay::start_with(Some(&config), &env).await;
    (a, b)
}

/// Longest a test waits for a change to reach another replica or the shared
/// log. Changes usually arrive within a second; under a loaded `make test`
/// (21 tests sharing one emulator) they have taken over 15 s.
const PROPAGATION: Duration = Duration::from_secs(60);

/// Polls a REQ on `c` until it returns `expected` ids (in any order).
async fn eventually_ids(c: &mut Client, filter: Value, expected: &[String]) {
    let mut want: Vec<String> = expected.to_vec();
    want.sort();
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    let mut n = 0;
    loop {
        n += 1;
        let mut got = c.req_ids(&format!("poll{n}"), vec![filter.clone()]).await;
        c.send(json!(["CLOSE", format!("poll{n}")])).await;
        got.sort();
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "expected {want:?}, still {got:?} after {PROPAGATION:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_firestore_metadata_store_passes_the_conformance_suite() {
    emulator_host();
    let config = FirestoreConfig { project_id: fresh_project(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let store: Arc<dyn MetadataStore> = Arc::new(FirestoreMetadataStore::new(firestore));
    conformance::run_all(store).await;
}

/// A prefix scan is billed for the keys it returns, not for the keys that
/// sort after the prefix (a KeyPackage request scans one owner's records).
#[tokio::test]
async fn a_prefix_scan_reads_only_the_keys_under_the_prefix() {
    emulator_host();
    let config = FirestoreConfig { project_id: fresh_project(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let store = FirestoreMetadataStore::new(firestore.clone());
    let mut keys: Vec<String> = vec!["kp/alice/1".into(), "kp/alice/2".into(), "kp0".into()];
    keys.extend((0..50).map(|i| format!("kp/bob/{i}")));
    for key in &keys {
        store.put("gateway", key, b"record".to_vec()).await.unwrap();
    }
    let reads = || firestore.usage().reads.load(std::sync::atomic::Ordering::Relaxed);
    let before = reads();
    let alice = store.scan_prefix("gateway", "kp/alice/", None, 500).await.unwrap();
    assert_eq!(alice.len(), 2);
    assert_eq!(reads() - before, 2, "documents read for a scan that returned 2");
    let before = reads();
    let all = store.scan_prefix("gateway", "kp/", None, 500).await.unwrap();
    assert_eq!(all.len(), 52);
    assert_eq!(reads() - before, 52, "documents read for a scan that returned 52");
}

#[tokio::test]
async fn an_event_accepted_by_one_replica_is_served_and_delivered_by_the_other() {
    let (a, b) = two_replicas().await;
    let mut on_b = b.client().await;
    on_b.req("live", vec![json!({"kinds": [1], "limit": 0})]).await;

    let k = Keys::generate();
    let e = note(&k, "written on A", 0);
    a.client().await.publish_ok(&e).await;
    // Live on B, then stored on B.
    assert_eq!(on_b.next_event_within("live", PROPAGATION).await["id"], e.id.to_hex());
    let mut c = b.client().await;
    eventually_ids(&mut c, json!({"authors": [k.public_key().to_hex()]}), &[e.id.to_hex()]).await;

    // And the other way round, with a deletion from B applying on A.
    let mut on_a = a.client().await;
    let second = note(&k, "written on B", 0);
    c.publish_ok(&second).await;
    eventually_ids(&mut on_a, json!({"authors": [k.public_key().to_hex()]}), &[e.id.to_hex(), second.id.to_hex()])
        .await;
    let deletion = sign(&k, 5, "", &[&["e", &e.id.to_hex()]], now());
    c.publish_ok(&deletion).await;
    eventually_ids(&mut on_a, json!({"kinds": [1], "authors": [k.public_key().to_hex()]}), &[second.id.to_hex()]).await;
    // The deleted event stays out on both replicas.
    let (ok, msg) = on_a.publish(&e).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");
}

#[tokio::test]
async fn ephemeral_events_reach_live_subscribers_on_every_replica_once() {
    let (a, b) = two_replicas().await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    on_a.req("eph", vec![json!({"kinds": [20001]})]).await;
    on_b.req("eph", vec![json!({"kinds": [20001]})]).await;
    let e = sign(&Keys::generate(), 20001, "typing...", &[], now());
    a.client().await.publish_ok(&e).await;
    assert_eq!(on_a.next_event("eph").await["id"], e.id.to_hex());
    assert_eq!(on_b.next_event_within("eph", PROPAGATION).await["id"], e.id.to_hex());
    // A has it once: its own copy coming back from Firestore is not re-sent.
    tokio::time::sleep(Duration::from_millis(800)).await;
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_replica_that_was_down_catches_up_exactly_once() {
    let (a, mut b) = two_replicas().await;
    let k = Keys::generate();
    let mut c = a.client().await;
    let first = note(&k, "before", 100);
    c.publish_ok(&first).await;
    eventually_ids(&mut b.client().await, json!({"authors": [k.public_key().to_hex()]}), &[first.id.to_hex()]).await;

    b.stop().await;
    let mut expected = vec![first.id.to_hex()];
    for i in 0..60 {
        let e = note(&k, &format!("while B was down {i}"), i);
        c.publish_ok(&e).await;
        expected.push(e.id.to_hex());
    }
    let b = b.restart().await;
    let mut on_b = b.client().await;
    eventually_ids(&mut on_b, json!({"authors": [k.public_key().to_hex()], "limit": 500}), &expected).await;
    let count = on_b.count("n", vec![json!({"authors": [k.public_key().to_hex()]})]).await;
    assert_eq!(count[2]["count"], 61, "every event once, none twice");
}

/// Two replicas of a relay on a fresh project (returned first), with
/// `admin` as its operator.
async fn two_replicas_with_admin() -> (String, Keys, TestRelay, TestRelay) {
    let project = fresh_project();
    let admin = Keys::generate();
    let config = format!("{}[admin]\npubkeys = [\"{}\"]\n", replica_config(&project), admin.public_key().to_hex());
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let a = TestRelay::start_with(Some(&config), &env).await;
    let b = TestRelay::start_with(Some(&config), &env).await;
    (project, admin, a, b)
}

/// `admin` calls NIP-86 `method` with `params` on `relay`, which must answer true.
async fn manage(relay: &TestRelay, admin: &Keys, method: &str, params: Value) {
    let body = json!({"method": method, "params": params}).to_string();
    let auth = nostr45::nip98_header(admin, &relay.url.replacen("ws://", "http://", 1), body.as_bytes());
    let headers = [("Content-Type", "application/nostr+json+rpc"), ("Authorization", auth.as_str())];
    let (status, _, reply) = relay.http("POST", "/", &headers, body.as_bytes()).await;
    assert!(status.contains("200") && reply.contains("true"), "{status} {reply}");
}

#[tokio::test]
async fn the_operators_lists_are_shared_by_the_replicas() {
    let (_, admin, a, b) = two_replicas_with_admin().await;
    let spammer = Keys::generate();
    manage(&a, &admin, "banpubkey", json!([spammer.public_key().to_hex()])).await;
    let mut on_b = b.client().await;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    loop {
        let (ok, msg) = on_b.publish(&note(&spammer, "spam", 0)).await;
        if !ok {
            assert!(msg.starts_with("blocked:"), "{msg}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ban made on A never reached B");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_relay_will_not_start_without_its_firestore() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, replica_config(&fresh_project())).unwrap();
    let out = TestRelay::command(&dir.path().join("data"), Some(&config))
        .env("FIRESTORE_EMULATOR_HOST", format!("127.0.0.1:{port}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("error: ") && stderr.contains("connecting to Firestore"), "{stderr}");
}

#[tokio::test]
async fn when_firestore_goes_away_events_are_refused_clearly_and_nothing_is_half_written() {
    let proxy = Proxy::start(emulator_host()).await;
    let relay =
        TestRelay::start_with(Some(&replica_config(&fresh_project())), &[("FIRESTORE_EMULATOR_HOST", &proxy.addr)])
            .await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&note(&k, "while Firestore is there", 1)).await;
    // Cut only once the replica has caught up: one still replaying the log
    // is rightly not ready, which is not what this test is about.
    relay.wait_for_log("caught up with the shared event log").await;

    proxy.cut();
    let e = note(&k, "cannot replicate", 0);
    let (ok, msg) = c.publish(&e).await;
    assert!(!ok && msg.starts_with("error:") && msg.contains("Firestore"), "{msg}");
    assert!(c.req_ids("none", vec![json!({"ids": [e.id.to_hex()]})]).await.is_empty(), "nothing half-written");
    // Still ready for reads, which the replica's own store serves; the body
    // says what is degraded.
    let (status, _, body) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("200") && body.contains("degraded") && body.contains("Firestore"), "{status} {body}");

    proxy.restore();
    c.publish_ok(&e).await;
    let (status, _, _) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("200"), "{status}");
}

/// The shared log's document holding event `id` in `project`, if there is one.
async fn shared_document(project: &str, id: &str) -> Option<firestore::gcloud_sdk::google::firestore::v1::Document> {
    use firestore::gcloud_sdk::google::firestore::v1::GetDocumentRequest;
    let found = log_documents(project).await.into_iter().find(|doc| {
        let entries = wasm_relay::replication::log_document::entries(doc);
        entries.iter().any(|entry| entry.id.is_some_and(|entry_id| hex::encode(entry_id) == id))
    });
    if found.is_some() {
        return found;
    }
    // A legacy document, named by the event's id.
    let config = FirestoreConfig { project_id: project.to_owned(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let mut client = firestore.client();
    let request = GetDocumentRequest { name: firestore.document("events", id), ..Default::default() };
    wasm_relay::firestore::call(client.get_document(request)).await.ok()
}

/// Every document of the shared log of `project`.
async fn log_documents(project: &str) -> Vec<firestore::gcloud_sdk::google::firestore::v1::Document> {
    use firestore::gcloud_sdk::google::firestore::v1 as fs;
    let config = FirestoreConfig { project_id: project.to_owned(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let query = fs::StructuredQuery {
        from: vec![fs::structured_query::CollectionSelector {
            collection_id: firestore.collection("events"),
            all_descendants: false,
        }],
        ..Default::default()
    };
    wasm_relay::firestore::run_query(firestore.client(), firestore.documents(), query, None)
        .await
        .expect("query the emulator")
}

/// Polls until the shared log no longer holds event `id`.
async fn eventually_gone(project: &str, id: &str, what: &str) {
    for _ in 0..600 {
        if shared_document(project, id).await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} is still in the shared log after 15 s");
}

#[tokio::test]
async fn deletions_requests_to_vanish_and_bans_clear_the_shared_log() {
    let project = fresh_project();
    let admin = Keys::generate();
    let config = format!("{}[admin]\npubkeys = [\"{}\"]\n", replica_config(&project), admin.public_key().to_hex());
    let a = TestRelay::start_with(Some(&config), &[("FIRESTORE_EMULATOR_HOST", emulator_host())]).await;
    let mut c = a.client().await;
    let (alice, bob, carol) = (Keys::generate(), Keys::generate(), Keys::generate());
    let deleted = note(&alice, "deleted by its author", 5);
    c.publish_ok(&deleted).await;
    assert!(shared_document(&project, &deleted.id.to_hex()).await.is_some(), "published to the shared log");
    c.publish_ok(&sign(&alice, 5, "", &[&["e", &deleted.id.to_hex()]], now())).await;
    eventually_gone(&project, &deleted.id.to_hex(), "a deleted event").await;

    let vanished = note(&bob, "before vanishing", 5);
    c.publish_ok(&vanished).await;
    let vanish = sign(&bob, 62, "", &[&["relay", "ALL_RELAYS"]], now());
    c.publish_ok(&vanish).await;
    eventually_gone(&project, &vanished.id.to_hex(), "a vanished user's event").await;
    assert!(shared_document(&project, &vanish.id.to_hex()).await.is_some(), "the request itself must replicate");

    let banned = note(&carol, "banned by the operator", 5);
    c.publish_ok(&banned).await;
    manage(&a, &admin, "banevent", json!([banned.id.to_hex()])).await;
    eventually_gone(&project, &banned.id.to_hex(), "a banned event").await;

    // Ephemeral documents carry the field a Firestore TTL policy deletes them by.
    let typing = sign(&alice, 20001, "typing...", &[], now());
    c.publish_ok(&typing).await;
    let mut doc = None;
    for _ in 0..100 {
        doc = shared_document(&project, &typing.id.to_hex()).await;
        if doc.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let doc = doc.expect("the ephemeral event reached the shared log");
    let expire_at = wasm_relay::firestore::field_timestamp(&doc, "expire_at").expect("an expire_at field");
    assert!(expire_at.seconds > now() as i64, "expire_at lies ahead");
}

#[tokio::test]
async fn a_replicated_event_passes_the_receiving_replicas_checks() {
    let project = fresh_project();
    let config = replica_config(&project);
    let host = emulator_host();
    let a = TestRelay::start_with(Some(&config), &[("FIRESTORE_EMULATOR_HOST", host)]).await;
    let b = TestRelay::start_with(
        Some(&config),
        &[("FIRESTORE_EMULATOR_HOST", host), ("WASM_RELAY_LIMITS__MAX_CONTENT_LENGTH", "1000")],
    )
    .await;
    let k = Keys::generate();
    let big = note(&k, &"b".repeat(2000), 2);
    let marker = note(&k, "small", 1);
    let mut on_a = a.client().await;
    on_a.publish_ok(&big).await;
    on_a.publish_ok(&marker).await;
    // Once B has the later event, it has decided on the earlier one.
    let mut on_b = b.client().await;
    eventually_ids(&mut on_b, json!({"authors": [k.public_key().to_hex()]}), &[marker.id.to_hex()]).await;
    b.wait_for_log("a replicated event is refused on this replica").await;
}

/// Commits `event` to the shared log of `project` the way a replica does,
/// except that its `written_at` is `written_at` rather than the server's
/// request time: how the test stages two commits in the same millisecond.
async fn commit_to_shared_log(project: &str, event: &nostr::event::Event, written_at: (i64, i32)) {
    use firestore::gcloud_sdk::google::firestore::v1 as fs;
    use firestore::gcloud_sdk::prost_types::Timestamp;
    let config = FirestoreConfig { project_id: project.to_owned(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let string = |s: String| fs::Value { value_type: Some(fs::value::ValueType::StringValue(s)) };
    let at = Timestamp { seconds: written_at.0, nanos: written_at.1 };
    let document = fs::Document {
        name: firestore.document("events", &event.id.to_hex()),
        fields: [
            ("json".to_string(), string(event.as_json())),
            ("origin".to_string(), string("another-replica".into())),
            ("pubkey".to_string(), string(event.pubkey.to_hex())),
            ("written_at".to_string(), fs::Value { value_type: Some(fs::value::ValueType::TimestampValue(at)) }),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let write = fs::Write { operation: Some(fs::write::Operation::Update(document)), ..Default::default() };
    firestore.commit_idempotent("test commit", vec![write]).await.expect("commit to the emulator");
}

/// Firestore makes a commit visible by its commit time, not by a field it
/// holds: two commits in one millisecond can become visible in either order.
/// A replica that has applied the one with the higher document id must still
/// apply the other when it shows up.
#[tokio::test]
async fn commits_in_one_millisecond_that_become_visible_out_of_order_both_reach_every_replica() {
    let project = fresh_project();
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let follower = TestRelay::start_with(Some(&replica_config(&project)), &env).await;
    let k = Keys::generate();
    // Two events whose ids order the other way round from their visibility.
    let (mut late, mut early) = (note(&k, "a", 1), note(&k, "b", 2));
    while late.id.to_hex() >= early.id.to_hex() {
        (late, early) = (note(&k, &format!("a{}", rand_suffix()), 1), early);
    }
    let millisecond = (now() as i64, 123_000_000);
    commit_to_shared_log(&project, &early, millisecond).await;
    let mut c = follower.client().await;
    let author = json!({"authors": [k.public_key().to_hex()]});
    eventually_ids(&mut c, author.clone(), &[early.id.to_hex()]).await;

    commit_to_shared_log(&project, &late, millisecond).await;
    eventually_ids(&mut c, author, &[early.id.to_hex(), late.id.to_hex()]).await;
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// A plugin that looks up an event this replica does not hold asks the shared
/// log; when Firestore cannot answer, the plugin must not be told "absent"
/// (the MLS gateway would drop a valid KeyPackage from its index for good).
/// The request is refused for a retry instead, and the plugin is not blamed.
#[tokio::test]
async fn a_failed_read_of_the_shared_log_is_never_an_absence_for_a_plugin() {
    let proxy = Proxy::start(emulator_host()).await;
    let probe = harness::plugin_path("probe.wasm");
    let config = format!(
        "{}\n[[plugins]]\nname = \"probe\"\npath = {}\nmax_consecutive_failures = 2\n\
         [plugins.settings]\n\"managed-kinds\" = \"9001\"\nreq = \"get-ids\"\n",
        replica_config(&fresh_project()),
        serde_json::to_string(&probe.display().to_string()).unwrap()
    );
    let relay = TestRelay::start_with(Some(&config), &[("FIRESTORE_EMULATOR_HOST", &proxy.addr)]).await;
    let mut c = relay.client().await;
    let missing = note(&Keys::generate(), "never published", 0).id.to_hex();
    let asking = || vec![json!({"ids": [missing], "kinds": [9001]})];
    // Firestore answers: the event is absent, and the plugin is told so.
    assert_eq!(c.req_refused("present", asking()).await, "error: probe v1 found 1 of 1 absent");

    proxy.cut();
    for i in 0..3 {
        let msg = c.req_refused(&format!("cut{i}"), asking()).await;
        assert!(msg.starts_with("error: plugin 'probe' could not read the relay's events"), "{msg}");
    }
    proxy.restore();
    // Not counted against the plugin: its circuit (2 failures) is still closed.
    assert_eq!(c.req_refused("back", asking()).await, "error: probe v1 found 1 of 1 absent");
}

/// A Firestore that hangs (accepts and never answers) holds a client's event
/// only for `replication.publish_timeout_ms`: it is refused, not stored, and
/// the replica keeps serving reads and stays ready, saying it is degraded.
#[tokio::test]
async fn a_hung_firestore_refuses_writes_within_the_publish_timeout_and_reads_go_on() {
    let proxy = Proxy::start(emulator_host()).await;
    let config = format!("{}publish_timeout_ms = 1500\n", replica_config(&fresh_project()));
    let relay = TestRelay::start_with(Some(&config), &[("FIRESTORE_EMULATOR_HOST", &proxy.addr)]).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let before = note(&k, "before the hang", 1);
    c.publish_ok(&before).await;

    proxy.stall();
    let during = note(&k, "during the hang", 0);
    let (ok, msg) = c.publish(&during).await;
    assert!(!ok && msg.starts_with("error:") && msg.contains("did not answer within 1500 ms"), "{msg}");
    let author = json!({"authors": [k.public_key().to_hex()]});
    assert_eq!(c.req_ids("read", vec![author.clone()]).await, vec![before.id.to_hex()]);
    let (status, _, body) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("200") && body.contains("degraded"), "{status} {body}");

    proxy.restore();
    // Publishing works again once Firestore answers (the client retries).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, msg) = c.publish(&during).await;
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still refused after the restore: {msg}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eventually_ids(&mut c, author, &[before.id.to_hex(), during.id.to_hex()]).await;
}

/// Billable Firestore operations of `relay` so far, from its metrics.
async fn firestore_operations(relay: &TestRelay) -> (f64, f64, f64) {
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    let op = |name: &str| {
        let series = format!("wasm_relay_firestore_operations_total{{op=\"{name}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok()).unwrap_or(0.0)
    };
    (op("read"), op("write"), op("delete"))
}

/// At rest, replicas cost nothing: no polling of the log, no re-reading of
/// the operator's lists (they are re-read only when their version changes),
/// and `/ready` probes the shared store at most once per interval.
#[tokio::test]
async fn idle_replicas_cost_no_firestore_operations() {
    let (_, admin, a, b) = two_replicas_with_admin().await;
    a.client().await.publish_ok(&note(&Keys::generate(), "some traffic first", 0)).await;
    b.wait_for_log("caught up with the shared event log").await;
    let spammer = Keys::generate();
    manage(&a, &admin, "banpubkey", json!([spammer.public_key().to_hex()])).await;
    let mut on_b = b.client().await;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    while on_b.publish(&note(&spammer, "spam", 0)).await.0 {
        assert!(tokio::time::Instant::now() < deadline, "the ban made on A never reached B");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rest begins once what the above set off (the ban's clean-up of the
    // log, spam accepted before the ban arrived) has settled.
    let mut before = (firestore_operations(&a).await, firestore_operations(&b).await);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = (firestore_operations(&a).await, firestore_operations(&b).await);
        if now == before {
            break;
        }
        before = now;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..3 {
        let (status, _, _) = b.http_get("/ready", "*/*").await;
        assert!(status.contains("200"), "{status}");
    }
    let after = (firestore_operations(&a).await, firestore_operations(&b).await);
    assert_eq!(before.0, after.0, "replica A did Firestore operations at rest");
    let (reads_before, reads_after) = (before.1.0, after.1.0);
    assert!(reads_after - reads_before <= 1.0, "B read {} documents at rest", reads_after - reads_before);
    assert_eq!((before.1.1, before.1.2), (after.1.1, after.1.2), "B wrote at rest");
}

/// A replica's `[[plugins]]` entry for the probe, ticking every second and
/// recording its ticks as replica `name`.
fn ticking_probe(name: &str) -> String {
    let probe = harness::plugin_path("probe.wasm");
    format!(
        "[[plugins]]\nname = \"probe\"\npath = {}\n[plugins.settings]\n\"tick-seconds\" = \"1\"\nreplica = \"{name}\"\n",
        serde_json::to_string(&probe.display().to_string()).unwrap()
    )
}

/// What the probe reports about ticks (`probe v1 ticks=N tickers=a,b`).
async fn tick_report(relay: &TestRelay) -> String {
    relay.client().await.req_refused("ticks", vec![json!({"kinds": [9999]})]).await
}

/// Plugin housekeeping works on state every replica shares, so it runs on
/// one replica at a time (the holder of a lease), and another takes over
/// when that one stops.
#[tokio::test]
async fn plugin_ticks_run_on_one_replica_at_a_time_and_fail_over() {
    let project = fresh_project();
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let a = TestRelay::start_with(Some(&format!("{}{}", replica_config(&project), ticking_probe("a"))), &env).await;
    let b = TestRelay::start_with(Some(&format!("{}{}", replica_config(&project), ticking_probe("b"))), &env).await;
    // Several ticks' worth: both replicas try every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let report = tick_report(&a).await;
        if report.contains("ticks=4") {
            break report;
        }
        assert!(tokio::time::Instant::now() < deadline, "the probe did not tick: {report}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut replicas = vec![a, b];
    let holder = match first.rsplit_once("tickers=") {
        Some((_, "a")) => 0,
        Some((_, "b")) => 1,
        _ => panic!("ticks ran on both replicas: {first}"),
    };
    // The holder dies without a word; the other takes over once its lease expires.
    drop(replicas.remove(holder));
    let survivor = &replicas[0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let report = tick_report(survivor).await;
        if report.ends_with("tickers=a,b") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no replica took over the ticks: {report}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `import` on a replica's data directory also publishes what it imports to
/// the shared log, so the other replicas receive it.
#[tokio::test]
async fn events_imported_on_one_replica_reach_the_others() {
    let project = fresh_project();
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let running = TestRelay::start_with(Some(&replica_config(&project)), &env).await;
    let k = Keys::generate();
    let events: Vec<_> = (0..3).map(|i| note(&k, &format!("imported {i}"), i)).collect();
    import_into_shared_log(&project, &events).await;
    let ids: Vec<String> = events.iter().map(|e| e.id.to_hex()).collect();
    eventually_ids(&mut running.client().await, json!({"authors": [k.public_key().to_hex()]}), &ids).await;
}

/// Replicas that disagree for a while (here, B's limit on `created_at` in
/// the future is tighter than A's, as with a skewed clock) diverge: the
/// follower refuses an event once and never sees it again. Reconciliation
/// reads the log again and stores it on B once B accepts it; C, the same
/// as B without reconciliation, keeps lacking it.
#[tokio::test]
async fn replicas_that_diverged_are_repaired_by_reconciliation() {
    let project = fresh_project();
    let config = replica_config(&project);
    let host = emulator_host();
    let a = TestRelay::start_with(Some(&config), &[("FIRESTORE_EMULATOR_HOST", host)]).await;
    let tight = [("FIRESTORE_EMULATOR_HOST", host), ("WASM_RELAY_LIMITS__CREATED_AT_UPPER_LIMIT", "2")];
    let b = TestRelay::start_with(
        Some(&config),
        &[tight[0], tight[1], ("WASM_RELAY_REPLICATION__RECONCILE_INTERVAL_S", "1")],
    )
    .await;
    let c = TestRelay::start_with(
        Some(&config),
        &[tight[0], tight[1], ("WASM_RELAY_REPLICATION__RECONCILE_INTERVAL_S", "0")],
    )
    .await;
    let k = Keys::generate();
    let author = json!({"authors": [k.public_key().to_hex()]});
    let early = sign(&k, 1, "dated 6 s ahead", &[], now() + 6);
    let mut on_a = a.client().await;
    on_a.publish_ok(&early).await;
    let marker = note(&k, "published after it", 0);
    on_a.publish_ok(&marker).await;
    // C has decided on the early event once it has the later one: refused.
    let mut on_c = c.client().await;
    eventually_ids(&mut on_c, author.clone(), &[marker.id.to_hex()]).await;
    c.wait_for_log("a replicated event is refused on this replica").await;

    let both = [early.id.to_hex(), marker.id.to_hex()];
    eventually_ids(&mut b.client().await, author.clone(), &both).await;
    b.wait_for_log("reconciling with the shared event log found events missing here").await;
    let (_, _, metrics) = b.http_get("/metrics", "*/*").await;
    assert!(metrics.contains("wasm_relay_replication_repaired_total 1"), "{metrics}");
    // Without reconciliation, C never gets it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_c_now = on_c.req_ids("after", vec![author]).await;
    assert_eq!(on_c_now, vec![marker.id.to_hex()], "C has only what its follower applied");
}

/// Serves `body` over HTTP on loopback to any number of GETs; returns its URL.
async fn serve_file(body: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/snapshot.jsonl", listener.local_addr().unwrap());
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    url
}

/// A new replica starts from a snapshot: another replica's export (which
/// starts with its position in the shared log), served over HTTP. It loads
/// it before it serves, then follows the log from that position, so it
/// serves what only the snapshot holds and what was published after it.
#[tokio::test]
async fn a_new_replica_starts_from_another_replicas_snapshot_and_follows_the_log_from_there() {
    let project = fresh_project();
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let mut a = TestRelay::start_with(Some(&replica_config(&project)), &env).await;
    let k = Keys::generate();
    let author = json!({"authors": [k.public_key().to_hex()]});
    let before: Vec<_> = (0..3).map(|i| note(&k, &format!("before the snapshot {i}"), 10 + i)).collect();
    let mut on_a = a.client().await;
    for e in &before {
        on_a.publish_ok(e).await;
    }
    a.wait_for_log("caught up with the shared event log").await;
    drop(on_a);

    // The operator stops A, exports its store, and starts it again.
    assert!(a.terminate().await.success());
    let out = tokio::process::Command::new(harness::relay_binary())
        .args(["export", "--data-dir"])
        .arg(a.data_dir())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut snapshot = String::from_utf8(out.stdout).unwrap();
    assert!(snapshot.starts_with("{\"log_position\":"), "a replica's export starts with its log position: {snapshot}");
    // An event only the snapshot holds shows that the new replica loaded it.
    let only_in_snapshot = note(&k, "only in the snapshot", 5);
    snapshot.push_str(&(only_in_snapshot.as_json() + "\n"));
    let a = a.restart().await;
    let after = note(&k, "after the snapshot", 1);
    a.client().await.publish_ok(&after).await;

    let url = serve_file(snapshot.into_bytes()).await;
    let c = TestRelay::start_with(
        Some(&replica_config(&project)),
        &[env[0], ("WASM_RELAY_REPLICATION__SNAPSHOT_URL", url.as_str())],
    )
    .await;
    c.wait_for_log("joined from a snapshot").await;
    let mut expected: Vec<String> = before.iter().map(|e| e.id.to_hex()).collect();
    expected.extend([only_in_snapshot.id.to_hex(), after.id.to_hex()]);
    eventually_ids(&mut c.client().await, author, &expected).await;
    let (status, _, body) = c.http_get("/ready", "*/*").await;
    assert!(status.contains("200") && body.contains("following"), "{status} {body}");

    // Restarted, it is no longer new: it resumes at its own position.
    let mut c = c;
    assert!(c.terminate().await.success());
    let c = c.restart().await;
    c.wait_for_log("caught up with the shared event log").await;
    assert!(c.log_lines("joined from a snapshot").is_empty(), "a replica loads a snapshot only once");
}

/// Imports `events` into a replica of `project` (offline, with replication:
/// published to the shared log as one publish).
async fn import_into_shared_log(project: &str, events: &[nostr::event::Event]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("import.jsonl");
    std::fs::write(&input, events.iter().map(|e| e.as_json() + "\n").collect::<String>()).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, replica_config(project)).unwrap();
    let out = tokio::process::Command::new(harness::relay_binary())
        .arg("--config")
        .arg(&config)
        .args(["import", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg(&input)
        .env("FIRESTORE_EMULATOR_HOST", emulator_host())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The ids of the events the shared log of `project` holds, by document.
async fn log_ids_by_document(project: &str) -> Vec<Vec<String>> {
    let mut docs: Vec<Vec<String>> = log_documents(project)
        .await
        .iter()
        .map(|doc| {
            let entries = wasm_relay::replication::log_document::entries(doc);
            let mut ids: Vec<String> = entries.iter().filter_map(|e| e.id.map(hex::encode)).collect();
            ids.sort();
            ids
        })
        .collect();
    docs.sort();
    docs
}

/// Events published together share one log document, so the log costs one
/// write (and each replica one read) per batch; a ban, a deletion and a
/// request to vanish remove their events from such a document and leave
/// the others, which every replica still gets.
#[tokio::test]
async fn events_published_together_share_one_log_document_and_leave_it_one_by_one() {
    let (project, admin, a, b) = two_replicas_with_admin().await;
    let (alice, bob, carol) = (Keys::generate(), Keys::generate(), Keys::generate());
    let mut events = Vec::new();
    for i in 0..40 {
        events.push(note(&alice, &format!("alice {i}"), i));
        events.push(note(&bob, &format!("bob {i}"), i));
        events.push(note(&carol, &format!("carol {i}"), i));
    }
    import_into_shared_log(&project, &events).await;
    let mut all: Vec<String> = events.iter().map(|e| e.id.to_hex()).collect();
    all.sort();
    assert_eq!(log_ids_by_document(&project).await, vec![all.clone()], "120 events, one document");
    let authors =
        json!({"authors": [alice.public_key().to_hex(), bob.public_key().to_hex(), carol.public_key().to_hex()]});
    eventually_ids(&mut b.client().await, authors.clone(), &all).await;

    // The operator bans alice on replica A; bob deletes one note; carol vanishes.
    manage(&a, &admin, "banpubkey", json!([alice.public_key().to_hex()])).await;
    let deleted = events[1].id.to_hex();
    let mut on_a = a.client().await;
    on_a.publish_ok(&sign(&bob, 5, "", &[&["e", &deleted]], now())).await;
    on_a.publish_ok(&sign(&carol, 62, "", &[&["relay", "ALL_RELAYS"]], now())).await;

    let left: Vec<String> = events
        .iter()
        .filter(|e| e.pubkey == bob.public_key() && e.id.to_hex() != deleted)
        .map(|e| e.id.to_hex())
        .collect();
    let mut expected = left.clone();
    expected.sort();
    let mut seen = Vec::new();
    for _ in 0..600 {
        seen = log_ids_by_document(&project).await;
        if seen.first() == Some(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.first(), Some(&expected), "the shared document keeps bob's other 39 notes only");
    // A replica starting now replays the log: bob's notes, none of the others.
    let c =
        TestRelay::start_with(Some(&replica_config(&project)), &[("FIRESTORE_EMULATOR_HOST", emulator_host())]).await;
    let mut on_c = c.client().await;
    eventually_ids(&mut on_c, json!({"authors": [bob.public_key().to_hex()], "kinds": [1]}), &left).await;
    let others = json!({"authors": [alice.public_key().to_hex(), carol.public_key().to_hex()], "kinds": [1]});
    let gone = on_c.req_ids("others", vec![others]).await;
    assert!(gone.is_empty(), "a new replica got events the log no longer holds: {gone:?}");
}

/// A replica that starts on a long shared log serves a partial store until it
/// has replayed it: `/ready` says so (503) until then, and 200 after.
#[tokio::test]
async fn a_replica_replaying_the_log_is_not_ready_until_it_has_caught_up() {
    use firestore::gcloud_sdk::google::firestore::v1 as fs;
    use wasm_relay::firestore::string_value;
    let project = fresh_project();
    emulator_host();
    let config = FirestoreConfig { project_id: project.clone(), ..Default::default() };
    let firestore = Firestore::connect(&config).await.expect("connect to the emulator");
    let k = Keys::generate();
    let events: Vec<_> = (0..20_000u64).map(|i| note(&k, &format!("log {i}"), i % 1000)).collect();
    for chunk in events.chunks(500) {
        let writes = chunk
            .iter()
            .map(|e| {
                let fields = [
                    ("json".to_string(), string_value(e.as_json())),
                    ("origin".to_string(), string_value("another-replica")),
                    ("pubkey".to_string(), string_value(e.pubkey.to_hex())),
                ];
                let document = fs::Document {
                    name: firestore.document("events", &e.id.to_hex()),
                    fields: fields.into_iter().collect(),
                    ..Default::default()
                };
                fs::Write { operation: Some(fs::write::Operation::Update(document)), ..Default::default() }
            })
            .collect();
        firestore.commit_idempotent("test log", writes).await.expect("commit to the emulator");
    }
    let env = [("FIRESTORE_EMULATOR_HOST", emulator_host())];
    let relay = TestRelay::start_with(Some(&replica_config(&project)), &env).await;
    let (status, _, body) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("503") && body.contains("replaying the shared event log"), "{status} {body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, body) = relay.http_get("/ready", "*/*").await;
        if status.contains("200") {
            assert!(body.contains("\"replication\":\"following\""), "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still not ready after 120 s: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let count = relay.client().await.count("n", vec![json!({"authors": [k.public_key().to_hex()]})]).await;
    assert_eq!(count[2]["count"], 20_000, "ready means the whole log is applied");
}

/// An event of the shared log that a replica's policy kept out (a kind the
/// operator disallowed) is applied once the operator allows the kind again.
#[tokio::test]
async fn events_kept_out_by_a_lifted_rule_are_applied_after_all() {
    let (project, admin, a, b) = two_replicas_with_admin().await;
    manage(&a, &admin, "disallowkind", json!([7])).await;
    let k = Keys::generate();
    let mut on_b = b.client().await;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    while on_b.publish(&sign(&k, 7, "+", &[], now())).await.0 {
        assert!(tokio::time::Instant::now() < deadline, "the rule made on A never reached B");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A reaction written to the log meanwhile (by a replica that still took it).
    let reaction = sign(&k, 7, "written to the log while kind 7 was disallowed", &[], now());
    commit_to_shared_log(&project, &reaction, (now() as i64, 0)).await;
    b.wait_for_log("a replicated event is refused on this replica").await;
    assert!(on_b.req_ids("before", vec![json!({"ids": [reaction.id.to_hex()]})]).await.is_empty());

    manage(&a, &admin, "allowkind", json!([7])).await;
    eventually_ids(&mut on_b, json!({"ids": [reaction.id.to_hex()]}), &[reaction.id.to_hex()]).await;
}
