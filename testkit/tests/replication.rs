//! Redis beyond one host, with real servers: `store.durability = "replica"`
//! (a `200` only once a replica confirmed the write), a Sentinel failover
//! under load (three sentinels, a master and two replicas; the master is
//! killed; the edge follows the sentinels to the promoted replica), and a
//! Redis Cluster failover under load (a master of three is killed; its
//! replica takes over its slots). Nothing answered `200` is lost.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_edge::config::{Durability, Secret};
use testkit::redis_server::MASTER_NAME;
use testkit::*;

fn stop(server: &RedisServer, sig: &str) {
    let pid = server.pid().expect("running").to_string();
    let ok = std::process::Command::new("kill").args([sig, &pid]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

async fn stream_len(server: &RedisServer, channel: &str) -> u64 {
    let mut conn = server.conn().await;
    redis::cmd("XLEN").arg(relay_edge::store::keys::stream(channel)).query_async(&mut conn).await.expect("XLEN")
}

/// A `200` means the replica has the webhook; without a replica's
/// confirmation the edge answers `503` within `replica_timeout` (and acks
/// and reads are not stuck behind the wait meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replica_durability_a_200_means_a_replica_has_it() {
    init_tracing();
    let master = Backing::redis();
    let replica = {
        let Backing::Redis(server) = &master else { unreachable!("redis") };
        RedisServer::replica_of(server)
    };
    let certs = Certs::generate();
    let mut cfg = edge_config(&master, &certs);
    cfg.store.durability = Durability::Replica;
    cfg.store.replica_timeout = Duration::from_millis(400);
    cfg.validate().expect("valid");
    let (edge, agent, rx) = edge_with_agent(cfg, &certs, "lan-1").await;
    let client = reqwest::Client::new();
    let url = edge.hook_url("hooks");

    let (status, body) = post(&client, &url, KEY, br#"{"n":1}"#.to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stream_len(&replica, "crm").await, 1, "the replica had it when the edge answered 200");

    stop(&replica, "-STOP");
    let started = Instant::now();
    let (status, body) = post(&client, &url, KEY, br#"{"n":2}"#.to_vec()).await;
    assert_eq!(status, 503, "no replica confirmed it: {body}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    // The first webhook is delivered and acknowledged meanwhile: acks do
    // not wait behind a WAIT.
    wait_until(Duration::from_secs(10), "the first webhook delivered", || rx.distinct_accepted() >= 1).await;
    let backing = &master;
    wait_for(Duration::from_secs(10), "its ack stored while the replica is stopped", || async {
        let snap = backing.snapshot("crm").await;
        snap.stats.pending == 0 && snap.stats.backlog <= 1
    })
    .await;

    stop(&replica, "-CONT");
    wait_for(Duration::from_secs(10), "200 again once the replica is back", || async {
        post(&client, &url, KEY, br#"{"n":3}"#.to_vec()).await.0 == 200
    })
    .await;
    agent.stop().await;
}

/// Three sentinels, a master and two replicas; webhooks posted by 8
/// senders while the master is killed. The sentinels promote a replica, the
/// edge follows them, and every webhook answered `200` (before, during or
/// after the failover) is delivered. Two replicas, because with
/// `durability = "replica"` the promoted one needs a replica of its own
/// before anything is answered `200` again. Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_loses_nothing_answered_200() {
    init_tracing();
    let mut master = RedisServer::start();
    let replicas = [RedisServer::replica_of(&master), RedisServer::replica_of(&master)];
    let sentinels: Vec<RedisServer> = (0..3).map(|_| RedisServer::sentinel_of(&master)).collect();
    // Each sentinel knows the replicas and the two other sentinels (so a
    // majority can authorize a failover).
    for s in &sentinels {
        wait_until(Duration::from_secs(30), "sentinels know each other and the replicas", || {
            let info = s.info("sentinel");
            info.contains("slaves=2") && info.contains("sentinels=3")
        })
        .await;
    }
    let certs = Certs::generate();
    let backing = Backing::embedded(); // replaced below: the edge uses the sentinels
    let mut cfg = edge_config(&backing, &certs);
    cfg.store.redis_url = None;
    cfg.store.sentinel_master = Some(MASTER_NAME.into());
    cfg.store.sentinel_addrs = sentinels.iter().map(|s| Secret::new(s.sentinel_url())).collect();
    cfg.store.durability = Durability::Replica;
    cfg.store.replica_timeout = Duration::from_millis(500);
    cfg.validate().expect("valid");
    let (edge, agent, rx) = edge_with_agent(cfg, &certs, "lan-1").await;

    let run = load_through_failover(&edge, &rx, async { master.kill() }).await;
    assert!(run.is_some(), "no 200s 60 s after the kill; a sentinel's log:\n{}", sentinels[0].sentinel_log());
    let promoted = replicas.iter().filter(|r| r.info("replication").contains("role:master")).count();
    assert_eq!(promoted, 1, "one replica was promoted");
    agent.stop().await;
    drop(sentinels);
}

/// A Redis Cluster of three masters with two replicas each; webhooks
/// posted by 8 senders while the master serving the channel is killed.
/// Its replica takes over its slots, the edge's cluster client follows the
/// new slot map, and every webhook answered `200` is delivered. Two
/// replicas each for the reason of the Sentinel test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_under_load_loses_nothing_answered_200() {
    init_tracing();
    let mut backing = Backing::Cluster(RedisCluster::start_with(3, 2));
    let certs = Certs::generate();
    let mut cfg = edge_config(&backing, &certs);
    cfg.store.durability = Durability::Replica;
    cfg.store.replica_timeout = Duration::from_millis(500);
    cfg.validate().expect("valid");
    let (edge, agent, rx) = edge_with_agent(cfg, &certs, "lan-1").await;
    let Backing::Cluster(cluster) = &mut backing else { unreachable!("cluster") };
    // The edge's connections over all nine nodes (each count includes the
    // one asking, and replicas count their masters' link to them).
    let clients: usize = cluster
        .nodes
        .iter()
        .map(|n| {
            let info = n.info("clients");
            let line = info.lines().find_map(|l| l.strip_prefix("connected_clients:")).unwrap_or("0");
            line.trim().parse::<usize>().unwrap_or(0).saturating_sub(1)
        })
        .sum();
    eprintln!("cluster: {clients} client connections over {} nodes, the edge's among them", cluster.nodes.len());
    assert!(clients <= 64, "{clients} connections");
    let victim = cluster.master_of(&relay_edge::store::keys::stream("crm"));
    let run = load_through_failover(&edge, &rx, async { cluster.nodes[victim].kill() }).await;
    assert!(run.is_some(), "no 200s 60 s after killing the master of `crm`");
    let now = cluster.master_of(&relay_edge::store::keys::stream("crm"));
    assert_ne!(now, victim, "a replica serves the channel's slot now");
    agent.stop().await;
}

/// 8 senders post webhooks through `edge` until 200 were answered, then
/// `disrupt` runs, and they go on until it is done and 200 more were
/// answered (`None` when that takes over 60 s after it started). Then every webhook answered `200` must reach
/// `rx`. Prints the figures.
async fn load_through_failover(
    edge: &Edge,
    rx: &Receiver,
    disrupt: impl Future<Output = ()>,
) -> Option<(Duration, std::collections::BTreeMap<String, u64>)> {
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    // Why senders were refused: a status code, or the client's error.
    let refused = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let stop_load = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for s in 0..8u64 {
        let (answered, refused, stop_load) = (answered.clone(), refused.clone(), stop_load.clone());
        let url = edge.hook_url("hooks");
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
            let mut i = 0u64;
            while !stop_load.is_cancelled() {
                let n = s * 1_000_000 + i;
                i += 1;
                let body = format!("{{\"n\":{n}}}");
                let sent = client.post(&url).header("x-api-key", KEY).body(body).send().await;
                let sent = match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let text = r.text().await.unwrap_or_default();
                        if status != 200 && status != 429 {
                            eprintln!("refused {status}: {text}");
                        }
                        Ok(status)
                    }
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(200) => {
                        answered.lock().expect("lock").insert(n);
                    }
                    other => {
                        let why = match other {
                            Ok(status) => status.to_string(),
                            Err(e) if e.is_timeout() => "timeout".into(),
                            Err(_) => "connection".into(),
                        };
                        *refused.lock().expect("lock").entry(why).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await; // a sender's retry pause
                    }
                }
            }
        }));
    }
    let count = || answered.lock().expect("lock").len();
    wait_until(Duration::from_secs(20), "load flowing before the failover", || count() >= 200).await;
    let before = count();
    let killed_at = Instant::now();
    let recovered = tokio::time::timeout(Duration::from_secs(60), async {
        disrupt.await;
        let before = count().max(before);
        while count() < before + 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let recovered_after = killed_at.elapsed();
    stop_load.cancel();
    for s in senders {
        s.await.expect("sender");
    }
    recovered.ok()?;
    let answered: BTreeSet<u64> = answered.lock().expect("lock").clone();
    let delivered_all = || {
        let got: BTreeSet<u64> = rx
            .accepted()
            .iter()
            .filter_map(|d| serde_json::from_slice::<serde_json::Value>(&d.body).ok()?["n"].as_u64())
            .collect();
        answered.is_subset(&got)
    };
    wait_until(Duration::from_secs(60), "every webhook answered 200 delivered", delivered_all).await;
    let accepted = rx.accepted().len();
    let distinct = rx.distinct_accepted();
    eprintln!(
        "failover: answered 200 {}, refused {:?}, delivered {distinct} distinct ({} duplicates), lost 0, \
         200s again {recovered_after:?} after the disruption began",
        answered.len(),
        refused.lock().expect("lock"),
        accepted - distinct,
    );
    let refused = refused.lock().expect("lock").clone();
    Some((recovered_after, refused))
}

/// A resharding's redirects were followed, not answered `503` (`429`: the
/// route's rate limit, which 8 busy senders meet), and 200s came back soon.
fn redirects_were_followed(run: Option<(Duration, std::collections::BTreeMap<String, u64>)>) {
    let (recovered, refused) = run.expect("200s again within 60 s after the resharding began");
    assert!(
        refused.keys().all(|why| why == "429"),
        "senders were refused for other reasons than the rate limit: {refused:?}"
    );
    assert!(recovered < Duration::from_secs(10), "{recovered:?}");
}

/// A Redis Cluster of three masters; webhooks posted by 8 senders while
/// the slot of the channel's stream is resharded to another master, one
/// key at a time with a pause at each stage (see
/// [`RedisCluster::migrate_slot`]): the edge meets `ASK` while the slot
/// migrates, `TRYAGAIN` for its scripts over keys on both sides, and
/// `MOVED` after. Every webhook answered `200` is delivered, and the
/// stream, its consumer group and pending entries now live on the new
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_resharded_under_load_loses_nothing_answered_200() {
    init_tracing();
    let backing = Backing::Cluster(RedisCluster::start_with(3, 0));
    let certs = Certs::generate();
    let cfg = edge_config(&backing, &certs);
    let (edge, agent, rx) = edge_with_agent(cfg, &certs, "lan-1").await;
    let Backing::Cluster(cluster) = &backing else { unreachable!("cluster") };
    let stream = relay_edge::store::keys::stream("crm");
    let (slot, from) = (cluster.slot_of(&stream), cluster.master_of(&stream));
    let to = cluster.masters().into_iter().find(|&m| m != from).expect("another master");
    let moved = std::sync::Mutex::new(Vec::new());
    let run = load_through_failover(&edge, &rx, async {
        *moved.lock().expect("lock") = cluster.migrate_slot(slot, to, Duration::from_millis(700)).await;
    })
    .await;
    let moved = moved.into_inner().expect("lock");
    eprintln!("resharding: slot {slot} moved from node {from} to node {to} with keys {moved:?}");
    redirects_were_followed(run);
    assert!(moved.contains(&stream), "the stream itself was moved: {moved:?}");
    assert_eq!(cluster.master_of(&stream), to, "the new master serves the channel");
    agent.stop().await;
}

/// As above, onto a master added after the edge connected, serving no
/// slot until then: the cluster client has no connection to it (its slot
/// map lists only nodes serving slots), so a redirect there is followed
/// only after a probe connects to it; before, each `ASK` there failed
/// (`503`) after redis-rs rebuilt its connections from the seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_resharded_onto_a_new_master_under_load_loses_nothing() {
    init_tracing();
    let mut backing = Backing::Cluster(RedisCluster::start_with(3, 0));
    let certs = Certs::generate();
    let cfg = edge_config(&backing, &certs);
    let (edge, agent, rx) = edge_with_agent(cfg, &certs, "lan-1").await;
    let Backing::Cluster(cluster) = &mut backing else { unreachable!("cluster") };
    let to = cluster.add_master();
    let cluster = &*cluster;
    let stream = relay_edge::store::keys::stream("crm");
    let (slot, from) = (cluster.slot_of(&stream), cluster.master_of(&stream));
    let run = load_through_failover(&edge, &rx, async {
        cluster.migrate_slot(slot, to, Duration::from_millis(700)).await;
    })
    .await;
    eprintln!("resharding: slot {slot} moved from node {from} to the new node {to}");
    redirects_were_followed(run);
    assert_eq!(cluster.master_of(&stream), to, "the new master serves the channel");
    agent.stop().await;
}

