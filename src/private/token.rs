//! The tokens the token endpoint issues: signed (HS256), short-lived, naming
//! the user and what they may do to which private repositories. Every
//! replica signs and checks with one key, kept in the metadata store.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

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
    /// The key last read from the store, and the keys made from it.
    keys: tokio::sync::RwLock<Option<Arc<Keys>>>,
}

struct Keys {
    secret: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    fn from(secret: String) -> Result<Keys, MetaError> {
        let bad = |e: jsonwebtoken::errors::Error| {
            MetaError::Corrupt(format!("the token signing key: {e}"))
        };
        Ok(Keys {
            encoding: EncodingKey::from_secret(secret.as_bytes()).map_err(bad)?,
            decoding: DecodingKey::from_secret(secret.as_bytes()).map_err(bad)?,
            secret,
        })
    }
}

impl Tokens {
    pub fn new(meta: Arc<dyn MetaStore>, ttl: Duration) -> Self {
        Self {
            meta,
            ttl,
            keys: tokio::sync::RwLock::new(None),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The signing keys, read from the store once (or made, by the first
    /// replica to need them).
    async fn keys(&self) -> Result<Arc<Keys>, MetaError> {
        if let Some(keys) = self.keys.read().await.as_ref() {
            return Ok(keys.clone());
        }
        self.load().await
    }

    /// Reads the stored key again (it may have been lost and made anew by
    /// another replica), making one if there is none.
    async fn load(&self) -> Result<Arc<Keys>, MetaError> {
        let mut cached = self.keys.write().await;
        let mine = hex::encode(rand::random::<[u8; 32]>());
        let secret = match self.meta.acquire_lease(KEY_RECORD, &mine, KEY_KEPT).await? {
            None => mine,
            Some(theirs) => theirs,
        };
        if let Some(keys) = cached.as_ref()
            && keys.secret == secret
        {
            return Ok(keys.clone());
        }
        let keys = Arc::new(Keys::from(secret)?);
        *cached = Some(keys.clone());
        Ok(keys)
    }

    /// A token for `user` (`None`: anonymous) granting `access`.
    pub async fn issue(
        &self,
        user: Option<&str>,
        access: Vec<Access>,
    ) -> Result<String, MetaError> {
        let keys = self.keys().await?;
        let iat = now_ms() / 1000;
        let claims = Claims {
            iss: ISSUER.into(),
            aud: SERVICE.into(),
            sub: user.unwrap_or_default().to_owned(),
            iat,
            exp: iat + self.ttl.as_secs(),
            access,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding)
            .map_err(|e| MetaError::Backend(format!("signing a token: {e}")))
    }

    /// What `token` grants, or `None` when it is not one of Pier's, is
    /// expired or was altered.
    pub async fn check(&self, token: &str) -> Result<Option<Granted>, MetaError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[SERVICE]);
        validation.leeway = 5;
        let keys = self.keys().await?;
        let checked = jsonwebtoken::decode::<Claims>(token, &keys.decoding, &validation);
        let checked = match checked {
            Ok(t) => Ok(t),
            // Signed with a key this replica has not seen: look again.
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                let again = self.load().await?;
                if Arc::ptr_eq(&again, &keys) {
                    Err(e)
                } else {
                    jsonwebtoken::decode::<Claims>(token, &again.decoding, &validation)
                }
            }
            Err(e) => Err(e),
        };
        Ok(checked.ok().map(|t| Granted {
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
        let other = Tokens::new(meta.clone(), Duration::from_secs(60));
        assert!(other.check(&t).await.unwrap().is_some());
        let mut altered = t.clone().into_bytes();
        let n = altered.len() - 3;
        altered[n] = if altered[n] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(tokens.check(&altered).await.unwrap().is_none());
        assert!(tokens.check("garbage").await.unwrap().is_none());
        let anonymous = tokens.issue(None, Vec::new()).await.unwrap();
        assert_eq!(tokens.check(&anonymous).await.unwrap().unwrap().user, None);

        // The stored key lost (an evicting Redis): a replica made a new one;
        // one that cached the old one reads it again rather than refuse.
        let lost = meta.lease(KEY_RECORD).await.unwrap().unwrap();
        meta.release_lease(KEY_RECORD, &lost).await.unwrap();
        let fresh = Tokens::new(meta.clone(), Duration::from_secs(60));
        let t = fresh.issue(Some("ci"), Vec::new()).await.unwrap();
        assert!(tokens.check(&t).await.unwrap().is_some());
    }
}
