//! Error types of the edge. Ingest errors map to a JSON answer with a stable
//! code and a human message that never carries secrets or internals.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use thiserror::Error;

/// Configuration that cannot work; the message names the key. Shared with
/// the agent (it comes with the loader).
pub use relay_runtime::ConfigError;

/// Failures of the store (either backend). `Clone`: one failed batched
/// write answers every request in it.
#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("store operation {op} timed out after {ms} ms")]
    Timeout { op: &'static str, ms: u128 },
    #[error("store {op} refused: {why}")]
    Busy { op: &'static str, why: String },
    #[error("store {op}: no replica confirmed the write within {ms} ms (store.durability = \"replica\")")]
    NotReplicated { op: &'static str, ms: u128 },
    #[error("embedded store {op} failed: {why}")]
    Embedded { op: &'static str, why: String },
    #[error("cannot open the embedded store {}: {why}", .path.display())]
    Open { path: PathBuf, why: String },
    #[error("stream entry {id} is unreadable: {why}")]
    Corrupt { id: String, why: String },
}

/// Failures while starting the edge.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// An ingest request refused; rendered as
/// `{"success":false,"error":"<code>","message":"<text>"}`.
#[derive(Debug, Error)]
pub enum IngestError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("unknown route `{0}`")]
    UnknownRoute(String),
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("signature missing or invalid")]
    BadSignature,
    #[error("verification token mismatch")]
    VerifyFailed,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("store unavailable; retry later")]
    StoreUnavailable,
    #[error("too many requests; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    #[error("this route accepts JSON bodies only (Content-Type: application/json)")]
    NotJson,
    #[error("the request body was not received in time")]
    SlowBody,
    #[error("channel `{channel}` holds {backlog} undelivered webhooks (cap {cap}); retry later")]
    BacklogFull { channel: String, backlog: u64, cap: u64 },
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            IngestError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            IngestError::UnknownRoute(_) => (StatusCode::NOT_FOUND, "unknown_route"),
            IngestError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            IngestError::BadSignature => (StatusCode::UNAUTHORIZED, "bad_signature"),
            IngestError::VerifyFailed => (StatusCode::FORBIDDEN, "verify_failed"),
            IngestError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            IngestError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            IngestError::BacklogFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "backlog_full"),
            IngestError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            IngestError::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            IngestError::SlowBody => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "success": false, "error": code, "message": self.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        let retry_after = match &self {
            IngestError::BacklogFull { .. } => Some(30),
            IngestError::StoreUnavailable => Some(5),
            IngestError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
