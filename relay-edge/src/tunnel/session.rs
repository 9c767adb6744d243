//! One agent session: handshake, then a `select!` loop over the agent's
//! frames, entries fetched from the store, redelivery timers, heartbeats
//! and shutdown.
//!
//! Flow control: a semaphore holds the session's free window slots. The
//! fetcher takes slots before it reads, the session gives one back when a
//! delivery is settled (`Ack`, permanent `Nack`). A transient `Nack` keeps
//! its slot while it waits to be redelivered, so `window = 1` stays strictly
//! FIFO across retries. `Flow` shrinking the window is absorbed as debt.
//!
//! An entry is settled only by the agent's verdict. A session that dies
//! leaves its entries pending in Redis; the next session of the same agent
//! re-reads them first, and another agent reclaims them after the
//! visibility timeout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use relay_protocol::{DecodeError, Frame, Limits, VERSION};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::registry::{Kick, Live, SessionInfo};
use crate::AppState;
use crate::store::{Backend, BlockingRead};
use crate::store::{DELETED_WHILE_PENDING, DeadLetter, Entry, Store, Stored, now_ms};

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

/// Entries read in one go. `overdraft` counts entries beyond the slots the
/// fetcher held (`COUNT` applies per stream), paid back as window debt.
struct Batch {
    entries: Vec<Fetched>,
    overdraft: u32,
}

/// An entry fetched for delivery, with its attempt number.
struct Fetched {
    entry: Entry,
    attempt: u32,
}

/// Events from helper tasks into the session loop.
enum Event {
    /// A transiently nacked entry is due again.
    Redeliver { channel: String, id: String },
    /// Fresh backlog figures for the agent.
    Stats(Vec<relay_protocol::ChannelStats>),
}

/// One delivery awaiting the agent's verdict.
struct Inflight {
    channel: String,
    attempt: u32,
    /// When the edge received the webhook (for end-to-end latency).
    received_at_ms: u64,
}

pub async fn run(mut ws: WebSocket, peer: Peer, state: Arc<AppState>) {
    let tunnel = &state.cfg.tunnel;
    let limits =
        Limits { max_frame: tunnel.max_frame.as_u64() as usize, max_window: tunnel.max_window, ..Limits::default() };
    let session_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();

    let handshake = tokio::time::timeout(tunnel.handshake_timeout, recv_frame(&mut ws, &limits)).await;
    let (window, channels) = match handshake {
        Err(_) => {
            return close(ws, &peer, Close::new("handshake_timeout", "no Hello frame in time")).await;
        }
        Ok(Err(c)) => return close(ws, &peer, c).await,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Frame::Hello { version, window, channels, .. }))) => {
            if version != VERSION {
                let msg = format!("protocol version {version} is not supported; this edge speaks {VERSION}");
                return close(ws, &peer, Close::new("unsupported_version", msg)).await;
            }
            match resolve_channels(&state, &peer.agent, channels) {
                Ok(c) => (window, c),
                Err(c) => return close(ws, &peer, c).await,
            }
        }
        Ok(Ok(Some(other))) => {
            let msg = format!("expected Hello as the first frame, got {}", other.kind());
            return close(ws, &peer, Close::new("protocol_error", msg)).await;
        }
    };
    let prepared = async {
        for channel in &channels {
            state.store.ensure_group(channel).await?;
        }
        state.store.reader().await
    }
    .await;
    let reader = match prepared {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(agent = %peer.agent, error = %e, "cannot prepare the session's channels");
            let c = Close::new("store_unavailable", "the edge's store is unavailable; retry later");
            return close(ws, &peer, c).await;
        }
    };

    let kick = Kick { token: state.shutdown.child_token(), ..Kick::default() };
    let live = Arc::new(Live::default());
    let cancel = kick.token.clone();
    state.registry.register(
        SessionInfo {
            session: session_id.clone(),
            agent: peer.agent.clone(),
            addr: peer.addr,
            channels: channels.clone(),
            connected_at_ms: now_ms(),
            cert: peer.cert.clone(),
            live: live.clone(),
        },
        kick.clone(),
    );
    tracing::info!(agent = %peer.agent, session = %session_id, ?channels, window, "agent connected");
    state.metrics.sessions_opened.inc();

    let welcome = Frame::Welcome {
        session: session_id.clone(),
        agent: peer.agent.clone(),
        channels: channels.clone(),
        heartbeat_ms: tunnel.heartbeat.as_millis() as u64,
        reclaim_after_ms: Some(tunnel.reclaim_after.as_millis() as u64),
    };
    let credit = Arc::new(Semaphore::new(window as usize));
    let paused = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let wake_fetcher = Arc::new(Notify::new());
    let (fetch_tx, fetch_rx) = mpsc::channel(4);
    let (events_tx, events_rx) = mpsc::channel(64);
    let fetcher = tokio::spawn(fetch_loop(
        state.store.clone(),
        reader,
        peer.agent.clone(),
        channels.clone(),
        credit.clone(),
        fetch_tx,
        cancel.clone(),
        tunnel.reclaim_after,
        paused.clone(),
        wake_fetcher.clone(),
    ));
    let mut session = Session {
        state: state.clone(),
        peer: peer.clone(),
        channels,
        limits,
        window,
        debt: 0,
        credit,
        inflight: HashMap::new(),
        held: VecDeque::new(),
        last_rx: Instant::now(),
        live,
        paused,
        wake_fetcher,
        events_tx,
    };
    let outcome = match session.send(&mut ws, &welcome).await {
        Ok(()) => session.run(&mut ws, fetch_rx, events_rx, &kick).await,
        Err(c) => Err(c),
    };
    cancel.cancel();
    fetcher.abort();
    state.registry.remove(&peer.agent, &session_id);
    state.metrics.session_closed(outcome.as_ref().err().map(|c| c.code).unwrap_or("disconnected"));
    match outcome {
        Ok(()) => tracing::info!(agent = %peer.agent, session = %session_id, "agent disconnected"),
        Err(c) => {
            tracing::info!(agent = %peer.agent, session = %session_id, code = c.code, reason = %c.message, "session closed");
            close(ws, &peer, c).await;
        }
    }
}

