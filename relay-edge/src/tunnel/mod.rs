//! The tunnel listener: TLS 1.3 with a required client certificate (the
//! handshake runs in the per-connection task, under a timeout), the agent
//! identity read from the verified certificate, revoked certificates
//! refused, and the WebSocket upgrade to subprotocol `relay.v1` handed to
//! [`session::run`].

pub mod fetcher;
pub mod inflight;
pub mod registry;
pub mod revocation;
pub mod session;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use relay_protocol::SUBPROTOCOL;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{EdgeConfig, TunnelConfig};
use crate::metrics::Metrics;
use crate::server::{ConnCaps, ConnLimits, accept_loop, serve_http};
use crate::store::Store;
use registry::{Registry, SessionInfo};
use revocation::Revocation;

/// Who is on the other end of a tunnel connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity from the verified client certificate.
    pub agent: String,
    pub addr: SocketAddr,
    /// Certificate ids, matched against `tunnel.revoked` (also on reload).
    pub cert: tls::CertIds,
    /// The certificate chain it presented (end-entity first), verified
    /// again at registration and when a reload changes the CA.
    pub chain: Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// What the tunnel listener and its sessions work with, and nothing else.
pub struct TunnelState {
    /// `[tunnel]` as at start: timeouts, frame and window limits, caps. Its
    /// `revoked` is only the first value of the `revoked` field below.
    cfg: TunnelConfig,
    /// Agent identity → channels granted to it.
    grants: HashMap<String, Vec<String>>,
    /// Where sessions read entries and settle verdicts.
    store: Store,
    /// The edge's metrics (shared with every subsystem).
    metrics: Arc<Metrics>,
    /// Channel figures refreshed edge-wide (what `Stats` frames carry).
    backlog: Arc<crate::backlog::Backlog>,
    /// One live session per agent (shared with the admin listener, which lists them).
    registry: Registry,
    /// Cancelled once, on SIGINT/SIGTERM (or by a test); every session's
    /// kick token is a child of it.
    shutdown: CancellationToken,
    /// `tunnel.revoked`, parsed once; replaced on reload.
    revoked: RwLock<Vec<Revocation>>,
    /// TLS of the tunnel listener, replaced on reload (new cert files);
    /// sessions already up keep theirs.
    server_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// The client-certificate check, replaced with `server_tls`.
    client_verifier: RwLock<tls::Verifier>,
    /// The largest entry a session's store read is sized for (as if every
    /// entry were this large): at first what this edge's ingest stores,
    /// `ingest.max_body` plus `ingest.max_header_bytes` and the envelope
    /// (16 → 31 entries per read with the defaults, where `max_frame` was
    /// the size before); raised by any larger entry a read returns; at
    /// most `tunnel.max_frame`.
    largest_entry: Arc<std::sync::atomic::AtomicUsize>,
    /// Every session runs tracked: a graceful shutdown waits for sessions
    /// to hand their last acks to the store.
    sessions: TaskTracker,
}

/// What a stored webhook carries besides its body and headers: ids,
/// route, path, times, client address, MessagePack framing.
const ENVELOPE: u64 = 4096;

impl TunnelState {
    /// The TLS pair is [`tls::tls_and_verifier`]'s answer for `cfg.tunnel`.
    pub fn new(
        cfg: &EdgeConfig,
        (server_tls, verifier): (Arc<rustls::ServerConfig>, tls::Verifier),
        store: Store,
        (metrics, backlog): (Arc<Metrics>, Arc<crate::backlog::Backlog>),
        registry: Registry,
        (shutdown, sessions): (CancellationToken, TaskTracker),
    ) -> Self {
        Self {
            cfg: cfg.tunnel.clone(),
            grants: cfg.agents.iter().map(|a| (a.name.clone(), a.channels.clone())).collect(),
            store,
            metrics,
            backlog,
            registry,
            shutdown,
            revoked: RwLock::new(revocation_list(&cfg.tunnel)),
            server_tls: RwLock::new(server_tls),
            client_verifier: RwLock::new(verifier),
            largest_entry: Arc::new(std::sync::atomic::AtomicUsize::new(
                (cfg.ingest.max_body.as_u64() + cfg.ingest.max_header_bytes.as_u64() + ENVELOPE)
                    .min(cfg.tunnel.max_frame.as_u64()) as usize,
            )),
            sessions,
        }
    }

