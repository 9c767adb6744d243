//! Appends of concurrent ingest requests, written together: one pipeline
//! (and with replica durability one `WAIT`) per round instead of one per
//! request. Off a cluster only: there a pipeline names one key (see
//! `conn::write_groups`).
//!
//! A request queues its `XADD`s and waits for its own replies. The first
//! to find no round running starts one task; the task takes whatever is
//! queued (up to [`ROUND_APPENDS`] appends or [`ROUND_BYTES`]), writes it,
//! answers each request, and goes on until the queue is empty. One round
//! is in flight at a time, so under load rounds grow by themselves, and a
//! lone request waits for nothing but its own write.
//!
//! What a request is told is what Redis answered: its entry ids, or the
//! round's error when the pipeline failed (a failed pipeline fails every
//! request in it, as one command failing fails a redis-rs pipeline; each
//! sender then retries, and may duplicate what was written). The queue
//! never holds more than one append per ingest request in progress: each
//! waits for its answer, and those are bounded by the ingest connection
//! caps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::super::StreamId;
use crate::error::StoreError;

/// At most this many appends go in one round …
pub const ROUND_APPENDS: usize = 128;
/// … and at most about this many bytes (always at least one append).
pub const ROUND_BYTES: usize = 1 << 20;

/// One request's append: a webhook's bytes to each of its channels'
/// streams, and where its ids go (in channel order).
pub struct Append {
    pub keys: Vec<String>,
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Result<Vec<StreamId>, StoreError>>,
}

/// The queue of appends and whether a round task runs.
#[derive(Default)]
pub struct Batch {
    inner: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Append>,
    running: bool,
}

impl Batch {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `append`; true when no round runs and the caller must start
    /// the task (which then runs until the queue is empty).
    pub fn push(&self, append: Append) -> bool {
        let mut q = self.queue();
        q.waiting.push_back(append);
        !std::mem::replace(&mut q.running, true)
    }

    /// The next round, oldest first; `None` (and the task ends) when
    /// nothing is queued.
    pub fn next_round(&self) -> Option<Vec<Append>> {
        let mut q = self.queue();
        let (mut n, mut bytes) = (0, 0);
        for a in &q.waiting {
            let size = a.bytes.len() * a.keys.len();
            if n == ROUND_APPENDS || (n > 0 && bytes + size > ROUND_BYTES) {
                break;
            }
            n += 1;
            bytes += size;
        }
        if n == 0 {
            q.running = false;
            return None;
        }
        Some(q.waiting.drain(..n).collect())
    }

    /// Held by the round task: if it ends any other way than by finding
    /// the queue empty (a panic, the runtime shutting down), the next
    /// append starts a new one, and the queued requests are answered with
    /// an error (their replies dropped) rather than left waiting.
    pub fn guard(self: &Arc<Self>) -> RoundGuard {
        RoundGuard { batch: self.clone(), finished: false }
    }
}

pub struct RoundGuard {
    batch: Arc<Batch>,
    /// `next_round` found the queue empty (and cleared `running`).
    pub finished: bool,
}

impl Drop for RoundGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut q = self.batch.queue();
            q.running = false;
            q.waiting.clear();
        }
    }
}

/// Hands each append of a round its share of the round's replies, in
/// order: `ids_of` reads one append's ids from its replies.
pub fn answer<R>(
    round: Vec<Append>,
    replies: Result<Vec<R>, StoreError>,
    ids_of: impl Fn(&[R]) -> Result<Vec<StreamId>, StoreError>,
) {
    match replies {
        Ok(replies) => {
            let mut rest = replies.as_slice();
            for a in round {
                let n = a.keys.len();
                let ids = match rest.get(..n) {
                    Some(mine) => ids_of(mine),
                    None => Err(StoreError::Corrupt { id: String::new(), why: "Redis answered fewer XADDs".into() }),
                };
                rest = rest.get(n..).unwrap_or_default();
                // A request that gave up (its deadline) no longer listens.
                let _ = a.reply.send(ids);
            }
        }
        Err(e) => {
            for a in round {
                let _ = a.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(keys: usize, size: usize) -> (Append, oneshot::Receiver<Result<Vec<StreamId>, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        let keys = (0..keys).map(|k| format!("k{k}")).collect();
        (Append { keys, bytes: vec![0; size], reply }, rx)
    }

    #[test]
    fn the_first_append_starts_the_task_and_the_empty_queue_ends_it() {
        let batch = Batch::default();
        assert!(batch.push(append(1, 10).0), "nothing runs: start it");
        assert!(!batch.push(append(1, 10).0), "a round runs: just queue");
        assert_eq!(batch.next_round().map(|r| r.len()), Some(2));
        assert!(batch.next_round().is_none(), "empty: the task ends");
        assert!(batch.push(append(1, 10).0), "and the next append starts one again");
    }

    #[test]
    fn rounds_are_capped_by_count_and_bytes_but_always_take_one() {
        let batch = Batch::default();
        for _ in 0..ROUND_APPENDS + 5 {
            batch.push(append(1, 10).0);
        }
        assert_eq!(batch.next_round().map(|r| r.len()), Some(ROUND_APPENDS));
        assert_eq!(batch.next_round().map(|r| r.len()), Some(5));
        // Bytes count once per channel written.
        batch.push(append(2, ROUND_BYTES).0); // over the cap alone: still goes
        batch.push(append(1, 1).0);
        assert_eq!(batch.next_round().map(|r| r.len()), Some(1));
        assert_eq!(batch.next_round().map(|r| r.len()), Some(1));
        assert!(batch.next_round().is_none());
    }

    #[test]
    fn each_append_gets_its_own_replies_in_order_or_the_round_error() {
        let (a, rx_a) = append(2, 1);
        let (b, rx_b) = append(1, 1);
        let (c, rx_c) = append(1, 1);
        let ids = |r: &[u64]| Ok(r.iter().map(|&n| StreamId::new(n, 0)).collect());
        answer(vec![a, b, c], Ok(vec![1, 2, 3]), ids);
        let got = |rx: oneshot::Receiver<Result<Vec<StreamId>, StoreError>>| {
            rx.blocking_recv().expect("answered").map(|v| v.iter().map(|i| i.ms).collect::<Vec<_>>())
        };
        assert_eq!(got(rx_a).ok(), Some(vec![1, 2]));
        assert_eq!(got(rx_b).ok(), Some(vec![3]));
        assert!(got(rx_c).is_err(), "no reply left for it: an error, not someone else's id");

        let (a, rx_a) = append(1, 1);
        let (b, rx_b) = append(1, 1);
        answer::<u64>(vec![a, b], Err(StoreError::Timeout { op: "XADD", ms: 5 }), ids);
        assert!(matches!(rx_a.blocking_recv(), Ok(Err(StoreError::Timeout { .. }))));
        assert!(matches!(rx_b.blocking_recv(), Ok(Err(StoreError::Timeout { .. }))));
    }

    #[test]
    fn a_task_that_dies_answers_its_queue_and_lets_the_next_start() {
        let batch = Arc::new(Batch::default());
        let (a, rx) = append(1, 1);
        assert!(batch.push(a));
        drop(batch.guard()); // not finished: died
        assert!(rx.blocking_recv().is_err(), "the waiting request is let go");
        assert!(batch.push(append(1, 1).0), "a new task starts");
    }
}
