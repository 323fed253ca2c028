//! NIP-09, 11, 40, 42, 45, 59, 62, 70, rate limits and access lists over real
//! WebSockets.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::time::Duration;

use harness::TestRelay;
use nostr::key::Keys;
use nostr45::{Publish, auth_event, authenticate, gift_wrap, ids, now, send_auth, sign};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn nip42_auth_accepts_only_a_fresh_answer_to_this_connections_challenge() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    assert_eq!(c.challenge.len(), 32);
    let (alice, bob) = (Keys::generate(), Keys::generate());
    for (event, expected) in [
        (auth_event(&alice, "wrong", &relay.url, now()), "challenge"),
        (auth_event(&alice, &c.challenge.clone(), "ws://elsewhere.example", now()), "relay tag"),
        (auth_event(&alice, &c.challenge.clone(), &relay.url, now() - 3600), "10 minutes"),
        (sign(&alice, 1, "", &[&["challenge", &c.challenge.clone()], &["relay", &relay.url]], now()), "kind 22242"),
    ] {
        let (ok, msg) = send_auth(&mut c, &event).await;
        assert!(!ok && msg.starts_with("invalid:") && msg.contains(expected), "{expected}: {msg}");
    }
    // Trailing slash and case in the relay URL do not matter.
    let url = format!("{}/", relay.url.to_uppercase().replace("WS://", "ws://"));
    let ok_event = auth_event(&alice, &c.challenge.clone(), &url, now());
    assert!(send_auth(&mut c, &ok_event).await.0);
    // Several keys on one connection.
    authenticate(&mut c, &bob, &relay.url).await;
    // Replaying the AUTH on another connection fails: another challenge.
    let mut other = relay.client().await;
    let (ok, msg) = send_auth(&mut other, &ok_event).await;
    assert!(!ok && msg.contains("challenge"), "{msg}");
    // AUTH events are never stored or broadcast, and EVENT cannot carry them.
    let (ok, msg) = other.publish(&auth_event(&alice, &other.challenge.clone(), &relay.url, now())).await;
    assert!(!ok && msg.starts_with("invalid:"), "{msg}");
    assert!(other.req("a", vec![json!({"kinds": [22242]})]).await.is_empty());
}

#[tokio::test]
async fn nip59_gift_wraps_reach_only_their_authenticated_recipient() {
    let relay = TestRelay::start().await;
    let (bob, eve) = (Keys::generate(), Keys::generate());
    let bob_pk = bob.public_key().to_hex();
    let mut bob_c = relay.client().await;
    authenticate(&mut bob_c, &bob, &relay.url).await;
    assert!(bob_c.req("inbox", vec![json!({"kinds": [1059], "#p": [bob_pk]})]).await.is_empty());
    let mut eve_c = relay.client().await;
    authenticate(&mut eve_c, &eve, &relay.url).await;
    eve_c.req("snoop", vec![json!({"#p": [bob_pk]})]).await;
    let mut anon = relay.client().await;
    anon.req("snoop-all", vec![json!({"limit": 0})]).await;

    // Created up to two days in the past, as NIP-59 randomises it.
    let wrap = gift_wrap(&bob, 36 * 3600);
    let mut sender = relay.client().await;
    sender.publish_ok(&wrap).await;
    assert_eq!(bob_c.next_event("inbox").await["id"], wrap.id.to_hex());
    eve_c.expect_silence(QUIET).await;
    anon.expect_silence(QUIET).await;

    let id = wrap.id.to_hex();
    let wrapper = wrap.pubkey.to_hex();
    // Unauthenticated, asking for kind 1059 explicitly: refused with auth-required.
    let msg = anon.req_refused("explicit", vec![json!({"kinds": [1059], "#p": [bob_pk]})]).await;
    assert!(msg.starts_with("auth-required:"), "{msg}");
    let count = anon.count("count", vec![json!({"kinds": [1059]})]).await;
    assert_eq!(count[0], "CLOSED");
    // Without naming the kind: silently left out, on every path.
    for (who, client) in [("anonymous", &mut anon), ("eve", &mut eve_c)] {
        for filter in [json!({"ids": [id]}), json!({"authors": [wrapper]}), json!({"#p": [bob_pk]}), json!({})] {
            assert!(client.req_ids("s", vec![filter.clone()]).await.is_empty(), "{who} saw the wrap via {filter}");
        }
        assert_eq!(client.count("c", vec![json!({"#p": [bob_pk]})]).await[2]["count"], 0, "{who}");
    }
    assert!(eve_c.req_ids("k", vec![json!({"kinds": [1059]})]).await.is_empty());
    // Bob sees it on every path.
    for filter in [json!({"ids": [id]}), json!({"authors": [wrapper]}), json!({"kinds": [1059], "#p": [bob_pk]})] {
        assert_eq!(bob_c.req_ids("b", vec![filter.clone()]).await, vec![id.clone()], "{filter}");
    }
    assert_eq!(bob_c.count("c", vec![json!({"kinds": [1059]})]).await[2]["count"], 1);
}

