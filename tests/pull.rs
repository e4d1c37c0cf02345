#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Real pulls with skopeo through every naming mode, against real upstream
//! registries standing in for docker.io, registry.k8s.io and gcr.io.

mod common;

use common::*;

struct Setup {
    docker: Upstream,
    k8s: Upstream,
    gcr: Upstream,
    pier: Pier,
    _data: tempfile::TempDir,
}

fn setup(extra: &str) -> Option<Setup> {
    if !have_tools(&["docker-registry", "skopeo", "curl"]) {
        return None;
    }
    let docker = Upstream::start("docker");
    let k8s = Upstream::start("k8s");
    let gcr = Upstream::start("gcr");
    let (pier, data) = Pier::start(
        &[
            ("docker.io", &docker.url()),
            ("registry.k8s.io", &k8s.url()),
            ("gcr.io", &gcr.url()),
        ],
        extra,
    );
    Some(Setup {
        docker,
        k8s,
        gcr,
        pier,
        _data: data,
    })
}

async fn pull_digest(src: &str, extra: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(src, out.path(), extra).await;
    assert!(run.ok, "skopeo copy {src} failed:\n{}", run.stderr);
    manifest_digest_in(out.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_prefix_pulls_match_upstream_digests() {
    let Some(s) = setup("") else { return };
    let h = s.pier.host();
    // Docker schema2, single arch.
    assert_eq!(
        pull_digest(&format!("{h}/docker.io/library/alpine:3.19"), &[]).await,
        digest_of("docker", "library/alpine:3.19")
    );
    // OCI multi-arch index, copied whole.
    assert_eq!(
        pull_digest(&format!("{h}/docker.io/library/nginx:latest"), &["--all"]).await,
        digest_of("docker", "library/nginx:latest")
    );
    // One architecture out of the index.
    let arm = pull_digest(
        &format!("{h}/docker.io/library/nginx:latest"),
        &["--override-arch", "arm64"],
    )
    .await;
    let index = reqwest::get(format!(
        "{}/v2/docker.io/library/nginx/manifests/latest",
        s.pier.url()
    ))
    .await
    .unwrap();
    let _ = index;
    let expected_arm = child_digest(&s.docker, "library/nginx", "latest", "arm64").await;
    assert_eq!(arm, expected_arm);
    // The same name on another upstream is another image.
    assert_eq!(
        pull_digest(&format!("{h}/registry.k8s.io/library/nginx:latest"), &[]).await,
        digest_of("k8s", "library/nginx:latest")
    );
    assert_eq!(
        pull_digest(&format!("{h}/gcr.io/kube-apiserver:v1.28.0"), &[]).await,
        digest_of("gcr", "kube-apiserver:v1.28.0")
    );
    // index.docker.io is docker.io.
    assert_eq!(
        pull_digest(&format!("{h}/index.docker.io/bitnami/nginx:latest"), &[]).await,
        digest_of("docker", "bitnami/nginx:latest")
    );
    let _ = (&s.k8s, &s.gcr);
}

/// The digest of the `arch` manifest inside an upstream index.
async fn child_digest(up: &Upstream, repo: &str, tag: &str, arch: &str) -> String {
    let c = reqwest::Client::new();
    let r = fetch(
        &c,
        reqwest::Method::GET,
        &format!("{}/v2/{repo}/manifests/{tag}", up.url()),
        &[],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_names_follow_the_routes() {
    let Some(s) = setup("") else { return };
    let h = s.pier.host();
    for (name, template, image) in [
        ("nginx:latest", "docker", "library/nginx:latest"),
        ("bitnami/nginx:latest", "docker", "bitnami/nginx:latest"),
        ("kube-apiserver:v1.28.0", "k8s", "kube-apiserver:v1.28.0"),
        (
            "distroless/static-debian11:latest",
            "gcr",
            "distroless/static-debian11:latest",
        ),
    ] {
        let extra: &[&str] = if name.starts_with("nginx") {
            &["--all"]
        } else {
            &[]
        };
        assert_eq!(
            pull_digest(&format!("{h}/{name}"), extra).await,
            digest_of(template, image),
            "{name}"
        );
    }
    // pause is a multi-arch index on registry.k8s.io, not docker.io's.
    assert_eq!(
        pull_digest(&format!("{h}/pause:3.9"), &["--all"]).await,
        digest_of("k8s", "pause:3.9")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_prefix_pulls() {
    let Some(s) = setup("") else { return };
    if !hosts_resolve() {
        return;
    }
    let p = s.pier.port();
    assert_eq!(
        pull_digest(&format!("docker.{DOMAIN}:{p}/library/alpine:3.19"), &[]).await,
        digest_of("docker", "library/alpine:3.19")
    );
    assert_eq!(
        pull_digest(&format!("k8s.{DOMAIN}:{p}/kube-apiserver:v1.28.0"), &[]).await,
        digest_of("k8s", "kube-apiserver:v1.28.0")
    );
    assert_eq!(
        pull_digest(
            &format!("gcr.{DOMAIN}:{p}/distroless/static-debian11:latest"),
            &[]
        )
        .await,
        digest_of("gcr", "distroless/static-debian11:latest")
    );
    // The bare domain behaves like any other host: add-a-prefix works.
    assert_eq!(
        pull_digest(
            &format!("{DOMAIN}:{p}/gcr.io/distroless/static-debian11:latest"),
            &[]
        )
        .await,
        digest_of("gcr", "distroless/static-debian11:latest")
    );
}

fn hosts_resolve() -> bool {
    use std::net::ToSocketAddrs;
    let ok = ["docker", "k8s", "gcr"]
        .iter()
        .all(|h| format!("{h}.{DOMAIN}:80").to_socket_addrs().is_ok());
    if !ok {
        let msg = format!("*.{DOMAIN} does not resolve: tests/run.sh adds it to /etc/hosts");
        if std::env::var("PIER_TEST_STRICT").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_cold_pulls_fetch_each_blob_once_and_warm_pulls_none() {
    let Some(s) = setup("") else { return };
    let src = format!("{}/docker.io/library/big:latest", s.pier.host());
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let src = src.clone();
        tasks.push(tokio::spawn(async move { pull_digest(&src, &[]).await }));
    }
    let want = digest_of("docker", "library/big:latest");
    for t in tasks {
        assert_eq!(t.await.unwrap(), want);
    }
    s.docker.assert_one_get_per_blob("library/big", 3);

    let before = s.docker.requests("GET", "library/big/blobs/");
    assert_eq!(pull_digest(&src, &[]).await, want);
    assert_eq!(s.docker.requests("GET", "library/big/blobs/"), before);
    assert_eq!(s.docker.requests("HEAD", "library/big/blobs/"), 0);
}
