//! Pausing a channel whose local endpoint is down, instead of burning
//! attempts: a refused connection pauses at once, timeouts after three in a
//! row. While paused the agent sends `Flow { window: 0, channel }`, parks
//! the deliveries it holds (no POST, no attempt used), and probes the
//! endpoint with a TCP connect (half-open) on a capped, jittered backoff.
//! When the probe connects it sends `Flow { window: n, channel }` and posts
//! the parked deliveries. Webhooks stay in the stream meanwhile.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use relay_protocol::Webhook;

use crate::backoff;

/// Timeouts in a row that pause a channel.
pub const TIMEOUTS_TO_PAUSE: u32 = 3;

/// A delivery held while its channel is paused.
pub struct Parked {
    pub id: String,
    pub attempt: u32,
    pub webhook: Webhook,
}

/// Health of one channel's local endpoint; survives reconnects.
#[derive(Default)]
pub struct Health {
    pub paused: bool,
    /// Timeouts in a row (reset by any answer).
    pub timeouts: u32,
    /// Failed probes since the pause began (drives the probe backoff).
    pub probes_failed: u32,
    pub next_probe: Option<Instant>,
    /// A probe is running now.
    pub probing: bool,
    /// Deliveries held until the endpoint answers again.
    pub parked: VecDeque<Parked>,
}

impl Health {
    pub fn pause(&mut self) {
        self.paused = true;
        self.probes_failed = 0;
        self.next_probe = Some(Instant::now() + probe_delay(0));
    }

    pub fn probe_failed(&mut self) {
        self.probing = false;
        self.probes_failed += 1;
        self.next_probe = Some(Instant::now() + probe_delay(self.probes_failed));
    }

    /// Back to normal; returns the parked deliveries to post.
    pub fn resume(&mut self) -> VecDeque<Parked> {
        self.paused = false;
        self.probing = false;
        self.timeouts = 0;
        self.next_probe = None;
        std::mem::take(&mut self.parked)
    }
}

fn probe_delay(failed: u32) -> Duration {
    backoff::delay(failed + 1, Duration::from_millis(250), 2.0, Duration::from_secs(15))
}

/// Half-open probe: can we open a TCP connection to the target?
pub async fn probe(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    let Some(host) = uri.host() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect((host.as_str(), port))).await,
        Ok(Ok(_))
    )
}
