//! Listings: a repository's tags, the catalog of cached repositories, and
//! referrers.

use bytes::Bytes;

use super::{Mirror, MirrorError};
use crate::reference::Digest;
use crate::route::Target;
use crate::upstream::UpstreamError;

/// The answer when there are no referrers, or upstream cannot say.
pub const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

impl Mirror {
    /// All tags, sorted: upstream's list, or the cached tags when upstream is
    /// unreachable.
    pub async fn tags(&self, target: &Target) -> Result<Vec<String>, MirrorError> {
        let upstream = self.upstream(target)?;
        let mut tags = match upstream.tags(target.repository.as_str()).await {
            Ok(t) => t,
            Err(UpstreamError::NotFound { .. }) => {
                return Err(MirrorError::NameUnknown(format!(
                    "{} is not on {}",
                    target.repository, target.registry
                )));
            }
            Err(e) => {
                let cached = self.meta.tags(&target.key()).await?;
                if cached.is_empty() {
                    return Err(e.into());
                }
                tracing::warn!(repository = %target.key(), error = %e, "listing cached tags");
                cached
            }
        };
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Cached repositories after `last`, at most `n`.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> Result<Vec<String>, MirrorError> {
        Ok(self.meta.repositories(last, n).await?)
    }

    /// The referrers index from upstream, or an empty index when upstream
    /// does not support the API or cannot be reached. The flag tells whether
    /// upstream applied the artifactType filter.
    pub async fn referrers(
        &self,
        target: &Target,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Bytes, bool), MirrorError> {
        let upstream = self.upstream(target)?;
        match upstream
            .referrers(target.repository.as_str(), digest, artifact_type)
            .await
        {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Ok((Bytes::from_static(EMPTY_INDEX.as_bytes()), false)),
            Err(e) => {
                tracing::warn!(repository = %target.key(), error = %e, "referrers unavailable upstream");
                Ok((Bytes::from_static(EMPTY_INDEX.as_bytes()), false))
            }
        }
    }
}
