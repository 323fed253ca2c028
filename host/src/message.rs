//! The NIP-01 wire format: parsing client messages and building relay
//! messages. Relay messages are built as strings so a stored event's JSON is
//! sent as it is, without re-serialization.

use serde_json::Value;
use serde_json::value::RawValue;

use crate::refusal::Refusal;

/// A parsed client message. Event and filter payloads stay raw here; the
/// connection validates them so every refusal can carry the right reply.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Event(&'a RawValue),
    Req {
        sub_id: String,
        filters: Vec<Value>,
    },
    Count {
        sub_id: String,
        filters: Vec<Value>,
    },
    Close {
        sub_id: String,
    },
    /// NIP-42 authentication.
    Auth(&'a RawValue),
    /// NIP-77: opens (or replaces) a reconciliation session over `filter`'s
    /// events; `message` is the client's first negentropy message, in hex.
    NegOpen {
        sub_id: String,
        filter: Value,
        message: String,
    },
    /// NIP-77: the client's next negentropy message, in hex.
    NegMsg {
        sub_id: String,
        message: String,
    },
    /// NIP-77: the client ends a session.
    NegClose {
        sub_id: String,
    },
}

/// Why a message could not be read; sent back in a NOTICE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MessageError(pub String);

/// A REQ/COUNT whose envelope is readable but whose payload is not: answered
/// with CLOSED (or a COUNT-style CLOSED) for that subscription id.
#[derive(Debug)]
pub enum Parsed<'a> {
    Message(ClientMessage<'a>),
    /// REQ or COUNT with a subscription id but unreadable filters.
    BadFilters {
        sub_id: String,
        reason: String,
    },
}

pub fn parse_client_message(text: &str) -> Result<Parsed<'_>, MessageError> {
    let parts: Vec<&RawValue> = serde_json::from_str(text)
        .map_err(|e| MessageError(format!("could not parse message as a JSON array: {e}")))?;
    let Some(first) = parts.first() else {
        return Err(MessageError("empty message array".into()));
    };
    let verb: String = serde_json::from_str(first.get()).map_err(|_| {
        MessageError("the first element of a message must be a string (EVENT, REQ, COUNT, CLOSE, AUTH, NEG-*)".into())
    })?;
    match verb.as_str() {
        "EVENT" => {
            if parts.len() != 2 {
                return Err(MessageError(format!("EVENT takes exactly one event, got {} elements", parts.len() - 1)));
            }
            Ok(Parsed::Message(ClientMessage::Event(parts[1])))
        }
        "REQ" | "COUNT" => {
            let sub_id = sub_id(&parts, &verb)?;
            let mut filters = Vec::with_capacity(parts.len() - 2);
            for raw in &parts[2..] {
                match serde_json::from_str::<Value>(raw.get()) {
                    Ok(v) => filters.push(v),
                    Err(e) => return Ok(Parsed::BadFilters { sub_id, reason: format!("unreadable filter: {e}") }),
                }
            }
            let message = if verb == "REQ" {
                ClientMessage::Req { sub_id, filters }
            } else {
                ClientMessage::Count { sub_id, filters }
            };
            Ok(Parsed::Message(message))
        }
        "CLOSE" => {
            if parts.len() != 2 {
                return Err(MessageError("CLOSE takes exactly one subscription id".into()));
            }
            Ok(Parsed::Message(ClientMessage::Close { sub_id: sub_id(&parts, "CLOSE")? }))
        }
        "AUTH" => {
            if parts.len() != 2 {
                return Err(MessageError("AUTH takes exactly one event".into()));
            }
            Ok(Parsed::Message(ClientMessage::Auth(parts[1])))
        }
        "NEG-OPEN" => {
            if parts.len() != 4 {
                return Err(MessageError(
                    "NEG-OPEN takes a subscription id, one filter and an initial message (NIP-77)".into(),
                ));
            }
            let sub_id = sub_id(&parts, "NEG-OPEN")?;
            let filter = serde_json::from_str::<Value>(parts[2].get())
                .map_err(|e| MessageError(format!("NEG-OPEN: unreadable filter: {e}")))?;
            let message = hex_text(parts[3], "NEG-OPEN")?;
            Ok(Parsed::Message(ClientMessage::NegOpen { sub_id, filter, message }))
        }
        "NEG-MSG" => {
            if parts.len() != 3 {
                return Err(MessageError("NEG-MSG takes a subscription id and a message (NIP-77)".into()));
            }
            let sub_id = sub_id(&parts, "NEG-MSG")?;
            let message = hex_text(parts[2], "NEG-MSG")?;
            Ok(Parsed::Message(ClientMessage::NegMsg { sub_id, message }))
        }
        "NEG-CLOSE" => {
            if parts.len() != 2 {
                return Err(MessageError("NEG-CLOSE takes exactly one subscription id".into()));
            }
            Ok(Parsed::Message(ClientMessage::NegClose { sub_id: sub_id(&parts, "NEG-CLOSE")? }))
        }
        other => Err(MessageError(format!("unknown message type \"{}\"", other.chars().take(32).collect::<String>()))),
    }
}

fn sub_id(parts: &[&RawValue], verb: &str) -> Result<String, MessageError> {
    let raw = parts.get(1).ok_or_else(|| MessageError(format!("{verb} needs a subscription id")))?;
    serde_json::from_str::<String>(raw.get())
        .map_err(|_| MessageError(format!("{verb} subscription id must be a string")))
}

