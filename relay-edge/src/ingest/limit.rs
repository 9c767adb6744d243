//! Rate limits of the ingest listener (GCRA, `governor`): per client IP
//! before anything else, and per API key once the key is known. Over the
//! limit: `429` with `Retry-After`. Keys are identified by route and
//! position, never by their text.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::IngestConfig;
use crate::error::IngestError;

pub struct Limiter {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_key: Option<DefaultKeyedRateLimiter<(String, usize)>>,
    /// Probes of the public `/health`, per client IP: [`HEALTH_RATE`].
    health: DefaultKeyedRateLimiter<IpAddr>,
}

/// Public `/health` probes per second per client IP, and the burst above
/// that: plenty for a load balancer, nothing for a flood.
pub const HEALTH_RATE: (u32, u32) = (5, 10);

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

fn retry_after(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> u64 {
    not_until.wait_time_from(DefaultClock::default().now()).as_secs_f64().ceil().max(1.0) as u64
}

impl Limiter {
    pub fn new(cfg: &IngestConfig) -> Self {
        Self {
            per_ip: quota(cfg.rate_per_ip, cfg.burst_per_ip).map(RateLimiter::keyed),
            per_key: quota(cfg.rate_per_key, cfg.burst_per_key).map(RateLimiter::keyed),
            health: RateLimiter::keyed(
                quota(HEALTH_RATE.0, HEALTH_RATE.1).unwrap_or_else(|| unreachable!("a non-zero constant")),
            ),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), IngestError> {
        match &self.per_ip {
            Some(l) => l.check_key(&ip).map_err(|n| IngestError::RateLimited { retry_after: retry_after(&n) }),
            None => Ok(()),
        }
    }

    pub fn check_health(&self, ip: IpAddr) -> Result<(), IngestError> {
        self.health.check_key(&ip).map_err(|n| IngestError::RateLimited { retry_after: retry_after(&n) })
    }

    pub fn check_key(&self, route: &str, key_index: usize) -> Result<(), IngestError> {
        match &self.per_key {
            Some(l) => l
                .check_key(&(route.to_string(), key_index))
                .map_err(|n| IngestError::RateLimited { retry_after: retry_after(&n) }),
            None => Ok(()),
        }
    }

    /// Forgets idle clients so the maps stay small.
    pub fn shrink(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
        }
        if let Some(l) = &self.per_key {
            l.retain_recent();
        }
        self.health.retain_recent();
    }
}
