//! Dev-only harness for the relay's integration tests: a real
//! `redis-server` on a free loopback port in a temp dir (killed on drop),
//! throwaway certificates, the real edge and agent run in-process on
//! `127.0.0.1:0`, and a recording HTTP receiver.
#![forbid(unsafe_code)]

pub mod backing;
pub mod haproxy;
pub mod procs;
pub mod proxy;
pub mod receiver;
pub mod redis_cluster;
pub mod redis_server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use relay_agent::AgentConfig;
use relay_edge::EdgeConfig;
use relay_edge::config::{AgentGrant, RouteConfig, Secret};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use backing::Backing;
pub use proxy::{FaultProxy, Mode};
pub use receiver::{Delivery, Receiver};
pub use redis_cluster::RedisCluster;
pub use redis_server::RedisServer;

/// API key of the test route `hooks` (channel `crm`) and the legacy route.
pub const KEY: &str = "test-key-0001";

/// Logs for tests: `RUST_LOG=debug cargo test` shows the relay's logs.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A CA, the edge certificate and agent certificates, in a temp dir.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    /// CA + edge (`localhost`, `127.0.0.1`) + agents `lan-1`, `lan-2`,
    /// `lan-3`, plus a second, unrelated CA in `rogue/` with its own `lan-1`.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        relay_edge::certs::init(dir.path(), &["localhost".into(), "127.0.0.1".into()], false).expect("certs init");
        for a in ["lan-1", "lan-2", "lan-3"] {
            relay_edge::certs::agent(dir.path(), a).expect("agent cert");
        }
        let rogue = dir.path().join("rogue");
        relay_edge::certs::init(&rogue, &["localhost".into()], false).expect("rogue init");
        relay_edge::certs::agent(&rogue, "lan-1").expect("rogue agent");
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// Webhook `n` of route `hooks`, as ingest would store it: for tests that
/// write to a store directly.
pub fn webhook(n: usize) -> relay_protocol::Webhook {
    relay_protocol::Webhook {
        id: format!("wh-{n}"),
        method: "POST".into(),
        path: "/hooks/hooks".into(),
        query: String::new(),
        headers: vec![relay_protocol::Header { name: "content-type".into(), value: b"application/json".to_vec() }],
        body: format!("{{\"n\":{n}}}").into_bytes().into(),
        route: "hooks".into(),
        received_at_ms: relay_edge::store::now_ms(),
        client_ip: "127.0.0.1".into(),
    }
}

/// Edge config for tests: fast heartbeats, route `hooks` → `crm`, the
/// legacy route → `default`, agents `lan-1`/`lan-2` granted `crm` and
/// `default`, `lan-3` granted only `other`.
pub fn edge_config(store: &Backing, certs: &Certs) -> EdgeConfig {
    let mut cfg = EdgeConfig::default();
    cfg.ingest.listen = "127.0.0.1:0".into();
    cfg.tunnel.listen = "127.0.0.1:0".into();
    cfg.admin.listen = "127.0.0.1:0".into();
    // No token: the admin API is open to loopback (tests of the generated
    // token run the binary).
    cfg.admin.token_file = Some(PathBuf::new());
    cfg.tunnel.cert = certs.path("edge.pem");
    cfg.tunnel.key = certs.path("edge-key.pem");
    cfg.tunnel.client_ca = certs.path("ca.pem");
    cfg.tunnel.heartbeat = Duration::from_millis(300);
    cfg.tunnel.handshake_timeout = Duration::from_secs(5);
    cfg.tunnel.reclaim_after = Duration::from_secs(3);
    cfg.tunnel.retry_delay = Duration::from_millis(100);
    store.apply(&mut cfg.store);
    cfg.store.block = Duration::from_millis(500);
    cfg.store.command_timeout = Duration::from_secs(2);
    cfg.routes = vec![
        RouteConfig {
            name: "hooks".into(),
            channels: vec!["crm".into()],
            api_keys: vec![Secret::new(KEY)],
            verify_token: Some(Secret::new("verify-me")),
            ..Default::default()
        },
        RouteConfig {
            name: relay_edge::config::LEGACY_ROUTE.into(),
            channels: vec![relay_edge::config::LEGACY_CHANNEL.into()],
            api_keys: vec![Secret::new(KEY)],
            ..Default::default()
        },
    ];
    cfg.agents = vec![
        AgentGrant { name: "lan-1".into(), channels: vec!["crm".into(), "default".into()] },
        AgentGrant { name: "lan-2".into(), channels: vec!["crm".into(), "default".into()] },
        AgentGrant { name: "lan-3".into(), channels: vec!["other".into()] },
    ];
    cfg.validate().expect("test edge config is valid");
    cfg
}

