#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The operator console in a real browser: Debian's headless Chromium,
//! driven by Playwright (`tests/browser/console.py`), against a Pier with
//! real pulls behind it (cold, warm and stale, through real registries and
//! skopeo). Screenshots of every page at a phone and a desktop width go to
//! `target/console-screenshots/`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "browser-admin-token-0123";

/// Debian's Chromium and Playwright for Python, as `tests/setup.sh`
/// installs them.
fn have_browser() -> bool {
    let playwright = Command::new("python3")
        .args(["-c", "import playwright"])
        .status()
        .is_ok_and(|s| s.success());
    if !playwright {
        assert!(
            !strict(),
            "missing Playwright for Python: run tests/run.sh, which installs it"
        );
        eprintln!("SKIPPED: missing Playwright for Python");
        return false;
    }
    have_tools(&["chromium", "docker-registry", "skopeo"])
}

async fn pull(pier: &Pier, image: &str) -> tempfile::TempDir {
    pulled_copy(&format!("{}/{image}", pier.host())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_in_a_real_browser() {
    if !have_browser() {
        return;
    }
    let docker = Upstream::start("docker");
    let mut k8s = Upstream::start("k8s");
    // A registry on a slow link (its big layer takes seconds), so a cold
    // fetch can be watched on the activity page.
    let far = Upstream::start("docker");
    let link = SlowLink::start(&far.url(), 4 << 20);
    // An unconfigured host that must never be contacted.
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    canary.set_nonblocking(true).unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_with(
        data.path(),
        &[
            ("docker.io", &docker.url()),
            ("registry.k8s.io", &k8s.url()),
            ("far.example", &link.url()),
        ],
        &format!(
            "[access]\ndeny = [\"docker.io/secret/**\"]\ndenied_message = \"ask #platform\"\n\
             [admin]\ntoken = \"{TOKEN}\"\n"
        ),
        "tag_ttl = \"1s\"",
    );

    // Cold, then warm; an index of two platforms (one pulled); then a tag
    // served stale while its upstream is down.
    let alpine = pull(&pier, "docker.io/library/alpine:3.19").await;
    pull(&pier, "docker.io/library/alpine:3.19").await;
    pull(&pier, "docker.io/library/nginx:latest").await;
    pull(&pier, "registry.k8s.io/pause:3.9").await;
    k8s.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pull(&pier, "registry.k8s.io/pause:3.9").await;

    let manifest: Value =
        serde_json::from_slice(&std::fs::read(alpine.path().join("manifest.json")).unwrap())
            .unwrap();
    let layer_sizes: Vec<u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    let index: Value = reqwest::Client::new()
        .get(format!(
            "{}/v2/library/nginx/manifests/latest",
            docker.url()
        ))
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                s = format!("{s}/{v}");
            }
            s
        })
        .collect();
    assert_eq!(platforms.len(), 2);
    let big_digest = {
        let m: Value = reqwest::Client::new()
            .get(format!("{}/v2/library/big/manifests/latest", far.url()))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let biggest = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .max_by_key(|l| l["size"].as_u64().unwrap())
            .unwrap()
            .clone();
        biggest["digest"].as_str().unwrap().to_owned()
    };

    let out = repo_root().join("target/console-screenshots");
    std::fs::create_dir_all(&out).unwrap();
    let spec = json!({
        "base": pier.url(),
        "out": out,
        "pulled": "docker.io/library/alpine",
        "pulled_tag": "3.19",
        "search": "library/",
        "unpulled": "docker.io/library/big",
        "nothing": "zzz-never-pulled",
        "stale_registry": "registry.k8s.io",
        "index": { "name": "docker.io/library/nginx:latest", "platforms": platforms },
        "image": { "name": "docker.io/library/alpine:3.19", "layer_sizes": layer_sizes },
        "explain": [
            {
                "name": "routed",
                "ref": "docker pull pause:3.9",
                "shows": ["registry.k8s.io/pause:3.9", "short name", "pause"],
            },
            {
                "name": "denied",
                "ref": "docker.io/secret/plans:1",
                "shows": ["denied", "ask #platform"],
                "hides": ["Prewarm"],
            },
            {
                "name": "unconfigured",
                "ref": format!("127.0.0.1:{canary_port}/x/y:1"),
                "shows": ["NAME UNKNOWN"],
            },
        ],
        "admin": {
            "token": TOKEN,
            "prewarm": "docker.io/distroless/static-debian11:latest",
            "purge": "docker.io/library/alpine:3.19",
        },
        "failing": "/v2/docker.io/library/nosuch/manifests/1.0",
        "slow": {
            "url": format!("{}/v2/far.example/library/big/blobs/{big_digest}", pier.url()),
            "digest": big_digest,
            "repository": "far.example/library/big",
        },
        "pages": {
            "dashboard": "/",
            "repositories": "/repositories?q=library",
            "repository": "/repositories/docker.io/library/alpine",
            "image-index": "/images/docker.io/library/nginx:latest",
            "image": "/images/docker.io/library/alpine:3.19",
            "activity": "/activity",
            "explain": "/explain?ref=nginx:1.25",
        },
    });
    let run = tokio::process::Command::new("python3")
        .arg(repo_root().join("tests/browser/console.py"))
        .arg(spec.to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(run.status.success(), "{stdout}\n{stderr}");
    // Explaining a name on an unconfigured host contacted nothing.
    assert!(
        canary.accept().is_err(),
        "the unconfigured host was contacted"
    );
    for name in ["dashboard", "repositories", "image", "activity", "explain"] {
        for width in [390, 1280] {
            assert!(out.join(format!("{name}-{width}.png")).exists());
        }
    }
}
