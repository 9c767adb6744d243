//! Edge configuration: defaults < TOML file < `RELAY_*` environment <
//! the reference Go relay's flat variables (`API_KEY`, `REDIS_URL`, …).
//!
//! The defaults are written once, with a comment per key, in
//! `relay-edge/config.default.toml` ([`DEFAULT_CONFIG`], the lowest layer;
//! `relay-edge print-default-config` prints it); the `Default` impls below
//! are the same values for in-process use, and a test keeps the two equal.
//! Every key has a default that works for a local trial; [`EdgeConfig::validate`]
//! names the key and the reason for anything that cannot work.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::tunnel::revocation::{Revocation, RevocationError, list_entries};

/// Every key with its default and a comment: `config.default.toml`, the
/// lowest configuration layer.
pub const DEFAULT_CONFIG: &str = include_str!("../config.default.toml");

/// Name of the route behind `POST /webhook` (reference relay compatibility).
pub const LEGACY_ROUTE: &str = "webhook";
/// Shortest `store.retention`: webhooks not delivered within it are
/// dead-lettered (`expired`), so `0s` (which some read as "forever")
/// would dead-letter everything. Below `tunnel.reclaim_after` is warned of.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Channel of the legacy route.
pub const LEGACY_CHANNEL: &str = "default";

/// The whole edge configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Threads running the edge. 1 (default): a single-threaded runtime,
    /// which spends a third less CPU per webhook than one thread per core
    /// (no cross-thread wake-ups; measured by `relay-bench`) and still
    /// carries tens of thousands of webhooks per second; 0 = one thread per
    /// CPU core, for hosts whose ingest needs more than one core.
    pub worker_threads: usize,
    pub ingest: IngestConfig,
    pub tunnel: TunnelConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    /// Named webhook routes (`[[route]]`).
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Agent identities and the channels granted to each (`[[agent]]`).
    #[serde(rename = "agent")]
    pub agents: Vec<AgentGrant>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            worker_threads: 1,
            ingest: IngestConfig::default(),
            tunnel: TunnelConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            routes: Vec::new(),
            agents: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Public webhook listener.
    pub listen: String,
    /// Largest accepted body; Meta batches reach 3 MB.
    pub max_body: ByteSize,
    /// Time allowed for reading a request and writing it to the store.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time allowed for a client to send the request head (slow-client cut-off).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most header fields in one request (431 past it).
    pub max_headers: usize,
    /// Largest request head (431 past it).
    pub max_header_bytes: ByteSize,
    /// HTTPS on the ingest listener: certificate chain and key (PEM), both
    /// or neither. Re-read on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Requests per second per client IP (0 = off); `burst_per_ip` above it.
    pub rate_per_ip: u32,
    pub burst_per_ip: u32,
    /// Requests per second per API key (0 = off); `burst_per_key` above it.
    pub rate_per_key: u32,
    pub burst_per_key: u32,
    /// Reverse proxies whose `X-Forwarded-For` is believed (exact IPs).
    /// They are also exempt from `max_connections_per_ip`.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Connections held at once, in all and from one client IP; past
    /// either, a new connection is closed at once, before TLS (0 = no cap).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Longest one connection is kept (an idle keep-alive too); then it is
    /// closed once its request in flight is answered (0 = no limit).
    #[serde(with = "humantime_serde")]
    pub connection_lifetime: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body: ByteSize::mib(4),
            request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: ByteSize::kib(64),
            tls_cert: None,
            tls_key: None,
            rate_per_ip: 1000,
            burst_per_ip: 2000,
            rate_per_key: 5000,
            burst_per_key: 10000,
            trusted_proxies: Vec::new(),
            max_connections: 2048,
            max_connections_per_ip: 128,
            connection_lifetime: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// `wss://` listener for agents (mutual TLS).
    pub listen: String,
    /// Edge server certificate chain (PEM).
    pub cert: PathBuf,
    /// Edge server private key (PEM).
    pub key: PathBuf,
    /// CA that signs agent client certificates (PEM).
    pub client_ca: PathBuf,
    /// Interval of edge → agent pings; a session silent for 3× this is closed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Time allowed for TLS + WebSocket handshake + `Hello`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Visibility timeout: entries pending this long on another consumer are
    /// reclaimed (`XAUTOCLAIM`). Must exceed the agent's request timeout plus
    /// its heartbeat deadline, or slow local apps cause duplicates.
    #[serde(with = "humantime_serde")]
    pub reclaim_after: Duration,
    /// Largest frame accepted from an agent.
    pub max_frame: ByteSize,
    /// Largest window an agent may ask for.
    pub max_window: u32,
    /// Most webhook bytes one session holds for its agent (sent and not
    /// yet settled, or waiting to be redelivered), counted in real sizes.
    /// A store read is sized as if every entry were the largest this
    /// edge's ingest stores (`ingest.max_body` plus `ingest.max_header_bytes`
    /// plus 4 KiB, at most `max_frame`; raised by any larger entry read) and
    /// only happens while a `max_frame` fits, so with what it read a session
    /// pins at most about twice this (plus one such entry per further
    /// channel), if the edges sharing the store share those ingest limits.
    pub session_bytes: ByteSize,
    /// Delay before redelivering a nacked webhook when the agent gave none.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Refused agent certificates: `sha256:<hex of the DER>` fingerprints or
    /// `serial:<hex>` serial numbers (`relay-edge certs fingerprint FILE`).
    /// Re-read on SIGHUP; matching sessions are dropped.
    pub revoked: Vec<String>,
    /// A file of more such entries, one per line (`#` comments), which
    /// `relay-edge certs revoke` appends to; read at start and on SIGHUP.
    pub revoked_file: Option<PathBuf>,
    /// Connections held at once, in all and from one IP (agents behind one
    /// NAT share an IP); past either, a new one is closed before TLS.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8443".into(),
            cert: "certs/dev/edge.pem".into(),
            key: "certs/dev/edge-key.pem".into(),
            client_ca: "certs/dev/ca.pem".into(),
            heartbeat: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            reclaim_after: Duration::from_secs(120),
            max_frame: ByteSize::mib(8),
            max_window: 1000,
            session_bytes: ByteSize::mib(128),
            retry_delay: Duration::from_secs(1),
            revoked: Vec::new(),
            revoked_file: None,
            max_connections: 512,
            max_connections_per_ip: 64,
        }
    }
}

