//! Real attack tools from Debian against the real `relay-edge` binary on
//! loopback, each run bounded in time:
//!
//! * `slowhttptest` (slowloris `-H`, slow body `-B`) on the plain ingest
//!   port, while real webhooks keep being posted and must be answered `200`
//!   within 2 s; slowhttptest's own probe must find the service available
//!   and the edge must close every slow connection before the attack ends.
//! * `testssl` on the tunnel (TLS 1.3 only, client certificate required)
//!   and on HTTPS ingest (`ingest.tls_cert`/`tls_key`: TLS 1.2+ only), read
//!   from its flat JSON (`--jsonfile`: an array of `{id, severity, finding}`).
//!
//! Needs `apt-get install -y slowhttptest testssl.sh` (testssl.sh 3.0.8
//! depends on openssl, dnsutils, procps, bsdextrautils).
//!
//! Network: everything stays on 127.0.0.0/8. testssl gets `--ip 127.0.0.1
//! --nodns none` and `NXCONNECT=127.0.0.1:0` (otherwise its start-up probes
//! of the local openssl, `s_client -curves X -connect invalid.`, ask the
//! system resolver about `invalid.`); `--phone-out` (CRL/OCSP) stays off.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::procs::*;
use testkit::*;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const SLOWHTTPTEST: &str = "/usr/bin/slowhttptest";
const TESTSSL: &str = "/usr/bin/testssl";
const OPENSSL: &str = "/usr/bin/openssl";

/// Slow connections per attack. Below the default `ingest.max_connections_per_ip`
/// (128): slowhttptest's own probe comes from the attacker's address
/// (127.0.0.1) too, and must not be turned away by the per-IP cap.
const SLOW_CONNECTIONS: u32 = 120;

/// The tools load the machine: one test of this file runs at a time, so
/// timing assertions measure the edge, not the other test's tool.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes this file's one-at-a-time turn, then starts the edge binary on an
/// embedded store, its config text rewritten by `tune` first.
async fn edge_binary(
    tune: impl FnOnce(&Certs, String) -> String,
) -> (tokio::sync::MutexGuard<'static, ()>, Backing, Certs, EdgeSpec, Proc) {
    let one = ONE_AT_A_TIME.lock().await;
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let spec = write_edge(&certs, "edge", &store.toml(), "5s");
    let text = std::fs::read_to_string(&spec.config).expect("edge config");
    std::fs::write(&spec.config, tune(&certs, text)).expect("edge config");
    let edge = Proc::start("relay-edge", &spec.config);
    wait_edge_up(spec.admin).await;
    (one, store, certs, spec, edge)
}

/// Where the legitimate sender posts from: not the attacker's address.
const SENDER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn tool<'a>(path: &'a str, package: &str) -> &'a str {
    assert!(Path::new(path).is_file(), "{path} is missing: `apt-get install -y {package}` (see .ci/run)");
    path
}

/// Runs `cmd` with stdin closed, killed if it outlives `limit`; returns its
/// exit code and stdout followed by stderr.
async fn run_tool(cmd: &mut Command, limit: Duration) -> (Option<i32>, String) {
    let what = format!("{:?}", cmd.as_std());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} still running after {limit:?}: killed"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The text without terminal escapes (`ESC [ ... letter`): slowhttptest
/// colours its output and has no switch to stop.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

/// Posts a small JSON webhook every 200 ms from [`SENDER_IP`], each on a
/// new connection (no pooling: a held-open connection would skip the
/// accept path the attack loads), until `stop`. Returns (status, latency)
/// per request; status 0 when no answer came within 2 s.
fn keep_posting(url: String, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<(u16, Duration)>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(0)
            .local_address(SENDER_IP)
            .build()
            .expect("client");
        let mut seen = Vec::new();
        let mut i = 0u64;
        while !stop.is_cancelled() {
            i += 1;
            let started = Instant::now();
            let status = client
                .post(&url)
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                .body(format!("{{\"during_attack\":{i}}}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            seen.push((status, started.elapsed()));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    })
}

/// One row of slowhttptest's CSV (`-g -o PREFIX` writes PREFIX.csv, header
/// `Seconds,Closed,Pending,Connected,Service Available`). `available` is the
/// number of connections while its probe was answered, 0 once it was not.
#[derive(Debug)]
struct Row {
    second: u64,
    closed: u64,
    connected: u64,
    available: u64,
}

fn read_csv(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("Seconds,Closed,Pending,Connected,Service Available"), "CSV header of {text}");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let n: Vec<u64> = l.split(',').map(|v| v.trim().parse().expect("CSV number")).collect();
            assert_eq!(n.len(), 5, "CSV row `{l}`");
            Row { second: n[0], closed: n[1], connected: n[3], available: n[4] }
        })
        .collect()
}

