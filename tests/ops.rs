//! What operators use, against the real binary: the Prometheus endpoint,
//! `/health` and `/ready`, the NIP-86 management API with NIP-98
//! authorization (lists and plugin management), and the CLI subcommands
//! (`plugin check`, `plugin list`, `export`, `import`).

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::path::Path;
use std::process::Output;

use harness::{TestRelay, plugin_path, relay_binary};
use nostr::key::Keys;
use nostr45::{Publish, nip98_header, note, sign};
use serde_json::{Value, json};

/// A relay whose management API admits `admin`, with the probe plugin
/// loaded from a copy of its file (swap tests replace it), and the folder
/// holding that copy.
async fn managed_relay(admin: &Keys) -> (TestRelay, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("probe.wasm");
    std::fs::copy(plugin_path("probe.wasm"), &copy).unwrap();
    let copy = serde_json::to_string(&copy.display().to_string()).unwrap();
    let relay = TestRelay::start_with_config(&format!(
        "[admin]\npubkeys = [\"{}\"]\n[[plugins]]\nname = \"probe\"\npath = {copy}\n[plugins.settings]\n\"reject-kinds\" = \"7\"\n",
        admin.public_key().to_hex()
    ))
    .await;
    (relay, dir)
}

/// Starts a relay on the data directory `dir` (an imported store); returns
/// the process and its WebSocket URL.
async fn serve_on(dir: &Path) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = TestRelay::command(dir, None);
    cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let url = line.strip_prefix("wasm-relay listening on ").unwrap().to_owned();
    (child, url)
}

/// The relay's HTTP URL, as NIP-98 `u` tags name it.
fn http_url(relay: &TestRelay) -> String {
    relay.url.replacen("ws://", "http://", 1)
}

/// A NIP-86 call signed by `keys`; returns (HTTP status line, reply).
async fn rpc(relay: &TestRelay, keys: &Keys, method: &str, params: Value) -> (String, Value) {
    let body = json!({ "method": method, "params": params }).to_string();
    let auth = nip98_header(keys, &http_url(relay), body.as_bytes());
    let headers = [("Content-Type", "application/nostr+json+rpc"), ("Authorization", auth.as_str())];
    let (status, _, reply) = relay.http("POST", "/", &headers, body.as_bytes()).await;
    (status, serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {reply}")))
}

/// A NIP-86 call that must succeed; returns its `result`.
async fn admin_call(relay: &TestRelay, keys: &Keys, method: &str, params: Value) -> Value {
    let (status, reply) = rpc(relay, keys, method, params).await;
    assert!(status.contains("200"), "{method}: {status} {reply}");
    assert!(reply.get("error").is_none_or(Value::is_null), "{method}: {reply}");
    reply["result"].clone()
}

/// The value of one sample line of the Prometheus exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn health_and_readiness_follow_the_relay_state() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    let (_, _, nip11) = relay.http_get("/", "application/nostr+json").await;
    let nips = serde_json::from_str::<Value>(&nip11).unwrap()["supported_nips"].clone();
    assert!(nips.as_array().unwrap().contains(&json!(86)), "NIP-86 is advertised when admins are set: {nips}");
    let (status, _, body) = relay.http_get("/health", "*/*").await;
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
    let (status, _, body) = relay.http_get("/ready", "*/*").await;
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["event_store"], "ok");
    assert_eq!(ready["metadata_store"], "ok");

    // A disabled plugin makes the relay unready, and names the plugin.
    admin_call(&relay, &admin, "disableplugin", json!(["probe"])).await;
    let (status, _, body) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("503"), "{status} {body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["disabled_plugins"], json!(["probe"]));
    admin_call(&relay, &admin, "enableplugin", json!(["probe"])).await;
    let (status, _, _) = relay.http_get("/ready", "*/*").await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test]
