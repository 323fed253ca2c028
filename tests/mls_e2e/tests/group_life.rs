//! End-to-end MLS group life through the relay with the MLS gateway loaded,
//! driven the way a client app does: mdk-core for MLS, nostr-sdk `Client`s
//! over WebSockets with automatic NIP-42 authentication.
//!
//! Alice creates a group with Bob from his fetched KeyPackage, Bob joins from
//! a gift-wrapped Welcome received live, both talk, Bob updates his keys,
//! Alice adds Carol, all three talk; KeyPackage consumption and gift-wrap
//! privacy are checked along the way, once with a hot swap of the gateway
//! in the middle, and once on two relay replicas sharing a Firestore database
//! (the emulator): Alice, Carol and the snoop on one, Bob and Eve on the other.

#[path = "../../harness/emulator.rs"]
mod emulator;
#[path = "../../harness/mod.rs"]
mod harness;
mod support;

use std::path::PathBuf;
use std::time::Duration;

use harness::{TestRelay, plugin_path};
use mdk_core::groups::NostrGroupConfigData;
use mdk_core::prelude::MessageProcessingResult;
use mdk_core::{GroupId, MDK};
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::*;
use support::gateway_config;

const WAIT: Duration = Duration::from_secs(15);

struct Peer {
    name: &'static str,
    keys: Keys,
    mdk: MDK<MdkMemoryStorage>,
    client: Client,
    notes: tokio::sync::broadcast::Receiver<RelayPoolNotification>,
}

impl Peer {
    async fn connect(name: &'static str, url: &str) -> Self {
        let keys = Keys::generate();
        let client = Client::builder().signer(keys.clone()).build();
        let notes = client.notifications();
        client.add_relay(url).await.expect("add relay");
        client.connect().await;
        client.wait_for_connection(WAIT).await;
        Self { name, keys, mdk: MDK::new(MdkMemoryStorage::default()), client, notes }
    }

    fn pk(&self) -> PublicKey {
        self.keys.public_key()
    }

    /// Publishes and asserts the relay said `OK true`, with its text otherwise.
    async fn publish(&self, event: &Event, what: &str) {
        let out = self.client.send_event(event).await.unwrap_or_else(|e| panic!("{}: sending {what}: {e}", self.name));
        assert!(
            out.failed.is_empty() && !out.success.is_empty(),
            "{}: relay refused {what}: {:?}",
            self.name,
            out.failed
        );
    }

    /// Subscribes and waits for EOSE, so what follows arrives live.
    async fn subscribe(&mut self, filter: Filter) -> SubscriptionId {
        let id = self.client.subscribe(filter, None).await.expect("subscribe").val;
        let sid = id.clone();
        self.wait(&format!("EOSE of {sid}"), move |n| match n {
            RelayPoolNotification::Message { message: RelayMessage::EndOfStoredEvents(s), .. } => **s == sid,
            _ => false,
        })
        .await;
        id
    }

