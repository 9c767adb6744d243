//! Authentication of a webhook: the API key (from `X-API-Key`, a path
//! segment or `?api_key=`), compared in constant time over SHA-256 digests
//! so neither content nor length leaks through timing — keys may be given
//! in config as they are or as `sha256:<hex>` — and Meta's
//! `X-Hub-Signature-256` HMAC over the exact raw body bytes.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// A route's API keys as SHA-256 digests, computed once (config load),
/// not per request.
#[derive(Clone, Default)]
pub struct KeyDigests(Vec<[u8; 32]>);

impl KeyDigests {
    /// Keys given as they are are hashed; `sha256:<hex>` ones decoded.
    pub fn of(keys: &[Secret]) -> Self {
        Self(
            keys.iter()
                .map(|key| match key.expose().strip_prefix("sha256:").and_then(|h| hex::decode(h).ok()) {
                    Some(d) if d.len() == 32 => d.try_into().unwrap_or([0; 32]),
                    _ => Sha256::digest(key.expose().as_bytes()).into(),
                })
                .collect(),
        )
    }
}

/// Index of the key in `keys` that `candidate` matches. Every key is
/// compared, so the time does not depend on which one matched.
pub fn match_key(candidate: &str, keys: &KeyDigests) -> Option<usize> {
    let cand = Sha256::digest(candidate.as_bytes());
    let mut found = None;
    for (i, digest) in keys.0.iter().enumerate() {
        if bool::from(cand.as_slice().ct_eq(digest)) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Constant-time equality of two secrets of any length.
pub fn secret_eq(a: &str, b: &str) -> bool {
    bool::from(Sha256::digest(a.as_bytes()).ct_eq(&Sha256::digest(b.as_bytes())))
}

/// Verifies `X-Hub-Signature-256: sha256=<hex>` over `body` with `secret`.
pub fn signature_valid(secret: &str, header: Option<&[u8]>, body: &[u8]) -> bool {
    let Some(hex_sig) = header.and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| h.trim().strip_prefix("sha256="))
    else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `sha256=<hex>` signature of `body`, as Meta sends it (for tests and tools).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_rotation_key_plain_or_hashed() {
        let hashed = format!("sha256:{}", hex::encode(Sha256::digest(b"new-key-456")));
        let keys = KeyDigests::of(&[Secret::new("old-key-123"), Secret::new(hashed)]);
        assert_eq!(match_key("new-key-456", &keys), Some(1));
        assert_eq!(match_key("old-key-123", &keys), Some(0));
        assert_eq!(match_key("new-key-45", &keys), None);
        assert_eq!(match_key("", &keys), None);
    }

    #[test]
    fn signature_is_checked_over_raw_bytes() {
        let body = br#"{"text":"caf\u00e9"}"#;
        let sig = sign("s3cret", body);
        assert!(signature_valid("s3cret", Some(sig.as_bytes()), body));
        assert!(!signature_valid("s3cret", Some(sig.as_bytes()), "{\"text\":\"café\"}".as_bytes()));
        assert!(!signature_valid("other", Some(sig.as_bytes()), body));
        assert!(!signature_valid("s3cret", None, body));
        assert!(!signature_valid("s3cret", Some(b"sha256=zz"), body));
    }
}
