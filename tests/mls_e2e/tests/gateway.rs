//! The MLS gateway plugin over real WebSockets, with real KeyPackages made by
//! mdk-core: accepted shapes and refusals, delivery caps, consumption under
//! concurrency, last resort, twins, every read path, rate limit, lifecycle,
//! restart and hot swap.

#[path = "../../harness/emulator.rs"]
mod emulator;
#[path = "../../harness/mod.rs"]
mod harness;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use harness::{Client, TestRelay, plugin_path};
use serde_json::json;
use support::{Member, fetch_key_packages, gateway_config, gateway_relay, nostr_auth, now, publish, publish_ok};

const UNLIMITED: (&str, &str) = ("requests_per_hour", "0");

#[tokio::test]
async fn every_shape_clients_publish_is_accepted() {
    let relay = gateway_relay(&[]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let (kp30443, kp443) = bob.key_package_pair(&relay.url);
    publish_ok(&mut c, &kp30443).await;
    publish_ok(&mut c, &kp443).await;
    // NIP-EE: kind 443, hex content, legacy tag names.
    let legacy = bob.key_package_shaped(&relay.url, 443, true, None, |tags| {
        tags.into_iter()
            .map(|mut t| {
                if t[0] == "mls_ciphersuite" {
                    t[0] = "ciphersuite".into();
                }
                if t[0] == "mls_extensions" {
                    t[0] = "extensions".into();
                }
                t
            })
            .collect()
    });
    publish_ok(&mut c, &legacy).await;
    // 30443 without an encoding tag (hex content), with an owner p tag and app tags.
    let pk = bob.pubkey();
    let bare = bob.key_package_shaped(&relay.url, 30443, true, None, |mut tags| {
        tags.push(vec!["p".into(), pk.clone()]);
        tags.push(vec!["app_components".into(), "0x0001".into()]);
        tags
    });
    publish_ok(&mut c, &bare).await;
}

#[tokio::test]
async fn broken_key_packages_are_refused_with_invalid() {
    let relay = gateway_relay(&[]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let other = Member::new().pubkey();
    let url = relay.url.clone();
    let cases: Vec<(nostr::Event, &str)> = vec![
        (bob.sign_raw(443, "", vec![vec!["mls_protocol_version".into(), "1.0".into()]], None), "empty"),
        (
            bob.sign_raw(
                443,
                "%%% not base64 %%%",
                vec![vec!["mls_protocol_version".into(), "1.0".into()], vec!["encoding".into(), "base64".into()]],
                None,
            ),
            "base64",
        ),
        (
            bob.sign_raw(443, "zz-not-hex-zz", vec![vec!["mls_protocol_version".into(), "1.0".into()]], None),
            "neither hex nor base64",
        ),
        (
            bob.key_package_shaped(&url, 30443, false, None, |t| {
                t.into_iter().filter(|t| t[0] != "mls_protocol_version").collect()
            }),
            "mls_protocol_version",
        ),
        (
            bob.key_package_shaped(&url, 30443, false, None, |mut t| {
                t.push(vec!["p".into(), other.clone()]);
                t
            }),
            "p tag",
        ),
        (
            bob.key_package_shaped(&url, 443, false, None, |mut t| {
                t.push(vec!["expiration".into(), (now() - 10).to_string()]);
                t
            }),
            "expired",
        ),
    ];
    for (event, expected) in cases {
        let (ok, msg) = publish(&mut c, &event).await;
        assert!(!ok && msg.starts_with("invalid:") && msg.contains(expected), "{expected}: {msg}");
    }
}

#[tokio::test]
async fn welcomes_outside_gift_wraps_and_bad_group_messages_are_refused() {
    let relay = gateway_relay(&[]).await;
    let mut c = relay.client().await;
    let alice = Member::new();
    let (ok, msg) = publish(&mut c, &alice.sign_raw(444, "welcome", vec![], None)).await;
    assert!(!ok && msg.starts_with("blocked:") && msg.contains("gift wrap"), "{msg}");
    assert!(c.req("w", vec![json!({"kinds": [444]})]).await.is_empty());
    let group = "ab".repeat(32);
    let good = alice.sign_raw(
        445,
        "ciphertext",
        vec![vec!["h".into(), group.clone()], vec!["encoding".into(), "base64".into()]],
        None,
    );
    publish_ok(&mut c, &good).await;
    for (tags, why) in [
        (vec![], "no h"),
        (vec![vec!["h".to_string(), "short".to_string()]], "not hex"),
        (vec![vec!["h".to_string(), group.clone()], vec!["h".to_string(), group.clone()]], "two h"),
    ] {
        let (ok, msg) = publish(&mut c, &alice.sign_raw(445, "x", tags, None)).await;
        assert!(!ok && msg.starts_with("invalid:"), "{why}: {msg}");
    }
    // Stored as sent and served to anyone by #h, no AUTH needed.
    let mut reader = relay.client().await;
    let got = reader.req("g", vec![json!({"kinds": [445], "#h": [group]})]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], good.id.to_hex());
    assert_eq!(got[0]["created_at"], good.created_at.as_secs());
}

#[tokio::test]
async fn delivery_is_capped_per_author_and_prefers_30443_newest_first() {
    let relay = gateway_relay(&[UNLIMITED, ("max_keypackages_per_author", "2")]).await;
    let mut c = relay.client().await;
    let (bob, carol) = (Member::new(), Member::new());
    let t = now() - 1000;
    let mut bob_kps = Vec::new();
    for i in 0..4 {
        let kp = bob.key_package_shaped(&relay.url, 30443, false, Some(t + i), |t| t);
        publish_ok(&mut c, &kp).await;
        bob_kps.push(kp);
    }
    // A 443 newer than all of them still comes after the 30443s.
    let old443 = bob.key_package_shaped(&relay.url, 443, false, Some(t + 100), |t| t);
    publish_ok(&mut c, &old443).await;
    for i in 0..3 {
        publish_ok(&mut c, &carol.key_package_shaped(&relay.url, 30443, false, Some(t + i), |t| t)).await;
    }
    let mut alice = relay.client().await;
    let got = fetch_key_packages(&mut alice, "kp", &[&bob.pubkey(), &carol.pubkey()]).await;
    assert_eq!(got.len(), 4, "two per author, not two in total: {got:?}");
    // The newest first: the likeliest to still have their keys on the device.
    assert!(got.contains(&bob_kps[3].id.to_hex()) && got.contains(&bob_kps[2].id.to_hex()), "{got:?}");
    // Other filters are honoured: #d picks one slot.
    let d = bob_kps[1].tags.iter().find(|t| t.kind().to_string() == "d").unwrap().content().unwrap().to_string();
    let got = alice.req_ids("d", vec![json!({"kinds": [30443], "authors": [bob.pubkey()], "#d": [d]})]).await;
    assert_eq!(got, vec![bob_kps[1].id.to_hex()]);
    let got = alice.req_ids("since", vec![json!({"kinds": [443], "authors": [bob.pubkey()], "since": t + 50})]).await;
    assert_eq!(got, vec![old443.id.to_hex()]);
}

/// Asserts no KeyPackage was handed to two requesters, except the owner's
/// last one (last resort), which may repeat.
fn assert_consumed_once(got: &[Vec<String>], last_resort: Option<&str>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for ids in got {
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
    }
    for (id, n) in seen {
        assert!(n == 1 || Some(id) == last_resort, "KeyPackage {id} was handed out {n} times");
    }
}

async fn concurrent_fetches(relay: &TestRelay, owner: &str, requesters: usize) -> Vec<Vec<String>> {
    concurrent_fetches_on(&[relay], owner, requesters).await
}

/// `requesters` concurrent KeyPackage requests for `owner`, spread round-robin
/// over `relays`.
async fn concurrent_fetches_on(relays: &[&TestRelay], owner: &str, requesters: usize) -> Vec<Vec<String>> {
    let mut tasks = Vec::new();
    for i in 0..requesters {
        let (url, owner) = (relays[i % relays.len()].url.clone(), owner.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            fetch_key_packages(&mut c, &format!("f{i}"), &[&owner]).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn concurrent_requesters_never_receive_the_same_key_package() {
    let relay = gateway_relay(&[UNLIMITED, ("max_keypackages_per_owner", "100")]).await;
    let mut c = relay.client().await;
    // Two requesters, two KeyPackages plus a spare.
    let carol = Member::new();
    let mut kps = Vec::new();
    for i in 0..3 {
        let kp = carol.key_package_shaped(&relay.url, 443, false, Some(now() - 100 + i), |t| t);
        publish_ok(&mut c, &kp).await;
        kps.push(kp.id.to_hex());
    }
    let got = concurrent_fetches(&relay, &carol.pubkey(), 2).await;
    assert!(got.iter().all(|ids| ids.len() == 1));
    assert_ne!(got[0], got[1], "two concurrent inviters received the same KeyPackage");
    assert_consumed_once(&got, None);

    // Fifty requesters, forty KeyPackages: 39 handed out once each (newest
    // first), then the last resort, the oldest.
    let dave = Member::new();
    let mut all = Vec::new();
    for i in 0..40 {
        let kp = dave.key_package_shaped(&relay.url, 443, false, Some(now() - 1000 + i), |t| t);
        publish_ok(&mut c, &kp).await;
        all.push(kp.id.to_hex());
    }
    let got = concurrent_fetches(&relay, &dave.pubkey(), 50).await;
    assert!(got.iter().all(|ids| ids.len() == 1), "every requester gets one: {got:?}");
    let last = all.first().unwrap().clone();
    assert_consumed_once(&got, Some(&last));
    let distinct: std::collections::HashSet<_> = got.iter().flatten().collect();
    assert_eq!(distinct.len(), 40, "all forty were handed out");
}

#[tokio::test]
async fn requesters_spread_over_two_replicas_never_receive_the_same_key_package() {
    let config = emulator::replica_config(&emulator::fresh_project())
        + &support::gateway_config_with(
            &plugin_path("mls_gateway.wasm"),
            support::REPLICA_GATEWAY_TIMEOUT,
            &[UNLIMITED, ("max_keypackages_per_owner", "100")],
        );
    let env = [("FIRESTORE_EMULATOR_HOST", emulator::emulator_host())];
    let a = TestRelay::start_with(Some(&config), &env).await;
    let b = TestRelay::start_with(Some(&config), &env).await;
    // Erin publishes 20 KeyPackages, half through each replica.
    let erin = Member::new();
    let mut all = Vec::new();
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    for i in 0..20 {
        let c = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let kp = erin.key_package_shaped(&a.url, 443, false, Some(now() - 1000 + i), |t| t);
        publish_ok(c, &kp).await;
        all.push(kp.id.to_hex());
    }
    // 30 requesters, alternating replicas: 19 KeyPackages once each, then the last resort (the oldest).
    let got = concurrent_fetches_on(&[&a, &b], &erin.pubkey(), 30).await;
    assert!(got.iter().all(|ids| ids.len() == 1), "every requester gets one: {got:?}");
    let last = all.first().unwrap().clone();
    assert_consumed_once(&got, Some(&last));
    let distinct: std::collections::HashSet<_> = got.iter().flatten().collect();
    assert_eq!(distinct.len(), 20, "all twenty were handed out");
}

#[tokio::test]
async fn the_last_key_package_keeps_being_served() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    // Legacy 443s without slots: one pool, consumed down to its last.
    let (a, b) = (
        bob.key_package_shaped(&relay.url, 443, false, None, |t| t),
        bob.key_package_shaped(&relay.url, 443, false, None, |t| t),
    );
    publish_ok(&mut c, &a).await;
    publish_ok(&mut c, &b).await;
    let first = fetch_key_packages(&mut c, "1", &[&bob.pubkey()]).await;
    let second = fetch_key_packages(&mut c, "2", &[&bob.pubkey()]).await;
    let third = fetch_key_packages(&mut c, "3", &[&bob.pubkey()]).await;
    assert_ne!(first, second);
    assert_eq!(second, third, "the last one is served again, not consumed");
    assert_eq!(first.len() + second.len(), 2);

    // Operators see the same story in the gateway's metrics.
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    let counter = |name: &str| {
        let series = format!("wasm_relay_plugin_counter_total{{name=\"{name}\",plugin=\"mls-gateway\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&series)?.parse::<u64>().ok()).unwrap_or(0)
    };
    assert_eq!(counter("keypackages_stored"), 2, "{metrics}");
    assert_eq!(counter("keypackages_served"), 3);
    assert_eq!(counter("keypackages_consumed"), 1);
    assert_eq!(counter("keypackages_last_resort"), 2);
}

#[tokio::test]
async fn a_key_package_and_its_twin_count_once_and_are_consumed_together() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    // A device publishes its KeyPackage as mdk does: a 30443 and its 443 twin.
    let (kp30443, kp443) = bob.key_package_pair_at(&relay.url, t + 50, None);
    publish_ok(&mut c, &kp443).await;
    publish_ok(&mut c, &kp30443).await;
    // The pair is one device and one KeyPackage: its 30443 is served, once.
    assert_eq!(fetch_key_packages(&mut c, "pair", &[&bob.pubkey()]).await, vec![kp30443.id.to_hex()]);
    assert_eq!(
        c.req_ids("443-only", vec![json!({"kinds": [443], "authors": [bob.pubkey()]})]).await,
        vec![kp443.id.to_hex()]
    );

    // Carol's legacy pool: two 443s. Handing out the newer consumes it...
    let carol = Member::new();
    let (newer30443, newer443) = carol.key_package_pair_at(&relay.url, t + 10, None);
    let older443 = carol.key_package_shaped(&relay.url, 443, false, Some(t), |t| t);
    publish_ok(&mut c, &older443).await;
    publish_ok(&mut c, &newer443).await;
    assert_eq!(fetch_key_packages(&mut c, "pool", &[&carol.pubkey()]).await, vec![newer443.id.to_hex()]);
    // ...and its 30443 twin, published afterwards, is consumed with it.
    publish_ok(&mut c, &newer30443).await;
    for i in 0..2 {
        let got = fetch_key_packages(&mut c, &format!("after{i}"), &[&carol.pubkey()]).await;
        assert_eq!(got, vec![older443.id.to_hex()], "the consumed KeyPackage came back as its twin");
    }
    assert!(c.req_ids("by-id", vec![json!({"ids": [newer30443.id.to_hex()]})]).await.is_empty());
}

#[tokio::test]
async fn two_devices_of_one_user_are_both_reachable_and_neither_is_used_up() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    // Bob's phone and laptop each keep a slot; the laptop's KeyPackage is newer.
    let (phone, phone443) = bob.key_package_pair_at(&relay.url, t, Some("phone-slot"));
    let (laptop, laptop443) = bob.key_package_pair_at(&relay.url, t + 10, Some("laptop-slot"));
    for e in [&phone, &phone443, &laptop, &laptop443] {
        publish_ok(&mut c, e).await;
    }
    // Every inviter gets both devices' KeyPackages (newest first, 30443s, twins once).
    for i in 0..5 {
        let mut inviter = relay.client().await;
        let got = fetch_key_packages(&mut inviter, &format!("invite{i}"), &[&bob.pubkey()]).await;
        assert_eq!(got, vec![laptop.id.to_hex(), phone.id.to_hex()], "invite {i}");
    }
    // With one device per request, the newest device is the one handed out,
    // and it stays: a slot's KeyPackage is its device's last.
    let one = gateway_relay(&[UNLIMITED, ("max_keypackages_per_author", "1")]).await;
    let mut c = one.client().await;
    for e in [&phone, &phone443, &laptop, &laptop443] {
        publish_ok(&mut c, e).await;
    }
    for i in 0..3 {
        assert_eq!(fetch_key_packages(&mut c, &format!("one{i}"), &[&bob.pubkey()]).await, vec![laptop.id.to_hex()]);
    }
    // The laptop replaces its slot: the new KeyPackage is served, and the old
    // one's 443 twin is retired with it (the laptop may have dropped its key).
    let (laptop2, _) = bob.key_package_pair_at(&relay.url, t + 20, Some("laptop-slot"));
    publish_ok(&mut c, &laptop2).await;
    assert_eq!(fetch_key_packages(&mut c, "replaced", &[&bob.pubkey()]).await, vec![laptop2.id.to_hex()]);
    let legacy = c.req_ids("legacy", vec![json!({"kinds": [443], "authors": [bob.pubkey()]})]).await;
    assert_eq!(legacy, vec![phone443.id.to_hex()], "the replaced KeyPackage's twin is still served");
}

#[tokio::test]
async fn consumed_key_packages_are_invisible_on_every_read_path() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let (used, spare) = (
        bob.key_package_shaped(&relay.url, 443, false, Some(now()), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(now() - 10), |t| t),
    );
    publish_ok(&mut c, &used).await;
    publish_ok(&mut c, &spare).await;
    assert_eq!(fetch_key_packages(&mut c, "take", &[&bob.pubkey()]).await, vec![used.id.to_hex()]);
    let id = used.id.to_hex();
    let pk = bob.pubkey();
    let mut eve = relay.client().await;
    for (sub, filter) in [
        ("ids", json!({"ids": [id]})),
        ("ids-kinds", json!({"ids": [id], "kinds": [443]})),
        ("author-all", json!({"authors": [pk]})),
        ("no-author", json!({"kinds": [30443, 443]})),
        ("all", json!({})),
    ] {
        let got = eve.req_ids(sub, vec![filter.clone()]).await;
        assert!(!got.contains(&id), "{filter} served a consumed KeyPackage");
    }
    let count = eve.count("c", vec![json!({"kinds": [30443, 443], "authors": [pk]})]).await;
    assert_eq!(count[2]["count"], 1, "COUNT sees only the unconsumed one: {count}");
    // COUNT does not consume.
    assert_eq!(eve.count("c2", vec![json!({"kinds": [443], "authors": [pk]})]).await[2]["count"], 1);
    // Live subscriptions never carry KeyPackages.
    eve.req("live", vec![json!({"kinds": [30443, 443], "authors": [pk], "limit": 0})]).await;
    publish_ok(&mut c, &bob.key_package(&relay.url)).await;
    eve.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn requests_per_requester_and_author_are_rate_limited() {
    let relay = gateway_relay(&[("requests_per_hour", "2")]).await;
    let mut c = relay.client().await;
    let (bob, carol) = (Member::new(), Member::new());
    publish_ok(&mut c, &bob.key_package(&relay.url)).await;
    publish_ok(&mut c, &carol.key_package(&relay.url)).await;
    fetch_key_packages(&mut c, "1", &[&bob.pubkey()]).await;
    fetch_key_packages(&mut c, "2", &[&bob.pubkey()]).await;
    let msg = c.req_refused("3", vec![json!({"kinds": [30443, 443], "authors": [bob.pubkey()]})]).await;
    assert!(msg.starts_with("rate-limited:"), "{msg}");
    // Per author: carol is still fine.
    assert_eq!(fetch_key_packages(&mut c, "4", &[&carol.pubkey()]).await.len(), 1);
    // Relay lists are ordinary events, served to anyone without AUTH.
    let list = bob.sign_raw(10051, "", vec![vec!["relay".into(), relay.url.clone()]], None);
    publish_ok(&mut c, &list).await;
    let mut anyone = relay.client().await;
    assert_eq!(
        anyone.req_ids("l", vec![json!({"kinds": [10051], "authors": [bob.pubkey()]})]).await,
        vec![list.id.to_hex()]
    );
}

#[tokio::test]
async fn expired_pruned_deleted_and_replaced_key_packages_are_not_served() {
    let relay = gateway_relay(&[UNLIMITED, ("max_keypackages_per_owner", "3")]).await;
    let mut c = relay.client().await;
    // Expiry from the event.
    let bob = Member::new();
    let soon = bob.key_package_shaped(&relay.url, 30443, false, None, |mut t| {
        t.push(vec!["expiration".into(), (now() + 2).to_string()]);
        t
    });
    publish_ok(&mut c, &soon).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(fetch_key_packages(&mut c, "exp", &[&bob.pubkey()]).await.is_empty());

    // Pruning: at most 3 per owner, the oldest dropped.
    let carol = Member::new();
    let kps: Vec<_> =
        (0..4).map(|i| carol.key_package_shaped(&relay.url, 30443, false, Some(now() - 100 + i), |t| t)).collect();
    for kp in &kps {
        publish_ok(&mut c, kp).await;
    }
    let count = c.count("n", vec![json!({"kinds": [30443], "authors": [carol.pubkey()]})]).await;
    assert_eq!(count[2]["count"], 3);
    // The oldest was dropped; each remaining slot is a device, newest first.
    let got = fetch_key_packages(&mut c, "prune", &[&carol.pubkey()]).await;
    assert_eq!(got, vec![kps[3].id.to_hex(), kps[2].id.to_hex(), kps[1].id.to_hex()]);
    let count =
        c.count("n2", vec![json!({"kinds": [30443], "authors": [carol.pubkey()], "ids": [kps[0].id.to_hex()]})]).await;
    assert_eq!(count[2]["count"], 0, "the oldest was pruned");

    // Kind 5 by e and by a.
    let dave = Member::new();
    let (x, y, z) = (
        dave.key_package_shaped(&relay.url, 30443, false, Some(now() - 30), |t| t),
        dave.key_package_shaped(&relay.url, 30443, false, Some(now() - 20), |t| t),
        dave.key_package_shaped(&relay.url, 30443, false, Some(now() - 10), |t| t),
    );
    for kp in [&x, &y, &z] {
        publish_ok(&mut c, kp).await;
    }
    let d_of =
        |e: &nostr::Event| e.tags.iter().find(|t| t.kind().to_string() == "d").unwrap().content().unwrap().to_string();
    let by_e = dave.sign_raw(5, "", vec![vec!["e".into(), x.id.to_hex()]], None);
    let by_a = dave.sign_raw(5, "", vec![vec!["a".into(), format!("30443:{}:{}", dave.pubkey(), d_of(&y))]], None);
    publish_ok(&mut c, &by_e).await;
    publish_ok(&mut c, &by_a).await;
    let count = c.count("d", vec![json!({"kinds": [30443], "authors": [dave.pubkey()]})]).await;
    assert_eq!(count[2]["count"], 1);
    assert_eq!(fetch_key_packages(&mut c, "del", &[&dave.pubkey()]).await, vec![z.id.to_hex()]);

    // 30443 replacement: a newer event in the same d slot replaces the old one.
    let erin = Member::new();
    let first = erin.key_package_shaped(&relay.url, 30443, false, Some(now() - 50), |t| t);
    let d = d_of(&first);
    let newer = erin.key_package_shaped(&relay.url, 30443, false, Some(now() - 5), |t| {
        t.into_iter()
            .map(|mut t| {
                if t[0] == "d" {
                    t[1] = d.clone();
                }
                t
            })
            .collect()
    });
    publish_ok(&mut c, &first).await;
    publish_ok(&mut c, &newer).await;
    assert_eq!(fetch_key_packages(&mut c, "repl", &[&erin.pubkey()]).await, vec![newer.id.to_hex()]);
}

/// Appends a custom section, giving a different file with the same behaviour.
fn with_custom_section(mut wasm: Vec<u8>, label: &str) -> Vec<u8> {
    let name = b"wasm-relay-test";
    let payload = label.as_bytes();
    let body_len = 1 + name.len() + payload.len();
    wasm.push(0);
    wasm.push(body_len as u8);
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    wasm.extend_from_slice(payload);
    wasm
}

#[tokio::test]
async fn consumption_survives_restart_and_hot_swap() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mls_gateway.wasm");
    std::fs::copy(plugin_path("mls_gateway.wasm"), &file).unwrap();
    let relay = TestRelay::start_with_config(&gateway_config(&file, &[UNLIMITED])).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let kps: Vec<_> =
        (0..4).map(|i| bob.key_package_shaped(&relay.url, 443, false, Some(now() - 100 + i), |t| t)).collect();
    for kp in &kps {
        publish_ok(&mut c, kp).await;
    }
    assert_eq!(fetch_key_packages(&mut c, "1", &[&bob.pubkey()]).await, vec![kps[3].id.to_hex()]);
    drop(c);
    let relay = relay.crash_and_restart().await;
    let mut c = relay.client().await;
    assert_eq!(fetch_key_packages(&mut c, "2", &[&bob.pubkey()]).await, vec![kps[2].id.to_hex()]);
    // Swap in a different file of the same plugin.
    let bytes = with_custom_section(std::fs::read(plugin_path("mls_gateway.wasm")).unwrap(), "v2");
    let tmp = dir.path().join("next.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    relay.wait_for_log("plugin swapped").await;
    assert_eq!(fetch_key_packages(&mut c, "3", &[&bob.pubkey()]).await, vec![kps[1].id.to_hex()]);
}

#[tokio::test]
async fn group_messages_can_be_rate_limited_per_group() {
    let relay = gateway_relay(&[("group_messages_per_minute", "2")]).await;
    let mut c = relay.client().await;
    let alice = Member::new();
    let (g1, g2) = ("ab".repeat(32), "cd".repeat(32));
    let msg = |g: &str, n: &str| alice.sign_raw(445, n, vec![vec!["h".into(), g.to_owned()]], None);
    publish_ok(&mut c, &msg(&g1, "1")).await;
    publish_ok(&mut c, &msg(&g1, "2")).await;
    // Five more: even if a minute boundary falls among them, one window gets three.
    let mut refusals = Vec::new();
    for n in 3..8 {
        let (ok, text) = publish(&mut c, &msg(&g1, &n.to_string())).await;
        if !ok {
            refusals.push(text);
        }
    }
    assert!(!refusals.is_empty(), "no message refused");
    assert!(refusals.iter().all(|t| t.starts_with("rate-limited:")), "{refusals:?}");
    publish_ok(&mut c, &msg(&g2, "other group")).await;
}

#[tokio::test]
async fn profile_views_and_owner_checks_never_consume_or_hit_the_rate_limit() {
    // The default rate limit (10 requests per requester and author per hour).
    let relay = gateway_relay(&[]).await;
    let bob = Member::new();
    let mut bob_c = relay.client().await;
    nostr_auth(&mut bob_c, &bob, &relay.url).await;
    let t = now() - 100;
    let (older, newer) = (
        bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t),
    );
    publish_ok(&mut bob_c, &older).await;
    publish_ok(&mut bob_c, &newer).await;

    // A client showing Bob's profile: no KeyPackage, nothing consumed, never refused.
    let mut viewer = relay.client().await;
    for i in 0..20 {
        let got = viewer.req_ids(&format!("profile{i}"), vec![json!({"authors": [bob.pubkey()]})]).await;
        assert!(!got.contains(&older.id.to_hex()) && !got.contains(&newer.id.to_hex()), "{got:?}");
        viewer.req_ids(&format!("by-id{i}"), vec![json!({"ids": [newer.id.to_hex()]})]).await;
    }
    // Bob checking his own KeyPackages at every login sees both, consumes none, is never limited.
    for i in 0..20 {
        let mut mine = fetch_key_packages(&mut bob_c, &format!("login{i}"), &[&bob.pubkey()]).await;
        mine.sort();
        let mut both = vec![older.id.to_hex(), newer.id.to_hex()];
        both.sort();
        assert_eq!(mine, both, "login check {i}");
    }
    // An inviter still gets the newest, then the other one as the last resort.
    let mut alice = relay.client().await;
    assert_eq!(fetch_key_packages(&mut alice, "invite1", &[&bob.pubkey()]).await, vec![newer.id.to_hex()]);
    assert_eq!(fetch_key_packages(&mut alice, "invite2", &[&bob.pubkey()]).await, vec![older.id.to_hex()]);
}

#[tokio::test]
async fn republishing_a_consumed_key_package_does_not_hand_it_out_again() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    let spare = bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t);
    let used = bob.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t);
    publish_ok(&mut c, &spare).await;
    publish_ok(&mut c, &used).await;
    assert_eq!(fetch_key_packages(&mut c, "take", &[&bob.pubkey()]).await, vec![used.id.to_hex()]);
    // The same KeyPackage (same content and tags, so the same `i`)
    // published again later.
    let tags: Vec<Vec<String>> = used.tags.iter().map(|t| t.as_slice().to_vec()).collect();
    let again = bob.sign_raw(443, &used.content, tags, Some(t + 20));
    publish_ok(&mut c, &again).await;
    for i in 0..3 {
        let got = fetch_key_packages(&mut c, &format!("after{i}"), &[&bob.pubkey()]).await;
        assert_eq!(got, vec![spare.id.to_hex()], "the consumed KeyPackage came back");
    }
}

