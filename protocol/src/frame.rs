//! The frames of protocol v1. Names are the contract; fields may grow, so
//! every field added after v1 carries `#[serde(default)]` and decoders ignore
//! fields they do not know.

use serde::{Deserialize, Serialize};

/// One message on the tunnel, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// agent → edge, first frame. `window` = max unacked deliveries in flight.
    Hello {
        version: u32,
        window: u32,
        /// Channels the agent wants; `None` = every channel granted to it.
        #[serde(default)]
        channels: Option<Vec<String>>,
        /// Free-form agent build string, for the edge's agent list.
        #[serde(default)]
        agent_version: Option<String>,
    },
    /// edge → agent: session accepted.
    Welcome {
        session: String,
        /// The identity read from the agent's certificate.
        agent: String,
        channels: Vec<String>,
        heartbeat_ms: u64,
        /// The edge's visibility timeout: entries pending this long on an
        /// agent may be redelivered to another one.
        #[serde(default)]
        reclaim_after_ms: Option<u64>,
    },
    /// edge → agent: one webhook. `id` is the stream entry id.
    Deliver { id: String, channel: String, attempt: u32, received_at_ms: u64, webhook: Webhook },
    /// agent → edge: delivered (local endpoint answered 2xx).
    Ack { ids: Vec<String> },
    /// agent → edge: not delivered; retry later, or dead-letter if `permanent`.
    Nack {
        id: String,
        permanent: bool,
        reason: String,
        #[serde(default)]
        retry_after_ms: Option<u64>,
        /// Last HTTP status from the local endpoint, if it answered at all.
        #[serde(default)]
        status: Option<u16>,
    },
    /// agent → edge: change the window; `0` pauses. With `channel`, pauses
    /// (`window = 0`) or resumes (`window > 0`) that channel only, e.g.
    /// while its local endpoint is down; the session window is unchanged.
    Flow {
        window: u32,
        #[serde(default)]
        channel: Option<String>,
    },
    /// Heartbeat; `t` is the sender's clock in microseconds since the Unix
    /// epoch (only the sender reads it back, to measure the round trip).
    Ping { t: u64 },
    /// Heartbeat answer echoing the `t` of the `Ping`.
    Pong { t: u64 },
    /// edge → agent: backlog figures for the agent's channels (for `status`).
    Stats { channels: Vec<ChannelStats> },
    /// edge → agent: sent before the edge closes a session.
    Error { code: String, message: String },
}

impl Frame {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Deliver { .. } => "deliver",
            Frame::Ack { .. } => "ack",
            Frame::Nack { .. } => "nack",
            Frame::Flow { .. } => "flow",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Stats { .. } => "stats",
            Frame::Error { .. } => "error",
        }
    }
}

/// A received webhook exactly as the edge got it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Webhook {
    /// Stable webhook id (UUID v7), sent downstream as `X-Relay-Id`.
    pub id: String,
    pub method: String,
    pub path: String,
    /// Raw query string without `?` (secrets redacted), empty when none.
    #[serde(default)]
    pub query: String,
    /// Original order; hop-by-hop and auth headers removed.
    pub headers: Vec<Header>,
    /// Body bytes, never re-encoded, so signatures still verify downstream.
    /// `Bytes`: handed to the local HTTP client (and kept for a retry)
    /// without a copy.
    pub body: bytes::Bytes,
    /// Name of the route that accepted it.
    pub route: String,
    /// Milliseconds since the Unix epoch when the edge received it.
    pub received_at_ms: u64,
}

/// A [`Webhook`] read in place from its encoded bytes, to check an entry
/// before it is forwarded as is. Same fields, types and defaults as
/// `Webhook` (kept next to it; `tests/codec.rs` checks they agree).
#[derive(Deserialize)]
#[allow(dead_code)] // fields other than `received_at_ms` are only type-checked
pub(crate) struct WebhookView<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow)]
    path: &'a str,
    #[serde(default, borrow)]
    query: &'a str,
    #[serde(borrow)]
    headers: Vec<HeaderView<'a>>,
    #[serde(with = "serde_bytes", borrow)]
    body: &'a [u8],
    #[serde(borrow)]
    route: &'a str,
    pub received_at_ms: u64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct HeaderView<'a> {
    #[serde(borrow)]
    name: &'a str,
    #[serde(with = "serde_bytes", borrow)]
    value: &'a [u8],
}

/// One HTTP header; values are bytes because HTTP allows non-UTF-8 values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Backlog figures of one channel, as the edge sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStats {
    pub channel: String,
    /// Entries not yet delivered to any consumer (stream lag of the group).
    pub backlog: u64,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Age of the oldest pending or undelivered entry, in milliseconds.
    #[serde(default)]
    pub oldest_ms: Option<u64>,
}
