//! Counters of the edge, in the reference relay's vocabulary so `/health`
//! keeps its JSON shape.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::now_ms;

#[derive(Default)]
pub struct Metrics {
    /// Webhooks accepted and stored (answered 200).
    pub received: AtomicU64,
    /// Webhooks acknowledged by an agent.
    pub processed: AtomicU64,
    /// Webhooks refused or not stored.
    pub failed: AtomicU64,
    /// Redeliveries after a transient nack.
    pub retried: AtomicU64,
    /// Ingest requests refused because a channel's backlog is at the cap.
    pub backlog_rejected: AtomicU64,
    /// Duplicate webhooks answered from the de-duplication window.
    pub duplicates: AtomicU64,
    /// Entries moved to the DLQ by retention (reason `expired`).
    pub expired: AtomicU64,
    /// Sum and count of received → acked latencies, for the average.
    latency_sum_ms: AtomicU64,
    latency_count: AtomicU64,
    /// RFC 3339 time of the last accepted webhook.
    pub last_webhook: Mutex<Option<String>>,
}

impl Metrics {
    pub fn delivered(&self, received_at_ms: u64) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(now_ms().saturating_sub(received_at_ms), Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn average_latency_ms(&self) -> f64 {
        let n = self.latency_count.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        self.latency_sum_ms.load(Ordering::Relaxed) as f64 / n as f64
    }
}
