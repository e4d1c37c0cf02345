#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Hostile requests against a real upstream: path traversal, overlong names
//! and URLs, malformed digests, absurd page sizes, malformed `Range` headers,
//! odd Host headers and `?ns=` pointing anywhere but a configured upstream.
//! Each gets a precise OCI error, nothing unexpected reaches the upstream (or
//! anything else), and Pier keeps serving afterwards.
//!
//! Requests are written by hand on a TCP socket: HTTP client libraries
//! normalise `..`, percent-encoding and the Host header, which is exactly
//! what these tests must not have done for them.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    docker: Upstream,
    pier: Pier,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

fn setup() -> Option<Setup> {
    if !have_tools(&["docker-registry", "curl"]) {
        return None;
    }
    let docker = Upstream::start("docker");
    let (pier, data) = Pier::start(&[("docker.io", &docker.url())], "");
    let http = http_for(&pier);
    Some(Setup {
        docker,
        pier,
        http,
        _data: data,
    })
}

const ALPINE: &str = "library/alpine";
const A_SHA256: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A response read off the socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The OCI error code, asserting the body is an OCI error document.
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not a JSON error body ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no errors[0].code in {v}"))
            .to_owned()
    }
}

/// Sends `GET target` with exactly this Host header (bytes, not a `&str`, so
/// it may be anything) and `extra` header lines, and reads the response.
async fn raw_get(addr: SocketAddr, target: &str, host: &[u8], extra: &[&[u8]]) -> Raw {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: ").into_bytes();
    req.extend_from_slice(host);
    req.extend_from_slice(format!("\r\nAccept: {ACCEPT_ALL}\r\nConnection: close\r\n").as_bytes());
    for line in extra {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    raw(addr, &req).await
}

/// Writes `request` as is and reads until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("Pier answered within 20 s")
        .unwrap();
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Raw {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Raw {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Asserts status and OCI error code of each `(target, status, code)`.
async fn expect_errors(s: &Setup, host: &[u8], cases: &[(String, u16, &str)]) {
    for (target, status, code) in cases {
        let r = raw_get(s.pier.addr, target, host, &[]).await;
        let shown: String = target.chars().take(120).collect();
        assert_eq!(
            r.status,
            *status,
            "{shown}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), *code, "{shown}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{shown}"
        );
    }
}

/// `/healthz` answers and a whole pull of alpine:3.19 (manifest, config and
/// every layer, digests checked) still works.
async fn still_serving(s: &Setup) {
    let base = s.pier.url();
    let r = fetch(&s.http, Method::GET, &format!("{base}/healthz"), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{base}/v2/docker.io/{ALPINE}/manifests/3.19"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-content-digest"],
        digest_of("docker", "library/alpine:3.19").as_str()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let mut blobs = vec![v["config"]["digest"].as_str().unwrap().to_owned()];
    for l in v["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in blobs {
        let r = fetch(
            &s.http,
            Method::GET,
            &format!("{base}/v2/docker.io/{ALPINE}/blobs/{d}"),
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{d}");
        let bytes = r.bytes().await.unwrap();
        let got: pier::reference::Digest = d.parse().unwrap();
        assert!(got.matches(&bytes), "{d}");
    }
}

/// The digest and size of alpine:3.19's first layer, read from upstream.
async fn alpine_layer(s: &Setup) -> (String, u64) {
    let r = fetch(
        &s.http,
        Method::GET,
        &format!("{}/v2/{ALPINE}/manifests/3.19", s.docker.url()),
        &[],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let l = &v["layers"][0];
    (
        l["digest"].as_str().unwrap().to_owned(),
        l["size"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_names_and_digests_is_refused() {
    let Some(s) = setup() else { return };
    let m = "/v2/docker.io";
    let cases: Vec<(String, u16, &str)> = [
        // Dot segments, raw: the name grammar refuses them.
        (
            format!("{m}/library/../{ALPINE}/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/../../../etc/passwd/manifests/latest"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/./{ALPINE}/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{ALPINE}/../../manifests/x"),
            400,
            "NAME_INVALID",
        ),
        (format!("{m}/../manifests/latest"), 400, "NAME_INVALID"),
        // `..` as the first component looks like a host (it has a dot) and
        // names no configured registry.
        (
            format!("/v2/../v2/docker.io/{ALPINE}/manifests/3.19"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/../../etc/passwd/manifests/latest".into(),
            404,
            "NAME_UNKNOWN",
        ),
        // Percent-encoded dots and slashes, single and double encoded.
        (
            format!("{m}/library/%2e%2e/{ALPINE}/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/library/%2E%2E/{ALPINE}/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/library%2falpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/library%2Falpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/library%252falpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/library/%252e%252e/alpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/%2e%2e/docker.io/library/alpine/manifests/3.19".into(),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{ALPINE}/blobs/sha256:..%2f..%2fetc%2fpasswd"),
            400,
            "NAME_INVALID",
        ),
        // Empty components.
        (format!("{m}//{ALPINE}/manifests/3.19"), 400, "NAME_INVALID"),
        (
            format!("{m}/library//alpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2//docker.io/{ALPINE}/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        (format!("{m}/{ALPINE}//manifests/3.19"), 400, "NAME_INVALID"),
        // Traversal where a reference or digest goes.
        (
            format!("{m}/{ALPINE}/manifests/.."),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (format!("{m}/{ALPINE}/blobs/.."), 400, "DIGEST_INVALID"),
        (
            format!("{m}/{ALPINE}/blobs/sha256:.."),
            400,
            "DIGEST_INVALID",
        ),
        (format!("{m}/{ALPINE}/referrers/.."), 400, "DIGEST_INVALID"),
        // `blobs/sha256:../../x` splits as <name>/<kind>/<ref> with kind `..`.
        (
            format!("{m}/{ALPINE}/blobs/sha256:../../etc/passwd"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            format!("{m}/{ALPINE}/blobs/{A_SHA256}/.."),
            404,
            "NAME_UNKNOWN",
        ),
        // Backslashes reach Pier unchanged and are no name or digest character.
        (
            format!("{m}/library\\..\\alpine/manifests/3.19"),
            400,
            "NAME_INVALID",
        ),
        // ... and `docker.io\..\library` is a first component that looks
        // like a host and is not a configured one.
        (
            format!("{m}\\..\\{ALPINE}/manifests/3.19"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            format!("{m}/{ALPINE}/blobs/sha256:..\\..\\etc"),
            400,
            "DIGEST_INVALID",
        ),
    ]
    .into_iter()
    .collect();
    expect_errors(&s, s.pier.host().as_bytes(), &cases).await;

    assert_eq!(s.docker.log(), "", "nothing reached upstream");
    assert!(s.pier.stored_blobs().is_empty());
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_and_urls_are_refused() {
    let Some(s) = setup() else { return };
    let m = "/v2/docker.io";
    let cases: Vec<(String, u16, &str)> = vec![
        // Just over the spec's 255, then past the router's own cut-off, then
        // absurd; as one component and as thousands.
        (
            format!("{m}/library/{}/manifests/latest", "a".repeat(248)),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{}/manifests/latest", "a".repeat(256)),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{}/manifests/latest", "a".repeat(600)),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{}/blobs/{A_SHA256}", "a".repeat(60_000)),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{m}/{}x/tags/list", "a/".repeat(20_000)),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/{}/manifests/latest", "b".repeat(256)),
            400,
            "NAME_INVALID",
        ),
        // A 129-character tag and a 60 KB reference.
        (
            format!("{m}/{ALPINE}/manifests/{}", "t".repeat(129)),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("{m}/{ALPINE}/manifests/{}", "t".repeat(60_000)),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("{m}/{ALPINE}/manifests/.INVALID_MANIFEST_NAME"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("{m}/{ALPINE}/blobs/sha256:{}", "0".repeat(60_000)),
            400,
            "DIGEST_INVALID",
        ),
        // A huge registry prefix is a name too long before it is a host; a
        // huge ns names no configured registry.
        (
            format!("/v2/{}.com/x/manifests/latest", "c".repeat(50_000)),
            400,
            "NAME_INVALID",
        ),
        (
            format!(
                "/v2/{ALPINE}/manifests/latest?ns={}.com",
                "d".repeat(50_000)
            ),
            404,
            "NAME_UNKNOWN",
        ),
    ];
    expect_errors(&s, s.pier.host().as_bytes(), &cases).await;

    // A request line of 64 KiB or more never reaches Pier's handlers: the
    // HTTP layer refuses it with 431 and an empty body.
    for target in [
        format!("{m}/{}/manifests/latest", "a".repeat(64 * 1024)),
        format!("{m}/{}/manifests/latest", "a/".repeat(512 * 1024)),
    ] {
        let r = raw_get(s.pier.addr, &target, s.pier.host().as_bytes(), &[]).await;
        assert_eq!(r.status, 431, "{} bytes", target.len());
        assert!(r.body.is_empty());
    }

    assert_eq!(s.docker.log(), "", "nothing reached upstream");
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_digests_are_refused() {
    let Some(s) = setup() else { return };
    let hex64 = "a".repeat(64);
    let digests = [
        format!("sha256:{}", "a".repeat(63)),
        format!("sha256:{}", "a".repeat(65)),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}A", "a".repeat(63)),
        format!("sha256:{}g", "a".repeat(63)),
        format!("sha256:{}", "a".repeat(128)),
        format!("sha512:{hex64}"),
        format!("sha512:{}", "a".repeat(127)),
        format!("sha512:{}", "a".repeat(129)),
        format!("sha512:{}", "F".repeat(128)),
        format!("SHA256:{hex64}"),
        format!("sha384:{}", "a".repeat(96)),
        format!("md5:{}", "a".repeat(32)),
        format!("sha256+b64:{hex64}"),
        format!(":{hex64}"),
        format!("sha256::{hex64}"),
        format!("sha256:{hex64}:"),
        format!("sha256:{hex64}@"),
        "sha256:".to_owned(),
        "sha256".to_owned(),
        hex64.clone(),
    ];
    let mut cases = Vec::new();
    for d in &digests {
        let base = format!("/v2/docker.io/{ALPINE}");
        cases.push((format!("{base}/blobs/{d}"), 400, "DIGEST_INVALID"));
        cases.push((format!("{base}/referrers/{d}"), 400, "DIGEST_INVALID"));
        // A manifest reference with a ':' is a digest; without, a tag.
        let (status, code) = if d.contains(':') {
            (400, "DIGEST_INVALID")
        } else {
            (404, "MANIFEST_UNKNOWN")
        };
        if d.len() > 128 || d.contains(':') {
            cases.push((format!("{base}/manifests/{d}"), status, code));
        }
    }
    expect_errors(&s, s.pier.host().as_bytes(), &cases).await;
    // HEAD is refused the same way, with no body.
    let r = fetch(
        &s.http,
        Method::HEAD,
        &format!(
            "{}/v2/docker.io/{ALPINE}/blobs/sha256:{}",
            s.pier.url(),
            "a".repeat(63)
        ),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.docker.log(), "", "nothing reached upstream");
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_page_sizes() {
    let Some(s) = setup() else { return };
    let host = s.pier.host();
    let tags = format!("/v2/docker.io/{ALPINE}/tags/list");
    // Not a u64 (too big, negative, not a number): PAGINATION_NUMBER_INVALID.
    let mut cases = Vec::new();
    for n in [
        "18446744073709551616",
        "99999999999999999999999999",
        "-1",
        "-0x1",
        "1e3",
        "0x10",
        "1.5",
        "%2D1",
        "%00",
        "5%20",
        "++5",
    ] {
        cases.push((format!("{tags}?n={n}"), 400, "PAGINATION_NUMBER_INVALID"));
        cases.push((
            format!("/v2/_catalog?n={n}"),
            400,
            "PAGINATION_NUMBER_INVALID",
        ));
    }
    expect_errors(&s, host.as_bytes(), &cases).await;
    assert_eq!(s.docker.log(), "", "refused before asking upstream");

    // Huge but valid numbers are capped: one page with every tag, no Link.
    for n in ["99999999999", "18446744073709551615", "10001"] {
        let r = raw_get(s.pier.addr, &format!("{tags}?n={n}"), host.as_bytes(), &[]).await;
        assert_eq!(r.status, 200, "n={n}");
        assert_eq!(r.header("link"), None, "n={n}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["tags"],
            serde_json::json!(["3.15", "3.16", "3.17", "3.18", "3.19"]),
            "n={n}"
        );
        let r = raw_get(
            s.pier.addr,
            &format!("/v2/_catalog?n={n}"),
            host.as_bytes(),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "n={n}");
        assert_eq!(r.header("link"), None, "n={n}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["repositories"].is_array(), "{v}");
    }
    // n=0 is an empty page, and `last` past the end is too.
    let r = raw_get(s.pier.addr, &format!("{tags}?n=0"), host.as_bytes(), &[]).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    let r = raw_get(
        s.pier.addr,
        &format!("{tags}?n=18446744073709551615&last=%FF%FF"),
        host.as_bytes(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ranges_are_refused() {
    let Some(s) = setup() else { return };
    let (digest, size) = alpine_layer(&s).await;
    let target = format!("/v2/docker.io/{ALPINE}/blobs/{digest}");
    let host = s.pier.host();
    // Refused before anything is fetched: 416 RANGE_INVALID, no
    // Content-Range (there is no size to report for a malformed header).
    for range in [
        &b"bytes=5-1"[..],
        b"bytes=abc",
        b"bytes=a-b",
        b"bytes 0-1",
        b"bytes=",
        b"bytes=-",
        b"bytes=--1",
        b"bytes=1-2-3",
        b"bytes=0x10-",
        b"bytes=+1-2",
        b"bytes=\xff-1",
        b"=0-1",
    ] {
        let mut line = b"Range: ".to_vec();
        line.extend_from_slice(range);
        let r = raw_get(s.pier.addr, &target, host.as_bytes(), &[&line]).await;
        let shown = String::from_utf8_lossy(range);
        assert_eq!(r.status, 416, "{shown}");
        assert_eq!(r.code(), "RANGE_INVALID", "{shown}");
        assert_eq!(r.header("content-range"), None, "{shown}");
    }
    assert_eq!(s.docker.requests("GET", &format!("{ALPINE}/blobs/")), 0);

    // Well-formed but outside the blob: 416 with the size.
    // Positions past u64 are past every blob.
    for range in [
        format!("bytes={size}-"),
        "bytes=-0".to_owned(),
        "bytes=99999999999999999999-".to_owned(),
        "bytes=18446744073709551616-".to_owned(),
    ] {
        let line = format!("Range: {range}");
        let r = raw_get(s.pier.addr, &target, host.as_bytes(), &[line.as_bytes()]).await;
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.code(), "RANGE_INVALID", "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{size}").as_str()),
            "{range}"
        );
    }

    // Several ranges are answered with the whole blob (RFC 9110 allows it).
    let whole = raw_get(s.pier.addr, &target, host.as_bytes(), &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body.len() as u64, size);
    // So is a unit other than bytes, which RFC 9110 says to ignore.
    for range in [
        "bytes=0-1,5-6",
        "bytes=0-0, -1",
        "bytes=5-1,abc",
        "items=0-1",
    ] {
        let line = format!("Range: {range}");
        let r = raw_get(s.pier.addr, &target, host.as_bytes(), &[line.as_bytes()]).await;
        assert_eq!(r.status, 200, "{range}");
        assert_eq!(r.header("content-range"), None, "{range}");
        assert_eq!(r.body, whole.body, "{range}");
    }
    // Units are compared without regard to case.
    let r = raw_get(
        s.pier.addr,
        &target,
        host.as_bytes(),
        &[b"Range: BYTES=0-1"],
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, whole.body[..2]);
    // An end past the blob is cut to it; spaces around numbers are fine.
    let r = raw_get(
        s.pier.addr,
        &target,
        host.as_bytes(),
        &[b"Range: bytes= 2 - 9999999999999999999"],
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 2-{}/{size}", size - 1).as_str())
    );
    assert_eq!(r.body, whole.body[2..]);
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_host_headers() {
    let Some(s) = setup() else { return };
    let addr = s.pier.addr;
    let manifest = format!("/v2/{ALPINE}/manifests/3.19");
    // An alias that is not configured, whatever the port: NAME_UNKNOWN.
    for host in [
        format!("evil.{DOMAIN}"),
        format!("evil.{DOMAIN}:1"),
        format!("evil.{DOMAIN}:99999999999999999999"),
        format!("evil.{DOMAIN}."),
        format!("EVIL.{}", DOMAIN.to_ascii_uppercase()),
        format!("xn--vil-9la.{DOMAIN}"),
        format!("a.b.{DOMAIN}"),
        format!(".{DOMAIN}"),
        format!("[evil.{DOMAIN}]:5000"),
    ] {
        let r = raw_get(addr, &manifest, host.as_bytes(), &[]).await;
        assert_eq!(r.status, 404, "{host}");
        assert_eq!(r.code(), "NAME_UNKNOWN", "{host}");
    }
    // Hosts that name no alias (IPv6 literals, IPs, odd or missing ports,
    // bytes that are not ASCII) route by the path alone, like a bare IP.
    for host in [
        format!("{DOMAIN}:0"),
        format!("{DOMAIN}:65536"),
        format!("{DOMAIN}:"),
        format!("{DOMAIN}:abc"),
        format!("docker.{DOMAIN}:abc"),
        "[::1]".to_owned(),
        "[::1]:5000".to_owned(),
        "[::ffff:127.0.0.1]:1".to_owned(),
        "[::1".to_owned(),
        "::1".to_owned(),
        "127.0.0.1:99999".to_owned(),
        "169.254.169.254".to_owned(),
        "localhost".to_owned(),
        String::new(),
        format!("ëvil.{DOMAIN}"),
        format!("docker.{DOMAIN}\u{feff}"),
        "\u{1F600}".to_owned(),
        "a".repeat(4000),
    ] {
        let r = raw_get(addr, &manifest, host.as_bytes(), &[]).await;
        assert_eq!(
            r.status,
            200,
            "{host:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.header("docker-content-digest"),
            Some(digest_of("docker", "library/alpine:3.19").as_str()),
            "{host:?}"
        );
    }
    // Raw non-UTF-8 bytes in Host.
    let r = raw_get(addr, &manifest, b"\xff\xfe.m.pier.test", &[]).await;
    assert_eq!(r.status, 200);
    // The alias still works with an odd port, a trailing dot, upper case.
    for host in [
        format!("docker.{DOMAIN}:65535"),
        format!("docker.{DOMAIN}."),
        format!("DOCKER.{}", DOMAIN.to_ascii_uppercase()),
    ] {
        let r = raw_get(addr, &manifest, host.as_bytes(), &[]).await;
        assert_eq!(r.status, 200, "{host}");
    }
    // An absolute-form request target is not a proxy request: its authority
    // is ignored, and a path outside /v2 is just not found.
    let r = raw(
        addr,
        format!(
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.pier.host()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "NAME_UNKNOWN");
    let r = raw(
        addr,
        format!(
            "GET http://evil.{DOMAIN}/v2/x/manifests/latest HTTP/1.1\r\nHost: evil.{DOMAIN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "NAME_UNKNOWN");
    // Pier only ever asked its upstream for alpine's manifest.
    let log = s.docker.log();
    assert!(
        log.lines()
            .all(|l| l.contains("/v2/library/alpine/manifests/")),
        "{log}"
    );
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_and_prefixes_naming_other_hosts_are_refused() {
    let Some(s) = setup() else { return };
    // A listener nobody should connect to, and a port nobody listens on.
    let canary = TcpListener::bind("127.0.0.1:0").unwrap();
    canary.set_nonblocking(true).unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let closed = free_port();
    let up = s.docker.port;
    let others = [
        "evil.example.com".to_owned(),
        "registry.k8s.io".to_owned(), // built in, but switched off here
        format!("127.0.0.1:{canary_port}"),
        format!("127.0.0.1:{closed}"),
        format!("127.0.0.1:{up}"), // the upstream itself, by address
        format!("localhost:{up}"),
        "localhost".to_owned(),
        "169.254.169.254".to_owned(),
        "169.254.169.254:80".to_owned(),
        "10.0.0.1".to_owned(),
        "192.168.1.1:5000".to_owned(),
        "[::1]".to_owned(),
        format!("[::1]:{canary_port}"),
        "0.0.0.0".to_owned(),
        "metadata.google.internal".to_owned(),
    ];
    let ns_only = [
        // Only as ?ns= (in a path these split differently).
        "",
        "http://169.254.169.254",
        "docker.io@169.254.169.254",
        "docker.io/../169.254.169.254",
        "docker.io%00",
        "docker.io:443",
        "docker.io.",
    ];
    let mut cases = Vec::new();
    for ns in others.iter().map(String::as_str).chain(ns_only) {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", ns)
            .finish();
        for path in [
            format!("{ALPINE}/manifests/3.19"),
            format!("{ALPINE}/manifests/{A_SHA256}"),
            format!("{ALPINE}/blobs/{A_SHA256}"),
            format!("{ALPINE}/tags/list"),
            format!("{ALPINE}/referrers/{A_SHA256}"),
        ] {
            cases.push((format!("/v2/{path}?{q}"), 404, "NAME_UNKNOWN"));
        }
    }
    // The same hosts as an add-a-prefix first component.
    for other in &others {
        cases.push((
            format!("/v2/{other}/{ALPINE}/manifests/3.19"),
            404,
            "NAME_UNKNOWN",
        ));
        cases.push((
            format!("/v2/{other}/{ALPINE}/blobs/{A_SHA256}"),
            404,
            "NAME_UNKNOWN",
        ));
    }
    expect_errors(&s, s.pier.host().as_bytes(), &cases).await;
    // Through the host-prefix mode too: ns must agree with the alias.
    let host = format!("docker.{DOMAIN}:{}", s.pier.port());
    let ns_cases: Vec<(String, u16, &str)> = others
        .iter()
        .map(|o| {
            (
                format!("/v2/{ALPINE}/manifests/3.19?ns={o}"),
                404,
                "NAME_UNKNOWN",
            )
        })
        .collect();
    expect_errors(&s, host.as_bytes(), &ns_cases).await;

    assert_eq!(s.docker.log(), "", "nothing reached upstream");
    match canary.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the canary: {other:?}"),
    }
    still_serving(&s).await;
    // The real ns still works afterwards.
    let r = raw_get(
        s.pier.addr,
        &format!("/v2/{ALPINE}/manifests/3.19?ns=docker.io"),
        s.pier.host().as_bytes(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
}
