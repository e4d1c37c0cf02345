//! The private namespace's face: who is asking (Basic credentials or a
//! token), whether they may, the token endpoint, and the push and content
//! API for private repositories. Mirrored names never come here.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::TryStreamExt;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;

use super::error::{ApiError, ErrorCode};
use super::handlers::{blob_headers, range_of};
use super::json_response;
use super::path::V2Path;
use crate::limits::ClientLimits;
use crate::private::manifests::MAX_MANIFEST;
use crate::private::{Access, Action, Granted, Private, Repo, token::SERVICE};
use crate::reference::{Digest, Reference};

/// What the private namespace needs beside itself.
pub struct PrivateApi {
    pub private: Arc<Private>,
    pub limits: Arc<ClientLimits>,
}

/// Who a request comes from.
enum Caller {
    Anonymous,
    /// Basic credentials, checked.
    User(String),
    /// A token of Pier's, checked.
    Token(Granted),
}

impl Caller {
    fn user(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::User(u) => Some(u),
            Caller::Token(g) => g.user.as_deref(),
        }
    }
}

/// The client's address, as the limits count it.
fn client(req: &Parts) -> Option<IpAddr> {
    req.extensions.get::<super::ClientIp>().map(|c| c.0)
}

/// The request's Host (or HTTP/2 authority).
fn host_of(req: &Parts) -> Option<&str> {
    super::host_of(&req.headers, &req.uri)
}

/// Works out who is asking. Wrong credentials are a `401` (counted as a
/// failed login), or a `429` once a client has failed too often.
async fn caller(api: &PrivateApi, req: &Parts) -> Result<Caller, ApiError> {
    let Some(value) = req.headers.get(header::AUTHORIZATION) else {
        return Ok(Caller::Anonymous);
    };
    let value = value.to_str().unwrap_or("");
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return match api.private.tokens.check(rest.trim()).await {
            Ok(Some(g)) => Ok(Caller::Token(g)),
            Ok(None) => Err(challenge(
                api,
                req,
                None,
                "the token is not valid or has expired",
            )),
            Err(e) => Err(unavailable(e)),
        };
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(challenge(
            api,
            req,
            None,
            "send Basic credentials or a Bearer token",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        return Err(challenge(
            api,
            req,
            None,
            "the Basic credentials are malformed",
        ));
    };
    let users = &api.private.users;
    if users.remembered(name, password) {
        return Ok(Caller::User(name.to_owned()));
    }
    // One check at a time per client, each after the lockout verdict on
    // the one before: guesses cannot run ahead of the count in parallel.
    let ip = client(req);
    let _turn = match ip {
        Some(ip) => {
            let turn = api.limits.login_turn(ip).await;
            api.limits
                .may_log_in(ip)
                .map_err(|r| ApiError::client_limited(&r))?;
            Some(turn)
        }
        None => None,
    };
    if users.verify(name, password).await {
        return Ok(Caller::User(name.to_owned()));
    }
    tracing::info!(user = name, "a login failed");
    if let Some(ip) = ip
        && let Err(refused) = api.limits.failed_login(ip).await
    {
        return Err(ApiError::client_limited(&refused));
    }
    Err(challenge(
        api,
        req,
        None,
        "the user name or password is wrong",
    ))
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "metadata error");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        "the registry's metadata store is unavailable; its log has the details",
    )
}

/// Marks a response of the private namespace: its failures stay out of
/// the console's list, which anyone who reaches the console reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct PrivateAnswer;

pub(super) fn marked(mut resp: Response) -> Response {
    resp.extensions_mut().insert(PrivateAnswer);
    resp
}

/// A `401` naming the token endpoint, and the scope to ask it for.
fn challenge(api: &PrivateApi, req: &Parts, scope: Option<(&str, Action)>, why: &str) -> ApiError {
    let realm = match &api.private.realm {
        Some(realm) => realm.clone(),
        None => derived_realm(req),
    };
    let mut value = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
    if let Some((name, action)) = scope {
        let actions = match action {
            Action::Pull => "pull",
            Action::Push => "pull,push",
        };
        value.push_str(&format!(",scope=\"repository:{name}:{actions}\""));
    }
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, why)
        .with_header(header::WWW_AUTHENTICATE, value)
}