    async fn wait(&mut self, what: &str, pred: impl Fn(&RelayPoolNotification) -> bool) -> RelayPoolNotification {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.notes.recv()).await {
                Ok(Ok(n)) if pred(&n) => return n,
                Ok(Ok(RelayPoolNotification::Message { message: RelayMessage::Closed { message, .. }, .. })) => {
                    // nostr-sdk authenticates and retries after auth-required; anything else is fatal.
                    assert!(message.starts_with("auth-required"), "{}: subscription closed: {message}", self.name);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: notifications: {e}", self.name),
                Err(_) => panic!("{}: timed out waiting for {what}", self.name),
            }
        }
    }

    /// The next live event with this id.
    async fn receive(&mut self, id: EventId) -> Event {
        match self
            .wait(&format!("event {id}"), |n| matches!(n, RelayPoolNotification::Event { event, .. } if event.id == id))
            .await
        {
            RelayPoolNotification::Event { event, .. } => *event,
            _ => unreachable!(),
        }
    }

    /// Publishes a KeyPackage as kind 30443 and its kind 443 twin.
    async fn publish_key_package(&self, url: &str) -> (Event, Event) {
        let data = self.mdk.create_key_package_for_event(&self.pk(), [RelayUrl::parse(url).unwrap()]).unwrap();
        let kp30443 = EventBuilder::new(Kind::Custom(30443), data.content.clone())
            .tags(data.tags_30443)
            .sign_with_keys(&self.keys)
            .unwrap();
        let kp443 =
            EventBuilder::new(Kind::Custom(443), data.content).tags(data.tags_443).sign_with_keys(&self.keys).unwrap();
        self.publish(&kp30443, "KeyPackage 30443").await;
        self.publish(&kp443, "KeyPackage 443").await;
        (kp30443, kp443)
    }

    /// Publishes a KeyPackage as a legacy kind 443 alone (no slot): the
    /// owner's legacy pool, which inviters consume one at a time.
    async fn publish_legacy_key_package(&self, url: &str) -> Event {
        let data = self.mdk.create_key_package_for_event(&self.pk(), [RelayUrl::parse(url).unwrap()]).unwrap();
        let kp443 =
            EventBuilder::new(Kind::Custom(443), data.content).tags(data.tags_443).sign_with_keys(&self.keys).unwrap();
        self.publish(&kp443, "KeyPackage 443").await;
        kp443
    }

    async fn fetch_key_package(&self, owner: PublicKey) -> Event {
        let filter = Filter::new().kinds([Kind::Custom(30443), Kind::Custom(443)]).author(owner);
        let events = self.client.fetch_events(filter, WAIT).await.expect("fetch KeyPackage");
        assert_eq!(events.len(), 1, "{}: one KeyPackage per author per request", self.name);
        events.into_iter().next().unwrap()
    }

    async fn send_welcome(&self, to: PublicKey, rumor: UnsignedEvent) -> Event {
        let wrap = EventBuilder::gift_wrap(&self.keys, &to, rumor, []).await.expect("gift wrap");
        self.publish(&wrap, "gift-wrapped Welcome").await;
        wrap
    }

    async fn join_from(&mut self, wrap_id: EventId) -> GroupId {
        let wrap = self.receive(wrap_id).await;
        let unwrapped = nip59::extract_rumor(&self.keys, &wrap).await.expect("unwrap Welcome");
        let welcome = self.mdk.process_welcome(&wrap.id, &unwrapped.rumor).expect("process Welcome");
        self.mdk.accept_welcome(&welcome).expect("accept Welcome");
        welcome.mls_group_id
    }

    async fn say(&self, group: &GroupId, text: &str) -> Event {
        let rumor = EventBuilder::new(Kind::TextNote, text).build(self.pk());
        let msg = self.mdk.create_message(group, rumor, None).expect("create message");
        self.publish(&msg, "group message").await;
        msg
    }

    async fn hear(&mut self, id: EventId, expected: &str) {
        let event = self.receive(id).await;
        match self.mdk.process_message(&event).unwrap_or_else(|e| panic!("{}: process message: {e}", self.name)) {
            MessageProcessingResult::ApplicationMessage(m) => assert_eq!(m.content, expected, "{}", self.name),
            other => panic!("{}: expected an application message, got {other:?}", self.name),
        }
    }

    async fn apply_commit(&mut self, id: EventId) {
        let event = self.receive(id).await;
        match self.mdk.process_message(&event).unwrap_or_else(|e| panic!("{}: process commit: {e}", self.name)) {
            MessageProcessingResult::Commit { .. } => {}
            other => panic!("{}: expected a commit, got {other:?}", self.name),
        }
    }
}

