//! The admin listener holds the only copy of failed webhooks: a browser
//! page on another site (an operator's browser reaches the port through
//! `ssh -L`) or a DNS-rebound name must not read or delete them, and a
//! destructive call needs an explicit JSON body.

use relay_edge::store::{Backend, BlockingRead, Cursor, DeadLetter};
use std::time::Duration;

use relay_protocol::Webhook;
use testkit::*;

/// An edge (no admin token: the API is protected only by being on
/// loopback) whose channel `crm` holds three dead letters.
async fn edge_with_dead_letters() -> (Backing, Certs, Edge) {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let handle = store.store();
    for i in 0..3 {
        let w =
            Webhook { id: format!("w{i}"), method: "POST".into(), path: "/hooks/hooks".into(), ..Default::default() };
        let ids = handle.append(&["crm".to_string()], &w).await.expect("append");
        let letter = DeadLetter { channel: "crm", id: ids[0], reason: "404", status: Some(404), attempts: 1 };
        handle.dead_letter(&letter).await.expect("dead-letter");
    }
    assert_eq!(xlen(&store, "crm", "dlq").await, 3);
    (store, certs, edge)
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_page_cannot_purge_the_dlq() {
    let (store, _certs, edge) = edge_with_dead_letters().await;
    let url = format!("http://{}/admin/dlq/crm/purge", edge.admin);
    // What `fetch(url, {method: "POST", mode: "no-cors"})` on evil.example sends.
    let resp = client()
        .post(&url)
        .header("origin", "http://evil.example")
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "no-cors")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 403, "{}", resp.text().await.unwrap_or_default());
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged");
    // An Origin alone (older browsers send no Sec-Fetch-*) is refused too.
    let resp = client()
        .post(&url)
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body("{\"all\":true}");
    assert_eq!(resp.send().await.expect("post").status(), 403);
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_rebound_name_cannot_read_the_admin_listener() {
    let (_store, _certs, edge) = edge_with_dead_letters().await;
    let port = edge.admin.port();
    for path in ["/admin/dlq/crm", "/health", "/metrics"] {
        let url = format!("http://{}{path}", edge.admin);
        let resp = client().get(&url).header("host", format!("rebind.evil.example:{port}")).send().await.expect("get");
        assert_eq!(resp.status(), 403, "{path} with a foreign Host");
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
            let resp = client().get(&url).header("host", &host).send().await.expect("get");
            assert_eq!(resp.status(), 200, "{path} with Host {host}");
        }
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destructive_calls_need_an_explicit_json_body() {
    let (store, _certs, edge) = edge_with_dead_letters().await;
    let purge = format!("http://{}/admin/dlq/crm/purge", edge.admin);
    let replay = format!("http://{}/admin/dlq/crm/replay", edge.admin);
    let resp = client().post(&purge).send().await.expect("post");
    assert_eq!(resp.status(), 415, "no body, no JSON content type");
    let resp = client().post(&purge).header("content-type", "text/plain").body("{\"all\":true}").send().await;
    assert_eq!(resp.expect("post").status(), 415, "a form-like content type");
    let resp = client().post(&purge).header("content-type", "application/json").body("{}").send().await.expect("post");
    assert_eq!(resp.status(), 400, "an empty object names nothing to purge");
    let resp = client().post(&replay).send().await.expect("post");
    assert_eq!(resp.status(), 415);
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged or replayed");

    let resp = client()
        .post(&purge)
        .header("content-type", "application/json")
        .body("{\"all\":true}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(xlen(&store, "crm", "dlq").await, 0);
    edge.stop().await;
}

/// The edge run with the default `admin.token_file` and no token: it
/// generates one at first start, in a new `0600` file, logs where (never
/// the token), requires it on `/admin`, keeps it across restarts, and the
/// CLI reads it from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_generated_at_first_start_and_the_cli_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    init_tracing();
    let certs = Certs::generate();
    let store = Backing::embedded();
    let spec = testkit::procs::write_edge(&certs, "edge", &store.toml(), "5s");
    let token_file = certs.path("state/admin.token");
    let text = std::fs::read_to_string(&spec.config).expect("config");
    let text = text.replace("token_file = \"\"", &format!("token_file = \"{}\"", token_file.display()));
    std::fs::write(&spec.config, text).expect("config");
    let log = certs.path("edge.log");
    let start = || {
        tokio::process::Command::new(bin("relay-edge"))
            .arg("--config")
            .arg(&spec.config)
            .env("RUST_LOG", "info")
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log"))
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn edge")
    };
    let mut edge = start();
    testkit::procs::wait_edge_up(spec.admin).await;
    let token = std::fs::read_to_string(&token_file).expect("token file written").trim().to_string();
    assert_eq!(token.len(), 64, "32 random bytes in hex: {token:?}");
    let mode = std::fs::metadata(&token_file).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode {mode:o}");

    let url = format!("http://127.0.0.1:{}/admin/dlq/crm", spec.admin);
    let c = client();
    assert_eq!(c.get(&url).send().await.expect("get").status(), 401, "no token");
    assert_eq!(c.get(&url).bearer_auth("wrong-token-0").send().await.expect("get").status(), 401);
    assert_eq!(c.get(&url).bearer_auth(&token).send().await.expect("get").status(), 200);
    let config = spec.config.to_str().expect("utf-8");
    let (code, out, err) = run_bin("relay-edge", &["--config", config, "dlq", "list", "--channel", "crm"]).await;
    assert_eq!(code, 0, "the CLI reads the token file: {out}{err}");

    // A restart keeps the token.
    let _ = edge.kill().await;
    let mut edge = start();
    testkit::procs::wait_edge_up(spec.admin).await;
    assert_eq!(std::fs::read_to_string(&token_file).expect("token").trim(), token, "same token after a restart");
    assert_eq!(c.get(&url).bearer_auth(&token).send().await.expect("get").status(), 200);
    let _ = edge.kill().await;

    // A token file others can read is refused (it may have been read or planted).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, _, err) = run_bin("relay-edge", &["--config", config, "check-config"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("admin.token_file") && err.contains("mode 644"), "{err}");
    // An empty one (a first start cut short) is replaced at the next start.
    std::fs::write(&token_file, "").expect("truncate");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut edge = start();
    testkit::procs::wait_edge_up(spec.admin).await;
    let fresh = std::fs::read_to_string(&token_file).expect("token").trim().to_string();
    assert_eq!(fresh.len(), 64, "a new token replaced the empty file: {fresh:?}");
    assert_eq!(c.get(&url).bearer_auth(&fresh).send().await.expect("get").status(), 200);
    let _ = edge.kill().await;

    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("admin API token generated"), "{logged}");
    assert!(logged.contains(&token_file.display().to_string()), "the log says where: {logged}");
    assert!(!logged.contains(&token), "the token reached the log");
}

