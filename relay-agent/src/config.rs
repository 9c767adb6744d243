//! Agent configuration: defaults < TOML file < `RELAY_*` environment <
//! the reference relay's `LOCAL_WEBHOOK_URL`, `MAX_RETRIES`, `RETRY_DELAY`,
//! `RETRY_MULTIPLIER`. Checked at start; errors name the key.
//!
//! The defaults are written once, with a comment per key, in
//! `relay-agent/config.default.toml` ([`DEFAULT_CONFIG`], the lowest
//! layer; `relay-agent print-default-config` prints it); the `Default`
//! impls below are the same values for in-process use, and a test keeps
//! the two equal. Only `status_socket` is computed at start
//! ([`default_status_socket`]), so the file shows it commented out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Every key with its default and a comment: `config.default.toml`, the
/// lowest configuration layer.
pub const DEFAULT_CONFIG: &str = include_str!("../config.default.toml");

/// Channel of the reference relay's single target.
pub const LEGACY_CHANNEL: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Edge tunnel URL, `wss://host:port`.
    pub edge: String,
    /// TLS server name to verify, when it differs from the URL's host.
    pub server_name: Option<String>,
    /// Client certificate (PEM); its CN is this agent's identity.
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
    /// CA that signed the edge certificate (PEM).
    pub ca: PathBuf,
    /// Unix socket answering `relay-agent status`.
    pub status_socket: PathBuf,
    /// Prometheus `/metrics` listener (off when unset; keep it on loopback).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Max unacked deliveries in flight (1 = strict per-channel FIFO).
    pub window: u32,
    /// Agent → edge ping interval; a link silent for 3× this is dropped.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Timeout of one local HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Timeout of TCP + TLS + WebSocket handshake + Welcome.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub reconnect: ReconnectConfig,
    pub retry: RetryConfig,
    /// Local endpoints, one per channel (`[[target]]`).
    #[serde(rename = "target")]
    pub targets: Vec<Target>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            edge: "wss://127.0.0.1:8443".into(),
            server_name: None,
            cert: "certs/dev/lan-1.pem".into(),
            key: "certs/dev/lan-1-key.pem".into(),
            ca: "certs/dev/ca.pem".into(),
            status_socket: default_status_socket(),
            metrics_listen: None,
            window: 64,
            heartbeat: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect: ReconnectConfig::default(),
            retry: RetryConfig::default(),
            targets: Vec::new(),
        }
    }
}

/// `$RUNTIME_DIRECTORY/status.sock` (systemd), else
/// `$XDG_RUNTIME_DIR/relay-agent.sock`, else `/tmp/relay-agent-<uid>/status.sock`
/// (a directory of this user's, never a name in `/tmp` itself, which any
/// user could take first).
pub fn default_status_socket() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    status_socket_from(std::env::var("RUNTIME_DIRECTORY").ok(), std::env::var("XDG_RUNTIME_DIR").ok(), uid)
}

