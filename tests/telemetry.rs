#![allow(clippy::unwrap_used, clippy::expect_used)]

//! What operators see of a running `pier serve`: spans exported over OTLP
//! (received here by a small OTLP/HTTP collector) and JSON log lines.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use common::fake::{Blob, Fake, random_bytes, sha256_hex};
use common::*;
use serde_json::Value;

/// Content type and body of each export received.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// Collects the bodies POSTed to /v1/traces.
struct Collector {
    url: String,
    bodies: Received,
}

impl Collector {
    async fn start() -> Collector {
        let bodies: Received = Arc::default();
        let app = Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(
                    |State(b): State<Received>, headers: http::HeaderMap, body: Bytes| async move {
                        let ct = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        b.lock().unwrap().push((ct, body));
                        "{}"
                    },
                ),
            )
            .with_state(bodies.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, bodies }
    }

    /// Every span received so far (OTLP/JSON), flattened.
    fn spans(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (_, body) in self.bodies.lock().unwrap().iter() {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                continue;
            };
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .map(|a| a["value"]["stringValue"].clone());
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["service"] = service.clone().unwrap_or(Value::Null);
                        out.push(span);
                    }
                }
            }
        }
        out
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn attr_str<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    attr(span, key)?["stringValue"].as_str()
}

async fn get_oci_manifest(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
}

