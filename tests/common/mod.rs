//! Integration-test harness: real upstream registries (`docker-registry`)
//! started on copies of generated fixtures, Pier started in-process on a
//! loopback port, and real clients (`skopeo`) run against it.
//!
//! The fixtures and tools come from `tests/run.sh`. When a tool is missing,
//! tests fail if `PIER_TEST_STRICT=1` (CI) and skip loudly otherwise.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod certs;
pub mod fake;

pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Hosts the test script maps to 127.0.0.1 in /etc/hosts for host-prefix mode.
pub const DOMAIN: &str = "m.pier.test";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn strict() -> bool {
    std::env::var("PIER_TEST_STRICT").is_ok_and(|v| v == "1")
}

/// Returns false (after saying why) when `tools` are missing and the run is
/// not strict; panics in strict mode.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&&str> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("missing {missing:?}: run tests/run.sh, which installs them");
    if strict() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// The generated fixture tree, built once per machine by
/// `tests/fixtures/build.sh` (idempotent, locked against parallel callers).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("PIER_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/pier-fixtures"));
        let status = Command::new("bash")
            .arg(repo_root().join("tests/fixtures/build.sh"))
            .arg(&dir)
            .status()
            .expect("run tests/fixtures/build.sh");
        assert!(status.success(), "tests/fixtures/build.sh failed");
        dir
    })
}

/// `<template> <repo>:<tag>` → digest, from the fixtures' images.txt.
pub fn digest_of(template: &str, image: &str) -> String {
    let text = std::fs::read_to_string(fixtures().join("images.txt")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(template) && parts.next() == Some(image))
                .then(|| parts.next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("{template} {image} not in images.txt"))
}

/// SIGKILLs a child process, if running, and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 20 s) until something listens on loopback `port`: servers
/// that speak no plain HTTP (TLS, Redis).
pub fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `url` answers at all (any status).
pub fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "1", url])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} did not come up");
}

/// A `docker-registry` serving a private copy of one fixture template.
pub struct Upstream {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra top-level YAML for the registry config (e.g. `auth:`).
    extra: String,
}

