#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The console's read API against real pulls: `/api/v1/explain` reads a
//! reference as a pull would, says what the cache holds and what a pull
//! would do, and never contacts an upstream or an unconfigured host.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn explain(pier: &Pier, reference: &str) -> Value {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ref", reference)
        .finish();
    let resp = reqwest::get(format!("{}/api/v1/explain?{query}", pier.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{reference}");
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reads_what_users_type_as_a_pull_would() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let k8s = Upstream::start("k8s");
    // An unconfigured "registry" that must never be contacted.
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    canary.set_nonblocking(true).unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let (pier, _d) = Pier::start(
        &[
            ("docker.io", &docker.url()),
            ("registry.k8s.io", &k8s.url()),
        ],
        "[access]\ndeny = [\"docker.io/secret/**\"]\ndenied_message = \"ask #platform\"\n",
    );

    // Not cached yet: read as Docker reads a short name, fetched on a pull.
    let before = explain(&pier, "docker pull nginx:1.25").await;
    assert_eq!(before["reference"], "nginx:1.25");
    assert_eq!(
        before["routed"]["normalized"],
        "docker.io/library/nginx:1.25"
    );
    assert_eq!(before["routed"]["mode"], "short name");
    assert_eq!(before["access"]["allowed"], true);
    assert_eq!(before["cached"]["manifest"], false);
    assert!(
        before["pull_would"]
            .as_str()
            .unwrap()
            .starts_with("fetch the manifest from docker.io")
    );
    let commands = before["pull_commands"].as_array().unwrap();
    assert!(
        commands.iter().any(|c| c
            == &Value::from(format!(
                "docker pull {}/docker.io/library/nginx:1.25",
                DOMAIN
            ))),
        "{commands:?}"
    );

    // After an arm64 pull of the multi-arch index.
    let dir = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/library/nginx:latest", pier.host()),
        dir.path(),
        &["--override-arch", "arm64"],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    let upstream_requests = docker.log().lines().count() + k8s.log().lines().count();
    let after = explain(&pier, "https://hub.docker.com/_/nginx").await;
    assert_eq!(
        after["routed"]["normalized"],
        "docker.io/library/nginx:latest"
    );
    assert_eq!(after["cached"]["manifest"], true);
    assert_eq!(
        after["cached"]["digest"],
        digest_of("docker", "library/nginx:latest")
    );
    assert_eq!(
        after["cached"]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64/v8"])
    );
    assert_eq!(
        after["cached"]["platforms_cached"],
        serde_json::json!(["linux/arm64/v8"])
    );
    assert!(
        after["pull_would"]
            .as_str()
            .unwrap()
            .contains("within its tag_ttl"),
        "{after}"
    );

    // A short name a built-in rule sends to registry.k8s.io.
    let pause = explain(&pier, "pause:3.9").await;
    assert_eq!(pause["routed"]["registry"], "registry.k8s.io");
    assert_eq!(pause["routed"]["route"], "pause");
    let hosted = explain(&pier, &format!("k8s.{DOMAIN}/pause:3.9")).await;
    assert_eq!(hosted["routed"]["mode"], "host-prefix");
    assert_eq!(hosted["routed"]["normalized"], "registry.k8s.io/pause:3.9");

    // Refused: denied by [access], an unconfigured host, nonsense.
    let denied = explain(&pier, "secret/plans:1").await;
    assert_eq!(denied["error"]["code"], "DENIED");
    assert!(
        denied["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ask #platform")
    );
    assert_eq!(denied["access"]["allowed"], false);
    for unknown in [
        format!("127.0.0.1:{canary_port}/x/y:1"),
        "evil.example.com/x".to_owned(),
    ] {
        let e = explain(&pier, &unknown).await;
        assert_eq!(e["error"]["code"], "NAME_UNKNOWN", "{e}");
        assert!(
            e["pull_would"]
                .as_str()
                .unwrap()
                .contains("before anything is contacted")
        );
    }
    assert_eq!(
        explain(&pier, "Upper/Case").await["error"]["code"],
        "NAME_INVALID"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        canary.accept().is_err(),
        "the unconfigured host was contacted"
    );
    assert_eq!(
        docker.log().lines().count() + k8s.log().lines().count(),
        upstream_requests,
        "explain contacted an upstream"
    );
    let empty = reqwest::get(format!("{}/api/v1/explain?ref=", pier.url()))
        .await
        .unwrap();
    assert_eq!(empty.status(), 400);
}

#[tokio::test]
async fn the_read_api_is_gone_with_the_ui_off() {
    let (pier, _d) = Pier::start(
        &[("docker.io", "http://127.0.0.1:9")],
        "[ui]\nenabled = false\n",
    );
    for path in [
        "/api/v1/explain?ref=nginx",
        "/api/v1/stats",
        "/api/v1/activity",
        "/",
        "/repositories",
        "/explain",
        "/ui/app.js",
    ] {
        let resp = reqwest::get(format!("{}{path}", pier.url())).await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    let v2 = reqwest::get(format!("{}/v2/", pier.url())).await.unwrap();
    assert_eq!(v2.status(), 200);
    // With the admin API on, the read API still answers beside it.
    let (pier, _d) = Pier::start(
        &[("docker.io", "http://127.0.0.1:9")],
        "[admin]\ntoken = \"console-admin-token-0123\"\n",
    );
    let resp = reqwest::get(format!("{}/api/v1/explain?ref=nginx", pier.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Search finds a pulled repository and not an unpulled one; a
/// repository's tags say what each names; what `[access]` hides stays
/// hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_are_searched_and_listed_and_hidden_ones_stay_hidden() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let ups = [("docker.io", url.as_str())];
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_in(data.path(), &ups, "");
    for image in ["library/nginx:latest", "library/alpine:3.19"] {
        pulled_copy(&format!("{}/{image}", pier.host())).await;
    }
    let get = async |pier: &Pier, path: &str| -> (u16, Value) {
        let resp = reqwest::get(format!("{}{path}", pier.url())).await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    };
    let (status, found) = get(&pier, "/api/v1/repositories?q=ngin").await;
    assert_eq!(status, 200);
    assert_eq!(
        found["repositories"],
        serde_json::json!(["docker.io/library/nginx"])
    );
    let (_, none) = get(&pier, "/api/v1/repositories?q=redis").await;
    assert_eq!(none["repositories"], serde_json::json!([]));
    let (_, all) = get(&pier, "/api/v1/repositories?q=library&n=1").await;
    assert_eq!(
        all["repositories"],
        serde_json::json!(["docker.io/library/alpine"])
    );
    assert_eq!(all["next"], "docker.io/library/alpine");
    let (_, rest) = get(
        &pier,
        "/api/v1/repositories?q=library&n=1&last=docker.io/library/alpine",
    )
    .await;
    assert_eq!(
        rest["repositories"],
        serde_json::json!(["docker.io/library/nginx"])
    );
    assert_eq!(rest["next"], Value::Null, "nothing more matches");

    let (status, nginx) = get(&pier, "/api/v1/repositories/docker.io/library/nginx").await;
    assert_eq!(status, 200);
    let tag = &nginx["tags"][0];
    assert_eq!(tag["tag"], "latest");
    assert_eq!(tag["digest"], digest_of("docker", "library/nginx:latest"));
    assert_eq!(
        tag["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64/v8"])
    );
    // An image's size is its config and layers, as its manifest says.
    let (_, alpine) = get(&pier, "/api/v1/repositories/docker.io/library/alpine").await;
    let manifest: Value = reqwest::Client::new()
        .get(format!("{}/v2/library/alpine/manifests/3.19", docker.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let size = manifest["config"]["size"].as_u64().unwrap()
        + manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(alpine["tags"][0]["size"], size);
    let (status, _) = get(&pier, "/api/v1/repositories/docker.io/library/redis").await;
    assert_eq!(status, 404);

    // The image pages' data: an index's platforms, each cached or not; an
    // image's layers as its manifest lists them, and its config.
    let (status, index) = get(&pier, "/api/v1/images/docker.io/library/nginx:latest").await;
    assert_eq!(status, 200, "{index}");
    let platforms = index["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), 2);
    assert_eq!(
        platforms.iter().filter(|p| p["cached"] == true).count(),
        1,
        "one platform was pulled: {index}"
    );
    let (status, image) = get(&pier, "/api/v1/images/docker.io/library/alpine:3.19").await;
    assert_eq!(status, 200, "{image}");
    let layers = image["layers"].as_array().unwrap();
    let listed = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), listed.len());
    for (shown, listed) in layers.iter().zip(listed) {
        assert_eq!(shown["digest"], listed["digest"]);
        assert_eq!(shown["size"], listed["size"]);
        assert_eq!(shown["cached"], true);
    }
    assert_eq!(image["config"]["digest"], manifest["config"]["digest"]);
    assert_eq!(image["config"]["cached"], true);
    assert_eq!(image["config"]["os"], "linux");
    let (status, _) = get(&pier, "/api/v1/images/docker.io/library/alpine:3.15").await;
    assert_eq!(status, 404);
    drop(pier);

    // The same cache behind a Pier that denies alpine: it is not shown.
    let pier = Pier::start_in(
        data.path(),
        &ups,
        "[access]\ndeny = [\"docker.io/library/alpine\"]\n",
    );
    let (_, found) = get(&pier, "/api/v1/repositories?q=library").await;
    assert_eq!(
        found["repositories"],
        serde_json::json!(["docker.io/library/nginx"])
    );
    let (status, _) = get(&pier, "/api/v1/repositories/docker.io/library/alpine").await;
    assert_eq!(status, 404);
}

/// The dashboard's figures are the cluster's: two replicas (separate
/// processes on one Redis and bucket) each publish theirs, and either one's
/// `/api/v1/stats` adds up both `/metrics`. A replica that stops leaves the
/// list of replicas once its record lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_add_up_every_replica() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let ns = format!("stats{:x}", rand::random::<u64>());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(config_a) = scaled_config(da.path(), &ns, &[("docker.io", &url)], "", None, "") else {
        return;
    };
    let config_b = scaled_config(db.path(), &ns, &[("docker.io", &url)], "", None, "").unwrap();
    let a = PierProcess::start(&config_a);
    let mut b = PierProcess::start(&config_b);
    let host = |p: &PierProcess| p.url().trim_start_matches("http://").to_owned();
    for (pier, image) in [
        (&a, "library/alpine:3.19"),
        (&b, "library/alpine:3.19"),
        (&b, "library/nginx:latest"),
    ] {
        pulled_copy(&format!("{}/docker.io/{image}", host(pier))).await;
    }
    // Cache lookups by outcome, and blob bytes served, from one /metrics.
    let lookups = async |pier: &PierProcess| -> (u64, u64) {
        let text = reqwest::get(format!("{}/metrics", pier.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut all = 0;
        let mut cached = 0;
        for line in text
            .lines()
            .filter(|l| l.starts_with("pier_cache_lookups_total{"))
        {
            let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            all += n;
            if ["hit", "revalidated", "stale"]
                .iter()
                .any(|o| line.contains(&format!("outcome=\"{o}\"")))
            {
                cached += n;
            }
        }
        (all, cached)
    };
    let (all_a, cached_a) = lookups(&a).await;
    let (all_b, cached_b) = lookups(&b).await;
    assert!(all_a > 0 && all_b > 0);
    let stats_of = async |pier: &PierProcess| -> Value {
        reqwest::get(format!("{}/api/v1/stats", pier.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let stats = loop {
        let stats = stats_of(&a).await;
        if stats["all_time"]["requests"] == all_a + all_b {
            break stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats never added up to {} requests: {stats}",
            all_a + all_b
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stats["all_time"]["from_cache"], cached_a + cached_b);
    assert_eq!(stats["last_hour"]["requests"], all_a + all_b);
    let mut names: Vec<String> = stats["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    let mut want = vec![host(&a), host(&b)];
    want.sort();
    assert_eq!(names, want);
    let top: Vec<(&str, u64)> = stats["top_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["repository"].as_str().unwrap(),
                t["pulls"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(top[0].0, "docker.io/library/alpine", "{top:?}");
    assert!(top[0].1 >= 2, "pulled through both replicas: {top:?}");
    let docker_io = &stats["upstreams"][0];
    assert_eq!(docker_io["registry"], "docker.io");
    assert_eq!(
        docker_io["requests"].as_u64().unwrap(),
        docker.log().lines().count() as u64,
        "upstream requests as the upstream logged them: {stats}"
    );
    // The other replica reads the same figures.
    assert_eq!(stats_of(&b).await["all_time"]["requests"], all_a + all_b);

    b.terminate();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let replicas = stats_of(&a).await["replicas"].as_array().unwrap().len();
        if replicas == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped replica stays listed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Pushes `bytes` as a blob of `repo` on the registry at `base`; its digest.
async fn push_blob(http: &reqwest::Client, base: &str, repo: &str, bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let started = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let done = http
        .put(format!("{location}{sep}digest={digest}"))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 201, "{}", done.text().await.unwrap());
    digest
}

/// The image page lists what the cache holds about an image: a signature
/// stored by the tag scheme (`sha256-<hex>.sig`) and an SBOM whose
/// `subject` is the image, each with its artifact type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_lists_its_cached_referrers() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let url = docker.url();
    let (pier, _d) = Pier::start(&[("docker.io", &url)], "");
    let dir = pulled_copy(&format!("{}/docker.io/library/alpine:3.19", pier.host())).await;
    let image = manifest_digest_in(dir.path());
    let image_size = std::fs::metadata(dir.path().join("manifest.json"))
        .unwrap()
        .len();

    let http = reqwest::Client::new();
    let repo = "library/alpine";
    let empty = push_blob(&http, &url, repo, b"{}").await;
    let mut pushed = Vec::new();
    for (artifact, tag, body) in [
        (
            "application/vnd.dev.cosign.artifact.sig.v1+json",
            image.replacen(':', "-", 1) + ".sig",
            "signature",
        ),
        (
            "application/spdx+json",
            "sbom-of-3.19".to_owned(),
            "{\"spdxVersion\":\"SPDX-2.3\"}",
        ),
    ] {
        let layer = push_blob(&http, &url, repo, body.as_bytes()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": body.len()}],
            "subject": {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": image, "size": image_size
            },
        })
        .to_string();
        let resp = http
            .put(format!("{url}/v2/{repo}/manifests/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let digest = resp.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned();
        pushed.push((artifact, tag, digest));
    }
    // The signature is fetched by its tag (as cosign does), the SBOM by
    // digest (as a referrers-aware client does).
    let client = http_for(&pier);
    let (sig, sbom) = (&pushed[0], &pushed[1]);
    for reference in [&sig.1, &sbom.2] {
        let resp = fetch(
            &client,
            reqwest::Method::GET,
            &format!("{}/v2/docker.io/{repo}/manifests/{reference}", pier.url()),
            &[],
        )
        .await;
        assert_eq!(resp.status(), 200, "{reference}");
    }
    let view: Value = reqwest::get(format!(
        "{}/api/v1/images/docker.io/{repo}:3.19",
        pier.url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let mut referrers = view["referrers"].as_array().unwrap().clone();
    referrers.sort_by_key(|r| r["digest"].as_str().unwrap().to_owned());
    let mut want = vec![
        serde_json::json!({"digest": sig.2, "artifact_type": sig.0, "tag": sig.1}),
        serde_json::json!({"digest": sbom.2, "artifact_type": sbom.0}),
    ];
    want.sort_by_key(|r| r["digest"].as_str().unwrap().to_owned());
    assert_eq!(referrers, want, "{view}");
    // Another image of the repository has none.
    let other: Value = reqwest::get(format!(
        "{}/api/v1/images/docker.io/{repo}@{}",
        pier.url(),
        sig.2
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(other["referrers"], serde_json::json!([]));
}

/// With the admin token, a purge forgets an image's tag and link: the
/// next pull asks upstream again. Without the token nothing happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_makes_the_next_pull_ask_upstream() {
    if !have_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    const TOKEN: &str = "console-admin-token-0123";
    let docker = Upstream::start("docker");
    let (pier, _d) = Pier::start(
        &[("docker.io", &docker.url())],
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    );
    let pull = async || {
        let dir = pulled_copy(&format!("{}/docker.io/library/alpine:3.19", pier.host())).await;
        manifest_digest_in(dir.path())
    };
    let digest = pull().await;
    let asked = || docker.requests("GET", "library/alpine/manifests/3.19");
    assert_eq!(asked(), 1);
    pull().await;
    assert_eq!(asked(), 1, "a warm pull within the tag TTL asks nothing");

    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/images/docker.io/library/alpine:3.19", pier.url());
    let refused = http.delete(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let wrong = http.delete(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    // The read side of the same URL answers without a token.
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    let purged = http.delete(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(purged.status(), 200);
    let purged: Value = purged.json().await.unwrap();
    assert_eq!(purged["tags"], serde_json::json!(["3.19"]));
    assert_eq!(purged["digest"], digest.as_str());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 404);
    let again = http.delete(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(again.status(), 404);

    assert_eq!(pull().await, digest);
    assert_eq!(asked(), 2, "the pull after the purge asked upstream");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
}
