//! A real local HTTP endpoint that records every request it gets and
//! answers with a status the test controls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;

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
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner { status: AtomicU16::new(200), ..Default::default() });
        let app = Router::new().route("/{*path}", any(handle)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
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

    pub fn count(&self) -> usize {
        self.inner.log.lock().map(|l| l.len()).unwrap_or(0)
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let answered = inner.status.load(Ordering::SeqCst);
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
