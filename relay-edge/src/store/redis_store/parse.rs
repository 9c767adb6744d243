//! Decoding of stream replies from raw [`redis::Value`]s. Hand-rolled rather
//! than `StreamReadReply` because a pending entry that was trimmed comes back
//! with nil fields, and that must be reported, not fail the whole read.

use std::collections::HashMap;

use redis::Value;

use crate::error::StoreError;
use crate::store::{Stored, StreamId, Unreadable, keys};

/// One entry of a reply: its id and fields (`None`: the entry was deleted
/// while pending).
#[derive(Debug)]
pub struct Item {
    pub id: StreamId,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

impl Item {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.as_ref()?.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// This entry of `channel`, on delivery `attempt`.
    pub fn into_entry(self, channel: String, attempt: u32) -> crate::store::Entry {
        crate::store::Entry { id: self.id, attempt, channel, webhook: self.webhook() }
    }

    /// The stored webhook, checked.
    pub fn webhook(self) -> Result<Stored, Unreadable> {
        let fields = self.fields.ok_or(Unreadable::DeletedWhilePending)?;
        match fields.into_iter().find(|(k, _)| k == keys::FIELD_WEBHOOK) {
            Some((_, bytes)) => Stored::check(bytes),
            None => Err(Unreadable::Corrupt(format!("entry has no `{}` field", keys::FIELD_WEBHOOK))),
        }
    }
}

fn id(v: &Value) -> Option<StreamId> {
    text(v)?.parse().ok()
}

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

/// `XREADGROUP`/`XREAD` reply: streams → `(channel, entry)`s.
pub fn read_reply(v: Value) -> Result<Vec<(String, Item)>, StoreError> {
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
        for e in self::entries(entries)? {
            out.push((channel.clone(), e));
        }
    }
    Ok(out)
}

/// A list of `[id, fields|nil]` entries.
pub fn entries(v: Value) -> Result<Vec<Item>, StoreError> {
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
        let Some(id) = id(&parts[0]) else {
            return Err(StoreError::Corrupt { id: format!("{:?}", parts[0]), why: "not a stream id".into() });
        };
        let fields = match fields_v {
            Value::Nil => None,
            other => Some(pairs(other).into_iter().filter_map(|(k, v)| Some((text(&k)?, bytes(v)))).collect()),
        };
        out.push(Item { id, fields });
    }
    Ok(out)
}

/// A flat list of ids.
pub fn ids(v: Value) -> Vec<StreamId> {
    match v {
        Value::Array(items) => items.iter().filter_map(id).collect(),
        _ => Vec::new(),
    }
}

/// `[id, count, id, count, …]` (the autoclaim script's) by id.
pub fn id_counts(v: Value) -> HashMap<StreamId, u32> {
    let Value::Array(items) = v else { return HashMap::new() };
    items
        .chunks(2)
        .filter_map(|pair| {
            let [id_v, count_v] = pair else { return None };
            let count = match count_v {
                Value::Int(n) => u32::try_from(*n).ok()?,
                other => text(other)?.parse().ok()?,
            };
            Some((id(id_v)?, count))
        })
        .collect()
}

/// Extended `XPENDING` reply: `[[id, consumer, idle, count], …]`.
pub fn pending_counts(v: Value) -> HashMap<StreamId, u32> {
    let Value::Array(items) = v else {
        return HashMap::new();
    };
    items
        .into_iter()
        .filter_map(|item| match item {
            Value::Array(p) if p.len() >= 4 => {
                let id = id(&p[0])?;
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
pub fn pending_summary(v: Value) -> (u64, Option<StreamId>) {
    let Value::Array(p) = v else { return (0, None) };
    let count = match p.first() {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    (count, p.get(1).and_then(id))
}

/// The fields of one group from `XINFO GROUPS`.
#[derive(Debug, Default)]
pub struct GroupInfo {
    pub last_delivered: Option<StreamId>,
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
            last_delivered: fields.get("last-delivered-id").and_then(id),
            lag: match fields.get("lag") {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            },
        };
    }
    GroupInfo::default()
}

/// `length` and `last-generated-id` of an `XINFO STREAM` reply.
pub fn stream_info(v: Value) -> (u64, Option<StreamId>) {
    let mut length = 0;
    let mut last = None;
    for (k, v) in pairs(v) {
        match text(&k).as_deref() {
            Some("length") => length = text(&v).and_then(|l| l.parse().ok()).unwrap_or(0),
            Some("last-generated-id") => last = id(&v),
            _ => {}
        }
    }
    (length, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    /// Counts are matched to entries by id, never by position: a reply
    /// item the parser skips (Redis 6.2's nil for a deleted entry) shifts
    /// nothing.
    #[test]
    fn autoclaim_counts_follow_their_ids() {
        let entry = |id: &str| Value::Array(vec![bulk(id), Value::Array(vec![bulk("w"), bulk("x")])]);
        let claimed = Value::Array(vec![entry("1-0"), Value::Nil, entry("3-0")]);
        let counts = Value::Array(vec![bulk("1-0"), Value::Int(3), bulk("3-0"), Value::Int(5)]);
        let items = entries(claimed).expect("entries");
        let counts = id_counts(counts);
        let got: Vec<(StreamId, Option<u32>)> = items.iter().map(|i| (i.id, counts.get(&i.id).copied())).collect();
        assert_eq!(got, [(StreamId::new(1, 0), Some(3)), (StreamId::new(3, 0), Some(5))]);
    }
}
