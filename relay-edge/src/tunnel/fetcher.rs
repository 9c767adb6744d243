//! Reads a session's entries from the store, one [`Grant`] at a time: the
//! agent's own pending entries first (each channel's cursor walks its
//! pending list, then moves on to new entries), plus entries of vanished
//! consumers every half visibility timeout. Runs as its own task because a
//! read of new entries blocks (up to `store.block`) until something
//! arrives.
//!
//! What to read and what to hand over is decided by the pure [`Planner`]:
//! every active channel is read at once (so a read blocks only when all of
//! them are idle), as many entries per channel as the grant could take if
//! each were of the largest size, and entries the grant cannot take now
//! wait in the planner, handed over before anything is read again. Each
//! entry is read once per session, so waiting does not raise its delivery
//! count (the attempt number the agent sees).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};

use super::inflight::Grant;
pub use crate::store::Cursor;
use crate::store::{Backend, BlockingRead, Entry, Reader, Store, StreamId};

/// Pause after a failed read before the next one.
const BACKOFF: Duration = Duration::from_millis(500);

/// The longest a channel whose reads keep failing (while the session's
/// other channels are read) rests between tries: each try that Redis runs
/// late raises the delivery count of what it read.
const MAX_REST: Duration = Duration::from_secs(8);

/// What the fetcher does for a grant.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Hand over entries already read ([`Planner::serve`]).
    Serve,
    /// Read these `(channel, cursor)`s, at most `count` entries each, then
    /// [`Planner::read_done`].
    Read { cursors: Vec<(String, Cursor)>, count: usize },
}

/// The fetcher's decisions, pure: each channel's cursor, the entries read
/// but not yet handed over, and what the next read is.
#[derive(Debug)]
pub struct Planner<E> {
    cursors: HashMap<String, Cursor>,
    /// The highest id read per channel this session (see [`Planner::read_failed`]).
    highest: HashMap<String, StreamId>,
    /// Read, not yet handed over, per channel in stream order.
    waiting: HashMap<String, VecDeque<E>>,
    /// Rotates which channel goes first, for fairness.
    turn: usize,
    /// The largest entry reads are sized for (see [`Fetcher::new`]).
    max_entry: usize,
}

impl<E> Planner<E> {
    /// Sizes reads from now on as if every entry were `max_entry` bytes.
    pub fn size_reads_for(&mut self, max_entry: usize) {
        self.max_entry = max_entry.max(1);
    }

    pub fn new(channels: &[String], max_entry: usize) -> Self {
        Self {
            cursors: channels.iter().map(|c| (c.clone(), Cursor::Pending(StreamId::ZERO))).collect(),
            highest: HashMap::new(),
            waiting: HashMap::new(),
            turn: 0,
            max_entry: max_entry.max(1),
        }
    }

    pub fn cursor(&self, channel: &str) -> Option<&Cursor> {
        self.cursors.get(channel)
    }

    /// Whether `pred` holds for an entry waiting on `channel`.
    pub fn is_waiting(&self, channel: &str, pred: impl Fn(&E) -> bool) -> bool {
        self.waiting.get(channel).is_some_and(|q| q.iter().any(pred))
    }

    /// Entries waiting, all channels.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// Serve what waits on the grant's channels, else read them all: as
    /// many per channel as the grant could take of the largest entries.
    pub fn step(&self, grant: &Grant) -> Step {
        if grant.channels.iter().any(|c| self.waiting.get(c).is_some_and(|q| !q.is_empty())) {
            return Step::Serve;
        }
        let allowed = grant.slots.min((grant.bytes / self.max_entry).max(1));
        let count = allowed.div_ceil(grant.channels.len().max(1));
        let cursors =
            grant.channels.iter().map(|c| (c.clone(), self.cursors.get(c).copied().unwrap_or(Cursor::New))).collect();
        Step::Read { cursors, count }
    }

    /// A read came back, `per_channel` in stream order: moves the cursors
    /// (a pending list is walked until a read of it is empty), then hands
    /// over what the grant takes; the rest waits.
    pub fn read_done(
        &mut self,
        grant: &Grant,
        per_channel: Vec<(String, Vec<E>)>,
        id: impl Fn(&E) -> StreamId,
        cost: impl Fn(&E) -> usize,
    ) -> Vec<(String, E)> {
        for (ch, read) in per_channel {
            if let Some(last) = read.iter().map(&id).max() {
                self.saw(&ch, last);
            }
            if let Some(cursor) = self.cursors.get_mut(&ch)
                && let Cursor::Pending(_) = cursor
            {
                *cursor = match read.last() {
                    Some(last) => Cursor::Pending(id(last)),
                    None => Cursor::New,
                };
            }
            self.waiting.entry(ch).or_default().extend(read);
        }
        self.serve(grant, cost)
    }

