#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Per-client limits: request rate (shared by replicas through Redis),
//! concurrent blob downloads and bytes per second, keyed by the client IP
//! that trusted proxies report.

mod common;

use std::time::{Duration, Instant};

use common::fake::{Blob, Fake, digest, random_bytes};
use common::*;
use reqwest::StatusCode;

async fn get(http: &reqwest::Client, url: &str, client: Option<&str>) -> reqwest::Response {
    let mut req = http.get(url);
    if let Some(ip) = client {
        req = req.header("x-forwarded-for", ip);
    }
    req.send().await.unwrap()
}

/// Statuses of `n` sequential GETs of `url`.
async fn statuses(http: &reqwest::Client, url: &str, client: Option<&str>, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(http, url, client).await.status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_per_client_ip() {
    let fake = Fake::start();
    let (pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [limits]\nrequests_per_second = 1\nburst = 4\n",
    );
    let http = http_for(&pier);
    let base = format!("{}/v2/", pier.url());
    assert_eq!(statuses(&http, &base, None, 4).await, [200; 4]);
    let r = get(&http, &base, None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    // Probes and metrics are never limited.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = get(&http, &format!("{}{path}", pier.url()), None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // Behind the trusted proxy (loopback here), each forwarded client has
    // its own budget.
    assert_eq!(
        statuses(&http, &base, Some("203.0.113.5"), 5).await,
        [200, 200, 200, 200, 429]
    );
    assert_eq!(
        statuses(&http, &base, Some("198.51.100.7, 127.0.0.1"), 1).await,
        [200]
    );
    let metrics = get(&http, &format!("{}/metrics", pier.url()), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pier_client_limit_refusals_total{limit=\"requests\"} 2"),
        "{metrics}"
    );
    // The budget refills at the sustained rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(statuses(&http, &base, None, 1).await, [200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_untrusted_peers_are_ignored() {
    let fake = Fake::start();
    let (pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[limits]\nrequests_per_second = 1\nburst = 2\n",
    );
    let http = http_for(&pier);
    let base = format!("{}/v2/", pier.url());
    // A client cannot escape its budget by inventing addresses.
    let mut got = Vec::new();
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        got.extend(statuses(&http, &base, Some(ip), 1).await);
    }
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exempt_networks_have_no_limits() {
    let fake = Fake::start();
    let (pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[limits]\nrequests_per_second = 1\nburst = 1\nexempt = [\"127.0.0.0/8\"]\n",
    );
    let http = http_for(&pier);
    let base = format!("{}/v2/", pier.url());
    assert_eq!(statuses(&http, &base, None, 10).await, [200; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_blob_downloads_per_client() {
    let fake = Fake::start();
    let slow = random_bytes(400_000, 21);
    let other = random_bytes(300_000, 22);
    let (ds, d_other) = (digest(&slow), digest(&other));
    fake.blob(&ds, Blob::Slow(slow.clone(), Duration::from_millis(1500)));
    fake.blob(&d_other, Blob::Good(other.clone()));
    let (pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[limits]\nconcurrent_blobs = 1\n",
    );
    let http = http_for(&pier);
    let url = |d: &str| format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url());
    let first = get(&http, &url(&ds), Some("203.0.113.1")).await;
    assert_eq!(first.status(), StatusCode::OK);
    // While its first download runs, the same client gets 429...
    let second = get(&http, &url(&d_other), Some("203.0.113.1")).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["retry-after"], "1");
    // ...manifests and HEADs still go through...
    let head = http
        .head(url(&d_other))
        .header("x-forwarded-for", "203.0.113.1")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    // ...and another client is not held back.
    let r = get(&http, &url(&d_other), Some("203.0.113.2")).await;
    assert_eq!(r.bytes().await.unwrap(), other);
    // Once the first body is done, the slot is free again (the server lets
    // go of the body just after its last bytes went out).
    assert_eq!(first.bytes().await.unwrap(), slow);
    let deadline = Instant::now() + Duration::from_secs(2);
    let again = loop {
        let r = get(&http, &url(&d_other), Some("203.0.113.1")).await;
        if r.status() != StatusCode::TOO_MANY_REQUESTS || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.bytes().await.unwrap(), other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_per_second_per_client() {
    // Kept whole: its upstream and data directory live as long as it does.
    let setup = OneBlob::start(
        3 * 1024 * 1024,
        23,
        "[limits]\nbytes_per_second = \"1MiB\"\n",
    );
    let (pier, http, url, body) = (&setup.pier, &setup.http, &setup.url, &setup.bytes);
    // Cold and warm, the client gets its bytes no faster than its rate. A
    // frame waits until the frames before it are paid for, and no frame is
    // over 2 MiB, so of 3 MiB at 1 MiB/s at least 1 MiB waits a second
    // however a cold fetch cuts the body.
    for _ in 0..2 {
        let started = Instant::now();
        let got = get(http, url, None).await.bytes().await.unwrap();
        assert_eq!(got, body);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1), "took {took:?}");
        pier.wait_stored(1);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_request_budget_through_redis() {
    let fake = Fake::start();
    let ns = format!("limits-{:x}", rand::random::<u32>());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let limits = "[limits]\nrequests_per_second = 1\nburst = 6\n";
    let mut piers = Vec::new();
    for dir in [&a, &b] {
        let Some(config) = scaled_config(
            dir.path(),
            &ns,
            &[("corp.example", &fake.url())],
            "",
            None,
            "",
        ) else {
            return;
        };
        piers.push(Pier::start_raw(dir.path(), &format!("{config}\n{limits}")));
    }
    let http = reqwest::Client::new();
    let mut got = Vec::new();
    for i in 0..8 {
        let r = get(&http, &format!("{}/v2/", piers[i % 2].url()), None).await;
        got.push(r.status().as_u16());
    }
    // Six in all, not six per replica.
    assert_eq!(got, [200, 200, 200, 200, 200, 200, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fetch_slots_send_large_blobs_to_upstream_storage() {
    let fake = Fake::start();
    let cdn = Fake::start();
    let hog = random_bytes(600_000, 31);
    let large = random_bytes(3 * 1024 * 1024, 32);
    let small = random_bytes(10_000, 33);
    let (d_hog, d_large, d_small) = (digest(&hog), digest(&large), digest(&small));
    fake.blob(&d_hog, Blob::Slow(hog.clone(), Duration::from_secs(4)));
    let cdn_url = format!("{}/storage/blobs/{d_large}?signature=abc", cdn.url());
    fake.blob(&d_large, Blob::Redirect(cdn_url.clone()));
    fake.blob(&d_small, Blob::Good(small.clone()));
    cdn.blob(&d_large, Blob::Good(large.clone()));
    let (pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[fetch]\nmax_concurrent = 1\nredirect_above = \"1MiB\"\nqueue_timeout = \"1s\"\n",
    );
    let http = http_for(&pier);
    let url = |d: &str| format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url());

    // One slow fetch takes the only slot.
    let first = get(&http, &url(&d_hog), None).await;
    assert_eq!(first.status(), StatusCode::OK);
    // A large blob goes to upstream's storage instead of waiting...
    let r = get(&http, &url(&d_large), None).await;
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()["location"], cdn_url.as_str());
    assert_eq!(r.headers()["docker-content-digest"], d_large.as_str());
    assert_eq!(cdn.count("GET", "/storage/"), 0, "Pier did not fetch it");
    let followed = reqwest::get(&cdn_url).await.unwrap().bytes().await.unwrap();
    assert_eq!(followed, large);
    // ...a small one queues for the slot and, past the queue timeout, gets
    // a 503 to retry later.
    let r = get(&http, &url(&d_small), None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "10");
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(
        fake.count("GET", &format!("/v2/team/app/blobs/{d_small}")),
        0
    );

    // Once the slot is free, both are fetched and served as usual.
    assert_eq!(first.bytes().await.unwrap(), hog);
    pier.wait_stored(1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (d, want) in [(&d_large, &large), (&d_small, &small)] {
        let r = get(&http, &url(d), None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap(), *want);
    }
    let metrics = get(&http, &format!("{}/metrics", pier.url()), None)
        .await
        .text()
        .await
        .unwrap();
    for line in [
        "pier_fetch_slots_full_total{outcome=\"redirected\"} 1",
        "pier_fetch_slots_full_total{outcome=\"refused\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}
