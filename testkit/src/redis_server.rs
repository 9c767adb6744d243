//! A real `redis-server`, on a free loopback port, in a temp dir, killed
//! (by its own PID) on drop. Never skipped: when the binary is missing the
//! test fails and says how to install it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::free_port;

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// What it runs as: a server, a replica of a port, or a sentinel.
    role: Role,
}

#[derive(Clone)]
enum Role {
    Server,
    ReplicaOf(u16),
    /// Watching the master on this port as `MASTER_NAME`.
    Sentinel(u16),
    /// A Redis Cluster node whose cluster bus listens on this port.
    ClusterNode(u16),
}

/// The master name the test sentinels watch.
pub const MASTER_NAME: &str = "relay-master";

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with("everysec")
    }

    /// With `appendfsync` = `everysec` or `always`.
    pub fn start_with(fsync: &str) -> Self {
        Self::start_as(fsync, Role::Server)
    }

    /// A replica of `master`, once its link to the master is up.
    pub fn replica_of(master: &RedisServer) -> Self {
        let replica = Self::start_as("everysec", Role::ReplicaOf(master.port));
        replica.wait_replicating(Duration::from_secs(10));
        replica
    }

    /// A sentinel watching `master` (as [`MASTER_NAME`], quorum 2): it
    /// calls a master down after 1 s of silence.
    pub fn sentinel_of(master: &RedisServer) -> Self {
        Self::start_as("everysec", Role::Sentinel(master.port))
    }

    /// A node for a Redis Cluster (see [`RedisCluster`](crate::RedisCluster)),
    /// not yet part of one. It declares a node failed after 1 s of silence.
    pub fn cluster_node() -> Self {
        Self::start_as("everysec", Role::ClusterNode(free_port()))
    }

    /// Waits until this replica's link to its master is up.
    pub fn wait_replicating(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let info = self.info("replication");
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(Instant::now() < deadline, "replica on port {} never linked: {info}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `INFO <section>` (empty when the server does not answer).
    pub fn info(&self, section: &str) -> String {
        self.command(&["INFO", section])
    }

    /// One command's answer as text (empty when the server does not answer).
    pub fn command(&self, args: &[&str]) -> String {
        let Ok(client) = redis::Client::open(self.url()) else { return String::new() };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(500)) else { return String::new() };
        match redis::cmd(args[0]).arg(&args[1..]).query::<redis::Value>(&mut c) {
            Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(redis::Value::SimpleString(s)) => s,
            Ok(redis::Value::VerbatimString { text, .. }) => text,
            Ok(redis::Value::Int(n)) => n.to_string(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error: {e}"),
        }
    }

    /// What a sentinel logged (its `+sdown`, `+switch-master`, …).
    pub fn sentinel_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    /// The sentinel URL of this server (for `store.sentinel_addrs`).
    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start_as(fsync: &str, role: Role) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for redis");
        std::fs::write(dir.path().join("fsync"), fsync).expect("write fsync setting");
        let mut last_err = String::new();
        // A free port can be taken between probing and binding: try again.
        for _ in 0..20 {
            let port = free_port();
            match spawn(dir.path(), port, &role) {
                Ok(mut child) => {
                    if wait_ready(&mut child, port, Duration::from_secs(5)) {
                        return Self { port, dir, child: Some(child), role };
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!("redis-server on port {port} did not answer PING");
                }
                Err(e) => last_err = e,
            }
        }
        panic!("cannot start redis-server: {last_err}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL to our own child).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut child) = spawn(self.dir.path(), self.port, &self.role) {
                if wait_ready(&mut child, self.port, Duration::from_secs(3)) {
                    self.child = Some(child);
                    return;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            assert!(Instant::now() < deadline, "redis-server did not come back on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_ready(child: &mut Child, port: u16, within: Duration) -> bool {
    let url = format!("redis://127.0.0.1:{port}/0");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &std::path::Path, port: u16, role: &Role) -> Result<Child, String> {
    let mut cmd = Command::new("redis-server");
    match role {
        Role::Server => {}
        Role::ClusterNode(bus) => {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]).args([
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                &bus.to_string(),
            ]);
        }
        Role::ReplicaOf(master) => {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        Role::Sentinel(master) => {
            // A sentinel rewrites its config file: one of its own.
            let conf = dir.join("sentinel.conf");
            let text = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 4000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.display()
            );
            if !conf.exists() {
                std::fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
            }
            let log = std::fs::File::create(dir.join("sentinel.log")).map_err(|e| format!("sentinel log: {e}"))?;
            return Command::new("redis-server")
                .arg(&conf)
                .args(["--sentinel", "--loglevel", "notice"])
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    format!("cannot run redis-server --sentinel ({e}); install it: `apt-get install -y redis-server`")
                });
        }
    }
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
        .args(["--appendfsync", &std::fs::read_to_string(dir.join("fsync")).unwrap_or_else(|_| "everysec".into())])
        .args(["--protected-mode", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot run redis-server ({e}); install it: `apt-get install -y redis-server` (the README's test command does this)")
        })
}
