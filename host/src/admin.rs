//! The NIP-86 relay management API: JSON-RPC over HTTP POST to the relay's
//! URL, authorized with NIP-98 by one of `admin.pubkeys`.
//!
//! Standard methods change the operator's lists in [`crate::policy`]
//! (persisted in the metadata store, namespace `relay:admin`, so they survive
//! restarts); extra methods manage plugins (`listplugins`, `reloadplugin`,
//! `swapplugin`, `disableplugin`, `enableplugin`, and `releasemanagedkinds` /
//! `claimmanagedkinds`, the rollback switch for a plugin's managed kinds).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use nostr::event::Event;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::metadata::MetadataStore;
use crate::policy::OperatorLists;
use crate::relay::Relay;

/// The metadata namespace of the operator's lists. Plugin names cannot
/// contain `:`, so no plugin can read or write it.
pub const NAMESPACE: &str = "relay:admin";
/// NIP-98 HTTP auth event kind.
const HTTP_AUTH_KIND: u16 = 27235;
/// How far a NIP-98 event's `created_at` may be from now.
const AUTH_WINDOW_SECONDS: u64 = 60;
/// Content type of NIP-86 requests and replies.
pub const CONTENT_TYPE: &str = "application/nostr+json+rpc";

/// Methods this relay answers, as `supportedmethods` lists them.
const METHODS: &[&str] = &[
    "supportedmethods",
    "banpubkey",
    "allowpubkey",
    "listbannedpubkeys",
    "listallowedpubkeys",
    "banevent",
    "allowevent",
    "listbannedevents",
    "allowkind",
    "disallowkind",
    "listallowedkinds",
    "listdisallowedkinds",
    "blockip",
    "unblockip",
    "listblockedips",
    "listplugins",
    "reloadplugin",
    "swapplugin",
    "disableplugin",
    "enableplugin",
    "releasemanagedkinds",
    "claimmanagedkinds",
];

/// Why a request is not authorized; the HTTP status is 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the management API is off: no admin.pubkeys are configured")]
    Disabled,
    #[error("missing `Authorization: Nostr <base64 event>` header (NIP-98)")]
    Missing,
    #[error("the Authorization event is unreadable: {0}")]
    Unreadable(String),
    #[error("the Authorization event is not valid: {0}")]
    Invalid(&'static str),
    #[error("{0} is not an admin of this relay")]
    NotAdmin(String),
}

/// A NIP-98 header that proved an admin, before the body is read.
pub struct AdminAuth {
    pub pubkey: String,
    event_id: [u8; 32],
    created_at: u64,
    /// The `payload` tag: the SHA-256 of the body this event authorizes.
    payload: Option<String>,
}

/// Checks a NIP-98 `Authorization` header for a POST to this relay: every
/// check that does not need the body, so nobody but an admin makes the relay
/// read a body at all. A replayed event is refused.
pub fn authorize_header(relay: &Relay, header: Option<&str>, now: u64) -> Result<AdminAuth, AuthError> {
    if relay.config.admin.pubkeys.is_empty() {
        return Err(AuthError::Disabled);
    }
    let token = header.and_then(|h| h.strip_prefix("Nostr ")).ok_or(AuthError::Missing)?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|e| AuthError::Unreadable(e.to_string()))?;
    let event: Event = serde_json::from_slice(&json).map_err(|e| AuthError::Unreadable(e.to_string()))?;
    if event.kind.as_u16() != HTTP_AUTH_KIND {
        return Err(AuthError::Invalid("its kind must be 27235"));
    }
    if event.created_at.as_secs().abs_diff(now) > AUTH_WINDOW_SECONDS {
        return Err(AuthError::Invalid("created_at must be within 60 seconds of now"));
    }
    let pubkey = event.pubkey.to_hex();
    if !relay.config.admin.pubkeys.iter().any(|k| k.eq_ignore_ascii_case(&pubkey)) {
        return Err(AuthError::NotAdmin(pubkey));
    }
    if !event.verify_id() || !event.verify_signature() {
        return Err(AuthError::Invalid("bad id or signature"));
    }
    let tag = |name: &str| {
        event.tags.iter().map(|t| t.as_slice()).find(|t| t.len() >= 2 && t[0] == name).map(|t| t[1].clone())
    };
    let ours = http_url(&relay.config.server.public_url);
    if tag("u").map(|u| http_url(&u)) != Some(ours) {
        return Err(AuthError::Invalid("its `u` tag must be this relay's URL"));
    }
    if !tag("method").is_some_and(|m| m.eq_ignore_ascii_case("POST")) {
        return Err(AuthError::Invalid("its `method` tag must be POST"));
    }
    let event_id = event.id.to_bytes();
    if relay.admin_replays.seen(&event_id, now) {
        return Err(AuthError::Invalid("this Authorization event was already used; sign a new one per request"));
    }
    Ok(AdminAuth { pubkey, event_id, created_at: event.created_at.as_secs(), payload: tag("payload") })
}

