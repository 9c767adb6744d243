//! The agent's live status: one [`Snapshot`] type shared by the socket
//! server (inside the running agent) and the `relay-agent status` command.
//! `--json` prints this type as is; its field names are the stable schema.

pub mod client;
pub mod metrics;
pub mod server;

use std::sync::{Arc, Mutex};

use relay_protocol::ChannelStats;
use serde::{Deserialize, Serialize};

/// What `relay-agent status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub connected: bool,
    /// Edge URL from the config.
    pub edge: String,
    /// Resolved edge address of the current session.
    pub edge_addr: Option<String>,
    /// Identity the edge read from our certificate.
    pub agent: Option<String>,
    pub session: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub started_at_ms: u64,
    /// Round trip of the last answered ping.
    pub last_rtt_ms: Option<f64>,
    /// When the last frame arrived from the edge.
    pub last_heartbeat_ms: Option<u64>,
    /// Heartbeat interval; the link counts as stale after 3× this.
    pub heartbeat_ms: u64,
    pub window: u32,
    pub in_flight: u64,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    /// Re-deliveries answered from the recently-acked set without a POST.
    pub duplicates_dropped: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub targets: Vec<TargetStatus>,
    /// Configuration problems found at connect time (e.g. visibility timeout).
    pub warnings: Vec<String>,
    /// When this agent's client certificate expires (ms since the epoch).
    pub cert_expires_at_ms: Option<u64>,
    /// Backlog per channel, as last reported by the edge.
    pub channels: Vec<ChannelStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetStatus {
    pub channel: String,
    pub url: String,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub last_attempt_ms: Option<u64>,
    /// Paused because the endpoint is down; the agent probes it.
    pub paused: bool,
    /// Deliveries held while paused.
    pub parked: u64,
}

impl Snapshot {
    /// Connected and heard from the edge within the heartbeat deadline.
    pub fn healthy(&self, now_ms: u64) -> bool {
        self.connected
            && self.last_heartbeat_ms.is_some_and(|t| now_ms.saturating_sub(t) <= self.heartbeat_ms.saturating_mul(3))
    }
}

/// Shared, cheap-to-clone handle on the live snapshot.
#[derive(Clone, Default)]
pub struct Status(Arc<Mutex<Snapshot>>);

impl Status {
    pub fn new(snapshot: Snapshot) -> Self {
        Self(Arc::new(Mutex::new(snapshot)))
    }

    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    pub fn get(&self) -> Snapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub use relay_protocol::now_ms;
