//! Local delivery: POST the webhook to the channel's target with its
//! original headers and raw body, plus `X-Relay-Id` / `X-Relay-Attempt`,
//! and classify the outcome.
//!
//! 2xx → ack. 408, 429, 5xx and other transport errors → retry with
//! backoff (honouring `Retry-After`). Any other status → dead letter at
//! once. Attempts exhausted → dead letter with the last outcome. Connection
//! refused and timeouts are reported as `Down`: the session decides whether
//! to pause the channel (see `tunnel::pause`).

use std::collections::HashMap;
use std::time::Duration;

use relay_protocol::Webhook;

use crate::backoff;
use crate::config::{AgentConfig, RetryConfig};

/// Headers not forwarded: hop-by-hop, and ones the HTTP client sets itself.
const SKIP: &[&str] = &["host", "content-length", "connection", "transfer-encoding", "keep-alive", "te", "upgrade"];

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ack {
        status: u16,
    },
    Retry {
        reason: String,
        status: Option<u16>,
        after: Duration,
    },
    /// The endpoint did not answer at all: connection refused (`refused`)
    /// or timed out. The session pauses the channel rather than burn attempts.
    Down {
        reason: String,
        refused: bool,
        after: Duration,
    },
    DeadLetter {
        reason: String,
        status: Option<u16>,
    },
}

pub struct Deliverer {
    client: reqwest::Client,
    targets: HashMap<String, String>,
    retry: RetryConfig,
}

impl Deliverer {
    pub fn new(cfg: &AgentConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(Duration::from_secs(5).min(cfg.request_timeout))
            .pool_max_idle_per_host(cfg.window as usize)
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            targets: cfg.targets.iter().map(|t| (t.channel.clone(), t.url.clone())).collect(),
            retry: cfg.retry.clone(),
        })
    }

    pub async fn deliver(&self, channel: &str, attempt: u32, webhook: &Webhook) -> Verdict {
        let Some(url) = self.targets.get(channel) else {
            return Verdict::DeadLetter {
                reason: format!("no target configured for channel `{channel}`"),
                status: None,
            };
        };
        let method = reqwest::Method::from_bytes(webhook.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        let mut req = self.client.request(method, url.as_str());
        for h in &webhook.headers {
            if SKIP.contains(&h.name.as_str()) || h.name.starts_with("x-relay-") {
                continue;
            }
            req = req.header(h.name.as_str(), h.value.as_slice());
        }
        let req = req
            .header("x-relay-id", webhook.id.as_str())
            .header("x-relay-attempt", attempt.to_string())
            .header("x-relay-channel", channel)
            .body(webhook.body.clone());
        let outcome = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // Drain the body so the connection can be reused.
                let _ = resp.bytes().await;
                classify(status, retry_after)
            }
            Err(e) if e.is_connect() || e.is_timeout() => {
                let after =
                    backoff::delay(attempt, self.retry.initial_delay, self.retry.multiplier, self.retry.max_delay);
                return Verdict::Down { reason: describe(&e), refused: e.is_connect(), after };
            }
            Err(e) => Err((describe(&e), None, None)),
        };
        match outcome {
            Ok(v) => v,
            Err((reason, status, retry_after)) if attempt < self.retry.max_attempts => {
                let backoff =
                    backoff::delay(attempt, self.retry.initial_delay, self.retry.multiplier, self.retry.max_delay);
                Verdict::Retry { reason, status, after: retry_after.unwrap_or(backoff).min(self.retry.max_delay) }
            }
            Err((reason, status, _)) => {
                Verdict::DeadLetter { reason: format!("gave up after {attempt} attempts: {reason}"), status }
            }
        }
    }
}

type Retryable = (String, Option<u16>, Option<Duration>);

fn classify(status: u16, retry_after: Option<Duration>) -> Result<Verdict, Retryable> {
    match status {
        200..=299 => Ok(Verdict::Ack { status }),
        408 | 429 | 500..=599 => Err((format!("local endpoint answered {status}"), Some(status), retry_after)),
        _ => Ok(Verdict::DeadLetter { reason: format!("local endpoint answered {status}"), status: Some(status) }),
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "local endpoint timed out".into()
    } else if e.is_connect() {
        "local endpoint refused the connection".into()
    } else {
        format!("local request failed: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_contract() {
        assert_eq!(classify(204, None), Ok(Verdict::Ack { status: 204 }));
        assert!(classify(500, None).is_err());
        assert!(classify(503, None).is_err());
        assert!(classify(408, None).is_err());
        assert!(classify(429, Some(Duration::from_secs(3))).is_err());
        assert!(matches!(classify(404, None), Ok(Verdict::DeadLetter { status: Some(404), .. })));
        assert!(matches!(classify(400, None), Ok(Verdict::DeadLetter { .. })));
    }
}
