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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::RwLock;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::EdgeConfig;
pub use error::{ConfigError, StartError};

use crate::store::Backend;
use crate::store::Store;

/// State shared by every listener and session.
pub struct AppState {
    pub cfg: EdgeConfig,
    pub store: Store,
    /// Agent identity → channels granted to it.
    pub grants: HashMap<String, Vec<String>>,
    pub registry: tunnel::registry::Registry,
    pub metrics: metrics::Metrics,
    /// Unacknowledged entries per channel, for the ingest cap.
    pub backlog: backlog::Backlog,
    /// Cancelled once, on SIGINT/SIGTERM (or by a test).
    pub shutdown: CancellationToken,
    /// `tunnel.revoked`, replaced on reload.
    pub revoked: RwLock<Vec<String>>,
    /// TLS of the tunnel listener, replaced on reload (new cert files);
    /// sessions already up keep theirs.
    pub tunnel_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// The tunnel's client-certificate check, replaced with `tunnel_tls`.
    pub client_verifier: RwLock<tunnel::tls::Verifier>,
    /// HTTPS for the ingest listener, replaced on reload (new cert files).
    pub ingest_tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Per-IP and per-key rate limiters of the ingest listener.
    pub limiter: ingest::limit::Limiter,
}

impl AppState {
    pub fn is_revoked(&self, ids: &tunnel::tls::CertIds) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).iter().any(|r| ids.matches(r))
    }

    /// Whether a session may exist now: its certificate is not revoked and
    /// the current CA still accepts its chain (also not expired).
    pub fn admits(&self, session: &tunnel::registry::SessionInfo) -> bool {
        !self.is_revoked(&session.cert)
            && self.client_verifier.read().unwrap_or_else(|p| p.into_inner()).admits(&session.chain)
    }

    /// Applies the reloadable parts of a new configuration (SIGHUP): the
    /// revocation list — connected sessions it names are dropped — and the
    /// ingest TLS certificate, re-read from disk. Everything else needs a
    /// restart.
    pub fn reload(&self, new: &EdgeConfig) {
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = new.tunnel.revoked.clone();
        match tunnel::tls::tls_and_verifier(&new.tunnel) {
            Ok((tls, verifier)) => {
                *self.tunnel_tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
                *self.client_verifier.write().unwrap_or_else(|p| p.into_inner()) = verifier;
            }
            Err(e) => tracing::error!(error = %e, "tunnel TLS reload failed; keeping the previous certificates"),
        }
        // After both changes: a session registering meanwhile is either
        // refused by them or found here.
        let dropped = self.registry.revoke_matching(|s| !self.admits(s));
        match ingest::tls_config(&new.ingest) {
            Ok(tls) => *self.ingest_tls.write().unwrap_or_else(|p| p.into_inner()) = tls,
            Err(e) => tracing::error!(error = %e, "ingest TLS reload failed; keeping the previous certificate"),
        }
        tracing::info!(revoked = new.tunnel.revoked.len(), sessions_dropped = dropped, "configuration reloaded");
    }
}

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
/// period. Each configuration received on `reload` is applied with
/// [`AppState::reload`].
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
    let (tls, verifier) = tunnel::tls::tls_and_verifier(&cfg.tunnel)?;
    let ingest_tls = ingest::tls_config(&cfg.ingest)?;
    let metrics = metrics::Metrics::new();
    let store = Store::open(&cfg.store, metrics.store_errors.clone())?;
    let grants = cfg.agents.iter().map(|a| (a.name.clone(), a.channels.clone())).collect();
    let (ingest_addr, tunnel_addr, admin_addr) = listeners.addrs();
    let state = Arc::new(AppState {
        store,
        grants,
        registry: Default::default(),
        metrics,
        backlog: Default::default(),
        shutdown: shutdown.clone(),
        revoked: RwLock::new(cfg.tunnel.revoked.clone()),
        ingest_tls: RwLock::new(ingest_tls),
        tunnel_tls: RwLock::new(tls),
        client_verifier: RwLock::new(verifier),
        limiter: ingest::limit::Limiter::new(&cfg.ingest),
        cfg,
    });
    warn_about_config(&state.cfg);
    tracing::info!(backend = state.cfg.store.backend(), location = %state.cfg.store.location(), "store");
    match state.store.ping().await {
        Ok(()) => {
            for ch in state.cfg.all_channels() {
                if let Err(e) = state.store.ensure_group(&ch).await {
                    tracing::warn!(channel = %ch, error = %e, "cannot create consumer group yet");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the store is not reachable yet; ingest answers 503 until it is")
        }
    }
    tracing::info!(%ingest_addr, %tunnel_addr, %admin_addr, "relay-edge listening");

    let tracker = TaskTracker::new();
    tracker.spawn(ingest::serve(listeners.ingest, state.clone(), shutdown.clone(), tracker.clone()));
    tracker.spawn(admin::serve(listeners.admin, state.clone(), shutdown.clone(), tracker.clone()));
    tracker.spawn(tunnel::serve(listeners.tunnel, state.clone(), shutdown.clone(), tracker.clone()));
    tracker.spawn(retention::run(state.clone(), shutdown.clone()));
    tracker.spawn(backlog::refresh_loop(state.clone(), shutdown.clone()));
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
                state.reload(&new);
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
