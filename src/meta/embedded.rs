//! Metadata in one redb database file on local disk: transactional and
//! durable (each commit is fsynced), so a restarted Pier keeps its cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{
    Claimed, Counts, FAILURES_KEPT, JOBS_KEPT, MINUTES_KEPT, MetaError, MetaStore, Removal,
    StoredManifest, TagRecord, UseKind, now_ms,
};
use crate::rate::{LocalRates, Rate};
use crate::reference::Digest;

/// digest → media type, `\n`, manifest bytes
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// `<repo>:<tag>` → JSON `TagRecord` (neither part can contain ':')
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// `<repo>@<digest>` → ()
const LINKS: TableDefinition<&str, ()> = TableDefinition::new("links");
/// repo → ()
const REPOS: TableDefinition<&str, ()> = TableDefinition::new("repositories");
/// blob digest → its last use, Unix ms
const USES: TableDefinition<&str, u64> = TableDefinition::new("uses");
/// manifest digest → its last use, Unix ms
const MUSES: TableDefinition<&str, u64> = TableDefinition::new("manifest_uses");
/// sync job id (ordered by age) → its record
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// ids of the sync jobs not finished
const OPEN_JOBS: TableDefinition<&str, ()> = TableDefinition::new("open_jobs");
/// blob digest → its deadline, Unix ms
const DEADLINES: TableDefinition<&str, u64> = TableDefinition::new("deadlines");
/// manifest digest → its deadline, Unix ms
const MDEADLINES: TableDefinition<&str, u64> = TableDefinition::new("manifest_deadlines");

/// the console's counts: name → total
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
/// `<Unix minute, 12 digits>/<name>` → that minute's count
const MINUTE_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("minute_counts");
/// repository → manifest pulls by tag
const PULLS: TableDefinition<&str, u64> = TableDefinition::new("pulls");
/// Upload session → its lapse time (Unix ms, 8 bytes big-endian), then its
/// record.
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// `<repo>\0<subject>\0<referrer>` for each manifest naming a subject.
const REFERRERS: TableDefinition<&str, ()> = TableDefinition::new("referrers");

fn minute_key(minute: u64, name: &str) -> String {
    format!("{minute:012}/{name}")
}

fn uses_table(kind: UseKind) -> TableDefinition<'static, &'static str, u64> {
    match kind {
        UseKind::Blobs => USES,
        UseKind::Manifests => MUSES,
        UseKind::BlobDeadlines => DEADLINES,
        UseKind::ManifestDeadlines => MDEADLINES,
    }
}

pub struct EmbeddedMeta {
    db: Arc<Database>,
    /// One process owns an embedded store, so leases live in memory.
    leases: Leases,
    rates: LocalRates,
    /// Bytes and blobs stored, counted since start: the blob store's
    /// eviction sets it right from what the store holds.
    usage: Mutex<(i64, i64)>,
    /// The one process's record, and until when it holds: nothing to share.
    replica: Mutex<Option<(Vec<u8>, Instant)>>,
    /// Failure records, newest first; like the replica's, kept in memory.
    failures: Mutex<std::collections::VecDeque<Vec<u8>>>,
    /// When lapsed upload sessions were last swept out (Unix ms).
    uploads_swept: std::sync::atomic::AtomicU64,
}

impl EmbeddedMeta {
    /// Opens (creating if needed) `<dir>/meta.redb`.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        std::fs::create_dir_all(dir).map_err(|e| MetaError::Backend(e.to_string()))?;
        let db = Database::create(dir.join("meta.redb")).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(MANIFESTS).map_err(backend)?;
        txn.open_table(TAGS).map_err(backend)?;
        txn.open_table(LINKS).map_err(backend)?;
        txn.open_table(REPOS).map_err(backend)?;
        for kind in UseKind::ALL {
            txn.open_table(uses_table(kind)).map_err(backend)?;
        }
        txn.open_table(JOBS).map_err(backend)?;
        txn.open_table(OPEN_JOBS).map_err(backend)?;
        txn.open_table(COUNTS).map_err(backend)?;
        txn.open_table(MINUTE_COUNTS).map_err(backend)?;
        txn.open_table(PULLS).map_err(backend)?;
        txn.open_table(UPLOADS).map_err(backend)?;
        txn.open_table(REFERRERS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(db),
            leases: Leases::default(),
            rates: LocalRates::default(),
            usage: Mutex::new((0, 0)),
            replica: Mutex::new(None),
            failures: Mutex::new(std::collections::VecDeque::new()),
            uploads_swept: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs blocking database work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| MetaError::Backend(e.to_string()))?
    }
}