    /// A read of `channels` failed (or its answer was lost): it may still
    /// have run in the store. A read of new entries that ran took them onto
    /// this consumer's pending list, above every id this session has read,
    /// so those channels walk their pending list again from the highest id
    /// read (only such lost entries lie beyond it). A pending cursor stays.
    pub fn read_failed<'a>(&mut self, channels: impl IntoIterator<Item = &'a String>) {
        for ch in channels {
            if let Some(cursor) = self.cursors.get_mut(ch)
                && *cursor == Cursor::New
            {
                *cursor = Cursor::Pending(self.highest.get(ch).copied().unwrap_or(StreamId::ZERO));
            }
        }
    }

    /// `id` of `channel` reached this session (a read, a reclaim): a walk
    /// after a lost read need not read it again.
    pub fn saw(&mut self, channel: &str, id: StreamId) {
        if let Some(highest) = self.highest.get_mut(channel) {
            *highest = (*highest).max(id);
        } else if self.cursors.contains_key(channel) {
            self.highest.insert(channel.to_string(), id);
        }
    }

    /// A reclaim of `channel` failed, and may have run: the entries it took
    /// are pending on this consumer, at any id. Walk the whole pending list.
    pub fn rewalk(&mut self, channel: &str) {
        if let Some(cursor) = self.cursors.get_mut(channel) {
            *cursor = Cursor::Pending(StreamId::ZERO);
        }
    }

    /// Hands over waiting entries of the grant's channels: round-robin, at
    /// most `grant.slots`, their costs within `grant.bytes`; a channel whose
    /// next entry does not fit gives nothing more this time. The first
    /// entry always fits (a grant holds a whole largest entry).
    pub fn serve(&mut self, grant: &Grant, cost: impl Fn(&E) -> usize) -> Vec<(String, E)> {
        let n = grant.channels.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.turn % n;
        self.turn = self.turn.wrapping_add(1);
        let order: Vec<&String> = grant.channels.iter().cycle().skip(start).take(n).collect();
        let mut open = vec![true; n];
        let (mut slots, mut bytes) = (grant.slots, grant.bytes);
        let mut out = Vec::new();
        while slots > 0 && open.iter().any(|o| *o) {
            for (i, ch) in order.iter().enumerate() {
                if slots == 0 || !open[i] {
                    continue;
                }
                let Some(queue) = self.waiting.get_mut(*ch) else {
                    open[i] = false;
                    continue;
                };
                match queue.front().map(&cost) {
                    Some(c) if c <= bytes => {
                        bytes -= c;
                        slots -= 1;
                        if let Some(e) = queue.pop_front() {
                            out.push(((*ch).clone(), e));
                        }
                    }
                    _ => open[i] = false,
                }
            }
        }
        self.waiting.retain(|_, q| !q.is_empty());
        out
    }
}

pub struct Fetcher {
    store: Store,
    reader: Reader,
    /// Consumer name: the agent's identity.
    consumer: String,
    planner: Planner<Entry>,
    reclaim_after: Duration,
    next_reclaim: Instant,
    /// The largest entry a session delivers (`tunnel.max_frame`).
    max_entry: usize,
    /// The largest entry reads are sized for, edge-wide, grow-only.
    largest: Arc<AtomicUsize>,
    /// Channels whose last read failed while others were read: not read
    /// again until the instant, and the rest that led to it (doubling).
    resting: HashMap<String, (Instant, Duration)>,
    /// The pause after the last whole read that failed, while they fail
    /// in a row ([`next_rest`]).
    pause: Option<Duration>,
}

impl Fetcher {
    /// `max_entry`: the largest entry a session delivers (`tunnel.max_frame`);
    /// `largest`: the largest entry reads are sized for, shared by the
    /// edge's sessions: at first what this edge's ingest stores, raised by
    /// any larger entry a read returns (one stored by an edge with larger
    /// limits), never above `max_entry`.
    pub fn new(
        store: Store,
        reader: Reader,
        consumer: String,
        channels: &[String],
        reclaim_after: Duration,
        (max_entry, largest): (usize, Arc<AtomicUsize>),
    ) -> Self {
        let max_entry = max_entry.max(1);
        let planner = Planner::new(channels, largest.load(Ordering::Relaxed).clamp(1, max_entry));
        let next_reclaim = Instant::now();
        Self {
            store,
            reader,
            consumer,
            planner,
            reclaim_after,
            next_reclaim,
            max_entry,
            largest,
            resting: HashMap::new(),
            pause: None,
        }
    }

    /// Answers one grant with one batch (possibly empty), and hands
    /// itself back with it: the session runs each read on a task of its
    /// own, stopped at a kick and aborted when the session ends.
    pub async fn read(mut self: Box<Self>, grant: Grant) -> (Box<Self>, Vec<Entry>) {
        let batch = self.fetch(grant).await;
        (self, batch)
    }

