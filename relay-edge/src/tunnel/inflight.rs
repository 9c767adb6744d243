//! The in-flight table of one agent session: which deliveries the agent
//! holds, how much more the fetcher may read, and what each agent verdict
//! means. Pure: no I/O, no clock. Every method returns what the session
//! must do (send these, acknowledge that, dead-letter this, schedule one
//! redelivery), and the session does it.
//!
//! Decisions it makes:
//!
//! - **Identity.** A delivery is an [`EntryKey`], `(channel, id)`: stream ids
//!   repeat across channels (a fan-out appends the same id to each stream),
//!   so nothing here is ever looked up by id alone, and no verdict settles
//!   an entry on a channel it does not name.
//! - **Flow control.** The fetcher hands over only what a [`Grant`] allows,
//!   and one grant is outstanding at a time. A grant never takes the
//!   session past the agent's window (counted over every held delivery,
//!   including ones waiting to be redelivered, so `window = 1` stays FIFO
//!   across retries) nor past its byte budget, counted in the entries' real
//!   sizes. A grant is issued only while a whole largest entry
//!   (`entry_reserve`) still fits, so every grant makes progress.
//! - **One exit per delivery.** A delivery leaves the table exactly once: by
//!   an ack, by a dead-letter that the store recorded, or because the store
//!   no longer holds it for us (`forget`). A transient nack parks it for one
//!   redelivery; a second nack while it waits schedules nothing more.
//! - **Verdicts for entries the table does not hold.** An ack naming a
//!   `(channel, id)` of one of the session's channels is acknowledged in the
//!   store even when not in flight here: the agent posted exactly that entry
//!   (e.g. in an earlier session), and stream ids are never reused within a
//!   channel, so it is done whoever holds it now (`XACK` of an entry not
//!   pending is a no-op). An ack naming another channel settles nothing. A
//!   nack for an entry not in flight here is ignored: the entry is still
//!   pending and comes back (the session's own pending list is re-read on
//!   reconnect, others' are reclaimed), and the agent decides again.
//! - **Agents that name ids only** (before acks carried channels; `Hello`
//!   without `named_acks`): an id alone is unambiguous only in a session of
//!   one channel, so the session refuses such an agent a session of several
//!   channels (`upgrade_required`), and here an id alone settles that one
//!   channel's entry. An old agent asks for the channels of its config, the
//!   same in every session, so even its late verdicts from an earlier
//!   session name that channel. In a session of several channels an id
//!   alone settles nothing (it stays pending and is redelivered).

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};

use crate::store::StreamId;

/// A delivery's identity: its channel and its stream id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    pub channel: String,
    pub id: StreamId,
}

impl EntryKey {
    pub fn new(channel: impl Into<String>, id: StreamId) -> Self {
        Self { channel: channel.into(), id }
    }
}

impl std::fmt::Display for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.channel, self.id)
    }
}

/// Permission for the fetcher to hand over at most `slots` entries
/// weighing at most `bytes` together, from `channels` (the session's
/// channels the agent has not paused). `bytes` is at least one whole
/// largest entry, so a grant always admits the first entry it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub slots: usize,
    pub bytes: usize,
    pub channels: Vec<String>,
}

/// An entry the fetcher read, with what the session forwards (`payload`).
#[derive(Debug, Clone)]
pub struct Arrival<P> {
    pub key: EntryKey,
    pub attempt: u32,
    /// Stored size, counted against the byte budget.
    pub bytes: usize,
    pub received_at_ms: u64,
    pub payload: P,
}

/// A delivery the session must send now.
#[derive(Debug, Clone)]
pub struct Send<P> {
    pub key: EntryKey,
    pub attempt: u32,
    pub payload: P,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Sent; the agent owes a verdict.
    WithAgent,
    /// Nacked; one redelivery is scheduled.
    Waiting,
    /// Nacked permanently; the session is dead-lettering it.
    DeadLettering,
}

/// One delivery held by the session.
#[derive(Debug, Clone)]
pub struct Flight {
    pub attempt: u32,
    pub bytes: usize,
    /// When the edge received the webhook (for end-to-end latency).
    pub received_at_ms: u64,
    pub stage: Stage,
}

/// What an ack means for one entry.
#[derive(Debug)]
pub enum Acked {
    /// It was in flight here; acknowledge it in the store.
    Settled(Flight),
    /// Not in flight here, on one of the session's channels: acknowledge
    /// it in the store (the agent did post it).
    NotHere,
    /// Names a channel this session does not deliver: settle nothing.
    Foreign,
}

/// What a nack means.
#[derive(Debug, PartialEq, Eq)]
pub enum Nacked {
    /// Dead-letter it, then report with [`Table::dead_lettered`].
    DeadLetter { attempts: u32 },
    /// Schedule one redelivery; when it is due, call [`Table::due`].
    Schedule,
    /// Not in flight here, or a redelivery is already scheduled: nothing.
    Ignore,
}