/// Runs slowhttptest with `mode_args` against `url` while [`keep_posting`]
/// posts to it, and checks both sides.
async fn slow_attack(name: &str, url: &str, mode_args: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = dir.path().join(name);
    let conns = SLOW_CONNECTIONS.to_string();
    let stop = CancellationToken::new();
    let sender = keep_posting(url.to_string(), stop.clone());
    let started = Instant::now();
    let (code, out) = run_tool(
        Command::new(tool(SLOWHTTPTEST, "slowhttptest"))
            .args(mode_args)
            // connections, per second, test length, probe timeout (and probe every 3 s)
            .args(["-c", &conns, "-r", "100", "-l", "20", "-p", "3"])
            .arg("-g")
            .arg("-o")
            .arg(&prefix)
            .args(["-u", url]),
        Duration::from_secs(45),
    )
    .await;
    let took = started.elapsed();
    stop.cancel();
    let posts = sender.await.expect("sender");
    let out = strip_ansi(&out);
    eprintln!("slowhttptest {name}: {took:?}, exit {code:?}, {} webhooks posted meanwhile", posts.len());

    // The edge closed every slow connection itself ("Hit test time limit"
    // would mean it still held some after 20 s; "Connection refused": the
    // attack never connected).
    assert!(
        out.contains("Exit status: No open connections left"),
        "{name}: the edge did not close every slow connection:\n{out}"
    );
    assert!(!out.contains("service available:   NO"), "{name}: slowhttptest's probe found the service down:\n{out}");
    assert!(out.contains("service available:   YES"), "{name}: no status line from slowhttptest:\n{out}");

    let csv_path = prefix.with_extension("csv");
    let rows = read_csv(&csv_path);
    assert!(!rows.is_empty(), "{name}: empty CSV");
    for r in &rows {
        assert_eq!(
            r.available,
            u64::from(SLOW_CONNECTIONS),
            "{name}: service unavailable at second {}: {r:?}",
            r.second
        );
    }
    let peak = rows.iter().map(|r| r.connected).max().unwrap_or(0);
    assert!(
        peak >= u64::from(SLOW_CONNECTIONS) * 3 / 4,
        "{name}: the attack never held its connections (peak {peak} connected): {rows:?}"
    );
    assert!(rows.iter().any(|r| r.closed > 0), "{name}: no connection was closed: {rows:?}");

    // Real webhooks were answered throughout, quickly.
    assert!(posts.len() >= 10, "{name}: only {} webhooks were posted during the attack", posts.len());
    let bad: Vec<_> = posts.iter().filter(|(s, t)| *s != 200 || *t >= Duration::from_secs(2)).collect();
    assert!(
        bad.is_empty(),
        "{name}: webhooks not answered 200 within 2 s during the attack: {bad:?} of {}",
        posts.len()
    );
}

/// Slowloris, then slow bodies, from 127.0.0.1, on the plain ingest port
/// (`ingest.header_timeout` 10 s by default, `ingest.request_timeout` 5 s
/// in the test config). One after the other: together they would exceed
/// the per-IP connection cap, and slowhttptest's probe with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_slow_bodies_do_not_starve_real_webhooks() {
    let (_one, _store, _certs, spec, mut edge) = edge_binary(|_, text| text).await;
    let url = spec.hook_url();

    // Slow headers: a header line every 2 s; the edge cuts each connection
    // at `header_timeout` (observed: all closed by second ~11-13 of 20).
    slow_attack("slowloris", &url, &["-H", "-i", "2"]).await;

    // Slow body: a valid request head, then 8 KiB announced and a few bytes
    // a second. slowhttptest has no option for a request header, so the API
    // key rides in its `-j` cookie value after a CRLF; without it the edge
    // answers `401` at once and the body is never read.
    let cookie = format!("a=b\r\nX-API-Key: {KEY}");
    slow_attack("slow-body", &url, &["-B", "-i", "1", "-s", "8192", "-f", "application/json", "-j", &cookie]).await;

    edge.sigterm().await;
}

