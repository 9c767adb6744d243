//! The public webhook listener.
//!
//! `POST /webhook` (reference relay: `X-API-Key`, route `webhook`, channel
//! `default`) and `POST /hooks/<route>[/<key>]`, `GET` of the same paths for
//! Meta's verification handshake. Checks run cheapest first — per-IP rate,
//! route, key, per-key rate, declared length, body (size and deadline),
//! signature, JSON, de-duplication, backlog cap — and a webhook is answered
//! `200` only after every `XADD` of its route's channels returned. Anything
//! else gets a JSON error and nothing is stored.

pub mod auth;
pub mod fuzz;
pub mod limit;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use relay_protocol::{Header, Webhook};
use serde::Deserialize;
use sha2::Digest;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backlog::Backlog;
use crate::config::{EdgeConfig, IngestConfig, LEGACY_ROUTE, RouteConfig};
use crate::error::{IngestError, StartError};
use crate::metrics::{IngestLabels, Metrics};
use crate::server::{ConnCaps, ConnLimits, accept_loop, serve_http};
use crate::store::StreamId;
use crate::store::{Backend, Store};
use crate::store::{DEDUPE_PENDING, keys, now_ms};

/// Headers never stored: hop-by-hop ones and credentials (and, besides
/// these, [`relay_protocol::SENDER_HEADERS`] and any `X-Relay-*`).
pub const DROPPED_HEADERS: &[&str] = &[
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

/// Past the body limit, the rest of an upload is read and dropped (up to
/// this much) while the `413` is sent; see [`discard`].
const DRAIN_CAP: u64 = 64 * 1024 * 1024;

/// What the ingest listener works with, and nothing else.
pub struct IngestState {
    /// `[ingest]`: deadlines, size limits, trusted proxies, connection caps.
    cfg: IngestConfig,
    /// The `[[route]]`s, found by name per request, with their keys'
    /// digests.
    routes: Vec<(RouteConfig, auth::KeyDigests)>,
    /// `store.max_backlog`: no channel of a route takes more unacknowledged entries.
    max_backlog: u64,
    /// Where webhooks are appended and de-duplication keys kept.
    store: Store,
    /// Unacknowledged entries per channel, for the cap (shared with the
    /// refresh loop and the admin API's replays).
    backlog: Arc<Backlog>,
    /// The edge's metrics (shared with every subsystem).
    metrics: Arc<Metrics>,
    /// Per-IP and per-key rate limiters.
    limiter: limit::Limiter,
    /// HTTPS, when `tls_cert`/`tls_key` are set; replaced on reload (new
    /// cert files).
    tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

impl IngestState {
    /// `tls` is [`tls_config`]'s answer for `cfg.ingest`.
    pub fn new(
        cfg: &EdgeConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        store: Store,
        metrics: Arc<Metrics>,
        backlog: Arc<Backlog>,
    ) -> Self {
        Self {
            cfg: cfg.ingest.clone(),
            routes: cfg.routes.iter().map(|r| (r.clone(), auth::KeyDigests::of(&r.api_keys))).collect(),
            max_backlog: cfg.store.max_backlog,
            store,
            backlog,
            metrics,
            limiter: limit::Limiter::new(&cfg.ingest),
            tls: RwLock::new(tls),
        }
    }

    /// Re-reads the HTTPS certificate named by a reloaded `[ingest]`; on
    /// an error the previous one stays. Nothing else of `[ingest]` is
    /// reloaded.
    pub fn reload_tls(&self, new: &IngestConfig) {
        match tls_config(new) {
            Ok(tls) => *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls,
            Err(e) => tracing::error!(error = %e, "ingest TLS reload failed; keeping the previous certificate"),
        }
    }
}

pub fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/webhook", post(legacy))
        .route("/hooks/{route}", post(hook).get(verify))
        .route("/hooks/{route}/{key}", post(hook_with_key).get(verify_with_key))
        .route("/health", get(liveness))
        .with_state(state)
}

/// Liveness on the public port: that the process answers, nothing else (no
/// agents, addresses, channel names or store round trip), rate-limited per
/// client IP. The full view is the admin listener's `/health`.
async fn liveness(
    State(state): State<Arc<IngestState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let ip = client_ip(peer, &headers, &state.cfg.trusted_proxies);
    match state.limiter.check_health(crate::server::cap_key(ip)) {
        Ok(()) => (StatusCode::OK, axum::Json(serde_json::json!({ "status": "ok" }))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// HTTPS settings of the ingest listener, when `tls_cert`/`tls_key` are set.
pub fn tls_config(cfg: &IngestConfig) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else { return Ok(None) };
    let chain = crate::tls::load_certs(cert, "ingest.tls_cert")?;
    let key = crate::tls::load_key(key, "ingest.tls_key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| StartError::Tls(format!("`ingest.tls_cert`/`ingest.tls_key` do not form a usable pair: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

pub async fn serve(listener: TcpListener, state: Arc<IngestState>, shutdown: CancellationToken, tracker: TaskTracker) {
    let app = router(state.clone());
    let cfg = &state.cfg;
    let limits = ConnLimits {
        header_timeout: cfg.header_timeout,
        max_headers: cfg.max_headers,
        max_header_bytes: cfg.max_header_bytes.as_u64() as usize,
        lifetime: ConnLimits::lifetime_of(cfg.connection_lifetime),
    };
    let conn_shutdown = shutdown.clone();
    let limiter_state = state.clone();
    let mut shrink = tokio::time::interval(Duration::from_secs(60));
    let shrink_shutdown = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shrink_shutdown.cancelled() => return,
                _ = shrink.tick() => limiter_state.limiter.shrink(),
            }
        }
    });
    let caps = ConnCaps {
        total: cfg.max_connections,
        per_ip: cfg.max_connections_per_ip,
        exempt: cfg.trusted_proxies.clone(),
    };
    accept_loop("ingest", listener, caps, shutdown, tracker, move |tcp, addr| {
        let app = app.clone();
        let shutdown = conn_shutdown.clone();
        let tls = state.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        async move {
            match tls {
                None => serve_http(tcp, addr, app, (), limits, shutdown).await,
                Some(tls) => {
                    match tokio::time::timeout(limits.header_timeout, TlsAcceptor::from(tls).accept(tcp)).await {
                        Ok(Ok(stream)) => serve_http(stream, addr, app, (), limits, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "ingest TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %addr, "ingest TLS handshake timed out"),
                    }
                }
            }
        }
    })
    .await;
}

#[derive(Deserialize, Default)]
struct KeyQuery {
    api_key: Option<String>,
}

async fn legacy(
    State(state): State<Arc<IngestState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<KeyQuery>,
    req: Request,
) -> Response {
    let key = header_key(req.headers()).or(q.api_key);
    accept(&state, peer, LEGACY_ROUTE, key, req).await
}

async fn hook(
    State(state): State<Arc<IngestState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(route): Path<String>,
    Query(q): Query<KeyQuery>,
    req: Request,
) -> Response {
    let key = header_key(req.headers()).or(q.api_key);
    accept(&state, peer, &route, key, req).await
}

async fn hook_with_key(
    State(state): State<Arc<IngestState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((route, key)): Path<(String, String)>,
    req: Request,
) -> Response {
    accept(&state, peer, &route, Some(key), req).await
}

fn header_key(headers: &HeaderMap) -> Option<String> {
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The client's address: the peer, or — when the peer is a trusted proxy —
/// the last `X-Forwarded-For` hop that is not itself a trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer.ip()) {
        return peer.ip();
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.into_iter().rev().find(|ip| !trusted.contains(ip)).unwrap_or(peer.ip())
}

async fn accept(
    state: &IngestState,
    peer: SocketAddr,
    route_name: &str,
    key: Option<String>,
    req: Request,
) -> Response {
    let started = std::time::Instant::now();
    let route = state.routes.iter().find(|(r, _)| r.name == route_name);
    // One deadline for the whole request: past it, a body still being read
    // is the client's fault (408), a write still running is the store's (503).
    let body_read = std::sync::atomic::AtomicBool::new(false);
    let result = match tokio::time::timeout(
        state.cfg.request_timeout,
        store_webhook(state, peer, route, route_name, key, req, &body_read),
    )
    .await
    {
        Ok(r) => r,
        Err(_) if !body_read.load(std::sync::atomic::Ordering::Relaxed) => Err(IngestError::SlowBody),
        Err(_) => Err(IngestError::StoreUnavailable),
    };
    let status = match &result {
        Ok(_) => 200,
        Err(e) => e.status().as_u16(),
    };
    // Unknown route names come from the URL: never a label of their own.
    let label = route.map(|(r, _)| r.name.as_str()).unwrap_or("unknown");
    state.metrics.ingest_requests.get_or_create(&IngestLabels { route: label.to_string(), status }).inc();
    state.metrics.ingest_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(body) => {
            state.metrics.received.inc();
            tracing::debug!(route = route_name, elapsed_us = started.elapsed().as_micros() as u64, "webhook stored");
            let json = match body {
                // Into a Vec sized for it: `axum::Json`'s growing `BytesMut`
                // writer cost as much again as the serializing. (It cannot
                // fail: strings, ids and a bool.)
                Answer::Stored(accepted) => {
                    let mut json = Vec::with_capacity(256);
                    match serde_json::to_writer(&mut json, &accepted) {
                        Ok(()) => json,
                        Err(_) => BARE_ANSWER.as_bytes().to_vec(),
                    }
                }
                Answer::Again(recorded) => recorded.into_bytes(),
            };
            ([(header::CONTENT_TYPE, JSON)], json).into_response()
        }
        Err(e) => {
            state.metrics.failed.inc();
            tracing::info!(route = route_name, %peer, error = %e, "webhook refused");
            e.into_response()
        }
    }
}

async fn store_webhook(
    state: &IngestState,
    peer: SocketAddr,
    route: Option<&(RouteConfig, auth::KeyDigests)>,
    route_name: &str,
    key: Option<String>,
    req: Request,
    body_read: &std::sync::atomic::AtomicBool,
) -> Result<Answer, IngestError> {
    let cfg = &state.cfg;
    let client = client_ip(peer, req.headers(), &cfg.trusted_proxies);
    // Per IPv6 /64 (one host usually holds a whole /64), as the connection caps count.
    state.limiter.check_ip(crate::server::cap_key(client))?;
    let (route, keys) = route.ok_or_else(|| unknown_route(route_name))?;
    let key_index = key.as_deref().and_then(|k| auth::match_key(k, keys)).ok_or(IngestError::Unauthorized)?;
    state.limiter.check_key(&route.name, key_index)?;
    let (parts, body) = req.into_parts();
    let limit = cfg.max_body.as_u64();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        // A client waiting for `100 Continue` has sent nothing: just answer.
        // Any other is uploading: read on while answering, so it can finish
        // sending and read the answer.
        let waits =
            parts.headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits {
            discard(body, cfg.request_timeout);
        }
        return Err(IngestError::TooLarge(limit));
    }
    let body = read_body(body, limit as usize, cfg.request_timeout).await?;
    body_read.store(true, std::sync::atomic::Ordering::Relaxed);
    check_body(route, &parts.headers, &body)?;

    let mut claim = match route.dedupe_window {
        Some(window) => {
            let key = keys::dedupe(&route.name, &hex::encode(sha2::Sha256::digest(&body)));
            // The claim outlives this request by a margin only: the whole
            // request runs within `request_timeout`, and a claim left by a
            // request that died (edge crash) must not refuse the body's
            // retries for the whole window.
            let hold = cfg.request_timeout + CLAIM_MARGIN;
            match claim_dedupe(state, &key, hold.min(window)).await? {
                Some(first) => return Ok(Answer::Again(first)),
                None => Some(Claim { store: state.store.clone(), key: Some(key), window }),
            }
        }
        None => None,
    };
    let stored = append(state, route, route_name, &parts, body, client).await;
    if let (Some(claim), Ok(answer)) = (&mut claim, &stored) {
        let first = Accepted { duplicate: true, ..answer.clone() };
        let first = serde_json::to_string(&first).unwrap_or_default();
        if let Some(key) = claim.key.take()
            && let Err(e) = state.store.dedupe_record(&key, &first, claim.window).await
        {
            tracing::warn!(route = route_name, error = %e, "cannot record de-duplication answer");
        }
    }
    // An error, or this future dropped at the deadline: `Claim` gives the key back.
    stored.map(Answer::Stored)
}

