//! The probe plugin: a test instrument, not an example. Settings choose what
//! each hook does, including misbehaving (trap, endless loop, memory
//! blow-up) so the relay's containment can be tested.
//!
//! Settings: `managed-kinds`, `event-kinds` (empty: all), `req-kinds` (empty:
//! all), `reject-kinds`, `on-event` (accept | trap | loop | oom | escape | hoard-http),
//! `req` (continue | claim | filter-query-all | bogus-ids | add-forged |
//! huge | get-ids | reject | trap | loop | oom), `fail-kinds` (kinds that trigger a failure
//! mode; empty: all), `tick-seconds`, `replica` (a name its ticks record),
//! `http-target` (host:port the `escape` mode tries an HTTP request to).

use std::hint::black_box;

use wasm_relay_plugin_sdk::*;

#[cfg(not(feature = "v2"))]
const VERSION: &str = "v1";
#[cfg(feature = "v2")]
const VERSION: &str = "v2";

struct Probe;

fn optional_kinds(name: &str) -> Option<Vec<u16>> {
    let kinds = setting_kinds(name);
    if kinds.is_empty() { None } else { Some(kinds) }
}

fn fails_for(kinds: &[u16]) -> bool {
    let fail = setting_kinds("fail-kinds");
    fail.is_empty() || kinds.iter().any(|k| fail.contains(k))
}

fn misbehave(mode: &str) {
    match mode {
        "trap" => panic!("probe {VERSION} traps on purpose"),
        "loop" => {
            let mut i: u64 = 0;
            loop {
                i = black_box(i.wrapping_add(1));
            }
        }
        "print" => {
            println!("probe {VERSION} says hello on stdout");
            eprintln!("probe {VERSION} says hello on stderr");
        }
        "flood" => {
            for i in 0..500 {
                println!("probe flood line {i}");
            }
        }
        "hoard-http" => {
            // Host-side memory through `wasi:http` handles kept past the
            // call: header maps of about 7 KiB each, never dropped.
            let value = vec![b'x'; 7 * 1024];
            for _ in 0..2000 {
                let fields = wasip2::http::types::Fields::new();
                if fields.append("x-hoard", &value).is_err() {
                    break;
                }
                std::mem::forget(fields);
            }
        }
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        _ => {}
    }
}

/// An HTTP GET through `wasi:http` to `authority` (host:port): `Ok` if any
/// response came back.
fn http_get(authority: &str) -> Result<(), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&Scheme::Http)).map_err(|()| "bad scheme")?;
    request.set_authority(Some(authority)).map_err(|()| "bad authority")?;
    request.set_path_with_query(Some("/")).map_err(|()| "bad path")?;
    let response = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    response.subscribe().block();
    match response.get() {
        Some(Ok(Ok(_))) => Ok(()),
        Some(Ok(Err(e))) => Err(format!("{e:?}")),
        other => Err(format!("{other:?}")),
    }
}

/// Tries to leave the sandbox (files, environment, network) and reports
/// what happened, e.g. `file: denied; env: 0 vars; tcp: denied; udp: denied`.
/// The setting `http-target` names a host:port for the HTTP attempt.
fn escape_report() -> String {
    let outcome = |r: Result<(), String>| match r {
        Ok(()) => "ESCAPED".to_string(),
        Err(e) => format!("denied ({e})"),
    };
    let file = outcome(std::fs::read("/etc/passwd").map(|_| ()).map_err(|e| e.to_string()));
    let dir = outcome(std::fs::read_dir(".").map(|_| ()).map_err(|e| e.to_string()));
    let write = outcome(std::fs::write("/tmp/probe-escape", b"x").map_err(|e| e.to_string()));
    let env = std::env::vars().count();
    let tcp = outcome(std::net::TcpStream::connect("127.0.0.1:1").map(|_| ()).map_err(|e| e.to_string()));
    let udp = outcome(std::net::UdpSocket::bind("0.0.0.0:0").map(|_| ()).map_err(|e| e.to_string()));
    let http = outcome(http_get(&setting("http-target")));
    format!(
        "probe {VERSION} escape: file: {file}; dir: {dir}; write: {write}; env: {env} vars; tcp: {tcp}; udp: {udp}; http: {http}"
    )
}

fn setting(name: &str) -> String {
    host::setting(name).unwrap_or_default()
}

