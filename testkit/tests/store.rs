//! The store contract, once per backend (a real redis-server, the embedded
//! file): groups and pending lists with delivery counts, reclaim, dead
//! letters and replay, retention, de-duplication keys and blocking reads.
//! Plus what only the embedded store has: it survives a reopen, and a file
//! in use or in an impossible place is refused with a clear error.

use std::time::Duration;

use relay_edge::store::{Backend, BlockingRead, Cursor, DeadLetter, Entry, Store, StreamId};
use testkit::procs::*;
use testkit::*;

const CH: &str = "crm";

async fn open(backing: &Backing) -> Store {
    let store = backing.store();
    store.ensure_group(CH).await.expect("group");
    store
}

async fn append(store: &Store, n: usize) -> Vec<StreamId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.extend(store.append(&[CH.to_string()], &webhook(i)).await.expect("append"));
    }
    ids
}

/// New entries.
fn new() -> Vec<(String, Cursor)> {
    vec![(CH.to_string(), Cursor::New)]
}

/// The consumer's pending entries after `after`.
fn pending_after(after: StreamId) -> Vec<(String, Cursor)> {
    vec![(CH.to_string(), Cursor::Pending(after))]
}

fn ids_of(entries: &[Entry]) -> Vec<StreamId> {
    entries.iter().map(|e| e.id).collect()
}

fn attempts(entries: &[Entry]) -> Vec<u32> {
    entries.iter().map(|e| e.attempt).collect()
}

async fn groups_track_pending_entries_and_acks(backing: Backing) {
    let store = open(&backing).await;
    let ids = append(&store, 5).await;
    let sorted = {
        let mut s = ids.clone();
        s.sort();
        s
    };
    assert_eq!(ids, sorted, "ids grow");
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!((snap.stats.backlog, snap.stats.pending, snap.length), (5, 0, 5));
    assert!(snap.stats.oldest_ms.is_some());

    let mut reader = store.reader().await.expect("reader");
    let got = reader.read("a", &new(), 3).await.expect("read");
    assert_eq!(ids_of(&got), ids[..3]);
    assert_eq!(attempts(&got), [1, 1, 1], "a first read is the first delivery");
    let first = got[0].clone().webhook.and_then(|s| s.decode()).expect("decodes");
    let sent = webhook(0);
    assert_eq!((&first.id, &first.headers, &first.body), (&sent.id, &sent.headers, &sent.body), "stored intact");
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!((snap.stats.backlog, snap.stats.pending), (2, 3));

    // Another consumer gets the rest, never a's.
    let rest = reader.read("b", &new(), 10).await.expect("read");
    assert_eq!(ids_of(&rest), ids[3..]);

    // a's own pending list, after a cursor; a history read counts a
    // delivery, and each entry comes with its count.
    let mine = reader.read("a", &pending_after(StreamId::ZERO), 10).await.expect("history");
    assert_eq!(ids_of(&mine), ids[..3]);
    assert_eq!(attempts(&mine), [2, 2, 2]);
    let after_first = reader.read("a", &pending_after(ids[0]), 10).await.expect("history");
    assert_eq!(ids_of(&after_first), ids[1..3]);
    assert_eq!(attempts(&after_first), [3, 3]);
    let b_only = reader.read("b", &pending_after(StreamId::ZERO), 1).await.expect("history");
    assert_eq!((ids_of(&b_only), attempts(&b_only)), (ids[3..4].to_vec(), vec![2]), "count bounds the read");

    assert_eq!(store.ack(CH, &ids[..2]).await.expect("ack"), 2);
    assert_eq!(store.ack(CH, &ids[..2]).await.expect("ack"), 0, "an ack of what is not pending is a no-op");
    assert_eq!(store.snapshot(CH).await.expect("snapshot").stats.pending, 3);
    assert!(store.raw_entry(CH, ids[0]).await.expect("raw").is_some(), "acked entries stay until trimmed");
    assert!(reader.read("a", &new(), 10).await.expect("read").is_empty());
    let mine = reader.read("a", &pending_after(StreamId::ZERO), 10).await.expect("history");
    assert_eq!((ids_of(&mine), attempts(&mine)), (ids[2..3].to_vec(), vec![4]), "acked ones left the list");
}

