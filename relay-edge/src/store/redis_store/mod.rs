//! The Redis Streams backend.
//!
//! # Layout
//! One stream per channel (`relay:{<channel>}:stream`, see [`keys`]), one
//! consumer group `relay` per stream created at id `0` so entries written
//! before any agent ever connected are still delivered, and one consumer per
//! agent identity. Agents granted the same channel share its load.
//!
//! # Delivery bookkeeping
//! An entry read by a session sits in the group's pending list (PEL) under
//! the agent's name until an `Ack` turns into `XACK`. On (re)connect a session
//! first re-reads its own PEL (`XREADGROUP … 0`), then new entries (`>`).
//! Entries idle in another consumer's PEL longer than the visibility timeout
//! are taken over with `XAUTOCLAIM`. The delivery count of the PEL is the
//! attempt number, so it survives reconnects and edge restarts.
//!
//! # Retention
//! `XTRIM MINID` by age, but never past the oldest pending entry nor past the
//! group's last delivered id: nothing unacknowledged is cut.
//!
//! # Connections
//! Commands share one auto-reconnecting multiplexed connection with a short
//! response timeout; sessions' reads share a pool of 4: a read never blocks
//! in Redis. A session waiting for new entries waits on the edge's append
//! announcements instead (`appends.rs`: one pub/sub connection per edge), so
//! an idle session holds no connection and sends nothing. An edge uses at
//! most 6 connections (14 with replica durability), whatever the number of
//! agents. On a cluster each pooled handle holds one connection per master
//! (`conn.rs`), with pools of 2 and 4: 1 + 3·masters connections (1 +
//! 7·masters with replica durability).
//!
//! # Sentinel and replica durability
//! With `store.sentinel_master`, the master is resolved through the
//! sentinels (`sentinel.rs`) when first needed and again whenever a command
//! fails in a way a failover explains (connection refused or dropped,
//! `READONLY` from a demoted master, a timeout); sessions' readers reconnect
//! to whatever the store resolved last. With `store.durability = "replica"`
//! every write that a `200` (or a dead letter) depends on is followed by
//! `WAIT 1 <replica_timeout>` and fails unless a replica confirmed it. Those
//! writes run on a small pool of their own connections, so a slow or absent
//! replica never stalls acks and reads behind a `WAIT`.

mod appends;
mod batch;
mod conn;
mod dlq;
mod parse;
mod sentinel;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{ServerErrorKind, Value};
use relay_protocol::{ChannelStats, Webhook};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Backend, BlockingRead, Cursor, DEDUPE_PENDING, DeadEntry, DeadLetter, Entry, Read, ReplayFrom, ReplayPage,
    Snapshot, StreamId, Unreadable, keys, now_ms,
};
use crate::config::{Durability, StoreConfig};
use crate::error::StoreError;
use appends::Appends;
use conn::{Conn, slot_groups, write_groups};
use sentinel::Resolver;

/// Consumer name under which retention reads never-delivered entries.
const EXPIRY_CONSUMER: &str = "__expiry";

/// Dead-letters one entry: copies its webhook bytes (if the stream still
/// holds it) into the DLQ and acknowledges it, atomically, so the bytes
/// never leave Redis and cannot be trimmed in between.
/// KEYS: stream, dlq. ARGV: id, reason, attempts, failed_at_ms, status
/// (`""`: none), group, webhook field.
const DEAD_LETTER: &str = "\
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) \
local f = {'stream_id', ARGV[1], 'reason', ARGV[2], 'attempts', ARGV[3], 'failed_at_ms', ARGV[4]} \
if ARGV[5] ~= '' then f[#f + 1] = 'status'; f[#f + 1] = ARGV[5] end \
if e[1] then \
  local fields = e[1][2] \
  for i = 1, #fields, 2 do \
    if fields[i] == ARGV[7] then f[#f + 1] = ARGV[7]; f[#f + 1] = fields[i + 1] end \
  end \
end \
redis.call('XADD', KEYS[2], '*', unpack(f)) \
return redis.call('XACK', KEYS[1], ARGV[6], ARGV[1])";

/// `XAUTOCLAIM` with each claimed entry's delivery count, in one step.
/// KEYS: stream. ARGV: group, consumer, min-idle ms, count.
/// Reply: `[entries, deleted ids, [id, count, id, count, …]]`. (Redis 6.2
/// answers a deleted entry with a nil among the entries: skipped here.)
const AUTOCLAIM: &str = "\
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4]) \
local counts = {} \
for _, e in ipairs(r[2]) do \
  if e and e[1] then \
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1) \
    counts[#counts + 1] = e[1] \
    if p[1] then counts[#counts + 1] = p[1][4] else counts[#counts + 1] = 1 end \
  end \
end \
return {r[2], r[3] or {}, counts}";

/// Commands whose `BUSYGROUP`/`NOGROUP`/`ERR` answers (an existing group,
/// a stream or group not created yet) callers expect and handle.
const EXPECTED_ERRORS_OF: &[&str] = &["XGROUP CREATE", "XINFO STREAM", "XINFO GROUPS", "XPENDING"];

/// Connections waiting on `WAIT` for replica confirmations.
const WRITE_POOL: usize = 8;

/// Pool sizes on a Redis Cluster (each connection is one per node).
const CLUSTER_READ_POOL: usize = 2;
const CLUSTER_WRITE_POOL: usize = 4;

/// Handle on the Redis store; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    /// The Redis in use, or how to find it (Sentinel).
    target: Arc<Resolver>,
    /// Per-command deadline, on top of the connection's response timeout.
    timeout: Duration,
    /// Counts failed and timed-out commands (`relay_store_errors_total`).
    errors: prometheus_client::metrics::counter::Counter,
    /// `BLOCK` of one `XREADGROUP`.
    block: Duration,
    /// `Some(timeout)`: writes wait for one replica (`store.durability`).
    replica_wait: Option<Duration>,
    /// Round-robin over the target's write pool.
    next_writer: Arc<AtomicUsize>,
    /// Announced appends, per channel (what waiting sessions wait on).
    appends: Arc<Appends>,
    /// A Redis Cluster: no pipeline mixes two channels' slots.
    cluster: bool,
    /// A background probe runs (one at a time: failing pipelines under
    /// load must not each leave one behind).
    probing: Arc<AtomicBool>,
    /// Appends of concurrent requests waiting for the next round's pipeline
    /// (off a cluster; see `batch.rs`).
    batch: Arc<batch::Batch>,
}

/// Connections carrying sessions' reads (a large read never delays an
/// ingest write or an ack on the command connection).
const READ_POOL: usize = 4;

