//! The admin listener holds the only copy of failed webhooks: a browser
//! page on another site (an operator's browser reaches the port through
//! `ssh -L`) or a DNS-rebound name must not read or delete them, and a
//! destructive call needs an explicit JSON body.

use relay_edge::store::{Backend, DeadLetter};
use relay_protocol::Webhook;
use testkit::*;

/// An edge (no admin token: the API is protected only by being on
/// loopback) whose channel `crm` holds three dead letters.
async fn edge_with_dead_letters() -> (Backing, Certs, Edge) {
    init_tracing();
    let store = Backing::embedded();
    let certs = Certs::generate();
    let edge = Edge::start(edge_config(&store, &certs)).await;
    let handle = store.store();
    for i in 0..3 {
        let w =
            Webhook { id: format!("w{i}"), method: "POST".into(), path: "/hooks/hooks".into(), ..Default::default() };
        let ids = handle.append(&["crm".to_string()], &w).await.expect("append");
        let letter =
            DeadLetter { channel: "crm", id: &ids[0], reason: "404", status: Some(404), attempts: 1, raw: None };
        handle.dead_letter(&letter).await.expect("dead-letter");
    }
    assert_eq!(xlen(&store, "crm", "dlq").await, 3);
    (store, certs, edge)
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_page_cannot_purge_the_dlq() {
    let (store, _certs, edge) = edge_with_dead_letters().await;
    let url = format!("http://{}/admin/dlq/crm/purge", edge.admin);
    // What `fetch(url, {method: "POST", mode: "no-cors"})` on evil.example sends.
    let resp = client()
        .post(&url)
        .header("origin", "http://evil.example")
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "no-cors")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 403, "{}", resp.text().await.unwrap_or_default());
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged");
    // An Origin alone (older browsers send no Sec-Fetch-*) is refused too.
    let resp = client()
        .post(&url)
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body("{\"all\":true}");
    assert_eq!(resp.send().await.expect("post").status(), 403);
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_rebound_name_cannot_read_the_admin_listener() {
    let (_store, _certs, edge) = edge_with_dead_letters().await;
    let port = edge.admin.port();
    for path in ["/admin/dlq/crm", "/health", "/metrics"] {
        let url = format!("http://{}{path}", edge.admin);
        let resp = client().get(&url).header("host", format!("rebind.evil.example:{port}")).send().await.expect("get");
        assert_eq!(resp.status(), 403, "{path} with a foreign Host");
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
            let resp = client().get(&url).header("host", &host).send().await.expect("get");
            assert_eq!(resp.status(), 200, "{path} with Host {host}");
        }
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destructive_calls_need_an_explicit_json_body() {
    let (store, _certs, edge) = edge_with_dead_letters().await;
    let purge = format!("http://{}/admin/dlq/crm/purge", edge.admin);
    let replay = format!("http://{}/admin/dlq/crm/replay", edge.admin);
    let resp = client().post(&purge).send().await.expect("post");
    assert_eq!(resp.status(), 415, "no body, no JSON content type");
    let resp = client().post(&purge).header("content-type", "text/plain").body("{\"all\":true}").send().await;
    assert_eq!(resp.expect("post").status(), 415, "a form-like content type");
    let resp = client().post(&purge).header("content-type", "application/json").body("{}").send().await.expect("post");
    assert_eq!(resp.status(), 400, "an empty object names nothing to purge");
    let resp = client().post(&replay).send().await.expect("post");
    assert_eq!(resp.status(), 415);
    assert_eq!(xlen(&store, "crm", "dlq").await, 3, "nothing purged or replayed");

    let resp = client()
        .post(&purge)
        .header("content-type", "application/json")
        .body("{\"all\":true}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(xlen(&store, "crm", "dlq").await, 0);
    edge.stop().await;
}
