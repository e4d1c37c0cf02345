//! The private namespace (`[private]`): repositories under a prefix of
//! their own that configured users push to, served only from what was
//! pushed, never from an upstream.
//!
//! Everything it holds is shared by every replica: manifests, tags and
//! links in the metadata store, blobs in the blob store, and upload
//! sessions as records in the metadata store whose bytes are blobs already
//! (`uploads`), so an upload begun on one replica finishes on any other.
//! Every digest private content points at is also linked to the prefix
//! itself, the one set eviction and retention spare (`pins`).

pub mod access;
mod gc;
pub mod manifests;
pub mod token;
mod uploads;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

pub use access::{Action, Users};
pub use gc::Collected;
pub use token::{Access, Granted, Tokens};
pub use uploads::Session;

use crate::config::{Config, PrivateConfig};
use crate::meta::{MetaError, MetaStore, StoredManifest, TagRecord, UseKind};
use crate::range::RangeSpec;
use crate::reference::{Digest, Reference, RepoName};
use crate::storage::{BlobBody, BlobStore, StorageError};

#[derive(Debug, Error)]
pub enum PrivateError {
    #[error("{0}")]
    NameInvalid(String),
    #[error("no manifest {0} in this repository")]
    ManifestUnknown(String),
    #[error("blob {0} is not in this repository")]
    BlobUnknown(Digest),
    #[error("no such upload: it finished, was cancelled, or lapsed after {0:?} idle")]
    UploadUnknown(Duration),
    #[error("{0}")]
    UploadInvalid(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    SizeInvalid(String),
    #[error("{0}")]
    ManifestInvalid(String),
    #[error("the manifest points at {0}, which is not in this repository: push it first")]
    ManifestBlobUnknown(Digest),
    /// A chunk that does not start where the upload stands.
    #[error("the upload stands at {offset} bytes; a chunk must start there")]
    RangeInvalid { offset: u64 },
    #[error("the request body broke off: {0}")]
    BodyBroken(io::Error),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("spooling: {0}")]
    Spool(io::Error),
}

/// A repository of the private namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    /// The name under the prefix (`team/app`): what user globs match.
    pub name: RepoName,
    /// Where the stores keep it: `<prefix>/<name>`.
    pub key: String,
}

/// A stored manifest and the digest it is stored under.
pub struct Found {
    pub digest: Digest,
    pub manifest: StoredManifest,
}

/// How long a push waits for a collection's removal of a blob it needs
/// (a removal is one delete).
const SETTLE_FOR: Duration = Duration::from_secs(30);

pub struct Private {
    prefix: String,
    /// `<alias>.<domain>` for each domain: hosts whose names are all private.
    alias_hosts: Vec<String>,
    pub users: Users,
    pub tokens: Tokens,
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    spool: PathBuf,
    upload_ttl: Duration,
    max_blob_size: u64,
    /// `[private] token_realm`: the token endpoint's URL, when set.
    pub realm: Option<String>,
    /// `[cache] pinned`: bytes a collection leaves in place for the mirror.
    pinned: Option<Arc<dyn crate::storage::Keep>>,
}

