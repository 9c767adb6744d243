//! A real `haproxy` in front of several edges: HTTP round-robin for ingest
//! (health-checked on each edge's `/health`, so a dead edge leaves the
//! rotation), TCP for the tunnel (TLS passes through to the edges, least
//! connections). Killed (by its own PID) on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::procs::free_port;

pub struct Haproxy {
    pub ingest: u16,
    pub tunnel: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Balances over edges given as `(ingest port, tunnel port)`.
    pub async fn start(edges: &[(u16, u16)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for haproxy");
        let (ingest, tunnel) = (free_port(), free_port());
        let servers = |pick: fn(&(u16, u16)) -> u16| -> String {
            edges
                .iter()
                .enumerate()
                .map(|(i, e)| format!("  server edge{i} 127.0.0.1:{} check inter 300 fall 2 rise 1\n", pick(e)))
                .collect()
        };
        let cfg = format!(
            "global\n  maxconn 2000\n\
             defaults\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  retries 2\n  option redispatch\n\
             frontend ingest\n  mode http\n  bind 127.0.0.1:{ingest}\n  default_backend ingest\n\
             backend ingest\n  mode http\n  balance roundrobin\n  option httpchk GET /health\n  retry-on conn-failure\n{}\
             frontend tunnel\n  mode tcp\n  bind 127.0.0.1:{tunnel}\n  default_backend tunnel\n\
             backend tunnel\n  mode tcp\n  balance leastconn\n{}",
            servers(|e| e.0),
            servers(|e| e.1),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run haproxy ({e}); install it: `apt-get install -y haproxy`"));
        let lb = Self { ingest, tunnel, child, _dir: dir };
        let url = format!("http://127.0.0.1:{ingest}/health");
        let client = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().expect("client");
        crate::wait_for(Duration::from_secs(10), "haproxy passes /health to an edge", || async {
            client.get(&url).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        lb
    }

    /// The route `hooks` through the balancer.
    pub fn hook_url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/hooks", self.ingest)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
