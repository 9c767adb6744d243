//! `relay-agent`: dials the edge over mutual-TLS WebSocket, posts each
//! webhook to the local target of its channel, and acks it after a 2xx.
//!
//! Component map: [`config`] (layered, validated), [`tunnel`] (connect,
//! session, reconnecting supervisor), [`deliver`] (local HTTP and outcome
//! classification), [`dedup`], [`backoff`], [`status`] (socket server and
//! the `status` command).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod dedup;
pub mod deliver;
pub mod error;
pub mod status;
pub mod tunnel;

use std::sync::Arc;

pub use config::AgentConfig;
use status::{Snapshot, Status, TargetStatus, now_ms};
use tokio_util::sync::CancellationToken;

/// Runs the agent until `shutdown`. Returns the live status handle's last
/// state for callers that want it.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let status = Status::new(Snapshot {
        edge: cfg.edge.clone(),
        started_at_ms: now_ms(),
        heartbeat_ms: cfg.heartbeat.as_millis() as u64,
        window: cfg.window,
        targets: cfg
            .targets
            .iter()
            .map(|t| TargetStatus { channel: t.channel.clone(), url: t.url.clone(), ..Default::default() })
            .collect(),
        ..Default::default()
    });
    let listener = status::server::bind(&cfg.status_socket).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind status socket {}: {e}", cfg.status_socket.display()))
    })?;
    tracing::info!(edge = %cfg.edge, socket = %cfg.status_socket.display(), "relay-agent starting");
    // Joined, not spawned: dropping this future (a test's "kill") stops
    // everything the agent runs, like a killed process.
    let server = status::server::serve(listener, cfg.status_socket.clone(), status.clone(), shutdown.clone());
    tokio::join!(server, tunnel::supervisor::run(Arc::new(cfg), status, shutdown.clone()));
    Ok(())
}
