//! The plugin runtime over real WebSockets, with real components built by
//! `make plugins`: every hook answer, managed kinds kept off other read
//! paths, hot swap under load, and containment of failing plugins.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::path::Path;
use std::time::Duration;

use harness::{Client, TestRelay, plugin_path};
use nostr::key::Keys;
use nostr45::{Publish, ids, now, sign};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

/// A `[[plugins]]` entry for `file` named `name`, with `extra` keys and settings.
fn plugin_entry(name: &str, file: &Path, extra: &str, settings: &[(&str, &str)]) -> String {
    let settings: String = settings.iter().map(|(k, v)| format!("\"{k}\" = {}\n", toml_string(v))).collect();
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = {}\n{extra}\n[plugins.settings]\n{settings}\n",
        toml_string(&file.display().to_string())
    )
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

async fn probe_relay(settings: &[(&str, &str)], extra: &str) -> TestRelay {
    TestRelay::start_with_config(&plugin_entry("probe", &plugin_path("probe.wasm"), extra, settings)).await
}

/// What a plugin prints, and a Rust panic's message, reach the relay's log
/// tagged with the plugin's name (never the client); a flood is cut to the
/// budget and the rest counted.
#[tokio::test]
async fn a_plugins_output_and_panic_messages_reach_the_log_within_a_budget() {
    let k = Keys::generate();
    let relay = probe_relay(&[("on-event", "print"), ("fail-kinds", "1")], "").await;
    relay.client().await.publish_ok(&sign(&k, 1, "print", &[], now())).await;
    let out = relay.wait_for_log("says hello on stdout").await;
    let err = relay.wait_for_log("says hello on stderr").await;
    assert!(out.contains("probe") && out.contains("INFO") && err.contains("WARN"), "{out}\n{err}");

    let relay = probe_relay(&[("on-event", "trap"), ("fail-kinds", "1")], "").await;
    let (ok, message) = relay.client().await.publish(&sign(&k, 1, "trap", &[], now())).await;
    assert!(!ok && !message.contains("on purpose"), "the panic message is for the log only: {message}");
    let panic = relay.wait_for_log("traps on purpose").await;
    assert!(panic.contains("probe"), "{panic}");

    let relay = probe_relay(&[("on-event", "flood"), ("fail-kinds", "1")], "").await;
    relay.client().await.publish_ok(&sign(&k, 1, "flood", &[], now())).await;
    let mut c = relay.client().await;
    // The next second's first line reports what was dropped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.publish_ok(&sign(&k, 1, "flood again", &[], now())).await;
    relay.wait_for_log("plugin output dropped").await;
    // The budget is per second of the clock, and a flood may straddle a
    // second's end: count the seconds lines were logged in. (The total, not
    // each second's count: a line let through at a second's very end may be
    // stamped with the next.)
    let logged = relay.log_lines("probe flood line");
    let mut per_second = std::collections::BTreeMap::<String, usize>::new();
    for line in &logged {
        *per_second.entry(logged_second(line)).or_default() += 1;
    }
    assert!(logged.len() < 1000, "all 1,000 flood lines logged");
    assert!(logged.len() <= 50 * per_second.len(), "flood lines logged per second: {per_second:?}");
}

/// The second (`YYYY-MM-DDTHH:MM:SS`) of a relay log line's timestamp.
fn logged_second(line: &str) -> String {
    let b = line.as_bytes();
    let at = (0..b.len().saturating_sub(19))
        .find(|&i| {
            b[i..i + 4].iter().all(u8::is_ascii_digit) && b[i + 4] == b'-' && b[i + 10] == b'T' && b[i + 13] == b':'
        })
        .unwrap_or_else(|| panic!("no timestamp in {line}"));
    line[at..at + 19].to_owned()
}