    /// One batch within the grant: at most `grant.slots` entries weighing
    /// at most `grant.bytes`.
    async fn fetch(&mut self, mut grant: Grant) -> Vec<Entry> {
        let max = self.max_entry;
        let cost = move |e: &Entry| cost(e, max);
        self.planner.size_reads_for(self.largest.load(Ordering::Relaxed).min(max));
        let Step::Read { mut cursors, count } = self.planner.step(&grant) else {
            return self.planner.serve(&grant, cost).into_iter().map(|(_, f)| f).collect();
        };
        let now = Instant::now();
        let rests_until = |ch: &str| self.resting.get(ch).map(|(until, _)| *until).filter(|until| *until > now);
        // When the first of the grant's resting channels wakes.
        let wake = grant.channels.iter().filter_map(|ch| rests_until(ch)).min();
        if wake.is_some() {
            cursors.retain(|(ch, _)| rests_until(ch).is_none());
            grant.channels.retain(|ch| rests_until(ch).is_none());
        }
        if cursors.is_empty() {
            // Every channel of the grant rests: wait for the first to wake.
            if let Some(until) = wake {
                tokio::time::sleep_until(until.into()).await;
            }
            return Vec::new();
        }
        let mut batch = Vec::new();
        let mut failed = false;
        if Instant::now() >= self.next_reclaim {
            self.next_reclaim = Instant::now() + (self.reclaim_after / 2).max(Duration::from_millis(200));
            // Boxed, as the store's other rare steps here: the task's
            // future is as large as its largest state, and an idle
            // session's fetcher waits in a small one.
            failed = Box::pin(self.reclaim(&mut grant, &mut batch)).await;
        }
        if !failed && grant.slots > 0 {
            let read = self.reader.read_each(&self.consumer, &cursors, count);
            // A resting channel is read again when it wakes, not after a
            // whole `store.block`: the wait ends then (a read cut short
            // counts as lost, [`Planner::read_failed`]).
            let read = match wake {
                Some(until) => tokio::time::timeout_at(until.into(), read).await.ok(),
                None => Some(read.await),
            };
            match read {
                None => self.planner.read_failed(cursors.iter().map(|(ch, _)| ch)),
                Some(Ok(read)) => {
                    self.pause = None;
                    self.rest(&cursors, &read.unread);
                    let mut by_channel: HashMap<String, Vec<Entry>> = HashMap::new();
                    if let Some(n) =
                        read.entries.iter().filter_map(|e| e.webhook.as_ref().ok()).map(|w| w.bytes.len()).max()
                    {
                        self.largest.fetch_max(n, Ordering::Relaxed);
                    }
                    for entry in read.entries {
                        by_channel.entry(entry.channel.clone()).or_default().push(entry);
                    }
                    let mut per_channel = Vec::with_capacity(cursors.len());
                    // A channel that could not be read keeps its cursor.
                    for (ch, _) in cursors.iter().filter(|(ch, _)| !read.unread.contains(ch)) {
                        let mut entries = by_channel.remove(ch).unwrap_or_default();
                        entries.truncate(count);
                        per_channel.push((ch.clone(), entries));
                    }
                    let taken = self.planner.read_done(&grant, per_channel, |e| e.id, cost);
                    batch.extend(taken.into_iter().map(|(_, f)| f));
                }
                Some(Err(e)) => {
                    tracing::warn!(agent = %self.consumer, error = %e, "store read failed");
                    self.planner.read_failed(cursors.iter().map(|(ch, _)| ch));
                    failed = true;
                }
            }
        }
        if failed {
            let pause = next_rest(self.pause);
            self.pause = Some(pause);
            tokio::time::sleep(pause).await;
            if let Ok(r) = Box::pin(self.store.reader()).await {
                self.reader = r;
            }
        }
        batch
    }

    /// After a read of `cursors`: the `unread` ones rest (and walk their
    /// pending list again, [`Planner::read_failed`]), the others wake.
    fn rest(&mut self, cursors: &[(String, Cursor)], unread: &[String]) {
        self.planner.read_failed(unread);
        for (ch, _) in cursors {
            if unread.contains(ch) {
                let rest = next_rest(self.resting.get(ch).map(|(_, rest)| *rest));
                self.resting.insert(ch.clone(), (Instant::now() + rest, rest));
            } else {
                self.resting.remove(ch);
            }
        }
    }

