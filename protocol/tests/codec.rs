use proptest::prelude::*;
use relay_protocol::{
    ChannelStats, DecodeError, Frame, Header, Limits, Webhook, check_webhook, decode, encode, encode_deliver,
};

fn webhook() -> Webhook {
    Webhook {
        id: "0191e3a4-0000-7000-8000-000000000001".into(),
        method: "POST".into(),
        path: "/hooks/meta".into(),
        query: "a=1".into(),
        headers: vec![
            Header { name: "content-type".into(), value: b"application/json".to_vec() },
            Header { name: "x-odd".into(), value: vec![0xff, 0x00, 0x80] },
        ],
        body: br#"{"entry":[{"id":"\u00e9"}]}"#.to_vec().into(),
        route: "meta".into(),
        received_at_ms: 1_700_000_000_123,
        client_ip: "203.0.113.7".into(),
    }
}

/// Entries stored by edges from before `client_ip` decode with it empty,
/// and agents from before it read new entries (unknown fields are skipped).
#[test]
fn webhooks_without_client_ip_still_decode_both_ways() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Old {
        id: String,
        method: String,
        path: String,
        query: String,
        headers: Vec<Header>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        route: String,
        received_at_ms: u64,
    }
    let w = webhook();
    let old = Old {
        id: w.id.clone(),
        method: w.method.clone(),
        path: w.path.clone(),
        query: w.query.clone(),
        headers: w.headers.clone(),
        body: w.body.to_vec(),
        route: w.route.clone(),
        received_at_ms: w.received_at_ms,
    };
    let bytes = rmp_serde::to_vec_named(&old).expect("encode");
    assert_eq!(check_webhook(&bytes).expect("valid"), w.received_at_ms);
    let new: Webhook = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(new, Webhook { client_ip: String::new(), ..w.clone() });
    let back: Old = rmp_serde::from_slice(&rmp_serde::to_vec_named(&w).expect("encode")).expect("old decode");
    assert_eq!(back.id, w.id);
}

fn every_frame() -> Vec<Frame> {
    vec![
        Frame::Hello {
            version: 1,
            window: 64,
            channels: Some(vec!["crm".into()]),
            agent_version: Some("0.1.0".into()),
            named_acks: true,
        },
        Frame::Hello { version: 1, window: 1, channels: None, agent_version: None, named_acks: true },
        Frame::Welcome {
            session: "s1".into(),
            agent: "lan-1".into(),
            channels: vec!["crm".into()],
            heartbeat_ms: 10_000,
            reclaim_after_ms: Some(120_000),
        },
        Frame::Deliver {
            id: "1700000000000-0".into(),
            channel: "crm".into(),
            attempt: 2,
            received_at_ms: 1,
            webhook: webhook(),
        },
        Frame::ack([("crm", "1-0"), ("erp", "1-0")]),
        Frame::Ack { ids: vec!["1-0".into(), "2-0".into()], channels: vec![] },
        Frame::Nack {
            channel: Some("crm".into()),
            id: "1-0".into(),
            permanent: true,
            reason: "404 Not Found".into(),
            retry_after_ms: Some(500),
            status: Some(404),
        },
        Frame::Flow { window: 0, channel: None },
        Frame::Flow { window: 0, channel: Some("crm".into()) },
        Frame::Ping { t: 42 },
        Frame::Pong { t: 42 },
        Frame::Stats {
            channels: vec![ChannelStats { channel: "crm".into(), backlog: 3, pending: 1, oldest_ms: Some(12) }],
        },
        Frame::Error { code: "forbidden_channel".into(), message: "no".into() },
    ]
}

#[test]
fn every_frame_round_trips() {
    let limits = Limits::default();
    for frame in every_frame() {
        let bytes = encode(&frame, &limits).expect("encode");
        assert_eq!(decode(&bytes, &limits).expect("decode"), frame, "{}", frame.kind());
    }
}

#[test]
fn body_bytes_are_encoded_as_binary_not_an_integer_array() {
    let frame =
        Frame::Deliver { id: "1-0".into(), channel: "c".into(), attempt: 1, received_at_ms: 0, webhook: webhook() };
    let bytes = encode(&frame, &Limits::default()).expect("encode");
    let body = &webhook().body;
    assert!(bytes.windows(body.len()).any(|w| w == &body[..]), "body must appear verbatim");
}

#[test]
fn oversize_frame_is_refused_before_decoding() {
    let limits = Limits { max_frame: 16, ..Limits::default() };
    let err = decode(&[0u8; 17], &limits).expect_err("must refuse");
    assert!(matches!(err, DecodeError::TooLarge { size: 17, limit: 16 }), "{err}");
    let big =
        Frame::Deliver { id: "1-0".into(), channel: "c".into(), attempt: 1, received_at_ms: 0, webhook: webhook() };
    assert!(encode(&big, &limits).is_err());
}

