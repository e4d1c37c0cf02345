//! Syncing one image: its manifest (and, for an index, the manifests of
//! the platforms asked for) and every blob they name, through the mirror
//! as a pull goes. A blob being synced and pulled at once is fetched once
//! across replicas: both join the same fetch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use super::image::ImageRef;
use super::job::ImageJob;
use super::platform::{index_entries, select};
use crate::config::SyncConfig;
use crate::descriptors::references;
use crate::mirror::{Mirror, MirrorError};
use crate::range::RangeSpec;
use crate::reference::Platform;
use crate::reference::{Digest, Reference};
use crate::route::Target;

/// Blobs of one image fetched at once, as Docker pulls them.
const PER_IMAGE: usize = 3;
/// Prefetches running at once on a replica.
const MAX_PREFETCHES: usize = 64;
/// How long a blob fetched may take to be stored after its last byte.
const STORE_WITHIN: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Mirror(#[from] MirrorError),
    #[error("{0}")]
    Unsyncable(String),
    #[error("reading blob {digest}: {detail}")]
    Read { digest: Digest, detail: String },
    #[error("blob {0} was fetched but not stored (is the store full?)")]
    NotStored(Digest),
}

impl SyncError {
    /// Whether trying again later may succeed.
    pub fn may_pass(&self) -> bool {
        match self {
            SyncError::Mirror(e) => e.may_pass(),
            SyncError::Unsyncable(_) => false,
            SyncError::Read { .. } | SyncError::NotStored(_) => true,
        }
    }
}

/// How far one image's sync got, updated as bytes arrive.
#[derive(Default)]
pub struct Progress {
    blobs_done: AtomicU64,
    blobs_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    found: Mutex<Option<(String, Vec<String>)>>,
}

