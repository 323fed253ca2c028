//! Plugins written in JavaScript (componentize-js) and Python
//! (componentize-py), built by `make plugins`, in a real relay: they load
//! as their toolchains build them by default, decide like the Rust
//! example, and what goes wrong inside them reaches the operator's log.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use harness::{TestRelay, plugin_path};
use nostr::key::Keys;
use nostr45::{Publish, now, sign};
use serde_json::json;

/// A relay with one plugin, `name`, loaded from `file` with `settings`.
async fn relay_with(name: &str, file: &str, settings: &[(&str, &str)]) -> TestRelay {
    let settings: String = settings.iter().map(|(k, v)| format!("{} = {}\n", json!(k), json!(v))).collect();
    let path = plugin_path(file).display().to_string();
    TestRelay::start_with_config(&format!(
        "[[plugins]]\nname = \"{name}\"\npath = {}\n[plugins.settings]\n{settings}",
        json!(path)
    ))
    .await
}

/// Client A publishes a kind the operator allows and one it does not; client
/// B then reads what was stored. Returns what both saw.
async fn allowlist_outcome(relay: &TestRelay) -> Vec<String> {
    let author = Keys::generate();
    let mut a = relay.client().await;
    let allowed = sign(&author, 7, "+", &[], now());
    let refused = sign(&author, 4, "a note the relay does not take", &[], now());
    let (allowed_ok, allowed_message) = a.publish(&allowed).await;
    let (refused_ok, refused_message) = a.publish(&refused).await;
    let mut b = relay.client().await;
    let stored = b.req_ids("s", vec![json!({"authors": [author.public_key().to_hex()]})]).await;
    assert_eq!(stored, vec![allowed.id.to_hex()], "only the allowed kind is stored");
    vec![format!("kind 7: {allowed_ok} {allowed_message:?}"), format!("kind 4: {refused_ok} {refused_message:?}")]
}

/// The same policy in Rust, JavaScript and Python: each accepts the kinds
/// in its `allowed-kinds` setting and refuses others with the same `OK`.
#[tokio::test]
async fn the_allowlist_in_javascript_and_python_decides_like_the_rust_one() {
    let settings = [("allowed-kinds", "1, 7")];
    let rust = allowlist_outcome(&relay_with("kind-allowlist", "kind_allowlist.wasm", &settings).await).await;
    assert_eq!(
        rust,
        ["kind 7: true \"\"", "kind 4: false \"blocked: kind 4 is not accepted by this relay\""],
        "the Rust example's answers"
    );
    for (name, file) in
        [("kind-allowlist-js", "kind_allowlist_js.wasm"), ("kind-allowlist-py", "kind_allowlist_py.wasm")]
    {
        let relay = relay_with(name, file, &settings).await;
        assert_eq!(allowlist_outcome(&relay).await, rust, "{name} answers as the Rust example does");
    }
}

/// Event contents that make a faults plugin misbehave, and what the log
/// then shows.
type Faults = &'static [(&'static str, &'static str)];

/// A JavaScript exception and a Python one refuse the event with a plain
/// `error:` (no backtrace, no message from inside the plugin) and reach the
/// log with their message, as does a value of the wrong shape returned to
/// the host; what the plugins print reaches the log too.
#[tokio::test]
async fn javascript_and_python_exceptions_and_prints_reach_the_log() {
    let k = Keys::generate();
    let cases: [(&str, &str, Faults); 2] = [
        (
            "faults-js",
            "faults_js.wasm",
            &[
                ("throw", "faults-js throws on purpose"),
                ("bad-variant", "invalid variant tag value `\"maybe\"`"),
                ("bad-enum", "\"forbidden\" is not one of the cases of refusal-kind"),
            ],
        ),
        (
            "faults-py",
            "faults_py.wasm",
            &[("throw", "ValueError: faults-py raises on purpose"), ("bad-variant", "KeyError")],
        ),
    ];
    for (name, file, faults) in cases {
        let relay = relay_with(name, file, &[]).await;
        let mut c = relay.client().await;
        c.publish_ok(&sign(&k, 1, "print", &[], now())).await;
        let out = relay.wait_for_log(&format!("{name} says hello on stdout")).await;
        let err = relay.wait_for_log(&format!("{name} says hello on stderr")).await;
        assert!(out.contains(name) && err.contains(name), "tagged with the plugin's name:\n{out}\n{err}");

        for (fault, logged) in faults {
            let (ok, message) = c.publish(&sign(&k, 1, fault, &[], now())).await;
            assert_eq!(
                (ok, message.as_str()),
                (false, format!("error: plugin '{name}' failed (trapped); the event was not stored").as_str()),
                "{name} {fault}: the client gets no internals"
            );
            let line = relay.wait_for_log(logged).await;
            assert!(line.contains(name), "{name} {fault}: {line}");
        }
    }
}