async fn stale_entries_are_reclaimed_and_claims_count_deliveries(backing: Backing) {
    let store = open(&backing).await;
    let ids = append(&store, 2).await;
    let mut reader = store.reader().await.expect("reader");
    assert_eq!(reader.read("a", &new(), 10).await.expect("read").len(), 2);
    let idle = Duration::from_millis(300);
    assert!(store.autoclaim(CH, "b", idle, 10).await.expect("autoclaim").is_empty(), "not stale yet");
    // Time must pass by design: idleness is measured by the store's own clock
    // (Redis, or the embedded file's), which a paused test clock cannot move.
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let taken = store.autoclaim(CH, "b", idle, 10).await.expect("autoclaim");
    assert_eq!(ids_of(&taken), ids);
    assert!(taken.iter().all(|e| e.webhook.is_ok()));
    assert_eq!(attempts(&taken), [2, 2], "a reclaim counts as a delivery");
    let mut reader = store.reader().await.expect("reader");
    assert!(reader.read("a", &pending_after(StreamId::ZERO), 10).await.expect("history").is_empty(), "b has them");
    let theirs = reader.read("b", &pending_after(StreamId::ZERO), 10).await.expect("history");
    assert_eq!(attempts(&theirs), [3, 3]);

    let claimed = store.claim(CH, "a", ids[0]).await.expect("claim").expect("pending");
    assert_eq!(claimed.attempt, 4, "a claim counts a delivery and says so");
    assert_eq!(claimed.webhook.and_then(|s| s.decode()).expect("webhook").id, "wh-0");
    store.ack(CH, &ids[..1]).await.expect("ack");
    assert!(store.claim(CH, "a", ids[0]).await.expect("claim").is_none(), "acked: nothing to claim");
}

async fn dead_letters_keep_the_bytes_and_replay_as_new_entries(backing: Backing) {
    let store = open(&backing).await;
    let ids = append(&store, 3).await;
    let mut reader = store.reader().await.expect("reader");
    reader.read("a", &new(), 10).await.expect("read");
    let raw = store.raw_entry(CH, ids[1]).await.expect("raw").expect("stored");
    let letter = DeadLetter { channel: CH, id: ids[1], reason: "http 400", status: Some(400), attempts: 1 };
    store.dead_letter(&letter).await.expect("dead-letter");
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!((snap.stats.pending, snap.dlq_length), (2, 1), "moved out of the pending list, into the DLQ");

    let dead = store.dlq_list(CH, None, 10).await.expect("list");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!((d.stream_id, d.reason.as_str(), d.status, d.attempts), (ids[1], "http 400", Some(400), 1));
    assert_eq!(d.raw.as_deref(), Some(raw.as_slice()), "the store copied the bytes verbatim");
    assert_eq!(d.webhook().expect("decodes").id, "wh-1");
    assert_eq!(store.dlq_get(CH, d.id).await.expect("get").map(|e| e.stream_id), Some(ids[1]));
    assert!(store.dlq_list(CH, Some(d.id), 10).await.expect("list").is_empty(), "paging starts after `after`");

    let new_id = store.dlq_replay_one(CH, d).await.expect("replay").expect("has a webhook");
    assert!(new_id > ids[2]);
    assert_eq!(store.dlq_len(CH).await.expect("len"), 0);
    let again = reader.read("a", &new(), 10).await.expect("read");
    assert_eq!(again.len(), 1);
    let bytes = again[0].webhook.as_ref().map(|s| s.bytes.as_slice()).ok();
    assert_eq!(bytes, Some(raw.as_slice()), "same bytes, so the same webhook id");

    for id in &ids[..2] {
        let letter = DeadLetter { channel: CH, id: *id, reason: "r", status: None, attempts: 0 };
        store.dead_letter(&letter).await.expect("dead-letter");
    }
    // An entry the stream no longer holds is dead-lettered without bytes.
    let gone = StreamId::new(1, 0);
    let letter = DeadLetter { channel: CH, id: gone, reason: "gone", status: None, attempts: 2 };
    store.dead_letter(&letter).await.expect("dead-letter of a missing entry");
    let dead = store.dlq_list(CH, None, 10).await.expect("list");
    assert_eq!(dead.len(), 3);
    assert!(dead[..2].iter().all(|d| d.raw.is_some()), "still in the stream: bytes copied");
    assert_eq!((dead[2].stream_id, dead[2].raw.as_deref()), (gone, None));
    assert_eq!(store.dlq_purge(CH, None).await.expect("purge"), 3);
    for id in &ids[..2] {
        let letter = DeadLetter { channel: CH, id: *id, reason: "r", status: None, attempts: 0 };
        store.dead_letter(&letter).await.expect("dead-letter");
    }
    assert_eq!(store.dlq_purge(CH, Some(0)).await.expect("purge"), 0, "nothing older than the epoch");
    assert_eq!(store.dlq_purge(CH, None).await.expect("purge"), 2);
    assert_eq!(store.dlq_len(CH).await.expect("len"), 0);
}

