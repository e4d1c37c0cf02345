//! Metadata: manifests by digest, tag → digest records, which digests each
//! repository may serve, the catalog, and leases that let one replica of
//! many do a piece of work. The `MetaStore` trait and backends.

mod embedded;
mod held;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::rate::Rate;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use self::redis::{RedisMeta, RedisOptions};
pub use embedded::EmbeddedMeta;
pub use held::Held;

use crate::reference::Digest;

#[derive(Debug, Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Backend(String),
    #[error("metadata store holds a corrupt record: {0}")]
    Corrupt(String),
}

/// A manifest exactly as upstream sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

impl StoredManifest {
    /// One value for a key-value store: media type, `\n`, the bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.media_type.len() + 1 + self.bytes.len());
        value.extend_from_slice(self.media_type.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(&self.bytes);
        value
    }

    /// The inverse of `encode`; `what` names the record in errors.
    pub(crate) fn decode(raw: &[u8], what: &Digest) -> Result<Self, MetaError> {
        let nl = raw
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| MetaError::Corrupt(format!("manifest {what}")))?;
        Ok(Self {
            media_type: String::from_utf8_lossy(&raw[..nl]).into_owned(),
            bytes: Bytes::copy_from_slice(&raw[nl + 1..]),
        })
    }
}

/// What a tag pointed at when Pier last asked upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    /// Unix time in milliseconds of the last upstream confirmation.
    pub checked_at_ms: u64,
}

/// Whose uses: blobs' and manifests' are kept apart, so each is bounded by
/// what its store holds. Beside each last use, a deadline (Unix ms) past
/// which the content expires by age, recorded where registries have their
/// own `max_age` (`lifecycle::Retention`); the latest one recorded stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseKind {
    Blobs,
    Manifests,
    BlobDeadlines,
    ManifestDeadlines,
}

impl UseKind {
    pub const ALL: [UseKind; 4] = [
        UseKind::Blobs,
        UseKind::Manifests,
        UseKind::BlobDeadlines,
        UseKind::ManifestDeadlines,
    ];
}

/// The word a blob lease's holder adds once the blob is stored; the lease
/// is then left to lapse, and eviction may take it.
pub const STORED: &str = "stored";

/// Whether a lease's value says its work is done.
pub fn lease_done(value: &str) -> bool {
    value.rsplit(' ').next() == Some(STORED)
}

/// Sync jobs kept; older ones are dropped as new ones are made.
pub const JOBS_KEPT: usize = 1000;

/// The time now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Minutes of per-minute counts kept for the console's charts.
pub const MINUTES_KEPT: u64 = 120;

/// Failed registry requests kept for the console's activity page.
pub const FAILURES_KEPT: usize = 100;

/// The console's counts added up over every replica: since the store began,
/// and by minute (Unix minutes, oldest first) for the minutes asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: std::collections::BTreeMap<String, u64>,
    pub minutes: Vec<(u64, std::collections::BTreeMap<String, u64>)>,
}

/// The name of the lease held by whoever fetches (or removes) a blob.
pub fn blob_lease(digest: &Digest) -> String {
    format!("blob:{digest}")
}

/// A blob eviction decided to remove, and on what grounds.
pub struct Removal<'a> {
    /// The eviction lease (its name) the remover must still hold.
    pub fence: &'a str,
    /// The remover's value in the eviction lease, and in the blob's while
    /// it removes the blob.
    pub holder: &'a str,
    pub digest: &'a Digest,
    /// The last use the decision saw (Unix ms; 0 for none).
    pub seen_ms: u64,
    /// How long the blob's lease lasts if the remover never gives it up.
    pub ttl: Duration,
}