impl TunnelConfig {
    /// `revoked` parsed (the grammar is [`crate::tunnel::revocation`]'s),
    /// with the `revoked_file` entries once [`EdgeConfig::read_revoked_file`]
    /// added them; the first bad entry is the error.
    pub fn revocations(&self) -> Result<Vec<Revocation>, RevocationError> {
        Revocation::parse_all(self.revoked.iter().map(String::as_str))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/health`, `/ready`, `/metrics` and the admin API. Keep on loopback.
    pub listen: String,
    /// Bearer token for the admin API (not needed for /health, /ready).
    pub token: Option<Secret>,
    /// Where the token lives when `token` is unset: read when it exists,
    /// else generated at the edge's first start (32 random bytes, hex, in a
    /// new `0600` file). Unset: `$STATE_DIRECTORY/admin.token` under
    /// systemd, else `relay-edge.admin-token` in the working directory.
    /// `""` = no file: the API is then open to loopback clients (refused
    /// off loopback). The CLI reads the same file.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9090".into(), token: None, token_file: None }
    }
}

/// Why a token file cannot be used.
/// A configuration error naming its key.
fn key_error(key: &str, why: String) -> ConfigError {
    ConfigError::Key { key: key.into(), why }
}

fn token_error(why: String) -> ConfigError {
    ConfigError::Key { key: "admin.token_file".into(), why }
}

impl AdminConfig {
    /// Whether `listen` is a loopback address.
    pub fn on_loopback(&self) -> bool {
        self.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
    }

    /// The token file: `token_file`, its default when unset, none for `""`.
    pub fn token_path(&self) -> Option<PathBuf> {
        match &self.token_file {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => Some(match std::env::var("STATE_DIRECTORY").ok().filter(|d| !d.is_empty()) {
                // systemd may list several directories, `:`-separated.
                Some(dirs) => PathBuf::from(dirs.split(':').next().unwrap_or_default()).join("admin.token"),
                None => PathBuf::from("relay-edge.admin-token"),
            }),
        }
    }

    /// Fills `token` from the token file when that file exists and holds
    /// one. The file must be a regular file of this user's that nobody
    /// else can read or write (so nobody planted or read it).
    pub fn read_token_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.token_path().filter(|_| self.token.is_none()) else { return Ok(()) };
        if let Some(token) = read_token(&path)? {
            self.token = Some(Secret::new(token));
        }
        Ok(())
    }

    /// With neither a token nor its file: generates one into the token
    /// file (`0600`, never overwriting another's) and returns the file's
    /// path. An empty file (a first start cut short) is replaced.
    pub fn generate_token(&mut self) -> Result<Option<PathBuf>, ConfigError> {
        self.read_token_file()?;
        let Some(path) = self.token_path().filter(|_| self.token.is_none()) else { return Ok(None) };
        if path.exists() {
            // Empty: read_token found no token in a file of ours.
            std::fs::remove_file(&path).map_err(|e| token_error(format!("cannot replace {}: {e}", path.display())))?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| token_error(format!("cannot create {}: {e}", dir.display())))?;
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let token = hex::encode(rand::random::<[u8; 32]>());
        // `create_new` (O_EXCL) never follows a symlink planted at the path.
        let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
        let mut file = match created {
            Ok(f) => f,
            // Another edge started at the same moment: use its token, once
            // it is written (never run without one because of the race).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                for _ in 0..20 {
                    self.read_token_file()?;
                    if self.token.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                if self.token.is_none() {
                    return Err(token_error(format!("{} is being written by another process", path.display())));
                }
                return Ok(None);
            }
            Err(e) => return Err(token_error(format!("cannot create {}: {e}", path.display()))),
        };
        file.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| token_error(format!("cannot write {}: {e}", path.display())))?;
        self.token = Some(Secret::new(token));
        Ok(Some(path))
    }
}

/// The token in `path`: `None` when the file is missing or empty; an
/// error when it is not a regular file owned by this user with no access
/// for others, or holds fewer than 8 characters.
fn read_token(path: &Path) -> Result<Option<String>, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(token_error(format!("cannot read {shown}: {e}"))),
        Ok(m) if !m.file_type().is_file() => {
            return Err(token_error(format!("{shown} is not a regular file (a symlink?)")));
        }
        Ok(_) => {}
    }
    let file = std::fs::File::open(path).map_err(|e| token_error(format!("cannot read {shown}: {e}")))?;
    let meta = file.metadata().map_err(|e| token_error(format!("cannot read {shown}: {e}")))?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(meta.uid());
    if meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(token_error(format!(
            "{shown} must belong to this user and be readable by it alone (it is mode {:o}, uid {}): chmod 600 it, or delete it to have a new one generated",
            meta.mode() & 0o7777,
            meta.uid()
        )));
    }
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).map_err(|e| token_error(format!("cannot read {shown}: {e}")))?;
    let token = text.trim();
    match token.len() {
        0 => Ok(None),
        1..8 => Err(token_error(format!("{shown} holds no token of 8 characters or more"))),
        _ => Ok(Some(token.to_string())),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Redis URL; may carry a password, so it is a secret. Unset (or empty):
    /// the embedded store at `path` is used instead.
    pub redis_url: Option<Secret>,
    /// File of the embedded store (created with its directory); used only
    /// when `redis_url` is unset.
    pub path: PathBuf,
    /// Memory the embedded store may use to cache its file's pages.
    pub cache: ByteSize,
    /// Retention by age (`XTRIM MINID`); never cuts unacknowledged entries.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Timeout of one Redis command (ingest answers 503 past it).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Longest wait of one session read for new entries (woken by appends,
    /// never blocking in the store): what an idle session costs is one
    /// wake-up per `block`.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Hard cap of unacknowledged entries per channel: past it ingest answers
    /// `503` + `Retry-After` instead of storing (and never drops anything).
    pub max_backlog: u64,
    /// Redis through Sentinel: the master's name. Set (with
    /// `sentinel_addrs`): the master is resolved through the sentinels, and
    /// again after a failover; `redis_url`, if set, gives only its password
    /// and database.
    pub sentinel_master: Option<String>,
    /// The sentinels, as `redis://host:port` URLs.
    pub sentinel_addrs: Vec<Secret>,
    /// Redis Cluster: some of its nodes, as `redis://[:password@]host:port`
    /// URLs (the rest are learnt from them). Set: channels spread over the
    /// cluster's masters; `redis_url` and Sentinel must be unset.
    pub redis_cluster: Vec<Secret>,
    /// When a write counts as stored: `local` (the Redis it went to, as its
    /// AOF policy promises) or `replica` (also confirmed by a replica with
    /// `WAIT 1`: a master lost right after a `200` loses nothing).
    pub durability: Durability,
    /// Longest wait for a replica's confirmation (`durability = "replica"`);
    /// past it ingest answers `503` (the sender retries).
    #[serde(with = "humantime_serde")]
    pub replica_timeout: Duration,
}

/// When a write to the store counts as done (`store.durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Local,
    Replica,
}