/// The token endpoint on the host the client asked, by the scheme it
/// used (as a proxy in front reports it).
fn derived_realm(req: &Parts) -> String {
    let scheme = match req
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        Some("http") => "http",
        _ if req.extensions.get::<crate::tls::Secured>().is_some() => "https",
        _ => "http",
    };
    let host = host_of(req).unwrap_or("localhost");
    format!("{scheme}://{host}/auth/token")
}

/// Lets the request through, or says why not: `401` (with what to ask
/// the token endpoint for) for an anonymous caller, `403` for a known one
/// that may not. A token proves who the caller is; what they may do is read
/// from the configuration now, not from the scopes the token was issued for
/// (clients such as ORAS keep one token across scopes).
fn authorize(
    api: &PrivateApi,
    req: &Parts,
    who: &Caller,
    name: &str,
    repo: &Repo,
    action: Action,
) -> Result<(), ApiError> {
    if api
        .private
        .users
        .may(who.user(), repo.name.as_str(), action)
    {
        return Ok(());
    }
    let Some(user) = who.user() else {
        return Err(challenge(
            api,
            req,
            Some((name, action)),
            "authentication required: log in to this registry",
        ));
    };
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Denied,
        format!("{user} may not {} {}", action.as_str(), repo.key),
    ))
}

/// `GET /v2/` with the private namespace on: who are you? Docker's login
/// checks credentials here.
pub(super) async fn base(api: &PrivateApi, req: &Parts) -> Response {
    match caller(api, req).await {
        Ok(Caller::Anonymous) => {
            challenge(api, req, None, "authentication required").into_response()
        }
        Ok(_) => json_response(StatusCode::OK, "{}".into()),
        Err(e) => e.into_response(),
    }
}

/// The private repository a request's path and host name, if any.
pub(super) fn claims(api: &PrivateApi, req: &Parts, path: &V2Path<'_>) -> bool {
    let name = match path {
        V2Path::Manifest { name, .. }
        | V2Path::Blob { name, .. }
        | V2Path::Tags { name }
        | V2Path::Referrers { name, .. }
        | V2Path::Upload { name, .. } => *name,
        V2Path::Base | V2Path::Catalog => return false,
    };
    api.private.repo(host_of(req), name).is_some()
}

