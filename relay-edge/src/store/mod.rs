//! Durable store of webhooks, behind one trait ([`Backend`]) with two
//! implementations:
//!
//! - [`RedisStore`]: Redis Streams, the production backend and the one that
//!   lets several edges share a queue;
//! - [`EmbeddedStore`]: a crash-safe `redb` file on local disk, for a trial
//!   or a single small VPS with no Redis server.
//!
//! Both keep the same model: one append-only stream per channel with ids
//! `<ms>-<seq>`, one consumer group per stream whose consumers are agent
//! identities, a pending list with delivery counts (the attempt number),
//! reclaim after a visibility timeout, a dead-letter queue per channel, and
//! retention by age that never cuts an unacknowledged entry. Which backend
//! runs is decided by the configuration: `store.redis_url` (or
//! `store.sentinel_master`) set → Redis, unset → embedded at `store.path`.

pub mod embedded;
mod id;
pub mod keys;
pub mod redis_store;

use std::future::Future;
use std::time::Duration;

use relay_protocol::{ChannelStats, Webhook};

use crate::config::StoreConfig;
use crate::error::StoreError;

pub use embedded::EmbeddedStore;
pub use id::{BadStreamId, StreamId};
pub use redis_store::RedisStore;

/// One stream entry handed to a session.
#[derive(Debug, Clone)]
pub struct Entry {
    pub channel: String,
    pub id: StreamId,
    /// Its delivery count after this read: the attempt number the agent
    /// sees (1 for an entry read for the first time).
    pub attempt: u32,
    /// The webhook, or why it could not be read.
    pub webhook: Result<Stored, Unreadable>,
}

impl Entry {
    /// An entry as a backend read it: `None` when it was deleted while
    /// pending, else its bytes, checked here to decode.
    pub fn read(channel: &str, id: StreamId, attempt: u32, bytes: Option<Vec<u8>>) -> Self {
        let webhook = match bytes {
            None => Err(Unreadable::DeletedWhilePending),
            Some(bytes) => Stored::check(bytes),
        };
        Self { channel: channel.to_string(), id, attempt, webhook }
    }
}

/// Why an entry has no webhook to deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// Trimmed (or deleted) from the stream while it was pending.
    #[error("entry was deleted from the stream while pending")]
    DeletedWhilePending,
    /// Its bytes are not a stored webhook (the text says why).
    #[error("{0}")]
    Corrupt(String),
    /// Too large for a `Deliver` frame (the text says how large).
    #[error("{0}")]
    TooLarge(String),
}

/// A stored webhook as its encoded bytes, checked to decode: sessions
/// forward these bytes to the agent without decoding and encoding again.
#[derive(Debug, Clone)]
pub struct Stored {
    pub bytes: Vec<u8>,
    /// When the edge received it (read from the bytes).
    pub received_at_ms: u64,
}

impl Stored {
    /// Checks `bytes` ([`relay_protocol::check_webhook`]).
    pub fn check(bytes: Vec<u8>) -> Result<Self, Unreadable> {
        match relay_protocol::check_webhook(&bytes) {
            Ok(received_at_ms) => Ok(Self { bytes, received_at_ms }),
            Err(e) => Err(Unreadable::Corrupt(format!("undecodable webhook: {e}"))),
        }
    }

    /// The webhook itself (for tests and tools; sessions forward the bytes).
    pub fn decode(&self) -> Result<Webhook, Unreadable> {
        relay_protocol::decode_webhook(&self.bytes)
            .map_err(|e| Unreadable::Corrupt(format!("undecodable webhook: {e}")))
    }
}

/// Where a session's read of one channel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// The consumer's own pending entries after this id
    /// ([`StreamId::ZERO`]: from the start).
    Pending(StreamId),
    /// Entries never delivered to anyone (they join the consumer's
    /// pending list).
    New,
}

/// What [`Backend::snapshot`] reports about a channel.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stats: ChannelStats,
    /// The stream's last generated id.
    pub last_id: StreamId,
    /// Entries retained in the stream (acknowledged ones included).
    pub length: u64,
    pub dlq_length: u64,
}

impl Snapshot {
    pub fn empty(channel: &str) -> Self {
        let stats = ChannelStats { channel: channel.into(), backlog: 0, pending: 0, oldest_ms: None };
        Self { stats, last_id: StreamId::ZERO, length: 0, dlq_length: 0 }
    }

    /// Unacknowledged entries: undelivered + pending.
    pub fn unacked(&self) -> u64 {
        self.stats.backlog + self.stats.pending
    }
}

