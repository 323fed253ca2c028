//! The operator's tools on a serving relay, through its operator socket:
//! `wasm-relay sync URL` between two relays of this project (NIP-77, this
//! relay as the negentropy client), and backups: an export taken during a
//! steady write load, restored into a fresh running relay through its
//! write path.

mod harness;
#[path = "harness/nostr45.rs"]
mod nostr45;

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::{Arc, Mutex};

use harness::{TestRelay, relay_binary};
use nostr::event::Event;
use nostr::key::Keys;
use nostr45::{Publish, note, now, sign};
use serde_json::json;

/// Rate limits off: these tests publish thousands of events from one address.
const UNLIMITED: &str = "[rate_limits]\nevents_per_minute_per_ip = 0\nevents_per_minute_per_pubkey = 0\n\
                         reqs_per_minute_per_ip = 0\nreqs_per_minute_per_pubkey = 0\n";

async fn cli(args: Vec<String>) -> Output {
    tokio::process::Command::new(relay_binary())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env("WASM_RELAY_LOG", "warn")
        .output()
        .await
        .expect("run wasm-relay")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Publishes `events` over one connection, 100 in flight.
async fn seed(relay: &TestRelay, events: &[Event]) {
    let all: Vec<(String, String)> = events.iter().map(|e| (e.as_json(), e.id.to_hex())).collect();
    relay.client().await.publish_many_ok(&all).await;
}

/// The ids a relay serves for `filter`.
async fn served(relay: &TestRelay, filter: serde_json::Value) -> BTreeSet<String> {
    let mut c = relay.client().await;
    c.req_ids("ids", vec![filter]).await.into_iter().collect()
}

fn ids(events: &[Event]) -> BTreeSet<String> {
    events.iter().map(|e| e.id.to_hex()).collect()
}

fn notes(keys: &Keys, n: usize, tag: &str, age: u64) -> Vec<Event> {
    (0..n).map(|i| note(keys, &format!("{tag} {i}"), age + i as u64)).collect()
}

#[tokio::test]
async fn sync_moves_the_difference_between_two_relays_through_the_write_path() {
    let (alice, mallory) = (Keys::generate(), Keys::generate());
    // This relay refuses Mallory; the other accepts anyone.
    let here = TestRelay::start_with_config(&format!(
        "{UNLIMITED}[access]\nwrite_deny_pubkeys = [\"{}\"]\n",
        mallory.public_key().to_hex()
    ))
    .await;
    let there = TestRelay::start_with_config(UNLIMITED).await;
    let shared = notes(&alice, 30, "shared", 100);
    let only_here = notes(&alice, 10, "here", 200);
    let only_there = notes(&alice, 20, "there", 300);
    let mallorys_note = note(&mallory, "spam", 50);
    let profile = sign(&alice, 0, "{}", &[], now() - 10);
    seed(&here, &[shared.clone(), only_here.clone()].concat()).await;
    seed(&there, &[shared.clone(), only_there.clone(), vec![mallorys_note.clone(), profile.clone()]].concat()).await;
    // A subscriber here sees fetched events arrive live, as any write.
    let mut watcher = here.client().await;
    watcher.req("live", vec![json!({"kinds": [1], "limit": 0})]).await;

    let data = here.data_dir().to_str().unwrap().to_owned();
    let out =
        cli(args(&["sync", &there.url, "--dir", "both", "--filter", r#"{"kinds":[1]}"#, "--data-dir", &data])).await;
    let summary = stderr(&out);
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("21 only there, 10 only here"), "{summary}");
    assert!(summary.contains("stored 20, already present 0, refused 1 {\"blocked\": 1})"), "{summary}");
    assert!(summary.contains("sent 10 (accepted 10, refused 0)"), "{summary}");
    let live = watcher.next_event("live").await;
    assert!(ids(&only_there).contains(live["id"].as_str().unwrap()), "{live}");

    let all_notes = ids(&[shared.clone(), only_here.clone(), only_there.clone()].concat());
    assert_eq!(served(&here, json!({"kinds": [1], "limit": 5000})).await, all_notes);
    let mut there_notes = all_notes.clone();
    there_notes.insert(mallorys_note.id.to_hex());
    assert_eq!(served(&there, json!({"kinds": [1], "limit": 5000})).await, there_notes);
    // The filter held: the profile stayed where it was.
    assert!(served(&here, json!({"kinds": [0]})).await.is_empty());

    // Again: nothing left to move but what this relay refuses.
    let out = cli(args(&["sync", &there.url, "--filter", r#"{"kinds":[1]}"#, "--data-dir", &data])).await;
    assert!(stderr(&out).contains("1 only there, 0 only here"), "{}", stderr(&out));

    // With no relay serving the data directory, the CLI syncs in its own
    // process, through the same write path.
    let mut here = here;
    here.stop().await;
    let out = cli(args(&["sync", &there.url, "--filter", r#"{"kinds":[0]}"#, "--data-dir", &data])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("stored 1,"), "{}", stderr(&out));
}

#[tokio::test]
async fn sync_reports_a_peer_that_refuses() {
    let here = TestRelay::start().await;
    let there = TestRelay::start_with_config("[negentropy]\nenabled = false\n").await;
    let data = here.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["sync", &there.url, "--data-dir", &data])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("blocked: this relay does not offer NIP-77"), "{}", stderr(&out));
    let out = cli(args(&["sync", "ws://127.0.0.1:1", "--data-dir", &data])).await;
    assert!(!out.status.success() && stderr(&out).contains("connecting to ws://127.0.0.1:1"), "{}", stderr(&out));
    let out = cli(args(&["sync", &there.url, "--filter", "{\"search\":\"x\"}", "--data-dir", &data])).await;
    assert!(!out.status.success() && stderr(&out).contains("search"), "{}", stderr(&out));
}

/// What a steady writer did, by the time it was asked.
#[derive(Default)]
struct Written {
    acknowledged: Vec<String>,
    deleted: Vec<String>,
}

#[tokio::test]
async fn an_export_during_a_write_load_restores_every_acknowledged_event_and_no_deleted_one() {
    let relay = TestRelay::start_with_config(UNLIMITED).await;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let before = notes(&alice, 3000, "before", 1000);
    seed(&relay, &before).await;
    // Some are deleted before the export begins.
    let mut c = relay.client().await;
    let mut deleted_before = BTreeSet::new();
    for e in before.iter().step_by(100) {
        c.publish_ok(&sign(&alice, 5, "", &[&["e", &e.id.to_hex()]], now())).await;
        deleted_before.insert(e.id.to_hex());
    }

    // A steady writer: new notes, and deletions of older ones, until told to stop.
    let written = Arc::new(Mutex::new(Written::default()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let (written, mut c, alice, bob) = (written.clone(), relay.client().await, alice.clone(), bob.clone());
        let targets: Vec<String> = before.iter().skip(50).step_by(100).map(|e| e.id.to_hex()).collect();
        tokio::spawn(async move {
            let mut i = 0usize;
            // Bob writes (at most 4000, one REQ page); Alice deletes.
            while !*stop_rx.borrow_and_update() && i < 4000 {
                let e = note(&bob, &format!("during {i}"), 0);
                c.publish_ok(&e).await;
                written.lock().unwrap().acknowledged.push(e.id.to_hex());
                if let Some(target) = targets.get(i / 5).filter(|_| i.is_multiple_of(5)) {
                    c.publish_ok(&sign(&alice, 5, "", &[&["e", target]], now())).await;
                    written.lock().unwrap().deleted.push(target.clone());
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (acknowledged_before_export, deleted_before_export) = {
        let w = written.lock().unwrap();
        let mut acked: BTreeSet<String> = ids(&before);
        acked.extend(w.acknowledged.iter().cloned());
        let mut deleted = deleted_before.clone();
        deleted.extend(w.deleted.iter().cloned());
        (acked, deleted)
    };
    let dump = relay.temp_dir().join("backup.jsonl");
    let data = relay.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["export", "--data-dir", &data, "--output", dump.to_str().unwrap()])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Deleted by the time the export ended: such events may be in the
    // restore or not (their tombstone may have been read); they are not
    // asked for below.
    let (during, deleted_by_the_end) = {
        let w = written.lock().unwrap();
        let mut deleted = deleted_before_export.clone();
        deleted.extend(w.deleted.iter().cloned());
        (w.acknowledged.len(), deleted)
    };
    stop_tx.send(true).unwrap();
    writer.await.unwrap();
    let after = written.lock().unwrap().acknowledged.len();
    assert!(after > during && during > 0, "the writer kept writing through the export ({during}, then {after})");

    // Restore into a fresh relay, running, through its write path.
    let fresh = TestRelay::start_with_config(UNLIMITED).await;
    let fresh_data = fresh.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["import", "--data-dir", &fresh_data, dump.to_str().unwrap()])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("into the relay serving"), "{}", stderr(&out));
    let mut restored = BTreeSet::new();
    for author in [&alice, &bob] {
        let filter = json!({"kinds": [1], "authors": [author.public_key().to_hex()], "limit": 5000});
        restored.extend(served(&fresh, filter).await);
    }
    let missing: Vec<&String> =
        acknowledged_before_export.difference(&deleted_by_the_end).filter(|id| !restored.contains(*id)).collect();
    assert!(missing.is_empty(), "{} acknowledged events are missing from the restore", missing.len());
    let resurrected: Vec<&String> = deleted_before_export.iter().filter(|id| restored.contains(*id)).collect();
    assert!(resurrected.is_empty(), "{} deleted events came back", resurrected.len());
    // A deletion is kept, not just its effect: the deleted notes are refused again.
    let mut c = fresh.client().await;
    let (ok, why) = c.publish(&before[0]).await;
    assert!(!ok && why.starts_with("blocked:"), "{why}");
}

#[tokio::test]
async fn the_operator_socket_is_the_owners_alone_and_answers_management_methods() {
    use std::os::unix::fs::PermissionsExt;
    let relay = TestRelay::start().await;
    let socket = relay.data_dir().join("admin.sock");
    let mode = std::fs::metadata(&socket).expect("the socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the relay's user may open it");
    let data = relay.data_dir().to_str().unwrap().to_owned();
    let spammer = Keys::generate();
    let spammer_hex = spammer.public_key().to_hex();
    let params = json!([spammer_hex, "spam"]).to_string();
    let out = cli(args(&["admin", "banpubkey", &params, "--data-dir", &data])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(args(&["admin", "listbannedpubkeys", "--data-dir", &data])).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains(&spammer_hex), "{}", stderr(&out));
    let mut c = relay.client().await;
    let (ok, why) = c.publish(&note(&spammer, "hi", 0)).await;
    assert!(!ok && why.starts_with("blocked:"), "{why}");
    let out = cli(args(&["admin", "nosuchmethod", "--data-dir", &data])).await;
    assert!(!out.status.success() && stderr(&out).contains("nosuchmethod"), "{}", stderr(&out));
    // Without a serving relay there is no socket to ask. (After a crash the
    // file stays, answers nothing, and the CLI works offline: the sync test
    // above runs on a killed relay's data directory.)
    let mut relay = relay;
    relay.terminate().await;
    assert!(!socket.exists(), "the socket file goes with the relay");
    let out = cli(args(&["admin", "supportedmethods", "--data-dir", &data])).await;
    assert!(!out.status.success() && stderr(&out).contains("no relay is serving"), "{}", stderr(&out));
}

#[tokio::test]
async fn sync_up_waits_out_the_other_relays_rate_limit_instead_of_losing_events() {
    let here = TestRelay::start_with_config(UNLIMITED).await;
    // The other relay takes 600 events a minute from one address (a burst of 600, then 10 a second).
    let there = TestRelay::start_with_config(
        "[rate_limits]\nevents_per_minute_per_ip = 600\nevents_per_minute_per_pubkey = 0\n",
    )
    .await;
    let alice = Keys::generate();
    let mine = notes(&alice, 610, "mine", 100);
    seed(&here, &mine).await;
    let data = here.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["sync", &there.url, "--dir", "up", "--data-dir", &data])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("sent 610 (accepted 610, refused 0)"), "{}", stderr(&out));
    assert_eq!(served(&there, json!({"limit": 5000})).await, ids(&mine));
}

#[tokio::test]
async fn sync_authenticates_with_the_relays_own_key_and_receives_what_is_addressed_to_it() {
    let relay_keys = Keys::generate();
    let keyed = TestRelay::start_with_config(&format!(
        "{UNLIMITED}[info]\nsecret_key = \"{}\"\n",
        relay_keys.secret_key().to_secret_hex()
    ))
    .await;
    let keyless = TestRelay::start_with_config(UNLIMITED).await;
    // The other relay serves gift wraps only to their authenticated recipient.
    let there = TestRelay::start_with_config(UNLIMITED).await;
    let wrap = nostr45::gift_wrap(&relay_keys, 60);
    let public = note(&Keys::generate(), "public", 30);
    seed(&there, &[wrap.clone(), public.clone()]).await;

    let data = keyed.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["sync", &there.url, "--data-dir", &data])).await;
    let summary = stderr(&out);
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains(&format!("authenticated as {}", relay_keys.public_key().to_hex())), "{summary}");
    assert!(summary.contains("stored 2,"), "the gift wrap to the relay's key came too: {summary}");

    let data = keyless.data_dir().to_str().unwrap().to_owned();
    let out = cli(args(&["sync", &there.url, "--data-dir", &data])).await;
    let summary = stderr(&out);
    assert!(out.status.success(), "{summary}");
    assert!(!summary.contains("authenticated") && summary.contains("stored 1,"), "{summary}");
}
