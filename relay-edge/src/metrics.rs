//! Metrics of the edge, exposed at `/metrics` (admin listener) in the
//! Prometheus text format by `prometheus-client`. Each edge owns its
//! registry (no global recorder), so several edges can run in one process.
//! Labels carry route, channel, status and outcome names — never keys.
//!
//! The reference relay's counters (`webhooks_received`, …) are kept for the
//! JSON of `/health`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::now_ms;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub channel: String,
    /// `acked`, `nacked`, `dead_lettered`, `redelivered`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    /// Webhooks accepted and stored (answered 200).
    pub received: Counter,
    /// Webhooks acknowledged by an agent.
    pub processed: Counter,
    /// Webhooks refused or not stored.
    pub failed: Counter,
    /// Redeliveries after a transient nack.
    pub retried: Counter,
    /// Ingest requests refused because a channel's backlog is at the cap.
    pub backlog_rejected: Counter,
    /// Duplicate webhooks answered from the de-duplication window.
    pub duplicates: Counter,
    /// Entries moved to the DLQ by retention (reason `expired`).
    pub expired: Counter,
    pub ingest_requests: Family<IngestLabels, Counter>,
    pub ingest_seconds: Histogram,
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// Received → acked.
    pub delivery_seconds: Histogram,
    pub stream_length: Family<ChannelLabels, Gauge>,
    pub backlog: Family<ChannelLabels, Gauge>,
    pub oldest_pending_seconds: Family<ChannelLabels, Gauge<f64, AtomicU64>>,
    pub dlq_length: Family<ChannelLabels, Gauge>,
    pub agents_connected: Gauge,
    pub sessions_opened: Counter,
    pub sessions_closed: Family<ReasonLabels, Counter>,
    /// Failed or timed-out store operations, either backend.
    pub store_errors: Counter,
    /// Sum and count of received → acked latencies, for `/health`.
    latency_sum_ms: Counter,
    /// RFC 3339 time of the last accepted webhook.
    pub last_webhook: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let m = Self {
            received: Counter::default(),
            processed: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            backlog_rejected: Counter::default(),
            duplicates: Counter::default(),
            expired: Counter::default(),
            ingest_requests: Family::default(),
            ingest_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            deliveries: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 24)),
            stream_length: Family::default(),
            backlog: Family::default(),
            oldest_pending_seconds: Family::default(),
            dlq_length: Family::default(),
            agents_connected: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Family::default(),
            store_errors: Counter::default(),
            latency_sum_ms: Counter::default(),
            last_webhook: Mutex::new(None),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("webhooks_received", "Webhooks stored and answered 200", m.received.clone());
        r.register("webhooks_processed", "Webhooks acknowledged by an agent", m.processed.clone());
        r.register("webhooks_failed", "Ingest requests refused or not stored", m.failed.clone());
        r.register("webhooks_retried", "Redeliveries after a transient nack", m.retried.clone());
        r.register("backlog_rejections", "Ingest refused at the backlog cap", m.backlog_rejected.clone());
        r.register("duplicates", "Duplicate webhooks answered from the de-duplication window", m.duplicates.clone());
        r.register("expired", "Unacknowledged entries moved to the DLQ by retention", m.expired.clone());
        r.register("ingest_requests", "Ingest requests by route and status", m.ingest_requests.clone());
        r.register("ingest_duration_seconds", "Ingest request time until the answer", m.ingest_seconds.clone());
        r.register("deliveries", "Delivery verdicts by channel and outcome", m.deliveries.clone());
        r.register("delivery_latency_seconds", "Time from receipt to acknowledgement", m.delivery_seconds.clone());
        r.register("stream_length", "Entries retained in the channel stream", m.stream_length.clone());
        r.register("backlog", "Unacknowledged entries (undelivered + pending)", m.backlog.clone());
        r.register(
            "oldest_pending_age_seconds",
            "Age of the oldest unacknowledged entry",
            m.oldest_pending_seconds.clone(),
        );
        r.register("dlq_length", "Dead letters per channel", m.dlq_length.clone());
        r.register("agents_connected", "Agents with a live session", m.agents_connected.clone());
        r.register("sessions_opened", "Tunnel sessions accepted", m.sessions_opened.clone());
        r.register("sessions_closed", "Tunnel sessions closed, by reason", m.sessions_closed.clone());
        r.register("store_errors", "Failed or timed-out store operations (Redis or embedded)", m.store_errors.clone());
        // The name before the embedded store existed; same counter, kept one release.
        r.register("redis_errors", "Deprecated alias of relay_store_errors_total", m.store_errors.clone());
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn delivered(&self, channel: &str, received_at_ms: u64) {
        let ms = now_ms().saturating_sub(received_at_ms);
        self.processed.inc();
        self.latency_sum_ms.inc_by(ms);
        self.delivery_seconds.observe(ms as f64 / 1000.0);
        self.outcome(channel, "acked");
    }

    pub fn outcome(&self, channel: &str, outcome: &'static str) {
        self.deliveries.get_or_create(&OutcomeLabels { channel: channel.to_string(), outcome }).inc();
    }

    pub fn session_closed(&self, reason: &str) {
        self.sessions_closed.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
    }

    pub fn average_latency_ms(&self) -> f64 {
        let n = self.processed.get();
        if n == 0 {
            return 0.0;
        }
        self.latency_sum_ms.get() as f64 / n as f64
    }
}
