//! The tokens the token endpoint issues: signed (HS256), short-lived, naming
//! the user and what they may do to which private repositories. Every
//! replica signs and checks with one key, kept in the metadata store.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::meta::{MetaError, MetaStore, now_ms};

/// Who signs: the issuer and audience every token carries.
const ISSUER: &str = "pier";
pub const SERVICE: &str = "pier";
/// The record the signing key is kept in (a lease that never lapses in
/// practice: set once, by whichever replica came first).
const KEY_RECORD: &str = "private-token-key";
const KEY_KEPT: Duration = Duration::from_secs(100 * 365 * 86_400);

/// One repository's granted actions, as the Docker token format lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    /// The private repository's key (`<prefix>/<name>`).
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The user; empty for an anonymous token.
    sub: String,
    iat: u64,
    exp: u64,
    access: Vec<Access>,
}

/// What a valid token says.
#[derive(Debug, PartialEq, Eq)]
pub struct Granted {
    pub user: Option<String>,
    pub access: Vec<Access>,
}

pub struct Tokens {
    meta: Arc<dyn MetaStore>,
    ttl: Duration,
    keys: OnceCell<(EncodingKey, DecodingKey)>,
}

impl Tokens {
    pub fn new(meta: Arc<dyn MetaStore>, ttl: Duration) -> Self {
        Self {
            meta,
            ttl,
            keys: OnceCell::new(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn keys(&self) -> Result<&(EncodingKey, DecodingKey), MetaError> {
        self.keys
            .get_or_try_init(|| async {
                let mine = hex::encode(rand::random::<[u8; 32]>());
                let key = match self.meta.acquire_lease(KEY_RECORD, &mine, KEY_KEPT).await? {
                    None => mine,
                    Some(theirs) => theirs,
                };
                let bad = |e: jsonwebtoken::errors::Error| {
                    MetaError::Corrupt(format!("the token signing key: {e}"))
                };
                Ok((
                    EncodingKey::from_secret(key.as_bytes()).map_err(bad)?,
                    DecodingKey::from_secret(key.as_bytes()).map_err(bad)?,
                ))
            })
            .await
    }

    /// A token for `user` (`None`: anonymous) granting `access`.
    pub async fn issue(
        &self,
        user: Option<&str>,
        access: Vec<Access>,
    ) -> Result<String, MetaError> {
        let (encoding, _) = self.keys().await?;
        let iat = now_ms() / 1000;
        let claims = Claims {
            iss: ISSUER.into(),
            aud: SERVICE.into(),
            sub: user.unwrap_or_default().to_owned(),
            iat,
            exp: iat + self.ttl.as_secs(),
            access,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| MetaError::Backend(format!("signing a token: {e}")))
    }

    /// What `token` grants, or `None` when it is not one of Pier's, is
    /// expired or was altered.
    pub async fn check(&self, token: &str) -> Result<Option<Granted>, MetaError> {
        let (_, decoding) = self.keys().await?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[SERVICE]);
        validation.leeway = 5;
        Ok(jsonwebtoken::decode::<Claims>(token, decoding, &validation)
            .ok()
            .map(|t| Granted {
                user: Some(t.claims.sub).filter(|s| !s.is_empty()),
                access: t.claims.access,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::EmbeddedMeta;

    #[tokio::test]
    async fn issued_tokens_check_and_altered_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetaStore> = Arc::new(EmbeddedMeta::open(dir.path()).unwrap());
        let tokens = Tokens::new(meta.clone(), Duration::from_secs(60));
        let access = vec![Access {
            kind: "repository".into(),
            name: "private/team/app".into(),
            actions: vec!["pull".into(), "push".into()],
        }];
        let t = tokens.issue(Some("ci"), access.clone()).await.unwrap();
        let g = tokens.check(&t).await.unwrap().unwrap();
        assert_eq!(g.user.as_deref(), Some("ci"));
        assert_eq!(g.access, access);
        // Another replica on the same store takes the same key.
        let other = Tokens::new(meta, Duration::from_secs(60));
        assert!(other.check(&t).await.unwrap().is_some());
        let mut altered = t.clone().into_bytes();
        let n = altered.len() - 3;
        altered[n] = if altered[n] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(tokens.check(&altered).await.unwrap().is_none());
        assert!(tokens.check("garbage").await.unwrap().is_none());
        let anonymous = tokens.issue(None, Vec::new()).await.unwrap();
        assert_eq!(tokens.check(&anonymous).await.unwrap().unwrap().user, None);
    }
}
