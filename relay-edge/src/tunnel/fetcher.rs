//! Reads a session's entries from the store, one [`Grant`] at a time: the
//! agent's own pending entries first (each channel's cursor walks its
//! pending list, then moves on to new entries), plus entries of vanished
//! consumers every half visibility timeout. Never returns more entries than
//! the grant's slots. Runs as its own task because a read of new entries
//! blocks (up to `store.block`) until something arrives.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::inflight::Grant;
use crate::store::{Backend, BlockingRead, Entry, Reader, Store};

/// Where a channel's reads stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// Re-reading this consumer's pending list after this id (`0` first).
    Pending(String),
    /// Reading entries never delivered to anyone.
    New,
}

impl Cursor {
    fn as_arg(&self) -> &str {
        match self {
            Cursor::Pending(after) => after,
            Cursor::New => ">",
        }
    }
}

/// An entry read for delivery, with its attempt number.
pub struct Fetched {
    pub entry: Entry,
    pub attempt: u32,
}

/// Pause after a failed read before the next one.
const BACKOFF: Duration = Duration::from_millis(500);

pub struct Fetcher {
    store: Store,
    reader: Reader,
    /// Consumer name: the agent's identity.
    consumer: String,
    cursors: HashMap<String, Cursor>,
    /// Rotates which channel is read first when a grant has fewer slots
    /// than there are channels.
    turn: usize,
    reclaim_after: Duration,
    next_reclaim: Instant,
    /// The largest entry a session delivers (`tunnel.max_frame`).
    max_entry: usize,
}

impl Fetcher {
    pub fn new(
        store: Store,
        reader: Reader,
        consumer: String,
        channels: &[String],
        reclaim_after: Duration,
        max_entry: usize,
    ) -> Self {
        let cursors = channels.iter().map(|c| (c.clone(), Cursor::Pending("0".into()))).collect();
        let max_entry = max_entry.max(1);
        Self { store, reader, consumer, cursors, turn: 0, reclaim_after, next_reclaim: Instant::now(), max_entry }
    }

    /// Answers every grant with one batch (possibly empty) until the
    /// session goes away.
    pub async fn run(
        mut self,
        mut grants: mpsc::Receiver<Grant>,
        batches: mpsc::Sender<Vec<Fetched>>,
        cancel: CancellationToken,
    ) {
        loop {
            let grant = tokio::select! {
                _ = cancel.cancelled() => return,
                g = grants.recv() => match g { Some(g) => g, None => return },
            };
            let batch = tokio::select! {
                _ = cancel.cancelled() => return,
                b = self.fetch(&grant) => b,
            };
            if batches.send(batch).await.is_err() {
                return;
            }
        }
    }

