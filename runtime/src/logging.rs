//! The one `tracing` subscriber of both binaries: to stderr, human lines
//! by default or JSON objects for journald/Loki (`--log-format json`).
//! Level from `RUST_LOG`; default `info` ([`DEFAULT_FILTER`]): one line per state change
//! (`debug` adds one line per webhook).

use tracing_subscriber::EnvFilter;

/// Log output: `--log-format` (env `RELAY_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    // No doc comments on the variants: clap would print them in `--help`.
    Human,
    Json,
}

/// Without `RUST_LOG`: `info`, but the Redis client's own cluster
/// bookkeeping only when it fails (it warns once per connection and
/// command while a cluster node fails over; the edge's store errors say
/// what matters).
pub const DEFAULT_FILTER: &str = "info,redis::cluster_handling=error";

/// Installs the global subscriber. Only one installed before (by a test)
/// can make this fail, and that one is then kept.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
