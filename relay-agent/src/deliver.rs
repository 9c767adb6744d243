//! Local delivery: POST the webhook to the channel's target with its
//! original headers and raw body, plus `X-Relay-Id` / `X-Relay-Attempt`,
//! and report how it went ([`Posted`]). What that means (ack, retry, park,
//! dead-letter) is decided by `pipeline::verdict`.

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

use crate::config::AgentConfig;

/// Headers not forwarded: hop-by-hop and ones the HTTP client sets itself;
/// also [`relay_protocol::SENDER_HEADERS`], and `X-Relay-*` (the relay's own).
const SKIP: &[&str] = &["host", "content-length", "connection", "transfer-encoding", "keep-alive", "te", "upgrade"];

/// Most bytes of a local answer read: only its status and `Retry-After`
/// count, the rest is read so the connection can be reused. A longer
/// answer is cut off (its connection closed).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How one local POST went; `pipeline::verdict` decides what it means.
#[derive(Debug, Clone, PartialEq)]
pub enum Posted {
    /// The endpoint answered (any status), with its `Retry-After` seconds.
    Answered { status: u16, retry_after: Option<Duration> },
    /// Connection refused.
    Refused,
    /// No answer within `request_timeout` (or the connect timeout).
    TimedOut,
    /// Another transport error.
    Failed(String),
    /// The channel has no target in this agent's config.
    NoTarget(String),
}

/// Posts webhooks to the local targets over one keep-alive connection pool
/// (hyper's client: targets are plain `http://` on the LAN, so no TLS, no
/// redirects, no proxy; each target's URL is parsed once, at start).
pub struct Deliverer {
    client: Client<HttpConnector, Full<Bytes>>,
    targets: HashMap<String, Uri>,
    timeout: Duration,
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
        Ok(Self { client, targets, timeout: cfg.request_timeout })
    }

    pub async fn post(&self, channel: &str, attempt: u32, webhook: &Webhook) -> Posted {
        let Some(uri) = self.targets.get(channel) else {
            return Posted::NoTarget(format!("no target configured for channel `{channel}`"));
        };
        let req = request(uri, channel, attempt, webhook);
        match tokio::time::timeout(self.timeout, self.send(req)).await.unwrap_or(Err(Failure::TimedOut)) {
            Ok((status, retry_after)) => Posted::Answered { status, retry_after },
            Err(Failure::Refused) => Posted::Refused,
            Err(Failure::TimedOut) => Posted::TimedOut,
            Err(Failure::Other(reason)) => Posted::Failed(reason),
        }
    }

    /// Sends the request and reads the whole answer (so the connection goes
    /// back to the pool): status and `Retry-After` seconds.
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(u16, Option<Duration>), Failure> {
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
        let mut body = resp.into_body();
        let mut read = 0;
        while read <= MAX_ANSWER_BYTES {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => {
                    return Err(Failure::Other(format!("local request failed: reading the answer: {}", chain(&e))));
                }
            }
        }
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
    // The four `x-relay-*` below, and the `host` and `content-length`
    // hyper adds: the map never grows on the way out.
    headers.reserve(webhook.headers.len() + 6);
    for h in &webhook.headers {
        let name = h.name.as_str();
        if SKIP.contains(&name) || relay_protocol::SENDER_HEADERS.contains(&name) || name.starts_with("x-relay-") {
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
    // From the edge's own field: never a header some sender set.
    if let Ok(v) = HeaderValue::from_str(&webhook.client_ip)
        && !webhook.client_ip.is_empty()
    {
        headers.insert(HeaderName::from_static("x-relay-client-ip"), v);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A local app that answers an endless body: the status counts, and the
    /// agent stops reading after [`MAX_ANSWER_BYTES`] instead of waiting
    /// for (or buffering) the rest.
    #[tokio::test]
    async fn an_endless_answer_is_cut_off_and_its_status_counts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let endless = || async {
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let stream = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            axum::body::Body::from_stream(stream)
        };
        let app = axum::Router::new().route("/", axum::routing::post(endless));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cfg = AgentConfig {
            request_timeout: Duration::from_secs(5),
            targets: vec![crate::config::Target { channel: "crm".into(), url: format!("http://{addr}/") }],
            ..Default::default()
        };
        let deliverer = Deliverer::new(&cfg).expect("deliverer");
        let webhook = Webhook { id: "w".into(), method: "POST".into(), ..Default::default() };
        let started = std::time::Instant::now();
        let posted = deliverer.post("crm", 1, &webhook).await;
        assert_eq!(posted, Posted::Answered { status: 200, retry_after: None });
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}