    /// One batch within the grant: at most `grant.slots` entries weighing
    /// at most `grant.bytes`.
    async fn fetch(&mut self, grant: &Grant) -> Vec<Fetched> {
        let mut batch = Vec::new();
        let mut bytes = grant.bytes;
        let mut failed = false;
        if Instant::now() >= self.next_reclaim {
            self.next_reclaim = Instant::now() + (self.reclaim_after / 2).max(Duration::from_millis(200));
            for ch in &grant.channels {
                // Reclaimed entries are taken as a whole: as many as fit
                // even if each is of the largest size.
                let room = (grant.slots - batch.len()).min(bytes / self.max_entry);
                if room == 0 {
                    break;
                }
                match self.store.autoclaim(ch, &self.consumer, self.reclaim_after, room).await {
                    Ok(entries) if !entries.is_empty() => {
                        tracing::info!(agent = %self.consumer, channel = %ch, count = entries.len(), "reclaimed stale pending entries");
                        let entries: Vec<Entry> = entries.into_iter().take(room).collect();
                        bytes -= entries.iter().map(|e| self.cost(e)).sum::<usize>().min(bytes);
                        self.with_counts(ch, entries, &mut batch).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(agent = %self.consumer, channel = %ch, error = %e, "reclaim failed");
                        failed = true;
                    }
                }
            }
        }
        let room = grant.slots - batch.len();
        if !failed && room > 0 {
            // Every active channel in one read, so it blocks only when all
            // of them have nothing new. COUNT applies per stream; what the
            // grant cannot take stays in our pending list, and its
            // channel's cursor goes back to before it.
            let want = room.div_ceil(grant.channels.len());
            let cursors: Vec<(String, String)> = grant
                .channels
                .iter()
                .map(|c| (c.clone(), self.cursors.get(c).unwrap_or(&Cursor::New).as_arg().to_string()))
                .collect();
            match self.reader.read(&self.consumer, &cursors, want).await {
                Ok(raws) => {
                    let mut by_channel: HashMap<String, Vec<Entry>> = HashMap::new();
                    for raw in raws {
                        let ch = raw.channel.clone();
                        by_channel.entry(ch.clone()).or_default().push(raw.into_entry(&ch));
                    }
                    let start = self.turn % grant.channels.len();
                    self.turn = self.turn.wrapping_add(1);
                    let order: Vec<String> =
                        grant.channels.iter().cycle().skip(start).take(grant.channels.len()).cloned().collect();
                    let per_channel: Vec<(String, Vec<Entry>)> = order
                        .into_iter()
                        .map(|c| {
                            let e = by_channel.remove(&c).unwrap_or_default();
                            (c, e)
                        })
                        .collect();
                    let admitted = admit(per_channel, room, bytes, |e| self.cost(e));
                    for (ch, mut read, taken) in admitted {
                        let Some(cursor) = self.cursors.get_mut(&ch) else { continue };
                        let from_pending = matches!(cursor, Cursor::Pending(_));
                        let ids: Vec<&str> = read.iter().map(|e| e.id.as_str()).collect();
                        *cursor = next_cursor(cursor, &ids, taken);
                        read.truncate(taken);
                        let taken = read;
                        if from_pending {
                            self.with_counts(&ch, taken, &mut batch).await;
                        } else {
                            batch.extend(taken.into_iter().map(|entry| Fetched { entry, attempt: 1 }));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(agent = %self.consumer, error = %e, "store read failed");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(BACKOFF).await;
            if let Ok(r) = self.store.reader().await {
                self.reader = r;
            }
        }
        batch
    }

    /// Bytes an entry counts against the session's budget: its stored size,
    /// or nothing when the session settles it at once (unreadable, or too
    /// large for a `Deliver`).
    fn cost(&self, e: &Entry) -> usize {
        match &e.webhook {
            Ok(w) if w.bytes.len() <= self.max_entry => w.bytes.len(),
            _ => 0,
        }
    }

    /// Adds entries that came from a pending list, with their delivery
    /// counts as attempt numbers.
    async fn with_counts(&self, channel: &str, entries: Vec<Entry>, batch: &mut Vec<Fetched>) {
        let counts = match (entries.first(), entries.last()) {
            (Some(first), Some(last)) => self
                .store
                .delivery_counts(channel, &self.consumer, &first.id, &last.id, entries.len())
                .await
                .unwrap_or_default(),
            _ => HashMap::new(),
        };
        batch.extend(entries.into_iter().map(|entry| {
            let attempt = counts.get(&entry.id).copied().unwrap_or(1);
            Fetched { entry, attempt }
        }));
    }
}

/// Which entries a grant takes from one read: round-robin over the
/// channels (in the order given), at most `slots` in all, their `cost`s
/// within `bytes`. A channel whose next entry does not fit takes nothing
/// more, so what each channel takes is a prefix of what it read. Returns,
/// per channel, what it read and how many of them it takes.
pub fn admit<E>(
    per_channel: Vec<(String, Vec<E>)>,
    slots: usize,
    bytes: usize,
    cost: impl Fn(&E) -> usize,
) -> Vec<(String, Vec<E>, usize)> {
    let mut taken = vec![0usize; per_channel.len()];
    let mut closed = vec![false; per_channel.len()];
    let (mut left, mut room) = (slots, bytes);
    loop {
        let mut progressed = false;
        for (i, (_, read)) in per_channel.iter().enumerate() {
            if left == 0 {
                break;
            }
            if closed[i] {
                continue;
            }
            let Some(e) = read.get(taken[i]) else {
                closed[i] = true;
                continue;
            };
            let c = cost(e);
            if c > room {
                closed[i] = true;
                continue;
            }
            room -= c;
            left -= 1;
            taken[i] += 1;
            progressed = true;
        }
        if !progressed || left == 0 {
            break;
        }
    }
    per_channel.into_iter().zip(taken).map(|((ch, read), n)| (ch, read, n)).collect()
}

/// A channel's cursor after a read that returned the entries `read` (their
/// ids, in stream order) of which the first `taken` were handed over.
pub fn next_cursor(cursor: &Cursor, read: &[&str], taken: usize) -> Cursor {
    let last_taken = taken.checked_sub(1).and_then(|i| read.get(i)).map(|id| id.to_string());
    let first_left = read.get(taken).copied();
    match (cursor, last_taken, first_left) {
        // The pending list is walked; an empty answer means it is done.
        (Cursor::Pending(_), _, _) if read.is_empty() => Cursor::New,
        (Cursor::Pending(_), Some(last), _) => Cursor::Pending(last),
        (Cursor::Pending(after), None, _) => Cursor::Pending(after.clone()),
        // New entries left over are now in our pending list: walk it from
        // just before them.
        (Cursor::New, Some(last), Some(_)) => Cursor::Pending(last),
        (Cursor::New, None, Some(first)) => Cursor::Pending(before(first)),
        (Cursor::New, _, None) => Cursor::New,
    }
}

/// The stream id just before `id` (`ms-seq`), as a pending-list cursor.
fn before(id: &str) -> String {
    match crate::store::parse_id(id) {
        Some((ms, seq)) if seq > 0 => crate::store::format_id((ms, seq - 1)),
        Some((ms, _)) if ms > 0 => crate::store::format_id((ms - 1, u64::MAX)),
        _ => "0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_round_robin_within_slots_and_bytes() {
        let per = vec![("a".to_string(), vec![5, 5, 5]), ("b".to_string(), vec![5, 50, 5])];
        let got = admit(per.clone(), 10, 100, |c| *c);
        assert_eq!(got.iter().map(|(_, _, n)| *n).collect::<Vec<_>>(), vec![3, 3]);
        let got = admit(per.clone(), 3, 100, |c| *c);
        assert_eq!(got.iter().map(|(_, _, n)| *n).collect::<Vec<_>>(), vec![2, 1], "slots shared in turn");
        let got = admit(per, 10, 20, |c| *c);
        assert_eq!(got.iter().map(|(_, _, n)| *n).collect::<Vec<_>>(), vec![3, 1], "b stops at what does not fit");
    }

    #[test]
    fn entries_left_over_are_read_again_from_the_pending_list() {
        let read = ["5-0", "5-1", "7-0"];
        assert_eq!(next_cursor(&Cursor::New, &read, 3), Cursor::New);
        assert_eq!(next_cursor(&Cursor::New, &read, 1), Cursor::Pending("5-0".into()));
        assert_eq!(next_cursor(&Cursor::New, &read, 0), Cursor::Pending(format!("4-{}", u64::MAX)));
        assert_eq!(next_cursor(&Cursor::Pending("0".into()), &read, 2), Cursor::Pending("5-1".into()));
        assert_eq!(next_cursor(&Cursor::Pending("3-0".into()), &read, 0), Cursor::Pending("3-0".into()));
        assert_eq!(next_cursor(&Cursor::Pending("3-0".into()), &[], 0), Cursor::New);
        assert_eq!(before("7-0"), format!("6-{}", u64::MAX));
        assert_eq!(before("0-0"), "0");
    }
}
