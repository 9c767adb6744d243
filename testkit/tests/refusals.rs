//! Every rejection path of the tunnel: who may connect, what they may
//! receive, and what a misbehaving session can break (only itself).

use std::time::Duration;

use relay_protocol::Frame;
use testkit::*;
use tokio_tungstenite::tungstenite::Message;

async fn setup(store: Backing) -> (Backing, Certs, Receiver, Edge) {
    init_tracing();
    let certs = Certs::generate();
    let rx = Receiver::start().await;
    let edge = Edge::start(edge_config(&store, &certs)).await;
    (store, certs, rx, edge)
}

/// A TLS client that presents no certificate at all.
async fn connect_without_cert(edge: &Edge, certs: &Certs) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(certs.path("ca.pem")).expect("ca") {
        roots.add(c.expect("cert")).expect("add");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(edge.tunnel).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: a refused client shows up on the first read after connect.
    let url = format!("wss://127.0.0.1:{}/", edge.tunnel.port());
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).expect("req");
    req.headers_mut().insert("sec-websocket-protocol", relay_protocol::SUBPROTOCOL.parse().expect("hv"));
    tokio_tungstenite::client_async(req, tls).await.map(|_| ()).map_err(|e| e.to_string())
}

async fn unauthenticated_and_unauthorized_agents_are_refused_and_get_nothing(store: Backing) {
    let (store, certs, rx, edge) = setup(store).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"i\":{i}}}").into_bytes()).await;
        assert_eq!(s, 200);
    }

    // 1. No client certificate.
    let err = connect_without_cert(&edge, &certs).await.expect_err("no cert must be refused");
    eprintln!("no certificate: {err}");

    // 2. A certificate from another CA (same CN as a granted agent).
    let err = raw::connect(&edge, &certs, "rogue/lan-1").await.expect_err("foreign CA must be refused");
    eprintln!("foreign CA: {err}");

    // 3. A valid agent asking for a channel it was not granted.
    let mut ws = raw::connect(&edge, &certs, "lan-3").await.expect("lan-3 has a valid certificate");
    raw::send(
        &mut ws,
        &Frame::Hello {
            version: 1,
            window: 10,
            channels: Some(vec!["crm".into()]),
            agent_version: None,
            named_acks: true,
        },
    )
    .await
    .expect("hello");
    match raw::recv(&mut ws).await {
        Ok(Some(Frame::Error { code, message })) => {
            assert_eq!(code, "forbidden_channel", "{message}");
            assert!(message.contains("crm"), "{message}");
        }
        other => panic!("expected Error forbidden_channel, got {other:?}"),
    }
    assert!(matches!(raw::recv(&mut ws).await, Ok(None) | Err(_)), "session must be closed");

    // 3b. The real agent binary's logic with the same mistake reports it.
    let agent = Agent::start(agent_config(&edge, &certs, "lan-3", &[("crm", rx.url())]));
    wait_until(Duration::from_secs(10), "agent reports the refusal", || {
        agent
            .status()
            .is_ok_and(|s| !s.connected && s.last_error.as_deref().is_some_and(|e| e.contains("forbidden_channel")))
    })
    .await;
    agent.stop().await;

    // 4. Wrong protocol version and missing subprotocol.
    let mut ws = raw::connect(&edge, &certs, "lan-2").await.expect("connect");
    raw::send(&mut ws, &Frame::Hello { version: 99, window: 1, channels: None, agent_version: None, named_acks: true })
        .await
        .expect("hello");
    let (code, _) = raw::recv_error(&mut ws).await.expect("error frame");
    assert_eq!(code, "unsupported_version");

    // Nothing was delivered to anyone, and all five wait in the stream.
    assert_eq!(rx.count(), 0);
    assert_eq!(pending(&store, "crm").await, 0);
    let good = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    wait_until(Duration::from_secs(10), "the granted agent gets all five", || rx.accepted().len() == 5).await;
    good.stop().await;
    edge.stop().await;
}

