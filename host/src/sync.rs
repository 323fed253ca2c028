//! `wasm-relay sync URL`: this relay reconciles its events with another
//! relay's over NIP-77 (this relay is the negentropy client), then fetches
//! what it lacks (`down`) and sends what the other lacks (`up`).
//!
//! Runs inside the serving relay (asked through the operator socket) or in
//! the CLI's own process when no relay is serving the data directory.
//! Fetched events take the operator's write path ([`crate::intake`]): every
//! check of a client's event, the same writer, plugins' hooks. The local set
//! is every stored event matching the filter (the operator's own relay:
//! gift wraps and plugin-managed kinds included). With `info.secret_key`
//! set, the relay answers the other relay's NIP-42 challenge with its key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use negentropy::{Id, Negentropy, NegentropyStorageVector};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::filter::{Filter, FilterLimits};
use crate::intake::{self, Source};
use crate::relay::Relay;
use crate::store::{ReadAccess, WriteOutcome};

/// Which way events move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Fetch what the other relay has and this one lacks.
    Down,
    /// Send what this relay has and the other lacks.
    Up,
    /// Both.
    Both,
}

impl Direction {
    fn down(self) -> bool {
        matches!(self, Direction::Down | Direction::Both)
    }
    fn up(self) -> bool {
        matches!(self, Direction::Up | Direction::Both)
    }
}

/// Where a sync stands; reported as it goes and at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// `reconciling`, `fetching`, `sending` or `done`.
    pub phase: String,
    /// Events matching the filter here.
    pub local_events: u64,
    /// The key this relay authenticated as to the other (NIP-42, with
    /// `info.secret_key`), if the other relay asked and accepted.
    pub authenticated_as: Option<String>,
    /// Negentropy round trips and the bytes of `NEG-*` messages both ways.
    pub rounds: u64,
    pub negentropy_bytes: u64,
    /// Ids only the other relay has, and only this one has.
    pub need: u64,
    pub have: u64,
    /// Down: events received, stored, already present, refused here (by
    /// NIP-01 prefix in `refusals`).
    pub fetched: u64,
    /// Bytes of the fetched events' JSON.
    pub fetched_bytes: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Up: events sent, accepted and refused by the other relay.
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub refusals: HashMap<String, u64>,
}

/// Why a sync could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the filter is not usable: {0}")]
    Filter(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the other relay: {0}")]
    Peer(String),
    #[error("the other relay did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reading this relay's events: {0}")]
    Store(String),
    #[error("negentropy: {0}")]
    Protocol(String),
}

/// Negentropy frames this relay sends as a client: what nostr-sdk sends,
/// so any relay that serves nostr-sdk accepts them.
const FRAME_SIZE_LIMIT: u64 = 60_000;
/// Ids fetched per REQ; their events are then written at once.
const FETCH_BATCH: usize = 250;
/// Events sent to the other relay before waiting for their `OK`s.
const SENDS_IN_FLIGHT: usize = 100;
/// Times an event the other relay rate-limits is sent.
const SEND_ATTEMPTS: u32 = 6;
/// How long the other relay may stay silent.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reconciles with the relay at `url` over the events matching `filter` and
/// moves the difference in `direction`; `report` is called as it goes.
pub async fn run(
    relay: &Arc<Relay>,
    url: &str,
    filter: &Value,
    direction: Direction,
    report: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<SyncReport, SyncError> {
    let parsed = Filter::parse(filter, FilterLimits { max_values: relay.config.limits.max_filter_values })
        .map_err(|e| SyncError::Filter(e.to_string()))?;
    if parsed.search.is_some() {
        return Err(SyncError::Filter("a search (NIP-50) filter cannot be reconciled".into()));
    }
    let mut progress = SyncReport { phase: "reconciling".into(), ..Default::default() };
    let items = local_set(relay, parsed).await?;
    progress.local_events = items.len() as u64;
    report(&progress);

    let mut socket = connect(url).await?;
    if let Some(keys) = relay_keys(relay)? {
        progress.authenticated_as = authenticate(&mut socket, url, &keys).await?;
    }
    let (have, need) = reconcile(&mut socket, filter, items, &mut progress, report).await?;
    progress.have = have.len() as u64;
    progress.need = need.len() as u64;
    if direction.down() {
        progress.phase = "fetching".into();
        report(&progress);
        fetch(relay, &mut socket, &need, &mut progress, report).await?;
    }
    if direction.up() {
        progress.phase = "sending".into();
        report(&progress);
        send(relay, &mut socket, &have, &mut progress, report).await?;
    }
    let _ = socket.close(None).await;
    progress.phase = "done".into();
    report(&progress);
    Ok(progress)
}

/// `(created_at, id)` of every local event matching `filter`, at most
/// `negentropy.max_records`, read on the blocking pool.
async fn local_set(relay: &Arc<Relay>, filter: Filter) -> Result<Vec<(u64, [u8; 32])>, SyncError> {
    let store = relay.store.clone();
    let max = relay.config.negentropy.max_records;
    let slot = relay.heavy_reads.clone().acquire_owned().await;
    let items = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut items = Vec::new();
        let mut too_many = false;
        store
            .visit_refs(&filter, &ReadAccess::trusted(crate::event::unix_now()), &mut |created_at, id| {
                too_many = items.len() >= max;
                if !too_many {
                    items.push((created_at, id));
                }
                !too_many
            })
            .map_err(|e| SyncError::Store(e.to_string()))?;
        if too_many {
            return Err(SyncError::TooLarge(format!(
                "more than {max} local events match the filter (negentropy.max_records); \
                 narrow it (since/until, kinds) and sync in parts"
            )));
        }
        Ok(items)
    })
    .await
    .map_err(|e| SyncError::Store(e.to_string()))??;
    Ok(items)
}

