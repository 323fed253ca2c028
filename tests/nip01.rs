//! NIP-01 over real WebSockets against the real relay binary.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::time::Duration;

use harness::TestRelay;
use nostr::key::Keys;
use nostr45::{Publish, ids, note, now, sign};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn stored_events_are_found_through_every_index() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client().await;
    let (a, b) = (Keys::generate(), Keys::generate());
    let t = now() - 100;
    let target = "ab".repeat(32);
    let a1 = sign(&a, 1, "a1", &[&["t", "nostr"], &["p", &target]], t);
    let a2 = sign(&a, 7, "a2", &[&["e", &target], &["t", "rust"]], t + 1);
    let b1 = sign(&b, 1, "b1", &[&["t", "nostr"], &["x", "custom"]], t + 2);
    let b2 = sign(&b, 445, "b2", &[&["h", &"cd".repeat(32)]], t + 3);
    for e in [&a1, &a2, &b1, &b2] {
        alice.publish_ok(e).await;
    }
    let (pa, pb) = (a.public_key().to_hex(), b.public_key().to_hex());
    let mut bob = relay.client().await;
    let cases = vec![
        (json!({"ids": [a1.id.to_hex(), b2.id.to_hex()]}), ids(&[&b2, &a1])),
        (json!({"authors": [pa]}), ids(&[&a2, &a1])),
        (json!({"authors": [pa, pb], "kinds": [1]}), ids(&[&b1, &a1])),
        (json!({"kinds": [445]}), ids(&[&b2])),
        (json!({"kinds": [1, 7]}), ids(&[&b1, &a2, &a1])),
        (json!({"#t": ["nostr"]}), ids(&[&b1, &a1])),
        (json!({"#t": ["nostr", "rust"]}), ids(&[&b1, &a2, &a1])),
        (json!({"#t": ["nostr"], "kinds": [1], "authors": [pb]}), ids(&[&b1])),
        (json!({"#p": [target]}), ids(&[&a1])),
        (json!({"#e": [target]}), ids(&[&a2])),
        (json!({"#x": ["custom"]}), ids(&[&b1])),
        (json!({"#h": ["cd".repeat(32)]}), ids(&[&b2])),
        (json!({"#t": ["nostr"], "#p": [target]}), ids(&[&a1])),
        (json!({"since": t + 1, "until": t + 2}), ids(&[&b1, &a2])),
        (json!({"authors": [pa], "since": t + 1}), ids(&[&a2])),
        (json!({"#t": ["missing"]}), vec![]),
        (json!({"kinds": []}), vec![]),
        (json!({}), ids(&[&b2, &b1, &a2, &a1])),
    ];
    for (i, (filter, expected)) in cases.into_iter().enumerate() {
        let got = bob.req_ids(&format!("q{i}"), vec![filter.clone()]).await;
        assert_eq!(got, expected, "filter {filter}");
    }
}

#[tokio::test]
async fn results_are_newest_first_with_ties_by_lowest_id_and_limited() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let t = now() - 1000;
    let mut same_time: Vec<_> = (0..6).map(|i| sign(&k, 1, &format!("tie {i}"), &[], t)).collect();
    let newer = sign(&k, 1, "newer", &[], t + 10);
    let older = sign(&k, 1, "older", &[], t - 10);
    for e in same_time.iter().chain([&newer, &older]) {
        c.publish_ok(e).await;
    }
    same_time.sort_by_key(|e| e.id.to_hex());
    let mut expected = vec![newer.id.to_hex()];
    expected.extend(same_time.iter().map(|e| e.id.to_hex()));
    expected.push(older.id.to_hex());
    let filter = json!({"authors": [k.public_key().to_hex()]});
    assert_eq!(c.req_ids("all", vec![filter.clone()]).await, expected);
    let mut limited = filter.clone();
    limited["limit"] = json!(3);
    assert_eq!(c.req_ids("three", vec![limited]).await, expected[..3].to_vec());
    // The same order from the time index and the kind index.
    assert_eq!(c.req_ids("kind", vec![json!({"kinds": [1], "limit": 4})]).await, expected[..4].to_vec());
}

#[tokio::test]
async fn filters_in_one_req_are_ored_without_duplicates() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let e1 = sign(&k, 1, "one", &[&["t", "x"]], now() - 5);
    let e2 = sign(&k, 7, "two", &[], now() - 4);
    c.publish_ok(&e1).await;
    c.publish_ok(&e2).await;
    let got = c.req_ids("or", vec![json!({"kinds": [1]}), json!({"#t": ["x"]}), json!({"kinds": [7]})]).await;
    assert_eq!(got, ids(&[&e2, &e1]));
    // Each filter's limit applies to that filter.
    let got = c.req_ids("lim", vec![json!({"kinds": [1], "limit": 1}), json!({"kinds": [7], "limit": 1})]).await;
    assert_eq!(got, ids(&[&e2, &e1]));
}