/// What became of a due redelivery's claim in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Re-sent to the agent.
    Sent,
    /// The store no longer holds it for us (acked, or claimed elsewhere).
    Gone,
    /// The store failed; try again later (the session reschedules).
    Failed,
}

/// Deliveries the agent holds and the session's flow control.
#[derive(Debug)]
pub struct Table<P> {
    /// Channels of the session.
    channels: Vec<String>,
    /// Channels the agent paused (their endpoint is down): not fetched.
    paused: BTreeSet<String>,
    /// Most deliveries held at once (the agent's current window).
    window: u32,
    /// Most bytes held at once.
    max_bytes: usize,
    /// Bytes a granted slot reserves (the largest deliverable entry).
    entry_reserve: usize,
    /// Most slots in one grant.
    max_grant: usize,
    /// Deliveries in flight, by whole identity.
    flights: HashMap<EntryKey, Flight>,
    /// Bytes of `flights`.
    bytes: usize,
    /// The grant the fetcher is working on: slots and bytes.
    granted: Option<(usize, usize)>,
    payload: std::marker::PhantomData<P>,
}

impl<P> Table<P> {
    pub fn new(channels: Vec<String>, window: u32, max_bytes: usize, entry_reserve: usize) -> Self {
        Self {
            channels,
            paused: BTreeSet::new(),
            window,
            max_bytes,
            entry_reserve: entry_reserve.max(1),
            max_grant: 256,
            flights: HashMap::new(),
            bytes: 0,
            granted: None,
            payload: std::marker::PhantomData,
        }
    }

