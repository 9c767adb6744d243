//! `relay-runtime`: what both binaries do the same way at start, so that
//! `relay-edge` and `relay-agent` cannot drift apart in it.
//!
//! - [`config`]: the configuration layers (the binary's embedded
//!   `config.default.toml` < the `--config` file < `RELAY_*` variables) and
//!   the check that an embedded defaults file matches its `Default` impl.
//! - [`error`]: [`ConfigError`] (a configuration that cannot work, naming
//!   the key) and [`SignalError`].
//! - [`logging`]: the one `tracing` subscriber, human lines or JSON.
//! - [`signals`]: SIGTERM/SIGINT → shutdown, SIGHUP → reload, installed
//!   before anything listens.
//!
//! No policy lives here: each binary still decides what its keys mean and
//! validates them.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod logging;
pub mod signals;

pub use error::{ConfigError, SignalError};
pub use logging::{LogFormat, init_logging};
pub use signals::{Request, Signals};