/// One Redis's connections (a server's, or a cluster's): the shared one
/// for commands, a pool for sessions' reads, a pool for writes that wait on
/// a replica, and the clients the append subscriber connects with (the
/// server; on a cluster, each seed in turn).
pub struct Target {
    clients: Vec<redis::Client>,
    conn: Conn,
    readers: Vec<Conn>,
    writers: Vec<Conn>,
}

impl Target {
    /// Connections open lazily: the edge starts (and answers 503) while
    /// Redis is down, and connects as soon as it is up.
    fn new(client: redis::Client, timeout: Duration, replica_wait: Option<Duration>) -> Result<Self, StoreError> {
        let open = |response| Conn::node(&client, timeout, response);
        Self::with(vec![client.clone()], open, READ_POOL, WRITE_POOL, timeout, replica_wait)
    }

    /// A Redis Cluster known by some of its nodes. Smaller pools: each
    /// cluster connection holds one connection per node.
    fn cluster(seeds: &[&str], timeout: Duration, replica_wait: Option<Duration>) -> Result<Self, StoreError> {
        if seeds.is_empty() {
            let none = (redis::ErrorKind::InvalidClientConfig, "store.redis_cluster names no node");
            return Err(redis_err("open cluster")(none.into()));
        }
        let clients = seeds
            .iter()
            .map(|url| redis::Client::open(*url).map_err(redis_err("open")))
            .collect::<Result<Vec<_>, _>>()?;
        let open = |response| Conn::cluster(seeds, timeout, response);
        Self::with(clients, open, CLUSTER_READ_POOL, CLUSTER_WRITE_POOL, timeout, replica_wait)
    }

    fn with(
        clients: Vec<redis::Client>,
        open: impl Fn(Duration) -> Result<Conn, StoreError>,
        read_pool: usize,
        write_pool: usize,
        timeout: Duration,
        replica_wait: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let conn = open(timeout)?;
        let readers = (0..read_pool).map(|_| open(timeout)).collect::<Result<_, _>>()?;
        let writers = match replica_wait {
            Some(wait) => (0..write_pool).map(|_| open(timeout + wait)).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        Ok(Self { clients, conn, readers, writers })
    }

    /// The client of the server (of the first seed, on a cluster).
    fn client(&self) -> &redis::Client {
        &self.clients[0]
    }

    /// Where the append subscriber listens, at its `n`th try: the server,
    /// or on a cluster each seed in turn.
    fn subscriber(&self, n: usize) -> redis::Client {
        self.clients[n % self.clients.len()].clone()
    }
}

/// One session's reads: on the shared connection, waiting for new entries
/// on the append announcements of the channels it reads.
pub struct Reader {
    store: RedisStore,
    /// Per channel read, what its sessions wait on.
    watches: Vec<(String, Arc<Notify>)>,
    /// When a read of new entries last came back empty, and of which
    /// channels (`None`: the last one found something, or none ran yet):
    /// until woken or `appends::RECHECK`, those need no look again.
    empty_since: Option<(Instant, Vec<String>)>,
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> StoreError {
    move |source| StoreError::Redis { op, source }
}

/// A command or a pipeline, for [`RedisStore::exec`].
#[derive(Clone, Copy)]
enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl Query<'_> {
    async fn run<T: redis::FromRedisValue>(self, conn: &mut Conn) -> redis::RedisResult<T> {
        match self {
            Self::Cmd(c) => c.query_async(conn).await,
            Self::Pipe(p) => p.query_async(conn).await,
        }
    }
}

/// The first channel key (`relay:{…}:stream` or `:dlq`) in a pipeline's
/// first command: what its slot is routed by. (Only an agent, named by the
/// operator, called like a channel key could come first; the probe then
/// reads another slot, harmlessly.)
fn first_key(pipe: &redis::Pipeline) -> Option<Vec<u8>> {
    channel_key(pipe.cmd_iter().next()?).map(<[u8]>::to_vec)
}

/// The channel key a probe of `query` reads ([`RedisStore::read_key`]).
fn probe_key(query: Query<'_>) -> Option<Vec<u8>> {
    match query {
        Query::Cmd(c) => channel_key(c).map(<[u8]>::to_vec),
        Query::Pipe(p) => first_key(p),
    }
}

/// The channel key (`relay:{…}:stream` or `:dlq`) `cmd` names first.
fn channel_key(cmd: &redis::Cmd) -> Option<&[u8]> {
    cmd.args_iter().find_map(|arg| match arg {
        redis::Arg::Simple(a) if a.starts_with(b"relay:{") && (a.ends_with(b"}:stream") || a.ends_with(b"}:dlq")) => {
            Some(a)
        }
        _ => None,
    })
}

/// Whether every command of `pipe` is on one and the same channel key (or
/// is the keyless `WAIT` of replica durability). Following an `ASK` runs the
/// whole pipeline again on the other node; with two keys, one may not have
/// moved yet (its command ran here) and would be made anew over there.
fn one_key(pipe: &redis::Pipeline) -> bool {
    let first = pipe.cmd_iter().next().and_then(channel_key);
    first.is_some() && pipe.cmd_iter().all(|c| is_wait(c) || channel_key(c) == first)
}

/// Runs `query` again on the node a redirect names: after `MOVED` as it
/// was, after `ASK` with each command after an `ASKING` (a transaction:
/// `ASKING` before its `MULTI`, whose flag holds until `EXEC`), as one
/// pipeline, so nothing else on that multiplexed connection comes between
/// an `ASKING` and its command. (redis-rs follows a redirect itself,
/// resending a pipeline whole, but sends `ASKING` apart: under load
/// another command takes its flag and the redirect bounces until its
/// retries run out. Hence write pipelines of one key each on a cluster,
/// [`conn::write_groups`].) Only nodes the client is connected to are
/// followed to ([`RedisStore::read_key`] connects first). A redirect means the node asked did
/// not run the command (its key is not there), so running it there runs it
/// once. `to`: whether it is an `ASK`, and the node ([`redirect_of`]).
/// `None` off a cluster.
async fn follow_redirect<T: redis::FromRedisValue>(
    conn: &mut Conn,
    query: Query<'_>,
    (asking, addr): (bool, String),
) -> Option<redis::RedisResult<T>> {
    let Conn::Cluster(cluster) = conn else { return None };
    let (host, port) = addr.rsplit_once(':')?;
    let route = SingleNodeRoutingInfo::ByAddress { host: host.to_owned(), port: port.parse().ok()? };
    let mut again = redis::pipe();
    let mut push = |cmd: &redis::Cmd| {
        if asking {
            again.cmd("ASKING");
        }
        again.add_command(cmd.clone());
    };
    // Which reply is the query's: the last (a command's, `EXEC`'s), or
    // every other one after `ASKING`s.
    let every = match query {
        Query::Cmd(c) => {
            push(c);
            None
        }
        Query::Pipe(p) if p.is_transaction() => {
            push(&redis::cmd("MULTI"));
            p.cmd_iter().for_each(|c| {
                again.add_command(c.clone());
            });
            again.cmd("EXEC");
            None
        }
        Query::Pipe(p) => {
            p.cmd_iter().for_each(&mut push);
            Some(if asking { 2 } else { 1 })
        }
    };
    let n = again.len();
    let replies = cluster.route_pipeline(again, 0, n, route).await.map(|mut r| match every {
        None => r.pop().unwrap_or(Value::Nil),
        Some(step) => Value::Array(r.into_iter().skip(step - 1).step_by(step).collect()),
    });
    Some(replies.and_then(Value::extract_error).and_then(|v| T::from_redis_value(v).map_err(Into::into)))
}

/// The redirect `err` is, for all of `query`: whether it is an `ASK` (else
/// `MOVED`), and the node. A pipeline's (or transaction's) error counts only
/// when every command of it (but a `WAIT`) was redirected to one node, and
/// all are on one key ([`one_key`]): then none of them ran.
fn redirect_of(err: &redis::RedisError, query: Query<'_>) -> Option<(bool, String)> {
    let errors = err.clone().into_server_errors()?;
    let mut redirect: Option<(bool, String)> = None;
    for (_, e) in errors.iter() {
        let asking = match e.kind()? {
            ServerErrorKind::Ask => true,
            ServerErrorKind::Moved => false,
            _ => return None,
        };
        // `<slot> <host:port>`
        let addr = e.details()?.split_ascii_whitespace().nth(1)?.to_owned();
        match &redirect {
            Some(r) if *r != (asking, addr.clone()) => return None,
            Some(_) => {}
            None => redirect = Some((asking, addr)),
        }
    }
    if let Query::Pipe(p) = query {
        let redirected = |i: usize| errors.iter().any(|(at, _)| *at == i);
        let all = p.cmd_iter().enumerate().all(|(i, c)| redirected(i) || is_wait(c));
        if !all || !one_key(p) {
            return None;
        }
    }
    redirect
}

fn is_wait(cmd: &redis::Cmd) -> bool {
    cmd.args_iter().next().is_some_and(|a| matches!(a, redis::Arg::Simple(b"WAIT")))
}

/// Whether a failed command may mean the master moved (Sentinel re-resolves).
fn may_be_failover(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout { .. } => true,
        StoreError::Redis { source, .. } => {
            source.is_io_error()
                || source.is_connection_dropped()
                || source.is_connection_refusal()
                || source.is_timeout()
                || matches!(
                    source.code(),
                    Some("READONLY") | Some("MASTERDOWN") | Some("LOADING") | Some("EXECABORT") | Some("NOREPLICAS")
                )
        }
        // No replica confirms: this master may have lost them in a failover.
        StoreError::NotReplicated { .. } => true,
        _ => false,
    }
}