/// Agent config for tests: identity `name`, fast heartbeats and reconnects.
pub fn agent_config(edge: &Edge, certs: &Certs, name: &str, targets: &[(&str, String)]) -> AgentConfig {
    let mut cfg = AgentConfig {
        edge: format!("wss://127.0.0.1:{}", edge.tunnel.port()),
        cert: certs.path(&format!("{name}.pem")),
        key: certs.path(&format!("{name}-key.pem")),
        ca: certs.path("ca.pem"),
        status_socket: certs.path(&format!("{name}-{}.sock", unique())),
        heartbeat: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    cfg.reconnect.initial_delay = Duration::from_millis(50);
    cfg.reconnect.max_delay = Duration::from_millis(500);
    cfg.retry.initial_delay = Duration::from_millis(50);
    cfg.retry.max_delay = Duration::from_millis(500);
    cfg.targets =
        targets.iter().map(|(c, u)| relay_agent::config::Target { channel: c.to_string(), url: u.clone() }).collect();
    cfg.validate().expect("test agent config is valid");
    cfg
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 1000
}

/// The listening addresses of an edge.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub ingest: SocketAddr,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
}

/// A running in-process edge.
pub struct Edge {
    pub ingest: SocketAddr,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<EdgeConfig>,
    task: JoinHandle<()>,
}

impl Edge {
    /// Applies a new configuration like SIGHUP does, and returns once it is
    /// in force. The edge takes one configuration at a time (a channel of
    /// one) and applies it before it takes the next: so once it took a copy
    /// sent after `cfg`, `cfg` is applied. (The copy is applied too, which
    /// changes nothing: it is the same configuration.)
    pub async fn reload(&self, cfg: EdgeConfig) {
        self.reload.send(cfg.clone()).await.expect("edge running");
        // A slot is free once the edge took `cfg`: it is applying it now.
        let fence = self.reload.reserve().await.expect("edge running");
        fence.send(cfg);
        // Free again once it took the copy: it had finished with `cfg`.
        drop(self.reload.reserve().await.expect("edge running"));
    }

    pub async fn start(cfg: EdgeConfig) -> Self {
        cfg.validate().expect("valid edge config");
        let listeners = relay_edge::Listeners::bind(&cfg).await.expect("bind edge listeners");
        let (ingest, tunnel, admin) = listeners.addrs();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            relay_edge::run(cfg, listeners, token, reload_rx).await.expect("edge runs");
        });
        Self { ingest, tunnel, admin, shutdown, reload, task }
    }

    /// Starts on the addresses a stopped edge had (for restart tests).
    pub async fn start_at(mut cfg: EdgeConfig, at: Addrs) -> Self {
        cfg.ingest.listen = at.ingest.to_string();
        cfg.tunnel.listen = at.tunnel.to_string();
        cfg.admin.listen = at.admin.to_string();
        Self::start(cfg).await
    }

    /// Graceful stop: cancels and waits for the edge to drain. Returns
    /// its addresses so it can be started again on them.
    pub async fn stop(self) -> Addrs {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        Addrs { ingest: self.ingest, tunnel: self.tunnel, admin: self.admin }
    }

    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhook", self.ingest)
    }

    pub fn hook_url(&self, route: &str) -> String {
        format!("http://{}/hooks/{route}", self.ingest)
    }
}

/// A running in-process agent.
pub struct Agent {
    pub socket: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Agent {
    pub fn start(cfg: AgentConfig) -> Self {
        let socket = cfg.status_socket.clone();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            relay_agent::run(cfg, token).await.expect("agent runs");
        });
        Self { socket, shutdown, task }
    }

    /// Like `kill -9`: aborts the agent and every local request it had
    /// running, with no goodbye to the edge.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    pub fn status(&self) -> Result<relay_agent::status::Snapshot, String> {
        relay_agent::status::client::query(&self.socket)
    }

    /// Waits until the agent reports a live session.
    pub async fn wait_connected(&self, within: Duration) {
        let socket = self.socket.clone();
        wait_until(within, "agent connected", || {
            relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected)
        })
        .await;
    }
}

