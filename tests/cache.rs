#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Caching rules against a real upstream: tag TTL and revalidation, stale
//! serving when upstream is down or hangs, and persistence across restarts.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};

fn ready() -> bool {
    have_tools(&["docker-registry", "skopeo", "curl"])
}

async fn manifest_digest(http: &reqwest::Client, url: &str) -> (StatusCode, String) {
    let r = fetch(http, Method::GET, url, &[]).await;
    let status = r.status();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    r.bytes().await.unwrap();
    (status, digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_after_their_ttl_and_follow_a_retag() {
    if !ready() {
        return;
    }
    let docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_with(
        data.path(),
        &[("docker.io", &docker.url())],
        "",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let url = format!("{}/v2/docker.io/library/alpine/manifests/3.19", pier.url());
    let first = digest_of("docker", "library/alpine:3.19");

    assert_eq!(
        manifest_digest(&http, &url).await,
        (StatusCode::OK, first.clone())
    );
    assert_eq!(docker.requests("GET", "library/alpine/manifests/3.19"), 1);
    // Within the TTL: no upstream request at all.
    assert_eq!(manifest_digest(&http, &url).await.1, first);
    assert_eq!(docker.requests("GET", "library/alpine/manifests/"), 1);
    assert_eq!(docker.requests("HEAD", "library/alpine/manifests/"), 0);

    // After it: one HEAD, no new GET while the digest is unchanged.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(manifest_digest(&http, &url).await.1, first);
    assert_eq!(docker.requests("HEAD", "library/alpine/manifests/3.19"), 1);
    assert_eq!(docker.requests("GET", "library/alpine/manifests/"), 1);

    // Retag upstream: 3.19 now holds 3.18's image (pushed as OCI).
    docker.push_layout("docker/library/alpine/3.18", "library/alpine:3.19");
    let direct = reqwest::Client::new();
    let (_, moved) = manifest_digest(
        &direct,
        &format!("{}/v2/library/alpine/manifests/3.19", docker.url()),
    )
    .await;
    assert_ne!(moved, first);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        manifest_digest(&http, &url).await,
        (StatusCode::OK, moved.clone())
    );
    assert_eq!(docker.requests("HEAD", "library/alpine/manifests/3.19"), 2);
    assert_eq!(docker.requests("GET", "library/alpine/manifests/3.19"), 2);
    // The old image stays reachable by digest.
    let by_digest = format!(
        "{}/v2/docker.io/library/alpine/manifests/{first}",
        pier.url()
    );
    assert_eq!(
        manifest_digest(&http, &by_digest).await,
        (StatusCode::OK, first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_is_served_stale_while_upstream_is_down() {
    if !ready() {
        return;
    }
    let mut docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_with(
        data.path(),
        &[("docker.io", &docker.url())],
        "",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let src = format!("{}/docker.io/library/alpine:3.19", pier.host());
    let want = digest_of("docker", "library/alpine:3.19");
    let out = tempfile::tempdir().unwrap();
    assert!(skopeo_copy(&src, out.path(), &[]).await.ok);

    docker.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let url = format!("{}/v2/docker.io/library/alpine/manifests/3.19", pier.url());
    let r = fetch(&http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["docker-content-digest"], want.as_str());
    assert!(r.headers().contains_key("warning"));

    // A whole pull still works from cache.
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(&src, out.path(), &[]).await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(manifest_digest_in(out.path()), want);

    // Something never cached gets a clear error naming the upstream.
    let r = fetch(
        &http,
        Method::GET,
        &format!("{}/v2/docker.io/library/alpine/manifests/3.18", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("UNAVAILABLE") && body.contains("docker.io"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pier_serves_its_cache_with_upstream_unreachable() {
    if !ready() {
        return;
    }
    let mut docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let mut pier = Pier::start_in(data.path(), &[("docker.io", &docker.url())], "");
    let want = digest_of("docker", "library/nginx:latest");
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/library/nginx:latest", pier.host()),
        out.path(),
        &["--all"],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    // Every blob skopeo wrote (all but manifests and `version`) is stored.
    let blobs = std::fs::read_dir(out.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().into_string().unwrap();
            !name.contains("manifest") && name != "version"
        })
        .count();
    let stored = pier.wait_stored(blobs);
    assert_eq!(stored.len(), blobs);

    docker.stop();
    pier.restart();
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/library/nginx:latest", pier.host()),
        out.path(),
        &["--all"],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(manifest_digest_in(out.path()), want);
    assert_eq!(pier.stored_blobs(), stored);
    // Nothing was left half-written in the spool.
    let spool: Vec<_> = std::fs::read_dir(data.path().join("tmp"))
        .unwrap()
        .collect();
    assert!(spool.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_hangs_times_out_to_the_stale_copy() {
    if !ready() {
        return;
    }
    let docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let mut pier = Pier::start_with(
        data.path(),
        &[("docker.io", &docker.url())],
        "",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    let url =
        |p: &Pier, tag: &str| format!("{}/v2/docker.io/library/alpine/manifests/{tag}", p.url());
    assert_eq!(
        manifest_digest(&http, &url(&pier, "3.19")).await.0,
        StatusCode::OK
    );
    pier.stop();

    // An endpoint that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    let pier = Pier::start_with(
        data.path(),
        &[("docker.io", &hole_url)],
        "[timeouts]\nresponse = \"500ms\"\n",
        "tag_ttl = \"1s\"",
    );
    let http = http_for(&pier);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Eight clients at once wait out one timeout between them, not eight in
    // a row.
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (http, u) = (http.clone(), url(&pier, "3.19"));
        clients.push(tokio::spawn(
            async move { manifest_digest(&http, &u).await },
        ));
    }
    for c in clients {
        let (status, digest) = c.await.unwrap();
        assert_eq!(
            (status, digest),
            (StatusCode::OK, digest_of("docker", "library/alpine:3.19"))
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let r = fetch(&http, Method::GET, &url(&pier, "3.18"), &[]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = r.text().await.unwrap();
    assert!(body.contains("no response within"), "{body}");
    // Bounded by the configured timeouts, not by the client giving up.
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(hole);
}