#[tokio::test]
async fn nip59_a_gift_wraps_recipient_deletes_it_and_no_one_else_can() {
    let relay = TestRelay::start().await;
    let (bob, eve) = (Keys::generate(), Keys::generate());
    let mut bob_c = relay.client().await;
    authenticate(&mut bob_c, &bob, &relay.url).await;
    let (wrap, other_wrap, early) = (gift_wrap(&bob, 3600), gift_wrap(&bob, 7200), gift_wrap(&bob, 60));
    let mut sender = relay.client().await;
    sender.publish_ok(&wrap).await;
    sender.publish_ok(&other_wrap).await;
    // Someone neither its author nor its recipient cannot delete a wrap.
    sender.publish_ok(&sign(&eve, 5, "", &[&["e", &other_wrap.id.to_hex()]], now())).await;
    // Its recipient can, stored or not yet stored, and it stays deleted.
    bob_c.publish_ok(&sign(&bob, 5, "", &[&["e", &wrap.id.to_hex()], &["e", &early.id.to_hex()]], now())).await;
    let inbox = bob_c.req_ids("inbox", vec![json!({"kinds": [1059]})]).await;
    assert_eq!(inbox, ids(&[&other_wrap]), "the recipient's deletion removed only its wrap");
    for w in [&wrap, &early] {
        let (ok, msg) = sender.publish(w).await;
        assert!(!ok && msg.starts_with("blocked:"), "a deleted wrap came back: {msg}");
    }
}

#[tokio::test]
async fn nip59_open_policy_serves_gift_wraps_to_anyone() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_NIPS__GIFT_WRAP_POLICY", "open")]).await;
    let bob = Keys::generate();
    let wrap = gift_wrap(&bob, 60);
    let mut c = relay.client().await;
    c.publish_ok(&wrap).await;
    assert_eq!(c.req_ids("any", vec![json!({"kinds": [1059]})]).await, ids(&[&wrap]));
}

#[tokio::test]
async fn nip40_expired_events_are_refused_hidden_and_swept() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_NIPS__EXPIRATION_SWEEP_SECONDS", "1")]).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let (ok, msg) = c.publish(&sign(&k, 1, "old news", &[&["expiration", &(now() - 1).to_string()]], now() - 5)).await;
    assert!(!ok && msg.starts_with("invalid:") && msg.contains("expired"), "{msg}");
    let soon = sign(&k, 1, "soon gone", &[&["expiration", &(now() + 2).to_string()], &["t", "exp"]], now());
    c.publish_ok(&soon).await;
    assert_eq!(c.req_ids("now", vec![json!({"#t": ["exp"]})]).await, ids(&[&soon]));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for filter in [json!({"#t": ["exp"]}), json!({"ids": [soon.id.to_hex()]}), json!({"kinds": [1]})] {
        assert!(c.req_ids("later", vec![filter.clone()]).await.is_empty(), "{filter}");
    }
    relay.wait_for_log("expired events removed").await;
}

