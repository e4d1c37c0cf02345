//! Sending one logical request: retries with backoff, endpoint failover,
//! answering an auth challenge, and following redirects. Every hop passes
//! the egress guard.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tracing::Instrument;
use url::Url;

use super::auth::TokenOutcome;
use super::challenge::{self, Challenge};
use super::egress::{Refused, refusal_in};
use super::{UpstreamClient, UpstreamError, describe};
use crate::telemetry::metrics::metrics;

/// Attempts per request across retries and endpoints.
const ATTEMPTS: usize = 3;
const MAX_REDIRECTS: usize = 5;

/// Why one attempt failed.
#[derive(Debug)]
pub(super) enum Failure {
    Http(reqwest::Error),
    Timeout(Duration),
    /// The token server announced by the upstream could not be used.
    Token(String),
    /// The upstream pointed somewhere Pier will not go (a redirect or token
    /// realm at a refused address).
    Refused(String),
}

impl Failure {
    /// Worth repeating against the same endpoint?
    fn is_quick(&self) -> bool {
        match self {
            Failure::Http(e) => !e.is_timeout(),
            Failure::Timeout(_) => false,
            Failure::Token(_) => true,
            Failure::Refused(_) => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Http(e) => f.write_str(&describe(e)),
            Failure::Timeout(d) => {
                write!(f, "no response within {}", humantime::format_duration(*d))
            }
            Failure::Token(why) => write!(f, "token server: {why}"),
            Failure::Refused(why) => f.write_str(why),
        }
    }
}

