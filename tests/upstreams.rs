#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The upstream client against real and scripted registries: Basic
//! credentials, failover across endpoints, retries on 5xx.

mod common;

use common::fake::{Blob, Fake, sha256_hex};
use common::*;
use reqwest::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_from_config_reach_the_upstream() {
    if !have_tools(&["docker-registry", "skopeo", "htpasswd"]) {
        return;
    }
    let docker = Upstream::start_with_basic_auth("docker", "puller", "s3cret pass");
    let want = digest_of("docker", "library/alpine:3.19");

    // Without credentials the upstream refuses, and the client is told so.
    let (anon, _d1) = Pier::start(&[("docker.io", &docker.url())], "");
    let r = fetch(
        &http_for(&anon),
        Method::GET,
        &format!("{}/v2/docker.io/library/alpine/manifests/3.19", anon.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("401"));

    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_with(
        data.path(),
        &[("docker.io", &docker.url())],
        "",
        "username = \"puller\"\npassword = \"s3cret pass\"",
    );
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/library/alpine:3.19", pier.host()),
        out.path(),
        &[],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(manifest_digest_in(out.path()), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_the_upstreams_realm_are_fetched_and_reused() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let (docker, tokens) = Upstream::start_with_token_auth("docker");
    // The upstream really demands a token.
    let r = reqwest::get(format!("{}/v2/library/alpine/manifests/3.19", docker.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let (pier, _data) = Pier::start(&[("docker.io", &docker.url())], "");
    for _ in 0..2 {
        let out = tempfile::tempdir().unwrap();
        let run = skopeo_copy(
            &format!("{}/docker.io/library/alpine:3.19", pier.host()),
            out.path(),
            &[],
        )
        .await;
        assert!(run.ok, "{}", run.stderr);
        assert_eq!(
            manifest_digest_in(out.path()),
            digest_of("docker", "library/alpine:3.19")
        );
    }
    // One token for the repository, reused for every request until expiry;
    // anonymous, as no credentials are configured.
    let asked = tokens.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].contains("scope=repository%3Alibrary%2Falpine%3Apull"),
        "{asked:?}"
    );
    assert!(asked[0].ends_with("auth=no"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_fails_over_to_the_next() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\nbuiltin_upstreams = false\n\
         [storage]\npath = \"{}\"\n\
         [[upstreams]]\nregistry = \"docker.io\"\nendpoints = [\"{dead}\", \"{}\"]\n",
        data.path().display(),
        docker.url()
    );
    let pier = Pier::start_raw(data.path(), &config);
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/library/alpine:3.19", pier.host()),
        out.path(),
        &[],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        manifest_digest_in(out.path()),
        digest_of("docker", "library/alpine:3.19")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_backoff() {
    let fake = Fake::start();
    let good: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let d = format!("sha256:{}", sha256_hex(&good));
    fake.blob(&d, Blob::FailFirst(2, good.clone().into()));
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], "");
    let r = fetch(
        &http_for(&pier),
        Method::GET,
        &format!("{}/v2/corp.example/team/app/blobs/{d}", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), good);
    assert_eq!(fake.count("GET", "/v2/team/app/blobs/"), 3);

    // A blob that keeps failing ends in a clear 503 after the retries.
    let d2 = format!("sha256:{}", sha256_hex(b"never"));
    fake.blob(
        &d2,
        Blob::FailFirst(100, bytes::Bytes::from_static(b"never")),
    );
    let r = fetch(
        &http_for(&pier),
        Method::GET,
        &format!("{}/v2/corp.example/team/app/blobs/{d2}", pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("corp.example") && body.contains("503"),
        "{body}"
    );
}
