//! A real local HTTP endpoint that records every request it gets and
//! answers with a status the test controls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use tokio_util::sync::CancellationToken;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub relay_id: String,
    pub attempt: u32,
    pub body: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Status the receiver answered.
    pub answered: u16,
}

#[derive(Default)]
struct Inner {
    log: Mutex<Vec<Delivery>>,
    status: AtomicU16,
    delay_ms: AtomicU64,
    /// Requests being handled (waiting out the delay) right now.
    in_flight: AtomicUsize,
    /// Statuses for the next requests, before `status` applies again.
    script: Mutex<std::collections::VecDeque<u16>>,
}

/// A running server: its stop token and task.
type Server = (CancellationToken, tokio::task::JoinHandle<()>);

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// Stops the server (closing its port) when cancelled.
    running: Arc<Mutex<Option<Server>>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner { status: AtomicU16::new(200), ..Default::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let r = Self { addr, inner, running: Arc::new(Mutex::new(None)) };
        r.serve(listener);
        r
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new().route("/{*path}", any(handle)).with_state(self.inner.clone());
        let token = CancellationToken::new();
        let stop = token.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        if let Ok(mut running) = self.running.lock() {
            *running = Some((token, task));
        }
    }

    /// Closes the port: connections are refused until [`Receiver::resume`].
    pub async fn stop(&self) {
        let running = self.running.lock().ok().and_then(|mut r| r.take());
        if let Some((token, task)) = running {
            token.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind receiver port");
        self.serve(listener);
    }

    /// The next requests get these statuses, in order; then `answer` applies.
    pub fn script(&self, statuses: &[u16]) {
        if let Ok(mut s) = self.inner.script.lock() {
            s.extend(statuses.iter().copied());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// Status for the following requests.
    pub fn answer(&self, status: u16) {
        self.inner.status.store(status, Ordering::SeqCst);
    }

    /// Delay before answering the following requests.
    pub fn delay(&self, d: Duration) {
        self.inner.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Deliveries answered 2xx.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.deliveries().into_iter().filter(|d| (200..300).contains(&d.answered)).collect()
    }

    /// Distinct `X-Relay-Id`s answered 2xx.
    pub fn distinct_accepted(&self) -> usize {
        self.accepted().iter().map(|d| d.relay_id.clone()).collect::<std::collections::HashSet<_>>().len()
    }

    /// Requests received and not answered yet (e.g. waiting out a delay).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.inner.log.lock().map(|l| l.len()).unwrap_or(0)
    }
}

/// Counts a request in flight until it is answered or dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let _in_flight = InFlight::enter(&inner.in_flight);
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let scripted = inner.script.lock().ok().and_then(|mut s| s.pop_front());
    let answered = scripted.unwrap_or_else(|| inner.status.load(Ordering::SeqCst));
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let d = Delivery {
        relay_id: get("x-relay-id"),
        attempt: get("x-relay-attempt").parse().unwrap_or(0),
        body: body.to_vec(),
        headers: headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
        answered,
    };
    if let Ok(mut log) = inner.log.lock() {
        log.push(d);
    }
    StatusCode::from_u16(answered).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
