//! The query engine: turns a [`Filter`] into index range scans, merges them
//! lazily in NIP-01 order, and re-checks candidates the index does not fully
//! decide. A query with `limit` reads about `limit` entries per range.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::event::{KindClass, kind_class};
use crate::filter::Filter;

use super::keys;

/// How a filter is answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Point lookups by id.
    Ids(Vec<[u8; 32]>),
    /// Point lookups of replaceable slots (`keys::address_key`): a filter
    /// naming authors and only replaceable kinds has at most one match per
    /// author and kind.
    Slots(Vec<Vec<u8>>),
    /// Range scans over index prefixes, merged. `covered`: every condition of
    /// the filter is decided by the index, so candidates need no re-check.
    Scan { prefixes: Vec<Vec<u8>>, covered: bool },
}

/// Beyond this many author x kind slots, scan per author instead.
const MAX_AUTHOR_KIND_SLOTS: usize = 4096;

pub fn plan(filter: &Filter) -> Plan {
    if let Some(ids) = &filter.ids {
        return Plan::Ids(ids.clone());
    }
    let has_tags = !filter.tags.is_empty();
    if let Some(authors) = &filter.authors {
        if let Some(kinds) = &filter.kinds
            && !kinds.is_empty()
            && kinds.iter().all(|k| kind_class(*k) == KindClass::Replaceable)
            && authors.len() * kinds.len() <= MAX_AUTHOR_KIND_SLOTS
        {
            let slots = authors.iter().flat_map(|a| kinds.iter().map(move |k| keys::address_key(a, *k, ""))).collect();
            return Plan::Slots(slots);
        }
        // Kinds are decided by the index value, without reading the event.
        let prefixes = authors.iter().map(keys::author_prefix).collect();
        return Plan::Scan { prefixes, covered: !has_tags };
    }
    if has_tags {
        // The tag with the fewest values gives the fewest ranges; the rest are re-checked.
        let (letter, values) = filter.tags.iter().min_by_key(|(_, v)| v.len()).expect("has tags");
        let mut exact = true;
        let prefixes = values
            .iter()
            .map(|v| {
                let (p, e) = keys::tag_prefix(*letter as u8, v);
                exact &= e;
                p
            })
            .collect();
        let covered = exact && filter.tags.len() == 1 && filter.kinds.is_none();
        return Plan::Scan { prefixes, covered };
    }
    if let Some(kinds) = &filter.kinds {
        return Plan::Scan { prefixes: kinds.iter().map(|k| keys::kind_prefix(*k)).collect(), covered: true };
    }
    Plan::Scan { prefixes: vec![keys::created_prefix()], covered: true }
}

/// Key bounds `[lower, upper]` of one prefix for the filter's `since`/`until`.
pub fn bounds(prefix: &[u8], filter: &Filter) -> (Vec<u8>, Vec<u8>) {
    let mut lower = prefix.to_vec();
    lower.extend_from_slice(&(u64::MAX - filter.until.unwrap_or(u64::MAX)).to_be_bytes());
    let mut upper = prefix.to_vec();
    upper.extend_from_slice(&(u64::MAX - filter.since.unwrap_or(0)).to_be_bytes());
    upper.extend_from_slice(&[0xff; 32]);
    (lower, upper)
}

/// One index entry as a scan yields it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub created_at: u64,
    pub id: [u8; 32],
    pub kind: u16,
    pub expiration: Option<u64>,
    /// The serial of its body, when the index value carries it.
    pub serial: Option<u64>,
}

/// An index entry's key suffix and its value.
type RawEntry = ([u8; 40], keys::IndexValue);
type HeapItem = Reverse<([u8; 40], usize, keys::IndexValue)>;

/// Merges several iterators of `(index key, index value)`, each already in
/// NIP-01 order, into one stream of entries in NIP-01 order without duplicates.
pub struct MergedScan<I> {
    iters: Vec<I>,
    heap: BinaryHeap<HeapItem>,
    last: Option<[u8; 40]>,
}

impl<I, E, K, V> MergedScan<I>
where
    I: Iterator<Item = Result<(K, V), E>>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    pub fn new(mut iters: Vec<I>) -> Result<Self, E> {
        let mut heap = BinaryHeap::with_capacity(iters.len());
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some((suffix, value)) = next_item(it)? {
                heap.push(Reverse((suffix, i, value)));
            }
        }
        Ok(Self { iters, heap, last: None })
    }

    pub fn next_entry(&mut self) -> Result<Option<IndexEntry>, E> {
        while let Some(Reverse((suffix, i, value))) = self.heap.pop() {
            if let Some((next, next_value)) = next_item(&mut self.iters[i])? {
                self.heap.push(Reverse((next, i, next_value)));
            }
            if self.last == Some(suffix) {
                continue; // the same event reached through two values of one tag
            }
            self.last = Some(suffix);
            let Some((created_at, id)) = keys::parse_suffix(&suffix) else { continue };
            let keys::IndexValue { kind, expiration, serial } = value;
            return Ok(Some(IndexEntry { created_at, id, kind, expiration, serial }));
        }
        Ok(None)
    }
}

