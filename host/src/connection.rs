//! One client connection: reads NIP-01 messages, answers each EVENT with one
//! `OK`, each REQ with stored events, `EOSE` and live events (or `CLOSED`),
//! each COUNT with `COUNT` (or `CLOSED`), and anything unreadable with a
//! `NOTICE`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use nostr::event::Event;
use serde_json::value::RawValue;

use crate::config::GiftWrapPolicy;
use crate::event::GIFT_WRAP;
use crate::event::{AcceptedEvent, KindClass, is_vanish_request_for, kind_class, read_event, unix_now};
use crate::fanout::{ConnId, Delivery};
use crate::filter::{Filter, FilterLimits, any_filter_matches};
use crate::ingest::WriteResult;
use crate::message::{self, ClientMessage, Parsed};
use crate::metrics::Verb;
use crate::plugin::{Caller, ReadPurpose};
use crate::refusal::{Refusal, RefusalKind};
use crate::relay::Relay;
use crate::store::{GiftWrapAccess, ReadAccess, StoredEvent, WriteOutcome};

/// What this connection remembers of one of its subscriptions.
struct LocalSub {
    generation: u64,
    /// Ids the initial query sent, so a live delivery of an event written
    /// while the query ran is not sent twice. Kept only until every write
    /// sequenced up to `seq_mark` has been delivered (see
    /// [`Connection::release_sent_sets`]).
    sent: Option<HashSet<[u8; 32]>>,
    seq_mark: u64,
}

type PendingOk = std::pin::Pin<Box<dyn std::future::Future<Output = (String, WriteResult)> + Send>>;

pub struct Connection<S> {
    id: ConnId,
    remote: SocketAddr,
    /// NIP-42 challenge sent on connect.
    challenge: String,
    /// Keys this connection proved with NIP-42.
    authed: Vec<[u8; 32]>,
    /// This connection as plugins see it.
    caller: Caller,
    relay: Arc<Relay>,
    ws: WebSocketStream<S>,
    subs: HashMap<Arc<str>, LocalSub>,
    /// Subscriptions still holding their `sent` set.
    dedup_pending: usize,
    /// Replies waiting to be flushed at the end of the current step.
    unflushed: bool,
    /// Open NIP-77 reconciliations (their own id space, apart from REQs).
    negentropy: crate::negentropy::Sessions,
}

enum Step {
    Continue,
    Close,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub fn new(relay: Arc<Relay>, ws: WebSocketStream<S>, remote: SocketAddr) -> Self {
        let id = relay.next_connection_id();
        let caller = Caller::new(id, remote);
        let challenge = hex::encode(rand::random::<[u8; 16]>());
        Self {
            id,
            remote,
            challenge,
            authed: vec![],
            caller,
            relay,
            ws,
            subs: HashMap::new(),
            dedup_pending: 0,
            unflushed: false,
            negentropy: Default::default(),
        }
    }

