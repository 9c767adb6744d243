//! Model-based test of the delivery protocol: the real in-flight
//! [`Table`] of each session, driven the way `tunnel/session.rs` drives
//! it, against a model store (Redis Streams semantics: streams per channel,
//! one group, pending lists with owners and delivery counts, `XACK`,
//! `XCLAIM`, `XAUTOCLAIM`, DLQ) and model agents, through random
//! interleavings: appends (fan-out gives equal ids on two channels), grants
//! and fetches, acks, transient and permanent nacks, duplicate and late
//! acks, session drops and reconnects with other channel sets, reclaim by
//! another consumer, redeliveries, store failures, window and pause
//! changes, and agents that name ids only.
//!
//! After every step: no entry is acknowledged on a channel unless an agent
//! reported success for that `(channel, id)` (or it was dead-lettered);
//! no grant takes a session past its window or byte budget; at most one
//! redelivery is scheduled per entry. After the run quiesces: every
//! appended entry is acknowledged or dead-lettered.
//!
//! `PROPTEST_CASES=20000 cargo test -p relay-edge --test inflight_model`
//! runs a longer search (the default is 256 cases).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use relay_edge::store::StreamId;
use relay_edge::tunnel::fetcher::{Cursor, Planner, Step};
use relay_edge::tunnel::inflight::{Acked, Arrival, Claimed, EntryKey, Nacked, Table};

const CHANNELS: [&str; 2] = ["a", "b"];
const MAX_BYTES: usize = 400;
const RESERVE: usize = 100;
const AGENTS: usize = 2;

#[derive(Debug, Clone)]
struct StoredEntry {
    bytes: usize,
    /// Consumer holding it pending; `None` when never delivered or acked.
    owner: Option<usize>,
    delivered: bool,
    acked: bool,
    dead: bool,
    count: u32,
}

/// An entry as a read returns it: id (`N-0`), delivery count, size.
type Read = (StreamId, u32, usize);

/// The id of model entry `n`.
fn sid(n: u64) -> StreamId {
    StreamId::new(n, 0)
}

/// Redis Streams, as the relay uses them.
#[derive(Debug, Default)]
struct ModelStore {
    streams: BTreeMap<String, BTreeMap<u64, StoredEntry>>,
    /// Next id per channel.
    next: BTreeMap<String, u64>,
    /// Entries an agent reported delivered (2xx), by `(channel, id)`.
    succeeded: BTreeSet<(String, u64)>,
}

impl ModelStore {
    fn append(&mut self, fanout: bool, channel: usize, bytes: usize) {
        let chans: Vec<&str> = if fanout { CHANNELS.to_vec() } else { vec![CHANNELS[channel % 2]] };
        // Fan-out appends one id to both streams, and streams written in
        // the same millisecond get equal ids too.
        let id = chans.iter().map(|c| self.next.get(*c).copied().unwrap_or(1)).max().unwrap_or(1);
        for c in chans {
            self.next.insert(c.to_string(), id + 1);
            let e = StoredEntry { bytes, owner: None, delivered: false, acked: false, dead: false, count: 0 };
            self.streams.entry(c.to_string()).or_default().insert(id, e);
        }
    }

    fn entry(&mut self, key: &EntryKey) -> Option<&mut StoredEntry> {
        self.streams.get_mut(&key.channel)?.get_mut(&key.id.ms)
    }

    fn pending(e: &StoredEntry) -> bool {
        e.owner.is_some() && !e.acked
    }

    /// `XREADGROUP … >`: entries never delivered, in order.
    fn read_new(&mut self, consumer: usize, channel: &str, count: usize) -> Vec<Read> {
        let Some(s) = self.streams.get_mut(channel) else { return vec![] };
        let mut out = vec![];
        for (id, e) in s.iter_mut().filter(|(_, e)| !e.delivered).take(count) {
            e.delivered = true;
            e.owner = Some(consumer);
            e.count += 1;
            out.push((sid(*id), e.count, e.bytes));
        }
        out
    }

    /// `XREADGROUP … <after>`: this consumer's pending entries after `after`.
    fn read_pending(&mut self, consumer: usize, channel: &str, after: u64, count: usize) -> Vec<Read> {
        let Some(s) = self.streams.get_mut(channel) else { return vec![] };
        let mut out = vec![];
        for (id, e) in
            s.range_mut(after + 1..).filter(|(_, e)| Self::pending(e) && e.owner == Some(consumer)).take(count)
        {
            e.count += 1;
            out.push((sid(*id), e.count, e.bytes));
        }
        out
    }

