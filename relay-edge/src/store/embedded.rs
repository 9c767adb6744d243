//! The embedded backend: one `redb` file, no server.
//!
//! # Model
//! The same streams-and-groups model as Redis, in five tables keyed by
//! `(channel, ms, seq)`: the stream entries (webhook bytes), the pending
//! list (consumer, delivery count, last delivery time), the DLQ, one
//! metadata row per channel (last id, the group's last delivered id, counts)
//! and the de-duplication keys. Ids are generated like Redis generates them
//! (`<ms>-<seq>`, monotonic per channel), so sessions, acks, the backlog cap
//! and the admin API do not know which backend runs.
//!
//! # Writes and durability
//! redb allows one write transaction at a time, so every change goes
//! through one writer thread that batches whatever is queued into one
//! transaction (group commit). A batch holding an append or a DLQ change
//! commits with `Durability::Immediate` (fsync) before any caller hears
//! back: a `200` means the webhook is on disk. Reads into the pending list,
//! acks and claims commit without fsync and become durable with the next
//! durable commit, at most [`SYNC_EVERY`] later — losing them in a crash
//! only means a redelivery (at-least-once), like Redis' `appendfsync
//! everysec`.
//!
//! # Blocking reads
//! A session's read of new entries waits on a counter the writer bumps after
//! each commit that appended, up to `store.block`, instead of polling.
//!
//! # One handle per file and process
//! redb locks its file. Opening a path that this process already has open
//! returns the same handle, so an in-process restart (tests) works; a
//! second process gets a clear "in use" error.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use relay_protocol::Webhook;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::{
    Backend, BlockingRead, Cursor, DEDUPE_PENDING, DeadEntry, DeadLetter, Entry, Read, ReplayFrom, ReplayPage,
    Snapshot, StreamId, Unreadable, now_ms,
};
use crate::config::StoreConfig;
use crate::error::StoreError;
use relay_protocol::ChannelStats;

type Id = (&'static str, u64, u64);
/// A borrowed key of the id-keyed tables.
type Key<'a> = (&'a str, u64, u64);

const ENTRIES: TableDefinition<Id, &[u8]> = TableDefinition::new("entries");
/// Value: (consumer, delivery count, last delivery ms).
const PENDING: TableDefinition<Id, (&str, u32, u64)> = TableDefinition::new("pending");
const DLQ: TableDefinition<Id, &[u8]> = TableDefinition::new("dlq");
const CHANNELS: TableDefinition<&str, [u64; META_LEN]> = TableDefinition::new("channels");
/// Value: (expires at ms, answer).
const DEDUPE: TableDefinition<&str, (u64, &str)> = TableDefinition::new("dedupe");

/// Longest time a non-durable commit (read, ack, claim) waits for an fsync.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 1024;
/// Entries moved per retention call (the loop calls again a second later).
const RETENTION_BATCH: usize = 5000;

const META_LEN: usize = 9;
/// How long opening waits for another holder of the file to let go.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Entries one replay transaction copies.
const REPLAY_PAGE: usize = 500;
/// Dead letters one purge transaction removes.
const PURGE_BATCH: usize = 1000;

/// Per-channel bookkeeping, one row of `channels`.
#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// Last id generated for the stream.
    last: (u64, u64),
    /// Group's last delivered id: entries after it are undelivered.
    delivered: (u64, u64),
    /// Entries in the stream.
    length: u64,
    /// Entries after `delivered`.
    undelivered: u64,
    dlq_last: (u64, u64),
    dlq_length: u64,
}

impl Meta {
    fn from_row(r: [u64; META_LEN]) -> Self {
        Self {
            last: (r[0], r[1]),
            delivered: (r[2], r[3]),
            length: r[4],
            undelivered: r[5],
            dlq_last: (r[6], r[7]),
            dlq_length: r[8],
        }
    }

    fn row(&self) -> [u64; META_LEN] {
        [
            self.last.0,
            self.last.1,
            self.delivered.0,
            self.delivered.1,
            self.length,
            self.undelivered,
            self.dlq_last.0,
            self.dlq_last.1,
            self.dlq_length,
        ]
    }
}

/// The next id after `last` at time `now`, as Redis generates them.
fn next_id(last: (u64, u64), now: u64) -> (u64, u64) {
    if now > last.0 { (now, 0) } else { (last.0, last.1 + 1) }
}

/// A dead letter as stored.
#[derive(Serialize, Deserialize)]
struct DeadRecord {
    stream_id: String,
    reason: String,
    attempts: u32,
    status: Option<u16>,
    failed_at_ms: u64,
    #[serde(with = "serde_bytes")]
    raw: Option<Vec<u8>>,
}

