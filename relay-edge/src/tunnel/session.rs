//! One agent session: handshake, then one `select!` loop over the agent's
//! frames, batches from the [`Fetcher`], due redeliveries, heartbeats and
//! shutdown. What each event means is decided by the pure in-flight
//! [`Table`] (see `inflight.rs`); this loop performs its decisions against
//! the store and the socket.
//!
//! An entry is settled only by the agent's verdict on that `(channel, id)`.
//! A session that dies leaves its entries pending in the store; the next
//! session of the same agent re-reads them first, and another agent
//! reclaims them after the visibility timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use foldhash::{HashMap, HashMapExt};
use futures_util::{SinkExt, StreamExt};
use relay_protocol::{DecodeError, Frame, Limits, VERSION};
use tokio_util::task::AbortOnDropHandle;
use tokio_util::time::{DelayQueue, delay_queue};

use super::Peer;
use super::TunnelState;
use super::fetcher::{Fetcher, deliverable};
use super::inflight::{Acked, Arrival, Claimed, EntryKey, Nacked, Send, Table};
use super::registry::{Kick, Live, SessionInfo};
use crate::store::{Backend, DeadLetter, Entry, Stored, StreamId, Unreadable, now_ms};

/// Why a session ended; sent to the agent as `Error { code, message }`.
struct Close {
    code: &'static str,
    message: String,
}

impl Close {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Longest nack reason kept (dead-letter record, logs).
const MAX_REASON: usize = 1024;

/// Backlog figures for the agent, one per channel.
type StatsEvent = Vec<relay_protocol::ChannelStats>;

/// How often the edge's own `Ping` rides along with a `Pong` (its `Pong`
/// back gives the RTT `relay-edge agents` shows), in heartbeats.
const RTT_EVERY: u32 = 6;

/// How often an agent's figures are looked at for a `Stats` frame, in
/// heartbeats.
const STATS_EVERY: u32 = 3;

/// A session that passed its handshake, ready to serve.
struct Opened {
    ws: WebSocket,
    session: Session,
    session_id: String,
}

impl Opened {
    /// Tells the agent it is in.
    async fn welcome(&mut self) -> Result<(), Close> {
        let cfg = &self.session.state.cfg;
        let welcome = Frame::Welcome {
            session: self.session_id.clone(),
            agent: self.session.peer.agent.clone(),
            channels: self.session.table.channels().to_vec(),
            heartbeat_ms: cfg.heartbeat.as_millis() as u64,
            reclaim_after_ms: Some(cfg.reclaim_after.as_millis() as u64),
        };
        self.session.send(&mut self.ws, &welcome).await
    }