#[tokio::test]
async fn nip09_deletions_remove_own_events_and_keep_them_out() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let (alice, mallory) = (Keys::generate(), Keys::generate());
    let apk = alice.public_key().to_hex();
    let t = now() - 100;
    let note = sign(&alice, 1, "regret", &[], t);
    let keep = sign(&alice, 1, "keep", &[], t + 1);
    let article = sign(&alice, 30023, "v1", &[&["d", "post"]], t);
    let kp = sign(&alice, 30443, "kp", &[&["d", "slot"]], t);
    for e in [&note, &keep, &article, &kp] {
        c.publish_ok(e).await;
    }
    // Someone else's deletion changes nothing.
    let forged = sign(&mallory, 5, "", &[&["e", &note.id.to_hex()]], t + 2);
    c.publish_ok(&forged).await;
    assert_eq!(c.req_ids("still", vec![json!({"ids": [note.id.to_hex()]})]).await, ids(&[&note]));

    let deletion = sign(
        &alice,
        5,
        "",
        &[&["e", &note.id.to_hex()], &["a", &format!("30023:{apk}:post")], &["e", &kp.id.to_hex()]],
        t + 10,
    );
    c.publish_ok(&deletion).await;
    let got = c.req_ids("after", vec![json!({"authors": [apk]})]).await;
    assert_eq!(got, ids(&[&deletion, &keep]), "the deletion itself stays served");
    // Re-publication of a deleted event, or of an older version of a deleted address, is refused.
    for e in [&note, &kp, &sign(&alice, 30023, "v0", &[&["d", "post"]], t + 5)] {
        let (ok, msg) = c.publish(e).await;
        assert!(!ok && msg.starts_with("blocked:"), "{msg}");
    }
    // A newer version of the address is fine.
    let v2 = sign(&alice, 30023, "v2", &[&["d", "post"]], t + 20);
    c.publish_ok(&v2).await;
    assert_eq!(c.req_ids("v2", vec![json!({"kinds": [30023], "authors": [apk]})]).await, ids(&[&v2]));
}

#[tokio::test]
async fn nip62_request_to_vanish_erases_everything_up_to_its_time() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let apk = alice.public_key().to_hex();
    let t = now() - 100;
    let note = sign(&alice, 1, "hi", &[], t);
    let profile = sign(&alice, 0, "{}", &[], t);
    let wrap_for_alice = gift_wrap(&alice, 200);
    let bobs = sign(&bob, 1, "unrelated", &[], t);
    for e in [&note, &profile, &wrap_for_alice, &bobs] {
        c.publish_ok(e).await;
    }
    // A request for another relay changes nothing here.
    let elsewhere = sign(&alice, 62, "", &[&["relay", "wss://other.example"]], t + 1);
    c.publish_ok(&elsewhere).await;
    let mut alice_c = relay.client().await;
    authenticate(&mut alice_c, &alice, &relay.url).await;
    assert_eq!(alice_c.req_ids("w", vec![json!({"kinds": [1059], "#p": [apk]})]).await, ids(&[&wrap_for_alice]));

    let vanish = sign(&alice, 62, "", &[&["relay", &relay.url]], t + 10);
    c.publish_ok(&vanish).await;
    assert_eq!(c.req_ids("a", vec![json!({"authors": [apk]})]).await, ids(&[&vanish]));
    assert!(alice_c.req_ids("w2", vec![json!({"kinds": [1059], "#p": [apk]})]).await.is_empty());
    assert_eq!(c.req_ids("b", vec![json!({"authors": [bob.public_key().to_hex()]})]).await, ids(&[&bobs]));
    for e in [&note, &profile, &wrap_for_alice] {
        let (ok, msg) = c.publish(e).await;
        assert!(!ok && msg.starts_with("blocked:"), "{msg}");
    }
    // Later events are welcome again; ALL_RELAYS also works.
    c.publish_ok(&sign(&alice, 1, "back", &[], now())).await;
    let all = sign(&bob, 62, "", &[&["relay", "ALL_RELAYS"]], now());
    c.publish_ok(&all).await;
    assert_eq!(c.req_ids("b2", vec![json!({"authors": [bob.public_key().to_hex()]})]).await, ids(&[&all]));
}

