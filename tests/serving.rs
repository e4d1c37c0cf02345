#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The client side of the server: stored blobs sent with sendfile (and byte
//! exact whichever way they go out), clients that stall or send too much,
//! and a graceful shutdown that finishes streams and gives up leases.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Blob, Fake, digest, random_bytes, sha256_hex};
use common::*;
use reqwest::{Method, StatusCode};

fn blob_path(d: &str) -> String {
    format!("/v2/corp.example/team/app/blobs/{d}")
}

/// Fetches `path` with curl, which can speak HTTP/2 with prior knowledge.
fn curl(pier: &Pier, path: &str, extra: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--noproxy", "*"])
        .args(extra)
        .arg(format!("{}{path}", pier.url()))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {extra:?} {path}: {out:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_blobs_go_out_with_sendfile_byte_exact() {
    let fake = Fake::start();
    // Larger than one sendfile frame (2 MiB), not a multiple of it.
    let big = random_bytes(5 * 1024 * 1024 + 12_345, 7);
    let small = random_bytes(70_000, 8);
    let (db, ds) = (digest(&big), digest(&small));
    fake.blob(&db, Blob::Good(big.clone()));
    fake.blob(&ds, Blob::Good(small.clone()));
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], "");
    let http = http_for(&pier);
    // Cold: streamed from the fetch, the big blob from its spool file with
    // sendfile, the small one (held in memory) copied.
    for (d, want) in [(&db, &big), (&ds, &small)] {
        let r = fetch(
            &http,
            Method::GET,
            &format!("{}{}", pier.url(), blob_path(d)),
            &[],
        )
        .await;
        assert_eq!(r.bytes().await.unwrap(), *want);
    }
    pier.wait_stored(2);
    let zero_copy = "pier_blob_bytes_zero_copy_total";
    let mut sent = big.len();
    assert_eq!(metric(&http, &pier, zero_copy).await, sent as f64);

    // Warm, several on one keep-alive connection, whole and in ranges.
    for _ in 0..3 {
        for (d, want) in [(&db, &big), (&ds, &small)] {
            let r = fetch(
                &http,
                Method::GET,
                &format!("{}{}", pier.url(), blob_path(d)),
                &[],
            )
            .await;
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-length"], want.len().to_string());
            let got = r.bytes().await.unwrap();
            assert_eq!(digest(&got), *d);
            sent += want.len();
        }
    }
    let ranges: [(&str, std::ops::Range<usize>); 3] = [
        ("bytes=0-0", 0..1),
        ("bytes=2097150-4194400", 2_097_150..4_194_401),
        ("bytes=-1000", big.len() - 1000..big.len()),
    ];
    for (range, want) in ranges {
        let url = format!("{}{}", pier.url(), blob_path(&db));
        let r = fetch(&http, Method::GET, &url, &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(r.bytes().await.unwrap(), big.slice(want.clone()), "{range}");
        sent += want.len();
    }
    assert_eq!(metric(&http, &pier, zero_copy).await, sent as f64);

    // HTTP/2 (prior knowledge) and HTTP/1.0 get the same bytes; HTTP/2
    // copies them into frames, so it does not use sendfile.
    let h2 = curl(&pier, &blob_path(&db), &["--http2-prior-knowledge"]);
    assert_eq!(digest(&h2), db);
    assert_eq!(metric(&http, &pier, zero_copy).await, sent as f64);
    let h10 = curl(&pier, &blob_path(&ds), &["--http1.0"]);
    assert_eq!(digest(&h10), ds);
    sent += small.len();
    assert_eq!(metric(&http, &pier, zero_copy).await, sent as f64);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 2, "no refetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_can_be_switched_off() {
    // Kept whole: its upstream and data directory live as long as it does.
    let setup = OneBlob::start(3 * 1024 * 1024, 9, "[server]\nzero_copy = false\n");
    let (pier, http, url) = (&setup.pier, &setup.http, &setup.url);
    let big = setup.bytes.clone();
    assert_eq!(
        fetch(http, Method::GET, url, &[])
            .await
            .bytes()
            .await
            .unwrap(),
        big
    );
    pier.wait_stored(1);
    let warm = fetch(http, Method::GET, url, &[])
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(warm, big);
    assert_eq!(
        metric(http, pier, "pier_blob_bytes_zero_copy_total").await,
        0.0
    );
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what arrived and whether the server closed it.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_are_cut_off() {
    let setup = OneBlob::start(
        24 * 1024 * 1024,
        10,
        "[server]\nheader_timeout = \"1s\"\nsend_timeout = \"1s\"\nmax_header_bytes = \"16KiB\"\n",
    );
    let (pier, http, url, d) = (&setup.pier, &setup.http, &setup.url, &setup.digest);
    let big = setup.bytes.clone();
    assert_eq!(
        fetch(http, Method::GET, url, &[])
            .await
            .bytes()
            .await
            .unwrap(),
        big
    );
    pier.wait_stored(1);
    let addr = pier.addr;
    let path = blob_path(d);
    let size = big.len();

    tokio::task::spawn_blocking(move || {
        // Connects and says nothing.
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).unwrap();
        let (got, closed) = read_until_closed(&mut silent, Duration::from_secs(5));
        assert!(closed && got.is_empty(), "silent client kept");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Starts a request and never finishes its headers.
        let started = Instant::now();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
        let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5));
        assert!(closed, "slow-header client kept");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Headers over the limit: refused with 431 and closed. (Pier may
        // answer and close while the client still writes; on a loaded
        // machine the write then fails and the reset can discard the
        // answer. The connection must end either way.)
        let mut fat = TcpStream::connect(addr).unwrap();
        let pad = "a".repeat(20 * 1024);
        let sent = write!(fat, "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n");
        let (got, closed) = read_until_closed(&mut fat, Duration::from_secs(5));
        let head = String::from_utf8_lossy(&got);
        assert!(closed, "oversized client kept");
        if sent.is_ok() || !got.is_empty() {
            assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        }

        // Asks for 24 MiB and reads none of it: dropped after send_timeout.
        let mut stalled = TcpStream::connect(addr).unwrap();
        write!(stalled, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_secs(4));
        let (got, closed) = read_until_closed(&mut stalled, Duration::from_secs(5));
        assert!(closed, "stalled reader kept");
        assert!(got.len() < size, "got all {} bytes", got.len());
    })
    .await
    .unwrap();

    // Still serving.
    let r = fetch(http, Method::GET, &format!("{}/healthz", pier.url()), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let warm = fetch(http, Method::GET, url, &[])
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(digest(&warm), *d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_streams_and_fetches_in_flight() {
    let fake = Fake::start();
    let body = random_bytes(1_500_000, 11);
    let d = digest(&body);
    fake.blob(&d, Blob::Slow(body.clone(), Duration::from_millis(1500)));
    let (mut pier, _data) = Pier::start(
        &[("corp.example", &fake.url())],
        "[server]\nshutdown_grace = \"20s\"\n",
    );
    let http = http_for(&pier);
    let url = format!("{}{}", pier.url(), blob_path(&d));
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The fetch is under way (the upstream pauses after 1 KiB): stop now.
    let addr = pier.addr;
    let stopping = std::thread::spawn(move || {
        let started = Instant::now();
        pier.stop();
        (pier, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after the shutdown signal"
    );
    // The client's stream completes, verified, during the drain.
    let got: Bytes = r.bytes().await.unwrap();
    assert_eq!(digest(&got), d);
    let (pier, took) = tokio::task::spawn_blocking(move || stopping.join().unwrap())
        .await
        .unwrap();
    assert!(took < Duration::from_secs(15), "drain took {took:?}");
    // And the fetch was committed before the process let go.
    assert_eq!(pier.stored_blobs(), vec![sha256_hex(&body)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_leases_past_the_grace_period() {
    if !have_tools(&["redis-cli"]) {
        return;
    }
    let fake = Fake::start();
    let body = random_bytes(1_000_000, 12);
    let d = digest(&body);
    // Upstream pauses far longer than the grace period.
    fake.blob(&d, Blob::Slow(body.clone(), Duration::from_secs(60)));
    let ns = format!("serving-{:x}", rand::random::<u32>());
    let data = tempfile::tempdir().unwrap();
    let Some(config) = scaled_config(
        data.path(),
        &ns,
        &[("corp.example", &fake.url())],
        "",
        None,
        "",
    ) else {
        return;
    };
    let config = config.replace(
        "[cluster]\n",
        "[server]\nshutdown_grace = \"1s\"\n[cluster]\nlease_ttl = \"60s\"\n",
    );
    let mut pier = Pier::start_raw(data.path(), &config);
    let http = http_for(&pier);
    let url = format!("{}{}", pier.url(), blob_path(&d));
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let redis = std::env::var("PIER_TEST_REDIS_URL").unwrap();
    let leases = || {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                &redis,
                "--scan",
                "--pattern",
                // Blob leases: the upload sweep's is left to lapse on purpose.
                &format!("{ns}:lease:blob:*"),
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(leases().contains(&d), "the fetch holds its lease");
    let started = Instant::now();
    tokio::task::spawn_blocking(move || pier.stop())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    // Released at exit, not left for the 60 s TTL.
    assert_eq!(leases().trim(), "");
    drop(r);
}
