//! Talking to upstream registries: token and basic auth with a token cache,
//! retries with backoff, endpoint failover, and redirects followed without
//! carrying credentials to another host. Only configured endpoints, the token
//! realms they announce and the redirects they send are ever contacted, and
//! never at a link-local or cloud metadata address (`egress`).

mod auth;
pub mod challenge;
mod egress;
mod tokens;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use thiserror::Error;
use url::Url;

use crate::config::{Config, Secret, TimeoutConfig, UpstreamConfig};
use crate::reference::Digest;
use egress::{Egress, GuardedResolver};
use tokens::TokenCache;

/// The manifest media types Pier asks for: every one it can serve.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (as distribution does).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Pages of `tags/list` followed before giving up on a huge repository.
const MAX_TAG_PAGES: usize = 100;

#[derive(Clone, Debug, Error)]
pub enum UpstreamError {
    #[error("upstream {registry} is unavailable: {detail}")]
    Unavailable { registry: String, detail: String },
    #[error("upstream {registry} does not have it (HTTP {status})")]
    NotFound { registry: String, status: u16 },
    #[error("upstream {registry} is rate limiting this mirror")]
    TooManyRequests {
        registry: String,
        retry_after: Option<String>,
    },
    #[error("upstream {registry} answered unexpectedly: {detail}")]
    Invalid { registry: String, detail: String },
}

impl UpstreamError {
    /// Whether the upstream could not be reached at all, so a cached copy
    /// may be served stale.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable { .. } | UpstreamError::TooManyRequests { .. }
        )
    }
}

/// A manifest response's headers and, for GET, its body.
pub struct UpstreamManifest {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub body: Option<Bytes>,
}

/// All configured upstreams, by registry name.
pub struct Upstreams {
    clients: HashMap<String, Arc<UpstreamClient>>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        // One guard for all upstreams: a host one upstream is configured
        // with is one the operator chose, whichever upstream points at it.
        let egress = Arc::new(Egress::new(
            &config.egress.refuse,
            config.upstreams.iter().flat_map(|u| &u.endpoints),
        ));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(GuardedResolver(egress.clone()))
            .connect_timeout(config.timeouts.connect)
            .read_timeout(config.timeouts.body_idle)
            .tcp_nodelay(true)
            .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .build()?;
        let clients = config
            .upstreams
            .iter()
            .map(|u| {
                let client =
                    UpstreamClient::new(u, http.clone(), egress.clone(), config.timeouts.clone());
                (u.registry.clone(), Arc::new(client))
            })
            .collect();
        Ok(Self { clients })
    }

    pub fn get(&self, registry: &str) -> Option<&Arc<UpstreamClient>> {
        self.clients.get(registry)
    }
}

pub struct UpstreamClient {
    registry: String,
    endpoints: Vec<Url>,
    credentials: Option<(String, Secret)>,
    http: reqwest::Client,
    /// Checks IP-literal hosts; the client's resolver checks names.
    egress: Arc<Egress>,
    timeouts: TimeoutConfig,
    tokens: TokenCache,
    /// Set once the upstream asked for Basic auth: send it up front.
    basic: AtomicBool,
    /// The endpoint that answered last; tried first.
    preferred: AtomicUsize,
    /// What the upstream last said of its rate limit: requests left, and
    /// until when that holds (the end of its window).
    quota: std::sync::Mutex<Option<(i64, std::time::Instant)>>,
}

/// How long a `ratelimit-remaining` without a window (`;w=`) holds.
const QUOTA_WINDOW: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

impl UpstreamClient {
    fn new(
        cfg: &UpstreamConfig,
        http: reqwest::Client,
        egress: Arc<Egress>,
        timeouts: TimeoutConfig,
    ) -> Self {
        Self {
            registry: cfg.registry.clone(),
            endpoints: cfg.endpoints.clone(),
            credentials: cfg.username.clone().zip(cfg.password.clone()),
            http,
            egress,
            timeouts,
            tokens: TokenCache::default(),
            basic: AtomicBool::new(false),
            preferred: AtomicUsize::new(0),
            quota: std::sync::Mutex::new(None),
        }
    }

    /// Notes Docker Hub's `ratelimit-remaining: 76;w=21600`.
    pub(crate) fn note_quota(&self, header: &str) {
        let mut parts = header.split(';');
        let Some(left) = parts.next().and_then(|v| v.trim().parse::<i64>().ok()) else {
            return;
        };
        // An upstream's window is believed up to a day.
        let window = parts
            .find_map(|p| p.trim().strip_prefix("w="))
            .and_then(|w| w.trim().parse::<u64>().ok())
            .map_or(QUOTA_WINDOW, |w| {
                std::time::Duration::from_secs(w.min(24 * 3600))
            });
        let Some(until) = std::time::Instant::now().checked_add(window) else {
            return;
        };
        *self
            .quota
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((left, until));
    }

