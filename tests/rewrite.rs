#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `pier rewrite` against golden files: real-world manifests of every
//! workload kind (tests/rewrite/*.yaml), rewritten in both forms.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::repo_root;

fn pier(args: &[&str], stdin: Option<&str>) -> (String, String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pier"))
        .arg("rewrite")
        .args(args)
        .current_dir(repo_root())
        .env_remove("PIER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("tests/rewrite").join(name)).unwrap()
}

/// Each manifest, rewritten in each form, is exactly its golden file: the
/// images of containers, init containers and ephemeral containers in every
/// kind and in a `List` change, with tags and digests kept; comments,
/// quoting, flow style, anchors, text beyond ASCII and everything else
/// stay; images already on the mirror, one from a registry the mirror does
/// not serve, and one written as a block scalar are left alone (named on
/// stderr).
#[test]
fn manifests_of_every_workload_kind_match_their_golden_files() {
    for file in ["workloads", "list", "mixed"] {
        for (flag, form) in [("--prefix", "prefix"), ("--host-prefix", "host-prefix")] {
            let input = format!("tests/rewrite/{file}.yaml");
            let (out, err, ok) = pier(&[flag, "m.example.com", &input], None);
            assert!(ok, "{err}");
            assert_eq!(out, golden(&format!("{file}.{form}.yaml")), "{file} {form}");
            let warned = match file {
                "workloads" => {
                    "left registry.local:5000/team/migrate:42 as it is: registry.local:5000 is not an upstream"
                }
                "mixed" => "left busybox as it is: written as a block scalar",
                _ => "",
            };
            if warned.is_empty() {
                assert!(err.is_empty(), "{err}");
            } else {
                assert!(err.contains(warned), "{err}");
            }
        }
    }
}

/// Windows line ends (and text beyond ASCII in a script before the images)
/// change nothing but the images.
#[test]
fn crlf_line_ends_are_kept() {
    let crlf = |t: String| t.replace('\n', "\r\n");
    let (out, err, ok) = pier(
        &["--prefix", "m.example.com"],
        Some(&crlf(golden("mixed.yaml"))),
    );
    assert!(ok, "{err}");
    assert_eq!(out, crlf(golden("mixed.prefix.yaml")));
}

/// Stdin works like a file; several files come out as one stream of
/// documents; a mirror host with a port is kept as written.
#[test]
fn stdin_several_files_and_a_port_in_the_mirror_host() {
    let (out, _, ok) = pier(
        &["--prefix", "m.example.com:8443"],
        Some("kind: Pod\nspec:\n  containers:\n    - image: nginx:1.27 # web\n"),
    );
    assert!(ok);
    assert_eq!(
        out,
        "kind: Pod\nspec:\n  containers:\n    - image: m.example.com:8443/docker.io/library/nginx:1.27 # web\n"
    );
    let (out, _, ok) = pier(
        &[
            "--prefix",
            "m.example.com",
            "tests/rewrite/list.yaml",
            "tests/rewrite/workloads.yaml",
        ],
        None,
    );
    assert!(ok);
    assert_eq!(
        out,
        format!(
            "{}---\n{}",
            golden("list.prefix.yaml"),
            golden("workloads.prefix.yaml")
        )
    );
    let (_, err, ok) = pier(&["--prefix", "m.example.com"], Some("a: [unclosed\n"));
    assert!(!ok);
    assert!(err.contains("not YAML"), "{err}");
    let (_, err, ok) = pier(&["tests/rewrite/list.yaml"], None);
    assert!(!ok, "a form is required: {err}");
}
