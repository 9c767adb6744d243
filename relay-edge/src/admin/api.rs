//! The admin API under `/admin` (admin listener, loopback by default):
//! dead letters (list, show, replay, purge), replay from history, agents.
//!
//! Authorization: `Authorization: Bearer <admin.token>`. Without a
//! configured token the API is open only because the listener is loopback
//! (config validation refuses a non-loopback admin listener without one).
//!
//! Loopback is not enough against a browser: an operator's browser reaches
//! the port (e.g. through `ssh -L`), and any page it shows can send it
//! requests. So the whole admin listener ([`same_origin_only`]) refuses
//! requests a browser marks as coming from another site (`Sec-Fetch-Site`,
//! `Origin`), and, while no token protects it, requests whose `Host` is
//! not a loopback name or the listener's own address (DNS rebinding: a page
//! whose name now resolves to 127.0.0.1 is same-origin to itself, but its
//! `Host` is its own name). Destructive calls take an explicit JSON body
//! (`Content-Type: application/json`), which a cross-site page cannot send
//! without a CORS preflight, and this API answers no preflight.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use crate::ingest::auth::secret_eq;
use crate::store::Backend;
use crate::store::{DeadEntry, ReplayFrom, StreamId, rfc3339};

pub fn router(state: Arc<AdminState>) -> Router<Arc<AdminState>> {
    Router::new()
        .route("/admin/dlq/{channel}", get(list))
        .route("/admin/dlq/{channel}/replay", post(replay_dlq))
        .route("/admin/dlq/{channel}/purge", post(purge))
        .route("/admin/dlq/{channel}/{id}", get(show))
        .route("/admin/replay", post(replay_history))
        .route("/admin/agents", get(agents))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

async fn authorize(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.cfg.token {
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

/// Refuses cross-site and DNS-rebound requests (see the module doc).
pub async fn same_origin_only(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let check_host = state.cfg.token.is_none();
    if let Err(why) = browser_guard(req.headers(), &state.cfg.listen, check_host) {
        tracing::warn!(path = %req.uri().path(), why, "admin request refused");
        return error(StatusCode::FORBIDDEN, "forbidden", format!("{why}; use the relay-edge CLI or curl"));
    }
    next.run(req).await
}

/// Why a request must be refused, if it must: another site's page
/// (`Sec-Fetch-Site` other than `same-origin`/`none`, or an `Origin` whose
/// host is not ours) or, with `check_host`, a `Host` that is neither a
/// loopback name nor the host of `listen`.
pub fn browser_guard(headers: &HeaderMap, listen: &str, check_host: bool) -> Result<(), &'static str> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err("a browser page of another site sent this request");
    }
    if let Some(origin) = text("origin") {
        let host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
        if !our_host(host, listen) {
            return Err("a browser page of another origin sent this request");
        }
    }
    if check_host
        && let Some(host) = text("host")
        && !our_host(host, listen)
    {
        return Err("the Host is not this listener's (DNS rebinding?)");
    }
    Ok(())
}

/// `host[:port]` names this listener: a loopback name or address, or the
/// host part of `listen`.
fn our_host(host_port: &str, listen: &str) -> bool {
    let host = strip_port(host_port);
    if host.is_empty() {
        return false;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>()
        && ip.is_loopback()
    {
        return true;
    }
    let listen_host = strip_port(listen);
    !listen_host.is_empty() && host.eq_ignore_ascii_case(listen_host)
}

/// `example:80` → `example`, `[::1]:80` → `[::1]`, `::1` stays.
fn strip_port(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return host_port.split_once(']').map(|(h, _)| &host_port[..h.len() + 1]).unwrap_or(host_port);
    }
    match host_port.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    }
}

/// An id from a URL or body; a `400` naming it when it is not a stream id.
fn stream_id(id: &str) -> Result<StreamId, Box<Response>> {
    id.parse().map_err(|_| {
        let shown: String = id.chars().take(64).collect();
        let why = format!("`{}` is not a stream id (`<ms>-<seq>`)", shown.escape_debug());
        Box::new(error(StatusCode::BAD_REQUEST, "bad_request", why))
    })
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "success": false, "error": code, "message": message }))).into_response()
}

fn store_error(e: crate::error::StoreError) -> Response {
    log_store_error(&e);
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the store is unavailable; retry later".into())
}

fn log_store_error(e: &crate::error::StoreError) {
    tracing::warn!(error = %e, "admin request failed on the store");
}