/// What [`Backend::dead_letter`] records. The backend copies the entry's
/// webhook bytes itself, in the same atomic step.
pub struct DeadLetter<'a> {
    pub channel: &'a str,
    pub id: StreamId,
    pub reason: &'a str,
    pub status: Option<u16>,
    pub attempts: u32,
}

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    /// Id in the DLQ.
    pub id: StreamId,
    /// Id the webhook had in the channel stream.
    pub stream_id: StreamId,
    pub reason: String,
    pub attempts: u32,
    pub status: Option<u16>,
    pub failed_at_ms: u64,
    /// The stored webhook bytes, verbatim (`None`: the entry was gone).
    pub raw: Option<Vec<u8>>,
}

impl DeadEntry {
    pub fn webhook(&self) -> Option<Webhook> {
        relay_protocol::decode_webhook(self.raw.as_deref()?).ok()
    }
}

/// Where a page of a history replay starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReplayFrom {
    /// The first entry received at or after this time.
    Since(u64),
    /// The entry after this id.
    After(StreamId),
}

/// What one page of a history replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayPage {
    /// Ids of the new entries.
    pub appended: Vec<StreamId>,
    /// The last history entry read, `None` when the range was exhausted.
    pub last: Option<StreamId>,
}

/// Value of a de-duplication key while its first request is being stored.
pub const DEDUPE_PENDING: &str = "pending";

/// The operations the edge needs from a durable store. Every method that
/// changes state returns only once the change is stored as durably as the
/// backend promises (Redis: its AOF policy; embedded: `append` and every
/// DLQ change are fsynced before they return).
pub trait Backend: Send + Sync {
    /// A session's handle for blocking reads.
    type Reader: BlockingRead;

    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Appends one webhook to each channel's stream; returns the entry ids
    /// in channel order.
    fn append(
        &self,
        channels: &[String],
        webhook: &Webhook,
    ) -> impl Future<Output = Result<Vec<StreamId>, StoreError>> + Send;

