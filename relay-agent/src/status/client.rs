//! `relay-agent status`: asks the running agent over its socket.
//! Exit code 0 connected and healthy, 1 disconnected or stale, 2 not running.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use super::{Snapshot, now_ms};

pub const EXIT_HEALTHY: u8 = 0;
pub const EXIT_DISCONNECTED: u8 = 1;
pub const EXIT_NOT_RUNNING: u8 = 2;

/// Reads the snapshot; `Err` when no agent answers on `socket`.
pub fn query(socket: &Path) -> Result<Snapshot, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("no agent answers on {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).map_err(|e| format!("reading {} failed: {e}", socket.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&buf).map_err(|e| format!("unreadable answer from {}: {e}", socket.display()))?;
    serde_json::from_value(v["status"].clone()).map_err(|e| format!("unexpected answer: {e}"))
}

/// `--watch`: redraws the status every second until interrupted.
pub fn watch(socket: &Path) -> u8 {
    loop {
        print!("\x1b[2J\x1b[H");
        let code = run(socket, false);
        println!("\n(refreshing every second; Ctrl-C to stop)");
        if code == EXIT_NOT_RUNNING {
            return code;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the command and returns its exit code.
pub fn run(socket: &Path, json: bool) -> u8 {
    let snapshot = match query(socket) {
        Ok(s) => s,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "running": false, "error": e }));
            } else {
                println!("relay-agent is not running ({e})");
            }
            return EXIT_NOT_RUNNING;
        }
    };
    let now = now_ms();
    let healthy = snapshot.healthy(now);
    if json {
        let mut v = serde_json::to_value(&snapshot).unwrap_or_default();
        v["running"] = true.into();
        v["healthy"] = healthy.into();
        println!("{v}");
    } else {
        print!("{}", render(&snapshot, now, healthy));
    }
    if healthy { EXIT_HEALTHY } else { EXIT_DISCONNECTED }
}

fn age(now: u64, t: Option<u64>) -> String {
    match t {
        Some(t) => format!("{} ago", humantime::format_duration(Duration::from_secs(now.saturating_sub(t) / 1000))),
        None => "never".into(),
    }
}

/// The human table.
pub fn render(s: &Snapshot, now: u64, healthy: bool) -> String {
    let state = match (s.connected, healthy) {
        (true, true) => "connected",
        (true, false) => "connected but stale (no heartbeat within the deadline)",
        _ => "disconnected",
    };
    let mut rows: Vec<(String, String)> = vec![
        ("state".into(), state.into()),
        ("edge".into(), format!("{}{}", s.edge, s.edge_addr.as_deref().map(|a| format!(" ({a})")).unwrap_or_default())),
        ("agent".into(), s.agent.clone().unwrap_or_else(|| "-".into())),
        ("session".into(), s.session.clone().unwrap_or_else(|| "-".into())),
        (
            "uptime".into(),
            s.connected_since_ms
                .filter(|_| s.connected)
                .map(|t| humantime::format_duration(Duration::from_secs(now.saturating_sub(t) / 1000)).to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "heartbeat".into(),
            format!(
                "rtt {} · last {}",
                s.last_rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into()),
                age(now, s.last_heartbeat_ms)
            ),
        ),
        ("window".into(), format!("{} · in flight {}", s.window, s.in_flight)),
        (
            "deliveries".into(),
            format!(
                "delivered {} · retried {} · failed {} · dead-lettered {} · duplicates dropped {}",
                s.delivered, s.retried, s.failed, s.dead_lettered, s.duplicates_dropped
            ),
        ),
        ("reconnects".into(), s.reconnects.to_string()),
        (
            "last error".into(),
            match (&s.last_error, s.last_error_at_ms) {
                (Some(e), t) => format!("{e} ({})", age(now, t)),
                _ => "-".into(),
            },
        ),
    ];
    if let Some(exp) = s.cert_expires_at_ms {
        let days = (exp as i64 - now as i64) / 86_400_000;
        let when = chrono::DateTime::from_timestamp_millis(exp as i64).map(|d| d.format("%Y-%m-%d").to_string());
        let note = if days < 30 { " — WARNING: renew it soon" } else { "" };
        rows.push(("certificate".into(), format!("expires {} (in {days} days){note}", when.unwrap_or_default())));
    }
    for w in &s.warnings {
        rows.push(("WARNING".into(), w.clone()));
    }
    for t in &s.targets {
        let health = match (t.last_status, &t.last_error) {
            _ if t.paused => format!(
                "PAUSED: endpoint down, probing ({} parked){}",
                t.parked,
                t.last_error.as_deref().map(|e| format!(" — {e}")).unwrap_or_default()
            ),
            (_, Some(e)) => format!("error: {e}"),
            (Some(st), None) => format!("last status {st}"),
            (None, None) => "not used yet".into(),
        };
        rows.push((format!("target {}", t.channel), format!("{} · {health}", t.url)));
    }
    for c in &s.channels {
        rows.push((
            format!("backlog {}", c.channel),
            format!(
                "{} waiting · {} pending · oldest {}",
                c.backlog,
                c.pending,
                c.oldest_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_else(|| "-".into())
            ),
        ));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}
