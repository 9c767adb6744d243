//! A fast receiver and an HTTP/1.1 load generator with connection reuse.
//! The sender stamps `x-sent-us` (microseconds since the epoch) so the
//! receiver measures end-to-end latency from the sender's request start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Counts arrivals and keeps end-to-end latencies while `recording`.
#[derive(Default)]
pub struct Receiver {
    pub count: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    recording: std::sync::atomic::AtomicBool,
}

impl Receiver {
    pub async fn start() -> (Arc<Self>, SocketAddr) {
        let rx = Arc::new(Self::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let r = rx.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        async move {
                            let sent =
                                req.headers().get("x-sent-us").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                            let _ = req.into_body().collect().await;
                            r.count.fetch_add(1, Ordering::Relaxed);
                            if let Some(sent) = sent
                                && r.recording.load(Ordering::Relaxed)
                                && let Ok(mut l) = r.latencies.lock()
                            {
                                l.push(now_us().saturating_sub(sent));
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        (rx, addr)
    }

    pub fn record(&self, on: bool) {
        if on && let Ok(mut l) = self.latencies.lock() {
            l.clear();
        }
        self.recording.store(on, Ordering::Relaxed);
    }

    pub fn take_latencies(&self) -> Vec<u64> {
        self.latencies.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(conn)
}

/// A 1 KiB JSON body.
pub fn body_1k() -> Bytes {
    let mut s =
        String::from("{\"object\":\"whatsapp_business_account\",\"entry\":[{\"id\":\"102290129340398\",\"pad\":\"");
    while s.len() < 1024 - 4 {
        s.push('x');
    }
    s.push_str("\"}]}");
    Bytes::from(s)
}

fn request(url: &str, key: Option<&str>, body: &Bytes) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json").header("x-sent-us", now_us().to_string());
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Full::new(body.clone())).expect("request")
}

/// Result of a load run.
#[derive(Debug, Default)]
pub struct Run {
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    /// Request latencies of the `200`s, microseconds.
    pub latencies: Vec<u64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
}

/// `concurrency` tasks sending back to back for `secs`.
pub async fn closed_loop(client: &HttpClient, url: &str, key: Option<&str>, concurrency: usize, secs: f64) -> Run {
    let body = body_1k();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, key, body) = (client.clone(), url.to_string(), key.map(str::to_string), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.request(request(&url, key.as_deref(), &body)).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        run.ok += 1;
                        run.latencies.push(t.elapsed().as_micros() as u64);
                    }
                    Ok(resp) => {
                        let _ = resp.into_body().collect().await;
                        run.errors += 1;
                    }
                    Err(_) => run.errors += 1,
                }
            }
            run
        }));
    }
    let mut total = Run::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.ok += r.ok;
            total.errors += r.errors;
            total.latencies.extend(r.latencies);
        }
    }
    total.secs = started.elapsed().as_secs_f64();
    total
}

/// Fixed-rate sending for `secs` (requests start on schedule, whatever the
/// answers do), at most `max_in_flight` outstanding.
pub async fn open_loop(client: &HttpClient, url: &str, key: Option<&str>, rate: f64, secs: f64) -> Run {
    let body = body_1k();
    let total = (rate * secs) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let mut set = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..total {
        tick.tick().await;
        let (client, url, key, body) = (client.clone(), url.to_string(), key.map(str::to_string), body.clone());
        let (ok, errors, lat) = (ok.clone(), errors.clone(), lat.clone());
        set.spawn(async move {
            let t = Instant::now();
            match client.request(request(&url, key.as_deref(), &body)).await {
                Ok(resp) if resp.status() == 200 => {
                    let _ = resp.into_body().collect().await;
                    ok.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = lat.lock() {
                        l.push(t.elapsed().as_micros() as u64);
                    }
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    let latencies = lat.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
    Run {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs: started.elapsed().as_secs_f64(),
        latencies,
    }
}
