//! The console's read-only JSON API (`[ui] enabled`, on by default):
//! explain, repositories, images, stats and activity under `/api/v1/`. It
//! reads only what the cache and the metadata store hold and never contacts
//! an upstream.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};

use super::error::{ApiError, ErrorCode};
use crate::config::Config;
use crate::console::{Reached, explain};
use crate::mirror::Mirror;

/// What to do about an image or repository the cache does not hold.
const PULL_FIRST: &str = "pull it through this mirror first";

pub struct Console {
    mirror: Arc<Mirror>,
    domains: Vec<String>,
    /// (alias, registry)
    aliases: Vec<(String, String)>,
    registries: Vec<String>,
    budget: Option<u64>,
    names: crate::console::RepoNames,
}

impl Console {
    /// `None` with `[ui] enabled = false`.
    pub fn new(config: &Config, mirror: Arc<Mirror>) -> Option<Self> {
        config.ui.enabled.then(|| Self {
            mirror,
            domains: config.domains.clone(),
            aliases: config
                .upstreams
                .iter()
                .filter_map(|u| Some((u.aliases.first()?.clone(), u.registry.clone())))
                .collect(),
            registries: config
                .upstreams
                .iter()
                .map(|u| u.registry.clone())
                .collect(),
            budget: config.cache.max_size,
            names: crate::console::RepoNames::default(),
        })
    }
}

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/api/v1/explain", get(explained))
        .route("/api/v1/repositories", get(repositories))
        .route("/api/v1/repositories/{*name}", get(repository))
        .route("/api/v1/images/{*name}", get(image))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/activity", get(activity))
        .with_state(console)
}

#[derive(serde::Deserialize)]
struct SearchQuery {
    q: Option<String>,
    n: Option<usize>,
    last: Option<String>,
}

/// `?q=nginx&n=50&last=…`: cached repositories whose name contains `q`.
async fn repositories(
    State(console): State<Arc<Console>>,
    Query(q): Query<SearchQuery>,
) -> Response {
    let n = q.n.unwrap_or(50).clamp(1, 1000);
    let needle = q.q.unwrap_or_default();
    if needle.len() > 256 {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "q is longer than any repository name (256 bytes at most)",
        )
        .into_response();
    }
    match crate::console::search(
        &console.mirror,
        &console.names,
        &needle,
        q.last.as_deref(),
        n,
    )
    .await
    {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => unreadable(e),
    }
}

/// `/api/v1/repositories/<registry>/<repository>`: its cached tags.
async fn repository(
    State(console): State<Arc<Console>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match crate::console::repository(&console.mirror, &name).await {
        Ok(Some(tags)) => {
            axum::Json(serde_json::json!({ "name": name, "tags": tags })).into_response()
        }
        Ok(None) => ApiError::not_cached(ErrorCode::NameUnknown, &name, PULL_FIRST).into_response(),
        Err(e) => unreadable(e),
    }
}

/// `/api/v1/images/<registry>/<repository>:<tag>` (or `@<digest>`).
async fn image(
    State(console): State<Arc<Console>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let unknown =
        || ApiError::not_cached(ErrorCode::ManifestUnknown, &name, PULL_FIRST).into_response();
    let (target, reference) = match super::path::image_name(&name) {
        Ok(Some(found)) => found,
        Ok(None) => return unknown(),
        Err(e) => return e.into_response(),
    };
    match crate::console::image(&console.mirror, &target, &reference).await {
        Ok(Some(view)) => axum::Json(view).into_response(),
        Ok(None) => unknown(),
        Err(e) => unreadable(e),
    }
}

/// The dashboard's figures for the whole cluster.
async fn stats(State(console): State<Arc<Console>>) -> Response {
    match crate::console::stats(&console.mirror, &console.registries, console.budget).await {
        Ok(stats) => axum::Json(stats).into_response(),
        Err(e) => unreadable(e),
    }
}

/// Fetches and sync jobs running now, and recent failures.
async fn activity(State(console): State<Arc<Console>>) -> Response {
    let meta = console.mirror.meta();
    match crate::console::activity(meta.as_ref(), 50).await {
        Ok(activity) => axum::Json(activity).into_response(),
        Err(e) => unreadable(e),
    }
}

fn unreadable(e: crate::meta::MetaError) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!("the metadata store cannot be read: {e}"),
    )
    .into_response()
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    #[serde(rename = "ref")]
    reference: Option<String>,
}

async fn explained(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let Some(input) = q.reference.filter(|r| !r.trim().is_empty()) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "give an image as a pull names it: /api/v1/explain?ref=nginx:1.27",
        )
        .into_response();
    };
    if input.len() > 1024 {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "ref is longer than any image reference (1024 bytes at most)",
        )
        .into_response();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        })
        .unwrap_or("localhost:5000");
    let reached = Reached {
        hosts: if console.domains.is_empty() {
            vec![host]
        } else {
            console.domains.iter().map(String::as_str).collect()
        },
        prefixes: !console.domains.is_empty(),
        aliases: &console.aliases,
    };
    axum::Json(explain(&console.mirror, &input, &reached).await).into_response()
}