impl RedisStore {
    /// Opens the store lazily: the edge starts (and answers 503) while Redis
    /// is down, and connects as soon as it is up. Through Sentinel, the
    /// master is resolved on first use.
    pub fn open(cfg: &StoreConfig, errors: prometheus_client::metrics::counter::Counter) -> Result<Self, StoreError> {
        let replica_wait = (cfg.durability == Durability::Replica).then_some(cfg.replica_timeout);
        let target = Resolver::new(cfg, replica_wait)?;
        Ok(Self {
            target: Arc::new(target),
            errors,
            timeout: cfg.command_timeout,
            block: cfg.block,
            replica_wait,
            next_writer: Arc::new(AtomicUsize::new(0)),
            appends: Arc::new(Appends::default()),
            cluster: cfg.cluster().is_some(),
            probing: Arc::new(AtomicBool::new(false)),
            // Rounds overlap as `WAIT`s did: one per write connection.
            batch: Arc::new(batch::Batch::new(if replica_wait.is_some() { WRITE_POOL } else { 2 })),
        })
    }

    /// Id of the newest entry of stream `key` at or below `upper` (`+`: any).
    async fn newest(&self, key: &str, upper: &str) -> Result<Option<StreamId>, StoreError> {
        let v: Value =
            self.run("XREVRANGE", redis::cmd("XREVRANGE").arg(key).arg(upper).arg("-").arg("COUNT").arg(1)).await?;
        Ok(parse::entries(v)?.into_iter().next().map(|e| e.id))
    }

    async fn run<T: redis::FromRedisValue>(&self, op: &'static str, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let conn = self.target.current(self.timeout).await?.conn.clone();
        let r = self.exec(op, conn, Query::Cmd(cmd), self.timeout).await;
        self.after(&r).await;
        r
    }

