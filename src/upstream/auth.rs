//! Getting credentials for a request: Bearer tokens from the realm an
//! upstream announces, and Basic credentials from the config.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderValue;
use url::Url;

use super::egress::refusal_in;
use super::tokens::TokenResponse;
use super::{UpstreamClient, describe};
use crate::config::Secret;

/// What asking a token server came to.
pub(super) enum TokenOutcome {
    /// A token for the scope is cached now.
    Cached,
    /// The token server said no (4xx) or answered nonsense.
    Refused,
    /// The token server could not be reached, timed out or failed (5xx):
    /// an outage, not an answer.
    Unreachable(String),
    /// The realm is at an address the egress guard refuses; nothing was
    /// sent to it.
    Barred(String),
}

pub(super) fn basic(user: &str, pass: &Secret) -> Option<HeaderValue> {
    let raw = format!("{user}:{}", pass.expose());
    let mut v = HeaderValue::from_str(&format!("Basic {}", BASE64.encode(raw))).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl UpstreamClient {
    /// Gets a token for `wanted` from the realm the upstream at `endpoint`
    /// announced, and caches it under `scope`.
    pub(super) async fn fetch_token(
        &self,
        endpoint: &Url,
        realm: &str,
        service: Option<&str>,
        wanted: &str,
        scope: &str,
    ) -> TokenOutcome {
        let Ok(mut url) = Url::parse(realm) else {
            tracing::warn!(registry = %self.registry, realm, "token realm is not a URL");
            return TokenOutcome::Refused;
        };
        if !matches!(url.scheme(), "http" | "https") {
            return TokenOutcome::Refused;
        }
        // Before credentials are attached: an IP literal is not resolved, so
        // the guard's resolver would never see it.
        if let Err(r) = self.egress.check_url(&url) {
            tracing::warn!(registry = %self.registry, host = %r.host, "token realm at a refused address");
            return TokenOutcome::Barred(r.to_string());
        }
        url.query_pairs_mut()
            .extend_pairs(service.map(|s| ("service", s)))
            .append_pair("scope", wanted);
        let mut req = self.http.get(url.clone());
        if let Some((user, pass)) = &self.credentials {
            // Never downgrade credentials from an https upstream to an http
            // realm, where they would cross the network in clear text.
            if url.scheme() == "https" || endpoint.scheme() == "http" {
                if let Some(v) = basic(user, pass) {
                    req = req.header(http::header::AUTHORIZATION, v);
                }
            } else {
                tracing::warn!(registry = %self.registry, "not sending credentials to a plain-http token realm");
            }
        }
        let resp = match tokio::time::timeout(self.timeouts.response, req.send()).await {
            Ok(Ok(r)) if r.status().is_success() => r,
            Ok(Ok(r)) if r.status().is_server_error() => {
                return TokenOutcome::Unreachable(format!("HTTP {}", r.status()));
            }
            Ok(Ok(r)) => {
                tracing::warn!(registry = %self.registry, status = %r.status(), "token server refused");
                return TokenOutcome::Refused;
            }
            Ok(Err(e)) => {
                if let Some(r) = refusal_in(&e) {
                    tracing::warn!(registry = %self.registry, host = %r.host, "token realm resolves to a refused address");
                    return TokenOutcome::Barred(r.to_string());
                }
                return TokenOutcome::Unreachable(describe(&e.without_url()));
            }
            Err(_) => return TokenOutcome::Unreachable("timed out".into()),
        };
        let body = match self.read_limited(resp, 1024 * 1024).await {
            Ok(b) => b,
            Err(e) => return TokenOutcome::Unreachable(e.to_string()),
        };
        match serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_parts)
        {
            Some((token, life)) => {
                self.tokens.put(scope, token, life);
                TokenOutcome::Cached
            }
            None => TokenOutcome::Refused,
        }
    }
}
