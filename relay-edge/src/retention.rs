//! Retention: every channel is expired and trimmed by age in bounded
//! batches. Entries never acknowledged within `store.retention` move to the
//! DLQ (reason `expired`) first, so trimming never makes one vanish.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Backend, Store};

/// Most batches of one retention pass per channel (each backend batch is
/// 500–5,000 entries).
const RETENTION_ROUNDS: usize = 1000;

/// Repeats one bounded retention step until it finds nothing left (or
/// fails, or [`RETENTION_ROUNDS`] passed); returns the entries it handled.
async fn until_done<F, Fut>(what: &str, channel: &str, mut step: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::error::StoreError>>,
{
    let mut total = 0;
    for _ in 0..RETENTION_ROUNDS {
        match step().await {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                tracing::debug!(channel, error = %e, "{what} failed");
                break;
            }
        }
    }
    total
}

/// Trims each of `channels` by age (`retention`, from `store.retention`),
/// never cutting unacknowledged entries, until `shutdown`.
pub async fn run(
    store: Store,
    channels: BTreeSet<String>,
    retention: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for ch in &channels {
            // Backends work in bounded batches (each its own transaction or
            // command): repeat until a round finds nothing left.
            let expired = until_done("expiry", ch, || store.expire(ch, retention)).await;
            if expired > 0 {
                metrics.expired.inc_by(expired);
                tracing::warn!(channel = %ch, count = expired, "unacknowledged webhooks reached the retention age; moved to the DLQ with reason `expired`");
            }
            let removed = until_done("retention trim", ch, || store.trim(ch, retention)).await;
            if removed > 0 {
                tracing::info!(channel = %ch, removed, "retention trimmed acknowledged entries");
            }
        }
    }
}
