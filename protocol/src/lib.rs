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

pub use codec::{check_webhook, decode, encode, encode_deliver};
pub use error::{DecodeError, EncodeError};
pub use frame::{ChannelStats, Frame, Header, MAX_ACK_BATCH, MAX_HELLO_CHANNELS, Webhook};
pub use limits::Limits;

/// Protocol version carried in `Hello` and checked by the edge.
pub const VERSION: u32 = 1;

/// WebSocket subprotocol the agent asks for; the edge refuses any other.
pub const SUBPROTOCOL: &str = "relay.v1";

/// Microseconds since the Unix epoch, the clock of `Ping { t }`.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
