//! Relay-level write and read policy: access lists and rate limits, applied
//! before any plugin or storage work.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nostr::event::Event;

use crate::config::{AccessLists, RateLimits};

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

pub struct Policy {
    access: AccessLists,
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
        !self.access.write_allow_pubkeys.is_empty() || !self.access.write_allow_ips.is_empty()
    }

    /// `Err` is the `OK false` message.
    pub fn check_write(&self, ip: IpAddr, event: &Event) -> Result<(), String> {
        let author = event.pubkey.to_hex();
        let a = &self.access;
        if a.write_deny_ips.iter().any(|n| n.contains(&ip))
            || (!a.write_allow_ips.is_empty() && !a.write_allow_ips.iter().any(|n| n.contains(&ip)))
        {
            return Err("blocked: this relay does not accept events from your network".into());
        }
        if a.write_deny_pubkeys.contains(&author) {
            return Err("blocked: this relay does not accept events from this public key".into());
        }
        if !a.write_allow_pubkeys.is_empty() && !a.write_allow_pubkeys.contains(&author) {
            return Err("restricted: this relay accepts events only from its members' public keys".into());
        }
        if let Some(l) = &self.events_per_ip
            && l.check_key(&ip).is_err()
        {
            return Err(format!(
                "rate-limited: more than {} events per minute from your address; slow down",
                self.limits.events_per_minute_per_ip
            ));
        }
        if let Some(l) = &self.events_per_pubkey
            && l.check_key(&event.pubkey.to_bytes()).is_err()
        {
            return Err(format!(
                "rate-limited: more than {} events per minute from this public key; slow down",
                self.limits.events_per_minute_per_pubkey
            ));
        }
        let kind = event.kind.as_u16();
        for rule in self.kinds.iter().filter(|r| r.kind == kind) {
            let key = match &rule.per {
                Per::Ip => ip.to_string(),
                Per::Pubkey => author.clone(),
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
                return Err(format!(
                    "rate-limited: more than {} kind {kind} events per minute {scope}; slow down",
                    rule.per_minute
                ));
            }
        }
        Ok(())
    }

    /// `Err` is the `CLOSED` message.
    pub fn check_read(&self, ip: IpAddr, authed: &[[u8; 32]]) -> Result<(), String> {
        if let Some(l) = &self.reqs_per_ip
            && l.check_key(&ip).is_err()
        {
            return Err(format!(
                "rate-limited: more than {} requests per minute from your address; slow down",
                self.limits.reqs_per_minute_per_ip
            ));
        }
        if let (Some(l), Some(pk)) = (&self.reqs_per_pubkey, authed.first())
            && l.check_key(pk).is_err()
        {
            return Err(format!(
                "rate-limited: more than {} requests per minute from this public key; slow down",
                self.limits.reqs_per_minute_per_pubkey
            ));
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
