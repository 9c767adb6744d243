//! Nothing lost on a fan-out: the real binaries as processes, a route
//! `hooks` fanned out to channels `a` and `b` (receivers A and B), broken on
//! purpose, then the invariant for each channel — every webhook answered
//! 200 reached both receivers with a 2xx and its body intact, nothing is
//! pending, nothing is dead-lettered.
//!
//! `random_faults_lose_nothing` draws its faults from a seed: it prints
//! `chaos seed = N`, and `CHAOS_SEED=N cargo test -p testkit --test
//! nothing_lost random_faults` replays the same schedule of faults (the
//! processes' own timing still varies). `SOAK_SECS=N` runs fresh seeds
//! until N seconds have passed, one table row per seed.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::procs::*;
use testkit::*;

/// One test of this file at a time: each runs an edge, agents and maybe a
/// Redis on a small machine, and its fault timing means something only
/// when it does not compete for the CPU with another one.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One round normally; with `SOAK_SECS=N`, rounds until N seconds have
/// passed (as in `faults.rs`; not a `RELAY_` variable, which the edge and
/// agent processes would refuse).
fn soak_rounds() -> impl Iterator<Item = u64> {
    let secs = soak_secs();
    let started = Instant::now();
    (1..).take_while(move |&round| round == 1 || started.elapsed() < Duration::from_secs(secs))
}

