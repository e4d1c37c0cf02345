#![allow(clippy::unwrap_used, clippy::expect_used)]

//! HTTPS of Pier's own (`[server] tls_cert` / `tls_key`): ALPN, the
//! answer to plain HTTP on the HTTPS port, blobs through the cipher instead
//! of sendfile, host-prefix names under a wildcard certificate, and
//! certificates rotated in place. The runtimes pulling over HTTPS are in
//! `tests/runtimes.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::certs::{Issued, TestCa};
use common::fake::{Blob, Fake, digest, random_bytes};
use common::*;

fn tls_config(issued: &Issued) -> String {
    format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        issued.cert.display(),
        issued.key.display()
    )
}

/// A fresh client (no pooled connections) that trusts only `ca` and finds
/// the mirror's names on Pier's port.
fn https_client(ca: &TestCa, pier: &Pier, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none());
    if http1_only {
        b = b.http1_only();
    }
    for h in ["corp", "docker"] {
        b = b.resolve(&format!("{h}.{DOMAIN}"), pier.addr);
    }
    b.resolve(DOMAIN, pier.addr).build().unwrap()
}

fn base(pier: &Pier) -> String {
    format!("https://{DOMAIN}:{}", pier.port())
}

/// The leaf certificate a new connection is shown.
async fn presented(ca: &TestCa, pier: &Pier) -> Vec<u8> {
    let r = https_client(ca, pier, false)
        .get(format!("{}/v2/", base(pier)))
        .send()
        .await
        .unwrap();
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_both_protocols_and_sends_blobs_through_the_cipher() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("pier test CA");
    let issued = ca.issue(dir.path(), "server");
    let fake = Fake::start();
    let body = random_bytes(5 * 1024 * 1024 + 17, 41);
    let d = digest(&body);
    fake.blob(&d, Blob::Good(body.clone()));
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], &tls_config(&issued));

    // ALPN: HTTP/2 when the client offers it, HTTP/1.1 otherwise.
    let h2 = https_client(&ca, &pier, false);
    let r = h2.get(format!("{}/v2/", base(&pier))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let h1 = https_client(&ca, &pier, true);
    let r = h1.get(format!("{}/v2/", base(&pier))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // A blob cold, then warm from its file, over HTTP/1.1 (where plain TCP
    // would use sendfile) and over HTTP/2; and by its host-prefix name,
    // which the wildcard certificate covers.
    let path = format!("/v2/corp.example/team/app/blobs/{d}");
    for client in [&h1, &h1, &h2] {
        let r = client
            .get(format!("{}{path}", base(&pier)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), body);
        pier.wait_stored(1);
    }
    let r = h1
        .get(format!(
            "https://corp.{DOMAIN}:{}/v2/team/app/blobs/{d}",
            pier.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), body);
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 1);
    // Placeholders must never reach a TLS stream: nothing went by sendfile.
    assert_eq!(
        metric_at(&h1, &base(&pier), "pier_blob_bytes_zero_copy_total").await,
        0.0
    );

    // Plain HTTP on the HTTPS port: a 400 that says what to do.
    let plain = reqwest::Client::new();
    let r = plain
        .get(format!("http://127.0.0.1:{}/v2/", pier.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("use https://"));
    assert_eq!(
        metric_at(
            &h1,
            &base(&pier),
            "pier_tls_handshake_failures_total{reason=\"plain_http\"}"
        )
        .await,
        1.0
    );

    // A client that does not trust the CA is refused by its own check.
    let stranger = reqwest::Client::builder()
        .resolve(DOMAIN, pier.addr)
        .build()
        .unwrap();
    let err = stranger
        .get(format!("{}/v2/", base(&pier)))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
}

/// Replaces `cert` and `key` in `dir` the way Kubernetes and careful tools
/// do: new files renamed into place.
fn install(dir: &Path, cert: &Path, key: &Path) {
    for (from, to) in [(cert, "tls.crt"), (key, "tls.key")] {
        let tmp = dir.join(format!(".{to}.new"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_reach_new_connections_and_a_bad_pair_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let ca = TestCa::new("pier test CA");
    let first = ca.issue(dir.path(), "first");
    install(&live, &first.cert, &first.key);
    let fake = Fake::start();
    let config = Issued {
        cert: live.join("tls.crt"),
        key: live.join("tls.key"),
        der: Vec::new(),
    };
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], &tls_config(&config));
    assert_eq!(presented(&ca, &pier).await, first.der);

    // New files: the next connections get them, without a restart.
    let second = ca.issue(dir.path(), "second");
    install(&live, &second.cert, &second.key);
    let deadline = Instant::now() + Duration::from_secs(15);
    while presented(&ca, &pier).await != second.der {
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = https_client(&ca, &pier, true);
    assert_eq!(
        metric_at(
            &client,
            &base(&pier),
            "pier_tls_certificate_reloads_total{outcome=\"loaded\"}"
        )
        .await,
        1.0
    );

    // A certificate whose key is not the one beside it is refused, and the
    // pair in use stays. (The rotation above may have been seen half done,
    // which counts as a refusal too: count from here.)
    let refused = "pier_tls_certificate_reloads_total{outcome=\"refused\"}";
    let before = metric_at(&client, &base(&pier), refused).await;
    let third = ca.issue(dir.path(), "third");
    install(&live, &third.cert, &second.key);
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_at(&client, &base(&pier), refused).await < before + 1.0 {
        assert!(
            Instant::now() < deadline,
            "the bad pair was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(presented(&ca, &pier).await, second.der);
    // Garbage in the certificate file is refused the same way.
    let before = metric_at(&client, &base(&pier), refused).await;
    std::fs::write(live.join("tls.crt"), "not a certificate\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_at(&client, &base(&pier), refused).await < before + 1.0 {
        assert!(Instant::now() < deadline, "the garbage was never looked at");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(presented(&ca, &pier).await, second.der);
}

#[test]
fn serve_refuses_to_start_without_a_usable_pair() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("pier test CA");
    let good = ca.issue(dir.path(), "good");
    let other = ca.issue(dir.path(), "other");
    let cases = [
        (
            dir.path().join("missing.crt"),
            good.key.clone(),
            "missing.crt",
        ),
        (
            good.cert.clone(),
            other.key.clone(),
            "do not make a usable pair",
        ),
        (good.key.clone(), good.key.clone(), "holds no certificate"),
    ];
    for (cert, key, says) in cases {
        let config = dir.path().join("pier.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n{}",
                dir.path().join("data").display(),
                tls_config(&Issued {
                    cert,
                    key,
                    der: Vec::new()
                })
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pier"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {says}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}
