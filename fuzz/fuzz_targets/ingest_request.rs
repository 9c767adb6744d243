#![no_main]
//! The ingest checks on attacker-controlled keys, paths, queries, headers
//! and bodies (layout: `relay_edge::ingest::fuzz::ingest_input`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| relay_edge::ingest::fuzz::ingest_input(data));
