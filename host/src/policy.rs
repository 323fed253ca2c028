//! Relay-level write and read policy: access lists and rate limits, applied
//! before any plugin or storage work.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::RwLock;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nostr::event::Event;

use crate::config::{AccessLists, RateLimits};
use crate::refusal::Refusal;

type Keyed<K> = Option<DefaultKeyedRateLimiter<K>>;

fn keyed<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Keyed<K> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

/// How a kind rule counts.
enum Per {
    Ip,
    Pubkey,
    Tag(String),
}

struct KindRule {
    kind: u16,
    per: Per,
    per_minute: u32,
    limiter: DefaultKeyedRateLimiter<String>,
}

/// Lists an operator changes at run time through the management API
/// (NIP-86). `crate::admin` persists them; values are the operator's reasons.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OperatorLists {
    pub banned_pubkeys: BTreeMap<String, String>,
    /// When non-empty (or the configured allow list is), only these and the
    /// configured keys may publish.
    pub allowed_pubkeys: BTreeMap<String, String>,
    pub banned_events: BTreeMap<String, String>,
    /// When non-empty, only these kinds are accepted.
    pub allowed_kinds: BTreeSet<u16>,
    pub disallowed_kinds: BTreeSet<u16>,
    pub blocked_ips: BTreeMap<IpAddr, String>,
}

pub struct Policy {
    access: AccessLists,
    operator: RwLock<OperatorLists>,
    events_per_ip: Keyed<IpAddr>,
    events_per_pubkey: Keyed<[u8; 32]>,
    reqs_per_ip: Keyed<IpAddr>,
    reqs_per_pubkey: Keyed<[u8; 32]>,
    kinds: Vec<KindRule>,
    limits: RateLimits,
}