/// An edge whose `crm` holds `n` dead letters, with `store.max_backlog`
/// set to `cap` (no agent: replayed entries stay in the backlog).
async fn dead_letters_under_a_cap(n: usize, cap: u64) -> (Backing, Certs, Edge) {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.store.max_backlog = cap;
    let edge = Edge::start(cfg).await;
    let handle = store.store();
    let mut reader = handle.reader().await.expect("reader");
    for i in 0..n {
        let w =
            Webhook { id: format!("w{i}"), method: "POST".into(), body: vec![b'x'; 100].into(), ..Default::default() };
        let ids = handle.append(&["crm".to_string()], &w).await.expect("append");
        // Delivered once (so no longer in the backlog), then failed.
        reader.read("test", &[("crm".to_string(), Cursor::New)], 1).await.expect("read");
        let letter = DeadLetter { channel: "crm", id: ids[0], reason: "404", status: Some(404), attempts: 1 };
        handle.dead_letter(&letter).await.expect("dead-letter");
    }
    (store, certs, edge)
}

/// Whether the edge's `/metrics` has the line `line`.
async fn metrics_show(edge: &Edge, line: &str) -> bool {
    let Ok(resp) = client().get(format!("http://{}/metrics", edge.admin)).send().await else { return false };
    resp.text().await.is_ok_and(|text| text.lines().any(|l| l == line))
}

async fn admin_post(edge: &Edge, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = client()
        .post(format!("http://{}{path}", edge.admin))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json"))
}

/// Replays (of dead letters, and of history) respect `store.max_backlog`
/// like ingest does, and say what they did when they stop early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_stop_at_the_backlog_cap_and_report_what_they_did() {
    let (store, _certs, edge) = dead_letters_under_a_cap(40, 20).await;
    // The backlog count is refreshed every 500 ms (replays also count their
    // own): wait for a refresh that saw all 40 dead letters, so the count
    // is the one after the set-up. (One read of the embedded store gives
    // both figures, and the gauges are set after the count.)
    wait_for(Duration::from_secs(10), "a backlog refresh after the set-up", || {
        metrics_show(&edge, "relay_dlq_length{channel=\"crm\"} 40")
    })
    .await;
    let (s, j) = admin_post(&edge, "/admin/dlq/crm/replay", serde_json::json!({"all": true})).await;
    assert_eq!(s, 200, "{j}");
    let replayed = j["replayed"].as_array().expect("replayed").len();
    assert!(j["stopped"].as_str().is_some_and(|w| w.contains("backlog")), "says why it stopped: {j}");
    assert_eq!(replayed, 20, "stopped at the cap of 20");
    assert_eq!(xlen(&store, "crm", "dlq").await, 40 - replayed as u64, "the rest stay dead letters");

    let (s, j) = admin_post(&edge, "/admin/replay", serde_json::json!({"channel": "crm", "since_ms": 0})).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["replayed"], 0, "already at the cap: {j}");
    assert!(j["stopped"].as_str().is_some_and(|w| w.contains("backlog")), "{j}");
}

