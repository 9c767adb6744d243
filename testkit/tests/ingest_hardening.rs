//! The public ingest port against what a careless client or an attacker
//! sends: a whole oversize body, probes of `/health`, keys hidden by
//! percent-encoding, forwarding headers and cookies meant for the LAN,
//! a de-duplication claim orphaned by a request that timed out, and more
//! connections than the edge will hold.

use std::time::Duration;

use relay_edge::config::{RouteConfig, Secret};
use relay_edge::store::{Backend, Stored};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the peer closes or `within` passes; what arrived.
async fn read_answer(s: &mut tokio::net::TcpStream, within: Duration) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Python's `http.client` sends the whole body without `Expect` and only
/// then reads: the edge must let it finish and answer `413`, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_a_whole_oversize_body_reads_the_413() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let body = vec![b'x'; 5 * 1024 * 1024];
    let mut s = tokio::net::TcpStream::connect(edge.ingest).await.expect("connect");
    let head = format!(
        "POST /hooks/hooks HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("send head");
    let sent = s.write_all(&body).await;
    let answer = read_answer(&mut s, Duration::from_secs(10)).await;
    assert!(sent.is_ok(), "the edge cut the upload short: {sent:?}; it read: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("body_too_large"), "{answer:?}");
    assert_eq!(xlen(&store, "crm", "stream").await, 0);
}

/// The public port's `/health` says the process is up and nothing else:
/// no agent names or addresses, no channel names, no store round trip;
/// a flood of probes is rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_health_tells_nothing_and_is_rate_limited() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let (edge, agent, _rx) = edge_with_agent(edge_config(&store, &certs), &certs, "lan-1").await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/health", edge.ingest);
    let first = client.get(&url).send().await.expect("health");
    assert_eq!(first.status(), 200);
    let text = first.text().await.expect("body");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["status"], "ok", "{text}");
    for secret in ["lan-1", "127.0.0.1", "crm", "agents", "channels", "webhooks_received"] {
        assert!(!text.contains(secret), "public /health tells `{secret}`: {text}");
    }
    let mut limited = 0;
    for _ in 0..100 {
        let r = client.get(&url).send().await.expect("health");
        if r.status() == 429 {
            limited += 1;
            assert!(r.headers().contains_key("retry-after"), "429 says when to come back");
        }
    }
    assert!(limited > 0, "100 probes in a burst were all answered: /health is not rate-limited");
    // The admin listener keeps the full view.
    let admin = client.get(format!("http://{}/health", edge.admin)).send().await.expect("admin");
    let admin: serde_json::Value = serde_json::from_slice(&admin.bytes().await.expect("body")).expect("json");
    assert!(admin["agents"].to_string().contains("lan-1"), "{admin}");
    agent.stop().await;
}

async fn stored(store: &Backing, answer: &serde_json::Value) -> relay_protocol::Webhook {
    let id = answer["message_id"].as_str().expect("message id");
    let raw = store.store().raw_entry("crm", id.parse().expect("stream id")).await.expect("raw").expect("stored");
    Stored { bytes: raw, received_at_ms: 0 }.decode().expect("decode")
}

/// A key in the path or query is never stored, however it is encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_keys_are_redacted_from_the_stored_path_and_query() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", edge.ingest);
    for (url, path, query) in [
        (format!("{base}/hooks/ho%6Fks/{KEY}"), "/hooks/hooks", ""),
        (format!("{base}/hooks/hooks/{KEY}?a=1"), "/hooks/hooks", "a=1"),
        (format!("{base}/hooks/hooks?api%5Fkey={KEY}&x=1"), "/hooks/hooks", "x=1"),
        (format!("{base}/hooks/hooks?x=2&api_key={KEY}"), "/hooks/hooks", "x=2"),
        (format!("{base}/hooks/hooks?%61pi_key={KEY}"), "/hooks/hooks", ""),
    ] {
        let resp = client.post(&url).body("{}").send().await.expect("post");
        assert_eq!(resp.status(), 200, "{url}");
        let answer: serde_json::Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
        let w = stored(&store, &answer).await;
        assert_eq!((w.path.as_str(), w.query.as_str()), (path, query), "{url}");
        assert!(!format!("{w:?}").contains(KEY), "the key was stored for {url}: {w:?}");
    }
}