#[tokio::test]
async fn fresh_keys_from_one_address_do_not_escape_the_rate_limit_and_other_filters_are_still_served() {
    let relay = gateway_relay(&[("requests_per_hour", "2")]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    for _ in 0..4 {
        publish_ok(&mut c, &bob.key_package(&relay.url)).await;
    }
    let note = bob.sign_raw(1, "hello", vec![], None);
    publish_ok(&mut c, &note).await;
    // Each request from a new connection authenticated as a new throwaway key.
    for i in 0..2 {
        let mut drainer = relay.client().await;
        nostr_auth(&mut drainer, &Member::new(), &relay.url).await;
        assert!(!fetch_key_packages(&mut drainer, &format!("d{i}"), &[&bob.pubkey()]).await.is_empty());
    }
    let mut drainer = relay.client().await;
    nostr_auth(&mut drainer, &Member::new(), &relay.url).await;
    let msg = drainer.req_refused("d2", vec![json!({"kinds": [30443, 443], "authors": [bob.pubkey()]})]).await;
    assert!(msg.starts_with("rate-limited:"), "{msg}");
    // A REQ that asks for other things too is served, without KeyPackages.
    let got = drainer
        .req_ids(
            "mixed",
            vec![
                json!({"kinds": [30443, 443], "authors": [bob.pubkey()]}),
                json!({"kinds": [1], "authors": [bob.pubkey()]}),
            ],
        )
        .await;
    assert_eq!(got, vec![note.id.to_hex()]);
}

/// A relay with the gateway (no rate limit) and the management API open to
/// the returned admin.
async fn gateway_relay_with_admin() -> (TestRelay, Member) {
    let admin = Member::new();
    let config = format!("[admin]\npubkeys = [\"{}\"]\n", admin.pubkey())
        + &gateway_config(&plugin_path("mls_gateway.wasm"), &[UNLIMITED]);
    (TestRelay::start_with_config(&config).await, admin)
}

/// A NIP-86 call to `relay` signed by `admin`; returns the HTTP status line and body.
async fn admin_call(relay: &TestRelay, admin: &Member, method: &str, params: serde_json::Value) -> (String, String) {
    use base64::Engine;
    use nostr::JsonUtil;
    use nostr::hashes::{Hash, sha256};
    let body = json!({"method": method, "params": params}).to_string();
    let url = relay.url.replacen("ws://", "http://", 1);
    let payload = sha256::Hash::hash(body.as_bytes()).to_string();
    let auth = admin.sign_raw(
        27235,
        "",
        vec![vec!["u".into(), url], vec!["method".into(), "POST".into()], vec!["payload".into(), payload]],
        None,
    );
    let header = format!("Nostr {}", base64::engine::general_purpose::STANDARD.encode(auth.as_json()));
    let headers = [("Content-Type", "application/nostr+json+rpc"), ("Authorization", header.as_str())];
    let (status, _, reply) = relay.http("POST", "/", &headers, body.as_bytes()).await;
    (status, reply)
}

#[tokio::test]
async fn an_operator_can_roll_the_gateway_back_and_take_its_kinds_again_with_state_intact() {
    let (relay, admin) = gateway_relay_with_admin().await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    let (old, new) = (
        bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t),
    );
    publish_ok(&mut c, &old).await;
    publish_ok(&mut c, &new).await;
    // Through the gateway: the newest is handed out and consumed.
    assert_eq!(fetch_key_packages(&mut c, "gw", &[&bob.pubkey()]).await, vec![new.id.to_hex()]);

    // Rollback: kinds 443/30443 are served by the standard query path, every time, in full.
    let (status, reply) = admin_call(&relay, &admin, "releasemanagedkinds", json!(["mls-gateway"])).await;
    assert!(status.contains("200") && reply.contains("\"managed_kinds_released\":true"), "{status} {reply}");
    let mut both = vec![old.id.to_hex(), new.id.to_hex()];
    both.sort();
    for i in 0..3 {
        let mut got = fetch_key_packages(&mut c, &format!("std{i}"), &[&bob.pubkey()]).await;
        got.sort();
        assert_eq!(got, both, "served as ordinary events");
    }
    // The gateway kept indexing meanwhile.
    let later = bob.key_package_shaped(&relay.url, 443, false, Some(t + 5), |t| t);
    publish_ok(&mut c, &later).await;

    // Taking the kinds back finds the consumption state as it was.
    let (status, reply) = admin_call(&relay, &admin, "claimmanagedkinds", json!(["mls-gateway"])).await;
    assert!(status.contains("200") && reply.contains("\"managed_kinds_released\":false"), "{status} {reply}");
    assert_eq!(fetch_key_packages(&mut c, "back1", &[&bob.pubkey()]).await, vec![later.id.to_hex()]);
    assert_eq!(fetch_key_packages(&mut c, "back2", &[&bob.pubkey()]).await, vec![old.id.to_hex()]);
}

