//! The accept loop and per-connection HTTP serving shared by the ingest and
//! tunnel listeners: every connection gets its own task (TLS handshakes
//! happen there, never in the accept loop), HTTP/1.1 with limits on the
//! request head and a deadline for sending it, WebSocket upgrades kept
//! working (`serve_connection_with_upgrades`), and a graceful close on
//! shutdown. Connections past a listener's caps (in all, per client IP)
//! are closed as soon as they are accepted, before any TLS handshake.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Deadline for the whole request head (slow clients are cut off).
    pub header_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Longest a connection is kept (then closed once its request in
    /// flight is answered), so an idle keep-alive cannot hold a slot of
    /// the caps for ever. `None`: no limit (tunnel: upgraded to sessions).
    pub lifetime: Option<Duration>,
}

impl ConnLimits {
    /// `lifetime` from a config value: zero means no limit.
    pub fn lifetime_of(d: Duration) -> Option<Duration> {
        (!d.is_zero()).then_some(d)
    }
}

/// How many connections a listener holds at once (0 = no cap).
#[derive(Debug, Clone, Default)]
pub struct ConnCaps {
    pub total: usize,
    pub per_ip: usize,
    /// Addresses the per-IP cap does not apply to (trusted proxies).
    pub exempt: Vec<IpAddr>,
}

/// Counts the connections a listener holds, in all and per IP.
struct Gate {
    caps: ConnCaps,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One held connection; gives its slot back when dropped.
struct Slot {
    gate: Arc<Gate>,
    /// The per-IP count it holds ([`cap_key`]); `None` for an exempt peer,
    /// which counts in the total only.
    ip: Option<IpAddr>,
}

/// The address the per-IP cap counts: IPv6 by its /64 (one host usually
/// holds a whole /64), IPv4 (also IPv4-mapped IPv6) as it is.
pub fn cap_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl Gate {
    fn enter(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let exempt = self.caps.exempt.contains(&peer.to_canonical());
        let ip = (!exempt).then(|| cap_key(peer));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *held;
        if self.caps.total > 0 && *total >= self.caps.total {
            return None;
        }
        if let Some(ip) = ip {
            let mine = per_ip.entry(ip).or_insert(0);
            if self.caps.per_ip > 0 && *mine >= self.caps.per_ip {
                return None;
            }
            *mine += 1;
        }
        *total += 1;
        Some(Slot { gate: self.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(ip) = &self.ip
            && let Some(n) = per_ip.get_mut(ip)
        {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(ip);
            }
        }
    }
}

/// Accepts until `shutdown`; `on_conn` runs in a tracked task per
/// connection, while the connection holds one of the slots `caps` allow.
pub async fn accept_loop<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    caps: ConnCaps,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let gate = Arc::new(Gate { caps, held: Mutex::new((0, HashMap::new())) });
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = gate.enter(addr.ip()) else {
            tracing::debug!(listener = what, peer = %addr, "connection cap reached; closed");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = on_conn(tcp, addr);
        tracker.spawn(async move {
            conn.await;
            drop(slot);
        });
    }
}

/// Serves HTTP/1.1 on one connection with `router`; every request carries
/// the peer address (`ConnectInfo`) and `extension`.
pub async fn serve_http<IO, X>(
    io: IO,
    addr: SocketAddr,
    router: Router,
    extension: X,
    limits: ConnLimits,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    X: Clone + Send + Sync + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(addr));
        req.extensions_mut().insert(extension.clone());
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|never| match never {})) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let expired = async {
        match limits.lifetime {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
        },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
        _ = expired => {
            // The request in flight (if any) is answered, then it closes.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_ip_cap_counts_ipv6_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(cap_key(a), cap_key(b), "one /64");
        assert_ne!(cap_key(a), cap_key(other));
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().expect("ip");
        assert_eq!(cap_key(mapped), "203.0.113.7".parse::<IpAddr>().expect("ip"));
        let gate = Arc::new(Gate { caps: ConnCaps { total: 0, per_ip: 2, exempt: vec![] }, held: Mutex::default() });
        let held = [gate.enter(a), gate.enter(b)];
        assert!(held.iter().all(Option::is_some));
        assert!(gate.enter(other).is_some(), "another /64");
        assert!(gate.enter("2001:db8:1:2::9".parse().expect("ip")).is_none(), "a third address of the same /64");
        drop(held);
        assert!(gate.enter(a).is_some(), "slots come back");
        // An exempt proxy in the same /64 neither is capped nor fills its neighbours' count.
        let proxy: IpAddr = "2001:db8:1:2::53".parse().expect("ip");
        let gate =
            Arc::new(Gate { caps: ConnCaps { total: 0, per_ip: 1, exempt: vec![proxy] }, held: Mutex::default() });
        let proxied: Vec<_> = (0..3).map(|_| gate.enter(proxy)).collect();
        assert!(proxied.iter().all(Option::is_some), "exempt");
        assert!(gate.enter(a).is_some(), "its neighbour still gets its one slot");
    }
}
