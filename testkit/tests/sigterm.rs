//! SIGTERM under steady load, on the real `relay-edge` and `relay-agent`
//! processes: each shuts down gracefully, comes back, and nothing that was
//! answered 200 is lost.

use std::time::Duration;

use testkit::procs::*;
use testkit::*;

/// Waits until `rx` got `n` more requests than it had when called.
async fn flowing(rx: &Receiver, n: usize) {
    let from = rx.count();
    wait_until(Duration::from_secs(20), "deliveries flowing", || rx.count() >= from + n).await;
}

async fn sigterm_on_edge_and_agent_under_load_loses_nothing(store: Backing) {
    init_tracing();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    rx.delay(Duration::from_millis(5));
    let edge_spec = write_edge(&certs, "edge", &store.toml(), "5s");
    if matches!(store, Backing::Embedded { .. }) {
        // One backend's edge runs a thread per core (`worker_threads = 0`);
        // the other the default, single-threaded runtime.
        let text = std::fs::read_to_string(&edge_spec.config).expect("edge config");
        std::fs::write(&edge_spec.config, format!("worker_threads = 0\n{text}")).expect("edge config");
    }
    let (agent_cfg, socket) = write_agent(&certs, "lan-1", edge_spec.tunnel, &rx.url(), "window = 16");
    let mut edge = Proc::start("relay-edge", &edge_spec.config);
    let mut agent = Proc::start("relay-agent", &agent_cfg);
    wait_connected(&socket).await;

    // Steady load: ~160 webhooks/s from 4 senders.
    let load = Workload::start(&[edge_spec.hook_url()], 4, Duration::from_millis(20), 256);
    let taken = || load.accepted.lock().map(|a| a.len()).unwrap_or(0);
    // Each SIGTERM lands while webhooks flow through the edge and the agent.
    flowing(&rx, 50).await;
    edge.sigterm().await;
    // Down for a while by design: the load meets a stopped edge.
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.restart();
    wait_until(Duration::from_secs(15), "agent reconnected to the new edge", || {
        relay_agent::status::client::query(&socket).is_ok_and(|s| s.connected && s.reconnects >= 1)
    })
    .await;
    flowing(&rx, 50).await;
    agent.sigterm().await;
    agent.restart();
    wait_connected(&socket).await;
    flowing(&rx, 50).await;
    wait_until(Duration::from_secs(20), "over 200 webhooks taken", || taken() > 200).await;
    let (accepted, refused) = load.stop().await;
    assert!(accepted.len() > 200, "the load ran ({} accepted)", accepted.len());
    let report = check_invariant(edge_spec.admin, &rx, &accepted, refused, Duration::from_secs(30)).await;
    eprintln!("sigterm under load: {report:?}");
    assert!(
        report.duplicates <= 2 * 16,
        "duplicates stay within the in-flight windows of the two restarts ({})",
        report.duplicates
    );
    agent.sigterm().await;
    edge.sigterm().await;
}

both_backends!(sigterm_on_edge_and_agent_under_load_loses_nothing);
