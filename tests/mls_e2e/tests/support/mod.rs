//! MLS client helpers on mdk-core 0.8 (nostr 0.44): real KeyPackages, and a
//! relay started with the MLS gateway plugin.
#![allow(dead_code)]

use std::path::Path;

use mdk_core::MDK;
use mdk_memory_storage::MdkMemoryStorage;
use nostr::{Event, EventBuilder, JsonUtil, Keys, Kind, RelayUrl, Tag, Timestamp};

use crate::harness::{Client, TestRelay, plugin_path};

/// Settings for the gateway in `[plugins.settings]` form.
pub fn gateway_config(plugin_file: &Path, settings: &[(&str, &str)]) -> String {
    gateway_config_with(plugin_file, "", settings)
}

/// [`gateway_config`] with extra `[[plugins]]` keys (e.g. `call_timeout_ms = 1000`).
pub fn gateway_config_with(plugin_file: &Path, extra: &str, settings: &[(&str, &str)]) -> String {
    let settings: String = settings
        .iter()
        .map(|(k, v)| format!("{} = {}\n", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()))
        .collect();
    format!(
        "[[plugins]]\nname = \"mls-gateway\"\npath = {}\n{extra}\n[plugins.settings]\n{settings}",
        serde_json::to_string(&plugin_file.display().to_string()).unwrap()
    )
}

/// The gateway's per-call budget on replicas: its key-value calls go to
/// Firestore, and retries under contention take guest time too.
pub const REPLICA_GATEWAY_TIMEOUT: &str = "call_timeout_ms = 1000";

/// A relay with the MLS gateway built by `make plugins`.
pub async fn gateway_relay(settings: &[(&str, &str)]) -> TestRelay {
    TestRelay::start_with_config(&gateway_config(&plugin_path("mls_gateway.wasm"), settings)).await
}

/// An MLS client: a Nostr identity and its MDK state.
pub struct Member {
    pub keys: Keys,
    pub mdk: MDK<MdkMemoryStorage>,
}

impl Member {
    pub fn new() -> Self {
        Self { keys: Keys::generate(), mdk: MDK::new(MdkMemoryStorage::default()) }
    }

    pub fn pubkey(&self) -> String {
        self.keys.public_key().to_hex()
    }

    /// A fresh KeyPackage as mdk publishes it: kind 30443 and its kind 443 twin.
    pub fn key_package_pair(&self, relay: &str) -> (Event, Event) {
        key_package_pair(&self.mdk, &self.keys, relay)
    }

    /// [`Self::key_package_pair`] created at `created_at`, its 30443 in slot
    /// `d` when given.
    pub fn key_package_pair_at(&self, relay: &str, created_at: u64, d: Option<&str>) -> (Event, Event) {
        let data = self
            .mdk
            .create_key_package_for_event(&self.keys.public_key(), [RelayUrl::parse(relay).unwrap()])
            .expect("mdk key package");
        let tags = |tags: Vec<Tag>| -> Vec<Vec<String>> {
            tags.into_iter()
                .map(|t| t.to_vec())
                .map(|mut t| {
                    if let (Some(d), "d") = (d, t[0].as_str()) {
                        t[1] = d.to_owned();
                    }
                    t
                })
                .collect()
        };
        (
            self.sign_raw(30443, &data.content, tags(data.tags_30443), Some(created_at)),
            self.sign_raw(443, &data.content, tags(data.tags_443), Some(created_at)),
        )
    }

    /// A kind 30443 KeyPackage alone.
    pub fn key_package(&self, relay: &str) -> Event {
        self.key_package_pair(relay).0
    }

    /// A KeyPackage in another shape: `kind`, content re-encoded as hex when
    /// `hex`, tags transformed by `edit`, created at `created_at`.
    pub fn key_package_shaped(
        &self,
        relay: &str,
        kind: u16,
        hex: bool,
        created_at: Option<u64>,
        edit: impl Fn(Vec<Vec<String>>) -> Vec<Vec<String>>,
    ) -> Event {
        use base64::Engine;
        let data = self
            .mdk
            .create_key_package_for_event(&self.keys.public_key(), [RelayUrl::parse(relay).unwrap()])
            .expect("mdk key package");
        let source = if kind == 30443 { data.tags_30443 } else { data.tags_443 };
        let mut tags: Vec<Vec<String>> = source.into_iter().map(|t| t.to_vec()).collect();
        let mut content = data.content;
        if hex {
            let bytes = base64::engine::general_purpose::STANDARD.decode(&content).unwrap();
            content = hex_encode(&bytes);
            tags.retain(|t| t[0] != "encoding");
        }
        tags = edit(tags);
        self.sign_raw(kind, &content, tags, created_at)
    }

    /// Signs any event as this member.
    pub fn sign_raw(&self, kind: u16, content: &str, tags: Vec<Vec<String>>, created_at: Option<u64>) -> Event {
        let mut b =
            EventBuilder::new(Kind::Custom(kind), content).tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()));
        if let Some(t) = created_at {
            b = b.custom_created_at(Timestamp::from(t));
        }
        b.sign_with_keys(&self.keys).unwrap()
    }
}

/// A fresh KeyPackage from `mdk` for `keys`: kind 30443 and its kind 443 twin.
pub fn key_package_pair(mdk: &MDK<MdkMemoryStorage>, keys: &Keys, relay: &str) -> (Event, Event) {
    let data = mdk
        .create_key_package_for_event(&keys.public_key(), [RelayUrl::parse(relay).unwrap()])
        .expect("mdk key package");
    let addressable = EventBuilder::new(Kind::Custom(30443), data.content.clone())
        .tags(data.tags_30443)
        .sign_with_keys(keys)
        .unwrap();
    let legacy = EventBuilder::new(Kind::Custom(443), data.content).tags(data.tags_443).sign_with_keys(keys).unwrap();
    (addressable, legacy)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now() -> u64 {
    Timestamp::now().as_secs()
}

/// Publishing nostr 0.44 events through the harness client.
pub async fn publish(c: &mut Client, e: &Event) -> (bool, String) {
    c.publish_raw(&e.as_json(), &e.id.to_hex()).await
}

pub async fn publish_ok(c: &mut Client, e: &Event) {
    c.publish_raw_ok(&e.as_json(), &e.id.to_hex()).await
}

/// Fetches `owner`'s KeyPackages the way clients do.
pub async fn fetch_key_packages(c: &mut Client, sub: &str, owners: &[&str]) -> Vec<String> {
    c.req_ids(sub, vec![serde_json::json!({"kinds": [30443, 443], "authors": owners})]).await
}

/// Authenticates `c` with NIP-42 as `member`.
pub async fn nostr_auth(c: &mut Client, member: &Member, relay: &str) {
    let tags = vec![vec!["challenge".to_string(), c.challenge.clone()], vec!["relay".to_string(), relay.to_string()]];
    let auth = member.sign_raw(22242, "", tags, None);
    c.send_raw(&format!("[\"AUTH\",{}]", auth.as_json())).await;
    let (ok, msg) = c.expect_ok(&auth.id.to_hex()).await;
    assert!(ok, "AUTH refused: {msg}");
}
