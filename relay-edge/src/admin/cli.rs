//! Client side of `relay-edge dlq …` and `relay-edge replay …`: calls the
//! admin API of a running edge and prints a table or (`--json`) its answer.

use std::time::Duration;

use serde_json::{Value, json};

/// Where the admin API is and how to authenticate.
pub struct AdminClient {
    pub base: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

impl AdminClient {
    pub fn new(base: String, token: Option<String>) -> Self {
        let base = if base.contains("://") { base } else { format!("http://{base}") };
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(120)).no_proxy().build().unwrap_or_default();
        Self { base: base.trim_end_matches('/').to_string(), token, client }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| format!("cannot reach the edge's admin API at {}: {e}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("reading the answer failed: {e}"))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()))?;
        if !status.is_success() {
            return Err(format!("{status}: {}", v["message"].as_str().unwrap_or("request failed")));
        }
        Ok(v)
    }
}

/// The purge call's body: everything, or what failed before a time.
fn purge_body(before_ms: Option<u64>) -> Value {
    match before_ms {
        Some(ms) => json!({ "before_ms": ms }),
        None => json!({ "all": true }),
    }
}

/// A point in time: RFC 3339, or a duration meaning "that long ago" (`2h`).
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return u64::try_from(t.timestamp_millis()).map_err(|_| format!("`{s}` is before 1970"));
    }
    let ago = humantime::parse_duration(s).map_err(|_| format!("`{s}` is neither RFC 3339 nor a duration like 2h"))?;
    Ok(now_ms.saturating_sub(ago.as_millis() as u64))
}

pub enum Command {
    List { channel: String, limit: usize },
    Show { channel: Option<String>, id: String, channels: Vec<String> },
    ReplayDlq { channel: String, ids: Vec<String>, all: bool },
    Purge { channel: String, before_ms: Option<u64> },
    ReplayHistory { channel: String, since_ms: u64, until_ms: Option<u64> },
    Agents,
}

/// Runs one command; returns the text to print (or the JSON).
pub async fn run(client: &AdminClient, cmd: Command, as_json: bool) -> Result<String, String> {
    use reqwest::Method;
    let (v, human): (Value, fn(&Value) -> String) = match cmd {
        Command::List { channel, limit } => {
            (client.call(Method::GET, &format!("/admin/dlq/{channel}?limit={limit}"), None).await?, render_list)
        }
        Command::Show { channel, id, channels } => {
            let candidates = match channel {
                Some(c) => vec![c],
                None => channels,
            };
            let mut found = None;
            let mut last_err = format!("no dead letter `{id}`");
            for c in candidates {
                match client.call(Method::GET, &format!("/admin/dlq/{c}/{id}"), None).await {
                    Ok(v) => {
                        found = Some(v);
                        break;
                    }
                    Err(e) => last_err = e,
                }
            }
            (found.ok_or(last_err)?, render_show)
        }
        Command::ReplayDlq { channel, ids, all } => (
            client
                .call(Method::POST, &format!("/admin/dlq/{channel}/replay"), Some(json!({ "ids": ids, "all": all })))
                .await?,
            render_replayed,
        ),
        Command::Purge { channel, before_ms } => (
            client.call(Method::POST, &format!("/admin/dlq/{channel}/purge"), Some(purge_body(before_ms))).await?,
            |v| format!("purged {} dead letters from channel {}\n", v["purged"], v["channel"].as_str().unwrap_or("")),
        ),
        Command::Agents => (client.call(Method::GET, "/admin/agents", None).await?, render_agents),
        Command::ReplayHistory { channel, since_ms, until_ms } => (
            client
                .call(
                    Method::POST,
                    "/admin/replay",
                    Some(json!({ "channel": channel, "since_ms": since_ms, "until_ms": until_ms })),
                )
                .await?,
            |v| {
                format!(
                    "replayed {} webhooks of channel {} received between {} and {}\n",
                    v["replayed"],
                    v["channel"].as_str().unwrap_or(""),
                    v["since"].as_str().unwrap_or(""),
                    v["until"].as_str().unwrap_or("")
                )
            },
        ),
    };
    let out = if as_json { format!("{v}\n") } else { human(&v) };
    // A replay that stopped early (backlog cap, store down) did part of
    // the work: say what, and fail so scripts notice.
    match v["stopped"].as_str() {
        Some(why) => Err(format!("{out}stopped early: {why}")),
        None => Ok(out),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render_list(v: &Value) -> String {
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![[
        "ID".to_string(),
        "FAILED AT".into(),
        "ROUTE".into(),
        "ATTEMPTS".into(),
        "STATUS".into(),
        "REASON".into(),
    ]];
    for e in &entries {
        rows.push([
            s(&e["id"]),
            s(&e["failed_at"]),
            s(&e["route"]),
            s(&e["attempts"]),
            s(&e["status"]),
            s(&e["reason"]),
        ]);
    }
    let mut out = table(&rows);
    out.push_str(&format!("{} of {} dead letters in channel {}\n", entries.len(), s(&v["total"]), s(&v["channel"])));
    out
}

fn render_agents(v: &Value) -> String {
    let agents = v["agents"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![[
        "AGENT".to_string(),
        "ADDRESS".into(),
        "CONNECTED SINCE".into(),
        "CHANNELS".into(),
        "IN FLIGHT".into(),
        "RTT".into(),
    ]];
    for a in &agents {
        let channels =
            a["channels"].as_array().map(|c| c.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default();
        let rtt = a["last_rtt_ms"].as_f64().map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
        rows.push([s(&a["agent"]), s(&a["addr"]), s(&a["connected_since"]), channels, s(&a["in_flight"]), rtt]);
    }
    let mut out = table(&rows);
    out.push_str(&format!("{} agents connected\n", agents.len()));
    out
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render_show(v: &Value) -> String {
    let mut out = String::new();
    for k in [
        "id",
        "channel",
        "stream_id",
        "webhook_id",
        "route",
        "received_at",
        "failed_at",
        "attempts",
        "status",
        "reason",
        "method",
        "path",
        "query",
    ] {
        out.push_str(&format!("{k:<12} {}\n", s(&v[k])));
    }
    for h in v["headers"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!("{:<12} {}: {}\n", "header", s(&h[0]), s(&h[1])));
    }
    match (&v["body"], &v["body_base64"]) {
        (Value::String(b), _) => out.push_str(&format!("body\n{b}\n")),
        (_, Value::String(b)) => out.push_str(&format!("body (base64)\n{b}\n")),
        _ => {}
    }
    out
}

fn render_replayed(v: &Value) -> String {
    let replayed = v["replayed"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    for r in &replayed {
        out.push_str(&format!("{} -> {}\n", s(&r["dlq_id"]), s(&r["stream_id"])));
    }
    let count = v["count"].as_u64().unwrap_or(replayed.len() as u64);
    if count > replayed.len() as u64 {
        out.push_str(&format!("(the first {} listed)\n", replayed.len()));
    }
    out.push_str(&format!("replayed {count} dead letters into channel {}\n", s(&v["channel"])));
    if let Some(m) = v["missing"].as_array().filter(|m| !m.is_empty()) {
        out.push_str(&format!("not found: {}\n", m.iter().map(s).collect::<Vec<_>>().join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_parse_as_rfc3339_or_ago() {
        let now = 10_000_000;
        assert_eq!(super::parse_time("2h", now), Ok(2_800_000));
        assert_eq!(super::parse_time("1970-01-01T00:00:01Z", now), Ok(1000));
        assert!(super::parse_time("yesterday-ish", now).is_err());
    }
}
