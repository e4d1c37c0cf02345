//! Purging an image from a repository: its tags are forgotten and its
//! manifest is no longer served from there, so the next pull asks upstream
//! again. Blobs stay: other images may share them, and the cache budget
//! removes what nothing uses. Other replicas may go on serving a tag they
//! hold in memory until its `tag_ttl` passes, and the manifest by digest
//! (its bytes are what the digest says, so never wrong).

use serde::Serialize;

use super::{Mirror, MirrorError};
use crate::reference::{Digest, Reference};
use crate::route::Target;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Purged {
    /// The tags forgotten.
    pub tags: Vec<String>,
    /// The manifest no longer served from the repository.
    pub digest: String,
}

impl Mirror {
    /// Purges what `reference` names in `target`; `None` when the cache
    /// holds nothing under it.
    pub async fn purge(
        &self,
        target: &Target,
        reference: &Reference,
    ) -> Result<Option<Purged>, MirrorError> {
        let repo = target.key();
        let (digest, mut tags) = match reference {
            Reference::Tag(t) => match self.meta.tag(&repo, t.as_str()).await? {
                Some(rec) => match Digest::parse(&rec.digest) {
                    Ok(d) => (d, vec![t.as_str().to_owned()]),
                    Err(_) => return Ok(None),
                },
                None => return Ok(None),
            },
            Reference::Digest(d) => {
                if !self.meta.is_linked(&repo, d).await? {
                    return Ok(None);
                }
                (d.clone(), Vec::new())
            }
        };
        // Every tag that names the same manifest goes with it.
        let wanted = digest.to_string();
        for tag in self.meta.tags(&repo).await? {
            if tags.contains(&tag) {
                continue;
            }
            if self
                .meta
                .tag(&repo, &tag)
                .await?
                .is_some_and(|r| r.digest == wanted)
            {
                tags.push(tag);
            }
        }
        for tag in &tags {
            self.meta.delete_tag(&repo, tag).await?;
        }
        self.meta
            .unlink(&repo, std::slice::from_ref(&digest))
            .await?;
        self.hot.forget(&repo, &tags, std::slice::from_ref(&digest));
        tracing::info!(repository = %repo, digest = %digest, tags = ?tags, "purged");
        Ok(Some(Purged {
            tags,
            digest: wanted,
        }))
    }
}