#[tokio::test]
async fn every_bad_event_gets_exactly_one_ok_false_with_a_reason() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let good = note(&k, "hello", 0);
    let id = good.id.to_hex();

    let mut v: serde_json::Value = serde_json::from_str(&good.as_json()).unwrap();
    v["content"] = json!("tampered");
    let (ok, msg) = c.publish_raw(&v.to_string(), &id).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("id"), "{msg}");

    let mut v: serde_json::Value = serde_json::from_str(&good.as_json()).unwrap();
    let other = note(&k, "other", 0);
    v["sig"] = json!(other.sig.to_string());
    let (ok, msg) = c.publish_raw(&v.to_string(), &id).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("signature"), "{msg}");

    let (ok, msg) = c.publish_raw(&format!("{{\"id\":\"{id}\",\"kind\":1}}"), &id).await;
    assert!(!ok && msg.starts_with("invalid: malformed event"), "{msg}");

    let future = sign(&k, 1, "future", &[], now() + 3600);
    let (ok, msg) = c.publish(&future).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("future"), "{msg}");

    let ancient = sign(&k, 1, "ancient", &[], 1_000_000);
    let (ok, msg) = c.publish(&ancient).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("older"), "{msg}");

    // No id to answer with: a NOTICE instead.
    c.send_raw(r#"["EVENT",{"kind":1}]"#).await;
    assert!(c.notice().await.starts_with("invalid:"));
    c.send_raw(r#"["EVENT","not an object"]"#).await;
    assert!(c.notice().await.starts_with("invalid:"));

    // The connection still works and nothing was stored.
    c.publish_ok(&good).await;
    assert_eq!(c.req_ids("s", vec![json!({"authors": [k.public_key().to_hex()]})]).await, vec![id]);
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn limits_are_enforced_with_clear_replies() {
    let relay = TestRelay::start_with_env(&[
        ("WASM_RELAY_LIMITS__MAX_EVENT_TAGS", "3"),
        ("WASM_RELAY_LIMITS__MAX_CONTENT_LENGTH", "10"),
        ("WASM_RELAY_LIMITS__MAX_MESSAGE_LENGTH", "2048"),
        ("WASM_RELAY_LIMITS__MAX_SUBSCRIPTIONS", "2"),
        ("WASM_RELAY_LIMITS__MAX_FILTERS", "2"),
    ])
    .await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let (ok, msg) = c.publish(&sign(&k, 1, "x", &[&["t", "1"], &["t", "2"], &["t", "3"], &["t", "4"]], now())).await;
    assert!(!ok && msg.contains("4 tags"), "{msg}");
    let (ok, msg) = c.publish(&sign(&k, 1, "more than ten bytes", &[], now())).await;
    assert!(!ok && msg.contains("content"), "{msg}");
    let big = sign(&k, 1, "ok", &[&["t", &"x".repeat(3000)]], now());
    let (ok, msg) = c.publish(&big).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("2048"), "{msg}");
    // Oversized non-EVENT messages get a NOTICE.
    c.send_raw(&format!("[\"REQ\",\"big\",{{\"#t\":[\"{}\"]}}]", "y".repeat(3000))).await;
    assert!(c.notice().await.contains("2048"));

    let too_many = c.req_refused("f", vec![json!({}), json!({}), json!({})]).await;
    assert!(too_many.starts_with("invalid:") && too_many.contains("filters"), "{too_many}");
    c.req("s1", vec![json!({"limit": 0})]).await;
    c.req("s2", vec![json!({"limit": 0})]).await;
    let third = c.req_refused("s3", vec![json!({"limit": 0})]).await;
    assert!(third.starts_with("blocked:") && third.contains("CLOSE"), "{third}");
    // Replacing an open subscription is not a new one; closing frees a slot.
    c.req("s2", vec![json!({"limit": 0})]).await;
    c.send(json!(["CLOSE", "s1"])).await;
    c.req("s3", vec![json!({"limit": 0})]).await;
}

#[tokio::test]
async fn malformed_reqs_are_closed_with_invalid() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let cases = vec![
        ("ids", vec![json!({"ids": ["abc"]})], "ids"),
        ("authors", vec![json!({"authors": ["AB".repeat(32)]})], "authors"),
        ("e", vec![json!({"#e": ["nothex"]})], "#e"),
        ("p", vec![json!({"#p": [5]})], "#p"),
        ("kinds", vec![json!({"kinds": ["1"]})], "kinds"),
        ("since", vec![json!({"since": -1})], "since"),
        ("unknown", vec![json!({"search": "x"})], "search"),
        ("shape", vec![json!([1, 2])], "object"),
        ("none", vec![], "at least one filter"),
    ];
    for (sub, filters, expected) in cases {
        let msg = c.req_refused(sub, filters).await;
        assert!(msg.starts_with("invalid:") && msg.contains(expected), "{sub}: {msg}");
    }
    let long = "s".repeat(65);
    let msg = c.req_refused(&long, vec![json!({})]).await;
    assert!(msg.starts_with("invalid:") && msg.contains("64"), "{msg}");
    let msg = c.req_refused("", vec![json!({})]).await;
    assert!(msg.starts_with("invalid:"), "{msg}");
    // 1000 authors is fine.
    let authors: Vec<String> = (0..1000).map(|i| format!("{i:064x}")).collect();
    assert!(c.req("many", vec![json!({"authors": authors})]).await.is_empty());
}

