//! Operations: `relay-agent status` in every state (through the real
//! binary), Prometheus metrics and `/health`, SIGTERM under load on real
//! processes, and the reference relay's environment aliases.

use std::time::Duration;

use testkit::*;

/// `relay-agent status --json --socket S` through the real binary.
async fn status_cmd(socket: &std::path::Path) -> (i32, serde_json::Value) {
    let socket = socket.display().to_string();
    let (code, out, _) = run_bin("relay-agent", &["status", "--json", "--socket", &socket]).await;
    (code, serde_json::from_slice(out.as_bytes()).unwrap_or_default())
}

async fn status_reports_each_state_with_its_exit_code(store: Backing) {
    init_tracing();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let cfg = edge_config(&store, &certs);
    let edge = Edge::start(cfg.clone()).await;
    let proxy = FaultProxy::start(edge.tunnel).await;
    let mut acfg = agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]);
    acfg.edge = format!("wss://127.0.0.1:{}", proxy.addr.port());
    let socket = acfg.status_socket.clone();

    // Not running.
    let (code, v) = status_cmd(&socket).await;
    assert_eq!(code, 2, "{v}");
    assert_eq!(v["running"], false);

    // Connected.
    let agent = Agent::start(acfg);
    agent.wait_connected(Duration::from_secs(10)).await;
    let client = reqwest::Client::new();
    let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, b"{}".to_vec()).await;
    assert_eq!(s, 200);
    wait_until(Duration::from_secs(10), "delivered", || rx.accepted().len() == 1).await;
    wait_until(Duration::from_secs(10), "the ack counted, a heartbeat round trip and a Stats frame", || {
        agent.status().is_ok_and(|s| {
            s.healthy(now())
                && s.delivered == 1
                && s.last_rtt_ms.is_some()
                && s.channels.first().is_some_and(|c| c.channel == "crm")
                && s.targets.first().is_some_and(|t| t.last_status == Some(200))
        })
    })
    .await;
    let (code, v) = status_cmd(&socket).await;
    assert_eq!(code, 0, "{v}");
    for field in [
        "connected",
        "edge",
        "edge_addr",
        "agent",
        "session",
        "connected_since_ms",
        "last_rtt_ms",
        "last_heartbeat_ms",
        "window",
        "in_flight",
        "delivered",
        "retried",
        "failed",
        "dead_lettered",
        "reconnects",
        "last_error",
        "targets",
        "channels",
        "cert_expires_at_ms",
        "healthy",
    ] {
        assert!(v.get(field).is_some(), "status JSON lacks `{field}`: {v}");
    }
    assert_eq!(v["connected"], true);
    assert_eq!(v["healthy"], true);
    assert_eq!(v["agent"], "lan-1");
    assert_eq!(v["delivered"], 1);
    assert!(v["last_rtt_ms"].as_f64().is_some(), "{v}");
    assert_eq!(v["channels"][0]["channel"], "crm", "the edge reports the backlog: {v}");
    assert_eq!(v["targets"][0]["last_status"], 200);

    // Stale: the link stays open but carries nothing.
    proxy.set(Mode::BlackHole);
    let mut stale = None;
    for _ in 0..100 {
        let (code, v) = status_cmd(&socket).await;
        if code == 1 {
            stale = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = stale.expect("a black-holed link is reported within the heartbeat deadline");
    assert_eq!(v["healthy"], false, "{v}");
    // The agent notices by its own heartbeat deadline (the black hole also
    // swallows the edge's close); later reconnect attempts through the black
    // hole overwrite `last_error`, so collect what it showed.
    let mut errors = Vec::new();
    wait_until(Duration::from_secs(10), "the agent drops the dead link", || {
        let s = agent.status();
        if let Some(e) = s.as_ref().ok().and_then(|s| s.last_error.clone())
            && !errors.contains(&e)
        {
            errors.push(e);
        }
        errors.iter().any(|e| e.contains("heartbeat")) && s.is_ok_and(|s| !s.connected)
    })
    .await;

    // Back to normal: reconnects by itself.
    proxy.set(Mode::Pass);
    proxy.cut();
    wait_until(Duration::from_secs(15), "reconnected", || agent.status().is_ok_and(|s| s.healthy(now()))).await;
    let (code, v) = status_cmd(&socket).await;
    assert_eq!(code, 0, "{v}");
    assert!(v["reconnects"].as_u64().unwrap_or(0) >= 1);

    // Edge down.
    edge.stop().await;
    wait_until(Duration::from_secs(10), "disconnected", || agent.status().is_ok_and(|s| !s.connected)).await;
    let (code, v) = status_cmd(&socket).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["connected"], false);
    assert!(v["last_error"].is_string(), "{v}");

    // Not running again.
    agent.stop().await;
    let (code, _) = status_cmd(&socket).await;
    assert_eq!(code, 2);
}

fn now() -> u64 {
    relay_agent::status::now_ms()
}