    /// Says why the session ended, and lets the socket go.
    async fn close(self: Box<Self>, c: Close) {
        let Opened { ws, session, .. } = *self;
        close(ws, &session.peer, c).await;
    }
}

/// Runs one agent's session on its socket. The handshake runs in a
/// future of its own, freed before the session's long wait: a task's
/// future is as large as its largest state, and it takes its arguments
/// (the socket) along for its whole life.
pub fn run(ws: WebSocket, peer: Peer, state: Arc<TunnelState>) -> impl Future<Output = ()> + std::marker::Send {
    let open = Box::pin(open(ws, peer, state));
    async move {
        if let Some(opened) = open.await {
            serve(opened).await;
        }
    }
}

/// The handshake: `None` when the session was refused (and told why).
async fn open(mut ws: WebSocket, peer: Peer, state: Arc<TunnelState>) -> Option<Box<Opened>> {
    let tunnel = &state.cfg;
    let limits =
        Limits { max_frame: tunnel.max_frame.as_u64() as usize, max_window: tunnel.max_window, ..Limits::default() };
    let session_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    // Nothing from an identity this edge does not serve is decoded at all.
    if !state.grants.contains_key(&peer.agent) {
        let c = Close::new(
            "unknown_agent",
            format!("agent `{}` is not configured on this edge ([[agent]] name = \"{}\")", peer.agent, peer.agent),
        );
        return refuse(ws, &peer, c).await;
    }

    let handshake = Box::pin(tokio::time::timeout(tunnel.handshake_timeout, recv_frame(&mut ws, &limits))).await;
    let (window, channels, named) = match handshake {
        Err(_) => return refuse(ws, &peer, Close::new("handshake_timeout", "no Hello frame in time")).await,
        Ok(Err(c)) => return refuse(ws, &peer, c).await,
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(Frame::Hello { version, window, channels, named_acks, .. }))) => {
            if version != VERSION {
                let msg = format!("protocol version {version} is not supported; this edge speaks {VERSION}");
                return refuse(ws, &peer, Close::new("unsupported_version", msg)).await;
            }
            match resolve_channels(&state, &peer.agent, channels) {
                Ok(c) if !named_acks && c.len() > 1 => {
                    // Its acks name ids only, which repeat across channels.
                    let msg = format!(
                        "this agent's acks name no channel, so it can be served one channel per session, not {}: \
                         upgrade relay-agent, or list a single channel in its [[target]]s",
                        c.len()
                    );
                    return refuse(ws, &peer, Close::new("upgrade_required", msg)).await;
                }
                Ok(c) => (window, c, named_acks),
                Err(c) => return refuse(ws, &peer, c).await,
            }
        }
        Ok(Ok(Some(other))) => {
            let msg = format!("expected Hello as the first frame, got {}", other.kind());
            return refuse(ws, &peer, Close::new("protocol_error", msg)).await;
        }
    };
    let prepared = Box::pin(async {
        for channel in &channels {
            state.store.ensure_group(channel).await?;
        }
        state.store.reader().await
    })
    .await;
    let reader = match prepared {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(agent = %peer.agent, error = %e, "cannot prepare the session's channels");
            let c = Close::new("store_unavailable", "the edge's store is unavailable; retry later");
            return refuse(ws, &peer, c).await;
        }
    };

    let kick = Kick { token: state.shutdown.child_token(), ..Kick::default() };
    let live = Arc::new(Live::default());
    let info = SessionInfo {
        session: session_id.clone(),
        agent: peer.agent.clone(),
        addr: peer.addr,
        channels: channels.clone(),
        connected_at_ms: now_ms(),
        cert: peer.cert.clone(),
        chain: peer.chain.clone(),
        live: live.clone(),
    };
    // Checked again now: a reload may have revoked the certificate, or
    // replaced the CA, since the TLS handshake.
    if !state.registry.register(info, kick.clone(), |s| state.admits(s)) {
        tracing::warn!(agent = %peer.agent, peer = %peer.addr, fingerprint = %peer.cert.fingerprint, "certificate revoked or no longer trusted; refused");
        let c = Close::new("revoked", "this agent's certificate has been revoked or is no longer trusted");
        return refuse(ws, &peer, c).await;
    }
    tracing::info!(agent = %peer.agent, session = %session_id, ?channels, window, named_acks = named, "agent connected");
    state.metrics.sessions_opened.inc();

    let max_entry = tunnel.max_frame.as_u64() as usize;
    let fetcher = Box::new(Fetcher::new(
        state.store.clone(),
        reader,
        peer.agent.clone(),
        &channels,
        tunnel.reclaim_after,
        (max_entry, state.largest_entry.clone()),
    ));
    let table = Table::new(
        channels.clone(),
        window,
        tunnel.session_bytes.as_u64() as usize,
        tunnel.max_frame.as_u64() as usize,
    );
    let session = Session {
        state: state.clone(),
        peer: peer.clone(),
        limits,
        table,
        redeliveries: Redeliveries::default(),
        scheduled: HashMap::new(),
        fetcher: Some(fetcher),
        fetching: None,
        last_rx: Instant::now(),
        // Both due at the agent's first Ping.
        last_ping: Instant::now().checked_sub(tunnel.heartbeat * RTT_EVERY).unwrap_or_else(Instant::now),
        last_stats: None,
        stats_looked: Instant::now().checked_sub(tunnel.heartbeat * STATS_EVERY).unwrap_or_else(Instant::now),
        live,
        kick: kick.clone(),
        acks: Acks::new(state.store.clone(), &peer.agent),
    };
    Some(Box::new(Opened { ws, session, session_id }))
}

/// Serves an opened session until it ends, then settles what it can and
/// says why it ended.
async fn serve(mut opened: Box<Opened>) {
    let outcome = match Box::pin(opened.welcome()).await {
        Ok(()) => opened.session.run(&mut opened.ws).await,
        Err(c) => Err(c),
    };
    let Opened { session, session_id, .. } = &mut *opened;
    session.kick.token.cancel();
    session.fetching = None;
    // What the agent acknowledged reaches the store before the session is
    // gone (each ack within the store's command timeout).
    Box::pin(session.acks.finish()).await;
    let (state, peer) = (&session.state, &session.peer);
    state.registry.remove(&peer.agent, session_id);
    state.metrics.session_closed(outcome.as_ref().err().map(|c| c.code).unwrap_or("disconnected"));
    match outcome {
        Ok(()) => tracing::info!(agent = %peer.agent, session = %session_id, "agent disconnected"),
        Err(c) => {
            tracing::info!(agent = %peer.agent, session = %session_id, code = c.code, reason = %c.message, "session closed");
            Box::pin(opened.close(c)).await;
        }
    }
}