async fn connect(url: &str) -> Result<Socket, SyncError> {
    // wss:// needs a TLS provider; several are compiled in, so name one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    match tokio::time::timeout(REPLY_TIMEOUT, connect).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(e)) => Err(SyncError::Connect { url: url.into(), reason: e.to_string() }),
        Err(_) => Err(SyncError::Connect { url: url.into(), reason: "timed out".into() }),
    }
}

/// The relay's own key (`info.secret_key`), if it has one.
fn relay_keys(relay: &Relay) -> Result<Option<nostr::key::Keys>, SyncError> {
    let Some(secret) = &relay.config.info.secret_key else { return Ok(None) };
    nostr::key::Keys::parse(secret.trim())
        .map(Some)
        .map_err(|e| SyncError::Protocol(format!("info.secret_key is not a secret key: {e}")))
}

/// How long a relay that asks for NIP-42 takes to send its challenge.
const CHALLENGE_WAIT: Duration = Duration::from_secs(2);

/// NIP-42 with the relay's own key: if the other relay sends a challenge
/// when the connection opens (within `CHALLENGE_WAIT`), answers it and
/// waits for the verdict. A relay that sends none, or refuses, is synced
/// anonymously; what it shows only to authenticated readers (an operator's
/// allow-list naming this relay's key, gift wraps to it) then stays out.
async fn authenticate(socket: &mut Socket, url: &str, keys: &nostr::key::Keys) -> Result<Option<String>, SyncError> {
    use nostr::event::{EventBuilder, FinalizeEvent, Kind, Tag};
    let challenge = loop {
        let frame = match tokio::time::timeout(CHALLENGE_WAIT, socket.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(frame)) => frame.map_err(|e| SyncError::Peer(e.to_string()))?,
        };
        let Message::Text(text) = frame else { continue };
        let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(&text) else { continue };
        if parts.first().and_then(Value::as_str) == Some("AUTH")
            && let Some(challenge) = parts.get(1).and_then(Value::as_str)
        {
            break challenge.to_owned();
        }
    };
    let tags = [Tag::parse(["challenge", challenge.as_str()]), Tag::parse(["relay", url])];
    let tags: Vec<Tag> = tags.into_iter().collect::<Result<_, _>>().map_err(|e| SyncError::Protocol(e.to_string()))?;
    let event = EventBuilder::new(Kind::from(crate::auth::CLIENT_AUTH_KIND), "")
        .tags(tags)
        .finalize(keys)
        .map_err(|e| SyncError::Protocol(format!("signing the NIP-42 answer: {e}")))?;
    let id = event.id.to_hex();
    let answer = format!("[\"AUTH\",{}]", serde_json::to_string(&event).expect("events serialize"));
    socket.send(Message::Text(answer.into())).await.map_err(|e| SyncError::Peer(e.to_string()))?;
    loop {
        let message = next_message(socket).await?;
        if message[0] == "OK" && message.get(1).and_then(Value::as_str) == Some(id.as_str()) {
            if message.get(2).and_then(Value::as_bool) == Some(true) {
                return Ok(Some(keys.public_key().to_hex()));
            }
            let reason = message.get(3).map(Value::to_string).unwrap_or_default();
            tracing::info!(%reason, "sync: the other relay refused this relay's NIP-42 answer");
            return Ok(None);
        }
    }
}