impl Progress {
    /// Writes what is known so far into `image`.
    pub fn apply(&self, image: &mut ImageJob) {
        image.blobs_done = self.blobs_done.load(Ordering::Relaxed);
        image.blobs_total = self.blobs_total.load(Ordering::Relaxed);
        image.bytes_done = self.bytes_done.load(Ordering::Relaxed);
        image.bytes_total = self.bytes_total.load(Ordering::Relaxed);
        if let Some((digest, platforms)) = self
            .found
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            image.digest = Some(digest);
            image.platforms = platforms;
        }
    }

    fn blob_done(&self) {
        self.blobs_done.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Syncer {
    mirror: Arc<Mirror>,
    /// Blob fetches for sync on this replica.
    slots: Semaphore,
    /// Requests an upstream must have left in its rate limit.
    min_quota: i64,
    /// Manifests whose blobs are being prefetched.
    prefetching: Mutex<HashSet<Digest>>,
}

impl Syncer {
    pub fn new(mirror: Arc<Mirror>, config: &SyncConfig) -> Self {
        Self {
            mirror,
            slots: Semaphore::new(config.max_concurrent.max(1)),
            min_quota: config.min_ratelimit_remaining,
            prefetching: Mutex::new(HashSet::new()),
        }
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Fetches the blobs of image manifest `digest` in the background, as a
    /// sync of it would (behind clients, within the rate limit).
    /// At most `MAX_PREFETCHES` at once, one per manifest; none while the
    /// upstream's rate limit is low or clients take every fetch slot (a
    /// prefetch is a guess, not worth a wait).
    pub fn prefetch(self: &Arc<Self>, target: &Target, digest: &Digest) {
        if self.upstream_short(&target.registry) || self.mirror.fetch_slots_full() {
            return;
        }
        {
            let mut running = self
                .prefetching
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if running.len() >= MAX_PREFETCHES || !running.insert(digest.clone()) {
                return;
            }
        }
        let image = ImageRef {
            target: target.clone(),
            reference: Reference::Digest(digest.clone()),
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.sync(&image, &[], &Progress::default()).await {
                tracing::debug!(image = %image, error = %e, "prefetching failed");
            }
            if let Reference::Digest(d) = &image.reference {
                this.prefetching
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(d);
            }
        });
    }

    /// Whether `registry` last said fewer requests are left than sync may
    /// leave it.
    fn upstream_short(&self, registry: &str) -> bool {
        self.mirror
            .upstream_quota(registry)
            .is_some_and(|(left, _)| left < self.min_quota)
    }

    /// Waits while clients' fetches take every fetch slot (sync goes
    /// behind them), and while `registry` says fewer than
    /// `min_ratelimit_remaining` requests are left in its rate limit (until
    /// its window ends, or a newer answer says more).
    async fn wait_for_upstream(&self, registry: &str) {
        let mut said = false;
        loop {
            let low = self
                .mirror
                .upstream_quota(registry)
                .filter(|(left, _)| *left < self.min_quota);
            let busy = self.mirror.fetch_slots_full();
            if low.is_none() && !busy {
                return;
            }
            if let Some((left, until)) = low
                && !std::mem::replace(&mut said, true)
            {
                let wait = until.saturating_duration_since(std::time::Instant::now());
                tracing::info!(registry, left, wait = ?wait, "sync waits: the upstream's rate limit is nearly used up");
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Brings `image` (the `platforms` of it; all when empty) into the
    /// cache.
    pub async fn sync(
        &self,
        image: &ImageRef,
        platforms: &[Platform],
        progress: &Progress,
    ) -> Result<(), SyncError> {
        let target = &image.target;
        self.wait_for_upstream(&target.registry).await;
        let top = self.mirror.manifest(target, &image.reference).await?;
        let mut bodies = Vec::new();
        let mut taken = Vec::new();
        match index_entries(&top.manifest.bytes) {
            Some(entries) => {
                let chosen = select(&entries, platforms);
                if chosen.is_empty() {
                    return Err(SyncError::Unsyncable(no_platform(&entries, platforms)));
                }
                for entry in chosen {
                    self.wait_for_upstream(&target.registry).await;
                    let child = Reference::Digest(entry.digest.clone());
                    let body = self.mirror.manifest(target, &child).await?.manifest.bytes;
                    if index_entries(&body).is_some() {
                        return Err(SyncError::Unsyncable(format!(
                            "{} is an index inside an index, which sync does not follow",
                            entry.digest
                        )));
                    }
                    bodies.push(body);
                    taken.extend(entry.platform.as_ref().map(Platform::to_string));
                }
            }
            None => bodies.push(top.manifest.bytes.clone()),
        }
        *progress
            .found
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((top.digest.to_string(), taken));
        let mut seen = HashSet::new();
        let mut blobs: Vec<(Digest, Option<u64>)> = Vec::new();
        for body in &bodies {
            let refs = references(body);
            for digest in refs.image_blobs {
                if seen.insert(digest.clone()) {
                    let size = refs.sizes.iter().find(|(d, _)| *d == digest).map(|s| s.1);
                    blobs.push((digest, size));
                }
            }
        }
        if blobs.is_empty() {
            return Err(SyncError::Unsyncable(format!(
                "manifest {} names no config or layers",
                top.digest
            )));
        }
        progress
            .blobs_total
            .store(blobs.len() as u64, Ordering::Relaxed);
        progress.bytes_total.store(
            blobs.iter().filter_map(|(_, s)| *s).sum(),
            Ordering::Relaxed,
        );
        futures::stream::iter(blobs)
            .map(|(digest, size)| self.blob(target, digest, size, progress))
            .buffer_unordered(PER_IMAGE)
            .try_collect::<()>()
            .await
    }

    /// Brings one blob into the cache. One already there is read one byte
    /// of, so it counts as used (eviction keeps what was just synced) and
    /// its repository may serve it, as a pull would find.
    async fn blob(
        &self,
        target: &Target,
        digest: Digest,
        size: Option<u64>,
        progress: &Progress,
    ) -> Result<(), SyncError> {
        if let Some(stored) = self.mirror.stored_size(&digest).await {
            if stored > 0 {
                let first = RangeSpec::From {
                    start: 0,
                    end: Some(0),
                };
                let body = self
                    .mirror
                    .blob(target, &digest, Some(first), false, false)
                    .await?;
                drain(body.stream, &digest, |_| {}).await?;
            }
            progress.bytes_done.fetch_add(stored, Ordering::Relaxed);
            progress.blob_done();
            return Ok(());
        }
        let _slot = self.slots.acquire().await;
        self.wait_for_upstream(&target.registry).await;
        let body = self
            .mirror
            .blob(target, &digest, None, false, false)
            .await?;
        let got = drain(body.stream, &digest, |n| {
            progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        })
        .await?;
        if let Some(size) = size.filter(|s| *s != got) {
            return Err(SyncError::Read {
                digest,
                detail: format!("{got} bytes, the manifest says {size}"),
            });
        }
        // Synced means stored: a fetch may store only once its last reader
        // is done.
        if !self.mirror.stored_within(&digest, STORE_WITHIN).await {
            return Err(SyncError::NotStored(digest));
        }
        progress.blob_done();
        Ok(())
    }
}

/// Reads a body to its end; the bytes read.
async fn drain(
    mut stream: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    digest: &Digest,
    on_bytes: impl Fn(u64),
) -> Result<u64, SyncError> {
    let mut got = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| SyncError::Read {
            digest: digest.clone(),
            detail: e.to_string(),
        })?;
        got += chunk.len() as u64;
        on_bytes(chunk.len() as u64);
    }
    Ok(got)
}

fn no_platform(entries: &[super::platform::Entry], wanted: &[Platform]) -> String {
    let wanted: Vec<String> = wanted.iter().map(Platform::to_string).collect();
    let mut has: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref().map(Platform::to_string))
        .collect();
    has.dedup();
    format!(
        "the index has no manifest for {} (it has {})",
        wanted.join(", "),
        if has.is_empty() {
            "none with a platform".to_owned()
        } else {
            has.join(", ")
        }
    )
}