fn ids_of(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Claims one unclaimed stored event of a managed kind matching the filters,
/// race-free through `kv::transact`.
fn claim(ctx: &RequestContext, filters: &[Filter]) -> ReqResult {
    let managed = setting_kinds("managed-kinds");
    let mut scoped = filters.to_vec();
    for f in &mut scoped {
        f.kinds = Some(managed.iter().copied().filter(|k| f.could_match_kind(*k)).collect());
        f.limit = None;
    }
    let mut candidates = events::query_events(&scoped, 1000);
    candidates.sort_by_key(|e| (e.created_at, e.id.clone()));
    for e in candidates {
        let key = format!("claimed/{}", e.id);
        let owner = ctx.connection_id.to_string();
        match store::compare_and_swap(&key, None, Some(owner.as_bytes())) {
            Ok(true) => return ReqResult::FilterQuery(FilterQuery { ids: vec![e.id], filters: filters.to_vec() }),
            Ok(false) => continue,
            Err(e) => {
                return ReqResult::Reject(Refusal { kind: RefusalKind::Error, message: format!("kv failed: {e:?}") });
            }
        }
    }
    ReqResult::FilterQuery(FilterQuery { ids: vec![], filters: filters.to_vec() })
}

impl Plugin for Probe {
    fn info() -> PluginInfo {
        misbehave(&setting("info"));
        let spec = |name: &str, default: &str| SettingSpec {
            name: name.into(),
            default_value: default.into(),
            description: format!("probe setting {name}"),
        };
        PluginInfo {
            name: "probe".into(),
            version: VERSION.into(),
            managed_kinds: setting_kinds("managed-kinds"),
            event_kinds: optional_kinds("event-kinds"),
            req_kinds: optional_kinds("req-kinds"),
            tick_interval_seconds: setting("tick-seconds").parse().ok(),
            settings: vec![
                spec("managed-kinds", ""),
                spec("event-kinds", ""),
                spec("req-kinds", ""),
                spec("reject-kinds", ""),
                spec("on-event", "accept"),
                spec("req", "continue"),
                spec("fail-kinds", ""),
                spec("tick-seconds", ""),
                spec("replica", ""),
                spec("info", ""),
                spec("http-target", "127.0.0.1:9"),
            ],
        }
    }

    fn on_event(_ctx: RequestContext, event: Event) -> Decision {
        if fails_for(&[event.kind]) {
            let mode = setting("on-event");
            if mode == "escape" {
                return reject(RefusalKind::Blocked, escape_report());
            }
            misbehave(&mode);
        }
        if setting_kinds("reject-kinds").contains(&event.kind) {
            return reject(RefusalKind::Blocked, format!("probe {VERSION} rejects kind {}", event.kind));
        }
        accept()
    }

    fn process_req(ctx: RequestContext, filters: Vec<Filter>) -> ReqResult {
        if filters.iter().any(|f| f.kinds.as_deref() == Some(&[9999][..])) {
            let ticks = kv::get("ticks").ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned());
            let tickers: Vec<String> = store::scan_all("ticked-by/")
                .unwrap_or_default()
                .into_iter()
                .map(|(k, _)| k.trim_start_matches("ticked-by/").to_owned())
                .collect();
            let tickers = if tickers.is_empty() { String::new() } else { format!(" tickers={}", tickers.join(",")) };
            return ReqResult::Reject(Refusal {
                kind: RefusalKind::Error,
                message: format!("probe {VERSION} ticks={}{tickers}", ticks.unwrap_or_else(|| "0".into())),
            });
        }
        let requested: Vec<u16> = filters.iter().flat_map(|f| f.kinds.clone().unwrap_or_default()).collect();
        let mode = setting("req");
        if fails_for(&requested) {
            misbehave(&mode);
        }
        match mode.as_str() {
            "claim" => claim(&ctx, &filters),
            "filter-query-all" => {
                let found = events::query_events(&filters, 1000);
                ReqResult::FilterQuery(FilterQuery { ids: ids_of(&found), filters })
            }
            "bogus-ids" => {
                // Ids that do not exist, that are malformed, and of events that do not match.
                let mut ids = vec!["00".repeat(32), "not-an-id".into()];
                let unrelated = Filter {
                    ids: None,
                    authors: None,
                    kinds: Some(vec![1]),
                    tags: vec![],
                    since: None,
                    until: None,
                    limit: Some(5),
                };
                ids.extend(ids_of(&events::query_events(&[unrelated], 5)));
                ids.extend(ids_of(&events::query_events(&filters, 1000)));
                ReqResult::FilterQuery(FilterQuery { ids, filters })
            }
            "huge" => {
                // Far more ids than any answer may hold, each well-formed.
                let ids = (0..200_000u32).map(|i| format!("{i:064x}")).collect();
                ReqResult::FilterQuery(FilterQuery { ids, filters })
            }
            "add-forged" => {
                let mut found = events::query_events(&filters, 10);
                for e in &mut found {
                    e.content.push_str(" (forged)");
                }
                ReqResult::AddEvents(found)
            }
            "get-ids" => {
                // Looks up each id the request names; reports what it found absent.
                let named: Vec<String> = filters.iter().flat_map(|f| f.ids.clone().unwrap_or_default()).collect();
                let absent = named.iter().filter(|id| events::get_event(id).is_none()).count();
                if absent > 0 {
                    return ReqResult::Reject(Refusal {
                        kind: RefusalKind::Error,
                        message: format!("probe {VERSION} found {absent} of {} absent", named.len()),
                    });
                }
                ReqResult::FilterQuery(FilterQuery { ids: named, filters })
            }
            "reject" => ReqResult::Reject(Refusal {
                kind: RefusalKind::RateLimited,
                message: format!("probe {VERSION} says slow down"),
            }),
            _ => ReqResult::Continue,
        }
    }

    fn tick(_now: u64) {
        // Which replicas ticked (the `replica` setting names this one).
        let replica = setting("replica");
        if !replica.is_empty() {
            let _ = kv::put(&format!("ticked-by/{replica}"), b"1");
        }
        // Read-modify-write through compare-and-swap so overlapping ticks count correctly.
        loop {
            let current = kv::get("ticks").ok().flatten();
            let n: u64 = current.as_deref().map(|v| String::from_utf8_lossy(v).parse().unwrap_or(0)).unwrap_or(0);
            let next = (n + 1).to_string();
            if let Ok(true) = store::compare_and_swap("ticks", current.as_deref(), Some(next.as_bytes())) {
                return;
            }
        }
    }
}

export_plugin!(Probe);
