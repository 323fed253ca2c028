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
