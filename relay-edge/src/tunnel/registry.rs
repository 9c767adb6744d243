//! Connected agents. One live session per identity: a new session of the
//! same identity replaces the old one (a reconnect after a half-dead link
//! must not wait for the old session's heartbeat deadline), because both
//! would read the same consumer's pending list.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::tls::CertIds;

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session: String,
    pub agent: String,
    pub addr: SocketAddr,
    pub channels: Vec<String>,
    pub connected_at_ms: u64,
    pub cert: CertIds,
    /// The chain the agent presented, end-entity first.
    pub chain: Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// Figures the session keeps current.
    pub live: Arc<Live>,
}

/// Live figures of a session, for `relay-edge agents`.
#[derive(Debug, Default)]
pub struct Live {
    pub in_flight: std::sync::atomic::AtomicU64,
    /// Last heartbeat round trip, microseconds.
    pub rtt_us: std::sync::atomic::AtomicU64,
}

/// How to stop a registered session, and why it was stopped.
#[derive(Clone, Default)]
pub struct Kick {
    pub token: CancellationToken,
    /// Set before `token` is cancelled when the certificate was revoked.
    pub revoked: Arc<AtomicBool>,
}

impl Kick {
    pub fn was_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }
}

#[derive(Default, Clone)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, (SessionInfo, Kick)>>>,
}

impl Registry {
    /// Registers a session, cancelling any older session of the same
    /// agent — if `admitted` (revocation, CA) still holds for it. The check
    /// runs under the registry's lock, and a reload changes what it checks
    /// before it sweeps the registry ([`Registry::revoke_matching`]), so a
    /// session is either refused here or found by the sweep.
    pub fn register(&self, info: SessionInfo, kick: Kick, admitted: impl Fn(&SessionInfo) -> bool) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !admitted(&info) {
            return false;
        }
        let old = map.insert(info.agent.clone(), (info, kick));
        drop(map);
        if let Some((old, kick)) = old {
            tracing::info!(agent = %old.agent, session = %old.session, "session replaced by a newer one");
            kick.token.cancel();
        }
        true
    }

    /// Removes a session if it is still the registered one.
    pub fn remove(&self, agent: &str, session: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(agent).is_some_and(|(i, _)| i.session == session) {
            map.remove(agent);
        }
    }

    /// Drops every session `refused` now refuses; returns how many.
    pub fn revoke_matching(&self, refused: impl Fn(&SessionInfo) -> bool) -> usize {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (info, kick) in map.values() {
            if refused(info) {
                tracing::warn!(agent = %info.agent, session = %info.session, "certificate revoked: dropping the session");
                kick.revoked.store(true, Ordering::SeqCst);
                kick.token.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().map(|(i, _)| i.clone()).collect();
        v.sort_by(|a, b| a.agent.cmp(&b.agent));
        v
    }
}
