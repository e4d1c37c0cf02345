//! A shared store (a bucket) kept within its budget: every blob served
//! from it (a read, a local copy, a presigned redirect) or stored in it is
//! a use; every store is counted, and wakes eviction when it takes usage
//! over `max_size`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::evict::{Evictor, publish};
use super::uses::UseLog;
use crate::meta::{MetaStore, blob_lease, lease_done};
use crate::range::RangeSpec;
use crate::reference::Digest;
use crate::storage::{BlobBody, BlobStore, Listed, StorageError};

pub struct BudgetedSharedStore {
    inner: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    uses: Arc<UseLog>,
    evictor: Arc<Evictor>,
}

impl BudgetedSharedStore {
    pub fn new(
        inner: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        uses: Arc<UseLog>,
        evictor: Arc<Evictor>,
    ) -> Self {
        Self {
            inner,
            meta,
            uses,
            evictor,
        }
    }

    /// Counts `bytes` (and `blobs`) more stored; wakes eviction past the
    /// budget.
    async fn count(&self, bytes: i64, blobs: i64) {
        match self.meta.add_usage(bytes, blobs).await {
            Ok(usage) => {
                publish(usage);
                if let Some(max) = self.evictor.budget().max_size
                    && usage.0 > 0
                    && usage.0 as u64 > max
                {
                    self.evictor.wake();
                }
            }
            // The next pass counts from the listing.
            Err(e) => tracing::debug!(error = %e, "cannot count a stored blob"),
        }
    }
}

#[async_trait]
impl BlobStore for BudgetedSharedStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.inner.stat(digest).await
    }

    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        let body = self.inner.get(digest, range).await?;
        if body.is_some() {
            self.uses.note(digest);
        }
        Ok(body)
    }

    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
        self.inner.store(digest, spool, size).await?;
        self.uses.note(digest);
        self.count(size as i64, 1).await;
        Ok(())
    }

    fn remote(&self) -> bool {
        self.inner.remote()
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        let size = self.inner.stat(digest).await?;
        self.inner.delete(digest).await?;
        if let Some(size) = size {
            self.count(-(size as i64), -1).await;
        }
        Ok(())
    }

    async fn health(&self) -> Result<(), StorageError> {
        self.inner.health().await
    }

    fn make_room(&self) {
        self.inner.make_room();
    }

    async fn abort_stale_uploads(&self, older_than: Duration) -> Result<usize, StorageError> {
        self.inner.abort_stale_uploads(older_than).await
    }

    async fn inventory(&self) -> Result<Vec<Listed>, StorageError> {
        self.inner.inventory().await
    }

    async fn written_at(
        &self,
        digest: &Digest,
    ) -> Result<Option<std::time::SystemTime>, StorageError> {
        self.inner.written_at(digest).await
    }

    async fn presigned_url(
        &self,
        digest: &Digest,
        expires: Duration,
    ) -> Result<Option<String>, StorageError> {
        // A blob claimed for removal may be gone before the client follows
        // the URL: it is streamed instead (and found missing, a miss).
        match self.meta.lease(&blob_lease(digest)).await {
            Ok(Some(holder)) if !lease_done(&holder) => return Ok(None),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%digest, error = %e, "cannot tell whether a blob is being evicted");
                return Ok(None);
            }
        }
        let url = self.inner.presigned_url(digest, expires).await?;
        if url.is_some() {
            self.uses.note(digest);
        }
        Ok(url)
    }
}
