//! Idle sessions on Redis: no connection each, no command while idle, and
//! still woken at once by an append, on this edge or another one sharing
//! the Redis (the append announcements of `store/redis_store/appends.rs`).

use std::time::{Duration, Instant};

use relay_edge::config::AgentGrant;
use testkit::*;

async fn redis_clients(server: &RedisServer) -> usize {
    let mut conn = server.conn().await;
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.expect("CLIENT LIST");
    // Less the connection asking.
    list.lines().count().saturating_sub(1)
}

async fn xreadgroup_calls(server: &RedisServer) -> u64 {
    let mut conn = server.conn().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xreadgroup:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_hold_no_redis_connection_and_send_nothing() {
    init_tracing();
    let store = Backing::redis();
    let certs = Certs::generate();
    const AGENTS: usize = 20;
    let names: Vec<String> = (0..AGENTS).map(|i| format!("idle-{i}")).collect();
    for name in &names {
        relay_edge::certs::agent(certs.dir.path(), name).expect("agent cert");
    }
    let mut cfg = edge_config(&store, &certs);
    // A long wait for new entries: a webhook that arrives sooner than this
    // was announced, not found by a poll.
    cfg.store.command_timeout = Duration::from_secs(3);
    cfg.store.block = Duration::from_secs(8);
    cfg.agents.extend(names.iter().map(|n| AgentGrant { name: n.clone(), channels: vec!["crm".into()] }));
    cfg.validate().expect("valid");
    let edge = Edge::start(cfg.clone()).await;
    let other_edge = Edge::start(cfg).await;
    let rx = Receiver::start().await;
    let Backing::Redis(server) = &store else { unreachable!("redis") };
    // One session first (it starts the edge's subscriber), then the rest.
    let mut agents = vec![Agent::start(agent_config(&edge, &certs, &names[0], &[("crm", rx.url())]))];
    agents[0].wait_connected(Duration::from_secs(10)).await;
    let with_one = redis_clients(server).await;
    for name in &names[1..] {
        agents.push(Agent::start(agent_config(&edge, &certs, name, &[("crm", rx.url())])));
    }
    for a in &agents {
        a.wait_connected(Duration::from_secs(10)).await;
    }
    let with_all = redis_clients(server).await;
    // Per edge at most 1 for commands, 4 for reads, 1 subscriber (no
    // replica waits here), whatever the number of sessions.
    assert!(
        with_all <= 2 * 6,
        "{AGENTS} sessions on two edges hold {with_all} Redis connections ({with_one} with one)"
    );

    // Settled: the sessions' first looks are done once the count stops moving.
    let settle = Instant::now();
    let mut last = xreadgroup_calls(server).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await; // poll interval of the wait
        let now = xreadgroup_calls(server).await;
        if std::mem::replace(&mut last, now) == now {
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(10), "the sessions kept reading: {now} reads");
    }
    let before = xreadgroup_calls(server).await;
    // Negative check: nothing to wait for; idle sessions must send no read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_reads = xreadgroup_calls(server).await - before;
    assert_eq!(idle_reads, 0, "{AGENTS} idle sessions read {idle_reads} times in 3 s");

    // Woken by an append on their edge, and by one on another edge.
    let client = reqwest::Client::new();
    for (i, via) in [&edge, &other_edge].into_iter().enumerate() {
        let sent = Instant::now();
        let (status, body) = post(&client, &via.hook_url("hooks"), KEY, format!("{{\"n\":{i}}}").into_bytes()).await;
        assert_eq!(status, 200, "{body}");
        wait_until(Duration::from_secs(20), "the webhook delivered", || rx.accepted().len() > i).await;
        let took = sent.elapsed();
        assert!(took < Duration::from_secs(2), "webhook {i} took {took:?}: found by a poll, not woken");
        eprintln!("idle sessions: webhook {i} delivered {took:?} after the post");
    }
    for a in agents {
        a.stop().await;
    }
}