/// Checks that the authorized event covers `body`, then spends the event so
/// it cannot authorize another request.
pub fn authorize_body(relay: &Relay, auth: &AdminAuth, body: &[u8]) -> Result<(), AuthError> {
    if auth.payload.as_ref().map(|p| p.to_ascii_lowercase()) != Some(hex::encode(Sha256::digest(body))) {
        return Err(AuthError::Invalid("its `payload` tag must be the SHA-256 of the request body"));
    }
    if !relay.admin_replays.spend(auth.event_id, auth.created_at + AUTH_WINDOW_SECONDS) {
        return Err(AuthError::Invalid("this Authorization event was already used; sign a new one per request"));
    }
    Ok(())
}

/// NIP-98 events already used, remembered until they would be refused as
/// too old anyway.
#[derive(Default)]
pub struct SpentAuthEvents {
    /// Event id to the unix time after which it no longer needs remembering.
    spent: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
}

impl SpentAuthEvents {
    /// Most events remembered at once; past that, requests are refused until
    /// old ones expire (admins send a handful a minute).
    const CAPACITY: usize = 10_000;

    fn seen(&self, id: &[u8; 32], now: u64) -> bool {
        let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        spent.get(id).is_some_and(|until| *until >= now)
    }

    /// Records `id` as used until `until`; false if it already was (or the
    /// record is full).
    fn spend(&self, id: [u8; 32], until: u64) -> bool {
        let now = crate::event::unix_now();
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        if spent.len() >= Self::CAPACITY {
            spent.retain(|_, u| *u >= now);
        }
        if spent.len() >= Self::CAPACITY {
            return false;
        }
        spent.insert(id, until).is_none()
    }
}

/// A relay URL compared loosely: `ws`/`http` and `wss`/`https` alike, case
/// and trailing slash ignored.
fn http_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/').to_ascii_lowercase();
    if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        url
    }
}

/// Runs one JSON-RPC request; the reply is `{"result": ...}` or `{"error": ...}`.
pub async fn handle(relay: &Arc<Relay>, admin: &str, body: &[u8]) -> Value {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return json!({ "error": format!("the body is not JSON: {e}") }),
    };
    let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_owned();
    let params = request.get("params").and_then(Value::as_array).cloned().unwrap_or_default();
    match call(relay, &method, &params).await {
        Ok(result) => {
            if !method.starts_with("list") && method != "supportedmethods" {
                tracing::info!(%admin, %method, params = %summary(&params), "management API call");
            }
            json!({ "result": result })
        }
        Err(e) => json!({ "error": e }),
    }
}

/// Parameters as logged: plugin bytes are not worth a log line.
fn summary(params: &[Value]) -> String {
    let shown: Vec<String> = params
        .iter()
        .map(|p| match p.as_str() {
            Some(s) if s.len() > 100 => format!("<{} bytes>", s.len()),
            _ => p.to_string(),
        })
        .collect();
    shown.join(", ")
}

fn string_param(params: &[Value], i: usize, what: &str) -> Result<String, String> {
    params
        .get(i)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("parameter {} must be {what}", i + 1))
}

fn hex64_param(params: &[Value], i: usize, what: &str) -> Result<String, String> {
    let v = string_param(params, i, what)?.to_ascii_lowercase();
    if v.len() != 64 || hex::decode(&v).is_err() {
        return Err(format!("parameter {} must be {what} (64 hex characters)", i + 1));
    }
    Ok(v)
}

