//! The tunnel listener: an own accept loop (TLS handshake in the
//! per-connection task, under a timeout), the agent identity read from the
//! verified client certificate, and the WebSocket upgrade to subprotocol
//! `relay.v1` handed to [`session::run`].

pub mod registry;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use relay_protocol::SUBPROTOCOL;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::AppState;

/// Who is on the other end of a tunnel connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity from the verified client certificate.
    pub agent: String,
    pub addr: SocketAddr,
}

/// Accepts tunnel connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    let router: Router =
        Router::new().route("/", get(upgrade)).route("/tunnel", get(upgrade)).with_state(state.clone());
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let handshake_timeout = state.cfg.tunnel.handshake_timeout;
        tracker.spawn(async move {
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
            let agent = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()).and_then(tls::identity_of);
            let Some(agent) = agent else {
                tracing::info!(peer = %addr, "client certificate carries no CN or DNS name; refused");
                return;
            };
            let peer = Peer { agent, addr };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req.extensions_mut().insert(ConnectInfo(addr));
                router.clone().oneshot(req)
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(peer = %addr, error = %e, "tunnel connection ended with an error");
                },
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
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
    let max = state.cfg.tunnel.max_frame.as_u64() as usize;
    ws.protocols([SUBPROTOCOL])
        // Slightly above the protocol limit so an oversize frame is answered
        // with a clear `Error` frame by the session rather than a bare close.
        .max_message_size(max + 64 * 1024)
        .max_frame_size(max + 64 * 1024)
        .on_upgrade(move |socket| session::run(socket, peer, state))
}
