//! A writer policy that asks an outside HTTP service whether an event's
//! author may write (contract 0.2): the shape of paid-relay and
//! web-of-trust policies.
//!
//! For each event, it sends `GET <url>?pubkey=<hex>` and reads the status:
//! 200 accepts; 402 and 403 refuse with `restricted:` and the service's
//! answer (its first 200 characters) as the message; anything else (no
//! answer, a timeout, another status) refuses with `error:` and writes
//! nothing, so an outage fails closed. A decision is kept in the plugin's
//! key-value store for `cache-seconds`, so a busy author costs one request
//! per period. With the setting `posting-policy` (a URL), the relay's NIP-11
//! document gains `posting_policy` while the plugin is loaded.
//!
//! The plugin asks for the capability `outbound-http` to the host of `url`.
//! The operator grants it in the relay's configuration, and every other host
//! stays unreachable:
//!
//! ```toml
//! [[plugins]]
//! name = "http-policy"
//! path = "target/plugins/http_policy.wasm"
//! grants = { outbound_http = ["127.0.0.1:8089"] }
//! [plugins.settings]
//! url = "http://127.0.0.1:8089/allowed"
//! ```

use wasm_relay_plugin_sdk::v0_2::*;

struct HttpPolicy;

const DEFAULT_URL: &str = "http://127.0.0.1:8089/allowed";

/// Most bytes of the service's answer read.
const MAX_ANSWER_BYTES: u64 = 4096;

impl Plugin for HttpPolicy {
    fn info() -> PluginInfo {
        // Settings read here are the operator's only: defaults are known to
        // the host once `info` has answered.
        let url = host::setting("url").unwrap_or_else(|| DEFAULT_URL.into());
        let capabilities = match Url::parse(&url) {
            Some(u) => vec![Capability::OutboundHttp(vec![u.authority])],
            None => vec![],
        };
        PluginInfo {
            name: "http-policy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: None,
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![
                SettingSpec {
                    name: "url".into(),
                    default_value: DEFAULT_URL.into(),
                    description: "The service asked, as http(s)://host[:port]/path; ?pubkey=<hex> is added".into(),
                },
                SettingSpec {
                    name: "posting-policy".into(),
                    default_value: String::new(),
                    description: "A page explaining who may write; advertised as NIP-11 posting_policy".into(),
                },
                SettingSpec {
                    name: "cache-seconds".into(),
                    default_value: "60".into(),
                    description: "How long a decision is kept before the service is asked again".into(),
                },
            ],
            hooks: vec![],
            capabilities,
            relay_info: Nip11Contribution { supported_nips: vec![], fields: posting_policy() },
        }
    }

    fn on_event(_ctx: RequestContext, event: Event) -> Decision {
        let now = host::now();
        let key = format!("d/{}", event.pubkey);
        if let Ok(Some(cached)) = kv::get(&key)
            && let Some((verdict, until)) = parse_cached(&cached)
            && until > now
        {
            return verdict;
        }
        let url = host::setting("url").unwrap_or_default();
        let Some(url) = Url::parse(&url) else {
            return reject(RefusalKind::Error, "the relay's admission service is misconfigured");
        };
        let decision = match ask(&url, &event.pubkey) {
            Ok((200, _)) => Decision::Accept,
            Ok((402 | 403, answer)) => reject(
                RefusalKind::Restricted,
                if answer.trim().is_empty() { "this key may not write here".into() } else { answer },
            ),
            Ok((status, _)) => {
                log(LogLevel::Warn, &format!("the admission service answered {status}"));
                return reject(RefusalKind::Error, "the relay's admission service failed; try again later");
            }
            Err(e) => {
                log(LogLevel::Warn, &format!("the admission service could not be asked: {e}"));
                return reject(RefusalKind::Error, "the relay's admission service did not answer; try again later");
            }
        };
        let keep: u64 = setting_or("cache-seconds", 60);
        if keep > 0 {
            let _ = kv::put(&key, cache_entry(&decision, now + keep).as_bytes());
        }
        decision
    }

    fn process_req(_ctx: RequestContext, _filters: Vec<Filter>) -> ReqResult {
        ReqResult::Continue
    }

    fn tick(_now: u64) {}

    fn on_stored(_events: Vec<Event>) {}

    fn on_removed(_events: Vec<RemovedEvent>) {}

    fn on_connect(_conn: Connection) -> Decision {
        Decision::Accept
    }

    fn on_auth(_ctx: RequestContext, _pubkey: String) -> Decision {
        Decision::Accept
    }
}

/// NIP-11 `posting_policy`, when the operator names a page.
fn posting_policy() -> Vec<Nip11Field> {
    match host::setting("posting-policy").filter(|url| !url.trim().is_empty()) {
        Some(url) => vec![Nip11Field { name: "posting_policy".into(), value_json: json_string(url.trim()) }],
        None => vec![],
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A decision as cached: `accept <until>` or `reject <until> <message>`.
fn cache_entry(decision: &Decision, until: u64) -> String {
    match decision {
        Decision::Accept => format!("accept {until}"),
        Decision::Reject(r) => format!("reject {until} {}", r.message),
    }
}

fn parse_cached(bytes: &[u8]) -> Option<(Decision, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, ' ');
    let verdict = parts.next()?;
    let until = parts.next()?.parse().ok()?;
    match verdict {
        "accept" => Some((Decision::Accept, until)),
        "reject" => Some((reject(RefusalKind::Restricted, parts.next().unwrap_or_default()), until)),
        _ => None,
    }
}

/// The parts of an `http(s)://authority/path` URL a request needs.
struct Url {
    https: bool,
    authority: String,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Option<Url> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            (false, url.strip_prefix("http://")?)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        (!authority.is_empty()).then(|| Url { https, authority: authority.into(), path: path.into() })
    }
}

/// `GET <url>?pubkey=<pubkey>`: the status and the start of the answer.
fn ask(url: &Url, pubkey: &str) -> Result<(u16, String), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    let scheme = if url.https { Scheme::Https } else { Scheme::Http };
    request.set_scheme(Some(&scheme)).map_err(|()| "bad scheme")?;
    request.set_authority(Some(&url.authority)).map_err(|()| "bad authority")?;
    let separator = if url.path.contains('?') { '&' } else { '?' };
    request.set_path_with_query(Some(&format!("{}{separator}pubkey={pubkey}", url.path))).map_err(|()| "bad path")?;
    let response = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    response.subscribe().block();
    let response = match response.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(format!("{e:?}")),
        other => return Err(format!("{other:?}")),
    };
    let status = response.status();
    let mut answer = Vec::new();
    if let Ok(body) = response.consume()
        && let Ok(stream) = body.stream()
    {
        while (answer.len() as u64) < MAX_ANSWER_BYTES {
            match stream.blocking_read(MAX_ANSWER_BYTES - answer.len() as u64) {
                Ok(chunk) if !chunk.is_empty() => answer.extend(chunk),
                _ => break,
            }
        }
    }
    let answer: String = String::from_utf8_lossy(&answer).chars().take(200).collect();
    Ok((status, answer))
}

export_plugin_v0_2!(HttpPolicy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escapes_what_json_requires_and_keeps_the_rest() {
        assert_eq!(json_string("https://ex.example/é?a=\"b\"\\\n"), "\"https://ex.example/é?a=\\\"b\\\"\\\\\\u000a\"");
    }
}