#[tokio::test]
async fn nip70_protected_events_need_their_author_authenticated() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let (alice, eve) = (Keys::generate(), Keys::generate());
    let protected = sign(&alice, 1, "mine only", &[&["-"]], now());
    let (ok, msg) = c.publish(&protected).await;
    assert!(!ok && msg.starts_with("auth-required:"), "{msg}");
    authenticate(&mut c, &eve, &relay.url).await;
    let (ok, msg) = c.publish(&protected).await;
    assert!(!ok && msg.starts_with("restricted:"), "{msg}");
    authenticate(&mut c, &alice, &relay.url).await;
    c.publish_ok(&protected).await;
}

#[tokio::test]
async fn rate_limits_refuse_with_rate_limited() {
    let config = r#"
[rate_limits]
events_per_minute_per_ip = 5
reqs_per_minute_per_ip = 3
[[rate_limits.kinds]]
kind = 445
per_minute = 2
per = "tag:h"
"#;
    let relay = TestRelay::start_with_config(config).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let group = "ab".repeat(32);
    let other_group = "cd".repeat(32);
    c.publish_ok(&sign(&k, 445, "1", &[&["h", &group]], now())).await;
    c.publish_ok(&sign(&k, 445, "2", &[&["h", &group]], now())).await;
    let (ok, msg) = c.publish(&sign(&k, 445, "3", &[&["h", &group]], now())).await;
    assert!(!ok && msg.starts_with("rate-limited:") && msg.contains("kind 445"), "{msg}");
    c.publish_ok(&sign(&k, 445, "other group", &[&["h", &other_group]], now())).await;
    c.publish_ok(&sign(&k, 1, "5th", &[], now())).await;
    let (ok, msg) = c.publish(&sign(&k, 1, "6th", &[], now())).await;
    assert!(!ok && msg.starts_with("rate-limited:") && msg.contains("events per minute"), "{msg}");
    for i in 0..3 {
        c.req(&format!("r{i}"), vec![json!({"limit": 0})]).await;
    }
    let msg = c.req_refused("r3", vec![json!({"limit": 0})]).await;
    assert!(msg.starts_with("rate-limited:"), "{msg}");
}

#[tokio::test]
async fn access_lists_control_who_may_write_and_nip11_says_so() {
    let (member, outsider, banned) = (Keys::generate(), Keys::generate(), Keys::generate());
    let config = format!(
        "[access]\nwrite_allow_pubkeys = [\"{}\", \"{}\"]\nwrite_deny_pubkeys = [\"{}\"]\n",
        member.public_key().to_hex(),
        banned.public_key().to_hex(),
        banned.public_key().to_hex()
    );
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    c.publish_ok(&sign(&member, 1, "hi", &[], now())).await;
    let (ok, msg) = c.publish(&sign(&outsider, 1, "hi", &[], now())).await;
    assert!(!ok && msg.starts_with("restricted:"), "{msg}");
    let (ok, msg) = c.publish(&sign(&banned, 1, "hi", &[], now())).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");
    let (_, _, body) = relay.http_get("/", "application/nostr+json").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["limitation"]["restricted_writes"], true);

    let relay = TestRelay::start_with_config("[access]\nwrite_deny_ips = [\"127.0.0.0/8\"]\n").await;
    let mut c = relay.client().await;
    let (ok, msg) = c.publish(&sign(&member, 1, "hi", &[], now())).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");
}

#[tokio::test]
async fn nip11_advertises_the_nips_and_limits_in_force() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_LIMITS__MAX_SUBSCRIPTIONS", "7")]).await;
    let (_, _, body) = relay.http_get("/", "application/nostr+json").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["supported_nips"], json!([1, 9, 11, 40, 42, 45, 59, 62, 70, 77]));
    let l = &doc["limitation"];
    assert_eq!(l["max_subscriptions"], 7);
    for key in [
        "max_message_length",
        "max_limit",
        "max_subid_length",
        "max_event_tags",
        "max_content_length",
        "auth_required",
        "restricted_writes",
        "created_at_lower_limit",
        "created_at_upper_limit",
        "default_limit",
    ] {
        assert!(!l[key].is_null(), "limitation.{key} missing");
    }
    assert_eq!(l["restricted_writes"], false);
    assert!(doc["version"].is_string() && doc["name"].is_string());
    assert!(doc.get("software").is_none(), "no invented project URL: {doc}");
}
