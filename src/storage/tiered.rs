//! A shared store (S3) with a bounded copy of recently served blobs on this
//! replica's local disk, served like the fs store (sendfile, no request to
//! the bucket). Blobs are immutable and named by digest, so a local copy
//! never goes stale; a copy is only ever made from verified bytes: the
//! spool of a fetch this replica committed, or the spool of the one read of
//! the shared store that this replica's clients followed (the mirror's
//! flight, which checks the digest as a fetch does). Least recently used
//! copies go first when the budget is full.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::budget::short_of_space;
use super::fs::{free_space, move_into_place, sync_spool};
use super::lru::Lru;
use super::{BlobBody, BlobStore, FsBlobStore, StorageError};
use crate::config::MinFree;
use crate::range::RangeSpec;
use crate::reference::Digest;
use crate::telemetry::metrics::metrics;

pub struct TieredBlobStore {
    shared: Arc<dyn BlobStore>,
    local: Arc<LocalCopies>,
}

impl TieredBlobStore {
    /// Fronts `shared` with copies under `dir`, at most `budget` bytes of
    /// them, and fewer when their filesystem has less than `min_free` free;
    /// copies a previous run left there are kept.
    pub async fn open(
        shared: Arc<dyn BlobStore>,
        dir: &Path,
        budget: u64,
        min_free: MinFree,
    ) -> io::Result<Self> {
        let files = FsBlobStore::open(dir).await?;
        let (root, tmp) = (dir.to_owned(), dir.join("tmp"));
        let found = tokio::task::spawn_blocking(move || {
            // Copies being written when the last run stopped are incomplete.
            match std::fs::remove_dir_all(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::create_dir_all(&tmp)?;
            super::fs::blobs_in(&root)
        })
        .await
        .map_err(io::Error::other)??;
        let local = LocalCopies {
            files,
            root: dir.to_owned(),
            tmp: dir.join("tmp"),
            index: Mutex::new(Lru::new(budget)),
            min_free,
        };
        for (digest, size) in found {
            local.admit(digest, size).await;
        }
        tracing::info!(
            dir = %dir.display(),
            bytes = local.index().used(),
            budget,
            "local blob copies ready"
        );
        let local = Arc::new(local);
        local.keep_free(0).await;
        tokio::spawn(reconcile_every(Arc::downgrade(&local)));
        Ok(Self { shared, local })
    }
}

/// How often the index of local copies is checked against the files.
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// How often free space is checked (other programs fill disks too).
const FREE_SPACE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps free space, and reconciles the copies' index with their files,
/// until the store is gone.
async fn reconcile_every(local: std::sync::Weak<LocalCopies>) {
    let mut last = std::time::Instant::now();
    loop {
        tokio::time::sleep(FREE_SPACE_EVERY).await;
        let Some(local) = local.upgrade() else {
            return;
        };
        local.keep_free(0).await;
        if last.elapsed() >= RECONCILE_EVERY {
            last = std::time::Instant::now();
            if let Err(e) = local.reconcile().await {
                tracing::warn!(error = %e, "cannot check the local blob copies");
            }
        }
    }
}

#[async_trait]
impl BlobStore for TieredBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        if self.local.holds(digest)
            && let Ok(Some(size)) = self.local.files.stat(digest).await
        {
            return Ok(Some(size));
        }
        self.shared.stat(digest).await
    }

    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        if let Some(body) = self.local.get(digest, range).await? {
            return Ok(Some(body));
        }
        self.shared.get(digest, range).await
    }

    /// Keeps the verified spool file as this replica's local copy (a second
    /// name for it, so the shared store can still read it), then stores the
    /// blob in the shared store. If that fails, the copy goes too: while it
    /// existed, this replica would take the blob for stored and never try
    /// again.
    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
        let kept = self.local.keep_spool(digest, spool, size).await?;
        let stored = self.shared.store(digest, spool, size).await;
        if stored.is_err()
            && kept
            && let Err(e) = self.local.drop_copy(digest).await
        {
            tracing::warn!(%digest, error = %e, "cannot remove the local copy of a blob that was not stored");
        }
        stored
    }

    fn remote(&self) -> bool {
        self.shared.remote()
    }

    /// Counted as a miss of the local copies when it does.
    fn reads_shared(&self, digest: &Digest) -> bool {
        let missing = !self.local.holds(digest);
        if missing {
            metrics().local_copy("miss");
        }
        missing
    }

    async fn get_shared(&self, digest: &Digest) -> Result<Option<BlobBody>, StorageError> {
        self.shared.get(digest, None).await
    }

    async fn keep_copy(
        &self,
        digest: &Digest,
        spool: &Path,
        size: u64,
    ) -> Result<bool, StorageError> {
        if self.local.holds(digest) {
            return Ok(true);
        }
        // A copy that would take the filesystem below `min_free` is not
        // made: the blob is read from the shared store next time too.
        if free_space(&self.local.root).is_ok_and(|(free, total)| {
            short_of_space(self.local.min_free, free.saturating_sub(size), total).is_some()
        }) {
            self.make_room();
            return Ok(false);
        }
        self.local.keep_spool(digest, spool, size).await
    }

    fn make_room(&self) {
        let local = self.local.clone();
        tokio::spawn(async move { local.keep_free(0).await });
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        self.local.drop_copy(digest).await?;
        self.shared.delete(digest).await
    }

    async fn health(&self) -> Result<(), StorageError> {
        self.shared.health().await
    }

    async fn abort_stale_uploads(
        &self,
        older_than: std::time::Duration,
    ) -> Result<usize, StorageError> {
        // Local copies are written whole or not at all; only the shared
        // store has uploads.
        self.shared.abort_stale_uploads(older_than).await
    }

    // A budget bounds the shared store; local copies have their own.
    async fn inventory(&self) -> Result<Vec<super::Listed>, StorageError> {
        self.shared.inventory().await
    }

    async fn written_at(
        &self,
        digest: &Digest,
    ) -> Result<Option<std::time::SystemTime>, StorageError> {
        self.shared.written_at(digest).await
    }

    async fn presigned_url(
        &self,
        digest: &Digest,
        expires: std::time::Duration,
    ) -> Result<Option<String>, StorageError> {
        // `stat` may have answered from the local copy: the URL is only
        // good if the bucket has the object.
        if self.local.holds(digest) && self.shared.stat(digest).await?.is_none() {
            return Ok(None);
        }
        self.shared.presigned_url(digest, expires).await
    }
}