async fn metrics_count_what_the_relay_did() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    let keys = Keys::generate();
    let mut c = relay.client().await;
    c.publish_ok(&note(&keys, "counted", 0)).await;
    c.publish_ok(&note(&keys, "counted too", 1)).await;
    let (ok, msg) = c.publish(&sign(&keys, 7, "+", &[], nostr45::now())).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");
    c.req("a", vec![json!({"kinds": [1]})]).await;
    c.req_refused("b", vec![json!({"search": "x"})]).await;

    let (status, headers, m) = relay.http_get("/metrics", "text/plain").await;
    assert!(status.contains("200") && headers.contains("text/plain"), "{status}");
    assert_eq!(sample(&m, "wasm_relay_events_total{outcome=\"stored\"}"), Some(2.0), "{m}");
    assert_eq!(sample(&m, "wasm_relay_events_total{outcome=\"blocked\"}"), Some(1.0));
    assert_eq!(sample(&m, "wasm_relay_messages_total{verb=\"EVENT\"}"), Some(3.0));
    assert_eq!(sample(&m, "wasm_relay_reads_total{outcome=\"served\",purpose=\"req\"}"), Some(1.0));
    assert_eq!(sample(&m, "wasm_relay_reads_total{outcome=\"invalid\",purpose=\"req\"}"), Some(1.0));
    assert_eq!(sample(&m, "wasm_relay_connections"), Some(1.0));
    assert_eq!(sample(&m, "wasm_relay_read_seconds_count{purpose=\"req\"}"), Some(1.0));
    assert_eq!(sample(&m, "wasm_relay_write_seconds_count"), Some(2.0));
    // The probe saw all three events (it refused the kind 7 one).
    assert_eq!(sample(&m, "wasm_relay_plugin_calls_total{hook=\"on-event\",plugin=\"probe\"}"), Some(3.0), "{m}");
    assert_eq!(sample(&m, "wasm_relay_plugin_call_seconds_count{hook=\"on-event\",plugin=\"probe\"}"), Some(3.0));
    assert_eq!(sample(&m, "wasm_relay_plugin_disabled{plugin=\"probe\"}"), Some(0.0));
    assert!(sample(&m, "wasm_relay_store_size_bytes").is_some_and(|b| b > 0.0));
}

#[tokio::test]
async fn metrics_behind_a_token_refuse_scrapes_without_it() {
    let relay =
        TestRelay::start_with_config("[metrics]\npath = \"/internal/metrics\"\nbearer_token = \"s3cret\"\n").await;
    let (status, headers, _) = relay.http_get("/internal/metrics", "*/*").await;
    assert!(status.contains("401") && headers.contains("www-authenticate: bearer"), "{status}");
    let wrong = [("Authorization", "Bearer guess")];
    let (status, _, _) = relay.http("GET", "/internal/metrics", &wrong, b"").await;
    assert!(status.contains("401"), "{status}");
    let right = [("Authorization", "Bearer s3cret")];
    let (status, _, body) = relay.http("GET", "/internal/metrics", &right, b"").await;
    assert!(status.contains("200") && body.contains("wasm_relay_connections_total"), "{status}");
    // The default path is not served when another is configured.
    let (status, _, _) = relay.http_get("/metrics", "*/*").await;
    assert!(status.contains("404"), "{status}");
    assert!(relay.log_lines("s3cret").is_empty(), "the token must never be logged");
}

