//! `relay-agent`: thin entry point. `relay-agent [--config F] [run]` runs
//! the agent; `relay-agent status [--json]` asks a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "relay-agent", version, about = "LAN agent of the webhook relay")]
struct Cli {
    /// Config file (TOML). Environment `RELAY_*` overrides it.
    #[arg(long, short, global = true, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Log output: human lines or JSON objects.
    #[arg(long, global = true, value_enum, default_value = "human", env = "RELAY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Show the running agent's tunnel health. Exit 0 connected, 1
    /// disconnected or stale, 2 not running.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Status socket (default: from the config, else the built-in default).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Redraw every second.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Status { json, socket, watch } => {
            let socket = socket.unwrap_or_else(|| {
                relay_agent::AgentConfig::load(cli.config.as_deref())
                    .map(|c| c.status_socket)
                    .unwrap_or_else(|_| relay_agent::config::default_status_socket())
            });
            if watch {
                return ExitCode::from(relay_agent::status::client::watch(&socket));
            }
            ExitCode::from(relay_agent::status::client::run(&socket, json))
        }
        Command::CheckConfig => match relay_agent::AgentConfig::load(cli.config.as_deref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay-agent: {e}");
                ExitCode::from(64)
            }
        },
        Command::Run => {
            init_tracing(cli.log_format);
            let cfg = match relay_agent::AgentConfig::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay-agent: {e}");
                    return ExitCode::from(64);
                }
            };
            // One thread: the agent is I/O-bound; a single-threaded runtime
            // saves memory and cross-thread wake-ups.
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("relay-agent: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = CancellationToken::new();
            match rt.block_on(async {
                tokio::spawn(signals(shutdown.clone()));
                relay_agent::run(cfg, shutdown).await
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// Human lines by default; `--log-format json` for journald/Loki. Level
/// from `RUST_LOG` (default `info`: one line per state change; `debug`
/// adds one line per webhook).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}