fn reason(params: &[Value], i: usize) -> String {
    params.get(i).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn kind_param(params: &[Value]) -> Result<u16, String> {
    params
        .first()
        .and_then(Value::as_u64)
        .and_then(|k| u16::try_from(k).ok())
        .ok_or_else(|| "parameter 1 must be an event kind (0-65535)".into())
}

fn ip_param(params: &[Value]) -> Result<IpAddr, String> {
    string_param(params, 0, "an IP address")?.parse().map_err(|e| format!("parameter 1 is not an IP address: {e}"))
}

fn plugin_name(params: &[Value]) -> Result<String, String> {
    string_param(params, 0, "a plugin name")
}

async fn call(relay: &Arc<Relay>, method: &str, params: &[Value]) -> Result<Value, String> {
    let policy = &relay.policy;
    let keyed = |m: &std::collections::BTreeMap<String, String>, name: &str| -> Value {
        m.iter().map(|(k, r)| json!({ name: k, "reason": r })).collect()
    };
    match method {
        "supportedmethods" => Ok(json!(METHODS)),
        "banpubkey" => {
            let pk = hex64_param(params, 0, "a public key")?;
            let r = reason(params, 1);
            persist(relay, &[(format!("ban-pubkey/{pk}"), Some(r.clone())), (format!("allow-pubkey/{pk}"), None)])
                .await?;
            policy.update_operator_lists(|l| {
                l.allowed_pubkeys.remove(&pk);
                l.banned_pubkeys.insert(pk.clone(), r);
            });
            if let Some(replicator) = &relay.replicator {
                let mut author = [0u8; 32];
                hex::decode_to_slice(&pk, &mut author).map_err(|e| e.to_string())?;
                replicator.retract(crate::replication::Retraction::Author { author, until: None });
            }
            Ok(json!(true))
        }
        "allowpubkey" => {
            let pk = hex64_param(params, 0, "a public key")?;
            let r = reason(params, 1);
            persist(relay, &[(format!("allow-pubkey/{pk}"), Some(r.clone())), (format!("ban-pubkey/{pk}"), None)])
                .await?;
            policy.update_operator_lists(|l| {
                l.banned_pubkeys.remove(&pk);
                l.allowed_pubkeys.insert(pk, r);
            });
            Ok(json!(true))
        }
        "listbannedpubkeys" => Ok(keyed(&policy.operator_lists().banned_pubkeys, "pubkey")),
        "listallowedpubkeys" => Ok(keyed(&policy.operator_lists().allowed_pubkeys, "pubkey")),
        "banevent" => {
            let id = hex64_param(params, 0, "an event id")?;
            let r = reason(params, 1);
            persist(relay, &[(format!("ban-event/{id}"), Some(r.clone()))]).await?;
            policy.update_operator_lists(|l| {
                l.banned_events.insert(id.clone(), r);
            });
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(&id, &mut bytes).map_err(|e| e.to_string())?;
            if let Some(replicator) = &relay.replicator {
                replicator.retract(crate::replication::Retraction::Events { ids: vec![bytes], author: None });
            }
            let store = relay.store.clone();
            match tokio::task::spawn_blocking(move || store.remove(&bytes)).await {
                Ok(Ok(_)) => Ok(json!(true)),
                Ok(Err(e)) => Err(format!("the event is banned but removing it failed: {e}")),
                Err(e) => Err(format!("the event is banned but removing it failed: {e}")),
            }
        }
        "allowevent" => {
            let id = hex64_param(params, 0, "an event id")?;
            persist(relay, &[(format!("ban-event/{id}"), None)]).await?;
            policy.update_operator_lists(|l| {
                l.banned_events.remove(&id);
            });
            Ok(json!(true))
        }
        "listbannedevents" => Ok(keyed(&policy.operator_lists().banned_events, "id")),
        "allowkind" => {
            let kind = kind_param(params)?;
            persist(
                relay,
                &[(format!("allow-kind/{kind}"), Some(String::new())), (format!("disallow-kind/{kind}"), None)],
            )
            .await?;
            policy.update_operator_lists(|l| {
                l.disallowed_kinds.remove(&kind);
                l.allowed_kinds.insert(kind);
            });
            Ok(json!(true))
        }
        "disallowkind" => {
            let kind = kind_param(params)?;
            persist(
                relay,
                &[(format!("disallow-kind/{kind}"), Some(String::new())), (format!("allow-kind/{kind}"), None)],
            )
            .await?;
            policy.update_operator_lists(|l| {
                l.allowed_kinds.remove(&kind);
                l.disallowed_kinds.insert(kind);
            });
            Ok(json!(true))
        }
        "listallowedkinds" => Ok(json!(policy.operator_lists().allowed_kinds)),
        "listdisallowedkinds" => Ok(json!(policy.operator_lists().disallowed_kinds)),
        "blockip" => {
            let ip = ip_param(params)?;
            let r = reason(params, 1);
            persist(relay, &[(format!("block-ip/{ip}"), Some(r.clone()))]).await?;
            policy.update_operator_lists(|l| {
                l.blocked_ips.insert(ip, r);
            });
            Ok(json!(true))
        }
        "unblockip" => {
            let ip = ip_param(params)?;
            persist(relay, &[(format!("block-ip/{ip}"), None)]).await?;
            policy.update_operator_lists(|l| {
                l.blocked_ips.remove(&ip);
            });
            Ok(json!(true))
        }
        "listblockedips" => {
            let lists = policy.operator_lists();
            Ok(lists.blocked_ips.iter().map(|(ip, r)| json!({ "ip": ip.to_string(), "reason": r })).collect())
        }
        "listplugins" => Ok(json!(relay.plugins.status())),
        "reloadplugin" => {
            let name = plugin_name(params)?;
            let swapped = relay.plugins.reload(&name).await?;
            Ok(json!({ "swapped": swapped, "plugin": status_of(relay, &name) }))
        }
        "swapplugin" => {
            let name = plugin_name(params)?;
            let wasm = string_param(params, 1, "the component, base64-encoded")?;
            let wasm = base64::engine::general_purpose::STANDARD
                .decode(wasm.trim())
                .map_err(|e| format!("parameter 2 is not base64: {e}"))?;
            let swapped = relay.plugins.swap(&name, &wasm).await?;
            Ok(json!({ "swapped": swapped, "plugin": status_of(relay, &name) }))
        }
        "disableplugin" => {
            let name = plugin_name(params)?;
            relay.plugins.disable(&name)?;
            Ok(json!(true))
        }
        "releasemanagedkinds" | "claimmanagedkinds" => {
            let name = plugin_name(params)?;
            relay.plugins.release_managed_kinds(&name, method == "releasemanagedkinds")?;
            Ok(status_of(relay, &name))
        }
        "enableplugin" => {
            let name = plugin_name(params)?;
            relay.plugins.enable(&name)?;
            Ok(json!(true))
        }
        "" => Err("the request has no `method`".into()),
        other => Err(format!("unknown method '{other}'; call supportedmethods for the list")),
    }
}

fn status_of(relay: &Relay, name: &str) -> Value {
    relay.plugins.status().into_iter().find(|s| s.name == name).map(|s| json!(s)).unwrap_or(Value::Null)
}

/// Writes list entries (`None` deletes) in one transaction, durably, before
/// the in-memory lists change.
async fn persist(relay: &Relay, entries: &[(String, Option<String>)]) -> Result<(), String> {
    let writes = entries
        .iter()
        .map(|(key, value)| crate::metadata::Write { key: key.clone(), value: value.clone().map(String::into_bytes) })
        .collect();
    match relay.metadata.transact(NAMESPACE, vec![], writes).await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("error: saving the change failed ({e}); nothing was changed")),
    }
}