fn soak_secs() -> u64 {
    std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The agent options both tests use: one `[[target]]` per channel, 503s
/// retried quickly and never given up on (nothing is dead-lettered by
/// design), a request timeout above receiver A's slowest answer.
fn agent_opts(rx_a: &Receiver, rx_b: &Receiver, request_timeout: &str, window: u32) -> AgentOpts {
    AgentOpts {
        targets: vec![("a".into(), rx_a.url()), ("b".into(), rx_b.url())],
        extra: format!("window = {window}"),
        request_timeout: request_timeout.into(),
        retry: "max_attempts = 1000".into(),
        ..Default::default()
    }
}

/// Figures and failures of a settled fan-out, one line per channel.
fn describe(reports: &[ChannelReport]) -> String {
    reports
        .iter()
        .map(|r| {
            format!(
                "channel {}: accepted {}, deliveries {}, duplicates {}, missing {}, pending {:?}, backlog {:?}, dlq {:?}",
                r.channel,
                r.accepted,
                r.deliveries,
                r.duplicates,
                r.missing.len(),
                r.pending,
                r.backlog,
                r.dlq
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Posts `n` unique webhooks (with `x-body-sha256`, as [`Workload`] does);
/// returns webhook id → body sha256 of those answered 200.
async fn post_batch(client: &reqwest::Client, url: &str, round: u64, n: u64) -> HashMap<String, String> {
    use sha2::Digest;
    let mut accepted = HashMap::new();
    for i in 0..n {
        let body = format!("{{\"round\":{round},\"i\":{i},\"pad\":\"fan-out\"}}").into_bytes();
        let hash = hex::encode(sha2::Sha256::digest(&body));
        let resp = client
            .post(url)
            .header("x-api-key", KEY)
            .header("x-body-sha256", &hash)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let Ok(resp) = resp else { continue };
        if resp.status() != 200 {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap_or_default()).unwrap_or_default();
        if let Some(id) = v["webhook_id"].as_str() {
            accepted.insert(id.to_string(), hash);
        }
    }
    accepted
}

fn status(socket: &std::path::Path) -> Option<relay_agent::status::Snapshot> {
    relay_agent::status::client::query(socket).ok()
}

/// Rounds of (post a batch, kill the edge while A's POSTs run, restart it).
/// On today's main a round loses webhooks only when the restarted edge
/// happens to hand the agent `b`'s copies before `a`'s (it reads both
/// channels into a hash map): about one round in two. Five make a miss
/// unlikely (1 in 32) and still take under 10 s.
const FAN_OUT_ROUNDS: u64 = 5;
const FAN_OUT_BATCH: u64 = 20;
/// Room for every round's webhooks on both channels: B's 503s keep `b`'s
/// copies in flight, and a window they fill would keep later rounds'
/// webhooks from reaching A before the edge dies.
const FAN_OUT_WINDOW: u32 = 256;

mod fan_out_edge_crash_loses_nothing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        let _serial = crate::SERIAL.lock().await;
        for _ in crate::soak_rounds() {
            crate::fan_out_edge_crash_once(testkit::Backing::redis()).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded() {
        let _serial = crate::SERIAL.lock().await;
        for _ in crate::soak_rounds() {
            crate::fan_out_edge_crash_once(testkit::Backing::embedded()).await;
        }
    }
}

/// The bug report: `hooks` → `a`, `b`; one agent granted both; A answers
/// after 2 s, B answers 503 for its first 3 s (and until the last round).
/// Twenty webhooks, then the edge is killed (-9) while the agent's POSTs to
/// A still run, and started again; [`FAN_OUT_ROUNDS`] rounds. The POSTs to
/// A finish and are acked on the next session — each ack must settle `a`
/// only, never the same id on `b`.
async fn fan_out_edge_crash_once(store: Backing) {
    init_tracing();
    let started = Instant::now();
    let certs = Certs::generate();
    let rx_a = Receiver::start().await;
    let rx_b = Receiver::start().await;
    rx_a.delay(Duration::from_secs(2));
    rx_b.answer(503);
    // reclaim_after above request_timeout 5 s + the heartbeat deadline.
    let spec = write_edge_with(&certs, "edge", &store.toml(), "8s", &routing(&["a", "b"], &["lan-1"]));
    let mut edge = Proc::start("relay-edge", &spec.config);
    let (agent_cfg, socket) =
        write_agent_with(&certs, "lan-1", spec.tunnel, &agent_opts(&rx_a, &rx_b, "5s", FAN_OUT_WINDOW));
    let _agent = Proc::start("relay-agent", &agent_cfg);
    wait_connected(&socket).await;
    // B answers 503 for its first 3 s, and until the last round is over.
    let b_fails_until = tokio::time::Instant::now() + Duration::from_secs(3);

    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let mut accepted = HashMap::new();
    let mut round_of: HashMap<String, u64> = HashMap::new();
    for round in 1..=FAN_OUT_ROUNDS {
        let batch = post_batch(&client, &spec.hook_url(), round, FAN_OUT_BATCH).await;
        round_of.extend(batch.keys().map(|id| (id.clone(), round)));
        accepted.extend(batch);
        // A answers after 2 s: its POSTs are still running when the edge dies.
        // Every webhook taken so far has reached A (answered, or being
        // answered: this round's batch too), and some POSTs still run.
        let taken = accepted.len();
        wait_until(Duration::from_secs(5), "the round's batch being posted to receiver A", || {
            let running = rx_a.in_flight();
            running > 0 && rx_a.count() + running >= taken
        })
        .await;
        let before = status(&socket).map(|s| s.reconnects).unwrap_or_default();
        edge.kill9().await;
        // Down for a moment by design; nothing to wait for.
        tokio::time::sleep(Duration::from_millis(200)).await;
        edge.restart();
        wait_until(Duration::from_secs(15), "the agent reconnected to the restarted edge", || {
            status(&socket).is_some_and(|s| s.connected && s.reconnects > before)
        })
        .await;
    }
    tokio::time::sleep_until(b_fails_until).await;
    rx_b.answer(200);
    let posted = (FAN_OUT_ROUNDS * FAN_OUT_BATCH) as usize;
    assert_eq!(accepted.len(), posted, "every webhook was answered 200 ({} of {posted})", accepted.len());

    let reports = settle(spec.admin, &[("a", &rx_a), ("b", &rx_b)], &accepted, Duration::from_secs(40)).await;
    let backend = store.name();
    eprintln!(
        "fan-out edge kill -9 x{FAN_OUT_ROUNDS} ({backend}), {} s:\n{}",
        started.elapsed().as_secs(),
        describe(&reports)
    );
    let mut failures: Vec<String> = reports.iter().flat_map(ChannelReport::failures).collect();
    for r in reports.iter().filter(|r| !r.missing.is_empty()) {
        let mut by_round = std::collections::BTreeMap::new();
        for id in &r.missing {
            *by_round.entry(round_of.get(id).copied().unwrap_or_default()).or_insert(0) += 1;
        }
        failures.push(format!("`{}` missing per round posted: {by_round:?}", r.channel));
    }
    assert!(
        failures.is_empty(),
        "fan-out edge kill -9 x{FAN_OUT_ROUNDS} ({backend}): {}\n{}",
        failures.join("; "),
        describe(&reports)
    );
}

mod random_faults_lose_nothing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        crate::chaos(|| testkit::Backing::redis_with("always")).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded() {
        crate::chaos(testkit::Backing::embedded).await
    }
}

/// Faults are drawn during this long, after a short warm-up.
const FAULT_PHASE: Duration = Duration::from_secs(9);
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the invariant may take to hold once everything is restored.
const RECOVERY: Duration = Duration::from_secs(45);

/// The seeds to run: `CHAOS_SEED` (or one from the clock), then, with
/// `SOAK_SECS=N`, fresh ones until N seconds have passed.
fn seeds() -> impl Iterator<Item = u64> {
    let fixed: Option<u64> = std::env::var("CHAOS_SEED").ok().and_then(|s| s.trim().parse().ok());
    let secs = soak_secs();
    let started = Instant::now();
    (0u64..)
        .take_while(move |&round| round == 0 || started.elapsed() < Duration::from_secs(secs))
        .map(move |round| if round == 0 { fixed.unwrap_or_else(fresh_seed) } else { fresh_seed() })
}

fn fresh_seed() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    // Short enough to type; a new one every run.
    ((nanos ^ (nanos >> 30)) % 1_000_000_000) as u64
}

/// Runs a chaos round per seed (see [`seeds`]) on a fresh `backing` each;
/// prints one row per seed and fails at the end naming every seed that
/// broke the invariant (or panicked), so each one can be replayed.
async fn chaos(backing: fn() -> Backing) {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut failed = Vec::new();
    let mut backend = "";
    for seed in seeds() {
        let store = backing();
        let name = store.name();
        backend = name;
        eprintln!("chaos seed = {seed} ({name})");
        match AssertUnwindSafe(chaos_once(seed, store)).catch_unwind().await {
            Ok(row) => {
                eprintln!("{}", row.line());
                if !row.failures.is_empty() {
                    failed.push(format!(
                        "chaos seed = {seed} ({name}): {}\n{}",
                        row.failures.join("; "),
                        describe(&row.channels)
                    ));
                }
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                eprintln!("chaos | seed {seed:>10} | {name:<8} | panicked: {why}");
                failed.push(format!("chaos seed = {seed} ({name}): panicked: {why}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{}\nreplay one with: CHAOS_SEED=<seed> cargo test -p testkit --test nothing_lost random_faults_lose_nothing::{backend} -- --nocapture",
        failed.join("\n")
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Rx {
    A,
    B,
}

/// One thing done to the rig; timed faults come as a pair (break, mend).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// `kill -9` the edge, `down` later start it again.
    EdgeKill {
        down: Duration,
    },
    /// SIGTERM the edge (it must exit cleanly), `down` later start it again.
    EdgeTerm {
        down: Duration,
    },
    AgentKill {
        agent: usize,
        down: Duration,
    },
    AgentStop {
        agent: usize,
    },
    AgentCont {
        agent: usize,
    },
    /// `kill -9` Redis, `down` later start it again from its AOF.
    RedisKill {
        down: Duration,
    },
    /// Drop every connection of an agent's link (it reconnects at once).
    Cut {
        link: usize,
    },
    /// Forward nothing on an agent's link, sockets kept open.
    BlackHole {
        link: usize,
    },
    /// Pass traffic again and drop the black-holed connections.
    Heal {
        link: usize,
    },
    Slow {
        rx: Rx,
        delay: Duration,
    },
    Fast {
        rx: Rx,
    },
    Fail {
        rx: Rx,
    },
    Answer {
        rx: Rx,
    },
}

#[derive(Debug, Clone)]
struct Step {
    /// From the start of the fault phase.
    at: Duration,
    action: Action,
}

/// What a timed fault holds until it is mended: a second timed fault on it
/// is drawn again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Held {
    Agent(usize),
    Link(usize),
    Delay(Rx),
    Status(Rx),
}

/// The schedule of faults for `seed`, on a virtual clock: the same seed
/// gives the same steps at the same offsets, whatever the processes do.
fn plan(seed: u64, redis: bool) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..=hi));
    let mut steps = Vec::new();
    let mut held: HashMap<Held, Duration> = HashMap::new();
    let mut t = WARM_UP;
    while t < WARM_UP + FAULT_PHASE {
        let kinds = if redis { 9 } else { 8 };
        for _try in 0..5 {
            let one = rng.random_range(0..2usize);
            let rx = if rng.random_bool(0.5) { Rx::A } else { Rx::B };
            let (action, hold) = match rng.random_range(0..kinds) {
                0 => (Action::EdgeKill { down: ms(&mut rng, 100, 500) }, None),
                1 => (Action::EdgeTerm { down: ms(&mut rng, 100, 500) }, None),
                2 => (Action::AgentKill { agent: one, down: ms(&mut rng, 100, 500) }, None),
                3 => (Action::AgentStop { agent: one }, Some((Held::Agent(one), ms(&mut rng, 300, 1500)))),
                4 => (Action::Cut { link: one }, None),
                5 => (Action::BlackHole { link: one }, Some((Held::Link(one), ms(&mut rng, 500, 2000)))),
                6 => (
                    Action::Slow { rx, delay: ms(&mut rng, 500, 2000) },
                    Some((Held::Delay(rx), ms(&mut rng, 1000, 3000))),
                ),
                7 => (Action::Fail { rx }, Some((Held::Status(rx), ms(&mut rng, 500, 3000)))),
                _ => (Action::RedisKill { down: ms(&mut rng, 200, 800) }, None),
            };
            if let Some((what, _)) = hold
                && held.get(&what).is_some_and(|until| *until > t)
            {
                continue;
            }
            if let Some((what, lasts)) = hold {
                held.insert(what, t + lasts);
                let mend = match what {
                    Held::Agent(agent) => Action::AgentCont { agent },
                    Held::Link(link) => Action::Heal { link },
                    Held::Delay(rx) => Action::Fast { rx },
                    Held::Status(rx) => Action::Answer { rx },
                };
                steps.push(Step { at: t + lasts, action: mend });
            }
            steps.push(Step { at: t, action });
            break;
        }
        t += ms(&mut rng, 500, 1500);
    }
    // Stable: a fault and a mend at the same offset keep their draw order.
    steps.sort_by_key(|s| s.at);
    steps
}

/// The processes and links of one chaos round.
struct Rig {
    store: Backing,
    rx_a: Receiver,
    rx_b: Receiver,
    spec: EdgeSpec,
    edge: Proc,
    /// Agent process and status socket, per agent (`lan-1`, `lan-2`).
    agents: Vec<(Proc, PathBuf)>,
    /// Each agent's tunnel link to the edge.
    links: Vec<FaultProxy>,
}

impl Rig {
    fn rx(&self, rx: Rx) -> &Receiver {
        match rx {
            Rx::A => &self.rx_a,
            Rx::B => &self.rx_b,
        }
    }

    async fn apply(&mut self, action: &Action) {
        match *action {
            // Each restart waits for the edge to answer: a SIGTERM in its
            // first milliseconds, before it installed its handler, would
            // end it by the signal's default action.
            Action::EdgeKill { down } => {
                self.edge.kill9().await;
                tokio::time::sleep(down).await;
                self.edge.restart();
                wait_edge_up(self.spec.admin).await;
            }
            Action::EdgeTerm { down } => {
                self.edge.sigterm().await;
                tokio::time::sleep(down).await;
                self.edge.restart();
                wait_edge_up(self.spec.admin).await;
            }
            Action::AgentKill { agent, down } => {
                self.agents[agent].0.kill9().await;
                tokio::time::sleep(down).await;
                self.agents[agent].0.restart();
            }
            // A stopped agent may be killed and restarted meanwhile: the
            // CONT then reaches the new process, which ignores it.
            Action::AgentStop { agent } => self.agents[agent].0.signal("STOP").await,
            Action::AgentCont { agent } => self.agents[agent].0.signal("CONT").await,
            Action::RedisKill { down } => {
                let redis = self.store.redis_server();
                tokio::task::block_in_place(|| redis.kill());
                tokio::time::sleep(down).await;
                let redis = self.store.redis_server();
                tokio::task::block_in_place(|| redis.restart());
            }
            Action::Cut { link } => self.links[link].cut(),
            Action::BlackHole { link } => self.links[link].set(Mode::BlackHole),
            Action::Heal { link } => {
                self.links[link].set(Mode::Pass);
                self.links[link].cut();
            }
            Action::Slow { rx, delay } => self.rx(rx).delay(delay),
            Action::Fast { rx } => self.rx(rx).delay(Duration::ZERO),
            Action::Fail { rx } => self.rx(rx).answer(503),
            Action::Answer { rx } => self.rx(rx).answer(200),
        }
    }

    /// Everything back to normal (the plan mends its own faults; this is
    /// belt and braces): links pass, receivers answer 200 at once, agents
    /// continue. Returns the processes that exited on their own.
    async fn restore(&mut self) -> Vec<String> {
        for link in &self.links {
            link.set(Mode::Pass);
        }
        for rx in [&self.rx_a, &self.rx_b] {
            rx.answer(200);
            rx.delay(Duration::ZERO);
        }
        let mut exited = Vec::new();
        if let Some(status) = self.edge.exited() {
            exited.push(format!("relay-edge exited by itself: {status}"));
        }
        for (i, (agent, _)) in self.agents.iter_mut().enumerate() {
            match agent.exited() {
                Some(status) => exited.push(format!("relay-agent lan-{} exited by itself: {status}", i + 1)),
                None => agent.signal("CONT").await,
            }
        }
        exited
    }
}

/// One seed's result: its table row and what broke.
struct Row {
    seed: u64,
    backend: &'static str,
    faults: usize,
    accepted: usize,
    refused: u64,
    channels: Vec<ChannelReport>,
    failures: Vec<String>,
}

impl Row {
    fn line(&self) -> String {
        let both = |f: &dyn Fn(&ChannelReport) -> String| self.channels.iter().map(f).collect::<Vec<_>>().join("/");
        let opt = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |n| n.to_string());
        format!(
            "chaos | seed {:>10} | {:<8} | faults {:>2} | accepted {:>5} (refused {:>4}) | lost a/b {} | duplicates a/b {} | pending a/b {} | dlq a/b {} | recovered {} ms | {}",
            self.seed,
            self.backend,
            self.faults,
            self.accepted,
            self.refused,
            both(&|r| r.missing.len().to_string()),
            both(&|r| r.duplicates.to_string()),
            both(&|r| opt(r.pending)),
            both(&|r| opt(r.dlq)),
            both(&|r| r.wait_ms.to_string()),
            if self.failures.is_empty() { "ok" } else { "FAILED" },
        )
    }
}

/// Two agents (`lan-1`, `lan-2`, each through its own fault proxy) share
/// `a` and `b`; a steady workload runs while the seed's faults hit the
/// edge, the agents, Redis, the links and the receivers; then everything is
/// restored and the invariant must hold on both channels.
async fn chaos_once(seed: u64, store: Backing) -> Row {
    let backend = store.name();
    let steps = plan(seed, matches!(store, Backing::Redis(_)));
    let faults = steps
        .iter()
        .filter(|s| {
            !matches!(
                s.action,
                Action::AgentCont { .. } | Action::Heal { .. } | Action::Fast { .. } | Action::Answer { .. }
            )
        })
        .count();
    for s in &steps {
        eprintln!("  seed {seed}: at {:>5} ms {:?}", s.at.as_millis(), s.action);
    }

    let certs = Certs::generate();
    let rx_a = Receiver::start().await;
    let rx_b = Receiver::start().await;
    // reclaim_after above request_timeout 2 s + the heartbeat deadline.
    let spec = write_edge_with(&certs, "edge", &store.toml(), "4s", &routing(&["a", "b"], &["lan-1", "lan-2"]));
    let edge = Proc::start("relay-edge", &spec.config);
    let tunnel: std::net::SocketAddr = format!("127.0.0.1:{}", spec.tunnel).parse().expect("tunnel addr");
    let mut links = Vec::new();
    let mut agents = Vec::new();
    for name in ["lan-1", "lan-2"] {
        let link = FaultProxy::start(tunnel).await;
        let (cfg, socket) = write_agent_with(&certs, name, link.addr.port(), &agent_opts(&rx_a, &rx_b, "2s", 16));
        agents.push((Proc::start("relay-agent", &cfg), socket));
        links.push(link);
    }
    for (_, socket) in &agents {
        wait_connected(socket).await;
    }
    let mut rig = Rig { store, rx_a, rx_b, spec, edge, agents, links };

    let load = Workload::start(&[rig.spec.hook_url()], 2, Duration::from_millis(25), 512);
    let started = tokio::time::Instant::now();
    for step in &steps {
        tokio::time::sleep_until(started + step.at).await;
        let began = tokio::time::Instant::now();
        rig.apply(&step.action).await;
        if began.elapsed() > Duration::from_secs(1) {
            eprintln!("  seed {seed}: {:?} took {} ms", step.action, began.elapsed().as_millis());
        }
    }
    let (accepted, refused) = load.stop().await;

    let mut failures = rig.restore().await;
    for (_, socket) in &rig.agents {
        wait_connected(socket).await;
    }
    let channels = settle(rig.spec.admin, &[("a", &rig.rx_a), ("b", &rig.rx_b)], &accepted, RECOVERY).await;
    failures.extend(channels.iter().flat_map(ChannelReport::failures));
    if accepted.len() < 50 {
        failures.push(format!("the workload hardly ran: {} webhooks accepted", accepted.len()));
    }
    Row { seed, backend, faults, accepted: accepted.len(), refused, channels, failures }
}
