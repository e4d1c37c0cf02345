//! The fs store within a budget: `[cache] max_size` bytes of blobs at most,
//! and `[cache] min_free` of its filesystem left free. Past either, the
//! least recently *served* blobs go. Upstream holds every blob, so an
//! evicted blob is only a miss, fetched again (once) when next asked for.
//!
//! Recency lives in the files themselves: a blob served has its
//! modification time set to now, in batches, so a restart finds the order
//! again from `stat` alone, without reading any blob's bytes.
//!
//! Why eviction never breaks a pull:
//! - a blob being read when it is removed keeps its bytes (an open file
//!   outlives its name), so a stream in progress finishes;
//! - a request that finds it gone fetches it again: a miss, not an error;
//! - storing a blob and removing an evicted one take the same lock, and a
//!   blob stored again after eviction chose it is left alone, so a fresh
//!   copy is never removed.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::fs::free_space;
use super::lru::Lru;
use super::{BlobBody, BlobStore, FsBlobStore, StorageError};
use crate::config::MinFree;
use crate::range::RangeSpec;
use crate::reference::Digest;
use crate::telemetry::metrics::metrics;

/// How often uses are written to the files, and free space is checked
/// (other programs fill disks too).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

/// What the store may take of its disk, and how it checks what it holds.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub max_size: Option<u64>,
    pub min_free: MinFree,
    /// Blobs not served for this long go, whatever the size; with an
    /// `Expiry`, it says which of them.
    pub max_age: Option<Duration>,
    pub scrub: Option<Scrub>,
}

/// Every blob is hashed again each `interval`, reading at most `rate` bytes
/// a second.
#[derive(Clone, Copy, Debug)]
pub struct Scrub {
    pub interval: Duration,
    pub rate: u64,
}

/// Told how far eviction reached: it removed a blob last used at a Unix
/// time in ms (what is older is gone too, but for pinned blobs).
pub trait Evicted: Send + Sync {
    fn evicted_through(&self, ms: u64);
}

/// Says which blobs eviction must spare (pinned images').
#[async_trait]
pub trait Keep: Send + Sync {
    async fn keep(&self, digest: &Digest) -> bool;

    /// Whether the metadata of `repo` (`<registry>/<repository>`) is kept.
    fn keeps_repository(&self, _repo: &str) -> bool {
        false
    }
}

/// Decides which blobs past `Budget::max_age` have expired, where
/// registries keep content for ages of their own.
#[async_trait]
pub trait Expiry: Send + Sync {
    /// Of blobs last used at the given times, which have expired.
    async fn expired(&self, blobs: &[(Digest, SystemTime)]) -> Vec<bool>;

    /// The blobs left the store: what was kept about them goes too.
    async fn removed(&self, digests: &[Digest]);
}

pub struct BudgetedFsStore {
    shared: Arc<Shared>,
}

struct Shared {
    files: FsBlobStore,
    root: PathBuf,
    budget: Budget,
    keep: Option<Arc<dyn Keep>>,
    evicted: std::sync::OnceLock<Arc<dyn Evicted>>,
    expiry: std::sync::OnceLock<Arc<dyn Expiry>>,
    index: Mutex<Index>,
    /// Held while a blob is put in place and while an evicted one is
    /// removed.
    placing: tokio::sync::Mutex<()>,
    /// Held by the one eviction that runs at a time.
    evicting: tokio::sync::Mutex<()>,
}

struct Index {
    /// Every stored blob, by last use.
    blobs: Lru<Digest>,
    /// Served since the last write of uses to the files.
    used: HashSet<Digest>,
    /// Removed since `Expiry` was last told.
    removed: Vec<Digest>,
}

