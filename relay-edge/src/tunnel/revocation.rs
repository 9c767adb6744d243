//! The revocation-entry grammar, in one place: what an item of
//! `tunnel.revoked` or a line of `tunnel.revoked_file` may say, and which
//! certificates it names. Config validation, the list-file reader, the
//! match against a peer's certificate and `relay-edge certs revoke` all go
//! through [`Revocation`] and [`list_entries`].
//!
//! An entry is one of
//! - `sha256:<64 hex digits>`: the SHA-256 of the certificate's DER, as
//!   `relay-edge certs fingerprint` prints it;
//! - `serial:<hex>`: the serial number, any number of digits (serials are
//!   printed without leading zeros, so an odd count is normal), after an
//!   optional `0x`; leading zeros do not count.
//!
//! Hex digits may be upper or lower case; the prefixes (`sha256:`,
//! `serial:`, `0x`) are lowercase. An entry is taken as it is, not
//! trimmed; the list file's lines are trimmed and may carry `#` comments.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::tls::CertIds;

/// One parsed revocation entry, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// SHA-256 of the certificate's DER: 64 lowercase hex digits.
    Fingerprint(String),
    /// Serial number: lowercase hex without leading zeros (`0` for zero).
    Serial(String),
}

/// Why an entry is not a [`Revocation`]; each names the entry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RevocationError {
    #[error("`{0}`: a `sha256:` fingerprint must carry 64 hex digits")]
    Fingerprint(String),
    #[error("`{0}`: a `serial:` must carry hex digits (after an optional `0x`)")]
    Serial(String),
    #[error("`{0}` is not sha256:<64 hex> or serial:<hex>")]
    Form(String),
}

impl FromStr for Revocation {
    type Err = RevocationError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let all_hex = |h: &str| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit());
        match entry.split_once(':') {
            Some(("sha256", h)) if h.len() == 64 && all_hex(h) => Ok(Self::Fingerprint(h.to_ascii_lowercase())),
            Some(("sha256", _)) => Err(RevocationError::Fingerprint(entry.into())),
            Some(("serial", h)) => {
                let digits = h.trim_start_matches("0x");
                if all_hex(digits) {
                    Ok(Self::Serial(canonical_serial(digits)))
                } else {
                    Err(RevocationError::Serial(entry.into()))
                }
            }
            _ => Err(RevocationError::Form(entry.into())),
        }
    }
}

impl fmt::Display for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fingerprint(h) => write!(f, "sha256:{h}"),
            Self::Serial(s) => write!(f, "serial:{s}"),
        }
    }
}

impl Revocation {
    /// Whether this entry names the certificate with `ids`.
    pub fn names(&self, ids: &CertIds) -> bool {
        match self {
            Self::Fingerprint(h) => ids.fingerprint.strip_prefix("sha256:") == Some(h.as_str()),
            // A certificate whose serial could not be read has `serial:`,
            // which no entry names (the canonical form is never empty).
            Self::Serial(s) => ids.serial.strip_prefix("serial:") == Some(s.as_str()),
        }
    }

    /// Parses every entry of `entries`; the first bad one is the error.
    pub fn parse_all<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Vec<Self>, RevocationError> {
        entries.into_iter().map(str::parse::<Self>).collect()
    }
}

/// The entries of a revocation list file (`tunnel.revoked_file`): one per
/// line, trimmed, after dropping `#` comments and blank lines. Not parsed:
/// each item is for [`Revocation`]'s `FromStr`. Yields (line number from
/// 1, entry).
pub fn list_entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or_default().trim()))
        .filter(|(_, l)| !l.is_empty())
}

