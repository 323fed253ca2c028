//! NIP-01 filters: parsing with exact validation, and `filter_matches`.
//!
//! A [`Filter`] is parsed from the client's JSON object once per REQ/COUNT and
//! then used both by the query planner and by the live fan-out. Lists are kept
//! sorted so membership is a binary search.

use nostr::event::Event;
use serde_json::{Map, Value};

/// Why a filter was refused. The text is sent to the client after `invalid:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

/// One NIP-01 filter. `None` means the field was absent (matches anything);
/// `Some(empty)` matches nothing, as NIP-01 reads an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub ids: Option<Vec<[u8; 32]>>,
    pub authors: Option<Vec<[u8; 32]>>,
    pub kinds: Option<Vec<u16>>,
    /// Tag filters `#x`, sorted by letter; each value list sorted.
    pub tags: Vec<(char, Vec<String>)>,
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub limit: Option<u64>,
    /// NIP-50 full-text query. The relay cannot evaluate it: a filter with
    /// `search` matches nothing in the store or in live delivery, and only
    /// the answers of plugins that handle search serve it.
    pub search: Option<String>,
    /// Kinds never matched, whatever the other fields say: the relay uses it
    /// to keep plugin-managed kinds off ordinary read paths. Sorted; never
    /// parsed from a client.
    pub exclude_kinds: Vec<u16>,
}

/// Longest NIP-50 `search` string accepted.
pub const MAX_SEARCH_BYTES: usize = 512;

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct FilterLimits {
    pub max_values: usize,
}

impl Filter {
    pub fn parse(value: &Value, limits: FilterLimits) -> Result<Self, FilterError> {
        let Value::Object(map) = value else {
            return Err(FilterError(format!("a filter must be a JSON object, got {}", json_type(value))));
        };
        Self::parse_map(map, limits)
    }

