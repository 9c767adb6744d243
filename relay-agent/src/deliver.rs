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

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
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

/// Posts webhooks to the local targets over one keep-alive connection pool
/// (hyper's client: targets are plain `http://` on the LAN, so no TLS, no
/// redirects, no proxy; each target's URL is parsed once, at start).
pub struct Deliverer {
    client: Client<HttpConnector, Full<Bytes>>,
    targets: HashMap<String, Uri>,
    timeout: Duration,
    retry: RetryConfig,
}

/// Why a local request got no HTTP answer.
enum Failure {
    Refused,
    TimedOut,
    Other(String),
}

impl Deliverer {
    pub fn new(cfg: &AgentConfig) -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5).min(cfg.request_timeout)));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(cfg.window as usize).build(connector);
        let mut targets = HashMap::new();
        for t in &cfg.targets {
            let uri = t.url.parse::<Uri>().map_err(|e| format!("target url `{}` is not a URL: {e}", t.url))?;
            targets.insert(t.channel.clone(), uri);
        }
        Ok(Self { client, targets, timeout: cfg.request_timeout, retry: cfg.retry.clone() })
    }

    pub async fn deliver(&self, channel: &str, attempt: u32, webhook: &Webhook) -> Verdict {
        let Some(uri) = self.targets.get(channel) else {
            return Verdict::DeadLetter {
                reason: format!("no target configured for channel `{channel}`"),
                status: None,
            };
        };
        let req = request(uri, channel, attempt, webhook);
        let posted = tokio::time::timeout(self.timeout, self.post(req)).await.unwrap_or(Err(Failure::TimedOut));
        let outcome = match posted {
            Ok((status, retry_after)) => classify(status, retry_after),
            Err(Failure::Other(reason)) => Err((reason, None, None)),
            Err(down) => {
                let (reason, refused) = match down {
                    Failure::Refused => ("local endpoint refused the connection", true),
                    _ => ("local endpoint timed out", false),
                };
                return Verdict::Down { reason: reason.into(), refused, after: self.backoff(attempt) };
            }
        };
        match outcome {
            Ok(v) => v,
            Err((reason, status, retry_after)) if attempt < self.retry.max_attempts => {
                let after = retry_after.unwrap_or_else(|| self.backoff(attempt)).min(self.retry.max_delay);
                Verdict::Retry { reason, status, after }
            }
            Err((reason, status, _)) => {
                Verdict::DeadLetter { reason: format!("gave up after {attempt} attempts: {reason}"), status }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        backoff::delay(attempt, self.retry.initial_delay, self.retry.multiplier, self.retry.max_delay)
    }

    /// Sends the request and reads the whole answer (so the connection goes
    /// back to the pool): status and `Retry-After` seconds.
    async fn post(&self, req: Request<Full<Bytes>>) -> Result<(u16, Option<Duration>), Failure> {
        let resp = self.client.request(req).await.map_err(|e| {
            if !e.is_connect() {
                Failure::Other(format!("local request failed: {}", chain(&e)))
            } else if timed_out(&e) {
                Failure::TimedOut
            } else {
                Failure::Refused
            }
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        resp.into_body()
            .collect()
            .await
            .map_err(|e| Failure::Other(format!("local request failed: reading the answer: {}", chain(&e))))?;
        Ok((status, retry_after))
    }
}

/// The local request: the webhook's method, headers and body (a cheap
/// reference-counted clone) plus the relay's own headers.
fn request(uri: &Uri, channel: &str, attempt: u32, webhook: &Webhook) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(webhook.body.clone()));
    *req.method_mut() = Method::from_bytes(webhook.method.as_bytes()).unwrap_or(Method::POST);
    *req.uri_mut() = uri.clone();
    let headers = req.headers_mut();
    headers.reserve(webhook.headers.len() + 3);
    for h in &webhook.headers {
        if SKIP.contains(&h.name.as_str()) || h.name.starts_with("x-relay-") {
            continue;
        }
        // The edge stored what its HTTP parser accepted, so both are valid;
        // a header that is not (a hand-made stream entry) is left out.
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(&h.value)) {
            headers.append(name, value);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&webhook.id) {
        headers.insert(HeaderName::from_static("x-relay-id"), v);
    }
    headers.insert(HeaderName::from_static("x-relay-attempt"), HeaderValue::from(attempt));
    if let Ok(v) = HeaderValue::from_str(channel) {
        headers.insert(HeaderName::from_static("x-relay-channel"), v);
    }
    req
}

/// An error and its causes, outermost first.
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// A connect error caused by the connect timeout (not a refusal).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut))
}

/// An error with its causes, `outer: inner: …`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e).map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

type Retryable = (String, Option<u16>, Option<Duration>);

fn classify(status: u16, retry_after: Option<Duration>) -> Result<Verdict, Retryable> {
    match status {
        200..=299 => Ok(Verdict::Ack { status }),
        408 | 429 | 500..=599 => Err((format!("local endpoint answered {status}"), Some(status), retry_after)),
        _ => Ok(Verdict::DeadLetter { reason: format!("local endpoint answered {status}"), status: Some(status) }),
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
