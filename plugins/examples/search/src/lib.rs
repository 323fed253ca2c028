//! NIP-50 search as a plugin (contract 0.2).
//!
//! The relay cannot evaluate a filter's `search`; this plugin answers it.
//! It keeps an inverted index in its key-value store, fed by `on-stored`
//! (events after they are durably stored) and pruned by `on-removed`
//! (deleted, expired, banned, vanished or replaced events), and answers a
//! REQ or COUNT with `search` through `filter-query`: the ids of indexed
//! events holding every term of the query, newest first. The relay re-checks
//! each id against the request's other fields and its read rules (gift
//! wraps, expiry), so the index never widens what a client may read.
//!
//! Terms are the content's words: lowercased, split on anything that is not
//! a letter or a digit, 2 to 32 characters, at most 64 distinct per event.
//! NIP-50 extensions (`key:value` tokens such as `language:en`) are ignored.
//! With the `search` hook loaded, the relay lists NIP-50 in its NIP-11
//! document. The metrics count events `indexed` and `unindexed`.
//!
//! Key layout (all keys are the plugin's own):
//! - `t/<term>/<u64::MAX - created_at, 20 digits>/<id>`: one posting; the
//!   inverted time makes a prefix scan return the newest first.
//! - `e/<id>`: `<created_at> <kind> <pubkey> <term> <term> ...`, the
//!   event's entry, to check the other terms and fields of a query and to
//!   remove its postings.

use wasm_relay_plugin_sdk::v0_2::*;
use wasm_relay_plugin_sdk::v0_2::{kv, setting_kinds};

struct Search;

/// Distinct terms indexed per event.
const MAX_TERMS_PER_EVENT: usize = 64;
/// Most writes in one key-value transaction.
const MAX_WRITES_PER_TRANSACTION: usize = 400;
/// Postings read per query term before giving up on filling the limit.
const MAX_SCANNED: u32 = 2_000;
/// Results per filter when it sets no limit.
const DEFAULT_LIMIT: u64 = 100;

impl Plugin for Search {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "search".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: Some(vec![]),
            // Called only for requests that search (the `search` hook).
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![SettingSpec {
                name: "kinds".into(),
                default_value: "1,30023".into(),
                description: "Comma-separated kinds whose content is indexed".into(),
            }],
            hooks: vec![Hook::OnStored, Hook::OnRemoved, Hook::Search],
            capabilities: vec![],
            relay_info: Nip11Contribution { supported_nips: vec![], fields: vec![] },
        }
    }

    fn on_event(_ctx: RequestContext, _event: Event) -> Decision {
        Decision::Accept
    }

    fn process_req(_ctx: RequestContext, filters: Vec<Filter>) -> ReqResult {
        let mut ids: Vec<String> = Vec::new();
        for filter in &filters {
            let Some(query) = &filter.search else { continue };
            match matching(filter, &terms(query)) {
                Ok(found) => ids.extend(found),
                Err(e) => {
                    return ReqResult::Reject(Refusal {
                        kind: RefusalKind::Error,
                        message: format!("the search index could not be read ({e:?}); try again"),
                    });
                }
            }
        }
        if ids.is_empty() && !filters.iter().any(|f| f.search.is_some()) {
            return ReqResult::Continue;
        }
        ids.sort_unstable();
        ids.dedup();
        ReqResult::FilterQuery(FilterQuery { ids, filters: vec![] })
    }

    fn tick(_now: u64) {}

    fn on_stored(events: Vec<Event>) {
        let kinds = setting_kinds("kinds");
        // Several events per transaction, each transaction within what every
        // key-value backend commits at once (Firestore: 500 writes).
        let mut writes: Vec<Write> = Vec::new();
        let mut pending = 0;
        for event in events.iter().filter(|e| kinds.contains(&e.kind)) {
            let postings = postings(event);
            if writes.len() + postings.len() > MAX_WRITES_PER_TRANSACTION {
                commit(&mut writes, &mut pending);
            }
            if !postings.is_empty() {
                writes.extend(postings);
                pending += 1;
            }
        }
        commit(&mut writes, &mut pending);
    }

    fn on_removed(events: Vec<RemovedEvent>) {
        for removed in &events {
            if let Err(e) = unindex(&removed.id) {
                log(LogLevel::Warn, &format!("dropping {} from the index failed: {e:?}", removed.id));
            }
        }
    }

    fn on_connect(_conn: Connection) -> Decision {
        Decision::Accept
    }

    fn on_auth(_ctx: RequestContext, _pubkey: String) -> Decision {
        Decision::Accept
    }
}

/// The distinct search terms of `text`, in order of first appearance.
fn terms(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        // NIP-50 extensions look like `key:value`; they are not words.
        if word.contains(':') {
            continue;
        }
        for token in word.split(|c: char| !c.is_alphanumeric()) {
            let token = token.to_lowercase();
            let length = token.chars().count();
            if (2..=32).contains(&length) && !out.contains(&token) {
                out.push(token);
            }
        }
    }
    out
}