/// The operator's lists as last saved.
pub async fn load_lists(metadata: &dyn MetadataStore) -> Result<OperatorLists, crate::metadata::KvError> {
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
    use super::*;

    #[test]
    fn urls_compare_across_ws_and_http() {
        assert_eq!(http_url("ws://127.0.0.1:7777"), http_url("http://127.0.0.1:7777/"));
        assert_eq!(http_url("wss://Relay.Example.com"), http_url("https://relay.example.com"));
        assert_ne!(http_url("ws://a.example"), http_url("https://a.example"));
    }

    #[tokio::test]
    async fn lists_round_trip_through_the_metadata_store() {
        let store = crate::metadata::SledMetadataStore::temporary().unwrap();
        let writes = ["ban-pubkey/aa", "allow-kind/1", "disallow-kind/4", "block-ip/10.0.0.1", "ban-event/bb"]
            .iter()
            .map(|k| crate::metadata::Write { key: k.to_string(), value: Some(b"why".to_vec()) })
            .collect();
        store.transact(NAMESPACE, vec![], writes).await.unwrap();
        let lists = load_lists(&store).await.unwrap();
        assert_eq!(lists.banned_pubkeys.get("aa").map(String::as_str), Some("why"));
        assert!(lists.allowed_kinds.contains(&1) && lists.disallowed_kinds.contains(&4));
        assert!(lists.blocked_ips.contains_key(&"10.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(lists.banned_events.contains_key("bb"));
    }
}
