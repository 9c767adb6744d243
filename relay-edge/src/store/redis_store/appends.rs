//! Wake-ups for sessions waiting for new entries, so that an idle session
//! holds no Redis connection and sends no command.
//!
//! Every append (ingest, replays) is announced by `PUBLISH`ing
//! `relay:{<channel>}:appended` after the write: by one task per edge at a
//! time, which sends the channels appended to since its last round together,
//! each with its count of appends (see [`Appends::to_announce`]). Each edge
//! has one subscriber connection (`PSUBSCRIBE relay:*:appended`) that wakes
//! **one** session waiting on that channel per append announced
//! (`Notify::notify_one`; with nobody waiting the wake is kept for the next
//! one to wait), so a thousand sessions on one channel cost one read per
//! append, not a thousand. A session's read
//! of new entries reads (without `BLOCK`, on the shared connection), and
//! when nothing was there waits to be woken. Appends by this edge wake at
//! once; its subscriber skips its own publishes (they carry its id). When the subscriber loses its
//! connection it wakes every waiting session (each looks once) and
//! subscribes again. A session that was not woken still looks once every
//! [`RECHECK`], which covers appends by edges that do not publish (an older
//! version during a rolling upgrade).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use foldhash::HashMap;
use futures_util::StreamExt;
use tokio::sync::Notify;

use super::sentinel::Resolver;

/// Longest a waiting session goes without looking for itself.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Most sessions one announcement wakes.
const MAX_WAKES: u64 = 1024;

/// What an announcement carries: the announcing edge's id and how many
/// appends it stands for (`origin:count`).
pub fn payload(origin: u64, count: u64) -> String {
    format!("{origin}:{count}")
}

/// `(origin, count)` of an announcement; a bare id (an edge from before
/// counts) stands for one append.
fn parse_payload(payload: &str) -> Option<(u64, u64)> {
    match payload.split_once(':') {
        Some((origin, count)) => Some((origin.parse().ok()?, count.parse().ok()?)),
        None => Some((payload.parse().ok()?, 1)),
    }
}

/// The pattern the subscriber listens to.
pub const PATTERN: &str = "relay:*:appended";

/// Pub/sub channel announcing appends to `channel`.
pub fn topic(channel: &str) -> String {
    format!("relay:{{{channel}}}:appended")
}

fn channel_of(topic: &str) -> Option<&str> {
    topic.strip_prefix("relay:{")?.strip_suffix("}:appended")
}

/// Per channel (of the configuration: sessions read no other), the
/// sessions waiting for an append.
pub struct Appends {
    channels: Mutex<HashMap<String, Arc<Notify>>>,
    subscribed: AtomicBool,
    /// This edge's id in its announcements (its subscriber skips them).
    origin: u64,
    /// Channels appended to and not yet `PUBLISH`ed, and whether a task
    /// is sending them.
    unannounced: Mutex<Unannounced>,
}

/// Channels appended to and not yet announced, each once (at most the
/// configuration's channels), and whether a task is sending rounds.
#[derive(Default)]
struct Unannounced {
    /// Each channel once, with its appends since the last round.
    channels: Vec<(String, u64)>,
    running: bool,
}

impl Default for Appends {
    fn default() -> Self {
        Self {
            channels: Mutex::default(),
            subscribed: AtomicBool::new(false),
            origin: rand::random(),
            unannounced: Mutex::default(),
        }
    }
}

impl Appends {
    /// What this edge's announcements carry.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// What sessions reading `channel` wait on.
    pub fn waiters(&self, channel: &str) -> Arc<Notify> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.entry(channel.to_string()).or_default().clone()
    }

    /// One append to `channel`: wakes one waiting session.
    pub fn bump(&self, channel: &str) {
        self.bump_n(channel, 1);
    }

    /// `n` appends to `channel`: wakes up to `n` waiting sessions.
    fn bump_n(&self, channel: &str, n: u64) {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiters) = channels.get(channel) {
            (0..n.min(MAX_WAKES)).for_each(|_| waiters.notify_one());
        }
    }

    fn unannounced(&self) -> std::sync::MutexGuard<'_, Unannounced> {
        self.unannounced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to `channels` to announce. `true` when the caller must start
    /// the task that sends rounds ([`Self::next_round`]): none is running.
    pub fn to_announce(&self, channels: &[String]) -> bool {
        let mut u = self.unannounced();
        for c in channels {
            match u.channels.iter_mut().find(|(name, _)| name == c) {
                Some((_, n)) => *n += 1,
                None => u.channels.push((c.clone(), 1)),
            }
        }
        !std::mem::replace(&mut u.running, true)
    }

    /// The channels of the announcing task's next round; `None` ends the
    /// task (under the same lock as [`Self::to_announce`], so an append
    /// either makes this round or starts the next task).
    pub fn next_round(&self) -> Option<Vec<(String, u64)>> {
        let mut u = self.unannounced();
        if u.channels.is_empty() {
            u.running = false;
            return None;
        }
        Some(std::mem::take(&mut u.channels))
    }

    /// Held by the announcing task: should it end before `next_round` said
    /// so (a panic, a cancel), a later append starts a new one.
    pub fn rounds_guard(self: &Arc<Self>) -> RoundsGuard {
        RoundsGuard { appends: self.clone(), finished: false }
    }

    /// Appends may have gone unannounced: wakes every waiting session.
    fn bump_all(&self) {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        for n in channels.values() {
            n.notify_waiters();
        }
    }

    /// Starts this edge's subscriber, once; it ends when the store is gone.
    pub fn ensure_subscribed(self: &Arc<Self>, target: &Arc<Resolver>, timeout: Duration) {
        if self.subscribed.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(subscribe(Arc::downgrade(self), Arc::downgrade(target), timeout));
    }
}

