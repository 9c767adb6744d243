//! Errors of starting up, shared by both binaries.

use std::path::PathBuf;

use thiserror::Error;

/// Configuration that cannot work; the message names the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: `{key}` {why}")]
    Key { key: String, why: String },
}

/// A signal handler could not be installed (so the signal would keep its
/// default action: ending the process without a clean shutdown).
#[derive(Debug, Error)]
#[error("cannot install the {signal} handler: {source}")]
pub struct SignalError {
    /// `SIGTERM`, `SIGINT` or `SIGHUP`.
    pub signal: &'static str,
    #[source]
    pub source: std::io::Error,
}