/// A request to a private repository (`claims` said so).
pub(super) async fn handle(api: &PrivateApi, req: Parts, body: Body, path: V2Path<'_>) -> Response {
    match handle_inner(api, req, body, path).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle_inner(
    api: &PrivateApi,
    req: Parts,
    body: Body,
    path: V2Path<'_>,
) -> Result<Response, ApiError> {
    let p = &api.private;
    let name = match &path {
        V2Path::Manifest { name, .. }
        | V2Path::Blob { name, .. }
        | V2Path::Tags { name }
        | V2Path::Referrers { name, .. }
        | V2Path::Upload { name, .. } => (*name).to_owned(),
        V2Path::Base | V2Path::Catalog => return Err(ApiError::not_found_route()),
    };
    let repo = match p.repo(host_of(&req), &name) {
        Some(r) => r?,
        None => return Err(ApiError::not_found_route()),
    };
    crate::telemetry::access::note_target(p.prefix(), repo.name.as_str());
    let method = req.method.clone();
    let action = match (&path, &method) {
        (_, &Method::GET | &Method::HEAD) if !matches!(path, V2Path::Upload { .. }) => Action::Pull,
        (V2Path::Manifest { .. } | V2Path::Blob { .. }, &Method::DELETE) => Action::Push,
        (V2Path::Manifest { .. }, &Method::PUT) => Action::Push,
        (V2Path::Upload { id: None, .. }, &Method::POST) => Action::Push,
        (
            V2Path::Upload { id: Some(_), .. },
            &Method::PATCH | &Method::PUT | &Method::GET | &Method::DELETE,
        ) => Action::Push,
        _ => return Err(not_allowed(&path)),
    };
    let who = caller(api, &req).await?;
    authorize(api, &req, &who, &name, &repo, action)?;
    match path {
        V2Path::Manifest { reference, .. } => {
            crate::telemetry::access::note_reference(reference);
            let reference = Reference::parse(reference)?;
            match method {
                Method::PUT => put_manifest(api, &req, body, &name, &repo, &reference).await,
                Method::DELETE => {
                    p.delete_manifest(&repo, &reference).await?;
                    Ok(StatusCode::ACCEPTED.into_response())
                }
                _ => get_manifest(api, &req, &repo, &reference).await,
            }
        }
        V2Path::Blob { digest, .. } => {
            crate::telemetry::access::note_reference(digest);
            let digest = Digest::parse(digest)?;
            match method {
                Method::DELETE => {
                    p.delete_blob(&repo, &digest).await?;
                    Ok(StatusCode::ACCEPTED.into_response())
                }
                _ => get_blob(api, &req, &repo, &digest).await,
            }
        }
        V2Path::Tags { .. } => tags(api, &req, &name, &repo).await,
        V2Path::Referrers { digest, .. } => {
            let subject = Digest::parse(digest)?;
            let query = params(&req);
            let artifact_type = param(&query, "artifactType");
            let body = p.referrers(&repo, &subject, artifact_type).await?;
            let mut resp = Response::new(Body::from(body));
            set(
                resp.headers_mut(),
                header::CONTENT_TYPE,
                crate::private::manifests::OCI_INDEX,
            );
            if artifact_type.is_some() {
                set(resp.headers_mut(), "oci-filters-applied", "artifactType");
            }
            Ok(resp)
        }
        V2Path::Upload { id: None, .. } => start_upload(api, &req, body, &who, &name, &repo).await,
        V2Path::Upload { id: Some(id), .. } => {
            let id = id.to_owned();
            upload(api, &req, body, &name, &repo, &id).await
        }
        V2Path::Base | V2Path::Catalog => Err(ApiError::not_found_route()),
    }
}

fn not_allowed(path: &V2Path<'_>) -> ApiError {
    let allow = match path {
        V2Path::Manifest { .. } => "GET, HEAD, PUT, DELETE",
        V2Path::Blob { .. } => "GET, HEAD, DELETE",
        V2Path::Upload { id: None, .. } => "POST",
        V2Path::Upload { id: Some(_), .. } => "GET, PATCH, PUT, DELETE",
        _ => "GET, HEAD",
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unsupported,
        format!("this endpoint takes {allow}"),
    )
    .with_header(header::ALLOW, allow.into())
}

async fn get_manifest(
    api: &PrivateApi,
    req: &Parts,
    repo: &Repo,
    reference: &Reference,
) -> Result<Response, ApiError> {
    let found = api.private.manifest(repo, reference).await?;
    let mut resp = if req.method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(found.manifest.bytes.clone()))
    };
    let h = resp.headers_mut();
    set(h, header::CONTENT_TYPE, &found.manifest.media_type);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(found.manifest.bytes.len()),
    );
    let digest = found.digest.to_string();
    set(h, header::ETAG, &format!("\"{digest}\""));
    set(h, "docker-content-digest", &digest);
    Ok(resp)
}

async fn put_manifest(
    api: &PrivateApi,
    req: &Parts,
    body: Body,
    name: &str,
    repo: &Repo,
    reference: &Reference,
) -> Result<Response, ApiError> {
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(body, MAX_MANIFEST)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::SizeInvalid,
                format!("a manifest may be at most {MAX_MANIFEST} bytes, and must arrive whole"),
            )
        })?;
    let (digest, points) = api
        .private
        .put_manifest(repo, reference, &content_type, body)
        .await?;
    let mut resp = created(&format!("/v2/{name}/manifests/{digest}"), &digest);
    // Tells the client the referrers API lists it: no fallback tag needed.
    if let Some(subject) = points.subject {
        set(resp.headers_mut(), "oci-subject", &subject.to_string());
    }
    Ok(resp)
}

async fn get_blob(
    api: &PrivateApi,
    req: &Parts,
    repo: &Repo,
    digest: &Digest,
) -> Result<Response, ApiError> {
    if req.method == Method::HEAD {
        let size = api.private.blob_size(repo, digest).await?;
        let mut resp = Response::new(Body::empty());
        private_blob_headers(resp.headers_mut(), digest);
        set(
            resp.headers_mut(),
            header::CONTENT_LENGTH,
            &size.to_string(),
        );
        return Ok(resp);
    }
    let range = range_of(&req.headers)?;
    let b = api.private.blob(repo, digest, range).await?;
    let len = b.len();
    let mut resp = Response::new(Body::from_stream(b.stream));
    let h = resp.headers_mut();
    private_blob_headers(h, digest);
    set(h, header::CONTENT_LENGTH, &len.to_string());
    if let Some(r) = b.range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        set(
            resp.headers_mut(),
            header::CONTENT_RANGE,
            &r.content_range(b.size),
        );
    }
    Ok(resp)
}

