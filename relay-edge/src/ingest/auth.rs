//! API keys: accepted from `X-API-Key`, a path segment or `?api_key=`;
//! compared in constant time over SHA-256 digests so neither content nor
//! length leaks through timing. Keys are never logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// True when `candidate` equals one of `keys`. Every key is compared, so
/// the time does not depend on which one matched.
pub fn key_matches(candidate: &str, keys: &[Secret]) -> bool {
    let cand = Sha256::digest(candidate.as_bytes());
    keys.iter().fold(false, |found, key| {
        let k = Sha256::digest(key.expose().as_bytes());
        found | bool::from(cand.ct_eq(&k))
    })
}

/// Constant-time equality of two secrets of any length.
pub fn secret_eq(a: &str, b: &str) -> bool {
    bool::from(Sha256::digest(a.as_bytes()).ct_eq(&Sha256::digest(b.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_rotation_key() {
        let keys = vec![Secret::new("old-key-123"), Secret::new("new-key-456")];
        assert!(key_matches("new-key-456", &keys));
        assert!(key_matches("old-key-123", &keys));
        assert!(!key_matches("new-key-45", &keys));
        assert!(!key_matches("", &keys));
    }
}