/// See [`Appends::rounds_guard`].
pub struct RoundsGuard {
    appends: Arc<Appends>,
    /// `next_round` ended the task (and cleared `running` itself).
    pub finished: bool,
}

impl Drop for RoundsGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.appends.unannounced().running = false;
        }
    }
}

/// Subscribes, bumps on every message, and subscribes again after a loss
/// (bumping everything, since announcements may have been missed).
async fn subscribe(appends: Weak<Appends>, target: Weak<Resolver>, timeout: Duration) {
    let mut warned = false;
    // On a cluster, which seed node to listen on (the next after a loss):
    // every node hears every `PUBLISH` of the cluster.
    let mut seed = 0usize;
    loop {
        let current = match target.upgrade() {
            Some(t) => t.current(timeout).await,
            None => return,
        };
        let subscribed = match &current {
            Ok(t) => {
                let client = t.subscriber(seed);
                seed = seed.wrapping_add(1);
                tokio::time::timeout(timeout, async move {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.psubscribe(PATTERN).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            Err(e) => Err(e.to_string()),
        };
        match (&subscribed, warned) {
            (Err(e), false) => {
                // Sessions still look every RECHECK; say why they are slow.
                tracing::warn!(error = %e, "cannot subscribe to append announcements (needs PSUBSCRIBE relay:*)");
                warned = true;
            }
            (Ok(_), _) => warned = false,
            _ => {}
        }
        if let (Ok(mut pubsub), Ok(current)) = (subscribed, current) {
            // Anything appended while we were not listening: look once.
            match appends.upgrade() {
                Some(a) => a.bump_all(),
                None => return,
            }
            let mut messages = pubsub.on_message();
            loop {
                // Wake now and then to notice that the store is gone.
                match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                    Ok(Some(msg)) => {
                        let Some(a) = appends.upgrade() else { return };
                        let (origin, count) =
                            msg.get_payload::<String>().ok().and_then(|p| parse_payload(&p)).unwrap_or((0, 1));
                        if let Some(channel) = channel_of(msg.get_channel_name())
                            && origin != a.origin
                        {
                            a.bump_n(channel, count);
                        }
                    }
                    Ok(None) => break,
                    Err(_) if appends.strong_count() == 0 => return,
                    // The store moved to another master (Sentinel): follow it.
                    Err(_) if target.upgrade().and_then(|t| t.get()).is_some_and(|t| !Arc::ptr_eq(&t, &current)) => {
                        break;
                    }
                    Err(_) => {}
                }
            }
            tracing::debug!("append subscriber lost its connection; subscribing again");
        }
        match appends.upgrade() {
            Some(a) => a.bump_all(),
            None => return,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Appends;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn counted(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    }

    #[test]
    fn appends_during_a_round_go_out_together_in_the_next_each_once() {
        let a = Appends::default();
        assert!(a.to_announce(&names(&["crm"])), "the first append starts the task");
        assert_eq!(a.next_round(), Some(counted(&[("crm", 1)])));
        // While that round's PUBLISH is in flight:
        assert!(!a.to_announce(&names(&["crm", "erp"])), "a task is running");
        assert!(!a.to_announce(&names(&["crm"])));
        assert_eq!(a.next_round(), Some(counted(&[("crm", 2), ("erp", 1)])), "each channel once, with its appends");
        assert_eq!(a.next_round(), None, "nothing left: the task ends");
        assert!(a.to_announce(&names(&["erp"])), "after the end, an append starts a task again");
        assert_eq!(a.next_round(), Some(counted(&[("erp", 1)])));
    }

    #[test]
    fn no_append_is_left_unannounced_whatever_the_interleaving() {
        // Threads append unique channels; whoever is told to start the task
        // runs its rounds right there. Random interleavings of appends with
        // the task's last look: every channel comes out of exactly one
        // round, and no task is left marked running.
        use std::sync::{Arc, Mutex};
        let a = Arc::new(Appends::default());
        let out = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (a, out) = (a.clone(), out.clone());
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        if a.to_announce(&[format!("{t}-{i}")]) {
                            while let Some(round) = a.next_round() {
                                out.lock().expect("lock").extend(round.into_iter().map(|(c, _)| c));
                            }
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().expect("appender thread"));
        let mut out = out.lock().expect("lock").clone();
        out.sort();
        let mut all: Vec<String> = (0..8).flat_map(|t| (0..2000).map(move |i| format!("{t}-{i}"))).collect();
        all.sort();
        assert_eq!(out, all, "each append announced once");
        assert!(!a.unannounced().running, "no task left marked running");
    }

    #[test]
    fn announcements_carry_their_origin_and_count() {
        assert_eq!(super::parse_payload(&super::payload(42, 7)), Some((42, 7)));
        assert_eq!(super::parse_payload("42"), Some((42, 1)), "an edge from before counts: one append");
        assert_eq!(super::parse_payload("x:1"), None);
    }

    #[test]
    fn topics_name_their_channel() {
        assert_eq!(super::topic("crm"), "relay:{crm}:appended");
        assert_eq!(super::channel_of("relay:{crm}:appended"), Some("crm"));
        assert_eq!(super::channel_of("relay:{crm}:stream"), None);
    }
}