/// An operator sets a plugin's settings on the command line, next to
/// `--plugin`: `--setting NAME.KEY=VALUE`; one for a plugin that is not
/// configured stops the start with a reason.
#[tokio::test]
async fn settings_given_on_the_command_line_reach_the_plugin() {
    let probe = format!("probe={}", plugin_path("probe.wasm").display());
    let relay = TestRelay::start_with_args(&["--plugin", &probe, "--setting", "probe.reject-kinds=7"]).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&sign(&k, 1, "fine", &[], now())).await;
    let (ok, message) = c.publish(&sign(&k, 7, "+", &[], now())).await;
    assert!(!ok && message.starts_with("blocked:"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(harness::relay_binary())
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--plugin", &probe, "--setting", "nope.reject-kinds=7"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no plugin named 'nope' is configured (configured: probe)"),
        "{stderr}"
    );
}

/// The compiled-plugin cache stays under its cap: entries no loaded plugin
/// uses go, least recently used first; the one in use stays.
#[tokio::test]
async fn the_compile_cache_drops_unused_entries_beyond_its_cap() {
    let cache = tempfile::tempdir().unwrap();
    let stale = cache.path().join(format!("{}-0000000000000000.cwasm", "ab".repeat(32)));
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(long_ago).unwrap();
    let dir = cache.path().to_str().unwrap();
    let env = [("WASM_RELAY_PLUGIN_RUNTIME__CACHE_DIR", dir), ("WASM_RELAY_PLUGIN_RUNTIME__CACHE_MAX_BYTES", "1")];
    let relay = TestRelay::start_with(Some(&plugin_entry("probe", &plugin_path("probe.wasm"), "", &[])), &env).await;
    relay.client().await.publish_ok(&sign(&Keys::generate(), 1, "loaded", &[], now())).await;
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!stale.exists(), "the unused entry is still there: {entries:?}");
    assert_eq!(entries.len(), 1, "the probe's own entry stays: {entries:?}");
}

/// A plugin configured under another name than its `info()` gives loads
/// (logs, metrics and the management API use the configured one), and the
/// operator is told.
#[tokio::test]
async fn a_plugin_configured_under_another_name_is_reported() {
    let relay = TestRelay::start_with_config(&plugin_entry("renamed", &plugin_path("probe.wasm"), "", &[])).await;
    let line = relay.wait_for_log("configured under another name than its info() gives").await;
    assert!(line.contains("renamed") && line.contains("probe"), "{line}");
}

#[tokio::test]
async fn on_event_accepts_or_rejects_with_the_plugins_reason() {
    let relay = probe_relay(&[("reject-kinds", "7,9")], "").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&sign(&k, 1, "fine", &[], now())).await;
    let (ok, msg) = c.publish(&sign(&k, 7, "+", &[], now())).await;
    assert!(!ok);
    assert_eq!(msg, "blocked: probe v1 rejects kind 7");
    assert!(c.req("s", vec![json!({"kinds": [7]})]).await.is_empty(), "a rejected event must not be stored");
}

#[tokio::test]
async fn the_kind_allowlist_example_blocks_other_kinds() {
    let config = plugin_entry("policy", &plugin_path("kind_allowlist.wasm"), "", &[("allowed-kinds", "1, 30023")]);
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&sign(&k, 1, "note", &[], now())).await;
    c.publish_ok(&sign(&k, 30023, "article", &[&["d", "a"]], now())).await;
    let (ok, msg) = c.publish(&sign(&k, 4, "dm", &[], now())).await;
    assert!(!ok && msg == "blocked: kind 4 is not accepted by this relay", "{msg}");
}