async fn retention_dead_letters_unacked_entries_and_trims_only_acked_ones(backing: Backing) {
    let store = open(&backing).await;
    let old = append(&store, 4).await;
    let mut reader = store.reader().await.expect("reader");
    reader.read("a", &new(), 2).await.expect("read");
    store.ack(CH, &old[..1]).await.expect("ack");
    // old[0] acked, old[1] pending, old[2..] never delivered.
    // Time must pass by design: entry ages come from their ids' wall-clock
    // milliseconds, so `old` must be older than `retention` when `young` is new.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let young = append(&store, 1).await;
    let retention = Duration::from_millis(800);
    assert_eq!(store.expire(CH, retention).await.expect("expire"), 3, "the pending one and the two undelivered");
    let dead = store.dlq_list(CH, None, 10).await.expect("list");
    assert!(dead.iter().all(|d| d.reason == "expired" && d.raw.is_some()));
    let mut expired: Vec<StreamId> = dead.iter().map(|d| d.stream_id).collect();
    expired.sort();
    assert_eq!(expired, old[1..].to_vec());
    assert_eq!(dead.iter().find(|d| d.stream_id == old[1]).map(|d| d.attempts), Some(1));

    assert_eq!(store.trim(CH, retention).await.expect("trim"), 4);
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!((snap.length, snap.stats.backlog, snap.stats.pending), (1, 1, 0), "only the young entry is left");
    let got = reader.read("a", &new(), 10).await.expect("read");
    assert_eq!(ids_of(&got), young);
    assert_eq!(store.trim(CH, retention).await.expect("trim"), 0, "a young entry is kept");
}

/// A whole history replay, page by page as the admin API runs it.
async fn replay_range(store: &Store, since_ms: u64, until_ms: u64) -> u64 {
    use relay_edge::store::ReplayFrom;
    let Some(stop) = store.replay_stop(CH, until_ms).await.expect("stop point") else { return 0 };
    let (mut from, mut n) = (ReplayFrom::Since(since_ms), 0);
    loop {
        let page = store.replay_page(CH, from, stop, 500).await.expect("replay page");
        n += page.appended.len() as u64;
        match page.last {
            Some(last) if last != stop => from = ReplayFrom::After(last),
            _ => return n,
        }
    }
}

async fn history_replays_in_order_with_the_same_bytes(backing: Backing) {
    let store = open(&backing).await;
    let since = relay_edge::store::now_ms();
    let ids = append(&store, 3).await;
    let mut reader = store.reader().await.expect("reader");
    reader.read("a", &new(), 10).await.expect("read");
    store.ack(CH, &ids).await.expect("ack");
    let n = replay_range(&store, since, relay_edge::store::now_ms()).await;
    assert_eq!(n, 3);
    let again = reader.read("a", &new(), 10).await.expect("read");
    let names: Vec<String> =
        again.into_iter().map(|e| e.webhook.and_then(|s| s.decode()).expect("webhook").id).collect();
    assert_eq!(names, ["wh-0", "wh-1", "wh-2"]);
}

/// A replay whose `until` is in the future stops at the newest entry that
/// existed when it started: it never re-reads its own copies (it used to
/// grow the stream by millions and send each webhook thousands of times).
async fn a_replay_into_the_future_stops_at_what_existed(backing: Backing) {
    let store = open(&backing).await;
    append(&store, 1_200).await;
    let tomorrow = relay_edge::store::now_ms() + 86_400_000;
    let replay = tokio::time::timeout(Duration::from_secs(30), replay_range(&store, 0, tomorrow)).await;
    let n = replay.expect("the replay finishes");
    assert_eq!(n, 1_200, "each entry once");
    assert_eq!(store.snapshot(CH).await.expect("snapshot").length, 2_400);
}

