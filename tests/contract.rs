//! Plugin contract versions side by side: plugins built for 0.1 and for 0.2
//! loaded in one relay, and the 0.2 hooks over real WebSockets: NIP-50
//! search answered by the search plugin, and `on-stored` / `on-removed`
//! notices with their reasons, lagging and dropping rather than delaying.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::path::Path;
use std::time::Duration;

use harness::{Client, TestRelay, plugin_path};
use nostr::key::Keys;
use nostr45::{Publish, ids, now, sign};
use serde_json::{Value, json};

/// How long an asynchronous notice may take to reach a plugin in a test.
const PATIENCE: Duration = Duration::from_secs(30);

fn plugin_entry(name: &str, file: &Path, extra: &str, settings: &[(&str, &str)]) -> String {
    let settings: String = settings.iter().map(|(k, v)| format!("\"{k}\" = {}\n", serde_json::json!(v))).collect();
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = {}\n{extra}\n[plugins.settings]\n{settings}\n",
        serde_json::json!(file.display().to_string())
    )
}

/// The value of one series of the relay's metrics (0 when absent).
async fn metric(relay: &TestRelay, series: &str) -> u64 {
    let (_, _, text) = relay.http_get("/metrics", "text/plain").await;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// A plugin's own counter (`host.count`).
async fn counter(relay: &TestRelay, plugin: &str, name: &str) -> u64 {
    metric(relay, &format!("wasm_relay_plugin_counter_total{{name=\"{name}\",plugin=\"{plugin}\"}}")).await
}

/// Waits until `plugin`'s counter `name` reaches `want`.
async fn counter_reaches(relay: &TestRelay, plugin: &str, name: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = counter(relay, plugin, name).await;
        if got >= want {
            assert_eq!(got, want, "{plugin} counted more {name} than expected");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{plugin}: {name} is {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Repeats a search REQ until it returns `expected` (the index is fed after
/// the acknowledgement, off the write path).
async fn search_until(c: &mut Client, filter: Value, expected: &[String]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut n = 0;
    loop {
        n += 1;
        let got = c.req_ids(&format!("search{n}"), vec![filter.clone()]).await;
        c.send(json!(["CLOSE", format!("search{n}")])).await;
        if got == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{filter}: expected {expected:?}, still {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Client A publishes notes; client B finds them with NIP-50 `search`
/// through the search plugin (contract 0.2), while a writer policy built for
/// contract 0.1 keeps ruling on every event beside it.
#[tokio::test]
async fn a_search_plugin_on_contract_0_2_answers_search_beside_a_0_1_policy() {
    let config = plugin_entry("allowlist", &plugin_path("kind_allowlist.wasm"), "", &[("allowed-kinds", "0,1,5")])
        + &plugin_entry("search", &plugin_path("search.wasm"), "", &[]);
    let relay = TestRelay::start_with_config(&config).await;
    let loaded = relay.log_lines("plugin loaded");
    assert!(loaded.iter().any(|l| l.contains("allowlist") && l.contains("0.1.0")), "{loaded:?}");
    assert!(loaded.iter().any(|l| l.contains("search") && l.contains("0.2.0")), "{loaded:?}");

    let (_, _, info) = relay.http_get("/", "application/nostr+json").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert!(info["supported_nips"].as_array().unwrap().contains(&json!(50)), "{info}");

    let (alice, bob) = (Keys::generate(), Keys::generate());
    let mut a = relay.client().await;
    let t = now() - 100;
    let mls = sign(&alice, 1, "The relay carries MLS groups now", &[], t);
    let fast = sign(&alice, 1, "this relay is fast", &[], t + 1);
    let bobs = sign(&bob, 1, "another relay, same words", &[], t + 2);
    let unindexed_kind = sign(&alice, 0, "{\"about\":\"relay\"}", &[], t);
    for e in [&mls, &fast, &bobs, &unindexed_kind] {
        a.publish_ok(e).await;
    }
    // The 0.1 policy still refuses what it does not allow.
    let (ok, message) = a.publish(&sign(&alice, 7, "+", &[], now())).await;
    assert!(!ok && message.starts_with("blocked:"), "{message}");

    let mut b = relay.client().await;
    search_until(&mut b, json!({"search": "relay"}), &ids(&[&bobs, &fast, &mls])).await;
    // Every term must be there; case and punctuation do not matter.
    assert_eq!(b.req_ids("and", vec![json!({"search": "RELAY, mls!"})]).await, ids(&[&mls]));
    // The other fields still apply, and the limit.
    let alices = json!({"search": "relay", "authors": [alice.public_key().to_hex()]});
    assert_eq!(b.req_ids("authors", vec![alices]).await, ids(&[&fast, &mls]));
    assert_eq!(b.req_ids("limit", vec![json!({"search": "relay", "limit": 1})]).await, ids(&[&bobs]));
    assert_eq!(b.req_ids("until", vec![json!({"search": "relay", "until": t + 1})]).await, ids(&[&fast, &mls]));
    assert!(b.req_ids("none", vec![json!({"search": "nothing-like-this"})]).await.is_empty());
    // A search filter beside a plain one: both answered, no duplicates.
    let mut both = b.req_ids("both", vec![json!({"search": "mls"}), json!({"kinds": [0]})]).await;
    let mut expected = ids(&[&mls, &unindexed_kind]);
    both.sort();
    expected.sort();
    assert_eq!(both, expected);
    let counted = b.count("count", vec![json!({"search": "relay"})]).await;
    assert_eq!(counted[2]["count"], 3, "{counted}");

    // Alice deletes a note: on-removed drops it from the index.
    a.publish_ok(&sign(&alice, 5, "", &[&["e", &mls.id.to_hex()]], now())).await;
    counter_reaches(&relay, "search", "unindexed", 1).await;
    assert!(b.req_ids("gone", vec![json!({"search": "mls"})]).await.is_empty());
    assert_eq!(counter(&relay, "search", "indexed").await, 3);
}

/// Every change to the store reaches an `on-removed` plugin with its reason,
/// and `on-stored` sees each stored event once.
#[tokio::test]
async fn on_stored_and_on_removed_see_every_change_with_its_reason() {
    let config = plugin_entry("contract-hooks", &plugin_path("contract_hooks.wasm"), "", &[]);
    let relay = TestRelay::start_with(Some(&config), &[("WASM_RELAY_NIPS__EXPIRATION_SWEEP_SECONDS", "1")]).await;
    let mut c = relay.client().await;
    let (alice, bob, carol) = (Keys::generate(), Keys::generate(), Keys::generate());
    let t = now() - 100;
    let note = sign(&alice, 1, "regret", &[], t);
    let profile = sign(&alice, 0, "{}", &[], t);
    let newer_profile = sign(&alice, 0, "{\"name\":\"alice\"}", &[], t + 1);
    let bobs = sign(&bob, 1, "bob was here", &[], t);
    let soon = sign(&carol, 1, "soon gone", &[&["expiration", &(now() + 2).to_string()]], now());
    for e in [&note, &profile, &newer_profile, &bobs, &soon] {
        c.publish_ok(e).await;
    }
    counter_reaches(&relay, "contract-hooks", "removed_replaced", 1).await;
    c.publish_ok(&sign(&alice, 5, "", &[&["e", &note.id.to_hex()]], now())).await;
    counter_reaches(&relay, "contract-hooks", "removed_deleted", 1).await;
    c.publish_ok(&sign(&bob, 62, "", &[&["relay", &relay.url]], now())).await;
    counter_reaches(&relay, "contract-hooks", "removed_vanished", 1).await;
    counter_reaches(&relay, "contract-hooks", "removed_expired", 1).await;
    // Seven events stored: five notes and profiles, one deletion, one request to vanish.
    counter_reaches(&relay, "contract-hooks", "stored_events", 7).await;
    let dropped =
        metric(&relay, "wasm_relay_plugin_notices_dropped_total{hook=\"on-stored\",plugin=\"contract-hooks\"}").await;
    assert_eq!(dropped, 0);
}

/// A plugin that is slower than the writes falls behind: every event is
/// still acknowledged as stored, the plugin gets what its queue holds, and
/// the rest is dropped and counted, never queued without bound.
#[tokio::test]
async fn a_slow_on_stored_plugin_lags_and_drops_without_holding_back_acknowledgements() {
    let config =
        plugin_entry("contract-hooks", &plugin_path("contract_hooks.wasm"), "notice_queue = 8", &[("stall-ms", "500")]);
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let events: Vec<_> = (0..60).map(|i| sign(&k, 1, &format!("burst {i}"), &[], now())).collect();
    for e in &events {
        c.publish_ok(e).await;
    }
    assert_eq!(c.req_ids("all", vec![json!({"kinds": [1], "limit": 100})]).await.len(), 60);
    let series = "wasm_relay_plugin_notices_dropped_total{hook=\"on-stored\",plugin=\"contract-hooks\"}";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (seen, dropped) = (counter(&relay, "contract-hooks", "stored_events").await, metric(&relay, series).await);
        if seen + dropped == 60 {
            assert!(dropped > 0 && seen > 0, "seen {seen}, dropped {dropped}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "seen {seen} + dropped {dropped} of 60");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback HTTP service for the policy plugin: `GET /allowed?pubkey=X`
/// answers 200 for `allowed`, 403 "pay first" for anyone else, and
/// `/slow` never answers. Returns its address and a count of connections.
async fn admission_service(allowed: String) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let allowed = allowed.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n]).lines().next().unwrap_or_default().to_owned();
                if line.contains("/slow") {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                let (status, body) = if line.contains(&format!("pubkey={allowed}")) {
                    ("200 OK", "welcome")
                } else {
                    ("403 Forbidden", "pay first at https://pay.example")
                };
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    (addr, connections)
}

/// A writer policy that asks an outside service (contract 0.2, capability
/// `outbound-http`) reaches the host the operator granted and nothing else,
/// and a service that never answers costs a timeout, not a stuck relay.
#[tokio::test]
async fn an_http_policy_reaches_only_the_host_it_was_granted_and_times_out() {
    use std::sync::atomic::Ordering;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let (service, connections) = admission_service(alice.public_key().to_hex()).await;
    let (elsewhere, elsewhere_connections) = admission_service(alice.public_key().to_hex()).await;
    let policy = plugin_path("http_policy.wasm");
    let entry = |url: String, grant: std::net::SocketAddr| {
        plugin_entry(
            "http-policy",
            &policy,
            &format!("grants = {{ outbound_http = [\"{grant}\"] }}\nhttp_timeout_ms = 500"),
            &[("url", &url), ("posting-policy", "https://relay.example/who-may-write")],
        )
    };

    // Granted: the service decides.
    let relay = TestRelay::start_with_config(&entry(format!("http://{service}/allowed"), service)).await;
    let mut c = relay.client().await;
    c.publish_ok(&sign(&alice, 1, "let me in", &[], now())).await;
    let (ok, message) = c.publish(&sign(&bob, 1, "me too", &[], now())).await;
    assert!(!ok && message == "restricted: pay first at https://pay.example", "{message}");
    assert!(connections.load(Ordering::SeqCst) >= 2);
    let (_, _, info) = relay.http_get("/", "application/nostr+json").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["posting_policy"], "https://relay.example/who-may-write", "{info}");

    // The plugin asks for another host than the one granted: it is refused
    // before any connection, and the event with it.
    let relay = TestRelay::start_with_config(&entry(format!("http://{elsewhere}/allowed"), service)).await;
    relay.wait_for_log("its grants do not name").await;
    let (ok, message) = relay.client().await.publish(&sign(&alice, 1, "let me in", &[], now())).await;
    assert!(!ok && message.starts_with("error:") && message.contains("did not answer"), "{message}");
    assert_eq!(elsewhere_connections.load(Ordering::SeqCst), 0, "the ungranted host was reached");
    let denied = relay.wait_for_log("could not be asked").await;
    assert!(denied.contains("HttpRequestDenied"), "{denied}");

    // A service that never answers: the request times out, the event is
    // refused, and the relay goes on serving.
    let relay = TestRelay::start_with_config(&entry(format!("http://{service}/slow"), service)).await;
    let mut c = relay.client().await;
    let (ok, message) = c.publish(&sign(&alice, 1, "anyone there?", &[], now())).await;
    assert!(!ok && message.starts_with("error:"), "{message}");
    let timed_out = relay.wait_for_log("could not be asked").await;
    assert!(timed_out.contains("Timeout"), "{timed_out}");
    assert!(c.req("alive", vec![json!({"limit": 1})]).await.is_empty());
}

/// A contract 0.2 plugin sees each connection, with its upgrade headers,
/// before the relay reads from it, and each NIP-42 authentication before it
/// counts; it can refuse either.
#[tokio::test]
async fn on_connect_and_on_auth_let_a_plugin_refuse_connections_and_authentications() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (alice, mallory) = (Keys::generate(), Keys::generate());
    let mallory_hex = mallory.public_key().to_hex();
    let settings = [("refuse-header", "x-scraper"), ("refuse-auth", mallory_hex.as_str())];
    let relay = TestRelay::start_with_config(&plugin_entry(
        "contract-hooks",
        &plugin_path("contract_hooks.wasm"),
        "",
        &settings,
    ))
    .await;

    // A connection the plugin refuses: one NOTICE with the reason, then the
    // relay closes it, before any AUTH challenge.
    let mut request = relay.url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("x-scraper", "yes".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("the upgrade itself succeeds");
    let mut got = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match message {
            Message::Text(text) => got.push(serde_json::from_str::<Value>(&text).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(got, vec![json!(["NOTICE", "blocked: connections with x-scraper are not welcome"])]);

    // Anyone else connects; Alice authenticates, Mallory is refused.
    let mut c = relay.client().await;
    nostr45::authenticate(&mut c, &alice, &relay.url).await;
    let refused = nostr45::auth_event(&mallory, &c.challenge.clone(), &relay.url, now());
    let (ok, message) = nostr45::send_auth(&mut c, &refused).await;
    assert!(!ok && message == "restricted: this key may not authenticate here", "{message}");
    // Alice's gift wraps are hers to read; Mallory's would not be.
    let wrap_for_mallory = nostr45::gift_wrap(&mallory, 10);
    c.publish_ok(&wrap_for_mallory).await;
    assert!(c.req_ids("w", vec![json!({"kinds": [1059], "#p": [mallory_hex]})]).await.is_empty());
    assert_eq!(counter(&relay, "contract-hooks", "connections").await, 2);
    assert_eq!(counter(&relay, "contract-hooks", "authentications").await, 2);
}

/// A plugin granted `publish` has the relay sign and store an event with the
/// relay's own key (which the plugin never sees); without the grant, or
/// without a relay key, nothing is published.
#[tokio::test]
async fn a_plugin_granted_publish_has_the_relay_sign_with_its_own_key() {
    let relay_keys = Keys::generate();
    let hooks = plugin_path("contract_hooks.wasm");
    let settings = [("publish-on-connect", "a notice from the relay")];
    let info = format!("[info]\nsecret_key = \"{}\"\n", relay_keys.secret_key().to_secret_hex());
    let granted = info.clone() + &plugin_entry("contract-hooks", &hooks, "grants = { publish = true }", &settings);
    let relay = TestRelay::start_with_config(&granted).await;
    let mut c = relay.client().await;
    counter_reaches(&relay, "contract-hooks", "published", 1).await;
    let got = c.req("from-relay", vec![json!({"#t": ["from-relay"]})]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["pubkey"], relay_keys.public_key().to_hex());
    assert_eq!(got[0]["content"], "a notice from the relay");

    // Asked for but not granted: the relay warns at load and publishes nothing.
    let relay = TestRelay::start_with_config(&(info + &plugin_entry("contract-hooks", &hooks, "", &settings))).await;
    relay.wait_for_log("its grant differ").await;
    let mut c = relay.client().await;
    counter_reaches(&relay, "contract-hooks", "publish_not_granted", 1).await;
    assert!(c.req("none", vec![json!({"#t": ["from-relay"]})]).await.is_empty());

    // Granted, but the relay has no key.
    let relay =
        TestRelay::start_with_config(&plugin_entry("contract-hooks", &hooks, "grants = { publish = true }", &settings))
            .await;
    let _c = relay.client().await;
    counter_reaches(&relay, "contract-hooks", "publish_no_relay_key", 1).await;
}