/// The next message from the other relay as a JSON array, skipping what a
/// sync does not use (`AUTH` challenges, pings).
async fn next_message(socket: &mut Socket) -> Result<Vec<Value>, SyncError> {
    loop {
        let frame = tokio::time::timeout(REPLY_TIMEOUT, socket.next())
            .await
            .map_err(|_| SyncError::Timeout(REPLY_TIMEOUT))?
            .ok_or_else(|| SyncError::Peer("closed the connection".into()))?
            .map_err(|e| SyncError::Peer(e.to_string()))?;
        let text = match frame {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(SyncError::Peer(format!("closed the connection: {frame:?}"))),
            _ => continue,
        };
        let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(&text) else { continue };
        match parts.first().and_then(Value::as_str) {
            Some("AUTH") | None => continue,
            Some("NOTICE") => {
                let notice = parts.get(1).map(Value::to_string).unwrap_or_default();
                tracing::info!(%notice, "sync: the other relay says");
                continue;
            }
            _ => return Ok(parts),
        }
    }
}

async fn send_json(socket: &mut Socket, message: Value) -> Result<usize, SyncError> {
    let text = message.to_string();
    let n = text.len();
    socket.send(Message::Text(text.into())).await.map_err(|e| SyncError::Peer(e.to_string()))?;
    Ok(n)
}

