//! The per-channel backlog cap. Checking Redis on every request would add
//! round trips to the hot path, so a loop refreshes each channel's
//! unacknowledged count every 500 ms and ingest adds what it appended since.
//! Over the cap, ingest answers `503` + `Retry-After` (Meta retries) and
//! stores nothing: nothing unacknowledged is ever dropped to make room.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::error::IngestError;

#[derive(Default)]
pub struct Backlog {
    /// channel → (last refreshed count, appended since that refresh)
    counts: Mutex<HashMap<String, (u64, u64)>>,
}

impl Backlog {
    /// Refuses when any of `channels` is at `cap`.
    pub fn check(&self, channels: &[String], cap: u64) -> Result<(), IngestError> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for ch in channels {
            let (base, added) = counts.get(ch).copied().unwrap_or((0, 0));
            if base + added >= cap {
                return Err(IngestError::BacklogFull { channel: ch.clone(), backlog: base + added, cap });
            }
        }
        Ok(())
    }

    pub fn appended(&self, channels: &[String]) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for ch in channels {
            counts.entry(ch.clone()).or_default().1 += 1;
        }
    }

    fn refreshed(&self, channel: &str, backlog: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.insert(channel.to_string(), (backlog, 0));
    }
}

pub async fn refresh_loop(state: std::sync::Arc<AppState>, shutdown: CancellationToken) {
    loop {
        for ch in state.cfg.all_channels() {
            match state.store.backlog(&ch).await {
                Ok(n) => state.backlog.refreshed(&ch, n),
                Err(e) => tracing::debug!(channel = %ch, error = %e, "backlog refresh failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
