//! Appends of concurrent ingest requests, written together: one pipeline
//! (and with replica durability one `WAIT`) per round instead of one per
//! request. Off a cluster only: there a pipeline names one key (see
//! `conn::write_groups`).
//!
//! A request queues its `XADD`s and waits for its own replies. When fewer
//! than the store's round tasks run (2; with replica durability one per
//! write connection, so `WAIT`s still overlap), the request starts one; a
//! task takes whatever is queued (up to [`ROUND_APPENDS`] appends or
//! [`ROUND_BYTES`]), writes it, answers each request, and goes on until the
//! queue is empty. Under load rounds grow by themselves, and a lone request
//! waits for nothing but its own write.
//!
//! What a request is told is what Redis answered for its own `XADD`s: its
//! entry ids, or the error of one of them (the pipeline ignores errors, so
//! one route's failing key fails only that route's requests), or the
//! round's error when the whole pipeline failed (connection lost, timeout:
//! each sender retries, and may duplicate what was written).
//!
//! Bounds: a request that gave up (its deadline passed, its sender left) is
//! dropped from the queue unwritten (when a round reaches it, or when the
//! queue is full), and the queue refuses an append past [`QUEUE_APPENDS`]
//! appends or [`QUEUE_BYTES`] of requests still waiting (the request is
//! answered `503` at once). On top of the queue, each running round holds
//! its appends (about [`ROUND_BYTES`]) and their packed pipeline.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::super::StreamId;
use crate::error::StoreError;

/// At most this many appends go in one round …
pub const ROUND_APPENDS: usize = 128;
/// … and at most about this many bytes (always at least one append).
pub const ROUND_BYTES: usize = 1 << 20;
/// At most this many appends wait in the queue …
pub const QUEUE_APPENDS: usize = 4096;
/// … holding at most this many bytes.
pub const QUEUE_BYTES: usize = 64 << 20;

/// One request's append: a webhook's bytes to each of its channels'
/// streams, and where its ids go (in channel order).
pub struct Append {
    pub keys: Vec<String>,
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Result<Vec<StreamId>, StoreError>>,
}

impl Append {
    /// The bytes it writes (once per channel).
    fn size(&self) -> usize {
        self.bytes.len() * self.keys.len()
    }
}

/// The queue of appends and the round tasks that write it.
pub struct Batch {
    inner: Mutex<Queue>,
    /// Round tasks that may run at once.
    tasks: usize,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Append>,
    /// What `waiting` holds, in bytes written.
    bytes: usize,
    /// Round tasks running (or spawned and not yet run).
    running: usize,
}

/// What [`Batch::push`] did with an append.
pub enum Pushed {
    /// Queued: a round task will take it.
    Queued,
    /// Queued, and the caller must run a round task with this guard (in a
    /// task of its own: it runs until the queue is empty).
    Start(RoundGuard),
    /// Refused: the queue is full (answered `503`).
    Full(StoreError),
}

