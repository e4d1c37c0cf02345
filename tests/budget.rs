#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The fs store within `[cache] max_size`, with real pulls: images adding
//! up to three times the budget pass through, the bytes on disk stay within
//! it, the latest image is still served with upstream stopped, and an
//! evicted image pulls again, one upstream GET per blob at most.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Bytes of the blobs under the store.
fn stored_bytes(data: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let m = e.metadata().unwrap();
                        if m.is_dir() { walk(&e.path()) } else { m.len() }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&data.join("blobs"))
}

async fn pull(pier: &Pier, image: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(&format!("{}/{image}", pier.host()), out.path(), &[]).await;
    assert!(run.ok, "{image}: {}", run.stderr);
    manifest_digest_in(out.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_of_three_times_the_budget_keep_the_store_within_it() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    // Six images of two 2.5 MB layers: 30 MB against a 10 MiB budget.
    let images: Vec<(String, String)> = (0..6)
        .map(|i| {
            let name = format!("budget/img{i}:v1");
            let digest = push_generated(&docker, work.path(), &name, 2_500_000);
            (name, digest)
        })
        .collect();
    let budget = 10 << 20;
    let (pier, data) = Pier::start(
        &[("docker.io", &docker.url())],
        "[cache]\nmax_size = \"10MiB\"\n",
    );
    for (name, digest) in &images {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
        // Eviction follows the commit within moments.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stored_bytes(data.path()) > budget {
            assert!(
                Instant::now() < deadline,
                "{} bytes stored",
                stored_bytes(data.path())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = reqwest::Client::new();
    assert!(metric(&http, &pier, "pier_cache_evicted_bytes_total").await >= 15e6);
    assert_eq!(
        metric(&http, &pier, "pier_cache_bytes").await as u64,
        stored_bytes(data.path())
    );
    // The metadata of what went goes too: the first images leave the
    // catalog, the latest stays.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = http
            .get(format!("{}/v2/_catalog", pier.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let catalog: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let repos = catalog["repositories"].as_array().unwrap().clone();
        let has = |r: &str| repos.iter().any(|v| v == r);
        assert!(has("docker.io/budget/img5"), "{repos:?}");
        if !has("docker.io/budget/img0") {
            break;
        }
        assert!(Instant::now() < deadline, "{repos:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The latest image is whole in the cache.
    docker.stop();
    let (last, last_digest) = images.last().unwrap();
    assert_eq!(
        &pull(&pier, &format!("docker.io/{last}")).await,
        last_digest
    );

    // The first was evicted: it pulls again, each blob fetched once.
    docker.restart();
    let (first, first_digest) = &images[0];
    let repo = first.split(':').next().unwrap();
    let before = docker.requests("GET", &format!("{repo}/blobs/"));
    assert_eq!(
        &pull(&pier, &format!("docker.io/{first}")).await,
        first_digest
    );
    let fetched = docker.requests("GET", &format!("{repo}/blobs/")) - before;
    assert!(
        (1..=3).contains(&fetched),
        "{fetched} blob GETs for three blobs"
    );
}

/// A size-limited tmpfs, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let msg = "cannot mount a tmpfs (tests/run.sh runs as root)";
            assert!(
                std::env::var("PIER_TEST_STRICT").as_deref() != Ok("1"),
                "{msg}"
            );
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// On a small disk, `min_free` keeps its share free: pulls adding up to
/// more than the disk go through, and the least recently served blobs make
/// room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_free_keeps_a_small_disk_from_filling() {
    if !have_tools(&["docker-registry", "skopeo", "python3", "mount"]) {
        return;
    }
    let Some(disk) = SmallDisk::mount("48m") else {
        return;
    };
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    // Six images of two 4 MB layers: 48 MB through a 48 MiB disk that
    // keeps half of itself free.
    let images: Vec<(String, String)> = (0..6)
        .map(|i| {
            let name = format!("free/img{i}:v1");
            let digest = push_generated(&docker, work.path(), &name, 4_000_000);
            (name, digest)
        })
        .collect();
    let pier = Pier::start_in(
        disk.dir.path(),
        &[("docker.io", &docker.url())],
        "[cache]\nmin_free = \"50%\"\n",
    );
    for (name, digest) in &images {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
        let deadline = Instant::now() + Duration::from_secs(5);
        while disk.free() < 24 << 20 {
            assert!(Instant::now() < deadline, "{} bytes free", disk.free());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = reqwest::Client::new();
    let evicted = "pier_cache_evictions_total{reason=\"free\"}";
    assert!(metric(&http, &pier, evicted).await > 0.0);
    // The latest image is still whole.
    let (last, last_digest) = images.last().unwrap();
    assert_eq!(
        &pull(&pier, &format!("docker.io/{last}")).await,
        last_digest
    );
    drop(pier);
}

/// A blob larger than the disk Pier caches on still pulls: it is passed
/// straight through from upstream, verified, and nothing is left behind;
/// what fits is cached as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_larger_than_the_disk_still_pulls() {
    if !have_tools(&["docker-registry", "skopeo", "python3", "mount"]) {
        return;
    }
    let Some(disk) = SmallDisk::mount("32m") else {
        return;
    };
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let huge_digest = push_image(
        &docker,
        work.path(),
        "huge/img:v1",
        &["--layers", "1", "--big-mib", "40"],
    );
    let small_digest = push_generated(&docker, work.path(), "small/img:v1", 100_000);
    let pier = Pier::start_in(
        disk.dir.path(),
        &[("docker.io", &docker.url())],
        "[cache]\nmin_free = 0\n",
    );
    for _ in 0..2 {
        assert_eq!(pull(&pier, "docker.io/huge/img:v1").await, huge_digest);
    }
    assert!(stored_bytes(disk.dir.path()) < 1 << 20);
    assert!(files_under(&disk.dir.path().join("tmp")).is_empty());
    let http = reqwest::Client::new();
    let passed = "pier_cache_lookups_total{kind=\"blob\",outcome=\"passthrough\"}";
    assert!(metric(&http, &pier, passed).await >= 2.0);
    let ready = http
        .get(format!("{}/readyz", pier.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    assert_eq!(pull(&pier, "docker.io/small/img:v1").await, small_digest);
    drop(pier);
}

/// A pinned image survives a budget that evicts everything else around it,
/// and is served whole with upstream stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_image_survives_the_budget() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let pinned_digest = push_generated(&docker, work.path(), "keep/base:v1", 2_500_000);
    let others: Vec<(String, String)> = (0..4)
        .map(|i| {
            let name = format!("churn/img{i}:v1");
            let digest = push_generated(&docker, work.path(), &name, 2_500_000);
            (name, digest)
        })
        .collect();
    let (pier, data) = Pier::start(
        &[("docker.io", &docker.url())],
        "[cache]\nmax_size = \"8MiB\"\npinned = [\"docker.io/keep/*\"]\n",
    );
    assert_eq!(pull(&pier, "docker.io/keep/base:v1").await, pinned_digest);
    for (name, digest) in &others {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_bytes(data.path()) > 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "{} bytes stored",
            stored_bytes(data.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Least recently served, yet kept: it pulls with upstream stopped.
    docker.stop();
    assert_eq!(pull(&pier, "docker.io/keep/base:v1").await, pinned_digest);
    let (first, _) = &others[0];
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/{first}", pier.host()),
        out.path(),
        &[],
    )
    .await;
    assert!(!run.ok, "an evicted, unpinned image needs upstream");
}

/// Churn: clients loop over images each bigger than a third of the budget,
/// so eviction runs under their feet; every pull completes with the right
/// digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_under_constant_eviction_all_complete() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let images: Vec<(String, String)> = (0..4)
        .map(|i| {
            let name = format!("churn/img{i}:v1");
            let digest = push_generated(&docker, work.path(), &name, 2_000_000);
            (name, digest)
        })
        .collect();
    // Each image is about 4 MB against a 10 MiB budget.
    let (pier, data) = Pier::start(
        &[("docker.io", &docker.url())],
        "[cache]\nmax_size = \"10MiB\"\n",
    );
    let pier = std::sync::Arc::new(pier);
    let until = Instant::now() + Duration::from_secs(15);
    let mut clients = Vec::new();
    for client in 0..3usize {
        let (pier, images) = (pier.clone(), images.clone());
        clients.push(tokio::spawn(async move {
            let mut pulls = 0;
            while Instant::now() < until {
                let (name, digest) = &images[(client + pulls) % images.len()];
                assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
                pulls += 1;
            }
            pulls
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total >= 6, "{total} pulls");
    let http = reqwest::Client::new();
    assert!(metric(&http, &pier, "pier_cache_evicted_bytes_total").await > 0.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_bytes(data.path()) > 10 << 20 {
        assert!(
            Instant::now() < deadline,
            "{} bytes stored",
            stored_bytes(data.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Six images of two `layer_size` layers pushed as `<prefix>/img<i>:v1`.
fn six_images(
    docker: &Upstream,
    dir: &Path,
    prefix: &str,
    layer_size: usize,
) -> Vec<(String, String)> {
    (0..6)
        .map(|i| {
            let name = format!("{prefix}/img{i}:v1");
            let digest = push_generated(docker, dir, &name, layer_size);
            (name, digest)
        })
        .collect()
}

/// Waits (up to `secs`) until the bucket holds at most `budget` bytes under
/// `ns`; what it holds then.
async fn bucket_within(ns: &str, budget: u64, secs: u64) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let usage = bucket_usage(ns).await;
        if usage.1 <= budget {
            return usage;
        }
        assert!(Instant::now() < deadline, "bucket holds {usage:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the shared test Redis has `key`.
fn redis_has(key: &str) -> bool {
    let url = std::env::var("PIER_TEST_REDIS_URL").unwrap();
    let out = Command::new("redis-cli")
        .args(["-u", &url, "EXISTS", key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

const BUCKET_BUDGET: &str = "[cache]\nmax_size = \"10MiB\"\n";

/// Two replicas on a real bucket and Redis, with a budget: pulls through
/// both, adding up to three times it, leave the bucket within it; the
/// replicas evict one pass at a time (every blob that left the bucket was
/// counted by exactly one of them); pulls on both keep working meanwhile;
/// the latest image is served with upstream stopped, and an evicted one
/// pulls again with one upstream GET per blob across both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_keep_the_bucket_within_its_budget() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    // 30 MB: three times the budget.
    let images = six_images(&docker, work.path(), "bucket", 2_500_000);
    let ns = format!("budget{:x}", rand::random::<u64>());
    let ups = [("docker.io", docker.url())];
    let ups: Vec<(&str, &str)> = ups.iter().map(|(r, u)| (*r, u.as_str())).collect();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(a) = Pier::start_scaled_with(da.path(), &ns, &ups, "", None, BUCKET_BUDGET) else {
        return;
    };
    let b = Pier::start_scaled_with(db.path(), &ns, &ups, "", None, BUCKET_BUDGET).unwrap();
    let replicas = [&a, &b];
    for (i, (name, digest)) in images.iter().enumerate() {
        let (here, there) = (replicas[i % 2], replicas[(i + 1) % 2]);
        // Pulls through the other replica while eviction runs.
        if i > 0 {
            let (prev, prev_digest) = &images[i - 1];
            assert_eq!(
                &pull(there, &format!("docker.io/{prev}")).await,
                prev_digest
            );
        }
        assert_eq!(&pull(here, &format!("docker.io/{name}")).await, digest);
    }
    let budget = 10 << 20;
    bucket_within(&ns, budget, 30).await;

    // Each blob fetched from upstream was stored once; every one that left
    // the bucket was evicted once, not once per replica. (Both replicas run
    // in this process: their counters are one.) The bucket is within its
    // budget before the pass that got it there has finished (it goes on
    // down to 90 %), so the two are compared once that pass has counted.
    let fetched = docker
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/bucket/") && l.contains("/blobs/"))
        .count();
    let http = reqwest::Client::new();
    let evicted = "pier_cache_evictions_total{reason=\"size\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let evictions = loop {
        let left = bucket_usage(&ns).await.0;
        let evictions = metric(&http, &a, evicted).await as usize;
        if evictions == fetched - left {
            break evictions;
        }
        assert!(
            Instant::now() < deadline,
            "{evictions} evictions, but {fetched} blobs fetched and {left} left"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(evictions >= 9, "{evictions} evictions");
    // Both replicas see the cluster's usage.
    for pier in replicas {
        let gauge = metric(&http, pier, "pier_cache_bytes").await as u64;
        assert!(gauge <= budget, "pier_cache_bytes {gauge}");
    }

    docker.stop();
    let (last, last_digest) = images.last().unwrap();
    for pier in replicas {
        assert_eq!(&pull(pier, &format!("docker.io/{last}")).await, last_digest);
    }
    docker.restart();
    let (first, first_digest) = &images[0];
    let repo = first.split(':').next().unwrap();
    // Its metadata went with its blobs: no tag record, manifest or
    // repository is left in Redis for it.
    let keys = [
        format!("{ns}:t:docker.io/{repo}:v1"),
        format!("{ns}:m:{first_digest}"),
        format!("{ns}:l:docker.io/{repo}"),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    while keys.iter().any(|k| redis_has(k)) {
        assert!(Instant::now() < deadline, "{keys:?} still in Redis");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = docker.requests("GET", &format!("{repo}/blobs/"));
    let first = format!("docker.io/{first}");
    let (x, y) = tokio::join!(pull(&a, &first), pull(&b, &first));
    assert_eq!((&x, &y), (first_digest, first_digest));
    let again = docker.requests("GET", &format!("{repo}/blobs/")) - before;
    assert_eq!(again, 3, "one GET per blob (two layers and the config)");
}

/// After Redis is flushed, the blobs in the bucket are still counted and
/// still evicted (oldest stored first): no metadata needs to know them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_in_the_bucket_still_count_after_redis_is_flushed() {
    if !have_tools(&["docker-registry", "skopeo", "python3", "redis-server"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    // Two images (8.8 MB) fit in 90 % of the budget, three do not.
    let images = six_images(&docker, work.path(), "flushed", 2_200_000);
    let redis = RedisServer::start();
    let ns = format!("flushed{:x}", rand::random::<u64>());
    let data = tempfile::tempdir().unwrap();
    let Some(pier) = Pier::start_scaled_with(
        data.path(),
        &ns,
        &[("docker.io", &docker.url())],
        "",
        Some(&redis.url()),
        BUCKET_BUDGET,
    ) else {
        return;
    };
    for (name, digest) in &images[..2] {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    // Uploads follow the pull by moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bucket_usage(&ns).await.0 < 6 {
        assert!(Instant::now() < deadline, "{:?}", bucket_usage(&ns).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flushed = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(flushed.status.success());

    // Two more images: with the first two, past the budget, though Redis
    // knows nothing of the first two any more.
    for (name, digest) in &images[2..4] {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    // A pass lists the bucket within a look (30 s) of the flush: the two
    // images Redis forgot are the oldest, and go.
    let (left, _) = bucket_within(&ns, 10 << 20, 50).await;
    assert!(left <= 7, "{left} blobs left of 12");
    // The newest are whole: they pull with nothing fetched again.
    let before = docker.requests("GET", "flushed/");
    for (name, digest) in &images[2..4] {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    assert_eq!(docker.requests("GET", "flushed/") - before, 0);
}

/// An S3 replica whose spool and local copies share a small disk keeps
/// `min_free` of it free: the least recently used copies go, pulls adding
/// up to more than the disk all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_replica_keeps_its_small_disk_from_filling() {
    if !have_tools(&["docker-registry", "skopeo", "python3", "mount"]) {
        return;
    }
    let Some(disk) = SmallDisk::mount("64m") else {
        return;
    };
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    // 48 MB of layers through a 64 MiB disk that keeps half of itself free
    // (and room for a spool file beside that).
    let images = six_images(&docker, work.path(), "copies", 4_000_000);
    let ns = format!("copies{:x}", rand::random::<u64>());
    let copies = disk.dir.path().join("copies");
    let storage = format!(
        "local_cache_size = \"1GiB\"\nlocal_cache_path = \"{}\"\n[cache]\nmin_free = \"50%\"\n",
        copies.display()
    );
    let Some(pier) = Pier::start_scaled_with(
        disk.dir.path(),
        &ns,
        &[("docker.io", &docker.url())],
        "",
        None,
        &storage,
    ) else {
        return;
    };
    for (name, digest) in &images {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
        let deadline = Instant::now() + Duration::from_secs(5);
        while disk.free() < 32 << 20 {
            assert!(Instant::now() < deadline, "{} bytes free", disk.free());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = reqwest::Client::new();
    let evicted = "pier_local_copies_total{outcome=\"evicted\"}";
    assert!(metric(&http, &pier, evicted).await > 0.0);
    // Every image is in the bucket: all pull again with nothing fetched.
    let before = docker.requests("GET", "copies/");
    for (name, digest) in &images {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    assert_eq!(docker.requests("GET", "copies/") - before, 0);
    drop(pier);
}

/// A registry's own `max_age`, end to end on a real bucket: one upstream
/// serves as docker.io (the `[cache] max_age` of an hour) and as quay.io
/// (three seconds). An image pulled only through quay.io is removed by
/// `pier gc` once its three seconds pass; one pulled through both stays,
/// kept by docker.io's hour; the removed image pulls again, from upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_registry_keeps_its_images_for_its_own_max_age() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let short = push_generated(&docker, work.path(), "ages/short:v1", 300_000);
    let both = push_generated(&docker, work.path(), "ages/both:v1", 300_000);
    let ns = format!("ages{:x}", rand::random::<u64>());
    let ups = [("docker.io", docker.url()), ("quay.io", docker.url())];
    let ups: Vec<(&str, &str)> = ups.iter().map(|(r, u)| (*r, u.as_str())).collect();
    let data = tempfile::tempdir().unwrap();
    let Some(config) = scaled_config(
        data.path(),
        &ns,
        &ups,
        "",
        None,
        "[cache]\nmax_age = \"1h\"\n",
    ) else {
        return;
    };
    let config = config.replace(
        "registry = \"quay.io\"\n",
        "registry = \"quay.io\"\nmax_age = \"3s\"\n",
    );
    let pier = Pier::start_raw(data.path(), &config);
    assert_eq!(pull(&pier, "quay.io/ages/short:v1").await, short);
    assert_eq!(pull(&pier, "quay.io/ages/both:v1").await, both);
    assert_eq!(pull(&pier, "docker.io/ages/both:v1").await, both);
    let (blobs, _) = bucket_usage(&ns).await;
    assert_eq!(blobs, 6, "two layers and a config each");

    // Past quay.io's age, and past one write of the uses.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let file = data.path().join("gc.toml");
    std::fs::write(&file, config.replace("{advertise}", "http://127.0.0.1:9")).unwrap();
    let gc = std::process::Command::new(env!("CARGO_BIN_EXE_pier"))
        .args(["gc", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&gc.stdout);
    assert!(
        gc.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(out.contains("max_age 1h (quay.io 3s)"), "{out}");
    assert!(out.contains("removed: 3 blobs"), "{out}");
    assert_eq!(bucket_usage(&ns).await.0, 3);

    let before = docker.requests("GET", "ages/short/blobs/");
    assert_eq!(pull(&pier, "quay.io/ages/short:v1").await, short);
    assert_eq!(docker.requests("GET", "ages/short/blobs/") - before, 3);
    let before = docker.requests("GET", "ages/both/blobs/");
    assert_eq!(pull(&pier, "docker.io/ages/both:v1").await, both);
    assert_eq!(docker.requests("GET", "ages/both/blobs/"), before);
}

/// Private images are never evicted: pushed to the private namespace, then
/// outlived by mirrored pulls of several times the budget, the image still
/// pulls whole, with upstream stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_survives_the_budget() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let own_digest = push_generated(&docker, work.path(), "own/base:v1", 2_500_000);
    let others: Vec<(String, String)> = (0..4)
        .map(|i| {
            let name = format!("churn/img{i}:v1");
            let digest = push_generated(&docker, work.path(), &name, 2_500_000);
            (name, digest)
        })
        .collect();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let (pier, data) = Pier::start(
        &[("docker.io", &docker.url())],
        &format!(
            "[cache]\nmax_size = \"8MiB\"\n[private]\n[[private.users]]\nname = \"ci\"\n\
             password_hash = \"{hash}\"\npush = [\"**\"]\n"
        ),
    );
    // Pushed straight from the upstream registry into the private namespace.
    let private = format!("{}/private/team/base:v1", pier.host());
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-creds",
            "ci:pw",
        ])
        .arg(format!(
            "docker://{}/own/base:v1",
            docker.url().trim_start_matches("http://")
        ))
        .arg(format!("docker://{private}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, digest) in &others {
        assert_eq!(&pull(&pier, &format!("docker.io/{name}")).await, digest);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_bytes(data.path()) > 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "{} bytes stored",
            stored_bytes(data.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    docker.stop();
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(&private, out.path(), &["--src-creds", "ci:pw"]).await;
    assert!(run.ok, "the private image lost a blob: {}", run.stderr);
    assert_eq!(manifest_digest_in(out.path()), own_digest);
    // The mirror did evict: its first image needs the (stopped) upstream.
    let (first, _) = &others[0];
    let out = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/{first}", pier.host()),
        out.path(),
        &[],
    )
    .await;
    assert!(!run.ok, "nothing was evicted: the test proves nothing");
}