impl BudgetedFsStore {
    /// Opens the fs store under `root` and finds what it holds; brings it
    /// within `budget` at once if it is over.
    pub async fn open(
        root: &Path,
        budget: Budget,
        keep: Option<Arc<dyn Keep>>,
    ) -> io::Result<Self> {
        let files = FsBlobStore::open(root).await?;
        let dir = root.to_owned();
        let found = tokio::task::spawn_blocking(move || super::fs::blobs_in(&dir))
            .await
            .map_err(io::Error::other)??;
        let mut blobs = Lru::new(u64::MAX);
        for (digest, size) in found {
            blobs.insert(digest, size);
        }
        tracing::info!(
            blobs = blobs.len(),
            bytes = blobs.used(),
            max_size = budget.max_size,
            "blob store ready"
        );
        let shared = Arc::new(Shared {
            files,
            root: root.to_owned(),
            budget,
            keep,
            evicted: std::sync::OnceLock::new(),
            expiry: std::sync::OnceLock::new(),
            index: Mutex::new(Index {
                blobs,
                used: HashSet::new(),
                removed: Vec::new(),
            }),
            placing: tokio::sync::Mutex::new(()),
            evicting: tokio::sync::Mutex::new(()),
        });
        shared.publish();
        tokio::spawn(housekeeping(Arc::downgrade(&shared)));
        if let Some(scrub) = budget.scrub {
            tokio::spawn(scrubbing(Arc::downgrade(&shared), scrub));
        }
        Shared::evict_if_over(&shared);
        Ok(Self { shared })
    }

    /// Tells `to` how far each eviction by size, free space or age reached.
    pub fn report_evictions_to(&self, to: Arc<dyn Evicted>) {
        let _ = self.shared.evicted.set(to);
    }

    /// Lets `expiry` decide which blobs past `max_age` go.
    pub fn judge_age_by(&self, expiry: Arc<dyn Expiry>) {
        let _ = self.shared.expiry.set(expiry);
    }

    /// Bytes and blobs held now.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.shared.index();
        (index.blobs.used(), index.blobs.len())
    }

    /// Brings the store within its budget now, by size and free space,
    /// then by age; the bytes removed.
    pub async fn evict(&self) -> u64 {
        let mut removed = self.shared.evict().await;
        if let Some(max_age) = self.shared.budget.max_age {
            removed += self.shared.evict_aged(max_age).await;
        }
        self.shared.report_removed().await;
        removed
    }

    /// Writes the uses recorded so far to the files.
    pub async fn record_uses(&self) {
        self.shared.record_uses().await;
    }

    /// Hashes every stored blob again, reading at most `rate` bytes a
    /// second, and removes those that no longer match; how many it removed.
    pub async fn scrub(&self, rate: u64) -> usize {
        self.shared.scrub(rate).await
    }
}

