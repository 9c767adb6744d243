//! The public webhook listener.
//!
//! `POST /webhook` (reference relay: `X-API-Key`, route `webhook`, channel
//! `default`) and `POST /hooks/<route>[/<key>]`. A webhook is answered `200`
//! only after every `XADD` of its route's channels returned; anything else
//! gets a JSON error and nothing is stored.

pub mod auth;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use relay_protocol::{Header, Webhook};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::{LEGACY_ROUTE, RouteConfig};
use crate::error::IngestError;
use crate::store::now_ms;

/// Headers never stored: hop-by-hop ones and credentials.
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "x-api-key",
];

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/webhook", post(legacy))
        .route("/hooks/{route}", post(hook).get(verify))
        .route("/hooks/{route}/{key}", post(hook_with_key).get(verify_with_key))
        .route("/health", get(crate::admin::health))
        .with_state(state)
}

pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let app = router(state);
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "ingest listener failed");
    }
}

#[derive(Deserialize, Default)]
struct KeyQuery {
    api_key: Option<String>,
}

async fn legacy(State(state): State<Arc<AppState>>, Query(q): Query<KeyQuery>, req: Request) -> Response {
    let key = header_key(req.headers()).or(q.api_key);
    accept(&state, LEGACY_ROUTE, key, req).await
}

async fn hook(
    State(state): State<Arc<AppState>>,
    Path(route): Path<String>,
    Query(q): Query<KeyQuery>,
    req: Request,
) -> Response {
    let key = header_key(req.headers()).or(q.api_key);
    accept(&state, &route, key, req).await
}

async fn hook_with_key(
    State(state): State<Arc<AppState>>,
    Path((route, key)): Path<(String, String)>,
    req: Request,
) -> Response {
    accept(&state, &route, Some(key), req).await
}

fn header_key(headers: &HeaderMap) -> Option<String> {
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn accept(state: &AppState, route_name: &str, key: Option<String>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let result =
        tokio::time::timeout(state.cfg.ingest.request_timeout, store_webhook(state, route_name, key, req)).await;
    let result = match result {
        Ok(r) => r,
        Err(_) => Err(IngestError::StoreUnavailable),
    };
    match result {
        Ok(body) => {
            state.metrics.received.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(route = route_name, elapsed_us = started.elapsed().as_micros() as u64, "webhook stored");
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => {
            state.metrics.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(route = route_name, error = %e, "webhook refused");
            e.into_response()
        }
    }
}

async fn store_webhook(
    state: &AppState,
    route_name: &str,
    key: Option<String>,
    req: Request,
) -> Result<serde_json::Value, IngestError> {
    let route = find_route(state, route_name)?;
    let authorized = key.as_deref().is_some_and(|k| auth::key_matches(k, &route.api_keys));
    if !authorized {
        return Err(IngestError::Unauthorized);
    }
    let (parts, body) = req.into_parts();
    let limit = state.cfg.ingest.max_body.as_u64();
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(IngestError::TooLarge(limit));
    }
    let body = read_body(body, limit as usize).await?;
    if let Err(e) = state.backlog.check(&route.channels, state.cfg.store.max_backlog) {
        state.metrics.backlog_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(route = route_name, error = %e, "ingest refused: backlog cap reached");
        return Err(e);
    }
    let received_at_ms = now_ms();
    let webhook = Webhook {
        id: uuid::Uuid::now_v7().to_string(),
        method: parts.method.as_str().to_string(),
        path: redact_path(parts.uri.path(), route_name),
        query: redact_query(parts.uri.query().unwrap_or("")),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| !DROPPED_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| Header { name: name.as_str().to_string(), value: value.as_bytes().to_vec() })
            .collect(),
        body,
        route: route.name.clone(),
        received_at_ms,
    };
    let ids = state.store.append(&route.channels, &webhook).await.map_err(|e| {
        tracing::warn!(route = route_name, error = %e, "store write failed");
        IngestError::StoreUnavailable
    })?;
    state.backlog.appended(&route.channels, &ids);
    let timestamp = chrono::DateTime::from_timestamp_millis(received_at_ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Ok(mut last) = state.metrics.last_webhook.lock() {
        *last = Some(timestamp.clone());
    }
    let mut answer = serde_json::json!({
        "success": true,
        "message_id": ids.first().cloned().unwrap_or_default(),
        "webhook_id": webhook.id,
        "timestamp": timestamp,
    });
    if ids.len() > 1 {
        answer["message_ids"] = serde_json::json!(ids);
    }
    Ok(answer)
}

fn find_route<'a>(state: &'a AppState, name: &str) -> Result<&'a RouteConfig, IngestError> {
    state
        .cfg
        .routes
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| IngestError::UnknownRoute(name.chars().take(64).collect()))
}

async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, IngestError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                Err(IngestError::TooLarge(limit as u64))
            } else {
                Err(IngestError::BadRequest("could not read the request body".into()))
            }
        }
    }
}

/// `/hooks/<route>/<key>` is stored as `/hooks/<route>`: the key never
/// reaches the stream, the agent or the local endpoint.
fn redact_path(path: &str, route: &str) -> String {
    let prefix = format!("/hooks/{route}/");
    if path.starts_with(&prefix) { format!("/hooks/{route}") } else { path.to_string() }
}

/// Drops `api_key` from a raw query string, keeping everything else as sent.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some("api_key"))
        .collect::<Vec<_>>()
        .join("&")
}

#[derive(Deserialize)]
struct VerifyQuery {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

async fn verify(
    State(state): State<Arc<AppState>>,
    Path(route): Path<String>,
    method: Method,
    Query(q): Query<VerifyQuery>,
) -> Response {
    meta_verify(&state, &route, method, q)
}

async fn verify_with_key(
    State(state): State<Arc<AppState>>,
    Path((route, _key)): Path<(String, String)>,
    method: Method,
    Query(q): Query<VerifyQuery>,
) -> Response {
    meta_verify(&state, &route, method, q)
}

/// Meta's subscription handshake: echo `hub.challenge` when the token
/// matches the route's `verify_token`. No signature is demanded here.
fn meta_verify(state: &AppState, route: &str, _method: Method, q: VerifyQuery) -> Response {
    let route = match find_route(state, route) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let ok = q.mode.as_deref() == Some("subscribe")
        && match (&route.verify_token, &q.token) {
            (Some(expected), Some(given)) => auth::secret_eq(expected.expose(), given),
            _ => false,
        };
    match (ok, q.challenge) {
        (true, Some(challenge)) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], challenge).into_response(),
        _ => IngestError::VerifyFailed.into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_is_redacted_from_path_and_query() {
        assert_eq!(super::redact_path("/hooks/meta/secret-key", "meta"), "/hooks/meta");
        assert_eq!(super::redact_path("/hooks/meta", "meta"), "/hooks/meta");
        assert_eq!(super::redact_query("a=1&api_key=s3cret&b=2"), "a=1&b=2");
        assert_eq!(super::redact_query("api_key=s3cret"), "");
    }
}
