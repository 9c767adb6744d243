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
}

impl Fetcher {
    pub fn new(store: Store, reader: Reader, consumer: String, channels: &[String], reclaim_after: Duration) -> Self {
        let cursors = channels.iter().map(|c| (c.clone(), Cursor::Pending("0".into()))).collect();
        Self { store, reader, consumer, cursors, turn: 0, reclaim_after, next_reclaim: Instant::now() }
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

    /// One batch of at most `grant.slots` entries.
    async fn fetch(&mut self, grant: &Grant) -> Vec<Fetched> {
        let mut batch = Vec::new();
        let mut failed = false;
        if Instant::now() >= self.next_reclaim {
            self.next_reclaim = Instant::now() + (self.reclaim_after / 2).max(Duration::from_millis(200));
            for ch in &grant.channels {
                let room = grant.slots - batch.len();
                if room == 0 {
                    break;
                }
                match self.store.autoclaim(ch, &self.consumer, self.reclaim_after, room).await {
                    Ok(entries) if !entries.is_empty() => {
                        tracing::info!(agent = %self.consumer, channel = %ch, count = entries.len(), "reclaimed stale pending entries");
                        let entries: Vec<Entry> = entries.into_iter().take(room).collect();
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
            // COUNT applies per stream: read at most `room` channels, so
            // the whole read stays within the grant.
            let n = grant.channels.len().min(room);
            let start = self.turn % grant.channels.len();
            self.turn = self.turn.wrapping_add(1);
            let picked: Vec<&String> = grant.channels.iter().cycle().skip(start).take(n).collect();
            let want = room / n;
            let cursors: Vec<(String, String)> = picked
                .iter()
                .map(|c| ((*c).clone(), self.cursors.get(*c).unwrap_or(&Cursor::New).as_arg().to_string()))
                .collect();
            match self.reader.read(&self.consumer, &cursors, want).await {
                Ok(raws) => {
                    let mut by_channel: HashMap<String, Vec<Entry>> = HashMap::new();
                    for raw in raws {
                        let ch = raw.channel.clone();
                        by_channel.entry(ch.clone()).or_default().push(raw.into_entry(&ch));
                    }
                    for (ch, _) in &cursors {
                        let mut entries = by_channel.remove(ch).unwrap_or_default();
                        entries.truncate(want);
                        let Some(cursor) = self.cursors.get_mut(ch) else { continue };
                        if let Cursor::Pending(_) = cursor {
                            // Walk the pending list; once it is exhausted, read new entries.
                            *cursor = match entries.last() {
                                Some(last) => Cursor::Pending(last.id.clone()),
                                None => Cursor::New,
                            };
                            self.with_counts(ch, entries, &mut batch).await;
                        } else {
                            batch.extend(entries.into_iter().map(|entry| Fetched { entry, attempt: 1 }));
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