#[tokio::test]
async fn a_banned_key_package_leaves_no_phantom_and_the_real_last_one_stays_served() {
    let (relay, admin) = gateway_relay_with_admin().await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    // The banned one is the older: inviters are never handed it, so only an
    // honest count of what is left keeps the newer one from being consumed.
    let (banned, kept) = (
        bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t),
    );
    publish_ok(&mut c, &banned).await;
    publish_ok(&mut c, &kept).await;
    let (status, reply) = admin_call(&relay, &admin, "banevent", json!([banned.id.to_hex(), "spam"])).await;
    assert!(status.contains("200"), "{reply}");
    // The banned one is gone; the other is now Bob's last and is never consumed.
    for i in 0..3 {
        let got = fetch_key_packages(&mut c, &format!("after-ban{i}"), &[&bob.pubkey()]).await;
        assert_eq!(got, vec![kept.id.to_hex()], "fetch {i}");
    }
    // The gateway (contract 0.2, hook on-removed) dropped it from its index.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway_counter(&relay, "keypackages_removed_banned").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway never heard of the ban");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway_counter(&relay, "keypackages_removed_banned").await, 1);
}

/// When Bob vanishes (NIP-62), his KeyPackages leave the gateway's index
/// with him, whoever asks afterwards.
#[tokio::test]
async fn a_vanished_owners_key_packages_leave_the_index() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    let kps = [
        bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(t + 1), |t| t),
    ];
    for kp in &kps {
        publish_ok(&mut c, kp).await;
    }
    let vanish = bob.sign_raw(62, "", vec![vec!["relay".into(), relay.url.clone()]], None);
    publish_ok(&mut c, &vanish).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway_counter(&relay, "keypackages_removed_vanished").await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway kept a vanished owner's KeyPackages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway_counter(&relay, "keypackages_removed_vanished").await, 2);
    assert!(fetch_key_packages(&mut c, "after", &[&bob.pubkey()]).await.is_empty());
}

