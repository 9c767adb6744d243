//! Dead letters and replay.
//!
//! A DLQ entry keeps the webhook bytes verbatim (field `w`), the stream id
//! it had, the reason, the last HTTP status and the attempt count. Replay
//! appends the same webhook bytes to the channel's stream as a new entry,
//! so the webhook id (`X-Relay-Id`) is unchanged and receivers can
//! de-duplicate; the DLQ entry is removed in the same script.

use super::parse::Item;
use super::{DeadEntry, keys};

/// A DLQ stream entry's fields as a [`DeadEntry`].
pub fn dead_entry(raw: Item) -> DeadEntry {
    let text = |k: &str| raw.field(k).map(|v| String::from_utf8_lossy(v).into_owned());
    DeadEntry {
        stream_id: text("stream_id").and_then(|v| v.parse().ok()).unwrap_or_default(),
        reason: text("reason").unwrap_or_default(),
        attempts: text("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
        status: text("status").and_then(|v| v.parse().ok()),
        failed_at_ms: text("failed_at_ms").and_then(|v| v.parse().ok()).unwrap_or(0),
        raw: raw.field(keys::FIELD_WEBHOOK).map(<[u8]>::to_vec),
        id: raw.id,
    }
}
