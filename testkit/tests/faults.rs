//! Nothing lost: the real binaries as processes, broken on purpose under a
//! steady workload, then the invariant — every webhook answered 200 was
//! delivered with its body intact, nothing pending, nothing dead-lettered.

use std::path::PathBuf;
use std::time::Duration;

use testkit::procs::*;
use testkit::*;

struct Rig {
    store: Backing,
    certs: Certs,
    rx: Receiver,
    edge: EdgeSpec,
}

async fn rig(store: Backing, reclaim_after: &str) -> Rig {
    init_tracing();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let edge = write_edge(&certs, "edge-a", &store.toml(), reclaim_after);
    Rig { store, certs, rx, edge }
}

impl Rig {
    /// Starts agent `name` dialing `tunnel` and waits until it is connected;
    /// returns the process and its status socket.
    async fn agent(&self, name: &str, tunnel: u16, extra: &str) -> (Proc, PathBuf) {
        let (cfg, socket) = write_agent(&self.certs, name, tunnel, &self.rx.url(), extra);
        let agent = Proc::start("relay-agent", &cfg);
        wait_connected(&socket).await;
        (agent, socket)
    }

    /// Stops the workload, checks the invariant and prints the figures.
    async fn finish(&self, name: &str, w: Workload) -> Report {
        self.finish_via(name, w, self.edge.admin).await
    }

    /// Like `finish`, asking the edge whose admin port is `admin`.
    async fn finish_via(&self, name: &str, w: Workload, admin: u16) -> Report {
        let (accepted, refused) = w.stop().await;
        let report = check_invariant(admin, &self.rx, &accepted, refused, Duration::from_secs(30)).await;
        eprintln!(
            "scenario {name} ({}): accepted {} (refused {}), deliveries {}, duplicates {}, recovered in {} ms",
            self.store.name(),
            report.accepted,
            report.refused,
            report.deliveries,
            report.duplicates,
            report.wait_ms
        );
        report
    }
}

/// A test that runs its scenario once, or in a loop in soak mode: once per
/// store backend (`name::redis`, `name::embedded`), or only on the backend
/// named.
macro_rules! scenario {
    ($test:ident, $once:ident) => {
        mod $test {
            scenario!(@one redis, $once, testkit::Backing::redis());
            scenario!(@one embedded, $once, testkit::Backing::embedded());
        }
    };
    ($test:ident, $once:ident, $backing:expr) => {
        scenario!(@one $test, $once, $backing);
    };
    (@one $name:ident, $once:ident, $backing:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            for _ in crate::soak_rounds() {
                crate::$once($backing).await;
            }
        }
    };
}

fn load(urls: &[String]) -> Workload {
    Workload::start(urls, 2, Duration::from_millis(25), 512)
}

/// Waits until `rx` got `n` more requests than it had when called: webhooks
/// flow end to end (through whatever was just started, or is left).
async fn flowing(rx: &Receiver, n: usize) {
    let from = rx.count();
    wait_until(Duration::from_secs(20), &format!("{n} more deliveries"), || rx.count() >= from + n).await;
}

/// Webhooks the workload has had answered 200 so far.
fn taken(w: &Workload) -> usize {
    w.accepted.lock().map(|a| a.len()).unwrap_or(0)
}

/// Webhooks the agent answering on `socket` has delivered and acked.
fn delivered(socket: &std::path::Path) -> u64 {
    relay_agent::status::client::query(socket).map(|s| s.delivered).unwrap_or(0)
}

/// One round normally; with `SOAK_SECS=N`, rounds until N seconds have
/// passed (the soak mode: `SOAK_SECS=3600 cargo test -p testkit --test
/// faults -- --nocapture --test-threads 1`). Not a `RELAY_` variable: the
/// edge and agent processes inherit the environment and refuse unknown
/// `RELAY_*` keys.
fn soak_rounds() -> impl Iterator<Item = u64> {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let started = std::time::Instant::now();
    (1..).take_while(move |&round| round == 1 || started.elapsed() < Duration::from_secs(secs))
}