/// A NIP-50 search that names KeyPackage kinds reaches the search plugin,
/// not the gateway: nothing is handed out for it, so nothing is consumed.
#[tokio::test]
async fn a_search_request_never_consumes_key_packages() {
    let search = format!(
        "[[plugins]]\nname = \"search\"\npath = {}\n",
        serde_json::to_string(&plugin_path("search.wasm").display().to_string()).unwrap()
    );
    let config = search + &gateway_config(&plugin_path("mls_gateway.wasm"), &[UNLIMITED]);
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    let t = now() - 100;
    let (older, newer) = (
        bob.key_package_shaped(&relay.url, 443, false, Some(t), |t| t),
        bob.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t),
    );
    publish_ok(&mut c, &older).await;
    publish_ok(&mut c, &newer).await;
    for i in 0..3 {
        let filter = json!({"kinds": [443], "authors": [bob.pubkey()], "search": "anything"});
        assert!(c.req_ids(&format!("search{i}"), vec![filter]).await.is_empty());
    }
    assert_eq!(gateway_counter(&relay, "keypackages_served").await, 0);
    // The first real fetch still gets the newest.
    assert_eq!(fetch_key_packages(&mut c, "real", &[&bob.pubkey()]).await, vec![newer.id.to_hex()]);
}

/// The first value of `e`'s tag `name`.
fn tag_value(e: &nostr::Event, name: &str) -> String {
    e.tags.iter().find(|t| t.kind().to_string() == name).and_then(|t| t.content()).unwrap().to_string()
}

