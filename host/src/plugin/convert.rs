//! Conversions between the relay's own types (nostr events, parsed filters)
//! and the WIT types plugins see.

use nostr::event::Event;
use serde_json::{Value, json};

use super::bindings::types as wit;
use crate::filter::{Filter, FilterLimits};
use crate::refusal::{Refusal, RefusalKind};

pub fn event_to_wit(e: &Event) -> wit::Event {
    wit::Event {
        id: e.id.to_hex(),
        pubkey: e.pubkey.to_hex(),
        created_at: e.created_at.as_secs(),
        kind: e.kind.as_u16(),
        tags: e.tags.iter().map(|t| t.as_slice().to_vec()).collect(),
        content: e.content.clone(),
        sig: e.sig.to_string(),
    }
}

/// Reads a plugin-supplied event; `None` if it is not a well-formed event
/// (the signature is checked separately).
pub fn event_from_wit(e: &wit::Event) -> Option<Event> {
    let v = json!({
        "id": e.id,
        "pubkey": e.pubkey,
        "created_at": e.created_at,
        "kind": e.kind,
        "tags": e.tags,
        "content": e.content,
        "sig": e.sig,
    });
    serde_json::from_value(v).ok()
}

pub fn filter_to_wit(f: &Filter) -> wit::Filter {
    wit::Filter {
        ids: f.ids.as_ref().map(|ids| ids.iter().map(hex::encode).collect()),
        authors: f.authors.as_ref().map(|a| a.iter().map(hex::encode).collect()),
        kinds: f.kinds.clone(),
        tags: f.tags.iter().map(|(l, v)| wit::TagFilter { name: l.to_string(), values: v.clone() }).collect(),
        since: f.since,
        until: f.until,
        limit: f.limit,
        search: f.search.clone(),
    }
}

/// Reads a plugin-supplied filter with the same rules as a client's.
pub fn filter_from_wit(f: &wit::Filter) -> Result<Filter, String> {
    let mut map = serde_json::Map::new();
    if let Some(ids) = &f.ids {
        map.insert("ids".into(), json!(ids));
    }
    if let Some(a) = &f.authors {
        map.insert("authors".into(), json!(a));
    }
    if let Some(k) = &f.kinds {
        map.insert("kinds".into(), json!(k));
    }
    for t in &f.tags {
        map.insert(format!("#{}", t.name), json!(t.values));
    }
    if let Some(s) = f.since {
        map.insert("since".into(), json!(s));
    }
    if let Some(u) = f.until {
        map.insert("until".into(), json!(u));
    }
    if let Some(l) = f.limit {
        map.insert("limit".into(), json!(l));
    }
    if let Some(q) = &f.search {
        map.insert("search".into(), json!(q));
    }
    Filter::parse(&Value::Object(map), FilterLimits { max_values: usize::MAX }).map_err(|e| e.0)
}

/// A relay refusal as plugins see it.
pub fn refusal_to_wit(r: &Refusal) -> wit::Refusal {
    let kind = match r.kind {
        RefusalKind::Invalid => wit::RefusalKind::Invalid,
        RefusalKind::Blocked => wit::RefusalKind::Blocked,
        RefusalKind::RateLimited => wit::RefusalKind::RateLimited,
        RefusalKind::AuthRequired => wit::RefusalKind::AuthRequired,
        RefusalKind::Restricted => wit::RefusalKind::Restricted,
        RefusalKind::Duplicate | RefusalKind::Error | RefusalKind::Closed => wit::RefusalKind::Error,
    };
    wit::Refusal { kind, message: r.message.clone() }
}

impl From<wit::Refusal> for Refusal {
    fn from(r: wit::Refusal) -> Self {
        let kind = match r.kind {
            wit::RefusalKind::Invalid => RefusalKind::Invalid,
            wit::RefusalKind::Blocked => RefusalKind::Blocked,
            wit::RefusalKind::RateLimited => RefusalKind::RateLimited,
            wit::RefusalKind::AuthRequired => RefusalKind::AuthRequired,
            wit::RefusalKind::Restricted => RefusalKind::Restricted,
            wit::RefusalKind::Error => RefusalKind::Error,
        };
        Refusal::new(kind, r.message)
    }
}
