//! The NIP-86 relay management API: JSON-RPC over HTTP POST to the relay's
//! URL, authorized with NIP-98 by one of `admin.pubkeys` ([`crate::auth`]).
//!
//! A request is parsed into an [`AdminRequest`] (typed parameters, every
//! problem reported before anything changes), then applied. Standard
//! methods change the operator's lists ([`crate::operator_lists`], applied
//! by [`crate::policy`]); extra methods manage plugins (`listplugins`,
//! `reloadplugin`, `swapplugin`, `disableplugin`, `enableplugin`, and
//! `releasemanagedkinds` / `claimmanagedkinds`, the rollback switch for a
//! plugin's managed kinds).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::policy::OperatorLists;
use crate::relay::Relay;

/// Content type of NIP-86 requests and replies.
pub const CONTENT_TYPE: &str = "application/nostr+json+rpc";

/// One of a pair of opposite lists: an item is in at most one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Banned,
    Allowed,
}

/// A management request, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
enum AdminRequest {
    SupportedMethods,
    /// `banpubkey` / `allowpubkey`: the key moves to that list.
    SetPubkey {
        side: Side,
        pubkey: String,
        reason: String,
    },
    /// `listbannedpubkeys` / `listallowedpubkeys`.
    ListPubkeys(Side),
    BanEvent {
        id: [u8; 32],
        reason: String,
    },
    AllowEvent {
        id: [u8; 32],
    },
    ListBannedEvents,
    /// `disallowkind` / `allowkind`: the kind moves to that list.
    SetKind {
        side: Side,
        kind: u16,
    },
    /// `listdisallowedkinds` / `listallowedkinds`.
    ListKinds(Side),
    BlockIp {
        ip: IpAddr,
        reason: String,
    },
    UnblockIp {
        ip: IpAddr,
    },
    ListBlockedIps,
    ListPlugins,
    ReloadPlugin {
        name: String,
    },
    SwapPlugin {
        name: String,
        wasm: Vec<u8>,
    },
    DisablePlugin {
        name: String,
    },
    EnablePlugin {
        name: String,
    },
    /// `releasemanagedkinds` (true) / `claimmanagedkinds` (false).
    ReleaseManagedKinds {
        name: String,
        release: bool,
    },
}

impl AdminRequest {
    /// Every method this relay answers, as `supportedmethods` lists them;
    /// [`Self::parse`] accepts exactly these (a unit test holds them equal).
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

    fn parse(method: &str, params: &[Value]) -> Result<Self, String> {
        let p = Params(params);
        Ok(match method {
            "supportedmethods" => Self::SupportedMethods,
            "banpubkey" => {
                Self::SetPubkey { side: Side::Banned, pubkey: p.hex64(0, "a public key")?, reason: p.reason(1) }
            }
            "allowpubkey" => {
                Self::SetPubkey { side: Side::Allowed, pubkey: p.hex64(0, "a public key")?, reason: p.reason(1) }
            }
            "listbannedpubkeys" => Self::ListPubkeys(Side::Banned),
            "listallowedpubkeys" => Self::ListPubkeys(Side::Allowed),
            "banevent" => Self::BanEvent { id: p.id(0)?, reason: p.reason(1) },
            "allowevent" => Self::AllowEvent { id: p.id(0)? },
            "listbannedevents" => Self::ListBannedEvents,
            "disallowkind" => Self::SetKind { side: Side::Banned, kind: p.kind(0)? },
            "allowkind" => Self::SetKind { side: Side::Allowed, kind: p.kind(0)? },
            "listdisallowedkinds" => Self::ListKinds(Side::Banned),
            "listallowedkinds" => Self::ListKinds(Side::Allowed),
            "blockip" => Self::BlockIp { ip: p.ip(0)?, reason: p.reason(1) },
            "unblockip" => Self::UnblockIp { ip: p.ip(0)? },
            "listblockedips" => Self::ListBlockedIps,
            "listplugins" => Self::ListPlugins,
            "reloadplugin" => Self::ReloadPlugin { name: p.plugin(0)? },
            "swapplugin" => {
                let wasm = base64::engine::general_purpose::STANDARD
                    .decode(p.string(1, "the component, base64-encoded")?.trim())
                    .map_err(|e| format!("parameter 2 is not base64: {e}"))?;
                Self::SwapPlugin { name: p.plugin(0)?, wasm }
            }
            "disableplugin" => Self::DisablePlugin { name: p.plugin(0)? },
            "enableplugin" => Self::EnablePlugin { name: p.plugin(0)? },
            "releasemanagedkinds" => Self::ReleaseManagedKinds { name: p.plugin(0)?, release: true },
            "claimmanagedkinds" => Self::ReleaseManagedKinds { name: p.plugin(0)?, release: false },
            "" => return Err("the request has no `method`".into()),
            other => return Err(format!("unknown method '{other}'; call supportedmethods for the list")),
        })
    }