/// How long a de-duplication claim outlives `ingest.request_timeout`.
const CLAIM_MARGIN: Duration = Duration::from_secs(1);

/// A de-duplication key this request claimed and has not yet recorded an
/// answer under: released when dropped (the write failed, or the request
/// was cut off at its deadline), so retries of the body are stored.
struct Claim {
    store: crate::store::Store,
    key: Option<String>,
    window: Duration,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.dedupe_release(&key).await {
                    tracing::debug!(error = %e, "cannot release a de-duplication claim; it expires");
                }
            });
        }
    }
}

/// Checks of the raw body that need no I/O: signature and JSON.
pub fn check_body(route: &RouteConfig, headers: &HeaderMap, body: &[u8]) -> Result<(), IngestError> {
    if let Some(secret) = &route.app_secret {
        let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
        if !auth::signature_valid(secret.expose(), sig, body) {
            return Err(IngestError::BadSignature);
        }
    }
    if route.require_json {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(IngestError::NotJson);
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            return Err(IngestError::BadRequest("the body is not valid JSON".into()));
        }
    }
    Ok(())
}

/// `None`: this request is the first of its body within the window.
/// `Some(answer)`: a duplicate; the first request's answer.
async fn claim_dedupe(state: &IngestState, key: &str, window: Duration) -> Result<Option<String>, IngestError> {
    let unavailable = |e: crate::error::StoreError| {
        tracing::warn!(error = %e, "de-duplication lookup failed");
        IngestError::StoreUnavailable
    };
    let mut seen = state.store.dedupe_claim(key, window).await.map_err(unavailable)?;
    // The first request is still being stored: wait for its answer.
    for _ in 0..50 {
        match seen.as_deref() {
            None => return Ok(None),
            Some(DEDUPE_PENDING) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                seen = state.store.dedupe_get(key).await.map_err(unavailable)?;
                if seen.is_none() {
                    // The first request failed and released its claim.
                    seen = state.store.dedupe_claim(key, window).await.map_err(unavailable)?;
                }
            }
            Some(answer) => {
                state.metrics.duplicates.inc();
                // Replayed as recorded (the first answer's bytes), if JSON.
                let valid = serde_json::from_str::<serde::de::IgnoredAny>(answer).is_ok();
                return Ok(Some(if valid { answer.to_string() } else { BARE_ANSWER.into() }));
            }
        }
    }
    Err(IngestError::StoreUnavailable)
}

