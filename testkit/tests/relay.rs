//! End-to-end tests of the core relay: real redis-server, real TLS, the
//! real edge and agent, a real HTTP receiver.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use testkit::*;

fn body(i: usize) -> Vec<u8> {
    // Bytes a re-encoder would change: escaped unicode, odd spacing.
    format!("{{\"n\": {i},  \"text\":\"caf\\u00e9 \u{1F600}\", \"pad\":\"{}\"}}", "x".repeat(i % 300)).into_bytes()
}

/// Posts `n` webhooks concurrently; returns webhook id → body for every 200.
async fn post_many(url: &str, n: usize, concurrency: usize) -> HashMap<String, Vec<u8>> {
    let client = reqwest::Client::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let url = url.to_string();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        set.spawn(async move {
            let b = body(i);
            let (status, json) = post(&client, &url, KEY, b.clone()).await;
            drop(permit);
            (status, json, b)
        });
    }
    let mut ok = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (status, json, b) = r.expect("task");
        if status == 200 {
            assert_eq!(json["success"], true, "{json}");
            assert!(json["message_id"].as_str().is_some_and(|s| s.contains('-')), "{json}");
            ok.insert(json["webhook_id"].as_str().expect("webhook_id").to_string(), b);
        }
    }
    ok
}

/// Every accepted webhook arrived with identical bytes; returns duplicates.
fn check_all_delivered(sent: &HashMap<String, Vec<u8>>, rx: &Receiver) -> usize {
    let got = rx.accepted();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for d in &got {
        let expected = sent.get(&d.relay_id).unwrap_or_else(|| panic!("unknown X-Relay-Id {}", d.relay_id));
        assert_eq!(&d.body, expected, "body bytes must be identical for {}", d.relay_id);
        *seen.entry(d.relay_id.as_str()).or_default() += 1;
    }
    let missing: Vec<_> = sent.keys().filter(|k| !seen.contains_key(k.as_str())).collect();
    assert!(missing.is_empty(), "{} webhooks answered 200 were never delivered, e.g. {:?}", missing.len(), missing.first());
    seen.values().map(|n| n - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_webhooks_are_each_delivered_once() {
    init_tracing();
    let redis = RedisServer::start();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let edge = Edge::start(edge_config(&redis, &certs)).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;

    let sent = post_many(&edge.hook_url("hooks"), 1000, 64).await;
    assert_eq!(sent.len(), 1000, "every webhook must be answered 200");
    wait_until(Duration::from_secs(30), "1000 deliveries", || rx.accepted().len() >= 1000).await;
    let dups = check_all_delivered(&sent, &rx);
    assert_eq!(dups, 0, "no duplicates without faults");
    // Headers: original ones kept, relay ones added, credentials dropped.
    let d = &rx.accepted()[0];
    let header = |n: &str| d.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header("content-type").as_deref(), Some(&b"application/json"[..]));
    assert_eq!(header("x-relay-attempt").as_deref(), Some(&b"1"[..]));
    assert!(header("x-api-key").is_none(), "the API key must never reach the receiver");
    wait_until(Duration::from_secs(5), "no pending entries", || true).await;
    let mut pending_left = u64::MAX;
    for _ in 0..100 {
        pending_left = pending(&redis, "crm").await;
        if pending_left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending_left, 0, "the stream's pending list must be empty");
    agent.stop().await;
    edge.stop().await;
}