impl Policy {
    pub fn new(limits: &RateLimits, access: &AccessLists) -> Self {
        let kinds = limits
            .kinds
            .iter()
            .filter_map(|k| {
                let per = match k.per.as_str() {
                    "ip" => Per::Ip,
                    "pubkey" => Per::Pubkey,
                    other => Per::Tag(other.strip_prefix("tag:")?.to_owned()),
                };
                let limiter = RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(k.per_minute)?));
                Some(KindRule { kind: k.kind, per, per_minute: k.per_minute, limiter })
            })
            .collect();
        Self {
            access: access.clone(),
            operator: RwLock::new(OperatorLists::default()),
            events_per_ip: keyed(limits.events_per_minute_per_ip),
            events_per_pubkey: keyed(limits.events_per_minute_per_pubkey),
            reqs_per_ip: keyed(limits.reqs_per_minute_per_ip),
            reqs_per_pubkey: keyed(limits.reqs_per_minute_per_pubkey),
            kinds,
            limits: limits.clone(),
        }
    }

    /// Whether writes are limited to allow lists (NIP-11 `restricted_writes`).
    pub fn restricted_writes(&self) -> bool {
        let operator = self.operator();
        !self.access.write_allow_pubkeys.is_empty()
            || !self.access.write_allow_ips.is_empty()
            || !operator.allowed_pubkeys.is_empty()
            || !operator.allowed_kinds.is_empty()
    }

    fn operator(&self) -> std::sync::RwLockReadGuard<'_, OperatorLists> {
        self.operator.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the operator's lists.
    pub fn operator_lists(&self) -> OperatorLists {
        self.operator().clone()
    }

    /// Changes the operator's lists (the caller persists them).
    pub fn update_operator_lists(&self, change: impl FnOnce(&mut OperatorLists)) {
        change(&mut self.operator.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Whether an operator banned the event or its author.
    pub fn is_banned(&self, event: &Event) -> bool {
        let operator = self.operator();
        operator.banned_events.contains_key(&event.id.to_hex())
            || operator.banned_pubkeys.contains_key(&event.pubkey.to_hex())
            || self.access.write_deny_pubkeys.contains(&event.pubkey.to_hex())
    }

    /// Whether an operator blocked `ip` (every request from it is refused).
    pub fn ip_blocked(&self, ip: IpAddr) -> bool {
        self.operator().blocked_ips.contains_key(&ip)
    }

    /// `Err` is the `OK false` message.
    /// The rules that depend on the event alone: access lists and bans by
    /// key, banned events, kinds. Also what an event another replica stored
    /// must pass (it has no client address, and rate limits were the origin
    /// replica's to apply).
    pub fn check_content(&self, event: &Event) -> Result<(), Refusal> {
        let author = event.pubkey.to_hex();
        let a = &self.access;
        let operator = self.operator();
        if a.write_deny_pubkeys.contains(&author) || operator.banned_pubkeys.contains_key(&author) {
            return Err(Refusal::blocked("this relay does not accept events from this public key"));
        }
        let allow_listed = !a.write_allow_pubkeys.is_empty() || !operator.allowed_pubkeys.is_empty();
        if allow_listed && !a.write_allow_pubkeys.contains(&author) && !operator.allowed_pubkeys.contains_key(&author) {
            return Err(Refusal::restricted("this relay accepts events only from its members' public keys"));
        }
        if operator.banned_events.contains_key(&event.id.to_hex()) {
            return Err(Refusal::blocked("the relay operator banned this event"));
        }
        let kind = event.kind.as_u16();
        if operator.disallowed_kinds.contains(&kind)
            || (!operator.allowed_kinds.is_empty() && !operator.allowed_kinds.contains(&kind))
        {
            return Err(Refusal::blocked(format!("this relay does not accept kind {kind} events")));
        }
        Ok(())
    }

    pub fn check_write(&self, ip: IpAddr, event: &Event) -> Result<(), Refusal> {
        let a = &self.access;
        {
            let operator = self.operator();
            if a.write_deny_ips.iter().any(|n| n.contains(&ip))
                || (!a.write_allow_ips.is_empty() && !a.write_allow_ips.iter().any(|n| n.contains(&ip)))
                || operator.blocked_ips.contains_key(&ip)
            {
                return Err(Refusal::blocked("this relay does not accept events from your network"));
            }
        }
        self.check_content(event)?;
        let kind = event.kind.as_u16();
        if let Some(l) = &self.events_per_ip
            && l.check_key(&ip).is_err()
        {
            return Err(Refusal::rate_limited(format!(
                "more than {} events per minute from your address; slow down",
                self.limits.events_per_minute_per_ip
            )));
        }
        if let Some(l) = &self.events_per_pubkey
            && l.check_key(&event.pubkey.to_bytes()).is_err()
        {
            return Err(Refusal::rate_limited(format!(
                "more than {} events per minute from this public key; slow down",
                self.limits.events_per_minute_per_pubkey
            )));
        }
        for rule in self.kinds.iter().filter(|r| r.kind == kind) {
            let key = match &rule.per {
                Per::Ip => ip.to_string(),
                Per::Pubkey => event.pubkey.to_hex(),
                Per::Tag(letter) => {
                    let value = event.tags.iter().map(|t| t.as_slice()).find(|t| t.len() >= 2 && t[0] == *letter);
                    match value {
                        Some(t) => format!("{letter}:{}", t[1]),
                        None => continue,
                    }
                }
            };
            if rule.limiter.check_key(&key).is_err() {
                let scope = match &rule.per {
                    Per::Ip => "from your address".to_string(),
                    Per::Pubkey => "from this public key".to_string(),
                    Per::Tag(l) => format!("for this {l} tag value"),
                };
                return Err(Refusal::rate_limited(format!(
                    "more than {} kind {kind} events per minute {scope}; slow down",
                    rule.per_minute
                )));
            }
        }
        Ok(())
    }

    /// `Err` is the `CLOSED` message.
    pub fn check_read(&self, ip: IpAddr, authed: &[[u8; 32]]) -> Result<(), Refusal> {
        if self.ip_blocked(ip) {
            return Err(Refusal::blocked("this relay does not serve your network"));
        }
        if let Some(l) = &self.reqs_per_ip
            && l.check_key(&ip).is_err()
        {
            return Err(Refusal::rate_limited(format!(
                "more than {} requests per minute from your address; slow down",
                self.limits.reqs_per_minute_per_ip
            )));
        }
        if let (Some(l), Some(pk)) = (&self.reqs_per_pubkey, authed.first())
            && l.check_key(pk).is_err()
        {
            return Err(Refusal::rate_limited(format!(
                "more than {} requests per minute from this public key; slow down",
                self.limits.reqs_per_minute_per_pubkey
            )));
        }
        Ok(())
    }

    /// Forgets idle keys so memory stays bounded.
    pub fn forget_idle(&self) {
        for l in [&self.events_per_ip, &self.reqs_per_ip].into_iter().flatten() {
            l.retain_recent();
        }
        for l in [&self.events_per_pubkey, &self.reqs_per_pubkey].into_iter().flatten() {
            l.retain_recent();
        }
        for r in &self.kinds {
            r.limiter.retain_recent();
        }
    }
}