/// Headers a sender (or a proxy in front of the edge) sets about itself
/// never reach the LAN endpoint as sent; the edge says who it saw in
/// `X-Relay-Client-IP`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_cookies_never_reach_the_lan() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let (edge, agent, rx) = edge_with_agent(edge_config(&store, &certs), &certs, "lan-1").await;
    let mut s = tokio::net::TcpStream::connect(edge.ingest).await.expect("connect");
    let body = r#"{"spoof":true}"#;
    let request = format!(
        "POST /hooks/hooks HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n\
         x-forwarded-for: 10.9.9.9\r\nx-real-ip: 10.9.9.8\r\nforwarded: for=10.9.9.7\r\ncookie: session=stolen\r\n\
         x-relay-client-ip: 10.9.9.6\r\ntrue-client-ip: 10.9.9.5\r\ncf-connecting-ip: 10.9.9.4\r\nx-custom: kept\r\nexpect: 100-continue\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("send");
    let answer = read_answer(&mut s, Duration::from_secs(5)).await;
    assert!(answer.contains("200 OK"), "{answer}");
    wait_until(Duration::from_secs(10), "delivered", || rx.count() >= 1).await;
    let d = &rx.deliveries()[0];
    let header = |n: &str| d.headers.iter().filter(|(k, _)| k == n).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    for name in ["x-forwarded-for", "x-real-ip", "forwarded", "cookie", "expect", "true-client-ip", "cf-connecting-ip"]
    {
        assert!(header(name).is_empty(), "`{name}` reached the LAN endpoint: {:?}", d.headers);
    }
    assert_eq!(header("x-relay-client-ip"), vec![b"127.0.0.1".to_vec()], "{:?}", d.headers);
    assert_eq!(header("x-custom"), vec![b"kept".to_vec()]);
    agent.stop().await;
}

