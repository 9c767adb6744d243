//! The tunnel yardstick: rathole (a TCP reverse tunnel that stores
//! nothing), its server and client on loopback, carrying the same load to
//! the same receiver as the relay. The binary is not part of the project:
//! `scripts/bench.sh` installs it with `cargo install` into `target/`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::procs::free_port;
use tokio::process::{Child, Command};

/// A running rathole server and client; both killed (by their own PIDs,
/// `kill_on_drop`) when dropped.
pub struct Rathole {
    server: Child,
    client: Child,
    /// Where senders connect: the server's end of the tunnelled service.
    pub port: u16,
}

impl Rathole {
    /// Starts a tunnel in `dir` whose far end is `target` (the receiver),
    /// once a TCP connection through it reaches the receiver.
    pub async fn start(bin: &Path, dir: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        let (control, port) = (free_port(), free_port());
        let server_cfg = dir.join("rathole-server.toml");
        let client_cfg = dir.join("rathole-client.toml");
        std::fs::write(
            &server_cfg,
            format!(
                "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tcp\"\n\
                 [server.transport.tcp]\nnodelay = true\n\
                 [server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{port}\"\n"
            ),
        )?;
        std::fs::write(
            &client_cfg,
            format!(
                "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"tcp\"\n\
                 [client.transport.tcp]\nnodelay = true\n\
                 [client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\n"
            ),
        )?;
        let spawn = |mode: &str, cfg: &Path| {
            Command::new(bin)
                .arg(mode)
                .arg(cfg)
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start {} {mode}", bin.display()))
        };
        let server = spawn("--server", &server_cfg)?;
        let client = spawn("--client", &client_cfg)?;
        let tunnel = Self { server, client, port };
        tunnel.wait_ready().await?;
        Ok(tunnel)
    }

    /// Until an HTTP request through the tunnel is answered.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = b"POST /webhook HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await
                && s.write_all(probe).await.is_ok()
            {
                let mut buf = [0u8; 12];
                let read = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await;
                if matches!(read, Ok(Ok(_))) && buf.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the rathole tunnel did not carry a request within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The PIDs of the server and the client.
    pub fn pids(&self) -> Vec<u32> {
        [self.server.id(), self.client.id()].into_iter().flatten().collect()
    }
}
