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

/// Appends announced together wake as many sessions on another edge as
/// they are appends: three webhooks posted at once on edge A, three
/// sessions waiting on edge B, each reading one entry. All three are
/// woken by the announcements, none left to its next look (`block`, 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_announced_together_wake_as_many_sessions_elsewhere() {
    use relay_edge::store::{Backend, BlockingRead, Cursor};
    init_tracing();
    let backing = Backing::redis();
    let open = || {
        let mut cfg = relay_edge::config::StoreConfig::default();
        backing.apply(&mut cfg);
        cfg.block = Duration::from_secs(10);
        relay_edge::store::Store::open(&cfg, Default::default()).expect("open the store")
    };
    let (a, b) = (open(), open());
    a.ensure_group("crm").await.expect("group");
    // B's subscriber is up once an append on A wakes a waiting read on B.
    let probe = a.clone();
    let mut reader = b.reader().await.expect("reader");
    let cursors = [("crm".to_string(), Cursor::New)];
    let first = tokio::spawn(async move { reader.read("probe", &cursors, 1).await.map(|e| e.len()) });
    wait_for(Duration::from_secs(10), "B's subscriber is up and woke the probe", || {
        let probe = probe.clone();
        let done = first.is_finished();
        async move {
            if !done {
                probe.append(&["crm".to_string()], &webhook(0)).await.expect("append");
            }
            done
        }
    })
    .await;
    // Take what the probing appended beyond the probe's one entry (a read
    // that finds nothing waits: bounded here), so the sessions below wait.
    let mut drain = b.reader().await.expect("reader");
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        drain.read("drain", &[("crm".to_string(), Cursor::New)], 1000),
    )
    .await;
    let Backing::Redis(server) = &backing else { unreachable!("a Redis backing") };
    let reads_before = xreadgroup_calls(server).await;

    let mut waiting = Vec::new();
    for i in 0..3 {
        let mut reader = b.reader().await.expect("reader");
        waiting.push(tokio::spawn(async move {
            let t = Instant::now();
            let got = reader.read(&format!("s{i}"), &[("crm".to_string(), Cursor::New)], 1).await.expect("read");
            (got.len(), t.elapsed())
        }));
    }
    // All three read, found nothing and wait.
    wait_for(Duration::from_secs(10), "three sessions waiting", || async {
        xreadgroup_calls(server).await >= reads_before + 3
    })
    .await;
    let (crm, hooks) = (["crm".to_string()], [webhook(1), webhook(2), webhook(3)]);
    let appends = hooks.iter().map(|w| a.append(&crm, w));
    for r in futures_util::future::join_all(appends).await {
        r.expect("append");
    }
    for w in waiting {
        let (got, took) = w.await.expect("session");
        assert_eq!(got, 1, "each session read one entry");
        assert!(took < Duration::from_secs(5), "woken by the announcement, not its next look: {took:?}");
    }
}

/// A raw agent on an edge with a 300 ms heartbeat: answers the edge's
/// Pings, sends its own every `ping_every` (never, with `None`) from
/// `offset` after the Welcome, for 3 s. Returns how many Pings the edge sent
/// and, for each, how long after the edge's last Pong it came, and how many
/// Pongs it sent.
async fn edge_pings(ping_every: Option<Duration>, offset: Duration) -> (usize, Vec<Duration>, usize) {
    use relay_protocol::{Frame, VERSION};
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.tunnel.heartbeat = Duration::from_millis(300);
    let edge = Edge::start(cfg).await;
    let mut ws = raw::connect(&edge, &certs, "lan-1").await.expect("connect");
    let hello = Frame::Hello { version: VERSION, window: 8, channels: None, agent_version: None, named_acks: true };
    raw::send(&mut ws, &hello).await.expect("hello");
    assert!(matches!(raw::recv(&mut ws).await, Ok(Some(Frame::Welcome { .. }))), "Welcome");
    let end = Instant::now() + Duration::from_secs(3);
    let mut next_ping = ping_every.map(|_| Instant::now() + offset);
    let (mut pings, mut after_pong, mut last_pong, mut pongs) = (0, Vec::new(), None::<Instant>, 0);
    while Instant::now() < end {
        let until = next_ping.unwrap_or(end).min(end);
        match tokio::time::timeout_at(until.into(), raw::recv(&mut ws)).await {
            Err(_) => {
                if let (Some(at), Some(every)) = (next_ping.as_mut(), ping_every)
                    && Instant::now() >= *at
                {
                    raw::send(&mut ws, &Frame::Ping { t: 7 }).await.expect("ping");
                    *at += every;
                }
            }
            Ok(Ok(Some(Frame::Ping { t }))) => {
                pings += 1;
                if let Some(p) = last_pong {
                    after_pong.push(p.elapsed());
                }
                raw::send(&mut ws, &Frame::Pong { t }).await.expect("pong");
            }
            Ok(Ok(Some(Frame::Pong { .. }))) => {
                pongs += 1;
                last_pong = Some(Instant::now());
            }
            Ok(Ok(Some(Frame::Stats { .. }))) => {}
            other => panic!("the session ended or sent something else: {other:?}"),
        }
    }
    (pings, after_pong, pongs)
}

/// An agent that pings as often as the edge: each Ping is answered, and
/// the edge's own Ping (for the RTT) rides along with a Pong only every
/// six heartbeats: per heartbeat an idle session costs the edge one frame
/// in and one out, and no timer of its own (before: a Ping every
/// heartbeat, 7 to 12 in these 3 s, and a ticker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edges_ping_rides_along_with_a_pong_every_six_heartbeats() {
    let (pings, after_pong, pongs) = edge_pings(Some(Duration::from_millis(300)), Duration::from_millis(150)).await;
    assert!((9..=11).contains(&pongs), "{pongs} Pongs to 10 Pings");
    // At the first Ping, then 5.5 heartbeats later at the earliest.
    assert!((1..=2).contains(&pings), "{pings} Pings from the edge in 3 s at a 300 ms heartbeat");
    assert!(after_pong.iter().all(|d| *d < Duration::from_millis(50)), "Pings not right after a Pong: {after_pong:?}");
}

/// An agent that never pings (an older or idle one) still hears the
/// edge's Pings, at least every 1.5 heartbeats, and stays connected past
/// the 3-heartbeat deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_pings_still_gets_the_edges_pings() {
    let (pings, _, _) = edge_pings(None, Duration::ZERO).await;
    // 3 s at 300 ms, a Ping each 1.5 to 2 heartbeats: 5 to 7, with the first.
    assert!((5..=8).contains(&pings), "{pings} Pings from the edge in 3 s at a 300 ms heartbeat");
}