async fn append(
    state: &IngestState,
    route: &RouteConfig,
    route_name: &str,
    parts: &axum::http::request::Parts,
    body: bytes::Bytes,
    client: IpAddr,
) -> Result<Accepted, IngestError> {
    if let Err(e) = state.backlog.check(&route.channels, state.max_backlog) {
        state.metrics.backlog_rejected.inc();
        tracing::warn!(route = route_name, error = %e, "ingest refused: backlog cap reached");
        return Err(e);
    }
    let received_at_ms = now_ms();
    let webhook = Webhook {
        id: uuid::Uuid::now_v7().to_string(),
        method: parts.method.as_str().to_string(),
        path: stored_path(&route.name),
        query: redact_query(parts.uri.query().unwrap_or("")),
        headers: stored_headers(&parts.headers),
        body,
        route: route.name.clone(),
        received_at_ms,
        client_ip: ip_text(client),
    };
    let ids = state.store.append(&route.channels, &webhook).await.map_err(|e| {
        tracing::warn!(route = route_name, error = %e, "store write failed");
        IngestError::StoreUnavailable
    })?;
    state.backlog.appended(&route.channels, &ids);
    let timestamp = crate::store::rfc3339(received_at_ms);
    if let Ok(mut last) = state.metrics.last_webhook.lock() {
        *last = Some(timestamp.clone());
    }
    Ok(Accepted {
        success: true,
        message_id: ids.first().copied().unwrap_or_default(),
        message_ids: if ids.len() > 1 { ids } else { Vec::new() },
        webhook_id: webhook.id,
        timestamp,
        duplicate: false,
    })
}