fn resolve_channels(state: &TunnelState, agent: &str, asked: Option<Vec<String>>) -> Result<Vec<String>, Close> {
    let Some(granted) = state.grants.get(agent) else {
        return Err(Close::new(
            "unknown_agent",
            format!("agent `{agent}` is not configured on this edge ([[agent]] name = \"{agent}\")"),
        ));
    };
    let Some(asked) = asked else {
        return Ok(granted.clone());
    };
    if asked.is_empty() {
        return Err(Close::new("protocol_error", "Hello lists no channel"));
    }
    if let Some(denied) = asked.iter().find(|c| !granted.contains(c)) {
        return Err(Close::new("forbidden_channel", format!("agent `{agent}` is not granted channel `{denied}`")));
    }
    let mut channels = asked;
    channels.sort();
    channels.dedup();
    Ok(channels)
}

/// A grant's read on its task: the fetcher back with its batch, or
/// `None` when the session was kicked first. Dropping it aborts the read
/// (a session that ends, however it ends, takes its read along).
type Reading = AbortOnDropHandle<Option<(Box<Fetcher>, Vec<Entry>)>>;

/// What the running read returns; pending while none runs.
async fn fetched(running: &mut Option<Reading>) -> Result<Option<(Box<Fetcher>, Vec<Entry>)>, tokio::task::JoinError> {
    match running {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

/// Refuses a session: [`close`], and nothing to serve.
async fn refuse(ws: WebSocket, peer: &Peer, c: Close) -> Option<Box<Opened>> {
    close(ws, peer, c).await;
    None
}

/// Sends `Error`, then a close frame, and lets the socket go. Boxed, as
/// are the session's other rare or short-lived steps: a task's future is as
/// large as its largest state, and an idle session waits in the smallest.
async fn close(ws: WebSocket, peer: &Peer, c: Close) {
    Box::pin(close_now(ws, peer, c)).await
}

async fn close_now(mut ws: WebSocket, peer: &Peer, c: Close) {
    tracing::info!(agent = %peer.agent, peer = %peer.addr, code = c.code, reason = %c.message, "closing tunnel session");
    let frame = Frame::Error { code: c.code.into(), message: c.message.clone() };
    if let Ok(bytes) = relay_protocol::encode(&frame, &Limits::default()) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Binary(bytes.into()))).await;
    }
    let reason: String = c.code.chars().take(100).collect();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        ws.send(Message::Close(Some(CloseFrame { code: 1008, reason: reason.into() }))),
    )
    .await;
}

/// Next frame from the agent; `Ok(None)` when the socket closed.
async fn recv_frame(ws: &mut WebSocket, limits: &Limits) -> Result<Option<Frame>, Close> {
    let limits = limits.for_agent_frames();
    loop {
        let msg = match ws.recv().await {
            None => return Ok(None),
            Some(Err(e)) => {
                use tokio_tungstenite::tungstenite::Error as WsError;
                let too_large = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<WsError>())
                    .is_some_and(|w| matches!(w, WsError::Capacity(_)));
                if too_large {
                    let msg = format!("an agent frame is limited to {} bytes: {e}", limits.max_frame);
                    return Err(Close::new("frame_too_large", msg));
                }
                return Err(Close::new("transport_error", format!("websocket error: {e}")));
            }
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(bytes) => {
                return relay_protocol::decode(&bytes, &limits).map(Some).map_err(|e| match e {
                    DecodeError::TooLarge { .. } => Close::new("frame_too_large", e.to_string()),
                    other => Close::new("bad_frame", other.to_string()),
                });
            }
            Message::Text(_) => {
                return Err(Close::new(
                    "text_frame",
                    "text messages are not part of relay.v1; send binary MessagePack frames",
                ));
            }
            Message::Close(_) => return Ok(None),
            Message::Ping(_) | Message::Pong(_) => continue,
        }
    }
}