    /// Creates a channel's stream and consumer group (from the beginning,
    /// so entries stored before any agent connected are delivered).
    fn ensure_group(&self, channel: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn reader(&self) -> impl Future<Output = Result<Self::Reader, StoreError>> + Send;

    /// Acknowledges delivered entries; returns how many were pending.
    fn ack(&self, channel: &str, ids: &[StreamId]) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Claims one pending entry for `consumer` (its delivery count goes up);
    /// `None` when it is no longer pending.
    fn claim(
        &self,
        channel: &str,
        consumer: &str,
        id: StreamId,
    ) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;

    /// Takes over entries idle longer than `min_idle` in any consumer's
    /// pending list, with their delivery counts. Entries deleted while
    /// pending come back unreadable (and leave the pending list).
    fn autoclaim(
        &self,
        channel: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send;

    /// The stored webhook bytes of one entry (for tools and tests).
    fn raw_entry(
        &self,
        channel: &str,
        id: StreamId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Moves an entry (its bytes, if the stream still holds it) to the
    /// channel's DLQ and acknowledges it, atomically.
    fn dead_letter(&self, letter: &DeadLetter<'_>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Moves entries older than `retention` that were never acknowledged to
    /// the DLQ (reason `expired`), so trimming never makes them vanish.
    fn expire(&self, channel: &str, retention: Duration) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Removes acknowledged entries older than `retention`; never one that
    /// is pending or not yet delivered. Returns entries removed.
    fn trim(&self, channel: &str, retention: Duration) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Depth, pending count, oldest waiting age, last id and lengths.
    fn snapshot(&self, channel: &str) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// Dead letters of a channel, oldest first, starting after `after`.
    fn dlq_list(
        &self,
        channel: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> impl Future<Output = Result<Vec<DeadEntry>, StoreError>> + Send;

    fn dlq_get(
        &self,
        channel: &str,
        id: StreamId,
    ) -> impl Future<Output = Result<Option<DeadEntry>, StoreError>> + Send;

    fn dlq_len(&self, channel: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Id of the newest dead letter of a channel (where a replay of all
    /// stops: dead letters that fail again meanwhile get later ids).
    fn dlq_last(&self, channel: &str) -> impl Future<Output = Result<Option<StreamId>, StoreError>> + Send;

    /// Moves one dead letter back into the channel stream as a new entry
    /// (same webhook bytes, so the same webhook id). Returns the new id, or
    /// `None` when it holds no webhook.
    fn dlq_replay_one(
        &self,
        channel: &str,
        entry: &DeadEntry,
    ) -> impl Future<Output = Result<Option<StreamId>, StoreError>> + Send;

    /// Deletes dead letters older than `before_ms`, or all of them.
    fn dlq_purge(&self, channel: &str, before_ms: Option<u64>) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Where a replay of history up to `until_ms` stops: the id of the
    /// newest entry received by then that exists now (`None`: nothing to
    /// replay). Captured before the first page, so a replay never reads
    /// its own copies.
    fn replay_stop(
        &self,
        channel: &str,
        until_ms: u64,
    ) -> impl Future<Output = Result<Option<StreamId>, StoreError>> + Send;

    /// Re-appends, as new entries in order, up to `count` webhooks of the
    /// retained history from `from` up to `stop` (inclusive), in one
    /// bounded step. Returns the new entries' ids and the last id read
    /// (the next page starts after it; `None`: nothing was left).
    fn replay_page(
        &self,
        channel: &str,
        from: ReplayFrom,
        stop: StreamId,
        count: usize,
    ) -> impl Future<Output = Result<ReplayPage, StoreError>> + Send;

    /// Claims a de-duplication key for `window`: `None` when this request
    /// is the first (the key now holds [`DEDUPE_PENDING`]), else the value
    /// already there.
    fn dedupe_claim(
        &self,
        key: &str,
        window: Duration,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Records the first request's answer under its de-duplication key.
    fn dedupe_record(
        &self,
        key: &str,
        answer: &str,
        window: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn dedupe_get(&self, key: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Gives a claim back (the write it guarded failed).
    fn dedupe_release(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What one read found, and the channels it could not read: on a Redis
/// Cluster one slot's node can fail while the others answer. The entries
/// found are pending on the consumer already, so they are returned; the
/// unread channels' cursors must stay where they were.
#[derive(Debug, Default)]
pub struct Read {
    pub entries: Vec<Entry>,
    pub unread: Vec<String>,
}

/// A session's reads: per channel a [`Cursor`]. Each entry comes with its
/// delivery count. Blocks (up to the configured `store.block`) only when
/// every cursor is [`Cursor::New`] and nothing is there.
pub trait BlockingRead: Send {
    /// The read; an error when nothing was read (no entry, some channel failed).
    fn read_each(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> impl Future<Output = Result<Read, StoreError>> + Send;

    /// The entries [`read_each`](Self::read_each) found, for callers that
    /// keep no cursors.
    fn read(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send {
        async move { Ok(self.read_each(consumer, cursors, count).await?.entries) }
    }
}

/// The configured backend; cheap to clone.
#[derive(Clone)]
pub enum Store {
    Redis(RedisStore),
    Embedded(EmbeddedStore),
}

/// A session's reader on the configured backend.
pub enum Reader {
    Redis(redis_store::Reader),
    Embedded(embedded::Reader),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Redis($s) => $call,
            Store::Embedded($s) => $call,
        }
    };
}

impl Store {
    /// Redis when `store.redis_url` is set, else the embedded file at
    /// `store.path`. Redis connects lazily (the edge starts and answers 503
    /// while it is down); the embedded file is opened (and created) now.
    pub fn open(cfg: &StoreConfig, errors: prometheus_client::metrics::counter::Counter) -> Result<Self, StoreError> {
        if cfg.uses_redis() {
            Ok(Self::Redis(RedisStore::open(cfg, errors)?))
        } else {
            Ok(Self::Embedded(EmbeddedStore::open(&cfg.path, cfg, errors)?))
        }
    }
}

impl Backend for Store {
    type Reader = Reader;

    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    async fn append(&self, channels: &[String], webhook: &Webhook) -> Result<Vec<StreamId>, StoreError> {
        dispatch!(self, s => s.append(channels, webhook).await)
    }

    async fn ensure_group(&self, channel: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.ensure_group(channel).await)
    }

    async fn reader(&self) -> Result<Reader, StoreError> {
        match self {
            Self::Redis(s) => s.reader().await.map(Reader::Redis),
            Self::Embedded(s) => s.reader().await.map(Reader::Embedded),
        }
    }

    async fn ack(&self, channel: &str, ids: &[StreamId]) -> Result<usize, StoreError> {
        dispatch!(self, s => s.ack(channel, ids).await)
    }

    async fn claim(&self, channel: &str, consumer: &str, id: StreamId) -> Result<Option<Entry>, StoreError> {
        dispatch!(self, s => s.claim(channel, consumer, id).await)
    }

    async fn autoclaim(
        &self,
        channel: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        dispatch!(self, s => s.autoclaim(channel, consumer, min_idle, count).await)
    }

    async fn raw_entry(&self, channel: &str, id: StreamId) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.raw_entry(channel, id).await)
    }

    async fn dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        dispatch!(self, s => s.dead_letter(letter).await)
    }

    async fn expire(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        dispatch!(self, s => s.expire(channel, retention).await)
    }

    async fn trim(&self, channel: &str, retention: Duration) -> Result<u64, StoreError> {
        dispatch!(self, s => s.trim(channel, retention).await)
    }

    async fn snapshot(&self, channel: &str) -> Result<Snapshot, StoreError> {
        dispatch!(self, s => s.snapshot(channel).await)
    }

    async fn dlq_list(
        &self,
        channel: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, StoreError> {
        dispatch!(self, s => s.dlq_list(channel, after, count).await)
    }

    async fn dlq_get(&self, channel: &str, id: StreamId) -> Result<Option<DeadEntry>, StoreError> {
        dispatch!(self, s => s.dlq_get(channel, id).await)
    }

    async fn dlq_len(&self, channel: &str) -> Result<u64, StoreError> {
        dispatch!(self, s => s.dlq_len(channel).await)
    }

    async fn dlq_last(&self, channel: &str) -> Result<Option<StreamId>, StoreError> {
        dispatch!(self, s => s.dlq_last(channel).await)
    }

    async fn dlq_replay_one(&self, channel: &str, entry: &DeadEntry) -> Result<Option<StreamId>, StoreError> {
        dispatch!(self, s => s.dlq_replay_one(channel, entry).await)
    }

    async fn dlq_purge(&self, channel: &str, before_ms: Option<u64>) -> Result<u64, StoreError> {
        dispatch!(self, s => s.dlq_purge(channel, before_ms).await)
    }

    async fn replay_stop(&self, channel: &str, until_ms: u64) -> Result<Option<StreamId>, StoreError> {
        dispatch!(self, s => s.replay_stop(channel, until_ms).await)
    }

    async fn replay_page(
        &self,
        channel: &str,
        from: ReplayFrom,
        stop: StreamId,
        count: usize,
    ) -> Result<ReplayPage, StoreError> {
        dispatch!(self, s => s.replay_page(channel, from, stop, count).await)
    }

    async fn dedupe_claim(&self, key: &str, window: Duration) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.dedupe_claim(key, window).await)
    }

    async fn dedupe_record(&self, key: &str, answer: &str, window: Duration) -> Result<(), StoreError> {
        dispatch!(self, s => s.dedupe_record(key, answer, window).await)
    }

    async fn dedupe_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.dedupe_get(key).await)
    }

    async fn dedupe_release(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.dedupe_release(key).await)
    }
}

impl BlockingRead for Reader {
    async fn read_each(
        &mut self,
        consumer: &str,
        cursors: &[(String, Cursor)],
        count: usize,
    ) -> Result<Read, StoreError> {
        match self {
            Self::Redis(r) => r.read_each(consumer, cursors, count).await,
            Self::Embedded(r) => r.read_each(consumer, cursors, count).await,
        }
    }
}

/// The stored form of a webhook ([`relay_protocol::encode_webhook`]).
pub fn encode(webhook: &Webhook) -> Result<Vec<u8>, StoreError> {
    relay_protocol::encode_webhook(webhook)
        .map_err(|e| StoreError::Corrupt { id: webhook.id.clone(), why: e.to_string() })
}

pub use relay_protocol::now_ms;

/// `ms` since the epoch as RFC 3339 with milliseconds, UTC
/// (`2026-12-01T10:00:00.000Z`): how answers and the CLI show times.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The lowest id retention keeps (everything below it may be trimmed):
/// entries older than `cutoff_ms`, but never the oldest pending entry nor
/// anything after `delivered` — the group's last delivered id, given when
/// entries wait undelivered ([`StreamId::ZERO`] when nothing was ever
/// delivered).
pub fn trim_bound(cutoff_ms: u64, oldest_pending: Option<StreamId>, delivered: Option<StreamId>) -> StreamId {
    let mut bound = StreamId::new(cutoff_ms, 0);
    if let Some(p) = oldest_pending {
        bound = bound.min(p);
    }
    if let Some(d) = delivered {
        bound = bound.min(StreamId::new(d.ms, d.seq.saturating_add(1)));
    }
    bound
}

#[cfg(test)]
mod tests {
    use super::{StreamId, trim_bound};

    #[test]
    fn the_trim_bound_keeps_pending_and_undelivered_entries() {
        let id = StreamId::new;
        assert_eq!(trim_bound(1000, None, None), id(1000, 0), "only age");
        assert_eq!(trim_bound(1000, Some(id(500, 3)), None), id(500, 3), "the oldest pending entry stays");
        assert_eq!(trim_bound(1000, None, Some(id(700, 2))), id(700, 3), "delivered up to 700-2, the rest stays");
        assert_eq!(trim_bound(1000, Some(id(600, 0)), Some(id(700, 2))), id(600, 0));
        assert_eq!(trim_bound(100, Some(id(600, 0)), Some(id(700, 2))), id(100, 0), "young entries stay");
        assert_eq!(trim_bound(1000, None, Some(StreamId::ZERO)), id(0, 1), "nothing delivered yet");
    }
}
