#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The private namespace (`[private]`): pushes and pulls by real clients
//! (skopeo here; the Docker daemon in `runtimes.rs`), the authentication
//! cases, upload sessions by hand (chunks, resuming, a wrong digest,
//! lapsing), and chunks of one upload landing on two replicas behind a
//! round-robin nginx.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use reqwest::{Method, StatusCode};
use sha2::Digest as _;

const PASSWORD: &str = "s3cret-pw";

/// `[private]` with `ci` (pushes `team/**`), `reader` (pulls only) and
/// `teamonly` (pulls `team/**` only); `extra` lines go in `[private]`.
fn private_config(extra: &str) -> String {
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    format!(
        "[private]\nprefix = \"private\"\n{extra}\n\
         [[private.users]]\nname = \"ci\"\npassword_hash = \"{hash}\"\npush = [\"team/**\"]\n\
         [[private.users]]\nname = \"reader\"\npassword_hash = \"{hash}\"\n\
         [[private.users]]\nname = \"teamonly\"\npassword_hash = \"{hash}\"\npull = [\"team/**\"]\n"
    )
}

/// Pier with the private namespace and one upstream nobody answers at.
fn start(extra: &str) -> (Pier, tempfile::TempDir) {
    Pier::start(
        &[("r.pier.test", &format!("http://127.0.0.1:{}", free_port()))],
        &private_config(extra),
    )
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn layout(name: &str) -> PathBuf {
    fixtures().join("layouts/docker/library").join(name)
}

/// Pushes the OCI layout at `src` to `dest` (`docker://…`) as `creds`
/// (`user:password`); (success, stderr).
async fn push(src: &Path, dest: &str, creds: &str) -> (bool, String) {
    skopeo(&[
        "--dest-tls-verify=false",
        "--dest-creds",
        creds,
        &format!("oci:{}", src.display()),
        dest,
    ])
    .await
}

/// Pushes as `ci`, which must succeed.
async fn push_as_ci(src: &Path, dest: &str) {
    let (ok, err) = push(src, dest, &format!("ci:{PASSWORD}")).await;
    assert!(ok, "push to {dest}: {err}");
}

/// `skopeo copy SRC DEST` with extra arguments; (success, stderr).
async fn skopeo(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--retry-times=0"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn oci_digest(dir: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(base: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_owned(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self.http.request(method, url).body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    async fn as_ci(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        self.send(method, path, Some(&basic("ci", PASSWORD)), headers, body)
            .await
    }
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()["location"].to_str().unwrap().to_owned()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_and_pulls_and_every_auth_case_answers_as_clients_expect() {
    if !have_tools(&["skopeo"]) {
        return;
    }
    let (pier, _data) = start("");
    let host = pier.host();
    let c = Client::new(&pier.url());
    let src = layout("alpine/3.19");
    let want = oci_digest(&src);

    // The base endpoint asks who is there, naming the token endpoint.
    let r = c.send(Method::GET, "/v2/", None, &[], vec![]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&r, "www-authenticate");
    assert_eq!(
        challenge,
        format!("Bearer realm=\"http://{host}/auth/token\",service=\"pier\"")
    );
    let r = c.as_ci(Method::GET, "/v2/", &[], vec![]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .send(
            Method::GET,
            "/v2/",
            Some(&basic("ci", "wrong")),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Push with skopeo's credentials; pull back with another user's.
    let dest = format!("docker://{host}/private/team/alpine:3.19");
    let creds = format!("ci:{PASSWORD}");
    let (ok, err) = push(&src, &dest, &creds).await;
    assert!(ok, "push: {err}");
    let out = tempfile::tempdir().unwrap();
    let reader = format!("reader:{PASSWORD}");
    let (ok, err) = skopeo(&[
        "--src-tls-verify=false",
        "--src-creds",
        &reader,
        &dest,
        &format!("oci:{}", out.path().display()),
    ])
    .await;
    assert!(ok, "pull: {err}");
    assert_eq!(
        oci_digest(out.path()),
        want,
        "the pulled manifest is the pushed one"
    );

    // Wrong password: 401 from the token endpoint, and skopeo says so.
    let (ok, err) = skopeo(&[
        "--src-tls-verify=false",
        "--src-creds",
        "ci:wrong",
        &dest,
        &format!("oci:{}", tempfile::tempdir().unwrap().path().display()),
    ])
    .await;
    assert!(!ok && err.contains("unauthorized"), "{err}");

    // No credentials: 401 with the scope to ask for.
    let r = c
        .send(
            Method::GET,
            "/v2/private/team/alpine/manifests/3.19",
            None,
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        header(&r, "www-authenticate").ends_with(",scope=\"repository:private/team/alpine:pull\""),
        "{}",
        header(&r, "www-authenticate")
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");

    // A user outside their push globs: 403, and nothing stored.
    let blob = b"not for reader".to_vec();
    let digest = sha256(&blob);
    for (user, repo) in [("reader", "team/alpine"), ("ci", "other/app")] {
        let r = c
            .send(
                Method::POST,
                &format!("/v2/private/{repo}/blobs/uploads/?digest={digest}"),
                Some(&basic(user, PASSWORD)),
                &[],
                blob.clone(),
            )
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{user} → {repo}");
        assert_eq!(error_code(r).await, "DENIED");
    }
    assert!(
        !pier
            .stored_blobs()
            .iter()
            .any(|b| digest.ends_with(b.as_str())),
        "a refused push stored its blob"
    );
    let (ok, err) = push(
        &src,
        &format!("docker://{host}/private/team/alpine:by-reader"),
        &reader,
    )
    .await;
    assert!(!ok && err.contains("denied"), "{err}");
    let r = c
        .send(
            Method::GET,
            "/v2/private/team/alpine/tags/list",
            Some(&reader_auth()),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tags"],
        serde_json::json!(["3.19"])
    );

    // The token endpoint grants what the user may of what was asked.
    let r = c
        .send(
            Method::GET,
            "/auth/token?service=pier&scope=repository:private/team/alpine:pull,push",
            Some(&basic("reader", PASSWORD)),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Bearer {token}");
    let r = c
        .send(
            Method::GET,
            "/v2/private/team/alpine/manifests/3.19",
            Some(&bearer),
            &[("accept", ACCEPT_ALL)],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), want);
    let r = c
        .send(
            Method::POST,
            "/v2/private/team/alpine/blobs/uploads/",
            Some(&bearer),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the token holds no push");
    let r = c
        .send(
            Method::GET,
            "/v2/private/team/alpine/manifests/3.19",
            Some(&format!("Bearer {}x", &token[..token.len() - 1])),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "an altered token");
    let r = c
        .send(
            Method::GET,
            "/auth/token?service=pier&scope=repository:private/team/alpine:pull",
            Some(&basic("reader", "nope")),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Mirrored names refuse every write, whoever asks.
    for (method, path) in [
        (Method::POST, "/v2/library/alpine/blobs/uploads/"),
        (Method::PATCH, "/v2/library/alpine/blobs/uploads/0123"),
        (
            Method::PUT,
            "/v2/library/alpine/blobs/uploads/0123?digest=sha256:00",
        ),
        (Method::PUT, "/v2/library/alpine/manifests/latest"),
        (Method::DELETE, "/v2/library/alpine/manifests/latest"),
        (Method::DELETE, &format!("/v2/r.pier.test/x/blobs/{digest}")),
    ] {
        let r = c.as_ci(method.clone(), path, &[], vec![]).await;
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }

    // The catalog shows private repositories to those who may pull them.
    let catalog = |auth: Option<String>| {
        let c = &c;
        async move {
            let r = c
                .send(Method::GET, "/v2/_catalog", auth.as_deref(), &[], vec![])
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<serde_json::Value>().await.unwrap()["repositories"].clone()
        }
    };
    assert_eq!(
        catalog(Some(reader_auth())).await,
        serde_json::json!(["private/team/alpine"])
    );
    assert_eq!(catalog(None).await, serde_json::json!([]));
    let (ok, err) = push(
        &src,
        &format!("docker://{host}/private/team2/alpine:1"),
        &creds,
    )
    .await;
    assert!(
        !ok && err.contains("denied"),
        "ci may not push team2: {err}"
    );

    // Failed logins are limited per client: past ten a minute, 429.
    let mut limited = false;
    for _ in 0..12 {
        let r = c
            .send(
                Method::GET,
                "/v2/",
                Some(&basic("ci", "guess")),
                &[],
                vec![],
            )
            .await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(limited, "failed logins were never limited");
    // A password not checked lately waits too, even a right one; one found
    // right a moment ago is no guess and goes through.
    let r = c
        .send(
            Method::GET,
            "/v2/",
            Some(&basic("teamonly", PASSWORD)),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a fresh check waits"
    );
    let r = c.as_ci(Method::GET, "/v2/", &[], vec![]).await;
    assert_eq!(r.status(), StatusCode::OK, "a remembered password");
    assert!(metric(&reqwest::Client::new(), &pier, "pier_failed_logins_total").await >= 10.0);
}

fn reader_auth() -> String {
    basic("reader", PASSWORD)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_pull_when_switched_on() {
    if !have_tools(&["skopeo"]) {
        return;
    }
    let (pier, _data) = start("anonymous_pull = true\nalias = \"own\"");
    let host = pier.host();
    let src = layout("alpine/3.18");
    push_as_ci(&src, &format!("docker://{host}/private/team/alpine:3.18")).await;
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = skopeo(&[
        "--src-tls-verify=false",
        &format!("docker://{host}/private/team/alpine:3.18"),
        &format!("oci:{}", out.path().display()),
    ])
    .await;
    assert!(ok, "anonymous pull: {err}");
    assert_eq!(oci_digest(out.path()), oci_digest(&src));
    let c = Client::new(&pier.url());
    let r = c
        .send(
            Method::POST,
            "/v2/private/team/alpine/blobs/uploads/",
            None,
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "anonymous push");

    // Under the alias host every name is private: the same repository, and
    // a name that would be a Docker Hub one elsewhere never leaves Pier.
    let alias = Client {
        http: reqwest::Client::builder()
            .resolve(&format!("own.{DOMAIN}"), pier.addr)
            .build()
            .unwrap(),
        base: format!("http://own.{DOMAIN}:{}", pier.port()),
    };
    let r = alias
        .send(
            Method::GET,
            "/v2/team/alpine/manifests/3.18",
            None,
            &[("accept", ACCEPT_ALL)],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), oci_digest(&src));
    let r = alias
        .send(
            Method::GET,
            "/v2/library/alpine/manifests/3.18",
            None,
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = alias
        .as_ci(Method::POST, "/v2/team/other/blobs/uploads/", &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(location(&r).starts_with("/v2/team/other/blobs/uploads/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sessions_chunk_resume_refuse_a_wrong_digest_and_lapse() {
    let (pier, _data) = start("upload_ttl = \"2s\"");
    let c = Client::new(&pier.url());
    let repo = "/v2/private/team/app";
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = sha256(&bytes);

    // Chunks, one of them out of place.
    let r = c
        .as_ci(Method::POST, &format!("{repo}/blobs/uploads/"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let at = location(&r);
    assert!(at.starts_with(&format!("{repo}/blobs/uploads/")), "{at}");
    assert_eq!(header(&r, "range"), "0-0");
    let r = c
        .as_ci(
            Method::PATCH,
            &at,
            &[("content-range", "0-99999")],
            bytes[..100_000].to_vec(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-99999");
    let r = c
        .as_ci(
            Method::PATCH,
            &at,
            &[("content-range", "50000-149999")],
            bytes[50_000..150_000].to_vec(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "range"), "0-99999");

    // A chunk that breaks off: what arrived is kept, and the client goes
    // on from where the status says the upload stands.
    let sent = 60_000;
    broken_patch(&pier, &at, &bytes[100_000..200_000], sent);
    let r = c.as_ci(Method::GET, &at, &[], vec![]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let range = header(&r, "range");
    let end: usize = range.strip_prefix("0-").unwrap().parse().unwrap();
    assert_eq!(
        end + 1,
        100_000 + sent,
        "kept what arrived before the break"
    );
    let r = c
        .as_ci(Method::PATCH, &at, &[], bytes[end + 1..250_000].to_vec())
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .as_ci(
            Method::PUT,
            &format!("{at}?digest={digest}"),
            &[],
            bytes[250_000..].to_vec(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    let r = c
        .as_ci(Method::GET, &format!("{repo}/blobs/{digest}"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[..]);
    let r = c.as_ci(Method::GET, &at, &[], vec![]).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a finished upload is gone"
    );
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");

    // A digest that does not match: 400, and nothing under it.
    let other = b"some other bytes".to_vec();
    let claimed = sha256(b"what the client claims");
    let r = c
        .as_ci(Method::POST, &format!("{repo}/blobs/uploads/"), &[], vec![])
        .await;
    let at = location(&r);
    let r = c.as_ci(Method::PATCH, &at, &[], other.clone()).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .as_ci(Method::PUT, &format!("{at}?digest={claimed}"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    for d in [&claimed, &sha256(&other)] {
        let r = c
            .as_ci(Method::HEAD, &format!("{repo}/blobs/{d}"), &[], vec![])
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{d}");
    }
    let r = c
        .as_ci(
            Method::POST,
            &format!("{repo}/blobs/uploads/?digest={claimed}"),
            &[],
            other.clone(),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "monolithic, wrong digest"
    );

    // Monolithic, then a mount into another repository; a mount from a
    // repository without the blob starts an upload instead.
    let small = b"monolithic blob".to_vec();
    let small_digest = sha256(&small);
    let r = c
        .as_ci(
            Method::POST,
            &format!("{repo}/blobs/uploads/?digest={small_digest}"),
            &[],
            small.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(location(&r), format!("{repo}/blobs/{small_digest}"));
    let r = c
        .as_ci(
            Method::POST,
            &format!(
                "/v2/private/team/copy/blobs/uploads/?mount={small_digest}&from=private/team/app"
            ),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .as_ci(
            Method::GET,
            &format!("/v2/private/team/copy/blobs/{small_digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &small[..]);
    let r = c
        .as_ci(
            Method::POST,
            &format!("/v2/private/team/copy/blobs/uploads/?mount={digest}&from=private/team/none"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Cancelled, and lapsed.
    let r = c
        .as_ci(Method::POST, &format!("{repo}/blobs/uploads/"), &[], vec![])
        .await;
    let at = location(&r);
    assert_eq!(
        c.as_ci(Method::DELETE, &at, &[], vec![]).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.as_ci(Method::GET, &at, &[], vec![]).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = c
        .as_ci(Method::POST, &format!("{repo}/blobs/uploads/"), &[], vec![])
        .await;
    let at = location(&r);
    assert_eq!(
        c.as_ci(Method::PATCH, &at, &[], b"abc".to_vec())
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c.as_ci(Method::GET, &at, &[], vec![]).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "an abandoned upload lapses"
    );
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");

    // Manifests: what they point at must be there; type and body agree.
    let config = b"{}".to_vec();
    let config_digest = sha256(&config);
    let manifest = |layer: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":1}}]}}"#
        )
        .into_bytes()
    };
    let oci = [("content-type", "application/vnd.oci.image.manifest.v1+json")];
    let r = c
        .as_ci(
            Method::PUT,
            &format!("{repo}/manifests/v1"),
            &oci,
            manifest(&small_digest),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        error_code(r).await,
        "MANIFEST_BLOB_UNKNOWN",
        "the config is not pushed"
    );
    c.as_ci(
        Method::POST,
        &format!("{repo}/blobs/uploads/?digest={config_digest}"),
        &[],
        config.clone(),
    )
    .await;
    let body = manifest(&small_digest);
    let r = c
        .as_ci(
            Method::PUT,
            &format!("{repo}/manifests/v1"),
            &[("content-type", "text/plain")],
            body.clone(),
        )
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let r = c
        .as_ci(
            Method::PUT,
            &format!("{repo}/manifests/v1"),
            &oci,
            body.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let manifest_digest = sha256(&body);
    assert_eq!(header(&r, "docker-content-digest"), manifest_digest);
    let r = c
        .as_ci(
            Method::PUT,
            &format!("{repo}/manifests/{}", sha256(b"x")),
            &oci,
            body.clone(),
        )
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    c.as_ci(
        Method::PUT,
        &format!("{repo}/manifests/v2"),
        &oci,
        body.clone(),
    )
    .await;
    let r = c
        .as_ci(Method::GET, &format!("{repo}/manifests/v1"), &[], vec![])
        .await;
    assert_eq!(header(&r, "content-type"), oci[0].1);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);

    // Deleting a tag leaves the manifest; deleting the manifest takes it
    // and every tag naming it.
    assert_eq!(
        c.as_ci(Method::DELETE, &format!("{repo}/manifests/v1"), &[], vec![])
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(tags(&c, repo).await, serde_json::json!(["v2"]));
    assert_eq!(
        c.as_ci(
            Method::GET,
            &format!("{repo}/manifests/{manifest_digest}"),
            &[],
            vec![]
        )
        .await
        .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.as_ci(
            Method::DELETE,
            &format!("{repo}/manifests/{manifest_digest}"),
            &[],
            vec![]
        )
        .await
        .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(tags(&c, repo).await, serde_json::json!([]));
    let r = c
        .as_ci(
            Method::GET,
            &format!("{repo}/manifests/{manifest_digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .as_ci(
            Method::DELETE,
            &format!("{repo}/blobs/{small_digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .as_ci(
            Method::HEAD,
            &format!("{repo}/blobs/{small_digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the blob left the repository"
    );
    let r = c
        .as_ci(
            Method::HEAD,
            &format!("/v2/private/team/copy/blobs/{small_digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "and stays where it was mounted");
}

/// A PATCH with a Content-Length of all of `chunk` that sends only `sent`
/// bytes of it, then closes.
fn broken_patch(pier: &Pier, at: &str, chunk: &[u8], sent: usize) {
    let mut s = std::net::TcpStream::connect(pier.addr).unwrap();
    write!(
        s,
        "PATCH {at} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        pier.host(),
        basic("ci", PASSWORD),
        chunk.len()
    )
    .unwrap();
    s.write_all(&chunk[..sent]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
}

async fn tags(c: &Client, repo: &str) -> serde_json::Value {
    c.as_ci(Method::GET, &format!("{repo}/tags/list"), &[], vec![])
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap()["tags"]
        .clone()
}

/// nginx round-robin (no stickiness) in front of `backends`, logging which
/// backend served each request.
struct RoundRobin {
    port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl RoundRobin {
    fn start(backends: &[&Pier]) -> RoundRobin {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let servers: String = backends
            .iter()
            .map(|p| format!("server {};\n", p.host()))
            .collect();
        let conf = format!(
            "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 1;\n\
             events {{}}\nhttp {{\n\
             log_format rr '$request_method $uri $upstream_addr $status';\n\
             access_log {d}/access.log rr;\n\
             client_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             upstream pier {{\n{servers}}}\n\
             server {{\nlisten 127.0.0.1:{port};\nclient_max_body_size 0;\n\
             proxy_request_buffering off;\nproxy_buffering off;\n\
             location / {{\nproxy_pass http://pier;\nproxy_http_version 1.1;\n\
             proxy_set_header Host $http_host;\nproxy_set_header Connection \"\";\n}}\n}}\n}}\n"
        );
        let file = dir.path().join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-c")
            .arg(&file)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port, "nginx");
        RoundRobin { port, dir, child }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The backends that served requests whose path contains `part`.
    fn served_by(&self, part: &str) -> std::collections::BTreeSet<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains(part))
            .filter_map(|l| l.split(' ').nth(2).map(str::to_owned))
            .collect()
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        // TERM lets the master stop its worker too; KILL would orphan it.
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_split_across_two_replicas_by_round_robin_completes() {
    if !have_tools(&["skopeo", "nginx"]) {
        return;
    }
    let namespace = format!("private-rr-{:x}", rand::random::<u32>());
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut replicas = Vec::new();
    for dir in &dirs {
        let Some(config) = scaled_config(
            dir.path(),
            &namespace,
            &[("r.pier.test", &upstream)],
            "",
            None,
            "",
        ) else {
            return;
        };
        replicas.push(Pier::start_raw(
            dir.path(),
            &format!("{config}\n{}", private_config("")),
        ));
    }
    let lb = RoundRobin::start(&[&replicas[0], &replicas[1]]);
    let c = Client::new(&format!("http://{}", lb.host()));

    // Five chunks and the end, by hand: round-robin sends them to the two
    // replicas in turn.
    let bytes: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let digest = sha256(&bytes);
    let repo = "/v2/private/team/chunked";
    let r = c
        .as_ci(Method::POST, &format!("{repo}/blobs/uploads/"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let at = location(&r);
    let id = at.rsplit('/').next().unwrap().to_owned();
    for (i, chunk) in bytes.chunks(1024 * 1024).enumerate() {
        let start = i * 1024 * 1024;
        let range = format!("{start}-{}", start + chunk.len() - 1);
        let r = c
            .as_ci(
                Method::PATCH,
                &at,
                &[("content-range", &range)],
                chunk.to_vec(),
            )
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "chunk {i}");
        assert_eq!(
            header(&r, "range"),
            format!("0-{}", start + chunk.len() - 1)
        );
    }
    let r = c
        .as_ci(Method::PUT, &format!("{at}?digest={digest}"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    assert_eq!(
        lb.served_by(&id).len(),
        2,
        "the upload's requests all went to one replica"
    );
    for replica in &replicas {
        let direct = Client::new(&replica.url());
        let r = direct
            .as_ci(Method::GET, &format!("{repo}/blobs/{digest}"), &[], vec![])
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.bytes().await.unwrap().as_ref() == &bytes[..],
            "bytes differ on {}",
            replica.host()
        );
    }

    // Whole images with skopeo through the balancer, pulled back through it.
    let creds = format!("ci:{PASSWORD}");
    for tag in ["3.17", "3.18", "3.19"] {
        let src = layout(&format!("alpine/{tag}"));
        let dest = format!("docker://{}/private/team/alpine:{tag}", lb.host());
        let (ok, err) = push(&src, &dest, &creds).await;
        assert!(ok, "push {tag}: {err}");
        let out = tempfile::tempdir().unwrap();
        let (ok, err) = skopeo(&[
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &dest,
            &format!("oci:{}", out.path().display()),
        ])
        .await;
        assert!(ok, "pull {tag}: {err}");
        assert_eq!(oci_digest(out.path()), oci_digest(&src), "{tag}");
    }
    assert_eq!(lb.served_by("/private/team/alpine/blobs/uploads/").len(), 2);
}

/// ORAS (its Python SDK) as the client: an artifact pushed in chunks with
/// the image as its subject, listed by the referrers API, pulled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_pushes_an_artifact_with_a_subject_that_the_referrers_api_lists() {
    if !have_tools(&["skopeo", "python3"]) {
        return;
    }
    let have_oras = std::process::Command::new("python3")
        .args(["-c", "import oras"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_oras {
        assert!(!strict(), "python3 cannot import oras: run tests/setup.sh");
        eprintln!("SKIPPED: no oras for python3");
        return;
    }
    let (pier, _data) = start("");
    let host = pier.host();
    let src = layout("alpine/3.19");
    push_as_ci(&src, &format!("docker://{host}/private/team/app:1")).await;
    let c = Client::new(&pier.url());
    let r = c
        .as_ci(
            Method::GET,
            "/v2/private/team/app/manifests/1",
            &[("accept", ACCEPT_ALL)],
            vec![],
        )
        .await;
    let media_type = header(&r, "content-type");
    let subject = header(&r, "docker-content-digest");
    let size = r.bytes().await.unwrap().len();

    let work = tempfile::tempdir().unwrap();
    let sbom: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(work.path().join("sbom.json"), &sbom).unwrap();
    let script = format!(
        r#"
import oras.client, oras.oci
c = oras.client.OrasClient(hostname="{host}", insecure=True)
c.login(username="ci", password="{PASSWORD}", hostname="{host}", tls_verify=False)
r = c.push(target="{host}/private/team/app:sbom", files=["sbom.json"],
           subject=oras.oci.Subject(mediaType="{media_type}", digest="{subject}", size={size}),
           manifest_annotations={{"org.example.kind": "sbom"}},
           do_chunked=True, chunk_size=1048576)
print("SUBJECT", r.headers.get("OCI-Subject"))
print("DIGEST", r.headers.get("Docker-Content-Digest"))
c.pull(target="{host}/private/team/app:sbom", outdir="out")
"#
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "oras: {text}");
    assert!(text.contains(&format!("SUBJECT {subject}")), "{text}");
    let artifact = text
        .lines()
        .find_map(|l| l.strip_prefix("DIGEST "))
        .unwrap()
        .to_owned();
    assert_eq!(
        std::fs::read(work.path().join("out/sbom.json")).unwrap(),
        sbom
    );

    let r = c
        .send(
            Method::GET,
            &format!("/v2/private/team/app/referrers/{subject}"),
            Some(&reader_auth()),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-type"),
        "application/vnd.oci.image.index.v1+json"
    );
    let index: serde_json::Value = r.json().await.unwrap();
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{index}");
    assert_eq!(listed[0]["digest"], artifact.as_str());
    assert_eq!(listed[0]["annotations"]["org.example.kind"], "sbom");
    let kind = listed[0]["artifactType"].as_str().unwrap().to_owned();
    let filtered = |t: String| {
        let c = &c;
        let subject = subject.clone();
        async move {
            let r = c
                .send(
                    Method::GET,
                    &format!(
                        "/v2/private/team/app/referrers/{subject}?artifactType={}",
                        t.replace('+', "%2B")
                    ),
                    Some(&reader_auth()),
                    &[],
                    vec![],
                )
                .await;
            assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
            r.json::<serde_json::Value>().await.unwrap()["manifests"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(filtered(kind).await, 1);
    assert_eq!(filtered("application/x-other".into()).await, 0);

    // Deleting the artifact takes it off the list.
    let r = c
        .as_ci(
            Method::DELETE,
            &format!("/v2/private/team/app/manifests/{artifact}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .as_ci(
            Method::GET,
            &format!("/v2/private/team/app/referrers/{subject}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["manifests"],
        serde_json::json!([])
    );
}

/// Deleting a manifest leaves blobs no manifest references: they go after
/// the grace period, and blobs another manifest references stay. A push
/// that checks for one of the orphans (HEAD) before referencing it keeps
/// it, even when its manifest arrives after the orphan's grace period ran
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_reclaims_what_a_deleted_manifest_left_and_spares_a_push_reusing_it() {
    let (pier, _data) = start("gc_interval = \"500ms\"\ngc_grace = \"4s\"\nupload_ttl = \"3s\"");
    let c = Client::new(&pier.url());
    let repo = "/v2/private/team/app";
    let push_blob = |bytes: Vec<u8>| {
        let c = &c;
        async move {
            let digest = sha256(&bytes);
            let r = c
                .as_ci(
                    Method::POST,
                    &format!("{repo}/blobs/uploads/?digest={digest}"),
                    &[],
                    bytes,
                )
                .await;
            assert_eq!(r.status(), StatusCode::CREATED);
            digest
        }
    };
    let shared = push_blob(vec![1u8; 40_000]).await;
    let orphan = push_blob(vec![2u8; 50_000]).await;
    let config1 = push_blob(br#"{"n":1}"#.to_vec()).await;
    let config2 = push_blob(br#"{"n":2}"#.to_vec()).await;
    let oci = [("content-type", "application/vnd.oci.image.manifest.v1+json")];
    let manifest = |config: &str, layers: &[&str]| {
        let layers: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":1}}"#)
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":7}},"layers":[{}]}}"#,
            layers.join(",")
        )
        .into_bytes()
    };
    let m1 = manifest(&config1, &[&shared, &orphan]);
    let m2 = manifest(&config2, &[&shared]);
    for (tag, body) in [("one", &m1), ("two", &m2)] {
        let r = c
            .as_ci(
                Method::PUT,
                &format!("{repo}/manifests/{tag}"),
                &oci,
                body.clone(),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let started = std::time::Instant::now();
    let r = c
        .as_ci(
            Method::DELETE,
            &format!("{repo}/manifests/{}", sha256(&m1)),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // A push begins 3 s in: it finds the orphan already there.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let r = c
        .as_ci(Method::HEAD, &format!("{repo}/blobs/{orphan}"), &[], vec![])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Its manifest comes at 5 s: past the orphan's grace had the HEAD not
    // counted (it was last used when pushed, at 0 s).
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    let config3 = push_blob(br#"{"n":3}"#.to_vec()).await;
    let m3 = manifest(&config3, &[&orphan]);
    let r = c
        .as_ci(Method::PUT, &format!("{repo}/manifests/three"), &oci, m3)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);

    // By then the first manifest's own config is gone: from the repository
    // and from the disk.
    let hex = |d: &str| d.strip_prefix("sha256:").unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pier.stored_blobs().contains(&hex(&config1)) {
        assert!(
            std::time::Instant::now() < deadline,
            "config1 was never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c
        .as_ci(
            Method::HEAD,
            &format!("{repo}/blobs/{config1}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Wait past every grace period once more, then look at what stayed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stored = pier.stored_blobs();
    for (what, d) in [
        ("shared", &shared),
        ("reused orphan", &orphan),
        ("config2", &config2),
        ("config3", &config3),
    ] {
        assert!(stored.contains(&hex(d)), "{what} was reclaimed");
    }
    for tag in ["two", "three"] {
        let r = c
            .as_ci(Method::GET, &format!("{repo}/manifests/{tag}"), &[], vec![])
            .await;
        let m: serde_json::Value = r.json().await.unwrap();
        let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
        digests.extend(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_owned()),
        );
        for d in digests {
            let r = c
                .as_ci(Method::GET, &format!("{repo}/blobs/{d}"), &[], vec![])
                .await;
            assert_eq!(r.status(), StatusCode::OK, "{tag}: {d}");
            assert_eq!(sha256(&r.bytes().await.unwrap()), d);
        }
    }
    assert!(
        metric(
            &reqwest::Client::new(),
            &pier,
            "pier_private_reclaimed_bytes_total"
        )
        .await
            >= 7.0
    );
}