    /// Runs `query` on `conn` within `deadline`. On a cluster, a redirect
    /// (`MOVED`, `ASK`) is followed once more here ([`follow_redirect`]),
    /// after one command of the query's key ([`RedisStore::read_key`]) in
    /// at most half of what is left of `deadline`. A pipeline that failed
    /// otherwise is followed by that probe too, in the background, one at
    /// a time: a pipeline's errors do not teach the cluster client the new
    /// slot map, a single command's do.
    async fn exec<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        mut conn: Conn,
        query: Query<'_>,
        deadline: Duration,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let first = tokio::time::timeout(deadline, query.run::<T>(&mut conn)).await;
        let redirect = match &first {
            Ok(Err(e)) if self.cluster && op != "PUBLISH" => redirect_of(e, query),
            _ => None,
        };
        let r = match (first, redirect) {
            (Ok(Err(e)), Some(to)) => {
                let left = deadline.saturating_sub(started.elapsed());
                let follow = async {
                    // At most half of what is left: the follow needs the rest.
                    if let Some(key) = probe_key(query) {
                        let _ = tokio::time::timeout(left / 2, self.read_key(&mut conn, &key)).await;
                    }
                    follow_redirect(&mut conn, query, to).await
                };
                return match tokio::time::timeout(left, follow).await {
                    Ok(Some(r)) => r.map_err(redis_err(op)),
                    Ok(None) => Err(e).map_err(redis_err(op)),
                    Err(_) => Err(StoreError::Timeout { op, ms: deadline.as_millis() }),
                };
            }
            (Ok(r), _) => r.map_err(redis_err(op)),
            (Err(_), _) => Err(StoreError::Timeout { op, ms: deadline.as_millis() }),
        };
        // `PUBLISH` is not routed by slot, and a timeout says nothing of
        // slots: nothing to learn from those.
        let learn = match &r {
            Ok(_) | Err(StoreError::Timeout { .. }) => false,
            Err(StoreError::Redis { source, .. }) => !source.is_timeout(),
            Err(_) => true,
        };
        if learn
            && self.cluster
            && op != "PUBLISH"
            && matches!(query, Query::Pipe(_))
            && let Some(key) = probe_key(query)
            && !self.probing.swap(true, Ordering::AcqRel)
        {
            let store = self.clone();
            tokio::spawn(async move {
                store.read_key(&mut conn, &key).await;
                store.probing.store(false, Ordering::Release);
            });
        }
        r
    }

    /// The probe: one command of a query's channel key ([`probe_key`]),
    /// read, never written, within the command timeout. redis-rs follows
    /// its redirect itself, which connects to the node named (a node new
    /// to the cluster, importing a slot, is not among its connections until
    /// then, and [`follow_redirect`] uses only those) and, after `MOVED`,
    /// refreshes the slot map.
    async fn read_key(&self, conn: &mut Conn, key: &[u8]) {
        let probe = redis::cmd("EXISTS").arg(key).to_owned();
        let _ = tokio::time::timeout(self.timeout, probe.query_async::<Value>(conn)).await;
    }

    /// Counts an error, and re-resolves a Sentinel master it may explain.
    async fn after<T>(&self, r: &Result<T, StoreError>) {
        // Expected answers (an existing group, a missing stream) are not
        // errors; an `ERR` from a script (say, `EVAL` renamed away) is.
        let expected = |e: &StoreError| {
            matches!(e, StoreError::Redis { op, source }
                if EXPECTED_ERRORS_OF.contains(op)
                    && matches!(source.code(), Some("BUSYGROUP") | Some("NOGROUP") | Some("ERR")))
        };
        if let Err(e) = r
            && !expected(e)
        {
            self.errors.inc();
            if may_be_failover(e) {
                self.target.failed(self.timeout).await;
            }
        }
    }

    /// A session's read (a command or a pipeline) on the read pool.
    async fn run_read<T: redis::FromRedisValue>(&self, op: &'static str, query: Query<'_>) -> Result<T, StoreError> {
        let target = self.target.current(self.timeout).await?;
        let n = self.next_writer.fetch_add(1, Ordering::Relaxed);
        let Some(conn) = target.readers.get(n % target.readers.len().max(1)).cloned() else {
            return Err(StoreError::Timeout { op, ms: 0 });
        };
        let r = self.exec(op, conn, query, self.timeout).await;
        self.after(&r).await;
        r
    }

    async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let conn = self.target.current(self.timeout).await?.conn.clone();
        let r = self.exec(op, conn, Query::Pipe(pipe), self.timeout).await;
        self.after(&r).await;
        r
    }

    /// Announces appends to `channels`, once they are stored: wakes this
    /// edge's sessions at once, and other edges' by `PUBLISH`. Best effort,
    /// after the write and apart from it: an announcement that fails (say,
    /// an ACL without pub/sub) never fails the write it follows (sessions
    /// then look again within `appends::RECHECK`); it is counted.
    ///
    /// The `PUBLISH`es run in one task per edge at a time, not one per
    /// append: the channels appended to while one round is in flight go
    /// out together in the next (`Appends::to_announce`), one `PUBLISH` per
    /// channel per round. They carry this edge's id, so this edge's
    /// subscriber ignores its own (the local wake came first).
    fn announce(&self, channels: &[String]) {
        channels.iter().for_each(|c| self.appends.bump(c));
        if self.appends.to_announce(channels) {
            tokio::spawn(self.clone().announce_rounds());
        }
    }

    /// Sends the unannounced channels' `PUBLISH`es, round after round,
    /// until none is left. Each round lives at most one command timeout:
    /// its slot groups go at once.
    async fn announce_rounds(self) {
        let mut guard = self.appends.rounds_guard();
        while let Some(round) = self.appends.next_round() {
            let pipes = slot_groups(self.cluster, round.iter().map(|(c, _)| c.as_str())).into_iter().map(|group| {
                let mut pipe = redis::pipe();
                for i in group {
                    let (channel, count) = &round[i];
                    pipe.cmd("PUBLISH")
                        .arg(appends::topic(channel))
                        .arg(appends::payload(self.appends.origin(), *count))
                        .ignore();
                }
                pipe
            });
            let pipes: Vec<redis::Pipeline> = pipes.collect();
            let sends = pipes.iter().map(|pipe| self.run_pipe::<()>("PUBLISH", pipe));
            for r in futures_util::future::join_all(sends).await {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "announcing an append failed");
                }
            }
        }
        guard.finished = true;
    }

    /// A cluster's append: one pipeline per channel, all at once.
    async fn append_each(&self, channels: &[String], bytes: &[u8]) -> Result<Vec<StreamId>, StoreError> {
        let groups = write_groups(self.cluster, channels.iter().map(String::as_str));
        let writes = groups.iter().map(|group| {
            let mut pipe = redis::pipe();
            for &i in group {
                pipe.cmd("XADD").arg(keys::stream(&channels[i])).arg("*").arg(keys::FIELD_WEBHOOK).arg(bytes);
            }
            self.write("XADD", pipe)
        });
        let replies = futures_util::future::try_join_all(writes).await?;
        let mut ids = vec![StreamId::ZERO; channels.len()];
        for (group, replies) in groups.iter().zip(&replies) {
            if replies.len() < group.len() {
                return Err(batch::fewer_replies());
            }
            for (&i, reply) in group.iter().zip(replies) {
                ids[i] = value_id(reply)?;
            }
        }
        Ok(ids)
    }

    /// Queues the append for the next round and waits for its ids.
    async fn append_batched(&self, channels: &[String], bytes: Vec<u8>) -> Result<Vec<StreamId>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let keys = channels.iter().map(|c| keys::stream(c)).collect();
        match self.batch.push(batch::Append { keys, bytes, reply }) {
            batch::Pushed::Queued => {}
            batch::Pushed::Start(guard) => {
                tokio::spawn(self.clone().write_rounds(guard));
            }
            batch::Pushed::Full(e) => {
                self.errors.inc();
                return Err(e);
            }
        }
        // Dropped unanswered only when the last round task died.
        answer.await.unwrap_or(Err(StoreError::Timeout { op: "XADD", ms: self.timeout.as_millis() }))
    }

    /// Writes the queued appends, a round (one pipeline) at a time, until
    /// none is left. The pipeline ignores errors: each request is told
    /// what its own `XADD`s got, and one error of the round (one a failover
    /// explains first: a `READONLY` still sends the store looking for the
    /// new master) goes through `after`.
    async fn write_rounds(self, mut guard: batch::RoundGuard) {
        while let Some(round) = self.batch.next_round(&mut guard) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for a in &round {
                for key in &a.keys {
                    pipe.cmd("XADD").arg(key).arg("*").arg(keys::FIELD_WEBHOOK).arg(a.bytes.as_slice());
                }
            }
            let replies = self.write("XADD", pipe).await;
            let ids_of = |mine: &[Value]| mine.iter().map(xadd_id).collect();
            let (failed, first) = batch::answer(round, replies, ids_of, may_be_failover);
            if let Some(e) = first {
                self.after(&Err::<(), _>(e)).await;
            }
            // `after` counted one error; the metric counts failed requests.
            if failed > 1 {
                self.errors.inc_by(failed as u64 - 1);
            }
        }
    }

    /// Runs a write that a `200` or a dead letter depends on: with replica
    /// durability on a pool connection, followed by `WAIT 1`, failing
    /// unless a replica confirmed it. The replies of `pipe`'s commands.
    async fn write(&self, op: &'static str, mut pipe: redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        let Some(wait) = self.replica_wait else {
            return self.run_pipe(op, &pipe).await;
        };
        pipe.cmd("WAIT").arg(1).arg(wait.as_millis() as u64);
        let target = self.target.current(self.timeout).await?;
        let n = self.next_writer.fetch_add(1, Ordering::Relaxed);
        let Some(writer) = target.writers.get(n % target.writers.len().max(1)) else {
            return Err(StoreError::Timeout { op, ms: 0 });
        };
        let r = self.exec::<Vec<Value>>(op, writer.clone(), Query::Pipe(&pipe), self.timeout + wait).await;
        let r = r.and_then(|mut replies| match replies.pop() {
            Some(Value::Int(n)) if n >= 1 => Ok(replies),
            _ => Err(StoreError::NotReplicated { op, ms: wait.as_millis() }),
        });
        self.after(&r).await;
        r
    }
}