/// The error answer for a channel no route or agent uses, if it is one.
fn unknown_channel(state: &AdminState, channel: &str) -> Option<Response> {
    (!state.channels.contains(channel))
        .then(|| error(StatusCode::NOT_FOUND, "unknown_channel", format!("no route or agent uses channel `{channel}`")))
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

/// Most dead letters one list answer names.
pub const LIST_MAX: usize = 1000;
/// Dead letters read from the store at once (each may hold a body of up
/// to `ingest.max_body`, so this bounds what one step holds).
const STORE_PAGE: usize = 16;
/// Stored bytes one list answer reads before it stops early (it says
/// `next` so the caller pages on).
const LIST_BYTES: usize = 32 * 1024 * 1024;

/// Dead letters, oldest first, without headers or bodies (`show` has
/// them): at most `limit` (≤ [`LIST_MAX`]); `next` is the `after` of the
/// next page while more remain.
async fn list(
    State(state): State<Arc<AdminState>>,
    Path(channel): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, LIST_MAX);
    let mut items = Vec::new();
    let mut after = match q.after.as_deref().map(stream_id).transpose() {
        Ok(after) => after,
        Err(r) => return *r,
    };
    let mut bytes = 0;
    let mut more = true;
    while items.len() < limit && bytes < LIST_BYTES {
        let want = STORE_PAGE.min(limit - items.len());
        let page = match state.store.dlq_list(&channel, after, want).await {
            Ok(p) => p,
            Err(e) => return store_error(e),
        };
        more = page.len() == want;
        for e in &page {
            bytes += e.raw.as_ref().map_or(0, Vec::len);
            items.push(entry_json(&channel, e, false));
        }
        after = page.last().map(|e| e.id).or(after);
        if !more {
            break;
        }
    }
    let total = state.store.dlq_len(&channel).await.unwrap_or(items.len() as u64);
    let next = if more { after } else { None };
    Json(json!({ "channel": channel, "total": total, "entries": items, "next": next })).into_response()
}

