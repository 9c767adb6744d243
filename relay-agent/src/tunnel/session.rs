//! One tunnel session from the agent's side: `Hello` → `Welcome`, then a
//! `select!` over the edge's frames, finished local deliveries, endpoint
//! probes, the heartbeat tick and shutdown. The delivery state and its
//! decisions live in the [`Pipeline`]; this loop moves frames. Acks are
//! batched: every delivery that has finished by the time one is handled
//! goes out in the same `Ack` frame.
//!
//! Generic over the byte stream under the WebSocket (TLS over TCP in the
//! binary, an in-memory pipe in the tests, which run its timing on a
//! paused clock), and timed with `tokio::time` only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_protocol::{Frame, Limits, VERSION};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::error::SessionError;
use crate::pipeline::{Pipeline, Settled};
use crate::status::{Status, now_ms};

/// What a session runs over: TLS over TCP, or a pipe in tests.
pub trait Link: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Link for T {}

type Ws<S> = WebSocketStream<S>;

pub async fn run<S: Link>(
    mut ws: Ws<S>,
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
        named_acks: true,
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
    let deadline = dead_link_after(cfg.heartbeat, edge_heartbeat);
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
    for frame in pipe.session_started() {
        send(&mut ws, &frame, deadline).await?;
    }
    pipe.acks_sent();

    let mut ticker = tokio::time::interval(cfg.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        let probe_at = pipe.next_probe();
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
            done = Pipeline::finished(&mut pipe.tasks) => {
                let settled = pipe.settle(done, status);
                send_settled(&mut ws, settled, cfg, pipe, status, deadline).await?;
            }
            _ = sleep_until(probe_at) => pipe.start_probes(cfg),
            Some(Ok((channel, up))) = pipe.probes.join_next(), if !pipe.probes.is_empty() => {
                if up {
                    if let Some(flow) = pipe.resume(&channel, cfg.window, status) {
                        send(&mut ws, &flow, deadline).await?;
                    }
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

async fn on_frame<S: Link>(
    ws: &mut Ws<S>,
    frame: Frame,
    pipe: &mut Pipeline,
    status: &Status,
    deadline: Duration,
) -> Result<(), SessionError> {
    match frame {
        Frame::Deliver { id, channel, attempt, webhook, .. } => {
            match pipe.on_deliver(channel, id, attempt, webhook, status) {
                Some(ack) => send(ws, &ack, deadline).await,
                None => Ok(()),
            }
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

/// Longest edge heartbeat interval the agent takes (an edge's value is
/// clamped to it): a link silent this long, three times, is dead.
pub const MAX_EDGE_HEARTBEAT: Duration = Duration::from_secs(600);

/// How long a silent link lives: three of the longer heartbeat interval,
/// ours or the edge's (which comes off the wire, so it is clamped).
pub fn dead_link_after(own: Duration, edge_ms: u64) -> Duration {
    own.max(Duration::from_millis(edge_ms).min(MAX_EDGE_HEARTBEAT)).saturating_mul(3)
}

/// The edge redelivers entries pending longer than its visibility timeout
/// to another agent; if a local request can take longer than that (plus
/// the time to notice a dead link), slow local apps cause duplicates.
fn warn_visibility(cfg: &AgentConfig, reclaim_after_ms: Option<u64>, edge_heartbeat_ms: u64, status: &Status) {
    let Some(reclaim) = reclaim_after_ms.map(Duration::from_millis) else { return };
    let deadline = dead_link_after(cfg.heartbeat, edge_heartbeat_ms);
    let needed = cfg.request_timeout.saturating_add(deadline);
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

/// Sends what finished deliveries settled: the `Ack`, then `Nack`s and
/// pauses, then resumes the channels whose endpoint answered again.
async fn send_settled<S: Link>(
    ws: &mut Ws<S>,
    settled: Settled,
    cfg: &AgentConfig,
    pipe: &mut Pipeline,
    status: &Status,
    deadline: Duration,
) -> Result<(), SessionError> {
    let Settled { acks, frames, resumed } = settled;
    for frame in crate::pipeline::ack_frames(&acks) {
        if let Err(e) = send(ws, &frame, deadline).await {
            pipe.keep_unsent(acks);
            return Err(e);
        }
    }
    for frame in frames {
        send(ws, &frame, deadline).await?;
    }
    for channel in resumed {
        if let Some(flow) = pipe.resume(&channel, cfg.window, status) {
            send(ws, &flow, deadline).await?;
        }
    }
    Ok(())
}

/// Sleeps until `at`, forever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// On shutdown: wait for running deliveries and ack them before closing.
async fn drain<S: Link>(ws: &mut Ws<S>, cfg: &AgentConfig, pipe: &mut Pipeline, status: &Status, deadline: Duration) {
    while !pipe.is_idle() {
        let done = Pipeline::finished(&mut pipe.tasks).await;
        let settled = pipe.settle(done, status);
        if send_settled(ws, settled, cfg, pipe, status, deadline).await.is_err() {
            return;
        }
    }
}

async fn send<S: Link>(ws: &mut Ws<S>, frame: &Frame, deadline: Duration) -> Result<(), SessionError> {
    let bytes = relay_protocol::encode(frame, &Limits::default()).map_err(|e| SessionError::Protocol(e.to_string()))?;
    match tokio::time::timeout(deadline, ws.send(Message::Binary(bytes.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::Transport(e.to_string())),
        Err(_) => Err(SessionError::Transport("the edge stopped reading".into())),
    }
}

async fn recv<S: Link>(ws: &mut Ws<S>, limits: &Limits) -> Result<Option<Frame>, SessionError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::Deliverer;
    use crate::status::Snapshot;

    /// An edge at the other end of an in-memory pipe: answers `Hello` with
    /// a `Welcome` (heartbeat `edge_ms`), then sends a `Ping` every
    /// `edge_ms` until `alive_for` has passed, then only reads. Returns
    /// how many frames it read.
    async fn fake_edge(io: tokio::io::DuplexStream, edge_ms: u64, alive_for: Duration) -> usize {
        let mut ws = tokio_tungstenite::accept_async(io).await.expect("handshake");
        let limits = Limits::default();
        let Ok(Some(Frame::Hello { .. })) = recv(&mut ws, &limits).await else { panic!("expected Hello") };
        let welcome = Frame::Welcome {
            session: "s".into(),
            agent: "lan-1".into(),
            channels: vec!["crm".into()],
            heartbeat_ms: edge_ms,
            reclaim_after_ms: None,
        };
        send(&mut ws, &welcome, Duration::from_secs(5)).await.expect("welcome");
        let until = Instant::now() + alive_for;
        let mut ping = tokio::time::interval(Duration::from_millis(edge_ms));
        let mut read = 0;
        loop {
            tokio::select! {
                _ = ping.tick(), if Instant::now() < until => {
                    if send(&mut ws, &Frame::Ping { t: 0 }, Duration::from_secs(5)).await.is_err() {
                        return read;
                    }
                }
                frame = recv(&mut ws, &limits) => match frame {
                    Ok(Some(_)) => read += 1,
                    _ => return read,
                },
            }
        }
    }

    /// Runs one agent session against [`fake_edge`]; returns how it ended
    /// and after how long (on the paused clock).
    async fn session_against(edge_ms: u64, alive_for: Duration) -> (Result<(), SessionError>, Duration) {
        let cfg = Arc::new(AgentConfig { heartbeat: Duration::from_secs(1), ..AgentConfig::default() });
        let (agent_io, edge_io) = tokio::io::duplex(64 * 1024);
        let edge = tokio::spawn(fake_edge(edge_io, edge_ms, alive_for));
        let (ws, _) = tokio_tungstenite::client_async("ws://edge/", agent_io).await.expect("handshake");
        let mut pipe = Pipeline::new(Arc::new(Deliverer::new(&cfg).expect("deliverer")), &cfg);
        let status = Status::new(Snapshot::default());
        let started = Instant::now();
        let addr: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
        let end = run(ws, addr, &cfg, &mut pipe, &status, &CancellationToken::new()).await;
        let took = started.elapsed();
        edge.abort();
        (end, took)
    }

    /// A link on which the edge goes silent is given up three of the
    /// longer heartbeat intervals later (the edge's 2 s here), not before
    /// and not much after; the agent pings meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_silent_edge_is_given_up_after_three_heartbeats() {
        let (end, took) = session_against(2_000, Duration::ZERO).await;
        assert!(matches!(end, Err(SessionError::HeartbeatTimeout(_))), "{end:?}");
        let deadline = Duration::from_secs(6);
        assert!(took > deadline && took <= deadline + Duration::from_secs(1), "gave up after {took:?}");
    }

    /// An edge that keeps talking keeps the link up however long it lasts;
    /// once it stops, the same deadline runs from its last frame.
    #[tokio::test(start_paused = true)]
    async fn a_talking_edge_keeps_the_link_up() {
        let (end, took) = session_against(2_000, Duration::from_secs(120)).await;
        assert!(matches!(end, Err(SessionError::HeartbeatTimeout(_))), "{end:?}");
        assert!(took > Duration::from_secs(120 + 4), "given up while the edge was talking: {took:?}");
        assert!(took <= Duration::from_secs(120 + 7), "gave up after {took:?}");
    }

    /// The edge's heartbeat comes off the wire but is clamped: an edge
    /// that claims a day still has its silent link given up in 30 minutes.
    #[tokio::test(start_paused = true)]
    async fn an_edge_claiming_a_long_heartbeat_is_clamped() {
        let (end, took) = session_against(86_400_000, Duration::ZERO).await;
        assert!(matches!(end, Err(SessionError::HeartbeatTimeout(_))), "{end:?}");
        let deadline = MAX_EDGE_HEARTBEAT * 3;
        assert!(took > deadline && took <= deadline + Duration::from_secs(1), "gave up after {took:?}");
    }

    /// An edge's `heartbeat_ms` comes off the wire: `u64::MAX` used to
    /// panic the agent (`Duration * 3` overflowed).
    #[test]
    fn an_edge_heartbeat_from_the_wire_cannot_overflow_the_deadline() {
        let own = Duration::from_secs(10);
        assert_eq!(dead_link_after(own, u64::MAX), MAX_EDGE_HEARTBEAT * 3);
        assert_eq!(dead_link_after(own, 0), own * 3);
        assert_eq!(dead_link_after(own, 20_000), Duration::from_secs(60));
        assert_eq!(dead_link_after(Duration::MAX, 5), Duration::MAX, "saturates");
    }
}
