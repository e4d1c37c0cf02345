#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Upstream misbehaviour a real registry will not produce on demand, from a
//! scripted fake: wrong bytes, truncated bodies, 429s, slow bodies,
//! redirects to another host, and a Bearer token flow.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Blob, Fake, digest, random_bytes, sha256_hex};
use common::*;
use futures::StreamExt;
use reqwest::{Method, StatusCode};

fn start(fake: &Fake) -> (Pier, tempfile::TempDir, reqwest::Client) {
    let (pier, data) = Pier::start(&[("corp.example", &fake.url())], "");
    let http = http_for(&pier);
    (pier, data, http)
}

fn blob_url(pier: &Pier, d: &str) -> String {
    format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url())
}

/// Reads a whole response body; `Err` when the body broke off.
async fn read_body(r: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    r.bytes().await
}

/// Sizes on both sides of the point where a fetch stops holding the blob
/// in memory and spools it to a file instead.
const SPOOL_SIZES: [usize; 2] = [300_000, 3_000_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_match_the_digest_are_never_cached_or_completed() {
    for size in SPOOL_SIZES {
        let fake = Fake::start();
        let good = random_bytes(size, 1);
        let bad = random_bytes(size, 2);
        let d = digest(&good);
        fake.blob(&d, Blob::Good(bad.clone()));
        let (pier, _data, http) = start(&fake);

        for round in 1..=2 {
            let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
            // Streaming already began, so the client sees the body break
            // off short of its length: it never holds a complete wrong blob.
            if r.status() == StatusCode::OK {
                let body = read_body(r).await;
                assert!(body.is_err() || body.unwrap().len() < bad.len());
            } else {
                assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
            }
            assert!(pier.stored_blobs().is_empty());
            assert_eq!(
                fake.count("GET", "/v2/team/app/blobs/"),
                round,
                "refetched, not cached ({size} bytes)"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upstream_body_is_not_cached() {
    for size in SPOOL_SIZES {
        let fake = Fake::start();
        let good = random_bytes(size, 3);
        let d = digest(&good);
        fake.blob(&d, Blob::Truncated(good.clone()));
        let (pier, data, http) = start(&fake);
        let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
        if r.status() == StatusCode::OK {
            assert!(read_body(r).await.is_err());
        }
        // The fetch ends on its own; nothing lands in the store or the spool.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(pier.stored_blobs().is_empty());
        assert_eq!(
            std::fs::read_dir(data.path().join("tmp"))
                .map(|d| d.count())
                .unwrap_or(0),
            0
        );
        // Once upstream behaves, the next request fetches and serves it.
        fake.blob(&d, Blob::Good(good.clone()));
        let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(read_body(r).await.unwrap(), good);
        assert_eq!(pier.wait_stored(1), vec![sha256_hex(&good)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_reaches_the_client_as_toomanyrequests() {
    let fake = Fake::start();
    let d = digest(b"limited");
    fake.blob(&d, Blob::TooMany);
    let (pier, _data, http) = start(&fake);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cold_blob_streams_to_every_client_from_one_fetch() {
    for size in SPOOL_SIZES {
        let fake = Fake::start();
        let good = random_bytes(size, 4);
        let d = digest(&good);
        let pause = Duration::from_secs(2);
        fake.blob(&d, Blob::Slow(good.clone(), pause));
        let (pier, _data, http) = start(&fake);

        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..10 {
            let (http, url) = (http.clone(), blob_url(&pier, &d));
            clients.push(tokio::spawn(async move {
                let r = fetch(&http, Method::GET, &url, &[]).await;
                assert_eq!(r.status(), StatusCode::OK);
                let mut stream = r.bytes_stream();
                let first = stream.next().await.unwrap().unwrap();
                let first_at = started.elapsed();
                let mut all = first.to_vec();
                while let Some(c) = stream.next().await {
                    all.extend_from_slice(&c.unwrap());
                }
                (first_at, all)
            }));
        }
        for c in clients {
            let (first_at, all) = c.await.unwrap();
            // The first bytes arrive while upstream is still paused.
            assert!(
                first_at < pause,
                "first byte after {first_at:?} ({size} bytes)"
            );
            assert_eq!(all, good);
        }
        assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
        assert_eq!(pier.wait_stored(1), vec![sha256_hex(&good)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_does_not_cancel_the_fetch() {
    let fake = Fake::start();
    let good = random_bytes(1_000_000, 5);
    let d = digest(&good);
    fake.blob(&d, Blob::Slow(good.clone(), Duration::from_millis(800)));
    let (pier, _data, http) = start(&fake);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    assert_eq!(pier.wait_stored(1), vec![sha256_hex(&good)]);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    assert_eq!(read_body(r).await.unwrap(), good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_fetched_once_and_not_sent_to_redirect_targets() {
    let fake = Fake::start();
    let cdn = Fake::start();
    fake.require_token("secret-token");
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
    let good = random_bytes(100_000, 6);
    let d = digest(&good);
    fake.blob(&d, Blob::Redirect(format!("{}/cdn/{d}", cdn.url())));
    cdn.blob(&d, Blob::Good(good.clone()));
    let (pier, _data, http) = start(&fake);

    let r = fetch(
        &http,
        Method::GET,
        &format!("{}/v2/corp.example/team/app/manifests/v1", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), Bytes::from_static(manifest));
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_body(r).await.unwrap(), good);

    // One token for the repository, used for both requests.
    assert_eq!(fake.count("GET", "/token"), 1);
    let authed: Vec<_> = fake
        .hits()
        .into_iter()
        .filter(|h| h.path.starts_with("/v2/team/app/"))
        .collect();
    assert!(
        authed
            .iter()
            .any(|h| h.authorization.as_deref() == Some("Bearer secret-token"))
    );
    // The CDN got the request, without the token.
    let cdn_hits = cdn.hits();
    assert_eq!(cdn_hits.len(), 1);
    assert_eq!(cdn_hits[0].authorization, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let fake = Fake::start();
    let real = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let wanted = digest(b"something else");
    fake.manifest(
        "team/app",
        &wanted,
        "application/vnd.oci.image.manifest.v1+json",
        real,
    );
    let (pier, _data, http) = start(&fake);
    let url = format!("{}/v2/corp.example/team/app/manifests/{wanted}", pier.url());
    for _ in 0..2 {
        let r = fetch(&http, Method::GET, &url, &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert!(r.text().await.unwrap().contains("does not match"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_never_completes_on_unverified_bytes() {
    for size in SPOOL_SIZES {
        let fake = Fake::start();
        let good = random_bytes(size, 7);
        let bad = random_bytes(size, 8);
        let d = digest(&good);
        // The first KiB arrives at once, the rest (wrong) after a pause.
        fake.blob(&d, Blob::Slow(bad, Duration::from_millis(500)));
        let (pier, _data, http) = start(&fake);
        let r = fetch(
            &http,
            Method::GET,
            &blob_url(&pier, &d),
            &[("range", "bytes=0-99")],
        )
        .await;
        // The range lies in bytes already received, yet its last byte waits
        // for the digest check, which fails: the response breaks off.
        if r.status() == StatusCode::PARTIAL_CONTENT {
            let body = read_body(r).await;
            assert!(body.is_err() || body.unwrap().len() < 100);
        } else {
            assert!(r.status().is_server_error(), "{}", r.status());
        }
        assert!(pier.stored_blobs().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_server_outage_serves_cached_tags_stale() {
    let fake = Fake::start();
    fake.require_token("tok");
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_with(
        data.path(),
        &[("corp.example", &fake.url())],
        "",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    assert_eq!(
        fetch(&http, Method::GET, &url, &[]).await.status(),
        StatusCode::OK
    );

    // Token expired from Pier's point of view: a fresh Pier on the same data.
    drop(pier);
    fake.token_down(true);
    let pier = Pier::start_with(
        data.path(),
        &[("corp.example", &fake.url())],
        "",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("warning"));
    assert_eq!(r.bytes().await.unwrap(), Bytes::from_static(manifest));
    // Never cached: a clear outage error, not "unknown".
    let r = fetch(
        &http,
        Method::GET,
        &format!("{}/v2/corp.example/team/app/manifests/v2", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("token server"));
}

/// With Redis and upstream both down, a tag past its TTL is served stale
/// from the copy this process keeps, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_and_upstream_down_a_stale_tag_comes_from_memory() {
    if !have_tools(&["redis-server"]) {
        return;
    }
    let mut redis = RedisServer::start();
    let fake = Fake::start();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
    let data = tempfile::tempdir().unwrap();
    let extra = format!(
        "[metadata]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"300ms\"\n",
        redis.url()
    );
    let pier = Pier::start_with(
        data.path(),
        &[("corp.example", &fake.url())],
        &extra,
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    assert_eq!(
        fetch(&http, Method::GET, &url, &[]).await.status(),
        StatusCode::OK
    );
    redis.stop();
    // Upstream unreachable for Pier: its token server is down (a dropped
    // fake would still answer on the connection Pier keeps open).
    fake.require_token("tok");
    fake.token_down(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("warning"));
    assert_eq!(r.bytes().await.unwrap(), Bytes::from_static(manifest));
}

/// HEAD of a cold blob upstream sends without a length says no length
/// (never a `Content-Length: 0` the GET would contradict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_blob_of_unknown_length_does_not_claim_zero_bytes() {
    let fake = Fake::start();
    let bytes = random_bytes(70_000, 21);
    let d = digest(&bytes);
    fake.blob(&d, Blob::Chunked(bytes.clone()));
    let (pier, _data, http) = start(&fake);
    let r = fetch(&http, Method::HEAD, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let length = r
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        length.is_none() || length.as_deref() == Some("70000"),
        "HEAD says Content-Length: {length:?}"
    );
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.bytes().await.unwrap(), bytes);
    // Stored now: HEAD answers from the store, with the length.
    pier.wait_stored(1);
    let r = fetch(&http, Method::HEAD, &blob_url(&pier, &d), &[]).await;
    assert_eq!(r.headers()["content-length"], "70000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_link_local_address_is_refused() {
    let fake = Fake::start();
    let d = digest(b"metadata");
    fake.blob(
        &d,
        Blob::Redirect("http://169.254.169.254/latest/meta-data/iam".into()),
    );
    let (pier, _data, http) = start(&fake);
    let r = fetch(&http, Method::GET, &blob_url(&pier, &d), &[]).await;
    // The upstream misbehaved (502), rather than being unreachable (503).
    // The literal is refused before a socket is opened: tests/egress.rs
    // covers the other spellings on a loopback stand-in, never here.
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body = r.text().await.unwrap();
    assert!(body.contains("link-local"), "{body}");
    // Not retried against the same refusal.
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_private_headers_never_reach_clients() {
    let fake = Fake::start();
    let blob = random_bytes(50_000, 5);
    let d = digest(&blob);
    fake.blob(&d, Blob::Good(blob.clone()));
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        br#"{"schemaVersion":2}"#,
    );
    let (pier, _data, http) = start(&fake);
    let manifest = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    // Cold and warm, GET and HEAD.
    for _ in 0..2 {
        for (method, url) in [
            (Method::GET, manifest.as_str()),
            (Method::HEAD, manifest.as_str()),
            (Method::GET, &blob_url(&pier, &d)),
            (Method::HEAD, &blob_url(&pier, &d)),
        ] {
            let r = fetch(&http, method.clone(), url, &[]).await;
            assert!(r.status().is_success(), "{method} {url}: {}", r.status());
            for (name, _) in common::fake::PRIVATE_HEADERS {
                assert!(
                    r.headers().get(name).is_none(),
                    "{method} {url} passed on {name}"
                );
            }
            let _ = r.bytes().await;
        }
        pier.wait_stored(1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_over_4_mib_are_refused() {
    let fake = Fake::start();
    let media = "application/vnd.oci.image.manifest.v1+json";
    // Valid JSON either way: only the size differs.
    let padded = |n: usize| format!("{{\"schemaVersion\":2,\"pad\":\"{}\"}}", "x".repeat(n));
    let big = padded(4 * 1024 * 1024);
    let fits = padded(4 * 1024 * 1024 - 100);
    fake.manifest("team/app", "big", media, big.as_bytes());
    fake.manifest("team/app", "fits", media, fits.as_bytes());
    let (pier, _data, http) = start(&fake);
    let url = |tag: &str| format!("{}/v2/corp.example/team/app/manifests/{tag}", pier.url());
    let r = fetch(&http, Method::GET, &url("big"), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    // Not cached: asked again next time.
    let r = fetch(&http, Method::GET, &url("big"), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(fake.count("GET", "/v2/team/app/manifests/big"), 2);
    let r = fetch(&http, Method::GET, &url("fits"), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), fits.len());
}

/// More slow cold fetches than tokio has blocking threads (512 by
/// default) hold none of them while they wait for bytes: a stored blob
/// read on the blocking pool (the streamed body, as HTTP/2 clients and
/// `zero_copy = false` get) is answered at once, and the process keeps
/// few threads. With a spool-writing thread per fetch, the read waited
/// for a fetch to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_cold_fetches_leave_the_blocking_pool_to_stored_blobs() {
    const FETCHES: usize = 520;
    let fake = Fake::start();
    let stored = random_bytes(64 * 1024, 31);
    let stored_digest = digest(&stored);
    fake.blob(&stored_digest, Blob::Good(stored.clone()));
    // Past the size held in memory, so each fetch writes a spool file.
    let cold: Vec<String> = (0..FETCHES).map(|i| format!("sha256:{i:064x}")).collect();
    for d in &cold {
        fake.blob(d, Blob::Stalled(2 * 1024 * 1024));
    }
    let data = tempfile::tempdir().unwrap();
    let pier = PierProcess::start(&format!(
        "listen = \"127.0.0.1:0\"\nbuiltin_upstreams = false\n\
         default_registry = \"corp.example\"\n\
         [server]\nzero_copy = false\n[fetch]\nmax_concurrent = 0\n\
         [storage]\nkind = \"fs\"\npath = \"{}\"\n\
         [[upstreams]]\nregistry = \"corp.example\"\nendpoints = [\"{}\"]\n",
        data.path().display(),
        fake.url()
    ));
    let url = |d: &str| format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url());
    let http = reqwest::Client::new();
    let r = http.get(url(&stored_digest)).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), stored);
    assert_eq!(wait_files(&data.path().join("blobs"), 1).len(), 1);

    // The clients wait on their fetches in the background.
    let waiting: Vec<_> = cold
        .iter()
        .map(|d| tokio::spawn(http.get(url(d)).send()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.count("GET", "/v2/team/app/blobs/sha256:00000") < FETCHES {
        assert!(Instant::now() < deadline, "the cold fetches did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every fetch has its answer from upstream; give them time to open
    // their spool files and take whatever they take.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        http.get(url(&stored_digest))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    })
    .await;
    assert_eq!(
        read.ok(),
        Some(stored),
        "a stored blob read waited behind {FETCHES} slow fetches for {:?}",
        started.elapsed()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", pier.pid())).unwrap();
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    // Held for every fetch, threads reach the pool's cap of 512. Short
    // trips (opening 520 spool files at once) may leave idle ones, which
    // tokio keeps for 10 s.
    assert!(
        threads < 400,
        "{threads} threads for {FETCHES} fetches waiting on upstream"
    );
    for w in waiting {
        w.abort();
    }
}
