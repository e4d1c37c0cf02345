#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The pull API over HTTP against a real upstream: Range, tags pagination,
//! catalog, referrers, HEAD, write refusal, open-proxy refusal, bad input.

mod common;

use common::*;
use reqwest::{Method, StatusCode};

struct Setup {
    docker: Upstream,
    pier: Pier,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

fn setup() -> Option<Setup> {
    if !have_tools(&["docker-registry", "curl"]) {
        return None;
    }
    let docker = Upstream::start("docker");
    let (pier, data) = Pier::start(&[("docker.io", &docker.url())], "");
    let http = http_for(&pier);
    Some(Setup {
        docker,
        pier,
        http,
        _data: data,
    })
}

/// The first layer of an image's manifest on the upstream: (digest, size).
async fn first_layer(s: &Setup, repo: &str, tag: &str) -> (String, u64) {
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/v2/{repo}/manifests/{tag}", s.docker.url()),
        &[],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let layer = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64())
        .unwrap()
        .clone();
    (
        layer["digest"].as_str().unwrap().to_owned(),
        layer["size"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_and_manifest_headers() {
    let Some(s) = setup() else { return };
    let r = fetch(&s.http, Method::GET, &format!("{}/v2/", s.pier.url()), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.text().await.unwrap(), "{}");

    // Manifests are served byte for byte with upstream's type and digest.
    for (repo, tag) in [("library/alpine", "3.19"), ("library/nginx", "latest")] {
        let up = fetch(
            &s.http,
            Method::GET,
            &format!("{}/v2/{repo}/manifests/{tag}", s.docker.url()),
            &[],
        )
        .await;
        let up_type = up.headers()["content-type"].clone();
        let up_bytes = up.bytes().await.unwrap();
        for method in [Method::HEAD, Method::GET] {
            let r = fetch(
                &s.http,
                method.clone(),
                &format!("{}/v2/docker.io/{repo}/manifests/{tag}", s.pier.url()),
                &[],
            )
            .await;
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], up_type);
            assert_eq!(
                r.headers()["docker-content-digest"],
                digest_of("docker", &format!("{repo}:{tag}")).as_str()
            );
            assert_eq!(
                r.headers()["content-length"],
                up_bytes.len().to_string().as_str()
            );
            let body = r.bytes().await.unwrap();
            if method == Method::GET {
                assert_eq!(body, up_bytes);
            } else {
                assert!(body.is_empty());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_header_per_line_is_honoured() {
    let Some(s) = setup() else { return };
    let url = format!(
        "{}/v2/docker.io/library/nginx/manifests/latest",
        s.pier.url()
    );
    // podman style: one Accept line per type, the index type on a later line.
    let r = s
        .http
        .get(&url)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A client that cannot take an index is told so, not given one.
    let r = s
        .http
        .get(&url)
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_ranges_cold_and_warm() {
    let Some(s) = setup() else { return };
    let (digest, size) = first_layer(&s, "library/big", "latest").await;
    let url = format!("{}/v2/docker.io/library/big/blobs/{digest}", s.pier.url());
    let upstream_url = format!("{}/v2/library/big/blobs/{digest}", s.docker.url());
    let whole = s
        .http
        .get(&upstream_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(whole.len() as u64, size);

    // HEAD on a cold blob asks upstream.
    let r = fetch(&s.http, Method::HEAD, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], size.to_string().as_str());
    assert_eq!(s.docker.requests("HEAD", "library/big/blobs/"), 1);

    // A cold Range request (containerd resuming) is served from the fetch.
    let start = size - 1000;
    let r = fetch(
        &s.http,
        Method::GET,
        &url,
        &[("range", &format!("bytes={start}-"))],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {start}-{}/{size}", size - 1).as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), whole.slice(start as usize..));

    // Warm: whole, a middle range, a suffix, and out of range.
    let r = fetch(&s.http, Method::GET, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), whole);
    let r = fetch(&s.http, Method::GET, &url, &[("range", "bytes=10-99")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 10-99/{size}").as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), whole.slice(10..100));
    let r = fetch(&s.http, Method::GET, &url, &[("range", "bytes=-5")]).await;
    assert_eq!(r.bytes().await.unwrap(), whole.slice(whole.len() - 5..));
    let r = fetch(
        &s.http,
        Method::GET,
        &url,
        &[("range", &format!("bytes={size}-"))],
    )
    .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let r = fetch(&s.http, Method::GET, &url, &[("range", "bytes=oops")]).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    // One upstream GET by Pier in all.
    assert_eq!(s.docker.requests("GET", "library/big/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_paginate_and_links_keep_the_naming_mode() {
    let Some(s) = setup() else { return };
    let base = s.pier.url();
    let mut seen = Vec::new();
    let mut next = Some("/v2/docker.io/library/alpine/tags/list?n=2".to_owned());
    while let Some(path) = next {
        let r = fetch(&s.http, Method::GET, &format!("{base}{path}"), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(
                l.starts_with("</v2/docker.io/library/alpine/tags/list?"),
                "{l}"
            );
            l.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_owned()
        });
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["name"], "docker.io/library/alpine");
        let page: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page);
    }
    assert_eq!(seen, ["3.15", "3.16", "3.17", "3.18", "3.19"]);

    // containerd-style: the ns parameter survives into the Link.
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/library/alpine/tags/list?n=4&ns=docker.io"),
        &[],
    )
    .await;
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert!(
        link.contains("/v2/library/alpine/tags/list?") && link.contains("ns=docker.io"),
        "{link}"
    );
    // A huge n is capped, not an error; a non-number is.
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/docker.io/library/alpine/tags/list?n=99999999999"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/docker.io/library/alpine/tags/list?n=x"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "PAGINATION_NUMBER_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_cached_repositories() {
    let Some(s) = setup() else { return };
    let base = s.pier.url();
    for repo in ["library/alpine", "bitnami/nginx", "library/pause"] {
        let tag = if repo.ends_with("alpine") {
            "3.19"
        } else if repo.ends_with("pause") {
            "3.9"
        } else {
            "latest"
        };
        let r = fetch(
            &s.http,
            Method::GET,
            &format!("{base}/v2/docker.io/{repo}/manifests/{tag}"),
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/_catalog?n=2"),
        &[],
    )
    .await;
    assert_eq!(
        r.headers()["link"],
        "</v2/_catalog?n=2&last=docker.io%2Flibrary%2Falpine>; rel=\"next\""
    );
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["docker.io/bitnami/nginx", "docker.io/library/alpine"])
    );
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/_catalog?n=2&last=docker.io%2Flibrary%2Falpine"),
        &[],
    )
    .await;
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["docker.io/library/pause"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_fall_back_to_an_empty_index() {
    let Some(s) = setup() else { return };
    let d = digest_of("docker", "library/alpine:3.19");
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/v2/docker.io/library/alpine/referrers/{d}", s.pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
    assert_eq!(v["schemaVersion"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused() {
    let Some(s) = setup() else { return };
    let base = s.pier.url();
    for (method, path) in [
        (Method::PUT, "/v2/docker.io/library/alpine/manifests/3.19"),
        (
            Method::DELETE,
            "/v2/docker.io/library/alpine/manifests/3.19",
        ),
        (Method::POST, "/v2/docker.io/library/alpine/blobs/uploads/"),
        (
            Method::PATCH,
            "/v2/docker.io/library/alpine/blobs/uploads/abc",
        ),
        (
            Method::GET,
            "/v2/docker.io/library/alpine/blobs/uploads/abc",
        ),
        (
            Method::DELETE,
            "/v2/docker.io/library/alpine/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ] {
        let r = fetch(&s.http, method.clone(), &format!("{base}{path}"), &[]).await;
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(error_code(r).await, "UNSUPPORTED", "{method} {path}");
    }
    assert_eq!(s.docker.log(), "", "nothing reached upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_is_not_an_open_proxy() {
    let Some(s) = setup() else { return };
    let base = s.pier.url();
    let p = s.pier.port();
    let cases = [
        format!("{base}/v2/evil.example.com/x/manifests/latest"),
        format!("{base}/v2/127.0.0.1:1/x/manifests/latest"),
        format!("{base}/v2/localhost/x/manifests/latest"),
        format!("{base}/v2/library/nginx/manifests/latest?ns=evil.example.com"),
        format!("{base}/v2/library/nginx/manifests/latest?ns=registry.k8s.io"),
        format!("http://evil.{DOMAIN}:{p}/v2/x/manifests/latest"),
        format!("http://k8s.{DOMAIN}:{p}/v2/library/nginx/manifests/latest?ns=docker.io"),
    ];
    for url in &cases {
        let r = fetch(&s.http, Method::GET, url, &[]).await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
            "{url}: {status} {body}"
        );
        assert!(body.contains("\"errors\""), "{url}: {body}");
    }
    assert_eq!(s.docker.log(), "", "nothing reached upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_digests_get_oci_errors() {
    let Some(s) = setup() else { return };
    let base = s.pier.url();
    for (path, status, code) in [
        (
            "/v2/docker.io/library/alpine/manifests/sha256:totallywrong",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/docker.io/library/alpine/blobs/sha256:totallywrong",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/docker.io/library/alpine/blobs/md5:abc",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/docker.io/library/alpine/blobs/latest",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/docker.io/Library/Alpine/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/docker.io/library/%2e%2e/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/docker.io/library%2falpine/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/docker.io/library/alpine/manifests/.bad",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/docker.io/library/alpine/manifests/nope",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/docker.io/library/nope/manifests/latest",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/docker.io/library/nope/tags/list", 404, "NAME_UNKNOWN"),
        (
            "/v2/docker.io/library/alpine/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            404,
            "BLOB_UNKNOWN",
        ),
        ("/v2/docker.io/library/alpine/other/x", 404, "NAME_UNKNOWN"),
        ("/nothing", 404, "NAME_UNKNOWN"),
    ] {
        let r = fetch(&s.http, Method::GET, &format!("{base}{path}"), &[]).await;
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert_eq!(error_code(r).await, code, "{path}");
    }
    let long = format!("{base}/v2/docker.io/{}/manifests/latest", "a".repeat(300));
    let r = fetch(&s.http, Method::GET, &long, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "NAME_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_only_served_under_a_repository_that_has_it() {
    let Some(s) = setup() else { return };
    let (digest, _) = first_layer(&s, "library/big", "latest").await;
    let base = s.pier.url();
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/docker.io/library/big/blobs/{digest}"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    // Cached now, but library/pause does not contain it upstream.
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/docker.io/library/pause/blobs/{digest}"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = fetch(
        &s.http,
        Method::HEAD,
        &format!("{base}/v2/docker.io/library/pause/blobs/{digest}"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let Some(s) = setup() else { return };
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/healthz", s.pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/readyz", s.pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_cache_outcomes_and_upstream_calls() {
    let Some(s) = setup() else { return };
    let (digest, size) = first_layer(&s, "library/big", "latest").await;
    let url = format!("{}/v2/docker.io/library/big/blobs/{digest}", s.pier.url());
    for _ in 0..2 {
        let r = fetch(&s.http, Method::GET, &url, &[]).await;
        assert_eq!(r.bytes().await.unwrap().len() as u64, size);
        // The second GET is a hit once the first committed.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let tag = format!(
        "{}/v2/docker.io/library/alpine/manifests/3.19",
        s.pier.url()
    );
    fetch(&s.http, Method::GET, &tag, &[])
        .await
        .bytes()
        .await
        .unwrap();
    fetch(&s.http, Method::GET, &tag, &[])
        .await
        .bytes()
        .await
        .unwrap();

    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/metrics", s.pier.url()),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    };
    assert_eq!(
        value("pier_cache_lookups_total{kind=\"blob\",outcome=\"miss\"}"),
        1.0
    );
    assert_eq!(
        value("pier_cache_lookups_total{kind=\"blob\",outcome=\"hit\"}"),
        1.0
    );
    assert_eq!(
        value("pier_cache_lookups_total{kind=\"manifest\",outcome=\"miss\"}"),
        1.0
    );
    assert_eq!(
        value("pier_cache_lookups_total{kind=\"manifest\",outcome=\"hit\"}"),
        1.0
    );
    // The fs store's blobs are files here; the cold one came from upstream.
    assert_eq!(
        value("pier_blob_bytes_served_total{source=\"cache\",origin=\"local\"}"),
        size as f64
    );
    assert_eq!(
        value("pier_blob_bytes_served_total{source=\"upstream\",origin=\"upstream\"}"),
        size as f64
    );
    assert_eq!(
        value("pier_http_requests_total{endpoint=\"blob\",method=\"GET\",status=\"200\"}"),
        2.0
    );
    assert!(value("pier_upstream_requests_total{registry=\"docker.io\",status=\"200\"}") >= 2.0);
    assert_eq!(value("pier_blob_fetches_in_flight"), 0.0);
    assert!(text.contains("pier_upstream_request_seconds_bucket{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_images_get_denied_with_the_operators_message() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let (pier, _data) = Pier::start(
        &[("docker.io", &docker.url())],
        "[access]\nallow = [\"docker.io/library/**\"]\ndeny = [\"docker.io/library/alpine\"]\n\
         denied_message = \"ask for it at https://wiki.example/mirror\"\n",
    );
    let http = http_for(&pier);
    for path in [
        "/v2/docker.io/library/alpine/manifests/3.19",
        "/v2/docker.io/bitnami/nginx/manifests/latest",
        "/v2/docker.io/library/alpine/tags/list",
    ] {
        let r = fetch(&http, Method::GET, &format!("{}{path}", pier.url()), &[]).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains("\"DENIED\""), "{body}");
        assert!(body.contains("https://wiki.example/mirror"), "{body}");
    }
    assert_eq!(docker.log(), "", "nothing denied reached upstream");
    // A real client sees the message too; allowed images still pull.
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(&format!("{}/alpine:3.19", pier.host()), out.path(), &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("wiki.example"), "{}", run.stderr);
    let run = skopeo_copy(
        &format!("{}/library/pause:3.9", pier.host()),
        out.path(),
        &[],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
}
