//! The NIP-86 relay management API: JSON-RPC over HTTP POST to the relay's
//! URL, authorized with NIP-98 by one of `admin.pubkeys` ([`crate::auth`]).
//!
//! Standard methods change the operator's lists in [`crate::policy`]
//! (persisted in the metadata store, namespace `relay:admin`, so they survive
//! restarts); extra methods manage plugins (`listplugins`, `reloadplugin`,
//! `swapplugin`, `disableplugin`, `enableplugin`, and `releasemanagedkinds` /
//! `claimmanagedkinds`, the rollback switch for a plugin's managed kinds).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::relay::Relay;

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

/// Saves list entries (`None` deletes) durably, before the in-memory lists
/// change.
async fn persist(relay: &Relay, entries: &[(String, Option<String>)]) -> Result<(), String> {
    crate::operator_lists::save(relay.metadata.as_ref(), entries)
        .await
        .map_err(|e| format!("error: saving the change failed ({e}); nothing was changed"))
}