impl Backend for RedisStore {
    type Reader = Reader;

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.run("PING", &redis::cmd("PING")).await?;
        Ok(())
    }

    /// Appends one webhook to each channel's stream and returns the entry
    /// ids in channel order. Returns only after Redis answered. Off a
    /// cluster the append joins the next round of concurrent requests'
    /// (`batch.rs`: one pipeline for all). On a cluster a fan-out writes
    /// each channel in a pipeline of its own, all at once; one failing
    /// fails the append (the sender retries, and may duplicate on the
    /// channels that were written, as a failed pipeline on one server can).
    async fn append(&self, channels: &[String], webhook: &Webhook) -> Result<Vec<StreamId>, StoreError> {
        let bytes = super::encode(webhook)?;
        let ids = if self.cluster {
            self.append_each(channels, &bytes).await?
        } else {
            self.append_batched(channels, bytes).await?
        };
        self.announce(channels);
        Ok(ids)
    }

    /// Creates the channel's stream and group at id 0; an existing group is fine.
    async fn ensure_group(&self, channel: &str) -> Result<(), StoreError> {
        let cmd = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys::stream(channel))
            .arg(keys::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .to_owned();
        match self.run::<Value>("XGROUP CREATE", &cmd).await {
            Ok(_) => Ok(()),
            Err(StoreError::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `XACK`s delivered entries; returns how many were pending.
    async fn ack(&self, channel: &str, ids: &[StreamId]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.run("XACK", redis::cmd("XACK").arg(keys::stream(channel)).arg(keys::GROUP).arg(ids)).await
    }

    /// Moves an entry to the channel's DLQ and acknowledges it, atomically
    /// (one script: the bytes are copied inside Redis).
    async fn dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(DEAD_LETTER).arg(2).arg(keys::stream(letter.channel)).arg(keys::dlq(letter.channel));
        cmd.arg(letter.id).arg(letter.reason).arg(letter.attempts).arg(now_ms());
        match letter.status {
            Some(status) => cmd.arg(status),
            None => cmd.arg(""),
        };
        cmd.arg(keys::GROUP).arg(keys::FIELD_WEBHOOK);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        self.write("dead-letter", pipe).await?;
        Ok(())
    }

    /// The webhook bytes of one entry.
    async fn raw_entry(&self, channel: &str, id: StreamId) -> Result<Option<Vec<u8>>, StoreError> {
        let v: Value = self.run("XRANGE", redis::cmd("XRANGE").arg(keys::stream(channel)).arg(id).arg(id)).await?;
        Ok(parse::entries(v)?.into_iter().next().and_then(|e| e.field(keys::FIELD_WEBHOOK).map(<[u8]>::to_vec)))
    }

    /// Opens a dedicated connection for one session's blocking reads.
    /// A session's reader: no connection of its own (see [`Reader`]).
    async fn reader(&self) -> Result<Reader, StoreError> {
        self.appends.ensure_subscribed(&self.target, self.timeout);
        Ok(Reader { store: self.clone(), watches: Vec::new(), empty_since: None })
    }

    /// Takes over entries idle longer than `min_idle` in any consumer's PEL,
    /// with their delivery counts (one script).
    async fn autoclaim(
        &self,
        channel: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(AUTOCLAIM).arg(1).arg(keys::stream(channel));
        cmd.arg(keys::GROUP).arg(consumer).arg(min_idle.as_millis() as u64).arg(count);
        let v: Value = self.run("XAUTOCLAIM", &cmd).await?;
        let Value::Array(parts) = v else {
            return Ok(Vec::new());
        };
        let mut parts = parts.into_iter();
        let (Some(claimed), Some(deleted), Some(counts)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(Vec::new());
        };
        let counts = parse::id_counts(counts);
        let mut out: Vec<Entry> = parse::entries(claimed)?
            .into_iter()
            .map(|item| {
                let attempt = counts.get(&item.id).copied().unwrap_or(1);
                item.into_entry(channel.to_string(), attempt)
            })
            .collect();
        // Entries trimmed while pending: report them so the session can XACK them.
        out.extend(parse::ids(deleted).into_iter().map(|id| Entry {
            channel: channel.to_string(),
            id,
            attempt: 1,
            webhook: Err(Unreadable::DeletedWhilePending),
        }));
        Ok(out)
    }

    /// Moves entries older than `retention` that were never acknowledged —
    /// pending on an agent, or not yet delivered — to the DLQ with reason
    /// `expired`, so trimming never makes them vanish. Returns how many.
    async fn expire(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        const BATCH: usize = 500;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        if cutoff == 0 {
            return Ok(0);
        }
        let last_old = StreamId::last_of(cutoff - 1);
        let stream = keys::stream(channel);
        let mut expired = 0;

        // 1. Pending (delivered, unacknowledged) and too old.
        let v: Value = match self
            .run("XPENDING", redis::cmd("XPENDING").arg(&stream).arg(keys::GROUP).arg("-").arg(last_old).arg(BATCH))
            .await
        {
            Ok(v) => v,
            Err(StoreError::Redis { source, .. }) if source.code() == Some("NOGROUP") => return Ok(0),
            Err(e) => return Err(e),
        };
        for (id, attempts) in parse::pending_counts(v) {
            self.dead_letter(&DeadLetter { channel, id, reason: "expired", status: None, attempts }).await?;
            expired += 1;
        }

        // 2. Never delivered and too old: read them through the group (so its
        //    counters stay right) under a pseudo-consumer, then dead-letter.
        let group = {
            let v: Value = self.run("XINFO GROUPS", redis::cmd("XINFO").arg("GROUPS").arg(&stream)).await?;
            parse::group_info(v, keys::GROUP)
        };
        let after = group.last_delivered.unwrap_or(StreamId::ZERO);
        let v: Value = self
            .run(
                "XRANGE",
                redis::cmd("XRANGE").arg(&stream).arg(format!("({after}")).arg(last_old).arg("COUNT").arg(BATCH),
            )
            .await?;
        let old = parse::entries(v)?.len();
        if old > 0 {
            let v: Value = self
                .run(
                    "XREADGROUP",
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(keys::GROUP)
                        .arg(EXPIRY_CONSUMER)
                        .arg("COUNT")
                        .arg(old)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">"),
                )
                .await?;
            for (_, item) in parse::read_reply(v)? {
                // A session may have read some meanwhile, so newer entries can
                // come back here: they stay pending on the pseudo-consumer and
                // are reclaimed by a session after the visibility timeout.
                if item.id.ms < cutoff {
                    let letter = DeadLetter { channel, id: item.id, reason: "expired", status: None, attempts: 0 };
                    self.dead_letter(&letter).await?;
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    /// Everything the edge reports about one channel, read in one `MULTI`
    /// (plus one `XRANGE` when nothing is pending but entries wait): backlog
    /// figures for `status`, `/health` and the metrics, and the stream's last
    /// id for the exact backlog cap.
    async fn snapshot(&self, channel: &str) -> Result<Snapshot, StoreError> {
        let stream = keys::stream(channel);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XINFO").arg("STREAM").arg(&stream);
        pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(keys::GROUP);
        pipe.cmd("XLEN").arg(keys::dlq(channel));
        let (info, groups, pending, dlq_length): (Value, Value, Value, u64) =
            match self.run_pipe("XINFO STREAM", &pipe).await {
                Ok(v) => v,
                // No stream or group yet: nothing waiting.
                Err(StoreError::Redis { source, .. }) if matches!(source.code(), Some("ERR") | Some("NOGROUP")) => {
                    return Ok(Snapshot::empty(channel));
                }
                Err(e) => return Err(e),
            };
        let (length, last_id) = parse::stream_info(info);
        let group = parse::group_info(groups, keys::GROUP);
        let (pending_count, oldest_pending) = parse::pending_summary(pending);
        let now = now_ms();
        let age = |id: StreamId| now.saturating_sub(id.ms);
        // Oldest waiting entry: the oldest pending one, else the first undelivered.
        let oldest_ms = match oldest_pending.map(age) {
            Some(a) => Some(a),
            None if group.lag.unwrap_or(0) > 0 => {
                let after = group.last_delivered.unwrap_or(StreamId::ZERO);
                let v: Value = self
                    .run(
                        "XRANGE",
                        redis::cmd("XRANGE").arg(&stream).arg(format!("({after}")).arg("+").arg("COUNT").arg(1),
                    )
                    .await?;
                parse::entries(v)?.first().map(|e| age(e.id))
            }
            None => None,
        };
        Ok(Snapshot {
            stats: ChannelStats {
                channel: channel.into(),
                backlog: group.lag.unwrap_or(0),
                pending: pending_count,
                oldest_ms,
            },
            last_id: last_id.unwrap_or(StreamId::ZERO),
            length,
            dlq_length,
        })
    }

    /// Trims entries older than `retention`, but never an entry that is
    /// pending or not yet delivered to the group. Returns entries removed.
    async fn trim(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        let stream = keys::stream(channel);
        let mut pipe = redis::pipe();
        pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(keys::GROUP);
        let (groups, pending): (Value, Value) = match self.run_pipe("XINFO GROUPS", &pipe).await {
            Ok(v) => v,
            Err(StoreError::Redis { source, .. })
                if source.code() == Some("ERR") || source.code() == Some("NOGROUP") =>
            {
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let group = parse::group_info(groups, keys::GROUP);
        let oldest = parse::pending_summary(pending).1;
        // Entries after last-delivered-id have not been read: keep them (a
        // lag Redis cannot tell counts as some).
        let delivered = (group.lag != Some(0)).then(|| group.last_delivered.unwrap_or(StreamId::ZERO));
        let bound = super::trim_bound(cutoff, oldest, delivered);
        self.run("XTRIM", redis::cmd("XTRIM").arg(&stream).arg("MINID").arg(bound)).await
    }

    /// Claims one pending entry for `consumer` (increments its delivery
    /// count, read back in the same `MULTI`); `None` when it is no longer
    /// pending.
    async fn claim(&self, channel: &str, consumer: &str, id: StreamId) -> Result<Option<Entry>, StoreError> {
        let stream = keys::stream(channel);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XCLAIM").arg(&stream).arg(keys::GROUP).arg(consumer).arg(0).arg(id);
        pipe.cmd("XPENDING").arg(&stream).arg(keys::GROUP).arg(id).arg(id).arg(1);
        let (claimed, pending): (Value, Value) = self.run_pipe("XCLAIM", &pipe).await?;
        let attempt = parse::pending_counts(pending).get(&id).copied().unwrap_or(1);
        Ok(parse::entries(claimed)?.into_iter().next().map(|item| item.into_entry(channel.to_string(), attempt)))
    }

    /// Claims a de-duplication key for `window`: `None` when this request
    /// is the first (the key now holds `pending`), else the value already
    /// there (`pending`, or the first request's JSON answer).
    async fn dedupe_claim(&self, key: &str, window: Duration) -> Result<Option<String>, StoreError> {
        self.run(
            "SET NX GET",
            redis::cmd("SET")
                .arg(key)
                .arg(DEDUPE_PENDING)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(window.as_millis() as u64),
        )
        .await
    }

    /// Records the first request's answer under its de-duplication key.
    async fn dedupe_record(&self, key: &str, answer: &str, window: Duration) -> Result<(), StoreError> {
        let _: Value =
            self.run("SET", redis::cmd("SET").arg(key).arg(answer).arg("PX").arg(window.as_millis() as u64)).await?;
        Ok(())
    }

    async fn dedupe_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.run("GET", redis::cmd("GET").arg(key)).await
    }

    /// Gives a claim back (the write it guarded failed).
    async fn dedupe_release(&self, key: &str) -> Result<(), StoreError> {
        let _: Value = self.run("DEL", redis::cmd("DEL").arg(key)).await?;
        Ok(())
    }

    /// Dead letters of a channel, oldest first, starting after `after`.
    async fn dlq_list(
        &self,
        channel: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, StoreError> {
        let start = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
        let v: Value = self
            .run("XRANGE", redis::cmd("XRANGE").arg(keys::dlq(channel)).arg(start).arg("+").arg("COUNT").arg(count))
            .await?;
        Ok(parse::entries(v)?.into_iter().map(dlq::dead_entry).collect())
    }

    async fn dlq_get(&self, channel: &str, id: StreamId) -> Result<Option<DeadEntry>, StoreError> {
        let v: Value = self.run("XRANGE", redis::cmd("XRANGE").arg(keys::dlq(channel)).arg(id).arg(id)).await?;
        Ok(parse::entries(v)?.into_iter().next().map(dlq::dead_entry))
    }

    async fn dlq_len(&self, channel: &str) -> Result<u64, StoreError> {
        self.run("XLEN", redis::cmd("XLEN").arg(keys::dlq(channel))).await
    }

    async fn dlq_last(&self, channel: &str) -> Result<Option<StreamId>, StoreError> {
        self.newest(&keys::dlq(channel), "+").await
    }

    /// Moves one dead letter back into the channel stream as a new entry.
    /// Returns the new stream id, or `None` when it holds no webhook.
    /// One script: the `XADD` happens only if this call's `XDEL` removed
    /// the dead letter, so two replays of one id replay it once.
    async fn dlq_replay_one(&self, channel: &str, entry: &DeadEntry) -> Result<Option<StreamId>, StoreError> {
        const SCRIPT: &str = "if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then \
            return redis.call('XADD', KEYS[2], '*', ARGV[2], ARGV[3]) end return false";
        let Some(raw) = &entry.raw else { return Ok(None) };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(2).arg(keys::dlq(channel)).arg(keys::stream(channel));
        cmd.arg(entry.id).arg(keys::FIELD_WEBHOOK).arg(raw.as_slice());
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let replies = self.write("dlq replay", pipe).await?;
        self.announce(&[channel.to_string()]);
        match replies.first() {
            None | Some(Value::Nil) => Ok(None),
            Some(id) => value_id(id).map(Some),
        }
    }

    /// Deletes dead letters older than `before_ms`, or all of them.
    async fn dlq_purge(&self, channel: &str, before_ms: Option<u64>) -> Result<u64, StoreError> {
        match before_ms {
            Some(ms) => self.run("XTRIM", redis::cmd("XTRIM").arg(keys::dlq(channel)).arg("MINID").arg(ms)).await,
            None => {
                let n = self.dlq_len(channel).await?;
                // UNLINK: the memory is freed off Redis's main thread.
                let _: Value = self.run("UNLINK", redis::cmd("UNLINK").arg(keys::dlq(channel))).await?;
                Ok(n)
            }
        }
    }

    /// The newest entry received by `until_ms` (`XREVRANGE`).
    async fn replay_stop(&self, channel: &str, until_ms: u64) -> Result<Option<StreamId>, StoreError> {
        self.newest(&keys::stream(channel), &StreamId::last_of(until_ms).to_string()).await
    }

    /// `XRANGE` of one page, then one pipeline of `XADD`s.
    async fn replay_page(
        &self,
        channel: &str,
        from: ReplayFrom,
        stop: StreamId,
        count: usize,
    ) -> Result<ReplayPage, StoreError> {
        let start = match from {
            ReplayFrom::Since(ms) => ms.to_string(),
            ReplayFrom::After(id) => format!("({id}"),
        };
        let v: Value = self
            .run(
                "XRANGE",
                redis::cmd("XRANGE").arg(keys::stream(channel)).arg(&start).arg(stop).arg("COUNT").arg(count.max(1)),
            )
            .await?;
        let page = parse::entries(v)?;
        let last = page.last().map(|e| e.id);
        let mut pipe = redis::pipe();
        let mut n = 0;
        for raw in &page {
            if let Some(w) = raw.field(keys::FIELD_WEBHOOK) {
                pipe.cmd("XADD").arg(keys::stream(channel)).arg("*").arg(keys::FIELD_WEBHOOK).arg(w);
                n += 1;
            }
        }
        let appended = if n > 0 {
            let replies = self.write("replay", pipe).await?;
            self.announce(&[channel.to_string()]);
            replies
        } else {
            Vec::new()
        };
        Ok(ReplayPage { appended: appended.iter().map(value_id).collect::<Result<_, _>>()?, last })
    }
}

impl Reader {
    /// What `channels` wait on; `true` when one of them is new to this
    /// reader (it must look: it has seen nothing of it yet).
    fn watch(&mut self, channels: &[&str]) -> bool {
        let mut added = false;
        for ch in channels {
            if !self.watches.iter().any(|(c, _)| c == ch) {
                self.watches.push((ch.to_string(), self.store.appends.waiters(ch)));
                added = true;
            }
        }
        added
    }

    /// Until woken for one of `channels`, or `within` has passed.
    async fn wait(&self, channels: &[&str], within: Duration) -> bool {
        let waits: Vec<_> = self
            .watches
            .iter()
            .filter(|(c, _)| channels.contains(&c.as_str()))
            .map(|(_, n)| Box::pin(n.notified()))
            .collect();
        if waits.is_empty() {
            tokio::time::sleep(within).await;
            return false;
        }
        // A wake taken by one of these is handed on when the others drop.
        tokio::time::timeout(within, futures_util::future::select_all(waits)).await.is_ok()
    }

    /// New entries of `channels` (their first delivery), read without blocking.
    async fn read_new(&mut self, consumer: &str, channels: &[&str], count: usize) -> Result<Read, StoreError> {
        let cursors: Vec<(String, Cursor)> = channels.iter().map(|c| (c.to_string(), Cursor::New)).collect();
        let got = self.read_by_slot(consumer, &cursors, count).await?;
        self.empty_since =
            got.entries.is_empty().then(|| (Instant::now(), channels.iter().map(|c| c.to_string()).collect()));
        Ok(got)
    }

    /// Reads `cursors` in one step, or on a cluster in one step per slot,
    /// all at once (`count` is per channel either way). Entries a step read
    /// are pending on `consumer`: another step's failure still returns them,
    /// naming the failed step's channels [`Read::unread`].
    async fn read_by_slot(
        &self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Read, StoreError> {
        let groups =
            if self.store.cluster { slot_groups(true, cursors.iter().map(|(c, _)| c.as_str())) } else { Vec::new() };
        if groups.len() <= 1 {
            let entries = self.read_once(consumer, cursors, count).await?;
            return Ok(Read { entries, unread: Vec::new() });
        }
        let parts: Vec<Vec<(String, Cursor)>> =
            groups.iter().map(|g| g.iter().map(|&i| cursors[i].clone()).collect()).collect();
        let reads =
            futures_util::future::join_all(parts.iter().map(|part| self.read_once(consumer, part, count))).await;
        let mut out = Read::default();
        let mut failed = None;
        for (read, part) in reads.into_iter().zip(parts) {
            match read {
                Ok(got) => out.entries.extend(got),
                Err(e) => {
                    out.unread.extend(part.into_iter().map(|(c, _)| c));
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) if out.entries.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, unread = ?out.unread, "a cluster read failed while others found entries");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// One `XREADGROUP` of cursors whose keys share a slot.
    async fn read_once(
        &self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        if cursors.iter().any(|(_, c)| *c != Cursor::New) {
            return self.read_pending(consumer, cursors, count).await;
        }
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(keys::GROUP).arg(consumer).arg("COUNT").arg(count).arg("STREAMS");
        for (channel, _) in cursors {
            read.arg(keys::stream(channel));
        }
        for _ in cursors {
            read.arg(">");
        }
        let v: Value = self.store.run_read("XREADGROUP", Query::Cmd(&read)).await?;
        Ok(parse::read_reply(v)?.into_iter().map(|(channel, item)| item.into_entry(channel, 1)).collect())
    }

    /// Pending entries after each cursor, with their delivery counts: the
    /// read and one `XPENDING` per pending cursor in one `MULTI`.
    async fn read_pending(
        &self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(keys::GROUP).arg(consumer).arg("COUNT").arg(count).arg("STREAMS");
        for (channel, _) in cursors {
            read.arg(keys::stream(channel));
        }
        for (_, cursor) in cursors {
            match cursor {
                Cursor::Pending(after) => read.arg(after),
                Cursor::New => read.arg(">"),
            };
        }
        let pending: Vec<(&str, StreamId)> = cursors
            .iter()
            .filter_map(|(ch, c)| match c {
                Cursor::Pending(after) => Some((ch.as_str(), *after)),
                Cursor::New => None,
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.add_command(read);
        for (channel, after) in &pending {
            let stream = keys::stream(channel);
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(keys::GROUP)
                .arg(format!("({after}"))
                .arg("+")
                .arg(count)
                .arg(consumer);
        }
        let mut replies: Vec<Value> = self.store.run_read("XREADGROUP", Query::Pipe(&pipe)).await?;
        if replies.is_empty() {
            return Ok(Vec::new());
        }
        let read = replies.remove(0);
        let mut counts = std::collections::HashMap::new();
        for (reply, (channel, _)) in replies.into_iter().zip(&pending) {
            counts.insert(*channel, parse::pending_counts(reply));
        }
        Ok(parse::read_reply(read)?
            .into_iter()
            .map(|(channel, item)| {
                let attempt = counts.get(channel.as_str()).and_then(|c| c.get(&item.id)).copied().unwrap_or(1);
                item.into_entry(channel, attempt)
            })
            .collect())
    }
}

impl BlockingRead for Reader {
    /// `XREADGROUP` over several streams, each from its own cursor, never
    /// blocking in Redis. A read of pending lists (any cursor not
    /// [`Cursor::New`]) gives each entry's delivery count. A read of new
    /// entries only (their first delivery) that finds nothing waits, up to
    /// `store.block`, to be woken by an announced append, looking again
    /// after each wake; after an empty look it does not look again before a
    /// wake or `appends::RECHECK`.
    async fn read_each(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Read, StoreError> {
        let count = count.max(1);
        if cursors.iter().any(|(_, c)| *c != Cursor::New) {
            self.empty_since = None;
            return Box::pin(self.read_by_slot(consumer, cursors, count)).await;
        }
        let channels: Vec<&str> = cursors.iter().map(|(c, _)| c.as_str()).collect();
        let new_channel = self.watch(&channels);
        // Look unless an empty look of these very channels (or more) is recent.
        let due = self.empty_since.as_ref().is_none_or(|(at, seen)| {
            at.elapsed() >= appends::RECHECK || !channels.iter().all(|c| seen.iter().any(|s| s == c))
        });
        if new_channel || due {
            let got = Box::pin(self.read_new(consumer, &channels, count)).await?;
            if !got.entries.is_empty() {
                return Ok(got);
            }
        }
        // An announcement can find nothing (another session took it, or the
        // subscriber woke everyone after reconnecting): wait on, up to the end.
        let deadline = Instant::now() + self.store.block;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait(&channels, left).await {
                return Ok(Read::default());
            }
            let got = Box::pin(self.read_new(consumer, &channels, count)).await?;
            if !got.entries.is_empty() {
                return Ok(got);
            }
        }
    }
}

/// An `XADD`'s id, or the error Redis answered it with (in a pipeline
/// that ignores errors).
fn xadd_id(v: &Value) -> Result<StreamId, StoreError> {
    match v {
        Value::ServerError(e) => Err(StoreError::Redis { op: "XADD", source: e.clone().into() }),
        v => value_id(v),
    }
}

/// An id Redis generated (an `XADD` reply).
fn value_id(v: &Value) -> Result<StreamId, StoreError> {
    let text = match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    text.parse().map_err(|_| StoreError::Corrupt { id: text.clone(), why: "Redis answered with no stream id".into() })
}