/// A `200`'s answer when there is no better one to give (a recorded
/// answer that is not JSON).
const BARE_ANSWER: &str = r#"{"success":true}"#;

/// The content type of every answer.
const JSON: header::HeaderValue = header::HeaderValue::from_static("application/json");

/// The `200` of a stored webhook, typed: serialized straight to its bytes
/// (a `serde_json::Value` tree cost more than the rest of the answer).
#[derive(serde::Serialize, Clone)]
pub(crate) struct Accepted {
    success: bool,
    message_id: StreamId,
    /// Every channel's entry id, for a fan-out route only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    message_ids: Vec<StreamId>,
    webhook_id: String,
    timestamp: String,
    /// Set in the answer recorded for later copies of a de-duplicated body.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

/// What a `200` says: this request's own answer, or the one recorded for
/// the first copy of a de-duplicated body (its JSON, byte for byte).
pub(crate) enum Answer {
    Stored(Accepted),
    Again(String),
}

/// `ip` as text, an IPv4 address through `itoa`: `Display` (padding
/// support and all) cost more than a tenth of the whole `append`.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else { return ip.to_string() };
    let mut text = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text
}

fn find_route<'a>(state: &'a IngestState, name: &str) -> Result<&'a RouteConfig, IngestError> {
    state.routes.iter().map(|(r, _)| r).find(|r| r.name == name).ok_or_else(|| unknown_route(name))
}

