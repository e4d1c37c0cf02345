//! Reclaiming what no private manifest references any more: blobs and
//! manifests left by deletes, and chunks of uploads. Everything the
//! namespace holds is linked to its prefix (the set eviction spares);
//! what no manifest of a private repository points at, and that nobody
//! used for the grace period, leaves the set, the repositories and the
//! blob store.
//!
//! A push that is about to reference a blob uses it first (uploads it,
//! mounts it, or HEADs it), which records a use; the removal is claimed
//! only while no use later than the one the decision saw exists, in one
//! atomic step, and the links go before that claim. So a manifest `PUT`
//! racing the removal either is seen (the blob stays, its links put back)
//! or finds the blob gone from the repository and is refused: it never
//! stores a manifest whose blob then disappears.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{Private, manifests};
use crate::meta::{Claimed, MetaError, Removal, UseKind, now_ms};
use crate::reference::Digest;

/// The lease one collection at a time holds, across replicas.
const LEASE: &str = "private-gc";
const LEASE_TTL: Duration = Duration::from_secs(300);
/// Repositories read from the catalog per request.
const PAGE: usize = 1000;

/// Whether a lease's holder is a collection (its removals are claimed
/// under the blob's lease, held by the collection's holder).
pub(super) fn is_collector(holder: &str) -> bool {
    holder.starts_with(HOLDER) && !crate::meta::lease_done(holder)
}

const HOLDER: &str = "private-gc-";

/// What one collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Digests that left the namespace.
    pub removed: usize,
    /// Blob bytes deleted from the blob store.
    pub bytes: u64,
    /// Unreferenced, but used within the grace period.
    pub spared: usize,
}

