//! One tunnel session from the agent's side: `Hello` → `Welcome`, then a
//! `select!` over the edge's frames, finished local deliveries, the
//! heartbeat tick and shutdown. Acks are batched: every delivery that has
//! finished by the time one is handled goes out in the same `Ack` frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use relay_protocol::{Frame, Limits, VERSION, Webhook};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::connect::Ws;
use super::supervisor::{Outcome, Pipeline};
use crate::config::AgentConfig;
use crate::dedup::{Key, Recent};
use crate::deliver::Verdict;
use crate::error::SessionError;
use crate::status::{Status, now_ms};

pub async fn run(
    mut ws: Ws,
    addr: SocketAddr,
    cfg: &Arc<AgentConfig>,
    pipe: &mut Pipeline,
    status: &Status,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let limits = Limits::default();
    let hello = Frame::Hello {
        version: VERSION,
        window: cfg.window,
        channels: Some(cfg.channels()),
        agent_version: Some(concat!("relay-agent/", env!("CARGO_PKG_VERSION")).into()),
    };
    send(&mut ws, &hello, cfg.heartbeat * 3).await?;
    let welcome = tokio::time::timeout(cfg.connect_timeout, recv(&mut ws, &limits))
        .await
        .map_err(|_| SessionError::ConnectTimeout(cfg.connect_timeout))??;
    let (session, agent, channels, edge_heartbeat) = match welcome {
        Some(Frame::Welcome { session, agent, channels, heartbeat_ms, reclaim_after_ms }) => {
            warn_visibility(cfg, reclaim_after_ms, heartbeat_ms, status);
            (session, agent, channels, heartbeat_ms)
        }
        Some(Frame::Error { code, message }) => {
            return Err(SessionError::Refused { code, message });
        }
        Some(other) => {
            return Err(SessionError::Protocol(format!("expected Welcome, got {}", other.kind())));
        }
        None => return Err(SessionError::Closed),
    };
    tracing::info!(%addr, %session, %agent, ?channels, "tunnel up");
    let heartbeat = cfg.heartbeat;
    let deadline = heartbeat.max(Duration::from_millis(edge_heartbeat)) * 3;
    status.update(|s| {
        s.connected = true;
        s.edge_addr = Some(addr.to_string());
        s.session = Some(session.clone());
        s.agent = Some(agent.clone());
        s.connected_since_ms = Some(now_ms());
        s.last_heartbeat_ms = Some(now_ms());
        s.heartbeat_ms = deadline.as_millis() as u64 / 3;
        s.window = cfg.window;
    });
    // Parked deliveries of the last session come back as redeliveries.
    for (channel, h) in pipe.health.iter_mut() {
        for p in h.parked.drain(..) {
            pipe.running.remove(&Recent::key(channel, &p.id));
        }
        if h.paused {
            let flow = Frame::Flow { window: 0, channel: Some(channel.clone()) };
            send(&mut ws, &flow, deadline).await?;
        }
    }
    // Acks of deliveries that finished while we were disconnected.
    if !pipe.unsent_acks.is_empty() {
        let ids = std::mem::take(&mut pipe.unsent_acks);
        send(&mut ws, &Frame::Ack { ids }, deadline).await?;
    }

    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        let probe_at = next_probe(pipe);
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), drain(&mut ws, cfg, pipe, status, deadline)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ok(());
            }
            frame = recv(&mut ws, &limits) => {
                let Some(frame) = frame? else { return Err(SessionError::Closed) };
                last_rx = Instant::now();
                status.update(|s| s.last_heartbeat_ms = Some(now_ms()));
                on_frame(&mut ws, frame, pipe, status, deadline).await?;
            }
            Some(done) = pipe.tasks.join_next(), if !pipe.tasks.is_empty() => {
                let mut outcomes = vec![done];
                while let Some(more) = pipe.tasks.try_join_next() {
                    outcomes.push(more);
                }
                settle(&mut ws, outcomes, cfg, pipe, status, deadline).await?;
            }
            _ = sleep_until(probe_at) => start_probes(pipe, cfg),
            Some(Ok((channel, up))) = pipe.probes.join_next(), if !pipe.probes.is_empty() => {
                if up {
                    resume(&mut ws, &channel, cfg, pipe, status, deadline).await?;
                } else if let Some(h) = pipe.health.get_mut(&channel) {
                    h.probe_failed();
                }
            }
            _ = ticker.tick() => {
                if last_rx.elapsed() > deadline {
                    return Err(SessionError::HeartbeatTimeout(last_rx.elapsed()));
                }
                send(&mut ws, &Frame::Ping { t: relay_protocol::now_micros() }, deadline).await?;
            }
        }
    }
}

