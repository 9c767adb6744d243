//! The per-channel backlog cap. Checking Redis on every request would add
//! round trips to the hot path, so a loop refreshes each channel's
//! unacknowledged count every 500 ms together with the stream's last id,
//! and ingest adds the entries it appended after that id — exact for one
//! edge, up to the requests in flight at the same moment.
//! Over the cap, ingest answers `503` + `Retry-After` (Meta retries) and
//! stores nothing: nothing unacknowledged is ever dropped to make room.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashMap;
use tokio_util::sync::CancellationToken;

use crate::error::IngestError;
use crate::metrics::{ChannelLabels, Metrics};
use crate::store::{Backend, Store, StreamId};

#[derive(Default)]
pub struct Backlog {
    counts: Mutex<HashMap<String, Count>>,
}

#[derive(Default)]
struct Count {
    /// Unacknowledged entries at the last refresh.
    base: u64,
    /// The stream's last id at that refresh.
    last: StreamId,
    /// Ids this edge appended that may be newer than `last`.
    recent: Vec<StreamId>,
    /// What the last refresh read (sessions send it to their agents).
    stats: Option<relay_protocol::ChannelStats>,
}

impl Count {
    /// Unacknowledged entries now.
    fn now(&self) -> u64 {
        self.base + self.recent.len() as u64
    }

    fn record(&mut self, id: StreamId) {
        if id > self.last {
            self.recent.push(id);
        }
    }
}

impl Backlog {
    fn count(counts: &HashMap<String, Count>, channel: &str) -> u64 {
        counts.get(channel).map(Count::now).unwrap_or(0)
    }

    /// Refuses when any of `channels` is at `cap`.
    pub fn check(&self, channels: &[String], cap: u64) -> Result<(), IngestError> {
        channels.iter().try_for_each(|ch| self.check_one(ch, cap))
    }

    /// Refuses when `channel` is at `cap`.
    pub fn check_one(&self, channel: &str, cap: u64) -> Result<(), IngestError> {
        let n = Self::count(&self.counts.lock().unwrap_or_else(|p| p.into_inner()), channel);
        if n >= cap {
            return Err(IngestError::BacklogFull { channel: channel.to_string(), backlog: n, cap });
        }
        Ok(())
    }

    /// How many more entries `channel` takes before it reaches `cap`.
    pub fn headroom(&self, channel: &str, cap: u64) -> u64 {
        cap.saturating_sub(Self::count(&self.counts.lock().unwrap_or_else(|p| p.into_inner()), channel))
    }

    /// Records appended entries (`ids` in channel order).
    pub fn appended(&self, channels: &[String], ids: &[StreamId]) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (ch, id) in channels.iter().zip(ids) {
            counts.entry(ch.clone()).or_default().record(*id);
        }
    }

    /// Records entries appended to one channel (a replay).
    pub fn appended_to(&self, channel: &str, ids: &[StreamId]) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(channel.to_string()).or_default();
        ids.iter().for_each(|id| c.record(*id));
    }

    /// The channel's figures at the last refresh (at most 500 ms old):
    /// what sessions tell their agents, with no store command of their own.
    pub fn stats(&self, channel: &str) -> Option<relay_protocol::ChannelStats> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(channel)?.stats.clone()
    }

    fn refreshed(&self, channel: &str, snap: &crate::store::Snapshot) {
        let (base, last) = (snap.unacked(), snap.last_id);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(channel.to_string()).or_default();
        c.stats = Some(snap.stats.clone());
        c.base = base;
        c.last = last;
        c.recent.retain(|id| *id > last);
    }
}

/// Refreshes `backlog` (and the channel gauges of `metrics`) from the
/// store every 500 ms, for each of `channels`, until `shutdown`.
pub async fn refresh_loop(
    backlog: Arc<Backlog>,
    store: Store,
    channels: BTreeSet<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        for ch in &channels {
            match store.snapshot(ch).await {
                Ok(snap) => {
                    backlog.refreshed(ch, &snap);
                    let labels = ChannelLabels { channel: ch.clone() };
                    let m = &metrics;
                    m.backlog.get_or_create(&labels).set(snap.unacked() as i64);
                    m.oldest_pending_seconds
                        .get_or_create(&labels)
                        .set(snap.stats.oldest_ms.map(|ms| ms as f64 / 1000.0).unwrap_or(0.0));
                    m.stream_length.get_or_create(&labels).set(snap.length as i64);
                    m.dlq_length.get_or_create(&labels).set(snap.dlq_length as i64);
                }
                Err(e) => tracing::debug!(channel = %ch, error = %e, "backlog refresh failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