/// The tables of one write transaction, opened once per batch.
struct W<'t> {
    entries: redb::Table<'t, Id, &'static [u8]>,
    pending: redb::Table<'t, Id, (&'static str, u32, u64)>,
    dlq: redb::Table<'t, Id, &'static [u8]>,
    channels: redb::Table<'t, &'static str, [u64; META_LEN]>,
    dedupe: redb::Table<'t, &'static str, (u64, &'static str)>,
    now: u64,
}

type DbResult<T> = Result<T, redb::Error>;

fn corrupt(why: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(why.to_string())
}

fn key(channel: &str, id: (u64, u64)) -> Key<'_> {
    (channel, id.0, id.1)
}

/// `(channel, after)` exclusive to the channel's end.
fn after(channel: &str, id: (u64, u64)) -> (Bound<Key<'_>>, Bound<Key<'_>>) {
    (Bound::Excluded(key(channel, id)), Bound::Included(key(channel, (u64::MAX, u64::MAX))))
}

/// A channel's row, as a read transaction sees it.
fn channel_meta(txn: &ReadTransaction, channel: &str) -> DbResult<Option<Meta>> {
    Ok(txn.open_table(CHANNELS)?.get(channel)?.map(|g| Meta::from_row(g.value())))
}

/// Pending entries in `range` (of one channel) that `keep(consumer,
/// delivery count, last delivery ms)` accepts, oldest first, at most
/// `count`: their ids and delivery counts.
fn scan_pending<'a>(
    pending: &impl ReadableTable<Id, (&'static str, u32, u64)>,
    range: (Bound<Key<'a>>, Bound<Key<'a>>),
    count: usize,
    mut keep: impl FnMut(&str, u32, u64) -> bool,
) -> DbResult<Vec<((u64, u64), u32)>> {
    let mut out = Vec::new();
    for item in pending.range(range)? {
        if out.len() >= count {
            break;
        }
        let (k, v) = item?;
        let (who, n, at) = v.value();
        if keep(who, n, at) {
            let (_, ms, seq) = k.value();
            out.push(((ms, seq), n));
        }
    }
    Ok(out)
}

impl W<'_> {
    fn meta(&self, channel: &str) -> DbResult<Meta> {
        Ok(self.channels.get(channel)?.map(|g| Meta::from_row(g.value())).unwrap_or_default())
    }

    fn put_meta(&mut self, channel: &str, meta: &Meta) -> DbResult<()> {
        self.channels.insert(channel, meta.row())?;
        Ok(())
    }

    /// Appends bytes as a new entry; returns its id.
    fn append(&mut self, channel: &str, bytes: &[u8]) -> DbResult<(u64, u64)> {
        let mut meta = self.meta(channel)?;
        let id = next_id(meta.last, self.now);
        self.entries.insert(key(channel, id), bytes)?;
        meta.last = id;
        meta.length += 1;
        meta.undelivered += 1;
        self.put_meta(channel, &meta)?;
        Ok(id)
    }

    fn entry(&self, channel: &str, id: (u64, u64)) -> DbResult<Option<Vec<u8>>> {
        Ok(self.entries.get(key(channel, id))?.map(|g| g.value().to_vec()))
    }

    /// Records a dead letter and removes the entry from the pending list.
    fn dead_letter(&mut self, channel: &str, record: &DeadRecord) -> DbResult<()> {
        let mut meta = self.meta(channel)?;
        let id = next_id(meta.dlq_last, self.now);
        let bytes = rmp_serde::to_vec_named(record).map_err(corrupt)?;
        self.dlq.insert(key(channel, id), bytes.as_slice())?;
        meta.dlq_last = id;
        meta.dlq_length += 1;
        self.put_meta(channel, &meta)?;
        if let Ok(sid) = record.stream_id.parse::<StreamId>() {
            self.pending.remove(key(channel, sid.into()))?;
        }
        Ok(())
    }

    /// Moves up to `count` undelivered entries to `consumer`'s pending list.
    fn read_new(&mut self, channel: &str, consumer: &str, count: usize) -> DbResult<Vec<Entry>> {
        let mut meta = self.meta(channel)?;
        if meta.undelivered == 0 {
            return Ok(Vec::new());
        }
        let mut read = Vec::new();
        for item in self.entries.range(after(channel, meta.delivered))?.take(count) {
            let (k, v) = item?;
            let (_, ms, seq) = k.value();
            read.push(((ms, seq), v.value().to_vec()));
        }
        let mut out = Vec::with_capacity(read.len());
        for (id, bytes) in read {
            self.pending.insert(key(channel, id), (consumer, 1, self.now))?;
            meta.delivered = id;
            out.push(Entry::read(channel, id.into(), 1, Some(bytes)));
        }
        meta.undelivered = meta.undelivered.saturating_sub(out.len() as u64);
        self.put_meta(channel, &meta)?;
        Ok(out)
    }

    /// Re-reads `consumer`'s own pending entries after `cursor` (their
    /// delivery count goes up, like Redis does for a history read).
    fn read_pending(
        &mut self,
        channel: &str,
        consumer: &str,
        cursor: (u64, u64),
        count: usize,
    ) -> DbResult<Vec<Entry>> {
        let mine = scan_pending(&self.pending, after(channel, cursor), count, |who, _, _| who == consumer)?;
        let mut out = Vec::with_capacity(mine.len());
        for (id, n) in mine {
            let n = n.saturating_add(1);
            self.pending.insert(key(channel, id), (consumer, n, self.now))?;
            out.push(Entry::read(channel, id.into(), n, self.entry(channel, id)?));
        }
        Ok(out)
    }

    /// The dead letter of entry `id`, with its bytes if the stream still
    /// holds it.
    fn letter(
        &self,
        channel: &str,
        id: (u64, u64),
        reason: &str,
        status: Option<u16>,
        attempts: u32,
    ) -> DbResult<DeadRecord> {
        Ok(DeadRecord {
            stream_id: StreamId::from(id).to_string(),
            reason: reason.to_string(),
            attempts,
            status,
            failed_at_ms: self.now,
            raw: self.entry(channel, id)?,
        })
    }

    /// Gives a pending entry to `consumer`, counting a delivery (its bytes
    /// are `None`, and it leaves the pending list, when the entry is gone).
    fn take_over(&mut self, channel: &str, consumer: &str, id: (u64, u64), n: u32) -> DbResult<Entry> {
        let bytes = self.entry(channel, id)?;
        let n = n.saturating_add(1);
        if bytes.is_some() {
            self.pending.insert(key(channel, id), (consumer, n, self.now))?;
        } else {
            self.pending.remove(key(channel, id))?;
        }
        Ok(Entry::read(channel, id.into(), n, bytes))
    }
}