/// What claiming a blob for removal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The blob's lease is the remover's: remove it, then release.
    Yes,
    /// Fetched or served since the decision: it stays.
    Wanted,
    /// The eviction lease is no longer the remover's: it must stop.
    Fenced,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, MetaError>;

    /// Stores a verified manifest and links it, and the digests it
    /// references, to repository `repo` (`<registry>/<repository>`).
    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        manifest: &StoredManifest,
        references: &[Digest],
    ) -> Result<(), MetaError>;

    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRecord>, MetaError>;

    async fn put_tag(&self, repo: &str, tag: &str, record: &TagRecord) -> Result<(), MetaError>;

    /// Tags cached for `repo`, sorted.
    async fn tags(&self, repo: &str) -> Result<Vec<String>, MetaError>;

    /// Records that `repo` may serve `digests` (upstream confirmed them).
    async fn link(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError>;

    async fn is_linked(&self, repo: &str, digest: &Digest) -> Result<bool, MetaError>;

    /// Cached repositories in order, those after `after`, at most `limit`.
    async fn repositories(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MetaError>;

    /// Takes lease `name` for `holder` for `ttl` if nobody holds it.
    /// Returns `None` when taken, or the current holder's value.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, MetaError>;

    /// Extends a lease `holder` still holds; false if it was lost.
    async fn renew_lease(&self, name: &str, holder: &str, ttl: Duration)
    -> Result<bool, MetaError>;

    /// Changes what a lease `holder` still holds says to `value`, for `ttl`
    /// from now; false if it was lost.
    async fn replace_lease(
        &self,
        name: &str,
        holder: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, MetaError>;

    /// Who holds lease `name` now (its value), if anyone.
    async fn lease(&self, name: &str) -> Result<Option<String>, MetaError>;

    /// Gives a lease up, if `holder` still holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError>;

    /// Counts a request against `key`'s rate: `Ok(Ok(()))` when it may go
    /// ahead, `Ok(Err(wait))` when it must wait. Shared by every process
    /// using the store.
    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, MetaError>;

    /// Records that each digest was served at the Unix time in ms given
    /// with it; a later use already recorded stays.
    async fn record_uses(&self, kind: UseKind, uses: &[(Digest, u64)]) -> Result<(), MetaError>;

    /// The last recorded use of each digest, in order.
    async fn last_uses(
        &self,
        kind: UseKind,
        digests: &[Digest],
    ) -> Result<Vec<Option<u64>>, MetaError>;

    /// Forgets the uses of what is no longer stored.
    async fn forget_uses(&self, kind: UseKind, digests: &[Digest]) -> Result<(), MetaError>;

    /// Digests whose last recorded use is older than `before_ms`, least
    /// recent first: `limit` of them after skipping `skip`.
    async fn used_before(
        &self,
        kind: UseKind,
        before_ms: u64,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<Digest>, MetaError>;

    /// Removes the manifest records among `digests` whose last use is still
    /// older than `before_ms`, with their uses; the digests it removed.
    /// (Manifests' uses are the `UseKind::Manifests` ones.)
    async fn forget_manifests(
        &self,
        digests: &[Digest],
        before_ms: u64,
    ) -> Result<Vec<Digest>, MetaError>;

    /// Gives every manifest record without a recorded use one at `at_ms`
    /// (records written before uses were kept); how many it gave.
    async fn adopt_manifests(&self, at_ms: u64) -> Result<usize, MetaError>;

    /// Which of `digests` have a manifest record, in order.
    async fn has_manifests(&self, digests: &[Digest]) -> Result<Vec<bool>, MetaError>;

    /// Every digest `repo` may serve.
    async fn links(&self, repo: &str) -> Result<Vec<Digest>, MetaError>;

    /// Withdraws `digests` from what `repo` may serve.
    async fn unlink(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError>;

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<(), MetaError>;

    /// Removes `repo` from the catalog, with its links and tag records.
    async fn forget_repository(&self, repo: &str) -> Result<(), MetaError>;

    /// Adds to the count of blob bytes and blobs stored (shared by every
    /// replica); the counts after.
    async fn add_usage(&self, bytes: i64, blobs: i64) -> Result<(i64, i64), MetaError>;

    /// Takes the lease fetches of `removal.digest` take, so none runs while
    /// the blob is removed: only while the remover still holds the eviction
    /// lease, nobody holds the blob's (one marked `STORED` is done with),
    /// and no use later than the one the decision saw was recorded. One atomic step, so a decision made on
    /// what is no longer true is never acted on.
    async fn claim_removal(&self, removal: &Removal<'_>) -> Result<Claimed, MetaError>;

    /// Stores (or replaces) a sync job's record; `open` while it is not
    /// finished. Job ids sort by the time they were made; past `JOBS_KEPT`
    /// jobs, the oldest finished ones are dropped (open ones never).
    async fn save_job(&self, id: &str, record: &[u8], open: bool) -> Result<(), MetaError>;

    /// The ids of the jobs not finished.
    async fn open_jobs(&self) -> Result<Vec<String>, MetaError>;

    /// Takes `id` off the open jobs, its record (if any) left as it is.
    async fn close_job(&self, id: &str) -> Result<(), MetaError>;

    async fn job(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError>;

    /// The records of the `limit` newest jobs, newest first.
    async fn recent_jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, MetaError>;

    /// Adds a replica's counts since its last call to the totals and to
    /// minute `minute`'s, and its manifest pulls to each repository's.
    async fn add_counts(
        &self,
        minute: u64,
        counts: &[(String, u64)],
        pulls: &[(String, u64)],
    ) -> Result<(), MetaError>;

    /// The totals, and the counts of minutes `from..=to` that have any.
    async fn counts(&self, from: u64, to: u64) -> Result<Counts, MetaError>;

    /// The `n` most pulled repositories, most first.
    async fn top_pulls(&self, n: usize) -> Result<Vec<(String, u64)>, MetaError>;

    /// Stores what replica `name` is doing now, for `ttl`.
    async fn put_replica(&self, name: &str, record: &[u8], ttl: Duration) -> Result<(), MetaError>;

    /// The records of the replicas whose last one has not lapsed.
    async fn replicas(&self) -> Result<Vec<Vec<u8>>, MetaError>;

    /// Adds failure records, oldest first; the newest `FAILURES_KEPT` stay.
    async fn add_failures(&self, records: &[Vec<u8>]) -> Result<(), MetaError>;

    /// The newest `n` failure records, newest first.
    async fn failures(&self, n: usize) -> Result<Vec<Vec<u8>>, MetaError>;

    /// Records that manifest `referrer` of `repo` names `subject` as its
    /// subject (OCI 1.1 referrers).
    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError>;

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError>;

    /// The manifests of `repo` that name `subject`, sorted.
    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<Digest>, MetaError>;

    /// Stores (or replaces) an upload session's record, which lapses
    /// `ttl` from now unless stored again.
    async fn put_upload(&self, id: &str, record: &[u8], ttl: Duration) -> Result<(), MetaError>;

    /// An upload session's record, unless it lapsed or was removed.
    async fn upload(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError>;

    async fn delete_upload(&self, id: &str) -> Result<(), MetaError>;

    async fn health(&self) -> Result<(), MetaError>;

    /// Whether other processes (replicas) may use this store too. Leases
    /// only coordinate anything when they can.
    fn shared(&self) -> bool;
}

#[cfg(test)]
pub(crate) mod suite;