/// Scrubs the store every interval, until it is dropped.
async fn scrubbing(shared: Weak<Shared>, scrub: Scrub) {
    loop {
        tokio::time::sleep(scrub.interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.scrub(scrub.rate).await;
    }
}

/// Records uses and keeps free space, until the store is dropped; now and
/// then checks the index against the files (`pier gc` may have run).
async fn housekeeping(shared: Weak<Shared>) {
    let mut rounds = 0u32;
    loop {
        tokio::time::sleep(HOUSEKEEPING_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.record_uses().await;
        if let Some(max_age) = shared.budget.max_age {
            shared.evict_aged(max_age).await;
        }
        shared.report_removed().await;
        rounds += 1;
        if rounds.is_multiple_of(RECONCILE_EVERY_ROUNDS)
            && let Err(e) = shared.reconcile().await
        {
            tracing::warn!(error = %e, "cannot check the blob store's files");
        }
        Shared::evict_if_over(&shared);
    }
}

/// Housekeeping rounds between two checks of the index against the files.
const RECONCILE_EVERY_ROUNDS: u32 = 20;

/// What a store directory holds, read from names and `stat` alone: for
/// `pier cache stats` and `pier gc`, beside a running replica or not.
pub struct Survey {
    /// (last use, digest, size), least recently used first.
    pub blobs: Vec<(SystemTime, Digest, u64)>,
    /// Free and total bytes of its filesystem.
    pub free: u64,
    pub total: u64,
}

impl Survey {
    /// Reads the store under `root`. Blocking.
    pub fn of(root: &Path) -> io::Result<Survey> {
        let blobs = super::fs::blobs_by_time(root, false)?;
        let (free, total) = free_space(root)?;
        Ok(Survey { blobs, free, total })
    }

    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, _, s)| s).sum()
    }

    /// The blobs to remove to bring the store within `budget`, least
    /// recently used first, as a running store would choose them.
    pub fn over_budget(&self, budget: &Budget) -> &[(SystemTime, Digest, u64)] {
        let need =
            to_free(budget, self.bytes(), Some((self.free, self.total))).map_or(0, |(n, _)| n);
        let mut freed = 0;
        let for_bytes = self
            .blobs
            .iter()
            .take_while(|(_, _, size)| {
                let more = freed < need;
                freed += size;
                more
            })
            .count();
        let cutoff = budget
            .max_age
            .and_then(|age| SystemTime::now().checked_sub(age));
        let aged = cutoff.map_or(0, |cutoff| {
            self.blobs
                .iter()
                .take_while(|(at, ..)| *at < cutoff)
                .count()
        });
        &self.blobs[..for_bytes.max(aged)]
    }

    /// Removes `victims` from the store under `root`, each only if it was
    /// not used (or stored again) since the survey; the count and bytes
    /// removed. Blocking.
    pub fn remove(root: &Path, victims: &[(SystemTime, Digest, u64)]) -> (usize, u64) {
        let files = FsBlobStore::at(root);
        let (mut count, mut bytes) = (0, 0);
        for (at, digest, size) in victims {
            let path = files.path_of(digest);
            let unchanged = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|now| now == *at);
            if unchanged && std::fs::remove_file(&path).is_ok() {
                count += 1;
                bytes += size;
            }
        }
        (count, bytes)
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self) {
        let (bytes, count) = {
            let index = self.index();
            (index.blobs.used(), index.blobs.len())
        };
        let m = metrics();
        m.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        m.cache_blobs.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Bytes to remove now, and why: down to 90 % of `max_size` once past
    /// it, or to a tenth more than `min_free` once free space is below it.
    fn excess(&self) -> Option<(u64, &'static str)> {
        let used = self.index().blobs.used();
        let space = free_space(&self.root)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot tell the blob store's free space"))
            .ok();
        to_free(&self.budget, used, space)
    }

    /// Starts an eviction in the background when the store is over budget
    /// and none runs.
    fn evict_if_over(this: &Arc<Self>) {
        if this.excess().is_some() && this.evicting.try_lock().is_ok() {
            let this = this.clone();
            tokio::spawn(async move { this.evict().await });
        }
    }

    /// Removes least recently used blobs until the store is within budget,
    /// after any eviction running now; the bytes removed.
    async fn evict(&self) -> u64 {
        let _one = self.evicting.lock().await;
        let _pass = Pass::start();
        let mut removed = 0;
        while let Some((excess, reason)) = self.excess() {
            let mut freed = 0;
            // Pinned blobs go back as the most recent; once every blob was
            // looked at, the rest is pinned.
            let mut left = self.index().blobs.len();
            while freed < excess && left > 0 {
                left -= 1;
                let Some((digest, size)) = self.index().blobs.pop_oldest() else {
                    break;
                };
                if self.kept(&digest).await {
                    self.index().blobs.insert(digest, size);
                    continue;
                }
                let _placing = self.placing.lock().await;
                // Stored again since it was chosen: that copy stays.
                if self.index().blobs.contains(&digest) {
                    continue;
                }
                if self.remove(&digest, size, reason).await {
                    freed += size;
                }
            }
            self.publish();
            removed += freed;
            if freed == 0 {
                break;
            }
        }
        if removed > 0 {
            tracing::info!(bytes = removed, "evicted the least recently served blobs");
        }
        removed
    }

    /// Removes the blobs not served for `max_age` (those of them `Expiry`
    /// says expired, with one), least recently used first, as long as their
    /// files' times (uses recorded) say so.
    async fn evict_aged(&self, max_age: Duration) -> u64 {
        const PAGE: usize = 256;
        let _pass = Pass::start();
        let Some(cutoff) = SystemTime::now().checked_sub(max_age) else {
            return 0;
        };
        let mut removed = 0;
        let mut after = None;
        let mut recent = false;
        while !recent {
            // A page at a time: eviction for room goes between pages.
            let _one = self.evicting.lock().await;
            let page = self.index().blobs.oldest_after(after, PAGE);
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            // (digest, last use recorded, size) of the blobs past the cutoff.
            let mut old = Vec::new();
            for (_, digest) in page {
                match self.last_use(&digest) {
                    // Served since its time was written: not old.
                    _ if self.index().used.contains(&digest) => {}
                    Some((used_at, _)) if used_at >= cutoff => {
                        recent = true;
                        break;
                    }
                    Some((used_at, size)) => old.push((digest, used_at, size)),
                    // Gone behind the index's back: forget it.
                    None => {
                        self.index().blobs.remove(&digest);
                    }
                }
            }
            let expired = match self.expiry.get() {
                Some(expiry) => {
                    let times: Vec<_> = old.iter().map(|(d, t, _)| (d.clone(), *t)).collect();
                    expiry.expired(&times).await
                }
                None => vec![true; old.len()],
            };
            for ((digest, used_at, size), expired) in old.into_iter().zip(expired) {
                if !expired || self.kept(&digest).await {
                    continue;
                }
                let _placing = self.placing.lock().await;
                // Served or stored again since the look: it stays.
                let unchanged = self
                    .last_use(&digest)
                    .is_some_and(|(now, _)| now == used_at);
                if !unchanged || self.index().used.contains(&digest) {
                    continue;
                }
                if self.remove(&digest, size, "age").await {
                    removed += size;
                }
            }
        }
        if removed > 0 {
            self.publish();
            tracing::info!(bytes = removed, max_age = %humantime::format_duration(max_age), "removed blobs not served for their max_age");
        }
        removed
    }

    /// Notes a blob that left the store, for `Expiry`.
    fn gone(&self, digest: &Digest) {
        if self.expiry.get().is_some() {
            self.index().removed.push(digest.clone());
        }
    }

    /// Tells `Expiry` which blobs left the store.
    async fn report_removed(&self) {
        if let Some(expiry) = self.expiry.get() {
            let removed = std::mem::take(&mut self.index().removed);
            if !removed.is_empty() {
                expiry.removed(&removed).await;
            }
        }
    }

    /// A stored blob's last use recorded (its file's time) and size.
    fn last_use(&self, digest: &Digest) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(self.files.path_of(digest)).ok()?;
        Some((
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        ))
    }

    /// Removes a blob eviction chose, for `reason`; whether it did. The
    /// caller holds `placing`.
    async fn remove(&self, digest: &Digest, size: u64, reason: &'static str) -> bool {
        {
            let mut index = self.index();
            index.blobs.remove(digest);
            index.used.remove(digest);
        }
        // Its file's time is its last use recorded. What is older went
        // too, but for pinned blobs; not so by age, where registries keep
        // content for different ages (their metadata goes by the same
        // rule).
        if !matches!(reason, "corrupt" | "age")
            && let Some(to) = self.evicted.get()
            && let Ok(used) =
                std::fs::metadata(self.files.path_of(digest)).and_then(|m| m.modified())
            && let Ok(ms) = used.duration_since(SystemTime::UNIX_EPOCH)
        {
            to.evicted_through(u64::try_from(ms.as_millis()).unwrap_or(u64::MAX));
        }
        match self.files.delete(digest).await {
            Ok(()) => {
                self.gone(digest);
                metrics().cache_eviction(reason, size);
                tracing::debug!(%digest, size, reason, "evicted a blob");
                true
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, reason, "cannot remove an evicted blob");
                false
            }
        }
    }

    async fn kept(&self, digest: &Digest) -> bool {
        match &self.keep {
            Some(keep) => keep.keep(digest).await,
            None => false,
        }
    }

    /// Makes the index agree with the files: blobs removed behind its back
    /// are forgotten, files it lacks are counted.
    async fn reconcile(&self) -> io::Result<()> {
        let root = self.root.clone();
        let on_disk = tokio::task::spawn_blocking(move || super::fs::blobs_by_time(&root, false))
            .await
            .map_err(io::Error::other)??;
        let _placing = self.placing.lock().await;
        let listed: HashSet<&Digest> = on_disk.iter().map(|(_, d, _)| d).collect();
        let indexed = self.index().blobs.keys();
        for digest in indexed.into_iter().filter(|d| !listed.contains(d)) {
            if matches!(self.files.stat(&digest).await, Ok(None)) {
                self.index().blobs.remove(&digest);
            }
        }
        {
            let mut index = self.index();
            for (_, digest, size) in &on_disk {
                if !index.blobs.contains(digest) {
                    index.blobs.insert(digest.clone(), *size);
                }
            }
        }
        self.publish();
        Ok(())
    }

    async fn scrub(&self, rate: u64) -> usize {
        let digests = self.index().blobs.keys();
        let mut removed = 0;
        for digest in digests {
            let (path, d) = (self.files.path_of(&digest), digest.clone());
            let checked = tokio::task::spawn_blocking(move || hash_matches(&path, &d, rate)).await;
            let inode = match checked {
                Ok(Ok(Checked::Corrupt(inode))) => inode,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::warn!(%digest, error = %e, "cannot scrub a blob");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "scrubbing failed");
                    continue;
                }
            };
            let _placing = self.placing.lock().await;
            // Stored again (whole) while it was read: that copy stays.
            let path = self.files.path_of(&digest);
            let size = match std::fs::metadata(&path) {
                Ok(m) if std::os::unix::fs::MetadataExt::ino(&m) == inode => m.len(),
                _ => continue,
            };
            if self.remove(&digest, size, "corrupt").await {
                removed += 1;
                tracing::error!(%digest, "a stored blob no longer matches its digest: removed");
            }
        }
        self.publish();
        tracing::info!(removed, "scrub done");
        removed
    }

    /// Sets the modification time of the blobs served since the last call
    /// to now: the order a restart finds them in.
    async fn record_uses(&self) {
        let used: Vec<PathBuf> = {
            let mut index = self.index();
            let used = std::mem::take(&mut index.used);
            used.iter().map(|d| self.files.path_of(d)).collect()
        };
        if used.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let written = tokio::task::spawn_blocking(move || {
            for path in used {
                // Evicted meanwhile: nothing to record.
                if let Ok(file) = std::fs::File::open(&path)
                    && let Err(e) = file.set_modified(now)
                {
                    tracing::debug!(path = %path.display(), error = %e, "cannot record a use");
                }
            }
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "recording uses failed");
        }
    }
}

