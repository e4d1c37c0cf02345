//! The console's read-only JSON API (`[ui] enabled`, on by default):
//! `/api/v1/explain?ref=…`. It reads only what the cache holds and never
//! contacts an upstream.

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

pub struct Console {
    mirror: Arc<Mirror>,
    domains: Vec<String>,
    /// (alias, registry)
    aliases: Vec<(String, String)>,
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
        })
    }
}

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/api/v1/explain", get(explained))
        .with_state(console)
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
