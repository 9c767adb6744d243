//! SIGTERM under steady load, on the real `relay-edge` and `relay-agent`
//! processes: each shuts down gracefully, comes back, and nothing that was
//! answered 200 is lost.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::*;
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

fn spawn(name: &str, config: &Path) -> Child {
    Command::new(bin(name))
        .arg("--config")
        .arg(config)
        .env_remove("RELAY_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn")
}

/// SIGTERM by PID (our own child), then wait for a clean exit.
async fn sigterm(child: &mut Child) {
    let pid = child.id().expect("running").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits in time").expect("wait");
    assert!(exit.success(), "graceful exit, got {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_edge_and_agent_under_load_loses_nothing() {
    init_tracing();
    let redis = RedisServer::start();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let (ingest, tunnel, admin) = (free_port(), free_port(), free_port());
    let dir = certs.dir.path();
    let d = dir.display();
    let edge_toml = dir.join("edge.toml");
    std::fs::write(
        &edge_toml,
        format!(
            r#"
[ingest]
listen = "127.0.0.1:{ingest}"
[tunnel]
listen = "127.0.0.1:{tunnel}"
cert = "{d}/edge.pem"
key = "{d}/edge-key.pem"
client_ca = "{d}/ca.pem"
heartbeat = "300ms"
reclaim_after = "5s"
[admin]
listen = "127.0.0.1:{admin}"
[store]
redis_url = "{url}"
block = "500ms"
[[route]]
name = "hooks"
channels = ["crm"]
api_keys = ["{KEY}"]
[[agent]]
name = "lan-1"
channels = ["crm"]
"#,
            url = redis.url()
        ),
    )
    .expect("write edge.toml");
    let agent_toml = dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            r#"
edge = "wss://127.0.0.1:{tunnel}"
cert = "{d}/lan-1.pem"
key = "{d}/lan-1-key.pem"
ca = "{d}/ca.pem"
status_socket = "{d}/agent.sock"
window = 16
heartbeat = "300ms"
[reconnect]
initial_delay = "50ms"
max_delay = "500ms"
[[target]]
channel = "crm"
url = "{target}"
"#,
            target = rx.url()
        ),
    )
    .expect("write agent.toml");
    rx.delay(Duration::from_millis(5));

    let mut edge = spawn("relay-edge", &edge_toml);
    let mut agent = spawn("relay-agent", &agent_toml);
    let socket = dir.join("agent.sock");
    wait_until(Duration::from_secs(15), "agent connected", || {
        relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected)
    })
    .await;

    // Steady load: ~200 webhooks/s from 4 senders, recording every 200.
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for s in 0..4 {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        let url = format!("http://127.0.0.1:{ingest}/hooks/hooks");
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let r =
                    client.post(&url).header("x-api-key", KEY).body(format!("{{\"s\":{s},\"i\":{i}}}")).send().await;
                if let Ok(r) = r
                    && r.status() == 200
                {
                    let v: serde_json::Value =
                        serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or_default();
                    if let Some(id) = v["webhook_id"].as_str()
                        && let Ok(mut a) = accepted.lock()
                    {
                        a.insert(id.to_string());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&mut edge).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut edge = spawn("relay-edge", &edge_toml);
    wait_until(Duration::from_secs(15), "agent reconnected to the new edge", || {
        relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected && s.reconnects >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&mut agent).await;
    let mut agent = spawn("relay-agent", &agent_toml);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    for s in senders {
        let _ = s.await;
    }
    let accepted = accepted.lock().expect("accepted").clone();
    assert!(accepted.len() > 200, "the load ran ({} accepted)", accepted.len());
    wait_until(Duration::from_secs(30), "every accepted webhook delivered", || {
        let got: HashSet<String> = rx.accepted().into_iter().map(|d| d.relay_id).collect();
        accepted.iter().all(|id| got.contains(id))
    })
    .await;
    let deliveries = rx.accepted().len();
    let distinct: HashSet<String> = rx.accepted().into_iter().map(|d| d.relay_id).collect();
    let dups = deliveries - distinct.len();
    eprintln!("sigterm under load: {} accepted, {deliveries} deliveries, {dups} duplicates", accepted.len());
    assert!(dups <= 2 * 16, "duplicates stay within the in-flight windows of the two restarts ({dups})");
    assert_drained(&redis, "crm").await;
    sigterm(&mut agent).await;
    sigterm(&mut edge).await;
}