struct Session {
    state: Arc<TunnelState>,
    peer: Peer,
    limits: Limits,
    /// Every delivery the agent holds, and the flow control.
    table: Table<Stored>,
    /// Transiently nacked entries, each due once for redelivery.
    redeliveries: Redeliveries,
    /// The queue slot of each scheduled entry: at most one per entry.
    scheduled: HashMap<EntryKey, delay_queue::Key>,
    /// The session's store reader, between reads.
    fetcher: Option<Box<Fetcher>>,
    /// The read of the outstanding grant, on a task of its own (the session
    /// goes on meanwhile), which hands the fetcher back with its batch; it
    /// stops at a kick, and is aborted when the session is dropped. One
    /// task per read, not a task and two channels per session: an idle
    /// session's read waits in it, and that is all it holds.
    fetching: Option<Reading>,
    /// Last time anything arrived from the agent.
    last_rx: Instant,
    /// Last time the edge sent its Ping.
    last_ping: Instant,
    /// The figures of the last `Stats` frame sent.
    last_stats: Option<StatsEvent>,
    /// When the figures were last looked at.
    stats_looked: Instant,
    /// Figures shown by `relay-edge agents`.
    live: Arc<Live>,
    /// Stops the session (replaced, revoked, shutdown).
    kick: Kick,
    /// Settled here, on their way to the store.
    acks: Acks,
}

/// Most acknowledged ids queued behind the `XACK` in flight before the
/// session waits for it (a store slower to ack than to read).
const MAX_QUEUED_ACKS: usize = 1024;

/// Longest a `Pong` waits for the acks before its `Ping` to reach the store.
const PONG_WAIT: Duration = Duration::from_secs(1);

/// The session's acknowledgements to the store, off its loop: the next
/// grant goes to the fetcher at once, not after the store's round trip.
/// One round (an ack per channel) is in flight at a time; acks settled
/// meanwhile merge into the next. An ack that fails leaves its entry
/// pending, redelivered later (at-least-once), as before.
struct Acks {
    store: crate::store::Store,
    agent: Arc<str>,
    /// The round in flight, in a task of its own: it lands even if the
    /// session is dropped meanwhile.
    in_flight: Option<tokio::task::JoinHandle<()>>,
    queued: std::collections::BTreeMap<String, Vec<StreamId>>,
}

impl Acks {
    fn new(store: crate::store::Store, agent: &str) -> Self {
        Self { store, agent: agent.into(), in_flight: None, queued: Default::default() }
    }

    fn push(&mut self, key: EntryKey) {
        self.queued.entry(key.channel).or_default().push(key.id);
    }

    /// Starts the queued round when none is in flight; waits for the one in
    /// flight first when more than [`MAX_QUEUED_ACKS`] queue behind it.
    async fn send(&mut self) {
        if self.in_flight.is_some() && self.queued.values().map(Vec::len).sum::<usize>() > MAX_QUEUED_ACKS {
            self.done().await;
        }
        self.start();
    }

    fn start(&mut self) {
        if self.in_flight.is_some() || self.queued.is_empty() {
            return;
        }
        let (store, agent, round) = (self.store.clone(), self.agent.clone(), std::mem::take(&mut self.queued));
        self.in_flight = Some(tokio::spawn(async move {
            // The channels at once: a round lasts one store round trip.
            let acks = round.iter().map(|(channel, ids)| store.ack(channel, ids));
            for ((channel, _), r) in round.iter().zip(futures_util::future::join_all(acks).await) {
                if let Err(e) = r {
                    // Still pending: it will be redelivered (at-least-once).
                    tracing::warn!(agent = &*agent, channel, error = %e, "acknowledging in the store failed");
                }
            }
        }));
    }

    /// The round in flight finished (never, while none is).
    async fn done(&mut self) {
        match self.in_flight.as_mut() {
            Some(f) => {
                let _ = f.await;
            }
            None => std::future::pending().await,
        }
        self.in_flight = None;
    }

    /// Everything queued and in flight is through.
    async fn finish(&mut self) {
        loop {
            self.start();
            if self.in_flight.is_none() {
                return;
            }
            self.done().await;
        }
    }
}