/// The local copies: files laid out like the fs store, and their sizes and
/// recency.
struct LocalCopies {
    files: FsBlobStore,
    /// Where `files` keeps them.
    root: PathBuf,
    /// Copies on their way from another filesystem.
    tmp: PathBuf,
    index: Mutex<Lru<Digest>>,
    /// Free space kept on the copies' filesystem.
    min_free: MinFree,
}

impl LocalCopies {
    fn index(&self) -> MutexGuard<'_, Lru<Digest>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn holds(&self, digest: &Digest) -> bool {
        self.index().contains(digest)
    }

    /// The local copy, or `None` when there is none (or it cannot be read:
    /// the shared store still has the blob).
    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        if !self.index().touch(digest) {
            metrics().local_copy("miss");
            return Ok(None);
        }
        match self.files.get(digest, range).await {
            Ok(Some(body)) => {
                metrics().local_copy("hit");
                Ok(Some(body))
            }
            Err(e @ (StorageError::Unsatisfiable { .. } | StorageError::MalformedRange)) => Err(e),
            Ok(None) => {
                // Removed behind our back: forget it.
                self.index().remove(digest);
                self.publish_size();
                metrics().local_copy("miss");
                Ok(None)
            }
            Err(e) => {
                // Perhaps passing (out of file descriptors): the shared
                // store serves this read, the copy stays counted.
                tracing::warn!(%digest, error = %e, "cannot read the local copy of a blob");
                metrics().local_copy("miss");
                Ok(None)
            }
        }
    }

    /// Keeps a fetch's verified spool file as the local copy, when it fits;
    /// whether it did. Only a spool of another length than `size` is an
    /// error: a copy that cannot be made costs a read from the shared store
    /// later, nothing more.
    async fn keep_spool(
        &self,
        digest: &Digest,
        spool: &Path,
        size: u64,
    ) -> Result<bool, StorageError> {
        if !self.index().fits(size) {
            return Ok(false);
        }
        let (from, dest) = (spool.to_owned(), self.files.path_of(digest));
        let tmp = self.tmp.join(format!("{}.copy", digest.hex()));
        match tokio::task::spawn_blocking(move || link_copy(&from, &dest, &tmp, size)).await {
            Ok(Ok(())) => {
                self.admit(digest.clone(), size).await;
                Ok(true)
            }
            Ok(Err(e @ StorageError::Backend(_))) => Err(e),
            Ok(Err(e)) => {
                tracing::warn!(%digest, error = %e, "cannot keep a local copy of a fetched blob");
                Ok(false)
            }
            Err(e) => Err(StorageError::Io(io::Error::other(e))),
        }
    }

    /// Removes the least recently used copies while their filesystem has
    /// less than `min_free` free, or would after `more` bytes are written.
    async fn keep_free(&self, more: u64) {
        let space = match free_space(&self.root) {
            Ok(space) => space,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell the local copies' free space");
                return;
            }
        };
        let (free, total) = (space.0.saturating_sub(more), space.1);
        let Some(mut excess) = short_of_space(self.min_free, free, total) else {
            return;
        };
        let mut evicted = Vec::new();
        {
            let mut index = self.index();
            while excess > 0 {
                let Some((digest, size)) = index.pop_oldest() else {
                    break;
                };
                excess = excess.saturating_sub(size);
                evicted.push(digest);
            }
        }
        if !evicted.is_empty() {
            tracing::info!(
                copies = evicted.len(),
                "low on free space: removing local blob copies"
            );
        }
        self.remove_evicted(evicted).await;
    }

    /// Counts a verified copy now in place, removing what no longer fits
    /// the budget or the free space.
    async fn admit(&self, digest: Digest, size: u64) {
        let evicted = self.index().insert(digest, size);
        self.remove_evicted(evicted).await;
        self.keep_free(0).await;
    }

    async fn remove_evicted(&self, evicted: Vec<Digest>) {
        self.publish_size();
        for old in evicted {
            metrics().local_copy("evicted");
            if let Err(e) = self.files.delete(&old).await {
                tracing::warn!(digest = %old, error = %e, "cannot remove an evicted local copy");
            }
            // A new copy of the same blob admitted between the eviction and
            // the removal lost its file to it: it is not held any more.
            if self.holds(&old) && matches!(self.files.stat(&old).await, Ok(None)) {
                self.index().remove(&old);
                self.publish_size();
            }
        }
    }

    /// Makes the index agree with the files, so the bytes counted are the
    /// bytes on disk: an entry whose file is gone is forgotten, a file the
    /// index lacks (its removal failed, or raced a new copy) is counted.
    async fn reconcile(&self) -> io::Result<()> {
        let root = self.root.clone();
        let on_disk = tokio::task::spawn_blocking(move || super::fs::blobs_in(&root))
            .await
            .map_err(io::Error::other)??;
        let listed: HashSet<&Digest> = on_disk.iter().map(|(d, _)| d).collect();
        let indexed = self.index().keys();
        for digest in indexed.into_iter().filter(|d| !listed.contains(d)) {
            // Made since the scan began, or really gone.
            if matches!(self.files.stat(&digest).await, Ok(None)) {
                self.index().remove(&digest);
            }
        }
        for (digest, size) in on_disk {
            if !self.holds(&digest) {
                self.admit(digest, size).await;
            }
        }
        self.publish_size();
        Ok(())
    }

    async fn drop_copy(&self, digest: &Digest) -> Result<(), StorageError> {
        self.index().remove(digest);
        self.publish_size();
        self.files.delete(digest).await
    }

    fn publish_size(&self) {
        let used = self.index().used();
        metrics()
            .local_copy_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
    }
}

