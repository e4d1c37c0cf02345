#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The deployment files under `deploy/`: the compose setup is complete and
//! its Pier config is valid, and the nginx config really balances a pull
//! across two replicas while streaming.

mod common;

use std::process::Command;

use common::*;

fn deploy(path: &str) -> std::path::PathBuf {
    repo_root().join("deploy").join(path)
}

#[test]
fn compose_file_wires_two_replicas_redis_s3_and_a_balancer() {
    if !have_tools(&["python3"]) {
        return;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(deploy("docker-compose.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = compose["services"].as_object().unwrap();
    for name in ["redis", "minio", "minio-init", "pier-a", "pier-b", "lb"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    // YAML merge keys give pier-b everything pier-a has but its address.
    for replica in ["pier-a", "pier-b"] {
        let svc = &services[replica];
        assert_eq!(
            svc["command"],
            serde_json::json!(["serve", "--config", "/etc/pier/pier.toml"])
        );
        let advertise = svc["environment"]["PIER_CLUSTER__ADVERTISE_URL"]
            .as_str()
            .unwrap();
        assert_eq!(advertise, format!("http://{replica}:5000"));
        assert!(
            svc["volumes"][0]
                .as_str()
                .unwrap()
                .starts_with("./pier.compose.toml:")
        );

        // The replica's configuration, as it will load it.
        let check = Command::new(env!("CARGO_BIN_EXE_pier"))
            .arg("check-config")
            .arg(deploy("pier.compose.toml"))
            .env("PIER_CLUSTER__ADVERTISE_URL", advertise)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let text = String::from_utf8(check.stdout).unwrap();
        assert!(
            text.contains("kind = \"s3\"") && text.contains("kind = \"redis\""),
            "{text}"
        );
        // Spool and local cache on the replica's one writable volume.
        assert_eq!(svc["volumes"][1], "/var/lib/pier/local");
        for key in ["spool_path", "local_cache_path"] {
            assert!(
                text.contains(&format!("{key} = \"/var/lib/pier/local/")),
                "{text}"
            );
        }
        assert!(
            text.contains(&format!("advertise_url = \"{advertise}/\"")),
            "{text}"
        );
        assert!(!text.contains("pier-secret-key"), "secrets are masked");
    }
    // Port 5000 unless PIER_PORT says otherwise.
    assert_eq!(services["lb"]["ports"][0], "${PIER_PORT:-5000}:80");
}

/// nginx running deploy/nginx.conf, pointed at two replicas on loopback.
struct Nginx {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(replicas: [&Pier; 2]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = std::fs::read_to_string(deploy("nginx.conf"))
            .unwrap()
            .replace(
                "server pier-a:5000;",
                &format!("server {};", replicas[0].host()),
            )
            .replace(
                "server pier-b:5000;",
                &format!("server {};", replicas[1].host()),
            )
            .replace("listen 80 ", &format!("listen 127.0.0.1:{port} "))
            .replace("worker_processes auto;", "worker_processes 2;");
        let file = dir.path().join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        for sub in ["body", "proxy"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let globals = format!(
            "daemon off; pid {0}/nginx.pid; error_log {0}/error.log;",
            dir.path().display()
        );
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&file)
            .arg("-p")
            .arg(dir.path())
            .args(["-g", &globals])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        wait_http(&format!("http://127.0.0.1:{port}/v2/"));
        Nginx {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan
        // them).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_config_balances_streaming_pulls_across_replicas() {
    if !have_tools(&["docker-registry", "skopeo", "nginx"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let ns = format!("lb{:x}", rand::random::<u64>());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = docker.url();
    let Some(a) = Pier::start_scaled(da.path(), &ns, &[("docker.io", &url)], "") else {
        return;
    };
    let b = Pier::start_scaled(db.path(), &ns, &[("docker.io", &url)], "").unwrap();
    let lb = Nginx::start([&a, &b]);

    let want = digest_of("docker", "library/big:latest");
    let mut clients = Vec::new();
    for _ in 0..8 {
        let src = format!("127.0.0.1:{}/docker.io/library/big:latest", lb.port);
        clients.push(tokio::spawn(async move {
            let out = tempfile::tempdir().unwrap();
            let run = skopeo_copy(&src, out.path(), &[]).await;
            assert!(run.ok, "{}", run.stderr);
            manifest_digest_in(out.path())
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), want);
    }
    // One upstream GET per blob, whichever replica nginx picked.
    docker.assert_one_get_per_blob("library/big", 3);

    // Host-prefix names survive the proxy (the Host header is passed on).
    let via_host = |alias: &str| {
        reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/v2/library/alpine/manifests/3.19",
                lb.port
            ))
            .header("host", format!("{alias}.{DOMAIN}:{}", lb.port))
            .header("accept", ACCEPT_ALL)
            .send()
    };
    let r = via_host("docker").await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(
        r.headers()["docker-content-digest"],
        digest_of("docker", "library/alpine:3.19").as_str()
    );
    let r = via_host("evil").await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}
