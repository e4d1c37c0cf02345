//! Request handlers for `/v2/...`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use serde_json::json;

use super::error::{ApiError, ErrorCode};
use super::json_response;
use super::path::{self, V2Path};
use crate::mirror::Mirror;
use crate::range::{RangeError, RangeSpec};
use crate::reference::{Digest, Reference};
use crate::route::Target;
use crate::telemetry::access;
use crate::telemetry::metrics::{SourceLabels, metrics};
use crate::zerocopy::{SendQueue, pieces_body};
use futures::StreamExt;

/// Largest page of tags or repositories one response carries.
const MAX_PAGE: usize = 10_000;
/// Page size of `_catalog` when the client names none.
const DEFAULT_CATALOG_PAGE: usize = 1_000;

/// The parts of a request handlers look at.
struct Ask<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    /// The Host header, or the authority of an HTTP/2 request.
    host: Option<&'a str>,
    query: Vec<(String, String)>,
    /// Lets stored files go out with sendfile (HTTP/1 connections only).
    send_queue: Option<SendQueue>,
    version: Version,
}

impl Ask<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn host(&self) -> Option<&str> {
        self.host
    }
}

/// What `/v2/` requests are served from.
pub struct V2State {
    pub mirror: Arc<Mirror>,
    pub private: Option<Arc<super::private::PrivateApi>>,
}

pub async fn v2(State(state): State<Arc<V2State>>, req: Request) -> Response {
    let mirror = &state.mirror;
    let mut visible: Option<Box<VisibleFn>> = None;
    let req = match &state.private {
        None => req,
        Some(api) => {
            let (parts, body) = req.into_parts();
            let raw = parts
                .uri
                .path()
                .strip_prefix("/v2")
                .unwrap_or("")
                .to_owned();
            match path::parse(&raw) {
                Ok(V2Path::Base) => {
                    return super::private::marked(super::private::base(api, &parts).await);
                }
                Ok(V2Path::Catalog) => match super::private::catalog_filter(api, &parts).await {
                    Ok(f) => visible = Some(Box::new(f)),
                    Err(e) => return super::private::marked(e.into_response()),
                },
                Ok(p) if super::private::claims(api, &parts, &p) => {
                    return super::private::marked(
                        super::private::handle(api, parts, body, p).await,
                    );
                }
                _ => {}
            }
            Request::from_parts(parts, body)
        }
    };
    let method = req.method();
    if method != Method::GET && method != Method::HEAD {
        return ApiError::unsupported().into_response();
    }
    let uri = req.uri();
    let query = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let headers = req.headers();
    let host = super::host_of(headers, uri);
    // Over HTTP/2 bodies are copied into frames: placeholders would be sent
    // as they are, so zero-copy is for HTTP/1 only.
    let send_queue = match req.version() {
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11 => {
            req.extensions().get::<SendQueue>().cloned()
        }
        _ => None,
    };
    let ask = Ask {
        method,
        headers,
        host,
        query,
        send_queue,
        version: req.version(),
    };
    let raw = uri.path().strip_prefix("/v2").unwrap_or(uri.path());
    match handle(mirror, &ask, raw, visible.as_deref()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Whether the caller may see a catalog entry.
type VisibleFn = dyn Fn(&str) -> bool + Send + Sync;
/// Which catalog entries the caller may see, when not all.
type Visible<'a> = Option<&'a VisibleFn>;

async fn handle(
    mirror: &Mirror,
    ask: &Ask<'_>,
    raw: &str,
    visible: Visible<'_>,
) -> Result<Response, ApiError> {
    match path::parse(raw)? {
        V2Path::Base => Ok(json_response(StatusCode::OK, "{}".into())),
        V2Path::Upload { .. } => Err(ApiError::unsupported()),
        V2Path::Catalog => catalog(mirror, ask, visible).await,
        V2Path::Manifest { name, reference } => {
            access::note_reference(reference);
            let target = resolve(mirror, ask, name)?;
            let reference = Reference::parse(reference)?;
            manifest(mirror, ask, &target, &reference).await
        }
        V2Path::Blob { name, digest } => {
            access::note_reference(digest);
            let target = resolve(mirror, ask, name)?;
            let digest = Digest::parse(digest)?;
            blob(mirror, ask, &target, &digest).await
        }
        V2Path::Tags { name } => {
            let target = resolve(mirror, ask, name)?;
            tags(mirror, ask, &target, name).await
        }
        V2Path::Referrers { name, digest } => {
            let target = resolve(mirror, ask, name)?;
            let digest = Digest::parse(digest)?;
            referrers(mirror, ask, &target, &digest).await
        }
    }
}

fn resolve(mirror: &Mirror, ask: &Ask<'_>, name: &str) -> Result<Target, ApiError> {
    let target = mirror.router.resolve(ask.host(), name, ask.param("ns"))?;
    access::note_target(target.registry.as_str(), target.repository.as_str());
    mirror
        .policy
        .check(&target)
        .map_err(|d| ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, d.0))?;
    Ok(target)
}

async fn manifest(
    mirror: &Mirror,
    ask: &Ask<'_>,
    target: &Target,
    reference: &Reference,
) -> Result<Response, ApiError> {
    let hit = mirror.manifest(target, reference).await?;
    // A client's pull by tag (not a prewarm's): the console's most pulled.
    if matches!(reference, Reference::Tag(_)) {
        crate::telemetry::tally::tally().pull(&target.key());
    }
    let media_type = &hit.manifest.media_type;
    if !accepts(ask.headers, media_type) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            format!(
                "the manifest is {media_type}, which this request's Accept header does not list"
            ),
        ));
    }
    let mut resp = if ask.method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(hit.manifest.bytes.clone()))
    };
    let h = resp.headers_mut();
    set(h, header::CONTENT_TYPE, media_type);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(hit.manifest.bytes.len()),
    );
    let digest = hit.digest.to_string();
    set(h, header::ETAG, &["\"", &digest, "\""].concat());
    set(h, "docker-content-digest", &digest);
    if hit.stale {
        set(
            h,
            header::WARNING,
            "110 pier \"served from cache; upstream unreachable\"",
        );
    }
    Ok(resp)
}