scenario!(agent_killed_repeatedly_under_load, agent_killed_repeatedly_under_load_once);

async fn agent_killed_repeatedly_under_load_once(store: Backing) {
    let r = rig(store, "3s").await;
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let (mut agent, socket) = r.agent("lan-1", r.edge.tunnel, "window = 16").await;
    let w = load(&[r.edge.hook_url()]);
    for _ in 0..3 {
        // Deliveries run through this agent process when it dies.
        flowing(&r.rx, 40).await;
        agent.kill9().await;
        // Down for a while by design, under load.
        tokio::time::sleep(Duration::from_millis(200)).await;
        agent.restart();
        wait_connected(&socket).await;
    }
    flowing(&r.rx, 20).await;
    wait_until(Duration::from_secs(20), "over 100 webhooks taken", || taken(&w) > 100).await;
    let report = r.finish("agent kill -9 x3", w).await;
    assert!(report.accepted > 100);
}

scenario!(edge_killed_under_load, edge_killed_under_load_once);

async fn edge_killed_under_load_once(store: Backing) {
    let r = rig(store, "3s").await;
    let mut edge = Proc::start("relay-edge", &r.edge.config);
    let (_agent, _) = r.agent("lan-1", r.edge.tunnel, "").await;
    let w = load(&[r.edge.hook_url()]);
    flowing(&r.rx, 40).await;
    edge.kill9().await;
    // Down for a while by design: the load meets a dead edge (`refused`).
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.restart();
    wait_edge_up(r.edge.admin).await;
    // The agent is back: webhooks flow through the restarted edge.
    flowing(&r.rx, 20).await;
    let report = r.finish("edge kill -9", w).await;
    assert!(report.refused > 0, "ingest was really down for a while");
}

scenario!(
    redis_killed_and_restarted_from_its_aof,
    redis_killed_and_restarted_from_its_aof_once,
    Backing::redis_with("always")
);

async fn redis_killed_and_restarted_from_its_aof_once(store: Backing) {
    let mut r = rig(store, "3s").await;
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let (_agent, _) = r.agent("lan-1", r.edge.tunnel, "").await;
    let w = load(&[r.edge.hook_url()]);
    flowing(&r.rx, 40).await;
    r.store.redis_server().kill();
    // Down for a while by design: ingest answers 503 meanwhile (`refused`).
    tokio::time::sleep(Duration::from_millis(800)).await;
    r.store.redis_server().restart();
    // The edge is back on Redis: webhooks flow again.
    flowing(&r.rx, 20).await;
    let report = r.finish("redis kill -9 (appendfsync always)", w).await;
    assert!(report.refused > 0, "ingest answered 503 while Redis was down");
}

scenario!(black_holed_tunnel_is_noticed_and_recovered, black_holed_tunnel_is_noticed_and_recovered_once);

