//! The status socket: every connection gets the current snapshot as one
//! JSON document, then the socket is closed. Mode 0660 where it can be set.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{Status, now_ms};

/// Binds the socket (replacing a stale one) and serves until `shutdown`.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed agent would make bind fail.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

pub async fn serve(listener: UnixListener, path: PathBuf, status: Status, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "status socket accept failed");
                    continue;
                }
            },
        };
        let snapshot = status.get();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut body =
                serde_json::to_vec(&serde_json::json!({ "now_ms": now_ms(), "status": snapshot })).unwrap_or_default();
            body.push(b'\n');
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.write_all(&body)).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}
