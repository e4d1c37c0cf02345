//! The console's pages (`[ui] enabled`): one page shell for every console
//! URL, and the script and style that draw each page from the read API.
//! Everything is compiled in; nothing is loaded from anywhere else, and the
//! content security policy says so to the browser.

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, header};

const SHELL: &str = include_str!("../../assets/console/index.html");
const SCRIPT: &str = include_str!("../../assets/console/app.js");
const STYLE: &str = include_str!("../../assets/console/app.css");
const ICON: &str = include_str!("../../assets/console/icon.svg");

/// Scripts, styles, images and API calls from this origin only; no
/// framing, no plugins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn router() -> Router {
    static PAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let page = || async {
        let shell = PAGE.get_or_init(|| SHELL.replace("VERSION", env!("CARGO_PKG_VERSION")));
        asset(shell, "text/html; charset=utf-8", "no-cache")
    };
    Router::new()
        .route("/", get(page))
        .route("/repositories", get(page))
        .route("/repositories/{*name}", get(page))
        .route("/images/{*name}", get(page))
        .route("/activity", get(page))
        .route("/explain", get(page))
        .route(
            "/ui/app.js",
            get(|| async { versioned(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { versioned(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/icon.svg",
            get(|| async { versioned(ICON, "image/svg+xml") }),
        )
        .route(
            "/favicon.ico",
            get(|| async { versioned(ICON, "image/svg+xml") }),
        )
}

/// Asset URLs carry the version, so a browser may keep them a day.
fn versioned(body: &'static str, kind: &'static str) -> Response {
    asset(body, kind, "public, max-age=86400")
}

fn asset(body: &'static str, kind: &'static str, cache: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
