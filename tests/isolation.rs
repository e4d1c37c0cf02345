#![allow(clippy::unwrap_used, clippy::expect_used)]

//! No repository reads another's cached content. A digest is not a secret:
//! any manifest may name one (an OCI 1.1 `subject` may name a digest in any
//! repository), so Pier serves a digest under a repository only when
//! upstream proved it is there: by accepting a manifest that is made of it,
//! or by answering for it under that repository. Failing metadata and
//! upstream do not open that door either.

mod common;

use common::fake::{Blob, Fake, digest, random_bytes};
use common::*;
use reqwest::{Method, StatusCode};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn url(pier: &Pier, repo: &str, what: &str) -> String {
    format!("{}/v2/corp.example/team/{repo}/{what}", pier.url())
}

/// An image manifest of `layer` that names `subject` as its subject.
fn manifest_with_subject(layer: &str, subject: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":1}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":1}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_does_not_open_another_repositorys_content() {
    let fake = Fake::start();
    let secret = random_bytes(50_000, 1);
    let secret_d = digest(&secret);
    fake.blob_in("team/private", &secret_d, Blob::Good(secret.clone()));
    let private_manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"digest":"{secret_d}","size":50000}},"layers":[]}}"#
    );
    let private_md = digest(private_manifest.as_bytes());
    fake.manifest(
        "team/private",
        &private_md,
        OCI_MANIFEST,
        private_manifest.as_bytes(),
    );
    // A public artifact whose subject is the private blob, another whose
    // subject is the private manifest.
    let config = b"{}";
    fake.blob_in(
        "team/public",
        &digest(config),
        Blob::Good(config[..].into()),
    );
    let m1 = manifest_with_subject(&digest(config), &secret_d);
    let m2 = manifest_with_subject(&digest(config), &private_md);
    fake.manifest("team/public", "blob-subject", OCI_MANIFEST, m1.as_bytes());
    fake.manifest(
        "team/public",
        "manifest-subject",
        OCI_MANIFEST,
        m2.as_bytes(),
    );
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], "");
    let http = http_for(&pier);

    // Cached through the private repository.
    let get = |u: String| {
        let http = http.clone();
        async move { fetch(&http, Method::GET, &u, &[]).await }
    };
    let r = get(url(&pier, "private", &format!("blobs/{secret_d}"))).await;
    assert!(r.bytes().await.unwrap() == secret);
    let r = get(url(&pier, "private", &format!("manifests/{private_md}"))).await;
    assert_eq!(r.status(), StatusCode::OK);
    for tag in ["blob-subject", "manifest-subject"] {
        let r = get(url(&pier, "public", &format!("manifests/{tag}"))).await;
        assert_eq!(r.status(), StatusCode::OK, "{tag}");
    }

    // Upstream has neither under the public repository.
    let r = get(url(&pier, "public", &format!("blobs/{secret_d}"))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = fetch(
        &http,
        Method::HEAD,
        &url(&pier, "public", &format!("blobs/{secret_d}")),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = get(url(&pier, "public", &format!("manifests/{private_md}"))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Upstream was asked, under the public repository.
    assert!(fake.count("HEAD", &format!("/v2/team/public/blobs/{secret_d}")) >= 1);
    let asked = format!("/v2/team/public/manifests/{private_md}");
    assert!(fake.count("HEAD", &asked) + fake.count("GET", &asked) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_upstream_confirms_is_served_and_remembered() {
    let fake = Fake::start();
    let shared = random_bytes(40_000, 2);
    let d = digest(&shared);
    // Upstream has the blob in both repositories.
    fake.blob(&d, Blob::Good(shared.clone()));
    let config = b"{}";
    fake.blob(&digest(config), Blob::Good(config[..].into()));
    let m = manifest_with_subject(&digest(config), &d);
    fake.manifest("team/public", "sig", OCI_MANIFEST, m.as_bytes());
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], "");
    let http = http_for(&pier);
    let r = fetch(
        &http,
        Method::GET,
        &url(&pier, "private", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert!(r.bytes().await.unwrap() == shared);
    let r = fetch(
        &http,
        Method::GET,
        &url(&pier, "public", "manifests/sig"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..2 {
        let r = fetch(
            &http,
            Method::GET,
            &url(&pier, "public", &format!("blobs/{d}")),
            &[],
        )
        .await;
        assert!(r.bytes().await.unwrap() == shared);
    }
    // One confirmation, then the link is remembered; one upstream GET in all.
    assert_eq!(fake.count("HEAD", &format!("/v2/team/public/blobs/{d}")), 1);
    assert_eq!(fake.count("GET", "/v2/team/public/blobs/"), 0);
    assert_eq!(fake.count("GET", "/v2/team/private/blobs/"), 1);
}

/// With Redis and upstream both down, a stored blob is served only under a
/// repository this process knows holds it, and HEAD answers as GET does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metadata_and_upstream_down_only_known_links_are_served() {
    if !have_tools(&["redis-server"]) {
        return;
    }
    let mut redis = RedisServer::start();
    let fake = Fake::start();
    let bytes = random_bytes(30_000, 3);
    let d = digest(&bytes);
    fake.blob(&d, Blob::Good(bytes.clone()));
    let extra = format!(
        "[metadata]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"300ms\"\n",
        redis.url()
    );
    let (pier, _data) = Pier::start(&[("corp.example", &fake.url())], &extra);
    let http = http_for(&pier);
    let r = fetch(
        &http,
        Method::GET,
        &url(&pier, "owner", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert!(r.bytes().await.unwrap() == bytes);
    pier.wait_stored(1);

    redis.stop();
    // Upstream failing (a dropped fake would still answer on the
    // connection Pier keeps open).
    fake.blob(&d, Blob::FailFirst(usize::MAX, bytes.clone()));

    let r = fetch(
        &http,
        Method::GET,
        &url(&pier, "other", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    let r = fetch(
        &http,
        Method::HEAD,
        &url(&pier, "other", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert!(r.status().is_server_error(), "{}", r.status());

    let r = fetch(
        &http,
        Method::GET,
        &url(&pier, "owner", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert!(r.bytes().await.unwrap() == bytes);
    let r = fetch(
        &http,
        Method::HEAD,
        &url(&pier, "owner", &format!("blobs/{d}")),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
}