/// [`default_status_socket`] from its inputs.
pub fn status_socket_from(runtime_dir: Option<String>, xdg_runtime_dir: Option<String>, uid: u32) -> PathBuf {
    match (runtime_dir.filter(|d| !d.is_empty()), xdg_runtime_dir.filter(|d| !d.is_empty())) {
        (Some(dir), _) => PathBuf::from(dir).join("status.sock"),
        (None, Some(dir)) => PathBuf::from(dir).join("relay-agent.sock"),
        (None, None) => PathBuf::from(format!("/tmp/relay-agent-{uid}/status.sock")),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// A session up this long resets the backoff.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts before a webhook is dead-lettered.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Target {
    pub channel: String,
    /// Local endpoint, `http://…`.
    pub url: String,
}

impl AgentConfig {
    /// Loads the layers and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg: AgentConfig =
            relay_runtime::config::load(DEFAULT_CONFIG, path, relay_runtime::config::ENV_PREFIX)?;
        cfg.apply_reference_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn apply_reference_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| ConfigError::Key { key: key.into(), why };
        if let Some(url) = var("LOCAL_WEBHOOK_URL").filter(|u| !u.is_empty()) {
            match self.targets.iter_mut().find(|t| t.channel == LEGACY_CHANNEL) {
                Some(t) => t.url = url,
                None => self.targets.push(Target { channel: LEGACY_CHANNEL.into(), url }),
            }
        }
        if let Some(n) = var("MAX_RETRIES").filter(|v| !v.is_empty()) {
            let n: u32 = n.parse().map_err(|_| bad("MAX_RETRIES", format!("`{n}` is not a count")))?;
            self.retry.max_attempts = n + 1;
        }
        if let Some(d) = var("RETRY_DELAY").filter(|v| !v.is_empty()) {
            self.retry.initial_delay = humantime::parse_duration(&d)
                .or_else(|_| d.parse::<u64>().map(Duration::from_secs))
                .map_err(|_| bad("RETRY_DELAY", format!("`{d}` is not a duration like 5s")))?;
        }
        if let Some(m) = var("RETRY_MULTIPLIER").filter(|v| !v.is_empty()) {
            self.retry.multiplier = m.parse().map_err(|_| bad("RETRY_MULTIPLIER", format!("`{m}` is not a number")))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| ConfigError::Key { key: key.into(), why };
        let uri: http::Uri =
            self.edge.parse().map_err(|e| bad("edge", format!("`{}` is not a URL: {e}", self.edge)))?;
        if uri.scheme_str() != Some("wss") {
            return Err(bad("edge", format!("`{}` must start with wss:// (the tunnel is always TLS)", self.edge)));
        }
        if uri.host().is_none() {
            return Err(bad("edge", format!("`{}` names no host", self.edge)));
        }
        if self.targets.is_empty() {
            return Err(bad(
                "target",
                "no [[target]] configured: add one with channel and url (or set LOCAL_WEBHOOK_URL)".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            if t.channel.is_empty() {
                return Err(bad(&format!("target[{i}].channel"), "is empty".into()));
            }
            if !seen.insert(t.channel.as_str()) {
                return Err(bad(&format!("target[{i}].channel"), format!("channel `{}` has two targets", t.channel)));
            }
            let u: http::Uri = t
                .url
                .parse()
                .map_err(|e| bad(&format!("target[{i}].url"), format!("`{}` is not a URL: {e}", t.url)))?;
            if u.scheme_str() != Some("http") || u.host().is_none() {
                return Err(bad(&format!("target[{i}].url"), format!("`{}` must be an http:// URL", t.url)));
            }
        }
        if self.window == 0 {
            return Err(bad("window", "must be at least 1".into()));
        }
        if self.heartbeat < Duration::from_millis(50) {
            return Err(bad("heartbeat", "must be at least 50ms".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(bad("retry.max_attempts", "must be at least 1".into()));
        }
        if !(self.retry.multiplier >= 1.0 && self.retry.multiplier.is_finite()) {
            return Err(bad("retry.multiplier", "must be a number ≥ 1".into()));
        }
        for (key, path) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
            if !path.is_file() {
                return Err(bad(key, format!("{} does not exist", path.display())));
            }
        }
        Ok(())
    }

    /// The channels this agent serves, in config order.
    pub fn channels(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.channel.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.default.toml` and the `Default` impls cannot drift apart:
    /// parsed, the file is exactly `AgentConfig::default()`, and it writes
    /// out every key that has a default (but the `[[target]]` list, empty
    /// by default, and `status_socket`, computed at start).
    #[test]
    fn the_default_config_file_is_the_default_impl() {
        let unwritten = ["target", "status_socket"];
        if let Err(why) = relay_runtime::config::check_defaults::<AgentConfig>(DEFAULT_CONFIG, &unwritten) {
            panic!("relay-agent/config.default.toml: {why}");
        }
    }

    #[test]
    fn the_default_status_socket_is_never_a_bare_name_in_tmp() {
        assert_eq!(
            status_socket_from(Some("/run/relay-agent".into()), None, 7),
            Path::new("/run/relay-agent/status.sock")
        );
        assert_eq!(status_socket_from(None, Some("/run/user/7".into()), 7), Path::new("/run/user/7/relay-agent.sock"));
        assert_eq!(status_socket_from(None, None, 7), Path::new("/tmp/relay-agent-7/status.sock"));
        assert_eq!(status_socket_from(Some(String::new()), None, 7), Path::new("/tmp/relay-agent-7/status.sock"));
    }

    #[test]
    fn reference_env_sets_default_target_and_retries() {
        let mut cfg = AgentConfig::default();
        cfg.apply_reference_env(|k| match k {
            "LOCAL_WEBHOOK_URL" => Some("http://127.0.0.1:3000/webhook".into()),
            "MAX_RETRIES" => Some("3".into()),
            "RETRY_DELAY" => Some("5s".into()),
            _ => None,
        })
        .expect("applies");
        assert_eq!(cfg.targets[0].channel, LEGACY_CHANNEL);
        assert_eq!(cfg.retry.max_attempts, 4);
        assert_eq!(cfg.retry.initial_delay, Duration::from_secs(5));
    }
}