/// An in-process edge with `cfg`, and agent `name` connected to it that
/// delivers channel `crm` to a fresh [`Receiver`].
pub async fn edge_with_agent(cfg: EdgeConfig, certs: &Certs, name: &str) -> (Edge, Agent, Receiver) {
    let rx = Receiver::start().await;
    let edge = Edge::start(cfg).await;
    let agent = Agent::start(agent_config(&edge, certs, name, &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    (edge, agent, rx)
}

/// Path of a workspace binary (built by `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.is_file(), "{} not built: run the workspace tests (`./scripts/test.sh`)", path.display());
    path
}

/// Runs `relay-edge <args>` against `edge`'s admin API; returns (exit code, stdout, stderr).
pub async fn edge_cli(edge: &Edge, args: &[&str]) -> (i32, String, String) {
    let admin = edge.admin.to_string();
    let mut all = args.to_vec();
    all.extend(["--admin", &admin]);
    run_bin("relay-edge", &all).await
}

/// Runs a workspace binary; returns (exit code, stdout, stderr).
pub async fn run_bin(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(bin(name))
        .args(args)
        .env_remove("RELAY_CONFIG")
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `cond` every 20 ms until it holds, or panics after `within`.
pub async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(within, what, || std::future::ready(cond())).await
}

/// Like [`wait_until`], for a condition that must await (the store, an
/// HTTP endpoint): polls `cond` every 20 ms until it holds, or panics
/// after `within`. The condition is what a test waits for, never a clock.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts a webhook with `X-API-Key`; returns status and JSON answer.
pub async fn post(client: &reqwest::Client, url: &str, key: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let resp = client
        .post(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post webhook");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// Number of entries pending (delivered, unacked) on a channel.
pub async fn pending(store: &Backing, channel: &str) -> u64 {
    store.snapshot(channel).await.stats.pending
}

/// Waits (up to 10 s) until no entry of `channel` is pending, and asserts it.
pub async fn assert_drained(store: &Backing, channel: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = pending(store, channel).await;
        if n == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} entries still pending on `{channel}`");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Length of a channel's stream (`kind` = "stream") or DLQ (`kind` = "dlq").
pub async fn xlen(store: &Backing, channel: &str, kind: &str) -> u64 {
    let snap = store.snapshot(channel).await;
    match kind {
        "stream" => snap.length,
        "dlq" => snap.dlq_length,
        other => panic!("xlen of `{other}`: use stream or dlq"),
    }
}

/// A hand-driven tunnel session, for tests that misbehave on purpose.
pub mod raw {
    use futures_util::{SinkExt, StreamExt};
    use relay_agent::tunnel::connect::{Connector, Ws};
    use relay_protocol::{Frame, Limits};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    /// Connects with `cert` (a file stem in the certs dir, or `rogue/lan-1`).
    pub async fn connect(edge: &Edge, certs: &Certs, cert: &str) -> Result<Ws, String> {
        let mut cfg = agent_config(edge, certs, "lan-1", &[("crm", "http://127.0.0.1:9/".into())]);
        cfg.cert = certs.path(&format!("{cert}.pem"));
        cfg.key = certs.path(&format!("{cert}-key.pem"));
        let connector = Connector::new(&cfg).map_err(|e| e.to_string())?;
        connector.connect().await.map(|(ws, _)| ws).map_err(|e| e.to_string())
    }

    pub async fn send(ws: &mut Ws, frame: &Frame) -> Result<(), String> {
        let bytes = relay_protocol::encode(frame, &Limits::default()).map_err(|e| e.to_string())?;
        ws.send(Message::Binary(bytes.into())).await.map_err(|e| e.to_string())
    }

    /// Next frame, `Ok(None)` on close, `Err` on a transport error.
    pub async fn recv(ws: &mut Ws) -> Result<Option<Frame>, String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Err(_) => return Err("timed out".into()),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(Message::Binary(b)))) => {
                    return relay_protocol::decode(&b, &Limits::default()).map(Some).map_err(|e| e.to_string());
                }
                Ok(Some(Ok(Message::Close(_)))) => return Ok(None),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads frames until an `Error` (returned) or the end of the session.
    pub async fn recv_error(ws: &mut Ws) -> Option<(String, String)> {
        loop {
            match recv(ws).await {
                Ok(Some(Frame::Error { code, message })) => return Some((code, message)),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Hello with window 0 (receives nothing) and waits for Welcome.
    pub async fn hello_idle(ws: &mut Ws, channels: Option<Vec<String>>) -> Result<Frame, String> {
        send(
            ws,
            &Frame::Hello {
                version: relay_protocol::VERSION,
                window: 0,
                channels,
                agent_version: None,
                named_acks: true,
            },
        )
        .await?;
        recv(ws).await?.ok_or_else(|| "closed".to_string())
    }

    pub async fn send_raw(ws: &mut Ws, msg: Message) -> Result<(), String> {
        ws.send(msg).await.map_err(|e| e.to_string())
    }
}