async fn show(State(state): State<Arc<AdminState>>, Path((channel, id)): Path<(String, String)>) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let dlq_id = match stream_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match state.store.dlq_get(&channel, dlq_id).await {
        Ok(Some(e)) => Json(entry_json(&channel, &e, true)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", format!("no dead letter `{id}` in channel `{channel}`")),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct ReplayBody {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Replays the named dead letters, or all of them up to the newest at the
/// start, in pages (never more in memory than one page), while the channel
/// is under `store.max_backlog`. Each is moved back at most once, however
/// many replays run at once. Answers what it did (`count`, and the first
/// [`LIST_MAX`] ids), also when it stopped early (`stopped`).
async fn replay_dlq(
    State(state): State<Arc<AdminState>>,
    Path(channel): Path<String>,
    Json(body): Json<ReplayBody>,
) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    if body.ids.is_empty() && !body.all {
        return error(StatusCode::BAD_REQUEST, "bad_request", "name the ids to replay, or all".into());
    }
    if body.ids.len() > LIST_MAX {
        return error(StatusCode::BAD_REQUEST, "bad_request", format!("at most {LIST_MAX} ids per call"));
    }
    let ids = match body.ids.iter().map(|id| stream_id(id)).collect::<Result<Vec<_>, _>>() {
        Ok(ids) => ids,
        Err(r) => return *r,
    };
    // All: up to the newest dead letter now. One that fails again while
    // this runs comes back under a later id, and is not replayed again.
    let last = match body.all {
        true => match state.store.dlq_last(&channel).await {
            Ok(last) => last,
            Err(e) => return store_error(e),
        },
        false => None,
    };
    let mut replayed = Vec::new();
    let mut count = 0u64;
    let mut missing = Vec::new();
    let mut named = ids.into_iter();
    let mut after: Option<StreamId> = None;
    let stopped = loop {
        let page = if body.all {
            match state.store.dlq_list(&channel, after, STORE_PAGE).await {
                Ok(mut page) => {
                    page.retain(|e| Some(e.id) <= last);
                    if page.is_empty() {
                        break None;
                    }
                    page
                }
                Err(e) => break Some(store_stop(e)),
            }
        } else {
            let Some(id) = named.next() else { break None };
            match state.store.dlq_get(&channel, id).await {
                Ok(Some(e)) => vec![e],
                Ok(None) => {
                    missing.push(id);
                    continue;
                }
                Err(e) => break Some(store_stop(e)),
            }
        };
        after = page.last().map(|e| e.id);
        let mut failed = None;
        for e in &page {
            if let Some(why) = backlog_full(&state, &channel) {
                failed = Some(why);
                break;
            }
            match state.store.dlq_replay_one(&channel, e).await {
                Ok(Some(new_id)) => {
                    state.backlog.appended_to(&channel, std::slice::from_ref(&new_id));
                    count += 1;
                    if replayed.len() < LIST_MAX {
                        replayed.push(json!({ "dlq_id": e.id, "stream_id": new_id }));
                    }
                }
                // Gone meanwhile (another replay or a purge took it).
                Ok(None) if missing.len() < LIST_MAX => missing.push(e.id),
                Ok(None) => {}
                Err(err) => {
                    failed = Some(store_stop(err));
                    break;
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
    };
    tracing::info!(%channel, count, stopped = stopped.as_deref(), "dead letters replayed");
    // The first LIST_MAX of each list; `count` is the whole number.
    let mut answer = json!({ "channel": channel, "count": count, "replayed": replayed, "missing": missing });
    if let Some(why) = stopped {
        answer["stopped"] = why.into();
    }
    Json(answer).into_response()
}

/// Why a replay stops early, when the channel's backlog is at the cap.
fn backlog_full(state: &AdminState, channel: &str) -> Option<String> {
    state.backlog.check_one(channel, state.max_backlog).err().map(|e| format!("backlog cap: {e}"))
}

/// Why a replay stops early on a store error (logged, never answered).
fn store_stop(e: crate::error::StoreError) -> String {
    log_store_error(&e);
    "the store is unavailable; replay the rest later".into()
}

/// What to purge: `{"all": true}`, or `{"before_ms": N}`.
#[derive(Deserialize, Default)]
struct PurgeBody {
    before_ms: Option<u64>,
    #[serde(default)]
    all: bool,
}

async fn purge(
    State(state): State<Arc<AdminState>>,
    Path(channel): Path<String>,
    Json(body): Json<PurgeBody>,
) -> Response {
    if let Some(r) = unknown_channel(&state, &channel) {
        return r;
    }
    let before = match (body.all, body.before_ms) {
        (true, None) => None,
        (false, Some(ms)) => Some(ms),
        _ => {
            let msg = "say what to purge: {\"all\": true}, or {\"before_ms\": N}".into();
            return error(StatusCode::BAD_REQUEST, "bad_request", msg);
        }
    };
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

/// Re-appends history received in `[since, until]`, `until` clamped to
/// now and its stop point captured before the first page, in pages of
/// [`HISTORY_PAGE`] while the channel is under `store.max_backlog`.
/// Answers how many it replayed, also when it stopped early (`stopped`).
async fn replay_history(State(state): State<Arc<AdminState>>, Json(body): Json<HistoryBody>) -> Response {
    if let Some(r) = unknown_channel(&state, &body.channel) {
        return r;
    }
    let now = crate::store::now_ms();
    let until = body.until_ms.unwrap_or(now).min(now);
    if until < body.since_ms {
        return error(StatusCode::BAD_REQUEST, "bad_request", "until is before since (or in the future)".into());
    }
    let channel = body.channel.clone();
    let stop = match state.store.replay_stop(&channel, until).await {
        Ok(stop) => stop,
        Err(e) => return store_error(e),
    };
    let mut replayed = 0u64;
    let mut from = ReplayFrom::Since(body.since_ms);
    let stopped = match stop {
        None => None,
        Some(stop) => loop {
            if let Some(why) = backlog_full(&state, &channel) {
                break Some(why);
            }
            // No more than the cap still takes.
            let room = state.backlog.headroom(&channel, state.max_backlog);
            let count = HISTORY_PAGE.min(usize::try_from(room).unwrap_or(HISTORY_PAGE));
            let page = match state.store.replay_page(&channel, from, stop, count).await {
                Ok(p) => p,
                Err(e) => break Some(store_stop(e)),
            };
            replayed += page.appended.len() as u64;
            state.backlog.appended_to(&channel, &page.appended);
            match page.last {
                Some(last) if last != stop => from = ReplayFrom::After(last),
                _ => break None,
            }
        },
    };
    tracing::info!(%channel, replayed, stopped = stopped.as_deref(), "history replayed");
    let mut answer =
        json!({ "channel": channel, "replayed": replayed, "since": rfc3339(body.since_ms), "until": rfc3339(until) });
    if let Some(why) = stopped {
        answer["stopped"] = why.into();
    }
    Json(answer).into_response()
}

/// History entries replayed per step.
const HISTORY_PAGE: usize = 500;

async fn agents(State(state): State<Arc<AdminState>>) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn hosts_and_origins_of_this_listener_pass() {
        let listen = "127.0.0.1:9090";
        for host in ["127.0.0.1:9090", "localhost:9090", "LOCALHOST", "[::1]:9090", "127.0.0.2:1"] {
            assert_eq!(browser_guard(&headers(&[("host", host)]), listen, true), Ok(()), "{host}");
        }
        let same = headers(&[
            ("host", "localhost:9090"),
            ("origin", "http://localhost:9090"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(browser_guard(&same, listen, true), Ok(()));
        assert_eq!(browser_guard(&headers(&[("host", "10.0.0.5:9090")]), "10.0.0.5:9090", true), Ok(()));
        assert_eq!(
            browser_guard(&headers(&[("host", "relay.example:9090")]), "0.0.0.0:9090", false),
            Ok(()),
            "with a token, any Host"
        );
    }

    #[test]
    fn other_sites_and_rebound_names_are_refused() {
        let listen = "127.0.0.1:9090";
        for h in [
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
            headers(&[("origin", "http://evil.example")]),
            headers(&[("origin", "null")]),
            headers(&[("host", "rebind.evil.example:9090")]),
            headers(&[("host", "127.0.0.1.evil.example")]),
        ] {
            assert!(browser_guard(&h, listen, true).is_err(), "{h:?}");
        }
        let cross = headers(&[("origin", "http://evil.example")]);
        assert!(browser_guard(&cross, "0.0.0.0:9090", false).is_err(), "Origin is checked with a token too");
    }
}
