#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The `pier` command itself: `check-config` and `serve` with no config.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn pier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pier"))
}

/// `pier ARGS --config FILE`, which must succeed; what it printed.
fn run_with_config(file: &std::path::Path, args: &[&str]) -> String {
    let out = pier()
        .args(args)
        .arg("--config")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pier.toml");
    std::fs::write(
        &file,
        "[[upstreams]]\nregistry = \"docker.io\"\nusername = \"me\"\npassword = \"hunter2\"\n",
    )
    .unwrap();
    let out = pier().arg("check-config").arg(&file).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"0.0.0.0:5000\""), "{text}");
    assert!(text.contains("registry = \"gcr.io\""));
    assert!(!text.contains("hunter2") && text.contains("********"));

    // PIER_CONFIG names the file; PIER_* variables override it.
    let out = pier()
        .arg("check-config")
        .env("PIER_CONFIG", &file)
        .env("PIER_LISTEN", "127.0.0.1:7000")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("listen = \"127.0.0.1:7000\"") && text.contains("********"),
        "{text}"
    );
}

#[test]
fn check_config_names_every_bad_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pier.toml");
    std::fs::write(
        &file,
        "listen = \"nope\"\n[[upstreams]]\nregistry = \"docker.io\"\nendpoints = [\"ftp://x\"]\ntag_ttl = \"1m\"\n[[routes]]\npattern = \"x\"\nregistry = \"nowhere.example\"\n",
    )
    .unwrap();
    let out = pier().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in [
        "listen:",
        "upstreams[0] (docker.io).endpoints[0]:",
        "routes[0].registry:",
    ] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    let out = pier()
        .arg("check-config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_without_a_config_keeps_its_data_under_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = pier()
        .arg("serve")
        .current_dir(dir.path())
        .env("PIER_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("PIER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{port}/healthz"));
    let out = Command::new("curl")
        .args(["-s", "-i", &format!("http://127.0.0.1:{port}/v2/")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0")
    );
    assert!(dir.path().join("data/meta.redb").exists());
    assert!(dir.path().join("data/blobs").is_dir());
    // SIGTERM stops it cleanly.
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pier did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Started with a soft limit of 256 open files (as some hosts start
/// services), `pier serve` raises it to the hard limit and logs the limit
/// in force, and it queues connections as deep as the kernel allows: a
/// fleet pulling at once is thousands of connections.
#[test]
fn serve_raises_the_open_file_limit_to_the_hard_one_and_queues_deep() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("pier.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} serve",
            env!("CARGO_BIN_EXE_pier")
        ))
        .current_dir(dir.path())
        .env("PIER_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("PIER_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{port}/healthz"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    // For a listening socket, `ss` shows the accept queue's length as
    // Send-Q: as deep as the kernel allows, not tokio's 1,024.
    let listening = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The kernel caps the queue at somaxconn.
    let queue = listening.split_whitespace().nth(2);
    assert_eq!(
        queue,
        Some(somaxconn.min(65535).to_string().as_str()),
        "{listening}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("open file limit") && l.contains(&format!("open_files={soft}"))),
        "{logged}"
    );
}

/// A store directory holding `n` blobs of `size` bytes, written oldest
/// first; their paths.
fn store_with_blobs(root: &std::path::Path, n: u8, size: usize) -> Vec<std::path::PathBuf> {
    use sha2::Digest as _;
    (0..n)
        .map(|seed| {
            let bytes = vec![seed; size];
            let hex = hex::encode(sha2::Sha256::digest(&bytes));
            let path = root.join("blobs/sha256").join(&hex[..2]).join(&hex);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            path
        })
        .collect()
}

#[test]
fn cache_stats_and_gc_bring_the_store_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let paths = store_with_blobs(&data, 5, 1 << 20);
    let file = dir.path().join("pier.toml");
    std::fs::write(
        &file,
        format!(
            "[storage]\npath = \"{}\"\n[cache]\nmax_size = \"3MiB\"\nmin_free = 0\n",
            data.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| run_with_config(&file, args);
    let stats = run(&["cache", "stats"]);
    assert!(stats.contains("blobs: 5 (5.0 MiB)"), "{stats}");
    assert!(stats.contains("166.7 % of max_size"), "{stats}");

    // Down to 90 % of 3 MiB: the three least recently served go.
    let plan = run(&["gc", "--dry-run"]);
    assert!(plan.contains("would remove: 3 blobs, 3.0 MiB"), "{plan}");
    assert!(paths.iter().all(|p| p.exists()));
    let done = run(&["gc"]);
    assert!(done.contains("removed: 3 blobs, 3.0 MiB"), "{done}");
    let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
    assert_eq!(left, [false, false, false, true, true]);
    assert!(run(&["gc"]).contains("within budget: nothing to remove"));
    assert!(run(&["cache", "stats"]).contains("blobs: 2 (2.0 MiB)"));
}

/// The bucket's budget from the command line, against the same bucket and
/// Redis replicas use: stats, a dry run that removes nothing, and a pass
/// that removes the least recently stored blobs no metadata knows of.
#[test]
fn cache_stats_and_gc_work_on_the_bucket() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(s3), Some(redis)) = (env("PIER_TEST_S3_ENDPOINT"), env("PIER_TEST_REDIS_URL")) else {
        assert!(
            std::env::var("PIER_TEST_STRICT").as_deref() != Ok("1"),
            "backends not running"
        );
        eprintln!("SKIPPED: backends not running: run tests/run.sh");
        return;
    };
    use sha2::Digest as _;
    let ns = format!("gc{:x}", rand::random::<u64>());
    let keys: Vec<String> = (0..5u8)
        .map(|seed| {
            let bytes = vec![seed; 1 << 20];
            let key = format!(
                "{ns}/blobs/sha256/{}",
                hex::encode(sha2::Sha256::digest(&bytes))
            );
            common::s3_put(&key, &bytes);
            // The bucket dates objects to the second: one a second.
            std::thread::sleep(Duration::from_millis(1100));
            key
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pier.toml");
    std::fs::write(
        &file,
        format!(
            "[storage]\nkind = \"s3\"\nbucket = \"{}\"\nprefix = \"{ns}\"\nendpoint = \"{s3}\"\n\
             access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
             [metadata]\nkind = \"redis\"\nurl = \"{redis}\"\nkey_prefix = \"{ns}:\"\n\
             [cache]\nmax_size = \"3MiB\"\n",
            env("PIER_TEST_S3_BUCKET").unwrap_or_else(|| "pier-test".into()),
            env("PIER_TEST_S3_ACCESS_KEY").unwrap_or_default(),
            env("PIER_TEST_S3_SECRET_KEY").unwrap_or_default(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| run_with_config(&file, args);
    let stats = run(&["cache", "stats"]);
    assert!(stats.contains("store: s3 "), "{stats}");
    assert!(stats.contains("blobs: 5 (5.0 MiB)"), "{stats}");
    assert!(stats.contains("166.7 % of max_size"), "{stats}");

    let plan = run(&["gc", "--dry-run"]);
    assert!(plan.contains("would remove: 3 blobs, 3.0 MiB"), "{plan}");
    assert!(keys.iter().all(|k| common::s3_has(k)));
    let done = run(&["gc"]);
    assert!(done.contains("removed: 3 blobs, 3.0 MiB"), "{done}");
    let left: Vec<bool> = keys.iter().map(|k| common::s3_has(k)).collect();
    assert_eq!(left, [false, false, false, true, true]);
    assert!(run(&["gc"]).contains("within budget: nothing to remove"));
    assert!(run(&["cache", "stats"]).contains("blobs: 2 (2.0 MiB)"));
}

#[test]
fn users_hash_prints_a_bcrypt_hash_of_stdin() {
    use std::io::Write as _;
    let mut child = pier()
        .args(["users", "hash", "--cost", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a pass phrase\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$2b$04$") && hash.len() == 60, "{hash}");
    // One line ending is not part of the password.
    assert!(bcrypt::verify("a pass phrase", hash).unwrap());
    assert!(!bcrypt::verify("a pass phrase\n", hash).unwrap());
    // A hash the config takes as it is.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pier.toml");
    std::fs::write(
        &file,
        format!("[private]\n[[private.users]]\nname = \"ci\"\npassword_hash = \"{hash}\"\n"),
    )
    .unwrap();
    let out = pier().arg("check-config").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("[private]"), "{printed}");
    assert!(!printed.contains(hash), "the hash was printed");

    let empty = pier()
        .args(["users", "hash"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("stdin"));
}
