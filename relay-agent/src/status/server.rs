//! The status socket: every connection gets the current snapshot as one
//! JSON document, then the socket is closed. The socket is mode 0660, in a
//! directory others cannot write (so nobody can put their own socket in
//! its place and answer `relay-agent status`).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{Status, now_ms};

/// Mode of the status socket: the agent's user and group.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds the socket (replacing a stale one of ours) with [`SOCKET_MODE`].
/// Its directory is created `0700` when missing, and refused when someone
/// else owns it or others may write to it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // Not followed: a symlink another user planted could be re-pointed.
    let meta = std::fs::symlink_metadata(dir)?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(meta.uid());
    if meta.file_type().is_symlink() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("its directory {} is a symlink: name the directory itself", dir.display()),
        ));
    }
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "its directory {} is {} (mode {:o}): another user could replace the socket; \
                 use a directory of this user's that only it can write (e.g. $RUNTIME_DIRECTORY)",
                dir.display(),
                if meta.uid() != me { "owned by another user" } else { "writable by others" },
                meta.mode() & 0o7777
            ),
        ));
    }
    // A socket file left by a crashed agent would make bind fail.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(listener)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_0660_and_a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("status.sock");
        let _listener = bind(&path).expect("bind");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), SOCKET_MODE);
        assert_eq!(mode(path.parent().expect("dir")), 0o700, "the directory it created");

        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = bind(&open.join("status.sock")).expect_err("a world-writable directory");
        assert!(err.to_string().contains("writable by others"), "{err}");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(path.parent().expect("dir"), &link).expect("symlink");
        let err = bind(&link.join("status.sock")).expect_err("a symlinked directory");
        assert!(err.to_string().contains("symlink"), "{err}");
    }
}
