//! Decoding of stream replies from raw [`redis::Value`]s. Hand-rolled rather
//! than `StreamReadReply` because a pending entry that was trimmed comes back
//! with nil fields, and that must be reported, not fail the whole read.

use std::collections::HashMap;

use redis::Value;

use crate::error::StoreError;
use crate::store::RawEntry;
use crate::store::keys;

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn pairs(v: Value) -> Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// `XREADGROUP`/`XREAD` reply: streams → entries.
pub fn read_reply(v: Value) -> Result<Vec<RawEntry>, StoreError> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m,
        Value::Array(items) => items
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        other => {
            return Err(StoreError::Corrupt { id: "XREADGROUP".into(), why: format!("unexpected reply {other:?}") });
        }
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let key = text(&key).unwrap_or_default();
        let channel = keys::channel_of(&key).unwrap_or_default().to_string();
        for mut e in self::entries(entries)? {
            e.channel = channel.clone();
            out.push(e);
        }
    }
    Ok(out)
}

/// A list of `[id, fields|nil]` entries.
pub fn entries(v: Value) -> Result<Vec<RawEntry>, StoreError> {
    let Value::Array(items) = v else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields_v = if parts.len() > 1 { parts.remove(1) } else { Value::Nil };
        let Some(id) = text(&parts[0]) else { continue };
        let fields = match fields_v {
            Value::Nil => None,
            other => Some(pairs(other).into_iter().filter_map(|(k, v)| Some((text(&k)?, bytes(v)))).collect()),
        };
        out.push(RawEntry { channel: String::new(), id, fields });
    }
    Ok(out)
}

/// A flat list of ids.
pub fn ids(v: Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().filter_map(text).collect(),
        _ => Vec::new(),
    }
}

/// Extended `XPENDING` reply: `[[id, consumer, idle, count], …]`.
pub fn pending_counts(v: Value) -> HashMap<String, u32> {
    let Value::Array(items) = v else {
        return HashMap::new();
    };
    items
        .into_iter()
        .filter_map(|item| match item {
            Value::Array(p) if p.len() >= 4 => {
                let id = text(&p[0])?;
                let count = match &p[3] {
                    Value::Int(n) => u32::try_from(*n).ok()?,
                    other => text(other)?.parse().ok()?,
                };
                Some((id, count))
            }
            _ => None,
        })
        .collect()
}

/// Summary `XPENDING` reply: `[count, smallest id, greatest id, consumers]`.
pub fn pending_summary(v: Value) -> (u64, Option<String>) {
    let Value::Array(p) = v else { return (0, None) };
    let count = match p.first() {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    (count, p.get(1).and_then(text))
}

/// The fields of one group from `XINFO GROUPS`.
#[derive(Debug, Default)]
pub struct GroupInfo {
    pub last_delivered: Option<String>,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell.
    pub lag: Option<u64>,
}

pub fn group_info(v: Value, group: &str) -> GroupInfo {
    let Value::Array(groups) = v else {
        return GroupInfo::default();
    };
    for g in groups {
        let fields: HashMap<String, Value> = pairs(g).into_iter().filter_map(|(k, v)| Some((text(&k)?, v))).collect();
        if fields.get("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        return GroupInfo {
            last_delivered: fields.get("last-delivered-id").and_then(text),
            lag: match fields.get("lag") {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            },
        };
    }
    GroupInfo::default()
}

/// `length` and `last-generated-id` of an `XINFO STREAM` reply.
pub fn stream_info(v: Value) -> (u64, Option<String>) {
    let mut length = 0;
    let mut last = None;
    for (k, v) in pairs(v) {
        match text(&k).as_deref() {
            Some("length") => length = text(&v).and_then(|l| l.parse().ok()).unwrap_or(0),
            Some("last-generated-id") => last = text(&v),
            _ => {}
        }
    }
    (length, last)
}
