//! `relay-edge`: the public side of the webhook relay.
//!
//! Component map:
//! - [`ingest`]: public HTTP listener; authenticates a webhook, appends it to
//!   each of its route's channel streams, and only then answers `200`
//!   (rate limits in [`ingest::limit`], key and signature checks in
//!   [`ingest::auth`]).
//! - [`store`]: the durable store behind one trait, two backends: Redis
//!   Streams ([`store::redis_store`]) or an embedded redb file
//!   ([`store::embedded`]): append, consumer groups, pending lists,
//!   reclaim, dead letters, replay, de-duplication keys.
//! - [`tunnel`]: the mutual-TLS WebSocket listener agents dial; one
//!   [`tunnel::session`] per agent pushes entries and settles acks, with its
//!   in-flight table ([`tunnel::inflight`]) and store reads
//!   ([`tunnel::fetcher`]); [`tunnel::registry`] holds one session per agent.
//! - [`admin`]: `/health`, `/ready`, `/metrics` and the admin API
//!   ([`admin::api`]: dead letters, replay, agents) on a loopback listener,
//!   and the CLI's client of it ([`admin::cli`]).
//! - [`server`]: accept loop (connection caps before TLS) and HTTP/1.1
//!   serving with head limits, shared by every listener; [`tls`]: PEM
//!   loading and the one crypto provider.
//! - [`backlog`]: the per-channel backlog cap; [`retention`]: expiry into the
//!   DLQ and trimming by age; [`metrics`]; [`config`]; [`error`].
//! - [`certs`]: `relay-edge certs …`, dev CA and certificates.
//!
//! Each listener's router has its own state, holding only what it uses:
//! [`ingest::IngestState`], [`tunnel::TunnelState`], [`admin::AdminState`].
//! They share the store, the metrics, the backlog counts and (tunnel and
//! admin) the session registry; [`run`] builds them and the loops of
//! [`backlog`] and [`retention`], which take their parts one by one.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backlog;
pub mod certs;
pub mod config;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod retention;
pub mod server;
pub mod store;
pub mod tls;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::EdgeConfig;
pub use error::{ConfigError, StartError};

use crate::store::Backend;
use crate::store::Store;

/// The three listeners, bound by the caller so tests can use port 0.
pub struct Listeners {
    pub ingest: TcpListener,
    pub tunnel: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &EdgeConfig) -> Result<Self, StartError> {
        async fn one(what: &'static str, addr: &str) -> Result<TcpListener, StartError> {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr: addr.into(), source })
        }
        Ok(Self {
            ingest: one("ingest", &cfg.ingest.listen).await?,
            tunnel: one("tunnel", &cfg.tunnel.listen).await?,
            admin: one("admin", &cfg.admin.listen).await?,
        })
    }

    pub fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        let a = |l: &TcpListener| l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        (a(&self.ingest), a(&self.tunnel), a(&self.admin))
    }
}

