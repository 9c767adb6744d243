//! Connected agents. One live session per identity: a new session of the
//! same identity replaces the old one (a reconnect after a half-dead link
//! must not wait for the old session's heartbeat deadline), because both
//! would read the same consumer's pending list.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session: String,
    pub agent: String,
    pub addr: SocketAddr,
    pub channels: Vec<String>,
    pub connected_at_ms: u64,
}

#[derive(Default, Clone)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, (SessionInfo, CancellationToken)>>>,
}

impl Registry {
    /// Registers a session, cancelling any older session of the same agent.
    pub fn register(&self, info: SessionInfo, cancel: CancellationToken) {
        let old = self.inner.lock().unwrap_or_else(|p| p.into_inner()).insert(info.agent.clone(), (info, cancel));
        if let Some((old, token)) = old {
            tracing::info!(agent = %old.agent, session = %old.session, "session replaced by a newer one");
            token.cancel();
        }
    }

    /// Removes a session if it is still the registered one.
    pub fn remove(&self, agent: &str, session: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(agent).is_some_and(|(i, _)| i.session == session) {
            map.remove(agent);
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().map(|(i, _)| i.clone()).collect();
        v.sort_by(|a, b| a.agent.cmp(&b.agent));
        v
    }
}