/// The error for a route name taken from the URL: cut to 64 characters and
/// escaped (a percent-decoded name may hold CR, LF or terminal escapes,
/// and the error reaches the logs).
pub fn unknown_route(name: &str) -> IngestError {
    IngestError::UnknownRoute(name.chars().take(64).flat_map(char::escape_default).collect())
}

/// Reads the body within `deadline`, up to `limit` bytes. Past the limit
/// the answer is `413` at once, and the rest is read and dropped meanwhile.
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<bytes::Bytes, IngestError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let read = async {
        let mut chunks: Vec<bytes::Bytes> = Vec::new();
        let mut kept = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| IngestError::BadRequest("could not read the request body".into()))?;
            let Ok(data) = frame.into_data() else { continue };
            if kept + data.len() > limit {
                return Err(IngestError::TooLarge(limit as u64));
            }
            kept += data.len();
            chunks.push(data);
        }
        Ok(match chunks.len() {
            1 => chunks.swap_remove(0),
            _ => chunks.concat().into(),
        })
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(IngestError::SlowBody),
        Ok(Err(IngestError::TooLarge(n))) => {
            discard(body, deadline);
            Err(IngestError::TooLarge(n))
        }
        Ok(r) => r,
    }
}

/// Reads the rest of a refused upload and drops it — up to [`DRAIN_CAP`]
/// within `deadline` — while the `413` is sent: a client that sends its
/// whole body before reading (no `Expect: 100-continue`) then reads the
/// answer, instead of a connection reset with unread data.
fn discard(body: Body, deadline: Duration) {
    use http_body_util::BodyExt;
    let mut body = body;
    tokio::spawn(tokio::time::timeout(deadline, async move {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_CAP {
                break;
            }
        }
    }));
}