async fn black_holed_tunnel_is_noticed_and_recovered_once(store: Backing) {
    let r = rig(store, "3s").await;
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", r.edge.tunnel).parse().expect("addr")).await;
    let (_agent, socket) = r.agent("lan-1", proxy.addr.port(), "").await;
    let w = load(&[r.edge.hook_url()]);
    flowing(&r.rx, 40).await;
    proxy.set(Mode::BlackHole);
    // The black hole lasts 2 s by design; the status is sampled meanwhile.
    let started = std::time::Instant::now();
    let mut saw_unhealthy = false;
    while started.elapsed() < Duration::from_secs(2) {
        if relay_agent::status::client::query(&socket).is_ok_and(|s| !s.healthy(relay_agent::status::now_ms())) {
            saw_unhealthy = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_unhealthy, "status reported the dead link while it lasted");
    proxy.set(Mode::Pass);
    proxy.cut();
    wait_connected(&socket).await;
    flowing(&r.rx, 20).await;
    r.finish("black hole 2 s", w).await;
}

scenario!(connections_cut_mid_frame_lose_and_corrupt_nothing, connections_cut_mid_frame_lose_and_corrupt_nothing_once);

async fn connections_cut_mid_frame_lose_and_corrupt_nothing_once(store: Backing) {
    let r = rig(store, "3s").await;
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", r.edge.tunnel).parse().expect("addr")).await;
    let (_agent, _) = r.agent("lan-1", proxy.addr.port(), "").await;
    // 96 KiB bodies: frames span many TCP reads, so cuts land mid-frame.
    let w = Workload::start(&[r.edge.hook_url()], 2, Duration::from_millis(25), 96 * 1024);
    for _ in 0..8 {
        // A live session carrying big frames (reconnected after the last cut).
        flowing(&r.rx, 10).await;
        proxy.cut();
    }
    r.finish("cut mid-frame x8", w).await;
}

scenario!(
    a_killed_agent_s_pending_webhooks_are_reclaimed_by_the_other,
    a_killed_agent_s_pending_webhooks_are_reclaimed_by_the_other_once
);

async fn a_killed_agent_s_pending_webhooks_are_reclaimed_by_the_other_once(store: Backing) {
    let r = rig(store, "2s").await;
    r.rx.delay(Duration::from_millis(30));
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let (mut a1, s1) = r.agent("lan-1", r.edge.tunnel, "window = 16").await;
    let (_a2, s2) = r.agent("lan-2", r.edge.tunnel, "window = 16").await;
    let w = load(&[r.edge.hook_url()]);
    // Both take part, so lan-1 holds deliveries of its own when it dies.
    wait_until(Duration::from_secs(20), "both agents delivering", || delivered(&s1) >= 10 && delivered(&s2) >= 10)
        .await;
    a1.kill9().await;
    // lan-2 carries the load on (and gets lan-1's pending ones after reclaim_after).
    flowing(&r.rx, 40).await;
    r.finish("two agents, one killed", w).await;
}

scenario!(two_edges_on_one_redis_survive_losing_one, two_edges_on_one_redis_survive_losing_one_once, Backing::redis());

async fn two_edges_on_one_redis_survive_losing_one_once(store: Backing) {
    let r = rig(store, "2s").await;
    let edge_b = write_edge(&r.certs, "edge-b", &r.store.toml(), "2s");
    let mut ea = Proc::start("relay-edge", &r.edge.config);
    let _eb = Proc::start("relay-edge", &edge_b.config);
    let (_a1, s1) = r.agent("lan-1", r.edge.tunnel, "").await;
    let (_a2, s2) = r.agent("lan-2", edge_b.tunnel, "").await;
    let w = load(&[r.edge.hook_url(), edge_b.hook_url()]);
    // Both edges deliver, each through its own agent.
    wait_until(Duration::from_secs(20), "both agents delivering", || delivered(&s1) >= 10 && delivered(&s2) >= 10)
        .await;
    ea.kill9().await;
    // Edge B carries the load on (and reclaims A's pending ones after reclaim_after).
    flowing(&r.rx, 40).await;
    r.finish_via("two edges, one killed", w, edge_b.admin).await;
}

scenario!(
    three_edges_behind_haproxy_survive_losing_one,
    three_edges_behind_haproxy_survive_losing_one_once,
    Backing::redis()
);

/// Agents whose edge (a) holds them now, asking each edge's admin API.
async fn holders(admins: &[u16], agent: &str) -> Vec<usize> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    let mut out = Vec::new();
    for (i, admin) in admins.iter().enumerate() {
        let url = format!("http://127.0.0.1:{admin}/admin/agents");
        let Ok(resp) = client.get(url).send().await else { continue };
        let Ok(bytes) = resp.bytes().await else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        if v["agents"].as_array().is_some_and(|l| l.iter().any(|a| a["agent"] == agent)) {
            out.push(i);
        }
    }
    out
}

