//! The fault-injection harness: the real `relay-edge` and `relay-agent`
//! binaries as processes (configs written to a temp dir), a steady
//! workload of unique webhooks, and the end-to-end invariant.
//!
//! Processes are stopped only by their own PID: `kill -9` (`Child::kill`)
//! or `kill -TERM <pid>`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::{Certs, KEY, Receiver, bin};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// One binary run as a process, restartable with the same config.
pub struct Proc {
    name: &'static str,
    config: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn start(name: &'static str, config: &Path) -> Self {
        let mut p = Self { name, config: config.to_path_buf(), child: None };
        p.restart();
        p
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} still running", self.name);
        let child = Command::new(bin(self.name))
            .arg("--config")
            .arg(&self.config)
            .env_remove("RELAY_CONFIG")
            .env("RUST_LOG", std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "error".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        self.child = Some(child);
    }

    /// `kill -9`: no goodbye, nothing flushed.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// `kill -TERM <pid>` and wait for a clean exit.
    pub async fn sigterm(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id().expect("running").to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill").success();
        assert!(ok, "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(20), c.wait()).await.expect("exits in time").expect("wait");
        assert!(exit.success(), "{} exits cleanly on SIGTERM, got {exit:?}", self.name);
    }
}

/// Ports and files of one edge.
#[derive(Clone)]
pub struct EdgeSpec {
    pub ingest: u16,
    pub tunnel: u16,
    pub admin: u16,
    pub config: PathBuf,
}

impl EdgeSpec {
    pub fn hook_url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/hooks", self.ingest)
    }
}

/// Writes an edge config with the `[store]` lines `store` (see
/// [`crate::Backing::toml`]) and the visibility timeout `reclaim_after`
/// (e.g. `"3s"`).
pub fn write_edge(certs: &Certs, name: &str, store: &str, reclaim_after: &str) -> EdgeSpec {
    let d = certs.dir.path().display();
    let spec = EdgeSpec {
        ingest: free_port(),
        tunnel: free_port(),
        admin: free_port(),
        config: certs.dir.path().join(format!("{name}.toml")),
    };
    let text = format!(
        r#"
[ingest]
listen = "127.0.0.1:{ingest}"
rate_per_ip = 0
rate_per_key = 0
request_timeout = "5s"
[tunnel]
listen = "127.0.0.1:{tunnel}"
cert = "{d}/edge.pem"
key = "{d}/edge-key.pem"
client_ca = "{d}/ca.pem"
heartbeat = "300ms"
retry_delay = "100ms"
reclaim_after = "{reclaim_after}"
[admin]
listen = "127.0.0.1:{admin}"
[store]
{store}
block = "500ms"
command_timeout = "1s"
[[route]]
name = "hooks"
channels = ["crm"]
api_keys = ["{KEY}"]
[[agent]]
name = "lan-1"
channels = ["crm"]
[[agent]]
name = "lan-2"
channels = ["crm"]
"#,
        ingest = spec.ingest,
        tunnel = spec.tunnel,
        admin = spec.admin,
    );
    std::fs::write(&spec.config, text).expect("write edge config");
    spec
}

/// Writes an agent config for identity `name` dialing `tunnel_port`;
/// `extra` lines go at the top level. Returns (config, status socket).
pub fn write_agent(certs: &Certs, name: &str, tunnel_port: u16, target: &str, extra: &str) -> (PathBuf, PathBuf) {
    let d = certs.dir.path().display();
    let config = certs.dir.path().join(format!("{name}-agent.toml"));
    let socket = certs.dir.path().join(format!("{name}-agent.sock"));
    let text = format!(
        r#"
edge = "wss://127.0.0.1:{tunnel_port}"
cert = "{d}/{name}.pem"
key = "{d}/{name}-key.pem"
ca = "{d}/ca.pem"
status_socket = "{socket}"
heartbeat = "300ms"
request_timeout = "2s"
{extra}
[reconnect]
initial_delay = "50ms"
max_delay = "500ms"
[retry]
initial_delay = "50ms"
max_delay = "500ms"
[[target]]
channel = "crm"
url = "{target}"
"#,
        socket = socket.display(),
    );
    std::fs::write(&config, text).expect("write agent config");
    (config, socket)
}