/// The stored path: the route's own, so a key in the path (however it was
/// encoded) never reaches the stream, the agent or the local endpoint.
pub fn stored_path(route: &str) -> String {
    if route == LEGACY_ROUTE { "/webhook".into() } else { format!("/hooks/{route}") }
}

/// Drops `api_key` from a raw query string — matched on the decoded name,
/// as the key lookup decodes it (`api%5Fkey`) — keeping the rest as sent.
pub fn redact_query(query: &str) -> String {
    let is_key = |kv: &str| form_urlencoded::parse(kv.as_bytes()).next().is_some_and(|(k, _)| k == "api_key");
    query.split('&').filter(|kv| !kv.is_empty() && !is_key(kv)).collect::<Vec<_>>().join("&")
}

/// The headers stored with a webhook: as sent, less [`DROPPED_HEADERS`],
/// [`relay_protocol::SENDER_HEADERS`] and any `X-Relay-*` (the relay's own).
pub fn stored_headers(headers: &HeaderMap) -> Vec<Header> {
    let dropped = |name: &str| {
        DROPPED_HEADERS.contains(&name)
            || relay_protocol::SENDER_HEADERS.contains(&name)
            || name.starts_with("x-relay-")
    };
    headers
        .iter()
        .filter(|(name, _)| !dropped(name.as_str()))
        .map(|(name, value)| Header { name: name.as_str().to_string(), value: value.as_bytes().to_vec() })
        .collect()
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
    State(state): State<Arc<IngestState>>,
    Path(route): Path<String>,
    Query(q): Query<VerifyQuery>,
) -> Response {
    meta_verify(&state, &route, q)
}

async fn verify_with_key(
    State(state): State<Arc<IngestState>>,
    Path((route, _key)): Path<(String, String)>,
    Query(q): Query<VerifyQuery>,
) -> Response {
    meta_verify(&state, &route, q)
}

/// Meta's subscription handshake: echo `hub.challenge` when the token
/// matches the route's `verify_token`. No signature is demanded here.
fn meta_verify(state: &IngestState, route: &str, q: VerifyQuery) -> Response {
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
    use super::*;

    #[test]
    fn client_ips_read_as_display_writes_them() {
        let mut ips: Vec<IpAddr> = ["::1", "::ffff:10.0.0.1", "2001:db8::7", "0.0.0.0", "255.255.255.255"]
            .iter()
            .map(|t| t.parse().expect("an address"))
            .collect();
        // Every octet value in each position.
        ips.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, o.wrapping_mul(7)])));
        for ip in ips {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn key_is_redacted_from_the_query_in_any_encoding() {
        assert_eq!(redact_query("a=1&api_key=s3cret&b=2"), "a=1&b=2");
        assert_eq!(redact_query("api_key=s3cret"), "");
        assert_eq!(redact_query("api%5Fkey=s3cret&a=%20"), "a=%20");
        assert_eq!(redact_query("%61pi_key=s3cret&api_keys=kept"), "api_keys=kept");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.0.0.2".parse().expect("hv"));
        let proxy: SocketAddr = "10.0.0.2:443".parse().expect("addr");
        let trusted: Vec<IpAddr> = vec!["10.0.0.2".parse().expect("ip")];
        assert_eq!(client_ip(proxy, &h, &trusted), "203.0.113.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(client_ip(proxy, &h, &[]), proxy.ip(), "untrusted peer: header ignored");
    }
}