/// Why acks must name their channel: a fan-out gives the same id on every
/// channel (on the embedded store always: one commit, one clock reading,
/// and the channels' last ids move together; on Redis when the `XADD`s
/// land in the same millisecond).
async fn a_fan_out_can_give_equal_ids_on_two_channels(backing: Backing) {
    let store = backing.store();
    let channels = ["crm".to_string(), "erp".to_string()];
    let mut equal = 0;
    for i in 0..20 {
        let ids = store.append(&channels, &webhook(i)).await.expect("append");
        equal += usize::from(ids[0] == ids[1]);
    }
    if backing.name() == "embedded" {
        assert_eq!(equal, 20, "every fan-out pair has one id");
    }
    eprintln!("{}: {equal} of 20 fan-out pairs with equal ids", backing.name());
}

async fn dedupe_keys_claim_record_and_release(backing: Backing) {
    let store = open(&backing).await;
    let window = Duration::from_secs(60);
    let key = relay_edge::store::keys::dedupe("hooks", "abc");
    assert_eq!(store.dedupe_claim(&key, window).await.expect("claim"), None, "first");
    assert_eq!(store.dedupe_claim(&key, window).await.expect("claim").as_deref(), Some("pending"));
    store.dedupe_record(&key, "{\"ok\":1}", window).await.expect("record");
    assert_eq!(store.dedupe_get(&key).await.expect("get").as_deref(), Some("{\"ok\":1}"));
    assert_eq!(store.dedupe_claim(&key, window).await.expect("claim").as_deref(), Some("{\"ok\":1}"));
    store.dedupe_release(&key).await.expect("release");
    assert_eq!(store.dedupe_get(&key).await.expect("get"), None);
    let short = Duration::from_millis(200);
    let other = relay_edge::store::keys::dedupe("hooks", "def");
    assert_eq!(store.dedupe_claim(&other, short).await.expect("claim"), None);
    // Time must pass by design: the key expires on the store's clock after
    // its window (polling a claim would take the key).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.dedupe_claim(&other, short).await.expect("claim"), None, "expired after its window");
}

async fn a_blocking_read_returns_as_soon_as_an_entry_arrives(backing: Backing) {
    let store = open(&backing).await;
    let mut reader = store.reader().await.expect("reader");
    let waiting = tokio::spawn(async move { reader.read("a", &new(), 10).await });
    // negative check: nothing to wait for — a read that waits shows nothing;
    // give it a moment in which a read that did not wait would have returned.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!waiting.is_finished(), "nothing to read: the read waits");
    append(&store, 1).await;
    // The test store's BLOCK is 1 s: an empty answer means the append did not wake it.
    let got = waiting.await.expect("join").expect("read");
    assert_eq!(got.len(), 1, "woken by the append within one BLOCK");
}

/// Two replays of one dead letter at once (two operators, a retried
/// request) move it back once: one gets the new id, the other `None`.
async fn a_dead_letter_replayed_twice_at_once_is_replayed_once(backing: Backing) {
    let store = open(&backing).await;
    let ids = append(&store, 1).await;
    let mut reader = store.reader().await.expect("reader");
    reader.read("a", &new(), 10).await.expect("read");
    let letter = DeadLetter { channel: CH, id: ids[0], reason: "r", status: None, attempts: 1 };
    store.dead_letter(&letter).await.expect("dead-letter");
    let dead = store.dlq_list(CH, None, 10).await.expect("list").remove(0);
    let (a, b) = tokio::join!(store.dlq_replay_one(CH, &dead), store.dlq_replay_one(CH, &dead));
    let replays = [a.expect("replay"), b.expect("replay")];
    assert_eq!(replays.iter().flatten().count(), 1, "replayed once: {replays:?}");
    assert_eq!(store.dlq_replay_one(CH, &dead).await.expect("replay"), None, "and never again");
    assert_eq!(reader.read("a", &new(), 10).await.expect("read").len(), 1, "one new entry");
}