#[test]
fn garbage_is_a_malformed_error() {
    let err = decode(b"\xc1\xc1 not msgpack", &Limits::default()).expect_err("must refuse");
    assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
}

#[test]
fn window_and_ack_batch_limits_are_enforced() {
    let limits = Limits { max_window: 10, max_ack_batch: 2, ..Limits::default() };
    let hello = encode(
        &Frame::Hello { version: 1, window: 11, channels: None, agent_version: None, named_acks: true },
        &Limits::default(),
    )
    .expect("encode");
    assert!(matches!(decode(&hello, &limits), Err(DecodeError::Limit(_))));
    let ack =
        encode(&Frame::Ack { ids: vec!["1".into(), "2".into(), "3".into()], channels: vec![] }, &Limits::default())
            .expect("encode");
    assert!(matches!(decode(&ack, &limits), Err(DecodeError::Limit(_))));
}

/// A newer peer may add fields: an older decoder must ignore them.
#[derive(serde::Serialize)]
enum FutureFrame {
    Ping { t: u64, extra: String, nested: Vec<u32> },
}

#[test]
fn unknown_extra_fields_are_tolerated() {
    let bytes =
        rmp_serde::to_vec_named(&FutureFrame::Ping { t: 7, extra: "new".into(), nested: vec![1, 2] }).expect("encode");
    assert_eq!(decode(&bytes, &Limits::default()).expect("decode"), Frame::Ping { t: 7 });
}

#[derive(serde::Serialize)]
enum OldHello {
    Hello { version: u32, window: u32 },
}

#[test]
fn optional_fields_may_be_missing() {
    let bytes = rmp_serde::to_vec_named(&OldHello::Hello { version: 1, window: 5 }).expect("encode");
    assert_eq!(
        decode(&bytes, &Limits::default()).expect("decode"),
        Frame::Hello { version: 1, window: 5, channels: None, agent_version: None, named_acks: false }
    );
}

#[test]
fn deliver_around_stored_bytes_is_the_frame_encoded_whole() {
    let w = webhook();
    let stored = rmp_serde::to_vec_named(&w).expect("store encoding");
    assert_eq!(check_webhook(&stored).expect("valid"), w.received_at_ms);
    for (attempt, received_at_ms) in [(1, 0), (127, 1), (128, 255), (70_000, u64::MAX), (u32::MAX, 1_700_000_000_123)] {
        let spliced = encode_deliver("1700000000000-12", "crm", attempt, received_at_ms, &stored, &Limits::default())
            .expect("splice");
        let frame = Frame::Deliver {
            id: "1700000000000-12".into(),
            channel: "crm".into(),
            attempt,
            received_at_ms,
            webhook: w.clone(),
        };
        assert_eq!(spliced, encode(&frame, &Limits::default()).expect("encode"), "attempt {attempt}");
    }
}

#[test]
fn stored_bytes_that_are_not_a_webhook_fail_the_check() {
    let mut w = rmp_serde::to_vec_named(&webhook()).expect("encode");
    assert!(check_webhook(&w[..w.len() - 3]).is_err(), "truncated");
    assert!(check_webhook(&rmp_serde::to_vec_named(&("id", 1)).expect("encode")).is_err(), "not a map");
    // A field of the wrong type: the id as a number.
    #[derive(serde::Serialize)]
    struct NumericId {
        id: u32,
        method: &'static str,
        path: &'static str,
        headers: Vec<Header>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        route: &'static str,
        received_at_ms: u64,
    }
    let numeric =
        NumericId { id: 7, method: "POST", path: "/", headers: vec![], body: vec![], route: "r", received_at_ms: 1 };
    let bad = rmp_serde::to_vec_named(&numeric).expect("encode");
    assert!(check_webhook(&bad).is_err(), "id must be a string");
    assert!(rmp_serde::from_slice::<Webhook>(&bad).is_err(), "and Webhook agrees");
    w.clear();
    assert!(check_webhook(&w).is_err(), "empty");
}

