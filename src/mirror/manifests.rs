//! Manifest requests. By digest: immutable, served from cache once verified.
//! By tag: served from cache for the upstream's `tag_ttl`, then revalidated
//! with a HEAD and refetched only when the digest moved; served stale when
//! upstream is unreachable.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;

use super::cluster::{Claim, Lease};
use super::{Mirror, MirrorError};
use crate::descriptors::{References, references};
use crate::meta::{StoredManifest, TagRecord};
use crate::reference::{Digest, Reference, Tag};
use crate::route::Target;
use crate::telemetry::metrics::metrics;
use crate::upstream::UpstreamError;

/// How often a replica waiting on another's tag revalidation looks again.
const OTHER_REPLICA_POLL: Duration = Duration::from_millis(100);

/// What waiting on another replica came to.
enum Waited {
    /// It refreshed the tag.
    Answer(ManifestHit),
    /// Go ahead, holding the lease if it could be taken.
    Lead(Option<Lease>),
}

/// A manifest ready to serve.
pub struct ManifestHit {
    pub digest: Digest,
    pub manifest: StoredManifest,
    /// Served from cache although upstream could not confirm it.
    pub stale: bool,
    /// For metrics: hit, revalidated, miss or stale.
    pub outcome: &'static str,
}

impl Mirror {
    pub async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
    ) -> Result<ManifestHit, MirrorError> {
        let hit = match reference {
            Reference::Digest(d) => self.manifest_by_digest(target, d).await,
            Reference::Tag(t) => self.manifest_by_tag(target, t).await,
        }?;
        metrics().cache("manifest", hit.outcome);
        if hit.stale {
            crate::telemetry::tally::tally().add(&format!("upstream.{}.stale", target.registry), 1);
        }
        if let Some(uses) = &self.uses {
            uses.note_manifest(&target.registry, &hit.digest);
        }
        Ok(hit)
    }

    async fn manifest_by_digest(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<ManifestHit, MirrorError> {
        let key = target.key();
        if let Some(hit) = self.cached_by_digest(&key, digest).await? {
            return Ok(hit);
        }
        // Nodes pulling one image at once ask for the same child manifests:
        // one upstream GET each, the others wait and read the cache.
        let _guard = self.tag_locks.lock(&format!("{key}@{digest}")).await;
        if let Some(hit) = self.cached_by_digest(&key, digest).await? {
            return Ok(hit);
        }
        if let Some(hit) = self.confirmed_elsewhere_cached(target, digest).await? {
            return Ok(hit);
        }
        let (got, manifest) = self
            .fetch_manifest(target, &digest.to_string(), Some(digest))
            .await?;
        Ok(ManifestHit {
            digest: got,
            manifest,
            stale: false,
            outcome: "miss",
        })
    }

    /// A manifest stored for another repository is served under this one
    /// once upstream's HEAD says this repository has it too (and that is
    /// remembered): the body need not come again. `None` when it is not
    /// stored, or upstream could not say (a GET follows).
    async fn confirmed_elsewhere_cached(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<Option<ManifestHit>, MirrorError> {
        let manifest = match self.hot.manifest(digest) {
            Some(m) => m,
            None => match self.recall(self.meta.manifest(digest)).await {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let head = self
            .upstream(target)?
            .manifest(
                target.repository.as_str(),
                &digest.to_string(),
                Method::HEAD,
            )
            .await;
        match head {
            Ok(h) if h.digest.as_ref().is_none_or(|d| d == digest) => {
                // Upstream has the manifest in this repository, so what it
                // is made of too.
                let key = target.key();
                let References { linked, sizes, .. } = references(&manifest.bytes);
                let linked: Vec<Digest> = std::iter::once(digest.clone()).chain(linked).collect();
                self.remember(self.meta.link(&key, &linked)).await;
                self.hot.put_manifest(digest, &manifest);
                for d in &linked {
                    self.hot.put_link(&key, d);
                }
                self.sizes.learn(&key, &sizes);
                Ok(Some(ManifestHit {
                    digest: digest.clone(),
                    manifest,
                    stale: false,
                    outcome: "hit",
                }))
            }
            Err(UpstreamError::NotFound { status, .. }) => Err(MirrorError::ManifestUnknown(
                not_on_upstream(target, &digest.to_string(), status),
            )),
            _ => Ok(None),
        }
    }

    /// Learns the blob sizes a manifest read from the metadata store names.
    fn learn_sizes(&self, key: &str, manifest: &StoredManifest) {
        self.sizes.learn(key, &references(&manifest.bytes).sizes);
    }

    async fn cached_by_digest(
        &self,
        key: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestHit>, MirrorError> {
        let hit = |manifest| {
            Some(ManifestHit {
                digest: digest.clone(),
                manifest,
                stale: false,
                outcome: "hit",
            })
        };
        if self.hot.is_linked(key, digest)
            && let Some(manifest) = self.hot.manifest(digest)
        {
            return Ok(hit(manifest));
        }
        if let Some(manifest) = self.recall(self.meta.manifest(digest)).await
            && matches!(self.meta.is_linked(key, digest).await, Ok(true))
        {
            self.learn_sizes(key, &manifest);
            self.hot.put_manifest(digest, &manifest);
            self.hot.put_link(key, digest);
            return Ok(hit(manifest));
        }
        Ok(None)
    }

    async fn manifest_by_tag(
        &self,
        target: &Target,
        tag: &Tag,
    ) -> Result<ManifestHit, MirrorError> {
        let key = target.key();
        if let Some(hit) = self.fresh_tag(target, tag).await? {
            return Ok(hit);
        }
        // One revalidation per tag at a time in this process, and (through a
        // lease) across replicas; the others wait and reuse its answer.
        let lock_key = format!("{key}:{tag}");
        let _guard = self.tag_locks.lock(&lock_key).await;
        if let Some(hit) = self.fresh_tag(target, tag).await? {
            return Ok(hit);
        }
        let lease = match self.cluster.claim(&format!("tag:{lock_key}")).await {
            Claim::Mine(lease) => Some(lease),
            Claim::Alone => None,
            Claim::Theirs { .. } => match self.await_other_replica(target, tag).await? {
                Waited::Answer(hit) => return Ok(hit),
                Waited::Lead(lease) => lease,
            },
        };
        let result = self.refresh_tag(target, tag).await;
        if let Some(lease) = lease {
            lease.release().await;
        }
        result
    }

    /// Waits while another replica revalidates `tag`: its fresh record, or
    /// the lease if it gives up (or dies), whichever comes first. After one
    /// lease period, this replica goes ahead on its own.
    async fn await_other_replica(&self, target: &Target, tag: &Tag) -> Result<Waited, MirrorError> {
        let name = format!("tag:{}:{tag}", target.key());
        let deadline = Instant::now() + self.cluster.lease_ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(OTHER_REPLICA_POLL).await;
            if let Some(hit) = self.fresh_tag(target, tag).await? {
                return Ok(Waited::Answer(hit));
            }
            match self.cluster.claim(&name).await {
                Claim::Mine(lease) => return Ok(Waited::Lead(Some(lease))),
                Claim::Alone => break,
                Claim::Theirs { .. } => {}
            }
        }
        Ok(Waited::Lead(None))
    }

    /// Revalidates (or first fetches) `tag` upstream; serves the cached copy
    /// when upstream cannot answer.
    async fn refresh_tag(&self, target: &Target, tag: &Tag) -> Result<ManifestHit, MirrorError> {
        let key = target.key();
        let lock_key = format!("{key}:{tag}");
        // The copy to fall back on: the metadata store's, or this process's
        // own when the store cannot be read.
        // A record the store no longer has (purged, forgotten) is not
        // brought back from memory.
        let record = match self.meta.tag(&key, tag.as_str()).await {
            Ok(rec) => rec,
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::warn!(error = %e, "metadata unavailable; using this process's copy");
                self.hot.tag(&key, tag.as_str())
            }
        };
        let cached = match record.map(|rec| Digest::parse(&rec.digest)) {
            Some(Ok(d)) => match self.hot.manifest(&d) {
                Some(m) => Some((d, m)),
                None => self.recall(self.meta.manifest(&d)).await.map(|m| (d, m)),
            },
            _ => None,
        };
        let upstream = self.upstream(target)?;
        let repo = target.repository.as_str();
        if let Some((digest, manifest)) = cached {
            let stale = |digest, manifest| ManifestHit {
                digest,
                manifest,
                stale: true,
                outcome: "stale",
            };
            // Upstream just failed for this tag: do not make every waiting
            // client sit through the same timeout again.
            if self.upstream_failures.recent(&lock_key) {
                return Ok(stale(digest, manifest));
            }
            // Revalidate cheaply: HEAD is free against Docker Hub's limits.
            match upstream.manifest(repo, tag.as_str(), Method::HEAD).await {
                Ok(head) if head.digest.as_ref() == Some(&digest) => {
                    self.remember_tag(&key, tag, &digest).await?;
                    return Ok(ManifestHit {
                        digest,
                        manifest,
                        stale: false,
                        outcome: "revalidated",
                    });
                }
                Ok(_) => {}
                Err(e) if allows_stale(&e) => {
                    tracing::warn!(repository = %key, %tag, error = %e, "serving a stale tag");
                    self.upstream_failures.note(&lock_key);
                    return Ok(stale(digest, manifest));
                }
                Err(e) => return Err(tag_error(target, tag, e)),
            }
            // The tag moved (or HEAD gave no digest): fetch it again.
            return match self.fetch_manifest(target, tag.as_str(), None).await {
                Ok((digest, manifest)) => {
                    self.remember_tag(&key, tag, &digest).await?;
                    Ok(ManifestHit {
                        digest,
                        manifest,
                        stale: false,
                        outcome: "miss",
                    })
                }
                Err(MirrorError::Upstream(e)) if allows_stale(&e) => {
                    tracing::warn!(repository = %key, %tag, error = %e, "serving a stale tag");
                    self.upstream_failures.note(&lock_key);
                    Ok(stale(digest, manifest))
                }
                Err(e) => Err(e),
            };
        }
        let (digest, manifest) = self
            .fetch_manifest(target, tag.as_str(), None)
            .await
            .map_err(|e| match e {
                MirrorError::Upstream(u) => tag_error(target, tag, u),
                other => other,
            })?;
        self.remember_tag(&key, tag, &digest).await?;
        Ok(ManifestHit {
            digest,
            manifest,
            stale: false,
            outcome: "miss",
        })
    }

    /// The cached manifest for `tag` if it was confirmed within the TTL.
    async fn fresh_tag(
        &self,
        target: &Target,
        tag: &Tag,
    ) -> Result<Option<ManifestHit>, MirrorError> {
        let key = target.key();
        let ttl = self
            .tag_ttls
            .get(&target.registry)
            .copied()
            .unwrap_or_default();
        let fresh =
            |rec: &TagRecord| now_ms().saturating_sub(rec.checked_at_ms) < ttl.as_millis() as u64;
        let rec = match self.hot.tag(&key, tag.as_str()) {
            Some(rec) if fresh(&rec) => rec,
            _ => {
                let Some(rec) = self.recall(self.meta.tag(&key, tag.as_str())).await else {
                    return Ok(None);
                };
                self.hot.put_tag(&key, tag.as_str(), rec.clone());
                rec
            }
        };
        if !fresh(&rec) {
            return Ok(None);
        }
        let Ok(digest) = Digest::parse(&rec.digest) else {
            return Ok(None);
        };
        let manifest = match self.hot.manifest(&digest) {
            Some(m) => m,
            None => {
                let Some(m) = self.recall(self.meta.manifest(&digest)).await else {
                    return Ok(None);
                };
                self.learn_sizes(&key, &m);
                self.hot.put_manifest(&digest, &m);
                m
            }
        };
        Ok(Some(ManifestHit {
            digest,
            manifest,
            stale: false,
            outcome: "hit",
        }))
    }

    async fn remember_tag(&self, key: &str, tag: &Tag, digest: &Digest) -> Result<(), MirrorError> {
        let rec = TagRecord {
            digest: digest.to_string(),
            checked_at_ms: now_ms(),
        };
        self.remember(self.meta.put_tag(key, tag.as_str(), &rec))
            .await;
        self.hot.put_tag(key, tag.as_str(), rec);
        Ok(())
    }

    /// GETs a manifest upstream, verifies it (against `expected` when the
    /// request named a digest, and against upstream's digest header), then
    /// stores it and links it, and what it references, to the repository.
    async fn fetch_manifest(
        &self,
        target: &Target,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<(Digest, StoredManifest), MirrorError> {
        let resp = self
            .upstream(target)?
            .manifest(target.repository.as_str(), reference, Method::GET)
            .await
            .map_err(|e| match e {
                UpstreamError::NotFound { status, .. } => {
                    MirrorError::ManifestUnknown(not_on_upstream(target, reference, status))
                }
                other => MirrorError::Upstream(other),
            })?;
        let body = resp.body.unwrap_or_default();
        let mismatch = |d: &Digest| MirrorError::DigestMismatch {
            registry: target.registry.clone(),
            expected: d.to_string(),
        };
        for claimed in expected.into_iter().chain(resp.digest.as_ref()) {
            if !claimed.matches(&body) {
                return Err(mismatch(claimed));
            }
        }
        let digest = match (expected, resp.digest) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d,
            (None, None) => Digest::sha256_of(&body),
        };
        let media_type = media_type(resp.media_type.as_deref(), &body);
        let key = target.key();
        let References {
            linked: references,
            image_blobs,
            sizes,
        } = references(&body);
        self.sizes.learn(&key, &sizes);
        let an_image = !image_blobs.is_empty();
        // The client asks for these next, most likely one after another.
        self.missing.look_up(&self.blobs, image_blobs);
        let manifest = StoredManifest {
            media_type,
            bytes: body,
        };
        self.remember(
            self.meta
                .put_manifest(&key, &digest, &manifest, &references),
        )
        .await;
        self.hot.put_manifest(&digest, &manifest);
        for linked in std::iter::once(&digest).chain(&references) {
            self.hot.put_link(&key, linked);
        }
        // An index names platforms; the client's next request says which
        // it wants, and that manifest is prefetched then.
        if an_image
            && self.prefetch.contains(&target.registry)
            && let Some(prefetch) = self.prefetcher.get()
        {
            prefetch(target, &digest);
        }
        Ok((digest, manifest))
    }
}

/// Failures after which a cached copy may be served: upstream unreachable,
/// rate limiting, or answering nonsense.
fn allows_stale(e: &UpstreamError) -> bool {
    e.is_outage() || matches!(e, UpstreamError::Invalid { .. })
}

fn tag_error(target: &Target, tag: &Tag, e: UpstreamError) -> MirrorError {
    match e {
        UpstreamError::NotFound { status, .. } => {
            MirrorError::ManifestUnknown(not_on_upstream(target, tag.as_str(), status))
        }
        other => MirrorError::Upstream(other),
    }
}

/// Registries answer 401/403 for repositories that do not exist as well as
/// for ones that need credentials: say both.
pub(super) fn not_on_upstream(target: &Target, what: &str, status: u16) -> String {
    let name = format!("{}:{what}", target.repository);
    let name = if what.contains(':') {
        format!("{}@{what}", target.repository)
    } else {
        name
    };
    match status {
        401 | 403 => format!(
            "{name}: upstream {} answered {status}; the repository does not exist there \
             or needs credentials this mirror does not have",
            target.registry
        ),
        _ => format!("{name} is not on {}", target.registry),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The manifest's media type: upstream's Content-Type when it is a real one,
/// else the document's own `mediaType`, else a guess from its shape.
fn media_type(header: Option<&str>, body: &Bytes) -> String {
    if let Some(h) = header
        && h.starts_with("application/vnd.")
    {
        return h.to_owned();
    }
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if let Some(mt) = doc.get("mediaType").and_then(|v| v.as_str()) {
        return mt.to_owned();
    }
    if doc.get("manifests").is_some() {
        "application/vnd.oci.image.index.v1+json".into()
    } else if doc.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
        "application/vnd.docker.distribution.manifest.v1+prettyjws".into()
    } else {
        "application/vnd.oci.image.manifest.v1+json".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let idx = Bytes::from_static(br#"{"manifests":[]}"#);
        assert_eq!(
            media_type(
                Some("application/vnd.docker.distribution.manifest.v2+json"),
                &idx
            ),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            media_type(Some("text/plain"), &idx),
            "application/vnd.oci.image.index.v1+json"
        );
        let m =
            Bytes::from_static(br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#);
        assert_eq!(
            media_type(None, &m),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
}
