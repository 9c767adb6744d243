//! The fault-injection harness: the real `relay-edge` and `relay-agent`
//! binaries as processes (configs written to a temp dir), a steady
//! workload of unique webhooks, and the end-to-end invariant. The bench
//! runs its release binaries with the same [`Proc`] and config writers
//! ([`EdgeOpts`], [`AgentOpts`] with `fast: false`).
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

/// A loopback port that is free now, for a child process to bind later.
///
/// Ports come from 10000–19999, below Linux's ephemeral range (32768+), so
/// no outgoing connection (a client, an agent, Redis) can take one between
/// this probe and the child's bind; and never twice in one test process.
/// A Redis Cluster node's bus port (`port + 10000`) stays below 30000, out
/// of this range too. The start offset comes from the PID, so test binaries
/// run one after another do not reuse each other's ports straight away.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % COUNT,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}–{}", FIRST + COUNT - 1)
}

/// One binary run as a process, restartable with the same config.
pub struct Proc {
    name: &'static str,
    /// The executable: the tests' build of `name` ([`crate::bin`]) unless
    /// [`Proc::start_bin`] named another (the bench's release build).
    bin: PathBuf,
    /// `RUST_LOG` of the process.
    log: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Runs the workspace binary `name` as the tests built it, logging at
    /// `RELAY_TEST_LOG` (default `error`).
    pub fn start(name: &'static str, config: &Path) -> Self {
        let log = std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "error".into());
        Self::start_bin(name, &bin(name), config, &log)
    }

    /// Runs the executable `bin` (e.g. a release build) as `name`, with
    /// `RUST_LOG` = `log`.
    pub fn start_bin(name: &'static str, bin: &Path, config: &Path, log: &str) -> Self {
        let mut p =
            Self { name, bin: bin.to_path_buf(), log: log.to_string(), config: config.to_path_buf(), child: None };
        p.restart();
        p
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} still running", self.name);
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RELAY_CONFIG")
            .env("RUST_LOG", &self.log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// `kill -9`: no goodbye, nothing flushed.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// The running process's PID (`None` once it was killed or stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// How the process ended, when it exited by itself (rather than
    /// through this handle); `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `kill -<sig> <pid>` (e.g. `STOP`, `CONT`) to the running
    /// process, by its own PID; does nothing when it is not running.
    pub async fn signal(&self, sig: &str) {
        let Some(pid) = self.pid() else { return };
        let ok =
            Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().await.expect("kill").success();
        assert!(ok, "kill -{sig} {pid} ({})", self.name);
    }

    /// `kill -TERM <pid>` and wait for a clean exit.
    pub async fn sigterm(&mut self) {
        if let Some(exit) = self.terminate().await {
            let exit = exit.unwrap_or_else(|e| panic!("{e}"));
            assert!(exit.success(), "{} exits cleanly on SIGTERM, got {exit:?}", self.name);
        }
    }

    /// `kill -TERM <pid>` and wait up to 20 s for the exit, without
    /// judging it: `None` when it was not running, `Err` saying what went
    /// wrong (then the process is killed, as it is dropped).
    pub async fn terminate(&mut self) -> Option<Result<std::process::ExitStatus, String>> {
        let mut c = self.child.take()?;
        let Some(pid) = c.id() else { return Some(Err(format!("{} had already exited", self.name))) };
        let pid = pid.to_string();
        match Command::new("kill").args(["-TERM", &pid]).status().await {
            Ok(s) if s.success() => {}
            other => return Some(Err(format!("kill -TERM {pid} ({}): {other:?}", self.name))),
        }
        Some(match tokio::time::timeout(Duration::from_secs(20), c.wait()).await {
            Ok(Ok(exit)) => Ok(exit),
            Ok(Err(e)) => Err(format!("wait for {} ({pid}): {e}", self.name)),
            Err(_) => Err(format!("{} ({pid}) did not exit within 20 s of SIGTERM", self.name)),
        })
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
/// (e.g. `"3s"`): route `hooks` → `crm`, agents `lan-1` and `lan-2`
/// granted `crm`.
pub fn write_edge(certs: &Certs, name: &str, store: &str, reclaim_after: &str) -> EdgeSpec {
    write_edge_with(certs, name, store, reclaim_after, &routing(&["crm"], &["lan-1", "lan-2"]))
}

/// The `[[route]]` `hooks` (key [`KEY`]) fanned out to `channels`, and one
/// `[[agent]]` per name in `agents`, each granted every one of `channels`.
pub fn routing(channels: &[&str], agents: &[&str]) -> String {
    routing_for("hooks", KEY, channels, agents)
}

/// Like [`routing`], for the route `route` with API key `key`.
pub fn routing_for(route: &str, key: &str, channels: &[&str], agents: &[&str]) -> String {
    let list = |names: &[&str]| names.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    let channels = list(channels);
    let mut text = format!("[[route]]\nname = \"{route}\"\nchannels = [{channels}]\napi_keys = [\"{key}\"]\n");
    for agent in agents {
        text.push_str(&format!("[[agent]]\nname = \"{agent}\"\nchannels = [{channels}]\n"));
    }
    text
}

/// Like [`write_edge`], with the `[[route]]` and `[[agent]]` tables
/// `routing` (see [`routing`]); [`EdgeSpec::hook_url`] posts to the route
/// named `hooks`.
pub fn write_edge_with(certs: &Certs, name: &str, store: &str, reclaim_after: &str, routing: &str) -> EdgeSpec {
    write_edge_in(certs.dir.path(), name, &EdgeOpts::fast(store, reclaim_after, routing))
}

/// What an edge config says besides its listeners (on free loopback
/// ports), certificates, open admin API and unlimited ingest rates: lines
/// added to each table, and the routes and agents.
#[derive(Debug, Clone, Default)]
pub struct EdgeOpts {
    /// Top-level lines, e.g. `worker_threads = 1`.
    pub top: String,
    /// More `[ingest]` lines.
    pub ingest: String,
    /// More `[tunnel]` lines.
    pub tunnel: String,
    /// The `[store]` lines: the backend (see [`crate::Backing::toml`]) and more.
    pub store: String,
    /// The `[[route]]` and `[[agent]]` tables (see [`routing`]).
    pub routing: String,
}

impl EdgeOpts {
    /// The tests' edge: quick heartbeats, retries and store reads, the
    /// visibility timeout `reclaim_after` (e.g. `"3s"`), the store lines
    /// `store` and the tables `routing`.
    pub fn fast(store: &str, reclaim_after: &str, routing: &str) -> Self {
        Self {
            top: String::new(),
            ingest: "request_timeout = \"5s\"".into(),
            tunnel: format!("heartbeat = \"300ms\"\nretry_delay = \"100ms\"\nreclaim_after = \"{reclaim_after}\""),
            store: format!("{store}\nblock = \"500ms\"\ncommand_timeout = \"1s\""),
            routing: routing.into(),
        }
    }
}

/// Writes `<dir>/<name>.toml`, an edge config with the certificates
/// `edge.pem`, `edge-key.pem` and `ca.pem` of `dir`, and `opts`.
pub fn write_edge_in(dir: &Path, name: &str, opts: &EdgeOpts) -> EdgeSpec {
    let d = dir.display();
    let spec = EdgeSpec {
        ingest: free_port(),
        tunnel: free_port(),
        admin: free_port(),
        config: dir.join(format!("{name}.toml")),
    };
    let text = format!(
        r#"{top}
[ingest]
listen = "127.0.0.1:{ingest}"
rate_per_ip = 0
rate_per_key = 0
{ingest_extra}
[tunnel]
listen = "127.0.0.1:{tunnel}"
cert = "{d}/edge.pem"
key = "{d}/edge-key.pem"
client_ca = "{d}/ca.pem"
{tunnel_extra}
[admin]
listen = "127.0.0.1:{admin}"
token_file = ""
[store]
{store}
{routing}"#,
        top = opts.top,
        ingest = spec.ingest,
        ingest_extra = opts.ingest,
        tunnel = spec.tunnel,
        tunnel_extra = opts.tunnel,
        admin = spec.admin,
        store = opts.store,
        routing = opts.routing,
    );
    std::fs::write(&spec.config, text).expect("write edge config");
    spec
}

/// Writes an agent config for identity `name` dialing `tunnel_port`;
/// `extra` lines go at the top level. Returns (config, status socket).
pub fn write_agent(certs: &Certs, name: &str, tunnel_port: u16, target: &str, extra: &str) -> (PathBuf, PathBuf) {
    let opts = AgentOpts { targets: vec![("crm".into(), target.into())], extra: extra.into(), ..Default::default() };
    write_agent_with(certs, name, tunnel_port, &opts)
}

/// What an agent config says besides its identity, certificates and edge.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// One `[[target]]` per `(channel, url)`.
    pub targets: Vec<(String, String)>,
    /// Top-level lines, e.g. `window = 16`.
    pub extra: String,
    /// `request_timeout` of a local POST (empty: the agent's default).
    pub request_timeout: String,
    /// More lines of the `[retry]` table, e.g. `max_attempts = 1000`.
    pub retry: String,
    /// The tests' quick heartbeats, reconnects and retries; `false` keeps
    /// the agent's defaults, as in production (what the bench measures).
    pub fast: bool,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            extra: String::new(),
            request_timeout: "2s".into(),
            retry: String::new(),
            fast: true,
        }
    }
}