#[test]
fn a_spliced_deliver_over_the_limit_is_refused() {
    let stored = rmp_serde::to_vec_named(&webhook()).expect("encode");
    let limits = Limits { max_frame: stored.len(), ..Limits::default() };
    assert!(matches!(
        encode_deliver("1-0", "c", 1, 0, &stored, &limits),
        Err(relay_protocol::EncodeError::TooLarge { .. })
    ));
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn decoding_mutated_frames_never_panics(idx in 0usize..13, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let frames = every_frame();
        let mut bytes = encode(&frames[idx % frames.len()], &Limits::default()).expect("encode");
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn arbitrary_webhooks_round_trip(body in proptest::collection::vec(any::<u8>(), 0..512), path in "/[a-z/]{0,20}", value in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut w = webhook();
        w.body = body.into();
        w.path = path;
        w.headers.push(Header { name: "x".into(), value });
        let stored = rmp_serde::to_vec_named(&w).expect("store encoding");
        prop_assert_eq!(check_webhook(&stored).expect("valid"), w.received_at_ms);
        let frame = Frame::Deliver { id: "9-9".into(), channel: "c".into(), attempt: 1, received_at_ms: 0, webhook: w };
        let bytes = encode(&frame, &Limits::default()).expect("encode");
        let spliced = encode_deliver("9-9", "c", 1, 0, &stored, &Limits::default()).expect("splice");
        prop_assert_eq!(&spliced, &bytes);
        prop_assert_eq!(decode(&bytes, &Limits::default()).expect("decode"), frame);
    }
}

/// An `Ack` from an agent that predates `channels` decodes with the list
/// empty, and reads back as ids with no channel.
#[derive(serde::Serialize)]
enum OldAck {
    Ack { ids: Vec<String> },
    Nack { id: String, permanent: bool, reason: String },
}

#[test]
fn acks_and_nacks_of_older_agents_name_no_channel() {
    let bytes = rmp_serde::to_vec_named(&OldAck::Ack { ids: vec!["1-0".into()] }).expect("encode");
    let frame = decode(&bytes, &Limits::default()).expect("decode");
    assert_eq!(frame.into_acked(), Some(vec![(None, "1-0".to_string())]));
    let bytes = rmp_serde::to_vec_named(&OldAck::Nack { id: "1-0".into(), permanent: false, reason: "x".into() })
        .expect("encode");
    let Frame::Nack { channel, id, .. } = decode(&bytes, &Limits::default()).expect("decode") else {
        panic!("not a nack")
    };
    assert_eq!((channel, id.as_str()), (None, "1-0"));
}

#[test]
fn an_ack_names_each_channel_and_id() {
    let frame = Frame::ack([("a", "1-0"), ("b", "1-0")]);
    let pair = |c: &str| (Some(c.to_string()), "1-0".to_string());
    assert_eq!(frame.into_acked(), Some(vec![pair("a"), pair("b")]));
}

#[test]
fn an_ack_whose_lists_disagree_is_refused() {
    let frame = Frame::Ack { ids: vec!["1-0".into(), "2-0".into()], channels: vec!["a".into()] };
    let bytes = encode(&frame, &Limits::default()).expect("encode");
    assert!(matches!(decode(&bytes, &Limits::default()), Err(DecodeError::Limit(_))));
    assert_eq!(frame.into_acked(), None);
}

/// MessagePack `fixarray`/`array32` headers claiming more entries than the
/// cap are refused from the header; a real list past the cap is refused at
/// the first entry over it.
#[test]
fn lists_are_counted_while_decoding() {
    let many: Vec<String> = vec![String::new(); relay_protocol::MAX_HELLO_CHANNELS + 1];
    let hello = Frame::Hello { version: 1, window: 1, channels: Some(many), agent_version: None, named_acks: true };
    let bytes = encode(&hello, &Limits::default()).expect("encode");
    let err = decode(&bytes, &Limits::default()).expect_err("too many channels");
    assert!(err.to_string().contains("at most 1024 channels"), "{err}");

    let ids: Vec<String> = vec![String::new(); relay_protocol::MAX_ACK_BATCH + 1];
    let bytes = encode(&Frame::Ack { ids, channels: vec![] }, &Limits::default()).expect("encode");
    assert!(decode(&bytes, &Limits::default()).is_err(), "too many ids");

    // A header announcing 2^32-1 ids in a 20-byte frame.
    let mut forged = Vec::new();
    rmp::encode::write_map_len(&mut forged, 1).expect("write");
    rmp::encode::write_str(&mut forged, "Ack").expect("write");
    rmp::encode::write_map_len(&mut forged, 1).expect("write");
    rmp::encode::write_str(&mut forged, "ids").expect("write");
    rmp::encode::write_array_len(&mut forged, u32::MAX).expect("write");
    assert!(decode(&forged, &Limits::default()).is_err());
}

#[test]
fn agent_frames_are_capped_below_deliveries() {
    let limits = Limits::default().for_agent_frames();
    assert_eq!(limits.max_frame, Limits::MAX_AGENT_FRAME);
    let reason = "x".repeat(Limits::MAX_AGENT_FRAME);
    let nack = Frame::Nack {
        channel: Some("a".into()),
        id: "1-0".into(),
        permanent: false,
        reason,
        retry_after_ms: None,
        status: None,
    };
    let bytes = encode(&nack, &Limits::default()).expect("encode");
    assert!(matches!(decode(&bytes, &limits), Err(DecodeError::TooLarge { .. })));
}
