//! Wire protocol v1 between `relay-edge` and `relay-agent`.
//!
//! Every WebSocket binary message carries exactly one MessagePack-encoded
//! [`Frame`] (named fields, so fields can be added without breaking older
//! peers). This crate is pure: types, the codec and the limits. Sessions own
//! I/O and policy.
#![forbid(unsafe_code)]

mod codec;
mod error;
mod frame;
mod limits;

pub use codec::{check_webhook, decode, decode_webhook, encode, encode_deliver, encode_webhook};
pub use error::{DecodeError, EncodeError};
pub use frame::{ChannelStats, Frame, Header, MAX_ACK_BATCH, MAX_HELLO_CHANNELS, Webhook};
pub use limits::Limits;

/// Protocol version carried in `Hello` and checked by the edge.
pub const VERSION: u32 = 1;

/// WebSocket subprotocol the agent asks for; the edge refuses any other.
pub const SUBPROTOCOL: &str = "relay.v1";

/// Headers in which a sender (or a proxy in front of the edge) says
/// something about itself, or that are meant for the hop they came over:
/// the edge does not store them and the agent does not forward them (an
/// entry stored by an older edge may still hold them). The edge tells who
/// it saw in `Webhook::client_ip` (`X-Relay-Client-IP`).
pub const SENDER_HEADERS: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "forwarded",
    "cookie",
    "expect",
];

/// Milliseconds since the Unix epoch: the clock of `received_at_ms` and of
/// both binaries' status times.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Microseconds since the Unix epoch, the clock of `Ping { t }`.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