/// Steady senders posting unique webhooks, recording every `200`.
pub struct Workload {
    /// webhook id → sha256 of the body it carried
    pub accepted: Arc<Mutex<HashMap<String, String>>>,
    pub refused: Arc<Mutex<u64>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// `senders` tasks per URL, each posting every `every`, with bodies of
    /// `body_bytes` bytes carrying `x-body-sha256`.
    pub fn start(urls: &[String], senders: usize, every: Duration, body_bytes: usize) -> Self {
        use sha2::Digest;
        let accepted: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let refused: Arc<Mutex<u64>> = Arc::default();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (u, url) in urls.iter().enumerate() {
            for s in 0..senders {
                let (accepted, refused, stop, url) = (accepted.clone(), refused.clone(), stop.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
                    let mut i = 0u64;
                    while !stop.is_cancelled() {
                        i += 1;
                        let mut body = format!("{{\"u\":{u},\"s\":{s},\"i\":{i},\"pad\":\"").into_bytes();
                        while body.len() + 2 < body_bytes {
                            body.push(b'a' + (body.len() % 26) as u8);
                        }
                        body.extend_from_slice(b"\"}");
                        let hash = hex::encode(sha2::Sha256::digest(&body));
                        let r = client
                            .post(&url)
                            .header("x-api-key", KEY)
                            .header("x-body-sha256", &hash)
                            .body(body)
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 200 => {
                                let v: serde_json::Value =
                                    serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or_default();
                                if let (Some(id), Ok(mut a)) = (v["webhook_id"].as_str(), accepted.lock()) {
                                    a.insert(id.to_string(), hash);
                                }
                            }
                            _ => {
                                if let Ok(mut n) = refused.lock() {
                                    *n += 1;
                                }
                            }
                        }
                        tokio::time::sleep(every).await;
                    }
                }));
            }
        }
        Self { accepted, refused, stop, tasks }
    }

    pub async fn stop(self) -> (HashMap<String, String>, u64) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let accepted = self.accepted.lock().map(|a| a.clone()).unwrap_or_default();
        let refused = self.refused.lock().map(|r| *r).unwrap_or_default();
        (accepted, refused)
    }
}

/// What a scenario ended with.
#[derive(Debug)]
pub struct Report {
    pub accepted: usize,
    pub refused: u64,
    pub deliveries: usize,
    pub duplicates: usize,
    pub wait_ms: u128,
}

/// The invariant: every webhook answered 200 was delivered (body intact),
/// nothing is left pending, nothing is in the DLQ (as the edge answering
/// on `admin` reports it). Waits up to `within`.
pub async fn check_invariant(
    admin: u16,
    rx: &Receiver,
    accepted: &HashMap<String, String>,
    refused: u64,
    within: Duration,
) -> Report {
    let started = std::time::Instant::now();
    loop {
        let got: HashSet<String> = rx.accepted().into_iter().map(|d| d.relay_id).collect();
        let missing = accepted.keys().filter(|id| !got.contains(*id)).count();
        if missing == 0 {
            break;
        }
        assert!(
            started.elapsed() < within,
            "{missing} of {} webhooks answered 200 were never delivered",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wait_ms = started.elapsed().as_millis();
    let deliveries = rx.accepted();
    for d in &deliveries {
        if let Some(expected) = accepted.get(&d.relay_id) {
            let header = d.headers.iter().find(|(k, _)| k == "x-body-sha256").map(|(_, v)| v.clone());
            assert_eq!(header.as_deref(), Some(expected.as_bytes()), "headers intact for {}", d.relay_id);
            use sha2::Digest;
            assert_eq!(&hex::encode(sha2::Sha256::digest(&d.body)), expected, "body intact for {}", d.relay_id);
        }
    }
    let distinct: HashSet<&str> = deliveries.iter().map(|d| d.relay_id.as_str()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let n = admin_pending(admin, "crm").await;
        if n == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "entries still pending: {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_dlq_total(admin, "crm").await, 0, "nothing dead-lettered");
    Report {
        accepted: accepted.len(),
        refused,
        deliveries: deliveries.len(),
        duplicates: deliveries.len() - distinct.len(),
        wait_ms,
    }
}

/// Waits until the agent answering on `socket` reports a live session.
pub async fn wait_connected(socket: &Path) {
    let socket = socket.to_path_buf();
    crate::wait_until(Duration::from_secs(15), "agent connected", || {
        relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected)
    })
    .await;
}

async fn admin_get(admin: u16, path: &str) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{admin}{path}");
    let resp = reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = resp.bytes().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Pending entries of `channel` per the edge's `/health`.
pub async fn admin_pending(admin: u16, channel: &str) -> u64 {
    let health = admin_get(admin, "/health").await;
    health["channels"][channel]["pending"].as_u64().unwrap_or_else(|| panic!("no pending count in {health}"))
}

/// Dead letters of `channel` per the edge's admin API.
pub async fn admin_dlq_total(admin: u16, channel: &str) -> u64 {
    let list = admin_get(admin, &format!("/admin/dlq/{channel}")).await;
    list["total"].as_u64().unwrap_or_else(|| panic!("no total in {list}"))
}
