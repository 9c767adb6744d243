//! A TCP fault proxy for tests: passes traffic, black-holes it (sockets
//! stay open, nothing is forwarded — the "looks connected, receives
//! nothing" failure), or cuts every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Read and drop everything in both directions; keep sockets open.
    BlackHole = 1,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Added before each forwarded chunk, in milliseconds.
    latency: Arc<std::sync::atomic::AtomicU64>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let latency = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (m, c, l) = (mode.clone(), conns.clone(), latency.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(target).await else { continue };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let a = tokio::spawn(pump(dr, uw, m.clone(), l.clone())).abort_handle();
                let b = tokio::spawn(pump(ur, dw, m.clone(), l.clone())).abort_handle();
                if let Ok(mut list) = c.lock() {
                    list.extend([a, b]);
                }
            }
        })
        .abort_handle();
        Self { addr, mode, latency, conns, accept }
    }

    /// Delay added to every forwarded chunk.
    pub fn latency(&self, d: std::time::Duration) {
        self.latency.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Drops every open connection (both ends see the socket close).
    pub fn cut(&self) {
        if let Ok(mut list) = self.conns.lock() {
            for h in list.drain(..) {
                h.abort();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    latency: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = latency.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if mode.load(Ordering::SeqCst) == Mode::Pass as u8 && to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // A black hole forwards nothing, not even the close: the other side must
    // notice the dead link by itself.
    if mode.load(Ordering::SeqCst) == Mode::Pass as u8 {
        let _ = to.shutdown().await;
    } else {
        std::future::pending::<()>().await;
    }
}