/// A negentropy message as sent: a JSON string of hex digits.
fn hex_text(raw: &RawValue, verb: &str) -> Result<String, MessageError> {
    serde_json::from_str::<String>(raw.get())
        .map_err(|_| MessageError(format!("{verb}: the negentropy message must be a string of hex digits")))
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

/// A refusal as NIP-01 text: `prefix: message`. The one place refusals
/// become text.
pub fn refusal_text(r: &Refusal) -> String {
    format!("{}: {}", r.kind.prefix(), r.message)
}

/// `["OK", id, false, "prefix: message"]`.
pub fn ok_refused(event_id: &str, r: &Refusal) -> String {
    ok(event_id, false, &refusal_text(r))
}

/// `["OK", id, true, "prefix: message"]`: accepted, with a note (NIP-01's
/// `duplicate:` for an event already stored).
pub fn ok_noted(event_id: &str, note: &Refusal) -> String {
    ok(event_id, true, &refusal_text(note))
}

/// `["CLOSED", sub_id, "prefix: message"]`.
pub fn closed_refused(sub_id: &str, r: &Refusal) -> String {
    closed(sub_id, &refusal_text(r))
}

/// `["NOTICE", "prefix: message"]`, for a refusal with nothing to answer to.
pub fn notice_refused(r: &Refusal) -> String {
    notice(&refusal_text(r))
}

pub fn ok(event_id: &str, accepted: bool, message: &str) -> String {
    format!("[\"OK\",{},{},{}]", json_string(event_id), accepted, json_string(message))
}

/// `["EVENT", sub_id, event]` with `event_json` already serialized.
pub fn event(sub_id_json: &str, event_json: &str) -> String {
    let mut s = String::with_capacity(event_json.len() + sub_id_json.len() + 12);
    s.push_str("[\"EVENT\",");
    s.push_str(sub_id_json);
    s.push(',');
    s.push_str(event_json);
    s.push(']');
    s
}

pub fn eose(sub_id: &str) -> String {
    format!("[\"EOSE\",{}]", json_string(sub_id))
}

pub fn closed(sub_id: &str, message: &str) -> String {
    format!("[\"CLOSED\",{},{}]", json_string(sub_id), json_string(message))
}

pub fn auth(challenge: &str) -> String {
    format!("[\"AUTH\",{}]", json_string(challenge))
}

pub fn notice(message: &str) -> String {
    format!("[\"NOTICE\",{}]", json_string(message))
}

/// `["NEG-MSG", sub_id, hex]`.
pub fn neg_msg(sub_id: &str, message: &[u8]) -> String {
    format!("[\"NEG-MSG\",{},\"{}\"]", json_string(sub_id), hex::encode(message))
}

/// `["NEG-ERR", sub_id, "prefix: message"]`.
pub fn neg_err(sub_id: &str, r: &Refusal) -> String {
    format!("[\"NEG-ERR\",{},{}]", json_string(sub_id), json_string(&refusal_text(r)))
}

pub fn count(sub_id: &str, count: u64) -> String {
    format!("[\"COUNT\",{},{{\"count\":{count}}}]", json_string(sub_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_verb() {
        assert!(matches!(
            parse_client_message(r#"["EVENT",{"id":"x"}]"#),
            Ok(Parsed::Message(ClientMessage::Event(_)))
        ));
        match parse_client_message(r#"["REQ","s",{"kinds":[1]},{}]"#).unwrap() {
            Parsed::Message(ClientMessage::Req { sub_id, filters }) => {
                assert_eq!(sub_id, "s");
                assert_eq!(filters.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_message(r#"["COUNT","s",{}]"#),
            Ok(Parsed::Message(ClientMessage::Count { .. }))
        ));
        assert!(matches!(parse_client_message(r#"["CLOSE","s"]"#), Ok(Parsed::Message(ClientMessage::Close { .. }))));
        match parse_client_message(r#"["NEG-OPEN","n",{"kinds":[1]},"6100"]"#).unwrap() {
            Parsed::Message(ClientMessage::NegOpen { sub_id, filter, message }) => {
                assert_eq!((sub_id.as_str(), message.as_str()), ("n", "6100"));
                assert_eq!(filter["kinds"][0], 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_message(r#"["NEG-MSG","n","61"]"#),
            Ok(Parsed::Message(ClientMessage::NegMsg { .. }))
        ));
        assert!(matches!(
            parse_client_message(r#"["NEG-CLOSE","n"]"#),
            Ok(Parsed::Message(ClientMessage::NegClose { .. }))
        ));
    }

    #[test]
    fn refuses_malformed_envelopes() {
        for (text, expected) in [
            ("not json", "could not parse"),
            ("{}", "could not parse"),
            ("[]", "empty message"),
            ("[1]", "first element"),
            (r#"["PING"]"#, "unknown message type"),
            (r#"["EVENT"]"#, "exactly one event"),
            (r#"["EVENT",{},{}]"#, "exactly one event"),
            (r#"["REQ"]"#, "needs a subscription id"),
            (r#"["REQ",5,{}]"#, "must be a string"),
            (r#"["CLOSE"]"#, "exactly one"),
            (r#"["NEG-OPEN","n",{}]"#, "initial message"),
            (r#"["NEG-OPEN","n",{},61]"#, "hex digits"),
            (r#"["NEG-MSG","n"]"#, "a message"),
        ] {
            let err = parse_client_message(text).unwrap_err().0;
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn relay_messages_escape_strings() {
        assert_eq!(ok("ab", false, "invalid: \"x\"\n"), r#"["OK","ab",false,"invalid: \"x\"\n"]"#);
        assert_eq!(closed("s\"", "m"), r#"["CLOSED","s\"","m"]"#);
        assert_eq!(event(&json_string("s"), "{}"), r#"["EVENT","s",{}]"#);
        assert_eq!(count("s", 3), r#"["COUNT","s",{"count":3}]"#);
    }
}