/// An eviction pass, counted in the metrics when it ends.
struct Pass(std::time::Instant);

impl Pass {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let m = metrics();
        m.gc_runs.inc();
        m.gc_seconds.observe(self.0.elapsed().as_secs_f64());
    }
}

/// What hashing a stored blob again found.
enum Checked {
    Whole,
    Gone,
    /// The file (this inode) does not hash to its digest.
    Corrupt(u64),
}

/// Hashes the blob file at `path`, reading at most `rate` bytes a second.
/// Blocking.
fn hash_matches(path: &Path, digest: &Digest, rate: u64) -> io::Result<Checked> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = match std::fs::File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Checked::Gone),
        other => other?,
    };
    let inode = file.metadata()?.ino();
    let mut hasher = crate::reference::Hasher::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    let (started, mut read) = (std::time::Instant::now(), 0u64);
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
        metrics().scrub_bytes.inc_by(n as u64);
        let due = Duration::from_secs_f64(read as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(if hasher.finish() == *digest {
        Checked::Whole
    } else {
        Checked::Corrupt(inode)
    })
}

/// Bytes to remove from a store holding `used` bytes, on a filesystem with
/// `space` (free, total) bytes, and why: down to 90 % of `max_size` once
/// past it, or to a tenth more than `min_free` once free space is below it.
/// What a running store and `pier gc` both decide by.
fn to_free(budget: &Budget, used: u64, space: Option<(u64, u64)>) -> Option<(u64, &'static str)> {
    let over_size = budget
        .max_size
        .filter(|&max| used > max)
        .map(|max| used - max / 10 * 9);
    let short_of_space =
        space.and_then(|(free, total)| short_of_space(budget.min_free, free, total));
    match (over_size, short_of_space) {
        (Some(a), Some(b)) if b > a => Some((b, "free")),
        (Some(a), _) => Some((a, "size")),
        (None, Some(b)) => Some((b, "free")),
        (None, None) => None,
    }
}

