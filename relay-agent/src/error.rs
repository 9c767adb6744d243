//! Error types of the agent.

use thiserror::Error;

/// Configuration that cannot work; the message names the key. Shared with
/// the edge (it comes with the loader).
pub use relay_runtime::ConfigError;

/// Why a tunnel session could not start or ended.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: std::io::Error },
    #[error("WebSocket handshake failed: {0}")]
    Upgrade(String),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(std::time::Duration),
    #[error("the edge refused the session: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no heartbeat from the edge for {0:?}")]
    HeartbeatTimeout(std::time::Duration),
    #[error("connection lost: {0}")]
    Transport(String),
    #[error("the edge closed the tunnel")]
    Closed,
}
