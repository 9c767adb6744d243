//! Admin listener (loopback by default): `/health` (liveness, Redis, queue
//! depth, agents and the reference relay's counters), `/ready`, `/metrics`,
//! and the admin API under `/admin` ([`api`]); [`cli`] is the client side
//! of `relay-edge dlq …`, `replay …` and `agents`.

pub mod api;
pub mod cli;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backlog::Backlog;
use crate::config::{AdminConfig, EdgeConfig, IngestConfig};
use crate::metrics::Metrics;
use crate::server::{ConnCaps, ConnLimits, accept_loop, serve_http};
use crate::store::{Backend, Store};
use crate::tunnel::registry::Registry;

/// What the admin listener works with, and nothing else.
pub struct AdminState {
    /// `[admin]`: the bearer token, and the listen address the browser
    /// guard checks `Host` and `Origin` against.
    cfg: AdminConfig,
    /// Every channel a route or agent uses: `/health` reports them, the
    /// API refuses any other.
    channels: BTreeSet<String>,
    /// The store backend's name (`redis`, `embedded`), for `/health`.
    backend: &'static str,
    /// Whether that backend is Redis, for `/health`.
    uses_redis: bool,
    /// `store.max_backlog`: replays stop at it.
    max_backlog: u64,
    /// Dead letters, history and channel figures.
    store: Store,
    /// Unacknowledged entries per channel (shared with ingest), updated by replays.
    backlog: Arc<Backlog>,
    /// The edge's metrics (shared with every subsystem).
    metrics: Arc<Metrics>,
    /// The tunnel's sessions, for `/health`, `/metrics` and the agents list.
    registry: Registry,
}

impl AdminState {
    pub fn new(
        cfg: &EdgeConfig,
        store: Store,
        metrics: Arc<Metrics>,
        backlog: Arc<Backlog>,
        registry: Registry,
    ) -> Self {
        Self {
            cfg: cfg.admin.clone(),
            channels: cfg.all_channels(),
            backend: cfg.store.backend(),
            uses_redis: cfg.store.uses_redis(),
            max_backlog: cfg.store.max_backlog,
            store,
            backlog,
            metrics,
            registry,
        }
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api::router(state.clone()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), api::same_origin_only))
        .with_state(state)
}

/// Connections the admin listener holds at once (operators and scrapers).
const ADMIN_CONNECTIONS: usize = 64;

/// The admin listener's connection limits: the ingest listener's request
/// head limits, and no lifetime (a replay or purge of many dead letters may
/// take minutes).
pub fn limits(ingest: &IngestConfig) -> ConnLimits {
    ConnLimits {
        header_timeout: ingest.header_timeout,
        max_headers: ingest.max_headers,
        max_header_bytes: ingest.max_header_bytes.as_u64() as usize,
        lifetime: None,
    }
}

/// Serves like the public listeners do: a deadline for each request head
/// (`limits`, from [`limits`]: a stuck client cannot hold a connection) and
/// a cap on connections.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: ConnLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let app = router(state);
    let caps = ConnCaps { total: ADMIN_CONNECTIONS, per_ip: 0, exempt: Vec::new() };
    let conn_shutdown = shutdown.clone();
    accept_loop("admin", listener, caps, shutdown, tracker, move |tcp, addr| {
        serve_http(tcp, addr, app.clone(), (), limits, conn_shutdown.clone())
    })
    .await;
}

/// Liveness and details; `200` while the process runs, `status` says
/// whether Redis is reachable.
pub async fn health(State(state): State<Arc<AdminState>>) -> Response {
    let redis = state.store.ping().await;
    let mut channels = serde_json::Map::new();
    if redis.is_ok() {
        for ch in &state.channels {
            if let Ok(s) = state.store.snapshot(ch).await.map(|s| s.stats) {
                channels.insert(
                    ch.clone(),
                    serde_json::json!({ "backlog": s.backlog, "pending": s.pending, "oldest_ms": s.oldest_ms }),
                );
            }
        }
    }
    let agents: Vec<_> = state
        .registry
        .list()
        .into_iter()
        .map(|s| serde_json::json!({ "agent": s.agent, "session": s.session, "addr": s.addr.to_string(), "channels": s.channels, "connected_at_ms": s.connected_at_ms }))
        .collect();
    let m = &state.metrics;
    let body = serde_json::json!({
        "status": if redis.is_ok() { "healthy" } else { "degraded" },
        "store": state.backend,
        "redis": match (state.uses_redis, redis.is_ok()) {
            (false, _) => "not used",
            (_, true) => "up",
            (_, false) => "down",
        },
        "channels": channels,
        "agents": agents,
        "webhooks_received": m.received.get(),
        "webhooks_processed": m.processed.get(),
        "webhooks_failed": m.failed.get(),
        "webhooks_retried": m.retried.get(),
        "average_latency_ms": m.average_latency_ms(),
        "last_webhook_time": m.last_webhook.lock().ok().and_then(|l| l.clone()),
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// For load balancers: `200` only when Redis answers.
async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response(),
    }
}

/// Prometheus text exposition.
async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    state.metrics.agents_connected.set(state.registry.list().len() as i64);
    let text = state.metrics.render();
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}
