#![allow(clippy::unwrap_used, clippy::expect_used)]

//! No client ever sees a clean end of a body that is not the verified blob,
//! whatever its HTTP version, and no upstream body can fill the disk or
//! hold a fetch for ever: blobs streamed without a length, HTTP/1.0 and
//! HTTP/2 clients, sizes named by manifests, endless and trickling bodies.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Blob, Fake, digest, random_bytes, sha256_hex};
use common::*;
use reqwest::{Method, StatusCode};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn blob_url(pier: &Pier, d: &str) -> String {
    format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url())
}

/// What curl saw: status, body, the Content-Length header (if any) and
/// whether curl itself reported the transfer as complete.
struct Curl {
    status: u16,
    body: Vec<u8>,
    content_length: Option<u64>,
    clean: bool,
}

async fn curl(url: &str, extra: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let (body, headers) = (dir.path().join("body"), dir.path().join("headers"));
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "60", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .await
        .expect("run curl");
    let headers = std::fs::read_to_string(&headers).unwrap_or_default();
    Curl {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        body: std::fs::read(&body).unwrap_or_default(),
        content_length: headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        }),
        clean: out.status.success(),
    }
}

fn spool_files(data: &tempfile::TempDir) -> usize {
    files_under(&data.path().join("tmp")).len()
}

/// The reported defect: 300,000 wrong bytes sent chunked reached an
/// HTTP/1.0 client as a clean `200` of 299,999 bytes. Now the client is
/// told the fetch failed; a right blob sent chunked reaches it whole, with
/// its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_never_gets_a_clean_end_of_a_wrong_body() {
    for size in [300_000, 3_000_000] {
        let fake = Fake::start();
        let (good, bad) = (random_bytes(size, 1), random_bytes(size, 2));
        let d = digest(&good);
        fake.blob(&d, Blob::Chunked(bad));
        let (pier, data) = Pier::start(&[("corp.example", &fake.url())], "");

        let got = curl(&blob_url(&pier, &d), &["--http1.0"]).await;
        assert_eq!(got.status, 502, "{size} bytes");
        let err: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(err["errors"][0]["code"], "UNAVAILABLE");
        assert!(pier.stored_blobs().is_empty());
        assert_eq!(spool_files(&data), 0);

        fake.blob(&d, Blob::Chunked(good.clone()));
        let got = curl(&blob_url(&pier, &d), &["--http1.0"]).await;
        assert_eq!(got.status, 200);
        assert!(got.clean);
        assert_eq!(got.content_length, Some(size as u64));
        assert_eq!(sha256_hex(&got.body), sha256_hex(&good));
        assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 2);
    }
}

/// HTTP/1.1 and HTTP/2 clients can tell a broken body from a whole one, so
/// they are streamed to at once; a wrong body reaches them broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_and_http2_clients_see_a_wrong_chunked_body_break() {
    let fake = Fake::start();
    let (good, bad) = (random_bytes(3_000_000, 3), random_bytes(3_000_000, 4));
    let d = digest(&good);
    fake.blob(&d, Blob::Chunked(bad));
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], "");
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let got = curl(&blob_url(&pier, &d), &[version]).await;
        assert!(
            !got.clean || got.status != 200,
            "{version}: a clean {} of {} bytes",
            got.status,
            got.body.len()
        );
        assert_ne!(sha256_hex(&got.body), sha256_hex(&good));
    }
    assert!(pier.stored_blobs().is_empty());
    // The log and the metrics say the bodies broke, not just `200`.
    let broken = metric(&http_for(&pier), &pier, "pier_response_bodies_broken_total").await;
    assert!(broken >= 1.0, "{broken}");
}