    /// Serves the connection until it ends. `headers` are the upgrade
    /// request's, for plugins' `on-connect`.
    pub async fn run(mut self, headers: Vec<(String, String)>) {
        let limits = self.relay.config.limits.clone();
        let (live_tx, mut live_rx) = mpsc::channel::<Delivery>(limits.send_queue_capacity);
        let overflowed = Arc::new(Notify::new());
        self.relay.fanout.add_connection(self.id, live_tx, overflowed.clone());
        self.relay.metrics.connections_total.inc();
        self.relay.metrics.connections_open.inc();
        tracing::debug!(conn = self.id, remote = %self.remote, "connected");
        let mut pending: FuturesUnordered<PendingOk> = FuturesUnordered::new();
        let mut shutdown = self.relay.shutdown.subscribe();
        let idle_timeout = Duration::from_secs(limits.idle_timeout_seconds);
        // Pings at half the idle timeout: a live client answers in time.
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + idle_timeout / 2, idle_timeout / 2);
        let mut last_heard = tokio::time::Instant::now();
        let result: Result<(), WsError> = async {
            if self.relay.plugins.wants_on_connect()
                && let Err(refusal) = self.relay.plugins.on_connect(&self.caller, &headers).await
            {
                tracing::info!(target: "wasm_relay::refused", conn = self.id, remote = %self.remote, reason = ?refusal, "connection refused by a plugin");
                self.feed(message::notice_refused(&refusal)).await?;
                self.flush().await?;
                return Ok(());
            }
            let challenge = message::auth(&self.challenge);
            self.feed(challenge).await?;
            self.flush().await?;
            if *shutdown.borrow_and_update() {
                self.say_goodbye().await?;
                self.flush().await?;
                return Ok(());
            }
            loop {
                let step = tokio::select! {
                    biased;
                    // Only ever turns true; the sender lives as long as the relay.
                    _ = shutdown.changed() => {
                        self.say_goodbye().await?;
                        Step::Close
                    }
                    _ = ping.tick() => {
                        if last_heard.elapsed() >= idle_timeout {
                            tracing::debug!(conn = self.id, remote = %self.remote, "closing: no frame within the idle timeout");
                            return Err(WsError::ConnectionClosed);
                        }
                        self.unflushed = true;
                        self.write(Message::Ping(Default::default())).await?;
                        self.close_idle_reconciliations().await?;
                        Step::Continue
                    }
                    _ = overflowed.notified() => {
                        self.relay.metrics.slow_disconnects.inc();
                        self.feed(message::notice_refused(&Refusal::error("this connection reads too slowly; closing it (reconnect and read faster)"))).await?;
                        Step::Close
                    }
                    Some((id, result)) = pending.next(), if !pending.is_empty() => {
                        self.count_write(&result);
                        self.feed(ok_reply(&id, result)).await?;
                        Step::Continue
                    }
                    Some(delivery) = live_rx.recv() => {
                        self.deliver(delivery).await?;
                        Step::Continue
                    }
                    frame = self.ws.next(), if pending.len() < limits.max_pending_events_per_connection => {
                        last_heard = tokio::time::Instant::now();
                        match frame {
                            None => Step::Close,
                            Some(Ok(frame)) => self.on_frame(frame, &mut pending).await?,
                            Some(Err(e)) => return Err(e),
                        }
                    }
                };
                if self.dedup_pending > 0 {
                    self.release_sent_sets(&live_rx);
                }
                // Batch writes while deliveries are queued; flush once the queue is drained.
                if self.unflushed && (live_rx.is_empty() || matches!(step, Step::Close)) {
                    self.flush().await?;
                }
                if let Step::Close = step {
                    // Answer what was already submitted before leaving.
                    while let Some((id, result)) = pending.next().await {
                        self.count_write(&result);
                        self.feed(ok_reply(&id, result)).await?;
                    }
                    self.flush().await?;
                    let _ = tokio::time::timeout(self.write_timeout(), self.ws.close(None)).await;
                    return Ok(());
                }
            }
        }
        .await;
        self.relay.fanout.remove_connection(self.id);
        self.relay.metrics.connections_open.dec();
        match result {
            Ok(()) | Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {}
            Err(WsError::Capacity(e)) => {
                tracing::info!(conn = self.id, remote = %self.remote, error = %e, "closing: frame over the size limit");
                let reason = format!("message too big: {e}");
                let frame = CloseFrame { code: CloseCode::Size, reason: reason.into() };
                let _ = tokio::time::timeout(self.write_timeout(), self.ws.close(Some(frame))).await;
            }
            Err(e) => tracing::debug!(conn = self.id, remote = %self.remote, error = %e, "connection ended"),
        }
    }

    fn count_write(&self, result: &WriteResult) {
        let outcome = match result {
            Ok(WriteOutcome::Stored) => "stored",
            Ok(WriteOutcome::Duplicate) | Ok(WriteOutcome::Superseded) => "duplicate",
            Ok(WriteOutcome::Deleted) | Ok(WriteOutcome::Vanished) => "blocked",
            Err(_) => "error",
        };
        self.relay.metrics.events.with_label_values(&[outcome]).inc();
    }

    fn count_refused_event(&self, refusal: &Refusal) {
        self.relay.metrics.events.with_label_values(&[refusal.kind.prefix()]).inc();
    }

    async fn feed(&mut self, text: String) -> Result<(), WsError> {
        self.unflushed = true;
        self.write(Message::Text(text.into())).await
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.relay.config.limits.write_timeout_seconds)
    }

    /// Queues a frame. A client that does not read eventually blocks the
    /// write; past the write timeout the connection is given up.
    async fn write(&mut self, message: Message) -> Result<(), WsError> {
        match tokio::time::timeout(self.write_timeout(), self.ws.feed(message)).await {
            Ok(r) => r,
            Err(_) => Err(self.stalled()),
        }
    }

    async fn flush(&mut self) -> Result<(), WsError> {
        self.unflushed = false;
        match tokio::time::timeout(self.write_timeout(), self.ws.flush()).await {
            Ok(r) => r,
            Err(_) => Err(self.stalled()),
        }
    }

    fn stalled(&self) -> WsError {
        self.relay.metrics.slow_disconnects.inc();
        tracing::info!(conn = self.id, remote = %self.remote, "closing: the client stopped reading (write timeout)");
        WsError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timeout"))
    }

    /// The relay is stopping: every open subscription is CLOSED and the
    /// client told why, before pending OKs are answered and the socket closed.
    async fn say_goodbye(&mut self) -> Result<(), WsError> {
        let subs: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for sub in subs {
            let refusal = Refusal::error("the relay is shutting down; reconnect and subscribe again");
            self.feed(message::closed_refused(&sub, &refusal)).await?;
        }
        self.feed(message::notice_refused(&Refusal::error("the relay is shutting down; reconnect in a moment"))).await
    }

    /// Drops the `sent` sets no longer needed: once every write sequenced up
    /// to a subscription's `seq_mark` has been broadcast and this
    /// connection's queue has been drained, no delivery can repeat its
    /// initial results.
    fn release_sent_sets(&mut self, live_rx: &mpsc::Receiver<Delivery>) {
        // The watermark is read first: deliveries up to it were queued before it moved.
        let delivered = self.relay.fanout.broadcast_watermark();
        if !live_rx.is_empty() {
            return;
        }
        for local in self.subs.values_mut() {
            if local.sent.is_some() && local.seq_mark <= delivered {
                local.sent = None;
                self.dedup_pending -= 1;
            }
        }
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), WsError> {
        let Some(local) = self.subs.get_mut(&d.sub_id) else { return Ok(()) };
        if local.generation != d.generation {
            return Ok(());
        }
        if d.seq > local.seq_mark {
            if local.sent.take().is_some() {
                self.dedup_pending -= 1;
            }
        } else if local.sent.as_ref().is_some_and(|s| s.contains(d.event.event.id.as_bytes())) {
            return Ok(()); // already sent by the initial query
        }
        let sub_json = message::json_string(&d.sub_id);
        self.relay.metrics.live_deliveries.inc();
        self.feed(message::event(&sub_json, &d.event.json)).await
    }

    async fn on_frame(&mut self, frame: Message, pending: &mut FuturesUnordered<PendingOk>) -> Result<Step, WsError> {
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(_) => {
                let refusal = Refusal::invalid("binary frames are not part of NIP-01; send JSON text frames");
                self.feed(message::notice_refused(&refusal)).await?;
                return Ok(Step::Continue);
            }
            Message::Close(_) => return Ok(Step::Close),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(Step::Continue),
        };
        let max = self.relay.config.limits.max_message_length;
        if text.len() > max {
            let reply = Refusal::invalid(format!("message is {} bytes; at most {max} are accepted", text.len()));
            match parse_event_id(&text) {
                Some(id) => self.feed(message::ok_refused(&id, &reply)).await?,
                None => self.feed(message::notice_refused(&reply)).await?,
            }
            return Ok(Step::Continue);
        }
        let parsed = message::parse_client_message(&text);
        let verb = match &parsed {
            Ok(Parsed::Message(ClientMessage::Event(_))) => Verb::Event,
            Ok(Parsed::BadFilters { .. }) | Ok(Parsed::Message(ClientMessage::Req { .. })) => Verb::Req,
            Ok(Parsed::Message(ClientMessage::Count { .. })) => Verb::Count,
            Ok(Parsed::Message(ClientMessage::Close { .. })) => Verb::Close,
            Ok(Parsed::Message(ClientMessage::Auth(_))) => Verb::Auth,
            Ok(Parsed::Message(ClientMessage::NegOpen { .. })) => Verb::NegOpen,
            Ok(Parsed::Message(ClientMessage::NegMsg { .. })) => Verb::NegMsg,
            Ok(Parsed::Message(ClientMessage::NegClose { .. })) => Verb::NegClose,
            Err(_) => Verb::Invalid,
        };
        self.relay.metrics.messages_by_verb[verb as usize].inc();
        match parsed {
            Err(e) => self.feed(message::notice_refused(&Refusal::invalid(e.to_string()))).await?,
            Ok(Parsed::BadFilters { sub_id, reason }) => {
                self.feed(message::closed_refused(&sub_id, &Refusal::invalid(reason))).await?
            }
            Ok(Parsed::Message(ClientMessage::Event(raw))) => self.on_event(raw, pending).await?,
            Ok(Parsed::Message(ClientMessage::Auth(raw))) => self.on_auth(raw).await?,
            Ok(Parsed::Message(ClientMessage::Req { sub_id, filters })) => self.on_req(sub_id, filters).await?,
            Ok(Parsed::Message(ClientMessage::Count { sub_id, filters })) => self.on_count(sub_id, filters).await?,
            Ok(Parsed::Message(ClientMessage::Close { sub_id })) => {
                self.relay.fanout.unsubscribe(self.id, &sub_id);
                self.forget_sub(&sub_id);
            }
            Ok(Parsed::Message(ClientMessage::NegOpen { sub_id, filter, message })) => {
                self.on_neg_open(sub_id, filter, message).await?
            }
            Ok(Parsed::Message(ClientMessage::NegMsg { sub_id, message })) => self.on_neg_msg(sub_id, message).await?,
            Ok(Parsed::Message(ClientMessage::NegClose { sub_id })) => self.negentropy.close(&sub_id),
        }
        Ok(Step::Continue)
    }

    async fn on_event(&mut self, raw: &RawValue, pending: &mut FuturesUnordered<PendingOk>) -> Result<(), WsError> {
        let now = unix_now();
        let event = match read_event(raw, &self.relay.config.limits, now) {
            Ok(event) => event,
            Err(rejected) => {
                self.count_refused_event(&rejected.refusal);
                tracing::info!(target: "wasm_relay::refused", conn = self.id, remote = %self.remote, reason = ?rejected.refusal, "event refused");
                let reply = match rejected.event_id {
                    Some(id) => message::ok_refused(&id, &rejected.refusal),
                    None => message::notice_refused(&rejected.refusal),
                };
                return self.feed(reply).await;
            }
        };
        let id = event.id.to_hex();
        if let Err(refusal) = self.admit(&event).await {
            self.count_refused_event(&refusal);
            tracing::info!(target: "wasm_relay::refused", conn = self.id, remote = %self.remote, event = %id, reason = ?refusal, "event refused");
            return self.feed(message::ok_refused(&id, &refusal)).await;
        }
        let mut accepted = AcceptedEvent::new(event);
        accepted.vanish_request = is_vanish_request_for(&accepted.event, &self.relay.config.server.public_url);
        let accepted = Arc::new(accepted);
        if kind_class(accepted.event.kind.as_u16()) == KindClass::Ephemeral {
            self.relay.fanout.broadcast(0, &accepted);
            if let Some(replicator) = &self.relay.replicator {
                replicator.publish_ephemeral(accepted.clone());
            }
            self.relay.metrics.events.with_label_values(&["ephemeral"]).inc();
            return self.feed(message::ok(&id, true, "")).await;
        }
        let rx: oneshot::Receiver<WriteResult> = self.relay.ingest.submit(accepted).await;
        pending.push(Box::pin(async move {
            let result = rx.await.unwrap_or_else(|_| Err("the event writer stopped".into()));
            (id, result)
        }));
        Ok(())
    }

    /// The relay's rules for a verified event, then the plugins'. `Err` is
    /// the `OK false` message.
    async fn admit(&mut self, event: &Event) -> Result<(), Refusal> {
        if event.kind.as_u16() == crate::auth::CLIENT_AUTH_KIND {
            return Err(Refusal::invalid(
                "kind 22242 authenticates a connection; send it in an AUTH message, not EVENT",
            ));
        }
        self.relay.policy.check_write(self.remote.ip(), event)?;
        if event.is_protected() {
            let author = event.pubkey.to_bytes();
            if self.authed.is_empty() {
                return Err(Refusal::auth_required(
                    "this event is protected (NIP-70); authenticate as its author to publish it",
                ));
            }
            if !self.authed.contains(&author) {
                return Err(Refusal::restricted("this event is protected (NIP-70) and only its author may publish it"));
            }
        }
        if !self.relay.plugins.is_empty() {
            self.relay.plugins.on_event(&self.caller, event).await?;
        }
        Ok(())
    }

    /// NIP-42: checks a kind 22242 answer to this connection's challenge.
    async fn on_auth(&mut self, raw: &RawValue) -> Result<(), WsError> {
        let now = unix_now();
        let event = match read_event(raw, &self.relay.config.limits, now) {
            Ok(e) => e,
            Err(rejected) => {
                let reply = match rejected.event_id {
                    Some(id) => message::ok_refused(&id, &rejected.refusal),
                    None => message::notice_refused(&rejected.refusal),
                };
                return self.feed(reply).await;
            }
        };
        let id = event.id.to_hex();
        let public_url = &self.relay.config.server.public_url;
        if let Err(refusal) = crate::auth::check_client_auth(&event, &self.challenge, public_url, now) {
            return self.feed(message::ok_refused(&id, &refusal)).await;
        }
        let pubkey = event.pubkey.to_bytes();
        let max_identities = self.relay.config.limits.max_auth_identities;
        if !self.authed.contains(&pubkey) && self.authed.len() >= max_identities {
            let reply = Refusal::restricted(format!(
                "this connection is already authenticated as {max_identities} keys, the most allowed; \
                 open another connection"
            ));
            return self.feed(message::ok_refused(&id, &reply)).await;
        }
        if !self.authed.contains(&pubkey) {
            if let Err(refusal) = self.relay.plugins.on_auth(&self.caller, &event.pubkey.to_hex()).await {
                return self.feed(message::ok_refused(&id, &refusal)).await;
            }
            self.authed.push(pubkey);
            self.caller.authed_pubkeys.push(event.pubkey.to_hex());
            self.relay.fanout.set_authed(self.id, self.authed.clone());
        }
        tracing::debug!(conn = self.id, pubkey = %event.pubkey, "authenticated");
        self.feed(message::ok(&id, true, "")).await
    }

    /// What this connection may read.
    fn read_access(&self) -> ReadAccess {
        let gift_wraps = match self.relay.config.nips.gift_wrap_policy {
            GiftWrapPolicy::Open => GiftWrapAccess::All,
            GiftWrapPolicy::RecipientOnly => GiftWrapAccess::Recipients(self.authed.clone()),
        };
        ReadAccess { now: unix_now(), gift_wraps }
    }

    /// Relay-level checks of a REQ/COUNT: rate limits, and gift wraps asked
    /// for explicitly by an unauthenticated connection. `Err` is the CLOSED text.
    fn admit_read(&self, filters: &[Filter]) -> Result<(), Refusal> {
        self.relay.policy.check_read(self.remote.ip(), &self.authed)?;
        let asks_gift_wraps = filters.iter().any(|f| f.kinds.as_ref().is_some_and(|k| k.contains(&GIFT_WRAP)));
        if asks_gift_wraps
            && self.authed.is_empty()
            && self.relay.config.nips.gift_wrap_policy == GiftWrapPolicy::RecipientOnly
        {
            return Err(Refusal::auth_required(
                "gift wraps (kind 1059) are served only to their recipient; authenticate with NIP-42",
            ));
        }
        Ok(())
    }

    /// Checks a REQ/COUNT's subscription id and filters; `Err` is the CLOSED text.
    fn read_filters(&self, sub_id: &str, raw: &[serde_json::Value]) -> Result<Vec<Filter>, Refusal> {
        let limits = &self.relay.config.limits;
        if sub_id.is_empty() {
            return Err(Refusal::invalid("subscription id must not be empty"));
        }
        if sub_id.chars().count() > limits.max_subid_length {
            return Err(Refusal::invalid(format!(
                "subscription id is longer than {} characters",
                limits.max_subid_length
            )));
        }
        if raw.is_empty() {
            return Err(Refusal::invalid("at least one filter is required"));
        }
        if raw.len() > limits.max_filters {
            return Err(Refusal::invalid(format!(
                "{} filters in one request; at most {} are allowed",
                raw.len(),
                limits.max_filters
            )));
        }
        let filter_limits = FilterLimits { max_values: limits.max_filter_values };
        let filters: Vec<Filter> = raw
            .iter()
            .map(|v| Filter::parse(v, filter_limits).map_err(|e| Refusal::invalid(e.to_string())))
            .collect::<Result<_, _>>()?;
        if filters.iter().any(|f| f.search.is_some()) && !self.relay.plugins.serves_search() {
            return Err(Refusal::invalid(
                "this relay does not support 'search' (NIP-50): no search plugin is loaded; drop the field",
            ));
        }
        Ok(filters)
    }

    async fn on_req(&mut self, sub_id: String, raw: Vec<serde_json::Value>) -> Result<(), WsError> {
        let started = std::time::Instant::now();
        let filters = match self.read_filters(&sub_id, &raw).and_then(|f| self.admit_read(&f).map(|_| f)) {
            Ok(f) => f,
            Err(reason) => return self.refuse_sub(ReadPurpose::Req, &sub_id, &reason).await,
        };
        let limits = self.relay.config.limits.clone();
        if !self.subs.contains_key(sub_id.as_str()) && self.subs.len() >= limits.max_subscriptions {
            let reason = Refusal::blocked(format!(
                "{} subscriptions are open, the most allowed; CLOSE one first",
                self.subs.len()
            ));
            return self.refuse_sub(ReadPurpose::Req, &sub_id, &reason).await;
        }
        let sub: Arc<str> = sub_id.into();
        let filters: Arc<[Filter]> = filters.into();
        // Register before querying, so nothing stored meanwhile is missed.
        let generation = self.relay.fanout.subscribe(self.id, sub.clone(), filters.clone());
        let from_plugins = match self.plugin_answer(&sub, ReadPurpose::Req, &filters).await {
            Ok(events) => events,
            Err(refusal) => {
                self.relay.fanout.unsubscribe(self.id, &sub);
                self.forget_sub(&sub);
                return self.refuse_sub(ReadPurpose::Req, &sub, &refusal).await;
            }
        };
        let store_filters = self.store_filters(&filters).into_owned();
        let mut rows = self.query_rows(store_filters, &limits);
        let mut from_plugins = from_plugins.into_iter().peekable();
        let sub_json = message::json_string(&sub);
        let mut initial = InitialSend::default();
        loop {
            let row = match rows.next().await {
                None => None,
                Some(Ok(row)) => Some(row),
                Some(Err(e)) => {
                    tracing::error!(conn = self.id, error = %e, "query failed");
                    self.relay.fanout.unsubscribe(self.id, &sub);
                    self.forget_sub(&sub);
                    return self
                        .refuse_sub(
                            ReadPurpose::Req,
                            &sub,
                            &Refusal::error("the query failed on the relay; try again later"),
                        )
                        .await;
                }
            };
            // Plugin answers and stored events together, in NIP-01 order, once each.
            while let Some(p) = from_plugins.next_if(|p| row.as_ref().is_none_or(|r| p.order_key() <= r.order_key())) {
                self.send_initial(&sub_json, &mut initial, p).await?;
            }
            match row {
                Some(row) => self.send_initial(&sub_json, &mut initial, row).await?,
                None => break,
            }
        }
        let seq_mark = self.relay.fanout.current_seq();
        self.forget_sub(&sub);
        self.dedup_pending += 1;
        self.subs.insert(sub.clone(), LocalSub { generation, sent: Some(initial.sent), seq_mark });
        self.served(ReadPurpose::Req, started);
        self.feed(message::eose(&sub)).await
    }

    fn forget_sub(&mut self, sub_id: &str) {
        if self.subs.remove(sub_id).is_some_and(|s| s.sent.is_some()) {
            self.dedup_pending -= 1;
        }
    }

    /// Sends one event of a subscription's initial results, unless it was
    /// just sent (a plugin and the store can name the same event).
    async fn send_initial(&mut self, sub_json: &str, initial: &mut InitialSend, e: StoredEvent) -> Result<(), WsError> {
        if initial.last == Some(e.id) {
            return Ok(());
        }
        initial.last = Some(e.id);
        initial.sent.insert(e.id);
        self.feed(message::event(sub_json, &e.json)).await
    }

    /// The store's answer to `filters`, in NIP-01 order. A small request is
    /// answered in place; a larger one runs on the blocking pool and streams
    /// through a short queue, so neither the async workers nor memory carry
    /// its size.
    fn query_rows(&self, filters: Vec<Filter>, limits: &crate::config::Limits) -> Rows {
        let access = self.read_access();
        let (default_limit, max_limit) = (limits.default_limit, limits.max_limit);
        // The most events each filter can yield: its limit, and no more
        // than the ids it names.
        let requested: usize = filters
            .iter()
            .map(|f| {
                let limit = f.limit.map_or(default_limit, |l| usize::try_from(l).unwrap_or(usize::MAX)).min(max_limit);
                f.ids.as_ref().map_or(limit, |ids| limit.min(ids.len()))
            })
            .fold(0usize, usize::saturating_add);
        if requested <= INLINE_QUERY_EVENTS {
            let rows = self.relay.store.query_filters(&filters, default_limit, max_limit, &access);
            return Rows::Inline(rows.map_err(|e| e.to_string()).map(Vec::into_iter));
        }
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let store = self.relay.store.clone();
        let slots = self.relay.heavy_reads.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::spawn(async move {
            // Large reads take turns: a burst of them never outnumbers the
            // cores, so the async workers (and `/health`) keep their share.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let _ = tokio::task::spawn_blocking(move || {
                let mut slot = Some(slot);
                let mut send = |e: StoredEvent| {
                    if tx.capacity() > 0 {
                        return tx.blocking_send(Ok(e)).is_ok();
                    }
                    // The client is the bottleneck: give the turn back while
                    // waiting for it, so a reader that stalls holds no turn.
                    slot = None;
                    if tx.blocking_send(Ok(e)).is_err() {
                        return false;
                    }
                    slot = runtime.block_on(slots.clone().acquire_owned()).ok();
                    true
                };
                if let Err(e) = store.visit_filters(&filters, default_limit, max_limit, &access, &mut send) {
                    let _ = tx.blocking_send(Err(e.to_string()));
                }
            })
            .await;
        });
        Rows::Streamed(rx)
    }

    async fn on_count(&mut self, sub_id: String, raw: Vec<serde_json::Value>) -> Result<(), WsError> {
        let started = std::time::Instant::now();
        let filters = match self.read_filters(&sub_id, &raw).and_then(|f| self.admit_read(&f).map(|_| f)) {
            Ok(f) => f,
            Err(reason) => return self.refuse_sub(ReadPurpose::Count, &sub_id, &reason).await,
        };
        let from_plugins = match self.plugin_answer(&sub_id, ReadPurpose::Count, &filters).await {
            Ok(events) => events,
            Err(refusal) => return self.refuse_sub(ReadPurpose::Count, &sub_id, &refusal).await,
        };
        let store_filters = self.store_filters(&filters).into_owned();
        let access = self.read_access();
        let store = self.relay.store.clone();
        // Counted from the indexes on the blocking pool; plugin answers the
        // store also counted count once.
        let slot = self.relay.heavy_reads.clone().acquire_owned().await;
        let counted = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let n = store.count_filters(&store_filters, &access)?;
            let mut extra = 0u64;
            for e in &from_plugins {
                let counted_by_store = store.get(&e.id)?.is_some()
                    && serde_json::from_str::<Event>(&e.json)
                        .is_ok_and(|ev| any_filter_matches(&store_filters, &ev) && access.can_see(&ev));
                extra += u64::from(!counted_by_store);
            }
            Ok::<u64, crate::store::StoreError>(n + extra)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match counted {
            Ok(n) => {
                self.served(ReadPurpose::Count, started);
                self.feed(message::count(&sub_id, n)).await
            }
            Err(e) => {
                tracing::error!(conn = self.id, error = %e, "count failed");
                self.refuse_sub(
                    ReadPurpose::Count,
                    &sub_id,
                    &Refusal::error("the count failed on the relay; try again later"),
                )
                .await
            }
        }
    }

    /// NIP-77 `NEG-OPEN`: answered with the first `NEG-MSG`, or `NEG-ERR`.
    async fn on_neg_open(&mut self, sub_id: String, filter: serde_json::Value, message: String) -> Result<(), WsError> {
        let started = std::time::Instant::now();
        match self.open_reconciliation(&sub_id, filter, &message).await {
            Ok(reply) => {
                self.served(ReadPurpose::Reconcile, started);
                self.feed(message::neg_msg(&sub_id, &reply)).await
            }
            Err(refusal) => self.refuse_reconciliation(&sub_id, &refusal).await,
        }
    }

    /// A reconciliation is a read: the same checks as a REQ (id, filter,
    /// rate limits, gift-wrap rules, policy plugins as for a COUNT), over
    /// the same events a REQ could be served from the store, never
    /// plugin-managed kinds. Building the set runs on the blocking pool and
    /// takes a turn of the large reads.
    async fn open_reconciliation(
        &mut self,
        sub_id: &str,
        filter: serde_json::Value,
        message: &str,
    ) -> Result<Vec<u8>, Refusal> {
        let config = self.relay.config.negentropy.clone();
        if !config.enabled {
            return Err(Refusal::blocked("this relay does not offer NIP-77 reconciliation; use REQ"));
        }
        let filters = self.read_filters(sub_id, std::slice::from_ref(&filter))?;
        if filters[0].search.is_some() {
            return Err(Refusal::invalid("a search (NIP-50) filter cannot be reconciled; drop the field"));
        }
        self.admit_read(&filters)?;
        // NIP-77: a NEG-OPEN under an open id replaces that session.
        self.negentropy.close(sub_id);
        if self.negentropy.len() >= config.max_sessions_per_connection {
            return Err(Refusal::blocked(format!(
                "{} reconciliations are open on this connection, the most allowed; NEG-CLOSE one first",
                self.negentropy.len()
            )));
        }
        let first = crate::negentropy::decode_message(message, self.relay.config.limits.max_message_length)?;
        let access = self.read_access();
        if !self.relay.plugins.is_empty() {
            self.relay.plugins.process_req(&self.caller, sub_id, ReadPurpose::Reconcile, &filters, &access).await?;
        }
        let filter = self.store_filters(&filters)[0].clone();
        let slot = self.relay.heavy_reads.clone().acquire_owned().await;
        let opening = crate::negentropy::Opening {
            store: self.relay.store.clone(),
            budget: self.relay.negentropy_budget.clone(),
            config,
            filter,
            access,
            address: crate::capacity::client_key(self.remote.ip()),
        };
        let reply = self.negentropy.open(sub_id, opening, first).await;
        drop(slot);
        reply
    }

    /// NIP-77 `NEG-MSG`: the next message of an open session, or `NEG-ERR`
    /// (the session is then closed).
    /// Each round is a read: it counts against the REQ rate limits (a
    /// session's rounds are few; a flood of them is refused) and takes a
    /// turn of the large reads (a round over a large set is real work).
    async fn on_neg_msg(&mut self, sub_id: String, message: String) -> Result<(), WsError> {
        let max = self.relay.config.limits.max_message_length;
        let checked = crate::negentropy::decode_message(&message, max)
            .and_then(|bytes| self.relay.policy.check_read(self.remote.ip(), &self.authed).map(|_| bytes));
        let reply = match checked {
            Ok(bytes) => {
                let slot = self.relay.heavy_reads.clone().acquire_owned().await;
                let reply = self.negentropy.reconcile(&sub_id, bytes).await;
                drop(slot);
                reply
            }
            Err(refusal) => {
                self.negentropy.close(&sub_id);
                Err(refusal)
            }
        };
        match reply {
            Ok(reply) => self.feed(message::neg_msg(&sub_id, &reply)).await,
            Err(refusal) => self.refuse_reconciliation(&sub_id, &refusal).await,
        }
    }

    /// Ends reconciliations the client left unused (they hold memory).
    async fn close_idle_reconciliations(&mut self) -> Result<(), WsError> {
        if self.negentropy.is_empty() {
            return Ok(());
        }
        let idle = Duration::from_secs(self.relay.config.negentropy.idle_seconds);
        for sub_id in self.negentropy.close_idle(idle) {
            let refusal =
                Refusal::new(RefusalKind::Closed, format!("unused for {} s; send NEG-OPEN again", idle.as_secs()));
            self.refuse_reconciliation(&sub_id, &refusal).await?;
        }
        Ok(())
    }

    async fn refuse_reconciliation(&mut self, sub_id: &str, refusal: &Refusal) -> Result<(), WsError> {
        let label = refusal.kind.prefix();
        self.relay.metrics.reads.with_label_values(&["negentropy", label]).inc();
        tracing::info!(target: "wasm_relay::refused", conn = self.id, remote = %self.remote, sub = sub_id, reason = ?refusal, "reconciliation refused");
        self.feed(message::neg_err(sub_id, refusal)).await
    }

    fn served(&self, purpose: ReadPurpose, started: std::time::Instant) {
        let label = purpose_label(purpose);
        self.relay.metrics.reads.with_label_values(&[label, "served"]).inc();
        self.relay.metrics.read_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
    }

    /// What the plugins add to a REQ/COUNT, or the CLOSED text.
    async fn plugin_answer(
        &mut self,
        sub_id: &str,
        purpose: ReadPurpose,
        filters: &[Filter],
    ) -> Result<Vec<StoredEvent>, Refusal> {
        if self.relay.plugins.is_empty() {
            return Ok(Vec::new());
        }
        let access = self.read_access();
        self.relay.plugins.process_req(&self.caller, sub_id, purpose, filters, &access).await
    }

    /// The filters the store answers: without plugin-managed kinds, which
    /// only their plugin serves.
    fn store_filters<'f>(&self, filters: &'f [Filter]) -> std::borrow::Cow<'f, [Filter]> {
        let managed = self.relay.plugins.managed_kinds();
        if managed.is_empty() {
            return std::borrow::Cow::Borrowed(filters);
        }
        filters.iter().map(|f| f.without_kinds(&managed)).collect()
    }

    async fn refuse_sub(&mut self, purpose: ReadPurpose, sub_id: &str, refusal: &Refusal) -> Result<(), WsError> {
        let label = refusal.kind.prefix();
        self.relay.metrics.reads.with_label_values(&[purpose_label(purpose), label]).inc();
        tracing::info!(target: "wasm_relay::refused", conn = self.id, remote = %self.remote, sub = sub_id, reason = ?refusal, "request refused");
        self.feed(message::closed_refused(sub_id, refusal)).await
    }
}