    /// Deliveries held (with the agent, or waiting to be redelivered).
    pub fn held(&self) -> usize {
        self.flights.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn flight(&self, key: &EntryKey) -> Option<&Flight> {
        self.flights.get(key)
    }

    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// The next read the fetcher may do, if none is outstanding and there
    /// is room in the window and the byte budget.
    pub fn grant(&mut self) -> Option<Grant> {
        if self.granted.is_some() {
            return None;
        }
        let channels: Vec<String> = self.channels.iter().filter(|c| !self.paused.contains(*c)).cloned().collect();
        if channels.is_empty() {
            return None;
        }
        let slots = (self.window as usize).saturating_sub(self.held()).min(self.max_grant);
        let bytes = self.max_bytes.saturating_sub(self.bytes);
        if slots == 0 || bytes < self.entry_reserve {
            return None;
        }
        self.granted = Some((slots, bytes));
        Some(Grant { slots, bytes, channels })
    }

    /// The fetcher's read came back (possibly empty). Returns what to send.
    /// An entry already in flight here (our own, reclaimed by us after the
    /// visibility timeout) is not sent twice. The fetcher never hands over
    /// more than the grant; should it, the excess is not taken (it stays
    /// pending in the store and comes back on reconnect or reclaim).
    pub fn arrived(&mut self, entries: Vec<Arrival<P>>) -> Vec<Send<P>> {
        let (slots, mut bytes) = self.granted.take().unwrap_or((0, 0));
        let mut out = Vec::new();
        for a in entries.into_iter().take(slots) {
            if self.flights.contains_key(&a.key) {
                continue;
            }
            if a.bytes > bytes {
                break;
            }
            bytes -= a.bytes;
            self.bytes += a.bytes;
            let flight = Flight {
                attempt: a.attempt,
                bytes: a.bytes,
                received_at_ms: a.received_at_ms,
                stage: Stage::WithAgent,
            };
            self.flights.insert(a.key.clone(), flight);
            out.push(Send { key: a.key, attempt: a.attempt, payload: a.payload });
        }
        out
    }

    /// The agent acked `key` (it names its channel).
    pub fn ack(&mut self, key: &EntryKey) -> Acked {
        if let Some(f) = self.leave(key) {
            return Acked::Settled(f);
        }
        if self.channels.contains(&key.channel) { Acked::NotHere } else { Acked::Foreign }
    }

    /// Which entry an ack or nack naming only `id` settles: in a session
    /// of one channel, that channel's; otherwise none (see the module doc).
    pub fn resolve(&self, id: StreamId) -> Option<EntryKey> {
        match self.channels.as_slice() {
            [only] => Some(EntryKey::new(only.clone(), id)),
            _ => None,
        }
    }

    /// The agent nacked `key`.
    pub fn nack(&mut self, key: &EntryKey, permanent: bool) -> Nacked {
        let Some(f) = self.flights.get_mut(key) else { return Nacked::Ignore };
        if f.stage != Stage::WithAgent {
            return Nacked::Ignore;
        }
        if permanent {
            f.stage = Stage::DeadLettering;
            Nacked::DeadLetter { attempts: f.attempt }
        } else {
            f.stage = Stage::Waiting;
            Nacked::Schedule
        }
    }

    /// The store recorded the dead letter (`true`), or failed to (`false`:
    /// it stays held and one redelivery must be scheduled, so the agent
    /// decides again).
    pub fn dead_lettered(&mut self, key: &EntryKey, stored: bool) {
        if stored {
            self.leave(key);
        } else if let Some(f) = self.flights.get_mut(key) {
            f.stage = Stage::Waiting;
        }
    }

    /// A scheduled redelivery is due: the attempt number to claim it with,
    /// or `None` when it no longer waits (acked meanwhile).
    pub fn due(&self, key: &EntryKey) -> Option<u32> {
        self.flights.get(key).filter(|f| f.stage == Stage::Waiting).map(|f| f.attempt + 1)
    }

    /// What the claim of a due redelivery found.
    pub fn redelivered(&mut self, key: &EntryKey, claimed: Claimed) {
        match claimed {
            Claimed::Sent => {
                if let Some(f) = self.flights.get_mut(key) {
                    f.attempt += 1;
                    f.stage = Stage::WithAgent;
                }
            }
            Claimed::Gone => {
                self.leave(key);
            }
            Claimed::Failed => {}
        }
    }

    /// Takes `key` out of the table (the store no longer holds it for us).
    pub fn forget(&mut self, key: &EntryKey) {
        self.leave(key);
    }

    /// The agent changed its window.
    pub fn set_window(&mut self, window: u32) {
        self.window = window;
    }

    /// The agent paused or resumed one channel. `false` when the channel is
    /// not part of the session.
    pub fn set_paused(&mut self, channel: &str, paused: bool) -> bool {
        if !self.channels.iter().any(|c| c == channel) {
            return false;
        }
        if paused {
            self.paused.insert(channel.to_string());
        } else {
            self.paused.remove(channel);
        }
        true
    }

    fn leave(&mut self, key: &EntryKey) -> Option<Flight> {
        let f = self.flights.remove(key)?;
        self.bytes -= f.bytes;
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(channel: &str, id: &str) -> Arrival<()> {
        let id = id.parse().expect("test id");
        Arrival { key: EntryKey::new(channel, id), attempt: 1, bytes: 10, received_at_ms: 0, payload: () }
    }

    fn table(window: u32) -> Table<()> {
        Table::new(vec!["a".into(), "b".into()], window, 1_000, 100)
    }

    #[test]
    fn equal_ids_on_two_channels_are_two_deliveries() {
        let mut t = table(4);
        assert!(t.grant().is_some());
        let sent = t.arrived(vec![arrival("a", "1-0"), arrival("b", "1-0")]);
        assert_eq!(sent.len(), 2);
        assert!(matches!(t.ack(&EntryKey::new("a", StreamId::new(1, 0))), Acked::Settled(_)));
        assert!(t.flight(&EntryKey::new("b", StreamId::new(1, 0))).is_some(), "b's copy is still owed");
        assert!(matches!(t.ack(&EntryKey::new("c", StreamId::new(1, 0))), Acked::Foreign));
    }

    #[test]
    fn grants_respect_window_and_bytes() {
        let mut t = table(3);
        let g = t.grant().expect("room");
        assert_eq!(g.slots, 3);
        assert!(t.grant().is_none(), "one grant at a time");
        t.arrived(vec![arrival("a", "1-0")]);
        assert_eq!(t.grant().map(|g| g.slots), Some(2));
        t.arrived(vec![]);
        // Budget 1000 bytes: the grant offers what is left, and none once
        // less than one largest entry (100 bytes) is left.
        let mut t = Table::<()>::new(vec!["a".into()], 1_000, 1_000, 100);
        assert_eq!(t.grant().map(|g| (g.slots, g.bytes)), Some((256, 1_000)));
        let big = |id: &str| Arrival { bytes: 460, ..arrival("a", id) };
        assert_eq!(t.arrived(vec![big("1-0"), big("2-0"), big("3-0")]).len(), 2, "the third is past the budget");
        assert_eq!(t.bytes(), 920);
        assert_eq!(t.grant(), None, "80 bytes left: not a whole largest entry");
    }

    #[test]
    fn one_redelivery_per_entry() {
        let mut t = table(4);
        t.grant();
        t.arrived(vec![arrival("a", "1-0")]);
        let k = EntryKey::new("a", StreamId::new(1, 0));
        assert_eq!(t.nack(&k, false), Nacked::Schedule);
        assert_eq!(t.nack(&k, false), Nacked::Ignore, "a second nack while waiting schedules nothing");
        assert_eq!(t.due(&k), Some(2));
        t.redelivered(&k, Claimed::Sent);
        assert_eq!(t.nack(&k, false), Nacked::Schedule);
    }

    #[test]
    fn an_id_alone_settles_only_in_a_single_channel_session() {
        let t = Table::<()>::new(vec!["a".into()], 4, 1_000, 100);
        assert_eq!(t.resolve(StreamId::new(1, 0)), Some(EntryKey::new("a", StreamId::new(1, 0))));
        assert_eq!(table(4).resolve(StreamId::new(1, 0)), None);
    }
}