async fn on_frame(
    ws: &mut Ws,
    frame: Frame,
    pipe: &mut Pipeline,
    status: &Status,
    deadline: Duration,
) -> Result<(), SessionError> {
    match frame {
        Frame::Deliver { id, channel, attempt, webhook, .. } => {
            let key = Recent::key(&channel, &id);
            if pipe.recent.contains(&key) {
                // Delivered already; the edge missed our ack.
                status.update(|s| s.duplicates_dropped += 1);
                return send(ws, &Frame::Ack { ids: vec![id] }, deadline).await;
            }
            if !pipe.running.insert(key.clone()) {
                // Still being posted from an earlier session (or parked);
                // its result will be acked when it finishes.
                return Ok(());
            }
            if let Some(h) = pipe.health.get_mut(&channel)
                && h.paused
            {
                h.parked.push_back(super::pause::Parked { id, attempt, webhook });
                let parked = h.parked.len() as u64;
                status.update(|s| set_paused(s, &channel, true, parked));
                return Ok(());
            }
            if attempt > 1 {
                status.update(|s| s.retried += 1);
            }
            spawn_delivery(pipe, key, channel, id, attempt, webhook);
            status.update(|s| s.in_flight = pipe.running.len() as u64);
            Ok(())
        }
        Frame::Ping { t } => send(ws, &Frame::Pong { t }, deadline).await,
        Frame::Pong { t } => {
            let rtt = relay_protocol::now_micros().saturating_sub(t) as f64 / 1000.0;
            status.update(|s| s.last_rtt_ms = Some(rtt));
            Ok(())
        }
        Frame::Stats { channels } => {
            status.update(|s| s.channels = channels);
            Ok(())
        }
        Frame::Error { code, message } => Err(SessionError::Refused { code, message }),
        other => Err(SessionError::Protocol(format!("unexpected {} frame from the edge", other.kind()))),
    }
}

/// The edge redelivers entries pending longer than its visibility timeout
/// to another agent; if a local request can take longer than that (plus
/// the time to notice a dead link), slow local apps cause duplicates.
fn warn_visibility(cfg: &AgentConfig, reclaim_after_ms: Option<u64>, edge_heartbeat_ms: u64, status: &Status) {
    let Some(reclaim) = reclaim_after_ms.map(Duration::from_millis) else { return };
    let deadline = cfg.heartbeat.max(Duration::from_millis(edge_heartbeat_ms)) * 3;
    let needed = cfg.request_timeout + deadline;
    let warning = (reclaim <= needed).then(|| {
        format!(
            "the edge's tunnel.reclaim_after ({reclaim:?}) does not exceed request_timeout ({:?}) + heartbeat deadline ({deadline:?}): \
             a slow local endpoint can get duplicates; raise reclaim_after above {needed:?} or lower request_timeout",
            cfg.request_timeout
        )
    });
    if let Some(w) = &warning {
        tracing::warn!("{w}");
    }
    status.update(|s| s.warnings = warning.into_iter().collect());
}