#[tokio::test]
async fn unknown_settings_and_missing_files_stop_startup_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (config, expected) in [
        (plugin_entry("probe", &plugin_path("probe.wasm"), "", &[("no-such-setting", "1")]), "no-such-setting"),
        (plugin_entry("probe", &dir.path().join("missing.wasm"), "", &[]), "missing.wasm"),
        (plugin_entry("Bad Name", &plugin_path("probe.wasm"), "", &[]), "not a valid name"),
    ] {
        let garbage = dir.path().join("garbage.wasm");
        std::fs::write(&garbage, b"not wasm").unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, &config).unwrap();
        let out = TestRelay::command(&dir.path().join("data"), Some(&path)).output().await.unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "expected '{expected}' in: {stderr}");
    }
    let garbage = dir.path().join("garbage.wasm");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, plugin_entry("probe", &garbage, "", &[])).unwrap();
    let out = TestRelay::command(&dir.path().join("data"), Some(&path)).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly component"));
}

#[tokio::test]
async fn managed_kinds_never_leak_around_the_plugin() {
    // `continue` for everything: the managed kind must be invisible on every path.
    let relay = probe_relay(&[("managed-kinds", "9001")], "").await;
    let mut publisher = relay.client().await;
    let mut reader = relay.client().await;
    let k = Keys::generate();
    let pk = k.public_key().to_hex();
    let managed = sign(&k, 9001, "managed", &[&["t", "x"]], now() - 5);
    let ordinary = sign(&k, 1, "ordinary", &[&["t", "x"]], now() - 4);
    reader.req("live", vec![json!({"authors": [pk]})]).await;
    publisher.publish_ok(&managed).await;
    publisher.publish_ok(&ordinary).await;
    // Live: only the ordinary event arrives.
    assert_eq!(reader.next_event("live").await["id"], ordinary.id.to_hex());
    reader.expect_silence(QUIET).await;
    let only_ordinary = ids(&[&ordinary]);
    for (sub, filter) in [
        ("kinds", json!({"kinds": [9001]})),
        ("ids", json!({"ids": [managed.id.to_hex()]})),
        ("authors", json!({"authors": [pk]})),
        ("tag", json!({"#t": ["x"]})),
        ("all", json!({})),
        ("mixed", json!({"kinds": [1, 9001]})),
    ] {
        let got = reader.req_ids(sub, vec![filter.clone()]).await;
        let expected = if sub == "kinds" || sub == "ids" { vec![] } else { only_ordinary.clone() };
        assert_eq!(got, expected, "{filter}");
    }
    assert_eq!(reader.count("c", vec![json!({"authors": [pk]})]).await[2]["count"], 1);
    assert_eq!(reader.count("c2", vec![json!({"kinds": [9001]})]).await[2]["count"], 0);
}

#[tokio::test]
async fn filter_query_serves_the_selected_stored_events_and_stays_live() {
    let relay = probe_relay(&[("managed-kinds", "9001"), ("req", "filter-query-all")], "").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let m1 = sign(&k, 9001, "m1", &[], now() - 10);
    let m2 = sign(&k, 9001, "m2", &[], now() - 9);
    let o = sign(&k, 1, "o", &[], now() - 8);
    for e in [&m1, &m2, &o] {
        c.publish_ok(e).await;
    }
    assert_eq!(c.req_ids("m", vec![json!({"kinds": [9001]})]).await, ids(&[&m2, &m1]));
    // Mixed: managed kinds from the plugin, others from the store, one NIP-01 order.
    assert_eq!(c.req_ids("mix", vec![json!({"kinds": [1, 9001]})]).await, ids(&[&o, &m2, &m1]));
    assert_eq!(c.count("c", vec![json!({"kinds": [1, 9001]})]).await[2]["count"], 3);
    // The subscription stays open for ordinary kinds.
    let later = sign(&k, 1, "later", &[], now());
    c.publish_ok(&later).await;
    assert_eq!(c.next_event("mix").await["id"], later.id.to_hex());
}