/// One session reads several channels in one call, new entries and its
/// pending ones, at most `count` of each channel (on a cluster the channels sit
/// on different masters: the read goes to each in turn).
async fn a_read_of_several_channels_sees_every_channel(backing: Backing) {
    let store = backing.store();
    let channels: Vec<String> = ["crm", "erp", "billing"].map(String::from).to_vec();
    for ch in &channels {
        store.ensure_group(ch).await.expect("group");
    }
    let cursors = |c: Cursor| channels.iter().map(|ch| (ch.clone(), c)).collect::<Vec<_>>();
    for i in 0..3 {
        store.append(&channels, &webhook(i)).await.expect("fan-out");
    }
    let mut reader = store.reader().await.expect("reader");
    let got = reader.read("a", &cursors(Cursor::New), 100).await.expect("read");
    for ch in &channels {
        assert_eq!(got.iter().filter(|e| &e.channel == ch).count(), 3, "three of {ch} in {got:?}");
    }
    assert!(got.iter().all(|e| e.attempt == 1 && e.webhook.is_ok()));

    for i in 3..6 {
        store.append(&channels, &webhook(i)).await.expect("fan-out");
    }
    let first = reader.read("a", &cursors(Cursor::New), 2).await.expect("read");
    for ch in &channels {
        assert_eq!(first.iter().filter(|e| &e.channel == ch).count(), 2, "the count is per channel: {first:?}");
    }
    let rest = reader.read("a", &cursors(Cursor::New), 100).await.expect("read");
    assert_eq!(rest.len(), 3, "one more of each on the next read");

    let pending = reader.read("a", &cursors(Cursor::Pending(StreamId::ZERO)), 100).await.expect("pending");
    assert_eq!(pending.len(), 18, "all 18 pending on `a`, from every channel");
    for ch in &channels {
        let ids: Vec<StreamId> = pending.iter().filter(|e| &e.channel == ch).map(|e| e.id).collect();
        assert_eq!(store.ack(ch, &ids).await.expect("ack"), 6, "{ch}: six acked");
    }
    let left = reader.read("a", &cursors(Cursor::Pending(StreamId::ZERO)), 100).await.expect("pending");
    assert!(left.is_empty(), "nothing pending after the acks: {left:?}");
}

/// Concurrent appends (on Redis they share pipelines, a round each): every
/// one gets the ids of its own entries, one per channel in the route's
/// order, and every entry holds the webhook of the append it was given to.
async fn concurrent_appends_each_get_the_ids_of_their_own_entries(backing: Backing) {
    let store = backing.store();
    let routes: [Vec<String>; 3] =
        [vec!["crm".into()], vec!["crm".into(), "erp".into()], vec!["erp".into(), "crm".into(), "erp".into()]];
    for ch in ["crm", "erp"] {
        store.ensure_group(ch).await.expect("group");
    }
    let appends = (0..300).map(|i| {
        let (store, channels) = (store.clone(), routes[i % 3].clone());
        async move { (i, channels.clone(), store.append(&channels, &webhook(i)).await.expect("append")) }
    });
    let answered = futures_util::future::join_all(appends).await;
    let mut reader = store.reader().await.expect("reader");
    let mut stored = std::collections::HashMap::new();
    loop {
        let cursors = vec![("crm".to_string(), Cursor::New), ("erp".to_string(), Cursor::New)];
        let got = reader.read("a", &cursors, 1000).await.expect("read");
        if got.is_empty() {
            break;
        }
        for e in got {
            let bytes = e.webhook.expect("readable").bytes;
            let id = relay_protocol::decode_webhook(&bytes).expect("decodes").id;
            assert!(stored.insert((e.channel, e.id), id).is_none(), "one entry per id and channel");
        }
    }
    assert_eq!(stored.len(), 100 + 200 + 300, "every channel of every append stored once");
    for (i, channels, ids) in answered {
        assert_eq!(ids.len(), channels.len(), "append {i}: an id per channel");
        for (ch, id) in channels.into_iter().zip(ids) {
            assert_eq!(stored.get(&(ch.clone(), id)), Some(&format!("wh-{i}")), "append {i}'s id on {ch}");
        }
    }
}