/// Three edges on one Redis behind haproxy (ingest over HTTP, health-checked;
/// the tunnel over TCP, TLS passing through). Both agents dial the
/// balancer. The edge holding lan-1 is killed under load: the balancer
/// routes around it, lan-1 reconnects through it to another edge, its
/// pending entries are redelivered, and nothing answered 200 is lost.
async fn three_edges_behind_haproxy_survive_losing_one_once(store: Backing) {
    let r = rig(store, "2s").await;
    let specs = [
        r.edge.clone(),
        write_edge(&r.certs, "edge-b", &r.store.toml(), "2s"),
        write_edge(&r.certs, "edge-c", &r.store.toml(), "2s"),
    ];
    let mut edges: Vec<Proc> = specs.iter().map(|e| Proc::start("relay-edge", &e.config)).collect();
    for e in &specs {
        wait_edge_up(e.admin).await;
    }
    let lb = testkit::haproxy::Haproxy::start(&specs.iter().map(|e| (e.ingest, e.tunnel)).collect::<Vec<_>>()).await;
    let (_a1, s1) = r.agent("lan-1", lb.tunnel, "").await;
    let (_a2, s2) = r.agent("lan-2", lb.tunnel, "").await;
    let w = load(&[lb.hook_url()]);
    wait_until(Duration::from_secs(20), "both agents delivering", || delivered(&s1) >= 10 && delivered(&s2) >= 10)
        .await;
    let admins: Vec<u16> = specs.iter().map(|e| e.admin).collect();
    let held = holders(&admins, "lan-1").await;
    let [victim] = held[..] else { panic!("lan-1 is held by edges {held:?}") };
    edges[victim].kill9().await;
    let survivors: Vec<u16> = admins.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, a)| *a).collect();
    // lan-1 is back, through the balancer, on another edge; webhooks flow.
    wait_for(Duration::from_secs(20), "lan-1 reconnected to a surviving edge", || async {
        !holders(&survivors, "lan-1").await.is_empty()
    })
    .await;
    let before = delivered(&s1);
    wait_until(Duration::from_secs(20), "lan-1 delivering again", || delivered(&s1) >= before + 10).await;
    flowing(&r.rx, 40).await;
    r.finish_via("three edges behind haproxy, one killed", w, survivors[0]).await;
}

scenario!(
    slow_receiver_visibility_warning_and_no_duplicates_when_configured_well,
    slow_receiver_visibility_warning_and_no_duplicates_when_configured_well_once
);

async fn slow_receiver_visibility_warning_and_no_duplicates_when_configured_well_once(store: Backing) {
    // Misconfigured: reclaim_after 1 s < request_timeout 2 s + 0.9 s deadline.
    let r = rig(Backing::embedded(), "1s").await;
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let (mut agent, socket) = r.agent("lan-1", r.edge.tunnel, "").await;
    let st = relay_agent::status::client::query(&socket).expect("status");
    assert!(st.warnings.iter().any(|w| w.contains("reclaim_after")), "the warning fires: {:?}", st.warnings);
    agent.sigterm().await;

    // Recommended: reclaim_after 5 s > 2 s + 0.9 s; the receiver takes 1.2 s.
    let r = rig(store, "5s").await;
    r.rx.delay(Duration::from_millis(1200));
    let _edge = Proc::start("relay-edge", &r.edge.config);
    let (_a1, s1) = r.agent("lan-1", r.edge.tunnel, "window = 4").await;
    let (_a2, _) = r.agent("lan-2", r.edge.tunnel, "window = 4").await;
    assert!(relay_agent::status::client::query(&s1).expect("status").warnings.is_empty());
    let w = Workload::start(&[r.edge.hook_url()], 1, Duration::from_millis(150), 256);
    // The load lasts 3 s by design: about 20 webhooks, each taking the
    // receiver 1.2 s, so deliveries overlap the visibility timeout's checks.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let report = r.finish("slow receiver, recommended settings", w).await;
    assert_eq!(report.duplicates, 0, "no duplicates with a visibility timeout above the request timeout");
}
