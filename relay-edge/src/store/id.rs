//! Stream entry ids, `<ms>-<seq>`, as one type: parsed once where they come
//! in (an agent's ack, an admin URL, a Redis reply) and ordered like Redis
//! orders them. Both backends generate them the same way, so sessions, the
//! backlog cap and the admin API never know which backend runs.

use std::fmt;
use std::str::FromStr;

/// A stream entry id: milliseconds since the epoch and a sequence number
/// within that millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// `0-0`: below every entry (a pending-list cursor at the start).
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The last id of millisecond `ms` (the upper end of a time range).
    pub const fn last_of(ms: u64) -> Self {
        Self { ms, seq: u64::MAX }
    }

    /// The next id after this one (`None` past the very last).
    pub fn successor(self) -> Option<Self> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(Self { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| Self { ms, seq: 0 }),
        }
    }
}

impl fmt::Display for StreamId {
    /// Through `itoa`, not `write!`: an id is formatted per delivered
    /// webhook, and `fmt`'s integer machinery costs several times more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(itoa::Buffer::new().format(self.ms))?;
        f.write_str("-")?;
        f.write_str(itoa::Buffer::new().format(self.seq))
    }
}

/// An id that is not `<ms>-<seq>` with both parts decimal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream id (`<ms>-<seq>`)")]
pub struct BadStreamId;

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(BadStreamId)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(BadStreamId);
        }
        Ok(Self { ms: ms.parse().map_err(|_| BadStreamId)?, seq: seq.parse().map_err(|_| BadStreamId)? })
    }
}

impl From<(u64, u64)> for StreamId {
    fn from((ms, seq): (u64, u64)) -> Self {
        Self { ms, seq }
    }
}

impl From<StreamId> for (u64, u64) {
    fn from(id: StreamId) -> Self {
        (id.ms, id.seq)
    }
}

impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl redis::ToRedisArgs for StreamId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

#[cfg(test)]
mod tests {
    use super::StreamId;

    #[test]
    fn ids_parse_print_and_order_like_redis() {
        let id: StreamId = "1700000000000-3".parse().expect("parses");
        assert_eq!(id, StreamId::new(1_700_000_000_000, 3));
        assert_eq!(id.to_string(), "1700000000000-3");
        assert!(StreamId::new(5, 10) > StreamId::new(5, 9));
        assert!(StreamId::new(6, 0) > StreamId::new(5, u64::MAX));
        for bad in ["", "-", "5", "5-", "-5", "a-1", "1-b", "1-2-3", "+1-2", " 1-2", "99999999999999999999-0"] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?} must not parse");
        }
        assert_eq!(StreamId::new(5, u64::MAX).successor(), Some(StreamId::new(6, 0)));
        assert_eq!(StreamId::new(5, 1).successor(), Some(StreamId::new(5, 2)));
    }

    #[test]
    fn printing_agrees_with_integer_formatting_at_the_extremes() {
        for (ms, seq) in [(0, 0), (9, 10), (10, 9), (1, u64::MAX), (u64::MAX, 0), (u64::MAX, u64::MAX)] {
            let id = StreamId::new(ms, seq);
            assert_eq!(id.to_string(), format!("{ms}-{seq}"));
            assert_eq!(id.to_string().parse::<StreamId>(), Ok(id));
        }
    }
}