/// A request that timed out after claiming its body's de-duplication key
/// (the store stalled) must not make every retry of that body answer
/// `503` for the whole `dedupe_window`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_timed_out_request_does_not_block_retries() {
    init_tracing();
    let mut store = Backing::redis();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.ingest.request_timeout = Duration::from_secs(1);
    // The request's deadline passes while the claim is still on its way.
    cfg.store.command_timeout = Duration::from_secs(5);
    cfg.routes.push(RouteConfig {
        name: "once".into(),
        channels: vec!["crm".into()],
        api_keys: vec![Secret::new(KEY)],
        dedupe_window: Some(Duration::from_secs(3600)),
        ..Default::default()
    });
    let edge = Edge::start(cfg).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let url = edge.hook_url("once");
    // The edge serves once its start-up store calls are done: stop Redis only after that.
    let ready = format!("http://{}/ready", edge.admin);
    let mut up = false;
    for _ in 0..100 {
        if client.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the edge did not get ready");
    let pid = store.redis_server().pid().expect("redis pid");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let (status, _) = post(&client, &url, KEY, br#"{"n":1}"#.to_vec()).await;
    signal("-CONT");
    assert_eq!(status, 503, "the store was stopped");
    let started = std::time::Instant::now();
    let mut last = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let (s, j) = post(&client, &url, KEY, br#"{"n":1}"#.to_vec()).await;
        last = s;
        if s == 200 {
            assert_eq!(j["duplicate"], serde_json::Value::Null, "the first one stored: {j}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, 200, "retries of the body still refused {:?} after the store came back", started.elapsed());
    let (s, j) = post(&client, &url, KEY, br#"{"n":1}"#.to_vec()).await;
    assert_eq!((s, j["duplicate"].as_bool()), (200, Some(true)), "later copies are duplicates: {j}");
    store.store().ensure_group("crm").await.expect("group");
    assert_eq!(xlen(&store, "crm", "stream").await, 1, "stored once");
}

/// More connections than `max_connections_per_ip` from one address are
/// closed at once, before any TLS handshake, on both public ports; the
/// edge keeps serving the connections it holds, and takes new ones when
/// some close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_are_closed_before_tls() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.ingest.max_connections_per_ip = 4;
    cfg.tunnel.max_connections_per_ip = 3;
    let edge = Edge::start(cfg).await;
    for (what, addr, cap) in [("ingest", edge.ingest, 4), ("tunnel", edge.tunnel, 3)] {
        let mut held = Vec::new();
        for _ in 0..cap {
            held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // No wait needed before the next one: each connect above completed
        // before the next began, the kernel's accept queue is FIFO, and the
        // edge's accept loop takes one connection at a time (counting it in
        // the cap before it accepts the next). So the edge counts all of
        // `held` before it sees `extra`.
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "{what}: connection {} of one IP was kept open: {closed:?}",
            cap + 1
        );
        for s in &mut held {
            let open = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
            assert!(open.is_err(), "{what}: a held connection was closed: {open:?}");
        }
        held.pop();
        // The slot is free once the edge has seen that close: wait for a new
        // connection to be kept. 2 s: far less than what would free it
        // without the close being seen (header timeout 10 s, TLS handshake
        // timeout 5 s).
        if what == "ingest" {
            let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
            let url = edge.hook_url("hooks");
            // (No second post after it: its own connection holds the slot
            // until the edge sees it close.)
            wait_for(Duration::from_secs(2), "ingest: a slot freed, a webhook is taken again", || async {
                let sent = client.post(&url).header("x-api-key", KEY).body("{}").send().await;
                sent.is_ok_and(|r| r.status() == 200)
            })
            .await;
        } else {
            wait_for(Duration::from_secs(2), "tunnel: a freed slot is given to a new connection", || async {
                let Ok(mut again) = tokio::net::TcpStream::connect(addr).await else { return false };
                let mut buf = [0u8; 16];
                // Kept open (no TLS from us, so nothing comes): the read times out.
                tokio::time::timeout(Duration::from_millis(300), again.read(&mut buf)).await.is_err()
            })
            .await;
        }
    }
}

/// A client that never finishes its request head is cut off on the admin
/// listener (after `ingest.header_timeout`) and on the agent's metrics
/// listener (after 5 s), instead of holding a connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_agent_metrics_listeners_cut_off_a_stalled_request_head() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.ingest.header_timeout = Duration::from_secs(1);
    let rx = Receiver::start().await;
    let edge = Edge::start(cfg).await;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let mut acfg = agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]);
    acfg.metrics_listen = Some(metrics);
    let agent = Agent::start(acfg);
    agent.wait_connected(Duration::from_secs(10)).await;
    for (what, addr, within) in [("admin", edge.admin, 4), ("agent metrics", metrics, 8)] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n").await.expect("send part of a head");
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(within), s.read_to_end(&mut buf)).await;
        assert!(ended.is_ok(), "{what}: a stalled request head still held its connection after {within} s");
        eprintln!("{what}: cut off after {:?}", started.elapsed());
    }
    agent.stop().await;
}

/// An idle keep-alive connection is closed after
/// `ingest.connection_lifetime`, so cheap requests now and then cannot
/// hold the connection caps' slots for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_end_after_their_lifetime() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.ingest.connection_lifetime = Duration::from_secs(1);
    let edge = Edge::start(cfg).await;
    let mut s = tokio::net::TcpStream::connect(edge.ingest).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("send");
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("answer").expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "answered, kept alive");
    let ended = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the idle connection outlived its 1 s lifetime by 4 s");
}
