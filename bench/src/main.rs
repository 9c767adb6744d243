//! `relay-bench`: starts redis-server, relay-edge and relay-agent (release
//! binaries next to this one) and a built-in receiver on loopback, runs
//! bounded scenarios once per store backend (Redis, embedded) and prints a
//! table plus a JSON report. Yardsticks are measured in the same run, so
//! relay figures are also given as ratios.
//!
//! Run it with `./scripts/bench.sh` (builds the release binaries first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use relay_bench::load::{self, Receiver};
use relay_bench::proc::{Usage, usage};
use relay_bench::stats::Latency;
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::procs::{AgentOpts, EdgeOpts, Proc, routing_for, write_agent_in, write_edge_in};

const KEY: &str = "bench-key-000001";
/// `RUST_LOG` of the edge and agent processes.
const LOG: &str = "warn";

#[derive(Parser)]
#[command(name = "relay-bench", about = "Benchmark of the whole relay path on loopback")]
struct Args {
    /// Seconds per timed scenario.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Webhooks stored with no agent connected, then drained.
    #[arg(long, default_value_t = 200_000)]
    backlog: u64,
    /// Agents connected at once in the fan-in scenario (0 skips it).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// The agent's window (deliveries in flight); 64 is the agent's default.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// The edge's `worker_threads` (1 = single-threaded, its default; 0 = one per core).
    #[arg(long, default_value_t = 1)]
    edge_threads: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-report.json")]
    out: PathBuf,
    /// Directory holding relay-edge and relay-agent (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Only the fan-in scenario (with `--agents N`), after the yardsticks.
    #[arg(long)]
    fan_in_only: bool,
    /// A rathole binary: measures the tunnel yardstick (a TCP tunnel that
    /// stores nothing) and each goal's ratio to it. `scripts/bench.sh`
    /// installs one into `target/bench-tools`.
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// Only this: the edge and the agent under valgrind's callgrind on the
    /// Redis store, for exactly N webhooks relayed end to end (after a
    /// warm-up); prints instructions and Redis commands per webhook.
    #[arg(long, value_name = "N")]
    callgrind: Option<u64>,
    /// Only this: `strace -c` attached to the edge, the agent and Redis for
    /// exactly N webhooks relayed end to end (after a warm-up); prints
    /// system calls per webhook of each, by call.
    #[arg(long, value_name = "N", conflicts_with = "callgrind")]
    syscalls: Option<u64>,
}