/// A testssl finding: (severity, finding).
type Findings = HashMap<String, (String, String)>;

/// Runs testssl's protocol, cipher-category and server-default checks on
/// `127.0.0.1:port` (about 15-25 s; 60 s under strace) and returns its
/// findings by id. Its exit code is not used: it is non-zero on the mTLS
/// port, where its openssl probe is refused (`optimal_proto` WARN
/// "Your OpenSSL cannot connect to 127.0.0.1:PORT.").
async fn testssl(port: u16) -> Findings {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("testssl.json");
    let target = format!("127.0.0.1:{port}");
    let (code, out) = run_tool(
        Command::new(tool(TESTSSL, "testssl.sh"))
            .env("NXCONNECT", "127.0.0.1:0")
            .args(["--quiet", "--color", "0", "--warnings", "off"])
            .args(["--nodns", "none", "--ip", "127.0.0.1"])
            .args(["--connect-timeout", "5", "--openssl-timeout", "5"])
            .args(["-p", "-s", "-S"])
            .arg("--jsonfile")
            .arg(&json)
            .arg(&target),
        Duration::from_secs(120),
    )
    .await;
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no JSON from testssl ({e}), exit {code:?}:\n{out}"));
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("testssl JSON: {e}:\n{text}"));
    let mut findings = Findings::new();
    for f in list {
        let field = |k: &str| f[k].as_str().unwrap_or_default().to_string();
        findings.entry(field("id")).or_insert((field("severity"), field("finding")));
    }
    eprintln!("testssl {target}: exit {code:?}, {} findings", findings.len());
    findings
}

fn finding<'a>(f: &'a Findings, id: &str) -> &'a str {
    &f.get(id).unwrap_or_else(|| panic!("testssl reported no `{id}`: {f:#?}")).1
}

fn assert_not_offered(f: &Findings, ids: &[&str], port: &str) {
    for id in ids {
        assert!(finding(f, id).starts_with("not offered"), "{port}: `{id}` is `{}`", finding(f, id));
    }
}

/// Cipher categories that must never be offered: NULL, anonymous, export,
/// LOW (64 bit, DES, RC2/RC4), 3DES/IDEA, and CBC (`cipherlist_AVERAGE`).
const WEAK_CIPHERS: &[&str] = &[
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",
];

/// No HIGH/CRITICAL finding but about the throwaway certificates
/// (`cert_chain_of_trust` CRITICAL "failed (chain incomplete).",
/// `cert_revocation` HIGH "Neither CRL nor OCSP URI provided").
fn assert_nothing_severe(f: &Findings, port: &str) {
    let severe: Vec<_> = f
        .iter()
        .filter(|(id, (sev, _))| !id.starts_with("cert") && matches!(sev.as_str(), "HIGH" | "CRITICAL"))
        .collect();
    assert!(severe.is_empty(), "{port}: severe findings: {severe:?}");
}

