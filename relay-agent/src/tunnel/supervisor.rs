//! Reconnect loop, apart from the session: connect, run a session, and on
//! any end wait a capped, jittered, growing delay before trying again —
//! forever, until shutdown. A session that stayed up resets the backoff.
//!
//! Deliveries outlive sessions (the [`Pipeline`] is kept across them): a
//! local POST that finishes after the link dropped is acked on the next
//! session, so a reconnect does not turn into a duplicate POST.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::connect::Connector;
use super::session;
use crate::backoff;
use crate::config::AgentConfig;
use crate::deliver::Deliverer;
use crate::error::SessionError;
use crate::pipeline::Pipeline;
use crate::status::{Status, now_ms};

pub async fn run(cfg: Arc<AgentConfig>, status: Status, shutdown: CancellationToken) {
    let connector = match Connector::new(&cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the tunnel client");
            status.update(|s| {
                s.last_error = Some(e.to_string());
                s.last_error_at_ms = Some(now_ms());
            });
            shutdown.cancelled().await;
            return;
        }
    };
    let deliverer = match Deliverer::new(&cfg) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the local HTTP client");
            shutdown.cancelled().await;
            return;
        }
    };
    let mut pipeline = Pipeline::new(deliverer, &cfg);
    let mut failures: u32 = 0;
    let mut first_attempt = true;
    let mut first = true;
    while !shutdown.is_cancelled() {
        if !first {
            status.update(|s| s.reconnects += 1);
        }
        first = false;
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(cfg.connect_timeout, connector.connect()) => r,
        };
        if first_attempt {
            // systemd (Type=notify): ready after the first connection attempt.
            first_attempt = false;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        let end = match result {
            Err(_) => Err(SessionError::ConnectTimeout(cfg.connect_timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok((ws, addr))) => session::run(ws, addr, &cfg, &mut pipeline, &status, &shutdown).await,
        };
        status.update(|s| {
            s.connected = false;
            s.session = None;
        });
        match &end {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::info!("tunnel closed by the edge; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "tunnel down; reconnecting");
                let msg = e.to_string();
                status.update(|s| {
                    s.last_error = Some(msg);
                    s.last_error_at_ms = Some(now_ms());
                });
            }
        }
        if started.elapsed() >= cfg.reconnect.reset_after {
            failures = 0;
        }
        let edge_restarting = matches!(&end, Err(SessionError::Refused { code, .. }) if code == "shutdown");
        let wait = if edge_restarting {
            // The edge said it is going away (restart, deploy): come back at
            // once, spread over a short jitter, without growing the backoff.
            failures = 0;
            backoff::delay(1, Duration::from_millis(200), 1.0, Duration::from_millis(200))
        } else {
            failures = failures.saturating_add(1);
            backoff::delay(failures, cfg.reconnect.initial_delay, 2.0, cfg.reconnect.max_delay)
        };
        tracing::debug!(?wait, failures, "waiting before reconnect");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Let running local deliveries finish briefly; their acks are lost with
    // the link, and the edge redelivers them to the next agent session.
    pipeline.wind_down(Duration::from_secs(2)).await;
}
