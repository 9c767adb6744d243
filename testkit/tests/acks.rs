//! What an agent's verdicts settle, driven frame by frame against a real
//! edge: acks and nacks name `(channel, id)`, late and duplicate verdicts
//! settle only what they name, older agents that name ids only, one
//! redelivery per entry however often it is nacked, and the session's byte
//! budget.

use std::time::Duration;

use relay_edge::config::RouteConfig;
use relay_protocol::{Frame, VERSION};
use testkit::raw;
use testkit::*;

const FAN: &str = "fan";

/// The test edge plus route `fan` → `crm` and `default` (both granted to
/// `lan-1` and `lan-2`).
fn fan_out_config(store: &Backing, certs: &Certs) -> relay_edge::config::EdgeConfig {
    let mut cfg = edge_config(store, certs);
    cfg.routes.push(RouteConfig {
        name: FAN.into(),
        channels: vec!["crm".into(), "default".into()],
        api_keys: vec![relay_edge::config::Secret::new(KEY)],
        ..Default::default()
    });
    cfg
}

/// Certificates and a running edge with [`fan_out_config`].
async fn start(store: &Backing) -> (Certs, Edge) {
    init_tracing();
    let certs = Certs::generate();
    let edge = Edge::start(fan_out_config(store, &certs)).await;
    (certs, edge)
}

fn hello(window: u32, channels: &[&str], named_acks: bool) -> Frame {
    Frame::Hello {
        version: VERSION,
        window,
        channels: Some(channels.iter().map(|c| c.to_string()).collect()),
        agent_version: None,
        named_acks,
    }
}

