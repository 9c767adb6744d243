//! Ingest for Meta and the public internet: signatures over raw bytes, the
//! verification handshake, keys in the URL, limits, de-duplication, and
//! certificate revocation with reload. Store-touching tests run once per store backend; real edge, agent.

use std::time::Duration;

use relay_edge::config::{RouteConfig, Secret};
use relay_protocol::Frame;
use testkit::*;

const APP_SECRET: &str = "meta-app-secret-1";

/// A WhatsApp status update + message, with escaped and raw non-ASCII text,
/// exactly as bytes (never re-serialized).
const WHATSAPP: &[u8] = "{\"object\":\"whatsapp_business_account\",\"entry\":[{\"id\":\"102290129340398\",\"changes\":[{\"value\":{\"messaging_product\":\"whatsapp\",\"metadata\":{\"display_phone_number\":\"15550783881\",\"phone_number_id\":\"106540352242922\"},\"statuses\":[{\"id\":\"wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJBRjVCQkJBNzQ5NjNEMTM3NTEA\",\"status\":\"delivered\",\"timestamp\":\"1750263773\",\"recipient_id\":\"16505551234\",\"pricing\":{\"billable\":true,\"pricing_model\":\"CBP\",\"category\":\"service\"}}],\"messages\":[{\"from\":\"16505551234\",\"type\":\"text\",\"text\":{\"body\":\"Ol\\u00e1, caf\\u00e9? \u{2713} \u{4f60}\u{597d} \u{1F600}\"}}]},\"field\":\"messages\"}]}]}".as_bytes();

fn meta_routes(cfg: &mut relay_edge::EdgeConfig) {
    cfg.routes.push(RouteConfig {
        name: "meta".into(),
        channels: vec!["crm".into()],
        api_keys: vec![Secret::new(KEY)],
        verify_token: Some(Secret::new("meta-verify-token")),
        app_secret: Some(Secret::new(APP_SECRET)),
        dedupe_window: Some(Duration::from_secs(600)),
        ..Default::default()
    });
    cfg.routes.push(RouteConfig {
        name: "json".into(),
        channels: vec!["crm".into()],
        api_keys: vec![Secret::new(KEY)],
        require_json: true,
        ..Default::default()
    });
}

async fn start(store: Backing, tune: impl FnOnce(&mut relay_edge::EdgeConfig)) -> (Backing, Certs, Receiver, Edge) {
    init_tracing();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let mut cfg = edge_config(&store, &certs);
    meta_routes(&mut cfg);
    tune(&mut cfg);
    let edge = Edge::start(cfg).await;
    (store, certs, rx, edge)
}

async fn post_signed(client: &reqwest::Client, url: &str, body: &[u8], signature: &str) -> (u16, serde_json::Value) {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", signature)
        .body(body.to_vec())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, serde_json::from_slice(&resp.bytes().await.expect("body")).unwrap_or_default())
}