impl Private {
    /// The namespace `config` asks for, if any.
    pub fn new(
        config: &Config,
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn BlobStore>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(p) = &config.private else {
            return Ok(None);
        };
        let PrivateConfig {
            prefix,
            alias,
            token_ttl,
            upload_ttl,
            ..
        } = p;
        Ok(Some(Self {
            prefix: prefix.clone(),
            alias_hosts: alias
                .iter()
                .flat_map(|a| config.domains.iter().map(move |d| format!("{a}.{d}")))
                .collect(),
            users: Users::new(p)?,
            tokens: Tokens::new(meta.clone(), *token_ttl),
            blobs,
            spool: config.storage.spool_dir(),
            upload_ttl: *upload_ttl,
            max_blob_size: config.fetch.max_blob_size,
            realm: p.token_realm.clone(),
            pinned: (!config.cache.pinned.is_empty()).then(|| {
                Arc::new(crate::pins::Pins::new(
                    config.cache.pinned.clone(),
                    meta.clone(),
                )) as Arc<dyn crate::storage::Keep>
            }),
            meta,
        }))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The private repository a request names (the Host header, and the
    /// name in its path), `None` when it names a mirrored one.
    pub fn repo(&self, host: Option<&str>, name: &str) -> Option<Result<Repo, PrivateError>> {
        let under = if host.is_some_and(|h| self.is_alias_host(h)) {
            name
        } else if name == self.prefix {
            return Some(Err(PrivateError::NameInvalid(format!(
                "{name:?} is the private namespace: name a repository under it"
            ))));
        } else {
            name.strip_prefix(&self.prefix)?.strip_prefix('/')?
        };
        Some(
            RepoName::parse(under)
                .map(|name| Repo {
                    key: [self.prefix.as_str(), "/", name.as_str()].concat(),
                    name,
                })
                .map_err(|e| PrivateError::NameInvalid(e.to_string())),
        )
    }

    /// The private repository a catalog or metadata key names.
    pub fn repo_of_key(&self, key: &str) -> Option<Repo> {
        let under = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        RepoName::parse(under).ok().map(|name| Repo {
            name,
            key: key.to_owned(),
        })
    }

    /// Whether a metadata key belongs to the private namespace (its
    /// repositories, or the set of everything they point at).
    pub fn owns_key(&self, key: &str) -> bool {
        key == self.prefix
            || key
                .strip_prefix(&self.prefix)
                .is_some_and(|r| r.starts_with('/'))
    }

    fn is_alias_host(&self, host: &str) -> bool {
        let host = crate::route::strip_port(host).trim_end_matches('.');
        self.alias_hosts
            .iter()
            .any(|a| a.eq_ignore_ascii_case(host))
    }

    /// Records that the private namespace holds `digests`: in `repo`, and
    /// in the set nothing evicts; and that they were used now (the
    /// collection spares what was used within its grace period).
    async fn hold(&self, repo: &Repo, digests: &[Digest]) -> Result<(), MetaError> {
        self.used(digests).await?;
        self.meta.link(&self.prefix, digests).await?;
        self.meta.link(&repo.key, digests).await
    }

    /// Before a push relies on stored bytes (finds them there, or puts
    /// them there): records the use, so a collection deciding from now on
    /// spares them, then waits out a removal a collection already claimed.
    async fn settle(&self, digest: &Digest) -> Result<(), PrivateError> {
        self.used(std::slice::from_ref(digest)).await?;
        let lease = crate::meta::blob_lease(digest);
        let deadline = std::time::Instant::now() + SETTLE_FOR;
        while let Some(holder) = self.meta.lease(&lease).await? {
            if !gc::is_collector(&holder) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(PrivateError::UploadInvalid(format!(
                    "{digest} is being removed; push it again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Records that the private namespace put these bytes in the blob
    /// store (they were not there): only such bytes does a collection
    /// delete; others belong to the mirror too.
    async fn owned(&self, digest: &Digest) -> Result<(), MetaError> {
        self.meta
            .link(&self.owned_key(), std::slice::from_ref(digest))
            .await
    }

    /// The set of blobs whose bytes the private namespace stored. Its key
    /// is under the prefix but no repository's (`_` cannot start a name).
    fn owned_key(&self) -> String {
        format!("{}/_stored", self.prefix)
    }

    async fn used(&self, digests: &[Digest]) -> Result<(), MetaError> {
        let now = crate::meta::now_ms();
        let uses: Vec<(Digest, u64)> = digests.iter().map(|d| (d.clone(), now)).collect();
        self.meta.record_uses(UseKind::Blobs, &uses).await
    }

    pub async fn manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
    ) -> Result<Found, PrivateError> {
        let unknown = || PrivateError::ManifestUnknown(reference.to_string());
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                let record = self
                    .meta
                    .tag(&repo.key, t.as_str())
                    .await?
                    .ok_or_else(unknown)?;
                Digest::parse(&record.digest)
                    .map_err(|_| MetaError::Corrupt(format!("tag {} of {}", t, repo.key)))?
            }
        };
        if !self.meta.is_linked(&repo.key, &digest).await? {
            return Err(unknown());
        }
        let manifest = self.meta.manifest(&digest).await?.ok_or_else(unknown)?;
        Ok(Found { digest, manifest })
    }

    /// Stores a pushed manifest under its digest and, for a tag, the tag.
    /// Everything it points at must be in the repository already.
    pub async fn put_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
        content_type: &str,
        body: Bytes,
    ) -> Result<(Digest, manifests::Points), PrivateError> {
        let points =
            manifests::check(content_type, &body).map_err(PrivateError::ManifestInvalid)?;
        let digest = match reference {
            Reference::Digest(d) => {
                if !d.matches(&body) {
                    return Err(PrivateError::DigestInvalid(format!(
                        "the manifest's digest is not {d}"
                    )));
                }
                d.clone()
            }
            Reference::Tag(_) => Digest::sha256_of(&body),
        };
        // Used before they are checked: a collection removing one of them
        // from now on sees the use and stops, or has unlinked it already.
        let pointed: Vec<Digest> = points
            .blobs
            .iter()
            .chain(&points.manifests)
            .cloned()
            .collect();
        self.used(&pointed).await?;
        for blob in &points.blobs {
            if !self.meta.is_linked(&repo.key, blob).await? {
                return Err(PrivateError::ManifestBlobUnknown(blob.clone()));
            }
        }
        let children = self.meta.has_manifests(&points.manifests).await?;
        for (child, stored) in points.manifests.iter().zip(children) {
            if !stored || !self.meta.is_linked(&repo.key, child).await? {
                return Err(PrivateError::ManifestBlobUnknown(child.clone()));
            }
        }
        let manifest = StoredManifest {
            media_type: content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            bytes: body,
        };
        let mut held: Vec<Digest> = points
            .blobs
            .iter()
            .chain(&points.manifests)
            .cloned()
            .collect();
        held.push(digest.clone());
        self.used(&held).await?;
        self.meta.link(&self.prefix, &held).await?;
        self.meta
            .put_manifest(&repo.key, &digest, &manifest, &held)
            .await?;
        if let Some(subject) = &points.subject {
            self.meta.add_referrer(&repo.key, subject, &digest).await?;
        }
        if let Reference::Tag(tag) = reference {
            let record = TagRecord {
                digest: digest.to_string(),
                checked_at_ms: crate::meta::now_ms(),
            };
            self.meta.put_tag(&repo.key, tag.as_str(), &record).await?;
        }
        Ok((digest, points))
    }

    /// A tag: only the tag goes. A digest: the manifest leaves the
    /// repository, with every tag that names it.
    pub async fn delete_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
    ) -> Result<(), PrivateError> {
        let found = self.manifest(repo, reference).await?;
        match reference {
            Reference::Tag(t) => self.meta.delete_tag(&repo.key, t.as_str()).await?,
            Reference::Digest(d) => {
                for tag in self.meta.tags(&repo.key).await? {
                    if let Some(r) = self.meta.tag(&repo.key, &tag).await?
                        && r.digest == found.digest.to_string()
                    {
                        self.meta.delete_tag(&repo.key, &tag).await?;
                    }
                }
                self.meta.unlink(&repo.key, std::slice::from_ref(d)).await?;
                if let Ok(points) =
                    manifests::check(&found.manifest.media_type, &found.manifest.bytes)
                    && let Some(subject) = points.subject
                {
                    self.meta.remove_referrer(&repo.key, &subject, d).await?;
                }
            }
        }
        Ok(())
    }

    /// The referrers of `subject` in `repo` as an OCI image index, only
    /// those of `artifact_type` when given.
    pub async fn referrers(
        &self,
        repo: &Repo,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<u8>, PrivateError> {
        let mut descriptors = Vec::new();
        for digest in self.meta.referrers(&repo.key, subject).await? {
            if !self.meta.is_linked(&repo.key, &digest).await? {
                continue;
            }
            let Some(m) = self.meta.manifest(&digest).await? else {
                continue;
            };
            let doc: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
            let kind = manifests::check(&m.media_type, &m.bytes)
                .ok()
                .and_then(|p| p.artifact_type);
            if artifact_type.is_some_and(|want| kind.as_deref() != Some(want)) {
                continue;
            }
            let mut d = serde_json::json!({
                "mediaType": m.media_type,
                "digest": digest.to_string(),
                "size": m.bytes.len(),
            });
            if let Some(kind) = kind {
                d["artifactType"] = kind.into();
            }
            if let Some(a) = doc.get("annotations") {
                d["annotations"] = a.clone();
            }
            descriptors.push(d);
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifests::OCI_INDEX,
            "manifests": descriptors,
        });
        Ok(index.to_string().into_bytes())
    }

    pub async fn tags(&self, repo: &Repo) -> Result<Vec<String>, PrivateError> {
        Ok(self.meta.tags(&repo.key).await?)
    }

    /// The size of a blob of the repository. A push asks this before it
    /// reuses a blob, so it counts as a use.
    pub async fn blob_size(&self, repo: &Repo, digest: &Digest) -> Result<u64, PrivateError> {
        if !self.meta.is_linked(&repo.key, digest).await? {
            return Err(PrivateError::BlobUnknown(digest.clone()));
        }
        self.used(std::slice::from_ref(digest)).await?;
        self.blobs
            .stat(digest)
            .await?
            .ok_or_else(|| PrivateError::BlobUnknown(digest.clone()))
    }

    pub async fn blob(
        &self,
        repo: &Repo,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<BlobBody, PrivateError> {
        if !self.meta.is_linked(&repo.key, digest).await? {
            return Err(PrivateError::BlobUnknown(digest.clone()));
        }
        self.blobs
            .get(digest, range)
            .await?
            .ok_or_else(|| PrivateError::BlobUnknown(digest.clone()))
    }

    /// Takes a blob out of the repository. Its bytes stay while anything
    /// else holds them.
    pub async fn delete_blob(&self, repo: &Repo, digest: &Digest) -> Result<(), PrivateError> {
        if !self.meta.is_linked(&repo.key, digest).await? {
            return Err(PrivateError::BlobUnknown(digest.clone()));
        }
        self.meta
            .unlink(&repo.key, std::slice::from_ref(digest))
            .await?;
        Ok(())
    }

    /// Puts a blob `from` holds into `repo` too (a cross-repository
    /// mount); false when `from` does not hold it.
    pub async fn mount(
        &self,
        repo: &Repo,
        from: &Repo,
        digest: &Digest,
    ) -> Result<bool, PrivateError> {
        // Used before the look: a collection removes links before it
        // claims a removal, so a blob found linked here is not one it took.
        self.used(std::slice::from_ref(digest)).await?;
        if !self.meta.is_linked(&from.key, digest).await?
            || self.blobs.stat(digest).await?.is_none()
        {
            return Ok(false);
        }
        self.hold(repo, std::slice::from_ref(digest)).await?;
        Ok(true)
    }
}

/// Where a push spools a request body: the spool of the blob store.
fn spool_name() -> String {
    format!("push-{:016x}.part", rand::random::<u64>())
}