impl Session {
    async fn run(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let heartbeat = self.state.cfg.heartbeat;
        // No timer fires for a session whose agent pings (see `watchdog`).
        let watchdog = tokio::time::sleep_until(self.watchdog(heartbeat).into());
        tokio::pin!(watchdog);
        self.grant();
        loop {
            self.live.in_flight.store(self.table.held() as u64, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = self.kick.token.cancelled() => return Err(self.kicked()),
                frame = recv_frame(ws, &self.limits) => {
                    match frame? {
                        None => return Ok(()),
                        Some(f) => {
                            self.last_rx = Instant::now();
                            Box::pin(self.on_frame(ws, f)).await?;
                        }
                    }
                }
                read = fetched(&mut self.fetching), if self.fetching.is_some() => {
                    self.fetching = None;
                    match read {
                        // Replaced, revoked or shutting down: what the read
                        // took stays pending for this agent's next session.
                        Ok(None) => return Err(self.kicked()),
                        Ok(Some(_)) if self.kick.token.is_cancelled() => return Err(self.kicked()),
                        Ok(Some((fetcher, batch))) => {
                            self.fetcher = Some(fetcher);
                            Box::pin(self.on_batch(ws, batch)).await?
                        }
                        // Only if the read panicked: end the session, so the
                        // agent reconnects to a working one.
                        Err(_) => return Err(Close::new("internal", "the session's store reader stopped")),
                    }
                }
                Some(due) = self.redeliveries.next(), if !self.redeliveries.is_empty() => {
                    let key = due.into_inner();
                    self.scheduled.remove(&key);
                    Box::pin(self.redeliver(ws, key)).await?;
                }
                () = self.acks.done(), if self.acks.in_flight.is_some() => self.acks.start(),
                () = &mut watchdog => {
                    if self.last_rx.elapsed() >= heartbeat * 3 {
                        return Err(Close::new("heartbeat_timeout", format!("nothing received for {:?}", self.last_rx.elapsed())));
                    }
                    // The agent has been silent for 1.5 heartbeats (it pings
                    // less often, or the link is going): the edge pings.
                    Box::pin(self.on_quiet(ws)).await?;
                }
            }
            let due = self.watchdog(heartbeat);
            if watchdog.deadline() != due.into() {
                watchdog.as_mut().reset(due.into());
            }
            self.grant();
        }
    }

    /// The agent has been quiet for a while: the edge's Ping, and figures.
    async fn on_quiet(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let ping = self.ping();
        self.queue(ws, &ping).await?;
        self.queue_stats(ws).await?;
        self.flush(ws).await
    }

    /// When the edge next acts on its own for the heartbeat: 1.5
    /// heartbeats after it last heard from the agent or pinged it,
    /// whichever is later, and at the latest when the agent's three
    /// heartbeats are up. An agent that pings every heartbeat keeps moving
    /// it on before it is reached.
    fn watchdog(&self, heartbeat: Duration) -> Instant {
        let quiet = self.last_rx.max(self.last_ping) + heartbeat.mul_f32(1.5);
        quiet.min(self.last_rx + heartbeat * 3)
    }

    /// Schedules `key`'s redelivery in `delay`, replacing any earlier one.
    fn schedule(&mut self, key: EntryKey, delay: Duration) {
        match self.scheduled.get(&key) {
            Some(slot) => self.redeliveries.reset(slot, delay),
            None => {
                let slot = self.redeliveries.insert(key.clone(), delay);
                self.scheduled.insert(key, slot);
            }
        }
    }