/// Whether the client's Accept lines (podman sends one per type, containerd
/// one comma-joined line) allow `media_type`. No manifest types listed means
/// anything goes.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let listed: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .collect();
    let manifest_types = listed
        .iter()
        .filter(|t| t.starts_with("application/vnd."))
        .count();
    manifest_types == 0
        || listed
            .iter()
            .any(|t| t.eq_ignore_ascii_case(media_type) || *t == "*/*")
}

async fn blob(
    mirror: &Mirror,
    ask: &Ask<'_>,
    target: &Target,
    digest: &Digest,
) -> Result<Response, ApiError> {
    if ask.method == Method::HEAD {
        let info = mirror.blob_info(target, digest).await?;
        // An empty body of unknown length: hyper would otherwise answer a
        // HEAD of unknown size with `Content-Length: 0`, which the GET
        // would contradict.
        let unknown =
            || Body::from_stream(futures::stream::empty::<Result<bytes::Bytes, std::io::Error>>());
        let mut resp = Response::new(if info.size.is_some() {
            Body::empty()
        } else {
            unknown()
        });
        let h = resp.headers_mut();
        blob_headers(h, digest);
        if let Some(size) = info.size {
            set(h, header::CONTENT_LENGTH, &size.to_string());
        }
        return Ok(resp);
    }
    let range = range_of(ask.headers)?;
    let for_peer = ask.headers.contains_key(crate::mirror::PEER_HEADER);
    // Whole-blob GETs may go straight to the bucket (never ranges, never a
    // peer replica, which streams).
    if range.is_none()
        && !for_peer
        && let Some(url) = mirror.blob_redirect(target, digest).await
    {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        set(resp.headers_mut(), header::LOCATION, &url);
        set(
            resp.headers_mut(),
            "docker-content-digest",
            &digest.to_string(),
        );
        return Ok(resp);
    }
    // Over HTTP/1.0 a body without a length ends when the connection
    // closes, so a fetch that breaks off would look complete.
    let needs_length = ask.version <= Version::HTTP_10;
    let b = mirror
        .blob(target, digest, range, for_peer, needs_length)
        .await?;
    let len = match (b.range, b.size) {
        (Some(r), _) => Some(r.len()),
        (None, size) => size,
    };
    let served = metrics().bytes_served.get_or_create(&SourceLabels {
        source: if b.cached { "cache" } else { "upstream" },
        origin: b.origin,
    });
    let served = served.clone();
    let stream = match (b.pieces, ask.send_queue.clone()) {
        (Some(pieces), Some(queue)) => pieces_body(queue, pieces).boxed(),
        _ => b.stream,
    };
    // The request's line is logged when the head goes out; a body that
    // breaks off later (a fetch failing, a full disk) is told in a line of
    // its own under the same request, so a `status=200` is not the last word.
    let span = tracing::Span::current();
    let mut sent = 0u64;
    let stream = stream.inspect(move |chunk| match chunk {
        Ok(c) => {
            sent += c.len() as u64;
            served.inc_by(c.len() as u64);
        }
        Err(e) => {
            metrics().bodies_broken.inc();
            span.in_scope(|| {
                tracing::warn!(sent, error = %e, "the response body broke off");
            });
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    blob_headers(h, digest);
    if let Some(len) = len {
        set(h, header::CONTENT_LENGTH, &len.to_string());
    }
    if let (Some(r), Some(size)) = (b.range, b.size) {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        set(
            resp.headers_mut(),
            header::CONTENT_RANGE,
            &r.content_range(size),
        );
    }
    Ok(resp)
}

/// The blob range a request's `Range` header asks for, if any.
pub(super) fn range_of(headers: &HeaderMap) -> Result<Option<RangeSpec>, ApiError> {
    match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(v)) => match RangeSpec::parse(v) {
            Ok(r) => Ok(r),
            Err(RangeError::Malformed | RangeError::Unsatisfiable) => {
                Err(ApiError::malformed_range())
            }
        },
        Some(Err(_)) => Err(ApiError::malformed_range()),
    }
}

pub(super) fn blob_headers(h: &mut HeaderMap, digest: &Digest) {
    set(h, header::CONTENT_TYPE, "application/octet-stream");
    set(h, "docker-content-digest", &digest.to_string());
    set(h, header::ETAG, &format!("\"{digest}\""));
    set(h, header::ACCEPT_RANGES, "bytes");
    set(h, header::CACHE_CONTROL, "max-age=31536000");
}

/// `n` and `last`: the page a listing asks for.
fn page(ask: &Ask<'_>, default: usize) -> Result<(usize, Option<String>), ApiError> {
    let n = match ask.param("n") {
        None | Some("") => default,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::PaginationInvalid,
                    "n must be a non-negative integer",
                )
            })?
            .min(MAX_PAGE as u64) as usize,
    };
    let last = ask
        .param("last")
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    Ok((n, last))
}