/// A reconnected session walks its pending entries per channel. When one
/// channel's master stalls during that walk while another channel's read
/// finds entries, the stalled channel's cursor must stay where it was: its
/// pending entries come on the next read, not only through `XAUTOCLAIM`
/// after `reclaim_after` (a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_master_does_not_skip_a_channels_pending_entries() {
    use relay_edge::store::{Backend, BlockingRead, Cursor};
    use relay_edge::tunnel::fetcher::Fetcher;
    use relay_edge::tunnel::inflight::Grant;
    init_tracing();
    let backing = Backing::cluster();
    let Backing::Cluster(cluster) = &backing else { unreachable!("cluster") };
    let (a, b) = ("crm", ["erp", "billing", "sales", "ops", "hr", "shop"]);
    let master_a = cluster.master_of(&relay_edge::store::keys::stream(a));
    let b = b
        .into_iter()
        .find(|c| cluster.master_of(&relay_edge::store::keys::stream(c)) != master_a)
        .expect("a channel on another master");
    let mut cfg = relay_edge::config::StoreConfig::default();
    backing.apply(&mut cfg);
    cfg.block = Duration::from_millis(300);
    cfg.command_timeout = Duration::from_millis(500);
    let store = relay_edge::store::Store::open(&cfg, Default::default()).expect("open the cluster store");
    for ch in [a, b] {
        store.ensure_group(ch).await.expect("group");
    }
    let a_ids = [
        store.append(&[a.to_string()], &webhook(1)).await.expect("append"),
        store.append(&[a.to_string()], &webhook(2)).await.expect("append"),
    ];
    let b_id = store.append(&[b.to_string()], &webhook(3)).await.expect("append")[0];
    // A session read all three and went away before acking any.
    let cursors = [(a.to_string(), Cursor::New), (b.to_string(), Cursor::New)];
    let first = store.reader().await.expect("reader").read("lan-1", &cursors, 10).await.expect("first read");
    assert_eq!(first.len(), 3, "the first session read everything");

    // The next session's fetcher.
    let channels = vec![a.to_string(), b.to_string()];
    let reader = store.reader().await.expect("reader");
    let mut fetcher = Some(Box::new(Fetcher::new(
        store.clone(),
        reader,
        "lan-1".into(),
        &channels,
        Duration::from_secs(60),
        (1 << 20, std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1 << 20))),
    )));
    let grant = |slots, channels: &[&str]| Grant {
        slots,
        bytes: 4 << 20,
        channels: channels.iter().map(|c| c.to_string()).collect(),
    };
    // Each read on a task of its own, as a session runs it.
    let mut fetch = async |g: Grant| {
        let read = tokio::spawn(fetcher.take().expect("fetcher back").read(g));
        let (back, batch) =
            tokio::time::timeout(Duration::from_secs(5), read).await.expect("a batch in time").expect("read");
        fetcher = Some(back);
        batch
    };
    // One of a's pending entries; a's cursor now sits after it.
    let got = fetch(grant(1, &[a])).await;
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a_ids[0][0]]);

    // b's master stalls while the fetcher reads a's next pending entry and
    // b's pending list.
    let paused = &cluster.nodes[cluster.master_of(&relay_edge::store::keys::stream(b))];
    assert_eq!(paused.command(&["CLIENT", "PAUSE", "1500", "ALL"]).to_lowercase(), "ok");
    let got = fetch(grant(2, &[a, b])).await;
    // a's read answered, b's did not. (Ids are per stream: a's and b's can
    // be equal.)
    let got: Vec<_> = got.iter().map(|e| (e.channel.as_str(), e.id)).collect();
    assert_eq!(got, vec![(a, a_ids[1][0])], "b's master is paused");

    // Once b's master answers again, b's pending entry comes back promptly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut redelivered = None;
    while redelivered.is_none() && Instant::now() < deadline {
        redelivered = fetch(grant(10, &[a, b])).await.into_iter().find(|e| e.channel == b && e.id == b_id);
    }
    let entry = redelivered.expect("b's pending entry within 5 s of the stall, not after reclaim_after (60 s)");
    // Each read of it that Redis ran counts, the timed-out ones included.
    assert!(entry.attempt >= 2, "a redelivery, attempt {}", entry.attempt);
}