/// Bytes to remove from a filesystem with `free` of `total` bytes free to
/// keep `min_free`: to a tenth more than it once below it, so removal does
/// not run on every write.
pub(super) fn short_of_space(min_free: MinFree, free: u64, total: u64) -> Option<u64> {
    let keep = min_free.bytes(total);
    (free < keep).then(|| keep + keep / 10 - free)
}

#[async_trait]
impl BlobStore for BudgetedFsStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.shared.files.stat(digest).await
    }

    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        let body = self.shared.files.get(digest, range).await?;
        if body.is_some() {
            let mut index = self.shared.index();
            // A warm read: no allocation once the blob's use is noted.
            if index.blobs.touch(digest) && !index.used.contains(digest) {
                index.used.insert(digest.clone());
            }
        }
        Ok(body)
    }

    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
        {
            let _placing = self.shared.placing.lock().await;
            self.shared.files.store(digest, spool, size).await?;
            self.shared.index().blobs.insert(digest.clone(), size);
        }
        self.shared.publish();
        Shared::evict_if_over(&self.shared);
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        let _placing = self.shared.placing.lock().await;
        self.shared.files.delete(digest).await?;
        self.shared.index().blobs.remove(digest);
        self.shared.gone(digest);
        self.shared.publish();
        Ok(())
    }

    async fn health(&self) -> Result<(), StorageError> {
        self.shared.files.health().await
    }

    async fn record_uses(&self) {
        self.shared.record_uses().await;
    }

    fn make_room(&self) {
        Shared::evict_if_over(&self.shared);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn budget(max: u64) -> Budget {
        Budget {
            max_size: Some(max),
            min_free: MinFree::Bytes(0),
            max_age: None,
            scrub: None,
        }
    }

    async fn put(store: &BudgetedFsStore, dir: &Path, seed: u8, size: usize) -> Digest {
        let bytes = vec![seed; size];
        let digest = Digest::sha256_of(&bytes);
        let spool = dir.join(format!("spool-{seed}"));
        std::fs::write(&spool, &bytes).unwrap();
        store.store(&digest, &spool, size as u64).await.unwrap();
        digest
    }

    #[tokio::test]
    async fn budgeted_store_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = BudgetedFsStore::open(&dir.path().join("store"), budget(1 << 30), None)
            .await
            .unwrap();
        crate::storage::suite::run(&store, &dir.path().join("store/tmp")).await;
    }

    /// The least recently served go first, down to 90 % of the budget, and
    /// a restart finds the same order from the files' times.
    #[tokio::test]
    async fn the_least_recently_served_go_first_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(1_000_000), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let mut blobs = Vec::new();
        for seed in 0..3 {
            blobs.push(put(&store, &root.join("tmp"), seed, 300_000).await);
            // Distinct modification times for the order at a restart.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first is served: it becomes the most recent.
        store.get(&blobs[0], None).await.unwrap().unwrap();
        store.record_uses().await;
        drop(store);

        let store = BudgetedFsStore::open(&root, budget(1_000_000), None)
            .await
            .unwrap();
        assert_eq!(store.usage(), (900_000, 3));
        let fourth = put(&store, &root.join("tmp"), 3, 300_000).await;
        // The eviction the store started, or this one after it.
        store.evict().await;
        // 1.2 MB held against 1 MB: down to 900 kB, the oldest first.
        assert_eq!(store.usage(), (900_000, 3));
        assert_eq!(store.stat(&blobs[1]).await.unwrap(), None);
        for kept in [&blobs[0], &blobs[2], &fourth] {
            assert_eq!(store.stat(kept).await.unwrap(), Some(300_000));
        }
    }

    /// Eviction chose a blob, and before it removed it the blob was stored
    /// again (a fetch committed it anew): the fresh copy stays.
    #[tokio::test]
    async fn a_blob_stored_again_after_eviction_chose_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(1_500_000), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let first = put(&store, &root.join("tmp"), 1, 1_000_000).await;
        // Commits are held back while the next one takes the store over
        // budget, so the eviction chooses the first and waits.
        let placing = store.shared.placing.lock().await;
        let second = vec![2u8; 1_000_000];
        let second_digest = Digest::sha256_of(&second);
        std::fs::write(root.join("tmp/second"), &second).unwrap();
        store
            .shared
            .files
            .store(&second_digest, &root.join("tmp/second"), 1_000_000)
            .await
            .unwrap();
        store
            .shared
            .index()
            .blobs
            .insert(second_digest.clone(), 1_000_000);
        let evicting = {
            let shared = store.shared.clone();
            tokio::spawn(async move { shared.evict().await })
        };
        while store.shared.index().blobs.contains(&first) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Chosen. Now the first is committed again, as a fetch would.
        std::fs::write(root.join("tmp/again"), vec![1u8; 1_000_000]).unwrap();
        store
            .shared
            .files
            .store(&first, &root.join("tmp/again"), 1_000_000)
            .await
            .unwrap();
        store.shared.index().blobs.insert(first.clone(), 1_000_000);
        drop(placing);
        evicting.await.unwrap();
        assert_eq!(store.stat(&first).await.unwrap(), Some(1_000_000));
        let body = store.get(&first, None).await.unwrap().unwrap();
        assert_eq!(body.size, 1_000_000);
    }

    /// A blob whose file rotted is found by the scrub and removed; whole
    /// ones stay.
    #[tokio::test]
    async fn the_scrub_removes_a_blob_with_a_flipped_byte() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(1 << 30), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let good = put(&store, &root.join("tmp"), 1, 300_000).await;
        let rotten = put(&store, &root.join("tmp"), 2, 300_000).await;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(store.shared.files.path_of(&rotten))
            .unwrap();
        file.write_all_at(&[3], 150_000).unwrap();
        assert_eq!(store.scrub(100 << 20).await, 1);
        assert_eq!(store.stat(&rotten).await.unwrap(), None);
        assert_eq!(store.stat(&good).await.unwrap(), Some(300_000));
        assert_eq!(store.usage(), (300_000, 1));
        assert_eq!(store.scrub(100 << 20).await, 0);
    }

    /// `pier gc` picks what a running store would, and removes nothing a
    /// store used (or stored) since its survey; the store then counts only
    /// the files left.
    #[tokio::test]
    async fn a_survey_plans_what_eviction_would_and_the_store_reconciles() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(u64::MAX), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let mut blobs = Vec::new();
        for seed in 0..4 {
            blobs.push(put(&store, &root.join("tmp"), seed, 100_000).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let survey = Survey::of(&root).unwrap();
        assert_eq!((survey.bytes(), survey.blobs.len()), (400_000, 4));
        // 250 kB allowed: down to 225 kB, so two go, the oldest.
        let victims = survey.over_budget(&budget(250_000));
        let chosen: Vec<&Digest> = victims.iter().map(|(_, d, _)| d).collect();
        assert_eq!(chosen, [&blobs[0], &blobs[1]]);
        // The second is served meanwhile: it stays.
        store.get(&blobs[1], None).await.unwrap().unwrap();
        store.record_uses().await;
        assert_eq!(Survey::remove(&root, victims), (1, 100_000));
        assert_eq!(store.stat(&blobs[0]).await.unwrap(), None);
        assert_eq!(store.usage(), (400_000, 4));
        store.shared.reconcile().await.unwrap();
        assert_eq!(store.usage(), (300_000, 3));
    }

    /// Blobs not served for `max_age` go, by the times their files keep;
    /// one served since stays.
    #[tokio::test]
    async fn blobs_not_served_for_max_age_go() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(u64::MAX), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let mut blobs = Vec::new();
        for seed in 0..3 {
            blobs.push(put(&store, &root.join("tmp"), seed, 1000).await);
        }
        let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
        for d in &blobs[..2] {
            let file = std::fs::File::open(store.shared.files.path_of(d)).unwrap();
            file.set_modified(two_days_ago).unwrap();
        }
        drop(store);
        let store = BudgetedFsStore::open(&root, budget(u64::MAX), None)
            .await
            .unwrap();
        // The second is served now: its use is not written yet, it stays.
        store.get(&blobs[1], None).await.unwrap().unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(store.shared.evict_aged(day).await, 1000);
        assert_eq!(store.stat(&blobs[0]).await.unwrap(), None);
        assert_eq!(store.usage(), (2000, 2));
        store.record_uses().await;
        assert_eq!(store.shared.evict_aged(day).await, 0);
        assert_eq!(store.usage(), (2000, 2));
    }

    /// A blob being read when it is evicted is read to its end.
    #[tokio::test]
    async fn a_read_in_progress_outlives_eviction() {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget(1_500_000), None)
            .await
            .unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let first = put(&store, &root.join("tmp"), 1, 1_000_000).await;
        let body = store.get(&first, None).await.unwrap().unwrap();
        put(&store, &root.join("tmp"), 2, 1_000_000).await;
        store.evict().await;
        assert_eq!(store.stat(&first).await.unwrap(), None);
        let chunks: Vec<bytes::Bytes> = body.stream.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), vec![1u8; 1_000_000]);
    }
}
