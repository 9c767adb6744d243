//! Secrets never reach logs, stored entries or the local endpoint. This
//! binary installs its own subscriber that captures every log line of the
//! edge and the agent at the most verbose level.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_edge::config::{RouteConfig, Secret};
use testkit::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SECRET_KEY: &str = "k_live_TOPSECRET_9f8e7d";
const APP_SECRET: &str = "app_secret_TOPSECRET_1a2b";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_and_secrets_never_reach_logs_storage_or_the_receiver() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            "relay_edge=trace,relay_agent=trace,testkit=trace,secrets_in_logs=trace,axum=trace,hyper=debug",
        )
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    for store in [Backing::redis(), Backing::embedded()] {
        relay_once(&store).await;
        assert_stored_without_secrets(&store).await;
    }

    let logs = String::from_utf8_lossy(&capture.0.lock().expect("logs")).into_owned();
    assert!(logs.contains("webhook refused"), "the capture works (refusals are logged)");
    assert!(logs.contains("MASKED"), "secrets in the config print as MASKED");
    assert!(logs.contains("backend=\"embedded\""), "both backends ran");
    for line in logs.lines() {
        assert!(!line.contains("TOPSECRET"), "a secret reached the logs: {line}");
        assert!(!line.starts_with("FORGED"), "a route name from the URL forged a log line: {line:?}");
        assert!(!line.contains('\u{1b}'), "a route name from the URL wrote an escape sequence: {line:?}");
    }
    assert!(logs.contains("FORGED"), "the refused route was logged");
}

/// Everything that may carry a secret, once: config, keys in header, path
/// and query, signatures, refusals, the verification handshake.
async fn relay_once(store: &Backing) {
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let mut cfg = edge_config(store, &certs);
    cfg.routes.push(RouteConfig {
        name: "meta".into(),
        channels: vec!["crm".into()],
        api_keys: vec![Secret::new(SECRET_KEY)],
        app_secret: Some(Secret::new(APP_SECRET)),
        verify_token: Some(Secret::new("verify_TOPSECRET")),
        ..Default::default()
    });
    tracing::info!(config = ?cfg, "starting with this config");
    let edge = Edge::start(cfg).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;

    let client = reqwest::Client::new();
    let body = br#"{"entry":[]}"#.to_vec();
    let sig = relay_edge::ingest::auth::sign(APP_SECRET, &body);
    let base = edge.hook_url("meta");
    let urls = [base.clone(), format!("{base}/{SECRET_KEY}"), format!("{base}?api_key={SECRET_KEY}&x=1")];
    for (i, url) in urls.iter().enumerate() {
        let mut req = client.post(url).header("x-hub-signature-256", &sig).body(body.clone());
        if i == 0 {
            req = req.header("x-api-key", SECRET_KEY);
        }
        assert_eq!(req.send().await.expect("post").status(), 200, "{i}");
    }
    // Refusals log too: a wrong key that shares a prefix, a bad signature.
    let near = format!("{SECRET_KEY}x");
    let r = client.post(format!("{base}/{near}")).body(body.clone()).send().await.expect("post");
    assert_eq!(r.status(), 401);
    let r = client.post(format!("{base}/{SECRET_KEY}")).header("x-hub-signature-256", "sha256=00").body(body.clone());
    assert_eq!(r.send().await.expect("post").status(), 401);
    let r = client
        .get(format!("{base}?hub.mode=subscribe&hub.verify_token=verify_TOPSECRET&hub.challenge=7"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    // A route name from the URL with CR/LF and an ANSI escape, percent-encoded.
    let evil = format!("http://{}/hooks/x%0D%0AFORGED%20log%20line%1B%5B31m", edge.ingest);
    assert_eq!(client.post(evil).body("{}").send().await.expect("post").status(), 404);

    wait_until(Duration::from_secs(10), "three deliveries", || rx.accepted().len() == 3).await;
    for d in rx.accepted() {
        let all = format!("{:?} {}", d.headers, String::from_utf8_lossy(&d.body));
        assert!(!all.contains("TOPSECRET"), "a secret reached the local endpoint: {all}");
    }
    agent.stop().await;
    edge.stop().await;
}

/// The stored bytes (Redis: the stream's entries; embedded: the whole file).
async fn assert_stored_without_secrets(store: &Backing) {
    let stored = match store {
        Backing::Redis(redis) => {
            let mut conn = redis.conn().await;
            let raw: redis::Value = redis::cmd("XRANGE")
                .arg("relay:{crm}:stream")
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .expect("XRANGE");
            format!("{raw:?}").into_bytes()
        }
        Backing::Embedded { path, .. } => std::fs::read(path).expect("read the store file"),
        Backing::Cluster(_) => unreachable!("this test runs on one server or the embedded store"),
    };
    assert!(stored.len() > 100, "something was stored");
    assert!(!stored.windows(9).any(|w| w == b"TOPSECRET"), "a secret was stored ({})", store.name());
}
