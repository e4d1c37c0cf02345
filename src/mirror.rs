//! The pull-through rules: manifests cached by digest and revalidated by tag,
//! blobs fetched once and streamed to every waiting client while they are
//! verified and stored, stale copies served when upstream is down.

mod blobs;
mod cluster;
mod fetch;
mod flight;
mod hot;
mod keyed_lock;
mod listing;
mod manifests;
mod missing;
mod pace;
mod purge;
mod sizes;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use blobs::{BlobInfo, BlobResponse};
pub use fetch::PEER_HEADER;
pub use flight::FlightNow;
pub use listing::EMPTY_INDEX;
pub use manifests::ManifestHit;
pub use purge::Purged;

use crate::config::{Config, StorageConfig};
use crate::lifecycle::UseLog;
use crate::meta::{MetaError, MetaStore};
use crate::policy::Policy;
use crate::reference::Digest;
use crate::route::{Router, Target};
use crate::storage::{BlobStore, StorageError};
use crate::telemetry::metrics::metrics;
use crate::upstream::{UpstreamClient, UpstreamError, Upstreams};
use cluster::Cluster;
use fetch::FetchSlots;
use flight::Flights;
use keyed_lock::{KeyedLocks, RecentFailures};
use missing::SeenMissing;
use sizes::KnownSizes;

/// After upstream failed to revalidate a tag, serve the cached copy without
/// asking again for this long.
const STALE_RETRY_AFTER: Duration = Duration::from_secs(10);
/// After the spool's disk had no room for a blob, cold blobs are passed
/// straight through from upstream for this long before spooling is tried
/// again (meanwhile the store evicts).
const NO_ROOM_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("repository unknown: {0}")]
    NameUnknown(String),
    #[error("upstream {registry} sent content that does not match digest {expected}")]
    DigestMismatch { registry: String, expected: String },
    #[error("fetching from upstream failed: {0}")]
    Fetch(String),
    #[error("{0}")]
    Busy(String),
}

impl MirrorError {
    /// Whether trying again later may succeed: upstream or a store failed,
    /// rather than upstream saying the content does not exist.
    pub fn may_pass(&self) -> bool {
        !matches!(
            self,
            MirrorError::ManifestUnknown(_)
                | MirrorError::BlobUnknown(_)
                | MirrorError::NameUnknown(_)
                | MirrorError::Upstream(UpstreamError::NotFound { .. })
        )
    }
}

pub struct Mirror {
    pub router: Router,
    pub policy: Policy,
    upstreams: Upstreams,
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    flights: Arc<Flights>,
    cluster: Arc<Cluster>,
    /// For streaming from other replicas.
    peers: reqwest::Client,
    tag_locks: KeyedLocks,
    upstream_failures: RecentFailures,
    tag_ttls: HashMap<String, Duration>,
    body_idle: Duration,
    /// Expiry of presigned blob URLs, when blob GETs redirect to the store.
    presign: Option<Duration>,
    fetch_slots: FetchSlots,
    hot: hot::HotCache,
    /// Blobs of freshly fetched manifests the store lacked a moment ago.
    missing: Arc<SeenMissing>,
    /// Blobs this large go to upstream's storage while fetch slots are full.
    redirect_above: Option<u64>,
    /// Blob sizes the manifests read here name.
    sizes: KnownSizes,
    bounds: fetch::FetchBounds,
    /// Set when the spool's disk had no room for a blob.
    no_room: RecentFailures,
    /// Where manifests served are noted as used, when something is
    /// forgotten by their use.
    uses: Option<Arc<UseLog>>,
    /// Registries whose new image manifests have their blobs fetched
    /// ahead (`[[upstreams]] prefetch`), and what fetches them.
    prefetch: std::collections::HashSet<String>,
    prefetcher: std::sync::OnceLock<Prefetcher>,
}

/// Told of an image manifest that just came from an upstream with
/// `prefetch` on.
pub type Prefetcher = Arc<dyn Fn(&Target, &Digest) + Send + Sync>;

