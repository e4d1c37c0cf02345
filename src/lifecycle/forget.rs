//! Forgetting the metadata of what is gone, so the metadata store does not
//! grow with the history of everything ever pulled: manifests not served
//! since a cutoff (the most recent use eviction removed, or `max_age`
//! ago), the tag records that named them, the links of repositories that
//! lost a manifest, and repositories left with none. Pinned repositories
//! keep theirs.
//!
//! A forgotten record is only a miss: a tag is resolved upstream again, a
//! manifest fetched again, a blob confirmed again.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::retention::Retention;
use super::uses::{FLUSH_EVERY, now_ms};
use crate::descriptors::references;
use crate::meta::Held;
use crate::meta::{MetaError, MetaStore, UseKind};
use crate::reference::Digest;
use crate::storage::{Evicted, Keep};

/// Records read per request.
const PAGE: usize = 1000;
/// How often some replica forgets what reached its age.
const PERIOD: Duration = Duration::from_secs(5 * 60);
/// Held while a pass runs.
const LEASE: &str = "lifecycle:forget";
const LEASE_TTL: Duration = Duration::from_secs(60);
/// Taken by the replica that ran the period's pass, and left to lapse.
const PERIOD_LEASE: &str = "lifecycle:forget-period";
/// Taken by the replica that gives old manifests a use, and left to lapse.
const ADOPT_LEASE: &str = "lifecycle:adopt";

/// What a pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub manifests: usize,
    pub tags: usize,
    pub links: usize,
    pub repositories: usize,
}

/// Runs passes: after evictions (from the most recent use they removed)
/// and, with an age, for what was not served that long.
pub struct Forgetter {
    meta: Arc<dyn MetaStore>,
    keep: Option<Arc<dyn Keep>>,
    retention: Retention,
    /// Uses older than this went with evicted blobs (Unix ms).
    horizon: AtomicU64,
    holder: String,
    wake: Notify,
}

impl Forgetter {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        keep: Option<Arc<dyn Keep>>,
        retention: Retention,
    ) -> Self {
        Self {
            meta,
            keep,
            retention,
            horizon: AtomicU64::new(0),
            holder: format!("{:016x} -", rand::random::<u64>()),
            wake: Notify::new(),
        }
    }

    /// What is forgotten now.
    fn cutoff(&self) -> Cutoff<'_> {
        Cutoff {
            evicted_ms: self.horizon.load(Ordering::Relaxed),
            retention: &self.retention,
            now_ms: now_ms(),
        }
    }

    /// Forgets at once after an eviction on this replica, and once a
    /// period on one replica what reached `max_age`.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            // Manifests stored before uses were kept get one now, so they
            // are forgotten like the others once unused (once a day on one
            // replica; records that have a use keep it).
            if self.lease(ADOPT_LEASE, Duration::from_secs(86_400)).await {
                match self.meta.adopt_manifests(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(manifests = n, "manifests without a recorded use given one")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot give manifests a use"),
                }
            }
            let mut done = 0;
            loop {
                let woken = tokio::select! {
                    () = self.wake.notified() => true,
                    () = tokio::time::sleep(PERIOD) => false,
                };
                if woken {
                    // Uses noted before the eviction reach the metadata
                    // store within a batch interval: wait for them.
                    tokio::time::sleep(FLUSH_EVERY + Duration::from_secs(1)).await;
                }
                let cutoff = self.cutoff();
                if cutoff.scan() <= done {
                    continue;
                }
                if !woken && !self.lease(PERIOD_LEASE, PERIOD).await {
                    continue;
                }
                let held = match Held::take(&self.meta, LEASE, &self.holder, LEASE_TTL).await {
                    Ok(Some(held)) => held,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot take the forget lease");
                        continue;
                    }
                };
                match forget(self.meta.as_ref(), self.keep.as_deref(), &cutoff).await {
                    Ok(f) => {
                        done = cutoff.scan();
                        if f != Forgotten::default() {
                            tracing::info!(
                                manifests = f.manifests,
                                tags = f.tags,
                                links = f.links,
                                repositories = f.repositories,
                                "forgot the metadata of content no longer cached"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot forget old metadata"),
                }
                held.release().await;
            }
        });
    }

    async fn lease(&self, name: &str, ttl: Duration) -> bool {
        match self.meta.acquire_lease(name, &self.holder, ttl).await {
            Ok(None) => true,
            Ok(Some(_)) => false,
            Err(e) => {
                tracing::debug!(lease = name, error = %e, "cannot take a lease");
                false
            }
        }
    }
}

impl Evicted for Forgetter {
    /// Eviction removed blobs last used at `ms`: what was used no later
    /// than that is gone from the store.
    fn evicted_through(&self, ms: u64) {
        if self.horizon.fetch_max(ms, Ordering::Relaxed) < ms {
            self.wake.notify_one();
        }
    }
}

/// What a pass forgets: manifests last used before `evicted_ms` (eviction
/// removed blobs used that late), and those past their age at `now_ms`.
pub struct Cutoff<'a> {
    pub evicted_ms: u64,
    pub retention: &'a Retention,
    pub now_ms: u64,
}