fn posting(term: &str, created_at: u64, id: &str) -> String {
    format!("t/{term}/{:020}/{id}", u64::MAX - created_at)
}

/// The writes that index `event`: a posting per term and its entry (none
/// when it has no terms).
fn postings(event: &Event) -> Vec<Write> {
    let mut words = terms(&event.content);
    words.truncate(MAX_TERMS_PER_EVENT);
    if words.is_empty() {
        return Vec::new();
    }
    let entry = format!("{} {} {} {}", event.created_at, event.kind, event.pubkey, words.join(" "));
    let mut writes: Vec<Write> =
        words.iter().map(|w| Write { key: posting(w, event.created_at, &event.id), value: Some(Vec::new()) }).collect();
    writes.push(Write { key: format!("e/{}", event.id), value: Some(entry.into_bytes()) });
    writes
}

/// Writes what `writes` holds for `events` indexed events, then empties both.
fn commit(writes: &mut Vec<Write>, events: &mut u64) {
    if writes.is_empty() {
        return;
    }
    match kv::transact(&[], writes) {
        Ok(_) => host::count("indexed", *events),
        Err(e) => log(LogLevel::Warn, &format!("indexing {events} events failed: {e:?}")),
    }
    writes.clear();
    *events = 0;
}

fn unindex(id: &str) -> Result<(), kv::KvError> {
    let Some(entry) = kv::get(&format!("e/{id}"))? else { return Ok(()) };
    let Some(parsed) = Entry::parse(&String::from_utf8_lossy(&entry)) else {
        return kv::delete(&format!("e/{id}"));
    };
    let mut writes: Vec<Write> =
        parsed.terms.iter().map(|w| Write { key: posting(w, parsed.created_at, id), value: None }).collect();
    writes.push(Write { key: format!("e/{id}"), value: None });
    kv::transact(&[], &writes)?;
    host::count("unindexed", 1);
    Ok(())
}

/// An indexed event's entry.
struct Entry {
    created_at: u64,
    kind: u16,
    pubkey: String,
    terms: Vec<String>,
}

impl Entry {
    fn parse(text: &str) -> Option<Entry> {
        let mut parts = text.split(' ');
        let created_at = parts.next()?.parse().ok()?;
        let kind = parts.next()?.parse().ok()?;
        let pubkey = parts.next()?.to_owned();
        Some(Entry { created_at, kind, pubkey, terms: parts.map(str::to_owned).collect() })
    }

    /// Whether the event holds every term and fits the filter's other
    /// fields this entry knows (the relay checks all of them again).
    fn fits(&self, filter: &Filter, words: &[String]) -> bool {
        words.iter().all(|w| self.terms.contains(w))
            && filter.kinds.as_ref().is_none_or(|k| k.contains(&self.kind))
            && filter.authors.as_ref().is_none_or(|a| a.contains(&self.pubkey))
            && filter.since.is_none_or(|s| self.created_at >= s)
            && filter.until.is_none_or(|u| self.created_at <= u)
    }
}

/// Ids of indexed events with every term of `words` that fit `filter`,
/// newest first, at most the filter's limit.
fn matching(filter: &Filter, words: &[String]) -> Result<Vec<String>, kv::KvError> {
    let Some(first) = words.first() else { return Ok(vec![]) };
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT) as usize;
    let prefix = format!("t/{first}/");
    let mut found = Vec::new();
    let mut after: Option<String> = None;
    let mut scanned = 0;
    // Newest first: start at `until` when the filter has one.
    if let Some(until) = filter.until {
        after = Some(format!("{prefix}{:020}", (u64::MAX - until).saturating_sub(1)));
    }
    while found.len() < limit && scanned < MAX_SCANNED {
        let page = kv::scan_prefix(&prefix, after.as_deref(), 200)?;
        if page.is_empty() {
            break;
        }
        scanned += page.len() as u32;
        after = page.last().map(|(k, _)| k.clone());
        for (key, _) in page {
            let Some(id) = key.rsplit('/').next() else { continue };
            let Some(entry) = kv::get(&format!("e/{id}"))? else { continue };
            let Some(entry) = Entry::parse(&String::from_utf8_lossy(&entry)) else { continue };
            if filter.since.is_some_and(|s| entry.created_at < s) {
                return Ok(found);
            }
            if entry.fits(filter, words) {
                found.push(id.to_owned());
                if found.len() >= limit {
                    break;
                }
            }
        }
    }
    Ok(found)
}

export_plugin_v0_2!(Search);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_lowercased_distinct_words_without_extensions() {
        assert_eq!(terms("Hello, hello WORLD! a language:en b2b"), vec!["hello", "world", "b2b"]);
    }

    #[test]
    fn postings_sort_newest_first() {
        assert!(posting("x", 200, "a") < posting("x", 100, "a"));
    }
}
