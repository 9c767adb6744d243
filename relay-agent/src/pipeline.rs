//! The agent's delivery pipeline: every delivery it holds, from the edge's
//! `Deliver` to the verdict frame it sends back. It outlives sessions: a
//! local POST that finishes after the link dropped is acked on the next
//! session (by `(channel, id)`), so a reconnect does not become a second
//! POST.
//!
//! What happens to a finished POST is decided in one place, [`verdict`]:
//! 2xx → ack; no answer (refused, timed out) → park the delivery while the
//! channel is paused (see `tunnel::pause`), else retry; 408, 429, 5xx and
//! transport errors → retry with backoff (honouring `Retry-After`) until
//! `retry.max_attempts`, then dead-letter; any other status → dead-letter.

use std::sync::Arc;
use std::time::Duration;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use relay_protocol::{Frame, Webhook};
use tokio::task::{Id, JoinError, JoinSet};

use crate::backoff;
use crate::config::{AgentConfig, RetryConfig};
use crate::dedup::{Key, Recent};
use crate::deliver::{Deliverer, Posted};
use crate::status::{Snapshot, Status, now_ms};
use crate::tunnel::pause::{self, Health, Parked};

/// What to do with one finished POST.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ack {
        status: u16,
    },
    /// Offer it again later (`Nack`, not permanent).
    Retry {
        reason: String,
        status: Option<u16>,
        after: Duration,
    },
    /// Hold it, unposted, until the channel's endpoint answers again.
    Park {
        reason: String,
    },
    DeadLetter {
        reason: String,
        status: Option<u16>,
    },
}

/// The verdict on a POST that went `posted` at `attempt`, for a channel in
/// state `health` (whose timeout count this updates). Pure.
pub fn verdict(posted: Posted, attempt: u32, health: &mut Health, retry: &RetryConfig) -> Verdict {
    let backoff = |attempt| backoff::delay(attempt, retry.initial_delay, retry.multiplier, retry.max_delay);
    let (reason, status, after) = match posted {
        Posted::NoTarget(reason) => return Verdict::DeadLetter { reason, status: None },
        Posted::Refused | Posted::TimedOut => {
            let refused = posted == Posted::Refused;
            let reason = if refused { "local endpoint refused the connection" } else { "local endpoint timed out" };
            health.timeouts += 1;
            if health.paused || refused || health.timeouts >= pause::TIMEOUTS_TO_PAUSE {
                // No attempt used: kept until the endpoint answers.
                return Verdict::Park { reason: reason.into() };
            }
            (reason.to_string(), None, backoff(attempt))
        }
        Posted::Failed(reason) => {
            health.timeouts = 0;
            (reason, None, backoff(attempt))
        }
        Posted::Answered { status, retry_after } => {
            health.timeouts = 0;
            match status {
                200..=299 => return Verdict::Ack { status },
                408 | 429 | 500..=599 => (
                    format!("local endpoint answered {status}"),
                    Some(status),
                    retry_after.unwrap_or_else(|| backoff(attempt)).min(retry.max_delay),
                ),
                _ => {
                    return Verdict::DeadLetter {
                        reason: format!("local endpoint answered {status}"),
                        status: Some(status),
                    };
                }
            }
        }
    };
    if attempt >= retry.max_attempts {
        Verdict::DeadLetter { reason: format!("gave up after {attempt} attempts: {reason}"), status }
    } else {
        Verdict::Retry { reason, status, after }
    }
}

/// One finished local POST (the webhook comes back so it can be parked).
pub struct Outcome {
    pub key: Key,
    pub channel: String,
    pub id: String,
    pub attempt: u32,
    pub webhook: Webhook,
    pub posted: Posted,
}

/// Frames a batch of finished POSTs asks the session to send, in order.
#[derive(Default)]
pub struct Settled {
    /// One `Ack` for every delivery that succeeded, `(channel, id)`.
    pub acks: Vec<(String, String)>,
    /// `Nack`s and `Flow` pauses.
    pub frames: Vec<Frame>,
    /// Channels whose endpoint answered again while paused.
    pub resumed: Vec<String>,
}

/// Delivery state that survives reconnects.
pub struct Pipeline {
    deliverer: Arc<Deliverer>,
    retry: RetryConfig,
    /// Running local POSTs; dropping the set aborts them.
    pub tasks: JoinSet<Outcome>,
    /// What each running task posts, to answer for it if it panics.
    task_keys: HashMap<Id, Key>,
    /// Keys (`channel\0id`) of deliveries running or parked now.
    running: HashSet<Key>,
    /// Recently acked keys.
    recent: Recent,
    /// Acks `(channel, id)` whose session died before they could be sent.
    unsent_acks: Vec<(String, String)>,
    /// Endpoint health per channel (pause/probe state, parked deliveries).
    pub health: HashMap<String, Health>,
    /// Running endpoint probes: (channel, endpoint reachable).
    pub probes: JoinSet<(String, bool)>,
}