fn spawn_delivery(pipe: &mut Pipeline, key: Key, channel: String, id: String, attempt: u32, webhook: Webhook) {
    let deliverer = pipe.deliverer.clone();
    pipe.tasks.spawn(async move {
        let verdict = deliverer.deliver(&channel, attempt, &webhook).await;
        Outcome { key, channel, id, attempt, webhook, verdict }
    });
}

/// Turns finished deliveries into one `Ack` frame plus any `Nack`s.
async fn settle(
    ws: &mut Ws,
    outcomes: Vec<Result<Outcome, tokio::task::JoinError>>,
    cfg: &AgentConfig,
    pipe: &mut Pipeline,
    status: &Status,
    deadline: Duration,
) -> Result<(), SessionError> {
    let mut acks = Vec::new();
    let mut nacks = Vec::new();
    let mut resumed = Vec::new();
    for outcome in outcomes {
        let Ok(Outcome { key, channel, id, attempt, webhook, verdict }) = outcome else { continue };
        let health = pipe.health.entry(channel.clone()).or_default();
        let verdict = match verdict {
            Verdict::Down { reason, refused, after } => {
                health.timeouts += 1;
                if health.paused || refused || health.timeouts >= super::pause::TIMEOUTS_TO_PAUSE {
                    // Keep it (no attempt used) until the endpoint answers.
                    if !health.paused {
                        health.pause();
                        tracing::warn!(%channel, %reason, "local endpoint down: pausing the channel and probing it");
                        nacks.push(Frame::Flow { window: 0, channel: Some(channel.clone()) });
                    }
                    health.parked.push_back(super::pause::Parked { id, attempt, webhook });
                    let parked = health.parked.len() as u64;
                    status.update(|s| {
                        note_target(s, &channel, None, Some(reason.clone()));
                        set_paused(s, &channel, true, parked);
                    });
                    continue;
                }
                if attempt >= cfg.retry.max_attempts {
                    Verdict::DeadLetter { reason: format!("gave up after {attempt} attempts: {reason}"), status: None }
                } else {
                    Verdict::Retry { reason, status: None, after }
                }
            }
            answered => {
                // The endpoint answered: it is up.
                health.timeouts = 0;
                if health.paused {
                    resumed.push(channel.clone());
                }
                answered
            }
        };
        pipe.running.remove(&key);
        match verdict {
            Verdict::Ack { status: code } => {
                pipe.recent.insert(key);
                acks.push(id);
                status.update(|s| {
                    s.delivered += 1;
                    note_target(s, &channel, Some(code), None);
                });
            }
            Verdict::Retry { reason, status: code, after } => {
                status.update(|s| {
                    s.failed += 1;
                    note_target(s, &channel, code, Some(reason.clone()));
                });
                tracing::info!(%channel, %id, %reason, ?after, "delivery failed; edge will retry");
                nacks.push(Frame::Nack {
                    id,
                    permanent: false,
                    reason,
                    retry_after_ms: Some(after.as_millis() as u64),
                    status: code,
                });
            }
            Verdict::Down { .. } => {}
            Verdict::DeadLetter { reason, status: code } => {
                status.update(|s| {
                    s.failed += 1;
                    s.dead_lettered += 1;
                    note_target(s, &channel, code, Some(reason.clone()));
                });
                tracing::warn!(%channel, %id, %reason, "delivery failed permanently; dead-lettering");
                nacks.push(Frame::Nack { id, permanent: true, reason, retry_after_ms: None, status: code });
            }
        }
    }
    status.update(|s| s.in_flight = pipe.running.len() as u64);
    if !acks.is_empty() {
        let frame = Frame::Ack { ids: acks };
        if let Err(e) = send(ws, &frame, deadline).await {
            if let Frame::Ack { ids } = frame {
                pipe.unsent_acks.extend(ids);
            }
            return Err(e);
        }
    }
    for nack in nacks {
        send(ws, &nack, deadline).await?;
    }
    for channel in resumed {
        resume(ws, &channel, cfg, pipe, status, deadline).await?;
    }
    Ok(())
}

