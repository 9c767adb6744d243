//! Recently acknowledged deliveries. A re-delivery of one of them (the edge
//! did not get our ack before the link dropped) is acked again without
//! posting it to the local endpoint twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// A delivery's identity, `channel\0id`; shared (not copied) between the
/// set and the eviction order.
pub type Key = Arc<str>;

pub struct Recent {
    set: HashSet<Key>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Self { set: HashSet::with_capacity(capacity), order: VecDeque::with_capacity(capacity), capacity }
    }

    pub fn key(channel: &str, id: &str) -> Key {
        let mut key = String::with_capacity(channel.len() + 1 + id.len());
        key.push_str(channel);
        key.push('\0');
        key.push_str(id);
        key.into()
    }

    /// `(channel, id)` of a key made by [`Recent::key`].
    pub fn split(key: &str) -> (&str, &str) {
        key.split_once('\0').unwrap_or((key, ""))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.set.contains(key)
    }

    pub fn insert(&mut self, key: Key) {
        if !self.set.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forgets_the_oldest() {
        let mut r = super::Recent::new(2);
        r.insert("a".into());
        r.insert("b".into());
        r.insert("c".into());
        assert!(!r.contains("a") && r.contains("b") && r.contains("c"));
    }
}