#[tokio::test]
async fn management_api_refuses_anyone_but_an_admin_with_a_fresh_nip98_event() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    let body = json!({ "method": "supportedmethods", "params": [] }).to_string();
    let rpc_type = ("Content-Type", "application/nostr+json+rpc");

    let (status, _, reply) = relay.http("POST", "/", &[rpc_type], body.as_bytes()).await;
    assert!(status.contains("401") && reply.contains("Authorization"), "{status} {reply}");

    let (status, reply) = rpc(&relay, &Keys::generate(), "supportedmethods", json!([])).await;
    assert!(status.contains("401") && reply["error"].as_str().unwrap().contains("not an admin"), "{reply}");

    // Signed for another body, another URL, or too long ago.
    let for_other_body = nip98_header(&admin, &http_url(&relay), b"{}");
    let (status, _, reply) =
        relay.http("POST", "/", &[rpc_type, ("Authorization", &for_other_body)], body.as_bytes()).await;
    assert!(status.contains("401") && reply.contains("payload"), "{reply}");
    let for_other_url = nip98_header(&admin, "https://elsewhere.example", body.as_bytes());
    let (status, _, reply) =
        relay.http("POST", "/", &[rpc_type, ("Authorization", &for_other_url)], body.as_bytes()).await;
    assert!(status.contains("401") && reply.contains("`u` tag"), "{reply}");
    let stale = {
        use base64::Engine as _;
        use sha2::Digest as _;
        let payload = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        let url = http_url(&relay);
        let tags: &[&[&str]] = &[&["u", &url], &["method", "POST"], &["payload", &payload]];
        let event = sign(&admin, 27235, "", tags, nostr45::now() - 600);
        format!("Nostr {}", base64::engine::general_purpose::STANDARD.encode(event.as_json()))
    };
    let (status, _, reply) = relay.http("POST", "/", &[rpc_type, ("Authorization", &stale)], body.as_bytes()).await;
    assert!(status.contains("401") && reply.contains("created_at"), "{reply}");

    let methods = admin_call(&relay, &admin, "supportedmethods", json!([])).await;
    for m in ["banpubkey", "listbannedpubkeys", "banevent", "blockip", "listplugins", "swapplugin"] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m} missing from {methods}");
    }
    let (_, reply) = rpc(&relay, &admin, "nosuchmethod", json!([])).await;
    assert!(reply["error"].as_str().unwrap().contains("unknown method"), "{reply}");
    let (_, reply) = rpc(&relay, &admin, "banpubkey", json!(["not-a-key"])).await;
    assert!(reply["error"].as_str().unwrap().contains("64 hex"), "{reply}");

    // Without configured admins the API is off.
    let plain = TestRelay::start().await;
    let (status, reply) = rpc(&plain, &admin, "supportedmethods", json!([])).await;
    assert!(status.contains("401") && reply["error"].as_str().unwrap().contains("admin.pubkeys"), "{reply}");
}

#[tokio::test]
async fn bans_and_kind_rules_apply_at_once_and_survive_a_restart() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    let (spammer, member) = (Keys::generate(), Keys::generate());
    let mut c = relay.client().await;
    let unwanted = note(&member, "unwanted", 5);
    c.publish_ok(&unwanted).await;

    admin_call(&relay, &admin, "banpubkey", json!([spammer.public_key().to_hex(), "spam"])).await;
    let (ok, msg) = c.publish(&note(&spammer, "more spam", 0)).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");
    let banned = admin_call(&relay, &admin, "listbannedpubkeys", json!([])).await;
    assert_eq!(banned, json!([{ "pubkey": spammer.public_key().to_hex(), "reason": "spam" }]));

    // banevent removes the stored event and refuses it from then on.
    admin_call(&relay, &admin, "banevent", json!([unwanted.id.to_hex(), "off-topic"])).await;
    assert!(c.req_ids("gone", vec![json!({"ids": [unwanted.id.to_hex()]})]).await.is_empty());
    let (ok, msg) = c.publish(&unwanted).await;
    assert!(!ok && msg.starts_with("blocked:"), "{msg}");

    admin_call(&relay, &admin, "disallowkind", json!([30023])).await;
    let (ok, msg) = c.publish(&sign(&member, 30023, "article", &[&["d", "a"]], nostr45::now())).await;
    assert!(!ok && msg.contains("kind 30023"), "{msg}");
    admin_call(&relay, &admin, "allowkind", json!([1])).await;
    let (ok, msg) = c.publish(&sign(&member, 4, "dm", &[], nostr45::now())).await;
    assert!(!ok && msg.starts_with("blocked:"), "only allowed kinds pass once one is allowed: {msg}");
    c.publish_ok(&note(&member, "a note", 0)).await;

    let relay = relay.crash_and_restart().await;
    let mut c = relay.client().await;
    let (ok, msg) = c.publish(&note(&spammer, "after restart", 0)).await;
    assert!(!ok && msg.starts_with("blocked:"), "the ban must persist: {msg}");
    assert_eq!(admin_call(&relay, &admin, "listallowedkinds", json!([])).await, json!([1]));
    assert_eq!(admin_call(&relay, &admin, "listbannedevents", json!([])).await[0]["id"], unwanted.id.to_hex());

    admin_call(&relay, &admin, "allowpubkey", json!([spammer.public_key().to_hex()])).await;
    assert_eq!(admin_call(&relay, &admin, "listbannedpubkeys", json!([])).await, json!([]));
    c.publish_ok(&note(&spammer, "reformed", 0)).await;
    // An allow list now exists: keys not on it may not publish.
    let (ok, msg) = c.publish(&note(&Keys::generate(), "stranger", 0)).await;
    assert!(!ok && msg.starts_with("restricted:"), "{msg}");
}