#[tokio::test]
async fn unreadable_messages_get_a_notice_and_the_connection_stays_usable() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    for bad in ["not json", "{}", "[]", "[42]", r#"["HELLO"]"#, r#"["REQ"]"#, r#"["CLOSE"]"#] {
        c.send_raw(bad).await;
        let notice = c.notice().await;
        assert!(notice.starts_with("invalid:"), "{bad}: {notice}");
    }
    c.send_binary(vec![1, 2, 3]).await;
    assert!(c.notice().await.contains("binary"));
    let k = Keys::generate();
    c.publish_ok(&note(&k, "still here", 0)).await;
}

#[tokio::test]
async fn duplicates_are_acknowledged_as_duplicates() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let e = note(&Keys::generate(), "once", 0);
    assert_eq!(c.publish(&e).await, (true, String::new()));
    let (ok, msg) = c.publish(&e).await;
    assert!(ok && msg.starts_with("duplicate:"), "{msg}");
    assert_eq!(c.req_ids("s", vec![json!({"ids": [e.id.to_hex()]})]).await.len(), 1);
}

#[tokio::test]
async fn replaceable_events_keep_the_newest_and_on_ties_the_lowest_id() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let pk = k.public_key().to_hex();
    let t = now() - 100;
    for kind in [0u16, 3, 10002] {
        let old = sign(&k, kind, "old", &[], t);
        let new = sign(&k, kind, "new", &[], t + 10);
        c.publish_ok(&old).await;
        c.publish_ok(&new).await;
        let filter = json!({"authors": [pk], "kinds": [kind]});
        assert_eq!(c.req_ids("r", vec![filter.clone()]).await, vec![new.id.to_hex()], "kind {kind}");
        // An older version arriving late is refused and changes nothing.
        let late = sign(&k, kind, "late", &[], t + 5);
        let (ok, msg) = c.publish(&late).await;
        assert!(!ok && msg.starts_with("duplicate:") && msg.contains("newer"), "{msg}");
        assert_eq!(c.req_ids("r", vec![filter.clone()]).await, vec![new.id.to_hex()]);
        // The replaced version is gone from every index.
        assert!(c.req_ids("r", vec![json!({"ids": [old.id.to_hex()]})]).await.is_empty());
    }
    // Equal created_at: the lowest id wins, whichever arrives first.
    let mut pair: Vec<_> = (0..2).map(|i| sign(&k, 10000, &format!("tie {i}"), &[], t + 50)).collect();
    pair.sort_by_key(|e| e.id.to_hex());
    let (low, high) = (&pair[0], &pair[1]);
    c.publish_ok(high).await;
    c.publish_ok(low).await;
    let filter = json!({"authors": [pk], "kinds": [10000]});
    assert_eq!(c.req_ids("tie", vec![filter.clone()]).await, vec![low.id.to_hex()]);
    let (ok, _) = c.publish(high).await;
    assert!(!ok);
    let k2 = Keys::generate();
    let mut pair: Vec<_> = (0..2).map(|i| sign(&k2, 10000, &format!("tie {i}"), &[], t + 50)).collect();
    pair.sort_by_key(|e| e.id.to_hex());
    c.publish_ok(&pair[0]).await;
    let (ok, _) = c.publish(&pair[1]).await;
    assert!(!ok);
    assert_eq!(
        c.req_ids("tie2", vec![json!({"authors": [k2.public_key().to_hex()]})]).await,
        vec![pair[0].id.to_hex()]
    );
}