/// One queued change: runs inside the batch's transaction, and reports
/// back only after the commit (or its failure).
struct Job {
    durable: bool,
    wakes: bool,
    run: Run,
}

/// Runs a job's change; says whether it succeeded and how to report back.
type Run = Box<dyn for<'t> FnOnce(&mut W<'t>) -> (bool, Finish) + Send>;

type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Inner {
    db: Arc<Database>,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    wake: watch::Receiver<u64>,
    last_sweep: Mutex<Option<Instant>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after a final durable commit;
        // waiting for it releases the file lock before the handle is gone.
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Files this process has open, so a second open shares the handle.
static OPEN: Mutex<Vec<(PathBuf, Weak<Inner>)>> = Mutex::new(Vec::new());

/// Handle on the embedded store; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    timeout: Duration,
    block: Duration,
    errors: prometheus_client::metrics::counter::Counter,
}

/// A session's reader: waits for appends instead of polling.
pub struct Reader {
    store: EmbeddedStore,
    wake: watch::Receiver<u64>,
}

fn open_err(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Open { path: path.to_path_buf(), why: why.to_string() }
}

impl EmbeddedStore {
    /// Opens (creating it and its directory if needed) the store file.
    pub fn open(
        path: &Path,
        cfg: &StoreConfig,
        errors: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(path, format!("cannot create its directory: {e}")))?;
        }
        // The file holds every webhook: owner only, whatever the umask.
        // (An empty file is what redb then initialises.)
        {
            use std::os::unix::fs::OpenOptionsExt;
            let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(open_err(path, format!("cannot create it: {e}"))),
            }
        }
        let abs = absolute(path).map_err(|e| open_err(path, e))?;
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        let inner = match open.iter().find(|(p, _)| *p == abs).and_then(|(_, w)| w.upgrade()) {
            Some(inner) => inner,
            None => {
                let inner = Arc::new(Inner::open(&abs, cfg.cache.as_u64() as usize)?);
                open.push((abs, Arc::downgrade(&inner)));
                inner
            }
        };
        Ok(Self { inner, timeout: cfg.command_timeout, block: cfg.block, errors })
    }

    /// Runs `f` in the next write batch; returns after its commit.
    async fn write<R: Send + 'static>(
        &self,
        op: &'static str,
        durable: bool,
        wakes: bool,
        f: impl for<'t> FnOnce(&mut W<'t>) -> DbResult<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |w: &mut W<'_>| {
            let r = f(w);
            let ok = r.is_ok();
            let finish: Finish = Box::new(move |commit: Result<(), String>| {
                let out = match (r, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(StoreError::Embedded { op, why: e.to_string() }),
                    (Ok(_), Err(why)) => Err(StoreError::Embedded { op, why }),
                };
                let _ = tx.send(out);
            });
            (ok, finish)
        });
        let job = Job { durable, wakes, run };
        let closed = || StoreError::Embedded { op, why: "the store is closed".into() };
        let sent = self.inner.jobs.as_ref().map(|j| j.send(job).is_ok()).unwrap_or(false);
        let r = if !sent {
            Err(closed())
        } else {
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(closed()),
                Err(_) => Err(StoreError::Timeout { op, ms: self.timeout.as_millis() }),
            }
        };
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// Runs `f` on a read transaction (a consistent snapshot) off the runtime.
    /// Id of the newest row of `channel` in `table` at or below `upper`.
    async fn newest(
        &self,
        op: &'static str,
        table: TableDefinition<'static, Id, &'static [u8]>,
        channel: &str,
        upper: (u64, u64),
    ) -> Result<Option<StreamId>, StoreError> {
        let ch = channel.to_string();
        self.read(op, move |txn| {
            let t = txn.open_table(table)?;
            let newest = t.range((Bound::Included(key(&ch, (0, 0))), Bound::Included(key(&ch, upper))))?.next_back();
            Ok(newest.transpose()?.map(|(k, _)| {
                let (_, ms, seq) = k.value();
                StreamId::new(ms, seq)
            }))
        })
        .await
    }

    async fn read<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&ReadTransaction) -> DbResult<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = self.inner.db.clone();
        let r = tokio::task::spawn_blocking(move || f(&db.begin_read()?))
            .await
            .map_err(|e| StoreError::Embedded { op, why: e.to_string() })
            .and_then(|r| r.map_err(|e| StoreError::Embedded { op, why: e.to_string() }));
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// Whether any of `channels` has undelivered entries (a cheap check
    /// before a read that would otherwise be an empty write).
    fn has_new(&self, cursors: &[(String, Cursor)]) -> Result<bool, StoreError> {
        let check = || -> DbResult<bool> {
            let txn = self.inner.db.begin_read()?;
            for (ch, _) in cursors {
                if channel_meta(&txn, ch)?.is_some_and(|m| m.undelivered > 0) {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        check().map_err(|e| StoreError::Embedded { op: "read", why: e.to_string() })
    }

    async fn read_group(
        &self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let consumer = consumer.to_string();
        let cursors = cursors.to_vec();
        self.write("read", false, false, move |w| {
            let mut out = Vec::new();
            for (ch, cursor) in &cursors {
                match cursor {
                    Cursor::New => out.extend(w.read_new(ch, &consumer, count)?),
                    Cursor::Pending(after) => out.extend(w.read_pending(ch, &consumer, (*after).into(), count)?),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Drops expired de-duplication keys, at most every 10 s.
    async fn sweep_dedupe(&self) -> Result<(), StoreError> {
        {
            let mut last = self.inner.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        self.write("dedupe sweep", false, false, |w| {
            let now = w.now;
            w.dedupe.retain(|_, (expires, _)| expires > now)?;
            Ok(())
        })
        .await
    }
}

fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.canonicalize()?,
        None => std::env::current_dir()?,
    };
    Ok(dir.join(path.file_name().ok_or_else(|| std::io::Error::other("the path names no file"))?))
}

impl Inner {
    fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        // A previous holder may still be closing (a restart): wait a little.
        let deadline = Instant::now() + LOCK_WAIT;
        let db = loop {
            match Database::builder().set_cache_size(cache_bytes).create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(open_err(
                        path,
                        "it is in use by another process (one edge per embedded store; use Redis for several)",
                    ));
                }
                Err(other) => return Err(open_err(path, other)),
            }
        };
        let db = Arc::new(db);
        // Create every table, so read transactions never miss one.
        let txn = db.begin_write().map_err(|e| open_err(path, e))?;
        open_tables(&txn, 0).map_err(|e| open_err(path, e))?;
        txn.commit().map_err(|e| open_err(path, e))?;

        let (jobs, rx) = mpsc::channel();
        let (wake_tx, wake) = watch::channel(0);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("relay-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &rx, &wake_tx))
            .map_err(|e| open_err(path, format!("cannot start its writer thread: {e}")))?;
        Ok(Self { db, jobs: Some(jobs), writer: Some(writer), wake, last_sweep: Mutex::new(None) })
    }
}

fn open_tables(txn: &WriteTransaction, now: u64) -> DbResult<W<'_>> {
    Ok(W {
        entries: txn.open_table(ENTRIES)?,
        pending: txn.open_table(PENDING)?,
        dlq: txn.open_table(DLQ)?,
        channels: txn.open_table(CHANNELS)?,
        dedupe: txn.open_table(DEDUPE)?,
        now,
    })
}

/// The group-commit loop: one transaction per batch of queued jobs.
fn writer_loop(db: &Database, rx: &mpsc::Receiver<Job>, wake: &watch::Sender<u64>) {
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        let first = if unsynced {
            match rx.recv_timeout(SYNC_EVERY.saturating_sub(last_sync.elapsed())) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    commit_batch(db, Vec::new(), true);
                    return;
                }
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|j| j.durable) || last_sync.elapsed() >= SYNC_EVERY;
        let wakes = batch.iter().any(|j| j.wakes);
        if commit_batch(db, batch, durable) {
            if durable {
                unsynced = false;
                last_sync = Instant::now();
            } else {
                unsynced = true;
            }
            if wakes {
                wake.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// Runs a batch in one transaction and tells every job how the commit went.
/// A job that fails aborts the whole batch (its writes are not separable).
fn commit_batch(db: &Database, batch: Vec<Job>, durable: bool) -> bool {
    let mut finishes = Vec::with_capacity(batch.len());
    let result = (|| -> Result<(), String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        if !durable {
            txn.set_durability(Durability::None).map_err(|e| e.to_string())?;
        }
        let mut failed = false;
        {
            let mut w = open_tables(&txn, now_ms()).map_err(|e| e.to_string())?;
            for job in batch {
                let (ok, finish) = (job.run)(&mut w);
                failed |= !ok;
                finishes.push(finish);
            }
        }
        if failed {
            txn.abort().map_err(|e| e.to_string())?;
            return Err("another change in the same transaction failed; nothing was written".into());
        }
        txn.commit().map_err(|e| e.to_string())
    })();
    let ok = result.is_ok();
    if let Err(e) = &result {
        tracing::error!(error = %e, "embedded store commit failed");
    }
    for finish in finishes {
        finish(result.clone());
    }
    ok
}

impl Backend for EmbeddedStore {
    type Reader = Reader;

    async fn ping(&self) -> Result<(), StoreError> {
        self.read("ping", |txn| txn.open_table(CHANNELS).map(|_| ()).map_err(Into::into)).await
    }

    async fn append(&self, channels: &[String], webhook: &Webhook) -> Result<Vec<StreamId>, StoreError> {
        let bytes = super::encode(webhook)?;
        let channels = channels.to_vec();
        self.write("append", true, true, move |w| {
            channels.iter().map(|ch| w.append(ch, &bytes).map(StreamId::from)).collect()
        })
        .await
    }

    async fn ensure_group(&self, _channel: &str) -> Result<(), StoreError> {
        // Every channel has its group from its first append (or read).
        Ok(())
    }

    async fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Reader { store: self.clone(), wake: self.inner.wake.clone() })
    }

    async fn ack(&self, channel: &str, ids: &[StreamId]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let channel = channel.to_string();
        let ids: Vec<(u64, u64)> = ids.iter().map(|id| (*id).into()).collect();
        self.write("ack", false, false, move |w| {
            let mut n = 0;
            for id in ids {
                if w.pending.remove(key(&channel, id))?.is_some() {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    async fn claim(&self, channel: &str, consumer: &str, id: StreamId) -> Result<Option<Entry>, StoreError> {
        let (ch, consumer) = (channel.to_string(), consumer.to_string());
        self.write("claim", false, false, move |w| {
            let n = match w.pending.get(key(&ch, id.into()))? {
                Some(g) => g.value().1,
                None => return Ok(None),
            };
            // Like XCLAIM: an entry gone from the stream is not claimed.
            let entry = w.take_over(&ch, &consumer, id.into(), n)?;
            Ok((!matches!(entry.webhook, Err(Unreadable::DeletedWhilePending))).then_some(entry))
        })
        .await
    }

    async fn autoclaim(
        &self,
        channel: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let (ch, consumer) = (channel.to_string(), consumer.to_string());
        let idle = min_idle.as_millis() as u64;
        self.write("autoclaim", false, false, move |w| {
            let now = w.now;
            let stale = scan_pending(&w.pending, after(&ch, (0, 0)), count, |_, _, at| now.saturating_sub(at) >= idle)?;
            stale.into_iter().map(|(id, n)| w.take_over(&ch, &consumer, id, n)).collect()
        })
        .await
    }

    async fn raw_entry(&self, channel: &str, id: StreamId) -> Result<Option<Vec<u8>>, StoreError> {
        let ch = channel.to_string();
        self.read("read entry", move |txn| {
            Ok(txn.open_table(ENTRIES)?.get(key(&ch, id.into()))?.map(|g| g.value().to_vec()))
        })
        .await
    }

    /// The entry's bytes are read in the same transaction that records the
    /// dead letter.
    async fn dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        let (ch, reason) = (letter.channel.to_string(), letter.reason.to_string());
        let (id, status, attempts) = (letter.id, letter.status, letter.attempts);
        self.write("dead-letter", true, false, move |w| {
            let record = w.letter(&ch, id.into(), &reason, status, attempts)?;
            w.dead_letter(&ch, &record)
        })
        .await
    }

    async fn expire(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        if cutoff == 0 {
            return Ok(0);
        }
        let ch = channel.to_string();
        self.write("expire", true, false, move |w| {
            let end = key(&ch, (cutoff - 1, u64::MAX));
            // 1. Pending (delivered, unacknowledged) and too old.
            let range = (Bound::Included(key(&ch, (0, 0))), Bound::Included(end));
            let old = scan_pending(&w.pending, range, RETENTION_BATCH, |_, _, _| true)?;
            let mut expired = 0;
            for (id, attempts) in old {
                let record = w.letter(&ch, id, "expired", None, attempts)?;
                w.dead_letter(&ch, &record)?;
                expired += 1;
            }
            // 2. Never delivered and too old: the head of the undelivered part.
            let mut meta = w.meta(&ch)?;
            if meta.undelivered > 0 {
                let mut undelivered = Vec::new();
                for item in w.entries.range((Bound::Excluded(key(&ch, meta.delivered)), Bound::Included(end)))? {
                    let (k, _) = item?;
                    let (_, ms, seq) = k.value();
                    undelivered.push((ms, seq));
                    if undelivered.len() >= RETENTION_BATCH {
                        break;
                    }
                }
                if let Some(last) = undelivered.last() {
                    meta.delivered = *last;
                    meta.undelivered = meta.undelivered.saturating_sub(undelivered.len() as u64);
                    w.put_meta(&ch, &meta)?;
                }
                for id in undelivered {
                    let record = w.letter(&ch, id, "expired", None, 0)?;
                    w.dead_letter(&ch, &record)?;
                    expired += 1;
                }
            }
            Ok(expired)
        })
        .await
    }

    async fn trim(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        self.sweep_dedupe().await?;
        let ch = channel.to_string();
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        self.write("trim", false, false, move |w| {
            let meta = w.meta(&ch)?;
            let oldest = match w.pending.range(after(&ch, (0, 0)))?.next() {
                Some(first) => {
                    let (_, ms, seq) = first?.0.value();
                    Some((ms, seq))
                }
                None => None,
            };
            let delivered = (meta.undelivered > 0).then_some(StreamId::from(meta.delivered));
            let bound: (u64, u64) = super::trim_bound(cutoff, oldest.map(StreamId::from), delivered).into();
            let mut old = Vec::new();
            for item in w.entries.range(key(&ch, (0, 0))..key(&ch, bound))?.take(RETENTION_BATCH) {
                let (k, _) = item?;
                let (_, ms, seq) = k.value();
                old.push((ms, seq));
            }
            for id in &old {
                w.entries.remove(key(&ch, *id))?;
            }
            if !old.is_empty() {
                let mut meta = meta;
                meta.length = meta.length.saturating_sub(old.len() as u64);
                w.put_meta(&ch, &meta)?;
            }
            Ok(old.len() as u64)
        })
        .await
    }

    async fn snapshot(&self, channel: &str) -> Result<Snapshot, StoreError> {
        let ch = channel.to_string();
        self.read("snapshot", move |txn| {
            let Some(meta) = channel_meta(txn, &ch)? else {
                return Ok(Snapshot::empty(&ch));
            };
            let pending = txn.open_table(PENDING)?;
            let mut count = 0u64;
            let mut oldest = None;
            for item in pending.range(after(&ch, (0, 0)))? {
                let (k, _) = item?;
                if oldest.is_none() {
                    oldest = Some(k.value().1);
                }
                count += 1;
            }
            if oldest.is_none() && meta.undelivered > 0 {
                let entries = txn.open_table(ENTRIES)?;
                if let Some(first) = entries.range(after(&ch, meta.delivered))?.next() {
                    oldest = Some(first?.0.value().1);
                }
            }
            let now = now_ms();
            Ok(Snapshot {
                stats: ChannelStats {
                    channel: ch.clone(),
                    backlog: meta.undelivered,
                    pending: count,
                    oldest_ms: oldest.map(|t| now.saturating_sub(t)),
                },
                last_id: meta.last.into(),
                length: meta.length,
                dlq_length: meta.dlq_length,
            })
        })
        .await
    }

    async fn dlq_list(
        &self,
        channel: &str,
        after_id: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, StoreError> {
        let ch = channel.to_string();
        let from: (u64, u64) = after_id.unwrap_or(StreamId::ZERO).into();
        let inclusive = after_id.is_none();
        self.read("dlq list", move |txn| {
            let t = txn.open_table(DLQ)?;
            let start = if inclusive { Bound::Included(key(&ch, from)) } else { Bound::Excluded(key(&ch, from)) };
            let mut out = Vec::new();
            for item in t.range((start, Bound::Included(key(&ch, (u64::MAX, u64::MAX)))))?.take(count) {
                let (k, v) = item?;
                let (_, ms, seq) = k.value();
                out.push(dead_entry((ms, seq), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn dlq_get(&self, channel: &str, id: StreamId) -> Result<Option<DeadEntry>, StoreError> {
        let id: (u64, u64) = id.into();
        let ch = channel.to_string();
        self.read("dlq show", move |txn| match txn.open_table(DLQ)?.get(key(&ch, id))? {
            Some(g) => Ok(Some(dead_entry(id, g.value())?)),
            None => Ok(None),
        })
        .await
    }

    async fn dlq_last(&self, channel: &str) -> Result<Option<StreamId>, StoreError> {
        self.newest("dlq last", DLQ, channel, (u64::MAX, u64::MAX)).await
    }

    async fn dlq_len(&self, channel: &str) -> Result<u64, StoreError> {
        let ch = channel.to_string();
        self.read("dlq length", move |txn| Ok(channel_meta(txn, &ch)?.map(|m| m.dlq_length).unwrap_or(0))).await
    }

    async fn dlq_replay_one(&self, channel: &str, entry: &DeadEntry) -> Result<Option<StreamId>, StoreError> {
        let Some(raw) = entry.raw.clone() else { return Ok(None) };
        let ch = channel.to_string();
        let dead: (u64, u64) = entry.id.into();
        // Appended only if this call removed the dead letter: two replays
        // of one id replay it once.
        self.write("dlq replay", true, true, move |w| {
            if w.dlq.remove(key(&ch, dead))?.is_none() {
                return Ok(None);
            }
            let mut meta = w.meta(&ch)?;
            meta.dlq_length = meta.dlq_length.saturating_sub(1);
            w.put_meta(&ch, &meta)?;
            Ok(Some(w.append(&ch, &raw)?.into()))
        })
        .await
    }

    /// In transactions of `PURGE_BATCH` dead letters (ingest goes on
    /// between them).
    async fn dlq_purge(&self, channel: &str, before_ms: Option<u64>) -> Result<u64, StoreError> {
        let mut purged = 0;
        loop {
            let ch = channel.to_string();
            let n = self
                .write("dlq purge", true, false, move |w| {
                    let end = match before_ms {
                        Some(ms) => Bound::Excluded(key(&ch, (ms, 0))),
                        None => Bound::Included(key(&ch, (u64::MAX, u64::MAX))),
                    };
                    let mut ids = Vec::new();
                    for item in w.dlq.range((Bound::Included(key(&ch, (0, 0))), end))?.take(PURGE_BATCH) {
                        let (k, _) = item?;
                        let (_, ms, seq) = k.value();
                        ids.push((ms, seq));
                    }
                    for id in &ids {
                        w.dlq.remove(key(&ch, *id))?;
                    }
                    let mut meta = w.meta(&ch)?;
                    meta.dlq_length = meta.dlq_length.saturating_sub(ids.len() as u64);
                    w.put_meta(&ch, &meta)?;
                    Ok(ids.len())
                })
                .await?;
            purged += n as u64;
            if n < PURGE_BATCH {
                return Ok(purged);
            }
        }
    }

    /// The channel's last id, capped at `until_ms`.
    async fn replay_stop(&self, channel: &str, until_ms: u64) -> Result<Option<StreamId>, StoreError> {
        self.newest("replay stop point", ENTRIES, channel, (until_ms, u64::MAX)).await
    }

    /// One write transaction of at most `count` entries (ingest goes on
    /// between pages).
    async fn replay_page(
        &self,
        channel: &str,
        from: ReplayFrom,
        stop: StreamId,
        count: usize,
    ) -> Result<ReplayPage, StoreError> {
        let stop: (u64, u64) = stop.into();
        let ch = channel.to_string();
        let lower = match from {
            ReplayFrom::Since(ms) => Bound::Included((ms, 0)),
            ReplayFrom::After(id) => Bound::Excluded(id.into()),
        };
        self.write("replay", true, true, move |w| {
            let mut rows = Vec::new();
            let range = (lower.map(|id| key(&ch, id)), Bound::Included(key(&ch, stop)));
            for item in w.entries.range(range)?.take(count.clamp(1, REPLAY_PAGE)) {
                let (k, v) = item?;
                let (_, ms, seq) = k.value();
                rows.push(((ms, seq), v.value().to_vec()));
            }
            let mut appended = Vec::with_capacity(rows.len());
            for (_, b) in &rows {
                appended.push(w.append(&ch, b)?.into());
            }
            Ok(ReplayPage { appended, last: rows.last().map(|(id, _)| StreamId::from(*id)) })
        })
        .await
    }

    async fn dedupe_claim(&self, key_: &str, window: Duration) -> Result<Option<String>, StoreError> {
        let k = key_.to_string();
        let ttl = window.as_millis() as u64;
        self.write("dedupe claim", false, false, move |w| {
            let now = w.now;
            let seen = w.dedupe.get(k.as_str())?.and_then(|g| {
                let (expires, answer) = g.value();
                (expires > now).then(|| answer.to_string())
            });
            if seen.is_none() {
                w.dedupe.insert(k.as_str(), (now + ttl, DEDUPE_PENDING))?;
            }
            Ok(seen)
        })
        .await
    }

    async fn dedupe_record(&self, key_: &str, answer: &str, window: Duration) -> Result<(), StoreError> {
        let (k, answer) = (key_.to_string(), answer.to_string());
        let ttl = window.as_millis() as u64;
        self.write("dedupe record", false, false, move |w| {
            let now = w.now;
            w.dedupe.insert(k.as_str(), (now + ttl, answer.as_str()))?;
            Ok(())
        })
        .await
    }

    async fn dedupe_get(&self, key_: &str) -> Result<Option<String>, StoreError> {
        let k = key_.to_string();
        self.read("dedupe get", move |txn| {
            let now = now_ms();
            Ok(txn.open_table(DEDUPE)?.get(k.as_str())?.and_then(|g| {
                let (expires, answer) = g.value();
                (expires > now).then(|| answer.to_string())
            }))
        })
        .await
    }

    async fn dedupe_release(&self, key_: &str) -> Result<(), StoreError> {
        let k = key_.to_string();
        self.write("dedupe release", false, false, move |w| {
            w.dedupe.remove(k.as_str())?;
            Ok(())
        })
        .await
    }
}

fn dead_entry(id: (u64, u64), bytes: &[u8]) -> DbResult<DeadEntry> {
    let r: DeadRecord = rmp_serde::from_slice(bytes).map_err(corrupt)?;
    Ok(DeadEntry {
        id: id.into(),
        stream_id: r.stream_id.parse().unwrap_or_default(),
        reason: r.reason,
        attempts: r.attempts,
        status: r.status,
        failed_at_ms: r.failed_at_ms,
        raw: r.raw,
    })
}

impl BlockingRead for Reader {
    async fn read_each(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Read, StoreError> {
        let entries = self.read_entries(consumer, cursors, count).await?;
        Ok(Read { entries, unread: Vec::new() })
    }
}

impl Reader {
    async fn read_entries(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let only_new = cursors.iter().all(|(_, c)| *c == Cursor::New);
        if !only_new {
            return self.store.read_group(consumer, cursors, count).await;
        }
        // Mark what has been seen before looking, so an append committed
        // between the look and the wait still wakes us.
        self.wake.borrow_and_update();
        if !self.store.has_new(cursors)? {
            match tokio::time::timeout(self.store.block, self.wake.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The store is closing: behave like an empty BLOCK.
                    tokio::time::sleep(self.store.block).await;
                    return Ok(Vec::new());
                }
                Err(_) => return Ok(Vec::new()),
            }
            if !self.store.has_new(cursors)? {
                return Ok(Vec::new());
            }
        }
        self.store.read_group(consumer, cursors, count).await
    }
}