    /// Requests the upstream last said are left, while that still holds.
    pub fn quota_left(&self) -> Option<(i64, std::time::Instant)> {
        let quota = *self
            .quota
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        quota.filter(|(_, until)| *until > std::time::Instant::now())
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Fetches (GET) or checks (HEAD) a manifest by tag or digest.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        method: Method,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.send(method.clone(), &path, headers, repo).await?;
        let resp = self.expect_success(resp).await?;
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v.trim()).ok());
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|v| !v.is_empty());
        let body = if method == Method::HEAD {
            None
        } else {
            Some(self.read_limited(resp, MAX_MANIFEST_BYTES).await?)
        };
        Ok(UpstreamManifest {
            digest,
            media_type,
            body,
        })
    }

    /// Starts a blob download; the caller reads the body as a stream.
    pub async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send(Method::GET, &path, HeaderMap::new(), repo)
            .await?;
        self.expect_success(resp).await
    }

    /// Where upstream serves a blob from when that is another host (blob
    /// storage, a CDN) the client can be sent to without credentials:
    /// `None` when upstream serves the bytes itself.
    pub async fn blob_location(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<url::Url>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send_with(Method::GET, &path, HeaderMap::new(), repo, false)
            .await?;
        if !resp.status().is_redirection() {
            // Dropping the response abandons its body.
            self.expect_success(resp).await?;
            return Ok(None);
        }
        let next = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|loc| resp.url().join(loc).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            // The client dials this, not Pier, so only a literal address
            // can be judged here; it may share Pier's network.
            .filter(|u| self.egress.check_url(u).is_ok())
            .filter(|u| !self.endpoints.iter().any(|e| e.origin() == u.origin()));
        Ok(next)
    }

    /// The size of an upstream blob, without downloading it.
    pub async fn blob_size(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send(Method::HEAD, &path, HeaderMap::new(), repo)
            .await?;
        let resp = self.expect_success(resp).await?;
        if let Some(n) = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            return Ok(Some(n));
        }
        // No length on HEAD: a one-byte range tells the total.
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        let resp = self.send(Method::GET, &path, headers, repo).await?;
        let resp = self.expect_success(resp).await?;
        Ok(resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next()?.trim().parse().ok()))
    }

    /// Every tag of `repo`, following upstream pagination.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let mut all = Vec::new();
        let mut path = format!("/v2/{repo}/tags/list");
        for _ in 0..MAX_TAG_PAGES {
            let resp = self
                .send(Method::GET, &path, HeaderMap::new(), repo)
                .await?;
            let resp = self.expect_success(resp).await?;
            let next = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = self.read_limited(resp, 16 * 1024 * 1024).await?;
            let list: TagList = serde_json::from_slice(&body).map_err(|e| self.invalid(e))?;
            all.extend(list.tags.unwrap_or_default());
            match next {
                // Only follow links on the same upstream, relative paths.
                Some(n) if n.starts_with(&format!("/v2/{repo}/tags/list?")) => path = n,
                _ => break,
            }
        }
        Ok(all)
    }

    /// The referrers index for `digest`, or `None` when the upstream does not
    /// support the referrers API.
    pub async fn referrers(
        &self,
        repo: &str,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<(Bytes, bool)>, UpstreamError> {
        let mut path = format!("/v2/{repo}/referrers/{digest}");
        if let Some(t) = artifact_type {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("artifactType", t)
                .finish();
            path = format!("{path}?{q}");
        }
        let resp = self
            .send(Method::GET, &path, HeaderMap::new(), repo)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND
            || resp.status() == StatusCode::METHOD_NOT_ALLOWED
            || resp.status() == StatusCode::BAD_REQUEST
        {
            return Ok(None);
        }
        let resp = self.expect_success(resp).await?;
        let is_index = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/vnd.oci.image.index.v1+json"));
        if !is_index {
            return Ok(None);
        }
        let filtered = resp.headers().contains_key("oci-filters-applied");
        let body = self.read_limited(resp, MAX_MANIFEST_BYTES).await?;
        Ok(Some((body, filtered)))
    }

    /// Maps a final response to an error unless it is 2xx.
    async fn expect_success(
        &self,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, UpstreamError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let registry = self.registry.clone();
        // Past a redirect, a refusal comes from storage or a CDN (an expired
        // signature, say), not from the registry: the blob exists, the
        // transfer failed.
        let foreign = !self
            .endpoints
            .iter()
            .any(|e| e.origin() == resp.url().origin());
        if foreign {
            return Err(UpstreamError::Unavailable {
                registry,
                detail: format!("the redirect target answered HTTP {status}"),
            });
        }
        Err(match status {
            StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                UpstreamError::NotFound {
                    registry,
                    status: status.as_u16(),
                }
            }
            StatusCode::TOO_MANY_REQUESTS => UpstreamError::TooManyRequests {
                registry,
                retry_after: resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            },
            s if s.is_server_error() => UpstreamError::Unavailable {
                registry,
                detail: format!("HTTP {s}"),
            },
            s => UpstreamError::Invalid {
                registry,
                detail: format!("HTTP {s}"),
            },
        })
    }

    async fn read_limited(
        &self,
        resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, UpstreamError> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(self.invalid(format!("body larger than {limit} bytes")));
        }
        // Small bodies get one deadline in all, so a trickle cannot hold a
        // request (and the tag lock behind it) forever.
        let read = async {
            let mut buf = BytesMut::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| UpstreamError::Unavailable {
                    registry: self.registry.clone(),
                    detail: describe(&e.without_url()),
                })?;
                if buf.len() + chunk.len() > limit {
                    return Err(self.invalid(format!("body larger than {limit} bytes")));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.freeze())
        };
        tokio::time::timeout(self.timeouts.response, read)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Unavailable {
                    registry: self.registry.clone(),
                    detail: format!(
                        "the response body took longer than {}",
                        humantime::format_duration(self.timeouts.response)
                    ),
                })
            })
    }

    fn invalid(&self, detail: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Invalid {
            registry: self.registry.clone(),
            detail: detail.to_string(),
        }
    }
}

/// The `rel="next"` target of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// A reqwest error with its cause chain, which is where the useful part
/// ("connection refused", "dns error") lives.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