#[tokio::test]
async fn addressable_events_are_replaced_per_d_tag() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let pk = k.public_key().to_hex();
    let t = now() - 100;
    let a_old = sign(&k, 30443, "a-old", &[&["d", "a"]], t);
    let a_new = sign(&k, 30443, "a-new", &[&["d", "a"]], t + 1);
    let b = sign(&k, 30443, "b", &[&["d", "b"]], t);
    let no_d = sign(&k, 30443, "no d", &[], t);
    let empty_d_newer = sign(&k, 30443, "empty d", &[&["d", ""]], t + 2);
    for e in [&a_old, &a_new, &b, &no_d, &empty_d_newer] {
        c.publish_ok(e).await;
    }
    let got = c.req_ids("s", vec![json!({"authors": [pk], "kinds": [30443]})]).await;
    // A missing d tag and an empty one address the same slot.
    assert_eq!(got, ids(&[&empty_d_newer, &a_new, &b]));
    assert_eq!(c.req_ids("d", vec![json!({"kinds": [30443], "#d": ["a"]})]).await, ids(&[&a_new]));
    // Another author's event with the same d is independent.
    let other = sign(&Keys::generate(), 30443, "other", &[&["d", "a"]], t);
    c.publish_ok(&other).await;
    assert_eq!(c.req_ids("d2", vec![json!({"kinds": [30443], "#d": ["a"]})]).await, ids(&[&a_new, &other]));
}

#[tokio::test]
async fn ephemeral_events_reach_live_subscribers_and_are_never_stored() {
    let relay = TestRelay::start().await;
    let mut sub = relay.client().await;
    let mut publisher = relay.client().await;
    assert!(sub.req("live", vec![json!({"kinds": [20001]})]).await.is_empty());
    let e = sign(&Keys::generate(), 20001, "now or never", &[], now());
    publisher.publish_ok(&e).await;
    assert_eq!(sub.next_event("live").await["id"], e.id.to_hex());
    assert!(publisher.req("later", vec![json!({"kinds": [20001]})]).await.is_empty());
    assert!(publisher.req("byid", vec![json!({"ids": [e.id.to_hex()]})]).await.is_empty());
}

#[tokio::test]
async fn live_subscriptions_send_only_matching_events_after_eose() {
    let relay = TestRelay::start().await;
    let mut sub = relay.client().await;
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    let stored = sign(&k, 1, "stored", &[&["t", "live"]], now() - 10);
    publisher.publish_ok(&stored).await;
    let got = sub.req_ids("s", vec![json!({"#t": ["live"]})]).await;
    assert_eq!(got, ids(&[&stored]));
    let other = sign(&k, 1, "other tag", &[&["t", "dead"]], now());
    let matching = sign(&k, 1, "matching", &[&["t", "live"]], now());
    publisher.publish_ok(&other).await;
    publisher.publish_ok(&matching).await;
    assert_eq!(sub.next_event("s").await["id"], matching.id.to_hex());
    sub.expect_silence(QUIET).await;
    // The publisher's own matching subscription sees its events too.
    publisher.req("mine", vec![json!({"authors": [k.public_key().to_hex()], "limit": 0})]).await;
    let again = sign(&k, 1, "again", &[], now());
    publisher.publish_ok(&again).await;
    assert_eq!(publisher.next_event("mine").await["id"], again.id.to_hex());
}

#[tokio::test]
async fn limit_zero_sends_only_eose_then_stays_live() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&note(&k, "before", 5)).await;
    assert!(c.req("z", vec![json!({"kinds": [1], "limit": 0})]).await.is_empty());
    let after = note(&k, "after", 0);
    c.publish_ok(&after).await;
    assert_eq!(c.next_event("z").await["id"], after.id.to_hex());
}

#[tokio::test]
async fn a_req_with_the_same_id_replaces_the_subscription_and_close_ends_it() {
    let relay = TestRelay::start().await;
    let mut sub = relay.client().await;
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    sub.req("s", vec![json!({"kinds": [1], "limit": 0})]).await;
    sub.req("s", vec![json!({"kinds": [7], "limit": 0})]).await;
    let one = sign(&k, 1, "kind 1", &[], now());
    let seven = sign(&k, 7, "+", &[], now());
    publisher.publish_ok(&one).await;
    publisher.publish_ok(&seven).await;
    assert_eq!(sub.next_event("s").await["id"], seven.id.to_hex());
    sub.expect_silence(QUIET).await;
    sub.send(json!(["CLOSE", "s"])).await;
    // CLOSE has no reply; a later REQ round-trip proves it was processed. The round-trip's own
    // subscription matches nothing, so it cannot be the one that answers the next event.
    sub.req("sync", vec![json!({"ids": ["0".repeat(64)], "limit": 0})]).await;
    publisher.publish_ok(&sign(&k, 7, "++", &[], now())).await;
    sub.expect_silence(QUIET).await;
}

