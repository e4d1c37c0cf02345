//! Bearer tokens per scope, kept until shortly before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Token servers that omit `expires_in` mean 60 seconds.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// Stop using a token this long before it expires.
const MARGIN: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token (servers send `token`, `access_token` or both) and how long
    /// to keep it.
    pub fn into_parts(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let life = self
            .expires_in
            .map_or(DEFAULT_LIFETIME, Duration::from_secs)
            .saturating_sub(MARGIN)
            .max(Duration::from_secs(1));
        Some((token, life))
    }
}

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let map = self.tokens.lock().ok()?;
        map.get(scope)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    pub fn put(&self, scope: &str, token: String, life: Duration) {
        if let Ok(mut map) = self.tokens.lock() {
            let now = Instant::now();
            // Drop expired entries so the map stays as small as the set of
            // repositories in use.
            map.retain(|_, (_, until)| *until > now);
            map.insert(scope.to_owned(), (token, now + life));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_fields() {
        let r: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(r.into_parts(), Some(("a".into(), Duration::from_secs(290))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":"t"}"#).unwrap();
        assert_eq!(r.into_parts(), Some(("t".into(), Duration::from_secs(50))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.into_parts(), None);
    }

    #[test]
    fn cache_expires() {
        let c = TokenCache::default();
        c.put("s", "t".into(), Duration::from_secs(100));
        assert_eq!(c.get("s"), Some("t".into()));
        c.put("old", "x".into(), Duration::ZERO);
        assert_eq!(c.get("old"), None);
        assert_eq!(c.get("other"), None);
    }
}