async fn tags(
    api: &PrivateApi,
    req: &Parts,
    name: &str,
    repo: &Repo,
) -> Result<Response, ApiError> {
    let query = params(req);
    let n = match query
        .iter()
        .find(|(k, _)| k == "n")
        .map(|(_, v)| v.as_str())
    {
        None | Some("") => usize::MAX,
        Some(v) => v.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::PaginationInvalid,
                "n must be a non-negative integer",
            )
        })?,
    };
    let last = query
        .iter()
        .find(|(k, _)| k == "last")
        .map(|(_, v)| v.clone());
    let all = api.private.tags(repo).await?;
    let start = last
        .as_deref()
        .map_or(0, |l| all.partition_point(|t| t.as_str() <= l));
    let page: Vec<&String> = all[start..].iter().take(n).collect();
    let more = start + page.len() < all.len() && !page.is_empty();
    let mut resp = json_response(
        StatusCode::OK,
        json!({ "name": name, "tags": page }).to_string(),
    );
    if more && let Some(last) = page.last() {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &n.to_string())
            .append_pair("last", last)
            .finish();
        set(
            resp.headers_mut(),
            header::LINK,
            &format!("</v2/{name}/tags/list?{q}>; rel=\"next\""),
        );
    }
    Ok(resp)
}

fn params(req: &Parts) -> Vec<(String, String)> {
    req.uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `POST .../blobs/uploads/`: a mount, a whole blob, or a new session.
async fn start_upload(
    api: &PrivateApi,
    req: &Parts,
    body: Body,
    who: &Caller,
    name: &str,
    repo: &Repo,
) -> Result<Response, ApiError> {
    let p = &api.private;
    let query = params(req);
    if let (Some(mount), Some(from)) = (param(&query, "mount"), param(&query, "from")) {
        let digest = Digest::parse(mount)?;
        // Only from a private repository the caller may pull; otherwise an
        // upload starts, as the spec asks.
        let from_repo = p.repo(host_of(req), from).and_then(Result::ok);
        if let Some(from_repo) = from_repo
            && may_pull(api, who, &from_repo)
            && p.mount(repo, &from_repo, &digest).await?
        {
            return Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest));
        }
    }
    if let Some(digest) = param(&query, "digest") {
        let digest = Digest::parse(digest)?;
        p.put_blob(repo, &digest, body_stream(body)).await?;
        return Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest));
    }
    let session = p.start(repo).await?;
    Ok(accepted(name, &session.id, session.offset))
}

fn may_pull(api: &PrivateApi, who: &Caller, repo: &Repo) -> bool {
    api.private
        .users
        .may(who.user(), repo.name.as_str(), Action::Pull)
}

/// `.../blobs/uploads/<id>`: status, a chunk, the end, or cancelling.
async fn upload(
    api: &PrivateApi,
    req: &Parts,
    body: Body,
    name: &str,
    repo: &Repo,
    id: &str,
) -> Result<Response, ApiError> {
    let p = &api.private;
    match req.method.clone() {
        Method::GET => {
            let s = p.status(repo, id).await?;
            let mut resp = accepted(name, &s.id, s.offset);
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        Method::DELETE => {
            p.cancel(repo, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::PATCH => {
            let start = content_range_start(&req.headers)?;
            let s = p.append(repo, id, start, body_stream(body)).await?;
            Ok(accepted(name, &s.id, s.offset))
        }
        Method::PUT => {
            let query = params(req);
            let Some(digest) = param(&query, "digest") else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::DigestInvalid,
                    "finishing an upload needs ?digest=",
                ));
            };
            let digest = Digest::parse(digest)?;
            p.finish(repo, id, body_stream(body), &digest).await?;
            Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest))
        }
        _ => Err(not_allowed(&V2Path::Upload { name, id: Some(id) })),
    }
}