#[tokio::test]
async fn filter_query_ids_that_do_not_exist_or_do_not_match_are_not_served() {
    let relay = probe_relay(&[("managed-kinds", "9001"), ("req", "bogus-ids")], "").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let m = sign(&k, 9001, "m", &[], now() - 3);
    let unrelated = sign(&k, 1, "kind 1", &[], now() - 2);
    c.publish_ok(&m).await;
    c.publish_ok(&unrelated).await;
    // The plugin also returns a missing id, a malformed one and the kind-1 event.
    assert_eq!(c.req_ids("m", vec![json!({"kinds": [9001]})]).await, ids(&[&m]));
}

#[tokio::test]
async fn add_events_are_served_with_the_stored_query_after_checks() {
    let k = Keys::generate();
    let pinned = sign(&k, 1, "pinned announcement", &[&["t", "news"]], now() - 100);
    let config = plugin_entry(
        "pinned",
        &plugin_path("pinned_events.wasm"),
        "",
        &[("events", &format!("[{}]", pinned.as_json()))],
    );
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    // Served although not stored, and also when the store finds nothing.
    assert_eq!(c.req_ids("n", vec![json!({"#t": ["news"]})]).await, ids(&[&pinned]));
    let stored = sign(&k, 1, "stored", &[&["t", "news"]], now());
    c.publish_ok(&stored).await;
    assert_eq!(c.req_ids("n2", vec![json!({"#t": ["news"]})]).await, ids(&[&stored, &pinned]));
    // Filters still apply to plugin events.
    assert!(c.req_ids("other", vec![json!({"#t": ["sports"]})]).await.is_empty());
    assert!(c.req_ids("kind", vec![json!({"kinds": [7]})]).await.is_empty());

    // Forged events from a plugin are dropped.
    let relay = probe_relay(&[("req", "add-forged")], "").await;
    let mut c = relay.client().await;
    let real = sign(&k, 1, "real", &[], now());
    c.publish_ok(&real).await;
    let got = c.req("f", vec![json!({"kinds": [1]})]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["content"], "real");
}

#[tokio::test]
async fn process_req_can_refuse_with_a_prefix() {
    let relay = probe_relay(&[("req", "reject")], "").await;
    let mut c = relay.client().await;
    assert_eq!(c.req_refused("r", vec![json!({"kinds": [1]})]).await, "rate-limited: probe v1 says slow down");
    let refused = c.count("c", vec![json!({})]).await;
    assert_eq!(refused[0], "CLOSED");
}

#[tokio::test]
async fn concurrent_claims_through_the_kv_store_never_hand_out_one_item_twice() {
    let relay = probe_relay(&[("managed-kinds", "9001"), ("req", "claim")], "").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let items: Vec<_> = (0..20).map(|i| sign(&k, 9001, &format!("item {i}"), &[], now() - 100 + i)).collect();
    for e in &items {
        c.publish_ok(e).await;
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = relay.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            c.req_ids(&format!("claim{i}"), vec![json!({"kinds": [9001]})]).await
        }));
    }
    let mut got: Vec<String> = Vec::new();
    for t in tasks {
        let ids = t.await.unwrap();
        assert_eq!(ids.len(), 1, "each requester gets exactly one item");
        got.extend(ids);
    }
    got.sort();
    let mut all: Vec<String> = items.iter().map(|e| e.id.to_hex()).collect();
    all.sort();
    assert_eq!(got, all, "every item handed out exactly once");
    // Nothing left.
    assert!(c.req_ids("empty", vec![json!({"kinds": [9001]})]).await.is_empty());
}