/// A session's reads are sized for the largest entry the edge expects; a
/// larger one read (stored by an edge with larger ingest limits) raises
/// that size for every later read, so the next reads ask for fewer.
async fn a_larger_entry_read_sizes_later_reads_for_itself(backing: Backing) {
    use relay_edge::tunnel::fetcher::Fetcher;
    use relay_edge::tunnel::inflight::Grant;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = open(&backing).await;
    let ids = append(&store, 3).await;
    let mut big = webhook(99);
    big.body = vec![b'x'; 200 * 1024].into();
    let big_id = store.append(&[CH.to_string()], &big).await.expect("append")[0];
    let largest = Arc::new(AtomicUsize::new(2048));
    let reader = store.reader().await.expect("reader");
    let mut fetcher = Box::new(Fetcher::new(
        store.clone(),
        reader,
        "lan-1".into(),
        &[CH.to_string()],
        Duration::from_secs(60),
        (1 << 20, largest.clone()),
    ));
    let mut got = Vec::new();
    while got.len() < 4 {
        let grant = Grant { slots: 64, bytes: 1 << 20, channels: vec![CH.to_string()] };
        let (back, batch) = tokio::time::timeout(Duration::from_secs(5), fetcher.read(grant)).await.expect("in time");
        fetcher = back;
        got.extend(ids_of(&batch));
    }
    let mut want = ids.clone();
    want.push(big_id);
    assert_eq!(got, want, "all four, in order");
    let size = largest.load(Ordering::Relaxed);
    assert!(size >= 200 * 1024, "reads are now sized for the 200 KiB entry: {size}");
}

every_backend!(
    a_read_of_several_channels_sees_every_channel,
    a_larger_entry_read_sizes_later_reads_for_itself,
    concurrent_appends_each_get_the_ids_of_their_own_entries,
);
every_backend!(
    a_replay_into_the_future_stops_at_what_existed,
    a_fan_out_can_give_equal_ids_on_two_channels,
    a_dead_letter_replayed_twice_at_once_is_replayed_once,
);
every_backend!(
    groups_track_pending_entries_and_acks,
    stale_entries_are_reclaimed_and_claims_count_deliveries,
    dead_letters_keep_the_bytes_and_replay_as_new_entries,
    retention_dead_letters_unacked_entries_and_trims_only_acked_ones,
    history_replays_in_order_with_the_same_bytes,
    dedupe_keys_claim_record_and_release,
    a_blocking_read_returns_as_soon_as_an_entry_arrives,
);

/// Appends that share rounds (one pipeline) are told what their own
/// `XADD`s got: a channel whose key Redis refuses (here a string stands
/// where its stream should) fails its own route's requests, never the
/// others' (which are stored and answered).
#[tokio::test]
async fn a_refused_key_fails_only_the_appends_to_it() {
    let mut backing = Backing::redis();
    let mut raw = backing.redis_server().conn().await;
    let _: () =
        redis::cmd("SET").arg("relay:{broken}:stream").arg("not a stream").query_async(&mut raw).await.expect("SET");
    let store = backing.store();
    store.ensure_group(CH).await.expect("group");
    let appends = (0..200).map(|i| {
        let store = store.clone();
        let channels = vec![if i % 2 == 0 { CH.to_string() } else { "broken".to_string() }];
        async move { (i, store.append(&channels, &webhook(i)).await) }
    });
    let answered = futures_util::future::join_all(appends).await;
    for (i, r) in &answered {
        match (i % 2, r) {
            (0, Ok(ids)) => assert_eq!(ids.len(), 1),
            (1, Err(e)) => assert!(e.to_string().contains("WRONGTYPE"), "append {i}: {e}"),
            (_, r) => panic!("append {i}: {r:?}"),
        }
    }
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!(snap.length, 100, "every append to the healthy channel stored once");
}

#[tokio::test]
async fn the_embedded_store_survives_a_reopen() {
    let backing = Backing::embedded();
    let ids = {
        let store = open(&backing).await;
        let ids = append(&store, 3).await;
        let mut reader = store.reader().await.expect("reader");
        reader.read("a", &new(), 1).await.expect("read");
        ids
        // Last handle dropped: the file is synced and closed.
    };
    let store = open(&backing).await;
    let snap = store.snapshot(CH).await.expect("snapshot");
    assert_eq!((snap.length, snap.stats.backlog, snap.stats.pending), (3, 2, 1));
    let mut reader = store.reader().await.expect("reader");
    let mine = reader.read("a", &pending_after(StreamId::ZERO), 10).await.expect("history");
    assert_eq!((ids_of(&mine), attempts(&mine)), (ids[..1].to_vec(), vec![2]), "the count survives too");
    let next = append(&store, 1).await;
    assert!(next[0] > ids[2], "ids keep growing");
}