/// Writes an agent config for identity `name` dialing `tunnel_port` with
/// `opts` (by default quick heartbeats, reconnects and retries). Returns
/// (config, status socket).
pub fn write_agent_with(certs: &Certs, name: &str, tunnel_port: u16, opts: &AgentOpts) -> (PathBuf, PathBuf) {
    write_agent_in(certs.dir.path(), name, tunnel_port, opts)
}

/// Writes `<dir>/<name>-agent.toml`, an agent config for identity `name`
/// with the certificates `<name>.pem`, `<name>-key.pem` and `ca.pem` of
/// `dir`, dialing `tunnel_port` with `opts`. Returns (config, status socket).
pub fn write_agent_in(dir: &Path, name: &str, tunnel_port: u16, opts: &AgentOpts) -> (PathBuf, PathBuf) {
    let d = dir.display();
    let config = dir.join(format!("{name}-agent.toml"));
    let socket = dir.join(format!("{name}-agent.sock"));
    let targets: String = opts
        .targets
        .iter()
        .map(|(channel, url)| format!("[[target]]\nchannel = \"{channel}\"\nurl = \"{url}\"\n"))
        .collect();
    let request_timeout = match opts.request_timeout.as_str() {
        "" => String::new(),
        t => format!("request_timeout = \"{t}\"\n"),
    };
    let (heartbeat, reconnect, retry_delays) = if opts.fast {
        let delays = "initial_delay = \"50ms\"\nmax_delay = \"500ms\"\n";
        ("heartbeat = \"300ms\"\n", format!("[reconnect]\n{delays}"), delays)
    } else {
        ("", String::new(), "")
    };
    let text = format!(
        r#"
edge = "wss://127.0.0.1:{tunnel_port}"
cert = "{d}/{name}.pem"
key = "{d}/{name}-key.pem"
ca = "{d}/ca.pem"
status_socket = "{socket}"
{heartbeat}{request_timeout}{extra}
{reconnect}[retry]
{retry_delays}{retry}
{targets}"#,
        socket = socket.display(),
        extra = opts.extra,
        retry = opts.retry,
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

/// What one channel ended with (see [`settle`]).
#[derive(Debug, Clone)]
pub struct ChannelReport {
    pub channel: String,
    /// Webhooks answered 200.
    pub accepted: usize,
    /// Webhooks answered 200 that never reached the channel's receiver with a 2xx.
    pub missing: Vec<String>,
    /// Deliveries answered 2xx whose body or `x-body-sha256` header is not what was sent.
    pub corrupt: Vec<String>,
    /// Requests the receiver answered 2xx.
    pub deliveries: usize,
    /// Of those, repeats of an id already delivered.
    pub duplicates: usize,
    /// The edge's last figures for the channel (`None`: it did not say —
    /// edge or store down): delivered and unacknowledged, never delivered,
    /// dead-lettered.
    pub pending: Option<u64>,
    pub backlog: Option<u64>,
    pub dlq: Option<u64>,
    /// Until every webhook had arrived, or the wait ended.
    pub wait_ms: u128,
}

impl ChannelReport {
    /// What breaks the invariant, one line each; empty when it holds.
    pub fn failures(&self) -> Vec<String> {
        let ch = &self.channel;
        let mut out = Vec::new();
        if !self.missing.is_empty() {
            let some: Vec<&str> = self.missing.iter().take(3).map(String::as_str).collect();
            out.push(format!(
                "`{ch}`: {} of {} webhooks answered 200 were never delivered (e.g. {})",
                self.missing.len(),
                self.accepted,
                some.join(", ")
            ));
        }
        if !self.corrupt.is_empty() {
            out.push(format!(
                "`{ch}`: {} deliveries with a changed body or header: {:?}",
                self.corrupt.len(),
                self.corrupt
            ));
        }
        match self.pending {
            Some(0) => {}
            Some(n) => out.push(format!("`{ch}`: {n} entries still pending")),
            None => out.push(format!("`{ch}`: the edge reports no pending count")),
        }
        match self.dlq {
            Some(0) => {}
            Some(n) => out.push(format!("`{ch}`: {n} entries dead-lettered")),
            None => out.push(format!("`{ch}`: the edge reports no DLQ total")),
        }
        out
    }
}

/// How long a channel must show nothing left to deliver (nothing pending,
/// no backlog) while webhooks are missing before [`settle`] calls them lost.
pub const LOST_AFTER: Duration = Duration::from_secs(3);

/// The invariant per channel, without panicking: waits up to `within`
/// until every webhook of `accepted` reached each channel's receiver with a
/// 2xx and the edge answering on `admin` reports nothing pending and no
/// backlog there. A channel whose missing webhooks can no longer arrive
/// (nothing left in the store for [`LOST_AFTER`]) stops the wait for it
/// early. Then reads each DLQ and checks every delivered body.
pub async fn settle(
    admin: u16,
    channels: &[(&str, &Receiver)],
    accepted: &HashMap<String, String>,
    within: Duration,
) -> Vec<ChannelReport> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    let started = std::time::Instant::now();
    // Per channel: missing ids, last (backlog, pending), when every webhook
    // had arrived, since when nothing was left to deliver, settled.
    struct Watch {
        missing: Vec<String>,
        stats: Option<(u64, u64)>,
        arrived_ms: Option<u128>,
        idle_since: Option<std::time::Instant>,
        done: bool,
    }
    let mut watch: Vec<Watch> = channels
        .iter()
        .map(|_| Watch { missing: Vec::new(), stats: None, arrived_ms: None, idle_since: None, done: false })
        .collect();
    loop {
        for ((channel, rx), w) in channels.iter().zip(watch.iter_mut()).filter(|(_, w)| !w.done) {
            let got: HashSet<String> = rx.accepted().into_iter().map(|d| d.relay_id).collect();
            w.missing = accepted.keys().filter(|id| !got.contains(*id)).cloned().collect();
            w.stats = admin_channel_stats(&client, admin, channel).await;
            if w.missing.is_empty() {
                w.arrived_ms.get_or_insert(started.elapsed().as_millis());
            }
            let empty = w.stats == Some((0, 0));
            if empty && w.missing.is_empty() {
                w.done = true;
            } else if empty {
                let since = *w.idle_since.get_or_insert_with(std::time::Instant::now);
                w.done = since.elapsed() >= LOST_AFTER;
            } else {
                w.idle_since = None;
            }
        }
        if watch.iter().all(|w| w.done) || started.elapsed() >= within {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reports = Vec::new();
    for ((channel, rx), w) in channels.iter().zip(watch) {
        let deliveries = rx.accepted();
        let corrupt = deliveries
            .iter()
            .filter(|d| accepted.get(&d.relay_id).is_some_and(|expected| !intact(d, expected)))
            .map(|d| d.relay_id.clone())
            .collect();
        let distinct: HashSet<&str> = deliveries.iter().map(|d| d.relay_id.as_str()).collect();
        let dlq = admin_try(&client, admin, &format!("/admin/dlq/{channel}")).await.and_then(|v| v["total"].as_u64());
        let mut missing = w.missing;
        missing.sort();
        reports.push(ChannelReport {
            channel: channel.to_string(),
            accepted: accepted.len(),
            missing,
            corrupt,
            deliveries: deliveries.len(),
            duplicates: deliveries.len() - distinct.len(),
            pending: w.stats.map(|(_, pending)| pending),
            backlog: w.stats.map(|(backlog, _)| backlog),
            dlq,
            wait_ms: w.arrived_ms.unwrap_or_else(|| started.elapsed().as_millis()),
        });
    }
    reports
}

/// Whether a delivery carries the body (and `x-body-sha256` header) whose
/// sha256 is `expected`.
fn intact(d: &crate::Delivery, expected: &str) -> bool {
    use sha2::Digest;
    let header = d.headers.iter().find(|(k, _)| k == "x-body-sha256").map(|(_, v)| v.as_slice());
    header == Some(expected.as_bytes()) && hex::encode(sha2::Sha256::digest(&d.body)) == expected
}

/// `GET` on the admin API; `None` when the edge does not answer with JSON.
async fn admin_try(client: &reqwest::Client, admin: u16, path: &str) -> Option<serde_json::Value> {
    let resp = client.get(format!("http://127.0.0.1:{admin}{path}")).send().await.ok()?;
    serde_json::from_slice(&resp.bytes().await.ok()?).ok()
}

/// `(backlog, pending)` of `channel` per the edge's `/health`; `None` when
/// the edge or its store is down.
async fn admin_channel_stats(client: &reqwest::Client, admin: u16, channel: &str) -> Option<(u64, u64)> {
    let health = admin_try(client, admin, "/health").await?;
    let ch = &health["channels"][channel];
    Some((ch["backlog"].as_u64()?, ch["pending"].as_u64()?))
}

/// Waits until the agent answering on `socket` reports a live session.
pub async fn wait_connected(socket: &Path) {
    let socket = socket.to_path_buf();
    let connected = || relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !connected() {
        if tokio::time::Instant::now() > deadline {
            // Say why: the agent's own last error (edge refused, TLS, …).
            let why = match relay_agent::status::client::query(&socket) {
                Ok(s) => format!("last error {:?}, reconnects {}", s.last_error, s.reconnects),
                Err(e) => format!("no status from the agent: {e}"),
            };
            panic!("timed out after 15s waiting for: agent connected ({why})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 15 s) until an edge answers on its admin port `admin`:
/// it has started (and installed its signal handlers), whether or not its
/// store is reachable.
pub async fn wait_edge_up(admin: u16) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("client");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while admin_try(&client, admin, "/health").await.is_none() {
        assert!(std::time::Instant::now() < deadline, "the edge with admin port {admin} did not start within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
