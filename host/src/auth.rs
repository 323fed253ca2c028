//! Proving who is on the other end: NIP-42 (a WebSocket connection
//! authenticates as a key) and NIP-98 (a management API request is signed by
//! an admin). Both check a signed event against this relay's URL and a time
//! window, and compare URLs with [`same_relay_url`].

use base64::Engine as _;
use nostr::event::Event;
use sha2::{Digest, Sha256};

use crate::event::{first_tag_value, same_relay_url};
use crate::refusal::Refusal;

/// NIP-42 authentication event kind.
pub const CLIENT_AUTH_KIND: u16 = 22242;
/// How far a NIP-42 event's `created_at` may be from now.
const CLIENT_AUTH_WINDOW_SECONDS: u64 = 600;
/// NIP-98 HTTP auth event kind.
const HTTP_AUTH_KIND: u16 = 27235;
/// How far a NIP-98 event's `created_at` may be from now.
const HTTP_AUTH_WINDOW_SECONDS: u64 = 60;

/// NIP-42: checks a verified event answering `challenge` on the relay at
/// `public_url`.
pub fn check_client_auth(event: &Event, challenge: &str, public_url: &str, now: u64) -> Result<(), Refusal> {
    if event.kind.as_u16() != CLIENT_AUTH_KIND {
        return Err(Refusal::invalid(format!("AUTH takes a kind {CLIENT_AUTH_KIND} event")));
    }
    if first_tag_value(event, "challenge") != Some(challenge) {
        return Err(Refusal::invalid("the challenge does not match the one this connection was given"));
    }
    if !first_tag_value(event, "relay").is_some_and(|r| same_relay_url(r, public_url)) {
        return Err(Refusal::invalid(format!("the relay tag must be this relay's URL, {public_url}")));
    }
    if event.created_at.as_secs().abs_diff(now) > CLIENT_AUTH_WINDOW_SECONDS {
        return Err(Refusal::invalid("the AUTH event's created_at must be within 10 minutes of now"));
    }
    Ok(())
}

/// What NIP-98 checks a request against.
pub struct RelayIdentity<'a> {
    /// `admin.pubkeys`.
    pub admins: &'a [String],
    /// `server.public_url`.
    pub public_url: &'a str,
    pub spent: &'a SpentAuthEvents,
}

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
pub fn authorize_header(relay: &RelayIdentity, header: Option<&str>, now: u64) -> Result<AdminAuth, AuthError> {
    if relay.admins.is_empty() {
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
    if event.created_at.as_secs().abs_diff(now) > HTTP_AUTH_WINDOW_SECONDS {
        return Err(AuthError::Invalid("created_at must be within 60 seconds of now"));
    }
    let pubkey = event.pubkey.to_hex();
    if !relay.admins.iter().any(|k| k.eq_ignore_ascii_case(&pubkey)) {
        return Err(AuthError::NotAdmin(pubkey));
    }
    if !event.verify_id() || !event.verify_signature() {
        return Err(AuthError::Invalid("bad id or signature"));
    }
    let tag = |name: &str| first_tag_value(&event, name).map(str::to_owned);
    if !tag("u").is_some_and(|u| same_relay_url(&u, relay.public_url)) {
        return Err(AuthError::Invalid("its `u` tag must be this relay's URL"));
    }
    if !tag("method").is_some_and(|m| m.eq_ignore_ascii_case("POST")) {
        return Err(AuthError::Invalid("its `method` tag must be POST"));
    }
    let event_id = event.id.to_bytes();
    if relay.spent.seen(&event_id, now) {
        return Err(AuthError::Invalid("this Authorization event was already used; sign a new one per request"));
    }
    Ok(AdminAuth { pubkey, event_id, created_at: event.created_at.as_secs(), payload: tag("payload") })
}

/// Checks that the authorized event covers `body`, then spends the event so
/// it cannot authorize another request.
pub fn authorize_body(spent: &SpentAuthEvents, auth: &AdminAuth, body: &[u8]) -> Result<(), AuthError> {
    if auth.payload.as_ref().map(|p| p.to_ascii_lowercase()) != Some(hex::encode(Sha256::digest(body))) {
        return Err(AuthError::Invalid("its `payload` tag must be the SHA-256 of the request body"));
    }
    if !spent.spend(auth.event_id, auth.created_at + HTTP_AUTH_WINDOW_SECONDS) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_compare_across_ws_and_http() {
        assert!(same_relay_url("ws://127.0.0.1:7777", "http://127.0.0.1:7777/"));
        assert!(same_relay_url("wss://Relay.Example.com", "https://relay.example.com"));
        assert!(!same_relay_url("ws://a.example", "https://a.example"));
    }
}
