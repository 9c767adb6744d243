//! Bounded property tests of the ingest request path: the same entry point
//! the `ingest_request` fuzz target drives (see `fuzz/`), on arbitrary and
//! on structured input. Nothing may panic.

use proptest::prelude::*;
use relay_edge::ingest::fuzz::ingest_input;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        ingest_input(&data);
    }

    #[test]
    fn structured_requests_never_panic(
        flags in any::<u8>(),
        key in "[ -~]{0,40}",
        path in "/hooks/[a-z]{0,8}(/[ -~]{0,20})?",
        query in "([a-z_]{1,8}=[ -~&]{0,12}){0,4}",
        headers in proptest::collection::vec(("[a-z-]{1,20}", "[ -~]{0,40}"), 0..12),
        sig in proptest::option::of("sha256=[0-9a-f]{0,70}"),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut data = vec![flags];
        for (i, part) in [key.as_bytes(), path.as_bytes(), query.as_bytes()].iter().enumerate() {
            if i > 0 { data.push(0xFF); }
            data.extend_from_slice(part);
        }
        data.push(0xFF);
        for (n, v) in &headers {
            data.extend_from_slice(format!("{n}:{v}\n").as_bytes());
        }
        if let Some(s) = sig {
            data.extend_from_slice(format!("x-hub-signature-256:{s}\ncontent-type:application/json\n").as_bytes());
        }
        data.push(0xFF);
        data.extend_from_slice(&body);
        ingest_input(&data);
    }
}