/// The tunnel yardstick's figures, which the relay's are judged against.
#[derive(Clone, Copy)]
struct Tunnel {
    /// Requests per second through it, c=32.
    rate: f64,
    /// CPU of its server and client per request, µs.
    cpu_us: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `met` or `not met`, for a goal.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Median latency of `fdatasync` after a 4 KiB write in `dir`, ms: what
/// the embedded store's commit waits for at least.
fn fsync_ms(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe"))?;
    let block = vec![7u8; 4096];
    let mut times = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The rathole yardstick: the same load as the relay's to the same
/// receiver, through a tunnel on loopback.
async fn tunnel_yardstick(
    bin: &Path,
    dir: &Path,
    client: &load::HttpClient,
    rx: &Receiver,
    rx_addr: std::net::SocketAddr,
    secs: f64,
) -> anyhow::Result<Tunnel> {
    let tunnel = relay_bench::tunnel::Rathole::start(bin, dir, rx_addr).await?;
    let url = format!("http://127.0.0.1:{}/webhook", tunnel.port);
    let cpu_of = || tunnel.pids().into_iter().map(|p| usage(p).cpu_s).sum::<f64>();
    let cpu0 = cpu_of();
    let run = load::closed_loop(client, &url, None, 32, secs).await;
    let cpu1 = cpu_of();
    rx.record(true);
    let _ = load::open_loop(client, &url, None, 1000.0, secs).await;
    rx.record(false);
    let e2e = Latency::of(&mut rx.take_latencies());
    Ok(Tunnel {
        rate: run.rate(),
        cpu_us: (cpu1 - cpu0) * 1e6 / run.ok.max(1) as f64,
        p50_ms: e2e.p50_ms,
        p99_ms: e2e.p99_ms,
    })
}

/// The processes measured; dropped, each is killed by its own PID.
struct Procs {
    redis: RedisServer,
    edge: Option<Proc>,
    agent: Option<Proc>,
}

impl Procs {
    /// Which of the edge and agent has exited, if one has.
    fn exited(&mut self) -> Option<String> {
        for (name, p) in [("relay-edge", &mut self.edge), ("relay-agent", &mut self.agent)] {
            if let Some(status) = p.as_mut().and_then(Proc::exited) {
                return Some(format!("{name} exited ({status})"));
            }
        }
        None
    }

    async fn stop_relay(&mut self) {
        for mut p in [self.agent.take(), self.edge.take()].into_iter().flatten() {
            let _ = p.terminate().await;
        }
    }
}

async fn wait_for(what: &str, within: Duration, ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    wait_unless(what, within, ok, || None).await
}

/// Waits for the relay to get somewhere, failing at once if the edge or
/// the agent exited meanwhile (e.g. refused its configuration).
async fn wait_relay(procs: &mut Procs, what: &str, within: Duration, ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    wait_unless(what, within, ok, || procs.exited()).await
}

async fn wait_unless(
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> bool,
    mut gone: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if let Some(which) = gone() {
            bail!("{which} while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

struct Sample {
    edge: Usage,
    agent: Usage,
    redis: Usage,
    bench: Usage,
    at: Instant,
}

/// What a process has used so far; nothing once it stopped.
fn usage_of(p: Option<&Proc>) -> Usage {
    p.and_then(Proc::pid).map(usage).unwrap_or_default()
}

fn sample(p: &Procs) -> Sample {
    Sample {
        edge: usage_of(p.edge.as_ref()),
        agent: usage_of(p.agent.as_ref()),
        redis: p.redis.pid().map(usage).unwrap_or_default(),
        bench: relay_bench::proc::me(),
        at: Instant::now(),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// CPU seconds used between two samples, per component, and µs per item.
fn cpu(a: &Sample, b: &Sample, items: u64) -> Value {
    let per = |x: f64| if items > 0 { x * 1e6 / items as f64 } else { 0.0 };
    let (e, g, r, l) = (
        b.edge.cpu_s - a.edge.cpu_s,
        b.agent.cpu_s - a.agent.cpu_s,
        b.redis.cpu_s - a.redis.cpu_s,
        b.bench.cpu_s - a.bench.cpu_s,
    );
    json!({
        "wall_s": (b.at - a.at).as_secs_f64(),
        "edge_cpu_s": e, "agent_cpu_s": g, "redis_cpu_s": r, "loadgen_and_receiver_cpu_s": l,
        "edge_us_per_webhook": per(e), "agent_us_per_webhook": per(g), "redis_us_per_webhook": per(r),
        "edge_plus_agent_us_per_webhook": per(e + g),
        "loadgen_and_receiver_us_per_webhook": per(l), "all_us_per_webhook": per(e + g + r + l),
        "edge_peak_rss_mib": b.edge.peak_rss_kib as f64 / 1024.0,
        "agent_peak_rss_mib": b.agent.peak_rss_kib as f64 / 1024.0,
        "agent_rss_mib": b.agent.rss_kib as f64 / 1024.0,
        "redis_peak_rss_mib": b.redis.peak_rss_kib as f64 / 1024.0,
    })
}

/// The store one pass of the relay scenarios runs on.
enum StoreKind {
    Redis(String),
    Embedded(PathBuf),
}

impl StoreKind {
    fn label(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::Embedded(_) => "embedded",
        }
    }

    fn toml(&self) -> String {
        match self {
            Self::Redis(url) => format!("redis_url = \"{url}\""),
            Self::Embedded(path) => format!("path = \"{}\"", path.display()),
        }
    }

    /// Bytes the store holds: Redis `used_memory`, or the file's size.
    async fn footprint(&self) -> anyhow::Result<u64> {
        match self {
            Self::Redis(url) => redis_memory(url).await,
            Self::Embedded(path) => Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)),
        }
    }
}

/// What every pass shares.
struct Ctx<'a> {
    args: &'a Args,
    dir: &'a Path,
    edge_bin: &'a Path,
    agent_bin: &'a Path,
    client: &'a load::HttpClient,
    rx: &'a Arc<Receiver>,
    target: String,
    redis_url: String,
    redis_pid: Option<u32>,
    tunnel: Option<Tunnel>,
    fsync_ms: f64,
}

impl Ctx<'_> {
    /// A directory `name` of the run's dir with the certificates, and the
    /// edge's and agent's configs for `store` in it: (edge, agent config).
    fn relay_configs(
        &self,
        name: &str,
        store: &StoreKind,
    ) -> anyhow::Result<(PathBuf, testkit::procs::EdgeSpec, PathBuf)> {
        let sub = self.dir.join(name);
        std::fs::create_dir_all(&sub)?;
        for f in ["ca.pem", "edge.pem", "edge-key.pem", "lan-1.pem", "lan-1-key.pem"] {
            std::fs::copy(self.dir.join(f), sub.join(f))?;
        }
        let edge = write_edge_in(&sub, "edge", &edge_opts(&store.toml(), &["lan-1"], self.args.edge_threads));
        let (agent, _) = write_agent_in(&sub, "lan-1", edge.tunnel, &agent_opts(&self.target, self.args.window));
        Ok((sub, edge, agent))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("binary dir")?.to_path_buf(),
    };
    let (edge_bin, agent_bin) = (bin_dir.join("relay-edge"), bin_dir.join("relay-agent"));
    for b in [&edge_bin, &agent_bin] {
        if !b.is_file() {
            bail!("{} not found: build with `cargo build --release --bins` (./scripts/bench.sh does)", b.display());
        }
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    relay_edge::certs::init(d, &["127.0.0.1".into()], false)?;
    relay_edge::certs::agent(d, "lan-1")?;

    // AOF with fsync every second, in a temp dir; answering once started.
    let mut procs = Procs { redis: RedisServer::start(), edge: None, agent: None };
    let redis_url = procs.redis.url();
    let (rx, rx_addr) = Receiver::start().await;
    let client = load::client();
    let direct = format!("http://{rx_addr}/webhook");
    let secs = args.secs;
    let mut report = serde_json::Map::new();
    let machine = json!({
        "cores": cores(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim(),
        "disk": "the temp dir's filesystem (embedded store file, Redis AOF)",
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "agent_window": args.window,
        "edge_worker_threads": args.edge_threads,
    });
    report.insert("machine".into(), machine.clone());
    println!(
        "relay-bench — {} cores, {}; {secs} s per scenario, 1 KiB JSON bodies, loopback; Redis AOF everysec, embedded store fsync per commit; agent window {}, edge worker_threads {}",
        machine["cores"], machine["cpu"], args.window, args.edge_threads
    );

    // The tunnel and fsync figures are filled in once measured.
    let mut ctx = Ctx {
        args: &args,
        dir: d,
        edge_bin: &edge_bin,
        agent_bin: &agent_bin,
        client: &client,
        rx: &rx,
        target: direct.clone(),
        redis_url: redis_url.clone(),
        redis_pid: procs.redis.pid(),
        tunnel: None,
        fsync_ms: 0.0,
    };
    let counted = match (args.callgrind, args.syscalls) {
        (Some(n), _) => Some((n, Count::Instructions)),
        (None, Some(n)) => Some((n, Count::Syscalls)),
        (None, None) => None,
    };
    if let Some((n, count)) = counted {
        let v = counted_pass(&ctx, n, count).await?;
        drop(procs);
        std::fs::write(&args.out, serde_json::to_string_pretty(&v)?)?;
        println!("\nreport written to {}", args.out.display());
        return Ok(());
    }

    // Yardsticks.
    let y_http32 = load::closed_loop(&client, &direct, None, 32, secs).await;
    let y_http128 = load::closed_loop(&client, &direct, None, 128, secs).await;
    let payload = load::body_1k();
    let y_redis100 = relay_bench::yardstick::redis_cycle(&redis_url, &payload, 100, secs).await?;
    let y_redis1 = relay_bench::yardstick::redis_cycle(&redis_url, &payload, 1, secs).await?;
    report.insert(
        "yardsticks".into(),
        json!({ "direct_http_c32_rps": y_http32.rate(), "direct_http_c128_rps": y_http128.rate(),
                 "redis_cycle_batch100_per_s": y_redis100, "redis_cycle_batch1_per_s": y_redis1 }),
    );
    println!("\n{:<44} {:>12}", "yardstick", "per second");
    println!("{:<44} {:>12.0}", "direct HTTP POST to the receiver, c=32", y_http32.rate());
    println!("{:<44} {:>12.0}", "direct HTTP POST to the receiver, c=128", y_http128.rate());
    println!("{:<44} {:>12.0}", "raw Redis XADD+XREADGROUP+XACK, batch 100", y_redis100);
    println!("{:<44} {:>12.0}", "raw Redis XADD+XREADGROUP+XACK, batch 1", y_redis1);
    let fsync = fsync_ms(d)?;
    println!("{:<44} {:>12.2}", "fsync (4 KiB write + fdatasync), median ms", fsync);
    report.insert("fsync_median_ms".into(), json!(fsync));
    let tunnel = match &args.rathole {
        Some(bin) => {
            let t = tunnel_yardstick(bin, d, &client, &rx, rx_addr, secs).await?;
            println!("{:<44} {:>12.0}", "rathole tunnel (TCP, stores nothing), c=32", t.rate);
            println!("{:<44} {:>12.0}", "  its CPU per request (server + client), µs", t.cpu_us);
            println!("{:<44} {:>5.2} / {:.2}", "  e2e p50 / p99 ms at 1,000/s", t.p50_ms, t.p99_ms);
            report.insert(
                "tunnel_yardstick".into(),
                json!({ "tool": "rathole", "rps_c32": t.rate, "cpu_us_per_request": t.cpu_us,
                         "e2e_p50_ms_at_1000": t.p50_ms, "e2e_p99_ms_at_1000": t.p99_ms }),
            );
            Some(t)
        }
        None => {
            println!("rathole tunnel yardstick: not run (pass --rathole PATH; ./scripts/bench.sh installs it)");
            None
        }
    };

    ctx.tunnel = tunnel;
    ctx.fsync_ms = fsync;
    let mut stores = serde_json::Map::new();
    let stores_run = if args.fan_in_only {
        Vec::new()
    } else {
        vec![StoreKind::Redis(redis_url.clone()), StoreKind::Embedded(d.join("store").join("relay.redb"))]
    };
    for store in stores_run {
        let v = relay_pass(&ctx, &mut procs, &store).await?;
        stores.insert(store.label().into(), v);
        procs.stop_relay().await;
    }
    report.insert("stores".into(), Value::Object(stores));

    // 4. Fan-in: many agents on one edge.
    if args.agents > 0 {
        match fan_in(&args, d, &edge_bin, &redis_url, &client, &rx, rx_addr).await {
            Ok(v) => {
                report.insert("fan_in".into(), v);
            }
            Err(e) => println!("\nfan-in: skipped after an error: {e:#}"),
        }
    }
    drop(procs);
    std::fs::write(&args.out, serde_json::to_string_pretty(&Value::Object(report))?)?;
    println!("\nreport written to {}", args.out.display());
    Ok(())
}

/// Ingest, end to end (saturation and fixed rates) and backlog drain on a
/// fresh edge over `store`.
async fn relay_pass(ctx: &Ctx<'_>, procs: &mut Procs, store: &StoreKind) -> anyhow::Result<Value> {
    let (client, rx, secs) = (ctx.client, ctx.rx, ctx.args.secs);
    // The machine's speed drifts (shared host): each ratio is taken to a
    // yardstick measured just before the scenario it judges.
    let payload = load::body_1k();
    let redis_cycle = || relay_bench::yardstick::redis_cycle(&ctx.redis_url, &payload, 100, secs);
    let (_, edge, agent_cfg) = ctx.relay_configs(store.label(), store)?;
    let ingest = edge.ingest;
    procs.edge = Some(Proc::start_bin("relay-edge", ctx.edge_bin, &edge.config, LOG));
    wait_relay(procs, "edge", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", ingest)).is_ok())
        .await?;
    let hook = format!("http://127.0.0.1:{ingest}/hooks/bench");
    let mut out = serde_json::Map::new();
    println!("\n── store: {} ──", store.label());

    // 1. Ingest (no agent connected).
    println!(
        "{:<28} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10} {:>18}",
        "ingest (no agent)", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "vs HTTP", "(HTTP just before)"
    );
    let mut ingest_json = serde_json::Map::new();
    let mut goals: Vec<(String, bool)> = Vec::new();
    let mut stored = 0;
    let mut y_http: f64 = 0.0;
    let footprint0 = store.footprint().await?;
    for c in [32, 128] {
        let y = load::closed_loop(client, &ctx.target, None, c, secs).await.rate();
        y_http = y_http.max(y);
        let a = sample(procs);
        let mut run = load::closed_loop(client, &hook, Some(KEY), c, secs).await;
        let b = sample(procs);
        stored += run.ok;
        let lat = Latency::of(&mut run.latencies);
        println!(
            "{:<28} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.0}% {:>18.0}",
            format!("concurrency {c}"),
            run.rate(),
            lat.p50_ms,
            lat.p90_ms,
            lat.p99_ms,
            lat.max_ms,
            100.0 * run.rate() / y,
            y
        );
        goals.push((
            format!("ingest ≥ 60% of direct HTTP at c={c}: {:.0}%", 100.0 * run.rate() / y),
            run.rate() >= 0.6 * y,
        ));
        ingest_json.insert(
            format!("c{c}"),
            json!({ "rps": run.rate(), "errors": run.errors, "latency": lat.json(), "direct_http_rps_just_before": y, "ratio_to_direct_http": run.rate() / y, "resources": cpu(&a, &b, run.ok) }),
        );
    }
    out.insert("ingest".into(), Value::Object(ingest_json));

    let mut retained = stored;
    // The ingest runs left a backlog: let the agent drain it before timing.
    let base = rx.count.load(Ordering::Relaxed);
    procs.agent = Some(Proc::start_bin("relay-agent", ctx.agent_bin, &agent_cfg, LOG));
    wait_relay(procs, "first drain", Duration::from_secs(600), || rx.count.load(Ordering::Relaxed) >= base + stored)
        .await?;

    // 2. End to end at saturation.
    let y_redis100 = redis_cycle().await?;
    let a = sample(procs);
    let before = rx.count.load(Ordering::Relaxed);
    let run = load::closed_loop(client, &hook, Some(KEY), 64, secs).await;
    let delivered_in_window = rx.count.load(Ordering::Relaxed) - before;
    let load_started = Instant::now() - Duration::from_secs_f64(run.secs);
    let target = before + run.ok;
    retained += run.ok;
    wait_relay(procs, "saturation drain", Duration::from_secs(300), || rx.count.load(Ordering::Relaxed) >= target)
        .await?;
    // CPU from the first request until the last delivery: every webhook of
    // the run was both ingested and delivered in it.
    let b = sample(procs);
    // Sustained: everything ingested under load, delivered, over the time
    // until the last one arrived.
    let sustained = run.ok as f64 / load_started.elapsed().as_secs_f64();
    let e2e_rate = delivered_in_window as f64 / run.secs;
    println!("end to end at saturation (closed loop, c=64)");
    println!(
        "  ingested {:.0}/s while delivering {:.0}/s; sustained end to end {:.0}/s = {:.0}% of the Redis cycle yardstick (batch 100: {:.0}/s just before), {:.0}% of direct HTTP",
        run.rate(),
        e2e_rate,
        sustained,
        100.0 * sustained / y_redis100,
        y_redis100,
        100.0 * sustained / y_http
    );
    let res = cpu(&a, &b, run.ok);
    let us = |k: &str| res[k].as_f64().unwrap_or(0.0);
    let relay_cpu = us("edge_plus_agent_us_per_webhook") + us("redis_us_per_webhook");
    if let Some(t) = ctx.tunnel {
        goals.push((
            format!("sustained ≥ 1.0 × the tunnel: {sustained:.0}/s vs {:.0}/s = {:.2}×", t.rate, sustained / t.rate),
            sustained >= t.rate,
        ));
        goals.push((
            format!(
                "CPU per webhook (edge + agent + store) ≤ 1.2 × the tunnel's per request: {relay_cpu:.0} µs vs {:.0} µs = {:.2}×",
                t.cpu_us,
                relay_cpu / t.cpu_us.max(1e-9)
            ),
            relay_cpu <= 1.2 * t.cpu_us,
        ));
    }
    goals.push((format!("agent RSS ≤ 15 MiB: {:.1} MiB", us("agent_rss_mib")), us("agent_rss_mib") <= 15.0));
    println!(
        "  CPU per relayed webhook (ingest + delivery): edge {:.0} µs + agent {:.0} µs = {:.0} µs; redis {:.0} µs, load generator + receiver {:.0} µs",
        us("edge_us_per_webhook"),
        us("agent_us_per_webhook"),
        us("edge_plus_agent_us_per_webhook"),
        us("redis_us_per_webhook"),
        us("loadgen_and_receiver_us_per_webhook"),
    );
    println!(
        "  all processes {:.0} µs per webhook: {} cores allow {:.0}/s at most; agent RSS {:.1} MiB, edge peak RSS {:.1} MiB",
        us("all_us_per_webhook"),
        cores(),
        cores() as f64 * 1e6 / us("all_us_per_webhook").max(1.0),
        us("agent_rss_mib"),
        us("edge_peak_rss_mib"),
    );
    let mut e2e = serde_json::Map::new();
    e2e.insert(
        "saturation".into(),
        json!({ "ingest_rps": run.rate(), "delivered_during_load_per_s": e2e_rate, "sustained_per_s": sustained,
                 "redis_cycle_per_s_just_before": y_redis100, "ratio_to_redis_cycle": sustained / y_redis100, "ratio_to_direct_http": sustained / y_http, "resources": res }),
    );

    // Fixed rates: latency from the sender's request start to the receiver.
    println!(
        "{:<20} {:>10} {:>12} {:>12} {:>12} {:>14}",
        "end to end, open loop", "sent/s", "e2e p50 ms", "e2e p99 ms", "e2e max ms", "ingest p99 ms"
    );
    for rate in [200.0, 1000.0, 5000.0] {
        rx.record(true);
        let before = rx.count.load(Ordering::Relaxed);
        let a = sample(procs);
        let mut run = load::open_loop(client, &hook, Some(KEY), rate, secs).await;
        let target = before + run.ok;
        retained += run.ok;
        wait_relay(procs, "open-loop drain", Duration::from_secs(60), || rx.count.load(Ordering::Relaxed) >= target)
            .await?;
        let b = sample(procs);
        rx.record(false);
        let mut e2e_lat = rx.take_latencies();
        let e = Latency::of(&mut e2e_lat);
        let i = Latency::of(&mut run.latencies);
        let redis = matches!(store, StoreKind::Redis(_));
        if rate == 1000.0 {
            let (bound, what) = if redis {
                (1.0, "1 ms".to_string())
            } else {
                (ctx.fsync_ms + 1.0, format!("fsync + 1 ms = {:.2} ms", ctx.fsync_ms + 1.0))
            };
            goals.push((format!("e2e p99 at 1,000/s ≤ {what}: {:.2} ms", e.p99_ms), e.p99_ms <= bound));
        }
        if rate == 5000.0 && redis {
            goals.push((format!("e2e p99 at 5,000/s ≤ 5 ms: {:.2} ms", e.p99_ms), e.p99_ms <= 5.0));
        }
        println!(
            "{:<20} {:>10.0} {:>12.2} {:>12.2} {:>12.2} {:>14.2}",
            format!("{rate:.0}/s"),
            run.rate(),
            e.p50_ms,
            e.p99_ms,
            e.max_ms,
            i.p99_ms
        );
        e2e.insert(
            format!("rate_{rate:.0}"),
            json!({ "sent_per_s": run.rate(), "errors": run.errors, "end_to_end": e.json(), "ingest": i.json(), "resources": cpu(&a, &b, run.ok) }),
        );
    }
    out.insert("end_to_end".into(), Value::Object(e2e));

    // 3. Backlog drain.
    if let Some(mut agent) = procs.agent.take() {
        let _ = agent.terminate().await;
    }
    let started = Instant::now();
    let fill = fill(client, &hook, ctx.args.backlog).await;
    let fill_secs = started.elapsed().as_secs_f64();
    // Every entry of the pass is retained (24 h): bytes per retained entry.
    retained += fill;
    let footprint = store.footprint().await?.saturating_sub(footprint0);
    let y_redis100 = redis_cycle().await?;
    let before = rx.count.load(Ordering::Relaxed);
    procs.agent = Some(Proc::start_bin("relay-agent", ctx.agent_bin, &agent_cfg, LOG));
    let a = sample(procs);
    let t = Instant::now();
    wait_relay(procs, "backlog drain", Duration::from_secs(900), || rx.count.load(Ordering::Relaxed) >= before + fill)
        .await?;
    let drain_secs = t.elapsed().as_secs_f64();
    let b = sample(procs);
    let drain_rate = fill as f64 / drain_secs;
    let kib_per_1k = footprint as f64 / 1024.0 / (retained as f64 / 1000.0);
    println!(
        "backlog: {fill} webhooks stored in {fill_secs:.1} s ({:.0}/s) with no agent; drained in {drain_secs:.1} s = {drain_rate:.0}/s ({:.0}% of the Redis cycle yardstick, {:.0}/s just before); store: {:.0} MiB for {retained} retained entries = {kib_per_1k:.0} KiB per 1k",
        fill as f64 / fill_secs,
        100.0 * drain_rate / y_redis100,
        y_redis100,
        footprint as f64 / 1024.0 / 1024.0,
    );
    out.insert(
        "backlog_drain".into(),
        json!({ "webhooks": fill, "fill_s": fill_secs, "fill_per_s": fill as f64 / fill_secs, "drain_s": drain_secs,
                 "drain_per_s": drain_rate, "redis_cycle_per_s_just_before": y_redis100, "ratio_to_redis_cycle": drain_rate / y_redis100,
                 "store_bytes": footprint, "retained_entries": retained, "store_kib_per_1k_entries": kib_per_1k, "resources": cpu(&a, &b, fill) }),
    );
    println!("goals ({}):", store.label());
    if ctx.tunnel.is_none() {
        println!("  (the tunnel goals need --rathole)");
    }
    for (goal, met) in &goals {
        println!("  {:<8} {goal}", verdict(*met));
    }
    out.insert("goals".into(), goals.iter().map(|(g, m)| json!({ "goal": g, "met": m })).collect());
    Ok(Value::Object(out))
}

/// Webhooks relayed before counting starts: connections, pools and
/// buffers are warm by then.
const WARM_UP: u64 = 500;

/// What a counted pass counts.
#[derive(Clone, Copy, PartialEq)]
enum Count {
    /// Instructions of the edge and the agent, under callgrind.
    Instructions,
    /// System calls of the edge, the agent and Redis, under `strace -c`.
    Syscalls,
}

/// `--callgrind N` / `--syscalls N`: the edge and the agent started (under
/// callgrind with instrumentation off, for instructions), a warm-up, then
/// exactly `n` webhooks (64 senders) relayed end to end and acked while
/// counting. Prints the count per webhook of each process, and Redis
/// commands per webhook by command (from `INFO commandstats`).
async fn counted_pass(ctx: &Ctx<'_>, n: u64, count: Count) -> anyhow::Result<Value> {
    use relay_bench::{callgrind, syscalls};
    let (client, rx, redis_url) = (ctx.client, ctx.rx, ctx.redis_url.as_str());
    let name = if count == Count::Instructions { "callgrind" } else { "syscalls" };
    let (sub, edge, agent_cfg) = ctx.relay_configs(name, &StoreKind::Redis(redis_url.to_string()))?;
    let (edge_out, agent_out) = (sub.join(format!("edge.{name}")), sub.join(format!("agent.{name}")));
    let (edge_bin, agent_bin) = match count {
        Count::Instructions => {
            (callgrind::wrapper(&sub, ctx.edge_bin, &edge_out)?, callgrind::wrapper(&sub, ctx.agent_bin, &agent_out)?)
        }
        Count::Syscalls => (ctx.edge_bin.to_path_buf(), ctx.agent_bin.to_path_buf()),
    };
    let redis = redis_conn(redis_url).await?;
    let mut stats_conn = redis.clone();
    let pending = |mut c: redis::aio::MultiplexedConnection| async move {
        let summary: redis::Value =
            redis::cmd("XPENDING").arg("relay:{bench}:stream").arg("relay").query_async(&mut c).await.ok()?;
        match summary {
            redis::Value::Array(v) => v.into_iter().next().and_then(|n| redis::from_redis_value::<u64>(n).ok()),
            _ => None,
        }
    };
    let mut edge_p = Proc::start_bin("relay-edge", &edge_bin, &edge.config, LOG);
    let ingest = edge.ingest;
    wait_for("the edge", Duration::from_secs(120), || std::net::TcpStream::connect(("127.0.0.1", ingest)).is_ok())
        .await?;
    let mut agent_p = Proc::start_bin("relay-agent", &agent_bin, &agent_cfg, LOG);
    let hook = format!("http://127.0.0.1:{ingest}/hooks/bench");
    let relay = |count: u64| {
        let (hook, redis) = (hook.clone(), redis.clone());
        async move {
            let base = rx.count.load(Ordering::Relaxed);
            let sent = fill(client, &hook, count).await;
            wait_for("deliveries", Duration::from_secs(600), || rx.count.load(Ordering::Relaxed) >= base + sent)
                .await?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while pending(redis.clone()).await != Some(0) {
                if Instant::now() > deadline {
                    bail!("acks: entries still pending after 120 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(sent)
        }
    };
    relay(WARM_UP).await?;
    let pids: Vec<u32> = [edge_p.pid(), agent_p.pid()].into_iter().flatten().collect();
    if pids.len() != 2 {
        bail!("the edge or the agent exited during the warm-up");
    }
    let stats0 = commandstats(&mut stats_conn).await?;
    let mut tracers = Vec::new();
    match count {
        Count::Instructions => {
            for &pid in &pids {
                callgrind::collect(pid, true).await?;
            }
        }
        Count::Syscalls => {
            let redis_pid = ctx.redis_pid.context("Redis's PID")?;
            for (pid, out) in [(pids[0], &edge_out), (pids[1], &agent_out), (redis_pid, &sub.join("redis.syscalls"))] {
                tracers.push(syscalls::attach(pid, out).await?);
            }
        }
    }
    let sent = relay(n).await?;
    let mut traced = Vec::new();
    for t in tracers {
        traced.push(t.detach().await?);
    }
    if count == Count::Instructions {
        for &pid in &pids {
            callgrind::collect(pid, false).await?;
        }
    }
    let stats1 = commandstats(&mut stats_conn).await?;
    // Callgrind writes its profile when the process exits.
    for p in [&mut agent_p, &mut edge_p] {
        if let Some(Err(e)) = p.terminate().await {
            bail!("{e}");
        }
    }
    let per = |x: u64| x as f64 / sent.max(1) as f64;
    let mut report = serde_json::Map::new();
    report.insert("webhooks".into(), json!(sent));
    match count {
        Count::Instructions => {
            let (edge_ir, agent_ir) = (callgrind::instructions(&edge_out)?, callgrind::instructions(&agent_out)?);
            println!(
                "callgrind over {sent} webhooks relayed end to end (Redis store, 64 senders, after {WARM_UP} warm-up):"
            );
            println!(
                "  instructions per webhook: edge {:.0}, agent {:.0}, both {:.0}",
                per(edge_ir),
                per(agent_ir),
                per(edge_ir + agent_ir)
            );
            report.insert("edge_instructions_per_webhook".into(), json!(per(edge_ir)));
            report.insert("agent_instructions_per_webhook".into(), json!(per(agent_ir)));
        }
        Count::Syscalls => {
            println!(
                "strace -c over {sent} webhooks relayed end to end (Redis store, 64 senders, after {WARM_UP} warm-up):"
            );
            for (who, s) in ["edge", "agent", "redis"].into_iter().zip(&traced) {
                let top: Vec<String> = s.by_call.iter().take(6).map(|(c, k)| format!("{c} {:.2}", per(*k))).collect();
                println!("  {who:<5} system calls per webhook: {:.2} ({})", per(s.total()), top.join(", "));
                let calls: serde_json::Map<String, Value> =
                    s.by_call.iter().map(|(c, k)| (c.clone(), json!(per(*k)))).collect();
                report.insert(format!("{who}_syscalls_per_webhook"), json!(per(s.total())));
                report.insert(format!("{who}_syscalls"), Value::Object(calls));
            }
        }
    }
    let mut cmds = serde_json::Map::new();
    let mut total = 0;
    for (cmd, calls) in &stats1 {
        let d = calls - stats0.get(cmd).copied().unwrap_or(0);
        if d > 0 && cmd != "info" && cmd != "xpending" {
            total += d;
            cmds.insert(cmd.clone(), json!(d as f64 / sent as f64));
        }
    }
    let listed: Vec<String> = cmds.iter().map(|(c, v)| format!("{c} {:.3}", v.as_f64().unwrap_or(0.0))).collect();
    println!("  Redis commands per webhook: {:.3} ({})", per(total), listed.join(", "));
    report.insert("redis_commands_per_webhook".into(), json!(per(total)));
    report.insert("redis_commands".into(), Value::Object(cmds));
    if count == Count::Instructions {
        println!("  profiles: {} and {} (callgrind_annotate)", edge_out.display(), agent_out.display());
        let keep = std::env::temp_dir().join("relay-bench-callgrind");
        std::fs::create_dir_all(&keep)?;
        for f in [&edge_out, &agent_out] {
            if let Some(name) = f.file_name() {
                std::fs::copy(f, keep.join(name))?;
            }
        }
        println!("  copied to {}", keep.display());
    }
    Ok(Value::Object(report))
}

/// Calls per Redis command so far (`INFO commandstats`), by command name.
async fn commandstats(
    c: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(c).await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect())
}

/// Stores exactly `n` webhooks (64 senders).
async fn fill(client: &load::HttpClient, url: &str, n: u64) -> u64 {
    let left = Arc::new(std::sync::atomic::AtomicI64::new(n as i64));
    let body = load::body_1k();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, url, left, body) = (client.clone(), url.to_string(), left.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while left.fetch_sub(1, Ordering::Relaxed) > 0 {
                loop {
                    let req = hyper::Request::post(&url)
                        .header("x-api-key", KEY)
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(body.clone()))
                        .expect("request");
                    if let Ok(r) = client.request(req).await
                        && r.status() == 200
                    {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok += 1;
                        break;
                    }
                }
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?.get_multiplexed_async_connection().await?)
}

async fn redis_memory(url: &str) -> anyhow::Result<u64> {
    let mut c = redis_conn(url).await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    Ok(info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}

/// The bench's edge: the edge's defaults, as in production, but for
/// `worker_threads` = `threads`, a window cap of 1000 and a backlog cap the
/// scenarios never reach; route `bench` → channel `bench`, granted to
/// `agents`; `store` are the `[store]` lines of the backend.
fn edge_opts(store: &str, agents: &[&str], threads: usize) -> EdgeOpts {
    EdgeOpts {
        top: format!("worker_threads = {threads}"),
        tunnel: "max_window = 1000".into(),
        store: format!("{store}\nmax_backlog = 100000000"),
        routing: routing_for("bench", KEY, &["bench"], agents),
        ..Default::default()
    }
}

/// The bench's agent: the agent's defaults, as in production, but for
/// `window`; channel `bench` delivered to `target`.
fn agent_opts(target: &str, window: u32) -> AgentOpts {
    AgentOpts {
        targets: vec![("bench".into(), target.into())],
        extra: format!("window = {window}"),
        request_timeout: String::new(),
        retry: String::new(),
        fast: false,
    }
}

/// Many agents (in this process) on a fresh edge: edge memory and CPU per
/// idle session, then the delivered rate with all of them busy.
async fn fan_in(
    args: &Args,
    d: &Path,
    edge_bin: &Path,
    redis_url: &str,
    client: &load::HttpClient,
    rx: &Arc<Receiver>,
    rx_addr: std::net::SocketAddr,
) -> anyhow::Result<Value> {
    let n = args.agents;
    let fan = d.join("fan");
    std::fs::create_dir_all(&fan)?;
    for f in ["ca.pem", "ca-key.pem", "edge.pem", "edge-key.pem"] {
        std::fs::copy(d.join(f), fan.join(f))?;
    }
    let names: Vec<String> = (0..n).map(|i| format!("fan-{i:04}")).collect();
    for name in &names {
        relay_edge::certs::agent(&fan, name)?;
    }
    let grants: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = format!("redis_url = \"{redis_url}\"");
    let spec = write_edge_in(&fan, "edge", &edge_opts(&store, &grants, args.edge_threads));
    let (ingest, tunnel, admin) = (spec.ingest, spec.tunnel, spec.admin);
    let mut edge = Proc::start_bin("relay-edge", edge_bin, &spec.config, LOG);
    wait_for("fan-in edge", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", ingest)).is_ok())
        .await?;
    let rss0 = usage_of(Some(&edge));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut agents = Vec::new();
    for name in &names {
        let (path, _) = write_agent_in(&fan, name, tunnel, &agent_opts(&format!("http://{rx_addr}/webhook"), 16));
        let cfg = std::sync::Arc::new(relay_agent::AgentConfig::load(Some(&path))?);
        let token = shutdown.clone();
        // The agent's tunnel without its status socket: one file
        // descriptor per agent in this process, not two.
        let status = relay_agent::status::Status::new(relay_agent::status::Snapshot::default());
        agents.push(tokio::spawn(relay_agent::tunnel::supervisor::run(cfg, status, token)));
    }
    let admin_url = format!("http://127.0.0.1:{admin}/admin/agents");
    let started = Instant::now();
    loop {
        let connected = agents_connected(client, &admin_url).await;
        if connected >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {connected} of {n} agents connected within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let idle_a = usage_of(Some(&edge));
    tokio::time::sleep(Duration::from_secs_f64(args.secs.max(10.0))).await;
    let idle_b = usage_of(Some(&edge));
    let idle_secs = args.secs.max(10.0);
    let rss_per_session_kib = (idle_b.rss_kib.saturating_sub(rss0.rss_kib)) as f64 / n as f64;
    let cpu_per_session_us_per_s = (idle_b.cpu_s - idle_a.cpu_s) * 1e6 / idle_secs / n as f64;
    let redis_clients = redis_client_count(redis_url).await;
    let hook = format!("http://127.0.0.1:{ingest}/hooks/bench");
    // One webhook at a time, 50/s, while all are connected: each goes to
    // whichever agent reads first.
    rx.record(true);
    let before = rx.count.load(Ordering::Relaxed);
    let probe = load::open_loop(client, &hook, Some(KEY), 50.0, args.secs.max(5.0)).await;
    let _ = wait_for_count(rx, before + probe.ok, Duration::from_secs(30)).await;
    rx.record(false);
    let one = relay_bench::stats::Latency::of(&mut rx.take_latencies());
    // All busy, while this process's file descriptors allow it (each agent
    // busy opens a connection to the receiver, also in this process).
    let busy = if n <= 4000 {
        let before = rx.count.load(Ordering::Relaxed);
        let run = load::closed_loop(client, &hook, Some(KEY), 128, args.secs).await;
        let delivered = rx.count.load(Ordering::Relaxed) - before;
        let _ = wait_for_count(rx, before + run.ok, Duration::from_secs(120)).await;
        Some((delivered as f64 / run.secs, run.rate()))
    } else {
        None
    };
    // The edge restarts (SIGTERM: it tells its agents, which come back at
    // once over a short jitter): how long until all are connected again.
    let _ = edge.terminate().await;
    let restarted = Instant::now();
    edge = Proc::start_bin("relay-edge", edge_bin, &spec.config, LOG);
    let mut reconnect_secs = None;
    while restarted.elapsed() < Duration::from_secs(120) {
        if agents_connected(client, &admin_url).await >= n {
            reconnect_secs = Some(restarted.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "\nfan-in: {n} agents connected in {connect_secs:.1} s; edge RSS {:.1} MiB ({rss_per_session_kib:.0} KiB per session), idle CPU {cpu_per_session_us_per_s:.1} µs/s per session, {redis_clients} Redis connections in all",
        idle_b.rss_kib as f64 / 1024.0
    );
    println!(
        "fan-in: one webhook at a time (50/s) while all are connected: e2e p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        one.p50_ms, one.p99_ms, one.max_ms
    );
    match busy {
        Some((rate, _)) => println!("fan-in: all busy: {rate:.0} delivered/s"),
        None => println!("fan-in: all busy: not run above 4,000 agents (file descriptors of this process)"),
    }
    match reconnect_secs {
        Some(s) => println!("fan-in: after an edge restart, all {n} agents connected again in {s:.1} s"),
        None => println!("fan-in: after an edge restart, not all {n} agents were back within 120 s"),
    }
    shutdown.cancel();
    for a in agents {
        let _ = a.await;
    }
    let _ = edge.terminate().await;
    Ok(json!({ "agents": n, "connect_s": connect_secs, "edge_rss_mib": idle_b.rss_kib as f64 / 1024.0,
               "edge_rss_kib_per_session": rss_per_session_kib, "edge_idle_cpu_us_per_s_per_session": cpu_per_session_us_per_s,
               "redis_connections": redis_clients, "one_at_a_time": one.json(),
               "busy_delivered_per_s": busy.map(|b| b.0), "busy_ingest_per_s": busy.map(|b| b.1),
               "reconnect_after_restart_s": reconnect_secs }))
}

async fn wait_for_count(rx: &Arc<Receiver>, target: u64, within: Duration) -> anyhow::Result<()> {
    wait_for("drain", within, || rx.count.load(Ordering::Relaxed) >= target).await
}

/// Clients connected to the Redis at `url` (less the one asking).
async fn redis_client_count(url: &str) -> usize {
    let Ok(client) = redis::Client::open(url) else { return 0 };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return 0 };
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.unwrap_or_default();
    list.lines().count().saturating_sub(1)
}

async fn agents_connected(client: &load::HttpClient, url: &str) -> usize {
    let req = hyper::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new())).expect("request");
    let Ok(resp) = client.request(req).await else { return 0 };
    let Ok(body) = http_body_util::BodyExt::collect(resp.into_body()).await else { return 0 };
    let v: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    v["agents"].as_array().map(|a| a.len()).unwrap_or(0)
}