/// The gateway's counter `name` from `/metrics`.
async fn gateway_counter(relay: &TestRelay, name: &str) -> u64 {
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    let series = format!("wasm_relay_plugin_counter_total{{name=\"{name}\",plugin=\"mls-gateway\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&series)?.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_key_package_is_served_until_the_end_of_its_own_mls_lifetime() {
    // Neither relay's default lifetime lasts the test; only the KeyPackage's
    // own MLS Lifetime (mdk: months) keeps it served.
    let short = [UNLIMITED, ("default_ttl_seconds", "1")];
    let reading = gateway_relay(&short).await;
    let blind = gateway_relay(&[UNLIMITED, ("default_ttl_seconds", "1"), ("read_mls_lifetime", "false")]).await;
    let bob = Member::new();
    let kp = bob.key_package(&reading.url);
    assert!(!kp.tags.iter().any(|t| t.kind().to_string() == "expiration"), "mdk sets no expiration tag");
    let (mut on_reading, mut on_blind) = (reading.client().await, blind.client().await);
    publish_ok(&mut on_reading, &kp).await;
    publish_ok(&mut on_blind, &kp).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(fetch_key_packages(&mut on_reading, "read", &[&bob.pubkey()]).await, vec![kp.id.to_hex()]);
    assert!(fetch_key_packages(&mut on_blind, "blind", &[&bob.pubkey()]).await.is_empty());
    assert_eq!(gateway_counter(&reading, "soft_unreadable_lifetime").await, 0, "mdk's KeyPackage was read");
}

#[tokio::test]
async fn only_what_the_client_is_sent_is_consumed() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let t = now() - 100;
    // Three owners, each with a legacy pool of two.
    let owners: Vec<Member> = (0..3).map(|_| Member::new()).collect();
    let (mut oldest, mut newest) = (Vec::new(), Vec::new());
    for o in &owners {
        let old = o.key_package_shaped(&relay.url, 443, false, Some(t), |t| t);
        let kp = o.key_package_shaped(&relay.url, 443, false, Some(t + 10), |t| t);
        publish_ok(&mut c, &old).await;
        publish_ok(&mut c, &kp).await;
        oldest.push(old.id.to_hex());
        newest.push(kp);
    }
    let mut alice = relay.client().await;
    // `#i` values match exactly, as NIP-01 says and the host does: an
    // upper-case KeyPackageRef names nothing, so nothing is consumed.
    let upper = tag_value(&newest[0], "i").to_ascii_uppercase();
    let got = alice.req_ids("upper", vec![json!({"kinds": [443], "#i": [upper]})]).await;
    assert!(got.is_empty(), "{got:?}");
    // A `limit` bounds what a request gets, across its authors.
    let pks: Vec<String> = owners.iter().map(Member::pubkey).collect();
    let got = alice.req_ids("limited", vec![json!({"kinds": [443], "authors": pks, "limit": 1})]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(gateway_counter(&relay, "keypackages_consumed").await, 1);
    // The owner that was sent its newest has its other one left; every
    // owner not sent anything still has its newest.
    let sent = &got[0];
    for (i, o) in owners.iter().enumerate() {
        let newest_id = newest[i].id.to_hex();
        let expected = if newest_id == *sent { oldest[i].clone() } else { newest_id };
        let after = fetch_key_packages(&mut alice, &format!("after{i}"), &[&o.pubkey()]).await;
        assert_eq!(after, vec![expected], "owner {i}");
    }
}

#[tokio::test]
async fn a_refusal_from_another_plugin_comes_before_anything_is_consumed() {
    // The gateway is configured first, a policy that refuses KeyPackage
    // requests second: the policy is asked first all the same.
    let config = gateway_config(&plugin_path("mls_gateway.wasm"), &[UNLIMITED])
        + &format!(
            "\n[[plugins]]\nname = \"gatekeeper\"\npath = {}\n[plugins.settings]\nreq = \"reject\"\nreq-kinds = \"443,30443\"\n",
            serde_json::to_string(&plugin_path("probe.wasm").display().to_string()).unwrap()
        );
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    for i in 0..3 {
        publish_ok(&mut c, &bob.key_package_shaped(&relay.url, 443, false, Some(now() - 10 + i), |t| t)).await;
    }
    for i in 0..3 {
        let msg = c.req_refused(&format!("r{i}"), vec![json!({"kinds": [443], "authors": [bob.pubkey()]})]).await;
        assert!(msg.contains("says slow down"), "{msg}");
    }
    assert_eq!(gateway_counter(&relay, "keypackages_served").await, 0);
    assert_eq!(gateway_counter(&relay, "keypackages_consumed").await, 0);
}

#[tokio::test]
async fn a_marmot_app_style_batch_of_32_authors_gets_every_device_once() {
    let relay = gateway_relay(&[]).await;
    let mut c = relay.client().await;
    let members: Vec<Member> = (0..32).map(|_| Member::new()).collect();
    let mut expected = Vec::new();
    for m in &members {
        let (kp30443, kp443) = m.key_package_pair(&relay.url);
        publish_ok(&mut c, &kp30443).await;
        publish_ok(&mut c, &kp443).await;
        expected.push(kp30443.id.to_hex());
    }
    expected.sort();
    let pks: Vec<String> = members.iter().map(Member::pubkey).collect();
    // Several inviters, each one batched REQ without a limit.
    for i in 0..3 {
        let mut inviter = relay.client().await;
        let mut got = inviter.req_ids(&format!("batch{i}"), vec![json!({"kinds": [30443, 443], "authors": pks})]).await;
        got.sort();
        assert_eq!(got, expected, "inviter {i}: one 30443 per author, twins once");
    }
}

#[tokio::test]
async fn a_key_package_published_while_inviters_ask_is_served_afterwards() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    for round in 0..10 {
        let bob = Member::new();
        let kp = bob.key_package_shaped(&relay.url, 443, false, None, |t| t);
        let (url, pk) = (relay.url.clone(), bob.pubkey());
        // Inviters keep asking while the KeyPackage is being published.
        let asking = tokio::spawn(async move {
            let mut inviter = Client::connect(&url).await;
            let mut seen = Vec::new();
            for i in 0..20 {
                seen.extend(fetch_key_packages(&mut inviter, &format!("race{i}"), &[&pk]).await);
            }
            seen
        });
        let mut publisher = relay.client().await;
        publish_ok(&mut publisher, &kp).await;
        let during = asking.await.unwrap();
        assert!(during.iter().all(|id| *id == kp.id.to_hex()), "round {round}: {during:?}");
        let mut inviter = relay.client().await;
        let after = fetch_key_packages(&mut inviter, "after", &[&bob.pubkey()]).await;
        assert_eq!(after, vec![kp.id.to_hex()], "round {round}: the KeyPackage was lost to the race");
    }
}