fn group_filter(mdk: &MDK<MdkMemoryStorage>, group: &GroupId) -> Filter {
    let g = mdk.get_group(group).unwrap().unwrap();
    Filter::new().kind(Kind::Custom(445)).custom_tag(SingleLetterTag::lowercase(Alphabet::H), hex(&g.nostr_group_id))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn inbox(pk: PublicKey) -> Filter {
    Filter::new().kind(Kind::GiftWrap).pubkey(pk)
}

/// Swaps the gateway's file for a different build of the same plugin.
fn swap_gateway(file: &PathBuf) {
    let mut bytes = std::fs::read(plugin_path("mls_gateway.wasm")).unwrap();
    // A trailing custom section changes the file, not the behaviour.
    let (name, payload) = (b"wasm-relay-test".as_slice(), b"swap".as_slice());
    bytes.extend_from_slice(&[0, (1 + name.len() + payload.len()) as u8, name.len() as u8]);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// How the relay is deployed for one run of the story.
enum Deployment {
    /// One relay.
    Single,
    /// One relay whose gateway is hot-swapped in the middle.
    SwapMidway,
    /// Two replicas on one Firestore database.
    Replicas,
}

async fn group_life(deployment: Deployment) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = dir.path().join("mls_gateway.wasm");
    std::fs::copy(plugin_path("mls_gateway.wasm"), &gateway).unwrap();
    let relays = match deployment {
        Deployment::Replicas => {
            let config = emulator::replica_config(&emulator::fresh_project())
                + &support::gateway_config_with(&gateway, support::REPLICA_GATEWAY_TIMEOUT, &[]);
            let env = [("FIRESTORE_EMULATOR_HOST", emulator::emulator_host())];
            vec![TestRelay::start_with(Some(&config), &env).await, TestRelay::start_with(Some(&config), &env).await]
        }
        _ => vec![TestRelay::start_with_config(&gateway_config(&gateway, &[])).await],
    };
    let relay = &relays[0];
    let url = relay.url.clone();
    let other_url = relays.last().unwrap().url.clone();
    let mut alice = Peer::connect("alice", &url).await;
    let mut bob = Peer::connect("bob", &other_url).await;
    let mut carol = Peer::connect("carol", &url).await;
    let mut eve = Peer::connect("eve", &other_url).await;
    // An unauthenticated eavesdropper on the raw protocol.
    let mut snoop = harness::Client::connect(&url).await;

    // 1. Bob publishes his KeyPackage as 30443 and its 443 twin.
    let (bob_kp, _) = bob.publish_key_package(&other_url).await;
    // 2. Bob listens to his inbox before anyone invites him; Eve tries to listen too.
    bob.subscribe(inbox(bob.pk())).await;
    eve.subscribe(inbox(bob.pk())).await;
    let refused =
        snoop.req_refused("snoop", vec![serde_json::json!({"kinds": [1059], "#p": [bob.pk().to_hex()]})]).await;
    assert!(refused.starts_with("auth-required:"), "{refused}");

    // 3. Alice fetches Bob's KeyPackage, creates the group, sends the Welcome.
    let fetched = alice.fetch_key_package(bob.pk()).await;
    assert_eq!(fetched.id, bob_kp.id, "the 30443 is preferred");
    let config = NostrGroupConfigData::new(
        "e2e".into(),
        "through wasm-relay".into(),
        None,
        None,
        None,
        vec![RelayUrl::parse(&url).unwrap()],
        vec![alice.pk()],
    );
    let created = alice.mdk.create_group(&alice.pk(), vec![fetched], config).expect("create group");
    let group = created.group.mls_group_id.clone();
    alice.mdk.merge_pending_commit(&group).expect("merge");
    let wrap = alice.send_welcome(bob.pk(), created.welcome_rumors.into_iter().next().expect("welcome")).await;
    let bob_group = bob.join_from(wrap.id).await;
    assert_eq!(bob_group, group);
    alice.subscribe(group_filter(&alice.mdk, &group)).await;
    bob.subscribe(group_filter(&bob.mdk, &group)).await;
    let m = alice.say(&group, "hi bob").await;
    bob.hear(m.id, "hi bob").await;
    let m = bob.say(&group, "hi alice").await;
    alice.hear(m.id, "hi alice").await;

    if let Deployment::SwapMidway = deployment {
        swap_gateway(&gateway);
        relay.wait_for_log("plugin swapped").await;
    }

    // 4. Bob rotates his keys; Alice processes the commit.
    let update = bob.mdk.self_update(&group).expect("self update");
    bob.publish(&update.evolution_event, "self-update commit").await;
    bob.mdk.merge_pending_commit(&group).expect("merge update");
    alice.apply_commit(update.evolution_event.id).await;
    let m = alice.say(&group, "new epoch").await;
    bob.hear(m.id, "new epoch").await;

    // 5. Alice adds Carol: commit first, acknowledged, then the Welcome.
    carol.publish_key_package(&url).await;
    carol.subscribe(inbox(carol.pk())).await;
    let carol_kp = alice.fetch_key_package(carol.pk()).await;
    let added = alice.mdk.add_members(&group, &[carol_kp]).expect("add Carol");
    alice.publish(&added.evolution_event, "add commit").await;
    alice.mdk.merge_pending_commit(&group).expect("merge add");
    bob.apply_commit(added.evolution_event.id).await;
    let welcome = added.welcome_rumors.expect("welcome for Carol").into_iter().next().unwrap();
    let wrap = alice.send_welcome(carol.pk(), welcome).await;
    assert_eq!(carol.join_from(wrap.id).await, group);
    carol.subscribe(group_filter(&carol.mdk, &group)).await;
    let m = carol.say(&group, "hello both").await;
    alice.hear(m.id, "hello both").await;
    bob.hear(m.id, "hello both").await;
    let m = bob.say(&group, "welcome carol").await;
    alice.hear(m.id, "welcome carol").await;
    carol.hear(m.id, "welcome carol").await;

    // 7. Eve (authenticated as herself) and the unauthenticated snoop never saw Bob's Welcome.
    let leaked = eve.wait_for_gift_wrap(Duration::from_millis(500)).await;
    assert!(leaked.is_none(), "Eve received a gift wrap addressed to Bob");
    for filter in [serde_json::json!({"ids": [wrap.id.to_hex()]}), serde_json::json!({"#p": [bob.pk().to_hex()]})] {
        assert!(snoop.req_ids("s", vec![filter]).await.is_empty());
    }
    let stored = eve.client.fetch_events(inbox(bob.pk()), WAIT).await.expect("fetch");
    assert!(stored.is_empty(), "Eve fetched Bob's gift wraps from storage");
}

impl Peer {
    async fn wait_for_gift_wrap(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.notes.recv()).await {
                Ok(Ok(RelayPoolNotification::Event { event, .. })) if event.kind == Kind::GiftWrap => {
                    return Some(*event);
                }
                Ok(Ok(_)) => {}
                _ => return None,
            }
        }
    }
}