    /// `XAUTOCLAIM` with every pending entry idle long enough (the worst
    /// case: a slow agent's in-flight entries are taken too).
    fn autoclaim(&mut self, consumer: usize, channel: &str, count: usize) -> Vec<Read> {
        let Some(s) = self.streams.get_mut(channel) else { return vec![] };
        let mut out = vec![];
        for (id, e) in s.iter_mut().filter(|(_, e)| Self::pending(e)).take(count) {
            e.owner = Some(consumer);
            e.count += 1;
            out.push((sid(*id), e.count, e.bytes));
        }
        out
    }

    /// `XCLAIM` of one entry (min-idle 0): `None` when no longer pending.
    fn claim(&mut self, consumer: usize, key: &EntryKey) -> Option<u32> {
        let e = self.entry(key)?;
        if !Self::pending(e) {
            return None;
        }
        e.owner = Some(consumer);
        e.count += 1;
        Some(e.count)
    }

    /// `XACK`: a no-op for entries not pending.
    fn ack(&mut self, key: &EntryKey) {
        if let Some(e) = self.entry(key)
            && Self::pending(e)
        {
            e.acked = true;
            e.owner = None;
        }
    }

    fn dead_letter(&mut self, key: &EntryKey) {
        if let Some(e) = self.entry(key) {
            e.dead = true;
            e.acked = true;
            e.owner = None;
        }
    }

    /// Safety: nothing acknowledged that no agent delivered (or that was
    /// not dead-lettered).
    fn check_safety(&self) {
        for (channel, s) in &self.streams {
            for (id, e) in s {
                assert!(
                    !e.acked || e.dead || self.succeeded.contains(&(channel.clone(), *id)),
                    "{channel}:{id} was acknowledged, but no agent delivered it and it is not dead-lettered"
                );
            }
        }
    }

    fn check_all_settled(&self) {
        for (channel, s) in &self.streams {
            for (id, e) in s {
                assert!(e.acked, "{channel}:{id} never settled: {e:?}");
            }
        }
    }
}

/// One edge session, driven as `session.rs` drives its table.
struct Session {
    table: Table<()>,
    /// The fetcher's real decisions: cursors and entries read, not yet handed over.
    planner: Planner<Read>,
    /// Channels of the session.
    channels: Vec<String>,
    /// Scheduled redeliveries (the session's `DelayQueue`, one per key).
    scheduled: BTreeSet<EntryKey>,
    window: u32,
}

/// A model agent: what it is posting, what it posted, how it acks.
#[derive(Default)]
struct Agent {
    /// Deliveries being posted (outlive sessions), by key.
    holding: Vec<EntryKey>,
    /// Acks it will repeat (duplicates).
    repeat: Vec<EntryKey>,
    /// Acks whose session died before they were sent.
    unsent: Vec<EntryKey>,
    /// Delivered (2xx) already: a redelivery is acked at once.
    recent: BTreeSet<EntryKey>,
    session: Option<Session>,
    /// This agent's acks name their channel.
    named: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        fanout: bool,
        channel: usize,
        bytes: usize,
    },
    /// `lost`: bit `i` loses the answer of cursor `i`'s read after it ran
    /// in the store (a timeout, or a slot's node failing mid-read); bit 2,
    /// the answers of the reclaims.
    Fetch {
        agent: usize,
        reclaim: bool,
        fail: bool,
        lost: u8,
    },
    Ack {
        agent: usize,
        pick: usize,
        repeat: bool,
    },
    Nack {
        agent: usize,
        pick: usize,
        permanent: bool,
        store_fails: bool,
    },
    RepeatAcks {
        agent: usize,
    },
    Due {
        agent: usize,
        pick: usize,
        fail: bool,
    },
    Drop {
        agent: usize,
    },
    Connect {
        agent: usize,
        only_a: bool,
    },
    Window {
        agent: usize,
        window: u32,
    },
    Pause {
        agent: usize,
        channel: usize,
        paused: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS;
    prop_oneof![
        3 => (any::<bool>(), 0..2usize, 1..=RESERVE).prop_map(|(fanout, channel, bytes)| Op::Append { fanout, channel, bytes }),
        4 => (agent.clone(), prop::bool::weighted(0.2), prop::bool::weighted(0.05), prop_oneof![8 => Just(0u8), 1 => 1..8u8]).prop_map(|(agent, reclaim, fail, lost)| Op::Fetch { agent, reclaim, fail, lost }),
        4 => (agent.clone(), any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(agent, pick, repeat)| Op::Ack { agent, pick, repeat }),
        2 => (agent.clone(), any::<usize>(), prop::bool::weighted(0.3), prop::bool::weighted(0.2)).prop_map(|(agent, pick, permanent, store_fails)| Op::Nack { agent, pick, permanent, store_fails }),
        1 => agent.clone().prop_map(|agent| Op::RepeatAcks { agent }),
        2 => (agent.clone(), any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(agent, pick, fail)| Op::Due { agent, pick, fail }),
        1 => agent.clone().prop_map(|agent| Op::Drop { agent }),
        1 => (agent.clone(), prop::bool::weighted(0.2)).prop_map(|(agent, only_a)| Op::Connect { agent, only_a }),
        1 => (agent.clone(), 0..12u32).prop_map(|(agent, window)| Op::Window { agent, window }),
        1 => (agent, 0..2usize, any::<bool>()).prop_map(|(agent, channel, paused)| Op::Pause { agent, channel, paused }),
    ]
}

