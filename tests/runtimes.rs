#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Real container runtimes as Pier's clients: a private Docker daemon
//! (`registry-mirrors` and add-a-prefix), containerd through `ctr` and a
//! `hosts.toml` mirror (`?ns=`, HEAD-first), and podman through
//! `registries.conf` (one `Accept:` line per media type). Each test starts
//! its own daemon on its own sockets and data directories under a short
//! /tmp directory, and stops it on drop, even when the test panics.
//!
//! Nothing may leave loopback: every registry a runtime could fall back to
//! is pointed at a closed loopback port, and the runtimes get an HTTP(S)
//! proxy on a closed loopback port too (Go never proxies loopback, so the
//! mirror is reached directly and anything else fails at once).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Upper bound for one CLI call (a pull through a cold mirror included).
const CMD_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for a daemon to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A directory directly under /tmp with a short name: unix socket paths
/// must stay under ~108 bytes, and containerd nests its own sockets deeper.
fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("prt")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    free_port()
}

/// Proxy variables that send any non-loopback HTTP(S) to a closed port.
fn no_egress_env() -> Vec<(&'static str, String)> {
    let proxy = format!("http://127.0.0.1:{}", closed_port());
    // The mirror's names resolve to loopback through /etc/hosts.
    let no_proxy = format!("127.0.0.1,localhost,{DOMAIN}");
    vec![
        ("HTTP_PROXY", proxy.clone()),
        ("HTTPS_PROXY", proxy.clone()),
        ("http_proxy", proxy.clone()),
        ("https_proxy", proxy),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
}

/// A daemon with its output in a log file. Dropping it sends SIGTERM (a
/// graceful stop: dockerd stops the containerd it manages and unmounts its
/// data-root), waits, SIGKILLs it if it hung, and finally unmounts anything
/// it left mounted under `root`. It stays in the test's process group, so a
/// runner that kills the group on a timeout or Ctrl-C takes it along.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    root: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, root: &Path) -> Daemon {
        let log = root.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name,
            child: Some(child),
            log,
            root: root.to_owned(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- last lines of {} log ---\n{}",
            self.name,
            lines[from..].join("\n")
        )
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn signal(pid: u32, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        Self::signal(pid, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SIGKILL if it hung (a no-op on the reaped-to-be zombie otherwise).
        let _ = child.kill();
        let _ = child.wait();
        unmount_under(&self.root);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lazily unmounts every mount point under `root`, deepest first (dockerd
/// bind-mounts its data-root onto itself and leaves it on a hard kill).
fn unmount_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount")
            .args(["-l", p])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A finished CLI call.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it if it outlives `CMD_TIMEOUT`.
async fn run(mut cmd: tokio::process::Command) -> Out {
    let what = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(CMD_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("timed out after {CMD_TIMEOUT:?}: {what}"))
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `probe` until it succeeds; panics with the daemon's log otherwise.
async fn wait_ready<F>(daemon: &mut Daemon, mut probe: F)
where
    F: FnMut() -> tokio::process::Command,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if run(probe()).await.ok {
            return;
        }
        if let Some(status) = daemon.exited() {
            panic!(
                "{} exited during start-up ({status})\n{}",
                daemon.name,
                daemon.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not come up within {START_TIMEOUT:?}\n{}",
            daemon.name,
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lines of Pier's upstream requests whose path starts with `/v2/<prefix>`
/// (any method).
fn upstream_hits(up: &Upstream, prefix: &str) -> usize {
    let needle = format!(" /v2/{prefix}");
    up.log().lines().filter(|l| l.contains(&needle)).count()
}

/// Asserts Pier fetched `repo`'s manifest and blobs from `up`.
fn assert_served(up: &Upstream, name: &str, repo: &str) {
    let log = up.log();
    assert!(
        up.requests("GET", &format!("{repo}/manifests/")) > 0,
        "Pier never fetched {repo}'s manifest from the {name} upstream; its log:\n{log}"
    );
    assert!(
        up.requests("GET", &format!("{repo}/blobs/")) > 0,
        "Pier never fetched {repo}'s blobs from the {name} upstream; its log:\n{log}"
    );
}

/// The digest after `@` in a `name@sha256:...` reference.
fn digest_part(reference: &str) -> &str {
    reference.rsplit_once('@').map_or(reference, |(_, d)| d)
}

// ---------------------------------------------------------------------------
// Docker daemon
// ---------------------------------------------------------------------------

struct Dockerd {
    sock: String,
    config_dir: PathBuf,
    daemon: Daemon,
}

impl Dockerd {
    /// A private dockerd whose only Docker Hub mirror is `mirror`, over
    /// plain HTTP.
    async fn start(dir: &Path, mirror: &str) -> Dockerd {
        Dockerd::start_with(dir, &format!("http://{mirror}"), &[mirror]).await
    }

    /// A private dockerd whose only Docker Hub mirror is `mirror_url`, and
    /// which talks plain HTTP to the `insecure` hosts.
    async fn start_with(dir: &Path, mirror_url: &str, insecure: &[&str]) -> Dockerd {
        let sock = dir.join("d.sock").display().to_string();
        let config = serde_json::json!({
            "registry-mirrors": [mirror_url],
            "insecure-registries": insecure,
            "storage-driver": "vfs",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "bridge": "none",
            "data-root": dir.join("data"),
            "exec-root": dir.join("x"),
            "pidfile": dir.join("d.pid"),
            "hosts": [format!("unix://{sock}")],
            "max-download-attempts": 1,
        });
        let file = dir.join("daemon.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let config_dir = dir.join("cli");
        std::fs::create_dir_all(&config_dir).unwrap();
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file").arg(&file).envs(no_egress_env());
        let mut d = Dockerd {
            sock,
            config_dir,
            daemon: Daemon::spawn("dockerd", cmd, dir),
        };
        let (sock, cfg) = (d.sock.clone(), d.config_dir.clone());
        wait_ready(&mut d.daemon, || docker_cmd(&sock, &cfg, &["version"])).await;
        d
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        docker_cmd(&self.sock, &self.config_dir, args)
    }

    /// `docker pull REF`; returns the digest from its `Digest:` line.
    async fn pull(&self, reference: &str) -> String {
        let out = run(self.cmd(&["pull", reference])).await;
        assert!(
            out.ok,
            "docker pull {reference} failed\n{}\n{}",
            out.both(),
            self.daemon.log_tail()
        );
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Digest: "))
            .unwrap_or_else(|| panic!("no Digest: line in docker pull output\n{}", out.both()))
            .trim()
            .to_owned()
    }

    /// `docker image inspect`'s RepoDigests for `reference`.
    async fn repo_digests(&self, reference: &str) -> Vec<String> {
        let out = run(self.cmd(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            reference,
        ]))
        .await;
        assert!(out.ok, "docker image inspect {reference}\n{}", out.both());
        serde_json::from_str(out.stdout.trim()).unwrap()
    }
}

fn docker_cmd(sock: &str, config_dir: &Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("docker");
    c.args(args)
        .env("DOCKER_HOST", format!("unix://{sock}"))
        .env("DOCKER_CONFIG", config_dir)
        .env_remove("DOCKER_CONTEXT")
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_daemon_pulls_through_registry_mirrors_and_prefix() {
    if !have_tools(&["docker-registry", "dockerd", "docker", "containerd", "runc"]) {
        return;
    }
    let started = Instant::now();
    let mut docker = Upstream::start("docker");
    let k8s = Upstream::start("k8s");
    let token = "runtimes-admin-token-0123";
    let (pier, _data) = Pier::start(
        &[
            ("docker.io", &docker.url()),
            ("registry.k8s.io", &k8s.url()),
        ],
        &format!("[admin]\ntoken = \"{token}\"\n"),
    );
    let dir = short_tempdir();
    let d = Dockerd::start(dir.path(), &pier.host()).await;
    eprintln!("dockerd ready after {:?}", started.elapsed());

    // registry-mirrors: a Docker Hub short name, sent as /v2/library/nginx/...
    // with no ns, so Pier must take it to docker.io (k8s has a different
    // library/nginx:latest).
    let want = digest_of("docker", "library/nginx:latest");
    assert_eq!(
        d.pull("nginx:latest").await,
        want,
        "docker pull nginx:latest"
    );
    let digests = d.repo_digests("nginx:latest").await;
    assert!(
        digests.iter().any(|r| digest_part(r) == want),
        "RepoDigests {digests:?} lack {want}"
    );
    assert_served(&docker, "docker", "library/nginx");
    assert_eq!(
        upstream_hits(&k8s, "library/nginx/"),
        0,
        "k8s upstream was asked for nginx:\n{}",
        k8s.log()
    );

    // Add-a-prefix, Docker schema2: 127.0.0.1 is an insecure registry by
    // default, so the daemon talks plain HTTP to Pier.
    let want = digest_of("docker", "library/alpine:3.19");
    let reference = format!("{}/docker.io/library/alpine:3.19", pier.host());
    assert_eq!(d.pull(&reference).await, want, "docker pull {reference}");
    let digests = d.repo_digests(&reference).await;
    assert!(
        digests.iter().any(|r| digest_part(r) == want),
        "RepoDigests {digests:?} lack {want}"
    );
    assert_served(&docker, "docker", "library/alpine");

    // Synced beforehand with `pier sync`, then pulled with the upstream
    // stopped.
    let synced = std::process::Command::new(env!("CARGO_BIN_EXE_pier"))
        .args([
            "sync",
            "--server",
            &pier.url(),
            "--token",
            token,
            "alpine:3.17",
        ])
        .output()
        .unwrap();
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    docker.stop();
    let want = digest_of("docker", "library/alpine:3.17");
    assert_eq!(d.pull("alpine:3.17").await, want, "docker pull alpine:3.17");

    drop(d);
    eprintln!(
        "docker_daemon_pulls_through_registry_mirrors_and_prefix took {:?}",
        started.elapsed()
    );
}

/// The private namespace through the Docker daemon: `docker login` checks
/// the password, `docker push` and `docker pull` of a private image, and
/// Docker Hub pulls through `registry-mirrors` still work while Pier's base
/// endpoint asks for credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_logs_in_pushes_and_pulls_a_private_image() {
    if !have_tools(&["docker-registry", "dockerd", "docker", "containerd", "runc"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let password = "docker-push-pw";
    let hash = bcrypt::hash(password, 4).unwrap();
    let (pier, _data) = Pier::start(
        &[("docker.io", &docker.url())],
        &format!(
            "[private]\nprefix = \"private\"\n[[private.users]]\nname = \"ci\"\n\
             password_hash = \"{hash}\"\npush = [\"team/**\"]\n"
        ),
    );
    let dir = short_tempdir();
    let d = Dockerd::start(dir.path(), &pier.host()).await;
    let want = digest_of("docker", "library/nginx:latest");
    assert_eq!(d.pull("nginx:latest").await, want, "a mirrored pull");

    let host = pier.host();
    let wrong = run(d.cmd(&["login", &host, "-u", "ci", "-p", "not-it"])).await;
    assert!(!wrong.ok, "a wrong password logged in\n{}", wrong.both());
    assert!(wrong.both().contains("unauthorized"), "{}", wrong.both());
    let login = run(d.cmd(&["login", &host, "-u", "ci", "-p", password])).await;
    assert!(login.ok, "docker login\n{}", login.both());

    let image = format!("{host}/private/team/nginx:1.0");
    let tagged = run(d.cmd(&["tag", "nginx:latest", &image])).await;
    assert!(tagged.ok, "{}", tagged.both());
    let push = run(d.cmd(&["push", &image])).await;
    assert!(
        push.ok,
        "docker push\n{}\n{}",
        push.both(),
        d.daemon.log_tail()
    );
    // "1.0: digest: sha256:... size: N"
    let pushed = push
        .stdout
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in docker push output\n{}", push.both()))
        .to_owned();
    let removed = run(d.cmd(&["rmi", &image, "nginx:latest"])).await;
    assert!(removed.ok, "{}", removed.both());
    assert_eq!(
        d.pull(&image).await,
        pushed,
        "the pulled image is the pushed one"
    );
    let digests = d.repo_digests(&image).await;
    assert!(
        digests.iter().any(|r| digest_part(r) == pushed),
        "RepoDigests {digests:?} lack {pushed}"
    );

    // Logged out, the private image is refused.
    let out = run(d.cmd(&["logout", &host])).await;
    assert!(out.ok, "{}", out.both());
    run(d.cmd(&["rmi", &image])).await;
    let refused = run(d.cmd(&["pull", &image])).await;
    assert!(!refused.ok, "pulled a private image without credentials");
    assert!(
        refused.both().contains("unauthorized")
            || refused.both().contains("authentication required"),
        "{}",
        refused.both()
    );
}

// ---------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------

struct Containerd {
    sock: String,
    daemon: Daemon,
}

impl Containerd {
    async fn start(dir: &Path) -> Containerd {
        let sock = dir.join("c.sock").display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            ttrpc = dir.join("t.sock").display(),
            opt = dir.join("opt").display(),
        );
        let file = dir.join("containerd.toml");
        std::fs::write(&file, config).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&file).envs(no_egress_env());
        let mut c = Containerd {
            sock,
            daemon: Daemon::spawn("containerd", cmd, dir),
        };
        let sock = c.sock.clone();
        wait_ready(&mut c.daemon, || ctr_cmd(&sock, &["version"])).await;
        c
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        ctr_cmd(&self.sock, args)
    }

    /// `ctr images pull` through the mirrors in `hosts_dir`, unpacked with
    /// the native snapshotter (works on any filesystem).
    async fn pull(&self, hosts_dir: &Path, reference: &str) {
        let hosts = hosts_dir.display().to_string();
        let out = run(self.cmd(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            reference,
        ]))
        .await;
        assert!(
            out.ok,
            "ctr images pull {reference} failed\n{}\n{}",
            out.both(),
            self.daemon.log_tail()
        );
    }

    /// The digest `ctr images ls` shows for `reference`.
    async fn listed_digest(&self, reference: &str) -> String {
        let out = run(self.cmd(&["images", "ls"])).await;
        assert!(out.ok, "ctr images ls\n{}", out.both());
        // REF TYPE DIGEST SIZE PLATFORMS LABELS
        out.stdout
            .lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(reference)).then(|| cols.nth(1).unwrap_or_default().to_owned())
            })
            .unwrap_or_else(|| panic!("{reference} not in ctr images ls:\n{}", out.stdout))
    }
}

fn ctr_cmd(sock: &str, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ctr");
    c.arg("--address")
        .arg(sock)
        .args(["--namespace", "pier-test"])
        .args(args)
        .envs(no_egress_env())
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("CONTAINERD_SNAPSHOTTER");
    c
}

/// `DIR/<registry>/hosts.toml`: Pier (`mirror_url`, trusted through the CA
/// file `ca` when given) as the only pull/resolve host, and the registry
/// itself (the fallback) on a closed loopback port.
fn write_hosts_toml(dir: &Path, registry: &str, mirror_url: &str, ca: Option<&Path>) {
    let d = dir.join(registry);
    std::fs::create_dir_all(&d).unwrap();
    let ca = ca.map_or(String::new(), |f| format!("  ca = \"{}\"\n", f.display()));
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{}\"\n\n\
             [host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{ca}",
            closed_port()
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_hosts_toml_mirror() {
    if !have_tools(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let started = Instant::now();
    let docker = Upstream::start("docker");
    let k8s = Upstream::start("k8s");
    let (pier, _data) = Pier::start(
        &[
            ("docker.io", &docker.url()),
            ("registry.k8s.io", &k8s.url()),
        ],
        "",
    );
    let dir = short_tempdir();
    let hosts = dir.path().join("certs.d");
    let mirror = format!("http://{}", pier.host());
    write_hosts_toml(&hosts, "docker.io", &mirror, None);
    write_hosts_toml(&hosts, "registry.k8s.io", &mirror, None);
    let c = Containerd::start(dir.path()).await;
    eprintln!("containerd ready after {:?}", started.elapsed());

    // docker.io: HEAD /v2/library/nginx/manifests/latest?ns=docker.io first,
    // then GETs by digest; an OCI index, of which ctr takes linux/amd64.
    let reference = "docker.io/library/nginx:latest";
    c.pull(&hosts, reference).await;
    assert_eq!(
        c.listed_digest(reference).await,
        digest_of("docker", "library/nginx:latest"),
        "ctr images ls digest of {reference}"
    );

    // registry.k8s.io: the same path shape; only ns says which registry.
    // docker.io has a library/pause:3.9 with another digest, so a wrong
    // route would show up as a wrong digest as well as in the logs.
    let reference = "registry.k8s.io/pause:3.9";
    c.pull(&hosts, reference).await;
    assert_eq!(
        c.listed_digest(reference).await,
        digest_of("k8s", "pause:3.9"),
        "ctr images ls digest of {reference}"
    );

    assert_served(&docker, "docker", "library/nginx");
    assert_served(&k8s, "k8s", "pause");
    assert_eq!(
        upstream_hits(&k8s, "library/nginx/"),
        0,
        "k8s upstream was asked for nginx:\n{}",
        k8s.log()
    );
    assert_eq!(
        upstream_hits(&docker, "pause/") + upstream_hits(&docker, "library/pause/"),
        0,
        "docker upstream was asked for pause:\n{}",
        docker.log()
    );

    drop(c);
    eprintln!(
        "containerd_pulls_through_hosts_toml_mirror took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------

/// podman, as root, with storage, state, configuration and registries all
/// private to one directory.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: &Path, mirror: &str) -> Podman {
        std::fs::write(
            dir.join("registries.conf"),
            format!(
                "unqualified-search-registries = []\n\n\
                 [[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:{}\"\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n",
                closed_port()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("policy.json"),
            r#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("runroot").display(),
                dir.join("root").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n",
                dir.join("events.log").display(),
                dir.join("tmp").display()
            ),
        )
        .unwrap();
        for sub in ["tmp", "xdg-runtime", "xdg-config", "xdg-data", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Podman {
            dir: dir.to_owned(),
        }
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let d = &self.dir;
        let mut c = tokio::process::Command::new("podman");
        c.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("XDG_RUNTIME_DIR", d.join("xdg-runtime"))
            .env("XDG_CONFIG_HOME", d.join("xdg-config"))
            .env("XDG_DATA_HOME", d.join("xdg-data"))
            .env("HOME", d.join("home"))
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .envs(no_egress_env());
        c
    }

    async fn pull(&self, reference: &str) {
        let policy = self.dir.join("policy.json").display().to_string();
        let out = run(self.cmd(&["pull", "--signature-policy", &policy, reference])).await;
        assert!(out.ok, "podman pull {reference} failed\n{}", out.both());
    }

    async fn inspect(&self, reference: &str, format: &str) -> String {
        let out = run(self.cmd(&["image", "inspect", "--format", format, reference])).await;
        assert!(out.ok, "podman image inspect {reference}\n{}", out.both());
        out.stdout.trim().to_owned()
    }
}

impl Drop for Podman {
    /// podman runs no daemon; just make sure no mount outlives the test.
    fn drop(&mut self) {
        unmount_under(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_registries_conf_mirror() {
    if !have_tools(&["docker-registry", "podman"]) {
        return;
    }
    let started = Instant::now();
    let docker = Upstream::start("docker");
    let (pier, _data) = Pier::start(&[("docker.io", &docker.url())], "");
    let dir = short_tempdir();
    let podman = Podman::new(dir.path(), &pier.host());

    // Docker schema2, single arch.
    let reference = "docker.io/library/alpine:3.19";
    podman.pull(reference).await;
    assert_eq!(
        podman.inspect(reference, "{{.Digest}}").await,
        digest_of("docker", "library/alpine:3.19"),
        "podman image inspect digest of {reference}"
    );
    assert_served(&docker, "docker", "library/alpine");

    // OCI multi-arch index: podman takes linux/amd64 from it, and records
    // the index's digest.
    let reference = "docker.io/library/nginx:latest";
    podman.pull(reference).await;
    let want = digest_of("docker", "library/nginx:latest");
    let digest = podman.inspect(reference, "{{.Digest}}").await;
    let repo_digests = podman.inspect(reference, "{{json .RepoDigests}}").await;
    assert_eq!(
        digest, want,
        "podman image inspect digest of {reference} (RepoDigests {repo_digests})"
    );
    assert_served(&docker, "docker", "library/nginx");

    drop(podman);
    eprintln!(
        "podman_pulls_through_registries_conf_mirror took {:?}",
        started.elapsed()
    );
}

/// podman against the private namespace: `podman login`, `push` and `pull`,
/// with Docker Hub pulls still going through the mirror beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_logs_in_pushes_and_pulls_a_private_image() {
    if !have_tools(&["docker-registry", "podman"]) {
        return;
    }
    let docker = Upstream::start("docker");
    let password = "podman-push-pw";
    let hash = bcrypt::hash(password, 4).unwrap();
    let (pier, _data) = Pier::start(
        &[("docker.io", &docker.url())],
        &format!(
            "[private]\nprefix = \"private\"\n[[private.users]]\nname = \"ci\"\n\
             password_hash = \"{hash}\"\npush = [\"team/**\"]\n"
        ),
    );
    let dir = short_tempdir();
    let podman = Podman::new(dir.path(), &pier.host());
    podman.pull("docker.io/library/alpine:3.19").await;

    let host = pier.host();
    let login = |pw: &'static str| {
        podman.cmd(&["login", "--tls-verify=false", "-u", "ci", "-p", pw, &host])
    };
    let wrong = run(login("not-it")).await;
    assert!(!wrong.ok, "a wrong password logged in\n{}", wrong.both());
    let right = run(login(password)).await;
    assert!(right.ok, "podman login\n{}", right.both());

    let image = format!("{host}/private/team/alpine:1");
    let out = run(podman.cmd(&["tag", "docker.io/library/alpine:3.19", &image])).await;
    assert!(out.ok, "{}", out.both());
    let digest_file = dir.path().join("pushed.digest");
    let digest_path = digest_file.display().to_string();
    let out = run(podman.cmd(&[
        "push",
        "--tls-verify=false",
        "--digestfile",
        &digest_path,
        &image,
    ]))
    .await;
    assert!(out.ok, "podman push\n{}", out.both());
    let pushed = std::fs::read_to_string(&digest_file)
        .unwrap()
        .trim()
        .to_owned();
    let out = run(podman.cmd(&["rmi", &image, "docker.io/library/alpine:3.19"])).await;
    assert!(out.ok, "{}", out.both());
    let policy = dir.path().join("policy.json").display().to_string();
    let out = run(podman.cmd(&[
        "pull",
        "--tls-verify=false",
        "--signature-policy",
        &policy,
        &image,
    ]))
    .await;
    assert!(out.ok, "podman pull {image}\n{}", out.both());
    assert_eq!(podman.inspect(&image, "{{.Digest}}").await, pushed);
}

// ---------------------------------------------------------------------------
// Over HTTPS, trusting a private CA, with no insecure flag anywhere
// ---------------------------------------------------------------------------

/// Pier serving HTTPS with a certificate from a fresh test CA for the
/// mirror's names; the CA, and Pier's address as clients name it
/// (`m.pier.test:PORT`, which /etc/hosts maps to loopback).
struct HttpsPier {
    pier: Pier,
    ca: common::certs::TestCa,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl HttpsPier {
    fn start(upstreams: &[(&str, &str)]) -> HttpsPier {
        let dir = tempfile::tempdir().unwrap();
        let ca = common::certs::TestCa::new("pier runtimes CA");
        let ca_file = dir.path().join("ca.crt");
        ca.write(&ca_file);
        let issued = ca.issue(dir.path(), "server");
        let pier = Pier::start_in(
            &dir.path().join("data"),
            upstreams,
            &format!(
                "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                issued.cert.display(),
                issued.key.display()
            ),
        );
        HttpsPier {
            pier,
            ca,
            ca_file,
            _dir: dir,
        }
    }

    fn host(&self) -> String {
        format!("{DOMAIN}:{}", self.pier.port())
    }
}

/// The CA in `/etc/docker/certs.d/<host>/ca.crt`, where the Docker daemon
/// looks for a registry's CA (it has no setting for another place);
/// removed on drop.
struct DockerCertsDir(PathBuf);

impl DockerCertsDir {
    fn install(host: &str, ca: &common::certs::TestCa) -> DockerCertsDir {
        let dir = Path::new("/etc/docker/certs.d").join(host);
        ca.write(&dir.join("ca.crt"));
        DockerCertsDir(dir)
    }
}

impl Drop for DockerCertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_skopeo_pull_over_https_trusting_a_private_ca() {
    if !have_tools(&[
        "docker-registry",
        "dockerd",
        "docker",
        "containerd",
        "runc",
        "skopeo",
    ]) {
        return;
    }
    let docker = Upstream::start("docker");
    let https = HttpsPier::start(&[("docker.io", &docker.url())]);
    let host = https.host();
    // Before the CA is anywhere a client looks: skopeo refuses the mirror
    // rather than going around it.
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args(["inspect", "--retry-times=0"])
        .arg(format!("docker://{host}/docker.io/library/alpine:3.17"))
        .envs(no_egress_env());
    let out = run(cmd).await;
    assert!(!out.ok, "skopeo trusted an unknown CA\n{}", out.both());
    assert!(out.stderr.contains("certificate"), "{}", out.both());
    let _certs = DockerCertsDir::install(&host, &https.ca);
    let dir = short_tempdir();
    let d = Dockerd::start_with(dir.path(), &format!("https://{host}"), &[]).await;

    // registry-mirrors over HTTPS.
    let want = digest_of("docker", "library/nginx:latest");
    assert_eq!(d.pull("nginx:latest").await, want, "docker pull nginx");
    // Add-a-prefix: the daemon's own registry client, over HTTPS.
    let want = digest_of("docker", "library/alpine:3.19");
    let reference = format!("{host}/docker.io/library/alpine:3.19");
    assert_eq!(d.pull(&reference).await, want, "docker pull {reference}");
    assert_served(&docker, "docker", "library/nginx");
    assert_served(&docker, "docker", "library/alpine");

    // skopeo, with the CA in a cert dir and verification on.
    let certs = tempfile::tempdir().unwrap();
    https.ca.write(&certs.path().join("ca.crt"));
    let out_dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args(["copy", "--insecure-policy", "--retry-times=0"])
        .arg("--src-cert-dir")
        .arg(certs.path())
        .arg(format!("docker://{host}/docker.io/library/alpine:3.17"))
        .arg(format!("dir:{}", out_dir.path().display()))
        .envs(no_egress_env());
    let out = run(cmd).await;
    assert!(out.ok, "skopeo over HTTPS\n{}", out.both());
    assert_eq!(
        manifest_digest_in(out_dir.path()),
        digest_of("docker", "library/alpine:3.17")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_over_https_with_the_ca_in_hosts_toml() {
    if !have_tools(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let k8s = Upstream::start("k8s");
    let https = HttpsPier::start(&[("registry.k8s.io", &k8s.url())]);
    let dir = short_tempdir();
    let hosts = dir.path().join("certs.d");
    write_hosts_toml(
        &hosts,
        "registry.k8s.io",
        &format!("https://{}", https.host()),
        Some(&https.ca_file),
    );
    let c = Containerd::start(dir.path()).await;
    let reference = "registry.k8s.io/pause:3.9";
    c.pull(&hosts, reference).await;
    assert_eq!(
        c.listed_digest(reference).await,
        digest_of("k8s", "pause:3.9"),
        "ctr images ls digest of {reference}"
    );
    assert_served(&k8s, "k8s", "pause");
}

// ---------------------------------------------------------------------------
// The container image
// ---------------------------------------------------------------------------

/// Debian's docker CLI: it builds with the daemon's own BuildKit, which the
/// multi-stage Dockerfile needs to skip the toolchain stage (a newer CLI
/// wants the buildx plugin for that).
const DOCKER_BUILD_CLI: &str = "/usr/bin/docker";

/// Builds Pier's image from deploy/Dockerfile the host-binary way, from
/// this test build's binary, as `tag`.
async fn build_pier_image(d: &Dockerd, work: &Path, tag: &str) {
    // The build context the Dockerfile expects, with the root filesystem
    // made from this build's binary.
    let ctx = work.join("ctx");
    std::fs::create_dir_all(ctx.join("deploy")).unwrap();
    for f in ["deploy/Dockerfile", ".dockerignore"] {
        std::fs::copy(repo_root().join(f), ctx.join(f)).unwrap();
    }
    let rootfs = Command::new(repo_root().join("deploy/rootfs.sh"))
        .arg(env!("CARGO_BIN_EXE_pier"))
        .arg(ctx.join("target/pier-image"))
        .output()
        .unwrap();
    assert!(
        rootfs.status.success(),
        "{}",
        String::from_utf8_lossy(&rootfs.stderr)
    );
    let mut build = tokio::process::Command::new(DOCKER_BUILD_CLI);
    build
        .args([
            "build",
            "-f",
            "deploy/Dockerfile",
            "--build-arg",
            "ROOTFS=host",
        ])
        .args(["-t", tag, "."])
        .current_dir(&ctx)
        .env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_HOST", format!("unix://{}", d.sock))
        .env("DOCKER_CONFIG", &d.config_dir)
        .envs(no_egress_env());
    let out = run(build).await;
    assert!(
        out.ok,
        "docker build\n{}\n{}",
        out.both(),
        d.daemon.log_tail()
    );
}

/// The Helm chart's default rendering: pier.toml, the pod and the Pier
/// container, as tests/helm/render_check.py renders them.
fn chart_defaults(dir: &Path) -> Option<serde_json::Value> {
    let out = dir.join("defaults.json");
    let run = Command::new("python3")
        .arg(repo_root().join("tests/helm/render_check.py"))
        .arg("--pier")
        .arg(env!("CARGO_BIN_EXE_pier"))
        .arg("--dump-defaults")
        .arg(&out)
        .output()
        .unwrap();
    if run.status.code() == Some(3) {
        assert!(!strict(), "the chart cannot be rendered: {:?}", run);
        eprintln!("SKIPPED: helm-python-sdk is missing (tests/setup.sh installs it)");
        return None;
    }
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    Some(serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_built_from_a_host_binary_runs_as_the_chart_expects_and_serves_a_pull() {
    if !have_tools(&[
        "docker-registry",
        "dockerd",
        "docker",
        "containerd",
        "runc",
        "python3",
    ]) || !Path::new(DOCKER_BUILD_CLI).exists()
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let Some(chart) = chart_defaults(work.path()) else {
        return;
    };
    let container = &chart["container"];
    let pod_security = &chart["pod"]["securityContext"];

    let port = free_port();
    let docker = Upstream::start("docker");
    let dir = short_tempdir();
    let d = Dockerd::start(dir.path(), &format!("127.0.0.1:{port}")).await;
    build_pier_image(&d, work.path(), "pier:test").await;

    // What the image says of itself agrees with the chart's pod spec.
    let inspect = run(d.cmd(&["image", "inspect", "pier:test"])).await;
    assert!(inspect.ok, "{}", inspect.both());
    let image: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let config = &image[0]["Config"];
    let user = format!(
        "{}:{}",
        pod_security["runAsUser"], pod_security["runAsGroup"]
    );
    assert_eq!(
        config["User"],
        user.as_str(),
        "image user vs the chart's runAsUser"
    );
    assert_ne!(pod_security["runAsUser"], 0);
    let port_name = format!("{}/tcp", container["ports"][0]["containerPort"]);
    assert!(
        config["ExposedPorts"].get(&port_name).is_some(),
        "{port_name} not exposed: {config}"
    );
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/pier");
    assert!(
        config["Healthcheck"].is_null(),
        "probes are the orchestrator's"
    );
    assert!(container["lifecycle"]["preStop"].get("exec").is_none());

    // Run it as the chart would: its arguments, its user, a read-only root
    // filesystem, the config file and data volume at the chart's paths.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let config_dir = mounts
        .iter()
        .find(|m| m.starts_with("/etc/"))
        .expect("a config mount");
    let conf = work.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("pier.toml"), chart["pier_toml"].as_str().unwrap()).unwrap();
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        "pier-image-test".into(),
        "--network".into(),
        "host".into(),
        "--user".into(),
        user.clone(),
        "-v".into(),
        format!("{}:{config_dir}:ro", conf.display()),
        "-e".into(),
        format!("PIER_LISTEN=127.0.0.1:{port}"),
        "-e".into(),
        format!("PIER_UPSTREAMS__DOCKER_IO__ENDPOINTS={}", docker.url()),
    ];
    if container["securityContext"]["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    for m in mounts.iter().filter(|m| *m != config_dir) {
        args.push("--mount".into());
        args.push(format!("type=volume,dst={m}"));
    }
    args.push("pier:test".into());
    args.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = run(d.cmd(&argv)).await;
    assert!(started.ok, "docker run\n{}", started.both());
    let logs = || async { run(d.cmd(&["logs", "pier-image-test"])).await.both() };

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "never ready\n{}", logs().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    // Not root: the process's real and effective ids, from /proc.
    let pid = run(d.cmd(&["inspect", "-f", "{{.State.Pid}}", "pier-image-test"])).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.stdout.trim())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let want_uid = pod_security["runAsUser"].to_string();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == want_uid),
        "{uid_line}"
    );

    // And a pull through it, by the same daemon (registry-mirrors).
    let want = digest_of("docker", "library/nginx:latest");
    assert_eq!(d.pull("nginx:latest").await, want, "{}", logs().await);
    assert_served(&docker, "docker", "library/nginx");
    let _ = run(d.cmd(&["rm", "-f", "pier-image-test"])).await;
}

// ---------------------------------------------------------------------------
// deploy/docker-compose.yml
// ---------------------------------------------------------------------------

/// The libraries `binary` links and their loader, as `ldd` names them.
fn linked_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            match l.split_once("=> ") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }
        })
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// What a stand-in image holds besides the binaries' libraries.
struct Standin<'a> {
    /// Host executable, path in the image.
    binaries: &'a [(&'a str, &'a str)],
    dirs: &'a [&'a str],
    /// Symlink in the image, its target.
    links: &'a [(&'a str, &'a str)],
    /// The image's CMD, as JSON.
    cmd: Option<&'a str>,
}

/// An image of this host's binaries with the libraries they link and a
/// passwd naming root and nobody, imported into `d` as `tag`: a stand-in
/// for an image nothing here can pull.
async fn standin_image(d: &Dockerd, work: &Path, tag: &str, what: Standin<'_>) {
    let Standin {
        binaries,
        dirs,
        links,
        cmd,
    } = what;
    let name = tag.replace([':', '/'], "_");
    let root = work.join(&name);
    for (src, dst) in binaries {
        let dst = root.join(dst.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, &dst).unwrap();
        for lib in linked_libraries(Path::new(src)) {
            let into = root.join(lib.strip_prefix("/").unwrap());
            std::fs::create_dir_all(into.parent().unwrap()).unwrap();
            std::fs::copy(&lib, &into).unwrap();
        }
    }
    for dir in dirs.iter().chain(&["/etc", "/tmp", "/run"]) {
        std::fs::create_dir_all(root.join(dir.trim_start_matches('/'))).unwrap();
    }
    for (link, target) in links {
        std::os::unix::fs::symlink(target, root.join(link.trim_start_matches('/'))).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let tar = work.join(format!("{name}.tar"));
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let tar_arg = tar.display().to_string();
    let cmd = cmd.map(|c| format!("CMD {c}"));
    let mut args = vec![
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ];
    if let Some(cmd) = &cmd {
        args.extend(["--change", cmd.as_str()]);
    }
    args.extend([tar_arg.as_str(), tag]);
    let out = run(d.cmd(&args)).await;
    assert!(out.ok, "docker import {tag}\n{}", out.both());
}

/// The executable `tool` runs on this host (through a pyenv shim, for
/// the `weed` that tests/setup.sh installs from PyPI).
fn real_path_of(tool: &str) -> String {
    let found = |cmd: &str| {
        let out = Command::new("sh").args(["-c", cmd]).output().ok()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let path = std::fs::canonicalize(path).ok()?;
        let head = std::fs::read(&path).ok()?;
        head.starts_with(b"\x7fELF")
            .then(|| path.display().to_string())
    };
    found(&format!("command -v {tool}"))
        .or_else(|| found(&format!("pyenv which {tool}")))
        .unwrap_or_else(|| panic!("no executable {tool} on this host"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_runs_two_replicas_behind_nginx_and_serves_a_pull() {
    if !have_tools(&[
        "docker-registry",
        "dockerd",
        "docker",
        "docker-compose",
        "containerd",
        "runc",
        "redis-server",
        "nginx",
        "weed",
        "busybox",
    ]) || !Path::new(DOCKER_BUILD_CLI).exists()
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = short_tempdir();
    let d = Dockerd::start(dir.path(), &format!("127.0.0.1:{port}")).await;

    // The images: Pier's from its Dockerfile; Redis and nginx from
    // Debian's binaries under the compose file's names; SeaweedFS (with
    // busybox for its init's shell) and an upstream registry.
    build_pier_image(&d, work.path(), "pier:dev").await;
    let (redis, nginx, weed, busybox) = (
        real_path_of("redis-server"),
        real_path_of("nginx"),
        real_path_of("weed"),
        real_path_of("busybox"),
    );
    standin_image(
        &d,
        work.path(),
        "redis:7-alpine",
        Standin {
            binaries: &[(&redis, "/usr/local/bin/redis-server")],
            dirs: &["/data"],
            links: &[],
            cmd: Some(r#"["redis-server"]"#),
        },
    )
    .await;
    standin_image(
        &d,
        work.path(),
        "nginx:1.27-alpine",
        Standin {
            binaries: &[(&nginx, "/usr/sbin/nginx")],
            dirs: &[
                "/etc/nginx",
                "/var/log/nginx",
                "/var/lib/nginx/body",
                "/var/lib/nginx/proxy",
                "/var/lib/nginx/fastcgi",
                "/var/lib/nginx/uwsgi",
                "/var/lib/nginx/scgi",
                "/usr/share/nginx",
            ],
            links: &[],
            cmd: Some(r#"["nginx", "-g", "daemon off;"]"#),
        },
    )
    .await;
    standin_image(
        &d,
        work.path(),
        "pier-standin/seaweedfs",
        Standin {
            binaries: &[(&weed, "/usr/local/bin/weed"), (&busybox, "/bin/busybox")],
            dirs: &["/data"],
            links: &[
                ("/bin/sh", "busybox"),
                ("/bin/grep", "busybox"),
                ("/bin/sleep", "busybox"),
            ],
            cmd: None,
        },
    )
    .await;
    standin_image(
        &d,
        work.path(),
        "pier-standin/registry",
        Standin {
            binaries: &[("/usr/bin/docker-registry", "/usr/bin/docker-registry")],
            dirs: &["/var/lib/registry"],
            links: &[],
            cmd: None,
        },
    )
    .await;

    // What the override mounts: SeaweedFS's keys (the compose file's MinIO
    // keys), and the upstream's config and a copy of its images.
    let standin = work.path().join("standin");
    std::fs::create_dir_all(&standin).unwrap();
    std::fs::write(
        standin.join("s3.json"),
        r#"{"identities":[{"name":"pier","credentials":[{"accessKey":"pier","secretKey":"pier-secret-key"}],"actions":["Admin","Read","Write","List","Tagging"]}]}"#,
    )
    .unwrap();
    std::fs::write(
        standin.join("registry.yml"),
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /var/lib/registry\n\
         http:\n  addr: 0.0.0.0:5000\nlog:\n  accesslog:\n    disabled: false\n",
    )
    .unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(fixtures().join("registries/docker"))
        .arg(standin.join("registry"))
        .status()
        .unwrap();
    assert!(copied.success());

    let compose = |args: &[&str]| {
        let mut c = tokio::process::Command::new("docker-compose");
        c.arg("-f")
            .arg(repo_root().join("deploy/docker-compose.yml"))
            .arg("-f")
            .arg(repo_root().join("tests/compose/offline.yml"))
            .args(["-p", "piercomposetest"])
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", d.sock))
            .env("DOCKER_CONFIG", &d.config_dir)
            .env("PIER_PORT", port.to_string())
            .env("STANDIN_DIR", &standin)
            .envs(no_egress_env());
        c
    };
    let up = run(compose(&["up", "-d", "--no-build"])).await;
    let logs = || async {
        run(compose(&["logs", "--no-color", "--tail", "30"]))
            .await
            .both()
    };
    assert!(
        up.ok,
        "docker-compose up\n{}\n{}\n{}",
        up.both(),
        logs().await,
        d.daemon.log_tail()
    );

    // Ready through the balancer, several times in a row: both replicas
    // answer (round robin).
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ready_in_a_row = 0;
    while ready_in_a_row < 4 {
        let ok = match http.get(format!("{base}/readyz")).send().await {
            Ok(r) => r.status() == 200,
            Err(_) => false,
        };
        ready_in_a_row = if ok { ready_in_a_row + 1 } else { 0 };
        assert!(
            Instant::now() < deadline,
            "the stack never became ready\n{}",
            logs().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A pull through nginx and the replicas, from the upstream.
    let want = digest_of("docker", "library/alpine:3.19");
    let reference = format!("127.0.0.1:{port}/docker.io/library/alpine:3.19");
    assert_eq!(d.pull(&reference).await, want, "{}", logs().await);
    let upstream_log = run(compose(&["logs", "--no-color", "upstream"]))
        .await
        .both();
    assert!(
        upstream_log.contains("GET /v2/library/alpine/blobs/"),
        "the upstream was not asked for alpine's blobs:\n{upstream_log}"
    );

    let down = run(compose(&["down", "-v", "--remove-orphans"])).await;
    assert!(down.ok, "docker-compose down\n{}", down.both());
}