impl Private {
    /// Looks for unreferenced content every `interval`, one replica at a
    /// time.
    pub fn spawn_gc(self: &Arc<Self>, interval: Duration, grace: Duration) {
        let private = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(private) = private.upgrade() else {
                    return;
                };
                match private.collect(grace).await {
                    Ok(c) if c.removed > 0 => tracing::info!(
                        removed = c.removed,
                        bytes = c.bytes,
                        spared = c.spared,
                        "reclaimed unreferenced private content"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "private garbage collection failed"),
                }
            }
        });
    }

    /// One collection: removes what nothing references and nobody used
    /// for `grace`. Another replica's collection running: nothing is done.
    pub async fn collect(&self, grace: Duration) -> Result<Collected, MetaError> {
        let holder = format!("{HOLDER}{:016x}", rand::random::<u64>());
        if self
            .meta
            .acquire_lease(LEASE, &holder, LEASE_TTL)
            .await?
            .is_some()
        {
            return Ok(Collected::default());
        }
        let result = self.collect_holding(&holder, grace).await;
        if let Err(e) = self.meta.release_lease(LEASE, &holder).await {
            tracing::debug!(error = %e, "the collection's lease is left to lapse");
        }
        result
    }

    async fn collect_holding(&self, holder: &str, grace: Duration) -> Result<Collected, MetaError> {
        let held = self.meta.links(&self.prefix).await?;
        // Which repositories hold each digest, and what their manifests
        // point at.
        let mut holders: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
        let mut live: HashSet<Digest> = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.repositories(after.as_deref(), PAGE).await?;
            for repo in page.iter().filter(|r| self.repo_of_key(r).is_some()) {
                let links = self.meta.links(repo).await?;
                let stored = self.meta.has_manifests(&links).await?;
                for (digest, is_manifest) in links.iter().zip(stored) {
                    holders
                        .entry(digest.clone())
                        .or_default()
                        .push(repo.clone());
                    if !is_manifest {
                        continue;
                    }
                    live.insert(digest.clone());
                    if let Some(m) = self.meta.manifest(digest).await?
                        && let Ok(points) = manifests::check(&m.media_type, &m.bytes)
                    {
                        live.extend(points.blobs);
                        live.extend(points.manifests);
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
            after = page.last().cloned();
        }
        let candidates: Vec<Digest> = held.into_iter().filter(|d| !live.contains(d)).collect();
        let uses = self.meta.last_uses(UseKind::Blobs, &candidates).await?;
        let before = now_ms().saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let mut collected = Collected::default();
        for (digest, used) in candidates.into_iter().zip(uses) {
            let seen_ms = used.unwrap_or(0);
            if seen_ms >= before {
                collected.spared += 1;
                continue;
            }
            let repos = holders.remove(&digest).unwrap_or_default();
            match self.remove(holder, &digest, seen_ms, &repos).await {
                Ok(Some(bytes)) => {
                    collected.removed += 1;
                    collected.bytes += bytes;
                }
                Ok(None) => collected.spared += 1,
                Err(Stop::Fenced) => break,
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
        Ok(collected)
    }

    /// Takes one unreferenced digest out of the namespace: its links first,
    /// then, if nobody used it since `seen_ms`, the bytes (only those the
    /// namespace stored, and not pinned for the mirror). The bytes' size,
    /// or `None` when it was used meanwhile and stays.
    async fn remove(
        &self,
        holder: &str,
        digest: &Digest,
        seen_ms: u64,
        repos: &[String],
    ) -> Result<Option<u64>, Stop> {
        let one = std::slice::from_ref(digest);
        let mut sets: Vec<&str> = repos.iter().map(String::as_str).collect();
        sets.push(&self.prefix);
        for (n, set) in sets.iter().enumerate() {
            if let Err(e) = self.meta.unlink(set, one).await {
                self.relink(&sets[..n], digest).await;
                return Err(Stop::Failed(e));
            }
        }
        let removal = Removal {
            fence: LEASE,
            holder,
            digest,
            seen_ms,
            ttl: LEASE_TTL,
        };
        match self.meta.claim_removal(&removal).await {
            Ok(Claimed::Yes) => {}
            Ok(Claimed::Wanted) => {
                // Used since the look: it stays where it was.
                self.relink(&sets, digest).await;
                return Ok(None);
            }
            Ok(Claimed::Fenced) => {
                self.relink(&sets, digest).await;
                return Err(Stop::Fenced);
            }
            Err(e) => {
                self.relink(&sets, digest).await;
                return Err(Stop::Failed(e));
            }
        }
        let result = self.delete_bytes(digest).await;
        let lease = crate::meta::blob_lease(digest);
        if let Err(e) = self.meta.release_lease(&lease, holder).await {
            tracing::debug!(error = %e, "a removal's blob lease is left to lapse");
        }
        Ok(Some(result))
    }

    /// Puts back links a removal took, for one that does not go ahead.
    async fn relink(&self, sets: &[&str], digest: &Digest) {
        for set in sets {
            if let Err(e) = self.meta.link(set, std::slice::from_ref(digest)).await {
                tracing::warn!(%digest, error = %e, "cannot put back a private link");
            }
        }
    }

    /// Deletes the bytes of a digest the namespace no longer holds, when
    /// it stored them and the mirror does not pin them; their size.
    async fn delete_bytes(&self, digest: &Digest) -> u64 {
        let owned = self.owned_key();
        match self.meta.is_linked(&owned, digest).await {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot tell whose bytes these are; they stay");
                return 0;
            }
        }
        if let Some(pins) = &self.pinned
            && pins.keep(digest).await
        {
            return 0;
        }
        let size = self.blobs.stat(digest).await.ok().flatten().unwrap_or(0);
        if let Err(e) = self.blobs.delete(digest).await {
            tracing::warn!(%digest, error = %e, "cannot delete an unreferenced private blob");
            return 0;
        }
        if let Err(e) = self.meta.unlink(&owned, std::slice::from_ref(digest)).await {
            tracing::debug!(%digest, error = %e, "a deleted blob stays in the stored set");
        }
        crate::telemetry::metrics::metrics()
            .private_reclaimed_bytes
            .inc_by(size);
        size
    }
}

/// Why a collection stops early.
enum Stop {
    /// Its lease went to another replica.
    Fenced,
    Failed(MetaError),
}
