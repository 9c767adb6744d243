//! Wake-ups on append: ingest notifies the sessions of a channel as soon as
//! its `XADD` returned, so a waiting session reads at once instead of
//! waiting out a blocking read. Sessions also poll every `store.poll` for
//! entries appended by other edges sharing the Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One `Notify` per configured channel.
#[derive(Default)]
pub struct Wakers {
    by_channel: HashMap<String, Arc<Notify>>,
}

impl Wakers {
    pub fn new<'a>(channels: impl IntoIterator<Item = &'a String>) -> Self {
        Self { by_channel: channels.into_iter().map(|c| (c.clone(), Arc::new(Notify::new()))).collect() }
    }

    /// Wakes every session waiting on `channel`.
    pub fn wake(&self, channel: &str) {
        if let Some(n) = self.by_channel.get(channel) {
            n.notify_waiters();
        }
    }

    pub fn get(&self, channel: &str) -> Option<Arc<Notify>> {
        self.by_channel.get(channel).cloned()
    }
}

/// Waits until one of `notifies` fires, `poll` passes, or `cancel`. The
/// `Notified` futures must be created (and enabled) *before* the read that
/// found nothing, so an append in between is not missed: that is what
/// `armed` holds.
pub async fn wait(
    armed: Vec<std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>>>,
    poll: Duration,
    cancel: &CancellationToken,
) {
    if armed.is_empty() {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        return;
    }
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(poll) => {}
        _ = futures_util::future::select_all(armed) => {}
    }
}