fn set_paused(s: &mut crate::status::Snapshot, channel: &str, paused: bool, parked: u64) {
    if let Some(t) = s.targets.iter_mut().find(|t| t.channel == channel) {
        t.paused = paused;
        t.parked = parked;
    }
}

/// The endpoint answers again: resume the channel and post what was parked.
async fn resume(
    ws: &mut Ws,
    channel: &str,
    cfg: &AgentConfig,
    pipe: &mut Pipeline,
    status: &Status,
    deadline: Duration,
) -> Result<(), SessionError> {
    let Some(h) = pipe.health.get_mut(channel) else { return Ok(()) };
    if !h.paused {
        return Ok(());
    }
    let parked = h.resume();
    tracing::info!(%channel, parked = parked.len(), "local endpoint is back: resuming the channel");
    status.update(|s| set_paused(s, channel, false, 0));
    for p in parked {
        let key = Recent::key(channel, &p.id);
        spawn_delivery(pipe, key, channel.to_string(), p.id, p.attempt, p.webhook);
    }
    send(ws, &Frame::Flow { window: cfg.window, channel: Some(channel.to_string()) }, deadline).await
}

/// When the earliest probe of a paused channel is due.
fn next_probe(pipe: &Pipeline) -> Option<std::time::Instant> {
    pipe.health.values().filter(|h| h.paused && !h.probing).filter_map(|h| h.next_probe).min()
}

/// Sleeps until `at`, forever when `None`.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn start_probes(pipe: &mut Pipeline, cfg: &AgentConfig) {
    let now = std::time::Instant::now();
    for (channel, h) in pipe.health.iter_mut() {
        if h.paused && !h.probing && h.next_probe.is_some_and(|t| t <= now) {
            h.probing = true;
            let url = cfg.targets.iter().find(|t| &t.channel == channel).map(|t| t.url.clone()).unwrap_or_default();
            let channel = channel.clone();
            pipe.probes.spawn(async move {
                let up = super::pause::probe(&url).await;
                (channel, up)
            });
        }
    }
}

/// Records the last outcome on the channel's target (targets are listed in
/// the snapshot from the start, one per configured channel).
fn note_target(s: &mut crate::status::Snapshot, channel: &str, code: Option<u16>, error: Option<String>) {
    if let Some(t) = s.targets.iter_mut().find(|t| t.channel == channel) {
        t.last_status = code;
        t.last_error = error;
        t.last_attempt_ms = Some(now_ms());
    }
}

/// On shutdown: wait for running deliveries and ack them before closing.
async fn drain(ws: &mut Ws, cfg: &AgentConfig, pipe: &mut Pipeline, status: &Status, deadline: Duration) {
    while let Some(done) = pipe.tasks.join_next().await {
        if settle(ws, vec![done], cfg, pipe, status, deadline).await.is_err() {
            return;
        }
    }
}

async fn send(ws: &mut Ws, frame: &Frame, deadline: Duration) -> Result<(), SessionError> {
    let bytes = relay_protocol::encode(frame, &Limits::default()).map_err(|e| SessionError::Protocol(e.to_string()))?;
    match tokio::time::timeout(deadline, ws.send(Message::Binary(bytes.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::Transport(e.to_string())),
        Err(_) => Err(SessionError::Transport("the edge stopped reading".into())),
    }
}

async fn recv(ws: &mut Ws, limits: &Limits) -> Result<Option<Frame>, SessionError> {
    loop {
        let msg = match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(SessionError::Transport(e.to_string())),
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(bytes) => {
                return relay_protocol::decode(&bytes, limits)
                    .map(Some)
                    .map_err(|e| SessionError::Protocol(e.to_string()));
            }
            Message::Close(_) => return Ok(None),
            Message::Text(_) => {
                return Err(SessionError::Protocol("text message from the edge".into()));
            }
            _ => continue,
        }
    }
}