fn resolve_channels(state: &AppState, agent: &str, asked: Option<Vec<String>>) -> Result<Vec<String>, Close> {
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

/// Sends `Error`, then a close frame, and lets the socket go.
async fn close(mut ws: WebSocket, peer: &Peer, c: Close) {
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
    loop {
        let msg = match ws.recv().await {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(Close::new("transport_error", format!("websocket error: {e}")));
            }
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(bytes) => {
                return relay_protocol::decode(&bytes, limits).map(Some).map_err(|e| match e {
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
    state: Arc<AppState>,
    peer: Peer,
    /// Channels this session delivers.
    channels: Vec<String>,
    limits: Limits,
    /// Current window asked by the agent.
    window: u32,
    /// Slots to swallow before giving any back (after a window shrink).
    debt: u32,
    /// Free window slots; the fetcher takes, settling gives back.
    credit: Arc<Semaphore>,
    /// Deliveries sent and not yet settled, by stream id.
    inflight: HashMap<String, Inflight>,
    /// Fetched entries whose id collides with an in-flight one of another
    /// channel (fan-out gives equal ids); sent once that one settles.
    held: VecDeque<Fetched>,
    /// Last time anything arrived from the agent.
    last_rx: Instant,
    /// Figures shown by `relay-edge agents`.
    live: Arc<Live>,
    /// Channels the agent paused (its local endpoint is down); shared with the fetcher.
    paused: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Wakes the fetcher when a channel resumes.
    wake_fetcher: Arc<Notify>,
    events_tx: mpsc::Sender<Event>,
}

impl Session {
    async fn run(
        &mut self,
        ws: &mut WebSocket,
        mut fetch_rx: mpsc::Receiver<Batch>,
        mut events_rx: mpsc::Receiver<Event>,
        kick: &Kick,
    ) -> Result<(), Close> {
        let heartbeat = self.state.cfg.tunnel.heartbeat;
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            self.live.in_flight.store(self.inflight.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = kick.token.cancelled() => {
                    return Err(if self.state.shutdown.is_cancelled() {
                        Close::new("shutdown", "the edge is shutting down; reconnect shortly")
                    } else if kick.was_revoked() {
                        Close::new("revoked", "this agent's certificate has been revoked")
                    } else {
                        Close::new("replaced", "a newer session of this agent took over")
                    });
                }
                frame = recv_frame(ws, &self.limits) => {
                    match frame? {
                        None => return Ok(()),
                        Some(f) => {
                            self.last_rx = Instant::now();
                            self.on_frame(ws, f).await?;
                        }
                    }
                }
                Some(batch) = fetch_rx.recv() => {
                    self.debt += batch.overdraft;
                    for f in batch.entries {
                        self.dispatch(ws, f).await?;
                    }
                    // One flush (one TLS record run, one syscall) per batch.
                    self.flush(ws).await?;
                }
                Some(ev) = events_rx.recv() => match ev {
                    Event::Redeliver { channel, id } => self.redeliver(ws, channel, id).await?,
                    Event::Stats(channels) => self.send(ws, &Frame::Stats { channels }).await?,
                },
                _ = ticker.tick() => {
                    if self.last_rx.elapsed() > heartbeat * 3 {
                        return Err(Close::new("heartbeat_timeout", format!("nothing received for {:?}", self.last_rx.elapsed())));
                    }
                    self.send(ws, &Frame::Ping { t: relay_protocol::now_micros() }).await?;
                    if ticks.is_multiple_of(3) {
                        self.spawn_stats();
                    }
                    ticks += 1;
                }
            }
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
    async fn queue_deliver(
        &self,
        ws: &mut WebSocket,
        id: &str,
        channel: &str,
        attempt: u32,
        webhook: &Stored,
    ) -> Result<(), Close> {
        let bytes =
            relay_protocol::encode_deliver(id, channel, attempt, webhook.received_at_ms, &webhook.bytes, &self.limits)
                .map_err(|e| Close::new("internal", format!("cannot encode deliver: {e}")))?;
        self.feed(ws, bytes).await
    }

    /// Queues an encoded frame.
    async fn feed(&self, ws: &mut WebSocket, bytes: Vec<u8>) -> Result<(), Close> {
        self.in_time(ws.feed(Message::Binary(bytes.into()))).await
    }

    async fn flush(&self, ws: &mut WebSocket) -> Result<(), Close> {
        self.in_time(ws.flush()).await
    }

    /// A write to the agent, bounded by the dead-session deadline.
    async fn in_time(&self, write: impl std::future::Future<Output = Result<(), axum::Error>>) -> Result<(), Close> {
        match tokio::time::timeout(self.state.cfg.tunnel.heartbeat * 3, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Close::new("transport_error", format!("send failed: {e}"))),
            Err(_) => Err(Close::new("send_timeout", "the agent stopped reading")),
        }
    }

    async fn on_frame(&mut self, ws: &mut WebSocket, frame: Frame) -> Result<(), Close> {
        match frame {
            Frame::Ack { ids } => {
                self.on_ack(ids).await;
                self.dispatch_held(ws).await?;
            }
            Frame::Nack { id, permanent, reason, retry_after_ms, status } => {
                self.on_nack(ws, id, permanent, reason, retry_after_ms, status).await?
            }
            Frame::Flow { window, channel: None } => self.on_flow(window),
            Frame::Flow { window, channel: Some(channel) } => self.on_channel_flow(&channel, window > 0)?,
            Frame::Ping { t } => self.send(ws, &Frame::Pong { t }).await?,
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

    /// Frees one window slot, or pays down debt after a window shrink.
    fn release(&mut self) {
        if self.debt > 0 {
            self.debt -= 1;
        } else {
            self.credit.add_permits(1);
        }
    }

    fn on_flow(&mut self, window: u32) {
        if window >= self.window {
            let mut grow = window - self.window;
            let absorbed = grow.min(self.debt);
            self.debt -= absorbed;
            grow -= absorbed;
            self.credit.add_permits(grow as usize);
        } else {
            self.debt += self.window - window;
        }
        tracing::debug!(agent = %self.peer.agent, from = self.window, to = window, "window changed");
        self.window = window;
    }

    /// Pauses or resumes one channel: the fetcher stops reading it; what is
    /// already in flight stays with the agent.
    fn on_channel_flow(&mut self, channel: &str, resume: bool) -> Result<(), Close> {
        if !self.channels.iter().any(|c| c == channel) {
            return Err(Close::new(
                "protocol_error",
                format!("Flow names channel `{channel}`, not part of this session"),
            ));
        }
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if resume {
            paused.remove(channel);
        } else {
            paused.insert(channel.to_string());
        }
        drop(paused);
        self.wake_fetcher.notify_one();
        tracing::info!(agent = %self.peer.agent, channel, resume, "channel flow changed by the agent");
        Ok(())
    }

    async fn on_ack(&mut self, ids: Vec<String>) {
        let mut by_channel: HashMap<String, Vec<String>> = HashMap::new();
        let mut unknown = Vec::new();
        for id in ids {
            match self.inflight.remove(&id) {
                Some(f) => {
                    self.state.metrics.delivered(&f.channel, f.received_at_ms);
                    by_channel.entry(f.channel).or_default().push(id);
                    self.release();
                }
                None => unknown.push(id),
            }
        }
        // An ack for an entry delivered by an earlier session of this agent:
        // the agent did deliver it, so acknowledge it on every channel of the
        // session (XACK of an id that is not pending is a no-op).
        if !unknown.is_empty() {
            for channel in &self.channels {
                by_channel.entry(channel.clone()).or_default().extend(unknown.iter().cloned());
            }
        }
        for (channel, ids) in by_channel {
            if let Err(e) = self.state.store.ack(&channel, &ids).await {
                // Still pending: it will be redelivered (at-least-once).
                tracing::warn!(agent = %self.peer.agent, channel, error = %e, "XACK failed");
            }
        }
    }

    async fn on_nack(
        &mut self,
        ws: &mut WebSocket,
        id: String,
        permanent: bool,
        reason: String,
        retry_after_ms: Option<u64>,
        status: Option<u16>,
    ) -> Result<(), Close> {
        let Some(f) = self.inflight.get(&id) else {
            tracing::debug!(agent = %self.peer.agent, id, "nack for an entry not in flight; ignored");
            return Ok(());
        };
        let channel = f.channel.clone();
        let attempts = f.attempt;
        if permanent {
            let raw = match self.state.store.raw_entry(&channel, &id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(agent = %self.peer.agent, channel, id, error = %e, "cannot read entry to dead-letter; left pending");
                    return Ok(());
                }
            };
            let letter =
                DeadLetter { channel: &channel, id: &id, reason: &reason, status, attempts, raw: raw.as_deref() };
            match self.state.store.dead_letter(&letter).await {
                Ok(()) => {
                    tracing::warn!(agent = %self.peer.agent, channel, id, attempts, reason, "webhook dead-lettered");
                    self.state.metrics.outcome(&channel, "dead_lettered");
                    self.inflight.remove(&id);
                    self.release();
                    self.dispatch_held(ws).await?;
                }
                Err(e) => {
                    tracing::warn!(agent = %self.peer.agent, channel, id, error = %e, "dead-letter failed; left pending")
                }
            }
            return Ok(());
        }
        let delay = retry_after_ms
            .map(Duration::from_millis)
            .unwrap_or(self.state.cfg.tunnel.retry_delay)
            .min(self.state.cfg.tunnel.reclaim_after / 2);
        tracing::debug!(agent = %self.peer.agent, channel, id, attempts, ?delay, reason, "nacked; redelivery scheduled");
        self.state.metrics.outcome(&channel, "nacked");
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Redeliver { channel, id }).await;
        });
        Ok(())
    }

    async fn redeliver(&mut self, ws: &mut WebSocket, channel: String, id: String) -> Result<(), Close> {
        let Some(attempt) = self.inflight.get(&id).map(|f| f.attempt + 1) else {
            return Ok(());
        };
        self.state.metrics.retried.inc();
        self.state.metrics.outcome(&channel, "redelivered");
        match self.state.store.claim(&channel, &self.peer.agent, &id).await {
            Ok(Some(entry)) => {
                if let Ok(webhook) = entry.webhook {
                    if let Some(f) = self.inflight.get_mut(&id) {
                        f.attempt = attempt;
                    }
                    self.queue_deliver(ws, &id, &channel, attempt, &webhook).await?;
                    return self.flush(ws).await;
                }
                self.inflight.remove(&id);
                self.release();
                Ok(())
            }
            Ok(None) => {
                // No longer pending here (acked late, or taken by another consumer).
                self.inflight.remove(&id);
                self.release();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(agent = %self.peer.agent, channel, id, error = %e, "redelivery read failed; retrying later");
                let tx = self.events_tx.clone();
                let delay = self.state.cfg.tunnel.retry_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Event::Redeliver { channel, id }).await;
                });
                Ok(())
            }
        }
    }

    async fn dispatch(&mut self, ws: &mut WebSocket, f: Fetched) -> Result<(), Close> {
        let Fetched { entry, attempt } = f;
        if let Some(existing) = self.inflight.get(&entry.id) {
            if existing.channel == entry.channel {
                // Our own in-flight entry came back through a reclaim: it is
                // already with the agent; don't deliver it twice.
                self.release();
                return Ok(());
            }
            self.held.push_back(Fetched { entry, attempt });
            return Ok(());
        }
        let webhook = match entry.webhook {
            Ok(w) => w,
            Err(why) => {
                self.discard_unreadable(&entry.channel, &entry.id, &why).await;
                self.release();
                return Ok(());
            }
        };
        self.queue_deliver(ws, &entry.id, &entry.channel, attempt, &webhook).await?;
        self.inflight
            .insert(entry.id, Inflight { channel: entry.channel, attempt, received_at_ms: webhook.received_at_ms });
        Ok(())
    }

    async fn dispatch_held(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let mut still = VecDeque::new();
        while let Some(f) = self.held.pop_front() {
            if self.inflight.contains_key(&f.entry.id) {
                still.push_back(f);
            } else {
                self.dispatch(ws, f).await?;
            }
        }
        self.held = still;
        self.flush(ws).await
    }

    /// An entry that cannot be delivered: trimmed while pending (nothing left
    /// to deliver, acknowledge it) or corrupt (keep it, in the DLQ).
    async fn discard_unreadable(&self, channel: &str, id: &str, why: &str) {
        tracing::warn!(agent = %self.peer.agent, channel, id, why, "unreadable stream entry");
        let result = if why == DELETED_WHILE_PENDING {
            self.state.store.ack(channel, &[id.to_string()]).await.map(|_| ())
        } else {
            let raw = self.state.store.raw_entry(channel, id).await.ok().flatten();
            let letter = DeadLetter { channel, id, reason: why, status: None, attempts: 0, raw: raw.as_deref() };
            self.state.store.dead_letter(&letter).await
        };
        if let Err(e) = result {
            tracing::warn!(channel, id, error = %e, "cannot settle unreadable entry; left pending");
        }
    }

    fn spawn_stats(&self) {
        let store = self.state.store.clone();
        let channels = self.channels.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(channels.len());
            for ch in &channels {
                match store.snapshot(ch).await.map(|s| s.stats) {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        tracing::debug!(channel = %ch, error = %e, "stats unavailable");
                        return;
                    }
                }
            }
            let _ = tx.send(Event::Stats(out)).await;
        });
    }
}