struct World {
    store: ModelStore,
    agents: Vec<Agent>,
}

impl World {
    fn new(named: [bool; AGENTS]) -> Self {
        let agents = named.iter().map(|&named| Agent { named, ..Agent::default() }).collect();
        let mut w = Self { store: ModelStore::default(), agents };
        for a in 0..AGENTS {
            w.connect(a, false);
        }
        w
    }

    fn connect(&mut self, a: usize, only_a: bool) {
        if self.agents[a].session.is_some() {
            return;
        }
        // An agent naming ids only is served one channel per session:
        // agent 0 `a`, agent 1 `b`.
        let channels: Vec<String> = if !self.agents[a].named {
            vec![CHANNELS[a % 2].to_string()]
        } else if only_a {
            vec!["a".to_string()]
        } else {
            CHANNELS.iter().map(|c| c.to_string()).collect()
        };
        let planner = Planner::new(&channels, RESERVE);
        let table = Table::new(channels.clone(), 4, MAX_BYTES, RESERVE);
        self.agents[a].session = Some(Session { table, planner, channels, scheduled: BTreeSet::new(), window: 4 });
        // Acks of deliveries that finished while disconnected.
        let unsent = std::mem::take(&mut self.agents[a].unsent);
        for key in unsent {
            self.send_ack(a, key);
        }
    }

