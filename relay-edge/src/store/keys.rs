//! Every Redis key the edge touches is formatted here. The `{channel}` hash
//! tag keeps one channel's stream and DLQ on one Redis Cluster slot, so the
//! dead-letter move (`XADD dlq` + `XACK stream`) can run in one `MULTI`.

/// Consumer group of every channel stream; consumers are agent identities.
pub const GROUP: &str = "relay";

/// Field holding the MessagePack-encoded webhook in a stream entry.
pub const FIELD_WEBHOOK: &str = "w";

pub fn stream(channel: &str) -> String {
    format!("relay:{{{channel}}}:stream")
}

pub fn dlq(channel: &str) -> String {
    format!("relay:{{{channel}}}:dlq")
}

/// De-duplication marker of a body on a route (`hash` = hex SHA-256).
pub fn dedupe(route: &str, hash: &str) -> String {
    format!("relay:dedupe:{{{route}}}:{hash}")
}

/// Recovers the channel from a stream key (`relay:{crm}:stream` → `crm`).
pub fn channel_of(stream_key: &str) -> Option<&str> {
    stream_key.strip_prefix("relay:{")?.strip_suffix("}:stream")
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_share_the_channel_hash_tag() {
        assert_eq!(super::stream("crm"), "relay:{crm}:stream");
        assert_eq!(super::dlq("crm"), "relay:{crm}:dlq");
        assert_eq!(super::channel_of("relay:{crm}:stream"), Some("crm"));
        assert_eq!(super::channel_of("other"), None);
    }
}
