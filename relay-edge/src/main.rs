//! `relay-edge`: thin entry point. Parses the command line, loads config
//! (exit 64 on a bad one), and hands over to `relay_edge::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay_edge::admin::cli;
use relay_runtime::{LogFormat, Request, Signals};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "relay-edge", version, about = "Public edge of the webhook relay")]
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
    /// Run the edge (the default).
    Run,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Print every configuration key with its default and meaning (the
    /// built-in config.default.toml), then exit.
    PrintDefaultConfig,
    /// Make development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Dead letters: list, show, replay, purge (calls the admin API).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Connected agents: identity, address, since, channels, in flight, RTT.
    Agents {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-deliver webhooks from the stream's retained history.
    Replay {
        #[arg(long)]
        channel: String,
        /// RFC 3339 time, or a duration meaning "that long ago" (2h).
        #[arg(long)]
        since: String,
        /// Same forms as --since; default now.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API address (default: admin.listen from the config).
    #[arg(long, env = "RELAY_ADMIN_URL", global = true)]
    admin: Option<String>,
    /// Bearer token (default: admin.token, or the file admin.token_file, from the config).
    #[arg(long, env = "RELAY_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters of a channel, oldest first.
    List {
        #[arg(long)]
        channel: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter with its headers and body.
    Show {
        id: String,
        /// Channel (default: search every configured channel).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Put dead letters back into the stream (same X-Relay-Id).
    Replay {
        #[arg(long)]
        channel: String,
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters (all, or those that failed before a time).
    Purge {
        #[arg(long)]
        channel: String,
        /// RFC 3339 time, or a duration meaning "that long ago" (7d).
        #[arg(long)]
        before: Option<String>,
    },
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
    /// Print the ids of a certificate for `tunnel.revoked`.
    Fingerprint { file: PathBuf },
    /// Add a certificate to a revocation list file (`tunnel.revoked_file`);
    /// then reload the edge (SIGHUP) to drop and refuse it.
    Revoke {
        file: PathBuf,
        #[arg(long)]
        list: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    relay_runtime::init_logging(cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Certs(cmd) => certs(cmd),
        Command::PrintDefaultConfig => {
            print!("{}", relay_edge::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Dlq { command, admin } => admin_command(cli.config.as_deref(), admin, |now, channels| {
            Ok(match command {
                DlqCommand::List { channel, limit } => cli::Command::List { channel, limit },
                DlqCommand::Show { id, channel } => cli::Command::Show { channel, id, channels },
                DlqCommand::Replay { channel, ids, all } => {
                    if ids.is_empty() && !all {
                        return Err("name the dead letters to replay, or pass --all".into());
                    }
                    cli::Command::ReplayDlq { channel, ids, all }
                }
                DlqCommand::Purge { channel, before } => {
                    cli::Command::Purge { channel, before_ms: before.map(|b| cli::parse_time(&b, now)).transpose()? }
                }
            })
        }),
        Command::Agents { admin } => admin_command(cli.config.as_deref(), admin, |_, _| Ok(cli::Command::Agents)),
        Command::Replay { channel, since, until, admin } => admin_command(cli.config.as_deref(), admin, |now, _| {
            Ok(cli::Command::ReplayHistory {
                channel,
                since_ms: cli::parse_time(&since, now)?,
                until_ms: until.map(|u| cli::parse_time(&u, now)).transpose()?,
            })
        }),
        Command::CheckConfig => match relay_edge::EdgeConfig::load(cli.config.as_deref()) {
            Ok(cfg) => {
                println!("configuration is valid");
                println!("store: {} at {}", cfg.store.backend(), cfg.store.location());
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
            let rt = match cfg.worker_threads {
                1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
                0 => tokio::runtime::Runtime::new(),
                n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
            };
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("relay-edge: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg, cli.config.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay-edge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(cfg: relay_edge::EdgeConfig, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers first: once a port answers, SIGTERM means a clean shutdown
    // and SIGHUP a reload, never the signals' default action (exit).
    let signals = Signals::shutdown_and_reload()?;
    let listeners = relay_edge::Listeners::bind(&cfg).await?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(on_signals(signals, shutdown.clone(), reload_tx, path));
    relay_edge::run(cfg, listeners, shutdown, reload_rx).await?;
    Ok(())
}

/// SIGINT or SIGTERM cancel the one shutdown token; SIGHUP reloads the
/// configuration (a bad one is logged and the running one kept).
async fn on_signals(
    mut signals: Signals,
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<relay_edge::EdgeConfig>,
    path: Option<PathBuf>,
) {
    while signals.recv().await == Request::Reload {
        match relay_edge::EdgeConfig::load(path.as_deref()) {
            Ok(cfg) => {
                let _ = reload.send(cfg).await;
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded"),
        }
    }
    shutdown.cancel();
}

/// Resolves the admin API (flags, else config), builds and runs a command.
fn admin_command(
    config: Option<&std::path::Path>,
    args: AdminArgs,
    build: impl FnOnce(u64, Vec<String>) -> Result<cli::Command, String>,
) -> ExitCode {
    let (base, token, channels) = match (args.admin, config) {
        (Some(base), _) => (base, args.token, Vec::new()),
        (None, path) => match relay_edge::EdgeConfig::load(path) {
            Ok(cfg) => (
                cfg.admin.listen.clone(),
                args.token.or(cfg.admin.token.as_ref().map(|t| t.expose().to_string())),
                cfg.all_channels().into_iter().collect(),
            ),
            Err(e) => {
                eprintln!("relay-edge: {e} (or pass --admin URL)");
                return ExitCode::from(64);
            }
        },
    };
    let now = relay_edge::store::now_ms();
    let cmd = match build(now, channels) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay-edge: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay-edge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = cli::AdminClient::new(base, token);
    match rt.block_on(cli::run(&client, cmd, args.json)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_fingerprint(file: &std::path::Path) -> ExitCode {
    match relay_edge::certs::fingerprint(file) {
        Ok(ids) => {
            println!("{}\n{}", ids.fingerprint, ids.serial);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-edge certs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn certs(cmd: CertsCommand) -> ExitCode {
    let result = match cmd {
        CertsCommand::Init { dir, sans, agents, force } => {
            relay_edge::certs::init(&dir, &sans, force).and_then(|mut w| {
                for a in &agents {
                    w.files.extend(relay_edge::certs::agent(&dir, a)?.files);
                }
                Ok(w)
            })
        }
        CertsCommand::Agent { name, dir } => relay_edge::certs::agent(&dir, &name),
        CertsCommand::Fingerprint { file } => return print_fingerprint(&file),
        CertsCommand::Revoke { file, list } => match relay_edge::certs::revoke(&file, &list) {
            Ok(id) => {
                println!("{id} added to {}; reload the edge (systemctl reload relay-edge) to apply it", list.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e),
        },
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
