//! The HTTP face: an axum router for the registry pull API, health and
//! readiness. Handlers parse, ask `mirror`, and frame the answer.

mod admin;
mod console;
mod error;
mod handlers;
mod pages;
mod path;
mod private;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;
use tracing::field::Empty;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::{HeaderValue, StatusCode};

pub use admin::Admin;
pub use console::Console;
pub use error::{ApiError, ErrorCode};
pub use private::PrivateApi;

use crate::limits::{ClientLimits, PeerAddr};
use crate::mirror::Mirror;
use crate::telemetry::{self, access, metrics::metrics};

/// The registry API, probes and metrics; with `reader` the console's read
/// API, and with `admin` the admin API.
pub fn router(
    mirror: Arc<Mirror>,
    limits: Arc<ClientLimits>,
    admin: Option<Arc<Admin>>,
    reader: Option<Arc<Console>>,
    private: Option<Arc<crate::private::Private>>,
) -> Router {
    let private = private.map(|private| {
        Arc::new(PrivateApi {
            private,
            limits: limits.clone(),
        })
    });
    let v2 = Arc::new(handlers::V2State {
        mirror: mirror.clone(),
        private: private.clone(),
    });
    let mut app = Router::new()
        .route("/v2", any(handlers::v2))
        .route("/v2/", any(handlers::v2))
        .route("/v2/{*rest}", any(handlers::v2))
        .with_state(v2)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(handlers::ready))
        .route("/metrics", get(metrics_text))
        .with_state(mirror);
    if let Some(reader) = reader {
        app = app.merge(console::router(reader)).merge(pages::router());
    }
    if let Some(admin) = admin {
        app = app.merge(admin::router(admin));
    }
    if let Some(private) = private {
        app = app.merge(
            Router::new()
                .route("/auth/token", get(private::token))
                .with_state(private),
        );
    }
    app.fallback(|| async { ApiError::not_found_route() })
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            enforce_client_limits,
        ))
        .layer(middleware::from_fn_with_state(
            limits,
            common_headers_and_log,
        ))
}

/// The client a request is counted against (a request extension).
#[derive(Clone, Copy, Debug)]
struct ClientIp(IpAddr);

/// Registry requests count against their client's limits; probes and
/// metrics do not.
async fn enforce_client_limits(
    State(limits): State<Arc<ClientLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(ClientIp(ip)) = req.extensions().get::<ClientIp>().copied() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if !path.starts_with("/v2") && !path.starts_with("/api/") && path != "/auth/token" {
        return next.run(req).await;
    }
    if let Err(refused) = limits.admit(ip).await {
        return ApiError::client_limited(&refused).into_response();
    }
    if req.method() != http::Method::GET || !req.uri().path().contains("/blobs/") {
        return next.run(req).await;
    }
    match limits.start_download(ip) {
        Ok(None) => next.run(req).await,
        Ok(Some(download)) => next
            .run(req)
            .await
            .map(|body| Body::new(download.wrap(body))),
        Err(refused) => ApiError::client_limited(&refused).into_response(),
    }
}

