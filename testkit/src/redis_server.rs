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
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with("everysec")
    }

    /// With `appendfsync` = `everysec` or `always`.
    pub fn start_with(fsync: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for redis");
        std::fs::write(dir.path().join("fsync"), fsync).expect("write fsync setting");
        let mut last_err = String::new();
        // A free port can be taken between probing and binding: try again.
        for _ in 0..20 {
            let port = free_port();
            match spawn(dir.path(), port) {
                Ok(mut child) => {
                    if wait_ready(&mut child, port, Duration::from_secs(5)) {
                        return Self { port, dir, child: Some(child) };
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
            if let Ok(mut child) = spawn(self.dir.path(), self.port) {
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

fn spawn(dir: &std::path::Path, port: u16) -> Result<Child, String> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
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