    /// What the fetcher does for one grant, with its real planner.
    fn fetch(&mut self, a: usize, reclaim: bool, fail: bool, lost: u8) {
        let Some(s) = self.agents[a].session.as_mut() else { return };
        let Some(grant) = s.table.grant() else { return };
        assert!(s.table.held() + grant.slots <= s.window as usize, "grant past the window");
        assert!(s.table.bytes() + grant.bytes <= MAX_BYTES, "grant past the byte budget");
        assert!(grant.bytes >= RESERVE, "a grant always fits one largest entry");
        let mut got: Vec<(String, Read)> = vec![];
        if !fail {
            match s.planner.step(&grant) {
                Step::Serve => got = s.planner.serve(&grant, |e| e.2),
                Step::Read { cursors, count } => {
                    let mut rest = grant.clone();
                    let mut reclaim_failed = false;
                    if reclaim {
                        for ch in &grant.channels {
                            let room = rest.slots.min(rest.bytes / RESERVE);
                            let claimed = self.store.autoclaim(a, ch, room);
                            if lost & 4 != 0 {
                                // It ran, its answer was lost: as the fetcher,
                                // re-walk that channel and read nothing more.
                                s.planner.rewalk(ch);
                                reclaim_failed = true;
                                break;
                            }
                            rest.slots -= claimed.len();
                            rest.bytes -= claimed.iter().map(|e| e.2).sum::<usize>();
                            for e in &claimed {
                                s.planner.saw(ch, e.0);
                            }
                            got.extend(claimed.into_iter().map(|e| (ch.clone(), e)));
                        }
                    }
                    if rest.slots > 0 && !reclaim_failed {
                        let mut per_channel: Vec<(String, Vec<Read>)> = Vec::new();
                        let mut unread = Vec::new();
                        for (i, (ch, c)) in cursors.iter().enumerate() {
                            let read = match c {
                                Cursor::New => self.store.read_new(a, ch, count),
                                Cursor::Pending(after) => self.store.read_pending(a, ch, after.ms, count),
                            };
                            if lost & (1 << i) != 0 {
                                unread.push(ch.clone());
                            } else {
                                per_channel.push((ch.clone(), read));
                            }
                        }
                        // As the fetcher: a whole failure reads nothing
                        // back; a partial one hands over what was read.
                        s.planner.read_failed(&unread);
                        if !per_channel.is_empty() {
                            got.extend(s.planner.read_done(&rest, per_channel, |e| e.0, |e| e.2));
                        }
                    }
                }
            }
        }
        assert!(got.len() <= grant.slots, "the fetcher handed over past its grant");
        // A reclaim and a pending read in one fetch may return one entry twice.
        let fresh: BTreeSet<EntryKey> =
            got.iter().map(|(ch, e)| EntryKey::new(ch.as_str(), e.0)).filter(|k| s.table.flight(k).is_none()).collect();
        let arrivals = got
            .into_iter()
            .map(|(ch, (id, attempt, bytes))| Arrival {
                key: EntryKey::new(ch, id),
                attempt,
                bytes,
                received_at_ms: 0,
                payload: (),
            })
            .collect();
        let sends = s.table.arrived(arrivals);
        assert_eq!(sends.len(), fresh.len(), "the table took every entry the fetcher handed over");
        assert!(s.table.bytes() <= MAX_BYTES);
        for send in sends {
            self.receive(a, send.key);
        }
    }

    /// Nothing is lost for a live session: every entry pending for its
    /// agent on its channels is in its table, waiting in its planner, or
    /// ahead of the channel's pending-list cursor.
    fn check_reachable(&self) {
        for (a, agent) in self.agents.iter().enumerate() {
            let Some(s) = &agent.session else { continue };
            for ch in &s.channels {
                let Some(stream) = self.store.streams.get(ch) else { continue };
                for (id, _) in stream.iter().filter(|(_, e)| ModelStore::pending(e) && e.owner == Some(a)) {
                    let key = EntryKey::new(ch.as_str(), sid(*id));
                    let held = s.table.flight(&key).is_some() || s.planner.is_waiting(ch, |w| w.0 == key.id);
                    let ahead = matches!(s.planner.cursor(ch), Some(Cursor::Pending(after)) if *id > after.ms);
                    assert!(held || ahead, "{key} is pending for agent {a} but its session will never deliver it");
                }
            }
        }
    }

    /// The agent gets a `Deliver`.
    fn receive(&mut self, a: usize, key: EntryKey) {
        let agent = &mut self.agents[a];
        if agent.recent.contains(&key) {
            self.send_ack(a, key);
        } else if !agent.holding.contains(&key) {
            agent.holding.push(key);
        }
    }

    /// The agent's `Ack` reaches its current session, as `on_ack` handles it.
    fn send_ack(&mut self, a: usize, key: EntryKey) {
        let named = self.agents[a].named;
        let Some(s) = self.agents[a].session.as_mut() else {
            self.agents[a].unsent.push(key);
            return;
        };
        let target = if named { Some(key) } else { s.table.resolve(key.id) };
        let Some(target) = target else { return };
        match s.table.ack(&target) {
            Acked::Settled(_) | Acked::NotHere => self.store.ack(&target),
            Acked::Foreign => {}
        }
    }

    fn ack(&mut self, a: usize, pick: usize, repeat: bool) {
        let agent = &mut self.agents[a];
        if agent.holding.is_empty() {
            return;
        }
        let key = agent.holding.remove(pick % agent.holding.len());
        self.store.succeeded.insert((key.channel.clone(), key.id.ms));
        agent.recent.insert(key.clone());
        if repeat {
            agent.repeat.push(key.clone());
        }
        self.send_ack(a, key);
    }