/// Every response says which API it speaks; every request is logged once.
async fn common_headers_and_log(
    State(limits): State<Arc<ClientLimits>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // For a failure's `?ns=`, read only if the request fails (a shared,
    // not copied, buffer).
    let uri = req.uri().clone();
    let client = req
        .extensions()
        .get::<PeerAddr>()
        .map(|peer| limits.client_ip(peer.0, req.headers()));
    if let Some(ip) = client {
        req.extensions_mut().insert(ClientIp(ip));
    }
    let client = client.map(|ip| ip.to_string()).unwrap_or_default();
    // Everything logged while handling the request (upstream failures, a
    // stale serve) carries the request it belongs to.
    let endpoint = endpoint_of(&path);
    let span = tracing::info_span!(
        "request",
        otel.name = Empty,
        otel.kind = Empty,
        %method,
        %path,
        %client,
        registry = Empty,
        repository = Empty,
        reference = Empty,
        cache = Empty,
        status = Empty,
    );
    // Before anything starts the exported span: its name and kind are fixed
    // from then on.
    let exporting = telemetry::exporting();
    if exporting {
        span.record("otel.name", format_args!("{method} {endpoint}"));
        span.record("otel.kind", "server");
    }
    let (mut resp, facts) = access::collect(next.run(req))
        .instrument(span.clone())
        .await;
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    let status = resp.status();
    let took = started.elapsed();
    metrics().request(endpoint, method.as_str(), status.as_u16(), took);
    if exporting {
        span.record("registry", facts.registry.as_deref());
        span.record("repository", facts.repository.as_deref());
        span.record("reference", facts.reference.as_deref());
        span.record("cache", facts.cache);
        span.record("status", i64::from(status.as_u16()));
    }
    // Whole microseconds: enough for a log line, and short.
    let ms = took.as_micros() as f64 / 1000.0;
    span.in_scope(|| {
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    registry = facts.registry.as_deref(),
                    repository = facts.repository.as_deref(),
                    reference = facts.reference.as_deref(),
                    cache = facts.cache,
                    status = status.as_u16(),
                    ms,
                    error = facts.error.as_deref(),
                    "request"
                )
            };
        }
        if status.is_server_error() {
            line!(warn);
        } else {
            line!(info);
        }
    });
    note_failure(&resp, &method, &path, uri.query());
    resp
}

/// A registry request refused for a reason a user may ask about (not the
/// `401` that starts every token dance) goes on the console's failures.
fn note_failure(resp: &Response, method: &http::Method, path: &str, query: Option<&str>) {
    let status = resp.status();
    if !path.starts_with("/v2/") || status.as_u16() < 400 || status == StatusCode::UNAUTHORIZED {
        return;
    }
    let Some(error::Refusal(message)) = resp.extensions().get::<error::Refusal>() else {
        return;
    };
    if resp.extensions().get::<private::PrivateAnswer>().is_some() {
        return;
    }
    let mut path: String = path.chars().take(512).collect();
    if let Some(ns) = query.and_then(|q| q.split('&').find(|p| p.starts_with("ns="))) {
        path.push('?');
        path.extend(ns.chars().take(256));
    }
    telemetry::tally::tally().failure(telemetry::tally::Failure {
        at_ms: crate::meta::now_ms(),
        method: method.to_string(),
        path,
        status: status.as_u16(),
        message: message.chars().take(512).collect(),
        replica: String::new(),
    });
}

/// The kind of endpoint a path is, for metrics (a fixed, small label set).
fn endpoint_of(path: &str) -> &'static str {
    match path.strip_prefix("/v2") {
        Some("" | "/") => "base",
        Some(rest) => match path::parse(rest) {
            Ok(path::V2Path::Manifest { .. }) => "manifest",
            Ok(path::V2Path::Blob { .. }) => "blob",
            Ok(path::V2Path::Tags { .. }) => "tags",
            Ok(path::V2Path::Catalog) => "catalog",
            Ok(path::V2Path::Referrers { .. }) => "referrers",
            _ => "other",
        },
        None if path == "/healthz" || path == "/readyz" => "health",
        None if path == "/metrics" => "metrics",
        None if path.starts_with("/api/") => "admin",
        None => "other",
    }
}

async fn metrics_text() -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics().encode(),
    )
        .into_response()
}

impl From<StatusCode> for ApiError {
    fn from(s: StatusCode) -> Self {
        ApiError::new(
            s,
            ErrorCode::Unknown,
            s.canonical_reason().unwrap_or("error"),
        )
    }
}

/// The host a request names: its Host header, or the authority of an
/// HTTP/2 request (which has no Host header).
fn host_of<'a>(headers: &'a http::HeaderMap, uri: &'a http::Uri) -> Option<&'a str> {
    match headers.get(http::header::HOST) {
        Some(v) => v.to_str().ok(),
        None => uri.authority().map(|a| a.as_str()),
    }
}

pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
