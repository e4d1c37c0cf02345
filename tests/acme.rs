#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Certificates Pier gets itself (`[server.acme]`) from a real ACME CA:
//! Debian's `pebble`, on loopback, validating by TLS-ALPN-01 on Pier's own
//! port. `pier serve` runs as a process here, as it would on a host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::TestCa;
use common::*;

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pebble, its HTTPS served with a certificate from `ca`, validating
/// TLS-ALPN-01 challenges on `tls_port`.
struct Pebble {
    _proc: Proc,
    directory: String,
    management: u16,
}

impl Pebble {
    fn start(dir: &Path, ca: &TestCa, tls_port: u16) -> Pebble {
        let own = ca.issue(dir, "pebble");
        let (port, management) = (free_port(), free_port());
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": own.cert,
                "privateKey": own.key,
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }})
            .to_string(),
        )
        .unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble");
        wait_port(port, "pebble");
        Pebble {
            _proc: Proc(child),
            directory: format!("https://127.0.0.1:{port}/dir"),
            management,
        }
    }

    /// The root pebble issues certificates under (new at every start).
    async fn root(&self, ca: &TestCa) -> String {
        https_client(&ca.pem, 0)
            .get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A client that trusts only `root_pem` and finds m.pier.test on `port`.
fn https_client(root_pem: &str, port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap()])
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .resolve(DOMAIN, ([127, 0, 0, 1], port).into())
        .build()
        .unwrap()
}

/// `pier serve` on `port` with ACME from `directory`.
fn start_pier(dir: &Path, port: u16, directory: &str, ca_file: &Path) -> Proc {
    let config = dir.join("pier.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n\
             [storage]\npath = \"{data}\"\n\
             [server.acme]\ndomains = [\"{DOMAIN}\"]\ncontact = [\"mailto:ops@pier.test\"]\n\
             directory = \"{directory}\"\ndirectory_ca = \"{ca}\"\ncache = \"{cache}\"\n",
            data = dir.join("data").display(),
            ca = ca_file.display(),
            cache = cache_dir(dir).display(),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pier"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pier.log")).unwrap())
        .spawn()
        .expect("start pier");
    wait_port(port, "pier");
    Proc(child)
}

fn cache_dir(dir: &Path) -> PathBuf {
    dir.join("acme-cache")
}

/// Waits until a client trusting only `root` is served `/v2/` over HTTPS;
/// the certificate it was shown.
async fn served_under(root: &str, port: u16, dir: &Path) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tried = https_client(root, port)
            .get(format!("https://{DOMAIN}:{port}/v2/"))
            .send()
            .await;
        if let Ok(r) = tried {
            assert_eq!(r.status(), 200);
            return r
                .extensions()
                .get::<reqwest::tls::TlsInfo>()
                .and_then(|i| i.peer_certificate())
                .unwrap()
                .to_vec();
        }
        assert!(
            Instant::now() < deadline,
            "no certificate under that root: {tried:?}\n{}",
            std::fs::read_to_string(dir.join("pier.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn cached(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(cache_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

/// pebble and what Pier needs to use it: the CA its HTTPS is checked
/// against, and the port Pier serves (and pebble validates) on.
struct Lab {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    port: u16,
    pebble: Pebble,
    /// The root pebble issues under.
    root: String,
}

impl Lab {
    async fn start() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("pebble's own HTTPS");
        let ca_file = dir.path().join("ca.crt");
        ca.write(&ca_file);
        let port = free_port();
        let pebble = Pebble::start(dir.path(), &ca, port);
        let root = pebble.root(&ca).await;
        Lab {
            dir,
            ca,
            ca_file,
            port,
            pebble,
            root,
        }
    }

    fn pier(&self) -> Proc {
        start_pier(
            self.dir.path(),
            self.port,
            &self.pebble.directory,
            &self.ca_file,
        )
    }

    async fn served(&self) -> Vec<u8> {
        served_under(&self.root, self.port, self.dir.path()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_obtained_by_tls_alpn_01_and_kept_across_restarts() {
    if !have_tools(&["pebble"]) {
        return;
    }
    let lab = Lab::start().await;
    let pier = lab.pier();

    // Issued by the ACME CA: a client trusting only its root is served.
    let first = lab.served().await;
    // Account, certificate and key are kept, readable by Pier's user only.
    for prefix in ["account-", "cert-", "key-"] {
        let files = cached(lab.dir.path(), prefix);
        assert_eq!(files.len(), 1, "{prefix}: {files:?}");
        assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
    }
    let client = https_client(&lab.root, lab.port);
    let base = format!("https://{DOMAIN}:{}", lab.port);
    let loaded = "pier_tls_certificate_reloads_total{outcome=\"loaded\"}";
    assert_eq!(metric_at(&client, &base, loaded).await, 1.0);
    let expiry = metric_at(
        &client,
        &base,
        "pier_tls_certificate_expiry_timestamp_seconds",
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "expiry {expiry} is not after {now}");

    // A restart with the CA gone serves the kept certificate at once.
    drop(pier);
    let Lab {
        dir,
        ca_file,
        port,
        pebble,
        root,
        ..
    } = lab;
    let directory = pebble.directory.clone();
    drop(pebble);
    let _pier = start_pier(dir.path(), port, &directory, &ca_file);
    assert_eq!(served_under(&root, port, dir.path()).await, first);
    // The account and certificate still on disk are the same single ones.
    assert_eq!(cached(dir.path(), "cert-").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_renewed_while_it_is_served() {
    if !have_tools(&["pebble"]) {
        return;
    }
    let lab = Lab::start().await;
    let dir = &lab.dir;
    // First a certificate from the CA, so the cache has its files...
    let pier = lab.pier();
    lab.served().await;
    drop(pier);
    // ...then one in their place with a day left of its year: due for
    // renewal (less than a third of its lifetime left), still valid.
    let old = lab
        .ca
        .issue_until(dir.path(), "old", Some(Duration::from_secs(24 * 3600)));
    let cert = cached(dir.path(), "cert-").remove(0);
    let key = cached(dir.path(), "key-").remove(0);
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();

    let _pier = lab.pier();
    // The renewal runs at start; new connections then get a certificate
    // under pebble's root...
    let renewed = lab.served().await;
    assert_ne!(renewed, old.der);
    // ...and the renewed pair replaced the old in the cache.
    assert_ne!(
        std::fs::read(&cert).unwrap(),
        std::fs::read(&old.cert).unwrap()
    );
}