#[tokio::test]
async fn tick_runs_periodically() {
    let relay = probe_relay(&[("tick-seconds", "1")], "").await;
    let mut c = relay.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = c.req_refused("t", vec![json!({"kinds": [9999]})]).await;
        let ticks: u64 = msg.rsplit('=').next().unwrap().parse().unwrap();
        if ticks >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "tick did not run twice in 15 s: {msg}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_trapping_plugin_costs_one_call() {
    for mode in ["trap", "loop", "oom"] {
        // A short budget ends the endless loop soon; the others get room,
        // so that on a loaded machine filling 16 MiB is not cut off by time.
        let budget = if mode == "loop" { 100 } else { 2000 };
        let relay = probe_relay(
            &[("on-event", mode), ("fail-kinds", "666")],
            &format!("call_timeout_ms = {budget}\nmemory_limit_bytes = 16777216"),
        )
        .await;
        let mut c = relay.client().await;
        let k = Keys::generate();
        let (ok, msg) = c.publish(&sign(&k, 666, "boom", &[], now())).await;
        assert!(!ok && msg.starts_with("error: plugin 'probe' failed"), "{mode}: {msg}");
        let expected = match mode {
            "trap" => "trapped",
            "loop" => "timed out",
            _ => "memory",
        };
        assert!(msg.contains(expected), "{mode}: {msg}");
        // A short reason; the trap text and backtrace stay in the log.
        assert!(
            msg.len() < 120 && !msg.contains("backtrace") && !msg.contains("wasm") && !msg.contains(".rs"),
            "{mode}: a client saw plugin internals: {msg}"
        );
        // The relay and the plugin keep working.
        c.publish_ok(&sign(&k, 1, "after", &[], now())).await;
        let (ok, _) = c.publish(&sign(&k, 666, "again", &[], now())).await;
        assert!(!ok);
        c.publish_ok(&sign(&k, 1, "after again", &[], now())).await;
    }
}

#[tokio::test]
async fn failing_reqs_follow_the_configured_policy() {
    let closed = probe_relay(&[("req", "trap"), ("fail-kinds", "5555")], "on_req_failure = \"closed\"").await;
    let mut c = closed.client().await;
    let msg = c.req_refused("x", vec![json!({"kinds": [5555]})]).await;
    assert!(msg.starts_with("error: plugin 'probe' failed"), "{msg}");
    c.req("ok", vec![json!({"kinds": [1]})]).await;

    let open = probe_relay(
        &[("req", "loop"), ("fail-kinds", "5555"), ("managed-kinds", "5555")],
        "on_req_failure = \"open\"\ncall_timeout_ms = 50",
    )
    .await;
    let mut c = open.client().await;
    let k = Keys::generate();
    let managed = sign(&k, 5555, "managed", &[], now() - 1);
    let ordinary = sign(&k, 1, "ordinary", &[], now());
    c.publish_ok(&managed).await;
    c.publish_ok(&ordinary).await;
    // Served without the plugin: ordinary kinds only, managed kinds still hidden.
    assert_eq!(c.req_ids("x", vec![json!({"kinds": [1, 5555]})]).await, ids(&[&ordinary]));
}

#[tokio::test]
async fn a_plugin_that_keeps_failing_opens_its_circuit_until_replaced_or_probed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.wasm");
    std::fs::copy(plugin_path("probe.wasm"), &file).unwrap();
    let config = plugin_entry(
        "probe",
        &file,
        "max_consecutive_failures = 3\ncircuit_open_seconds = 300",
        &[("on-event", "trap"), ("fail-kinds", "666")],
    );
    let relay = TestRelay::start_with_config(&config).await;
    let k = Keys::generate();
    // Failures from three different clients (one client's count once).
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let mut c = Client::connect_from(&relay.url, ip).await;
        let (ok, msg) = c.publish(&sign(&k, 666, ip, &[], now())).await;
        assert!(!ok && msg.contains("failed"), "{msg}");
    }
    relay.wait_for_log("circuit opened").await;
    let mut c = relay.client().await;
    let (ok, msg) = c.publish(&sign(&k, 1, "any kind now", &[], now())).await;
    assert!(!ok && msg.starts_with("error: plugin 'probe' is unavailable"), "{msg}");
    // Replacing the file closes the circuit at once.
    replace_file(&plugin_path("probe_v2.wasm"), &file);
    relay.wait_for_log("plugin swapped").await;
    c.publish_ok(&sign(&k, 1, "enabled again", &[], now())).await;
}