#[tokio::test]
async fn a_blocked_ip_is_refused_until_unblocked() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    admin_call(&relay, &admin, "blockip", json!(["127.0.0.1", "abuse"])).await;
    let (status, _, body) = relay.http_get("/", "application/nostr+json").await;
    assert!(status.contains("403") && body.starts_with("blocked:"), "{status} {body}");
    assert!(tokio_tungstenite::connect_async(&relay.url).await.is_err(), "websocket upgrade must be refused");
    let listed = admin_call(&relay, &admin, "listblockedips", json!([])).await;
    assert_eq!(listed, json!([{ "ip": "127.0.0.1", "reason": "abuse" }]));
    // The management API still answers, so the block can be undone.
    admin_call(&relay, &admin, "unblockip", json!(["127.0.0.1"])).await;
    relay.client().await.publish_ok(&note(&Keys::generate(), "back", 0)).await;
}

#[tokio::test]
async fn plugins_are_listed_disabled_reloaded_and_swapped_through_the_api() {
    let admin = Keys::generate();
    let (relay, _plugins) = managed_relay(&admin).await;
    let keys = Keys::generate();
    let mut c = relay.client().await;

    let list = admin_call(&relay, &admin, "listplugins", json!([])).await;
    assert_eq!(list[0]["name"], "probe");
    assert_eq!(list[0]["version"], "v1");
    assert_eq!(list[0]["wit_version"], "0.1.0");
    assert_eq!(list[0]["disabled"], false);

    admin_call(&relay, &admin, "disableplugin", json!(["probe"])).await;
    let (ok, msg) = c.publish(&note(&keys, "while disabled", 0)).await;
    assert!(!ok && msg.contains("disabled"), "{msg}");
    admin_call(&relay, &admin, "enableplugin", json!(["probe"])).await;
    c.publish_ok(&note(&keys, "enabled again", 0)).await;

    // A broken replacement is refused; the running version keeps serving.
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (_, reply) = rpc(&relay, &admin, "swapplugin", json!(["probe", b64(b"not wasm")])).await;
    assert!(reply["error"].as_str().unwrap().contains("not a WebAssembly binary"), "{reply}");
    let future = std::fs::read(plugin_path("future_wit.wasm")).unwrap();
    let (_, reply) = rpc(&relay, &admin, "swapplugin", json!(["probe", b64(&future)])).await;
    assert!(reply["error"].as_str().unwrap().contains("@9.0.0"), "{reply}");
    let (ok, msg) = c.publish(&sign(&keys, 7, "+", &[], nostr45::now())).await;
    assert_eq!((ok, msg.as_str()), (false, "blocked: probe v1 rejects kind 7"));

    let v2 = std::fs::read(plugin_path("probe_v2.wasm")).unwrap();
    let swapped = admin_call(&relay, &admin, "swapplugin", json!(["probe", b64(&v2)])).await;
    assert_eq!(swapped["swapped"], true);
    assert_eq!(swapped["plugin"]["version"], "v2");
    let (ok, msg) = c.publish(&sign(&keys, 7, "+", &[], nostr45::now())).await;
    assert_eq!((ok, msg.as_str()), (false, "blocked: probe v2 rejects kind 7"));
    // The file was replaced too, so a reload (or restart) keeps v2.
    let reloaded = admin_call(&relay, &admin, "reloadplugin", json!(["probe"])).await;
    assert_eq!(reloaded["swapped"], false);
    assert_eq!(reloaded["plugin"]["version"], "v2");
    let (_, reply) = rpc(&relay, &admin, "reloadplugin", json!(["nope"])).await;
    assert!(reply["error"].as_str().unwrap().contains("no plugin named 'nope'"), "{reply}");
}

