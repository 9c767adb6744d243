//! `relay-edge`: thin entry point. Parses the command line, loads config
//! (exit 64 on a bad one), and hands over to `relay_edge::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "relay-edge",
    version,
    about = "Public edge of the webhook relay"
)]
struct Cli {
    /// Config file (TOML). Environment `RELAY_*` overrides it.
    #[arg(long, short, global = true, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge (the default).
    Run,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Make development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a dev CA (kept if present) and the edge server certificate.
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Names and IPs the edge certificate is valid for.
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// Also issue client certificates for these agents.
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// Replace an existing CA (invalidates every issued certificate).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for agent NAME (its identity).
    Agent {
        name: String,
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command.unwrap_or(Command::Run) {
        Command::Certs(cmd) => certs(cmd),
        Command::CheckConfig => match relay_edge::EdgeConfig::load(cli.config.as_deref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay-edge: {e}");
                ExitCode::from(64)
            }
        },
        Command::Run => {
            let cfg = match relay_edge::EdgeConfig::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay-edge: {e}");
                    return ExitCode::from(64);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("relay-edge: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay-edge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(cfg: relay_edge::EdgeConfig) -> anyhow::Result<()> {
    let listeners = relay_edge::Listeners::bind(&cfg).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    relay_edge::run(cfg, listeners, shutdown).await?;
    Ok(())
}

/// SIGINT or SIGTERM cancel the one shutdown token.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn certs(cmd: CertsCommand) -> ExitCode {
    let result = match cmd {
        CertsCommand::Init {
            dir,
            sans,
            agents,
            force,
        } => relay_edge::certs::init(&dir, &sans, force).and_then(|mut w| {
            for a in &agents {
                w.files.extend(relay_edge::certs::agent(&dir, a)?.files);
            }
            Ok(w)
        }),
        CertsCommand::Agent { name, dir } => relay_edge::certs::agent(&dir, &name),
    };
    match result {
        Ok(w) => {
            for f in w.files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-edge certs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