/// Reads entries for a session: its own pending entries first (cursor `0`,
/// advancing), then new ones (`>`), plus stale entries of vanished
/// consumers every half visibility timeout. Never reads more than the
/// window slots it holds.
#[allow(clippy::too_many_arguments)]
async fn fetch_loop(
    store: Store,
    mut reader: crate::store::Reader,
    consumer: String,
    channels: Vec<String>,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<Batch>,
    cancel: CancellationToken,
    reclaim_after: Duration,
    paused: Arc<std::sync::Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
) {
    const MAX_BATCH: usize = 256;
    let mut cursors: Vec<(String, String)> = channels.iter().map(|c| (c.clone(), "0".to_string())).collect();
    let reclaim_every = (reclaim_after / 2).max(Duration::from_millis(200));
    let mut next_reclaim = Instant::now();
    loop {
        let active: Vec<(String, String)> = {
            let paused = paused.lock().unwrap_or_else(|p| p.into_inner());
            cursors.iter().filter(|(c, _)| !paused.contains(c)).cloned().collect()
        };
        if active.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => continue,
            }
        }
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = credit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        permit.forget();
        let mut slots = 1;
        while slots < MAX_BATCH {
            match credit.try_acquire() {
                Ok(p) => {
                    p.forget();
                    slots += 1;
                }
                Err(_) => break,
            }
        }
        let mut batch: Vec<Fetched> = Vec::new();
        let mut failed = false;

        if Instant::now() >= next_reclaim {
            next_reclaim = Instant::now() + reclaim_every;
            for (ch, _) in &active {
                if batch.len() >= slots {
                    break;
                }
                match store.autoclaim(ch, &consumer, reclaim_after, slots - batch.len()).await {
                    Ok(entries) if !entries.is_empty() => {
                        tracing::info!(agent = %consumer, channel = %ch, count = entries.len(), "reclaimed stale pending entries");
                        let counts = counts_for(&store, ch, &consumer, &entries).await;
                        batch.extend(entries.into_iter().map(|e| {
                            let attempt = counts.get(&e.id).copied().unwrap_or(1);
                            Fetched { entry: e, attempt }
                        }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(agent = %consumer, channel = %ch, error = %e, "reclaim failed");
                        failed = true;
                    }
                }
            }
        }

        if !failed && batch.len() < slots {
            // COUNT applies per stream: split the free slots between them.
            let want = ((slots - batch.len()) / active.len()).max(1);
            let read = tokio::select! {
                _ = cancel.cancelled() => return,
                r = reader.read(&consumer, &active, want) => r,
            };
            match read {
                Ok(raws) => {
                    // Pending phase: advance each channel's cursor; a channel
                    // whose own pending list is exhausted moves to `>`.
                    let history: Vec<(String, String)> = active.iter().filter(|(_, c)| c != ">").cloned().collect();
                    for (ch, cursor) in cursors.iter_mut() {
                        if cursor == ">" || !history.iter().any(|(c, _)| c == ch) {
                            continue;
                        }
                        match raws.iter().rev().find(|r| &r.channel == ch).map(|r| r.id.clone()) {
                            Some(last) => *cursor = last,
                            None => *cursor = ">".into(),
                        }
                    }
                    let mut by_channel: HashMap<String, Vec<Entry>> = HashMap::new();
                    for raw in raws {
                        let ch = raw.channel.clone();
                        by_channel.entry(ch.clone()).or_default().push(raw.into_entry(&ch));
                    }
                    for (ch, entries) in by_channel {
                        let from_history = history.iter().any(|(c, _)| c == &ch);
                        let counts = if from_history {
                            counts_for(&store, &ch, &consumer, &entries).await
                        } else {
                            HashMap::new()
                        };
                        batch.extend(entries.into_iter().map(|e| {
                            let attempt = counts.get(&e.id).copied().unwrap_or(1);
                            Fetched { entry: e, attempt }
                        }));
                    }
                }
                Err(e) => {
                    tracing::warn!(agent = %consumer, error = %e, "XREADGROUP failed");
                    failed = true;
                }
            }
        }

        let unused = slots.saturating_sub(batch.len());
        if unused > 0 {
            credit.add_permits(unused);
        }
        let overdraft = batch.len().saturating_sub(slots) as u32;
        if !batch.is_empty() && tx.send(Batch { entries: batch, overdraft }).await.is_err() {
            return;
        }
        if failed {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Ok(r) = store.reader().await {
                reader = r;
            }
        }
    }
}

/// Delivery counts of entries that came from a pending list.
async fn counts_for(store: &Store, channel: &str, consumer: &str, entries: &[Entry]) -> HashMap<String, u32> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return HashMap::new();
    };
    store.delivery_counts(channel, consumer, &first.id, &last.id, entries.len()).await.unwrap_or_default()
}
