//! `relay-bench`: the pieces of the benchmark — a fast receiver, a closed-
//! and open-loop HTTP load generator (hyper, keep-alive), process resource
//! readings from `/proc`, and the raw Redis stream cycle yardstick.
#![forbid(unsafe_code)]

pub mod callgrind;
pub mod load;
pub mod proc;
pub mod stats;
pub mod syscalls;
pub mod tunnel;
pub mod yardstick;