fn cli(args: &[&str]) -> Output {
    std::process::Command::new(relay_binary())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env("WASM_RELAY_LOG", "warn")
        .output()
        .expect("run wasm-relay")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn plugin_check_prints_info_and_names_what_is_wrong() {
    let gateway = plugin_path("mls_gateway.wasm");
    let out = cli(&["plugin", "check", gateway.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("name:          mls-gateway"), "{stdout}");
    assert!(stdout.contains("wit:           nostr-relay:plugin@0.2.0"), "{stdout}");
    assert!(stdout.contains("managed kinds: [443, 30443]"), "{stdout}");
    assert!(stdout.contains("setting:       max_keypackages_per_author = 8"), "{stdout}");
    assert!(stdout.contains("hooks:         on-removed"), "{stdout}");
    assert!(stdout.contains("capabilities:  none asked"), "{stdout}");
    // A plugin built for contract 0.1 checks as 0.1.
    let out = cli(&["plugin", "check", plugin_path("kind_allowlist.wasm").to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("wit:           nostr-relay:plugin@0.1.0") && stdout.contains("hooks:         none"),
        "{stdout}"
    );
    // One that asks for capabilities names them.
    let out = cli(&["plugin", "check", plugin_path("http_policy.wasm").to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("capabilities:  outbound-http to 127.0.0.1:8089 (asked;"), "{stdout}");

    let out = cli(&["plugin", "check", plugin_path("future_wit.wasm").to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("targets nostr-relay:plugin@9.0.0; this relay supports @0.1.0, @0.2.0"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"hello").unwrap();
    let out = cli(&["plugin", "check", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("not a WebAssembly binary"), "{}", text(&out).1);
    let out = cli(&["plugin", "check", dir.path().join("missing.wasm").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).1.contains("missing.wasm"));
    assert!(!text(&out).1.contains("backtrace"), "errors are one readable line, not a backtrace");

    let out = cli(&["plugin", "check", gateway.to_str().unwrap(), "--setting", "no_such_setting=1"]);
    let stderr = text(&out).1;
    assert!(!out.status.success() && stderr.contains("no_such_setting"), "{stderr}");
    assert!(stderr.contains("plugin 'mls-gateway' does not declare"), "named after its file: {stderr}");

    // A missing file: the system's reason once.
    let out = cli(&["plugin", "check", dir.path().join("missing.wasm").to_str().unwrap()]);
    let stderr = text(&out).1;
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");

    // A core module (the smallest valid one) gets the way to a component.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = cli(&["plugin", "check", core.to_str().unwrap()]);
    let stderr = text(&out).1;
    assert!(!out.status.success() && stderr.contains("core WebAssembly module, not a component"), "{stderr}");
    assert!(stderr.contains("wasm32-wasip2"), "{stderr}");

    // info() has ten times the call budget (50 ms by default), and says so.
    let probe = plugin_path("probe.wasm");
    let out = cli(&["plugin", "check", probe.to_str().unwrap(), "--setting", "info=loop"]);
    let stderr = text(&out).1;
    assert!(!out.status.success() && stderr.contains("info() failed: timed out after 500 ms"), "{stderr}");
}

/// `plugin new` writes a project that builds with the one documented
/// command and passes `plugin check`, in each language.
#[test]
fn a_new_plugin_project_builds_and_passes_plugin_check() {
    let root = harness::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let sdk = root.join("plugins/sdk");
    let out =
        cli(&["plugin", "new", "word-filter", "--dir", dir.path().to_str().unwrap(), "--sdk", sdk.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let project = dir.path().join("word-filter");
    // The README's build command; a shared target folder lets runs reuse the SDK's build.
    let target = root.join("target/template-build");
    let build = std::process::Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    a_word_filter_passes_check(&target.join("wasm32-wasip2/release/word_filter.wasm"), "word-filter");
    passes_its_fixtures(&target.join("wasm32-wasip2/release/word_filter.wasm"), &project.join("fixtures.json"));
}

/// The JavaScript and Python templates: the build command `plugin new`
/// prints (the README's) builds a component that passes `plugin check`.
#[test]
fn new_javascript_and_python_plugin_projects_build_and_pass_plugin_check() {
    let dir = tempfile::tempdir().unwrap();
    for (lang, name) in [("js", "js-words"), ("python", "py-words")] {
        let out = cli(&["plugin", "new", name, "--lang", lang, "--dir", dir.path().to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let project = dir.path().join(name);
        let build = stdout.lines().find_map(|l| l.split_once(" && ").filter(|_| l.starts_with("build it: cd ")));
        let (_, build) = build.unwrap_or_else(|| panic!("no build command printed: {stdout}"));
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(readme.contains(build), "the README gives the same command:\n{build}\n{readme}");
        let run =
            std::process::Command::new("sh").args(["-c", build]).current_dir(&project).output().expect("run the build");
        assert!(run.status.success(), "{lang}: {build}\n{}", String::from_utf8_lossy(&run.stderr));
        let wasm = project.join(format!("{}.wasm", name.replace('-', "_")));
        a_word_filter_passes_check(&wasm, name);
        passes_its_fixtures(&wasm, &project.join("fixtures.json"));
    }
}

/// `plugin test` with the fixtures `plugin new` wrote: every case passes.
fn passes_its_fixtures(wasm: &Path, fixtures: &Path) {
    let out = cli(&["plugin", "test", wasm.to_str().unwrap(), fixtures.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success() && stdout.ends_with("3 passed, 0 failed\n"), "{stdout}\n{stderr}");
}

/// `plugin test` runs a plugin's hooks against fixtures without a relay:
/// the allowlist's fixtures pass in all three languages; a wrong
/// expectation fails the run and shows what came back; what the plugin
/// prints is on standard error; accepted events are there for later REQs.
#[test]
fn plugin_test_checks_a_plugin_against_fixtures_without_a_relay() {
    let fixtures = harness::workspace_root().join("plugins/examples/kind_allowlist/fixtures.json");
    for file in ["kind_allowlist.wasm", "kind_allowlist_js.wasm", "kind_allowlist_py.wasm"] {
        let out = cli(&["plugin", "test", plugin_path(file).to_str().unwrap(), fixtures.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{file}: {stdout}\n{stderr}");
        assert!(stdout.contains("ok      a kind the operator did not list is refused\n"), "{file}: {stdout}");
        assert!(stdout.ends_with("4 passed, 0 failed\n"), "{file}: {stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        r#"{"cases": [
            {"name": "prints and is accepted", "event": {"kind": 1, "content": "print"}, "expect": "accept"},
            {"name": "expects a refusal", "event": {"kind": 1, "content": "fine"}, "expect": "blocked:"},
            {"name": "an exception fails the call", "event": {"kind": 1, "content": "throw"}, "expect": "error:"}
        ]}"#,
    )
    .unwrap();
    let out = cli(&["plugin", "test", plugin_path("faults_py.wasm").to_str().unwrap(), wrong.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAILED  expects a refusal\n        expected: blocked:\n        got:      accept\n"),
        "{stdout}"
    );
    assert!(stdout.ends_with("2 passed, 1 failed\n"), "{stdout}");
    assert!(stderr.contains("faults-py says hello on stderr"), "the plugin's output: {stderr}");
    assert!(stderr.contains("ValueError: faults-py raises on purpose"), "the exception: {stderr}");

    // Accepted events are stored: a plugin answering with `filter-query`
    // serves them to a later case.
    let stored = dir.path().join("stored.json");
    std::fs::write(
        &stored,
        r#"{"settings": {"req": "filter-query-all"}, "cases": [
            {"name": "first note", "event": {"kind": 1, "content": "one"}, "expect": "accept"},
            {"name": "second note", "event": {"kind": 1, "content": "two"}, "expect": "accept"},
            {"name": "both are served", "req": [{"kinds": [1]}], "expect": "served 2"},
            {"name": "only what the filter matches", "req": [{"kinds": [7]}], "expect": "served 0"}
        ]}"#,
    )
    .unwrap();
    let out = cli(&["plugin", "test", plugin_path("probe.wasm").to_str().unwrap(), stored.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success() && stdout.ends_with("4 passed, 0 failed\n"), "{stdout}\n{stderr}");

    std::fs::write(&wrong, r#"{"cases": [{"name": "no hook", "expect": "accept"}]}"#).unwrap();
    let out = cli(&["plugin", "test", plugin_path("faults_py.wasm").to_str().unwrap(), wrong.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("got:      fixture error: a case has exactly one of `event`, `req` and `tick`"),
        "{stdout}"
    );
}

fn a_word_filter_passes_check(wasm: &Path, name: &str) {
    let out = cli(&["plugin", "check", wasm.to_str().unwrap(), "--setting", "blocked-word=spam"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("name:          {name}\n")) && stdout.contains("setting:       blocked-word"),
        "{stdout}"
    );
}

#[test]
fn plugin_list_loads_every_configured_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let entry = |name: &str, path: &Path| {
        format!(
            "[[plugins]]\nname = \"{name}\"\npath = {}\n",
            serde_json::to_string(&path.display().to_string()).unwrap()
        )
    };
    std::fs::write(&config, entry("mls-gateway", &plugin_path("mls_gateway.wasm"))).unwrap();
    let out = cli(&["--config", config.to_str().unwrap(), "plugin", "list"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("mls-gateway\t") && stdout.contains("mls-gateway 0.1.0\twit@0.2.0"), "{stdout}");

    let both = entry("mls-gateway", &plugin_path("mls_gateway.wasm")) + &entry("old", &plugin_path("future_wit.wasm"));
    std::fs::write(&config, both).unwrap();
    let out = cli(&["--config", config.to_str().unwrap(), "plugin", "list"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a plugin that cannot load fails the command");
    assert!(stdout.contains("old\t") && stdout.contains("FAILED") && stdout.contains("@9.0.0"), "{stdout}");
    assert!(stderr.contains("1 plugin(s) cannot be loaded"), "{stderr}");
}

#[tokio::test]
async fn export_then_import_moves_every_event_to_a_new_relay() {
    let mut relay = TestRelay::start().await;
    let keys = Keys::generate();
    let mut c = relay.client().await;
    let mut published = Vec::new();
    for i in 0..25 {
        let e = note(&keys, &format!("note {i}"), i);
        c.publish_ok(&e).await;
        published.push(e.id.to_hex());
    }
    let profile = sign(&keys, 0, "{\"name\":\"exported\"}", &[], nostr45::now());
    c.publish_ok(&profile).await;
    published.push(profile.id.to_hex());
    drop(c);

    // While the relay runs, export asks it through its operator socket.
    let data = relay.data_dir().to_str().unwrap().to_owned();
    let out = cli(&["export", "--data-dir", &data]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).1.contains("from the relay serving"), "{}", text(&out).1);
    assert_eq!(text(&out).0.lines().count(), 26);

    relay.stop().await;
    let dump = relay.temp_dir().join("events.jsonl");
    let out = cli(&["export", "--data-dir", &data, "--output", dump.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let lines = std::fs::read_to_string(&dump).unwrap();
    assert_eq!(lines.lines().count(), 26);

    // Into a fresh store, with a forged line and a duplicate mixed in.
    let mut forged: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    forged["content"] = json!("tampered");
    let input = relay.temp_dir().join("import.jsonl");
    std::fs::write(&input, format!("{lines}{forged}\nnot json\n{}\n", lines.lines().next().unwrap())).unwrap();
    let fresh = relay.temp_dir().join("fresh");
    let out = cli(&["import", "--data-dir", fresh.to_str().unwrap(), input.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("26 stored, 1 already present, 0 skipped (superseded or deleted), 2 invalid, 0 tombstones"),
        "{stderr}"
    );

    // A relay on the imported store serves every event.
    let (mut child, url) = serve_on(&fresh).await;
    let mut c = harness::Client::connect(&url).await;
    let mut found = c.req_ids("all", vec![json!({"authors": [keys.public_key().to_hex()]})]).await;
    found.sort();
    published.sort();
    assert_eq!(found, published);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn export_and_import_keep_deletions_and_vanish_requests() {
    let mut relay = TestRelay::start().await;
    let (alice, bob, carol) = (Keys::generate(), Keys::generate(), Keys::generate());
    let t = nostr45::now();
    let mut c = relay.client().await;
    // Alice deletes a note and an address; Bob asks the relay to vanish.
    let deleted = note(&alice, "deleted", 20);
    c.publish_ok(&deleted).await;
    c.publish_ok(&sign(&alice, 5, "", &[&["e", &deleted.id.to_hex()]], t - 10)).await;
    let article = sign(&alice, 30023, "v1", &[&["d", "post"]], t - 30);
    c.publish_ok(&article).await;
    let address = format!("30023:{}:post", alice.public_key().to_hex());
    c.publish_ok(&sign(&alice, 5, "", &[&["a", &address]], t - 5)).await;
    let bobs = note(&bob, "before vanishing", 40);
    c.publish_ok(&bobs).await;
    let vanish = sign(&bob, 62, "", &[&["relay", &relay.url]], t - 2);
    c.publish_ok(&vanish).await;
    // The vanish request itself is removed by an operator ban, as it may be;
    // its tombstone must still travel.
    drop(c);
    relay.stop().await;
    let data = relay.data_dir().to_str().unwrap().to_owned();
    let dump = relay.temp_dir().join("dump.jsonl");
    let out = cli(&["export", "--data-dir", &data, "--output", dump.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).1.contains("and 3 tombstones"), "{}", text(&out).1);
    let lines = std::fs::read_to_string(&dump).unwrap();
    let without_vanish: String =
        lines.lines().filter(|l| !l.contains(&vanish.id.to_hex())).map(|l| format!("{l}\n")).collect();
    std::fs::write(&dump, without_vanish).unwrap();

    let fresh = relay.temp_dir().join("fresh");
    let out = cli(&["import", "--data-dir", fresh.to_str().unwrap(), dump.to_str().unwrap()]);
    assert!(out.status.success() && text(&out).1.contains("3 tombstones"), "{}", text(&out).1);
    let (mut child, url) = serve_on(&fresh).await;
    let mut c = harness::Client::connect(&url).await;
    // Nothing deleted or vanished comes back on the migrated relay.
    for (event, what) in
        [(&deleted, "a deleted note"), (&article, "a deleted address"), (&bobs, "a vanished user's note")]
    {
        let (ok, why) = c.publish(event).await;
        assert!(!ok && why.starts_with("blocked:"), "{what} was accepted again: {why}");
    }
    // A tombstone belongs to its deleter: Carol's events are untouched.
    c.publish_ok(&note(&carol, "unrelated", 0)).await;
    child.kill().await.unwrap();
}
