//! A real local Redis Cluster: `masters` × (1 + `replicas`) `redis-server
//! --cluster-enabled yes` nodes on free loopback ports, joined with
//! `redis-cli --cluster create`, each killed (by its own PID) on drop.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::RedisServer;

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, each with one replica.
    pub fn start() -> Self {
        Self::start_with(3, 1)
    }

    /// `masters` masters with `replicas` replicas each, once every slot is
    /// served and every replica is linked to its master.
    pub fn start_with(masters: usize, replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas)).map(|_| RedisServer::cluster_node()).collect();
        let mut args: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        args.extend(["--cluster-replicas".into(), replicas.to_string(), "--cluster-yes".into()]);
        cluster_cli("create", &args);
        let cluster = Self { nodes };
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// Waits until every live node says the cluster is `ok` and every live
    /// replica is linked to its master.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut why = None;
            for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
                let state = node.command(&["CLUSTER", "INFO"]);
                let replication = node.info("replication");
                if !state.contains("cluster_state:ok") {
                    why = Some(format!("node {} is not ok: {state}", node.port));
                } else if replication.contains("role:slave") && !replication.contains("master_link_status:up") {
                    why = Some(format!("replica {} is not linked", node.port));
                }
            }
            let Some(why) = why else { return };
            assert!(Instant::now() < deadline, "the cluster never became healthy: {why}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes' URLs, for `store.redis_cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// Index (in [`nodes`](Self::nodes)) of the live master serving `key`.
    pub fn master_of(&self, key: &str) -> usize {
        let node = self.nodes.iter().find(|n| n.pid().is_some()).expect("a live node");
        let slot: u16 = node.command(&["CLUSTER", "KEYSLOT", key]).trim().parse().expect("CLUSTER KEYSLOT");
        // `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots…>`
        let table = node.command(&["CLUSTER", "NODES"]);
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            let port = f[1].split(['@', ':']).nth(1).and_then(|p| p.parse::<u16>().ok());
            if serves && let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                return i;
            }
        }
        panic!("no live master serves slot {slot}:\n{table}");
    }
}

impl RedisCluster {
    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.pid().is_some()).expect("a live node");
        node.command(&["CLUSTER", "KEYSLOT", key]).trim().parse().expect("CLUSTER KEYSLOT")
    }

    /// Indexes of the live masters.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].pid().is_some() && self.nodes[i].info("replication").contains("role:master"))
            .collect()
    }

    /// Adds a master that serves no slot yet (`redis-cli --cluster
    /// add-node`), once every node knows it; returns its index.
    pub fn add_master(&mut self) -> usize {
        let node = RedisServer::cluster_node();
        cluster_cli("add-node", &[format!("127.0.0.1:{}", node.port), format!("127.0.0.1:{}", self.nodes[0].port)]);
        let id = node.command(&["CLUSTER", "MYID"]);
        self.nodes.push(node);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Known to all, past the handshake.
        while !self
            .nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .all(|n| n.command(&["CLUSTER", "NODES"]).lines().any(|l| l.starts_with(&id) && !l.contains("handshake")))
        {
            assert!(Instant::now() < deadline, "node {id} never joined the cluster");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_healthy(Duration::from_secs(30));
        self.nodes.len() - 1
    }

    /// Reshards `slot` from the master serving it to master `to`, the way
    /// `redis-cli --cluster reshard` does, but slowly, so that clients meet
    /// each stage: `IMPORTING`/`MIGRATING` set (commands on keys already
    /// moved are answered `ASK`, multi-key commands over keys on both sides
    /// `TRYAGAIN`), then one key at a time `MIGRATE`d with `pause` before
    /// each, then the slot assigned to `to` on every master (`MOVED` from
    /// then on). Returns the keys it moved.
    pub async fn migrate_slot(&self, slot: u16, to: usize, pause: Duration) -> Vec<String> {
        let masters = self.masters();
        let from = masters
            .iter()
            .copied()
            .find(|&i| self.nodes[i].command(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]) != "0")
            .unwrap_or_else(|| panic!("no master holds keys of slot {slot}"));
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let id = |i: usize| self.nodes[i].command(&["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        let mut src = self.nodes[from].conn().await;
        let mut dst = self.nodes[to].conn().await;
        let setslot = |state: &str, node: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(node);
            c
        };
        let () = setslot("IMPORTING", &from_id).query_async(&mut dst).await.expect("SETSLOT IMPORTING");
        let () = setslot("MIGRATING", &to_id).query_async(&mut src).await.expect("SETSLOT MIGRATING");
        let mut moved = Vec::new();
        loop {
            tokio::time::sleep(pause).await;
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query_async(&mut src)
                .await
                .expect("GETKEYSINSLOT");
            let Some(key) = keys.into_iter().next() else { break };
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg(&key)
                .arg(0)
                .arg(5000)
                .query_async(&mut src)
                .await
                .unwrap_or_else(|e| panic!("MIGRATE {key}: {e}"));
            moved.push(key);
        }
        tokio::time::sleep(pause).await;
        // The new owner first, then the old one, then the others (what
        // `redis-cli --cluster reshard` does).
        for i in std::iter::once(to)
            .chain(std::iter::once(from))
            .chain(masters.into_iter().filter(|&i| i != to && i != from))
        {
            let mut conn = self.nodes[i].conn().await;
            let () = setslot("NODE", &to_id).query_async(&mut conn).await.expect("SETSLOT NODE");
        }
        moved
    }
}

/// `redis-cli --cluster <what> <args…>`, which must succeed.
fn cluster_cli(what: &str, args: &[String]) {
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg(what)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); install it: `apt-get install -y redis-server`"));
    assert!(
        out.status.success(),
        "redis-cli --cluster {what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
