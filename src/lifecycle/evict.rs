//! Eviction over a store that replicas share: one pass at a time across
//! the cluster, holding the eviction lease, removes the least recently
//! used blobs until usage is under budget, and those past their
//! `max_age` (`Retention`).
//!
//! A pass works from the store's own listing, so blobs no metadata knows
//! of (Redis was flushed, another process wrote them) count and go too;
//! their write time stands in for a use. Each removal is fenced: the blob
//! is claimed in one atomic step that also checks the eviction lease and
//! the blob's last use (`MetaStore::claim_removal`); a fetch of the blob
//! then waits. The pass lets every replica's pending uses arrive, looks
//! once more, and removes the blob only if nobody used or wrote it since
//! the listing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use super::forget::Forgetter;
use super::retention::Retention;
use super::uses::{UseLog, now_ms};
use crate::meta::Held;
use crate::meta::{Claimed, MetaError, MetaStore, Removal, UseKind, blob_lease};
use crate::reference::Digest;
use crate::storage::{BlobStore, Evicted, Keep, StorageError};
use crate::telemetry::metrics::metrics;

/// Held by the replica running a pass.
const LEASE: &str = "lifecycle:evict";
const LEASE_TTL: Duration = Duration::from_secs(60);
/// Taken by the replica that ran the periodic pass, and left to lapse: the
/// others skip theirs until the period is over.
const PERIOD_LEASE: &str = "lifecycle:period";
/// How often some replica runs a pass whatever the usage: blobs reach
/// `max_age`, and the shared count is set right from the listing.
const PERIOD: Duration = Duration::from_secs(5 * 60);
/// How often each replica reads the shared usage (for its metrics and to
/// notice the store over budget when another replica's wake-up was lost).
const LOOK_EVERY: Duration = Duration::from_secs(30);
/// After a pass that left the store over budget (everything left is
/// pinned or just used), the next waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Blobs claimed at once; fetches of them wait while the claims last.
const BATCH: usize = 256;
/// Uses read per request.
const PAGE: usize = 1000;
/// How long a claimed blob's lease lasts if the pass dies.
const CLAIM_TTL: Duration = Duration::from_secs(60);

/// What the blobs of a shared store may take.
#[derive(Clone, Debug, Default)]
pub struct SharedBudget {
    pub max_size: Option<u64>,
    /// Blobs past their age go, whatever the size.
    pub retention: Retention,
}

impl SharedBudget {
    pub fn is_set(&self) -> bool {
        self.max_size.is_some() || self.retention.is_set()
    }
}

/// A stored blob as a pass sees it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub digest: Digest,
    pub size: u64,
    pub written: SystemTime,
    /// The last use recorded (Unix ms), if any.
    pub used_ms: Option<u64>,
    /// The deadline recorded, if any (`Retention`).
    pub deadline: Option<u64>,
}