/// Replaces `target` atomically, as a deployment would.
fn replace_file(source: &Path, target: &Path) {
    let tmp = target.with_extension("tmp");
    std::fs::copy(source, &tmp).unwrap();
    std::fs::rename(&tmp, target).unwrap();
}

#[tokio::test]
async fn hot_swap_under_load_fails_no_request_and_shows_the_new_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.wasm");
    std::fs::copy(plugin_path("probe.wasm"), &file).unwrap();
    let config =
        plugin_entry("probe", &file, "", &[("reject-kinds", "7"), ("managed-kinds", "9001"), ("req", "claim")]);
    let relay = TestRelay::start_with_config(&config).await;
    let k = Keys::generate();
    let mut c = relay.client().await;
    // State written through the KV store before the swap...
    let items: Vec<_> = (0..4).map(|i| sign(&k, 9001, &format!("{i}"), &[], now() - 50 + i)).collect();
    for e in &items {
        c.publish_ok(e).await;
    }
    let first = c.req_ids("claim-before", vec![json!({"kinds": [9001]})]).await;
    assert_eq!(first, ids(&[&items[0]]));

    // Load: 8 clients publishing and querying throughout the swap.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for n in 0..8 {
        let (url, stop) = (relay.url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let k = Keys::generate();
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || done < 20 {
                let e = sign(&k, 1, &format!("{n}/{done}"), &[], now());
                let (ok, msg) = c.publish(&e).await;
                assert!(ok, "publish failed during swap: {msg}");
                let got = c.req_ids("q", vec![json!({"ids": [e.id.to_hex()]})]).await;
                assert_eq!(got.len(), 1, "query failed during swap");
                done += 1;
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    replace_file(&plugin_path("probe_v2.wasm"), &file);
    relay.wait_for_log("plugin swapped").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        assert!(t.await.expect("load client panicked") >= 20);
    }
    // New behaviour...
    let (ok, msg) = c.publish(&sign(&k, 7, "+", &[], now())).await;
    assert!(!ok && msg == "blocked: probe v2 rejects kind 7", "{msg}");
    // ...and the KV state survived: the claimed item is not handed out again.
    let second = c.req_ids("claim-after", vec![json!({"kinds": [9001]})]).await;
    assert_eq!(second, ids(&[&items[1]]));
}

#[tokio::test]
async fn a_broken_replacement_is_refused_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.wasm");
    std::fs::copy(plugin_path("probe.wasm"), &file).unwrap();
    let relay = TestRelay::start_with_config(&plugin_entry("probe", &file, "", &[("reject-kinds", "7")])).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let tmp = dir.path().join("broken.tmp");
    std::fs::write(&tmp, b"\0asm this is not a component").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let line = relay.wait_for_log("plugin swap failed").await;
    assert!(line.contains("not a valid WebAssembly component"), "{line}");
    let (ok, msg) = c.publish(&sign(&k, 7, "+", &[], now())).await;
    assert!(!ok && msg == "blocked: probe v1 rejects kind 7", "{msg}");
    c.publish_ok(&sign(&k, 1, "still served", &[], now())).await;
}

/// Files, environment, sockets and outgoing HTTP are all closed to a
/// plugin. The HTTP request names a server listening on loopback, which never
/// sees a connection: the host links `wasi:http` (JavaScript and Python
/// toolchains import it) but denies every request.
#[tokio::test]
async fn a_plugin_cannot_reach_files_environment_or_network() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap().to_string();
    let relay = probe_relay(&[("on-event", "escape"), ("fail-kinds", "666"), ("http-target", &target)], "").await;
    let mut c = relay.client().await;
    let (ok, msg) = c.publish(&sign(&Keys::generate(), 666, "try", &[], now())).await;
    assert!(!ok && msg.starts_with("blocked: probe v1 escape:"), "{msg}");
    assert!(!msg.contains("ESCAPED"), "the sandbox leaked: {msg}");
    assert!(msg.contains("env: 0 vars"), "{msg}");
    for what in [
        "file: denied",
        "dir: denied",
        "write: denied",
        "tcp: denied",
        "udp: denied",
        "http: denied (ErrorCode::HttpRequestDenied)",
    ] {
        assert!(msg.contains(what), "{what} missing: {msg}");
    }
    let connection = tokio::time::timeout(QUIET, server.accept()).await;
    assert!(connection.is_err(), "the plugin's HTTP request reached the server");
}

