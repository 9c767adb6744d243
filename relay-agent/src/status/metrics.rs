//! Optional Prometheus `/metrics` of the agent (`metrics_listen`, off by
//! default; keep it on loopback). Rendered from the live status snapshot
//! by `prometheus-client` at each scrape.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Snapshot, Status, now_ms};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

/// The exposition of one snapshot.
pub fn render(s: &Snapshot, now: u64) -> String {
    let mut r = Registry::with_prefix("relay_agent");
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    r.register("connected", "1 while the tunnel is up and heartbeats are fresh", gauge(i64::from(s.healthy(now))));
    r.register("in_flight", "Deliveries being posted", gauge(s.in_flight as i64));
    r.register("delivered", "Webhooks acked after a 2xx", counter(s.delivered));
    r.register("retried", "Redeliveries received", counter(s.retried));
    r.register("failed", "Failed local deliveries", counter(s.failed));
    r.register("dead_lettered", "Webhooks sent to the DLQ", counter(s.dead_lettered));
    r.register("duplicates_dropped", "Re-deliveries acked without posting", counter(s.duplicates_dropped));
    r.register("reconnects", "Tunnel reconnects", counter(s.reconnects));
    if let Some(rtt) = s.last_rtt_ms {
        r.register("heartbeat_rtt_microseconds", "Last heartbeat round trip", gauge((rtt * 1000.0) as i64));
    }
    let paused = Family::<ChannelLabels, Gauge>::default();
    for t in &s.targets {
        paused.get_or_create(&ChannelLabels { channel: t.channel.clone() }).set(i64::from(t.paused));
    }
    r.register("target_paused", "1 while a channel is paused (endpoint down)", paused);
    let backlog = Family::<ChannelLabels, Gauge>::default();
    for c in &s.channels {
        backlog.get_or_create(&ChannelLabels { channel: c.channel.clone() }).set((c.backlog + c.pending) as i64);
    }
    r.register("edge_backlog", "Unacknowledged webhooks per channel, as the edge reports", backlog);
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

pub async fn serve(addr: SocketAddr, status: Status, shutdown: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the metrics listener; metrics disabled");
            return;
        }
    };
    let app = Router::new().route("/metrics", get(scrape)).with_state(status);
    tracing::info!(%addr, "agent metrics on /metrics");
    let held = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the cap, a new connection is closed at once.
        let Ok(slot) = held.clone().try_acquire_owned() else { continue };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { tower::ServiceExt::oneshot(app, req).await }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()).http1_only();
            builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

/// Scrapers connected at once.
const METRICS_CONNECTIONS: usize = 16;
/// Time a scraper has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a scrape connection is kept.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

async fn scrape(State(status): State<Status>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        render(&status.get(), now_ms()),
    )
}