/// `openssl s_client` on the tunnel: writes `input` to it, keeps its stdin
/// open until its output (stdout and stderr) shows `until` or it ends by
/// itself, then closes stdin; returns all it printed.
async fn s_client(port: u16, args: &[&str], input: &str, until: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let target = format!("127.0.0.1:{port}");
    let mut child = Command::new(tool(OPENSSL, "openssl"))
        .args(["s_client", "-connect", &target, "-servername", "localhost", "-msg"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl");
    let mut stdin = child.stdin.take().expect("openssl stdin");
    // (s_client reads its stdin only once the handshake is done.)
    if !input.is_empty() {
        stdin.write_all(input.as_bytes()).await.expect("write to openssl s_client");
    }
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let readers = [
        collect(child.stdout.take().expect("openssl stdout"), output.clone()),
        collect(child.stderr.take().expect("openssl stderr"), output.clone()),
    ];
    wait_until(Duration::from_secs(10), &format!("openssl s_client to print `{until}` or end"), || {
        output.lock().is_ok_and(|o| o.contains(until)) || readers.iter().all(|r| r.is_finished())
    })
    .await;
    drop(stdin);
    let _exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("openssl s_client ends")
        .expect("openssl s_client");
    for r in readers {
        let _ = r.await;
    }
    output.lock().map(|o| o.clone()).unwrap_or_default()
}

/// Appends all `from` yields to `into`, until it ends.
fn collect<R>(mut from: R, into: std::sync::Arc<std::sync::Mutex<String>>) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if let Ok(mut o) = into.lock() {
                o.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_the_tunnel_tls13_only_with_client_certificates() {
    let (_one, _store, certs, spec, mut edge) = edge_binary(|_, text| text).await;
    let port = format!("tunnel {}", spec.tunnel);

    let f = testssl(spec.tunnel).await;
    assert_not_offered(&f, &["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"], &port);
    assert!(finding(&f, "TLS1_3").starts_with("offered"), "{port}: TLS1_3 is `{}`", finding(&f, "TLS1_3"));
    assert_not_offered(&f, WEAK_CIPHERS, &port);
    assert_eq!(finding(&f, "cipherlist_STRONG"), "offered", "{port}: AEAD ciphers");
    assert_nothing_severe(&f, &port);
    // testssl 3.0.8 has no client-auth finding for a TLS 1.3 server (its
    // check needs an openssl exit code and `Master-Key`, which TLS 1.3 does
    // not give). What it does list: the server's extensions, and these two
    // a TLS 1.3 server sends only in a CertificateRequest (RFC 8446 4.2).
    let ext = finding(&f, "TLS_extensions");
    for e in ["signature algorithms/#13", "certificate authorities/#47"] {
        assert!(ext.contains(e), "{port}: no CertificateRequest extension `{e}` in `{ext}`");
    }

    // The certificate is required, not just asked for.
    let ca = certs.path("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    // Refused: s_client prints the edge's alert and ends by itself.
    let without = s_client(spec.tunnel, &["-CAfile", ca], "", "alert certificate required").await;
    assert!(without.contains("CertificateRequest"), "{port}: no CertificateRequest:\n{without}");
    // "<<< TLS 1.3, Alert [length 0002], fatal certificate_required", then
    // "...:error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:...".
    assert!(
        without.contains("alert certificate required"),
        "{port}: a client without certificate was not refused:\n{without}"
    );
    let (cert, key) = (certs.path("lan-1.pem"), certs.path("lan-1-key.pem"));
    // Taken: the edge answers an HTTP request on the session (whatever the
    // status), which it does only once it accepted the certificate; a refusal
    // would have come before, as an alert.
    let with = s_client(
        spec.tunnel,
        &["-CAfile", ca, "-cert", cert.to_str().expect("utf-8"), "-key", key.to_str().expect("utf-8")],
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "HTTP/1.1 ",
    )
    .await;
    assert!(with.contains("Verify return code: 0 (ok)"), "{port}: handshake with lan-1:\n{with}");
    // (A clean run ends with ">>> TLS 1.3, Alert [length 0002], warning close_notify".)
    assert!(!with.contains("fatal") && !with.contains(":error:"), "{port}: lan-1's certificate was refused:\n{with}");

    edge.sigterm().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_https_ingest_tls12_and_up_with_strong_ciphers() {
    // HTTPS ingest: the edge's own certificate (SANs localhost, 127.0.0.1).
    let (_one, _store, _certs, spec, mut edge) = edge_binary(|certs, text| {
        let tls = format!(
            "[ingest]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.path("edge.pem").display(),
            certs.path("edge-key.pem").display()
        );
        text.replacen("[ingest]\n", &tls, 1)
    })
    .await;
    let port = format!("ingest {}", spec.ingest);

    let f = testssl(spec.ingest).await;
    assert_eq!(finding(&f, "service"), "HTTP", "{port}: testssl sees HTTP behind TLS");
    assert_not_offered(&f, &["SSLv2", "SSLv3", "TLS1", "TLS1_1"], &port);
    for id in ["TLS1_2", "TLS1_3"] {
        assert!(finding(&f, id).starts_with("offered"), "{port}: `{id}` is `{}`", finding(&f, id));
    }
    assert_not_offered(&f, WEAK_CIPHERS, &port);
    assert_eq!(finding(&f, "cipherlist_STRONG"), "offered", "{port}: AEAD ciphers");
    assert_nothing_severe(&f, &port);
    // Public senders have no client certificate: ingest must not ask.
    let ext = finding(&f, "TLS_extensions");
    assert!(!ext.contains("certificate authorities/#47"), "{port}: ingest asks for a client certificate: `{ext}`");

    edge.sigterm().await;
}
