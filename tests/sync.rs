#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Sync through the admin API, against a real upstream registry: images in
//! the cache before anyone pulls them, only the platforms asked for, and an
//! API that exists only with a token and refuses what a pull would.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

fn admin_config() -> String {
    format!("[admin]\ntoken = \"{TOKEN}\"\n[access]\ndeny = [\"docker.io/secret/**\"]\n")
}

async fn post_sync(pier: &Pier, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/v1/sync", pier.url()))
        .json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

/// `GET <base><path>` on the admin API, as JSON.
async fn admin_get(base: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Serves `team/app:<tag>` on `upstream`: a config of `seed` and one
/// layer, served as `serve` says; the layer's bytes and digest.
fn fake_image(
    upstream: &common::fake::Fake,
    tag: &str,
    seed: u8,
    layer_size: usize,
    serve: impl FnOnce(bytes::Bytes) -> common::fake::Blob,
) -> (bytes::Bytes, String) {
    use common::fake::{self, Blob};
    let config = fake::random_bytes(100, seed);
    let layer = fake::random_bytes(layer_size, seed.wrapping_add(10));
    let (cd, ld) = (fake::digest(&config), fake::digest(&layer));
    upstream.blob(&cd, Blob::Good(config.clone()));
    upstream.blob(&ld, serve(layer.clone()));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    upstream.manifest("team/app", tag, MANIFEST, manifest.as_bytes());
    (layer, ld)
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Two replicas with the admin API on the shared bucket and Redis, under a
/// fresh namespace; `None` (skipping) without them.
fn two_replicas(
    ups: &[(&str, &str)],
) -> Option<(Pier, Pier, tempfile::TempDir, tempfile::TempDir)> {
    let ns = format!("sync{:x}", rand::random::<u64>());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let admin = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    let config = scaled_config(da.path(), &ns, ups, "", None, "")?;
    let a = Pier::start_raw(da.path(), &format!("{config}{admin}"));
    let config = scaled_config(db.path(), &ns, ups, "", None, "")?;
    let b = Pier::start_raw(db.path(), &format!("{config}{admin}"));
    Some((a, b, da, db))
}

/// Waits (up to 60 s) for job `id` to finish; its record.
async fn finished(pier: &Pier, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: Value = admin_get(&pier.url(), &format!("/api/v1/sync/{id}")).await;
        if job["state"] == "done" || job["state"] == "failed" {
            return job;
        }
        assert!(Instant::now() < deadline, "job not finished: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pulls `image` from `host` with skopeo; its manifest digest.
async fn pulled(host: &str, image: &str) -> String {
    manifest_digest_in(pulled_copy(&format!("{host}/{image}")).await.path())
}

async fn submit(pier: &Pier, body: Value) -> Value {
    let resp = post_sync(pier, Some(TOKEN), &body).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    finished(pier, &id).await
}

/// Without a token the API does not exist; with one it refuses requests
/// without it or with another, and refuses what a pull would refuse
/// before contacting anything.
#[tokio::test]
async fn the_admin_api_exists_only_with_a_token_and_refuses_strangers() {
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let body = json!({ "images": ["library/nginx:latest"] });

    let (plain, _d) = Pier::start(&ups, "");
    let resp = post_sync(&plain, Some(TOKEN), &body).await;
    assert_eq!(resp.status(), 404);
    let resp = reqwest::get(format!("{}/api/v1/sync", plain.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let (pier, _d) = Pier::start(&ups, &admin_config());
    let resp = post_sync(&pier, None, &body).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"pier-admin\""
    );
    assert_eq!(error_code(resp).await, "UNAUTHORIZED");
    for wrong in ["nope", &TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x")] {
        let resp = post_sync(&pier, Some(wrong), &body).await;
        assert_eq!(resp.status(), 401, "{wrong}");
    }
    let listed = reqwest::get(format!("{}/api/v1/sync", pier.url()))
        .await
        .unwrap();
    assert_eq!(listed.status(), 401);

    // Refused as pulls are, and nothing contacted.
    let before = docker.log().lines().count();
    for (image, status, code) in [
        ("evil.example.org/x/y:1", 404, "NAME_UNKNOWN"),
        ("nowhere.pier.test/x:1", 404, "NAME_UNKNOWN"),
        ("secret/plans:1", 403, "DENIED"),
        ("Upper/Case:1", 400, "NAME_INVALID"),
    ] {
        let resp = post_sync(
            &pier,
            Some(TOKEN),
            &json!({ "images": ["library/nginx:latest", image] }),
        )
        .await;
        assert_eq!(resp.status(), status, "{image}");
        let text = resp.text().await.unwrap();
        assert!(
            text.contains(code) && text.contains(image),
            "{image}: {text}"
        );
    }
    for (body, says) in [
        (json!({ "images": [] }), "lists no image"),
        (
            json!({ "images": ["nginx"], "platforms": ["linux"] }),
            "not a platform",
        ),
        (json!({ "image": ["nginx"] }), "must be JSON like"),
    ] {
        let resp = post_sync(&pier, Some(TOKEN), &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("BAD_REQUEST") && text.contains(says),
            "{text}"
        );
    }
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/sync/0123456789abcdef0123", pier.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "NOT_FOUND");
    assert_eq!(
        docker.log().lines().count(),
        before,
        "upstream was contacted"
    );
}

/// A synced image pulls with its upstream stopped; a multi-arch index
/// synced for one platform brings that platform's manifest and blobs and
/// no other's; the job says what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_images_pull_with_the_upstream_stopped() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (pier, _d) = Pier::start(&ups, &admin_config());

    // What the upstream's index says each platform is made of.
    let http = reqwest::Client::new();
    let accept =
        "application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json";
    let get = |path: String| {
        let http = http.clone();
        async move {
            http.get(path)
                .header("accept", accept)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let base = format!("{}/v2/library/nginx", docker.url());
    let index = get(format!("{base}/manifests/latest")).await;
    let mut blobs_of = std::collections::HashMap::new();
    for m in index["manifests"].as_array().unwrap() {
        let arch = m["platform"]["architecture"].as_str().unwrap().to_owned();
        let manifest = get(format!(
            "{base}/manifests/{}",
            m["digest"].as_str().unwrap()
        ))
        .await;
        let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
        for l in manifest["layers"].as_array().unwrap() {
            blobs.push(l["digest"].as_str().unwrap().to_owned());
        }
        blobs_of.insert(arch, blobs);
    }
    assert_eq!(blobs_of.len(), 2);
    let requests_before = docker.log().lines().count();

    let job = submit(
        &pier,
        json!({ "images": ["nginx"], "platforms": ["linux/arm64"] }),
    )
    .await;
    assert_eq!(job["state"], "done", "{job}");
    let image = &job["images"][0];
    assert_eq!(image["source"], "docker.io/library/nginx:latest");
    assert_eq!(image["digest"], digest_of("docker", "library/nginx:latest"));
    assert_eq!(image["platforms"], json!(["linux/arm64/v8"]));
    assert_eq!(image["blobs_done"], 3);
    assert_eq!(image["blobs_total"], 3);
    assert_eq!(image["bytes_done"], image["bytes_total"]);
    assert!(image["bytes_total"].as_u64().unwrap() > 0);
    let log: String = docker
        .log()
        .lines()
        .skip(requests_before)
        .collect::<Vec<_>>()
        .join("\n");
    for blob in &blobs_of["arm64"] {
        assert_eq!(
            log.matches(&format!("GET /v2/library/nginx/blobs/{blob}"))
                .count(),
            1,
            "{blob}"
        );
    }
    for blob in &blobs_of["amd64"] {
        assert!(!log.contains(blob.as_str()), "amd64 blob {blob} fetched");
    }
    let manifests = log.matches("GET /v2/library/nginx/manifests/").count();
    assert_eq!(manifests, 2, "the index and the arm64 manifest:\n{log}");

    // A second image, whole; then the list shows both, newest first.
    let job = submit(
        &pier,
        json!({ "images": ["docker.io/library/alpine:3.19"] }),
    )
    .await;
    assert_eq!(job["state"], "done", "{job}");
    let listed: Value = admin_get(&pier.url(), "/api/v1/sync").await;
    let jobs = listed["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["id"], job["id"]);

    docker.stop();
    let out = tempfile::tempdir().unwrap();
    let arm = skopeo_copy(
        &format!("{}/library/nginx:latest", pier.host()),
        out.path(),
        &["--override-arch", "arm64"],
    )
    .await;
    assert!(arm.ok, "{}", arm.stderr);
    assert_eq!(
        pulled(&pier.host(), "library/alpine:3.19").await,
        digest_of("docker", "library/alpine:3.19")
    );
    // amd64 was not synced: with upstream stopped it cannot be pulled.
    let out = tempfile::tempdir().unwrap();
    let amd = skopeo_copy(
        &format!("{}/library/nginx:latest", pier.host()),
        out.path(),
        &["--override-arch", "amd64"],
    )
    .await;
    assert!(!amd.ok);
}

/// An image that does not exist fails at once, naming why; one whose
/// upstream is down is tried again, then fails.
#[tokio::test]
async fn a_failed_image_says_why() {
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ups = [
        ("docker.io", docker.url()),
        ("quay.io", format!("http://127.0.0.1:{}", free_port())),
    ];
    let ups: Vec<(&str, &str)> = ups.iter().map(|(r, u)| (*r, u.as_str())).collect();
    let extra = format!(
        "{}[sync]\nretries = 2\nretry_after = \"200ms\"\n",
        admin_config()
    );
    let (pier, _d) = Pier::start(&ups, &extra);
    let job = submit(
        &pier,
        json!({ "images": ["library/nginx:9.9", "quay.io/x/y:1", "library/alpine:3.19"] }),
    )
    .await;
    assert_eq!(job["state"], "failed", "{job}");
    let images = job["images"].as_array().unwrap();
    assert_eq!(images[0]["state"], "failed");
    assert_eq!(images[0]["attempts"], 1);
    assert!(
        images[0]["error"].as_str().unwrap().contains("unknown"),
        "{job}"
    );
    assert_eq!(images[1]["state"], "failed");
    assert_eq!(images[1]["attempts"], 2);
    assert!(
        images[1]["error"].as_str().unwrap().contains("unavailable"),
        "{job}"
    );
    assert_eq!(images[2]["state"], "done");
}

fn pier_sync(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pier"))
        .arg("sync")
        .args(args)
        .env_remove("PIER_SERVER")
        .env_remove("PIER_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `pier sync` against a running Pier: it follows the job with a line per
/// change when its output is not a terminal, exits 0, and the images then
/// pull with the upstream stopped; a failed image makes it exit non-zero,
/// naming the image and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_sync_follows_the_job_and_says_what_failed() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (pier, _d) = Pier::start(&ups, &admin_config());
    let server = pier.url();

    let out = pier_sync(
        &["--server", &server, "library/alpine:3.18", "bitnami/nginx"],
        &[("PIER_ADMIN_TOKEN", TOKEN)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alpine = digest_of("docker", "library/alpine:3.18");
    let short = &alpine[7..19];
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("library/alpine:3.18: done ") && l.contains(short)),
        "{stdout}"
    );
    assert!(stdout.contains("bitnami/nginx: done "), "{stdout}");

    let out = pier_sync(
        &["--server", &server, "--token", TOKEN, "library/nosuch:1"],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pier: library/nosuch:1 failed: ") && stderr.contains("unknown"),
        "{stderr}"
    );
    let out = pier_sync(
        &[
            "--server",
            &server,
            "--token",
            "wrong-token-0000000000",
            "nginx",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (401)"));
    let out = pier_sync(&["--server", &server, "nginx"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // A Pier without a token has no admin API, and says so.
    let (plain, _p) = Pier::start(&ups, "");
    let out = pier_sync(&["--server", &plain.url(), "--token", TOKEN, "nginx"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no admin API: set [admin] token on it"),
        "{stderr}"
    );

    docker.stop();
    for image in ["library/alpine:3.18", "bitnami/nginx:latest"] {
        assert_eq!(
            pulled(&pier.host(), image).await,
            digest_of("docker", image)
        );
    }
}

/// Under a terminal, `pier sync` draws progress bars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_sync_draws_bars_on_a_terminal() {
    if !have_tools(&["docker-registry", "script"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (pier, _d) = Pier::start(&ups, &admin_config());
    // `script` runs the command under a pseudo-terminal and copies what it
    // draws.
    let command = format!(
        "{} sync --server {} --token {TOKEN} library/big:latest",
        env!("CARGO_BIN_EXE_pier"),
        pier.url()
    );
    let out = std::process::Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .env("COLUMNS", "120")
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let drawn = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{drawn}");
    // A bar's frame, a size against the total, and the end.
    assert!(drawn.contains("library/big:latest"), "{drawn}");
    assert!(drawn.contains("\u{1b}["), "no terminal drawing: {drawn}");
    assert!(drawn.contains("MiB") && drawn.contains("done "), "{drawn}");
}

/// A job outlives the replica that accepted it: that replica is killed
/// while it runs the job, and the other finishes it; the image then pulls
/// from the other with the upstream stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_the_replica_that_accepted_it() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let ns = format!("sync{:x}", rand::random::<u64>());
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let admin = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    let Some(config) = scaled_config(da.path(), &ns, &ups, "", None, "") else {
        return;
    };
    let mut a = PierProcess::start(&format!("{config}{admin}"));
    let config = scaled_config(db.path(), &ns, &ups, "", None, "").unwrap();
    let b = Pier::start_raw(db.path(), &format!("{config}{admin}"));

    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/api/v1/sync", a.url()))
        .bearer_auth(TOKEN)
        .json(&json!({ "images": ["library/big:latest", "library/alpine:3.17"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Killed once the job runs there (as the other replica sees it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job: Value = admin_get(&b.url(), &format!("/api/v1/sync/{id}")).await;
        assert_ne!(job["state"], "done", "finished before the kill: {job}");
        if job["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let job = finished(&b, &id).await;
    assert_eq!(job["state"], "done", "{job}");
    assert!(
        job["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "done")
    );

    docker.stop();
    for (image, digest) in [
        (
            "library/big:latest",
            digest_of("docker", "library/big:latest"),
        ),
        (
            "library/alpine:3.17",
            digest_of("docker", "library/alpine:3.17"),
        ),
    ] {
        assert_eq!(pulled(&b.host(), image).await, digest);
    }
}

/// `pier sync --config` works with no server: straight into the stores the
/// configuration names, which a Pier started on them then serves with the
/// upstream stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_sync_with_a_config_fills_the_stores_without_a_server() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "builtin_upstreams = false\n[storage]\nkind = \"fs\"\npath = \"{}\"\n\
         [[upstreams]]\nregistry = \"docker.io\"\nendpoints = [\"{}\"]\n",
        data.path().display(),
        docker.url()
    );
    let file = data.path().join("pier.toml");
    std::fs::write(&file, &config).unwrap();
    let out = pier_sync(
        &[
            "--config",
            file.to_str().unwrap(),
            "alpine:3.16",
            "--platform",
            "linux/amd64",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("alpine:3.16: done "), "{stdout}");

    docker.stop();
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let pier = Pier::start_in(data.path(), &ups, "");
    assert_eq!(
        pulled(&pier.host(), "library/alpine:3.16").await,
        digest_of("docker", "library/alpine:3.16")
    );
}

/// A `[[sync.images]]` entry with a `tag_pattern` picks up a tag pushed
/// upstream after Pier started, within its interval, and leaves the tags it
/// does not match; its runs are jobs the API lists, and the metrics say how
/// the last one went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_list_picks_up_a_new_tag_within_its_interval() {
    if !have_tools(&["docker-registry", "skopeo", "python3"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let work = tempfile::tempdir().unwrap();
    let v1 = push_generated(&docker, work.path(), "lists/app:1.0", 1000);
    let extra = format!(
        "{}[[sync.images]]\nimage = \"docker.io/lists/app\"\ntag_pattern = '^1\\.'\ninterval = \"2s\"\n",
        admin_config()
    );
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (pier, _d) = Pier::start(&ups, &extra);
    let listed = async |pier: &Pier| -> Vec<Value> {
        let v: Value = admin_get(&pier.url(), "/api/v1/sync").await;
        v["jobs"].as_array().unwrap().clone()
    };
    // Waits until a finished job of the list synced `source`.
    let synced = async |source: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = listed(&pier).await;
            let done = jobs.iter().any(|j| {
                j["list"] == "docker.io/lists/app"
                    && j["state"] == "done"
                    && j["images"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|i| i["source"] == source)
            });
            if done {
                return jobs;
            }
            assert!(Instant::now() < deadline, "{source} not synced: {jobs:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    synced("docker.io/lists/app:1.0").await;
    let v2 = push_generated(&docker, work.path(), "lists/app:1.1", 1000);
    push_generated(&docker, work.path(), "lists/app:2.0", 1000);
    let jobs = synced("docker.io/lists/app:1.1").await;
    assert!(
        !jobs
            .iter()
            .flat_map(|j| j["images"].as_array().unwrap().iter())
            .any(|i| i["source"] == "docker.io/lists/app:2.0"),
        "2.0 does not match the pattern"
    );
    let lists: Value = admin_get(&pier.url(), "/api/v1/sync/lists").await;
    let entry = &lists["lists"][0];
    assert_eq!(entry["image"], "docker.io/lists/app");
    assert_eq!(entry["interval"], "2s");
    assert_eq!(entry["last_success"]["failed"], 0, "{lists}");
    assert!(entry["last_run"]["done"].as_u64().unwrap() >= 1, "{lists}");
    let text = reqwest::get(format!("{}/metrics", pier.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("pier_sync_images{image=\"docker.io/lists/app\",state=\"failed\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("pier_sync_last_success_timestamp_seconds{image=\"docker.io/lists/app\"}")
    );

    docker.stop();
    for (tag, digest) in [("1.0", v1), ("1.1", v2)] {
        assert_eq!(
            pulled(&pier.host(), &format!("lists/app:{tag}")).await,
            digest
        );
    }
}

/// Sync waits while the upstream says its rate limit is nearly used up
/// (fewer than `[sync] min_ratelimit_remaining` left), until the window it
/// named is over; then it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pauses_while_the_upstreams_rate_limit_is_low() {
    use common::fake::{Blob, Fake};
    let upstream = Fake::start();
    let mut images = Vec::new();
    for tag in ["1", "2", "3"] {
        fake_image(&upstream, tag, tag.as_bytes()[0], 2000, Blob::Good);
        images.push(format!("corp.example/team/app:{tag}"));
    }
    // 11 left: the first manifest GET leaves 10, the second 9.
    upstream.ratelimit(11, 3);
    let extra = format!("{}[sync]\nmin_ratelimit_remaining = 10\n", admin_config());
    let (pier, _d) = Pier::start(&[("corp.example", &upstream.url())], &extra);
    let job = submit(&pier, json!({ "images": images })).await;
    assert_eq!(job["state"], "done", "{job}");
    let hits = upstream.hits();
    let low = hits
        .iter()
        .position(|h| h.ratelimit.is_some_and(|left| left < 10))
        .expect("the limit fell below 10");
    let next = hits.get(low + 1).expect("sync went on after the pause");
    let paused = next.at.duration_since(hits[low].at);
    assert!(
        paused >= Duration::from_millis(2500),
        "the next request came {paused:?} after the upstream said {} were left",
        hits[low].ratelimit.unwrap()
    );
}

/// A 64 MiB image synced while eight clients pull it through two replicas:
/// one upstream GET per blob across the cluster, every pull complete and
/// correct, and the job done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_and_eight_pulls_of_one_image_fetch_each_blob_once() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let Some((a, b, _da, _db)) = two_replicas(&ups) else {
        return;
    };
    let digest = digest_of("docker", "library/big:latest");

    let sync = submit(&a, json!({ "images": ["library/big:latest"] }));
    let pulls = (0..8).map(|i| {
        let host = if i % 2 == 0 { a.host() } else { b.host() };
        async move { pulled(&host, "library/big:latest").await }
    });
    let (job, digests) = tokio::join!(sync, futures::future::join_all(pulls));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        job["images"][0]["bytes_done"],
        job["images"][0]["bytes_total"]
    );
    assert!(digests.iter().all(|d| *d == digest), "{digests:?}");
    let blobs = job["images"][0]["blobs_total"].as_u64().unwrap() as usize;
    docker.assert_one_get_per_blob("library/big", blobs);
}

/// With `prefetch` on, the first time an image manifest comes from upstream
/// its blobs are fetched in the background, before the client asks; an
/// index alone fetches nothing, and without `prefetch` nothing is fetched
/// ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_a_new_images_blobs_before_the_client_asks() {
    if !have_tools(&["docker-registry"]) {
        return;
    }
    let accept = "application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json,\
                  application/vnd.docker.distribution.manifest.v2+json,\
                  application/vnd.docker.distribution.manifest.list.v2+json";
    let http = reqwest::Client::new();
    let manifest = async |pier: &Pier, reference: &str| -> Value {
        let resp = http
            .get(format!(
                "{}/v2/library/nginx/manifests/{reference}",
                pier.url()
            ))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    };
    for prefetch in [true, false] {
        let docker = Upstream::start("docker");
        let data = tempfile::tempdir().unwrap();
        let pier = Pier::start_with(
            data.path(),
            &[("docker.io", &docker.url())],
            "",
            &format!("prefetch = {prefetch}\n"),
        );
        // The index: no blob is fetched for it.
        let index = manifest(&pier, "latest").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(docker.requests("GET", "library/nginx/blobs/"), 0);
        let child = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
        let image = manifest(&pier, &child).await;
        let mut blobs = vec![image["config"]["digest"].as_str().unwrap().to_owned()];
        for layer in image["layers"].as_array().unwrap() {
            blobs.push(layer["digest"].as_str().unwrap().to_owned());
        }
        if prefetch {
            let stored = pier.wait_stored(blobs.len());
            for blob in &blobs {
                assert!(
                    stored.iter().any(|s| blob.ends_with(s.as_str())),
                    "{blob} not stored: {stored:?}"
                );
            }
            docker.assert_one_get_per_blob("library/nginx", blobs.len());
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(docker.requests("GET", "library/nginx/blobs/"), 0);
        }
    }
}

/// `pier rewrite --sync` writes the manifests to stdout and syncs every
/// image it pointed at the mirror, following the job on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_rewrite_sync_warms_what_it_rewrote() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let (pier, _d) = Pier::start(&ups, &admin_config());
    let manifest = "kind: Pod\nspec:\n  containers:\n    - name: a\n      image: alpine:3.15\n";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pier"))
        .args([
            "rewrite",
            "--prefix",
            &pier.host(),
            "--sync",
            "--server",
            &pier.url(),
        ])
        .env("PIER_ADMIN_TOKEN", TOKEN)
        .env_remove("PIER_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), manifest.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "kind: Pod\nspec:\n  containers:\n    - name: a\n      image: {}/docker.io/library/alpine:3.15\n",
            pier.host()
        )
    );
    assert!(stderr.contains("alpine:3.15: done "), "{stderr}");
    docker.stop();
    assert_eq!(
        pulled(&pier.host(), "library/alpine:3.15").await,
        digest_of("docker", "library/alpine:3.15")
    );
}

/// A sync that finds another replica fetching a blob streams from that
/// fetch and counts the blob done once that replica stored it: one upstream
/// GET, and the job done with every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_joins_another_replicas_fetch_and_waits_for_its_store() {
    use common::fake::{Blob, Fake};
    let upstream = Fake::start();
    let (layer, ld) = fake_image(&upstream, "1", 1, 2 << 20, |bytes| {
        Blob::Slow(bytes, Duration::from_millis(1500))
    });
    let url = upstream.url();
    let ups = [("corp.example", url.as_str())];
    let Some((a, b, _da, _db)) = two_replicas(&ups) else {
        return;
    };

    // A client on b starts the layer's fetch there (after the manifest,
    // which tells the repository has it).
    let http = reqwest::Client::new();
    let got = http
        .get(format!("{}/v2/corp.example/team/app/manifests/1", b.url()))
        .header("accept", MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let pull = tokio::spawn({
        let url = format!("{}/v2/corp.example/team/app/blobs/{ld}", b.url());
        async move { reqwest::get(url).await.unwrap().bytes().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = submit(&a, json!({ "images": ["corp.example/team/app:1"] })).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        job["images"][0]["bytes_done"],
        job["images"][0]["bytes_total"]
    );
    assert_eq!(pull.await.unwrap(), layer);
    assert_eq!(
        upstream.count("GET", &format!("/v2/team/app/blobs/{ld}")),
        1
    );
}
