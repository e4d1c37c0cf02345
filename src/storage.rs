//! Content-addressed blob storage: the `BlobStore` trait and its backends.
//! A store only ever holds verified bytes under a digest's key.

mod budget;
pub(crate) mod fs;
mod lru;
pub(crate) mod s3;
mod tiered;
mod verify;

use std::io;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use thiserror::Error;

pub use budget::{Budget, BudgetedFsStore, Evicted, Expiry, Keep, Scrub, Survey};
pub use fs::{FsBlobStore, free_space};
pub use s3::S3BlobStore;
pub use tiered::TieredBlobStore;
pub use verify::verified;

use crate::range::{ByteRange, RangeSpec};
use crate::reference::Digest;
use crate::zerocopy::FileSlice;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("blob storage I/O: {0}")]
    Io(#[from] io::Error),
    #[error("range not satisfiable for a blob of {size} bytes")]
    Unsatisfiable { size: u64 },
    #[error("malformed Range header")]
    MalformedRange,
    #[error("blob storage: {0}")]
    Backend(String),
}

/// Bytes of a stored blob, whole or a range of it.
pub struct BlobBody {
    /// Size of the whole blob.
    pub size: u64,
    /// The part being sent, when the request named a range.
    pub range: Option<ByteRange>,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
    /// The same bytes as a region of a local file, when the store keeps
    /// blobs as files: the server can then send them without copying.
    pub file: Option<FileSlice>,
}

impl BlobBody {
    /// How many bytes `stream` yields.
    pub fn len(&self) -> u64 {
        self.range.map_or(self.size, |r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stored blob, as a listing of the store shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub digest: Digest,
    pub size: u64,
    pub written: std::time::SystemTime,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The blob's size, or `None` when it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// Streams a stored blob, or the part `range` selects.
    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError>;

    /// Stores `digest` from the local spool file `spool`, which holds its
    /// `size` bytes, already verified. The store may take the file (rename)
    /// or read it. Nothing is visible under the digest unless whole; a
    /// spool of another length is refused.
    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError>;

    /// Whether the store is on another machine (S3). Storing a blob then
    /// uploads it, taking bandwidth and CPU that clients reading the same
    /// blob from this replica could use, and every lookup is a round trip;
    /// on the local disk a store is a rename and a lookup a `stat`.
    fn remote(&self) -> bool {
        false
    }

    /// Whether a read of `digest` would come from a shared store behind a
    /// copy this replica could keep: the mirror then reads it from there
    /// once ([`BlobStore::get_shared`]), however many clients here ask,
    /// and keeps what it read as the copy ([`BlobStore::keep_copy`]).
    fn reads_shared(&self, _digest: &Digest) -> bool {
        false
    }

    /// The whole blob from the shared store, past any local copy.
    async fn get_shared(&self, digest: &Digest) -> Result<Option<BlobBody>, StorageError> {
        self.get(digest, None).await
    }

    /// Keeps `spool`, which holds the verified `size` bytes of a blob the
    /// shared store holds, as this replica's copy; whether it did (a copy
    /// that does not fit is not made).
    async fn keep_copy(
        &self,
        _digest: &Digest,
        _spool: &Path,
        _size: u64,
    ) -> Result<bool, StorageError> {
        Ok(false)
    }

    /// Removes a blob; removing a missing blob is not an error.
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;

    /// Whether the store can be read and written now.
    async fn health(&self) -> Result<(), StorageError>;

    /// A write on this machine's disk failed for lack of space: evict now
    /// if the store keeps a budget there.
    fn make_room(&self) {}

    /// Writes down the uses noted in memory (at shutdown: a short-lived
    /// process, `pier sync --config`, never reaches the next batch).
    async fn record_uses(&self) {}

    /// Aborts the multipart uploads under the store's blob keys that were
    /// begun more than `older_than` ago, and returns how many. A process
    /// that dies mid-upload leaves its upload open, holding the parts sent
    /// so far (billed on AWS) until someone aborts it; uploads younger than
    /// `older_than` may still be running on another replica. Stores
    /// without multipart uploads have none.
    async fn abort_stale_uploads(
        &self,
        _older_than: std::time::Duration,
    ) -> Result<usize, StorageError> {
        Ok(0)
    }

    /// Every blob the store holds, with its size and when it was written:
    /// what a budget over a store that other processes write to too (a
    /// bucket) is kept from. Stores that cannot list say so in an error.
    async fn inventory(&self) -> Result<Vec<Listed>, StorageError> {
        Err(StorageError::Backend(
            "this store cannot list its blobs".into(),
        ))
    }

    /// When the stored blob was written, `None` when it is not stored.
    async fn written_at(
        &self,
        _digest: &Digest,
    ) -> Result<Option<std::time::SystemTime>, StorageError> {
        Err(StorageError::Backend(
            "this store cannot date its blobs".into(),
        ))
    }

    /// A URL clients can fetch the stored blob from directly for `expires`,
    /// when the store has such a thing.
    async fn presigned_url(
        &self,
        _digest: &Digest,
        _expires: std::time::Duration,
    ) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
}

#[cfg(test)]
pub(crate) mod suite;