impl StoreConfig {
    /// The store this selects: `redis` or `embedded`.
    pub fn backend(&self) -> &'static str {
        if self.uses_redis() { "redis" } else { "embedded" }
    }

    /// Redis: one server, through Sentinel, or a cluster.
    pub fn uses_redis(&self) -> bool {
        self.redis().is_some() || self.sentinel().is_some() || self.cluster().is_some()
    }

    /// The Redis Cluster's seed nodes, when one is configured.
    pub fn cluster(&self) -> Option<Vec<&str>> {
        let seeds: Vec<&str> = self.redis_cluster.iter().map(Secret::expose).filter(|u| !u.is_empty()).collect();
        (!seeds.is_empty()).then_some(seeds)
    }

    /// The Sentinel set-up: the master's name and the sentinels' URLs.
    pub fn sentinel(&self) -> Option<(&str, Vec<&str>)> {
        let master = self.sentinel_master.as_deref().filter(|m| !m.is_empty())?;
        Some((master, self.sentinel_addrs.iter().map(Secret::expose).collect()))
    }

    /// Where that store lives, without secrets (`relay-edge.redb`,
    /// `127.0.0.1:6379 db 0`).
    pub fn location(&self) -> String {
        if let Some((master, addrs)) = self.sentinel() {
            return format!("Sentinel master `{master}` ({} sentinels)", addrs.len());
        }
        if let Some(seeds) = self.cluster() {
            return format!("Redis Cluster ({} seed nodes)", seeds.len());
        }
        match self.redis().map(redis::Client::open) {
            Some(Ok(client)) => {
                let info = client.get_connection_info();
                format!("{} db {}", info.addr(), info.redis_settings().db())
            }
            Some(Err(_)) => "(unusable URL)".into(),
            None => self.path.display().to_string(),
        }
    }

    /// The Redis URL when one is configured (an empty one counts as unset).
    pub fn redis(&self) -> Option<&str> {
        self.redis_url.as_ref().map(|u| u.expose()).filter(|u| !u.is_empty())
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            path: PathBuf::from("relay-edge.redb"),
            cache: ByteSize::mib(64),
            retention: Duration::from_secs(24 * 3600),
            command_timeout: Duration::from_secs(3),
            block: Duration::from_secs(30),
            max_backlog: 1_000_000,
            sentinel_master: None,
            sentinel_addrs: Vec::new(),
            redis_cluster: Vec::new(),
            durability: Durability::Local,
            replica_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// `POST /hooks/<name>`.
    pub name: String,
    /// Channels the webhook is appended to (several = fan-out).
    pub channels: Vec<String>,
    /// Accepted API keys (several allow rotation).
    pub api_keys: Vec<Secret>,
    /// Token for Meta's `hub.challenge` verification GET.
    pub verify_token: Option<Secret>,
    /// Meta app secret: `X-Hub-Signature-256` is verified when set.
    pub app_secret: Option<Secret>,
    /// Refuse bodies that are not JSON (`415` wrong type, `400` unparsable).
    pub require_json: bool,
    /// Store an identical body on this route once within this window and
    /// answer duplicates `200` with the first `message_id` (off when unset).
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AgentGrant {
    /// Identity: the agent certificate's CN (or first DNS SAN).
    pub name: String,
    /// Channels this agent may receive.
    pub channels: Vec<String>,
}

/// A string that never prints: API keys, tokens, app secrets, Redis URLs.
/// Deserializes from any scalar, since the environment infers types
/// (`RELAY_ADMIN__TOKEN=12345` would otherwise be an integer).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(Secret(match Scalar::deserialize(d)? {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::U(u) => u.to_string(),
            Scalar::F(f) => f.to_string(),
            Scalar::B(b) => b.to_string(),
        }))
    }
}