    fn is_revoked(&self, ids: &tls::CertIds) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r.names(ids))
    }

    /// Whether a session may exist now: its certificate is not revoked and
    /// the current CA still accepts its chain (also not expired).
    fn admits(&self, session: &SessionInfo) -> bool {
        !self.is_revoked(&session.cert)
            && self.client_verifier.read().unwrap_or_else(|p| p.into_inner()).admits(&session.chain)
    }

    /// Applies the reloadable parts of a new `[tunnel]`: the revocation
    /// list and the certificates (on an error the previous ones stay), then
    /// drops every connected session they no longer admit; returns how
    /// many. Nothing else of `[tunnel]` is reloaded.
    pub fn reload(&self, new: &TunnelConfig) -> usize {
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revocation_list(new);
        match tls::tls_and_verifier(new) {
            Ok((server_tls, verifier)) => {
                *self.server_tls.write().unwrap_or_else(|p| p.into_inner()) = server_tls;
                *self.client_verifier.write().unwrap_or_else(|p| p.into_inner()) = verifier;
            }
            Err(e) => tracing::error!(error = %e, "tunnel TLS reload failed; keeping the previous certificates"),
        }
        // After both changes: a session registering meanwhile is either
        // refused by them or found here.
        self.registry.revoke_matching(|s| !self.admits(s))
    }
}

/// `tunnel.revoked`, parsed. Validation refuses a bad entry; one that got
/// here all the same (a caller skipped `validate`) is logged and left out:
/// it could never name a certificate.
fn revocation_list(cfg: &TunnelConfig) -> Vec<Revocation> {
    cfg.revoked
        .iter()
        .filter_map(|entry| match entry.parse::<Revocation>() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "tunnel.revoked: entry ignored");
                None
            }
        })
        .collect()
}

/// Accepts tunnel connections until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<TunnelState>, shutdown: CancellationToken, tracker: TaskTracker) {
    let router: Router =
        Router::new().route("/", get(upgrade)).route("/tunnel", get(upgrade)).with_state(state.clone());
    let limits = ConnLimits {
        header_timeout: state.cfg.handshake_timeout,
        max_headers: 64,
        max_header_bytes: 16 * 1024,
        lifetime: None,
    };
    let conn_shutdown = shutdown.clone();
    // Counted until the connection becomes a session (sessions are bounded
    // by one per configured agent identity).
    let caps =
        ConnCaps { total: state.cfg.max_connections, per_ip: state.cfg.max_connections_per_ip, exempt: Vec::new() };
    accept_loop("tunnel", listener, caps, shutdown, tracker, move |tcp, addr| {
        let acceptor = TlsAcceptor::from(state.server_tls.read().unwrap_or_else(|p| p.into_inner()).clone());
        let router = router.clone();
        let shutdown = conn_shutdown.clone();
        let state = state.clone();
        async move {
            let handshake_timeout = state.cfg.handshake_timeout;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, error = %e, "tunnel TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %addr, "tunnel TLS handshake timed out");
                    return;
                }
            };
            let chain: Vec<_> = tls.get_ref().1.peer_certificates().map(|c| c.to_vec()).unwrap_or_default();
            let Some(cert) = chain.first().cloned() else {
                return;
            };
            let Some(agent) = tls::identity_of(&cert) else {
                tracing::info!(peer = %addr, "client certificate carries no CN or DNS name; refused");
                return;
            };
            let ids = tls::CertIds::of(&cert);
            if state.is_revoked(&ids) {
                tracing::warn!(%agent, peer = %addr, fingerprint = %ids.fingerprint, "revoked client certificate refused");
                return;
            }
            let peer = Peer { agent, addr, cert: ids, chain: Arc::new(chain) };
            serve_http(tls, addr, router, peer, limits, shutdown).await;
        }
    })
    .await;
}

async fn upgrade(
    State(state): State<Arc<TunnelState>>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .any(|p| p == SUBPROTOCOL);
    if !offered {
        tracing::info!(agent = %peer.agent, peer = %peer.addr, "refused: agent did not offer subprotocol {SUBPROTOCOL}");
        return (
            StatusCode::BAD_REQUEST,
            format!("this edge speaks WebSocket subprotocol `{SUBPROTOCOL}` only; upgrade the agent\n"),
        )
            .into_response();
    }
    // Agents send only small frames (verdicts, flow, heartbeats): reading
    // is capped at the agent-frame limit, not the delivery limit.
    let max = relay_protocol::Limits::MAX_AGENT_FRAME.min(state.cfg.max_frame.as_u64() as usize);
    ws.protocols([SUBPROTOCOL])
        // Idle sessions are the edge's main memory cost. Agents send small
        // frames (a verdict is tens of bytes), so 1 KiB reads from rustls's
        // plaintext (tungstenite zeroes what it reads into: 128 KiB by
        // default; a larger frame reserves its length); deliveries are
        // flushed per batch.
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        // Slightly above the protocol limit so an oversize frame is answered
        // with a clear `Error` frame by the session rather than a bare close.
        .max_message_size(max + 64 * 1024)
        .max_frame_size(max + 64 * 1024)
        .on_upgrade(move |socket| {
            let sessions = state.sessions.clone();
            sessions.track_future(session::run(socket, peer, state))
        })
}