impl Batch {
    pub fn new(tasks: usize) -> Self {
        Self { inner: Mutex::default(), tasks: tasks.max(1) }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `append`, unless the queue is full.
    pub fn push(self: &Arc<Self>, append: Append) -> Pushed {
        let mut q = self.queue();
        let full =
            |q: &Queue| q.waiting.len() >= QUEUE_APPENDS || q.bytes + append.size() > QUEUE_BYTES.max(append.size());
        if full(&q) {
            // Requests that gave up wait nowhere: make room of them first.
            q.waiting.retain(|a| !a.reply.is_closed());
            q.bytes = q.waiting.iter().map(Append::size).sum();
        }
        if full(&q) {
            let why = format!("{} appends ({} bytes) already wait for Redis", q.waiting.len(), q.bytes);
            return Pushed::Full(StoreError::Busy { op: "XADD", why });
        }
        q.bytes += append.size();
        q.waiting.push_back(append);
        if q.running < self.tasks {
            q.running += 1;
            return Pushed::Start(RoundGuard { batch: self.clone(), finished: false });
        }
        Pushed::Queued
    }

    /// The next round, oldest first, leaving out the appends whose request
    /// gave up; `None` (and the task ends) when nothing is left.
    pub fn next_round(&self, guard: &mut RoundGuard) -> Option<Vec<Append>> {
        let mut q = self.queue();
        let mut round = Vec::new();
        let mut bytes = 0;
        while let Some(a) = q.waiting.pop_front() {
            let size = a.size();
            if !round.is_empty() && (round.len() == ROUND_APPENDS || bytes + size > ROUND_BYTES) {
                q.waiting.push_front(a);
                break;
            }
            q.bytes -= size;
            if a.reply.is_closed() {
                continue;
            }
            bytes += size;
            round.push(a);
        }
        if round.is_empty() {
            q.running -= 1;
            guard.finished = true;
            return None;
        }
        Some(round)
    }
}

/// Held by a round task from before it is spawned. If it ends any other
/// way than by finding the queue empty (a panic, dropped unrun by a
/// runtime shutting down), it no longer counts as running; when it was
/// the last, the queued requests are answered with an error (their
/// replies dropped) rather than left waiting.
pub struct RoundGuard {
    batch: Arc<Batch>,
    /// `next_round` found the queue empty (and stopped counting it).
    finished: bool,
}

impl Drop for RoundGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut q = self.batch.queue();
            q.running -= 1;
            if q.running == 0 {
                q.waiting.clear();
                q.bytes = 0;
            }
        }
    }
}

/// Redis answered a pipeline with fewer replies than it had `XADD`s.
pub fn fewer_replies() -> StoreError {
    StoreError::Corrupt { id: String::new(), why: "Redis answered fewer XADDs".into() }
}