fn backend(e: impl std::fmt::Display) -> MetaError {
    MetaError::Backend(e.to_string())
}

fn link_key(repo: &str, digest: &Digest) -> String {
    format!("{repo}@{digest}")
}

#[async_trait]
impl MetaStore for EmbeddedMeta {
    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, MetaError> {
        let key = digest.to_string();
        let digest = digest.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(MANIFESTS).map_err(backend)?;
            let Some(v) = table.get(key.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            StoredManifest::decode(v.value(), &digest).map(Some)
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        manifest: &StoredManifest,
        references: &[Digest],
    ) -> Result<(), MetaError> {
        let value = manifest.encode();
        let key = digest.to_string();
        let repo = repo.to_owned();
        let links: Vec<String> = std::iter::once(digest)
            .chain(references)
            .map(|d| link_key(&repo, d))
            .collect();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                txn.open_table(MANIFESTS)
                    .map_err(backend)?
                    .insert(key.as_str(), value.as_slice())
                    .map_err(backend)?;
                let mut t = txn.open_table(LINKS).map_err(backend)?;
                for l in &links {
                    t.insert(l.as_str(), ()).map_err(backend)?;
                }
                txn.open_table(REPOS)
                    .map_err(backend)?
                    .insert(repo.as_str(), ())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRecord>, MetaError> {
        let key = format!("{repo}:{tag}");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(TAGS).map_err(backend)?;
            match table.get(key.as_str()).map_err(backend)? {
                Some(v) => serde_json::from_slice(v.value())
                    .map(Some)
                    .map_err(|e| MetaError::Corrupt(format!("tag {key}: {e}"))),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_tag(&self, repo: &str, tag: &str, record: &TagRecord) -> Result<(), MetaError> {
        let key = format!("{repo}:{tag}");
        let repo = repo.to_owned();
        let value = serde_json::to_vec(record).map_err(backend)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                txn.open_table(TAGS)
                    .map_err(backend)?
                    .insert(key.as_str(), value.as_slice())
                    .map_err(backend)?;
                txn.open_table(REPOS)
                    .map_err(backend)?
                    .insert(repo.as_str(), ())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn tags(&self, repo: &str) -> Result<Vec<String>, MetaError> {
        // ';' sorts right after ':', so this range is exactly `<repo>:*`.
        let (from, to) = (format!("{repo}:"), format!("{repo};"));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(TAGS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str()).map_err(backend)? {
                let (k, _) = entry.map_err(backend)?;
                out.push(k.value()[from.len()..].to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn link(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError> {
        let repo = repo.to_owned();
        let links: Vec<String> = digests.iter().map(|d| link_key(&repo, d)).collect();
        self.blocking(move |db| {
            // Links are usually there already (a manifest links its blobs):
            // a read costs no write transaction and no fsync.
            let links = {
                let txn = db.begin_read().map_err(backend)?;
                let t = txn.open_table(LINKS).map_err(backend)?;
                let mut missing = Vec::new();
                for l in links {
                    if t.get(l.as_str()).map_err(backend)?.is_none() {
                        missing.push(l);
                    }
                }
                missing
            };
            if links.is_empty() {
                return Ok(());
            }
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut t = txn.open_table(LINKS).map_err(backend)?;
                for l in &links {
                    t.insert(l.as_str(), ()).map_err(backend)?;
                }
                txn.open_table(REPOS)
                    .map_err(backend)?
                    .insert(repo.as_str(), ())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn is_linked(&self, repo: &str, digest: &Digest) -> Result<bool, MetaError> {
        let key = link_key(repo, digest);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(LINKS).map_err(backend)?;
            Ok(table.get(key.as_str()).map_err(backend)?.is_some())
        })
        .await
    }

    async fn repositories(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MetaError> {
        let after = after.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(REPOS).map_err(backend)?;
            let iter = match &after {
                Some(a) => table.range::<&str>((
                    std::ops::Bound::Excluded(a.as_str()),
                    std::ops::Bound::Unbounded,
                )),
                None => table.range::<&str>(..),
            }
            .map_err(backend)?;
            let mut out = Vec::new();
            for entry in iter.take(limit) {
                out.push(entry.map_err(backend)?.0.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, MetaError> {
        Ok(self.leases.acquire(name, holder, ttl))
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetaError> {
        Ok(self.leases.renew(name, holder, ttl))
    }

    async fn replace_lease(
        &self,
        name: &str,
        holder: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, MetaError> {
        Ok(self.leases.replace(name, holder, value, ttl))
    }

    async fn lease(&self, name: &str) -> Result<Option<String>, MetaError> {
        let now = Instant::now();
        Ok(self
            .leases
            .map()
            .get(name)
            .filter(|(_, until)| *until > now)
            .map(|(h, _)| h.clone()))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        self.leases.release(name, holder);
        Ok(())
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, MetaError> {
        Ok(self.rates.check(key, rate))
    }

    async fn record_uses(&self, kind: UseKind, uses: &[(Digest, u64)]) -> Result<(), MetaError> {
        let uses: Vec<(String, u64)> = uses.iter().map(|(d, at)| (d.to_string(), *at)).collect();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(uses_table(kind)).map_err(backend)?;
                for (digest, at) in &uses {
                    let known = table
                        .get(digest.as_str())
                        .map_err(backend)?
                        .map(|v| v.value());
                    if known.is_none_or(|k| k < *at) {
                        table.insert(digest.as_str(), at).map_err(backend)?;
                    }
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn last_uses(
        &self,
        kind: UseKind,
        digests: &[Digest],
    ) -> Result<Vec<Option<u64>>, MetaError> {
        let keys: Vec<String> = digests.iter().map(Digest::to_string).collect();
        self.blocking(move |db| last_uses_in(db, kind, &keys)).await
    }

    async fn forget_uses(&self, kind: UseKind, digests: &[Digest]) -> Result<(), MetaError> {
        let keys: Vec<String> = digests.iter().map(Digest::to_string).collect();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(uses_table(kind)).map_err(backend)?;
                for key in &keys {
                    table.remove(key.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn used_before(
        &self,
        kind: UseKind,
        before_ms: u64,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<Digest>, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(uses_table(kind)).map_err(backend)?;
            let mut old = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if v.value() < before_ms
                    && let Ok(d) = Digest::parse(k.value())
                {
                    old.push((v.value(), d));
                }
            }
            old.sort();
            Ok(old
                .into_iter()
                .skip(skip)
                .take(limit)
                .map(|(_, d)| d)
                .collect())
        })
        .await
    }

    async fn forget_manifests(
        &self,
        digests: &[Digest],
        before_ms: u64,
    ) -> Result<Vec<Digest>, MetaError> {
        let digests = digests.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut removed = Vec::new();
            {
                let mut uses = txn.open_table(MUSES).map_err(backend)?;
                let mut manifests = txn.open_table(MANIFESTS).map_err(backend)?;
                for digest in digests {
                    let key = digest.to_string();
                    let used = uses.get(key.as_str()).map_err(backend)?.map(|v| v.value());
                    if used.is_some_and(|u| u >= before_ms) {
                        continue;
                    }
                    if manifests.remove(key.as_str()).map_err(backend)?.is_some() {
                        uses.remove(key.as_str()).map_err(backend)?;
                        removed.push(digest);
                    }
                }
            }
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn adopt_manifests(&self, at_ms: u64) -> Result<usize, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut adopted = 0;
            {
                let manifests = txn.open_table(MANIFESTS).map_err(backend)?;
                let mut uses = txn.open_table(MUSES).map_err(backend)?;
                for entry in manifests.iter().map_err(backend)? {
                    let (digest, _) = entry.map_err(backend)?;
                    if uses.get(digest.value()).map_err(backend)?.is_none() {
                        uses.insert(digest.value(), at_ms).map_err(backend)?;
                        adopted += 1;
                    }
                }
            }
            txn.commit().map_err(backend)?;
            Ok(adopted)
        })
        .await
    }

    async fn has_manifests(&self, digests: &[Digest]) -> Result<Vec<bool>, MetaError> {
        let keys: Vec<String> = digests.iter().map(Digest::to_string).collect();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(MANIFESTS).map_err(backend)?;
            keys.iter()
                .map(|k| Ok(table.get(k.as_str()).map_err(backend)?.is_some()))
                .collect()
        })
        .await
    }

    async fn links(&self, repo: &str) -> Result<Vec<Digest>, MetaError> {
        // 'A' sorts right after '@', so this range is exactly `<repo>@*`.
        let (from, to) = (format!("{repo}@"), format!("{repo}A"));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(LINKS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str()).map_err(backend)? {
                let (k, _) = entry.map_err(backend)?;
                if let Ok(d) = Digest::parse(&k.value()[from.len()..]) {
                    out.push(d);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn unlink(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError> {
        let keys: Vec<String> = digests.iter().map(|d| link_key(repo, d)).collect();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(LINKS).map_err(backend)?;
                for k in &keys {
                    table.remove(k.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<(), MetaError> {
        let key = format!("{repo}:{tag}");
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(TAGS)
                .map_err(backend)?
                .remove(key.as_str())
                .map_err(backend)?;
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn forget_repository(&self, repo: &str) -> Result<(), MetaError> {
        let links: Vec<String> = self
            .links(repo)
            .await?
            .iter()
            .map(|d| link_key(repo, d))
            .collect();
        let tags: Vec<String> = self
            .tags(repo)
            .await?
            .iter()
            .map(|t| format!("{repo}:{t}"))
            .collect();
        let repo = repo.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(LINKS).map_err(backend)?;
                for k in &links {
                    table.remove(k.as_str()).map_err(backend)?;
                }
                let mut table = txn.open_table(TAGS).map_err(backend)?;
                for k in &tags {
                    table.remove(k.as_str()).map_err(backend)?;
                }
                txn.open_table(REPOS)
                    .map_err(backend)?
                    .remove(repo.as_str())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn add_usage(&self, bytes: i64, blobs: i64) -> Result<(i64, i64), MetaError> {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage.0 = usage.0.saturating_add(bytes);
        usage.1 = usage.1.saturating_add(blobs);
        Ok(*usage)
    }

    async fn claim_removal(&self, removal: &Removal<'_>) -> Result<Claimed, MetaError> {
        let key = vec![removal.digest.to_string()];
        let used = self
            .blocking(move |db| last_uses_in(db, UseKind::Blobs, &key))
            .await?;
        // Leases live in this process, so checking them and taking the
        // blob's under one lock is atomic; a use recorded after the read
        // above is one batched here too late, which a lease-less store
        // cannot tell apart from one recorded a moment after the removal.
        let mut leases = self.leases.map();
        let now = Instant::now();
        leases.retain(|_, (_, until)| *until > now);
        if leases
            .get(removal.fence)
            .is_none_or(|(h, _)| h != removal.holder)
        {
            return Ok(Claimed::Fenced);
        }
        let name = super::blob_lease(removal.digest);
        let fetching = leases
            .get(&name)
            .is_some_and(|(h, _)| !super::lease_done(h));
        let used = used.first().copied().flatten();
        if fetching || used.is_some_and(|u| u > removal.seen_ms) {
            return Ok(Claimed::Wanted);
        }
        leases.insert(name, (removal.holder.to_owned(), now + removal.ttl));
        Ok(Claimed::Yes)
    }

    fn shared(&self) -> bool {
        false
    }

    async fn save_job(&self, id: &str, record: &[u8], open: bool) -> Result<(), MetaError> {
        let (id, record) = (id.to_owned(), record.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut jobs = txn.open_table(JOBS).map_err(backend)?;
                let mut opened = txn.open_table(OPEN_JOBS).map_err(backend)?;
                jobs.insert(id.as_str(), record.as_slice())
                    .map_err(backend)?;
                if open {
                    opened.insert(id.as_str(), ()).map_err(backend)?;
                } else {
                    opened.remove(id.as_str()).map_err(backend)?;
                }
                let mut excess = jobs
                    .len()
                    .map_err(backend)?
                    .saturating_sub(JOBS_KEPT as u64);
                let mut oldest = Vec::new();
                for entry in jobs.iter().map_err(backend)? {
                    if excess == 0 {
                        break;
                    }
                    let (k, _) = entry.map_err(backend)?;
                    let k = k.value().to_owned();
                    if opened.get(k.as_str()).map_err(backend)?.is_none() {
                        oldest.push(k);
                        excess -= 1;
                    }
                }
                for id in oldest {
                    jobs.remove(id.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn open_jobs(&self) -> Result<Vec<String>, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let opened = txn.open_table(OPEN_JOBS).map_err(backend)?;
            let mut ids = Vec::new();
            for entry in opened.iter().map_err(backend)? {
                ids.push(entry.map_err(backend)?.0.value().to_owned());
            }
            Ok(ids)
        })
        .await
    }

    async fn close_job(&self, id: &str) -> Result<(), MetaError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(OPEN_JOBS)
                .map_err(backend)?
                .remove(id.as_str())
                .map_err(backend)?;
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn job(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let jobs = txn.open_table(JOBS).map_err(backend)?;
            Ok(jobs
                .get(id.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn recent_jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let jobs = txn.open_table(JOBS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in jobs.iter().map_err(backend)?.rev().take(limit) {
                let (_, v) = entry.map_err(backend)?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
        .await
    }

    async fn add_counts(
        &self,
        minute: u64,
        counts: &[(String, u64)],
        pulls: &[(String, u64)],
    ) -> Result<(), MetaError> {
        if counts.is_empty() && pulls.is_empty() {
            return Ok(());
        }
        let (counts, pulls) = (counts.to_vec(), pulls.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut total = txn.open_table(COUNTS).map_err(backend)?;
                let mut by_minute = txn.open_table(MINUTE_COUNTS).map_err(backend)?;
                for (name, n) in &counts {
                    let t = total
                        .get(name.as_str())
                        .map_err(backend)?
                        .map_or(0, |v| v.value());
                    total
                        .insert(name.as_str(), t.saturating_add(*n))
                        .map_err(backend)?;
                    let key = minute_key(minute, name);
                    let m = by_minute
                        .get(key.as_str())
                        .map_err(backend)?
                        .map_or(0, |v| v.value());
                    by_minute
                        .insert(key.as_str(), m.saturating_add(*n))
                        .map_err(backend)?;
                }
                let horizon = minute_key(minute.saturating_sub(MINUTES_KEPT), "");
                by_minute
                    .retain_in(..horizon.as_str(), |_, _| false)
                    .map_err(backend)?;
                let mut pulled = txn.open_table(PULLS).map_err(backend)?;
                for (repo, n) in &pulls {
                    let p = pulled
                        .get(repo.as_str())
                        .map_err(backend)?
                        .map_or(0, |v| v.value());
                    pulled
                        .insert(repo.as_str(), p.saturating_add(*n))
                        .map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn counts(&self, from: u64, to: u64) -> Result<Counts, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let mut counts = Counts::default();
            for entry in txn
                .open_table(COUNTS)
                .map_err(backend)?
                .iter()
                .map_err(backend)?
            {
                let (k, v) = entry.map_err(backend)?;
                counts.total.insert(k.value().to_owned(), v.value());
            }
            let by_minute = txn.open_table(MINUTE_COUNTS).map_err(backend)?;
            let (lo, hi) = (minute_key(from, ""), minute_key(to.saturating_add(1), ""));
            for entry in by_minute.range(lo.as_str()..hi.as_str()).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let Some((m, name)) = k.value().split_once('/') else {
                    continue;
                };
                let Ok(m) = m.parse::<u64>() else { continue };
                match counts.minutes.last_mut() {
                    Some((last, map)) if *last == m => {
                        map.insert(name.to_owned(), v.value());
                    }
                    _ => counts
                        .minutes
                        .push((m, [(name.to_owned(), v.value())].into_iter().collect())),
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn top_pulls(&self, n: usize) -> Result<Vec<(String, u64)>, MetaError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let mut all = Vec::new();
            for entry in txn
                .open_table(PULLS)
                .map_err(backend)?
                .iter()
                .map_err(backend)?
            {
                let (k, v) = entry.map_err(backend)?;
                all.push((k.value().to_owned(), v.value()));
            }
            all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            all.truncate(n);
            Ok(all)
        })
        .await
    }

    async fn put_replica(
        &self,
        _name: &str,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), MetaError> {
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((record.to_vec(), Instant::now() + ttl));
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<Vec<u8>>, MetaError> {
        let replica = self.replica.lock().unwrap_or_else(|p| p.into_inner());
        Ok(replica
            .iter()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn add_failures(&self, records: &[Vec<u8>]) -> Result<(), MetaError> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            failures.push_front(r.clone());
        }
        failures.truncate(FAILURES_KEPT);
        Ok(())
    }

    async fn failures(&self, n: usize) -> Result<Vec<Vec<u8>>, MetaError> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        Ok(failures.iter().take(n).cloned().collect())
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError> {
        let key = format!("{repo}\0{subject}\0{referrer}");
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(REFERRERS)
                .map_err(backend)?
                .insert(key.as_str(), ())
                .map_err(backend)?;
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError> {
        let key = format!("{repo}\0{subject}\0{referrer}");
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(REFERRERS)
                .map_err(backend)?
                .remove(key.as_str())
                .map_err(backend)?;
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<Digest>, MetaError> {
        let start = format!("{repo}\0{subject}\0");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(REFERRERS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.range(start.as_str()..).map_err(backend)? {
                let (k, _) = entry.map_err(backend)?;
                let Some(referrer) = k.value().strip_prefix(start.as_str()) else {
                    break;
                };
                if let Ok(d) = Digest::parse(referrer) {
                    out.push(d);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_upload(&self, id: &str, record: &[u8], ttl: Duration) -> Result<(), MetaError> {
        let until = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut value = until.to_be_bytes().to_vec();
        value.extend_from_slice(record);
        let id = id.to_owned();
        // Lapsed sessions go as new ones come, once a minute at most.
        let now = now_ms();
        let swept = &self.uploads_swept;
        let sweep = swept.load(std::sync::atomic::Ordering::Relaxed) + 60_000 < now;
        if sweep {
            swept.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut uploads = txn.open_table(UPLOADS).map_err(backend)?;
                uploads
                    .insert(id.as_str(), value.as_slice())
                    .map_err(backend)?;
                let lapsed: Vec<String> = if !sweep {
                    Vec::new()
                } else {
                    uploads
                        .iter()
                        .map_err(backend)?
                        .filter_map(Result::ok)
                        .filter(|(_, v)| lapse_of(v.value()) <= now)
                        .map(|(k, _)| k.value().to_owned())
                        .collect()
                };
                for k in lapsed {
                    uploads.remove(k.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn upload(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let uploads = txn.open_table(UPLOADS).map_err(backend)?;
            Ok(uploads
                .get(id.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_vec())
                .filter(|v| v.len() >= 8 && lapse_of(v) > now_ms())
                .map(|v| v[8..].to_vec()))
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), MetaError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(UPLOADS)
                .map_err(backend)?
                .remove(id.as_str())
                .map_err(backend)?;
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn health(&self) -> Result<(), MetaError> {
        self.blocking(|db| db.begin_read().map(drop).map_err(backend))
            .await
    }
}

/// When an upload session's value lapses (0 for a value too short).
fn lapse_of(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

fn last_uses_in(
    db: &Database,
    kind: UseKind,
    keys: &[String],
) -> Result<Vec<Option<u64>>, MetaError> {
    let txn = db.begin_read().map_err(backend)?;
    let table = txn.open_table(uses_table(kind)).map_err(backend)?;
    keys.iter()
        .map(|k| Ok(table.get(k.as_str()).map_err(backend)?.map(|v| v.value())))
        .collect()
}

/// Leases with expiry, in memory.
#[derive(Default)]
struct Leases {
    held: Mutex<HashMap<String, (String, Instant)>>,
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Option<String> {
        let mut map = self.map();
        let now = Instant::now();
        map.retain(|_, (_, until)| *until > now);
        match map.get(name) {
            Some((h, _)) => Some(h.clone()),
            None => {
                map.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                None
            }
        }
    }

    fn renew(&self, name: &str, holder: &str, ttl: Duration) -> bool {
        let mut map = self.map();
        match map.get_mut(name) {
            Some((h, until)) if h == holder && *until > Instant::now() => {
                *until = Instant::now() + ttl;
                true
            }
            _ => false,
        }
    }

    fn replace(&self, name: &str, holder: &str, value: &str, ttl: Duration) -> bool {
        let mut map = self.map();
        match map.get_mut(name) {
            Some((h, until)) if h == holder && *until > Instant::now() => {
                *h = value.to_owned();
                *until = Instant::now() + ttl;
                true
            }
            _ => false,
        }
    }

    fn release(&self, name: &str, holder: &str) {
        let mut map = self.map();
        if map.get(name).is_some_and(|(h, _)| h == holder) {
            map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn embedded_meta_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let meta = super::EmbeddedMeta::open(dir.path()).unwrap();
        crate::meta::suite::run(&meta).await;
        crate::meta::suite::leases(&meta).await;
        crate::meta::suite::throttle(&meta).await;
        crate::meta::suite::uses_and_removals(&meta).await;
        crate::meta::suite::forgetting(&meta).await;
        drop(meta);
        // What was written survives reopening.
        let meta = super::EmbeddedMeta::open(dir.path()).unwrap();
        crate::meta::suite::check_persisted(&meta).await;
        crate::meta::suite::jobs(&meta).await;
        crate::meta::suite::uploads(&meta).await;
        crate::meta::suite::console_figures(&meta).await;
    }
}