async fn signed_whatsapp_payload_is_delivered_byte_identical_and_tampering_is_refused(store: Backing) {
    let (store, certs, rx, edge) = start(store, |_| {}).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    let client = reqwest::Client::new();
    // Meta sends the key in the URL (no custom headers).
    let url = format!("{}/{KEY}", edge.hook_url("meta"));
    let sig = relay_edge::ingest::auth::sign(APP_SECRET, WHATSAPP);
    let (s, j) = post_signed(&client, &url, WHATSAPP, &sig).await;
    assert_eq!(s, 200, "{j}");
    wait_until(Duration::from_secs(10), "delivered", || rx.accepted().len() == 1).await;
    let d = &rx.accepted()[0];
    assert_eq!(d.body, WHATSAPP, "body bytes must be identical (signatures still verify downstream)");
    let fwd_sig = d.headers.iter().find(|(k, _)| k == "x-hub-signature-256").map(|(_, v)| v.clone());
    assert_eq!(fwd_sig.as_deref(), Some(sig.as_bytes()), "Meta's signature header is forwarded");
    assert!(
        relay_edge::ingest::auth::signature_valid(APP_SECRET, fwd_sig.as_deref(), &d.body),
        "the receiver can verify the signature itself"
    );

    // One byte changed: 401, nothing stored.
    let mut tampered = WHATSAPP.to_vec();
    let pos = tampered.iter().position(|b| *b == b'd').expect("a 'd'");
    tampered[pos] = b'D';
    let before = xlen(&store, "crm", "stream").await;
    let (s, j) = post_signed(&client, &url, &tampered, &sig).await;
    assert_eq!((s, j["error"].as_str()), (401, Some("bad_signature")), "{j}");
    let (s, _) = post_signed(&client, &url, WHATSAPP, "").await;
    assert_eq!(s, 401, "a missing signature is refused too");
    assert_eq!(xlen(&store, "crm", "stream").await, before, "nothing stored for a bad signature");
    agent.stop().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verification_handshake_needs_no_signature() {
    let (_store, _certs, _rx, edge) = start(Backing::embedded(), |_| {}).await;
    let client = reqwest::Client::new();
    for base in [edge.hook_url("meta"), format!("{}/{KEY}", edge.hook_url("meta"))] {
        let ok = client
            .get(format!("{base}?hub.mode=subscribe&hub.verify_token=meta-verify-token&hub.challenge=1158201444"))
            .send()
            .await
            .expect("get");
        assert_eq!(ok.status(), 200);
        assert!(ok.headers()["content-type"].to_str().expect("ct").starts_with("text/plain"));
        assert_eq!(ok.text().await.expect("text"), "1158201444");
        let bad = client
            .get(format!("{base}?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1158201444"))
            .send()
            .await
            .expect("get");
        assert_eq!(bad.status(), 403);
    }
    edge.stop().await;
}

async fn identical_deliveries_within_the_window_are_stored_once(store: Backing) {
    let (store, certs, rx, edge) = start(store, |_| {}).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    let client = reqwest::Client::new();
    let url = format!("{}?api_key={KEY}", edge.hook_url("meta"));
    let sig = relay_edge::ingest::auth::sign(APP_SECRET, WHATSAPP);
    let (s1, j1) = post_signed(&client, &url, WHATSAPP, &sig).await;
    let (s2, j2) = post_signed(&client, &url, WHATSAPP, &sig).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(j1["message_id"], j2["message_id"], "{j1} {j2}");
    assert_eq!(j1["webhook_id"], j2["webhook_id"]);
    assert_eq!(j2["duplicate"], true);
    assert_eq!(xlen(&store, "crm", "stream").await, 1, "stored once");
    wait_until(Duration::from_secs(10), "delivered", || rx.accepted().len() == 1).await;
    // Settled: the one entry acked on the edge and nothing running on the
    // agent, so no second request can come.
    assert_drained(&store, "crm").await;
    wait_until(Duration::from_secs(10), "the agent acked it and holds nothing", || {
        agent.status().is_ok_and(|s| s.delivered == 1 && s.in_flight == 0)
    })
    .await;
    assert_eq!(rx.count(), 1, "delivered once");
    agent.stop().await;
    edge.stop().await;
}

async fn json_rate_and_slow_client_limits_store_nothing(store: Backing) {
    let (store, _certs, _rx, edge) = start(store, |c| {
        c.ingest.rate_per_key = 2;
        c.ingest.burst_per_key = 2;
        c.ingest.header_timeout = Duration::from_millis(500);
        c.ingest.request_timeout = Duration::from_secs(1);
    })
    .await;
    let client = reqwest::Client::new();
    let json_url = edge.hook_url("json");

    // 415: not JSON; 400: JSON type, broken body.
    let r =
        client.post(&json_url).header("x-api-key", KEY).header("content-type", "text/plain").body("hi").send().await;
    let r = r.expect("post");
    assert_eq!(r.status(), 415);
    let r = client
        .post(&json_url)
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body("{\"open\":")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    assert_eq!(xlen(&store, "crm", "stream").await, 0);

    // 429 with Retry-After once the key's burst is spent.
    let mut limited = None;
    for i in 0..10 {
        let r = client
            .post(&json_url)
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(format!("{{\"i\":{i}}}"))
            .send()
            .await
            .expect("post");
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the per-key rate limit answers 429");
    let retry: u64 = r.headers()["retry-after"].to_str().expect("ra").parse().expect("seconds");
    assert!(retry >= 1);
    let stored = xlen(&store, "crm", "stream").await;
    assert!(stored <= 3, "only requests within the limit were stored ({stored})");

    // Slow head: cut off after header_timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.ingest).await.expect("connect");
    s.write_all(b"POST /hooks/json HTTP/1.1\r\nhost: x\r\n").await.expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a client that never finishes its head is disconnected");

    // Slow body: 408 after request_timeout.
    let mut s = tokio::net::TcpStream::connect(edge.ingest).await.expect("connect");
    let head = format!(
        "POST /hooks/hooks HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"a\":"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(xlen(&store, "crm", "stream").await, stored, "nothing stored by the slow clients");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_certificates_are_refused_and_reload_drops_connected_ones() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let lan2 = relay_edge::certs::fingerprint(&certs.path("lan-2.pem")).expect("fingerprint");
    let mut cfg = edge_config(&store, &certs);
    cfg.tunnel.revoked = vec![lan2.serial.clone()];
    let edge = Edge::start(cfg.clone()).await;

    // Revoked by serial at start: refused at connect.
    match raw::connect(&edge, &certs, "lan-2").await {
        Err(e) => eprintln!("revoked lan-2 refused: {e}"),
        // TLS 1.3: the refusal can surface on the first read instead.
        Ok(mut ws) => assert!(raw::hello_idle(&mut ws, None).await.is_err(), "a revoked certificate gets no session"),
    }

    // lan-1 connects, then its fingerprint is revoked by a reload.
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    let lan1 = relay_edge::certs::fingerprint(&certs.path("lan-1.pem")).expect("fingerprint");
    cfg.tunnel.revoked.push(lan1.fingerprint.clone());
    edge.reload(cfg).await;
    wait_until(Duration::from_secs(10), "the connected agent is dropped", || {
        agent.status().is_ok_and(|s| !s.connected)
    })
    .await;
    retried_and_refused(&agent).await;
    let st = agent.status().expect("status");
    assert!(!st.connected, "and cannot come back: {st:?}");
    // Webhooks wait for an agent that is still allowed: lan-1 tries again
    // meanwhile, and gets nothing.
    let client = reqwest::Client::new();
    let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, b"{}".to_vec()).await;
    assert_eq!(s, 200);
    retried_and_refused(&agent).await;
    assert_eq!(rx.count(), 0);
    agent.stop().await;
    let other = Agent::start(agent_config(&edge, &certs, "lan-3", &[("other", rx.url())]));
    other.wait_connected(Duration::from_secs(10)).await;
    other.stop().await;
    edge.stop().await;
}

/// A connection that finished TLS before a reload revoked its
/// certificate, and says `Hello` only afterwards, gets no session (nor
/// replaces the legitimate session of its identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_parked_before_hello_is_checked_again_at_registration() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    let edge = Edge::start(cfg.clone()).await;
    let mut parked = raw::connect(&edge, &certs, "lan-1").await.expect("TLS and upgrade done");
    let lan1 = relay_edge::certs::fingerprint(&certs.path("lan-1.pem")).expect("fingerprint");
    cfg.tunnel.revoked.push(lan1.fingerprint.clone());
    edge.reload(cfg).await;
    let answer = raw::hello_idle(&mut parked, None).await;
    assert!(refused_as_revoked(&answer), "a certificate revoked meanwhile got a session: {answer:?}");
    assert!(edge_agents(&edge).await.is_empty(), "no session registered");
    edge.stop().await;
}

/// A reload that replaces `tunnel.client_ca` drops the sessions whose
/// certificates the new CA did not sign, and refuses parked connections
/// of the old CA at `Hello`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_of_a_ca_removed_by_a_reload_are_dropped() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let mut cfg = edge_config(&store, &certs);
    let edge = Edge::start(cfg.clone()).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    let mut parked = raw::connect(&edge, &certs, "lan-2").await.expect("TLS and upgrade done");
    // The operator moves to another CA (here: the rogue one's).
    cfg.tunnel.client_ca = certs.path("rogue/ca.pem");
    edge.reload(cfg).await;
    wait_until(Duration::from_secs(10), "the old CA's session is dropped", || {
        agent.status().is_ok_and(|s| !s.connected)
    })
    .await;
    let answer = raw::hello_idle(&mut parked, None).await;
    assert!(refused_as_revoked(&answer), "a parked connection of the old CA got a session: {answer:?}");
    retried_and_refused(&agent).await;
    assert!(!agent.status().expect("status").connected, "and cannot come back");
    // The new CA's agents are let in.
    let mut fresh = raw::connect(&edge, &certs, "rogue/lan-1").await.expect("the new CA's agent connects");
    let welcome = raw::hello_idle(&mut fresh, None).await;
    assert!(matches!(welcome, Ok(Frame::Welcome { .. })), "the new CA's agent gets a session: {welcome:?}");
    agent.stop().await;
    edge.stop().await;
}