/// Connects `cert` with `hello` and returns the socket after `Welcome`.
async fn session(edge: &Edge, certs: &Certs, hello: &Frame) -> relay_agent::tunnel::connect::Ws {
    let mut ws = raw::connect(edge, certs, "lan-1").await.expect("connect");
    raw::send(&mut ws, hello).await.expect("hello");
    match raw::recv(&mut ws).await {
        Ok(Some(Frame::Welcome { .. })) => ws,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The next `n` deliveries as `(channel, id, attempt)`, skipping heartbeats
/// and stats (and answering pings, so the session stays up).
async fn deliveries(ws: &mut relay_agent::tunnel::connect::Ws, n: usize) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    while out.len() < n {
        match raw::recv(ws).await {
            Ok(Some(Frame::Deliver { channel, id, attempt, .. })) => out.push((channel, id, attempt)),
            Ok(Some(Frame::Ping { t })) => raw::send(ws, &Frame::Pong { t }).await.expect("pong"),
            Ok(Some(_)) => {}
            other => panic!("expected {n} deliveries, got {out:?} then {other:?}"),
        }
    }
    out
}

/// Deliveries that arrive within `within` (answering pings meanwhile).
async fn deliveries_within(ws: &mut relay_agent::tunnel::connect::Ws, within: Duration) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(next) = tokio::time::timeout_at(deadline, raw::recv(ws)).await {
        match next {
            Ok(Some(Frame::Deliver { channel, id, attempt, .. })) => out.push((channel, id, attempt)),
            Ok(Some(Frame::Ping { t })) => raw::send(ws, &Frame::Pong { t }).await.expect("pong"),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    out
}

async fn post_fan(edge: &Edge, body: &str) {
    let (status, _) = post(&reqwest::Client::new(), &edge.hook_url(FAN), KEY, body.as_bytes().to_vec()).await;
    assert_eq!(status, 200);
}

both_backends!(a_late_ack_settles_only_the_channel_it_names, an_agent_that_names_ids_only_gets_one_channel);
both_backends!(repeated_nacks_schedule_one_redelivery, a_session_holds_at_most_its_byte_budget);
both_backends!(an_idle_channel_does_not_slow_a_busy_one, small_webhooks_fill_the_whole_window);
both_backends!(attempts_count_deliveries_not_reads);

/// The fan-out loss, frame by frame: the agent holds both copies, acks
/// `crm`'s only, loses the link, and acks `crm`'s again on the next
/// session (a late duplicate). `default`'s copy stays owed until acked.
async fn a_late_ack_settles_only_the_channel_it_names(store: Backing) {
    let (certs, edge) = start(&store).await;
    let h = hello(10, &["crm", "default"], true);
    let mut ws = session(&edge, &certs, &h).await;
    post_fan(&edge, "{\"n\":1}").await;
    let got = deliveries(&mut ws, 2).await;
    let crm = got.iter().find(|d| d.0 == "crm").expect("crm copy").clone();
    let default = got.iter().find(|d| d.0 == "default").expect("default copy").clone();
    raw::send(&mut ws, &Frame::ack([("crm", crm.1.as_str())])).await.expect("ack");
    assert_drained(&store, "crm").await;
    assert_eq!(pending(&store, "default").await, 1, "default's copy is still owed");
    drop(ws);

    // Next session: the late duplicate ack, an ack naming a channel
    // outside the session, and an id-only ack from an agent that names
    // channels must not settle `default`.
    let mut ws = session(&edge, &certs, &h).await;
    let again = deliveries(&mut ws, 1).await;
    assert_eq!(again[0].0, "default", "own pending entry redelivered first: {again:?}");
    assert_eq!(again[0].1, default.1);
    raw::send(&mut ws, &Frame::ack([("crm", crm.1.as_str())])).await.expect("late ack");
    raw::send(&mut ws, &Frame::ack([("other", default.1.as_str())])).await.expect("foreign ack");
    raw::send(&mut ws, &Frame::Ack { ids: vec![default.1.clone()], channels: vec![] }).await.expect("id-only ack");
    raw::send(&mut ws, &Frame::Ping { t: 1 }).await.expect("ping");
    // The Pong is the edge's answer to the ping sent after the acks, so
    // they were all handled by then.
    loop {
        match raw::recv(&mut ws).await {
            Ok(Some(Frame::Pong { t: 1 })) => break,
            Ok(Some(_)) => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }
    assert_eq!(pending(&store, "default").await, 1, "only an ack naming default settles it");
    raw::send(&mut ws, &Frame::ack([("default", default.1.as_str())])).await.expect("ack");
    assert_drained(&store, "default").await;
    assert_eq!(xlen(&store, "crm", "dlq").await + xlen(&store, "default", "dlq").await, 0);
    edge.stop().await;
}

/// An agent from before acks named channels: refused a session of two
/// channels (its ids would be ambiguous), served a session of one, where
/// an id alone settles that channel's entry.
async fn an_agent_that_names_ids_only_gets_one_channel(store: Backing) {
    let (certs, edge) = start(&store).await;
    let mut ws = raw::connect(&edge, &certs, "lan-1").await.expect("connect");
    raw::send(&mut ws, &hello(10, &["crm", "default"], false)).await.expect("hello");
    let (code, message) = raw::recv_error(&mut ws).await.expect("refused");
    assert_eq!(code, "upgrade_required", "{message}");
    assert!(message.contains("upgrade relay-agent"), "{message}");

    let mut ws = session(&edge, &certs, &hello(10, &["crm"], false)).await;
    post_fan(&edge, "{\"n\":1}").await;
    let got = deliveries(&mut ws, 1).await;
    assert_eq!(got[0].0, "crm");
    raw::send(&mut ws, &Frame::Ack { ids: vec![got[0].1.clone()], channels: vec![] }).await.expect("old ack");
    assert_drained(&store, "crm").await;
    assert_eq!(store.snapshot("default").await.unacked(), 1, "default's copy waits for its own agent");
    edge.stop().await;
}

/// A thousand transient nacks of one entry: one redelivery, not a
/// thousand (each nack used to spawn its own timer task and resend).
async fn repeated_nacks_schedule_one_redelivery(store: Backing) {
    let (certs, edge) = start(&store).await;
    let mut ws = session(&edge, &certs, &hello(10, &["crm"], true)).await;
    let (status, _) = post(&reqwest::Client::new(), &edge.hook_url("hooks"), KEY, b"{}".to_vec()).await;
    assert_eq!(status, 200);
    let got = deliveries(&mut ws, 1).await;
    let id = got[0].1.clone();
    for _ in 0..1000 {
        let nack = Frame::Nack {
            channel: Some("crm".into()),
            id: id.clone(),
            permanent: false,
            reason: "503".into(),
            // Long enough that all 1000 are in before it is due (a nack
            // after the redelivery is a nack of the new attempt).
            retry_after_ms: Some(1000),
            status: Some(503),
        };
        raw::send(&mut ws, &nack).await.expect("nack");
    }
    let again = deliveries_within(&mut ws, Duration::from_millis(2500)).await;
    assert_eq!(again, vec![("crm".to_string(), id.clone(), 2)], "exactly one redelivery, attempt 2");
    raw::send(&mut ws, &Frame::ack([("crm", id.as_str())])).await.expect("ack");
    assert_drained(&store, "crm").await;
    edge.stop().await;
}

/// `tunnel.session_bytes` bounds what one session holds, whatever its
/// window: ten webhooks of 60 KiB with a budget of 512 KiB and a window of
/// 100 reach the agent only as far as the budget allows, the rest once it
/// settles some.
async fn a_session_holds_at_most_its_byte_budget(store: Backing) {
    init_tracing();
    let certs = Certs::generate();
    let mut cfg = fan_out_config(&store, &certs);
    cfg.ingest.max_body = bytesize_kib(64);
    cfg.tunnel.max_frame = bytesize_kib(256);
    cfg.tunnel.session_bytes = bytesize_kib(512);
    let edge = Edge::start(cfg).await;
    let client = reqwest::Client::new();
    for i in 0..10 {
        let body = format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(60 * 1024));
        let (status, _) = post(&client, &edge.hook_url("hooks"), KEY, body.into_bytes()).await;
        assert_eq!(status, 200);
    }
    let mut ws = session(&edge, &certs, &hello(100, &["crm"], true)).await;
    let held = deliveries_within(&mut ws, Duration::from_millis(1500)).await;
    assert!(!held.is_empty(), "something is delivered");
    assert!(held.len() * 60 * 1024 <= 512 * 1024, "{} deliveries of 60 KiB exceed the 512 KiB budget", held.len());
    let acks: Vec<(&str, &str)> = held.iter().map(|d| (d.0.as_str(), d.1.as_str())).collect();
    raw::send(&mut ws, &Frame::ack(acks)).await.expect("ack");
    let rest = deliveries(&mut ws, 10 - held.len()).await;
    assert!(rest.iter().all(|d| !held.contains(d)), "the rest, after the acks");
    edge.stop().await;
}

/// `window = 1` over two channels, one idle: the busy one drains at the
/// speed of the acks, not one entry per blocking read of the idle one.
async fn an_idle_channel_does_not_slow_a_busy_one(store: Backing) {
    let (certs, edge) = start(&store).await;
    post_small(&edge, 20).await;
    let mut ws = session(&edge, &certs, &hello(1, &["crm", "default"], true)).await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let d = deliveries(&mut ws, 1).await;
        raw::send(&mut ws, &Frame::ack([(d[0].0.as_str(), d[0].1.as_str())])).await.expect("ack");
    }
    // store.block is 500 ms here: one blocking read per delivery would take 10 s.
    assert!(started.elapsed() < Duration::from_secs(6), "20 deliveries took {:?}", started.elapsed());
    edge.stop().await;
}

/// The byte budget counts real sizes: small webhooks fill the agent's
/// whole window (64), not the budget divided by the largest frame.
async fn small_webhooks_fill_the_whole_window(store: Backing) {
    let (certs, edge) = start(&store).await;
    post_small(&edge, 80).await;
    let mut ws = session(&edge, &certs, &hello(64, &["crm"], true)).await;
    let first = deliveries(&mut ws, 64).await;
    let more = deliveries_within(&mut ws, Duration::from_millis(800)).await;
    assert!(more.is_empty(), "the window is 64: {} more", more.len());
    raw::send(&mut ws, &Frame::ack([(first[0].0.as_str(), first[0].1.as_str())])).await.expect("ack");
    assert_eq!(deliveries(&mut ws, 1).await.len(), 1);
    edge.stop().await;
}

/// `window = 1` over two busy channels: a read takes one entry of each and
/// the grant only one; the other waits, read once, so every first delivery
/// is attempt 1 (re-reading it from the pending list would count up).
async fn attempts_count_deliveries_not_reads(store: Backing) {
    let (certs, edge) = start(&store).await;
    for i in 0..10 {
        post_fan(&edge, &format!("{{\"i\":{i}}}")).await;
    }
    let mut ws = session(&edge, &certs, &hello(1, &["crm", "default"], true)).await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let d = deliveries(&mut ws, 1).await;
        raw::send(&mut ws, &Frame::ack([(d[0].0.as_str(), d[0].1.as_str())])).await.expect("ack");
        seen.push(d[0].clone());
    }
    assert!(seen.iter().all(|d| d.2 == 1), "first deliveries are attempt 1: {seen:?}");
    assert_eq!(seen.iter().filter(|d| d.0 == "crm").count(), 10, "both channels served: {seen:?}");
    edge.stop().await;
}

/// Posts `n` small webhooks to route `hooks` (channel `crm`).
async fn post_small(edge: &Edge, n: usize) {
    let client = reqwest::Client::new();
    for i in 0..n {
        let (status, _) = post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"i\":{i}}}").into_bytes()).await;
        assert_eq!(status, 200);
    }
}

fn bytesize_kib(n: u64) -> bytesize::ByteSize {
    bytesize::ByteSize::kib(n)
}
