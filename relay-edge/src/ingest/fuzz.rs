//! The ingest request path as one function of raw bytes, for the fuzz
//! target `ingest_request` (`fuzz/`) and its bounded proptest twin: it runs
//! every check a request goes through before storage — key matching
//! (plain and hashed keys), signature, JSON check, route-name escaping, query and header redaction,
//! client-IP resolution — on attacker-controlled input. It must never panic.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{auth, check_body, client_ip, redact_query, stored_headers, unknown_route};
use crate::config::{RouteConfig, Secret};

/// Input layout: byte 0 = flags (bit 0 app_secret, bit 1 require_json);
/// then fields split on `0xFF`: key, path, query, headers (`name:value`
/// lines split on `\n`), body.
pub fn ingest_input(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut fields = rest.splitn(5, |b| *b == 0xFF);
    let key = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let path = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let query = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let header_lines = fields.next().unwrap_or_default();
    let body = fields.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    for line in header_lines.split(|b| *b == b'\n') {
        let mut kv = line.splitn(2, |b| *b == b':');
        let (Some(name), Some(value)) = (kv.next(), kv.next()) else { continue };
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let route = RouteConfig {
        name: "fuzz".into(),
        channels: vec!["c".into()],
        api_keys: vec![
            Secret::new("plain-key-0001"),
            Secret::new("sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        ],
        app_secret: (flags & 1 != 0).then(|| Secret::new("fuzz-secret")),
        require_json: flags & 2 != 0,
        ..Default::default()
    };
    let _ = auth::match_key(&key, &auth::KeyDigests::of(&route.api_keys));
    let _ = check_body(&route, &headers, body);
    let _ = unknown_route(&path);
    let _ = redact_query(&query);
    let peer = SocketAddr::from(([10, 0, 0, 1], 443));
    let _ = stored_headers(&headers);
    let _ = client_ip(peer, &headers, &[peer.ip()]);
    let _ = auth::signature_valid("fuzz-secret", headers.get("x-hub-signature-256").map(|v| v.as_bytes()), body);
}