/// `hex` (hex digits only) as lowercase without leading zeros, `0` for
/// zero or nothing: how serials are compared and printed.
pub(crate) fn canonical_serial(hex: &str) -> String {
    let lower = hex.to_ascii_lowercase();
    let digits = lower.trim_start_matches('0');
    if digits.is_empty() { "0".into() } else { digits.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    type Parsed = Result<Revocation, RevocationError>;

    fn parse(entry: &str) -> Parsed {
        entry.parse()
    }

    #[test]
    fn fingerprints_are_64_hex_digits_in_either_case() {
        assert_eq!(parse(&format!("sha256:{FP}")), Ok(Revocation::Fingerprint(FP.into())));
        let upper = format!("sha256:{}", FP.to_ascii_uppercase());
        assert_eq!(parse(&upper), Ok(Revocation::Fingerprint(FP.into())));
    }

    #[test]
    fn serials_are_canonical_whatever_their_length_zeros_or_case() {
        let serial = |s: &str| -> Parsed { Ok(Revocation::Serial(s.into())) };
        // Serials are printed without leading zeros (`certs fingerprint`).
        let odd = "145f75e79fc981d4851423583b0f47acbb18a0c";
        assert_eq!(parse(&format!("serial:{odd}")), serial(odd));
        assert_eq!(parse("serial:0x0a1"), serial("a1"));
        assert_eq!(parse("serial:00A1"), serial("a1"));
        assert_eq!(parse("serial:0x0x1"), serial("1"));
        assert_eq!(parse("serial:000"), serial("0"));
    }

    #[test]
    fn each_bad_form_has_its_error_naming_the_entry() {
        let fp = |e: &str| -> Parsed { Err(RevocationError::Fingerprint(e.into())) };
        let serial = |e: &str| -> Parsed { Err(RevocationError::Serial(e.into())) };
        let form = |e: &str| -> Parsed { Err(RevocationError::Form(e.into())) };
        assert_eq!(parse("sha256:abcd"), fp("sha256:abcd"));
        assert_eq!(parse("sha256:"), fp("sha256:"));
        let not_hex = format!("sha256:{}", "g".repeat(64));
        assert_eq!(parse(&not_hex), fp(&not_hex));
        // Not trimmed: a trailing space makes 65 characters.
        let spaced = format!("sha256:{FP} ");
        assert_eq!(parse(&spaced), fp(&spaced));
        assert_eq!(parse("serial:"), serial("serial:"));
        assert_eq!(parse("serial:0x"), serial("serial:0x"));
        assert_eq!(parse("serial:12g4"), serial("serial:12g4"));
        // Only a lowercase `0x`, and no `:` between the bytes.
        assert_eq!(parse("serial:0X1a"), serial("serial:0X1a"));
        assert_eq!(parse("serial:ab:cd"), serial("serial:ab:cd"));
        // The prefixes are lowercase and the entry is not trimmed.
        let upper = format!("SHA256:{FP}");
        assert_eq!(parse(&upper), form(&upper));
        let leading = format!(" sha256:{FP}");
        assert_eq!(parse(&leading), form(&leading));
        // No other forms: not a name, not a CN.
        for e in ["", "lan-1", "CN=lan-1", "cn:lan-1", "md5:abcd"] {
            assert_eq!(parse(e), form(e));
        }
        let msg = parse("serial:12g4").expect_err("bad").to_string();
        assert!(msg.contains("`serial:12g4`"), "{msg}");
    }

    #[test]
    fn display_is_the_canonical_entry() {
        for e in [format!("sha256:{FP}"), "serial:a1".to_string()] {
            assert_eq!(parse(&e).expect("valid").to_string(), e);
        }
        assert_eq!(parse("serial:0x00A1").expect("valid").to_string(), "serial:a1");
    }

    #[test]
    fn entries_name_the_certificate_by_fingerprint_or_serial() {
        let ids = CertIds { fingerprint: format!("sha256:{FP}"), serial: "serial:a1".into() };
        let names = |e: &str| parse(e).expect("valid").names(&ids);
        assert!(names(&format!("sha256:{}", FP.to_ascii_uppercase())));
        assert!(names("serial:0x00A1"));
        assert!(!names("serial:a10"));
        assert!(!names(&format!("sha256:{}", "0".repeat(64))));
        // A certificate without a readable serial is named by no serial.
        let unread = CertIds { fingerprint: ids.fingerprint.clone(), serial: "serial:".into() };
        assert!(!parse("serial:0").expect("valid").names(&unread));
    }

    #[test]
    fn a_certificate_is_named_by_its_own_printed_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::certs::init(dir.path(), &["localhost".into()], false).expect("init");
        let ids = crate::certs::fingerprint(&dir.path().join("edge.pem")).expect("ids");
        for printed in [&ids.fingerprint, &ids.serial] {
            let entry = parse(printed).expect("valid");
            assert!(entry.names(&ids), "{printed}");
            assert_eq!(&entry.to_string(), printed);
        }
    }

    #[test]
    fn list_files_drop_comments_blank_lines_and_indentation() {
        let text = "# revoked agents\n\n  sha256:ab # lan-2, 2024\nserial:1f\n\t# gone\n   \n";
        let entries: Vec<_> = list_entries(text).collect();
        assert_eq!(entries, vec![(3, "sha256:ab"), (4, "serial:1f")]);
        assert!(Revocation::parse_all(["serial:1f", "serial:2"]).is_ok());
        assert_eq!(Revocation::parse_all(["serial:1f", "nope"]), Err(RevocationError::Form("nope".into())));
    }
}
