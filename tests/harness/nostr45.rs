//! Event helpers for the relay's own tests, on the relay's nostr version.
#![allow(dead_code)]

use nostr::event::{Event, EventBuilder, FinalizeEvent, Kind, Tag};
use nostr::key::Keys;
use nostr::types::Timestamp;

use crate::harness::Client;

/// Publishing signed events.
pub trait Publish {
    /// Publishes `event` and returns the `OK` (accepted, message).
    async fn publish(&mut self, event: &Event) -> (bool, String);
    /// Publishes and asserts `OK true`.
    async fn publish_ok(&mut self, event: &Event);
}

impl Publish for Client {
    async fn publish(&mut self, event: &Event) -> (bool, String) {
        self.publish_raw(&event.as_json(), &event.id.to_hex()).await
    }

    async fn publish_ok(&mut self, event: &Event) {
        self.publish_raw_ok(&event.as_json(), &event.id.to_hex()).await
    }
}

pub fn now() -> u64 {
    Timestamp::now().as_secs()
}

/// A signed event.
pub fn sign(keys: &Keys, kind: u16, content: &str, tags: &[&[&str]], created_at: u64) -> Event {
    EventBuilder::new(Kind::from(kind), content)
        .tags(tags.iter().map(|t| Tag::parse(t.iter().copied()).expect("tag")))
        .custom_created_at(Timestamp::from(created_at))
        .finalize(keys)
        .expect("sign")
}

/// A signed kind-1 note created `age` seconds ago.
pub fn note(keys: &Keys, content: &str, age: u64) -> Event {
    sign(keys, 1, content, &[], now() - age)
}

pub fn ids(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.id.to_hex()).collect()
}

/// A NIP-42 AUTH event answering `challenge` for the relay at `url`.
pub fn auth_event(keys: &Keys, challenge: &str, url: &str, created_at: u64) -> Event {
    sign(keys, 22242, "", &[&["challenge", challenge], &["relay", url]], created_at)
}

/// Authenticates `client` as `keys` and asserts `OK true`.
pub async fn authenticate(client: &mut Client, keys: &Keys, url: &str) {
    let event = auth_event(keys, &client.challenge.clone(), url, now());
    let (ok, msg) = send_auth(client, &event).await;
    assert!(ok, "AUTH refused: {msg}");
}

/// Sends an AUTH message and returns the `OK`.
pub async fn send_auth(client: &mut Client, event: &Event) -> (bool, String) {
    client.send_raw(&format!("[\"AUTH\",{}]", event.as_json())).await;
    client.expect_ok(&event.id.to_hex()).await
}

/// A gift wrap (kind 1059) for `recipient`, signed by a throwaway key, with a
/// created_at `age` seconds in the past as NIP-59 randomises it.
pub fn gift_wrap(recipient: &Keys, age: u64) -> Event {
    let pk = recipient.public_key().to_hex();
    sign(&Keys::generate(), 1059, "sealed and wrapped", &[&["p", &pk]], now() - age)
}

/// A NIP-98 `Authorization` header value for a POST of `body` to `url`.
pub fn nip98_header(keys: &Keys, url: &str, body: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let payload = hex::encode(sha2::Sha256::digest(body));
    let event = sign(keys, 27235, "", &[&["u", url], &["method", "POST"], &["payload", &payload]], now());
    format!("Nostr {}", base64::engine::general_purpose::STANDARD.encode(event.as_json()))
}