impl Pipeline {
    pub fn new(deliverer: Arc<Deliverer>, cfg: &AgentConfig) -> Self {
        Self {
            deliverer,
            retry: cfg.retry.clone(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            running: HashSet::new(),
            recent: Recent::new(16_384),
            unsent_acks: Vec::new(),
            health: cfg.channels().into_iter().map(|c| (c, Health::default())).collect(),
            probes: JoinSet::new(),
        }
    }

    /// Deliveries running or parked.
    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// A new session starts: parked deliveries of the last one come back
    /// from the edge as redeliveries (so they are dropped here). Returns the
    /// frames to send first: pauses still in force, then the acks that the
    /// last session could not send.
    pub fn session_started(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (channel, h) in self.health.iter_mut() {
            for p in h.parked.drain(..) {
                self.running.remove(&Recent::key(channel, &p.id));
            }
            if h.paused {
                frames.push(Frame::Flow { window: 0, channel: Some(channel.clone()) });
            }
        }
        // Kept until `acks_sent`: sending them twice is harmless.
        frames.extend(ack_frames(&self.unsent_acks));
        frames
    }

    /// The acks handed out by [`Pipeline::session_started`] went out.
    pub fn acks_sent(&mut self) {
        self.unsent_acks.clear();
    }

    /// Acks that could not be sent: kept for the next session.
    pub fn keep_unsent(&mut self, acks: Vec<(String, String)>) {
        self.unsent_acks.extend(acks);
    }

    /// A `Deliver` from the edge. Returns an `Ack` to send at once when it
    /// was delivered already (the edge missed the ack).
    pub fn on_deliver(
        &mut self,
        channel: String,
        id: String,
        attempt: u32,
        webhook: Webhook,
        status: &Status,
    ) -> Option<Frame> {
        let key = Recent::key(&channel, &id);
        if self.recent.contains(&key) {
            status.update(|s| s.duplicates_dropped += 1);
            return Some(Frame::ack([(channel.as_str(), id.as_str())]));
        }
        if !self.running.insert(key.clone()) {
            // Still being posted from an earlier session (or parked); its
            // result is acked when it finishes.
            return None;
        }
        if let Some(h) = self.health.get_mut(&channel)
            && h.paused
        {
            h.parked.push_back(Parked { id, attempt, webhook });
            let parked = h.parked.len() as u64;
            status.update(|s| set_paused(s, &channel, true, parked));
            return None;
        }
        if attempt > 1 {
            status.update(|s| s.retried += 1);
        }
        self.spawn(key, channel, id, attempt, webhook);
        let n = self.running.len() as u64;
        status.update(|s| s.in_flight = n);
        None
    }

    fn spawn(&mut self, key: Key, channel: String, id: String, attempt: u32, webhook: Webhook) {
        let deliverer = self.deliverer.clone();
        let task_key = key.clone();
        let handle = self.tasks.spawn(async move {
            let posted = deliverer.post(&channel, attempt, &webhook).await;
            Outcome { key, channel, id, attempt, webhook, posted }
        });
        self.task_keys.insert(handle.id(), task_key);
    }

    /// Every POST that has finished: waits for the first, then takes the
    /// rest without waiting. Pending forever while nothing runs.
    /// (Takes the task set, not the pipeline, so a `select!` can wait on
    /// it next to the probes.) Cancel-safe.
    pub async fn finished(tasks: &mut JoinSet<Outcome>) -> Vec<Result<(Id, Outcome), JoinError>> {
        let Some(first) = tasks.join_next_with_id().await else { return std::future::pending().await };
        let mut out = vec![first];
        while let Some(more) = tasks.try_join_next_with_id() {
            out.push(more);
        }
        out
    }

    /// Turns finished POSTs into frames: one `Ack` for all successes,
    /// `Nack`s, and `Flow` pauses for channels whose endpoint went down.
    pub fn settle(&mut self, done: Vec<Result<(Id, Outcome), JoinError>>, status: &Status) -> Settled {
        let mut out = Settled::default();
        for result in done {
            let outcome = match result {
                Ok((task, outcome)) => {
                    self.task_keys.remove(&task);
                    outcome
                }
                Err(e) => {
                    // A POST that panicked: no verdict from it, so let the
                    // edge offer it again rather than hold it forever.
                    if let Some(key) = self.task_keys.remove(&e.id()) {
                        self.running.remove(&key);
                        let (channel, id) = Recent::split(&key);
                        let (channel, id) = (channel.to_string(), id.to_string());
                        tracing::error!(%channel, %id, error = %e, "local delivery task failed; edge will retry");
                        out.frames.push(nack(channel, id, false, "local delivery task failed".into(), None, None));
                    }
                    continue;
                }
            };
            let Outcome { key, channel, id, attempt, webhook, posted } = outcome;
            let health = self.health.entry(channel.clone()).or_default();
            let answered = matches!(posted, Posted::Answered { .. } | Posted::Failed(_));
            let v = verdict(posted, attempt, health, &self.retry);
            if answered && health.paused {
                out.resumed.push(channel.clone());
            }
            if let Verdict::Park { reason } = v {
                if !health.paused {
                    health.pause();
                    tracing::warn!(%channel, %reason, "local endpoint down: pausing the channel and probing it");
                    out.frames.push(Frame::Flow { window: 0, channel: Some(channel.clone()) });
                }
                health.parked.push_back(Parked { id, attempt, webhook });
                let parked = health.parked.len() as u64;
                status.update(|s| {
                    note_target(s, &channel, None, Some(reason.clone()));
                    set_paused(s, &channel, true, parked);
                });
                continue;
            }
            self.running.remove(&key);
            match v {
                Verdict::Ack { status: code } => {
                    self.recent.insert(key);
                    status.update(|s| {
                        s.delivered += 1;
                        note_target(s, &channel, Some(code), None);
                    });
                    out.acks.push((channel, id));
                }
                Verdict::Retry { reason, status: code, after } => {
                    status.update(|s| {
                        s.failed += 1;
                        note_target(s, &channel, code, Some(reason.clone()));
                    });
                    tracing::info!(%channel, %id, %reason, ?after, "delivery failed; edge will retry");
                    out.frames.push(nack(channel, id, false, reason, Some(after), code));
                }
                Verdict::DeadLetter { reason, status: code } => {
                    status.update(|s| {
                        s.failed += 1;
                        s.dead_lettered += 1;
                        note_target(s, &channel, code, Some(reason.clone()));
                    });
                    tracing::warn!(%channel, %id, %reason, "delivery failed permanently; dead-lettering");
                    out.frames.push(nack(channel, id, true, reason, None, code));
                }
                Verdict::Park { .. } => {}
            }
        }
        let n = self.running.len() as u64;
        status.update(|s| s.in_flight = n);
        out
    }

    /// The channel's endpoint answers again: post what was parked. Returns
    /// the `Flow` that resumes the channel at the edge.
    pub fn resume(&mut self, channel: &str, window: u32, status: &Status) -> Option<Frame> {
        let h = self.health.get_mut(channel)?;
        if !h.paused {
            return None;
        }
        let parked = h.resume();
        tracing::info!(%channel, parked = parked.len(), "local endpoint is back: resuming the channel");
        status.update(|s| set_paused(s, channel, false, 0));
        for p in parked {
            let key = Recent::key(channel, &p.id);
            self.spawn(key, channel.to_string(), p.id, p.attempt, p.webhook);
        }
        Some(Frame::Flow { window, channel: Some(channel.to_string()) })
    }

    /// When the earliest probe of a paused channel is due.
    pub fn next_probe(&self) -> Option<tokio::time::Instant> {
        self.health.values().filter(|h| h.paused && !h.probing).filter_map(|h| h.next_probe).min()
    }

    pub fn start_probes(&mut self, cfg: &AgentConfig) {
        let now = tokio::time::Instant::now();
        for (channel, h) in self.health.iter_mut() {
            if h.paused && !h.probing && h.next_probe.is_some_and(|t| t <= now) {
                h.probing = true;
                let url = cfg.targets.iter().find(|t| &t.channel == channel).map(|t| t.url.clone()).unwrap_or_default();
                let channel = channel.clone();
                self.probes.spawn(async move {
                    let up = pause::probe(&url).await;
                    (channel, up)
                });
            }
        }
    }

    /// Lets running POSTs finish for up to `within` (their verdicts are
    /// lost with the link; the edge redelivers them).
    pub async fn wind_down(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async { while self.tasks.join_next().await.is_some() {} }).await;
    }
}

