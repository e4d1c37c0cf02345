//! The admin API under `/api/v1/`: there only once `[admin] token` is set,
//! and then only for requests that carry it (`Authorization: Bearer`) from
//! `[admin] allow_from`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use http::{HeaderValue, StatusCode, header};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::ClientIp;
use super::error::{ApiError, ErrorCode};
use crate::config::{Config, SyncListConfig};
use crate::mirror::Mirror;
use crate::route::RouteError;
use crate::sync::{ImageError, Jobs, SubmitError, SyncRequest, is_id};

/// Jobs `GET /api/v1/sync` lists unless asked for another number.
const LISTED: usize = 50;

/// Who may use the admin API, and what it drives.
pub struct Admin {
    pub jobs: Arc<Jobs>,
    mirror: Arc<Mirror>,
    /// `[[sync.images]]`, for their state.
    lists: Vec<SyncListConfig>,
    /// SHA-256 of the token: compared in constant time, whatever the
    /// length of what a request sends.
    token_hash: [u8; 32],
    allow_from: Vec<ipnet::IpNet>,
}

impl Admin {
    /// `None` unless a token is configured.
    pub fn new(config: &Config, jobs: Arc<Jobs>, mirror: Arc<Mirror>) -> Option<Self> {
        let token = config.admin.token.as_ref()?;
        Some(Self {
            jobs,
            mirror,
            lists: config.sync.images.clone(),
            token_hash: Sha256::digest(token.expose().as_bytes()).into(),
            allow_from: config.admin.allow_from.clone(),
        })
    }

    fn admits(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        hash.ct_eq(&self.token_hash).into()
    }
}

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/api/v1/sync", get(list_jobs).post(submit))
        .route("/api/v1/sync/lists", get(lists))
        .route("/api/v1/sync/{id}", get(job))
        .route("/api/v1/images/{*name}", delete(purge))
        .route("/api/v1/{*rest}", axum::routing::any(no_such_endpoint))
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize))
        .with_state(admin)
}

async fn authorize(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if !admin.allow_from.is_empty() {
        let ip = req.extensions().get::<ClientIp>().map(|c| c.0);
        if !ip.is_some_and(|ip| admin.allow_from.iter().any(|net| net.contains(&ip))) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Denied,
                "the admin API does not answer this client's address ([admin] allow_from)",
            )
            .into_response();
        }
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(token) if admin.admits(token) => next.run(req).await,
        given => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            if given.is_some() {
                "the admin token is not valid"
            } else {
                "the admin API needs `Authorization: Bearer <[admin] token>`"
            },
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"pier-admin\"".into(),
        )
        .into_response(),
    }
}

/// `DELETE /api/v1/images/<registry>/<repository>:<tag>` (or `@<digest>`):
/// the next pull asks upstream again.
async fn purge(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    let unknown = || {
        ApiError::not_cached(ErrorCode::ManifestUnknown, &name, "nothing to purge").into_response()
    };
    let (target, reference) = match super::path::image_name(&name) {
        Ok(Some(found)) => found,
        Ok(None) => return unknown(),
        Err(e) => return e.into_response(),
    };
    if let Err(denied) = admin.mirror.policy.check(&target) {
        return ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, denied.0).into_response();
    }
    match admin.mirror.purge(&target, &reference).await {
        Ok(Some(purged)) => axum::Json(purged).into_response(),
        Ok(None) => unknown(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn submit(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let request: SyncRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!(
                    "the body must be JSON like {{\"images\": [\"nginx:1.27\"], \"platforms\": [\"linux/amd64\"]}}: {e}"
                ),
            )
            .into_response();
        }
    };
    match admin.jobs.submit(request).await {
        Ok(job) => {
            let mut resp = (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "id": job.id })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/sync/{}", job.id)) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Err(e) => refused(e).into_response(),
    }
}

/// A refused job, answered as a pull of the same image would be.
fn refused(e: SubmitError) -> ApiError {
    let message = e.to_string();
    let (status, code) = match e {
        SubmitError::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        SubmitError::Image { error, .. } => match error {
            ImageError::Route(RouteError::Name(_)) => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
            ImageError::Route(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            ImageError::Reference(r) => {
                let e = ApiError::from(r);
                (e.status, e.code)
            }
            ImageError::Denied(_) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
        },
        SubmitError::Meta(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
    };
    ApiError::new(status, code, message)
}

#[derive(serde::Deserialize)]
struct ListQuery {
    n: Option<usize>,
}

async fn list_jobs(State(admin): State<Arc<Admin>>, Query(q): Query<ListQuery>) -> Response {
    let n = q.n.unwrap_or(LISTED).clamp(1, crate::meta::JOBS_KEPT);
    match admin.jobs.recent(n).await {
        Ok(jobs) => axum::Json(serde_json::json!({ "jobs": jobs })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Jobs looked through for the lists' last runs.
const LIST_RUNS_LOOKED_AT: usize = 200;

/// Each `[[sync.images]]` entry with its last run and its last run that
/// synced everything.
async fn lists(State(admin): State<Arc<Admin>>) -> Response {
    let recent = match admin.jobs.recent(LIST_RUNS_LOOKED_AT).await {
        Ok(jobs) => jobs,
        Err(e) => return unavailable(e),
    };
    let summary = |job: &crate::sync::Job| {
        let count = |state| job.images.iter().filter(|i| i.state == state).count();
        serde_json::json!({
            "id": job.id,
            "state": job.state,
            "created_ms": job.created_ms,
            "updated_ms": job.updated_ms,
            "images": job.images.len(),
            "done": count(crate::sync::State::Done),
            "failed": count(crate::sync::State::Failed),
        })
    };
    let lists: Vec<serde_json::Value> = admin
        .lists
        .iter()
        .map(|entry| {
            let runs: Vec<&crate::sync::Job> = recent
                .iter()
                .filter(|j| j.list.as_deref() == Some(entry.image.as_str()))
                .collect();
            let succeeded = runs.iter().find(|j| j.state == crate::sync::State::Done);
            serde_json::json!({
                "image": entry.image,
                "tags": entry.tags,
                "tag_pattern": entry.tag_pattern,
                "platforms": entry.platforms,
                "interval": crate::config::age_text(entry.interval),
                "last_run": runs.first().map(|j| summary(j)),
                "last_success": succeeded.map(|j| summary(j)),
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "lists": lists })).into_response()
}

async fn job(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let found = if is_id(&id) {
        admin.jobs.get(&id).await
    } else {
        Ok(None)
    };
    match found {
        Ok(Some(job)) => axum::Json(job).into_response(),
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!(
                "no sync job {:?} (jobs are kept until {} newer ones were made)",
                id.chars().take(64).collect::<String>(),
                crate::meta::JOBS_KEPT
            ),
        )
        .into_response(),
        Err(e) => unavailable(e),
    }
}

fn unavailable(e: crate::meta::MetaError) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!("the metadata store cannot be read: {e}"),
    )
    .into_response()
}

async fn no_such_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such admin endpoint: /api/v1/sync, /api/v1/sync/<id> and /api/v1/sync/lists are served",
    )
}