/// A dead-letter list names at most `limit` entries, no bodies, and
/// `next` to page on; paging visits each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_are_bounded_pages_without_bodies() {
    let (_store, _certs, edge) = dead_letters_under_a_cap(45, 1_000_000).await;
    let c = client();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("http://{}/admin/dlq/crm?limit=20", edge.admin);
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let j: serde_json::Value =
            serde_json::from_slice(&c.get(&url).send().await.expect("get").bytes().await.expect("body")).expect("json");
        let page = j["entries"].as_array().expect("entries").clone();
        assert!(page.len() <= 20, "{}", page.len());
        assert!(page.iter().all(|e| e.get("body").is_none() && e.get("headers").is_none()), "no bodies in a list");
        seen.extend(page.iter().map(|e| e["id"].as_str().expect("id").to_string()));
        match j["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let distinct: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), distinct.len()), (45, 45), "each dead letter once");
    let url = format!("http://{}/admin/dlq/crm?limit=1000000", edge.admin);
    let j: serde_json::Value =
        serde_json::from_slice(&c.get(&url).send().await.expect("get").bytes().await.expect("body")).expect("json");
    assert_eq!(j["entries"].as_array().expect("entries").len(), 45);
}

/// `replay --all` while the local endpoint still refuses them: each dead
/// letter comes back under a new, later id within milliseconds, and the
/// replay must not reach those and replay them again (it used to page on
/// until the DLQ stayed empty: an endless loop of duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_all_while_they_fail_again_replays_each_once() {
    let (store, certs, edge) = dead_letters_under_a_cap(30, 1_000_000).await;
    let rx = Receiver::start().await;
    rx.answer(400);
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    let replay = admin_post(&edge, "/admin/dlq/crm/replay", serde_json::json!({"all": true}));
    let (s, j) = tokio::time::timeout(Duration::from_secs(20), replay).await.expect("the replay ends");
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["count"], 30, "each of the 30 once: {}", j["count"]);
    wait_until(Duration::from_secs(10), "all 30 refused again", || rx.count() >= 30).await;
    // Settled: all 30 dead letters again and nothing left in the stream to
    // deliver, so no further request can come.
    wait_for(Duration::from_secs(10), "all 30 back in the DLQ, nothing left to deliver", || async {
        let snap = store.snapshot("crm").await;
        snap.dlq_length == 30 && snap.unacked() == 0
    })
    .await;
    assert_eq!(rx.count(), 30, "the endpoint got each once");
    agent.stop().await;
}

/// Upgrading an edge whose token file cannot be written (a read-only
/// working directory under `ProtectSystem=strict`) must not keep ingest
/// down: on loopback the edge starts, with the API open to loopback only
/// as before, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_token_file_does_not_keep_a_loopback_edge_down() {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let mut cfg = edge_config(&store, &certs);
    cfg.admin.token_file = Some("/proc/relay-edge-test/admin.token".into());
    let edge = Edge::start(cfg).await;
    let (s, _) = post(&client(), &edge.hook_url("hooks"), KEY, b"{}".to_vec()).await;
    assert_eq!(s, 200, "ingest runs");
    let dlq = client().get(format!("http://{}/admin/dlq/crm", edge.admin)).send().await.expect("get");
    assert_eq!(dlq.status(), 200, "the admin API is open to loopback, as without a token");
    edge.stop().await;
}

/// An id that is not a stream id is the caller's mistake on both backends:
/// a `400` naming it (on Redis it used to reach `XRANGE` and come back as a
/// store error, `503`), and nothing is replayed.
async fn malformed_ids_are_a_bad_request(backing: Backing) {
    init_tracing();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&backing, &certs)).await;
    let get = |path: String| async move {
        let resp = client().get(format!("http://{}{path}", edge.admin)).send().await.expect("get");
        let status = resp.status().as_u16();
        (status, String::from_utf8_lossy(&resp.bytes().await.expect("body")).into_owned())
    };
    for path in ["/admin/dlq/crm/not-an-id", "/admin/dlq/crm/1-", "/admin/dlq/crm?after=x-1", "/admin/dlq/crm?after=5"]
    {
        let (status, body) = get(path.to_string()).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("not a stream id"), "{path}: {body}");
    }
    let (status, body) = get("/admin/dlq/crm/1-0".to_string()).await;
    assert_eq!(status, 404, "a well-formed id of nothing: {body}");
    let (status, body) =
        admin_post(&edge, "/admin/dlq/crm/replay", serde_json::json!({ "ids": ["1-0", "oops"] })).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("oops"), "the answer names the bad id: {body}");
    assert_eq!(xlen(&backing, "crm", "stream").await, 0, "nothing replayed");
}

both_backends!(malformed_ids_are_a_bad_request);