/// Waits until `agent` started three more connection attempts than it had
/// (its `reconnects` counts every attempt after the first): so at least two
/// made after this call were answered. Callers then check it is still out.
async fn retried_and_refused(agent: &Agent) {
    let before = agent.status().expect("status").reconnects;
    wait_until(Duration::from_secs(15), "the agent tried to connect again, twice", || {
        agent.status().is_ok_and(|s| s.reconnects >= before + 3)
    })
    .await;
}

/// `Hello` was answered with the `revoked` error (or the connection ended).
fn refused_as_revoked(answer: &Result<Frame, String>) -> bool {
    match answer {
        Ok(Frame::Error { code, .. }) => code == "revoked",
        Ok(_) => false,
        Err(_) => true,
    }
}

/// The agents the edge's admin API lists.
async fn edge_agents(edge: &Edge) -> Vec<serde_json::Value> {
    let url = format!("http://{}/admin/agents", edge.admin);
    let body = reqwest::get(&url).await.expect("agents").bytes().await.expect("body");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    v["agents"].as_array().cloned().unwrap_or_default()
}

both_backends!(
    signed_whatsapp_payload_is_delivered_byte_identical_and_tampering_is_refused,
    identical_deliveries_within_the_window_are_stored_once,
    json_rate_and_slow_client_limits_store_nothing,
);
