//! `relay-agent`: thin entry point. `relay-agent [--config F] [run]` runs
//! the agent; `relay-agent status [--json]` asks a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay_runtime::{LogFormat, Signals};
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
    /// Print every configuration key with its default and meaning (the
    /// built-in config.default.toml), then exit.
    PrintDefaultConfig,
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
        Command::PrintDefaultConfig => {
            print!("{}", relay_agent::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
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
            relay_runtime::init_logging(cli.log_format);
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
            let ran = rt.block_on(async {
                // Handlers before the tunnel starts: from then on SIGTERM
                // and SIGINT are a clean shutdown, never an abrupt exit.
                tokio::spawn(Signals::shutdown()?.cancel_on_shutdown(shutdown.clone()));
                relay_agent::run(cfg, shutdown).await?;
                Ok::<(), anyhow::Error>(())
            });
            match ran {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