impl Mirror {
    pub fn new(
        config: &Config,
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        spool_dir: PathBuf,
    ) -> Result<Self, reqwest::Error> {
        let peers = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeouts.connect)
            .read_timeout(config.timeouts.body_idle)
            .no_proxy()
            .build()?;
        Ok(Self {
            router: Router::new(config),
            policy: Policy::new(config),
            upstreams: Upstreams::new(config)?,
            cluster: Arc::new(Cluster::new(&config.cluster, meta.clone())),
            peers,
            blobs,
            meta,
            flights: Arc::new(Flights::new(spool_dir)),
            tag_locks: KeyedLocks::default(),
            upstream_failures: RecentFailures::new(STALE_RETRY_AFTER),
            tag_ttls: config
                .upstreams
                .iter()
                .map(|u| (u.registry.clone(), u.tag_ttl))
                .collect(),
            body_idle: config.timeouts.body_idle,
            presign: match &config.storage {
                StorageConfig::S3(s3) if s3.presigned_redirect => Some(s3.presigned_expiry),
                _ => None,
            },
            hot: hot::HotCache::default(),
            missing: Arc::new(SeenMissing::new(config.cluster.lease_ttl / 2)),
            fetch_slots: FetchSlots::new(config.fetch.max_concurrent, config.fetch.queue_timeout),
            redirect_above: config.fetch.redirect_above,
            sizes: KnownSizes::default(),
            bounds: fetch::FetchBounds {
                max_blob_size: config.fetch.max_blob_size,
                min_rate: config.fetch.min_rate,
                min_rate_window: config.fetch.min_rate_window,
            },
            no_room: RecentFailures::new(NO_ROOM_FOR),
            uses: None,
            prefetch: config
                .upstreams
                .iter()
                .filter(|u| u.prefetch)
                .map(|u| u.registry.clone())
                .collect(),
            prefetcher: std::sync::OnceLock::new(),
        })
    }

    /// What fetches the blobs of new image manifests from upstreams with
    /// `prefetch` on.
    pub fn prefetch_with(&self, prefetcher: Prefetcher) {
        let _ = self.prefetcher.set(prefetcher);
    }

    /// Whether some upstream prefetches.
    pub fn prefetches(&self) -> bool {
        !self.prefetch.is_empty()
    }

    /// Notes every manifest served in `uses`.
    pub fn noting_uses(self, uses: Option<Arc<UseLog>>) -> Self {
        Self { uses, ..self }
    }

    fn upstream(&self, target: &Target) -> Result<&Arc<UpstreamClient>, MirrorError> {
        self.upstreams
            .get(&target.registry)
            .ok_or_else(|| MirrorError::NameUnknown(format!("no upstream {}", target.registry)))
    }

    /// How long a tag of `registry` is served before upstream is asked
    /// again.
    pub fn tag_ttl(&self, registry: &str) -> Duration {
        self.tag_ttls.get(registry).copied().unwrap_or_default()
    }

    /// A small stored blob's bytes (an image config), `None` when it is not
    /// stored, larger than `limit`, or does not match its digest.
    pub async fn stored_bytes(&self, digest: &Digest, limit: u64) -> Option<bytes::Bytes> {
        use futures::StreamExt;
        let body = self.blobs.get(digest, None).await.ok()??;
        if body.size > limit {
            return None;
        }
        let mut stream = body.stream;
        let mut out = Vec::with_capacity(usize::try_from(body.size).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.ok()?);
            if out.len() as u64 > limit {
                return None;
            }
        }
        digest.matches(&out).then(|| bytes::Bytes::from(out))
    }

    /// The metadata store, for reading what the cache holds.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// The blob store, which the private namespace keeps its blobs in too.
    pub fn blob_store(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// What `registry` last said of its rate limit: requests left, until
    /// when that holds.
    pub fn upstream_quota(&self, registry: &str) -> Option<(i64, std::time::Instant)> {
        self.upstreams.get(registry)?.quota_left()
    }

    /// The blob fetches this replica runs now.
    pub fn fetches_now(&self) -> Vec<FlightNow> {
        self.flights.now()
    }

    /// Whether a fetch started now would have to queue for a slot.
    pub fn fetch_slots_full(&self) -> bool {
        self.fetch_slots.full()
    }

    /// Waits (up to `limit`) until the fetch that brought `digest` in has
    /// stored it: the one here, or another replica's this one streamed
    /// from (it stores once its readers are done); whether it is stored.
    pub async fn stored_within(&self, digest: &Digest, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let lease = crate::meta::blob_lease(digest);
        let mut pause = Duration::from_millis(20);
        loop {
            if !self.flights.is_running(digest) {
                if self.stored_size(digest).await.is_some() {
                    return true;
                }
                // No fetch runs anywhere: what is not stored now will not be.
                let fetching = match self.meta.lease(&lease).await {
                    Ok(Some(holder)) => !crate::meta::lease_done(&holder),
                    Ok(None) => false,
                    Err(_) => true,
                };
                if !fetching {
                    return self.stored_size(digest).await.is_some();
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Shutdown begins: fetches that wait for their clients before
    /// storing store at once, within the grace period.
    pub fn begin_shutdown(&self) {
        self.flights.close();
    }

    /// At shutdown: lets running fetches finish until `deadline`, then gives
    /// up the leases still held so other replicas take over at once.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        while self.flights.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.flights.count();
        if left > 0 {
            tracing::warn!(fetches = left, "abandoning unfinished fetches");
        }
        self.cluster.release_all().await;
        // Uses noted since the last batch are not lost with the process.
        self.blobs.record_uses().await;
        if let Some(uses) = &self.uses {
            uses.flush().await;
        }
    }

    /// Whether storage and metadata answer.
    pub async fn ready(&self) -> Result<(), MirrorError> {
        self.blobs.health().await?;
        self.meta.health().await?;
        Ok(())
    }

    /// Whether `repo` may serve `digest`: linked by one of its manifests, or
    /// confirmed by upstream now (then remembered). A digest is not a
    /// secret: a manifest anywhere may name it. So with metadata and
    /// upstream both unreachable, only what this process knows the
    /// repository holds is served.
    async fn authorized(&self, target: &Target, digest: &Digest) -> Result<bool, MirrorError> {
        let key = target.key();
        if matches!(self.link_recorded(&key, digest).await, Ok(true)) {
            return Ok(true);
        }
        match self
            .upstream(target)?
            .blob_size(target.repository.as_str(), digest)
            .await
        {
            Ok(_) => {
                self.remember(self.meta.link(&key, std::slice::from_ref(digest)))
                    .await;
                self.hot.put_link(&key, digest);
                Ok(true)
            }
            Err(UpstreamError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether one of `target`'s manifests named `digest` (or upstream
    /// confirmed it before), as far as the metadata says; never asks
    /// upstream.
    async fn linked(&self, target: &Target, digest: &Digest) -> bool {
        matches!(self.link_recorded(&target.key(), digest).await, Ok(true))
    }

    async fn link_recorded(&self, key: &str, digest: &Digest) -> Result<bool, MetaError> {
        if self.hot.is_linked(key, digest) {
            return Ok(true);
        }
        let linked = self.meta.is_linked(key, digest).await;
        if matches!(linked, Ok(true)) {
            self.hot.put_link(key, digest);
        }
        linked
    }

    /// Reads the metadata cache. It is only a cache: when it cannot be read,
    /// Pier carries on as if it were cold and asks upstream.
    async fn recall<T>(
        &self,
        read: impl Future<Output = Result<Option<T>, MetaError>>,
    ) -> Option<T> {
        match read.await {
            Ok(v) => v,
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::warn!(error = %e, "metadata unavailable; asking upstream");
                None
            }
        }
    }

    /// Writes the metadata cache; a failure costs a later upstream request,
    /// not this one.
    async fn remember(&self, write: impl Future<Output = Result<(), MetaError>>) {
        if let Err(e) = write.await {
            metrics().backend_error("metadata");
            tracing::warn!(error = %e, "metadata unavailable; not remembering");
        }
    }

    /// Looks for a stored blob; an unreachable store counts as a miss, so
    /// the blob comes from upstream.
    /// The size of a blob the store holds (`None` also when the store
    /// cannot say).
    pub async fn stored_size(&self, digest: &Digest) -> Option<u64> {
        match self.blobs.stat(digest).await {
            Ok(size) => size,
            Err(e) => {
                metrics().backend_error("storage");
                tracing::warn!(%digest, error = %e, "blob storage unavailable; asking upstream");
                None
            }
        }
    }
}