impl EdgeConfig {
    /// Loads the layers and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg: EdgeConfig = relay_runtime::config::load(DEFAULT_CONFIG, path, relay_runtime::config::ENV_PREFIX)?;
        cfg.apply_reference_env(|k| std::env::var(k).ok())?;
        cfg.read_revoked_file()?;
        cfg.admin.read_token_file()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Adds the entries of `tunnel.revoked_file` (when set) to
    /// `tunnel.revoked`. A configured file that is missing is an error:
    /// revocation must not fail open (at start the edge refuses to run; on
    /// SIGHUP the running configuration is kept).
    pub fn read_revoked_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.tunnel.revoked_file else { return Ok(()) };
        if !path.exists() {
            return Err(ConfigError::Key {
                key: "tunnel.revoked_file".into(),
                why: format!(
                    "{} does not exist, so no certificate would be revoked; create it (an empty file revokes nothing) or remove the key",
                    path.display()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Key {
            key: "tunnel.revoked_file".into(),
            why: format!("cannot read {}: {e}", path.display()),
        })?;
        // Checked here, so that a bad entry is named with its file and line.
        let entries = list_entries(&text)
            .map(|(line, entry)| match entry.parse::<Revocation>() {
                Ok(_) => Ok(entry.to_string()),
                Err(e) => Err(ConfigError::Key {
                    key: "tunnel.revoked_file".into(),
                    why: format!("{} line {line}: {e}", path.display()),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.tunnel.revoked.extend(entries);
        Ok(())
    }

    /// Honours the reference Go relay's flat variables so its users can
    /// switch binaries: `API_KEY` creates the `webhook` route on channel
    /// `default`, `REDIS_URL`/`REDIS_PASSWORD`/`REDIS_DB` build the store URL,
    /// `SERVER_PORT` moves the ingest listener, `MESSAGE_TTL` sets retention.
    pub fn apply_reference_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(key) = var("API_KEY").filter(|k| !k.is_empty()) {
            match self.routes.iter_mut().find(|r| r.name == LEGACY_ROUTE) {
                Some(route) => route.api_keys.push(Secret::new(key)),
                None => self.routes.push(RouteConfig {
                    name: LEGACY_ROUTE.into(),
                    channels: vec![LEGACY_CHANNEL.into()],
                    api_keys: vec![Secret::new(key)],
                    ..RouteConfig::default()
                }),
            }
        }
        if let Some(url) = var("REDIS_URL").filter(|u| !u.is_empty()) {
            let mut url = if url.contains("://") { url } else { format!("redis://{url}") };
            if let Some(pw) = var("REDIS_PASSWORD").filter(|p| !p.is_empty())
                && !url.contains('@')
            {
                url = url.replacen("://", &format!("://:{pw}@"), 1);
            }
            if let Some(db) = var("REDIS_DB").filter(|d| !d.is_empty()) {
                let db: u32 = db.parse().map_err(|_| ConfigError::Key {
                    key: "REDIS_DB".into(),
                    why: format!("`{db}` is not a database number"),
                })?;
                let base = url.trim_end_matches('/');
                let has_db = base
                    .rsplit_once('/')
                    .is_some_and(|(head, tail)| !head.ends_with('/') && tail.parse::<u32>().is_ok());
                url = if has_db { base.to_string() } else { format!("{base}/{db}") };
            }
            self.store.redis_url = Some(Secret::new(url));
        }
        if let Some(port) = var("SERVER_PORT").filter(|p| !p.is_empty()) {
            let port: u16 = port.parse().map_err(|_| ConfigError::Key {
                key: "SERVER_PORT".into(),
                why: format!("`{port}` is not a port number"),
            })?;
            self.ingest.listen = format!("0.0.0.0:{port}");
        }
        if let Some(ttl) = var("MESSAGE_TTL").filter(|t| !t.is_empty()) {
            self.store.retention = parse_reference_duration(&ttl).ok_or_else(|| ConfigError::Key {
                key: "MESSAGE_TTL".into(),
                why: format!("`{ttl}` is not a duration like 24h or 86400"),
            })?;
        }
        Ok(())
    }

    /// Checks what the types cannot: names, references, files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_addresses_and_admin()?;
        self.check_sizes_and_timings()?;
        self.check_store()?;
        self.check_routes()?;
        self.check_ingest_tls_and_revocations()?;
        self.check_agents()?;
        self.check_tunnel_files()?;
        Ok(())
    }

    /// Listen addresses parse; a non-loopback admin listener has a token.
    fn check_addresses_and_admin(&self) -> Result<(), ConfigError> {
        for (key, addr) in [
            ("ingest.listen", &self.ingest.listen),
            ("tunnel.listen", &self.tunnel.listen),
            ("admin.listen", &self.admin.listen),
        ] {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| key_error(key, format!("`{addr}` is not an address like 127.0.0.1:8080: {e}")))?;
        }
        if !self.admin.on_loopback() && self.admin.token.is_none() && self.admin.token_path().is_none() {
            return Err(key_error(
                "admin.token",
                format!(
                    "must be set (or admin.token_file) when admin.listen ({}) is not a loopback address",
                    self.admin.listen
                ),
            ));
        }
        if self.admin.token.as_ref().is_some_and(|t| t.expose().len() < 8) {
            return Err(key_error("admin.token", "needs at least 8 characters".into()));
        }
        Ok(())
    }

    /// Retention, body, frame and session sizes, heartbeat and reclaim timings fit together.
    fn check_sizes_and_timings(&self) -> Result<(), ConfigError> {
        if self.store.retention < MIN_RETENTION {
            return Err(key_error(
                "store.retention",
                format!(
                    "{:?} is below {MIN_RETENTION:?}: every webhook not delivered within it is dead-lettered \
                     (0 does not mean forever; retention is by age, e.g. \"7d\")",
                    self.store.retention
                ),
            ));
        }
        if self.ingest.max_body.as_u64() == 0 {
            return Err(key_error("ingest.max_body", "must be above zero".into()));
        }
        if self.tunnel.max_frame.as_u64() < self.ingest.max_body.as_u64() + 64 * 1024 {
            return Err(key_error(
                "tunnel.max_frame",
                format!(
                    "{} cannot carry a body of ingest.max_body = {} plus headers; raise it",
                    self.tunnel.max_frame, self.ingest.max_body
                ),
            ));
        }
        if self.tunnel.session_bytes.as_u64() < self.tunnel.max_frame.as_u64() {
            return Err(key_error(
                "tunnel.session_bytes",
                format!(
                    "{} is below tunnel.max_frame ({}): a session could not hold even one webhook",
                    self.tunnel.session_bytes, self.tunnel.max_frame
                ),
            ));
        }
        if self.tunnel.heartbeat < Duration::from_millis(50) {
            return Err(key_error("tunnel.heartbeat", "must be at least 50ms".into()));
        }
        if self.tunnel.reclaim_after < self.tunnel.heartbeat * 3 {
            return Err(key_error(
                "tunnel.reclaim_after",
                "must exceed 3 × tunnel.heartbeat (the dead-session deadline)".into(),
            ));
        }
        if self.store.block > Duration::from_secs(30) {
            // Redis sessions look for appends that were not announced (an
            // older edge) every 30 s: a longer wait would delay those.
            return Err(key_error("store.block", "must be at most 30s".into()));
        }
        Ok(())
    }

    /// Redis Cluster: usable node URLs, and no other Redis set beside it.
    fn check_cluster(&self) -> Result<(), ConfigError> {
        if self.store.cluster().is_none() {
            return Ok(());
        }
        if self.store.redis().is_some() || self.store.sentinel().is_some() {
            return Err(key_error(
                "store.redis_cluster",
                "set either redis_cluster, redis_url or sentinel_master, not several".into(),
            ));
        }
        // How a node is reached: the cluster client uses the first seed's
        // user, password and TLS for every node it learns.
        let access = |info: &redis::ConnectionInfo| {
            let r = info.redis_settings();
            let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
            (r.username().map(str::to_owned), r.password().map(str::to_owned), tls)
        };
        let mut first = None;
        for (i, node) in self.store.redis_cluster.iter().enumerate() {
            // Never echo the URL: it may hold a password.
            let key = format!("store.redis_cluster[{i}]");
            let Ok(client) = redis::Client::open(node.expose()) else {
                return Err(key_error(&key, "is not a redis:// URL".into()));
            };
            let info = client.get_connection_info();
            if info.redis_settings().db() != 0 {
                return Err(key_error(&key, "a cluster has database 0 only".into()));
            }
            let access = access(info);
            match &first {
                None => first = Some(access),
                Some(first) if *first != access => {
                    return Err(key_error(
                        &key,
                        "every node must have the user, password and TLS of the first (the client uses the first's for all)"
                            .into(),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The store: a usable Redis URL or embedded path, Sentinel, durability and wait timings.
    fn check_store(&self) -> Result<(), ConfigError> {
        match self.store.redis() {
            // Never echo the URL: it may hold a password.
            Some(url) if redis::Client::open(url).is_err() => {
                return Err(key_error("store.redis_url", "is not a redis:// or rediss:// URL".into()));
            }
            Some(_) => {}
            None if !self.store.uses_redis() && self.store.path.as_os_str().is_empty() => {
                return Err(key_error("store.path", "must name a file when store.redis_url is unset".into()));
            }
            None => {}
        }
        let master = self.store.sentinel_master.as_deref().filter(|m| !m.is_empty());
        match (master, self.store.sentinel_addrs.is_empty()) {
            (Some(_), true) => {
                return Err(key_error("store.sentinel_addrs", "name the sentinels of sentinel_master".into()));
            }
            (None, false) => {
                return Err(key_error("store.sentinel_master", "name the master the sentinels watch".into()));
            }
            _ => {}
        }
        for (i, addr) in self.store.sentinel_addrs.iter().enumerate() {
            // Never echo the URL: it may hold a password.
            if redis::Client::open(addr.expose()).is_err() {
                return Err(key_error(&format!("store.sentinel_addrs[{i}]"), "is not a redis:// URL".into()));
            }
        }
        self.check_cluster()?;
        if self.store.durability == Durability::Replica && !self.store.uses_redis() {
            return Err(key_error(
                "store.durability",
                "`replica` needs Redis (store.redis_url, store.sentinel_master or store.redis_cluster)".into(),
            ));
        }
        if self.store.replica_timeout < Duration::from_millis(1)
            || self.store.replica_timeout > self.store.command_timeout
        {
            // Below 1 ms it would be `WAIT 1 0`: wait for ever.
            return Err(key_error(
                "store.replica_timeout",
                "must be 1ms or more and at most store.command_timeout".into(),
            ));
        }
        if self.store.block < Duration::from_millis(100) {
            return Err(key_error("store.block", "must be 100ms or more (sessions would spin)".into()));
        }
        Ok(())
    }

    /// Routes: names, channels and API keys.
    fn check_routes(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field}");
            check_name(&route.name).map_err(|why| key_error(&key("name"), why))?;
            if !names.insert(route.name.as_str()) {
                return Err(key_error(&key("name"), format!("route `{}` is defined twice", route.name)));
            }
            if route.channels.is_empty() {
                return Err(key_error(&key("channels"), format!("route `{}` lists no channel", route.name)));
            }
            for ch in &route.channels {
                check_name(ch).map_err(|why| key_error(&key("channels"), why))?;
            }
            if route.api_keys.is_empty() {
                return Err(key_error(
                    &key("api_keys"),
                    format!("route `{}` has no API key; an open route would accept anyone's webhooks", route.name),
                ));
            }
            if route.api_keys.iter().any(|k| k.expose().len() < 8) {
                return Err(key_error(&key("api_keys"), "every key needs at least 8 characters".into()));
            }
            for k in &route.api_keys {
                if let Some(hash) = k.expose().strip_prefix("sha256:")
                    && (hash.len() != 64 || hex::decode(hash).is_err())
                {
                    return Err(key_error(&key("api_keys"), "a `sha256:` key must carry 64 hex digits".into()));
                }
            }
        }
        Ok(())
    }

    /// Ingest TLS files and header limits; the revocation entries.
    fn check_ingest_tls_and_revocations(&self) -> Result<(), ConfigError> {
        if self.ingest.tls_cert.is_some() != self.ingest.tls_key.is_some() {
            return Err(key_error("ingest.tls_cert", "and ingest.tls_key must be set together".into()));
        }
        for (key, path) in [("ingest.tls_cert", &self.ingest.tls_cert), ("ingest.tls_key", &self.ingest.tls_key)] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(key_error(key, format!("{} does not exist", p.display())));
            }
        }
        if self.ingest.max_headers == 0 || self.ingest.max_header_bytes.as_u64() < 8192 {
            return Err(key_error(
                "ingest.max_header_bytes",
                "must be at least 8KiB (and max_headers at least 1)".into(),
            ));
        }
        if let Err(e) = self.tunnel.revocations() {
            return Err(key_error("tunnel.revoked", e.to_string()));
        }
        Ok(())
    }

    /// Agent grants: names and channels.
    fn check_agents(&self) -> Result<(), ConfigError> {
        let mut agents = BTreeSet::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let key = |field: &str| format!("agent[{i}].{field}");
            if agent.name.is_empty() {
                return Err(key_error(&key("name"), "is empty".into()));
            }
            if !agents.insert(agent.name.as_str()) {
                return Err(key_error(&key("name"), format!("agent `{}` is defined twice", agent.name)));
            }
            if agent.channels.is_empty() {
                return Err(key_error(&key("channels"), format!("agent `{}` is granted no channel", agent.name)));
            }
            for ch in &agent.channels {
                check_name(ch).map_err(|why| key_error(&key("channels"), why))?;
            }
        }
        Ok(())
    }

    /// The tunnel certificate files exist.
    fn check_tunnel_files(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("tunnel.cert", &self.tunnel.cert),
            ("tunnel.key", &self.tunnel.key),
            ("tunnel.client_ca", &self.tunnel.client_ca),
        ] {
            if !path.is_file() {
                return Err(key_error(
                    key,
                    format!("{} does not exist (make dev certificates with `relay-edge certs init`)", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// Channel → agents granted it; used to warn about undeliverable routes.
    pub fn channel_grants(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for agent in &self.agents {
            for ch in &agent.channels {
                map.entry(ch.as_str()).or_default().push(agent.name.as_str());
            }
        }
        map
    }

    /// Every channel any route writes to or any agent reads from.
    pub fn all_channels(&self) -> BTreeSet<String> {
        self.routes
            .iter()
            .flat_map(|r| r.channels.iter())
            .chain(self.agents.iter().flat_map(|a| a.channels.iter()))
            .cloned()
            .collect()
    }
}

/// Route, channel and agent names go into URLs, store keys and
/// certificate names: keep them plain.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("`{name}` must be 1–64 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(format!("`{name}` may only hold letters, digits, `-`, `_` and `.`"));
    }
    Ok(())
}

/// The reference relay takes Go durations (`24h`) or plain seconds.
pub(crate) fn parse_reference_duration(s: &str) -> Option<Duration> {
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).ok()
}

#[cfg(test)]
mod tests {
    use figment::Figment;
    use figment::providers::{Format, Toml};

    use super::*;

    /// `config.default.toml` and the `Default` impls cannot drift apart:
    /// parsed, the file is exactly `EdgeConfig::default()`, and it writes
    /// out every key that has a default (the `[[route]]` and `[[agent]]`
    /// lists are empty by default; the file shows them commented out).
    #[test]
    fn the_default_config_file_is_the_default_impl() {
        if let Err(why) = relay_runtime::config::check_defaults::<EdgeConfig>(DEFAULT_CONFIG, &["route", "agent"]) {
            panic!("relay-edge/config.default.toml: {why}");
        }
    }

    #[test]
    fn revoked_serials_may_have_an_odd_number_of_hex_digits() {
        // Whether validation refuses the entry (other keys may fail too:
        // the default config names certificate files that do not exist).
        let refused = |entry: &str| {
            let mut cfg = EdgeConfig::default();
            cfg.tunnel.revoked = vec![entry.to_string()];
            cfg.validate().is_err_and(|e| e.to_string().contains("tunnel.revoked"))
        };
        // Serials are printed without leading zeros (`certs fingerprint`).
        assert!(!refused("serial:145f75e79fc981d4851423583b0f47acbb18a0c"));
        assert!(!refused("serial:0x0a1"));
        assert!(refused("serial:"));
        assert!(refused("serial:12g4"));
        assert!(refused("sha256:abcd"));
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret::new("k_live_1")), "MASKED");
    }

    #[test]
    fn reference_env_creates_legacy_route_and_redis_url() {
        let mut cfg = EdgeConfig::default();
        let env = |k: &str| match k {
            "API_KEY" => Some("legacy-key-123".to_string()),
            "REDIS_URL" => Some("localhost:6380".to_string()),
            "REDIS_PASSWORD" => Some("pw".to_string()),
            "REDIS_DB" => Some("2".to_string()),
            "SERVER_PORT" => Some("8081".to_string()),
            "MESSAGE_TTL" => Some("12h".to_string()),
            _ => None,
        };
        cfg.apply_reference_env(env).expect("applies");
        assert_eq!(cfg.routes[0].name, LEGACY_ROUTE);
        assert_eq!(cfg.routes[0].channels, vec![LEGACY_CHANNEL.to_string()]);
        assert_eq!(cfg.store.redis(), Some("redis://:pw@localhost:6380/2"));
        assert_eq!(cfg.ingest.listen, "0.0.0.0:8081");
        assert_eq!(cfg.store.retention, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn reference_env_equals_its_toml_equivalent() {
        let toml = r#"
            [ingest]
            listen = "0.0.0.0:8081"
            [store]
            redis_url = "redis://:pw@10.0.0.5:6379/3"
            retention = "12h"
            [[route]]
            name = "webhook"
            channels = ["default"]
            api_keys = ["legacy-key-123"]
        "#;
        let from_toml: EdgeConfig =
            Figment::from(Toml::string(DEFAULT_CONFIG)).merge(Toml::string(toml)).extract().expect("toml");
        let mut from_env = EdgeConfig::default();
        from_env
            .apply_reference_env(|k| {
                Some(
                    match k {
                        "API_KEY" => "legacy-key-123",
                        "REDIS_URL" => "10.0.0.5:6379",
                        "REDIS_PASSWORD" => "pw",
                        "REDIS_DB" => "3",
                        "SERVER_PORT" => "8081",
                        "MESSAGE_TTL" => "43200",
                        _ => return None,
                    }
                    .to_string(),
                )
            })
            .expect("env");
        let a = serde_json::to_value(&from_toml).expect("json");
        let b = serde_json::to_value(&from_env).expect("json");
        assert_eq!(a, b);
    }

    #[test]
    fn bad_reference_port_names_the_variable() {
        let mut cfg = EdgeConfig::default();
        let err =
            cfg.apply_reference_env(|k| (k == "SERVER_PORT").then(|| "eighty".to_string())).expect_err("must fail");
        assert!(err.to_string().contains("SERVER_PORT"), "{err}");
    }

    #[test]
    fn a_bad_revoked_file_line_is_named_with_its_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = dir.path().join("revoked.txt");
        std::fs::write(&list, "# agents\nserial:1f # lan-2\n\nsha256:abcd\n").expect("write list");
        let mut cfg = EdgeConfig::default();
        cfg.tunnel.revoked_file = Some(list.clone());
        let err = cfg.read_revoked_file().expect_err("bad line").to_string();
        let named = ["tunnel.revoked_file", "revoked.txt line 4", "`sha256:abcd`"];
        assert!(named.iter().all(|n| err.contains(n)), "{err}");
        assert!(cfg.tunnel.revoked.is_empty(), "nothing added from a bad list");
        std::fs::write(&list, "# agents\n  serial:1f # lan-2\n").expect("write list");
        cfg.read_revoked_file().expect("good list");
        assert_eq!(cfg.tunnel.revoked, vec!["serial:1f"]);
    }

    #[test]
    fn a_bad_redis_cluster_is_refused_naming_the_key_not_the_url() {
        let refused = |nodes: &[&str], redis_url: Option<&str>| {
            let mut cfg = EdgeConfig::default();
            cfg.store.redis_cluster = nodes.iter().map(|n| Secret::new(n.to_string())).collect();
            cfg.store.redis_url = redis_url.map(|u| Secret::new(u.to_string()));
            cfg.check_cluster().expect_err("refused").to_string()
        };
        let both = refused(&["redis://:pw@10.0.0.1:6379"], Some("redis://:pw@10.0.0.9:6379"));
        assert!(both.contains("store.redis_cluster") && both.contains("not several"), "{both}");
        let bad = refused(&["redis://10.0.0.1:6379", "http://:pw@x"], None);
        assert!(bad.contains("store.redis_cluster[1]") && !bad.contains("pw"), "{bad}");
        let db = refused(&["redis://:pw@10.0.0.1:6379/3"], None);
        assert!(db.contains("database 0") && !db.contains("pw"), "{db}");
        let mixed = refused(&["redis://:pw@10.0.0.1:6379", "redis://:other@10.0.0.2:6379"], None);
        assert!(mixed.contains("store.redis_cluster[1]") && mixed.contains("password"), "{mixed}");
        assert!(!mixed.contains("pw") && !mixed.contains("other@"), "{mixed}");
        let mut cfg = EdgeConfig::default();
        cfg.store.redis_cluster = vec![Secret::new(String::from("redis://10.0.0.1:6379"))];
        cfg.check_cluster().expect("a good cluster");
        assert_eq!((cfg.store.backend(), cfg.store.location().as_str()), ("redis", "Redis Cluster (1 seed nodes)"));
    }
}