    /// Whether it only reads (not logged).
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Self::SupportedMethods
                | Self::ListPubkeys(_)
                | Self::ListBannedEvents
                | Self::ListKinds(_)
                | Self::ListBlockedIps
                | Self::ListPlugins
        )
    }
}

/// A request's positional parameters.
struct Params<'a>(&'a [Value]);

impl Params<'_> {
    fn string(&self, i: usize, what: &str) -> Result<String, String> {
        self.0
            .get(i)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("parameter {} must be {what}", i + 1))
    }

    fn hex64(&self, i: usize, what: &str) -> Result<String, String> {
        let v = self.string(i, what)?.to_ascii_lowercase();
        if v.len() != 64 || hex::decode(&v).is_err() {
            return Err(format!("parameter {} must be {what} (64 hex characters)", i + 1));
        }
        Ok(v)
    }

    fn id(&self, i: usize) -> Result<[u8; 32], String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(self.hex64(i, "an event id")?, &mut bytes).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    fn reason(&self, i: usize) -> String {
        self.0.get(i).and_then(Value::as_str).unwrap_or_default().to_owned()
    }

    fn kind(&self, i: usize) -> Result<u16, String> {
        self.0
            .get(i)
            .and_then(Value::as_u64)
            .and_then(|k| u16::try_from(k).ok())
            .ok_or_else(|| format!("parameter {} must be an event kind (0-65535)", i + 1))
    }

    fn ip(&self, i: usize) -> Result<IpAddr, String> {
        self.string(i, "an IP address")?.parse().map_err(|e| format!("parameter {} is not an IP address: {e}", i + 1))
    }

    fn plugin(&self, i: usize) -> Result<String, String> {
        self.string(i, "a plugin name")
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
    let request = match AdminRequest::parse(&method, &params) {
        Ok(r) => r,
        Err(e) => return json!({ "error": e }),
    };
    let logged = !request.reads_only();
    match apply(relay, request).await {
        Ok(result) => {
            if logged {
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

async fn apply(relay: &Arc<Relay>, request: AdminRequest) -> Result<Value, String> {
    let policy = &relay.policy;
    let keyed = |m: &std::collections::BTreeMap<String, String>, name: &str| -> Value {
        m.iter().map(|(k, r)| json!({ name: k, "reason": r })).collect()
    };
    match request {
        AdminRequest::SupportedMethods => Ok(json!(AdminRequest::METHODS)),
        AdminRequest::SetPubkey { side, pubkey, reason } => {
            let (to, from) = match side {
                Side::Banned => ("ban-pubkey", "allow-pubkey"),
                Side::Allowed => ("allow-pubkey", "ban-pubkey"),
            };
            move_between(relay, to, from, &pubkey, &reason, |l| {
                let (to, from) = pubkey_lists(l, side);
                from.remove(&pubkey);
                to.insert(pubkey.clone(), reason.clone());
            })
            .await?;
            if side == Side::Banned
                && let Some(replicator) = &relay.replicator
            {
                let mut author = [0u8; 32];
                hex::decode_to_slice(&pubkey, &mut author).map_err(|e| e.to_string())?;
                replicator.retract(crate::replication::Retraction::Author { author, until: None });
            }
            Ok(json!(true))
        }
        AdminRequest::ListPubkeys(side) => {
            let lists = policy.operator_lists();
            Ok(match side {
                Side::Banned => keyed(&lists.banned_pubkeys, "pubkey"),
                Side::Allowed => keyed(&lists.allowed_pubkeys, "pubkey"),
            })
        }
        AdminRequest::BanEvent { id, reason } => {
            let hex_id = hex::encode(id);
            persist(relay, &[(format!("ban-event/{hex_id}"), Some(reason.clone()))]).await?;
            policy.update_operator_lists(|l| {
                l.banned_events.insert(hex_id.clone(), reason);
            });
            if let Some(replicator) = &relay.replicator {
                replicator.retract(crate::replication::Retraction::Events { ids: vec![id], author: None });
            }
            let store = relay.store.clone();
            match tokio::task::spawn_blocking(move || store.remove(&id)).await {
                Ok(Ok(_)) => Ok(json!(true)),
                Ok(Err(e)) => Err(format!("the event is banned but removing it failed: {e}")),
                Err(e) => Err(format!("the event is banned but removing it failed: {e}")),
            }
        }
        AdminRequest::AllowEvent { id } => {
            let hex_id = hex::encode(id);
            persist(relay, &[(format!("ban-event/{hex_id}"), None)]).await?;
            policy.update_operator_lists(|l| {
                l.banned_events.remove(&hex_id);
            });
            Ok(json!(true))
        }
        AdminRequest::ListBannedEvents => Ok(keyed(&policy.operator_lists().banned_events, "id")),
        AdminRequest::SetKind { side, kind } => {
            let (to, from) = match side {
                Side::Banned => ("disallow-kind", "allow-kind"),
                Side::Allowed => ("allow-kind", "disallow-kind"),
            };
            move_between(relay, to, from, &kind.to_string(), "", |l| {
                let (to, from) = kind_lists(l, side);
                from.remove(&kind);
                to.insert(kind);
            })
            .await?;
            Ok(json!(true))
        }
        AdminRequest::ListKinds(side) => {
            let lists = policy.operator_lists();
            Ok(match side {
                Side::Banned => json!(lists.disallowed_kinds),
                Side::Allowed => json!(lists.allowed_kinds),
            })
        }
        AdminRequest::BlockIp { ip, reason } => {
            persist(relay, &[(format!("block-ip/{ip}"), Some(reason.clone()))]).await?;
            policy.update_operator_lists(|l| {
                l.blocked_ips.insert(ip, reason);
            });
            Ok(json!(true))
        }
        AdminRequest::UnblockIp { ip } => {
            persist(relay, &[(format!("block-ip/{ip}"), None)]).await?;
            policy.update_operator_lists(|l| {
                l.blocked_ips.remove(&ip);
            });
            Ok(json!(true))
        }
        AdminRequest::ListBlockedIps => {
            let lists = policy.operator_lists();
            Ok(lists.blocked_ips.iter().map(|(ip, r)| json!({ "ip": ip.to_string(), "reason": r })).collect())
        }
        AdminRequest::ListPlugins => Ok(json!(relay.plugins.status())),
        AdminRequest::ReloadPlugin { name } => {
            let swapped = relay.plugins.reload(&name).await?;
            Ok(json!({ "swapped": swapped, "plugin": status_of(relay, &name) }))
        }
        AdminRequest::SwapPlugin { name, wasm } => {
            let swapped = relay.plugins.swap(&name, &wasm).await?;
            Ok(json!({ "swapped": swapped, "plugin": status_of(relay, &name) }))
        }
        AdminRequest::DisablePlugin { name } => {
            relay.plugins.disable(&name)?;
            Ok(json!(true))
        }
        AdminRequest::EnablePlugin { name } => {
            relay.plugins.enable(&name)?;
            Ok(json!(true))
        }
        AdminRequest::ReleaseManagedKinds { name, release } => {
            relay.plugins.release_managed_kinds(&name, release)?;
            Ok(status_of(relay, &name))
        }
    }
}

/// The ban/allow pairs: puts `item` in list `to` (with `reason`) and takes it
/// out of the opposite list `from`, durably, then in memory with `update`.
async fn move_between(
    relay: &Relay,
    to: &str,
    from: &str,
    item: &str,
    reason: &str,
    update: impl FnOnce(&mut OperatorLists),
) -> Result<(), String> {
    persist(relay, &[(format!("{to}/{item}"), Some(reason.to_owned())), (format!("{from}/{item}"), None)]).await?;
    relay.policy.update_operator_lists(update);
    Ok(())
}

/// (the list `side` names, its opposite) among the key lists.
fn pubkey_lists(
    l: &mut OperatorLists,
    side: Side,
) -> (&mut std::collections::BTreeMap<String, String>, &mut std::collections::BTreeMap<String, String>) {
    match side {
        Side::Banned => (&mut l.banned_pubkeys, &mut l.allowed_pubkeys),
        Side::Allowed => (&mut l.allowed_pubkeys, &mut l.banned_pubkeys),
    }
}

/// (the list `side` names, its opposite) among the kind lists.
fn kind_lists(
    l: &mut OperatorLists,
    side: Side,
) -> (&mut std::collections::BTreeSet<u16>, &mut std::collections::BTreeSet<u16>) {
    match side {
        Side::Banned => (&mut l.disallowed_kinds, &mut l.allowed_kinds),
        Side::Allowed => (&mut l.allowed_kinds, &mut l.disallowed_kinds),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters that satisfy any method.
    fn any_params() -> Vec<Value> {
        vec![json!("00".repeat(32)), json!("AA==")]
    }

    #[test]
    fn the_method_list_is_what_the_parser_accepts() {
        for method in AdminRequest::METHODS {
            let params = match method {
                m if m.ends_with("kind") => vec![json!(1)],
                m if m.ends_with("ip") => vec![json!("10.0.0.1")],
                _ => any_params(),
            };
            assert!(AdminRequest::parse(method, &params).is_ok(), "{method} is listed but not parsed");
        }
        assert!(AdminRequest::parse("banpubkeys", &any_params()).unwrap_err().contains("unknown method"));
    }

    #[test]
    fn parameters_are_checked_before_anything_acts() {
        assert!(AdminRequest::parse("banpubkey", &[json!("zz")]).unwrap_err().contains("64 hex"));
        assert!(AdminRequest::parse("allowkind", &[json!(70000)]).unwrap_err().contains("event kind"));
        assert!(AdminRequest::parse("blockip", &[json!("not-an-ip")]).unwrap_err().contains("IP address"));
        assert!(AdminRequest::parse("swapplugin", &[json!("p"), json!("%%%")]).unwrap_err().contains("base64"));
        assert_eq!(
            AdminRequest::parse("claimmanagedkinds", &[json!("mls-gateway")]).unwrap(),
            AdminRequest::ReleaseManagedKinds { name: "mls-gateway".into(), release: false }
        );
    }
}
