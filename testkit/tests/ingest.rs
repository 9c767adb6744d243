//! Ingest rejection paths: each answers a clear JSON error and stores nothing.

use std::time::Duration;

use testkit::*;

/// Writes a raw request (ignoring a write cut short by the server) and
/// returns whatever the server answered.
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

async fn bad_requests_are_refused_and_nothing_is_stored(store: Backing) {
    init_tracing();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let client = reqwest::Client::new();
    let url = edge.hook_url("hooks");

    let (s, j) = post(&client, &url, "wrong-key-000", b"{}".to_vec()).await;
    assert_eq!((s, j["error"].as_str()), (401, Some("unauthorized")), "{j}");
    assert_eq!(j["success"], false);
    assert!(!j.to_string().contains("wrong-key"), "the key must not be echoed: {j}");

    let resp = client.post(&url).body("{}").send().await.expect("post");
    assert_eq!(resp.status(), 401, "missing key");

    let (s, j) = post(&client, &edge.hook_url("nope"), KEY, b"{}".to_vec()).await;
    assert_eq!((s, j["error"].as_str()), (404, Some("unknown_route")), "{j}");

    // Oversize: answered 413 from the declared length, before the body is
    // read (a raw socket, since an HTTP client would still be uploading).
    let answer = raw_http(
        edge.ingest,
        &format!(
            "POST /hooks/hooks HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-length: {}\r\n\r\n{}",
            4 * 1024 * 1024 + 1,
            "x".repeat(1024)
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // Chunked (no declared length): cut off at the limit while reading.
    let mut chunked =
        format!("POST /hooks/hooks HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ntransfer-encoding: chunked\r\n\r\n");
    for _ in 0..5 {
        chunked.push_str(&format!("100000\r\n{}\r\n", "y".repeat(0x100000)));
    }
    let answer = raw_http(edge.ingest, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", &answer[..answer.len().min(200)]);

    assert_eq!(xlen(&store, "crm", "stream").await, 0, "nothing stored by refused requests");

    // Key as a path segment and as ?api_key= (Meta cannot send headers).
    let r = client.post(format!("{url}/{KEY}")).body("{\"a\":1}").send().await.expect("post");
    assert_eq!(r.status(), 200);
    let r = client.post(format!("{url}?api_key={KEY}&x=1")).body("{\"a\":2}").send().await.expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(xlen(&store, "crm", "stream").await, 2);

    // Meta verification handshake.
    let r = client
        .get(format!("{url}?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=12345"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("text"), "12345");
    let r = client
        .get(format!("{url}?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=12345"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);

    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_and_recovery_keeps_what_was_stored() {
    init_tracing();
    let mut store = Backing::redis();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let client = reqwest::Client::new();
    let url = edge.hook_url("hooks");
    let (s, j) = post(&client, &url, KEY, b"{\"before\":true}".to_vec()).await;
    assert_eq!(s, 200, "{j}");

    // Redis down: 503 with Retry-After, never a 200.
    store.redis_server().kill();
    let started = std::time::Instant::now();
    let resp = client.post(&url).header("x-api-key", KEY).body("{}").send().await.expect("post");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let j: serde_json::Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(j["error"], "store_unavailable");
    assert!(started.elapsed() < Duration::from_secs(12), "answered within the request timeout");

    // Redis back: accepted again, and the earlier entries survived (AOF).
    store.redis_server().restart();
    wait_until(Duration::from_secs(1), "noop", || true).await;
    let mut ok = false;
    for _ in 0..50 {
        let (s, _) = post(&client, &url, KEY, b"{\"back\":true}".to_vec()).await;
        if s == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "ingest recovers when Redis returns");
    assert!(xlen(&store, "crm", "stream").await >= 2, "the webhook stored before the outage survived");
    edge.stop().await;
}

both_backends!(bad_requests_are_refused_and_nothing_is_stored);