/// Most entries in one `Ack` frame: far below the edge's limits (10,000
/// ids, 1 MiB), however many acks piled up while disconnected.
const ACKS_PER_FRAME: usize = 1_000;

/// `Ack` frames for `acks`, `(channel, id)` each.
pub fn ack_frames(acks: &[(String, String)]) -> Vec<Frame> {
    acks.chunks(ACKS_PER_FRAME).map(|chunk| Frame::ack(chunk.iter().map(|(c, i)| (c.as_str(), i.as_str())))).collect()
}

fn nack(
    channel: String,
    id: String,
    permanent: bool,
    reason: String,
    after: Option<Duration>,
    status: Option<u16>,
) -> Frame {
    Frame::Nack {
        channel: Some(channel),
        id,
        permanent,
        reason,
        retry_after_ms: after.map(|a| a.as_millis() as u64),
        status,
    }
}

pub fn set_paused(s: &mut Snapshot, channel: &str, paused: bool, parked: u64) {
    if let Some(t) = s.targets.iter_mut().find(|t| t.channel == channel) {
        t.paused = paused;
        t.parked = parked;
    }
}

/// Records the last outcome on the channel's target (targets are listed in
/// the snapshot from the start, one per configured channel).
fn note_target(s: &mut Snapshot, channel: &str, code: Option<u16>, error: Option<String>) {
    if let Some(t) = s.targets.iter_mut().find(|t| t.channel == channel) {
        t.last_status = code;
        t.last_error = error;
        t.last_attempt_ms = Some(now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
        }
    }

    fn answered(status: u16) -> Posted {
        Posted::Answered { status, retry_after: None }
    }

    #[test]
    fn acks_are_split_into_frames_the_edge_takes() {
        let acks: Vec<(String, String)> = (0..2_500).map(|i| ("crm".to_string(), format!("{i}-0"))).collect();
        let frames = ack_frames(&acks);
        assert_eq!(frames.len(), 3);
        let total: usize = frames.into_iter().map(|f| f.into_acked().map(|a| a.len()).unwrap_or(0)).sum();
        assert_eq!(total, 2_500);
        assert!(ack_frames(&[]).is_empty());
    }

    #[test]
    fn classification_follows_the_contract() {
        let (r, mut h) = (retry(), Health::default());
        assert_eq!(verdict(answered(204), 1, &mut h, &r), Verdict::Ack { status: 204 });
        for status in [408, 429, 500, 503] {
            assert!(matches!(verdict(answered(status), 1, &mut h, &r), Verdict::Retry { .. }), "{status}");
        }
        assert!(matches!(verdict(answered(404), 1, &mut h, &r), Verdict::DeadLetter { status: Some(404), .. }));
        assert!(matches!(verdict(answered(400), 1, &mut h, &r), Verdict::DeadLetter { .. }));
        let after = Some(Duration::from_secs(3));
        let Verdict::Retry { after, .. } = verdict(Posted::Answered { status: 429, retry_after: after }, 1, &mut h, &r)
        else {
            panic!("429 retries")
        };
        assert_eq!(after, Duration::from_secs(1), "Retry-After capped by retry.max_delay");
    }

    #[test]
    fn attempts_run_out_into_the_dlq_for_every_retryable_kind() {
        let (r, mut h) = (retry(), Health::default());
        for posted in [answered(503), Posted::Failed("reset".into()), Posted::TimedOut] {
            h.timeouts = 0;
            let v = verdict(posted, 3, &mut h, &r);
            assert!(
                matches!(&v, Verdict::DeadLetter { reason, .. } if reason.starts_with("gave up after 3 attempts")),
                "{v:?}"
            );
        }
    }

    #[test]
    fn no_answer_parks_instead_of_burning_attempts() {
        let (r, mut h) = (retry(), Health::default());
        assert!(matches!(verdict(Posted::Refused, 1, &mut h, &r), Verdict::Park { .. }), "refused parks at once");
        let mut h = Health::default();
        assert!(matches!(verdict(Posted::TimedOut, 1, &mut h, &r), Verdict::Retry { .. }));
        assert!(matches!(verdict(Posted::TimedOut, 1, &mut h, &r), Verdict::Retry { .. }));
        assert!(matches!(verdict(Posted::TimedOut, 1, &mut h, &r), Verdict::Park { .. }), "third timeout in a row");
        let mut h = Health::default();
        verdict(Posted::TimedOut, 1, &mut h, &r);
        verdict(answered(200), 1, &mut h, &r);
        assert_eq!(h.timeouts, 0, "an answer resets the count");
    }
}
