//! The operator's lists (bans, allow lists, blocked addresses, kinds) as
//! stored: their key scheme and loading and saving them through any
//! metadata store. The management API changes them, the relay loads them at
//! start and when another replica changed them, and [`crate::policy`]
//! applies them.
//!
//! Keys live in the metadata namespace [`NAMESPACE`] as `<list>/<item>`
//! (`ban-pubkey/<hex>`, `allow-pubkey/<hex>`, `ban-event/<id>`,
//! `allow-kind/<n>`, `disallow-kind/<n>`, `block-ip/<addr>`), valued with
//! the operator's reason. Every change also rewrites [`VERSION_KEY`], so a
//! replica learns of another's change by watching that one key instead of
//! re-reading the lists.

use crate::metadata::{KvError, MetadataStore, Write};
use crate::policy::OperatorLists;

/// The metadata namespace of the operator's lists.
pub const NAMESPACE: &str = "relay:admin";

/// The key rewritten (with a random value) by every change to the lists.
pub const VERSION_KEY: &str = "version";

/// Writes list entries (`None` deletes) and a new version in one transaction.
pub async fn save(metadata: &dyn MetadataStore, entries: &[(String, Option<String>)]) -> Result<(), KvError> {
    let version = Write { key: VERSION_KEY.into(), value: Some(hex::encode(rand::random::<[u8; 16]>()).into_bytes()) };
    let writes = entries
        .iter()
        .map(|(key, value)| Write { key: key.clone(), value: value.clone().map(String::into_bytes) })
        .chain(std::iter::once(version))
        .collect();
    metadata.transact(NAMESPACE, vec![], writes).await.map(|_| ())
}

/// Whether `new` lets through something `old` kept out: a ban or a
/// disallowed kind lifted, or an allow list widened or emptied.
pub fn loosened(old: &OperatorLists, new: &OperatorLists) -> bool {
    let removed = |o: &std::collections::BTreeMap<String, String>, n: &std::collections::BTreeMap<String, String>| {
        o.keys().any(|k| !n.contains_key(k))
    };
    let widened_keys = !old.allowed_pubkeys.is_empty()
        && (new.allowed_pubkeys.is_empty() || new.allowed_pubkeys.keys().any(|k| !old.allowed_pubkeys.contains_key(k)));
    let widened_kinds = !old.allowed_kinds.is_empty()
        && (new.allowed_kinds.is_empty() || new.allowed_kinds.iter().any(|k| !old.allowed_kinds.contains(k)));
    removed(&old.banned_pubkeys, &new.banned_pubkeys)
        || removed(&old.banned_events, &new.banned_events)
        || old.disallowed_kinds.iter().any(|k| !new.disallowed_kinds.contains(k))
        || widened_keys
        || widened_kinds
}

/// The operator's lists as last saved.
pub async fn load(metadata: &dyn MetadataStore) -> Result<OperatorLists, KvError> {
    let mut lists = OperatorLists::default();
    let mut after: Option<String> = None;
    loop {
        let page = metadata.scan_prefix(NAMESPACE, "", after.as_deref(), 1000).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, value) in page {
            let reason = String::from_utf8_lossy(&value).into_owned();
            let Some((list, item)) = key.split_once('/') else { continue };
            let item = item.to_owned();
            let known = match list {
                "ban-pubkey" => {
                    lists.banned_pubkeys.insert(item, reason);
                    true
                }
                "allow-pubkey" => {
                    lists.allowed_pubkeys.insert(item, reason);
                    true
                }
                "ban-event" => {
                    lists.banned_events.insert(item, reason);
                    true
                }
                "allow-kind" => item.parse().map(|k| lists.allowed_kinds.insert(k)).is_ok(),
                "disallow-kind" => item.parse().map(|k| lists.disallowed_kinds.insert(k)).is_ok(),
                "block-ip" => item.parse().map(|ip| lists.blocked_ips.insert(ip, reason)).is_ok(),
                _ => false,
            };
            if !known {
                tracing::warn!(%key, "unreadable entry in the operator's lists; ignored");
            }
        }
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[tokio::test]
    async fn lists_round_trip_through_the_metadata_store() {
        let store = crate::metadata::SledMetadataStore::temporary().unwrap();
        let writes = ["ban-pubkey/aa", "allow-kind/1", "disallow-kind/4", "block-ip/10.0.0.1", "ban-event/bb"]
            .iter()
            .map(|k| crate::metadata::Write { key: k.to_string(), value: Some(b"why".to_vec()) })
            .collect();
        store.transact(NAMESPACE, vec![], writes).await.unwrap();
        let lists = load(&store).await.unwrap();
        assert_eq!(lists.banned_pubkeys.get("aa").map(String::as_str), Some("why"));
        assert!(lists.allowed_kinds.contains(&1) && lists.disallowed_kinds.contains(&4));
        assert!(lists.blocked_ips.contains_key(&"10.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(lists.banned_events.contains_key("bb"));
    }
}