/// Runs the edge until `shutdown` is cancelled, then drains for a grace
/// period. Each configuration received on `reload` is applied as
/// [`tunnel::TunnelState::reload`] and [`ingest::IngestState::reload_tls`]
/// say; everything else needs a restart.
pub async fn run(
    mut cfg: EdgeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
    mut reload: mpsc::Receiver<EdgeConfig>,
) -> Result<(), StartError> {
    match cfg.admin.generate_token() {
        // The path only: the token itself never reaches a log.
        Ok(Some(path)) => {
            tracing::info!(file = %path.display(), "admin API token generated (mode 0600); the CLI reads it from there")
        }
        Ok(None) => {}
        // On loopback the API worked without a token before: an unwritable
        // token file must not keep ingest down.
        Err(e) if cfg.admin.on_loopback() => {
            tracing::error!(error = %e, "no admin API token: the API is open to loopback clients only");
        }
        Err(e) => return Err(e.into()),
    }
    let tunnel_tls = tunnel::tls::tls_and_verifier(&cfg.tunnel)?;
    let ingest_tls = ingest::tls_config(&cfg.ingest)?;
    // Shared by the subsystems, each a cheap handle; every other part of
    // their state is one subsystem's own.
    let metrics = Arc::new(metrics::Metrics::new());
    let store = Store::open(&cfg.store, metrics.store_errors.clone())?;
    let backlog = Arc::new(backlog::Backlog::default());
    let registry = tunnel::registry::Registry::default();
    let (ingest_addr, tunnel_addr, admin_addr) = listeners.addrs();
    // Every task and session the edge runs; a shutdown waits for them.
    let tracker = TaskTracker::new();
    let ingest = Arc::new(ingest::IngestState::new(&cfg, ingest_tls, store.clone(), metrics.clone(), backlog.clone()));
    let tunnel = Arc::new(tunnel::TunnelState::new(
        &cfg,
        tunnel_tls,
        store.clone(),
        (metrics.clone(), backlog.clone()),
        registry.clone(),
        (shutdown.clone(), tracker.clone()),
    ));
    let admin = Arc::new(admin::AdminState::new(&cfg, store.clone(), metrics.clone(), backlog.clone(), registry));
    warn_about_config(&cfg);
    tracing::info!(backend = cfg.store.backend(), location = %cfg.store.location(), "store");
    match store.ping().await {
        Ok(()) => {
            for ch in cfg.all_channels() {
                if let Err(e) = store.ensure_group(&ch).await {
                    tracing::warn!(channel = %ch, error = %e, "cannot create consumer group yet");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the store is not reachable yet; ingest answers 503 until it is")
        }
    }
    tracing::info!(%ingest_addr, %tunnel_addr, %admin_addr, "relay-edge listening");

    let admin_limits = admin::limits(&cfg.ingest);
    tracker.spawn(ingest::serve(listeners.ingest, ingest.clone(), shutdown.clone(), tracker.clone()));
    tracker.spawn(admin::serve(listeners.admin, admin, admin_limits, shutdown.clone(), tracker.clone()));
    tracker.spawn(tunnel::serve(listeners.tunnel, tunnel.clone(), shutdown.clone(), tracker.clone()));
    let max_age = cfg.store.retention;
    tracker.spawn(retention::run(store.clone(), cfg.all_channels(), max_age, metrics.clone(), shutdown.clone()));
    tracker.spawn(backlog::refresh_loop(backlog, store, cfg.all_channels(), metrics, shutdown.clone()));
    tracker.close();

    // systemd (Type=notify): ready once the listeners run; watchdog pings
    // from this loop; both are no-ops outside systemd.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2).unwrap_or(Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(watchdog);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = watchdog.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Some(new) = reload.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                apply_reload(&ingest, &tunnel, &new);
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down; draining connections");
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within 10 s; exiting anyway");
    } else {
        tracing::info!("drained");
    }
    Ok(())
}

/// Applies the reloadable parts of a new configuration (SIGHUP): the
/// tunnel's revocation list and certificates — connected sessions they no
/// longer admit are dropped — and the ingest TLS certificate, re-read from
/// disk. Everything else needs a restart.
fn apply_reload(ingest: &ingest::IngestState, tunnel: &tunnel::TunnelState, new: &EdgeConfig) {
    let dropped = tunnel.reload(&new.tunnel);
    ingest.reload_tls(&new.ingest);
    tracing::info!(revoked = new.tunnel.revoked.len(), sessions_dropped = dropped, "configuration reloaded");
}

fn warn_about_config(cfg: &EdgeConfig) {
    let grants = cfg.channel_grants();
    for route in &cfg.routes {
        for ch in &route.channels {
            if !grants.contains_key(ch.as_str()) {
                tracing::warn!(route = %route.name, channel = %ch, "no [[agent]] is granted this channel: its webhooks will wait in the stream");
            }
        }
    }
    if cfg.store.retention <= cfg.tunnel.reclaim_after {
        tracing::warn!(
            retention = ?cfg.store.retention,
            reclaim_after = ?cfg.tunnel.reclaim_after,
            "store.retention does not exceed tunnel.reclaim_after: a webhook whose delivery stalls expires into the DLQ before it is redelivered"
        );
    }
}