/// Hands each append of a round its share of the round's replies, in
/// order: `ids_of` reads one append's ids from its replies, or its error.
/// Returns how many appends failed, and, when the round itself succeeded,
/// one error of them: the first that `telling` picks out (a failover),
/// else the first (the store counts it, and looks for a failover in it).
pub fn answer<R>(
    round: Vec<Append>,
    replies: Result<Vec<R>, StoreError>,
    ids_of: impl Fn(&[R]) -> Result<Vec<StreamId>, StoreError>,
    telling: impl Fn(&StoreError) -> bool,
) -> (usize, Option<StoreError>) {
    let (mut failed, mut first) = (0, None);
    match replies {
        Ok(replies) => {
            let mut rest = replies.as_slice();
            for a in round {
                let n = a.keys.len();
                let ids = match rest.get(..n) {
                    Some(mine) => ids_of(mine),
                    None => Err(fewer_replies()),
                };
                rest = rest.get(n..).unwrap_or_default();
                if let Err(e) = &ids {
                    failed += 1;
                    if first.as_ref().is_none_or(|f| !telling(f) && telling(e)) {
                        first = Some(e.clone());
                    }
                }
                // A request that gave up (its deadline) no longer listens.
                let _ = a.reply.send(ids);
            }
        }
        Err(e) => {
            failed = round.len();
            for a in round {
                let _ = a.reply.send(Err(e.clone()));
            }
        }
    }
    (failed, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rx = oneshot::Receiver<Result<Vec<StreamId>, StoreError>>;

    fn append(keys: usize, size: usize) -> (Append, Rx) {
        let (reply, rx) = oneshot::channel();
        let keys = (0..keys).map(|k| format!("k{k}")).collect();
        (Append { keys, bytes: vec![0; size], reply }, rx)
    }

    /// Pushes an append whose request still waits (its receiver kept).
    fn push(batch: &Arc<Batch>, keys: usize, size: usize, kept: &mut Vec<Rx>) -> Pushed {
        let (a, rx) = append(keys, size);
        kept.push(rx);
        batch.push(a)
    }

    fn round_len(batch: &Batch, guard: &mut RoundGuard) -> Option<usize> {
        batch.next_round(guard).map(|r| r.len())
    }

    #[test]
    fn appends_start_tasks_up_to_the_limit_and_an_empty_queue_ends_them() {
        let batch = Arc::new(Batch::new(2));
        let mut kept = Vec::new();
        let Pushed::Start(mut one) = push(&batch, 1, 10, &mut kept) else { panic!("nothing runs: start one") };
        let Pushed::Start(mut two) = push(&batch, 1, 10, &mut kept) else { panic!("one of two runs: start another") };
        assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Queued), "two run: just queue");
        assert_eq!(round_len(&batch, &mut one), Some(3));
        assert_eq!(round_len(&batch, &mut two), None, "empty: this task ends");
        assert_eq!(round_len(&batch, &mut one), None, "and this one");
        assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Start(_)), "the next append starts one again");
    }

    #[test]
    fn rounds_are_capped_by_count_and_bytes_but_always_take_one() {
        let batch = Arc::new(Batch::new(1));
        let mut kept = Vec::new();
        let Pushed::Start(mut g) = push(&batch, 1, 10, &mut kept) else { panic!("start") };
        for _ in 0..ROUND_APPENDS + 4 {
            push(&batch, 1, 10, &mut kept);
        }
        assert_eq!(round_len(&batch, &mut g), Some(ROUND_APPENDS));
        assert_eq!(round_len(&batch, &mut g), Some(5));
        // Bytes count once per channel written.
        push(&batch, 2, ROUND_BYTES, &mut kept); // over the cap alone: still goes
        push(&batch, 1, 1, &mut kept);
        assert_eq!(round_len(&batch, &mut g), Some(1));
        assert_eq!(round_len(&batch, &mut g), Some(1));
        assert_eq!(round_len(&batch, &mut g), None);
    }

    #[test]
    fn appends_whose_request_gave_up_are_not_written() {
        let batch = Arc::new(Batch::new(1));
        let mut kept = Vec::new();
        let Pushed::Start(mut g) = push(&batch, 1, 10, &mut kept) else { panic!("start") };
        let (gone, rx) = append(1, 10);
        drop(rx); // its request timed out
        batch.push(gone);
        push(&batch, 1, 10, &mut kept);
        assert_eq!(round_len(&batch, &mut g), Some(2), "the two still waiting, not the one that left");
        assert_eq!(round_len(&batch, &mut g), None);
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_takes_appends_again_once_written() {
        let batch = Arc::new(Batch::new(1));
        let mut kept = Vec::new();
        let Pushed::Start(mut g) = push(&batch, 1, 10, &mut kept) else { panic!("start") };
        for _ in 1..QUEUE_APPENDS {
            assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Queued));
        }
        assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Full(StoreError::Busy { .. })), "by count");
        while round_len(&batch, &mut g).is_some() {}
        let Pushed::Start(mut g) = push(&batch, 1, QUEUE_BYTES - 10, &mut kept) else { panic!("start") };
        assert!(matches!(push(&batch, 1, 11, &mut kept), Pushed::Full(_)), "by bytes");
        assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Queued), "what still fits");
        assert_eq!(round_len(&batch, &mut g), Some(1), "the large one alone");
        assert_eq!(round_len(&batch, &mut g), Some(1));
        assert_eq!(round_len(&batch, &mut g), None);
        // One larger than the whole queue is taken when nothing waits.
        assert!(matches!(push(&batch, 2, QUEUE_BYTES, &mut kept), Pushed::Start(_)));
    }

    #[test]
    fn each_append_gets_its_own_replies_in_order_or_its_own_error() {
        let (a, rx_a) = append(2, 1);
        let (b, rx_b) = append(1, 1);
        let (c, rx_c) = append(1, 1);
        let (d, rx_d) = append(1, 1);
        // Reply 0 is an error: it fails `a` only.
        let ids = |r: &[u64]| {
            r.iter()
                .map(|&n| if n == 0 { Err(StoreError::Timeout { op: "XADD", ms: 1 }) } else { Ok(StreamId::new(n, 0)) })
                .collect()
        };
        let (failed, first) = answer(vec![a, b, c, d], Ok(vec![1, 0, 3, 4]), ids, |_| false);
        let got = |rx: Rx| rx.blocking_recv().expect("answered").map(|v| v.iter().map(|i| i.ms).collect::<Vec<_>>());
        assert!(got(rx_a).is_err(), "one of its XADDs failed");
        assert_eq!(got(rx_b).ok(), Some(vec![3]));
        assert_eq!(got(rx_c).ok(), Some(vec![4]));
        assert!(got(rx_d).is_err(), "no reply left for it: an error, not someone else's id");
        assert_eq!(failed, 2);
        assert!(first.is_some());

        let (a, rx_a) = append(1, 1);
        let (b, rx_b) = append(1, 1);
        let (failed, first) = answer::<u64>(vec![a, b], Err(StoreError::Timeout { op: "XADD", ms: 5 }), ids, |_| false);
        assert_eq!((failed, first.is_none()), (2, true), "the round's own error was counted by the write");
        assert!(matches!(rx_a.blocking_recv(), Ok(Err(StoreError::Timeout { .. }))));
        assert!(matches!(rx_b.blocking_recv(), Ok(Err(StoreError::Timeout { .. }))));
    }

    #[test]
    fn the_error_reported_for_a_round_is_one_a_failover_explains_if_any() {
        let (a, _rx_a) = append(1, 1);
        let (b, _rx_b) = append(1, 1);
        let (c, _rx_c) = append(1, 1);
        let ids = |r: &[u64]| match r[0] {
            0 => Err(StoreError::Corrupt { id: String::new(), why: "wrong type".into() }),
            1 => Err(StoreError::Timeout { op: "XADD", ms: 1 }),
            n => Ok(vec![StreamId::new(n, 0)]),
        };
        let failover = |e: &StoreError| matches!(e, StoreError::Timeout { .. });
        let (failed, first) = answer(vec![a, b, c], Ok(vec![0, 1, 2]), ids, failover);
        assert_eq!(failed, 2);
        assert!(matches!(first, Some(StoreError::Timeout { .. })), "the failover one, though second: {first:?}");
    }

    #[test]
    fn a_full_queue_first_lets_go_of_requests_that_gave_up() {
        let batch = Arc::new(Batch::new(1));
        let mut kept = Vec::new();
        let Pushed::Start(mut g) = push(&batch, 1, 10, &mut kept) else { panic!("start") };
        let mut gone = Vec::new();
        for _ in 1..QUEUE_APPENDS {
            let (a, rx) = append(1, 10);
            gone.push(rx);
            batch.push(a);
        }
        drop(gone); // all but the first gave up while Redis stalled
        assert!(matches!(push(&batch, 1, 10, &mut kept), Pushed::Queued), "room made of the ones that left");
        assert_eq!(round_len(&batch, &mut g), Some(2), "the two still waiting");
        assert_eq!(round_len(&batch, &mut g), None);
    }

    #[test]
    fn a_task_that_dies_lets_the_next_start_and_the_last_answers_the_queue() {
        let batch = Arc::new(Batch::new(2));
        let (a, mut rx) = append(1, 1);
        let Pushed::Start(one) = batch.push(a) else { panic!("start") };
        let (b, rx_b) = append(1, 1);
        let Pushed::Start(two) = batch.push(b) else { panic!("start") };
        drop(one); // died (or was dropped unrun): one still runs
        let still = matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert!(still, "still queued for the other task");
        drop(two); // the last died
        assert!(rx.blocking_recv().is_err() && rx_b.blocking_recv().is_err(), "the waiting requests are let go");
        assert!(matches!(batch.push(append(1, 1).0), Pushed::Start(_)), "a new task starts");
    }
}