fn purpose_label(purpose: ReadPurpose) -> &'static str {
    match purpose {
        ReadPurpose::Req => "req",
        ReadPurpose::Count => "count",
        ReadPurpose::Reconcile => "negentropy",
    }
}

/// Events a REQ may answer in place; beyond this the store query runs on
/// the blocking pool.
const INLINE_QUERY_EVENTS: usize = 100;
/// Events a streamed query may have read ahead of the socket.
const STREAM_DEPTH: usize = 64;

/// A store query's rows, in NIP-01 order.
enum Rows {
    Inline(Result<std::vec::IntoIter<StoredEvent>, String>),
    Streamed(mpsc::Receiver<Result<StoredEvent, String>>),
}

impl Rows {
    async fn next(&mut self) -> Option<Result<StoredEvent, String>> {
        match self {
            Rows::Inline(Ok(rows)) => rows.next().map(Ok),
            Rows::Inline(Err(e)) => {
                let e = std::mem::take(e);
                *self = Rows::Inline(Ok(Vec::new().into_iter()));
                Some(Err(e))
            }
            Rows::Streamed(rx) => rx.recv().await,
        }
    }
}

/// What a subscription's initial send has sent so far.
#[derive(Default)]
struct InitialSend {
    /// Ids sent, to skip their live delivery (see [`LocalSub::sent`]).
    sent: HashSet<[u8; 32]>,
    last: Option<[u8; 32]>,
}

fn ok_reply(id: &str, result: WriteResult) -> String {
    let refusal = match result {
        Ok(WriteOutcome::Stored) => return message::ok(id, true, ""),
        // Accepted: NIP-01 lets `OK true` carry the `duplicate:` note.
        Ok(WriteOutcome::Duplicate) => {
            return message::ok_noted(id, &Refusal::new(RefusalKind::Duplicate, "this event is already stored"));
        }
        Ok(WriteOutcome::Superseded) => {
            Refusal::new(RefusalKind::Duplicate, "a newer version of this replaceable event is already stored")
        }
        Ok(WriteOutcome::Deleted) => Refusal::blocked("its author deleted this event (NIP-09)"),
        Ok(WriteOutcome::Vanished) => {
            Refusal::blocked("its author (or recipient) asked this relay to erase it (NIP-62)")
        }
        Err(e) => Refusal::error(e),
    };
    message::ok_refused(id, &refusal)
}

/// The id of an EVENT message too large to process, if it can be read.
fn parse_event_id(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a>(#[serde(borrow)] &'a str, IdOnly);
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let Envelope(verb, event) = serde_json::from_str(text).ok()?;
    (verb == "EVENT" && event.id.len() <= 128).then_some(event.id)
}