/// Checks the Prometheus text format line by line; returns samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF"
                    || line.starts_with("# UNIT "),
                "bad comment line: {line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let metric = name.split('{').next().unwrap_or_default();
        assert!(
            !metric.is_empty() && metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = name.strip_prefix(metric) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "bad labels: {line}");
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        samples.push((name.to_string(), v));
    }
    samples
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_traffic_and_health_reports_redis_down() {
    init_tracing();
    let mut store = Backing::redis();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    let client = reqwest::Client::new();
    let scrape = || async {
        let text = client
            .get(format!("http://{}/metrics", edge.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        parse_prometheus(&text)
    };
    let before = scrape().await;
    assert_eq!(sample(&before, "relay_webhooks_received_total"), 0.0);
    for i in 0..5 {
        let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"i\":{i}}}").into_bytes()).await;
        assert_eq!(s, 200);
    }
    let (s, _) = post(&client, &edge.hook_url("hooks"), "wrong-key-0", b"{}".to_vec()).await;
    assert_eq!(s, 401);
    wait_until(Duration::from_secs(10), "delivered", || rx.accepted().len() == 5).await;
    // The acks processed and the gauges refreshed (every 500 ms) after them.
    wait_for(Duration::from_secs(10), "acks counted and gauges refreshed", || async {
        let s = scrape().await;
        sample(&s, "relay_deliveries_total{channel=\"crm\",outcome=\"acked\"}") == 5.0
            && sample(&s, "relay_delivery_latency_seconds_count") == 5.0
            && sample(&s, "relay_stream_length{channel=\"crm\"}") == 5.0
            && sample(&s, "relay_backlog{channel=\"crm\"}") == 0.0
    })
    .await;
    let after = scrape().await;
    assert_eq!(sample(&after, "relay_webhooks_received_total"), 5.0);
    assert_eq!(sample(&after, "relay_ingest_requests_total{route=\"hooks\",status=\"200\"}"), 5.0);
    assert_eq!(sample(&after, "relay_ingest_requests_total{route=\"hooks\",status=\"401\"}"), 1.0);
    assert_eq!(sample(&after, "relay_deliveries_total{channel=\"crm\",outcome=\"acked\"}"), 5.0);
    assert_eq!(sample(&after, "relay_delivery_latency_seconds_count"), 5.0);
    assert_eq!(sample(&after, "relay_agents_connected"), 1.0);
    assert_eq!(sample(&after, "relay_stream_length{channel=\"crm\"}"), 5.0);
    assert_eq!(sample(&after, "relay_backlog{channel=\"crm\"}"), 0.0);
    assert!(sample(&after, "relay_sessions_opened_total") >= 1.0);

    let health: serde_json::Value = serde_json::from_str(
        &client.get(format!("http://{}/health", edge.admin)).send().await.expect("health").text().await.expect("t"),
    )
    .expect("json");
    assert_eq!(health["redis"], "up");
    assert_eq!(health["webhooks_received"], 5);
    assert_eq!(health["webhooks_processed"], 5);
    assert_eq!(health["agents"][0]["agent"], "lan-1");

    store.redis_server().kill();
    let health: serde_json::Value = serde_json::from_str(
        &client.get(format!("http://{}/health", edge.admin)).send().await.expect("health").text().await.expect("t"),
    )
    .expect("json");
    assert_eq!(health["redis"], "down", "{health}");
    assert_eq!(health["status"], "degraded");
    let ready = client.get(format!("http://{}/ready", edge.admin)).send().await.expect("ready");
    assert_eq!(ready.status(), 503);
    let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, b"{}".to_vec()).await;
    assert_eq!(s, 503);
    let text = scrape().await;
    assert!(sample(&text, "relay_store_errors_total") >= 1.0);
    assert_eq!(sample(&text, "relay_redis_errors_total"), sample(&text, "relay_store_errors_total"), "the alias");
    agent.stop().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_command_lists_connected_agents() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let (edge, agent, _rx) = edge_with_agent(edge_config(&store, &certs), &certs, "lan-2").await;
    let url = format!("http://{}/admin/agents", edge.admin);
    wait_for(Duration::from_secs(10), "the edge measured a heartbeat round trip", || async {
        let Ok(resp) = reqwest::get(&url).await else { return false };
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap_or_default()).unwrap_or_default();
        v["agents"][0]["last_rtt_ms"].is_f64()
    })
    .await;
    let (code, out, err) = edge_cli(&edge, &["agents", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let a = &v["agents"][0];
    assert_eq!(a["agent"], "lan-2");
    assert_eq!(a["channels"][0], "crm");
    assert!(a["in_flight"].is_u64() && a["last_rtt_ms"].is_f64(), "{a}");
    let (code, out, _) = edge_cli(&edge, &["agents"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("lan-2") && out.contains("1 agents connected"), "{out}");
    agent.stop().await;
    edge.stop().await;
}

both_backends!(status_reports_each_state_with_its_exit_code,);