#[tokio::test]
async fn count_uses_req_semantics() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    for i in 0..5 {
        c.publish_ok(&sign(&k, 1, &format!("{i}"), &[&["t", if i % 2 == 0 { "even" } else { "odd" }]], now() - i))
            .await;
    }
    c.publish_ok(&sign(&k, 7, "r", &[&["t", "even"]], now())).await;
    let pk = k.public_key().to_hex();
    assert_eq!(c.count("c1", vec![json!({"authors": [pk]})]).await, json!(["COUNT", "c1", {"count": 6}]));
    assert_eq!(c.count("c2", vec![json!({"#t": ["even"], "kinds": [1]})]).await[2]["count"], 3);
    // Overlapping filters count each event once.
    assert_eq!(c.count("c3", vec![json!({"#t": ["even"]}), json!({"kinds": [7]})]).await[2]["count"], 4);
    let refused = c.count("c4", vec![json!({"ids": ["zz"]})]).await;
    assert_eq!(refused[0], "CLOSED");
    assert!(refused[2].as_str().unwrap().starts_with("invalid:"));
}

#[tokio::test]
async fn acknowledged_events_survive_a_crash_fully_indexed() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let pk = k.public_key().to_hex();
    let t = now() - 50;
    let regular = sign(&k, 1, "kept", &[&["t", "persist"], &["p", &"ee".repeat(32)]], t);
    let replaceable = sign(&k, 0, "{\"name\":\"k\"}", &[], t);
    let addressable = sign(&k, 30443, "kp", &[&["d", "slot"]], t);
    for e in [&regular, &replaceable, &addressable] {
        c.publish_ok(e).await;
    }
    drop(c);
    let relay = relay.crash_and_restart().await;
    let mut c = relay.client().await;
    // Same created_at: NIP-01 order is by id.
    let mut all = ids(&[&regular, &replaceable, &addressable]);
    all.sort();
    assert_eq!(c.req_ids("a", vec![json!({"authors": [pk]})]).await, all);
    assert_eq!(c.req_ids("t", vec![json!({"#t": ["persist"]})]).await, ids(&[&regular]));
    assert_eq!(c.req_ids("p", vec![json!({"#p": ["ee".repeat(32)]})]).await, ids(&[&regular]));
    assert_eq!(c.req_ids("k", vec![json!({"kinds": [30443]})]).await, ids(&[&addressable]));
    assert_eq!(c.req_ids("i", vec![json!({"ids": [replaceable.id.to_hex()]})]).await, ids(&[&replaceable]));
    // Replacement state survived too.
    let (ok, _) = c.publish(&sign(&k, 0, "older", &[], t - 1)).await;
    assert!(!ok);
    let (ok, msg) = c.publish(&regular).await;
    assert!(ok && msg.starts_with("duplicate:"));
}

#[tokio::test]
async fn concurrent_publishers_all_get_durable_oks() {
    let relay = TestRelay::start().await;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let url = relay.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = harness::Client::connect(&url).await;
            let k = Keys::generate();
            let events: Vec<_> =
                (0..25).map(|i| sign(&k, 1, &format!("{n}/{i}"), &[&["t", "load"]], now() - i)).collect();
            // Pipeline: send all, then read all OKs.
            for e in &events {
                c.send_raw(&format!("[\"EVENT\",{}]", e.as_json())).await;
            }
            for e in &events {
                let (ok, msg) = c.expect_ok(&e.id.to_hex()).await;
                assert!(ok, "{msg}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = relay.client().await;
    assert_eq!(c.count("n", vec![json!({"#t": ["load"]})]).await[2]["count"], 500);
}

#[tokio::test]
async fn nip11_document_is_served_on_the_same_port() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_LIMITS__MAX_LIMIT", "777")]).await;
    let (status, headers, body) = relay.http_get("/", "application/nostr+json").await;
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("content-type: application/nostr+json"));
    assert!(headers.contains("access-control-allow-origin: *"));
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["limitation"]["max_limit"], 777);
    assert_eq!(doc["limitation"]["max_message_length"], 262144);
    assert!(doc["supported_nips"].as_array().unwrap().contains(&json!(1)));
    let (status, headers, body) = relay.http_get("/", "text/html").await;
    assert!(status.contains("200") && headers.contains("text/html") && body.contains("Nostr relay"));
}