    fn nack(&mut self, a: usize, pick: usize, permanent: bool, store_fails: bool) {
        let agent = &mut self.agents[a];
        if agent.holding.is_empty() {
            return;
        }
        let key = agent.holding.remove(pick % agent.holding.len());
        let named = agent.named;
        // A nack is not kept across sessions: the entry comes back.
        let Some(s) = agent.session.as_mut() else { return };
        let target = if named { Some(key) } else { s.table.resolve(key.id) };
        let Some(target) = target else { return };
        match s.table.nack(&target, permanent) {
            Nacked::Ignore => {}
            Nacked::Schedule => {
                s.scheduled.insert(target);
            }
            Nacked::DeadLetter { .. } => {
                if !store_fails {
                    self.store.dead_letter(&target);
                }
                s.table.dead_lettered(&target, !store_fails);
                if store_fails {
                    assert!(s.scheduled.insert(target), "a second redelivery for one entry");
                }
            }
        }
    }

    fn due(&mut self, a: usize, pick: usize, fail: bool) {
        let Some(s) = self.agents[a].session.as_mut() else { return };
        if s.scheduled.is_empty() {
            return;
        }
        let Some(key) = s.scheduled.iter().nth(pick % s.scheduled.len()).cloned() else { return };
        s.scheduled.remove(&key);
        let Some(_attempt) = s.table.due(&key) else { return };
        if fail {
            s.table.redelivered(&key, Claimed::Failed);
            s.scheduled.insert(key);
            return;
        }
        match self.store.claim(a, &key) {
            Some(_) => {
                s.table.redelivered(&key, Claimed::Sent);
                self.receive(a, key);
            }
            None => s.table.redelivered(&key, Claimed::Gone),
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append { fanout, channel, bytes } => self.store.append(fanout, channel, bytes),
            Op::Fetch { agent, reclaim, fail, lost } => self.fetch(agent, reclaim, fail, lost),
            Op::Ack { agent, pick, repeat } => self.ack(agent, pick, repeat),
            Op::Nack { agent, pick, permanent, store_fails } => self.nack(agent, pick, permanent, store_fails),
            Op::RepeatAcks { agent } => {
                let keys = std::mem::take(&mut self.agents[agent].repeat);
                for key in keys {
                    self.send_ack(agent, key);
                }
            }
            Op::Due { agent, pick, fail } => self.due(agent, pick, fail),
            Op::Drop { agent } => self.agents[agent].session = None,
            Op::Connect { agent, only_a } => self.connect(agent, only_a),
            Op::Window { agent, window } => {
                if let Some(s) = self.agents[agent].session.as_mut() {
                    s.table.set_window(window);
                    s.window = window;
                }
            }
            Op::Pause { agent, channel, paused } => {
                if let Some(s) = self.agents[agent].session.as_mut() {
                    s.table.set_paused(CHANNELS[channel], paused);
                }
            }
        }
        self.store.check_safety();
        self.check_reachable();
        for agent in &self.agents {
            if let Some(s) = &agent.session {
                assert!(s.table.bytes() <= MAX_BYTES, "byte budget exceeded");
                assert!(s.scheduled.len() <= s.table.held(), "more redeliveries than held entries");
            }
        }
    }

    /// Everyone healthy until nothing moves: the agents post and ack what
    /// they hold, redeliveries fire, sessions fetch (and reclaim), and now
    /// and then every session is restarted.
    fn quiesce(&mut self) {
        for round in 0..200 {
            if round % 10 == 9 {
                for a in 0..AGENTS {
                    self.agents[a].session = None;
                }
            }
            for a in 0..AGENTS {
                self.connect(a, false);
                if let Some(s) = self.agents[a].session.as_mut() {
                    s.table.set_window(4);
                    s.window = 4;
                    for c in CHANNELS {
                        s.table.set_paused(c, false);
                    }
                }
                while !self.agents[a].holding.is_empty() {
                    self.apply(&Op::Ack { agent: a, pick: 0, repeat: false });
                }
                while self.agents[a].session.as_ref().is_some_and(|s| !s.scheduled.is_empty()) {
                    self.apply(&Op::Due { agent: a, pick: 0, fail: false });
                }
                self.apply(&Op::Fetch { agent: a, reclaim: round % 5 == 4, fail: false, lost: 0 });
            }
            let settled = self.store.streams.values().all(|s| s.values().all(|e| e.acked));
            if settled {
                return;
            }
        }
        self.store.check_all_settled();
    }
}