impl UpstreamClient {
    /// Sends a request with retries, failover, auth and redirects. Connect
    /// errors and 5xx are retried with backoff, rotating through the
    /// endpoints; a timeout is not repeated against a lone endpoint.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        repo: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_with(method, path, headers, repo, true).await
    }

    /// Like `send`; with `follow` false a redirect is returned as it came.
    pub(super) async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        repo: &str,
        follow: bool,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let n = self.endpoints.len().max(1);
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last_error = String::from("no endpoints configured");
        let mut refused = false;
        for attempt in 0..ATTEMPTS.max(n) {
            let index = (first + attempt) % n;
            let Some(endpoint) = self.endpoints.get(index) else {
                break;
            };
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let url = endpoint
                .join(path.trim_start_matches('/'))
                .map_err(|e| self.invalid(e))?;
            match self.send_once(&method, url, &headers, &scope, follow).await {
                Ok(resp) if resp.status().is_server_error() => {
                    last_error = format!("{} answered HTTP {}", host_of(endpoint), resp.status());
                    refused = false;
                }
                Ok(resp) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) => {
                    last_error = format!("{}: {e}", host_of(endpoint));
                    refused = matches!(e, Failure::Refused(_));
                    tracing::debug!(registry = %self.registry, error = %last_error, "upstream attempt failed");
                    if !e.is_quick() && n == 1 {
                        break;
                    }
                }
            }
        }
        // Pointing Pier at a refused address is the upstream misbehaving,
        // not an outage: no stale copy is implied to be the cure.
        if refused {
            return Err(self.invalid(last_error));
        }
        Err(UpstreamError::Unavailable {
            registry: self.registry.clone(),
            detail: last_error,
        })
    }

    /// One request to one endpoint: answer an auth challenge once, then
    /// follow redirects.
    async fn send_once(
        &self,
        method: &Method,
        url: Url,
        headers: &HeaderMap,
        scope: &str,
        follow: bool,
    ) -> Result<reqwest::Response, Failure> {
        let mut auth = self.authorization(scope);
        let mut resp = self
            .execute(method, url.clone(), headers, auth.clone())
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(challenge::parse);
            let answered = match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    let wanted = asked.unwrap_or_else(|| scope.to_owned());
                    match self
                        .fetch_token(&url, &realm, service.as_deref(), &wanted, scope)
                        .await
                    {
                        TokenOutcome::Cached => true,
                        // The upstream's own 401 stands: the client is told
                        // the repository is unknown or needs credentials.
                        TokenOutcome::Refused => false,
                        TokenOutcome::Unreachable(why) => return Err(Failure::Token(why)),
                        TokenOutcome::Barred(why) => {
                            return Err(Failure::Refused(format!("token realm refused: {why}")));
                        }
                    }
                }
                Some(Challenge::Basic) if self.credentials.is_some() => {
                    self.basic.store(true, Ordering::Relaxed);
                    true
                }
                _ => false,
            };
            if answered {
                auth = self.authorization(scope);
                resp = self.execute(method, url, headers, auth.clone()).await?;
            }
        }
        if !follow {
            return Ok(resp);
        }
        self.follow_redirects(method, resp, headers, auth).await
    }

    /// The `Authorization` value for `scope`: a cached token, or Basic
    /// credentials once the upstream asked for them.
    fn authorization(&self, scope: &str) -> Option<HeaderValue> {
        if let Some(token) = self.tokens.get(scope) {
            return HeaderValue::from_str(&format!("Bearer {token}")).ok();
        }
        if !self.basic.load(Ordering::Relaxed) {
            return None;
        }
        let (user, pass) = self.credentials.as_ref()?;
        super::auth::basic(user, pass)
    }

    /// Sends one request, waiting at most the response timeout for headers.
    /// The body has no overall deadline here (a blob may take minutes); the
    /// client's read timeout bounds pauses inside it.
    pub(super) async fn execute(
        &self,
        method: &Method,
        url: Url,
        headers: &HeaderMap,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, Failure> {
        let host = host_of(&url);
        // The HTTP client dials IP literals without asking the resolver, so
        // they are judged here; names are judged by the resolver.
        if let Err(r) = self.egress.check_url(&url) {
            return Err(self.barred(&r));
        }
        let mut req = self
            .http
            .request(method.clone(), url)
            .headers(headers.clone());
        if let Some(mut a) = auth {
            a.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, a);
        }
        // Host only: a redirect target's path and query may carry a
        // signature.
        let span = tracing::info_span!(
            "upstream",
            otel.name = %format_args!("{method} upstream"),
            otel.kind = "client",
            registry = %self.registry,
            %method,
            %host,
            status = tracing::field::Empty,
        );
        let started = Instant::now();
        let sent =
            tokio::time::timeout(self.timeouts.response, req.send()).instrument(span.clone());
        let result = match sent.await {
            // Signed redirect URLs must not end up in logs or error bodies.
            Ok(r) => r.map_err(|e| match refusal_in(&e) {
                Some(refused) => self.barred(refused),
                None => Failure::Http(e.without_url()),
            }),
            Err(_) => Err(Failure::Timeout(self.timeouts.response)),
        };
        let m = metrics();
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        if let Some(s) = status {
            span.record("status", i64::from(s));
        }
        m.upstream(&self.registry, status, started.elapsed());
        if let Ok(r) = &result
            && let Some(v) = r.headers().get("ratelimit-remaining")
            && let Ok(v) = v.to_str()
        {
            m.ratelimit(&self.registry, v);
            self.note_quota(v);
        }
        result
    }

    /// A hop the egress guard stopped; logged by host only (a URL's path and
    /// query may carry a signature).
    fn barred(&self, r: &Refused) -> Failure {
        tracing::warn!(registry = %self.registry, host = %r.host, "upstream pointed at a refused address");
        Failure::Refused(r.to_string())
    }

    /// Follows 301/302/303/307/308 to wherever the upstream points (blob
    /// storage, a CDN). `Authorization` goes along only to the same origin.
    async fn follow_redirects(
        &self,
        method: &Method,
        mut resp: reqwest::Response,
        headers: &HeaderMap,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, Failure> {
        let origin = resp.url().origin();
        for _ in 0..MAX_REDIRECTS {
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|loc| resp.url().join(loc).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"))
            else {
                return Ok(resp);
            };
            let keep_auth = next.origin() == origin;
            resp = self
                .execute(method, next, headers, auth.clone().filter(|_| keep_auth))
                .await
                .map_err(|e| match e {
                    Failure::Refused(why) => Failure::Refused(format!("redirect refused: {why}")),
                    other => other,
                })?;
        }
        Ok(resp)
    }
}

pub(super) fn host_of(url: &Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("?")),
        None => url.host_str().unwrap_or("?").to_owned(),
    }
}
