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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Status { json, socket } => {
            let socket = socket.unwrap_or_else(|| {
                relay_agent::AgentConfig::load(cli.config.as_deref())
                    .map(|c| c.status_socket)
                    .unwrap_or_else(|_| relay_agent::config::default_status_socket())
            });
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
            init_tracing();
            let cfg = match relay_agent::AgentConfig::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay-agent: {e}");
                    return ExitCode::from(64);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