async fn nip11(relay: &TestRelay) -> serde_json::Value {
    let (_, _, body) = relay.http_get("/", "application/nostr+json").await;
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn nip11_advertises_marmot_support_only_while_the_gateway_serves() {
    let (relay, admin) = gateway_relay_with_admin().await;
    let doc = nip11(&relay).await;
    assert_eq!(doc["supported_mips"], json!([0, 1, 2, 3]), "{doc}");
    assert!(doc["supported_nips"].as_array().unwrap().contains(&json!(59)), "{doc}");
    // An operator turns the gateway off: the advertisement goes with it.
    let (status, _) = admin_call(&relay, &admin, "disableplugin", json!(["mls-gateway"])).await;
    assert!(status.contains("200"), "{status}");
    assert!(nip11(&relay).await.get("supported_mips").is_none());
    let (status, _) = admin_call(&relay, &admin, "enableplugin", json!(["mls-gateway"])).await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(nip11(&relay).await["supported_mips"], json!([0, 1, 2, 3]));
    // A relay without the gateway says nothing of Marmot; an operator can
    // withdraw the advertisement with an empty setting.
    let plain = TestRelay::start().await;
    assert!(nip11(&plain).await.get("supported_mips").is_none());
    let quiet = gateway_relay(&[("nip11.supported_mips", "")]).await;
    assert!(nip11(&quiet).await.get("supported_mips").is_none());
}

#[tokio::test]
async fn one_ipv6_network_is_one_requester_for_the_rate_limit() {
    // Behind a proxy that names clients, as on Cloud Run; each address of a
    // /64 is the same client, as the relay's own per-address limits count it.
    let config = gateway_config(&plugin_path("mls_gateway.wasm"), &[("requests_per_hour", "2")]);
    let env = [("WASM_RELAY_CLIENT_ADDRESS_HEADER", "x-forwarded-for")];
    let relay = TestRelay::start_with(Some(&config), &env).await;
    let mut c = relay.client().await;
    let bob = Member::new();
    for _ in 0..2 {
        publish_ok(&mut c, &bob.key_package_shaped(&relay.url, 443, false, None, |t| t)).await;
    }
    for addr in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
        let mut inviter = Client::connect_with_headers(&relay.url, &[("x-forwarded-for", addr)]).await;
        assert!(!fetch_key_packages(&mut inviter, "kp", &[&bob.pubkey()]).await.is_empty(), "{addr}");
    }
    let mut same_network = Client::connect_with_headers(&relay.url, &[("x-forwarded-for", "2001:db8:1:2::3")]).await;
    let msg = same_network.req_refused("kp", vec![json!({"kinds": [30443, 443], "authors": [bob.pubkey()]})]).await;
    assert!(msg.starts_with("rate-limited:"), "a fresh address of the same /64 escaped the limit: {msg}");
    let mut elsewhere = Client::connect_with_headers(&relay.url, &[("x-forwarded-for", "2001:db8:1:3::1")]).await;
    assert!(!fetch_key_packages(&mut elsewhere, "kp", &[&bob.pubkey()]).await.is_empty());
}