/// Where a chunk says it starts (`Content-Range: <start>-<end>`).
fn content_range_start(h: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::BlobUploadInvalid,
            "Content-Range must be <start>-<end>",
        )
    };
    let v = v.to_str().map_err(|_| bad())?.trim();
    let v = v
        .strip_prefix("bytes")
        .map_or(v, |r| r.trim_start_matches([' ', '=']));
    let (start, end) = v.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end = end.split('/').next().unwrap_or("");
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok(Some(start))
}

fn body_stream(
    body: Body,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin {
    body.into_data_stream().map_err(std::io::Error::other)
}

fn accepted(name: &str, id: &str, offset: u64) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    let h = resp.headers_mut();
    set(
        h,
        header::LOCATION,
        &format!("/v2/{name}/blobs/uploads/{id}"),
    );
    set(h, "docker-upload-uuid", id);
    set(h, header::RANGE, &format!("0-{}", offset.saturating_sub(1)));
    set(h, header::CONTENT_LENGTH, "0");
    resp
}

fn created(location: &str, digest: &Digest) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::CREATED;
    let h = resp.headers_mut();
    set(h, header::LOCATION, location);
    set(h, "docker-content-digest", &digest.to_string());
    set(h, header::CONTENT_LENGTH, "0");
    resp
}

/// `GET /auth/token`: a signed token for the scopes asked, holding what
/// the caller may do of them.
pub(super) async fn token(State(api): State<Arc<PrivateApi>>, req: Request) -> Response {
    let (req, _) = req.into_parts();
    marked(token_for(&api, &req).await)
}

async fn token_for(api: &PrivateApi, req: &Parts) -> Response {
    let p = &api.private;
    // repository:<name>:<actions>, space-separated, in one or more scopes.
    let mut asked: Vec<(Option<Repo>, &str)> = Vec::new();
    let query = params(req);
    for (_, scope) in query.iter().filter(|(k, _)| k == "scope") {
        for one in scope.split(' ') {
            let Some(("repository", rest)) = one.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let repo = match p.repo(host_of(req), name) {
                Some(Ok(repo)) => Some(repo),
                Some(Err(_)) => continue,
                None => None,
            };
            asked.push((repo, actions));
        }
    }
    // A token for mirrored names only (a Docker daemon pulling through
    // Pier) needs no credentials: stale ones stored for this host must not
    // break a pull, nor count as failed logins.
    let mirrored_only = !asked.is_empty() && asked.iter().all(|(repo, _)| repo.is_none());
    let who = if mirrored_only {
        Caller::Anonymous
    } else {
        match caller(api, req).await {
            Ok(Caller::Token(_)) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unauthorized,
                    "ask for a token with Basic credentials, or none",
                )
                .into_response();
            }
            Ok(w) => w,
            Err(e) => return e.into_response(),
        }
    };
    let mut access: Vec<Access> = Vec::new();
    for (repo, actions) in asked {
        let Some(repo) = repo else { continue };
        let granted: Vec<String> = actions
            .split(',')
            .filter_map(Action::parse)
            .filter(|a| p.users.may(who.user(), repo.name.as_str(), *a))
            .map(|a| a.as_str().to_owned())
            .collect();
        if !granted.is_empty() {
            access.push(Access {
                kind: "repository".into(),
                name: repo.key,
                actions: granted,
            });
        }
    }
    let token = match p.tokens.issue(who.user(), access).await {
        Ok(t) => t,
        Err(e) => return unavailable(e).into_response(),
    };
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": p.tokens.ttl().as_secs(),
        "issued_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    set(resp.headers_mut(), header::CACHE_CONTROL, "no-store");
    resp
}

/// Whether the caller of a catalog request may see each private key.
pub(super) async fn catalog_filter(
    api: &PrivateApi,
    req: &Parts,
) -> Result<impl Fn(&str) -> bool + Send + Sync + use<>, ApiError> {
    let who = caller(api, req).await?;
    let private = api.private.clone();
    let user = who.user().map(str::to_owned);
    Ok(move |key: &str| {
        if !private.owns_key(key) {
            return true;
        }
        private.repo_of_key(key).is_some_and(|repo| {
            private
                .users
                .may(user.as_deref(), repo.name.as_str(), Action::Pull)
        })
    })
}

/// A private blob's headers: the mirror's, but no shared cache may keep it.
fn private_blob_headers(h: &mut HeaderMap, digest: &Digest) {
    blob_headers(h, digest);
    set(h, header::CACHE_CONTROL, "private, max-age=31536000");
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
