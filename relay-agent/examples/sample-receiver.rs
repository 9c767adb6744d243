//! A sample local webhook endpoint for trials: logs every request it gets
//! (relay id, attempt, size, a preview of the body) and answers 200.
//!
//! `cargo run -p relay-agent --example sample-receiver -- 127.0.0.1:3000`

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::any;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:3000".into());
    let app = Router::new().fallback(any(log));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("sample receiver listening on http://{addr}/");
    axum::serve(listener, app).await
}

async fn log(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> &'static str {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let preview: String = String::from_utf8_lossy(&body).chars().take(120).collect();
    println!(
        "received {method} {uri} x-relay-id={} attempt={} bytes={} body={preview}",
        h("x-relay-id"),
        h("x-relay-attempt"),
        body.len()
    );
    "ok\n"
}
