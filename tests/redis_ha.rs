#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Redis as production runs it, with real `redis-server` processes on
//! loopback: over TLS with a private CA (`rediss://`, `metadata.tls_ca`), a
//! master named by Sentinel that fails over mid-run, and a three-master
//! Redis Cluster. Blobs go to the shared S3 bucket of `tests/backends.sh`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::TestCa;
use common::fake::{Blob, Fake, digest, random_bytes};
use common::*;

/// A redis-server (or sentinel) of the test's own, killed on drop.
struct Node {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// `redis-server` with `args` after a loopback, no-persistence base.
    fn redis(port: u16, args: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(args);
        if !args.contains(&"--tls-port") {
            cmd.args(["--port", &port.to_string()]);
        }
        Node::spawn(cmd, port, dir)
    }

    /// A sentinel watching the master on `master_port` as `mymaster`.
    fn sentinel(port: u16, master_port: u16) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 10000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel");
        Node::spawn(cmd, port, dir)
    }

    fn spawn(mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Node {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_port(port, "redis");
        Node {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    /// SIGKILL, as a crashed host.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p PORT ARGS...`, its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ok` for up to `secs` seconds.
async fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn namespace(what: &str) -> String {
    format!("{what}-{:x}", rand::random::<u32>())
}

/// The scaled-out config with `lines` added to `[metadata]`.
fn with_metadata(config: String, lines: &str) -> String {
    config.replace("[metadata]\n", &format!("[metadata]\n{lines}"))
}

/// A master, its replica, and three sentinels watching them.
struct SentinelSet {
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
}

impl SentinelSet {
    /// Returns once failover is possible: the replica in sync, and the
    /// sentinels known to each other (two of three must agree).
    async fn start(mp: u16, rp: u16) -> SentinelSet {
        let master = Node::redis(mp, &[]);
        let replica = Node::redis(rp, &["--replicaof", "127.0.0.1", &mp.to_string()]);
        let sentinels: Vec<Node> = (0..3).map(|_| Node::sentinel(free_port(), mp)).collect();
        wait_for("the replica to sync", 20, || {
            cli(rp, &["INFO", "replication"]).contains("master_link_status:up")
        })
        .await;
        for s in &sentinels {
            wait_for("the sentinels to find each other", 30, || {
                let info = cli(s.port, &["SENTINEL", "MASTER", "mymaster"]);
                let mut lines = info.lines();
                while let Some(l) = lines.next() {
                    if l == "num-other-sentinels" {
                        return lines.next() == Some("2");
                    }
                }
                false
            })
            .await;
        }
        SentinelSet {
            master,
            replica,
            sentinels,
        }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// Waits until the sentinels name the replica as the master.
    async fn wait_promoted(&self) {
        let promoted = self.replica.port.to_string();
        wait_for("the sentinels to promote the replica", 60, || {
            cli(
                self.sentinels[0].port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
            )
            .lines()
            .nth(1)
                == Some(promoted.as_str())
        })
        .await;
    }
}

/// A replica on the shared bucket with its metadata in the Redis at
/// `url`, under `ns`; its data directory lives as long as it does. `None`
/// (skipping) without the shared backends.
struct Replica {
    pier: Pier,
    _data: tempfile::TempDir,
}

impl std::ops::Deref for Replica {
    type Target = Pier;
    fn deref(&self) -> &Pier {
        &self.pier
    }
}

fn replica(ns: &str, upstream: (&str, &str), url: &str) -> Option<Replica> {
    let data = tempfile::tempdir().unwrap();
    let pier = Pier::start_scaled_with(data.path(), ns, &[upstream], "", Some(url), "")?;
    Some(Replica { pier, _data: data })
}

async fn readyz(pier: &Pier) -> u16 {
    reqwest::get(format!("{}/readyz", pier.url()))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Pulls `image` of the `docker` fixtures through `pier` and checks its
/// digest.
async fn pull(pier: &Pier, image: &str) {
    let copy = pulled_copy(&format!("{}/docker.io/{image}", pier.host())).await;
    assert_eq!(
        manifest_digest_in(copy.path()),
        digest_of("docker", image),
        "{image}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_carries_the_metadata() {
    if !have_tools(&["redis-server", "docker-registry", "skopeo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("pier redis CA");
    let ca_file = dir.path().join("ca.crt");
    ca.write(&ca_file);
    let issued = ca.issue(dir.path(), "redis");
    let port = free_port();
    let (cert, key, ca_arg) = (
        issued.cert.display().to_string(),
        issued.key.display().to_string(),
        ca_file.display().to_string(),
    );
    let _redis = Node::redis(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca_arg,
            "--tls-auth-clients",
            "no",
        ],
    );
    let upstream = Upstream::start("docker");
    let ns = namespace("rediss");
    let url = format!("rediss://127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let Some(config) = scaled_config(
        data.path(),
        &ns,
        &[("docker.io", &upstream.url())],
        "",
        Some(&url),
        "",
    ) else {
        return;
    };
    let trusting = with_metadata(
        config.clone(),
        &format!("tls_ca = \"{}\"\n", ca_file.display()),
    );
    let pier = Pier::start_raw(data.path(), &trusting);
    assert_eq!(readyz(&pier).await, 200);
    pull(&pier, "library/alpine:3.19").await;

    // The tag went to the TLS server, read back over TLS with the same CA.
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem.as_bytes().to_vec()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:t:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        keys.iter().any(|k| k.contains("library/alpine")),
        "{keys:?}"
    );

    // A replica without the CA checks against the public roots, refuses
    // the server's certificate, and is not ready.
    let data2 = tempfile::tempdir().unwrap();
    let untrusting = Pier::start_raw(data2.path(), &config);
    assert_eq!(readyz(&untrusting).await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_moves_pier_to_the_new_master() {
    if !have_tools(&["redis-server", "redis-cli", "docker-registry", "skopeo"]) {
        return;
    }
    let (mp, rp) = (free_port(), free_port());
    let mut set = SentinelSet::start(mp, rp).await;
    let url = set.url();
    let upstream = Upstream::start("docker");
    let ns = namespace("sentinel");
    let Some(pier) = replica(&ns, ("docker.io", &upstream.url()), &url) else {
        return;
    };
    pull(&pier, "library/alpine:3.19").await;
    assert!(cli(mp, &["KEYS", &format!("{ns}:t:*")]).contains("library/alpine"));

    // The master dies. A pull during the failover still works (what
    // metadata cannot be had is fetched from upstream)...
    set.master.kill();
    pull(&pier, "library/alpine:3.18").await;
    set.wait_promoted().await;
    // ...and once a new master is named, Pier writes to it, without a
    // restart.
    // A sentinel may not know the new master yet when Pier asks it; a tag
    // pulled then is kept in the process only, so each try pulls a tag not
    // pulled before.
    let deadline = Instant::now() + Duration::from_secs(20);
    for tag in ["3.17", "3.16", "3.15"].iter().cycle() {
        pull(&pier, &format!("library/alpine:{tag}")).await;
        let keys = cli(set.replica.port, &["KEYS", &format!("{ns}:t:*")]);
        if ["3.17", "3.16", "3.15"]
            .iter()
            .any(|t| keys.contains(&format!("library/alpine:{t}")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no tag pulled after the failover is on the new master: {keys}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(readyz(&pier).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_in_failover_means_two_fetches_never_a_wrong_byte() {
    // Redis replicates asynchronously: a lease taken on the master just
    // before it dies may never reach the replica that takes over. Then a
    // second replica finds no lease and fetches the blob too. Both fetches
    // are verified before anything is kept, so the cost is one upstream
    // GET more, never a wrong byte. The lease is deleted on the new master
    // to make that state certain rather than likely.
    if !have_tools(&["redis-server", "redis-cli"]) {
        return;
    }
    let set = SentinelSet::start(free_port(), free_port()).await;
    let fake = Fake::start();
    let body = random_bytes(3 * 1024 * 1024, 77);
    let d = digest(&body);
    // Long enough for the failover to finish while the first fetch runs.
    fake.blob(&d, Blob::Slow(body.clone(), Duration::from_secs(25)));
    let ns = namespace("lost-lease");
    let mut piers = Vec::new();
    for _ in 0..2 {
        let Some(pier) = replica(&ns, ("corp.example", &fake.url()), &set.url()) else {
            return;
        };
        piers.push(pier);
    }
    let path = format!("/v2/corp.example/team/app/blobs/{d}");
    let http = reqwest::Client::new();
    let first = http
        .get(format!("{}{path}", piers[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let lease = format!("{ns}:lease:*");
    wait_for("the first replica's lease", 10, || {
        !cli(set.master.port, &["KEYS", &lease]).trim().is_empty()
    })
    .await;

    let mut set = set;
    set.master.kill();
    set.wait_promoted().await;
    for key in cli(set.replica.port, &["KEYS", &lease]).lines() {
        cli(set.replica.port, &["DEL", key]);
    }
    let second = http
        .get(format!("{}{path}", piers[1].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let (a, b) = tokio::join!(first.bytes(), second.bytes());
    assert_eq!(a.unwrap(), body);
    assert_eq!(b.unwrap(), body);
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 2);
    // What is kept is the verified blob, whichever fetch stored it.
    assert!(wait_s3_has(&format!("{ns}/blobs/sha256/{}", &d[7..])).await);
    for pier in &piers {
        let again = http
            .get(format!("{}{path}", pier.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(again.bytes().await.unwrap(), body);
    }
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_holds_leases_and_metadata() {
    if !have_tools(&["redis-server", "redis-cli", "docker-registry", "skopeo"]) {
        return;
    }
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes: Vec<Node> = ports
        .iter()
        .map(|p| {
            Node::redis(
                *p,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{p}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for n in &nodes {
        wait_for("the cluster to agree", 30, || {
            cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
        })
        .await;
    }

    // Two seeds; the third master is found from them.
    let url = format!("redis://{},{}", addrs[0], addrs[1]);
    let upstream = Upstream::start("docker");
    let ns = namespace("cluster");
    let mut piers = Vec::new();
    for _ in 0..2 {
        let Some(pier) = replica(&ns, ("docker.io", &upstream.url()), &url) else {
            return;
        };
        piers.push(pier);
    }
    for pier in &piers {
        assert_eq!(readyz(pier).await, 200);
    }
    // Ten cold pulls of one image at once, split between the replicas: one
    // upstream GET per blob, through leases held in the cluster.
    let image = "library/big:latest";
    let pulls = (0..10).map(|i| {
        let host = piers[i % 2].host();
        async move {
            let dir = tempfile::tempdir().unwrap();
            let run = skopeo_copy(&format!("{host}/docker.io/{image}"), dir.path(), &[]).await;
            assert!(run.ok, "{}", run.stderr);
            manifest_digest_in(dir.path())
        }
    });
    for got in futures::future::join_all(pulls).await {
        assert_eq!(got, digest_of("docker", image));
    }
    // A config and two layers.
    upstream.assert_one_get_per_blob("library/big", 3);

    // The tags are in the cluster: with the upstream gone, a replica that
    // has seen nothing yet serves the image (manifests from the cluster,
    // blobs from the bucket).
    let mut upstream = upstream;
    upstream.stop();
    let fresh = replica(&ns, ("docker.io", &upstream.url()), &url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = skopeo_copy(
        &format!("{}/docker.io/{image}", fresh.host()),
        dir.path(),
        &[],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(manifest_digest_in(dir.path()), digest_of("docker", image));

    // Every key carries the prefix as a hash tag: one slot, on one master.
    let pattern = format!("*{ns}*");
    let holding: Vec<(u16, String)> = nodes
        .iter()
        .map(|n| (n.port, cli(n.port, &["KEYS", &pattern])))
        .filter(|(_, keys)| !keys.trim().is_empty())
        .collect();
    assert_eq!(
        holding.len(),
        1,
        "keys spread over the cluster: {holding:?}"
    );
    let keys = &holding[0].1;
    assert!(
        keys.lines().all(|k| k.starts_with(&format!("{{{ns}:}}"))),
        "{keys}"
    );
    assert!(keys.contains("library/big"), "{keys}");
}