async fn tags(
    mirror: &Mirror,
    ask: &Ask<'_>,
    target: &Target,
    name: &str,
) -> Result<Response, ApiError> {
    let (n, last) = page(ask, MAX_PAGE)?;
    let all = mirror.tags(target).await?;
    let start = match &last {
        Some(l) => all.partition_point(|t| t.as_str() <= l.as_str()),
        None => 0,
    };
    let page: Vec<&String> = all[start..].iter().take(n).collect();
    let more = start + page.len() < all.len() && !page.is_empty();
    let body = json!({ "name": name, "tags": page }).to_string();
    let mut resp = json_response(StatusCode::OK, body);
    if more && let Some(last_tag) = page.last() {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("n", &n.to_string());
        q.append_pair("last", last_tag);
        if let Some(ns) = ask.param("ns") {
            q.append_pair("ns", ns);
        }
        let link = format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish());
        set(resp.headers_mut(), header::LINK, &link);
    }
    Ok(resp)
}

async fn catalog(
    mirror: &Mirror,
    ask: &Ask<'_>,
    visible: Visible<'_>,
) -> Result<Response, ApiError> {
    let (n, last) = page(ask, DEFAULT_CATALOG_PAGE)?;
    // One more than asked tells whether another page exists.
    let mut repos = Vec::new();
    let mut after = last.clone();
    loop {
        let listed = mirror.catalog(after.as_deref(), n + 1).await?;
        let exhausted = listed.len() <= n;
        after = listed.last().cloned();
        repos.extend(listed.into_iter().filter(|r| visible.is_none_or(|v| v(r))));
        if exhausted || repos.len() > n {
            break;
        }
    }
    let more = repos.len() > n;
    repos.truncate(n);
    let body = json!({ "repositories": repos }).to_string();
    let mut resp = json_response(StatusCode::OK, body);
    if more && let Some(last_repo) = repos.last() {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &n.to_string())
            .append_pair("last", last_repo)
            .finish();
        set(
            resp.headers_mut(),
            header::LINK,
            &format!("</v2/_catalog?{q}>; rel=\"next\""),
        );
    }
    Ok(resp)
}

async fn referrers(
    mirror: &Mirror,
    ask: &Ask<'_>,
    target: &Target,
    digest: &Digest,
) -> Result<Response, ApiError> {
    let artifact_type = ask.param("artifactType");
    let (body, filtered) = mirror.referrers(target, digest, artifact_type).await?;
    let mut resp = Response::new(Body::from(body));
    set(
        resp.headers_mut(),
        header::CONTENT_TYPE,
        "application/vnd.oci.image.index.v1+json",
    );
    if filtered {
        set(resp.headers_mut(), "oci-filters-applied", "artifactType");
    }
    Ok(resp)
}

pub async fn ready(State(mirror): State<Arc<Mirror>>) -> Response {
    match mirror.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lines_are_all_read() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        assert!(!accepts(
            &h,
            "application/vnd.docker.distribution.manifest.v2+json"
        ));
        let mut h = HeaderMap::new();
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json;q=0.5"),
        );
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
    }
}
