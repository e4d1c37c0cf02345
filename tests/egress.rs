#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The egress guard, black-box: redirects and token realms that point at a
//! refused address are never dialled, whatever form the address takes.
//!
//! No test here may send a packet toward a real link-local or metadata
//! address, even with the guard broken. The loopback address 127.0.0.77
//! stands in for the metadata service, refused through `[egress] refuse`;
//! a listener there counts the connections that reach it, and
//! `metadata.pier.test` names it (in /etc/hosts, from tests/setup.sh).

mod common;

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::fake::{Blob, Fake, digest, random_bytes};
use common::*;
use reqwest::{Method, StatusCode};

/// The stand-in for a metadata service.
const TRAP_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);
/// A name tests/setup.sh maps to `TRAP_IP`.
const TRAP_NAME: &str = "metadata.pier.test";
const EGRESS: &str = "[egress]\nrefuse = [\"127.0.0.77/32\"]\n";

/// A listener on the stand-in address that counts accepted connections.
struct Trap {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = tokio::net::TcpListener::bind((TRAP_IP, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Trap { port, accepted }
    }

    /// Connections accepted so far, after a pause long enough for one that
    /// raced the response to be accepted too.
    async fn connections(&self) -> usize {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Whether `TRAP_NAME` resolves to the trap address only; without the
/// /etc/hosts line, fails in strict runs and skips loudly otherwise.
fn trap_name_resolves() -> bool {
    let ok = (TRAP_NAME, 0)
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.all(|a| a.ip() == IpAddr::V4(TRAP_IP)));
    if ok {
        return true;
    }
    let msg = format!("{TRAP_NAME} does not resolve to {TRAP_IP}: run tests/setup.sh");
    if std::env::var("PIER_TEST_STRICT").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

fn start(fake: &Fake) -> (Pier, tempfile::TempDir, reqwest::Client) {
    let (pier, data) = Pier::start(&[("corp.example", &fake.url())], EGRESS);
    let http = http_for(&pier);
    (pier, data, http)
}

fn blob_url(pier: &Pier, d: &str) -> String {
    format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url())
}

/// The client sees a 502 naming the refused hop, and nothing of the URL's
/// path or query (a redirect's may carry a signature).
async fn assert_refused(r: reqwest::Response, hop: &str) {
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let error = &body["errors"][0];
    assert_eq!(error["code"], "UNAVAILABLE", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(hop), "{message}");
    assert!(message.contains("refused"), "{message}");
    assert!(!message.contains("signature"), "{message}");
}

/// Upstream redirects a blob to `location(trap port)`: refused before any
/// connection, not retried.
async fn redirect_is_refused(location: impl Fn(u16) -> String) {
    let trap = Trap::start().await;
    let fake = Fake::start();
    let d = digest(b"credentials");
    fake.blob(&d, Blob::Redirect(location(trap.port)));
    let (pier, _data, http) = start(&fake);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    // First what matters most: not one connection reached the address.
    assert_eq!(
        trap.connections().await,
        0,
        "the refused address was dialled"
    );
    assert_refused(r, "redirect refused").await;
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1, "retried");
    assert!(pier.stored_blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_address_is_never_dialled() {
    redirect_is_refused(|port| format!("http://{TRAP_IP}:{port}/latest?signature=s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_the_ipv4_mapped_form_is_never_dialled() {
    redirect_is_refused(|port| format!("http://[::ffff:{TRAP_IP}]:{port}/latest?signature=s"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_name_for_a_refused_address_is_never_dialled() {
    if !trap_name_resolves() {
        return;
    }
    redirect_is_refused(|port| format!("http://{TRAP_NAME}:{port}/latest?signature=s")).await;
}

/// Upstream demands a token from a realm at `realm(trap port)`: refused
/// before any connection, so credentials never travel there either.
async fn realm_is_refused(realm: impl Fn(u16) -> String) {
    let trap = Trap::start().await;
    let fake = Fake::start();
    fake.require_token("t0ken");
    fake.token_realm(&realm(trap.port));
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        br#"{"schemaVersion":2}"#,
    );
    let (pier, data) = Pier::start(&[("corp.example", &fake.url())], EGRESS);
    let http = http_for(&pier);
    let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(trap.connections().await, 0, "the refused realm was dialled");
    assert_refused(r, "token realm refused").await;
    assert_eq!(fake.count("GET", "/v2/team/app/manifests/"), 1, "retried");
    drop((pier, data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_at_a_refused_address_is_never_dialled() {
    realm_is_refused(|port| format!("http://{TRAP_IP}:{port}/token")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_named_for_a_refused_address_is_never_dialled() {
    if !trap_name_resolves() {
        return;
    }
    realm_is_refused(|port| format!("http://{TRAP_NAME}:{port}/token")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_allowed_addresses_still_work() {
    let fake = Fake::start();
    let cdn = Fake::start();
    let port = cdn.addr.port();
    let (pier, _data, http) = start(&fake);
    // By address and by a name that resolves (through the guard) to one.
    for (seed, host) in [(1, "127.0.0.1".to_owned()), (2, DOMAIN.to_owned())] {
        let good = random_bytes(70_000, seed);
        let d = digest(&good);
        fake.blob(&d, Blob::Redirect(format!("http://{host}:{port}/cdn/{d}")));
        cdn.blob(&d, Blob::Good(good.clone()));
        let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "via {host}");
        assert_eq!(r.bytes().await.unwrap(), good, "via {host}");
    }
    assert_eq!(cdn.count("GET", "/cdn/"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_endpoint_on_a_refused_address_still_works() {
    if !trap_name_resolves() {
        return;
    }
    // A private registry the operator configured, by name and by address:
    // its own token realm and redirects to itself are followed.
    let fake = Fake::start_at("127.0.0.77");
    let port = fake.addr.port();
    fake.require_token("t0ken");
    let manifest = br#"{"schemaVersion":2}"#;
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
    for (seed, host) in [(3, TRAP_NAME.to_owned()), (4, TRAP_IP.to_string())] {
        let endpoint = format!("http://{host}:{port}");
        let (pier, _data) = Pier::start(&[("corp.example", &endpoint)], EGRESS);
        let http = http_for(&pier);
        let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
        let r = fetch(&http, Method::GET, &url, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "via {host}");
        assert_eq!(r.bytes().await.unwrap(), &manifest[..]);

        let good = random_bytes(50_000, seed);
        let d = digest(&good);
        // The fake's /cdn/ serves the bytes stored under the key after it.
        fake.blob(&format!("{d}-cdn"), Blob::Good(good.clone()));
        fake.blob(&d, Blob::Redirect(format!("{endpoint}/cdn/{d}-cdn")));
        let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "via {host}");
        assert_eq!(r.bytes().await.unwrap(), good);
    }
}
