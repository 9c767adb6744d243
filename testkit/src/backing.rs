//! The store behind a test's edge: a real `redis-server`, or an embedded
//! store file in a temp dir. Tests that must hold for both backends take a
//! [`Backing`] and are instantiated twice with [`both_backends!`](crate::both_backends).

use std::path::PathBuf;

use relay_edge::config::{Secret, StoreConfig};
use relay_edge::store::{Backend, Store};

use crate::{RedisCluster, RedisServer};

pub enum Backing {
    Redis(RedisServer),
    Embedded {
        dir: tempfile::TempDir,
        path: PathBuf,
    },
    /// Three masters with a replica each.
    Cluster(RedisCluster),
}

impl Backing {
    pub fn redis() -> Self {
        Self::Redis(RedisServer::start())
    }

    /// Redis with `appendfsync` = `everysec` or `always`.
    pub fn redis_with(fsync: &str) -> Self {
        Self::Redis(RedisServer::start_with(fsync))
    }

    /// A local Redis Cluster: three masters, a replica each.
    pub fn cluster() -> Self {
        Self::Cluster(RedisCluster::start())
    }

    pub fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the embedded store");
        let path = dir.path().join("data").join("relay.redb");
        Self::Embedded { dir, path }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::Embedded { .. } => "embedded",
            Self::Cluster(_) => "cluster",
        }
    }

    /// Points an edge's store configuration at this backing.
    pub fn apply(&self, cfg: &mut StoreConfig) {
        match self {
            Self::Redis(r) => cfg.redis_url = Some(Secret::new(r.url())),
            Self::Embedded { path, .. } => {
                cfg.redis_url = None;
                cfg.path = path.clone();
            }
            Self::Cluster(c) => {
                cfg.redis_url = None;
                cfg.redis_cluster = c.seeds().into_iter().map(Secret::new).collect();
            }
        }
    }

    /// The `[store]` lines of an edge config file.
    pub fn toml(&self) -> String {
        match self {
            Self::Redis(r) => format!("redis_url = \"{}\"", r.url()),
            Self::Embedded { path, .. } => format!("path = \"{}\"", path.display()),
            Self::Cluster(c) => format!("redis_cluster = {:?}", c.seeds()),
        }
    }

    /// The Redis server, for tests about Redis itself.
    pub fn redis_server(&mut self) -> &mut RedisServer {
        match self {
            Self::Redis(r) => r,
            _ => panic!("this test needs the Redis backend"),
        }
    }

    /// A handle on the store. For the embedded backend this shares the
    /// in-process edge's handle (the file is locked to one process), so
    /// use it for in-process edges; process tests ask the edge's admin API.
    pub fn store(&self) -> Store {
        let mut cfg = StoreConfig::default();
        self.apply(&mut cfg);
        // Short empty reads, as every test edge has (the default is 30 s).
        cfg.block = std::time::Duration::from_secs(1);
        Store::open(&cfg, Default::default()).expect("open the test store")
    }

    /// What the store reports for `channel`.
    pub async fn snapshot(&self, channel: &str) -> relay_edge::store::Snapshot {
        self.store().snapshot(channel).await.expect("store snapshot")
    }
}

/// Instantiates `async fn name(store: Backing)` tests once per backend of
/// the list, as `name::redis`, `name::embedded`, `name::cluster`:
/// `backends!([redis, embedded] name, …)`.
#[macro_export]
macro_rules! backends {
    ($backends:tt $($name:ident),+ $(,)?) => {$(
        $crate::backends!(@one $name $backends);
    )+};
    (@one $name:ident [$($backend:ident),+]) => {
        mod $name {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $backend() {
                super::$name($crate::Backing::$backend()).await
            }
        )+}
    };
}

/// [`backends!`](crate::backends) on a real redis-server and the embedded file.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        $crate::backends!([redis, embedded] $($name),+);
    };
}

/// [`both_backends!`](crate::both_backends), plus `name::cluster` on a
/// local Redis Cluster (for the store contract: six servers per test).
#[macro_export]
macro_rules! every_backend {
    ($($name:ident),+ $(,)?) => {
        $crate::backends!([redis, embedded, cluster] $($name),+);
    };
}
