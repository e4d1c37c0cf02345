#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Replicas sharing blobs in S3 (SeaweedFS, which checks SigV4) and
//! metadata in Redis: what one replica cached, another serves without
//! touching upstream; losing Redis loses no blobs.

mod common;

use common::*;

fn namespace() -> String {
    format!("t{:x}", rand::random::<u64>())
}

async fn pull(pier: &Pier, image: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(&format!("{}/{image}", pier.host()), out.path(), &[]).await;
    assert!(run.ok, "{}", run.stderr);
    manifest_digest_in(out.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_cached_through_one_replica_is_served_by_another() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = namespace();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ups = [("docker.io", docker.url())];
    let ups: Vec<(&str, &str)> = ups.iter().map(|(r, u)| (*r, u.as_str())).collect();
    let Some(a) = Pier::start_scaled(da.path(), &ns, &ups, "") else {
        return;
    };
    let b = Pier::start_scaled(db.path(), &ns, &ups, "").unwrap();

    // 64 MiB layer: a multipart upload once it is verified.
    let want = digest_of("docker", "library/big:latest");
    assert_eq!(pull(&a, "docker.io/library/big:latest").await, want);
    let blob_gets = docker.requests("GET", "library/big/blobs/");
    assert_eq!(blob_gets, 3, "{}", docker.log());

    // Replica B: same bucket and Redis, no upstream traffic at all. The
    // commit happens just after A's clients got their last byte.
    let mut tries = 0;
    loop {
        let before = docker.log();
        assert_eq!(pull(&b, "docker.io/library/big:latest").await, want);
        if docker.log() == before {
            break;
        }
        tries += 1;
        assert!(
            tries < 3,
            "replica B kept asking upstream:\n{}",
            docker.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(docker.requests("GET", "library/big/blobs/"), blob_gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_on_two_replicas_cause_one_upstream_get_per_blob() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = namespace();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = docker.url();
    // Two `pier serve` processes sharing one bucket and one Redis.
    let config =
        |dir: &std::path::Path| scaled_config(dir, &ns, &[("docker.io", &url)], "", None, "");
    let (Some(ca), Some(cb)) = (config(da.path()), config(db.path())) else {
        return;
    };
    let (a, b) = (PierProcess::start(&ca), PierProcess::start(&cb));
    let want = digest_of("docker", "library/big:latest");
    let mut clients = Vec::new();
    for i in 0..20 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        let src = format!("127.0.0.1:{port}/docker.io/library/big:latest");
        clients.push(tokio::spawn(async move {
            let out = tempfile::tempdir().unwrap();
            let run = skopeo_copy(&src, out.path(), &[]).await;
            assert!(run.ok, "{src}: {}", run.stderr);
            manifest_digest_in(out.path())
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), want);
    }
    docker.assert_one_get_per_blob("library/big", 3);
    // Tags too: one upstream manifest GET for the tag across both.
    assert_eq!(
        docker.requests("GET", "library/big/manifests/latest"),
        1,
        "{}",
        docker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushing_redis_loses_no_blobs() {
    if !have_tools(&["docker-registry", "skopeo", "redis-cli"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = namespace();
    let data = tempfile::tempdir().unwrap();
    let url = docker.url();
    let Some(mut pier) = Pier::start_scaled(data.path(), &ns, &[("docker.io", &url)], "") else {
        return;
    };
    let want = digest_of("docker", "library/alpine:3.19");
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    // The commit follows the last byte the client got.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let gets = docker.requests("GET", "library/alpine/blobs/");
    let manifest_gets = docker.requests("GET", "library/alpine/manifests/");

    // Drop this namespace's metadata, as a Redis flush would.
    let redis = std::env::var("PIER_TEST_REDIS_URL").unwrap();
    let keys = std::process::Command::new("redis-cli")
        .args(["-u", &redis, "--scan", "--pattern", &format!("{ns}:*")])
        .output()
        .unwrap();
    let keys = String::from_utf8(keys.stdout).unwrap();
    assert!(!keys.trim().is_empty());
    for key in keys.lines() {
        let del = std::process::Command::new("redis-cli")
            .args(["-u", &redis, "del", key])
            .output()
            .unwrap();
        assert!(del.status.success());
    }

    // A replica that starts now (nothing in memory) gets the manifests from
    // upstream again (which link their blobs again); the blobs are found in
    // S3, never downloaded again.
    pier.restart();
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    assert!(docker.requests("GET", "library/alpine/manifests/") > manifest_gets);
    assert_eq!(docker.requests("GET", "library/alpine/blobs/"), gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_rides_out_a_redis_outage_and_reconnects() {
    if !have_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let mut redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let url = docker.url();
    let Some(pier) = Pier::start_scaled_with(
        data.path(),
        &namespace(),
        &[("docker.io", &url)],
        "",
        Some(&redis.url()),
        "",
    ) else {
        return;
    };
    let http = http_for(&pier);
    let ready = || async {
        reqwest::get(format!("{}/readyz", pier.url()))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    let want = digest_of("docker", "library/alpine:3.19");
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let gets = docker.requests("GET", "library/alpine/blobs/");

    // Redis gone: not ready, but pulls still work (manifests from upstream,
    // blobs from S3), and nothing hangs.
    redis.stop();
    assert_eq!(ready().await, 503);
    let started = std::time::Instant::now();
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(docker.requests("GET", "library/alpine/blobs/"), gets);

    // Redis and upstream both gone: a blob by digest still comes from S3.
    docker.stop();
    let layer = biggest_layer_of_alpine();
    let r = fetch(
        &http,
        reqwest::Method::GET,
        &format!("{}/v2/docker.io/library/alpine/blobs/{layer}", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    // A tag still fresh in this replica's memory is answered from there; one
    // it never saw, with nothing to ask: a clear 503, not a hang or a 500.
    let manifest = |tag: &'static str| {
        let http = http.clone();
        let url = format!("{}/v2/docker.io/library/alpine/manifests/{tag}", pier.url());
        async move { fetch(&http, reqwest::Method::GET, &url, &[]).await }
    };
    let r = manifest("3.19").await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(r.headers()["docker-content-digest"], want.as_str());
    let r = manifest("3.20").await;
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(r).await, "UNAVAILABLE");

    // Redis back (empty): Pier reconnects by itself.
    docker.restart();
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ready().await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after Redis came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    assert_eq!(docker.requests("GET", "library/alpine/blobs/"), gets);
}

/// The largest blob of a fixture layout (`library/alpine/3.19`): a layer,
/// since the schema2 conversion keeps layer digests. Its hex and size.
fn biggest_blob(layout: &str) -> (String, u64) {
    let dir = fixtures()
        .join("layouts/docker")
        .join(layout)
        .join("blobs/sha256");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .max_by_key(|(_, size)| *size)
        .unwrap()
}

fn biggest_layer_of_alpine() -> String {
    format!("sha256:{}", biggest_blob("library/alpine/3.19").0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_blobs_can_redirect_to_presigned_bucket_urls() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let url = docker.url();
    let Some(pier) = Pier::start_scaled_with(
        data.path(),
        &namespace(),
        &[("docker.io", &url)],
        "",
        None,
        "presigned_redirect = true\npresigned_expiry = \"2m\"",
    ) else {
        return;
    };
    let want = digest_of("docker", "library/alpine:3.19");
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
    let layer = biggest_layer_of_alpine();
    let blob = format!("{}/v2/docker.io/library/alpine/blobs/{layer}", pier.url());
    let http = http_for(&pier);
    // Wait for the commit that follows the pull.
    let mut r = fetch(&http, reqwest::Method::GET, &blob, &[]).await;
    for _ in 0..20 {
        if r.status() == reqwest::StatusCode::TEMPORARY_REDIRECT {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        r = fetch(&http, reqwest::Method::GET, &blob, &[]).await;
    }
    assert_eq!(r.status(), reqwest::StatusCode::TEMPORARY_REDIRECT);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("X-Amz-Signature="), "{location}");
    // The presigned URL serves the right bytes (the server checks the
    // signature).
    let bytes = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        format!("sha256:{}", common::fake::sha256_hex(&bytes)),
        layer
    );
    // Ranges and HEAD are answered by Pier itself.
    let r = fetch(
        &http,
        reqwest::Method::GET,
        &blob,
        &[("range", "bytes=0-9")],
    )
    .await;
    assert_eq!(r.status(), reqwest::StatusCode::PARTIAL_CONTENT);
    let r = fetch(&http, reqwest::Method::HEAD, &blob, &[]).await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    // And a client following redirects (skopeo) still pulls.
    assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
}

/// A 3 MB blob on a fake upstream that sends its first KiB, then the rest
/// after a pause; and the config of replicas in front of it.
struct SlowBlob {
    fake: common::fake::Fake,
    good: Vec<u8>,
    hex: String,
    /// The blob's URL path on a replica.
    path: String,
    ns: String,
    config: String,
    _data: tempfile::TempDir,
}

impl SlowBlob {
    fn start(pause: std::time::Duration) -> Option<SlowBlob> {
        use common::fake::{Blob, Fake, sha256_hex};
        let fake = Fake::start();
        let good: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let hex = sha256_hex(&good);
        let digest = format!("sha256:{hex}");
        fake.blob(&digest, Blob::Slow(good.clone().into(), pause));
        let ns = namespace();
        let data = tempfile::tempdir().unwrap();
        let config = scaled_config(
            data.path(),
            &ns,
            &[("corp.example", &fake.url())],
            "",
            None,
            "",
        )?;
        Some(SlowBlob {
            fake,
            good,
            hex,
            path: format!("/v2/corp.example/team/app/blobs/{digest}"),
            ns,
            config,
            _data: data,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_over_when_the_fetching_one_is_killed() {
    use futures::StreamExt;
    let Some(SlowBlob {
        fake,
        good,
        hex,
        path,
        ns,
        config,
        _data,
    }) = SlowBlob::start(std::time::Duration::from_secs(3))
    else {
        return;
    };
    let config = config.replace("[cluster]\n", "[cluster]\nlease_ttl = \"2s\"\n");
    let mut a = PierProcess::start(&config);
    let b = PierProcess::start(&config);

    // A client starts the blob on A, which takes the lease and streams.
    let http = reqwest::Client::new();
    let r = http.get(format!("{}{path}", a.url())).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    // A dies mid-blob: the client's stream breaks, nothing is under the key.
    a.kill();
    let mut broke = false;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            broke = true;
            break;
        }
    }
    assert!(
        broke,
        "the stream from a killed replica must not end cleanly"
    );
    let key = format!("{ns}/blobs/sha256/{hex}");
    assert!(!s3_has(&key), "a partial object is under {key}");

    // The client retries on B: B waits out A's lease, fetches, verifies.
    let r = http.get(format!("{}{path}", b.url())).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 2);
    assert!(wait_s3_has(&key).await, "B never committed the blob");
}

/// Replicas ask the one fetching a blob with a header that says so. A
/// client sending that header to a replica that is not fetching the blob
/// gets no way around the lease: it is served from the fetch under way on
/// the other replica, and upstream sees one GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_the_peer_header_still_waits_on_the_lease() {
    use futures::StreamExt;
    let Some(SlowBlob {
        fake,
        good,
        path,
        config,
        _data,
        ..
    }) = SlowBlob::start(std::time::Duration::from_secs(2))
    else {
        return;
    };
    let a = PierProcess::start(&config);
    let b = PierProcess::start(&config);
    let http = reqwest::Client::new();

    // A takes the lease and streams the blob's first bytes.
    let r = http.get(format!("{}{path}", a.url())).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let mut from_a = r.bytes_stream();
    let mut got_a = from_a.next().await.unwrap().unwrap().to_vec();
    assert!(!got_a.is_empty());

    // A client on B passes itself off as a peer.
    let r = http
        .get(format!("{}{path}", b.url()))
        .header(pier::mirror::PEER_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), good);
    while let Some(chunk) = from_a.next().await {
        got_a.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got_a, good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_clients_are_served_from_upstream_and_nothing_is_stored() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let url = docker.url();
    let Some(config) = scaled_config(
        data.path(),
        &namespace(),
        &[("docker.io", &url)],
        "",
        None,
        "",
    ) else {
        return;
    };
    // The bucket's endpoint refuses connections.
    let s3 = std::env::var("PIER_TEST_S3_ENDPOINT").unwrap();
    let config = config.replace(&s3, &format!("http://127.0.0.1:{}", free_port()));
    let pier = Pier::start_raw(data.path(), &config);
    let r = reqwest::get(format!("{}/readyz", pier.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let want = digest_of("docker", "library/alpine:3.19");
    let http = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(pull(&pier, "docker.io/library/alpine:3.19").await, want);
        // Until the failed commits give up, a pull would join their
        // flights, verified bytes and all.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while metric(&http, &pier, "pier_blob_fetches_in_flight").await > 0.0 {
            assert!(std::time::Instant::now() < deadline, "fetches never ended");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    // Nothing could be kept, so the second pull went upstream again.
    let blobs = docker.requests("GET", "library/alpine/blobs/");
    assert!(blobs >= 4, "{}", docker.log());
    // And no spool file is left behind once the failed commits give up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let spool: Vec<_> = std::fs::read_dir(data.path().join("spool"))
            .unwrap()
            .collect();
        if spool.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{spool:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_their_local_copies_without_the_bucket() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = namespace();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let local = |dir: &std::path::Path| {
        format!(
            "local_cache_path = \"{}\"\nlocal_cache_size = \"1GiB\"",
            dir.join("cache").display()
        )
    };
    let Some(a) = Pier::start_scaled_with(da.path(), &ns, &ups, "", None, &local(da.path())) else {
        return;
    };
    let b = Pier::start_scaled_with(db.path(), &ns, &ups, "", None, &local(db.path())).unwrap();
    let want = digest_of("docker", "library/big:latest");

    // A fetches (config and two layers, one of 64 MiB) and keeps the
    // verified spool files; B reads them from the bucket and copies them
    // while its client streams.
    assert_eq!(pull(&a, "docker.io/library/big:latest").await, want);
    let in_a = wait_files(&da.path().join("cache/blobs"), 3);
    assert_eq!(in_a.len(), 3, "{in_a:?}");
    let gets = docker.requests("GET", "library/big/blobs/");
    assert_eq!(gets, 3, "{}", docker.log());
    for hex in &in_a {
        let key = format!("{ns}/blobs/sha256/{hex}");
        assert!(wait_s3_has(&key).await, "{key} never stored");
    }
    // Clients of B asking at once for the 64 MiB layer, which only the
    // bucket holds, share one read of it, and every one gets every byte.
    let http = reqwest::Client::new();
    let get_objects = "pier_bucket_requests_total{operation=\"GetObject\"}";
    let reads_before = metric(&http, &b, get_objects).await;
    let (big, size) = biggest_blob("library/big/latest");
    assert!(in_a.contains(&big), "{in_a:?}");
    assert!(size >= 64 << 20, "{size}");
    let url = format!("{}/v2/docker.io/library/big/blobs/sha256:{big}", b.url());
    let bodies = futures::future::join_all((0..6).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let resp = http.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap()
        }
    }))
    .await;
    for body in &bodies {
        assert_eq!(body.len() as u64, size);
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body)),
            big
        );
    }
    assert_eq!(metric(&http, &b, get_objects).await - reads_before, 1.0);
    assert_eq!(
        metric(
            &http,
            &b,
            "pier_blob_bytes_served_total{source=\"cache\",origin=\"bucket\"}"
        )
        .await,
        (6 * size) as f64
    );

    assert_eq!(pull(&b, "docker.io/library/big:latest").await, want);
    let in_b = wait_files(&db.path().join("cache/blobs"), 3);
    assert_eq!(in_b, in_a);
    assert!(files_under(&db.path().join("cache/tmp")).is_empty());

    // With the bucket emptied, both still serve every byte, and upstream
    // hears nothing more.
    for hex in &in_a {
        s3_delete(&format!("{ns}/blobs/sha256/{hex}"));
    }
    assert_eq!(pull(&a, "docker.io/library/big:latest").await, want);
    assert_eq!(pull(&b, "docker.io/library/big:latest").await, want);
    assert_eq!(docker.requests("GET", "library/big/blobs/"), gets);

    let hits = metric(&http, &b, "pier_local_copies_total{outcome=\"hit\"}").await;
    assert!(hits >= 3.0, "{hits}");
    // Local copies go out with sendfile, like the fs store's blobs.
    let zero_copy = metric(&http, &b, "pier_blob_bytes_zero_copy_total").await;
    assert!(zero_copy >= (64 << 20) as f64, "{zero_copy}");
    assert!(metric(&http, &b, "pier_local_copy_bytes").await > 0.0);
}

/// One replica on the shared bucket and Redis, under a fresh namespace,
/// in front of `docker`, with `extra` appended to its config.
fn replica_of(docker: &Upstream, extra: &str) -> Option<(Pier, String, tempfile::TempDir)> {
    let ns = namespace();
    let data = tempfile::tempdir().unwrap();
    let url = docker.url();
    let config = scaled_config(data.path(), &ns, &[("docker.io", &url)], "", None, "")?;
    let pier = Pier::start_raw(data.path(), &format!("{config}{extra}"));
    Some((pier, ns, data))
}

/// `library/big:latest`'s manifest, through `pier`.
async fn big_manifest(http: &reqwest::Client, pier: &Pier) -> serde_json::Value {
    let url = format!("{}/v2/docker.io/library/big/manifests/latest", pier.url());
    let body = fetch(http, reqwest::Method::GET, &url, &[])
        .await
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// A client that took the first chunk of `library/big`'s 64 MiB layer
/// and stopped reading, once upstream has sent all of it (so the fetch is
/// verified).
struct StalledClient {
    resp: reqwest::Response,
    hasher: sha2::Sha256,
    received: u64,
    digest: String,
    size: u64,
}

impl StalledClient {
    async fn start(pier: &Pier, docker: &Upstream) -> StalledClient {
        use sha2::Digest as _;
        let http = reqwest::Client::new();
        let base = format!("{}/v2/docker.io/library/big", pier.url());
        let manifest = big_manifest(&http, pier).await;
        let layer = &manifest["layers"][0];
        let digest = layer["digest"].as_str().unwrap().to_owned();
        let size = layer["size"].as_u64().unwrap();
        assert!(size >= 64 << 20, "{manifest}");
        let mut resp = http
            .get(format!("{base}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut hasher = sha2::Sha256::new();
        let first = resp.chunk().await.unwrap().unwrap();
        hasher.update(&first);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while docker.requests("GET", &format!("library/big/blobs/{digest}")) == 0 {
            assert!(std::time::Instant::now() < deadline, "{}", docker.log());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        StalledClient {
            resp,
            hasher,
            received: first.len() as u64,
            digest,
            size,
        }
    }

    fn key(&self, ns: &str) -> String {
        format!(
            "{ns}/blobs/sha256/{}",
            self.digest.trim_start_matches("sha256:")
        )
    }

    /// Reads the rest and checks every byte.
    async fn finish(mut self) {
        use sha2::Digest as _;
        while let Some(chunk) = self.resp.chunk().await.unwrap() {
            self.hasher.update(&chunk);
            self.received += chunk.len() as u64;
        }
        assert_eq!(self.received, self.size);
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        assert_eq!(got, self.digest);
    }
}

/// A client slower than upstream is still reading a blob when its fetch is
/// verified: the upload to the bucket waits until it has read the last
/// byte, so that the two do not compete for this replica's bandwidth (and,
/// here, the S3 server's CPU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_uploaded_once_its_clients_have_read_it() {
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let Some((pier, ns, _data)) = replica_of(&docker, "") else {
        return;
    };
    let client = StalledClient::start(&pier, &docker).await;
    let key = client.key(&ns);
    // An upload started when upstream finished would be done well within
    // this (about 0.5 s here).
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(!s3_has(&key), "uploaded while its client was still reading");
    client.finish().await;
    assert!(wait_s3_has(&key).await, "{key} never stored");
    assert_eq!(
        docker.requests("GET", "library/big/blobs/"),
        1,
        "{}",
        docker.log()
    );
}

/// Shutdown does not wait for a client that stopped reading before it
/// uploads the blob: the grace period is for storing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_uploads_a_blob_its_client_is_still_reading() {
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let Some((mut pier, ns, _data)) = replica_of(&docker, "[server]\nshutdown_grace = \"5s\"\n")
    else {
        return;
    };
    let client = StalledClient::start(&pier, &docker).await;
    let key = client.key(&ns);
    assert!(!s3_has(&key));
    // The stalled connection keeps the shutdown waiting for the whole grace
    // period; the upload must not wait for it.
    let pier = tokio::task::spawn_blocking(move || {
        pier.stop();
        pier
    })
    .await
    .unwrap();
    assert!(s3_has(&key), "not stored within the grace period");
    drop((client, pier));
}

/// A new image's blobs are looked up in the bucket all together when its
/// manifest comes from upstream, so a cold pull makes no round trip to the
/// bucket per blob it asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pull_looks_its_blobs_up_in_the_bucket_ahead() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let Some((pier, _ns, _data)) = replica_of(&docker, "") else {
        return;
    };
    let want = digest_of("docker", "library/big:latest");
    assert_eq!(pull(&pier, "docker.io/library/big:latest").await, want);
    docker.assert_one_get_per_blob("library/big", 3);
    let http = reqwest::Client::new();
    let sent = |op: &str| format!("pier_bucket_requests_total{{operation=\"{op}\"}}");
    // One lookup per blob (config and two layers), made ahead; no reads.
    assert_eq!(metric(&http, &pier, &sent("HeadObject")).await, 3.0);
    assert_eq!(metric(&http, &pier, &sent("GetObject")).await, 0.0);
}

/// Replicas A and B on a fresh namespace: A fetched the manifest of
/// `library/big` and found its blobs missing from the bucket, then B pulled
/// the image and stored them.
struct StoredSinceTheLook {
    a: Pier,
    _b: Pier,
    blobs: Vec<String>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl StoredSinceTheLook {
    async fn start(docker: &Upstream, redis: Option<&str>) -> Option<StoredSinceTheLook> {
        let ns = namespace();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = docker.url();
        // Answers are trusted for half the lease TTL: the whole test.
        let config = |dir: &std::path::Path| {
            scaled_config(dir, &ns, &[("docker.io", &url)], "", redis, "")
                .map(|c| c.replace("[cluster]\n", "[cluster]\nlease_ttl = \"120s\"\n"))
        };
        let (ca, cb) = (config(da.path())?, config(db.path())?);
        let (a, b) = (
            Pier::start_raw(da.path(), &ca),
            Pier::start_raw(db.path(), &cb),
        );

        let http = reqwest::Client::new();
        let manifest = big_manifest(&http, &a).await;
        let blobs: Vec<String> = std::iter::once(&manifest["config"])
            .chain(manifest["layers"].as_array().unwrap())
            .map(|b| b["digest"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(blobs.len(), 3, "{manifest}");
        let heads = "pier_bucket_requests_total{operation=\"HeadObject\"}";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while metric(&http, &a, heads).await < 3.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "A never looked the blobs up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        let want = digest_of("docker", "library/big:latest");
        assert_eq!(pull(&b, "docker.io/library/big:latest").await, want);
        for digest in &blobs {
            let key = format!("{ns}/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
            assert!(wait_s3_has(&key).await, "{key} never stored");
        }
        Some(StoredSinceTheLook {
            a,
            _b: b,
            blobs,
            _dirs: (da, db),
        })
    }

    /// Every blob through A, checked against its digest.
    async fn read_all_from_a(&self) {
        use sha2::Digest as _;
        let http = reqwest::Client::new();
        for digest in &self.blobs {
            let url = format!("{}/v2/docker.io/library/big/blobs/{digest}", self.a.url());
            let resp = http.get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{digest}");
            let body = resp.bytes().await.unwrap();
            let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
            assert_eq!(&got, digest);
        }
    }
}

/// A replica that found a blob missing a moment ago does not fetch it
/// again when another replica has stored it since: the blob's lease, left
/// to lapse by the replica that stored it, sends it there instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_stored_by_another_replica_since_the_look_is_not_fetched_again() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let Some(setup) = StoredSinceTheLook::start(&docker, None).await else {
        return;
    };
    // A goes for the leases B left (and so to B), not to the bucket or
    // upstream.
    let http = reqwest::Client::new();
    let waits = metric(&http, &setup.a, "pier_lease_waits_total").await;
    setup.read_all_from_a().await;
    docker.assert_one_get_per_blob("library/big", 3);
    assert!(metric(&http, &setup.a, "pier_lease_waits_total").await >= waits + 3.0);
}

/// With Redis gone there is no lease to say that another replica stored
/// the blob since the look: the replica asks the bucket again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_blob_found_missing_ahead_is_looked_up_again() {
    if !have_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let mut redis = RedisServer::start();
    let Some(setup) = StoredSinceTheLook::start(&docker, Some(&redis.url())).await else {
        return;
    };
    redis.stop();
    setup.read_all_from_a().await;
    docker.assert_one_get_per_blob("library/big", 3);
}

/// The lease key of the slow blob, in the shared Redis.
fn lease_key(ns: &str, hex: &str) -> String {
    format!("{ns}:lease:blob:sha256:{hex}")
}

fn redis_cli(args: &[&str]) -> String {
    let url = std::env::var("PIER_TEST_REDIS_URL").unwrap();
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &url])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Redis loses the lease of a fetch under way (a failover): the holder
/// claims it again at its next renewal, so another replica streams from it
/// instead of fetching the blob a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_mid_fetch_is_claimed_again() {
    use futures::StreamExt;
    let Some(SlowBlob {
        fake,
        good,
        hex,
        path,
        ns,
        config,
        _data,
    }) = SlowBlob::start(std::time::Duration::from_secs(4))
    else {
        return;
    };
    let config = config.replace("[cluster]\n", "[cluster]\nlease_ttl = \"1500ms\"\n");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Pier::start_raw(da.path(), &config);
    let b = Pier::start_raw(db.path(), &config);
    let http = reqwest::Client::new();
    let r = http.get(format!("{}{path}", a.url())).send().await.unwrap();
    let mut from_a = r.bytes_stream();
    let mut got_a = from_a.next().await.unwrap().unwrap().to_vec();

    assert_eq!(redis_cli(&["DEL", &lease_key(&ns, &hex)]), "1");
    // A renews every half second: by now it has the lease again.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!redis_cli(&["GET", &lease_key(&ns, &hex)]).is_empty());

    let r = http.get(format!("{}{path}", b.url())).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert!(r.bytes().await.unwrap() == good);
    while let Some(chunk) = from_a.next().await {
        got_a.extend_from_slice(&chunk.unwrap());
    }
    assert!(got_a == good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
}

/// A replica that cannot stream from the holder waits as long as the holder
/// keeps renewing, however long the fetch takes (here past 8 lease TTLs),
/// without asking the bucket over and over, and is served from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_replica_outlasts_a_long_fetch_without_polling_the_bucket() {
    use futures::StreamExt;
    let Some(SlowBlob {
        fake,
        good,
        path,
        config,
        _data,
        ..
    }) = SlowBlob::start(std::time::Duration::from_secs(10))
    else {
        return;
    };
    let config = config
        .replace("advertise_url = \"{advertise}\"\n", "")
        .replace("[cluster]\n", "[cluster]\nlease_ttl = \"1s\"\n");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Pier::start_raw(da.path(), &config);
    let b = Pier::start_raw(db.path(), &config);
    let http = reqwest::Client::new();
    let r = http.get(format!("{}{path}", a.url())).send().await.unwrap();
    let mut from_a = r.bytes_stream();
    let mut got_a = from_a.next().await.unwrap().unwrap().to_vec();

    let url_b = format!("{}{path}", b.url());
    let on_b = tokio::spawn(async move {
        let r = reqwest::get(url_b).await.unwrap();
        (r.status(), r.bytes().await.unwrap())
    });
    while let Some(chunk) = from_a.next().await {
        got_a.extend_from_slice(&chunk.unwrap());
    }
    assert!(got_a == good);
    let (status, body) = on_b.await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK);
    assert!(body == good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
    let heads = metric(
        &reqwest::Client::new(),
        &b,
        "pier_bucket_requests_total{operation=\"HeadObject\"}",
    )
    .await;
    // Two looks of its own, and one every 2 s while waiting (against one
    // every 250 ms before).
    assert!(
        heads <= 8.0,
        "B asked the bucket {heads} times while waiting"
    );
}

/// With Redis down, replicas fetch without a lease (pulls go on), and say
/// so in a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_without_a_lease_is_counted() {
    use common::fake::{Blob, Fake, digest, random_bytes};
    if !have_tools(&["redis-server"]) {
        return;
    }
    let mut redis = RedisServer::start();
    let fake = Fake::start();
    let bytes = random_bytes(20_000, 1);
    fake.blob(&digest(&bytes), Blob::Good(bytes.clone()));
    let data = tempfile::tempdir().unwrap();
    let Some(pier) = Pier::start_scaled_with(
        data.path(),
        &namespace(),
        &[("corp.example", &fake.url())],
        "",
        Some(&redis.url()),
        "",
    ) else {
        return;
    };
    redis.stop();
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v2/corp.example/team/app/blobs/{}",
        pier.url(),
        digest(&bytes)
    );
    let r = http.get(url).send().await.unwrap();
    assert!(r.bytes().await.unwrap() == bytes);
    let unguarded = "pier_blob_fetches_unguarded_total{reason=\"metadata_error\"}";
    assert_eq!(metric(&http, &pier, unguarded).await, 1.0);
}

/// Begins a multipart upload of `key` and leaves it open, as a replica
/// killed mid-upload does.
async fn leave_upload(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) {
    let out = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    assert!(out.upload_id().is_some());
}

/// The ids of the open multipart uploads of `key`.
async fn open_uploads(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<String> {
    let out = s3
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .filter_map(|u| u.upload_id().map(str::to_owned))
        .collect()
}

/// A replica killed mid-upload leaves its multipart upload open. A replica
/// (here one with a local cache in front of the bucket) aborts it when it
/// starts, once it is older than `abandoned_upload_age`, and leaves a
/// younger one, which may be another replica's upload in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_replica_aborts_abandoned_uploads() {
    let ns = namespace();
    let data = tempfile::tempdir().unwrap();
    let storage = format!(
        "abandoned_upload_age = \"5s\"\nlocal_cache_path = \"{}\"\nlocal_cache_size = \"1MiB\"",
        data.path().join("cache").display()
    );
    // No upstream is asked for anything.
    let upstreams = [("docker.io", "http://127.0.0.1:9")];
    let Some(config) = scaled_config(data.path(), &ns, &upstreams, "", None, &storage) else {
        return;
    };
    let (s3, bucket) = bucket_client();
    let [stale, young] = ["a", "b"].map(|c| format!("{ns}/blobs/sha256/{}", c.repeat(64)));
    leave_upload(&s3, &bucket, &stale).await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    leave_upload(&s3, &bucket, &young).await;

    let pier = Pier::start_raw(data.path(), &config);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while !open_uploads(&s3, &bucket, &stale).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned upload is still open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The sweep goes on to the young upload after the stale one: give it
    // time to get it wrong.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let young_ids = open_uploads(&s3, &bucket, &young).await;
    assert_eq!(young_ids.len(), 1, "the young upload was aborted");
    let http = reqwest::Client::new();
    assert!(metric(&http, &pier, "pier_abandoned_uploads_aborted_total").await >= 1.0);

    for id in young_ids {
        s3.abort_multipart_upload()
            .bucket(&bucket)
            .key(&young)
            .upload_id(id)
            .send()
            .await
            .unwrap();
    }
}

/// A replica asked for a blob under a repository upstream does not have it
/// in, while another replica fetches it for a repository that does: the
/// client gets `404` at once, not after asking the other replica (and
/// upstream, through it) again and again until its fetch ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_another_replica_fetches_for_another_repository_is_not_polled_for() {
    use common::fake::{Blob, Fake, digest, random_bytes};
    use futures::StreamExt;
    let fake = Fake::start();
    let bytes = random_bytes(2_000_000, 5);
    let d = digest(&bytes);
    fake.blob_in(
        "team/app",
        &d,
        Blob::Slow(bytes.clone(), std::time::Duration::from_secs(4)),
    );
    let ns = namespace();
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
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Pier::start_raw(da.path(), &config);
    let b = Pier::start_raw(db.path(), &config);
    let http = reqwest::Client::new();
    let blob =
        |pier: &Pier, repo: &str| format!("{}/v2/corp.example/team/{repo}/blobs/{d}", pier.url());
    let r = http.get(blob(&a, "app")).send().await.unwrap();
    let mut from_a = r.bytes_stream();
    let mut got = from_a.next().await.unwrap().unwrap().to_vec();

    let started = std::time::Instant::now();
    let r = http.get(blob(&b, "other")).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let asked = format!("/v2/team/other/blobs/{d}");
    assert!(fake.count("HEAD", &asked) + fake.count("GET", &asked) <= 2);

    while let Some(chunk) = from_a.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == bytes);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 1);
}

/// Someone overwrites a blob's object in the bucket: no client gets those
/// bytes complete, the object is removed, and the next request fetches the
/// blob again and gets it right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_bucket_object_is_never_served_complete() {
    use common::fake::{Blob, Fake, digest, random_bytes, sha256_hex};
    let fake = Fake::start();
    let bytes = random_bytes(1_500_000, 9);
    let d = digest(&bytes);
    fake.blob(&d, Blob::Good(bytes.clone()));
    let ns = namespace();
    let data = tempfile::tempdir().unwrap();
    let Some(pier) = Pier::start_scaled(data.path(), &ns, &[("corp.example", &fake.url())], "")
    else {
        return;
    };
    let http = reqwest::Client::new();
    let url = format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url());
    assert!(http.get(&url).send().await.unwrap().bytes().await.unwrap() == bytes);
    let key = format!("{ns}/blobs/sha256/{}", sha256_hex(&bytes));
    assert!(wait_s3_has(&key).await);

    for (round, wrong) in [random_bytes(1_500_000, 10), random_bytes(700_000, 11)]
        .into_iter()
        .enumerate()
    {
        s3_put(&key, &wrong);
        // The body breaks off (or the response never starts).
        if let Ok(r) = http.get(&url).send().await
            && let Ok(got) = r.bytes().await
        {
            assert!(got.len() < wrong.len(), "round {round}: a complete body");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s3_has(&key) {
            assert!(std::time::Instant::now() < deadline, "the object stayed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Fetched again at once: the finished lease of the first fetch
        // does not hold it up.
        let started = std::time::Instant::now();
        let r = http.get(&url).send().await.unwrap();
        assert!(r.bytes().await.unwrap() == bytes);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), round + 2);
        assert!(wait_s3_has(&key).await);
    }
}

/// A bucket read that breaks off mid-way (a bucket under load drops long
/// reads) is picked up where it broke with a ranged read: the client gets
/// the whole blob, checked, instead of a body cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_read_that_breaks_off_is_resumed() {
    use sha2::Digest as _;
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = namespace();
    let d = tempfile::tempdir().unwrap();
    let url = docker.url();
    let Some(config) = scaled_config(d.path(), &ns, &[("docker.io", &url)], "", None, "") else {
        return;
    };
    let (hex, _) = biggest_blob("library/big/latest");
    let s3 = std::env::var("PIER_TEST_S3_ENDPOINT").unwrap();
    let link = CutLink::start(&s3, &hex, 1 << 20);
    let pier = Pier::start_raw(d.path(), &config.replace(&s3, &link.url()));
    let blob = format!("{}/v2/docker.io/library/big/blobs/sha256:{hex}", pier.url());
    let http = reqwest::Client::new();
    let get = async || {
        let resp = http.get(&blob).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.unwrap();
        hex::encode(sha2::Sha256::digest(&body))
    };
    // Cold: fetched, then stored in the bucket through the relay.
    assert_eq!(get().await, hex);
    assert!(wait_s3_has(&format!("{ns}/blobs/sha256/{hex}")).await);
    // Warm: read from the bucket, broken off after 1 MiB, resumed.
    assert_eq!(get().await, hex);
    let heads = link.heads.lock().unwrap().clone();
    let reads: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("GET ") && h.contains(&hex))
        .collect();
    assert_eq!(reads.len(), 2, "one read, then its resumption: {reads:#?}");
    assert!(
        reads[1].to_ascii_lowercase().contains("range: bytes="),
        "{reads:#?}"
    );
    assert_eq!(docker.requests("GET", "library/big/blobs/sha256:"), 1);
}