impl Upstream {
    pub fn start(template: &str) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(fixtures().join("registries").join(template))
            .arg(dir.path().join("storage"))
            .status()
            .unwrap();
        assert!(status.success());
        let mut up = Upstream {
            port: free_port(),
            dir,
            child: None,
            extra: String::new(),
        };
        up.run();
        up
    }

    /// Like `start`, demanding Bearer tokens from a Docker-Hub-style token
    /// server (`tests/fixtures/token_server.py`), which it also starts.
    /// Returns the upstream and the token server's request log.
    pub fn start_with_token_auth(template: &str) -> (Upstream, TokenServer) {
        let mut up = Upstream::start(template);
        up.stop();
        let port = free_port();
        let cert = up.dir.path().join("token-cert.pem");
        let log = up.dir.path().join("token.log");
        std::fs::write(&log, "").unwrap();
        let child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/token_server.py"))
            .args(["--port", &port.to_string(), "--issuer", "pier-test-issuer"])
            .arg("--cert")
            .arg(&cert)
            .arg("--log")
            .arg(&log)
            .spawn()
            .expect("start token_server.py");
        let server = TokenServer { child, log };
        wait_http(&format!("http://127.0.0.1:{port}/token"));
        up.extra = format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    \
             service: pier-test-registry\n    issuer: pier-test-issuer\n    \
             rootcertbundle: {}\n",
            cert.display()
        );
        up.run();
        (up, server)
    }

    /// Like `start`, demanding HTTP Basic credentials (htpasswd auth).
    pub fn start_with_basic_auth(template: &str, user: &str, password: &str) -> Upstream {
        let mut up = Upstream::start(template);
        up.stop();
        let htpasswd = up.dir.path().join("htpasswd");
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("run htpasswd (apache2-utils)");
        assert!(out.status.success());
        std::fs::write(&htpasswd, out.stdout).unwrap();
        up.extra = format!(
            "auth: {{htpasswd: {{realm: test, path: {}}}}}\n",
            htpasswd.display()
        );
        up.run();
        up
    }

    fn run(&mut self) {
        let cfg = self.dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\n\
                 log: {{level: info, formatter: text, accesslog: {{disabled: false}}}}\n\
                 storage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\n  \
                 maintenance: {{uploadpurging: {{enabled: false}}}}\n\
                 http: {{addr: \"127.0.0.1:{}\", secret: pier-test}}\n{}",
                self.dir.path().join("storage").display(),
                self.port,
                self.extra,
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.access_log())
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        wait_http(&format!("{}/v2/", self.url()));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Pier's requests (by user agent) for `METHOD /v2/<path prefix>`.
    pub fn requests(&self, method: &str, path_prefix: &str) -> usize {
        let needle = format!("\"{method} /v2/{path_prefix}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Asserts that Pier sent exactly one GET for each of `blobs` distinct
    /// blobs under `repo` (the point of a pull-through cache).
    pub fn assert_one_get_per_blob(&self, repo: &str, blobs: usize) {
        let log = self.log();
        let needle = format!("\"GET /v2/{repo}/blobs/");
        let gets: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| l.split('"').nth(1).unwrap_or(l))
            .collect();
        let counts = histogram(gets.iter().copied());
        assert_eq!(counts.len(), blobs, "{log}");
        assert!(counts.values().all(|&n| n == 1), "{counts:#?}");
    }

    /// The access-log lines of requests Pier sent (not the harness's own).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.access_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"pier/"))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Pushes a fixture layout (`layouts/<template>/<repo>/<tag>`) to
    /// `repo:tag` on this upstream.
    pub fn push_layout(&self, layout: &str, repo_tag: &str) {
        let src = fixtures().join("layouts").join(layout);
        let tag = layout.rsplit('/').next().unwrap();
        self.push_oci(&src, tag, repo_tag);
    }

    /// Pushes tag `tag` of the OCI layout at `dir` to `repo_tag`.
    pub fn push_oci(&self, dir: &Path, tag: &str, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--insecure-policy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", dir.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The host-prefix alias tests use for a registry.
fn alias_of(registry: &str) -> &'static str {
    match registry {
        "docker.io" => "docker",
        "registry.k8s.io" => "k8s",
        "gcr.io" => "gcr",
        _ => "corp",
    }
}

/// A config for a replica on the shared S3 bucket and Redis (or `redis`),
/// under `namespace`; `{advertise}` stands for the replica's own URL. None
/// (after saying why) when the backends are not running.
pub fn scaled_config(
    data: &Path,
    namespace: &str,
    upstreams: &[(&str, &str)],
    per_upstream: &str,
    redis: Option<&str>,
    storage_extra: &str,
) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let redis = redis
        .map(str::to_owned)
        .or_else(|| env("PIER_TEST_REDIS_URL"));
    let (Some(redis), Some(s3)) = (redis, env("PIER_TEST_S3_ENDPOINT")) else {
        let msg = "PIER_TEST_REDIS_URL / PIER_TEST_S3_ENDPOINT are not set: run tests/run.sh";
        if strict() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    };
    let mut config = format!(
        "listen = \"127.0.0.1:0\"\nbuiltin_upstreams = false\ndefault_registry = \"{}\"\n\
         domains = [\"{DOMAIN}\"]\n\
         [storage]\nkind = \"s3\"\nbucket = \"{}\"\nprefix = \"{namespace}\"\n\
         endpoint = \"{s3}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         spool_path = \"{}\"\n{storage_extra}\n\
         [metadata]\nkind = \"redis\"\nurl = \"{redis}\"\nkey_prefix = \"{namespace}:\"\n\
         timeout = \"500ms\"\n[cluster]\nadvertise_url = \"{{advertise}}\"\n",
        upstreams[0].0,
        env("PIER_TEST_S3_BUCKET").unwrap_or_else(|| "pier-test".into()),
        env("PIER_TEST_S3_ACCESS_KEY").unwrap_or_default(),
        env("PIER_TEST_S3_SECRET_KEY").unwrap_or_default(),
        data.join("spool").display(),
    );
    for (registry, url) in upstreams {
        config.push_str(&format!(
            "[[upstreams]]\nregistry = \"{registry}\"\naliases = [\"{}\"]\n\
             endpoints = [\"{url}\"]\n{per_upstream}\n",
            alias_of(registry)
        ));
    }
    Some(config)
}

/// Pier as a separate process (`pier serve`), for tests that kill it.
pub struct PierProcess {
    pub port: u16,
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl PierProcess {
    /// Starts `pier serve` with `config`, in which `{advertise}` and the
    /// listen address are filled in with a free loopback port.
    pub fn start(config: &str) -> PierProcess {
        PierProcess::start_with(config, &[], None)
    }

    /// Like `start`, with extra environment variables and stderr (the log)
    /// written to `log` when given.
    pub fn start_with(config: &str, env: &[(&str, &str)], log: Option<&Path>) -> PierProcess {
        let port = free_port();
        let text = config
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace("{advertise}", &format!("http://127.0.0.1:{port}"));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pier"));
        cmd.arg("serve")
            .arg("--config")
            .arg(file.path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().expect("start pier");
        wait_http(&format!("http://127.0.0.1:{port}/healthz"));
        PierProcess {
            port,
            child,
            _config: file,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id (for /proc/PID figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PierProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the shared test bucket has an object at `key` (a signed HEAD).
pub fn s3_has(key: &str) -> bool {
    let code = s3_request("HEAD", key);
    assert!(code == "200" || code == "404", "S3 HEAD {key}: {code}");
    code == "200"
}

/// Polls (up to 5 s) until the shared test bucket has an object at `key`.
pub async fn wait_s3_has(key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s3_has(key) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Deletes the object at `key` from the shared test bucket.
pub fn s3_delete(key: &str) {
    let code = s3_request("DELETE", key);
    assert!(code == "204" || code == "200", "S3 DELETE {key}: {code}");
}

/// Writes `bytes` at `key` in the shared test bucket (as someone else with
/// access to the bucket could).
pub fn s3_put(key: &str, bytes: &[u8]) {
    use sha2::Digest as _;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .arg("--data-binary")
        .arg(format!("@{}", file.path().display()))
        .arg("-H")
        .arg(format!(
            "x-amz-content-sha256: {}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            env("PIER_TEST_S3_ACCESS_KEY"),
            env("PIER_TEST_S3_SECRET_KEY")
        ))
        .arg(format!(
            "{}/{}/{key}",
            env("PIER_TEST_S3_ENDPOINT"),
            std::env::var("PIER_TEST_S3_BUCKET").unwrap_or_else(|_| "pier-test".into())
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "S3 PUT {key}");
}

/// A signed request to the shared test bucket; the status code.
fn s3_request(method: &str, key: &str) -> String {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
    if method == "HEAD" {
        cmd.arg("-I");
    } else {
        cmd.args(["-X", method]);
    }
    let out = cmd
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            env("PIER_TEST_S3_ACCESS_KEY"),
            env("PIER_TEST_S3_SECRET_KEY")
        ))
        .arg(format!(
            "{}/{}/{key}",
            env("PIER_TEST_S3_ENDPOINT"),
            std::env::var("PIER_TEST_S3_BUCKET").unwrap_or_else(|_| "pier-test".into())
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A client of the shared test bucket, for what the harness's curl helpers
/// do not sign (requests with a query), and the bucket's name.
pub fn bucket_client() -> (aws_sdk_s3::Client, String) {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(env("PIER_TEST_S3_ENDPOINT"))
        .region(Region::new("us-east-1"))
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            env("PIER_TEST_S3_ACCESS_KEY"),
            env("PIER_TEST_S3_SECRET_KEY"),
            None,
            None,
            "pier-test",
        ))
        .build();
    let bucket = std::env::var("PIER_TEST_S3_BUCKET").unwrap_or_else(|_| "pier-test".into());
    (aws_sdk_s3::Client::from_conf(config), bucket)
}

/// Blobs and their bytes under `namespace` in the shared test bucket.
pub async fn bucket_usage(namespace: &str) -> (usize, u64) {
    let (s3, bucket) = bucket_client();
    let (mut count, mut bytes) = (0, 0);
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(format!("{namespace}/blobs/"))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for object in page.unwrap().contents() {
            count += 1;
            bytes += object.size().unwrap_or(0) as u64;
        }
    }
    (count, bytes)
}

/// A private `redis-server` on a loopback port, for outage tests.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.run();
        r
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_port(self.port, "redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (as an outage would).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The token server behind a token-auth upstream.
pub struct TokenServer {
    child: Child,
    log: PathBuf,
}

impl TokenServer {
    /// Token requests served so far (`<path?query> auth=yes|no` lines).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("/token?"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pier running in-process on its own runtime and thread.
pub struct Pier {
    pub addr: SocketAddr,
    pub data: PathBuf,
    config: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pier {
    /// Starts Pier with `extra` config TOML, every built-in upstream switched
    /// off, and `upstreams` (registry → endpoint URL) configured, with data
    /// under a fresh directory.
    pub fn start(upstreams: &[(&str, &str)], extra: &str) -> (Pier, tempfile::TempDir) {
        let data = tempfile::tempdir().unwrap();
        let pier = Pier::start_in(data.path(), upstreams, extra);
        (pier, data)
    }

    pub fn start_in(data: &Path, upstreams: &[(&str, &str)], extra: &str) -> Pier {
        Pier::start_with(data, upstreams, extra, "")
    }

    /// Like `start_in`, with `per_upstream` TOML lines (e.g. `tag_ttl = "1s"`)
    /// added to every `[[upstreams]]` entry.
    pub fn start_with(
        data: &Path,
        upstreams: &[(&str, &str)],
        extra: &str,
        per_upstream: &str,
    ) -> Pier {
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\ndomains = [\"{DOMAIN}\"]\nbuiltin_upstreams = false\n{extra}\n[storage]\nkind = \"fs\"\npath = \"{}\"\n",
            data.display()
        );
        if !upstreams.iter().any(|(r, _)| *r == "docker.io")
            && let Some((first, _)) = upstreams.first()
        {
            config.insert_str(0, &format!("default_registry = \"{first}\"\n"));
        }
        for (registry, url) in upstreams {
            let alias = alias_of(registry);
            config.push_str(&format!(
                "[[upstreams]]\nregistry = \"{registry}\"\naliases = [\"{alias}\"]\nendpoints = [\"{url}\"]\n{per_upstream}\n"
            ));
        }
        Pier::run(data, config)
    }

    /// Starts a replica on the shared S3 bucket and Redis from
    /// `tests/backends.sh`, under `namespace` (a key prefix in both), or
    /// returns None (skipping) when they are not running.
    pub fn start_scaled(
        data: &Path,
        namespace: &str,
        upstreams: &[(&str, &str)],
        per_upstream: &str,
    ) -> Option<Pier> {
        Pier::start_scaled_with(data, namespace, upstreams, per_upstream, None, "")
    }

    /// Like `start_scaled`, with metadata in the Redis at `redis` instead of
    /// the shared one, and `storage_extra` lines in `[storage]`.
    pub fn start_scaled_with(
        data: &Path,
        namespace: &str,
        upstreams: &[(&str, &str)],
        per_upstream: &str,
        redis: Option<&str>,
        storage_extra: &str,
    ) -> Option<Pier> {
        let config = scaled_config(
            data,
            namespace,
            upstreams,
            per_upstream,
            redis,
            storage_extra,
        )?;
        Some(Pier::run(data, config))
    }

    /// Starts Pier with exactly this config text.
    pub fn start_raw(data: &Path, config: &str) -> Pier {
        Pier::run(data, config.to_owned())
    }

    fn run(data: &Path, config: String) -> Pier {
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        // `{advertise}` in a config stands for this replica's own URL.
        let config = config.replace("{advertise}", &format!("http://{addr}"));
        let parsed = pier::config::Config::from_toml(&config, Vec::new())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{config}"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let shutdown = async {
                    let _ = rx.await;
                };
                if let Err(e) = pier::server::serve(&parsed, listener, shutdown).await {
                    eprintln!("pier stopped with an error: {e:#}");
                }
            });
            // Dropping the runtime cancels detached fetches too.
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        pier::telemetry::init(pier::config::LogFormat::Text);
        Pier {
            addr,
            data: data.to_owned(),
            config,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the way clients name the mirror.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops and starts again on the same data directory and config.
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Pier::run(&self.data, self.config.clone());
        *self = fresh;
    }

    /// Waits (up to 5 s) until the blob store holds `n` blobs, and returns
    /// them: a blob is committed just after its last byte is sent.
    pub fn wait_stored(&self, n: usize) -> Vec<String> {
        wait_files(&self.data.join("blobs"), n)
    }

    /// Every file under the blob store (verified blobs only ever).
    pub fn stored_blobs(&self) -> Vec<String> {
        files_under(&self.data.join("blobs"))
    }
}

impl Drop for Pier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls (up to 5 s) until `dir` holds `n` files; their names.
pub fn wait_files(dir: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let files = files_under(dir);
        if files.len() >= n || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The names of the files under `dir`, at any depth, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Output of a finished `skopeo` run.
pub struct Run {
    pub ok: bool,
    pub stderr: String,
}

/// `skopeo copy docker://SRC dir:DEST` with extra arguments.
pub async fn skopeo_copy(src: &str, dest: &Path, extra: &[&str]) -> Run {
    let out = tokio::process::Command::new("skopeo")
        .args([
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            "--retry-times=0",
        ])
        .args(extra)
        .arg(format!("docker://{src}"))
        .arg(format!("dir:{}", dest.display()))
        .output()
        .await
        .expect("run skopeo");
    Run {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Pulls `image` (`<host>/<name>:<tag>`) with skopeo into a fresh `dir:`
/// copy, which must succeed; the copy.
pub async fn pulled_copy(image: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let run = skopeo_copy(image, dir.path(), &[]).await;
    assert!(run.ok, "{image}: {}", run.stderr);
    dir
}

/// The sha256 digest of the manifest skopeo wrote into a `dir:` copy.
pub fn manifest_digest_in(dir: &Path) -> String {
    use sha2::Digest as _;
    let bytes = std::fs::read(dir.join("manifest.json")).unwrap();
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
}

/// A scripted upstream serving one blob of `size` pseudo-random bytes, and
/// a Pier (with `extra` config TOML) in front of it.
pub struct OneBlob {
    pub fake: fake::Fake,
    pub pier: Pier,
    pub http: reqwest::Client,
    pub bytes: bytes::Bytes,
    pub digest: String,
    /// The blob's URL on Pier.
    pub url: String,
    _data: tempfile::TempDir,
}

impl OneBlob {
    pub fn start(size: usize, seed: u8, extra: &str) -> OneBlob {
        let fake = fake::Fake::start();
        let bytes = fake::random_bytes(size, seed);
        let digest = fake::digest(&bytes);
        fake.blob(&digest, fake::Blob::Good(bytes.clone()));
        let (pier, data) = Pier::start(&[("corp.example", &fake.url())], extra);
        let http = http_for(&pier);
        let url = format!("{}/v2/corp.example/team/app/blobs/{digest}", pier.url());
        OneBlob {
            fake,
            pier,
            http,
            bytes,
            digest,
            url,
            _data: data,
        }
    }
}

/// An HTTP client that resolves `*.m.pier.test` to Pier without /etc/hosts.
pub fn http_for(pier: &Pier) -> reqwest::Client {
    let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    for h in ["docker", "k8s", "gcr", "evil", "corp"] {
        b = b.resolve(&format!("{h}.{DOMAIN}"), pier.addr);
    }
    b.resolve(DOMAIN, pier.addr).build().unwrap()
}

/// GET (or another method) with the full manifest Accept list.
pub async fn fetch(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client.request(method, url).header("accept", ACCEPT_ALL);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// The OCI error code in a response body.
pub async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Counts how many times each line occurs (for request-count assertions).
pub fn histogram<'a>(lines: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut m = HashMap::new();
    for l in lines {
        *m.entry(l).or_default() += 1;
    }
    m
}

/// A counter's value in Pier's /metrics.
pub async fn metric(http: &reqwest::Client, pier: &Pier, name: &str) -> f64 {
    metric_at(http, &pier.url(), name).await
}

/// A counter's value in the /metrics of the Pier at `base`.
pub async fn metric_at(http: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Writes an image (`gen_images.py` with `args`) and pushes it to
/// `repo_tag` on `upstream`; the digest of its manifest.
pub fn push_image(upstream: &Upstream, dir: &Path, repo_tag: &str, args: &[&str]) -> String {
    let layout = dir.join(repo_tag.replace(['/', ':'], "_"));
    let out = Command::new("python3")
        .arg(repo_root().join("tests/fixtures/gen_images.py"))
        .arg("--out")
        .arg(&layout)
        .args(["--tag", "v1", "--print-digest", "--seed", repo_tag])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    upstream.push_oci(&layout, "v1", repo_tag);
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An image of two random layers of `layer_size` bytes, pushed.
pub fn push_generated(
    upstream: &Upstream,
    dir: &Path,
    repo_tag: &str,
    layer_size: usize,
) -> String {
    let size = layer_size.to_string();
    push_image(
        upstream,
        dir,
        repo_tag,
        &["--layers", "2", "--layer-size", &size],
    )
}

/// A TCP relay to `target` that sends what comes back at most `rate` bytes
/// a second: an upstream on a slow link. It lives as long as the test
/// process.
pub struct SlowLink {
    pub port: u16,
}

impl SlowLink {
    pub fn start(target: &str, rate: usize) -> SlowLink {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = target.trim_start_matches("http://").to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    // A tenth of a second's worth at a time.
                    let mut buf = vec![0u8; (rate / 10).max(1)];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        SlowLink { port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A TCP relay to `target` (an S3 server) that breaks off the first GET
/// whose request line contains `needle` after `cut` response bytes, as a
/// bucket under load may. It records every request head it relays.
pub struct CutLink {
    pub port: u16,
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl CutLink {
    pub fn start(target: &str, needle: &str, cut: usize) -> CutLink {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = target.trim_start_matches("http://").to_owned();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let armed = Arc::new(AtomicBool::new(true));
        let (needle, recorded) = (needle.to_owned(), heads.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                // Set by the request side when this connection carries the
                // GET to break.
                let cutting = Arc::new(AtomicBool::new(false));
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (needle, recorded, armed, flag) = (
                    needle.clone(),
                    recorded.clone(),
                    armed.clone(),
                    cutting.clone(),
                );
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if let Some(line) = text.lines().next()
                            && (line.starts_with("GET ")
                                || line.starts_with("HEAD ")
                                || line.starts_with("PUT "))
                        {
                            recorded
                                .lock()
                                .unwrap()
                                .push(text.split("\r\n\r\n").next().unwrap_or("").to_owned());
                            if line.starts_with("GET ")
                                && line.contains(&needle)
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                flag.store(true, Ordering::SeqCst);
                            }
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent_while_cutting = 0;
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut n = n;
                        if cutting.load(Ordering::SeqCst) {
                            n = n.min(cut - sent_while_cutting);
                            sent_while_cutting += n;
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if cutting.load(Ordering::SeqCst) && sent_while_cutting >= cut {
                            let _ = c_write.shutdown(std::net::Shutdown::Both);
                            let _ = s_read.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CutLink { port, heads }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