    /// Takes over entries of vanished consumers, as many as the grant takes
    /// even if each is of the largest size, and shrinks the grant by them.
    /// `true` when the store failed.
    async fn reclaim(&mut self, grant: &mut Grant, batch: &mut Vec<Entry>) -> bool {
        for ch in grant.channels.clone() {
            let room = grant.slots.min(grant.bytes / self.max_entry);
            if room == 0 {
                break;
            }
            match self.store.autoclaim(&ch, &self.consumer, self.reclaim_after, room).await {
                Ok(entries) if !entries.is_empty() => {
                    tracing::info!(agent = %self.consumer, channel = %ch, count = entries.len(), "reclaimed stale pending entries");
                    let entries: Vec<Entry> = entries.into_iter().take(room).collect();
                    for e in &entries {
                        self.planner.saw(&ch, e.id);
                    }
                    grant.slots -= entries.len();
                    grant.bytes -= entries.iter().map(|e| cost(e, self.max_entry)).sum::<usize>().min(grant.bytes);
                    batch.extend(entries);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(agent = %self.consumer, channel = %ch, error = %e, "reclaim failed");
                    self.planner.rewalk(&ch);
                    return true;
                }
            }
        }
        false
    }
}

/// The pause after a failed read, given the one before it (`None`: the
/// last read went well): doubling from [`BACKOFF`] to [`MAX_REST`], since
/// each read Redis runs late raises the delivery counts of what it read.
fn next_rest(last: Option<Duration>) -> Duration {
    last.map_or(BACKOFF, |d| (d * 2).min(MAX_REST))
}

/// Room a `Deliver` needs around the stored webhook: its other fields
/// (channel names and stream ids are short) and MessagePack framing.
const DELIVER_OVERHEAD: usize = 1024;

/// Whether a stored webhook of `len` bytes fits a `Deliver` of at most
/// `max_frame` bytes; the session dead-letters those that do not.
pub fn deliverable(len: usize, max_frame: usize) -> bool {
    len + DELIVER_OVERHEAD <= max_frame
}

/// Bytes an entry counts against the session's budget: its stored size,
/// or nothing when the session settles it at once (unreadable, or too
/// large for a `Deliver`).
fn cost(e: &Entry, max_entry: usize) -> usize {
    match &e.webhook {
        Ok(w) if deliverable(w.bytes.len(), max_entry) => w.bytes.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(slots: usize, bytes: usize, channels: &[&str]) -> Grant {
        Grant { slots, bytes, channels: channels.iter().map(|c| c.to_string()).collect() }
    }

    /// Entries as `(id, cost)`, ids as `N-0`.
    fn read(
        p: &mut Planner<(&'static str, usize)>,
        g: &Grant,
        per: Vec<(&str, Vec<(&'static str, usize)>)>,
    ) -> Vec<&'static str> {
        let per = per.into_iter().map(|(c, e)| (c.to_string(), e)).collect();
        p.read_done(g, per, |e| id(e.0), |e| e.1).into_iter().map(|(_, e)| e.0).collect()
    }

    fn id(s: &str) -> StreamId {
        s.parse().expect("test id")
    }

    #[test]
    fn every_channel_is_read_at_once_and_leftovers_wait() {
        let mut p = Planner::new(&["a".into(), "b".into()], 100);
        let g = grant(1, 1_000, &["a", "b"]);
        assert_eq!(
            p.step(&g),
            Step::Read {
                cursors: vec![
                    ("a".into(), Cursor::Pending(StreamId::ZERO)),
                    ("b".into(), Cursor::Pending(StreamId::ZERO))
                ],
                count: 1
            }
        );
        assert_eq!(read(&mut p, &g, vec![("a", vec![("1-0", 10)]), ("b", vec![])]), ["1-0"]);
        assert_eq!(p.cursor("b"), Some(&Cursor::New), "b's pending list is done");
        assert_eq!(p.cursor("a"), Some(&Cursor::Pending(id("1-0"))));
        let g = grant(1, 1_000, &["a", "b"]);
        let taken = read(&mut p, &g, vec![("a", vec![("2-0", 10)]), ("b", vec![("5-0", 10)])]);
        assert_eq!(taken.len(), 1);
        assert_eq!(p.waiting(), 1);
        assert_eq!(p.step(&g), Step::Serve, "what waits goes first, without a read");
        assert_eq!(p.serve(&g, |e| e.1).len(), 1);
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn reads_are_sized_for_the_largest_entries_and_serving_for_real_ones() {
        let mut p = Planner::new(&["a".into()], 100);
        let g = grant(50, 1_000, &["a"]);
        assert!(matches!(p.step(&g), Step::Read { count: 10, .. }), "1000 bytes hold ten largest entries");
        p.size_reads_for(250);
        assert!(matches!(p.step(&g), Step::Read { count: 4, .. }), "sized for a larger entry seen: four");
        p.size_reads_for(100);
        let small: Vec<(&'static str, usize)> = vec![("1-0", 300), ("2-0", 300), ("3-0", 300), ("4-0", 300)];
        assert_eq!(read(&mut p, &g, vec![("a", small)]), ["1-0", "2-0", "3-0"], "the fourth is past the bytes");
        assert_eq!(p.waiting(), 1);
    }
}
