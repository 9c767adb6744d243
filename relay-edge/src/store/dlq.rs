//! Dead letters and replay.
//!
//! A DLQ entry keeps the webhook bytes verbatim (field `w`), the stream id
//! it had, the reason, the last HTTP status and the attempt count. Replay
//! appends the same webhook bytes to the channel's stream as a new entry,
//! so the webhook id (`X-Relay-Id`) is unchanged and receivers can
//! de-duplicate; the DLQ entry is removed in the same `MULTI`.

use redis::Value;
use relay_protocol::Webhook;

use super::{Store, keys, parse};
use crate::error::StoreError;

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    /// Id in the DLQ stream.
    pub id: String,
    /// Id the webhook had in the channel stream.
    pub stream_id: String,
    pub reason: String,
    pub attempts: u32,
    pub status: Option<u16>,
    pub failed_at_ms: u64,
    pub raw: Option<Vec<u8>>,
}

impl DeadEntry {
    fn from_raw(raw: parse::RawEntry) -> Self {
        let text = |k: &str| raw.field(k).map(|v| String::from_utf8_lossy(&v).into_owned());
        Self {
            stream_id: text("stream_id").unwrap_or_default(),
            reason: text("reason").unwrap_or_default(),
            attempts: text("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
            status: text("status").and_then(|v| v.parse().ok()),
            failed_at_ms: text("failed_at_ms").and_then(|v| v.parse().ok()).unwrap_or(0),
            raw: raw.field(keys::FIELD_WEBHOOK),
            id: raw.id,
        }
    }

    pub fn webhook(&self) -> Option<Webhook> {
        rmp_serde::from_slice(self.raw.as_deref()?).ok()
    }
}

impl Store {
    /// Dead letters of a channel, oldest first, starting after `after`.
    pub async fn dlq_list(
        &self,
        channel: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, StoreError> {
        let start = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
        let v: Value = self
            .run("XRANGE", redis::cmd("XRANGE").arg(keys::dlq(channel)).arg(start).arg("+").arg("COUNT").arg(count))
            .await?;
        Ok(parse::entries(v)?.into_iter().map(DeadEntry::from_raw).collect())
    }

    pub async fn dlq_get(&self, channel: &str, id: &str) -> Result<Option<DeadEntry>, StoreError> {
        let v: Value = self.run("XRANGE", redis::cmd("XRANGE").arg(keys::dlq(channel)).arg(id).arg(id)).await?;
        Ok(parse::entries(v)?.into_iter().next().map(DeadEntry::from_raw))
    }

    pub async fn dlq_len(&self, channel: &str) -> Result<u64, StoreError> {
        self.run("XLEN", redis::cmd("XLEN").arg(keys::dlq(channel))).await
    }

    /// Moves one dead letter back into the channel stream as a new entry.
    /// Returns the new stream id, or `None` when it holds no webhook.
    pub async fn dlq_replay_one(&self, channel: &str, entry: &DeadEntry) -> Result<Option<String>, StoreError> {
        let Some(raw) = &entry.raw else { return Ok(None) };
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XADD").arg(keys::stream(channel)).arg("*").arg(keys::FIELD_WEBHOOK).arg(raw.as_slice());
        pipe.cmd("XDEL").arg(keys::dlq(channel)).arg(&entry.id).ignore();
        let (id,): (String,) = self.run_pipe("dlq replay", &pipe).await?;
        Ok(Some(id))
    }

    /// Deletes dead letters older than `before_ms`, or all of them.
    pub async fn dlq_purge(&self, channel: &str, before_ms: Option<u64>) -> Result<u64, StoreError> {
        match before_ms {
            Some(ms) => self.run("XTRIM", redis::cmd("XTRIM").arg(keys::dlq(channel)).arg("MINID").arg(ms)).await,
            None => {
                let n = self.dlq_len(channel).await?;
                let _: Value = self.run("DEL", redis::cmd("DEL").arg(keys::dlq(channel))).await?;
                Ok(n)
            }
        }
    }

    /// Re-appends the webhooks received in `[since_ms, until_ms]` (from the
    /// stream's retained history, acknowledged or not) as new entries, in
    /// their original order. Returns how many were replayed.
    pub async fn replay_range(&self, channel: &str, since_ms: u64, until_ms: u64) -> Result<u64, StoreError> {
        const PAGE: usize = 500;
        let mut start = since_ms.to_string();
        let end = format!("{until_ms}-18446744073709551615");
        let mut replayed = 0;
        loop {
            let v: Value = self
                .run(
                    "XRANGE",
                    redis::cmd("XRANGE").arg(keys::stream(channel)).arg(&start).arg(&end).arg("COUNT").arg(PAGE),
                )
                .await?;
            let page = parse::entries(v)?;
            let Some(last) = page.last() else { break };
            start = format!("({}", last.id);
            let full = page.len() == PAGE;
            let mut pipe = redis::pipe();
            let mut n = 0;
            for raw in &page {
                if let Some(w) = raw.field(keys::FIELD_WEBHOOK) {
                    pipe.cmd("XADD").arg(keys::stream(channel)).arg("*").arg(keys::FIELD_WEBHOOK).arg(w).ignore();
                    n += 1;
                }
            }
            if n > 0 {
                let _: Value = self.run_pipe("replay", &pipe).await?;
                replayed += n;
            }
            if !full {
                break;
            }
        }
        Ok(replayed)
    }
}