fn config(fake: &Fake) -> String {
    let data = tempfile::tempdir().unwrap().keep();
    format!(
        "listen = \"127.0.0.1:0\"\nbuiltin_upstreams = false\ndefault_registry = \"corp.example\"\n\
         log_format = \"json\"\n\
         [storage]\npath = \"{}\"\n\
         [[upstreams]]\nregistry = \"corp.example\"\nendpoints = [\"{}\"]\n",
        data.display(),
        fake.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_logs_are_json() {
    let fake = Fake::start();
    let blob = random_bytes(200_000, 41);
    let digest = format!("sha256:{}", sha256_hex(&blob));
    fake.blob(&digest, Blob::Good(blob.clone()));
    let manifest = br#"{"schemaVersion":2}"#;
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
    let collector = Collector::start().await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut pier = PierProcess::start_with(
        &config(&fake),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "pier-under-test"),
        ],
        Some(log.path()),
    );
    let http = reqwest::Client::new();
    let base = format!("{}/v2/corp.example/team/app", pier.url());
    let r = get_oci_manifest(&http, &format!("{base}/manifests/v1")).await;
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{base}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), blob);

    // Spans arrive in batches.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.spans();
        let has_fetch = spans.iter().any(|s| s["name"] == "blob fetch");
        if has_fetch || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    let request = spans
        .iter()
        .find(|s| s["name"] == "GET manifest")
        .unwrap_or_else(|| panic!("no manifest request span in {names:?}"));
    assert_eq!(request["service"], "pier-under-test");
    assert_eq!(attr_str(request, "registry"), Some("corp.example"));
    assert_eq!(attr_str(request, "repository"), Some("team/app"));
    assert_eq!(attr_str(request, "reference"), Some("v1"));
    assert_eq!(attr_str(request, "cache"), Some("miss"));
    let status = attr(request, "status").map(|v| v["intValue"].to_string());
    assert_eq!(
        status.as_deref().map(|s| s.trim_matches('"')),
        Some("200"),
        "{request}"
    );
    // The upstream call is a child of the request, in the same trace.
    let upstream = spans
        .iter()
        .find(|s| s["name"] == "GET upstream" && s["parentSpanId"] == request["spanId"])
        .unwrap_or_else(|| panic!("no upstream child span in {names:?}"));
    assert_eq!(upstream["traceId"], request["traceId"]);
    assert_eq!(attr_str(upstream, "registry"), Some("corp.example"));
    // The blob request, its fetch and the fetch's upstream call.
    let blob_req = spans
        .iter()
        .find(|s| s["name"] == "GET blob")
        .unwrap_or_else(|| panic!("no blob request span in {names:?}"));
    assert_eq!(attr_str(blob_req, "reference"), Some(digest.as_str()));
    assert_eq!(attr_str(blob_req, "cache"), Some("miss"));
    let fetch = spans
        .iter()
        .find(|s| s["name"] == "blob fetch")
        .unwrap_or_else(|| panic!("no fetch span in {names:?}"));
    assert_eq!(fetch["parentSpanId"], blob_req["spanId"]);
    assert_eq!(attr_str(fetch, "digest"), Some(digest.as_str()));
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "GET upstream" && s["parentSpanId"] == fetch["spanId"]),
        "{names:?}"
    );
    // No secrets or signed URLs in what leaves the process.
    let all = serde_json::to_string(&spans).unwrap();
    assert!(!all.to_ascii_lowercase().contains("authorization"));

    // Every log line is one JSON object; the request lines carry their
    // fields.
    assert!(pier.terminate().success());
    let text = std::fs::read_to_string(log.path()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request_line = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "request"
                && l["span"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/manifests/v1"))
        })
        .unwrap_or_else(|| panic!("no request line in\n{text}"));
    assert_eq!(request_line["level"], "INFO");
    assert_eq!(request_line["fields"]["status"], 200);
    assert_eq!(request_line["span"]["client"], "127.0.0.1");
    assert_eq!(request_line["fields"]["registry"], "corp.example");
    assert_eq!(request_line["fields"]["repository"], "team/app");
    assert_eq!(request_line["fields"]["reference"], "v1");
    assert_eq!(request_line["fields"]["cache"], "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_is_the_default_otlp_encoding() {
    let fake = Fake::start();
    let collector = Collector::start().await;
    let pier = PierProcess::start_with(
        &config(&fake),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        None,
    );
    let r = reqwest::get(format!("{}/v2/", pier.url())).await.unwrap();
    assert_eq!(r.status(), 200);
    // The probe Pier's start-up waited on may come in an earlier batch.
    let needle = b"GET base";
    let has_base = |bodies: &[(String, Bytes)]| {
        bodies
            .iter()
            .any(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_base(&collector.bodies.lock().unwrap()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bodies = collector.bodies.lock().unwrap();
    assert!(has_base(&bodies), "no span for the request received");
    for (content_type, _) in bodies.iter() {
        assert_eq!(content_type, "application/x-protobuf");
    }
}

/// The default text format, as a log file or collector receives it: one
/// line per request with the image and the cache outcome, none lost to the
/// background writer when Pier stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_name_the_image_and_none_are_lost_at_shutdown() {
    let fake = Fake::start();
    fake.manifest(
        "team/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        br#"{"schemaVersion":2}"#,
    );
    let log = tempfile::NamedTempFile::new().unwrap();
    let text_config = config(&fake).replace("log_format = \"json\"\n", "");
    let mut pier = PierProcess::start_with(&text_config, &[], Some(log.path()));
    let http = reqwest::Client::new();
    let url = format!("{}/v2/corp.example/team/app/manifests/v1", pier.url());
    const REQUESTS: usize = 500;
    for _ in 0..REQUESTS {
        assert_eq!(get_oci_manifest(&http, &url).await.status(), 200);
    }
    let r = http
        .get(format!(
            "{}/v2/corp.example/team/app/manifests/v%20",
            pier.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(pier.terminate().success());

    let text = std::fs::read_to_string(log.path()).unwrap();
    let request_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("/manifests/v1 client=127.0.0.1}: pier::api: request "))
        .collect();
    assert_eq!(request_lines.len(), REQUESTS, "{text}");
    for line in &request_lines {
        let (time, rest) = line.split_once(' ').unwrap();
        // 2026-11-22T15:35:08.962959Z
        assert_eq!(time.len(), 27, "{line}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
        assert!(
            rest.starts_with(" INFO request{method=GET path=/v2/corp.example/team/app/manifests/v1 client=127.0.0.1}: pier::api: request registry=\"corp.example\" repository=\"team/app\" reference=\"v1\" cache="),
            "{line}"
        );
        assert!(line.contains(" status=200 ms="), "{line}");
    }
    assert!(
        request_lines[0].contains("cache=\"miss\""),
        "{}",
        request_lines[0]
    );
    assert!(
        request_lines[1].contains("cache=\"hit\""),
        "{}",
        request_lines[1]
    );
    // The year in the line is the clock's.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let year = 1970 + now / 31_556_952;
    assert!(
        request_lines[0].starts_with(&year.to_string()),
        "{}",
        request_lines[0]
    );
    // A client's mistake: logged with its status, nothing about an image.
    let bad = text
        .lines()
        .find(|l| l.contains("manifests/v%20"))
        .unwrap_or_else(|| panic!("no line for the bad request in\n{text}"));
    assert!(bad.contains(" status=400 "), "{bad}");
    assert!(!bad.contains("cache="), "{bad}");
    // It says why, as the error body did.
    assert!(bad.contains(" error=\""), "{bad}");
    assert!(!request_lines[0].contains("error="), "{}", request_lines[0]);
}