impl Cutoff<'_> {
    /// Manifests used since this (Unix ms) stay.
    fn scan(&self) -> u64 {
        self.retention
            .horizon(self.now_ms)
            .unwrap_or(0)
            .max(self.evicted_ms)
    }

    /// Of `page` (used before `scan`), which to forget.
    async fn expired(&self, meta: &dyn MetaStore, page: &[Digest]) -> Result<Vec<bool>, MetaError> {
        if !self.retention.per_registry() {
            // Before `scan` is past the one age, or before eviction's reach.
            return Ok(vec![true; page.len()]);
        }
        let used = meta.last_uses(UseKind::Manifests, page).await?;
        let deadlines = meta.last_uses(UseKind::ManifestDeadlines, page).await?;
        Ok(used
            .into_iter()
            .zip(deadlines)
            .map(|(used, deadline)| {
                let used = used.unwrap_or(0);
                used < self.evicted_ms || self.retention.expired(deadline, used, self.now_ms)
            })
            .collect())
    }
}

/// One pass: forgets what `cutoff` says is gone or expired.
pub async fn forget(
    meta: &dyn MetaStore,
    keep: Option<&dyn Keep>,
    cutoff: &Cutoff<'_>,
) -> Result<Forgotten, MetaError> {
    let mut report = Forgotten::default();
    let mut gone: HashSet<Digest> = HashSet::new();
    let before_ms = cutoff.scan();
    // Manifests kept by a longer age stay in the uses: step over them.
    let mut skip = 0;
    loop {
        let page = meta
            .used_before(UseKind::Manifests, before_ms, skip, PAGE)
            .await?;
        let len = page.len();
        let expired = cutoff.expired(meta, &page).await?;
        let (mut candidates, mut pinned) = (Vec::new(), Vec::new());
        for (digest, expired) in page.into_iter().zip(expired) {
            if !expired {
                continue;
            }
            if kept(keep, &digest).await {
                pinned.push(digest);
            } else {
                candidates.push(digest);
            }
        }
        let removed = meta.forget_manifests(&candidates, before_ms).await?;
        // A pinned manifest, or a use with no record behind it, needs no
        // use kept: the next serve records one.
        let left: Vec<Digest> = candidates
            .into_iter()
            .filter(|d| !removed.contains(d))
            .collect();
        let stored = meta.has_manifests(&left).await?;
        let mut dropped = pinned;
        dropped.extend(
            left.into_iter()
                .zip(stored)
                .filter_map(|(d, stored)| (!stored).then_some(d)),
        );
        meta.forget_uses(UseKind::Manifests, &dropped).await?;
        dropped.extend(removed.iter().cloned());
        meta.forget_uses(UseKind::ManifestDeadlines, &dropped)
            .await?;
        skip += len - dropped.len();
        report.manifests += removed.len();
        gone.extend(removed);
        if len < PAGE {
            break;
        }
    }
    let mut after: Option<String> = None;
    loop {
        let repos = meta.repositories(after.as_deref(), PAGE).await?;
        for repo in &repos {
            if keep.is_some_and(|k| k.keeps_repository(repo)) {
                continue;
            }
            forget_in(meta, repo, &gone, &mut report).await?;
        }
        if repos.len() < PAGE {
            break;
        }
        after = repos.last().cloned();
    }
    Ok(report)
}

async fn kept(keep: Option<&dyn Keep>, digest: &Digest) -> bool {
    match keep {
        Some(keep) => keep.keep(digest).await,
        None => false,
    }
}

/// Drops a repository's tag records that name no stored manifest; its
/// links, when one of its manifests was forgotten, down to what the
/// remaining manifests name; and the repository itself when none remain.
async fn forget_in(
    meta: &dyn MetaStore,
    repo: &str,
    gone: &HashSet<Digest>,
    report: &mut Forgotten,
) -> Result<(), MetaError> {
    let links = meta.links(repo).await?;
    let stored = meta.has_manifests(&links).await?;
    let manifests: Vec<&Digest> = links
        .iter()
        .zip(&stored)
        .filter_map(|(d, s)| s.then_some(d))
        .collect();
    if manifests.is_empty() {
        // A pull may have stored a manifest here since the look: then the
        // repository stays.
        let now = meta.links(repo).await?;
        if now.len() != links.len() || meta.has_manifests(&now).await?.contains(&true) {
            return Ok(());
        }
        report.tags += meta.tags(repo).await?.len();
        report.links += links.len();
        report.repositories += 1;
        return meta.forget_repository(repo).await;
    }
    let named: HashSet<String> = manifests.iter().map(|d| d.to_string()).collect();
    for tag in meta.tags(repo).await? {
        let points_at_one = match meta.tag(repo, &tag).await {
            Ok(record) => record.is_some_and(|r| named.contains(&r.digest)),
            // A record that cannot be read serves nobody.
            Err(MetaError::Corrupt(_)) => false,
            Err(e) => return Err(e),
        };
        if !points_at_one {
            meta.delete_tag(repo, &tag).await?;
            report.tags += 1;
        }
    }
    if !links.iter().any(|d| gone.contains(d)) {
        return Ok(());
    }
    let mut wanted: HashSet<Digest> = manifests.iter().map(|d| (*d).clone()).collect();
    for digest in &manifests {
        if let Some(manifest) = meta.manifest(digest).await? {
            wanted.extend(references(&manifest.bytes).linked);
        }
    }
    // What a manifest stored here since the look names stays too.
    let now = meta.links(repo).await?;
    let before: HashSet<&Digest> = links.iter().collect();
    let added: Vec<Digest> = now
        .iter()
        .filter(|d| !before.contains(d))
        .cloned()
        .collect();
    for (digest, stored) in added.iter().zip(meta.has_manifests(&added).await?) {
        wanted.insert(digest.clone());
        if stored && let Some(manifest) = meta.manifest(digest).await? {
            wanted.extend(references(&manifest.bytes).linked);
        }
    }
    let unwanted: Vec<Digest> = now.into_iter().filter(|d| !wanted.contains(d)).collect();
    report.links += unwanted.len();
    meta.unlink(repo, &unwanted).await
}