/// A manifest names each layer's size: a fetch streamed without a length
/// still tells clients the length, and a body running past it is cut off
/// at once rather than spooled to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_a_manifest_names_is_announced_and_enforced() {
    let fake = Fake::start();
    let layer = random_bytes(2_000_000, 5);
    let (config, endless) = (Bytes::from_static(b"{}"), random_bytes(1_000, 6));
    let (dl, dc, de) = (digest(&layer), digest(&config), digest(&endless));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{dc}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{dl}","size":{}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{de}","size":1000}}]}}"#,
        layer.len()
    );
    fake.manifest("team/app", "v1", OCI_MANIFEST, manifest.as_bytes());
    fake.blob(&dl, Blob::Chunked(layer.clone()));
    fake.blob(&de, Blob::Endless);
    let (pier, data) = Pier::start(&[("corp.example", &fake.url())], "");
    let http = http_for(&pier);
    let m = fetch(
        &http,
        Method::GET,
        &format!("{}/v2/corp.example/team/app/manifests/v1", pier.url()),
        &[],
    )
    .await;
    assert_eq!(m.status(), StatusCode::OK);

    let r = fetch(&http, Method::GET, &blob_url(&pier, &dl), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), Some(layer.len() as u64));
    assert!(r.bytes().await.unwrap() == layer);

    let started = Instant::now();
    // The fetch fails at the 1,001st byte: the client sees a body that
    // breaks off short of the length it was told, an error status, or (when
    // the failure beat the response head) a connection closed on it.
    match http.get(blob_url(&pier, &de)).send().await {
        Ok(r) if r.status() == StatusCode::OK => {
            assert_eq!(r.content_length(), Some(1000));
            assert!(r.bytes().await.is_err());
        }
        Ok(r) => assert_eq!(r.status(), StatusCode::BAD_GATEWAY),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pier.stored_blobs(), vec![sha256_hex(&layer)]);
    assert_eq!(spool_files(&data), 0);
    assert_eq!(
        metric(&http, &pier, "pier_blob_fetches_in_flight").await,
        0.0
    );
}

/// An endless body of unknown length is cut off at `max_blob_size`, even
/// after its only client hung up; its spool file, fetch slot and lease are
/// freed, so the next fetch runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_stops_at_max_blob_size_and_frees_its_slot() {
    let fake = Fake::start();
    let endless = digest(b"never ends");
    fake.blob(&endless, Blob::Endless);
    let next = random_bytes(100_000, 7);
    fake.blob(&digest(&next), Blob::Good(next.clone()));
    let (pier, data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[fetch]\nmax_concurrent = 1\nqueue_timeout = \"1s\"\nmax_blob_size = \"8MiB\"\n",
    );
    let http = http_for(&pier);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &endless), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), None);
    // The client hangs up after the first bytes.
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&http, &pier, "pier_blob_fetches_in_flight").await > 0.0 {
        assert!(Instant::now() < deadline, "the fetch never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(
            &http,
            &pier,
            "pier_blob_fetches_abandoned_total{reason=\"too_large\"}"
        )
        .await,
        1.0
    );
    assert_eq!(spool_files(&data), 0);
    assert!(pier.stored_blobs().is_empty());
    let r = fetch(&http, Method::GET, &blob_url(&pier, &digest(&next)), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == next);

    // Announced larger than the ceiling: refused before any byte is kept.
    let big = random_bytes(9 << 20, 8);
    fake.blob(&digest(&big), Blob::Good(big.clone()));
    let r = fetch(&http, Method::GET, &blob_url(&pier, &digest(&big)), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body = r.text().await.unwrap();
    assert!(body.contains("max_blob_size"), "{body}");
}

/// A fetch every client has left must keep up `min_rate`; one that trickles
/// is abandoned after the window, while a client reading keeps it going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_fetch_nobody_reads_is_abandoned() {
    let fake = Fake::start();
    // 1 KiB every 100 ms: 10 KiB/s, under the 64 KiB/s floor.
    let slow = random_bytes(60_000, 9);
    fake.blob(
        &digest(&slow),
        Blob::Trickle(slow.clone(), Duration::from_millis(100)),
    );
    let (pier, data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[fetch]\nmin_rate = \"64KiB\"\nmin_rate_window = \"2s\"\n",
    );
    let http = http_for(&pier);
    // A reader holds it up for the whole trickle (about 6 s, three windows).
    let r = fetch(&http, Method::GET, &blob_url(&pier, &digest(&slow)), &[]).await;
    assert!(r.bytes().await.unwrap() == slow);
    assert_eq!(pier.wait_stored(1), vec![sha256_hex(&slow)]);

    let slower = random_bytes(200_000, 10);
    let d = digest(&slower);
    fake.blob(&d, Blob::Trickle(slower, Duration::from_millis(100)));
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    let left = Instant::now();
    while metric(&http, &pier, "pier_blob_fetches_in_flight").await > 0.0 {
        assert!(left.elapsed() < Duration::from_secs(8), "never abandoned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        metric(
            &http,
            &pier,
            "pier_blob_fetches_abandoned_total{reason=\"too_slow\"}"
        )
        .await,
        1.0
    );
    assert_eq!(spool_files(&data), 0);
    assert_eq!(pier.stored_blobs(), vec![sha256_hex(&slow)]);
}