    /// Starts the fetcher's next read, when the table allows one (one
    /// grant outstanding at a time: the fetcher is here whenever the table
    /// has none).
    fn grant(&mut self) {
        if self.fetcher.is_none() {
            return;
        }
        if let Some(g) = self.table.grant()
            && let Some(fetcher) = self.fetcher.take()
        {
            // It stops at a kick, as the session does: a replaced
            // session's read must not take entries past the cursor of the
            // agent's new session.
            let kicked = self.kick.token.clone();
            self.fetching = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                tokio::select! {
                    biased;
                    () = kicked.cancelled() => None,
                    read = fetcher.read(g) => Some(read),
                }
            })));
        }
    }

    async fn send(&self, ws: &mut WebSocket, frame: &Frame) -> Result<(), Close> {
        self.queue(ws, frame).await?;
        self.flush(ws).await
    }

    /// Queues a frame without flushing; [`Session::flush`] sends the queue.
    async fn queue(&self, ws: &mut WebSocket, frame: &Frame) -> Result<(), Close> {
        let bytes = relay_protocol::encode(frame, &self.limits)
            .map_err(|e| Close::new("internal", format!("cannot encode {}: {e}", frame.kind())))?;
        self.feed(ws, bytes).await
    }

    /// Queues `Deliver` of a stored webhook, its bytes forwarded as stored.
    async fn queue_deliver(&self, ws: &mut WebSocket, d: &Send<Stored>) -> Result<(), Close> {
        let (key, webhook) = (&d.key, &d.payload);
        let bytes = relay_protocol::encode_deliver(
            &key.id.to_string(),
            &key.channel,
            d.attempt,
            webhook.received_at_ms,
            &webhook.bytes,
            &self.limits,
        )
        .map_err(|e| Close::new("internal", format!("cannot encode deliver: {e}")))?;
        self.feed(ws, bytes).await
    }

    /// Queues every delivery, then flushes once (one TLS record run).
    async fn deliver_all(&self, ws: &mut WebSocket, sends: Vec<Send<Stored>>) -> Result<(), Close> {
        if sends.is_empty() {
            return Ok(());
        }
        // By value: each stored payload is let go once it is encoded.
        for d in sends {
            self.queue_deliver(ws, &d).await?;
        }
        self.flush(ws).await
    }

    /// Queues an encoded frame.
    async fn feed(&self, ws: &mut WebSocket, bytes: Vec<u8>) -> Result<(), Close> {
        self.in_time(ws.feed(Message::Binary(bytes.into()))).await
    }

    async fn flush(&self, ws: &mut WebSocket) -> Result<(), Close> {
        self.in_time(ws.flush()).await
    }

    /// A write to the agent, bounded by the dead-session deadline, and
    /// given up when the session is stopped (a replaced session stuck on
    /// an agent that stopped reading lets go of what it holds at once).
    async fn in_time(&self, write: impl std::future::Future<Output = Result<(), axum::Error>>) -> Result<(), Close> {
        tokio::select! {
            biased;
            _ = self.kick.token.cancelled() => Err(self.kicked()),
            r = tokio::time::timeout(self.state.cfg.heartbeat * 3, write) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Close::new("transport_error", format!("send failed: {e}"))),
                Err(_) => Err(Close::new("send_timeout", "the agent stopped reading")),
            },
        }
    }

    /// Why the session was stopped from outside.
    fn kicked(&self) -> Close {
        if self.state.shutdown.is_cancelled() {
            Close::new("shutdown", "the edge is shutting down; reconnect shortly")
        } else if self.kick.was_revoked() {
            Close::new("revoked", "this agent's certificate has been revoked or is no longer trusted")
        } else {
            Close::new("replaced", "a newer session of this agent took over")
        }
    }

    async fn on_frame(&mut self, ws: &mut WebSocket, frame: Frame) -> Result<(), Close> {
        match frame {
            ack @ Frame::Ack { .. } => {
                let Some(acked) = ack.into_acked() else {
                    return Err(Close::new("protocol_error", "Ack lists a different number of channels and ids"));
                };
                self.on_ack(acked).await;
            }
            Frame::Nack { channel, id, permanent, mut reason, retry_after_ms, status } => {
                // Stored with a dead letter and logged: keep it short.
                if reason.len() > MAX_REASON {
                    let mut end = MAX_REASON;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                }
                let key = match (channel, self.stream_id(&id)) {
                    (_, None) => None,
                    (Some(channel), Some(id)) => Some(EntryKey::new(channel, id)),
                    (None, Some(id)) => self.table.resolve(id),
                };
                match key {
                    Some(key) => self.on_nack(key, permanent, reason, retry_after_ms, status).await,
                    None => tracing::debug!(agent = %self.peer.agent, id, "nack naming an ambiguous id; ignored"),
                }
            }
            Frame::Flow { window, channel: None } => {
                tracing::debug!(agent = %self.peer.agent, to = window, "window changed");
                self.table.set_window(window);
            }
            Frame::Flow { window, channel: Some(channel) } => {
                if !self.table.set_paused(&channel, window == 0) {
                    return Err(Close::new(
                        "protocol_error",
                        format!("Flow names channel `{channel}`, not part of this session"),
                    ));
                }
                tracing::info!(agent = %self.peer.agent, channel, resume = window > 0, "channel flow changed by the agent");
            }
            Frame::Ping { t } => {
                // The Pong follows the acks sent before the Ping into the
                // store (a test may take it as their receipt), unless the
                // store takes over a second: the session goes on.
                let _ = tokio::time::timeout(PONG_WAIT.min(self.state.cfg.heartbeat), self.acks.finish()).await;
                self.queue(ws, &Frame::Pong { t }).await?;
                // The edge's own Ping rides along every few heartbeats, for
                // the RTT: an agent's Ping and the edge's Pong already show
                // each side the other is there, so per heartbeat an idle
                // session costs one frame and one write each way (the
                // watchdog pings when the agent pings less often).
                let heartbeat = self.state.cfg.heartbeat;
                if self.last_ping.elapsed() >= heartbeat * RTT_EVERY - heartbeat / 2 {
                    let ping = self.ping();
                    self.queue(ws, &ping).await?;
                }
                self.queue_stats(ws).await?;
                self.flush(ws).await?
            }
            Frame::Pong { t } => {
                let rtt_us = relay_protocol::now_micros().saturating_sub(t);
                self.live.rtt_us.store(rtt_us, std::sync::atomic::Ordering::Relaxed);
            }
            other => {
                return Err(Close::new("protocol_error", format!("unexpected {} frame from an agent", other.kind())));
            }
        }
        Ok(())
    }

    /// The edge's heartbeat Ping, now.
    fn ping(&mut self) -> Frame {
        self.last_ping = Instant::now();
        Frame::Ping { t: relay_protocol::now_micros() }
    }

    /// Settles what an `Ack` names (see `inflight.rs` for entries not in
    /// flight here and for agents that name ids only).
    async fn on_ack(&mut self, acked: Vec<(Option<String>, String)>) {
        for (channel, id_text) in acked {
            let Some(id) = self.stream_id(&id_text) else { continue };
            let key = match channel {
                Some(channel) => EntryKey::new(channel, id),
                None => match self.table.resolve(id) {
                    Some(key) => key,
                    None => {
                        tracing::debug!(agent = %self.peer.agent, id = id_text, "ack naming an ambiguous id; left pending");
                        continue;
                    }
                },
            };
            match self.table.ack(&key) {
                Acked::Settled(f) => {
                    self.state.metrics.delivered(&key.channel, f.received_at_ms);
                    // A redelivery it was waiting for is moot: free its timer now.
                    if let Some(slot) = self.scheduled.remove(&key) {
                        self.redeliveries.remove(&slot);
                    }
                }
                Acked::NotHere => {
                    tracing::debug!(agent = %self.peer.agent, entry = %key, "ack for an entry not in flight here")
                }
                Acked::Foreign => {
                    tracing::debug!(agent = %self.peer.agent, entry = %key, "ack naming a channel outside the session; ignored");
                    continue;
                }
            }
            self.acks.push(key);
        }
        self.acks.send().await;
    }

    async fn on_nack(
        &mut self,
        key: EntryKey,
        permanent: bool,
        reason: String,
        retry_after_ms: Option<u64>,
        status: Option<u16>,
    ) {
        let tunnel = &self.state.cfg;
        match self.table.nack(&key, permanent) {
            Nacked::Ignore => {
                tracing::debug!(agent = %self.peer.agent, entry = %key, "nack for an entry not awaiting a verdict; ignored");
            }
            Nacked::Schedule => {
                let delay = retry_after_ms
                    .map(Duration::from_millis)
                    .unwrap_or(tunnel.retry_delay)
                    .min(tunnel.reclaim_after / 2);
                tracing::debug!(agent = %self.peer.agent, entry = %key, ?delay, reason, "nacked; redelivery scheduled");
                self.state.metrics.outcome(&key.channel, "nacked");
                self.schedule(key, delay);
            }
            Nacked::DeadLetter { attempts } => {
                let stored = self.dead_letter(&key, &reason, status, attempts).await;
                self.table.dead_lettered(&key, stored);
                if stored {
                    tracing::warn!(agent = %self.peer.agent, channel = %key.channel, id = %key.id, attempts, reason, "webhook dead-lettered");
                    self.state.metrics.outcome(&key.channel, "dead_lettered");
                } else {
                    // Held, and offered to the agent again: it decides anew.
                    let delay = tunnel.retry_delay;
                    self.schedule(key, delay);
                }
            }
        }
    }

    /// An id an agent sent, parsed; `None` (logged) when it is not a
    /// stream id: it names nothing the edge delivered.
    fn stream_id(&self, id: &str) -> Option<StreamId> {
        let parsed = id.parse().ok();
        if parsed.is_none() {
            tracing::debug!(agent = %self.peer.agent, id = %id.escape_debug(), "verdict naming no stream id; ignored");
        }
        parsed
    }

    /// Records a dead letter (the store copies the entry's bytes); `false`
    /// when the store failed (the entry stays pending).
    async fn dead_letter(&self, key: &EntryKey, reason: &str, status: Option<u16>, attempts: u32) -> bool {
        let (channel, id) = (key.channel.as_str(), key.id);
        match self.state.store.dead_letter(&DeadLetter { channel, id, reason, status, attempts }).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(agent = %self.peer.agent, channel, %id, error = %e, "dead-letter failed; left pending");
                false
            }
        }
    }

    /// A scheduled redelivery is due: claim the entry again and resend it.
    async fn redeliver(&mut self, ws: &mut WebSocket, key: EntryKey) -> Result<(), Close> {
        let Some(attempt) = self.table.due(&key) else { return Ok(()) };
        self.state.metrics.retried.inc();
        self.state.metrics.outcome(&key.channel, "redelivered");
        match self.state.store.claim(&key.channel, &self.peer.agent, key.id).await {
            Ok(Some(entry)) => match entry.webhook {
                Ok(webhook) => {
                    let send = Send { key: key.clone(), attempt, payload: webhook };
                    self.queue_deliver(ws, &send).await?;
                    self.table.redelivered(&key, Claimed::Sent);
                    self.flush(ws).await
                }
                Err(why) => {
                    self.discard_unreadable(&key, &why).await;
                    self.table.forget(&key);
                    Ok(())
                }
            },
            Ok(None) => {
                // No longer pending here (acked late, or taken by another consumer).
                self.table.redelivered(&key, Claimed::Gone);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(agent = %self.peer.agent, entry = %key, error = %e, "redelivery read failed; retrying later");
                self.table.redelivered(&key, Claimed::Failed);
                self.schedule(key, self.state.cfg.retry_delay);
                Ok(())
            }
        }
    }

    /// A batch from the fetcher: unreadable entries are settled here, the
    /// rest go through the table, and what it says to send is sent.
    async fn on_batch(&mut self, ws: &mut WebSocket, batch: Vec<Entry>) -> Result<(), Close> {
        let max = self.limits.max_frame;
        let mut arrivals = Vec::with_capacity(batch.len());
        for Entry { channel, id, attempt, webhook } in batch {
            let key = EntryKey::new(channel, id);
            match webhook {
                Ok(w) if !deliverable(w.bytes.len(), max) => {
                    let why = Unreadable::TooLarge(format!(
                        "stored webhook of {} bytes does not fit a Deliver frame (tunnel.max_frame = {max} bytes)",
                        w.bytes.len()
                    ));
                    self.discard_unreadable(&key, &why).await;
                }
                Ok(w) => arrivals.push(Arrival {
                    key,
                    attempt,
                    bytes: w.bytes.len(),
                    received_at_ms: w.received_at_ms,
                    payload: w,
                }),
                Err(why) => self.discard_unreadable(&key, &why).await,
            }
        }
        let sends = self.table.arrived(arrivals);
        if !sends.is_empty() {
            // An agent too busy to go quiet (one that does not ping on its
            // own) still hears its figures.
            self.queue_stats(ws).await?;
        }
        self.deliver_all(ws, sends).await
    }

    /// An entry that cannot be delivered: trimmed while pending (nothing left
    /// to deliver, acknowledge it) or corrupt or too large (keep it, in the DLQ).
    async fn discard_unreadable(&self, key: &EntryKey, why: &Unreadable) {
        let (channel, id) = (key.channel.as_str(), key.id);
        tracing::warn!(agent = %self.peer.agent, channel, %id, %why, "undeliverable stream entry");
        let result = match why {
            Unreadable::DeletedWhilePending => self.state.store.ack(channel, &[id]).await.map(|_| ()),
            Unreadable::Corrupt(_) | Unreadable::TooLarge(_) => {
                let reason = why.to_string();
                let letter = DeadLetter { channel, id, reason: &reason, status: None, attempts: 0 };
                self.state.store.dead_letter(&letter).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(channel, %id, error = %e, "cannot settle undeliverable entry; left pending");
        }
    }

    /// Queues a `Stats` frame of the session's channel figures, from the
    /// edge-wide refresh (no store command per session), every few
    /// heartbeats and only when they changed; nothing while a channel has
    /// no figures yet.
    async fn queue_stats(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let heartbeat = self.state.cfg.heartbeat;
        if self.stats_looked.elapsed() < heartbeat * STATS_EVERY - heartbeat / 2 {
            return Ok(());
        }
        self.stats_looked = Instant::now();
        let stats: Option<StatsEvent> = self.table.channels().iter().map(|ch| self.state.backlog.stats(ch)).collect();
        match stats {
            Some(stats) if self.last_stats.as_ref() != Some(&stats) => {
                self.queue(ws, &Frame::Stats { channels: stats.clone() }).await?;
                self.last_stats = Some(stats);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Redeliveries waiting out their delay. The timer wheel (≈ 6 KiB) exists
/// only while one waits: most sessions, idle or healthy, never need it.
#[derive(Default)]
struct Redeliveries(Option<DelayQueue<EntryKey>>);

impl Redeliveries {
    fn insert(&mut self, key: EntryKey, delay: Duration) -> delay_queue::Key {
        self.0.get_or_insert_with(DelayQueue::new).insert(key, delay)
    }

    fn reset(&mut self, slot: &delay_queue::Key, delay: Duration) {
        if let Some(queue) = &mut self.0 {
            queue.reset(slot, delay);
        }
    }

    fn remove(&mut self, slot: &delay_queue::Key) {
        if let Some(queue) = &mut self.0 {
            queue.remove(slot);
            if queue.is_empty() {
                self.0 = None;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(DelayQueue::is_empty)
    }

    /// The next one due; `None` while none waits.
    async fn next(&mut self) -> Option<delay_queue::Expired<EntryKey>> {
        let queue = self.0.as_mut()?;
        let due = queue.next().await;
        if queue.is_empty() {
            self.0 = None;
        }
        due
    }
}
