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
        /// At most [`MAX_HELLO_CHANNELS`], counted while decoding.
        #[serde(default, deserialize_with = "bounded::hello_channels")]
        channels: Option<Vec<String>>,
        /// Free-form agent build string, for the edge's agent list.
        #[serde(default)]
        agent_version: Option<String>,
        /// This agent's `Ack`s and `Nack`s name each entry's channel.
        /// `false` (the default, for agents that predate it): the edge
        /// treats their verdicts by id, where unambiguous.
        #[serde(default)]
        named_acks: bool,
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
    /// agent → edge: delivered (local endpoint answered 2xx). Settles the
    /// entries `(channels[i], ids[i])`. `channels` came after v1's first
    /// release: an agent that sends it empty names ids only, which the edge
    /// settles only where that is unambiguous (see `relay-edge`'s
    /// `tunnel::inflight`). Build it with [`Frame::ack`]; read it with
    /// [`Frame::into_acked`]. Both lists are counted while decoding (at most
    /// [`MAX_ACK_BATCH`]).
    Ack {
        #[serde(deserialize_with = "bounded::ack_list")]
        ids: Vec<String>,
        #[serde(default, deserialize_with = "bounded::ack_list")]
        channels: Vec<String>,
    },
    /// agent → edge: not delivered; retry later, or dead-letter if `permanent`.
    Nack {
        /// The entry's channel (`None` from agents that predate it: the
        /// edge then applies the nack only where the id is unambiguous).
        #[serde(default)]
        channel: Option<String>,
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

/// Most ids (and channels) one `Ack` may carry; checked while decoding,
/// before the list is allocated beyond it.
pub const MAX_ACK_BATCH: usize = 10_000;

/// Most channels one `Hello` may ask for; checked while decoding.
pub const MAX_HELLO_CHANNELS: usize = 1_024;

impl Frame {
    /// An `Ack` naming each `(channel, id)` it settles.
    pub fn ack<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let (channels, ids) = entries.into_iter().map(|(c, i)| (c.to_string(), i.to_string())).unzip();
        Frame::Ack { ids, channels }
    }

    /// What an `Ack` settles: `(Some(channel), id)` pairs, or `(None, id)`
    /// from an agent that names ids only. `None` when the lists disagree in
    /// length (a malformed frame) or `self` is not an `Ack`. Consumes the
    /// frame: the decoded strings are moved, not copied.
    pub fn into_acked(self) -> Option<Vec<(Option<String>, String)>> {
        let Frame::Ack { ids, channels } = self else { return None };
        if channels.is_empty() {
            return Some(ids.into_iter().map(|i| (None, i)).collect());
        }
        if channels.len() != ids.len() {
            return None;
        }
        Some(channels.into_iter().map(Some).zip(ids).collect())
    }

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
    /// The sender's address as the edge saw it (the peer, or the hop a
    /// trusted proxy named); sent downstream as `X-Relay-Client-IP`. Empty
    /// from edges before it existed. A field, not a stored header, so no
    /// header a sender set can pass for it.
    #[serde(default)]
    pub client_ip: String,
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
    #[serde(default, borrow)]
    client_ip: &'a str,
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

/// Lists whose length is checked while they are decoded, so a small frame
/// of many empty strings cannot make the decoder allocate far more than
/// its size.
mod bounded {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::Deserializer;
    use serde::de::{self, Deserialize, SeqAccess, Visitor};

    pub fn ack_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(List { max: super::MAX_ACK_BATCH, what: "acked entries", item: PhantomData })
    }

    pub fn hello_channels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        d.deserialize_option(Optional(List { max: super::MAX_HELLO_CHANNELS, what: "channels", item: PhantomData }))
    }

    struct List<T> {
        max: usize,
        what: &'static str,
        item: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for List<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {} {}", self.max, self.what)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > self.max {
                return Err(de::Error::invalid_length(hint, &self));
            }
            // The header's count is the peer's claim: grow as items arrive.
            let mut out = Vec::with_capacity(hint.min(64));
            while let Some(item) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(de::Error::invalid_length(self.max + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    struct Optional<V>(V);

    impl<'de, V: Visitor<'de>> Visitor<'de> for Optional<V> {
        type Value = Option<V::Value>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.0.expecting(f)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self.0).map(Some)
        }
    }
}
