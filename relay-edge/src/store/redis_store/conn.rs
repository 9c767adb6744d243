//! One connection handle over the two shapes of Redis the store runs on: a
//! single server (or the master Sentinel names) and a Redis Cluster.
//!
//! A cluster handle is redis-rs's `cluster_async` connection: it keeps one
//! connection per node, routes each command by its key's slot, follows
//! `MOVED`/`ASK` during resharding and refreshes its slot map when a master
//! fails over to its replica. A pipeline goes to one slot's node, so the
//! store never puts two channels' keys in one pipeline on a cluster
//! ([`slot_groups`]).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::redis_err;
use crate::error::StoreError;

#[derive(Clone)]
pub enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// A connection to one server, opened lazily (the edge starts while
    /// Redis is down); `response` bounds one command.
    pub fn node(client: &redis::Client, connect: Duration, response: Duration) -> Result<Self, StoreError> {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(response))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        ConnectionManager::new_lazy_with_config(client.clone(), cfg).map(Self::Node).map_err(redis_err("connect"))
    }

    /// A connection to the cluster that `seeds` belong to, opened lazily:
    /// it learns the slot map from the first seed that answers.
    pub fn cluster(seeds: &[&str], connect: Duration, response: Duration) -> Result<Self, StoreError> {
        let client = ClusterClientBuilder::new(seeds.to_vec())
            // A failover takes a node timeout or two; commands keep their
            // own deadline (`store.command_timeout`) on top.
            .retries(8)
            .min_retry_wait(20)
            .max_retry_wait(500)
            .build()
            .map_err(redis_err("open cluster"))?;
        let cfg = ClusterConfig::new().set_connection_timeout(connect).set_response_timeout(response);
        Ok(Self::Cluster(client.get_pending_async_connection_with_config(cfg)))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Indices of `channels` grouped so that each group's keys can share one
/// pipeline: on a cluster, by the slot of the channel's hash tag (all of a
/// channel's keys carry it, see `keys`), in first-seen order; otherwise
/// one group of all.
pub fn slot_groups<'a>(cluster: bool, channels: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    if !cluster {
        return vec![channels.enumerate().map(|(i, _)| i).collect()];
    }
    let mut groups: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, channel) in channels.enumerate() {
        let slot = Slot::for_key(super::keys::stream(channel));
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, g)) => g.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// Like [`slot_groups`] for writes: on a cluster one write per pipeline.
/// A pipeline of one command can be sent whole again (redis-rs resends a
/// redirected pipeline whole; so does [`super::follow_redirect`]) without
/// writing twice; two writes in one, even to one key (a route that names a
/// channel twice), could have the first run on the node importing the slot
/// while the second is sent back, and then run again.
pub fn write_groups<'a>(cluster: bool, channels: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let all = 0..channels.count();
    if cluster { all.map(|i| vec![i]).collect() } else { vec![all.collect()] }
}

#[cfg(test)]
mod tests {
    use super::{slot_groups, write_groups};

    #[test]
    fn channels_split_by_slot_only_on_a_cluster() {
        let channels = ["crm", "billing", "crm"];
        assert_eq!(slot_groups(false, channels.into_iter()), vec![vec![0, 1, 2]]);
        // `crm` and `billing` hash to different slots; a repeat joins its own.
        assert_eq!(slot_groups(true, channels.into_iter()), vec![vec![0, 2], vec![1]]);
        assert_eq!(slot_groups(true, std::iter::empty()), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn writes_on_a_cluster_get_a_pipeline_each_even_in_one_slot() {
        // Any two names in one slot: found by search.
        let slot = |c: &str| redis::cluster_routing::Slot::for_key(super::super::keys::stream(c));
        let other = (0..100_000).map(|i| format!("ch{i}")).find(|c| c != "crm" && slot(c) == slot("crm"));
        let other = other.expect("a channel sharing crm's slot");
        let channels = ["crm", other.as_str(), "crm"];
        assert_eq!(slot_groups(true, channels.into_iter()), vec![vec![0, 1, 2]], "one slot: one read pipeline");
        // One write per pipeline, a channel named twice included.
        assert_eq!(write_groups(true, channels.into_iter()), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(write_groups(false, channels.into_iter()), vec![vec![0, 1, 2]]);
    }
}
