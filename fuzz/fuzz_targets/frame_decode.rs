#![no_main]
//! Any bytes an agent or edge can send as one WebSocket message.

use libfuzzer_sys::fuzz_target;
use relay_protocol::{Limits, decode, encode};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(frame) = decode(data, &limits) {
        // What decodes must encode again and decode to the same frame.
        let bytes = encode(&frame, &limits).expect("a decoded frame re-encodes");
        assert_eq!(decode(&bytes, &limits).expect("re-decodes"), frame);
    }
});