/// A plugin cannot hold host memory outside its memory cap through
/// `wasi:http` handles it keeps across calls: header maps are small and an
/// instance holds a bounded number of handles, so forty calls that each try
/// to keep 2,000 header maps of 7 KiB (560 MB) leave the relay's memory
/// bounded; calls past the bound fail and their instance is discarded.
#[tokio::test]
async fn a_plugin_cannot_hoard_host_memory_through_wasi_http_handles() {
    let relay = probe_relay(&[("on-event", "hoard-http"), ("fail-kinds", "1")], "call_timeout_ms = 2000").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    c.publish_ok(&sign(&k, 7, "warm up", &[], now())).await;
    let before = relay.rss_bytes();
    for i in 0..40 {
        // Accepted or failed; either way the memory must not stay.
        let _ = c.publish(&sign(&k, 1, &format!("hoard {i}"), &[], now())).await;
    }
    let grown = relay.rss_bytes().saturating_sub(before);
    assert!(grown < 150 << 20, "the relay grew by {} MiB", grown >> 20);
}

#[tokio::test]
async fn huge_plugin_answers_are_capped_and_checked() {
    // Building 200,000 ids takes the guest longer than the default budget.
    let relay = probe_relay(&[("req", "huge"), ("fail-kinds", "1")], "call_timeout_ms = 5000").await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    let e = sign(&k, 1, "real", &[], now());
    c.publish_ok(&e).await;
    // 200,000 ids that name no stored event: none served, the real one still is.
    assert_eq!(c.req_ids("h", vec![json!({"kinds": [1]})]).await, ids(&[&e]));
    let (_, _, metrics) = relay.http_get("/metrics", "text/plain").await;
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasm_relay_plugin_dropped_results_total{plugin=\"probe\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // The host looks at no more than limits.max_limit of them.
    assert_eq!(dropped, 5000, "{metrics}");
    c.publish_ok(&sign(&k, 1, "after", &[], now())).await;
}

#[tokio::test]
async fn a_failing_plugin_does_not_stop_the_others() {
    let probe = plugin_path("probe.wasm");
    let config = plugin_entry(
        "looping",
        &probe,
        "call_timeout_ms = 50\nclient_failures_per_minute = 100",
        &[("on-event", "loop"), ("fail-kinds", "666"), ("req", "trap"), ("req-kinds", "666")],
    ) + &plugin_entry("guard", &probe, "", &[("reject-kinds", "7")]);
    let relay = TestRelay::start_with_config(&config).await;
    let mut c = relay.client().await;
    let k = Keys::generate();
    for _ in 0..3 {
        let (ok, msg) = c.publish(&sign(&k, 666, "spin", &[], now())).await;
        assert!(!ok && msg.contains("'looping' failed") && msg.contains("timed out"), "{msg}");
        let (ok, msg) = c.publish(&sign(&k, 7, "+", &[], now())).await;
        assert_eq!((ok, msg.as_str()), (false, "blocked: probe v1 rejects kind 7"));
        let refused = c.req_refused("r", vec![json!({"kinds": [666]})]).await;
        assert!(refused.contains("'looping' failed"), "{refused}");
    }
    let e = sign(&k, 1, "fine", &[], now());
    c.publish_ok(&e).await;
    assert_eq!(c.req_ids("ok", vec![json!({"kinds": [1]})]).await, ids(&[&e]));
}
