//! Events the operator brings into a running relay (`import` and `sync`
//! through the operator socket): the write path of a client's event, for a
//! source that is not a connection.
//!
//! Each event is checked as a client's would be (id, signature, sizes,
//! expiry, the operator's rules, every plugin's `on-event`) and written by
//! the same ingest writer, so it is durable, fanned out to subscribers and
//! seen by plugins' `on-stored` like any other. Two checks do not apply:
//! the `created_at` window (it guards against clients' clocks; a backup or
//! another relay's history is old by nature) and rate limits (the operator
//! chose the load). A sync also refuses NIP-70 protected events, which only
//! their author may publish; a restore keeps them (this relay accepted them
//! once).

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::event::{AcceptedEvent, KindClass, is_vanish_request_for, kind_class, read_event, unix_now};
use crate::plugin::Caller;
use crate::refusal::Refusal;
use crate::relay::Relay;
use crate::store::WriteOutcome;

/// Where an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A restore (`import` into the running relay).
    Import,
    /// Another relay (`sync`).
    Sync,
}

impl Source {
    /// The caller plugins see: connection 0, address `import` or `sync`.
    fn caller(self) -> Caller {
        match self {
            Source::Import => Caller::operator("import"),
            Source::Sync => Caller::operator("sync"),
        }
    }
}

/// Checks and writes one event's JSON. `Ok` is the store's outcome (durable
/// when it returns); `Err` is why it was refused.
pub async fn write(relay: &Arc<Relay>, json: &str, source: Source) -> Result<WriteOutcome, Refusal> {
    let raw = RawValue::from_string(json.to_owned()).map_err(|e| Refusal::invalid(format!("malformed event: {e}")))?;
    let limits = crate::config::Limits { created_at_lower_limit: 0, ..relay.config.limits.clone() };
    let now = unix_now();
    // The upper bound of the window still holds: an event from the future is refused.
    let event = read_event(&raw, &limits, now).map_err(|rejected| rejected.refusal)?;
    if event.kind.as_u16() == crate::auth::CLIENT_AUTH_KIND {
        return Err(Refusal::invalid("kind 22242 authenticates a connection and is never stored"));
    }
    if kind_class(event.kind.as_u16()) == KindClass::Ephemeral {
        return Err(Refusal::invalid("ephemeral events are not stored"));
    }
    if source == Source::Sync && event.is_protected() {
        return Err(Refusal::restricted("this event is protected (NIP-70): only its author may publish it here"));
    }
    relay.policy.check_content(&event)?;
    if !relay.plugins.is_empty() {
        relay.plugins.on_event(&source.caller(), &event).await?;
    }
    let mut accepted = AcceptedEvent::new(event);
    accepted.vanish_request = is_vanish_request_for(&accepted.event, &relay.config.server.public_url);
    let written = relay.ingest.submit(Arc::new(accepted)).await.await;
    match written {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(Refusal::error(format!("storage failed: {e}"))),
        Err(_) => Err(Refusal::error("the event writer stopped")),
    }
}
