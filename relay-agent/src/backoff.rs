//! Capped exponential backoff with jitter, for reconnects and retries.

use std::time::Duration;

use rand::Rng;

/// Delay before try number `n` (1-based): `initial × multiplier^(n-1)`,
/// capped at `max`, then jittered into `[d/2, d]` so agents that lost the
/// edge together do not come back in lockstep.
pub fn delay(n: u32, initial: Duration, multiplier: f64, max: Duration) -> Duration {
    let exp = multiplier.powi(n.saturating_sub(1).min(64) as i32);
    let base = initial.as_secs_f64() * exp;
    let capped = base.min(max.as_secs_f64()).max(0.0);
    let jittered = rand::rng().random_range(capped / 2.0..=capped.max(f64::MIN_POSITIVE));
    Duration::from_secs_f64(jittered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let i = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for _ in 0..100 {
            let d1 = delay(1, i, 2.0, max);
            assert!(d1 >= Duration::from_millis(50) && d1 <= i, "{d1:?}");
            let d4 = delay(4, i, 2.0, max);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800), "{d4:?}");
            assert!(delay(40, i, 2.0, max) <= max);
        }
    }
}