/// Housekeeping removes a KeyPackage whose expiry has come from the index
/// and leaves the others. Two paths, both once a minute and racing: the
/// gateway's tick finds it through its expiry index (`keypackages_expired`),
/// or the relay's NIP-40 sweep removes it from the store and tells the
/// gateway (`on-removed`: `keypackages_removed_expired`). Exactly one of
/// them counts it, and the one that has not expired is still served.
#[tokio::test]
async fn housekeeping_removes_expired_key_packages_from_the_index() {
    let relay = gateway_relay(&[UNLIMITED]).await;
    let mut c = relay.client().await;
    let (bob, carol) = (Member::new(), Member::new());
    let soon = bob.key_package_shaped(&relay.url, 30443, false, None, |mut t| {
        t.push(vec!["expiration".into(), (now() + 2).to_string()]);
        t
    });
    publish_ok(&mut c, &soon).await;
    let lasting = carol.key_package_shaped(&relay.url, 30443, false, None, |t| t);
    publish_ok(&mut c, &lasting).await;
    // The first tick comes a minute after the start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let expired = || async {
        gateway_counter(&relay, "keypackages_expired").await
            + gateway_counter(&relay, "keypackages_removed_expired").await
    };
    while expired().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing expired the KeyPackage within 2 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Whichever came second found nothing left to remove.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(expired().await, 1, "only the one due, counted once");
    assert!(fetch_key_packages(&mut c, "gone", &[&bob.pubkey()]).await.is_empty());
    assert_eq!(fetch_key_packages(&mut c, "kept", &[&carol.pubkey()]).await, vec![lasting.id.to_hex()]);
}