fn run(ops: &[Op], named: [bool; AGENTS]) {
    let mut w = World::new(named);
    for op in ops {
        w.apply(op);
    }
    w.quiesce();
    w.store.check_all_settled();
}

proptest! {
    #[test]
    fn agents_naming_channels_lose_nothing(ops in prop::collection::vec(op(), 1..150)) {
        run(&ops, [true, true]);
    }

    #[test]
    fn agents_naming_ids_only_lose_nothing(ops in prop::collection::vec(op(), 1..150)) {
        run(&ops, [false, false]);
    }

    #[test]
    fn mixed_agents_lose_nothing(ops in prop::collection::vec(op(), 1..150)) {
        run(&ops, [true, false]);
    }
}

/// The report that started this: fan-out to `a` and `b`, `a`'s copy still
/// being posted when the session dies, `b`'s copy redelivered in the next
/// session; the late ack for `a:1` must not settle `b:1`.
#[test]
fn a_late_ack_settles_only_its_own_channel() {
    let mut w = World::new([true, true]);
    w.apply(&Op::Append { fanout: true, channel: 0, bytes: 10 });
    // The first read walks the (empty) pending list, the second reads new entries.
    w.apply(&Op::Fetch { agent: 0, reclaim: false, fail: false, lost: 0 });
    w.apply(&Op::Fetch { agent: 0, reclaim: false, fail: false, lost: 0 });
    assert_eq!(w.agents[0].holding.len(), 2, "a:1 and b:1 with the agent");
    // b's endpoint fails: transient nack; a's is slow.
    let b = w.agents[0].holding.iter().position(|k| k.channel == "b").expect("b held");
    w.apply(&Op::Nack { agent: 0, pick: b, permanent: false, store_fails: false });
    w.apply(&Op::Drop { agent: 0 });
    w.apply(&Op::Connect { agent: 0, only_a: false });
    w.apply(&Op::Fetch { agent: 0, reclaim: false, fail: false, lost: 0 });
    assert_eq!(w.agents[0].session.as_ref().map(|s| s.table.held()), Some(2), "own pending re-read first");
    // a's POST finishes now: its ack names a:1.
    let a = w.agents[0].holding.iter().position(|k| k.channel == "a").expect("a held");
    w.apply(&Op::Ack { agent: 0, pick: a, repeat: false });
    let b_entry = &w.store.streams["b"][&1];
    assert!(!b_entry.acked, "b:1 must still be owed: {b_entry:?}");
    w.quiesce();
    w.store.check_all_settled();
}

/// Found by the model (a lost read): a read of new entries runs in the
/// store, but its answer is lost (a timeout, or one slot's node failing
/// while the other's answered). The entries are pending on the agent now;
/// its session must read them back, not leave them to a reclaim.
#[test]
fn a_lost_read_of_new_entries_is_read_back() {
    let mut w = World::new([true, false]);
    w.apply(&Op::Append { fanout: false, channel: 0, bytes: 1 });
    w.apply(&Op::Append { fanout: false, channel: 0, bytes: 1 });
    w.apply(&Op::Fetch { agent: 1, reclaim: false, fail: false, lost: 0 });
    w.apply(&Op::Append { fanout: false, channel: 1, bytes: 1 });
    w.apply(&Op::Fetch { agent: 1, reclaim: false, fail: false, lost: 3 });
    w.check_reachable();
    w.quiesce();
    w.store.check_all_settled();
}

/// Found by the model (a lost reclaim): agent 1's `XAUTOCLAIM` takes agent
/// 0's pending entry, but its answer is lost. The entry is agent 1's now,
/// at an id below anything agent 1 read: its session walks its whole
/// pending list again.
#[test]
fn a_lost_reclaim_is_read_back() {
    let mut w = World::new([true, true]);
    w.apply(&Op::Fetch { agent: 0, reclaim: false, fail: false, lost: 0 });
    w.apply(&Op::Fetch { agent: 1, reclaim: false, fail: false, lost: 0 });
    w.apply(&Op::Append { fanout: false, channel: 0, bytes: 1 });
    w.apply(&Op::Fetch { agent: 0, reclaim: false, fail: false, lost: 0 });
    w.apply(&Op::Fetch { agent: 1, reclaim: true, fail: false, lost: 4 });
    w.check_reachable();
    w.quiesce();
    w.store.check_all_settled();
}
