//! `relay-agent`: dials the edge over mutual-TLS WebSocket, posts each
//! webhook to the local target of its channel, and acks it after a 2xx.
//!
//! Component map: [`config`] (layered, validated), [`tunnel`] (connect,
//! session, reconnecting supervisor, endpoint pause/probe), [`pipeline`]
//! (every delivery the agent holds, across sessions, and the one place
//! that decides ack / retry / park / dead-letter), [`deliver`] (the local
//! HTTP POST), [`dedup`], [`backoff`], [`status`] (socket server and the
//! `status` command).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod dedup;
pub mod deliver;
pub mod error;
pub mod pipeline;
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
        cert_expires_at_ms: cert_expiry(&cfg.cert),
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
    let metrics = async {
        if let Some(addr) = cfg.metrics_listen {
            status::metrics::serve(addr, status.clone(), shutdown.clone()).await;
        }
    };
    tokio::join!(
        server,
        metrics,
        tunnel::supervisor::run(Arc::new(cfg.clone()), status.clone(), shutdown.clone()),
        watchdog(shutdown.clone())
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}

/// `notAfter` of the client certificate, for the expiry warning of `status`.
fn cert_expiry(path: &std::path::Path) -> Option<u64> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok().map(|s| s * 1000)
}

/// systemd watchdog pings while the runtime is alive (no-op outside systemd).
async fn watchdog(shutdown: CancellationToken) {
    let Some(every) = sd_notify::watchdog_enabled().map(|d| d / 2) else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }
}