/// Runs the negentropy exchange: `(ids only here, ids only there)`.
async fn reconcile(
    socket: &mut Socket,
    filter: &Value,
    items: Vec<(u64, [u8; 32])>,
    progress: &mut SyncReport,
    report: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(Vec<[u8; 32]>, Vec<[u8; 32]>), SyncError> {
    let protocol = |e: negentropy::Error| SyncError::Protocol(e.to_string());
    let mut storage = NegentropyStorageVector::with_capacity(items.len());
    for (created_at, id) in items {
        storage.insert(created_at, Id::from_byte_array(id)).map_err(protocol)?;
    }
    storage.seal().map_err(protocol)?;
    let mut engine = Negentropy::owned(storage, FRAME_SIZE_LIMIT).map_err(protocol)?;
    let sub = format!("sync-{}", hex::encode(rand::random::<[u8; 4]>()));
    let first = engine.initiate().map_err(protocol)?;
    progress.negentropy_bytes += send_json(socket, json!(["NEG-OPEN", sub, filter, hex::encode(first)])).await? as u64;
    let (mut have, mut need) = (Vec::new(), Vec::new());
    loop {
        let message = next_message(socket).await?;
        if message.get(1).and_then(Value::as_str) != Some(sub.as_str()) {
            continue;
        }
        let text = message.get(2).and_then(Value::as_str).unwrap_or_default();
        match message[0].as_str() {
            Some("NEG-ERR") => return Err(SyncError::Peer(text.to_owned())),
            Some("NEG-MSG") => {}
            _ => continue,
        }
        progress.rounds += 1;
        progress.negentropy_bytes += text.len() as u64;
        let bytes = hex::decode(text).map_err(|e| SyncError::Protocol(format!("a NEG-MSG is not hex: {e}")))?;
        let (mut have_ids, mut need_ids) = (Vec::new(), Vec::new());
        let next = engine.reconcile_with_ids(&bytes, &mut have_ids, &mut need_ids).map_err(protocol)?;
        have.extend(have_ids.into_iter().map(Id::to_bytes));
        need.extend(need_ids.into_iter().map(Id::to_bytes));
        progress.have = have.len() as u64;
        progress.need = need.len() as u64;
        report(progress);
        match next {
            Some(message) => {
                progress.negentropy_bytes +=
                    send_json(socket, json!(["NEG-MSG", sub, hex::encode(message)])).await? as u64;
            }
            None => {
                send_json(socket, json!(["NEG-CLOSE", sub])).await?;
                return Ok((have, need));
            }
        }
    }
}

/// Down: fetches `need` by id and writes each event here.
async fn fetch(
    relay: &Arc<Relay>,
    socket: &mut Socket,
    need: &[[u8; 32]],
    progress: &mut SyncReport,
    report: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(), SyncError> {
    for (n, batch) in need.chunks(FETCH_BATCH).enumerate() {
        let sub = format!("sync-down-{n}");
        let ids: Vec<String> = batch.iter().map(hex::encode).collect();
        send_json(socket, json!(["REQ", sub, {"ids": ids, "limit": batch.len()}])).await?;
        let mut writes = FuturesUnordered::new();
        loop {
            let message = next_message(socket).await?;
            if message.get(1).and_then(Value::as_str) != Some(sub.as_str()) {
                continue;
            }
            match message[0].as_str() {
                Some("EVENT") => {
                    progress.fetched += 1;
                    let json = message.get(2).map(Value::to_string).unwrap_or_default();
                    progress.fetched_bytes += json.len() as u64;
                    let relay = relay.clone();
                    // Written together after EOSE: the writer groups them into commits.
                    writes.push(async move { intake::write(&relay, &json, Source::Sync).await });
                }
                Some("EOSE") => break,
                Some("CLOSED") => {
                    return Err(SyncError::Peer(format!(
                        "refused to serve events by id: {}",
                        message.get(2).and_then(Value::as_str).unwrap_or_default()
                    )));
                }
                _ => {}
            }
        }
        send_json(socket, json!(["CLOSE", sub])).await?;
        while let Some(outcome) = writes.next().await {
            count_write(progress, outcome);
        }
        report(progress);
    }
    Ok(())
}

fn count_write(progress: &mut SyncReport, outcome: Result<WriteOutcome, crate::refusal::Refusal>) {
    match outcome {
        Ok(WriteOutcome::Stored) => progress.stored += 1,
        Ok(WriteOutcome::Duplicate) => progress.duplicates += 1,
        Ok(other) => {
            progress.refused += 1;
            *progress.refusals.entry(format!("{other:?}").to_lowercase()).or_default() += 1;
        }
        Err(refusal) => {
            progress.refused += 1;
            *progress.refusals.entry(refusal.kind.prefix().to_owned()).or_default() += 1;
        }
    }
}

/// Up: sends the events in `have` to the other relay and counts its `OK`s.
/// Events it refuses with `rate-limited:` are sent again after a pause
/// (1 s, doubling, at most `SEND_ATTEMPTS` times): a peer's rate limits
/// slow a sync down rather than lose events.
async fn send(
    relay: &Arc<Relay>,
    socket: &mut Socket,
    have: &[[u8; 32]],
    progress: &mut SyncReport,
    report: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(), SyncError> {
    for batch in have.chunks(SENDS_IN_FLIGHT) {
        let store = relay.store.clone();
        let ids = batch.to_vec();
        let mut events = tokio::task::spawn_blocking(move || {
            ids.iter().filter_map(|id| store.get(id).transpose()).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| SyncError::Store(e.to_string()))?
        .map_err(|e| SyncError::Store(e.to_string()))?;
        let mut pause = Duration::from_secs(1);
        for attempt in 1..=SEND_ATTEMPTS {
            let mut waiting: HashMap<String, usize> = HashMap::new();
            for (i, e) in events.iter().enumerate() {
                let text = format!("[\"EVENT\",{}]", e.json);
                socket.send(Message::Text(text.into())).await.map_err(|e| SyncError::Peer(e.to_string()))?;
                waiting.insert(hex::encode(e.id), i);
                if attempt == 1 {
                    progress.sent += 1;
                }
            }
            let mut again = Vec::new();
            while !waiting.is_empty() {
                let message = next_message(socket).await?;
                if message[0] != "OK" {
                    continue;
                }
                let Some(index) = message.get(1).and_then(Value::as_str).and_then(|id| waiting.remove(id)) else {
                    continue;
                };
                let reason = message.get(3).and_then(Value::as_str).unwrap_or_default();
                if message.get(2).and_then(Value::as_bool) == Some(true) {
                    progress.accepted += 1;
                } else if reason.starts_with("rate-limited:") && attempt < SEND_ATTEMPTS {
                    again.push(index);
                } else {
                    progress.rejected += 1;
                    tracing::info!(id = %hex::encode(events[index].id), reason, "sync: the other relay refused an event");
                }
            }
            if again.is_empty() {
                break;
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            again.sort_unstable();
            events = again.into_iter().map(|i| events[i].clone()).collect();
        }
        report(progress);
    }
    Ok(())
}