/// The embedded file holds every webhook: it and the directory the store
/// creates are the owner's only, whatever the process umask (022 here).
#[tokio::test]
async fn the_embedded_store_file_is_the_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let backing = Backing::embedded();
    let _store = open(&backing).await;
    let Backing::Embedded { path, .. } = &backing else { unreachable!("embedded") };
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(path), 0o600, "{}", path.display());
    assert_eq!(mode(path.parent().expect("dir")), 0o700, "the directory it created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_in_use_or_unwritable_is_refused_with_a_clear_error() {
    let backing = Backing::embedded();
    let certs = Certs::generate();
    let first = write_edge(&certs, "edge-a", &backing.toml(), "3s");
    let mut edge = Proc::start("relay-edge", &first.config);
    wait_until(Duration::from_secs(15), "first edge ready", || {
        std::net::TcpStream::connect(("127.0.0.1", first.admin)).is_ok()
    })
    .await;
    let second = write_edge(&certs, "edge-b", &backing.toml(), "3s");
    let config = second.config.display().to_string();
    let (code, _, err) = run_bin("relay-edge", &["--config", &config]).await;
    assert_ne!(code, 0, "a second edge on the same file must not start");
    assert!(err.contains("in use by another process"), "{err}");
    edge.sigterm().await;

    // check-config says which store a config selects, without secrets.
    let (code, out, _) = run_bin("relay-edge", &["--config", &config, "check-config"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("store: embedded at ") && out.contains("relay.redb"), "{out}");
    let redis = write_edge(&certs, "edge-r", "redis_url = \"redis://:hunter2pw@127.0.0.1:1/0\"", "3s");
    let config_r = redis.config.display().to_string();
    let (code, out, _) = run_bin("relay-edge", &["--config", &config_r, "check-config"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("store: redis at 127.0.0.1:1 db 0") && !out.contains("hunter2pw"), "{out}");

    let bad = write_edge(&certs, "edge-c", "path = \"/proc/version/relay.redb\"", "3s");
    let config = bad.config.display().to_string();
    let (code, _, err) = run_bin("relay-edge", &["--config", &config]).await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot open the embedded store /proc/version/relay.redb"), "{err}");
}

/// The README's migration: drain the embedded store with `max_backlog = 0`
/// (ingest refuses, agents deliver), then switch the edge to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_from_embedded_to_redis_by_draining_loses_nothing() {
    init_tracing();
    let (embedded, redis) = (Backing::embedded(), Backing::redis());
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let client = reqwest::Client::new();
    let mut sent = Vec::new();

    let edge = Edge::start(edge_config(&embedded, &certs)).await;
    for i in 0..20 {
        let (s, j) = post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"old\":{i}}}").into_bytes()).await;
        assert_eq!(s, 200, "{j}");
        sent.push(j["webhook_id"].as_str().expect("webhook_id").to_string());
    }
    let addrs = edge.stop().await;

    // 1. Drain mode: nothing accepted, the stored backlog still delivered.
    let mut cfg = edge_config(&embedded, &certs);
    cfg.store.max_backlog = 0;
    let edge = Edge::start_at(cfg, addrs).await;
    let (s, j) = post(&client, &edge.hook_url("hooks"), KEY, b"{\"during\":1}".to_vec()).await;
    assert_eq!((s, j["error"].as_str()), (503, Some("backlog_full")), "{j}");
    let agent_cfg = agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]);
    let agent = Agent::start(agent_cfg);
    wait_until(Duration::from_secs(20), "the embedded backlog drained", || rx.distinct_accepted() == 20).await;
    assert_drained(&embedded, "crm").await;
    assert_eq!(embedded.snapshot("crm").await.stats.backlog, 0);
    let addrs = edge.stop().await;

    // 2. Switch to Redis on the same addresses; the agent reconnects by itself.
    let edge = Edge::start_at(edge_config(&redis, &certs), addrs).await;
    agent.wait_connected(Duration::from_secs(15)).await;
    for i in 0..5 {
        let (s, j) = post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"new\":{i}}}").into_bytes()).await;
        assert_eq!(s, 200, "{j}");
        sent.push(j["webhook_id"].as_str().expect("webhook_id").to_string());
    }
    wait_until(Duration::from_secs(20), "new webhooks delivered via Redis", || rx.distinct_accepted() == 25).await;
    let got: std::collections::HashSet<String> = rx.accepted().into_iter().map(|d| d.relay_id).collect();
    assert!(sent.iter().all(|id| got.contains(id)), "every webhook answered 200 was delivered");
    assert_drained(&redis, "crm").await;
    agent.stop().await;
    edge.stop().await;
}
