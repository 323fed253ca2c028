//! Why the relay says no: to an EVENT (`OK false`), a REQ or COUNT
//! (`CLOSED`), or a message it cannot read (`NOTICE`). Every layer that
//! decides (event checks, policy, plugins, the connection, replication)
//! passes a typed [`Refusal`] on; only the wire layer ([`crate::message`])
//! renders it as NIP-01's `prefix: message` text, and metrics label it by
//! its [`RefusalKind`].

/// NIP-01's machine-readable reasons (the prefix of an `OK`/`CLOSED`
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The message or event is malformed or breaks a rule of the protocol.
    Invalid,
    /// Refused by policy (bans, blocks, unaccepted kinds).
    Blocked,
    /// Too much, too fast; retry later.
    RateLimited,
    /// Authenticate with NIP-42 first.
    AuthRequired,
    /// Authenticated, but not allowed.
    Restricted,
    /// Already have it (an older version of a replaceable event, ...).
    Duplicate,
    /// The relay failed; nothing is wrong with the request.
    Error,
    /// NIP-77: the reconciliation session is not (or no longer) open.
    Closed,
}

impl RefusalKind {
    /// The NIP-01 prefix, also the metrics label.
    pub fn prefix(self) -> &'static str {
        match self {
            RefusalKind::Invalid => "invalid",
            RefusalKind::Blocked => "blocked",
            RefusalKind::RateLimited => "rate-limited",
            RefusalKind::AuthRequired => "auth-required",
            RefusalKind::Restricted => "restricted",
            RefusalKind::Duplicate => "duplicate",
            RefusalKind::Error => "error",
            RefusalKind::Closed => "closed",
        }
    }
}

/// A refusal: its kind and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    /// The relay could not serve this now (a failure, a busy plugin), so the
    /// same request may succeed later; replication retries such events.
    pub retry_later: bool,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_later: kind == RefusalKind::Error }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Invalid, message)
    }

    pub fn blocked(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Blocked, message)
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::RateLimited, message)
    }

    pub fn auth_required(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::AuthRequired, message)
    }

    pub fn restricted(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Restricted, message)
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Error, message)
    }

    /// Rate-limited because a shared resource is busy, not because of this
    /// client: worth retrying as it is.
    pub fn busy(message: impl Into<String>) -> Self {
        Self { retry_later: true, ..Self::rate_limited(message) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_and_busy_resources_are_worth_retrying_other_refusals_are_not() {
        assert!(Refusal::error("disk").retry_later);
        assert!(Refusal::busy("plugin busy").retry_later);
        assert!(!Refusal::rate_limited("slow down").retry_later);
        assert!(!Refusal::invalid("bad").retry_later);
        assert_eq!(Refusal::busy("x").kind.prefix(), "rate-limited");
    }
}