impl Seen {
    /// When it was last wanted: its last use, or its write when no use is
    /// known (the metadata was lost, or another process stored it). Storing
    /// a blob counts as a use, so a known use is never older than the write
    /// of the copy it was made for.
    pub fn recency_ms(&self) -> u64 {
        self.used_ms.unwrap_or_else(|| {
            self.written
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
    }
}

/// Everything the store holds, least recently wanted first.
pub struct Inventory {
    pub blobs: Vec<Seen>,
    pub bytes: u64,
}

/// A blob a pass chose, and why.
pub struct Victim {
    pub seen: Seen,
    pub reason: &'static str,
}

/// What a pass did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub blobs: usize,
    pub bytes: u64,
    pub removed: usize,
    pub removed_bytes: u64,
    /// The least recent use (or write) among the blobs removed, and the
    /// most recent among those removed for room, Unix ms.
    pub oldest_ms: Option<u64>,
    pub newest_ms: Option<u64>,
    /// Chosen, but used, written or fetched again before removal.
    pub spared: usize,
    /// Spared because an image they belong to is pinned.
    pub pinned: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    #[error("another eviction pass runs now")]
    Busy,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

pub struct Evictor {
    store: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    keep: Option<Arc<dyn Keep>>,
    budget: SharedBudget,
    uses: Arc<UseLog>,
    /// Told how far eviction reached, to forget the metadata of what went.
    forgetter: Option<Arc<Forgetter>>,
    /// This process's value in the leases it takes (a blob lease's value is
    /// read by fetches: `<id> -` names no replica to stream from).
    pub(super) holder: String,
    wake: Notify,
    #[cfg(test)]
    pub(super) hook: Option<Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>>,
}

impl Evictor {
    pub fn new(
        store: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        keep: Option<Arc<dyn Keep>>,
        budget: SharedBudget,
        uses: Arc<UseLog>,
        forgetter: Option<Arc<Forgetter>>,
    ) -> Self {
        Self {
            store,
            meta,
            keep,
            budget,
            uses,
            forgetter,
            holder: format!("{:016x} -", rand::random::<u64>()),
            wake: Notify::new(),
            #[cfg(test)]
            hook: None,
        }
    }

    pub fn budget(&self) -> &SharedBudget {
        &self.budget
    }

    /// Asks for a pass now (the store went over budget).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs passes in the background when woken, when the shared usage is
    /// over budget, and once a period on some replica.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut not_before = Instant::now();
            // The first look is at start: a budget made smaller, or a
            // period's pass that no replica ran, is acted on at once.
            let mut first = true;
            loop {
                if !std::mem::take(&mut first) {
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(LOOK_EVERY) => {}
                    }
                }
                tokio::time::sleep_until(not_before.into()).await;
                let over = match self.meta.add_usage(0, 0).await {
                    Ok(usage) => {
                        publish(usage);
                        self.budget
                            .max_size
                            .is_some_and(|max| usage.0 > 0 && usage.0 as u64 > max)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the shared usage");
                        false
                    }
                };
                if !over && !self.periodic_due().await {
                    continue;
                }
                match self.pass(false).await {
                    Ok(report) if report.removed == 0 && over => {
                        not_before = Instant::now() + RETRY_AFTER;
                    }
                    // Blobs used during the pass were spared and the store
                    // is still over: the next pass follows at once, not at
                    // the next store or look.
                    Ok(report)
                        if self.budget.max_size.is_some_and(|max| {
                            report.bytes.saturating_sub(report.removed_bytes) > max
                        }) =>
                    {
                        first = true;
                    }
                    Ok(_) | Err(EvictError::Busy) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "eviction pass failed");
                        not_before = Instant::now() + RETRY_AFTER;
                    }
                }
            }
        });
    }

    /// Whether this replica runs this period's pass.
    async fn periodic_due(&self) -> bool {
        matches!(
            self.meta
                .acquire_lease(PERIOD_LEASE, &self.holder, PERIOD)
                .await,
            Ok(None)
        )
    }

    /// Lists the store and reads each blob's last use.
    pub async fn inventory(&self) -> Result<Inventory, EvictError> {
        let listed = self.store.inventory().await?;
        let digests: Vec<Digest> = listed.iter().map(|l| l.digest.clone()).collect();
        let used = self.meta.last_uses(UseKind::Blobs, &digests).await?;
        let deadlines = if self.budget.retention.per_registry() {
            self.meta
                .last_uses(UseKind::BlobDeadlines, &digests)
                .await?
        } else {
            vec![None; digests.len()]
        };
        let mut blobs: Vec<Seen> = listed
            .into_iter()
            .zip(used.into_iter().zip(deadlines))
            .map(|(l, (used_ms, deadline))| Seen {
                digest: l.digest,
                size: l.size,
                written: l.written,
                used_ms,
                deadline,
            })
            .collect();
        blobs.sort_by_key(Seen::recency_ms);
        let bytes = blobs.iter().map(|b| b.size).sum();
        Ok(Inventory { blobs, bytes })
    }

    /// The blobs to remove, least recently wanted first: those past their
    /// age, and as many as bring usage down to 90 % of `max_size` once past
    /// it. Pinned blobs are counted in `report` and passed over.
    pub async fn choose(&self, inventory: &Inventory, report: &mut Report) -> Vec<Victim> {
        let now = now_ms();
        let retention = &self.budget.retention;
        let horizon = retention.horizon(now);
        let mut excess = match self.budget.max_size {
            Some(max) if inventory.bytes > max => inventory.bytes - max / 10 * 9,
            _ => 0,
        };
        let mut victims = Vec::new();
        for seen in &inventory.blobs {
            let recency = seen.recency_ms();
            let reason = if retention.expired(seen.deadline, recency, now) {
                "age"
            } else if excess > 0 {
                "size"
            } else if horizon.is_some_and(|h| recency < h) {
                // Kept by its registry's longer age; others may not be.
                continue;
            } else {
                break;
            };
            if self.kept(&seen.digest).await {
                report.pinned += 1;
                continue;
            }
            excess = excess.saturating_sub(seen.size);
            victims.push(Victim {
                seen: seen.clone(),
                reason,
            });
        }
        victims
    }

    async fn kept(&self, digest: &Digest) -> bool {
        match &self.keep {
            Some(keep) => keep.keep(digest).await,
            None => false,
        }
    }

    /// One pass: under the eviction lease, brings the store within budget.
    /// `dry`: only says what it would remove, taking no lease.
    pub async fn pass(&self, dry: bool) -> Result<Report, EvictError> {
        if dry {
            let inventory = self.inventory().await?;
            let mut report = Report {
                blobs: inventory.blobs.len(),
                bytes: inventory.bytes,
                ..Report::default()
            };
            for victim in self.choose(&inventory, &mut report).await {
                report.removed += 1;
                report.removed_bytes += victim.seen.size;
                report.oldest_ms.get_or_insert(victim.seen.recency_ms());
            }
            return Ok(report);
        }
        let Some(held) = Held::take(&self.meta, LEASE, &self.holder, LEASE_TTL).await? else {
            return Err(EvictError::Busy);
        };
        let started = Instant::now();
        let result = self.evict(&held).await;
        held.release().await;
        let m = metrics();
        m.gc_runs.inc();
        m.gc_seconds.observe(started.elapsed().as_secs_f64());
        let report = result?;
        if let (Some(forgetter), Some(newest)) = (&self.forgetter, report.newest_ms) {
            forgetter.evicted_through(newest);
        }
        if report.removed > 0 || report.spared > 0 {
            tracing::info!(
                removed = report.removed,
                bytes = report.removed_bytes,
                spared = report.spared,
                pinned = report.pinned,
                stored = report.bytes - report.removed_bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "eviction pass"
            );
        }
        Ok(report)
    }

    async fn evict(&self, held: &Held) -> Result<Report, EvictError> {
        // This replica's own uses are in before the listing is read.
        self.uses.flush().await;
        let started_ms = now_ms();
        let inventory = self.inventory().await?;
        // Read after the listing: a store made while it ran is then
        // counted once (or, missed by the listing, set right next pass).
        let before = self.meta.add_usage(0, 0).await?;
        let count = inventory.blobs.len() as i64;
        // The shared count drifts (a blob stored twice, a removal nobody
        // counted): the listing sets it right, keeping what was added
        // meanwhile.
        let after = self
            .meta
            .add_usage(
                (inventory.bytes as i64).saturating_sub(before.0),
                count - before.1,
            )
            .await?;
        publish(after);
        self.forget_unlisted(&inventory, started_ms).await;
        let mut report = Report {
            blobs: inventory.blobs.len(),
            bytes: inventory.bytes,
            ..Report::default()
        };
        let victims = self.choose(&inventory, &mut report).await;
        drop(inventory);
        #[cfg(test)]
        if let Some(hook) = &self.hook {
            hook().await;
        }
        for batch in victims.chunks(BATCH) {
            if held.lost() {
                tracing::warn!("eviction lease lost: pass stopped");
                break;
            }
            let fenced = self.remove_batch(batch, held, &mut report).await?;
            if fenced {
                tracing::warn!("another process holds the eviction lease: pass stopped");
                break;
            }
        }
        Ok(report)
    }

    /// Claims a batch, waits for every replica's pending uses, and removes
    /// the blobs still unwanted, releasing each claim once its blob is
    /// dealt with. Whether the pass was fenced off (it then removes
    /// nothing more, not even what it claimed).
    async fn remove_batch(
        &self,
        batch: &[Victim],
        held: &Held,
        report: &mut Report,
    ) -> Result<bool, EvictError> {
        let mut claimed = Vec::with_capacity(batch.len());
        let claimed_at = Instant::now();
        for victim in batch {
            let removal = Removal {
                fence: LEASE,
                holder: &self.holder,
                digest: &victim.seen.digest,
                seen_ms: victim.seen.used_ms.unwrap_or(0),
                ttl: CLAIM_TTL,
            };
            match self.meta.claim_removal(&removal).await {
                Ok(Claimed::Yes) => claimed.push(victim),
                Ok(Claimed::Wanted) => report.spared += 1,
                Ok(Claimed::Fenced) => {
                    self.release(&claimed).await;
                    return Ok(true);
                }
                Err(e) => {
                    self.release(&claimed).await;
                    return Err(e.into());
                }
            }
        }
        if claimed.is_empty() {
            return Ok(false);
        }
        // A use noted anywhere before the claims is written within the log's
        // delay; one after them finds the blob until it is removed.
        tokio::time::sleep(self.uses.delay() + Duration::from_secs(1)).await;
        if held.lost() {
            self.release(&claimed).await;
            return Ok(true);
        }
        let digests: Vec<Digest> = claimed.iter().map(|v| v.seen.digest.clone()).collect();
        let used = match self.meta.last_uses(UseKind::Blobs, &digests).await {
            Ok(used) => used,
            Err(e) => {
                self.release(&claimed).await;
                return Err(e.into());
            }
        };
        let mut removed = Vec::new();
        for (victim, used) in claimed.iter().zip(used) {
            let seen = &victim.seen;
            let wanted = used.is_some_and(|u| u > seen.used_ms.unwrap_or(0));
            // Every request under a claim must end well before the claim
            // could lapse: past that, another replica may store the blob
            // again, and a late DELETE would remove the fresh copy.
            let left = (CLAIM_TTL / 2).checked_sub(claimed_at.elapsed());
            let outcome = match left {
                Some(left) if !wanted => tokio::time::timeout(left, self.remove(seen))
                    .await
                    .unwrap_or(Removed::OutOfTime),
                Some(_) => Removed::Wanted,
                None => Removed::OutOfTime,
            };
            self.release(&[*victim]).await;
            match outcome {
                Removed::Yes => {
                    metrics().cache_eviction(victim.reason, seen.size);
                    tracing::debug!(digest = %seen.digest, size = seen.size, reason = victim.reason, "evicted a blob");
                    report.removed += 1;
                    report.removed_bytes += seen.size;
                    report.oldest_ms.get_or_insert(seen.recency_ms());
                    // What is older went too (but pinned blobs); not so by
                    // age, where registries keep content for different
                    // ages.
                    if victim.reason != "age" {
                        report.newest_ms = report.newest_ms.max(Some(seen.recency_ms()));
                    }
                    removed.push(seen.digest.clone());
                    self.count_removed(seen.size).await;
                }
                Removed::Gone => {
                    removed.push(seen.digest.clone());
                    self.count_removed(seen.size).await;
                }
                Removed::Wanted | Removed::OutOfTime => report.spared += 1,
                Removed::Failed => {}
            }
        }
        for kind in [UseKind::Blobs, UseKind::BlobDeadlines] {
            if let Err(e) = self.meta.forget_uses(kind, &removed).await {
                tracing::debug!(error = %e, "cannot forget the uses of evicted blobs");
            }
        }
        Ok(false)
    }

    /// Removes a claimed blob unless it was written again since the
    /// listing (by a fetch that held no lease: that copy stays).
    async fn remove(&self, seen: &Seen) -> Removed {
        match self.store.written_at(&seen.digest).await {
            // Listings and HEAD answers date objects with different
            // precision (milliseconds, seconds): compare whole seconds.
            Ok(Some(written)) if whole_seconds(written) != whole_seconds(seen.written) => {
                return Removed::Wanted;
            }
            Ok(Some(_)) => {}
            Ok(None) => return Removed::Gone,
            Err(e) => {
                tracing::warn!(digest = %seen.digest, error = %e, "cannot look at a blob to evict");
                return Removed::Failed;
            }
        }
        match self.store.delete(&seen.digest).await {
            Ok(()) => Removed::Yes,
            Err(e) => {
                tracing::warn!(digest = %seen.digest, error = %e, "cannot remove an evicted blob");
                Removed::Failed
            }
        }
    }

    /// Forgets the uses of blobs the bucket no longer holds (removed by
    /// someone else, or served from a local copy after they went), so the
    /// uses stay bounded by what is stored. Uses newer than a minute
    /// before the listing may be of blobs stored since: they stay. So do
    /// the deadlines of blobs with a use left.
    async fn forget_unlisted(&self, inventory: &Inventory, listed_at_ms: u64) {
        let listed: HashSet<&Digest> = inventory.blobs.iter().map(|b| &b.digest).collect();
        let before = listed_at_ms.saturating_sub(60_000);
        if let Err(e) = self
            .forget_unlisted_of(UseKind::Blobs, before, &listed)
            .await
        {
            tracing::debug!(error = %e, "cannot forget old blob uses");
            return;
        }
        if self.budget.retention.per_registry()
            && let Err(e) = self
                .forget_unlisted_of(UseKind::BlobDeadlines, u64::MAX, &listed)
                .await
        {
            tracing::debug!(error = %e, "cannot forget old blob deadlines");
        }
    }

    async fn forget_unlisted_of(
        &self,
        kind: UseKind,
        before: u64,
        listed: &HashSet<&Digest>,
    ) -> Result<(), MetaError> {
        let mut skip = 0;
        loop {
            let page = self.meta.used_before(kind, before, skip, PAGE).await?;
            let len = page.len();
            let mut gone: Vec<Digest> = page.into_iter().filter(|d| !listed.contains(d)).collect();
            if kind != UseKind::Blobs {
                let used = self.meta.last_uses(UseKind::Blobs, &gone).await?;
                gone = gone
                    .into_iter()
                    .zip(used)
                    .filter_map(|(d, used)| used.is_none().then_some(d))
                    .collect();
            }
            skip += len - gone.len();
            self.meta.forget_uses(kind, &gone).await?;
            if len < PAGE {
                return Ok(());
            }
        }
    }

    async fn count_removed(&self, size: u64) {
        match self.meta.add_usage(-(size as i64), -1).await {
            Ok(usage) => publish(usage),
            Err(e) => tracing::debug!(error = %e, "cannot count an eviction"),
        }
    }

    async fn release(&self, claimed: &[&Victim]) {
        for victim in claimed {
            let lease = blob_lease(&victim.seen.digest);
            if let Err(e) = self.meta.release_lease(&lease, &self.holder).await {
                tracing::debug!(%lease, error = %e, "cannot release a blob's lease; it will lapse");
            }
        }
    }
}

/// What became of a claimed blob.
enum Removed {
    Yes,
    /// Already gone from the store.
    Gone,
    /// Used or written again since the decision.
    Wanted,
    /// The claim is too old to act under.
    OutOfTime,
    Failed,
}

fn whole_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Shows the shared usage in this replica's metrics.
pub fn publish((bytes, blobs): (i64, i64)) {
    let m = metrics();
    m.cache_bytes.set(bytes.max(0));
    m.cache_blobs.set(blobs.max(0));
}