/// The next entry's key suffix and value.
fn next_item<I, E, K, V>(it: &mut I) -> Result<Option<RawEntry>, E>
where
    I: Iterator<Item = Result<(K, V), E>>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    for entry in it.by_ref() {
        let (key, value) = entry?;
        let key = key.as_ref();
        if key.len() >= 40 {
            let mut s = [0u8; 40];
            s.copy_from_slice(&key[key.len() - 40..]);
            return Ok(Some((s, keys::parse_index_value(value.as_ref()))));
        }
    }
    Ok(None)
}

/// Merges per-filter streams, each in NIP-01 order, into one stream in
/// NIP-01 order in which an event matched by several filters appears once.
/// It holds one pending entry per stream, whatever the result size.
/// A stream's next entry in the merge: its NIP-01 order key and the stream.
type UnionItem = Reverse<((Reverse<u64>, [u8; 32]), usize)>;

pub struct UnionMerge<S: EntryStream> {
    streams: Vec<S>,
    heap: BinaryHeap<UnionItem>,
    pending: Vec<Option<S::Payload>>,
    last: Option<[u8; 32]>,
}

/// One event of a stream in NIP-01 order: `created_at`, id, and what the
/// stream carries with it.
pub type Ordered<T> = (u64, [u8; 32], T);

/// A stream of events in NIP-01 order.
pub trait EntryStream {
    type Payload;
    type Error;
    fn next_entry(&mut self) -> Result<Option<Ordered<Self::Payload>>, Self::Error>;
}

impl<S: EntryStream> UnionMerge<S> {
    pub fn new(mut streams: Vec<S>) -> Result<Self, S::Error> {
        let mut heap = BinaryHeap::with_capacity(streams.len());
        let mut pending = Vec::with_capacity(streams.len());
        for (i, s) in streams.iter_mut().enumerate() {
            match s.next_entry()? {
                Some((created_at, id, payload)) => {
                    heap.push(Reverse(((Reverse(created_at), id), i)));
                    pending.push(Some(payload));
                }
                None => pending.push(None),
            }
        }
        Ok(Self { streams, heap, pending, last: None })
    }

    /// The next `(created_at, id, payload)` of the union.
    pub fn next(&mut self) -> Result<Option<Ordered<S::Payload>>, S::Error> {
        while let Some(Reverse(((Reverse(created_at), id), i))) = self.heap.pop() {
            let payload = self.pending[i].take().expect("a heap item has its payload");
            if let Some((next_at, next_id, next)) = self.streams[i].next_entry()? {
                self.heap.push(Reverse(((Reverse(next_at), next_id), i)));
                self.pending[i] = Some(next);
            }
            if self.last == Some(id) {
                continue; // the same event matched by another filter
            }
            self.last = Some(id);
            return Ok(Some((created_at, id, payload)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: serde_json::Value) -> Filter {
        Filter::parse(&v, crate::filter::FilterLimits { max_values: 5000 }).unwrap()
    }

    #[test]
    fn chooses_the_narrowest_index() {
        let a = "aa".repeat(32);
        assert!(matches!(plan(&filter(json!({"ids": [a]}))), Plan::Ids(_)));
        match plan(&filter(json!({"authors": [a], "kinds": [1, 7]}))) {
            Plan::Scan { prefixes, covered } => {
                assert_eq!(prefixes.len(), 1);
                assert_eq!(prefixes[0][0], keys::AUTHOR);
                assert!(covered, "kinds are decided by the index value");
            }
            p => panic!("{p:?}"),
        }
        match plan(&filter(json!({"authors": [a], "kinds": [0, 10002]}))) {
            Plan::Slots(slots) => {
                assert_eq!(
                    slots,
                    vec![keys::address_key(&[0xaa; 32], 0, ""), keys::address_key(&[0xaa; 32], 10002, "")]
                );
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(plan(&filter(json!({"authors": [a], "kinds": [0, 1]}))), Plan::Scan { .. }));
        match plan(&filter(json!({"#t": ["x"], "kinds": [1]}))) {
            Plan::Scan { prefixes, covered } => {
                assert_eq!(prefixes[0][0], keys::TAG);
                assert!(!covered);
            }
            p => panic!("{p:?}"),
        }
        match plan(&filter(json!({"#t": ["x", "y"], "#p": [a]}))) {
            Plan::Scan { prefixes, covered } => {
                assert_eq!(prefixes.len(), 1, "the tag with fewer values");
                assert!(!covered);
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(
            plan(&filter(json!({"since": 5}))),
            Plan::Scan { prefixes: vec![keys::created_prefix()], covered: true }
        );
    }

    #[test]
    fn merge_is_ordered_and_deduplicated() {
        let k = |ts: u64, id: u8| -> Result<(Vec<u8>, Vec<u8>), ()> {
            let mut v = vec![b'T'];
            v.extend_from_slice(&keys::order_suffix(ts, &[id; 32]));
            Ok((v, vec![0, 1]))
        };
        let a = vec![k(30, 1), k(20, 1), k(10, 1)].into_iter();
        let b = vec![k(25, 2), k(20, 0), k(20, 1)].into_iter();
        let mut m = MergedScan::new(vec![a, b]).unwrap();
        let mut got = vec![];
        while let Some(e) = m.next_entry().unwrap() {
            assert_eq!((e.kind, e.expiration), (1, None));
            got.push((e.created_at, e.id[0]));
        }
        assert_eq!(got, vec![(30, 1), (25, 2), (20, 0), (20, 1), (10, 1)]);
    }
}
