//! The admin API under `/admin` (admin listener, loopback by default):
//! dead letters (list, show, replay, purge), replay from history, agents.
//!
//! Authorization: `Authorization: Bearer <admin.token>`. Without a
//! configured token the API is open only because the listener is loopback
//! (config validation refuses a non-loopback admin listener without one).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::ingest::auth::secret_eq;
use crate::store::Backend;
use crate::store::DeadEntry;

pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/dlq/{channel}", get(list))
        .route("/admin/dlq/{channel}/replay", post(replay_dlq))
        .route("/admin/dlq/{channel}/purge", post(purge))
        .route("/admin/dlq/{channel}/{id}", get(show))
        .route("/admin/replay", post(replay_history))
        .route("/admin/agents", get(agents))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.cfg.admin.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !secret_eq(given, token.expose()) {
            return error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token".into());
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "success": false, "error": code, "message": message }))).into_response()
}

fn store_error(e: crate::error::StoreError) -> Response {
    tracing::warn!(error = %e, "admin request failed on the store");
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the store is unavailable; retry later".into())
}

/// The error answer for a channel no route or agent uses, if it is one.
fn unknown_channel(state: &AppState, channel: &str) -> Option<Response> {
    (!state.cfg.all_channels().contains(channel))
        .then(|| error(StatusCode::NOT_FOUND, "unknown_channel", format!("no route or agent uses channel `{channel}`")))
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// JSON of a dead letter; `full` adds headers and body.
pub fn entry_json(channel: &str, e: &DeadEntry, full: bool) -> Value {
    let w = e.webhook();
    let mut v = json!({
        "id": e.id,
        "channel": channel,
        "stream_id": e.stream_id,
        "failed_at": rfc3339(e.failed_at_ms),
        "reason": e.reason,
        "attempts": e.attempts,
        "status": e.status,
        "route": w.as_ref().map(|w| w.route.clone()),
        "webhook_id": w.as_ref().map(|w| w.id.clone()),
        "received_at": w.as_ref().map(|w| rfc3339(w.received_at_ms)),
    });
    if full && let Some(w) = w {
        v["method"] = w.method.clone().into();
        v["path"] = w.path.clone().into();
        v["query"] = w.query.clone().into();
        v["headers"] =
            w.headers.iter().map(|h| json!([h.name, String::from_utf8_lossy(&h.value)])).collect::<Vec<_>>().into();
        match String::from_utf8(w.body.to_vec()) {
            Ok(text) => v["body"] = text.into(),
            Err(_) => v["body_base64"] = base64::engine::general_purpose::STANDARD.encode(&w.body).into(),
        }
    }
    v
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(State(state): State<Arc<AppState>>, Path(channel): Path<String>, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    match state.store.dlq_list(&channel, q.after.as_deref(), limit).await {
        Ok(entries) => {
            let total = state.store.dlq_len(&channel).await.unwrap_or(entries.len() as u64);
            let items: Vec<Value> = entries.iter().map(|e| entry_json(&channel, e, false)).collect();
            Json(json!({ "channel": channel, "total": total, "entries": items })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn show(State(state): State<Arc<AppState>>, Path((channel, id)): Path<(String, String)>) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    match state.store.dlq_get(&channel, &id).await {
        Ok(Some(e)) => Json(entry_json(&channel, &e, true)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", format!("no dead letter `{id}` in channel `{channel}`")),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize, Default)]
struct ReplayBody {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

async fn replay_dlq(
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    body: Option<Json<ReplayBody>>,
) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    if body.ids.is_empty() && !body.all {
        return error(StatusCode::BAD_REQUEST, "bad_request", "name the ids to replay, or all".into());
    }
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    if body.all {
        let mut after: Option<String> = None;
        loop {
            match state.store.dlq_list(&channel, after.as_deref(), 1000).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    after = page.last().map(|e| e.id.clone());
                    entries.extend(page);
                }
                Err(e) => return store_error(e),
            }
        }
    } else {
        for id in &body.ids {
            match state.store.dlq_get(&channel, id).await {
                Ok(Some(e)) => entries.push(e),
                Ok(None) => missing.push(id.clone()),
                Err(e) => return store_error(e),
            }
        }
    }
    let mut replayed = Vec::new();
    for e in &entries {
        match state.store.dlq_replay_one(&channel, e).await {
            Ok(Some(new_id)) => replayed.push(json!({ "dlq_id": e.id, "stream_id": new_id })),
            Ok(None) => missing.push(e.id.clone()),
            Err(err) => return store_error(err),
        }
    }
    tracing::info!(%channel, count = replayed.len(), "dead letters replayed");
    Json(json!({ "channel": channel, "replayed": replayed, "missing": missing })).into_response()
}

#[derive(Deserialize, Default)]
struct PurgeBody {
    before_ms: Option<u64>,
}

async fn purge(
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    body: Option<Json<PurgeBody>>,
) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let before = body.and_then(|b| b.0.before_ms);
    match state.store.dlq_purge(&channel, before).await {
        Ok(n) => {
            tracing::info!(%channel, purged = n, "dead letters purged");
            Json(json!({ "channel": channel, "purged": n })).into_response()
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct HistoryBody {
    channel: String,
    since_ms: u64,
    until_ms: Option<u64>,
}

async fn replay_history(State(state): State<Arc<AppState>>, Json(body): Json<HistoryBody>) -> Response {
    if let Some(r) = unknown_channel(&state, &body.channel) {
        return r;
    }
    let until = body.until_ms.unwrap_or_else(crate::store::now_ms);
    if until < body.since_ms {
        return error(StatusCode::BAD_REQUEST, "bad_request", "until is before since".into());
    }
    match state.store.replay_range(&body.channel, body.since_ms, until).await {
        Ok(n) => {
            tracing::info!(channel = %body.channel, replayed = n, "history replayed");
            Json(json!({ "channel": body.channel, "replayed": n, "since": rfc3339(body.since_ms), "until": rfc3339(until) }))
                .into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn agents(State(state): State<Arc<AppState>>) -> Response {
    let list: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .map(|s| {
            let rtt_us = s.live.rtt_us.load(std::sync::atomic::Ordering::Relaxed);
            json!({
                "agent": s.agent, "session": s.session, "addr": s.addr.to_string(),
                "channels": s.channels, "connected_since": rfc3339(s.connected_at_ms),
                "in_flight": s.live.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                "last_rtt_ms": (rtt_us > 0).then(|| rtt_us as f64 / 1000.0),
                "certificate": s.cert.fingerprint,
            })
        })
        .collect();
    Json(json!({ "agents": list })).into_response()
}
