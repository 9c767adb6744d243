//! Which Redis the store talks to: the one `store.redis_url` names, the
//! cluster of `store.redis_cluster`, or the master that the sentinels name
//! for `store.sentinel_master`.
//!
//! Through Sentinel the master is resolved on first use, and again when a
//! command fails in a way a failover explains (the store calls
//! [`Resolver::failed`]): the sentinels are asked for the master's address
//! (and the server there must say it is a master: `ROLE`), and when it
//! moved, new connections replace the old ones. Re-resolving happens at
//! most once per [`RESOLVE_EVERY`] however many commands fail at once.
//! The redis-rs Sentinel client does not follow a failover by itself.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Target, redis_err};
use crate::config::StoreConfig;
use crate::error::StoreError;

/// Least time between two resolutions of the master.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(500);

pub struct Resolver {
    /// The target in use; `None` until the sentinels named a master.
    current: RwLock<Option<Arc<Target>>>,
    /// Set for Sentinel; a fixed URL has nothing to resolve.
    sentinel: Option<SentinelSource>,
    replica_wait: Option<Duration>,
}

struct SentinelSource {
    master: String,
    /// Password and database of the master (from `store.redis_url`).
    node: SentinelNodeConnectionInfo,
    /// The sentinels; one resolution at a time, and when it last ran.
    state: Mutex<(Sentinel, Option<Instant>)>,
}

impl Resolver {
    pub fn new(cfg: &StoreConfig, replica_wait: Option<Duration>) -> Result<Self, StoreError> {
        if let Some(seeds) = cfg.cluster() {
            let target = Target::cluster(&seeds, cfg.command_timeout, replica_wait)?;
            return Ok(Self { current: RwLock::new(Some(Arc::new(target))), sentinel: None, replica_wait });
        }
        let Some((master, addrs)) = cfg.sentinel() else {
            let url = cfg.redis().unwrap_or_default();
            let client = redis::Client::open(url).map_err(redis_err("open"))?;
            let target = Target::new(client, cfg.command_timeout, replica_wait)?;
            return Ok(Self { current: RwLock::new(Some(Arc::new(target))), sentinel: None, replica_wait });
        };
        let sentinel = Sentinel::build(addrs).map_err(redis_err("open sentinels"))?;
        let mut node = SentinelNodeConnectionInfo::default();
        if let Some(url) = cfg.redis() {
            let client = redis::Client::open(url).map_err(redis_err("open"))?;
            node = node.set_redis_connection_info(client.get_connection_info().redis_settings().clone());
        }
        let source = SentinelSource { master: master.to_string(), node, state: Mutex::new((sentinel, None)) };
        Ok(Self { current: RwLock::new(None), sentinel: Some(source), replica_wait })
    }

    /// The target in use, if any yet.
    pub fn get(&self) -> Option<Arc<Target>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The target in use, resolved now if none is yet.
    pub async fn current(&self, timeout: Duration) -> Result<Arc<Target>, StoreError> {
        if let Some(t) = self.get() {
            return Ok(t);
        }
        self.resolve(timeout, true).await
    }

    /// A command failed in a way a failover explains: ask the sentinels
    /// again (at most every [`RESOLVE_EVERY`]). Errors are logged; the
    /// next failure tries again.
    pub async fn failed(&self, timeout: Duration) {
        // A resolution already running answers for this failure too.
        if self.sentinel.is_some()
            && let Err(e) = self.resolve(timeout, false).await
        {
            tracing::warn!(error = %e, "cannot resolve the Redis master through Sentinel");
        }
    }

    /// Asks the sentinels (one at a time; `wait`: behind one running now,
    /// else not at all), at most every [`RESOLVE_EVERY`]: within it, the
    /// target in use, or a fast error while none is known.
    async fn resolve(&self, timeout: Duration, wait: bool) -> Result<Arc<Target>, StoreError> {
        let unknown = || StoreError::Timeout { op: "resolve the Redis master through Sentinel", ms: 0 };
        let Some(source) = &self.sentinel else {
            return self.get().ok_or_else(unknown);
        };
        let mut state = match wait {
            true => source.state.lock().await,
            false => match source.state.try_lock() {
                Ok(state) => state,
                Err(_) => return self.get().ok_or_else(unknown),
            },
        };
        let (sentinel, last) = &mut *state;
        if let Some(at) = *last
            && at.elapsed() < RESOLVE_EVERY
        {
            return self.get().ok_or_else(unknown);
        }
        *last = Some(Instant::now());
        let found = tokio::time::timeout(timeout, sentinel.async_master_for(&source.master, Some(&source.node)))
            .await
            .map_err(|_| StoreError::Timeout { op: "SENTINEL get-master-addr-by-name", ms: timeout.as_millis() })?
            .map_err(redis_err("SENTINEL get-master-addr-by-name"))?;
        let addr = found.get_connection_info().addr().to_string();
        if let Some(current) = self.get()
            && current.client().get_connection_info().addr().to_string() == addr
        {
            return Ok(current);
        }
        let target = Arc::new(Target::new(found, timeout, self.replica_wait)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(target.clone());
        tracing::info!(master = %source.master, %addr, "Redis master resolved through Sentinel");
        Ok(target)
    }
}