async fn bad_frames_close_only_their_own_session(store: Backing) {
    let (_store, certs, rx, edge) = setup(store).await;
    let agent = Agent::start(agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]));
    agent.wait_connected(Duration::from_secs(10)).await;
    let client = reqwest::Client::new();

    let cases: Vec<(&str, Message)> = vec![
        ("bad_frame", Message::Binary(b"\xc1\xc1\xc1 definitely not msgpack".to_vec().into())),
        ("text_frame", Message::Text("{\"Ack\":{\"ids\":[]}}".into())),
        // Agents send small frames only: past 1 MiB a frame is refused.
        ("frame_too_large", Message::Binary(vec![0x80u8; relay_protocol::Limits::MAX_AGENT_FRAME + 1].into())),
    ];
    for (i, (code, msg)) in cases.into_iter().enumerate() {
        let expected = i + 1;
        let mut ws = raw::connect(&edge, &certs, "lan-2").await.expect("connect");
        match raw::hello_idle(&mut ws, Some(vec!["crm".into()])).await {
            Ok(Frame::Welcome { agent, .. }) => assert_eq!(agent, "lan-2"),
            other => panic!("expected Welcome, got {other:?}"),
        }
        raw::send_raw(&mut ws, msg).await.expect("send");
        let got = raw::recv_error(&mut ws).await;
        assert_eq!(got.as_ref().map(|(c, _)| c.as_str()), Some(code), "{got:?}");
        assert!(matches!(raw::recv(&mut ws).await, Ok(None) | Err(_)), "{code}: session must be closed");

        // The other agent's session keeps delivering.
        let (s, _) =
            post(&client, &edge.hook_url("hooks"), KEY, format!("{{\"after\":\"{code}\"}}").into_bytes()).await;
        assert_eq!(s, 200);
        wait_until(Duration::from_secs(10), "delivery after a bad session", || rx.accepted().len() == expected).await;
        assert!(agent.status().expect("status").connected);
    }

    // A delivery-sized frame (8 MiB) from an agent is cut off by the
    // WebSocket layer after ~1 MiB, never buffered whole.
    let mut ws = raw::connect(&edge, &certs, "lan-2").await.expect("connect");
    raw::hello_idle(&mut ws, Some(vec!["crm".into()])).await.expect("welcome");
    let sent = raw::send_raw(&mut ws, Message::Binary(vec![0x80u8; 8 * 1024 * 1024 + 1].into())).await;
    if sent.is_ok() {
        match raw::recv_error(&mut ws).await {
            Some((code, _)) => assert_eq!(code, "frame_too_large"),
            None => assert!(matches!(raw::recv(&mut ws).await, Ok(None) | Err(_)), "session closed"),
        }
    }
    let (s, _) = post(&client, &edge.hook_url("hooks"), KEY, b"{\"after\":\"8MiB\"}".to_vec()).await;
    assert_eq!(s, 200);
    wait_until(Duration::from_secs(10), "delivery after a huge frame", || rx.accepted().len() == 4).await;
    agent.stop().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_exit_codes_follow_the_tunnel() {
    use relay_agent::status::client;
    let (_store, certs, rx, edge) = setup(Backing::embedded()).await;
    let cfg = agent_config(&edge, &certs, "lan-1", &[("crm", rx.url())]);
    let socket = cfg.status_socket.clone();
    assert_eq!(client::run(&socket, false), client::EXIT_NOT_RUNNING);
    let agent = Agent::start(cfg);
    agent.wait_connected(Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(5), "healthy", || client::run(&socket, true) == client::EXIT_HEALTHY).await;
    let snap = agent.status().expect("status");
    assert_eq!(snap.agent.as_deref(), Some("lan-1"));
    edge.stop().await;
    wait_until(Duration::from_secs(10), "disconnected", || client::run(&socket, false) == client::EXIT_DISCONNECTED)
        .await;
    assert!(agent.status().expect("status").last_error.is_some());
    agent.stop().await;
    assert_eq!(client::run(&socket, false), client::EXIT_NOT_RUNNING);
}

both_backends!(
    unauthenticated_and_unauthorized_agents_are_refused_and_get_nothing,
    bad_frames_close_only_their_own_session,
);