#[tokio::test]
async fn a_group_forms_talks_updates_and_grows_through_the_relay() {
    group_life(Deployment::Single).await;
}

#[tokio::test]
async fn a_group_lives_across_two_replicas_sharing_firestore() {
    group_life(Deployment::Replicas).await;
}

#[tokio::test]
async fn the_group_keeps_working_across_a_gateway_hot_swap() {
    group_life(Deployment::SwapMidway).await;
}

#[tokio::test]
async fn concurrent_inviters_get_different_legacy_key_packages_then_the_last_resort() {
    let relay = support::gateway_relay(&[("requests_per_hour", "0")]).await;
    let url = relay.url.clone();
    let carol = Peer::connect("carol", &url).await;
    let a = carol.publish_legacy_key_package(&url).await;
    let b = carol.publish_legacy_key_package(&url).await;
    let alice = Peer::connect("alice", &url).await;
    let dave = Peer::connect("dave", &url).await;
    let (x, y) = tokio::join!(alice.fetch_key_package(carol.pk()), dave.fetch_key_package(carol.pk()));
    assert_ne!(x.id, y.id, "two inviters received the same KeyPackage");
    let mut got = [x.id, y.id];
    got.sort();
    let mut published = [a.id, b.id];
    published.sort();
    assert_eq!(got, published);
    // Only one is left: it keeps being served.
    let again = alice.fetch_key_package(carol.pk()).await;
    let once_more = dave.fetch_key_package(carol.pk()).await;
    assert_eq!(again.id, once_more.id);
    assert!(again.id == x.id || again.id == y.id);
    // Both KeyPackages are usable: each inviter can build a group from its own.
    for (who, kp) in [(&alice, x), (&dave, y)] {
        let config = NostrGroupConfigData::new(
            "g".into(),
            "".into(),
            None,
            None,
            None,
            vec![RelayUrl::parse(&url).unwrap()],
            vec![who.pk()],
        );
        who.mdk.create_group(&who.pk(), vec![kp], config).expect("group from the fetched KeyPackage");
    }
}
