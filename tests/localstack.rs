#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Pier with the developer setup in `localstack/`: LocalStack's S3 (started
//! natively by `tests/localstack.sh`, which sets
//! `PIER_TEST_LOCALSTACK_ENDPOINT`), a bucket made by
//! `localstack/init-bucket.sh`, and a config derived from
//! `localstack/pier.toml`. Blobs really land in the bucket, whole, and a
//! second Pier with no metadata of its own serves them from there.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// LocalStack's endpoint, or None (after saying why) when it is not running;
/// panics instead under `PIER_TEST_STRICT=1`.
fn localstack_endpoint() -> Option<String> {
    match std::env::var("PIER_TEST_LOCALSTACK_ENDPOINT") {
        Ok(v) if !v.is_empty() => Some(v.trim_end_matches('/').to_owned()),
        _ => {
            let msg = "PIER_TEST_LOCALSTACK_ENDPOINT is not set: run tests/run.sh \
                       (tests/localstack.sh starts LocalStack)";
            if std::env::var("PIER_TEST_STRICT").is_ok_and(|v| v == "1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// `localstack/pier.toml` as a table, checked to be what the README says.
fn example_config() -> toml::Table {
    let text = std::fs::read_to_string(repo_root().join("localstack/pier.toml")).unwrap();
    let cfg: toml::Table = text.parse().unwrap();
    let storage = cfg["storage"].as_table().unwrap();
    for (key, want) in [
        ("kind", "s3"),
        ("bucket", "pier"),
        ("endpoint", "http://127.0.0.1:4566"),
        ("region", "us-east-1"),
        ("access_key_id", "test"),
        ("secret_access_key", "test"),
    ] {
        assert_eq!(storage[key].as_str(), Some(want), "storage.{key}");
    }
    assert_eq!(cfg["metadata"]["kind"].as_str(), Some("embedded"));
    cfg
}

/// The example config with this test's bucket, endpoint and directories,
/// and `docker.io` at `upstream` as the only upstream.
fn config_for(endpoint: &str, bucket: &str, data: &Path, upstream: &str) -> String {
    let mut cfg = example_config();
    cfg.insert("listen".into(), "127.0.0.1:0".into());
    cfg.insert("builtin_upstreams".into(), false.into());
    let storage = cfg.get_mut("storage").unwrap().as_table_mut().unwrap();
    storage.insert("bucket".into(), bucket.into());
    storage.insert("endpoint".into(), endpoint.into());
    let spool = data.join("spool");
    storage.insert("spool_path".into(), spool.display().to_string().into());
    let metadata = cfg.get_mut("metadata").unwrap().as_table_mut().unwrap();
    metadata.insert(
        "path".into(),
        data.join("meta").display().to_string().into(),
    );
    let mut docker = toml::Table::new();
    docker.insert("registry".into(), "docker.io".into());
    docker.insert("endpoints".into(), vec![upstream.to_owned()].into());
    cfg.insert("upstreams".into(), vec![toml::Value::Table(docker)].into());
    toml::to_string(&cfg).unwrap()
}

/// A signed GET of `key` in `bucket` into `dest`: true when it is there,
/// false on 404 (anything else fails the test).
fn s3_get(endpoint: &str, bucket: &str, key: &str, dest: &Path) -> bool {
    let out = Command::new("curl")
        .args(["-s", "-o"])
        .arg(dest)
        .args(["-w", "%{http_code}", "--max-time", "60"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test"])
        .arg(format!("{endpoint}/{bucket}/{key}"))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code == "200" || code == "404", "S3 GET {key}: {code}");
    code == "200"
}

fn sha256_of(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Pulls `image` through `pier` with skopeo into `out`; returns the
/// manifest digest.
async fn pull(pier: &Pier, image: &str, out: &Path) -> String {
    let run = skopeo_copy(&format!("{}/{image}", pier.host()), out, &[]).await;
    assert!(run.ok, "{image}: {}", run.stderr);
    manifest_digest_in(out)
}

/// The blobs (config and layers) skopeo wrote into a `dir:` copy, by hex
/// digest, with their sizes.
fn blobs_in(dir: &Path) -> Vec<(String, u64)> {
    let mut blobs: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().into_string().unwrap();
            (name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| (name, e.metadata().unwrap().len()))
        })
        .collect();
    blobs.sort();
    blobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_land_in_localstack_and_a_second_pier_serves_them_from_there() {
    let Some(endpoint) = localstack_endpoint() else {
        return;
    };
    if !have_tools(&["docker-registry", "skopeo", "curl", "sha256sum"]) {
        return;
    }
    // A bucket of its own, made by the script the README names (twice: it
    // is idempotent).
    let bucket = format!("pier-test-{:016x}", rand::random::<u64>());
    for _ in 0..2 {
        let out = Command::new("bash")
            .arg(repo_root().join("localstack/init-bucket.sh"))
            .args([&bucket, &endpoint])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init-bucket.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let mut first = Pier::start_raw(
        data.path(),
        &config_for(&endpoint, &bucket, data.path(), &docker.url()),
    );

    // big: a 64 MiB layer, a multipart upload once it is verified.
    let images = ["library/big:latest", "library/alpine:3.19"];
    let mut blobs = Vec::new();
    for image in images {
        let out = tempfile::tempdir().unwrap();
        let digest = pull(&first, &format!("docker.io/{image}"), out.path()).await;
        assert_eq!(digest, digest_of("docker", image), "{image}");
        let image_blobs = blobs_in(out.path());
        assert!(!image_blobs.is_empty(), "{image}: no blobs in the copy");
        blobs.extend(image_blobs);
    }
    assert!(
        blobs.iter().any(|(_, size)| *size >= 64 << 20),
        "no 64 MiB layer: {blobs:?}"
    );
    let blob_gets = || {
        docker.requests("GET", "library/big/blobs/")
            + docker.requests("GET", "library/alpine/blobs/")
    };
    let gets = blob_gets();
    assert!(gets >= blobs.len(), "{}", docker.log());
    let manifest_gets = docker.requests("GET", "library/big/manifests/");

    // Every blob is in the bucket, whole: a blob is committed just after
    // its last byte went to the client, so give the last ones a moment.
    let scratch = tempfile::tempdir().unwrap();
    for (hex, size) in &blobs {
        let file = scratch.path().join(hex);
        let key = format!("blobs/sha256/{hex}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s3_get(&endpoint, &bucket, &key, &file) {
            assert!(Instant::now() < deadline, "{key} never reached {bucket}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(std::fs::metadata(&file).unwrap().len(), *size, "{key}");
        assert_eq!(&sha256_of(&file), hex, "{key}");
    }
    first.stop();

    // A second Pier: fresh embedded metadata, same bucket. Manifests come
    // from upstream again; no blob does.
    let data2 = tempfile::tempdir().unwrap();
    let second = Pier::start_raw(
        data2.path(),
        &config_for(&endpoint, &bucket, data2.path(), &docker.url()),
    );
    for image in images {
        let out = tempfile::tempdir().unwrap();
        let digest = pull(&second, &format!("docker.io/{image}"), out.path()).await;
        assert_eq!(
            digest,
            digest_of("docker", image),
            "{image} via the second Pier"
        );
    }
    assert!(docker.requests("GET", "library/big/manifests/") > manifest_gets);
    assert_eq!(blob_gets(), gets, "{}", docker.log());
}
