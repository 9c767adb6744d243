//! Dialing the edge: TCP, TLS 1.3 with our client certificate (ring
//! provider), then the WebSocket upgrade asking for subprotocol `relay.v1`.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_protocol::SUBPROTOCOL;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::AgentConfig;
use crate::error::SessionError;

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

pub struct Connector {
    tls: TlsConnector,
    url: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    max_frame: usize,
}

impl Connector {
    pub fn new(cfg: &AgentConfig) -> Result<Self, SessionError> {
        let tls_err = SessionError::Tls;
        let uri: http::Uri = cfg.edge.parse().map_err(|e| tls_err(format!("edge URL: {e}")))?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(443);
        let name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| tls_err(format!("`{name}` is not a valid TLS server name")))?;

        let mut roots = RootCertStore::empty();
        for ca in read_certs(&cfg.ca, "ca")? {
            roots.add(ca).map_err(|e| tls_err(format!("`ca` {}: {e}", cfg.ca.display())))?;
        }
        let chain = read_certs(&cfg.cert, "cert")?;
        let key = PrivateKeyDer::from_pem_file(&cfg.key)
            .map_err(|e| tls_err(format!("`key`: cannot read a private key from {}: {e}", cfg.key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err(format!("`cert`/`key` do not form a usable pair: {e}")))?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            url: cfg.edge.clone(),
            host,
            port,
            server_name,
            max_frame: relay_protocol::Limits::DEFAULT_MAX_FRAME + 64 * 1024,
        })
    }

    /// Connects and upgrades; the caller applies the overall timeout.
    pub async fn connect(&self) -> Result<(Ws, SocketAddr), SessionError> {
        let target = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| SessionError::Connect { addr: target.clone(), source })?;
        let addr = tcp.peer_addr().map_err(|source| SessionError::Connect { addr: target.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| SessionError::Handshake { addr: addr.to_string(), source })?;
        let mut request = self.url.as_str().into_client_request().map_err(|e| SessionError::Upgrade(e.to_string()))?;
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        // 16 KiB reads: rustls hands out at most one record's plaintext
        // (16 KiB) per read, and tungstenite zeroes the whole read buffer
        // (128 KiB by default) before each read.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(self.max_frame))
            .max_frame_size(Some(self.max_frame));
        let (ws, response) = tokio_tungstenite::client_async_with_config(request, tls, Some(config))
            .await
            .map_err(|e| SessionError::Upgrade(describe_ws_error(e)))?;
        let agreed = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p == SUBPROTOCOL);
        if !agreed {
            return Err(SessionError::Upgrade(format!("the edge did not agree to subprotocol {SUBPROTOCOL}")));
        }
        Ok((ws, addr))
    }
}

fn describe_ws_error(e: tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(resp) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            format!("edge answered {}: {}", resp.status(), body.trim())
        }
        // With TLS 1.3 a refused client certificate surfaces on the first read.
        Error::Io(io) => format!("connection failed during upgrade (certificate refused?): {io}"),
        other => other.to_string(),
    }
}

fn read_certs(path: &std::path::Path, key: &str) -> Result<Vec<CertificateDer<'static>>, SessionError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SessionError::Tls(format!("`{key}`: cannot read {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(SessionError::Tls(format!("`{key}`: {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}