/// Removes a temporary file that may be left after a failure. Blocking.
fn remove_leftover(tmp: &Path) {
    if let Err(e) = std::fs::remove_file(tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a partial local copy");
    }
}

/// Gives the spool (which must hold `size` bytes) a second name at `dest`,
/// or copies it there by way of `tmp` when they are on different
/// filesystems. The bytes reach the disk before the name: after a crash, a
/// copy under its name is whole. Blocking.
fn link_copy(spool: &Path, dest: &Path, tmp: &Path, size: u64) -> Result<(), StorageError> {
    sync_spool(spool, size)?;
    let link = || match std::fs::hard_link(spool, dest) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    };
    let linked = match link() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            link()
        }
        other => other,
    };
    match linked {
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            let copied = std::fs::copy(spool, tmp)
                .map_err(StorageError::from)
                .and_then(|_| move_into_place(tmp, dest, size));
            remove_leftover(tmp);
            copied
        }
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::StreamExt;

    use super::*;

    async fn tiered(dir: &Path, budget: u64) -> (TieredBlobStore, Arc<FsBlobStore>) {
        let shared = Arc::new(FsBlobStore::open(&dir.join("shared")).await.unwrap());
        let store = TieredBlobStore::open(
            shared.clone(),
            &dir.join("local"),
            budget,
            MinFree::Bytes(0),
        )
        .await
        .unwrap();
        (store, shared)
    }

    #[tokio::test]
    async fn tiered_store_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = tiered(dir.path(), 1 << 30).await;
        crate::storage::suite::run(&store, &dir.path().join("scratch")).await;
    }

    async fn read_all(store: &TieredBlobStore, digest: &Digest) -> Vec<u8> {
        let body = store.get(digest, None).await.unwrap().unwrap();
        let chunks: Vec<_> = body.stream.collect().await;
        chunks.into_iter().flat_map(|c| c.unwrap()).collect()
    }

    async fn put_shared(shared: &FsBlobStore, dir: &Path, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let spool = dir.join(format!("{}.spool", digest.hex()));
        std::fs::write(&spool, bytes).unwrap();
        shared
            .store(&digest, &spool, bytes.len() as u64)
            .await
            .unwrap();
        digest
    }

    /// Puts `bytes` in the shared store, then keeps a copy as the mirror
    /// does once a read of it is verified.
    async fn put_copied(
        store: &TieredBlobStore,
        shared: &FsBlobStore,
        dir: &Path,
        bytes: &[u8],
    ) -> Digest {
        let digest = put_shared(shared, dir, bytes).await;
        assert!(store.reads_shared(&digest));
        let spool = dir.join(format!("{}.read", digest.hex()));
        std::fs::write(&spool, bytes).unwrap();
        let size = bytes.len() as u64;
        assert!(store.keep_copy(&digest, &spool, size).await.unwrap());
        assert!(!store.reads_shared(&digest));
        digest
    }

    #[tokio::test]
    async fn a_kept_copy_outlives_the_shared_blob() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared) = tiered(dir.path(), 1 << 20).await;
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        let bytes = vec![7u8; 300_000];
        let digest = put_copied(&store, &shared, &dir.path().join("in"), &bytes).await;
        shared.delete(&digest).await.unwrap();
        assert_eq!(read_all(&store, &digest).await, bytes);
        assert_eq!(store.stat(&digest).await.unwrap(), Some(300_000));
        // A second process finds the copy.
        drop(store);
        let again = TieredBlobStore::open(
            shared.clone(),
            &dir.path().join("local"),
            1 << 20,
            MinFree::Bytes(0),
        )
        .await
        .unwrap();
        assert!(again.local.holds(&digest));
        assert_eq!(read_all(&again, &digest).await, bytes);
    }

    #[tokio::test]
    async fn a_read_of_the_shared_store_makes_no_copy_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared) = tiered(dir.path(), 1 << 30).await;
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = put_shared(&shared, &dir.path().join("in"), &bytes).await;
        assert_eq!(read_all(&store, &digest).await, bytes);
        let range = Some(RangeSpec::From {
            start: 0,
            end: Some(9),
        });
        let part = store.get(&digest, range).await.unwrap().unwrap();
        assert_eq!(part.len(), 10);
        let whole = store.get_shared(&digest).await.unwrap().unwrap();
        assert_eq!(whole.len(), 2_000_000);
        assert!(!store.local.holds(&digest));
        assert!(store.reads_shared(&digest));
        assert!(files_in(&dir.path().join("local")).is_empty());
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files_in(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn the_least_recently_used_copy_goes_when_the_budget_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared) = tiered(dir.path(), 250_000).await;
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        let mut digests = Vec::new();
        for seed in 0..3u8 {
            let bytes = vec![seed; 100_000];
            let d = put_copied(&store, &shared, &dir.path().join("in"), &bytes).await;
            digests.push(d);
            if seed == 1 {
                // The first becomes the most recently used.
                read_all(&store, &digests[0]).await;
            }
        }
        assert!(store.local.holds(&digests[0]));
        assert!(!store.local.holds(&digests[1]));
        assert!(store.local.holds(&digests[2]));
        assert_eq!(store.local.files.stat(&digests[1]).await.unwrap(), None);
        assert_eq!(store.local.index().used(), 200_000);
    }

    #[test]
    fn a_spool_on_another_filesystem_is_copied_and_one_of_another_length_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (dest, tmp) = (dir.path().join("a/b/blob"), dir.path().join("blob.copy"));
        // /dev/shm is a tmpfs where there is one: a link to /tmp fails there.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let spool = shm.path().join("spool");
        std::fs::write(&spool, b"verified bytes").unwrap();
        assert!(matches!(
            link_copy(&spool, &dest, &tmp, 99),
            Err(StorageError::Backend(_))
        ));
        assert!(!dest.exists());
        link_copy(&spool, &dest, &tmp, 14).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"verified bytes");
        // The spool stays for the shared store to read.
        assert_eq!(std::fs::read(&spool).unwrap(), b"verified bytes");
        assert!(!tmp.exists());
    }

    /// Eviction racing a new copy of the same blob, a copy deleted behind
    /// the index, a copy whose removal failed: the bytes counted come back
    /// to the bytes on disk.
    #[tokio::test]
    async fn the_count_of_local_bytes_converges_on_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared) = tiered(dir.path(), 1 << 20).await;
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        let mut digests = Vec::new();
        for seed in 0..3u8 {
            let bytes = vec![seed; 10_000];
            let d = put_copied(&store, &shared, &dir.path().join("in"), &bytes).await;
            digests.push(d);
        }
        assert_eq!(store.local.index().used(), 30_000);

        // Evicted, then copied again before the eviction removed the file.
        store.local.remove_evicted(vec![digests[0].clone()]).await;
        assert!(!store.local.holds(&digests[0]));
        assert_eq!(store.local.index().used(), 20_000);

        // Removed behind the index's back; and a copy the index lacks.
        std::fs::remove_file(store.local.files.path_of(&digests[1])).unwrap();
        let extra = vec![9u8; 5_000];
        let d = Digest::sha256_of(&extra);
        let spool = dir.path().join("in/extra");
        std::fs::write(&spool, &extra).unwrap();
        store.local.files.store(&d, &spool, 5_000).await.unwrap();
        store.local.reconcile().await.unwrap();
        assert!(!store.local.holds(&digests[1]));
        assert!(store.local.holds(&d));
        assert_eq!(store.local.index().used(), 15_000);
    }

    /// A shared store whose writes all fail.
    struct Refusing(FsBlobStore);

    #[async_trait]
    impl BlobStore for Refusing {
        async fn stat(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
            self.0.stat(d).await
        }
        async fn get(
            &self,
            d: &Digest,
            r: Option<RangeSpec>,
        ) -> Result<Option<BlobBody>, StorageError> {
            self.0.get(d, r).await
        }
        async fn store(&self, _: &Digest, _: &Path, _: u64) -> Result<(), StorageError> {
            Err(StorageError::Backend("bucket unreachable".into()))
        }
        async fn delete(&self, d: &Digest) -> Result<(), StorageError> {
            self.0.delete(d).await
        }
        async fn health(&self) -> Result<(), StorageError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn no_local_copy_outlives_a_failed_store() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Refusing(
            FsBlobStore::open(&dir.path().join("shared")).await.unwrap(),
        ));
        let store = TieredBlobStore::open(
            shared,
            &dir.path().join("local"),
            1 << 20,
            MinFree::Bytes(0),
        )
        .await
        .unwrap();
        let spool = dir.path().join("spool");
        std::fs::write(&spool, b"verified").unwrap();
        let digest = Digest::sha256_of(b"verified");
        assert!(store.store(&digest, &spool, 8).await.is_err());
        // Else this replica would take the blob for stored, and never store it.
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        assert!(!store.local.holds(&digest));
        assert_eq!(store.local.files.stat(&digest).await.unwrap(), None);
    }
}