    fn parse_map(map: &Map<String, Value>, limits: FilterLimits) -> Result<Self, FilterError> {
        let mut f = Filter::default();
        for (key, value) in map {
            match key.as_str() {
                "ids" => f.ids = Some(hex32_list(key, value, limits)?),
                "authors" => f.authors = Some(hex32_list(key, value, limits)?),
                "kinds" => {
                    let mut kinds = list(key, value, limits)?
                        .iter()
                        .map(|v| {
                            v.as_u64().and_then(|k| u16::try_from(k).ok()).ok_or_else(|| {
                                FilterError(format!("'kinds' values must be integers from 0 to 65535, got {v}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    kinds.sort_unstable();
                    kinds.dedup();
                    f.kinds = Some(kinds);
                }
                "since" => f.since = Some(timestamp(key, value)?),
                "until" => f.until = Some(timestamp(key, value)?),
                "limit" => f.limit = Some(timestamp(key, value)?),
                "search" => {
                    let Value::String(query) = value else {
                        return Err(FilterError(format!("'search' must be a string, got {}", json_type(value))));
                    };
                    if query.len() > MAX_SEARCH_BYTES {
                        return Err(FilterError(format!("'search' is longer than {MAX_SEARCH_BYTES} bytes")));
                    }
                    f.search = Some(query.clone());
                }
                _ => {
                    let letter = tag_filter_letter(key)
                        .ok_or_else(|| FilterError(format!("unsupported filter field '{key}' (NIP-01 fields: ids, authors, kinds, #<letter>, since, until, limit; NIP-50: search)")))?;
                    let values = list(key, value, limits)?;
                    let mut strings = Vec::with_capacity(values.len());
                    for v in values {
                        let Value::String(s) = v else {
                            return Err(FilterError(format!("'{key}' values must be strings, got {}", json_type(v))));
                        };
                        if (letter == 'e' || letter == 'p') && !is_hex64(s) {
                            return Err(FilterError(format!(
                                "'{key}' values must be 64 lowercase hex characters, got \"{}\"",
                                truncate(s)
                            )));
                        }
                        strings.push(s.clone());
                    }
                    strings.sort_unstable();
                    strings.dedup();
                    f.tags.push((letter, strings));
                }
            }
        }
        f.tags.sort_by_key(|(letter, _)| *letter);
        Ok(f)
    }

    /// The tag filter values for `letter`, if the filter has one.
    pub fn tag_values(&self, letter: char) -> Option<&[String]> {
        self.tags.iter().find(|(l, _)| *l == letter).map(|(_, v)| v.as_slice())
    }

    /// This filter with `excluded` kinds removed from what it can match.
    pub fn without_kinds(&self, excluded: &[u16]) -> Filter {
        let mut f = self.clone();
        if excluded.is_empty() {
            return f;
        }
        match &mut f.kinds {
            Some(kinds) => kinds.retain(|k| !excluded.contains(k)),
            None => {
                f.exclude_kinds.extend_from_slice(excluded);
                f.exclude_kinds.sort_unstable();
                f.exclude_kinds.dedup();
            }
        }
        f
    }

    /// Whether this filter could match an event of `kind`.
    pub fn could_match_kind(&self, kind: u16) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.binary_search(&kind).is_ok())
            && self.exclude_kinds.binary_search(&kind).is_err()
    }

    /// True when no event can match here (an empty list, or since > until),
    /// or only a search plugin can tell (`search`).
    pub fn matches_nothing(&self) -> bool {
        self.search.is_some()
            || self.ids.as_ref().is_some_and(Vec::is_empty)
            || self.authors.as_ref().is_some_and(Vec::is_empty)
            || self.kinds.as_ref().is_some_and(Vec::is_empty)
            || self.tags.iter().any(|(_, v)| v.is_empty())
            || matches!((self.since, self.until), (Some(s), Some(u)) if s > u)
    }
}

/// Whether `event` satisfies every field of `filter` (NIP-01: fields AND,
/// list values OR). Never for a filter with `search`, which the relay cannot
/// evaluate (see [`filter_matches_besides_search`]).
pub fn filter_matches(filter: &Filter, event: &Event) -> bool {
    filter.search.is_none() && filter_matches_besides_search(filter, event)
}

/// Whether `event` satisfies every field of `filter` except `search`: how the
/// relay checks what a search plugin selected.
pub fn filter_matches_besides_search(filter: &Filter, event: &Event) -> bool {
    if let Some(ids) = &filter.ids
        && ids.binary_search(event.id.as_bytes()).is_err()
    {
        return false;
    }
    if let Some(authors) = &filter.authors
        && authors.binary_search(event.pubkey.as_bytes()).is_err()
    {
        return false;
    }
    if !filter.could_match_kind(event.kind.as_u16()) {
        return false;
    }
    let created_at = event.created_at.as_secs();
    if filter.since.is_some_and(|s| created_at < s) || filter.until.is_some_and(|u| created_at > u) {
        return false;
    }
    filter.tags.iter().all(|(letter, values)| {
        event.tags.iter().any(|tag| {
            let t = tag.as_slice();
            t.len() >= 2 && is_single_char(&t[0], *letter) && values.binary_search(&t[1]).is_ok()
        })
    })
}

/// Any filter in the list matches (NIP-01: filters OR).
pub fn any_filter_matches(filters: &[Filter], event: &Event) -> bool {
    filters.iter().any(|f| filter_matches(f, event))
}

fn is_single_char(s: &str, c: char) -> bool {
    let mut chars = s.chars();
    chars.next() == Some(c) && chars.next().is_none()
}

/// `#x` with a single ASCII letter x.
fn tag_filter_letter(key: &str) -> Option<char> {
    let rest = key.strip_prefix('#')?;
    let mut chars = rest.chars();
    let c = chars.next()?;
    (c.is_ascii_alphabetic() && chars.next().is_none()).then_some(c)
}

fn list<'a>(key: &str, value: &'a Value, limits: FilterLimits) -> Result<&'a Vec<Value>, FilterError> {
    let Value::Array(values) = value else {
        return Err(FilterError(format!("'{key}' must be an array, got {}", json_type(value))));
    };
    if values.len() > limits.max_values {
        return Err(FilterError(format!(
            "'{key}' has {} values; at most {} are allowed",
            values.len(),
            limits.max_values
        )));
    }
    Ok(values)
}

fn hex32_list(key: &str, value: &Value, limits: FilterLimits) -> Result<Vec<[u8; 32]>, FilterError> {
    let mut out = list(key, value, limits)?
        .iter()
        .map(|v| match v {
            Value::String(s) if is_hex64(s) => {
                let mut b = [0u8; 32];
                hex::decode_to_slice(s, &mut b).expect("checked hex");
                Ok(b)
            }
            Value::String(s) => {
                Err(FilterError(format!("'{key}' values must be 64 lowercase hex characters, got \"{}\"", truncate(s))))
            }
            other => Err(FilterError(format!("'{key}' values must be strings, got {}", json_type(other)))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn timestamp(key: &str, value: &Value) -> Result<u64, FilterError> {
    value.as_u64().ok_or_else(|| FilterError(format!("'{key}' must be a non-negative integer, got {value}")))
}

/// 64 lowercase hexadecimal characters (NIP-01 ids and public keys).
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= 70 { s.to_owned() } else { format!("{}...", s.chars().take(67).collect::<String>()) }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
    use nostr::key::Keys;
    use nostr::types::Timestamp;
    use serde_json::json;

    const LIMITS: FilterLimits = FilterLimits { max_values: 1000 };

    fn parse(v: Value) -> Result<Filter, FilterError> {
        Filter::parse(&v, LIMITS)
    }

    fn event(keys: &Keys, kind: u16, created_at: u64, tags: Vec<Vec<&str>>) -> Event {
        let tags = tags.into_iter().map(|t| Tag::parse(t).unwrap());
        EventBuilder::new(Kind::from(kind), "hello")
            .tags(tags)
            .custom_created_at(Timestamp::from(created_at))
            .finalize(keys)
            .unwrap()
    }

    #[test]
    fn empty_filter_matches_everything() {
        let keys = Keys::generate();
        assert!(filter_matches(&parse(json!({})).unwrap(), &event(&keys, 1, 10, vec![])));
    }

    #[test]
    fn fields_are_anded_and_values_ored() {
        let keys = Keys::generate();
        let other = Keys::generate();
        let e = event(&keys, 1, 100, vec![vec!["t", "nostr"], vec!["p", &"ab".repeat(32)]]);
        let pk = keys.public_key().to_hex();
        let ok = parse(json!({"authors": [other.public_key().to_hex(), pk], "kinds": [7, 1], "#t": ["x", "nostr"]}))
            .unwrap();
        assert!(filter_matches(&ok, &e));
        let wrong_kind = parse(json!({"authors": [pk], "kinds": [7]})).unwrap();
        assert!(!filter_matches(&wrong_kind, &e));
        let wrong_tag = parse(json!({"authors": [pk], "#t": ["rust"]})).unwrap();
        assert!(!filter_matches(&wrong_tag, &e));
        let two_tags = parse(json!({"#t": ["nostr"], "#p": ["ab".repeat(32)]})).unwrap();
        assert!(filter_matches(&two_tags, &e));
        let missing_tag = parse(json!({"#t": ["nostr"], "#e": ["ab".repeat(32)]})).unwrap();
        assert!(!filter_matches(&missing_tag, &e));
        let by_id = parse(json!({"ids": [e.id.to_hex()]})).unwrap();
        assert!(filter_matches(&by_id, &e));
    }

    #[test]
    fn since_and_until_are_inclusive() {
        let keys = Keys::generate();
        let e = event(&keys, 1, 100, vec![]);
        assert!(filter_matches(&parse(json!({"since": 100, "until": 100})).unwrap(), &e));
        assert!(!filter_matches(&parse(json!({"since": 101})).unwrap(), &e));
        assert!(!filter_matches(&parse(json!({"until": 99})).unwrap(), &e));
    }

    #[test]
    fn tag_filter_uses_the_first_value_only_and_exact_single_letter_names() {
        let keys = Keys::generate();
        let e = event(&keys, 1, 1, vec![vec!["t", "a", "b"], vec!["tt", "c"]]);
        assert!(filter_matches(&parse(json!({"#t": ["a"]})).unwrap(), &e));
        assert!(!filter_matches(&parse(json!({"#t": ["b"]})).unwrap(), &e));
        assert!(!filter_matches(&parse(json!({"#t": ["c"]})).unwrap(), &e));
    }

    #[test]
    fn excluded_kinds_never_match() {
        let keys = Keys::generate();
        let f = parse(json!({})).unwrap().without_kinds(&[443]);
        assert!(!filter_matches(&f, &event(&keys, 443, 1, vec![])));
        assert!(filter_matches(&f, &event(&keys, 1, 1, vec![])));
        let f = parse(json!({"kinds": [1, 443]})).unwrap().without_kinds(&[443]);
        assert_eq!(f.kinds, Some(vec![1]));
        assert!(parse(json!({"kinds": [443]})).unwrap().without_kinds(&[443]).matches_nothing());
    }

    #[test]
    fn empty_lists_match_nothing() {
        let f = parse(json!({"kinds": []})).unwrap();
        assert!(f.matches_nothing());
        let keys = Keys::generate();
        assert!(!filter_matches(&f, &event(&keys, 1, 1, vec![])));
        assert!(parse(json!({"since": 5, "until": 4})).unwrap().matches_nothing());
    }

    #[test]
    fn malformed_filters_are_refused_with_a_reason() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({"ids": ["abc"]}), "64 lowercase hex"),
            (json!({"ids": ["AB".repeat(32)]}), "64 lowercase hex"),
            (json!({"authors": "x"}), "must be an array"),
            (json!({"authors": [1]}), "must be strings"),
            (json!({"#e": ["zz"]}), "64 lowercase hex"),
            (json!({"#p": ["12"]}), "64 lowercase hex"),
            (json!({"kinds": [70000]}), "0 to 65535"),
            (json!({"kinds": [-1]}), "0 to 65535"),
            (json!({"since": -5}), "non-negative integer"),
            (json!({"limit": "10"}), "non-negative integer"),
            (json!({"search": 1}), "'search' must be a string"),
            (json!({"#emoji": ["x"]}), "unsupported filter field"),
            (json!({"#t": [1]}), "must be strings"),
        ];
        for (input, expected) in cases {
            let err = parse(input.clone()).unwrap_err().0;
            assert!(err.contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn value_lists_are_bounded() {
        let many: Vec<String> = (0..1001).map(|i| format!("{i:064x}")).collect();
        let err = parse(json!({"authors": many})).unwrap_err().0;
        assert!(err.contains("at most 1000"), "{err}");
        let exactly: Vec<String> = (0..1000).map(|i| format!("{i:064x}")).collect();
        assert_eq!(parse(json!({"authors": exactly})).unwrap().authors.unwrap().len(), 1000);
    }
}
