//! Hardening against the real binary: SIGKILL at several points while many
//! clients publish (nothing acknowledged lost, nothing half-written
//! visible), graceful SIGTERM, and hostile clients (bad frames, deep or huge
//! JSON, subscription and REQ floods, clients that stop reading, silent and
//! half-open connections). Throughout, a well-behaved client keeps being served.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use harness::{Client, TestRelay};
use nostr::key::Keys;
use nostr45::{Publish, nip98_header, note, now, sign};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A well-behaved client publishes and reads its event back.
async fn still_serves(relay: &TestRelay) {
    let mut c = relay.client().await;
    let e = note(&Keys::generate(), "still here", 0);
    c.publish_ok(&e).await;
    assert_eq!(c.req_ids("check", vec![json!({"ids": [e.id.to_hex()]})]).await, vec![e.id.to_hex()]);
}

type RawSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the relay ends the connection; `Some(close code)` when it
/// sent a close frame with one. Fails the test after `seconds`.
async fn closed_within(ws: &mut RawSocket, seconds: u64, why: &str) -> Option<u16> {
    let ended = tokio::time::timeout(Duration::from_secs(seconds), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    ended.unwrap_or_else(|_| panic!("{why}"))
}

/// Publishes events from `key` on its own connection as fast as OKs come
/// back (up to 32 in flight), recording every id acknowledged with `OK true`,
/// until the connection breaks.
async fn publish_until_cut(url: String, key: Keys, acked: Arc<Mutex<BTreeSet<String>>>) {
    let Ok((ws, _)) = tokio_tungstenite::connect_async_with_config(&url, None, true).await else { return };
    let (mut tx, mut rx) = ws.split();
    let mut sent = 0u64;
    let mut in_flight = 0;
    loop {
        while in_flight < 32 {
            let e = sign(&key, 1, &format!("crash test {sent}"), &[&["t", "crash"]], now() - (sent % 600));
            sent += 1;
            if tx.send(Message::Text(format!("[\"EVENT\",{}]", e.as_json()).into())).await.is_err() {
                return;
            }
            in_flight += 1;
        }
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v[0] == "OK" {
                    in_flight -= 1;
                    assert_eq!(v[2], true, "{v}");
                    acked.lock().unwrap().insert(v[1].as_str().unwrap().to_owned());
                }
            }
            Some(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Ids a REQ returns, as a set.
async fn id_set(c: &mut Client, sub: &str, filter: Value) -> BTreeSet<String> {
    c.req_ids(sub, vec![filter]).await.into_iter().collect()
}

#[tokio::test]
async fn sigkill_at_several_points_loses_nothing_acknowledged_and_leaves_nothing_half_written() {
    let mut relay = TestRelay::start_with_env(&[("WASM_RELAY_LIMITS__MAX_LIMIT", "100000")]).await;
    let keys: Vec<Keys> = (0..8).map(|_| Keys::generate()).collect();
    let authors: Vec<String> = keys.iter().map(|k| k.public_key().to_hex()).collect();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    for (round, kill_after_ms) in [40u64, 150, 400].into_iter().enumerate() {
        let publishers: Vec<_> =
            keys.iter().map(|k| tokio::spawn(publish_until_cut(relay.url.clone(), k.clone(), acked.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        relay = relay.crash_and_restart().await;
        for p in publishers {
            p.await.expect("a publisher saw a wrong OK");
        }
        let acked_now = acked.lock().unwrap().clone();
        assert!(!acked_now.is_empty(), "round {round}: nothing was acknowledged before the kill");

        let mut c = relay.client().await;
        let limit = 100_000;
        let by_tag = id_set(&mut c, "t", json!({"#t": ["crash"], "limit": limit})).await;
        let by_kind = id_set(&mut c, "k", json!({"kinds": [1], "limit": limit})).await;
        let by_author = id_set(&mut c, "a", json!({"authors": authors, "limit": limit})).await;
        let by_author_kind = id_set(&mut c, "ak", json!({"authors": authors, "kinds": [1], "limit": limit})).await;
        let by_time = id_set(&mut c, "c", json!({"since": 0, "limit": limit})).await;
        let missing: Vec<_> = acked_now.difference(&by_tag).collect();
        assert!(missing.is_empty(), "round {round}: {} acknowledged events lost, e.g. {:?}", missing.len(), missing[0]);
        // Every index agrees: an event is either fully there or not at all.
        assert_eq!(by_tag, by_kind, "round {round}: tag and kind indexes disagree");
        assert_eq!(by_tag, by_author, "round {round}: tag and author indexes disagree");
        assert_eq!(by_tag, by_author_kind, "round {round}: author+kind index disagrees");
        assert_eq!(by_tag, by_time, "round {round}: created_at index disagrees");
        let sample: Vec<&String> = by_tag.iter().step_by((by_tag.len() / 200).max(1)).collect();
        let by_id = id_set(&mut c, "i", json!({"ids": sample})).await;
        assert_eq!(by_id.len(), sample.len(), "round {round}: indexed events missing their body");
        let count = c.count("n", vec![json!({"#t": ["crash"]})]).await;
        assert_eq!(count[2]["count"], by_tag.len(), "round {round}: COUNT disagrees");
    }
    still_serves(&relay).await;
}

#[tokio::test]
async fn sigterm_closes_subscriptions_answers_pending_events_and_exits_cleanly() {
    let mut relay = TestRelay::start().await;
    let mut watcher = relay.client().await;
    watcher.req("live", vec![json!({"kinds": [1]})]).await;
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    let events: Vec<_> = (0..200).map(|i| note(&k, &format!("in flight {i}"), i)).collect();
    for e in &events {
        publisher.send_raw(&format!("[\"EVENT\",{}]", e.as_json())).await;
    }
    let status = relay.terminate().await;
    assert!(status.success(), "exit status {status}");

    let got = watcher.drain_until_closed().await;
    let closed = got.iter().find(|m| m[0] == "CLOSED" && m[1] == "live").expect("CLOSED for the live subscription");
    assert!(closed[2].as_str().unwrap().starts_with("error: the relay is shutting down"), "{closed}");
    assert!(got.iter().any(|m| m[0] == "NOTICE" && m[1].as_str().unwrap().contains("shutting down")), "{got:?}");

    // Every EVENT the relay read got its OK; every OK true is durable.
    let replies = publisher.drain_until_closed().await;
    let acked: BTreeSet<String> =
        replies.iter().filter(|m| m[0] == "OK" && m[2] == true).map(|m| m[1].as_str().unwrap().to_owned()).collect();
    assert!(!acked.is_empty(), "no event was acknowledged: {replies:?}");
    let relay = relay.restart().await;
    let mut c = relay.client().await;
    let stored: BTreeSet<String> =
        c.req_ids("all", vec![json!({"authors": [k.public_key().to_hex()]})]).await.into_iter().collect();
    assert!(acked.is_subset(&stored), "{} acknowledged events are missing", acked.difference(&stored).count());
}

#[tokio::test]
async fn malformed_frames_close_only_the_offender() {
    let relay = TestRelay::start().await;
    // Invalid UTF-8 in a text frame: the relay closes that connection.
    let (mut ws, _) = tokio_tungstenite::connect_async(&relay.url).await.unwrap();
    let bad = Frame::message(vec![b'[', 0xff, 0xfe, b']'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    closed_within(&mut ws, 10, "a frame with invalid UTF-8 must end the connection").await;
    still_serves(&relay).await;

    // Deeply nested JSON within the size limit: a NOTICE, and the connection stays usable.
    let mut c = relay.client().await;
    let depth = 50_000;
    c.send_raw(&format!("[\"REQ\",\"deep\",{{\"#t\":{}{}}}]", "[".repeat(depth), "]".repeat(depth))).await;
    let closed = c.recv_where("CLOSED deep", |m| m[0] == "CLOSED" && m[1] == "deep").await;
    assert!(closed[2].as_str().unwrap().starts_with("invalid:"), "{closed}");
    c.send_raw(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).await;
    assert!(c.notice().await.starts_with("invalid:"));
    // A huge flat JSON value is refused by size.
    c.send_raw(&format!("[\"EVENT\",{{\"content\":\"{}\"}}]", "a".repeat(300_000))).await;
    assert!(c.notice().await.contains("262144"));
    c.publish_ok(&note(&Keys::generate(), "usable", 0)).await;

    // Far over the limit: the connection is closed with 1009 (message too big).
    let (mut ws, _) = tokio_tungstenite::connect_async(&relay.url).await.unwrap();
    let _ = ws.send(Message::Text("x".repeat(2 << 20).into())).await;
    let closed = closed_within(&mut ws, 10, "an oversized frame must end the connection").await;
    assert!(closed.is_none_or(|code| code == 1009), "close code {closed:?}");
    still_serves(&relay).await;
}

#[tokio::test]
async fn subscription_and_req_floods_are_refused_without_hurting_others() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_RATE_LIMITS__REQS_PER_MINUTE_PER_IP", "600")]).await;
    let mut flooder = relay.client().await;
    let n = 1000;
    for i in 0..n {
        flooder.send_raw(&format!("[\"REQ\",\"s{i}\",{{\"kinds\":[1],\"limit\":0}}]")).await;
    }
    let mut eose = 0;
    let mut refused = Vec::new();
    for _ in 0..n {
        let m = flooder.recv_where("EOSE or CLOSED", |m| m[0] == "EOSE" || m[0] == "CLOSED").await;
        if m[0] == "EOSE" {
            eose += 1;
        } else {
            refused.push(m[2].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(eose, 50, "exactly the allowed subscriptions open");
    assert!(refused.iter().all(|r| r.starts_with("blocked:") || r.starts_with("rate-limited:")), "{refused:?}");
    assert!(refused.iter().any(|r| r.starts_with("rate-limited:")), "600 per minute allows a burst of 600, not 1000");
    // A client from another address is served normally meanwhile.
    let mut other = Client::connect_from(&relay.url, "127.0.0.2").await;
    let e = note(&Keys::generate(), "unaffected", 0);
    other.publish_ok(&e).await;
    assert_eq!(other.req_ids("mine", vec![json!({"ids": [e.id.to_hex()]})]).await, vec![e.id.to_hex()]);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_does_not_slow_others() {
    let relay = TestRelay::start_with_env(&[
        ("WASM_RELAY_LIMITS__SEND_QUEUE_CAPACITY", "16"),
        ("WASM_RELAY_LIMITS__WRITE_TIMEOUT_SECONDS", "1"),
    ])
    .await;
    let mut sleeper = relay.client().await;
    sleeper.req("all", vec![json!({"kinds": [1]})]).await;
    let rss_before = relay.rss_bytes();
    // From here on the sleeper never reads. 300 events of 60 KB overflow any socket buffer.
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    let content = "z".repeat(60_000);
    for i in 0..300 {
        publisher.publish_ok(&sign(&k, 1, &content, &[], now() - i)).await;
    }
    relay.wait_for_log("closing").await;
    // 18 MB were pushed at the sleeper; what the relay holds for it is bounded
    // by its send queue and write buffer, not by what was published.
    let grown = relay.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "the relay grew by {} MiB serving a client that does not read", grown >> 20);
    let got = sleeper.drain_until_closed().await;
    assert!(got.len() < 300, "the slow reader was cut off, not served everything ({} messages)", got.len());
    still_serves(&relay).await;
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    assert!(metrics.contains("wasm_relay_slow_disconnects_total 1"), "{metrics}");
}

#[tokio::test]
async fn silent_and_half_open_connections_are_closed() {
    let relay = TestRelay::start_with_env(&[
        ("WASM_RELAY_LIMITS__HANDSHAKE_TIMEOUT_SECONDS", "1"),
        ("WASM_RELAY_LIMITS__IDLE_TIMEOUT_SECONDS", "2"),
    ])
    .await;
    // A TCP connection that never sends its HTTP request.
    let mut silent = tokio::net::TcpStream::connect(&relay.addr).await.unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "the relay must drop a connection that never sends a request");
    // A partial request is dropped too.
    let mut partial = tokio::net::TcpStream::connect(&relay.addr).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), partial.read(&mut buf)).await;
    assert!(read.is_ok(), "a request that never completes must be dropped");

    // A WebSocket peer that has gone away (never reads, so never answers pings).
    let (mut gone, _) = tokio_tungstenite::connect_async(&relay.url).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    closed_within(&mut gone, 10, "a peer that answers no ping must be disconnected").await;

    // A client that reads (and so answers pings) stays connected past the timeout.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&relay.url, None, true).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(m)) = rx.next().await {
            if m.is_ping() {
                pings += 1;
            }
            if pings >= 3 {
                return rx;
            }
        }
        panic!("the connection ended while the client was reading");
    });
    let mut rx = tokio::time::timeout(Duration::from_secs(15), reader).await.expect("pings arrive").unwrap();
    let e = note(&Keys::generate(), "alive", 0);
    tx.send(Message::Text(format!("[\"EVENT\",{}]", e.as_json()).into())).await.unwrap();
    loop {
        let m = rx.next().await.expect("still connected").unwrap();
        if m.to_text().is_ok_and(|t| t.starts_with("[\"OK\"")) {
            break;
        }
    }
}

/// A `[[plugins]]` entry for the component `file` named `name`.
fn plugin_entry(name: &str, file: &str, extra: &str, settings: &[(&str, &str)]) -> String {
    let path = serde_json::to_string(&harness::plugin_path(file).display().to_string()).unwrap();
    let settings: String =
        settings.iter().map(|(k, v)| format!("\"{k}\" = {}\n", serde_json::to_string(v).unwrap())).collect();
    format!("[[plugins]]\nname = \"{name}\"\npath = {path}\n{extra}\n[plugins.settings]\n{settings}\n")
}

/// What a client may see of a plugin failure: a short reason, nothing internal.
fn assert_no_internals(message: &str) {
    let leaks = ["backtrace", "wasm", ".rs", "0x", "panicked", "/"];
    assert!(
        message.len() < 160 && leaks.iter().all(|l| !message.contains(l)),
        "a client saw plugin internals: {message}"
    );
}

#[tokio::test]
async fn an_anonymous_flood_of_expensive_keypackage_requests_leaves_the_gateway_up_for_everyone() {
    let relay = TestRelay::start_with_config(&plugin_entry("mls-gateway", "mls_gateway.wasm", "", &[])).await;
    let victim = Keys::generate();
    let mut other = Client::connect_from(&relay.url, "127.0.0.2").await;
    let x = note(&victim, "to be deleted later", 10);
    other.publish_ok(&x).await;

    // 16 anonymous connections from one address, each asking 10 times for
    // the KeyPackages of 256 random keys.
    let flooders: Vec<_> = (0..16)
        .map(|c| {
            let url = relay.url.clone();
            tokio::spawn(async move {
                let mut flooder = Client::connect(&url).await;
                for i in 0..10 {
                    let authors: Vec<String> = (0..256).map(|_| Keys::generate().public_key().to_hex()).collect();
                    let sub = format!("f{c}-{i}");
                    flooder.send(json!(["REQ", sub, {"kinds": [443], "authors": authors}])).await;
                }
                for i in 0..10 {
                    let sub = format!("f{c}-{i}");
                    let m = flooder.recv_where("EOSE or CLOSED", |m| m[1] == sub.as_str()).await;
                    if m[0] == "CLOSED" {
                        let why = m[2].as_str().unwrap();
                        assert!(why.starts_with("rate-limited:") || why.starts_with("error:"), "{m}");
                        assert_no_internals(why);
                    } else {
                        assert_eq!(m[0], "EOSE", "{m}");
                    }
                }
            })
        })
        .collect();
    for f in flooders {
        f.await.expect("a flooder saw a malformed answer");
    }

    // Everyone else is served as before: the gateway is still up.
    let (status, _, body) = relay.http_get("/ready", "application/json").await;
    assert!(status.contains("200"), "{status} {body}");
    let deletion = sign(&victim, 5, "", &[&["e", &x.id.to_hex()]], now());
    other.publish_ok(&deletion).await;
    let profile = other.req_ids("profile", vec![json!({"authors": [victim.public_key().to_hex()]})]).await;
    assert_eq!(profile, vec![deletion.id.to_hex()], "a kindless REQ is served");
    other.req("kps", vec![json!({"kinds": [443], "authors": [victim.public_key().to_hex()]})]).await;
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    assert!(metrics.contains("wasm_relay_plugin_disabled{plugin=\"mls-gateway\"} 0"), "{metrics}");
    // Naming 40,960 keys without KeyPackages left no state behind.
    assert!(metrics.contains("wasm_relay_plugin_kv_keys{plugin=\"mls-gateway\"} 0"), "{metrics}");
}

#[tokio::test]
async fn a_client_that_makes_a_plugin_fail_pays_for_it_and_the_circuit_recovers_by_itself() {
    let config = plugin_entry(
        "probe",
        "probe.wasm",
        "max_consecutive_failures = 3\ncircuit_open_seconds = 1\nclient_failures_per_minute = 2",
        &[("req", "trap"), ("fail-kinds", "5555"), ("managed-kinds", "5555")],
    );
    let relay = TestRelay::start_with_config(&config).await;
    let d = Keys::generate();
    let mut bystander = Client::connect_from(&relay.url, "127.0.0.4").await;
    let kept = note(&d, "published before the outage", 5);
    bystander.publish_ok(&kept).await;

    // One client makes the plugin trap: short errors, then rate-limited.
    let mut abuser = relay.client().await;
    for i in 0..2 {
        let why = abuser.req_refused(&format!("a{i}"), vec![json!({"kinds": [5555]})]).await;
        assert!(why.starts_with("error: plugin 'probe' failed on this request (trapped)"), "{why}");
        assert_no_internals(&why);
    }
    let why = abuser.req_refused("a2", vec![json!({"kinds": [5555]})]).await;
    assert!(why.starts_with("rate-limited: your recent requests made plugin 'probe' fail"), "{why}");
    // Requests that do not name the plugin's managed kinds still work for it.
    abuser.req("feed", vec![json!({"authors": [d.public_key().to_hex()]})]).await;
    // One address moved the breaker once, however often it failed.
    assert!(relay.log_lines("circuit opened").is_empty());

    // Failures from two more clients open the circuit.
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let mut c = Client::connect_from(&relay.url, ip).await;
        let why = c.req_refused("x", vec![json!({"kinds": [5555]})]).await;
        assert!(why.contains("failed"), "{why}");
    }
    relay.wait_for_log("circuit opened").await;
    let why = bystander.req_refused("m", vec![json!({"kinds": [5555]})]).await;
    assert!(why.starts_with("error: plugin 'probe' is unavailable"), "{why}");
    // Only what the plugin manages is affected: a kindless REQ is served
    // without the managed kinds, a deletion of an ordinary event is stored.
    let feed = bystander.req_ids("feed", vec![json!({"authors": [d.public_key().to_hex()]})]).await;
    assert_eq!(feed, vec![kept.id.to_hex()]);
    bystander.publish_ok(&sign(&d, 5, "", &[&["e", &kept.id.to_hex()]], now())).await;
    let (ok, why) = bystander.publish(&sign(&d, 5, "", &[&["a", &format!("5555:{}:", d.public_key())]], now())).await;
    assert!(!ok && why.contains("unavailable"), "{why}");
    // Checking a deletion costs store reads: one naming too many events waits for the plugin.
    let many: Vec<String> = (0..65u8).map(|i| hex::encode([i; 32])).collect();
    let tags: Vec<[&str; 2]> = many.iter().map(|id| ["e", id.as_str()]).collect();
    let tags: Vec<&[&str]> = tags.iter().map(|t| &t[..]).collect();
    let (ok, why) = bystander.publish(&sign(&d, 5, "", &tags, now())).await;
    assert!(!ok && why.contains("unavailable"), "{why}");

    // After the open period one call probes the plugin; it answers, and the
    // circuit closes without an operator.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    bystander.publish_ok(&note(&d, "after the outage", 0)).await;
    relay.wait_for_log("circuit closed").await;
    bystander.req("m2", vec![json!({"kinds": [1]})]).await;
}

#[tokio::test]
async fn plugin_instances_are_capped_and_excess_calls_are_refused_as_busy() {
    let config = plugin_entry(
        "probe",
        "probe.wasm",
        "call_timeout_ms = 500\nmax_instances = 1\ninstance_wait_ms = 20",
        &[("req", "loop"), ("fail-kinds", "5555"), ("managed-kinds", "5555")],
    );
    let relay = TestRelay::start_with_config(&config).await;
    let mut first = Client::connect_from(&relay.url, "127.0.0.2").await;
    let mut second = Client::connect_from(&relay.url, "127.0.0.3").await;
    first.send(json!(["REQ", "spin", {"kinds": [5555]}])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let why = second.req_refused("wait", vec![json!({"kinds": [5555]})]).await;
    assert_eq!(why, "rate-limited: plugin 'probe' is busy; retry in a moment");
    let spun = first.recv_where("CLOSED spin", |m| m[1] == "spin").await;
    assert!(spun[2].as_str().unwrap().contains("(timed out)"), "{spun}");
    // Busy is load, not a fault: it never opens the circuit.
    second.req("later", vec![json!({"kinds": [1]})]).await;
}

#[tokio::test]
async fn a_deletion_cannot_be_undone_by_another_key() {
    let relay = TestRelay::start().await;
    let mut c = relay.client().await;
    let victim = Keys::generate();
    let mallory = Keys::generate();
    let x = note(&victim, "deleted by its author", 10);
    c.publish_ok(&x).await;
    c.publish_ok(&sign(&victim, 5, "", &[&["e", &x.id.to_hex()]], now())).await;
    // Another key "deletes" X too, then X is sent again.
    c.publish_ok(&sign(&mallory, 5, "", &[&["e", &x.id.to_hex()]], now())).await;
    let (ok, why) = c.publish(&x).await;
    assert!(!ok && why.starts_with("blocked:"), "the deleted event came back: {why}");
    assert!(c.req_ids("x", vec![json!({"ids": [x.id.to_hex()]})]).await.is_empty());

    // A key that deletes someone else's event ahead of time blocks nothing.
    let y = note(&victim, "not Mallory's to delete", 5);
    c.publish_ok(&sign(&mallory, 5, "", &[&["e", &y.id.to_hex()]], now())).await;
    c.publish_ok(&y).await;
    // Y's author still can.
    c.publish_ok(&sign(&victim, 5, "", &[&["e", &y.id.to_hex()]], now())).await;
    let (ok, _) = c.publish(&y).await;
    assert!(!ok);
}

/// Sends a POST / whose headers claim `content_length` bytes but whose body
/// is only `sent`; returns the status line the relay answers with, which
/// must come without the rest of the body.
async fn post_partial(relay: &TestRelay, auth: Option<&str>, content_length: usize, sent: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(&relay.addr).await.unwrap();
    let mut head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/nostr+json+rpc\r\nContent-Length: {content_length}\r\n",
        relay.addr
    );
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(sent).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the relay waited for a body it should not read")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_management_endpoint_reads_no_body_it_does_not_need_and_refuses_replays() {
    // The API off: answered at once, whatever the body claims to be.
    let off = TestRelay::start().await;
    let status = post_partial(&off, None, 48 << 20, b"{\"meth").await;
    assert!(status.contains("401"), "{status}");

    let admin = Keys::generate();
    let relay = TestRelay::start_with(
        Some(&format!("[admin]\npubkeys = [\"{}\"]\nbody_timeout_seconds = 1\n", admin.public_key().to_hex())),
        &[],
    )
    .await;
    let url = relay.url.replacen("ws://", "http://", 1);
    // A stranger, or a blocked address, is refused before any body is read.
    let stranger = nip98_header(&Keys::generate(), &url, b"whatever");
    let status = post_partial(&relay, Some(&stranger), 48 << 20, b"{").await;
    assert!(status.contains("401"), "{status}");
    // An admin's oversized body is refused from its declared length.
    let big = nip98_header(&admin, &url, b"big");
    let status = post_partial(&relay, Some(&big), 2 << 20, b"{").await;
    assert!(status.contains("413"), "{status}");
    // A body that trickles is cut off after the body timeout.
    let slow = nip98_header(&admin, &url, b"slow");
    let status = post_partial(&relay, Some(&slow), 100, b"{\"method\"").await;
    assert!(status.contains("408"), "{status}");

    // A NIP-98 event authorizes one request: a replay within its window is refused.
    let body = json!({"method": "supportedmethods", "params": []}).to_string();
    let auth = nip98_header(&admin, &url, body.as_bytes());
    let headers = [("Content-Type", "application/nostr+json+rpc"), ("Authorization", auth.as_str())];
    let (status, _, reply) = relay.http("POST", "/", &headers, body.as_bytes()).await;
    assert!(status.contains("200"), "{status} {reply}");
    let (status, _, reply) = relay.http("POST", "/", &headers, body.as_bytes()).await;
    assert!(status.contains("401") && reply.contains("already used"), "{status} {reply}");
}

/// The HTTP status and body a WebSocket handshake is refused with.
async fn handshake_refusal(url: &str, local_ip: &str) -> (u16, String) {
    let addr: std::net::SocketAddr = url.trim_start_matches("ws://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local_ip}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(url, stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Ok(_) => panic!("the handshake from {local_ip} was accepted"),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

#[tokio::test]
async fn connections_are_capped_per_address_and_in_total_and_identities_per_connection() {
    let relay = TestRelay::start_with_env(&[
        ("WASM_RELAY_LIMITS__MAX_CONNECTIONS_PER_IP", "3"),
        ("WASM_RELAY_LIMITS__MAX_CONNECTIONS", "4"),
        ("WASM_RELAY_LIMITS__MAX_AUTH_IDENTITIES", "2"),
    ])
    .await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(relay.client().await);
    }
    let (status, why) = handshake_refusal(&relay.url, "127.0.0.1").await;
    assert_eq!(status, 503);
    assert!(why.starts_with("rate-limited: 3 connections from your address"), "{why}");
    // Another address still gets in, up to the relay's total.
    let mut other = Client::connect_from(&relay.url, "127.0.0.2").await;
    let (status, why) = handshake_refusal(&relay.url, "127.0.0.3").await;
    assert_eq!(status, 503);
    assert!(why.starts_with("rate-limited: the relay is at its limit of 4 connections"), "{why}");
    // A closed connection frees its place.
    drop(mine.pop());
    let mut again = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let addr: std::net::SocketAddr = relay.addr.parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        if let Ok((ws, _)) = tokio_tungstenite::client_async(&relay.url, stream).await {
            again = Some(ws);
            break;
        }
    }
    assert!(again.is_some(), "the freed place was never given back");

    // NIP-42: at most two identities on one connection.
    for _ in 0..2 {
        nostr45::authenticate(&mut other, &Keys::generate(), &relay.url).await;
    }
    let third = nostr45::auth_event(&Keys::generate(), &other.challenge.clone(), &relay.url, now());
    let (ok, why) = nostr45::send_auth(&mut other, &third).await;
    assert!(!ok && why.starts_with("restricted:"), "{why}");
    other.publish_ok(&note(&Keys::generate(), "still served", 0)).await;
}

/// Publishes `n` kind 1 events by `k` with `body`, one second apart, 50 in
/// flight at a time, each acknowledged with `OK true`.
async fn publish_many(publisher: &mut Client, k: &Keys, body: &str, n: u64) {
    let start = now();
    for chunk in 0..n.div_ceil(50) {
        let events: Vec<_> =
            (0..50.min(n - chunk * 50)).map(|i| sign(k, 1, body, &[], start - (chunk * 50 + i))).collect();
        for e in &events {
            publisher.send_raw(&format!("[\"EVENT\",{}]", e.as_json())).await;
        }
        for e in &events {
            assert!(publisher.expect_ok(&e.id.to_hex()).await.0);
        }
    }
}

#[tokio::test]
async fn many_filters_with_big_limits_cost_the_relay_no_memory_per_filter() {
    let relay = TestRelay::start_with_env(&[("WASM_RELAY_RATE_LIMITS__EVENTS_PER_MINUTE_PER_IP", "0")]).await;
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    let body = "m".repeat(3000);
    // 2,000 events of 3 KB: 6 MB of JSON.
    publish_many(&mut publisher, &k, &body, 2000).await;
    let rss_before = relay.rss_bytes();
    let every: Vec<Value> = (0..20).map(|_| json!({})).collect();
    let big: Vec<Value> = (0..20).map(|_| json!({"limit": 5000})).collect();
    let abusers: Vec<_> = (0..4)
        .map(|_| {
            let (url, every, big) = (relay.url.clone(), every.clone(), big.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(&url).await;
                let counted = c.count("n", every).await;
                assert_eq!(counted[2]["count"], 2000, "{counted}");
                assert_eq!(c.req("all", big).await.len(), 2000, "each event once");
            })
        })
        .collect();
    for a in abusers {
        a.await.unwrap();
    }
    // 4 x 20 filters x 2,000 events would be 480 MB held at once if each
    // filter's results were loaded before merging.
    let grown = relay.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 96 << 20, "the relay grew by {} MiB answering 4 abusive requests", grown >> 20);
    still_serves(&relay).await;
}

#[tokio::test]
async fn a_plugin_is_held_to_its_key_value_quota() {
    let config = plugin_entry("probe", "probe.wasm", "kv_max_keys = 2", &[("managed-kinds", "9001"), ("req", "claim")]);
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    for i in 0..3 {
        c.publish_ok(&sign(&k, 9001, &format!("item {i}"), &[], now() - 10 + i)).await;
    }
    // Each claim writes one key: two fit, the third is refused by the quota.
    assert_eq!(c.req_ids("one", vec![json!({"kinds": [9001]})]).await.len(), 1);
    assert_eq!(c.req_ids("two", vec![json!({"kinds": [9001]})]).await.len(), 1);
    let why = c.req_refused("three", vec![json!({"kinds": [9001]})]).await;
    assert!(why.contains("quota of 2 keys is used up"), "{why}");
}

#[tokio::test]
async fn clients_that_stop_reading_a_large_answer_do_not_hold_up_other_large_reads() {
    let relay = TestRelay::start_with_env(&[
        ("WASM_RELAY_RATE_LIMITS__EVENTS_PER_MINUTE_PER_IP", "0"),
        ("WASM_RELAY_RATE_LIMITS__EVENTS_PER_MINUTE_PER_PUBKEY", "0"),
    ])
    .await;
    let mut publisher = relay.client().await;
    let k = Keys::generate();
    let body = "s".repeat(4000);
    // 4,000 events of 4 KB: 16 MB per full answer, more than the buffers
    // between the relay and a client that does not read.
    publish_many(&mut publisher, &k, &body, 4000).await;
    // More stalled readers than the relay gives large reads turns at once.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut stalled = Vec::new();
    for i in 0..(2 * cores + 1) {
        let (mut ws, _) = tokio_tungstenite::connect_async(&relay.url).await.unwrap();
        ws.send(Message::Text(format!("[\"REQ\",\"big{i}\",{{\"limit\":5000}}]").into())).await.unwrap();
        stalled.push(ws); // never read
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut reader = Client::connect_from(&relay.url, "127.0.0.2").await;
    assert_eq!(reader.req("all", vec![json!({"limit": 5000})]).await.len(), 4000);
    drop(stalled);
}

/// A WebSocket handshake from 127.0.0.1 carrying `X-Forwarded-For:
/// forwarded`: the open socket, or the HTTP status and body of the refusal.
async fn handshake_forwarded(
    url: &str,
    forwarded: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, (u16, String)>
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("x-forwarded-for", forwarded.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

#[tokio::test]
async fn a_client_cannot_pick_its_address_but_a_trusted_proxy_names_it() {
    // Reached directly, the header is ignored: three "different" clients
    // from one socket address are one client.
    let direct = TestRelay::start_with_env(&[("WASM_RELAY_LIMITS__MAX_CONNECTIONS_PER_IP", "2")]).await;
    let _a = handshake_forwarded(&direct.url, "203.0.113.1").await.expect("first");
    let _b = handshake_forwarded(&direct.url, "203.0.113.2").await.expect("second");
    let (status, why) = handshake_forwarded(&direct.url, "203.0.113.3").await.expect_err("a spoofed header got in");
    assert_eq!(status, 503);
    assert!(why.starts_with("rate-limited: 2 connections from your address"), "{why}");

    // Behind a proxy the operator names: the last entry, the address the
    // proxy saw, is the client; what the client put to its left is ignored.
    let proxied = TestRelay::start_with_env(&[
        ("WASM_RELAY_LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
        ("WASM_RELAY_CLIENT_ADDRESS_HEADER", "x-forwarded-for"),
    ])
    .await;
    let _c = handshake_forwarded(&proxied.url, "198.51.100.7, 203.0.113.1").await.expect("first");
    let _d = handshake_forwarded(&proxied.url, "198.51.100.8, 203.0.113.1").await.expect("second");
    let (status, _) = handshake_forwarded(&proxied.url, "198.51.100.9, 203.0.113.1").await.expect_err("third");
    assert_eq!(status, 503, "one client behind the proxy, however it fills the header");
    let _e = handshake_forwarded(&proxied.url, "203.0.113.2").await.expect("another client behind the same proxy");
    let _f = handshake_forwarded(&proxied.url, "203.0.113.3").await.expect("and another");
}
