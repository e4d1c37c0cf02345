//! Blobs as files: `<root>/blobs/<algorithm>/<first two hex>/<hex>`. A blob
//! appears by rename, so a reader sees all of it or nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::StreamExt;

use super::{BlobBody, BlobStore, StorageError};
use crate::range::{RangeError, RangeSpec};
use crate::reference::Digest;
use crate::zerocopy::FileSlice;

/// Read buffer per blob stream: large reads keep syscalls per GiB low.
const READ_CHUNK: u64 = 512 * 1024;

pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating if needed) a store under `root`.
    pub async fn open(root: &Path) -> io::Result<Self> {
        tokio::fs::create_dir_all(root.join("blobs")).await?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The store under `root`, as it is (nothing created).
    pub(crate) fn at(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub(crate) fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        // Inline, not on the blocking pool: every blob request starts with
        // this, the inode is almost always cached (a few microseconds), and
        // a hop to a pool thread and back costs far more than that.
        match std::fs::metadata(self.path_of(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        // Inline, like `stat`: a warm blob request is often just this open
        // (when the blob is linked to its repository), and a cold one asks
        // it first.
        let path = self.path_of(digest);
        let opened = std::fs::File::open(path).and_then(|file| {
            let size = file.metadata()?.len();
            Ok((file, size))
        });
        let (file, size) = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let range = match range.map(|r| r.resolve(size)).transpose() {
            Ok(r) => r,
            Err(RangeError::Unsatisfiable) => return Err(StorageError::Unsatisfiable { size }),
            Err(RangeError::Malformed) => return Err(StorageError::MalformedRange),
        };
        let (start, len) = range.map_or((0, size), |r| (r.start, r.len()));
        let file = std::sync::Arc::new(file);
        Ok(Some(BlobBody {
            size,
            range,
            stream: read_chunks(file.clone(), start, len).boxed(),
            file: Some(FileSlice { file, start, len }),
        }))
    }

    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
        // The spool sits on this filesystem: storing is a rename, done in
        // one trip to the blocking pool.
        let (spool, dest) = (spool.to_owned(), self.path_of(digest));
        tokio::task::spawn_blocking(move || move_into_place(&spool, &dest, size))
            .await
            .map_err(io::Error::other)?
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.path_of(digest)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn health(&self) -> Result<(), StorageError> {
        tokio::fs::metadata(self.root.join("blobs")).await?;
        Ok(())
    }
}

/// `len` bytes of `file` from `start`, as large chunks read on the blocking
/// pool straight into the buffers handed to the client: one copy out of the
/// page cache per byte, one blocking-pool hop per chunk.
fn read_chunks(
    file: std::sync::Arc<std::fs::File>,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = io::Result<bytes::Bytes>> + Send + 'static {
    futures::stream::unfold(Some((file, start, start + len)), |state| async move {
        let (file, pos, end) = state?;
        if pos >= end {
            return None;
        }
        let n = (end - pos).min(READ_CHUNK);
        let reading = file.clone();
        let read = tokio::task::spawn_blocking(move || read_at(&reading, pos, n as usize))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        Some(match read {
            Ok(buf) => (Ok(buf), Some((file, pos + n, end))),
            Err(e) => (Err(e), None),
        })
    })
}

/// Exactly `n` bytes of `file` from `pos`, read positionally (readers may
/// share the file) into a buffer that is not zeroed first. Blocking.
pub(crate) fn read_at(file: &std::fs::File, pos: u64, n: usize) -> io::Result<bytes::Bytes> {
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let at = pos + buf.len() as u64;
        let got = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The capacity may exceed `n`; bytes past it are not ours.
    buf.truncate(n);
    Ok(bytes::Bytes::from(buf))
}

/// Checks that `spool` holds `size` bytes and puts them on disk, so that a
/// name given to the file afterwards never stands for less after a crash.
/// (The name itself is not synced: losing it costs a refetch, no wrong
/// byte.) Blocking.
pub(crate) fn sync_spool(spool: &Path, size: u64) -> Result<(), StorageError> {
    let file = std::fs::File::open(spool)?;
    let actual = file.metadata()?.len();
    if actual != size {
        return Err(StorageError::Backend(format!(
            "spool file holds {actual} bytes, expected {size}"
        )));
    }
    file.sync_all()?;
    Ok(())
}

/// Renames `spool` (which must hold `size` bytes) to `dest`. Blocking.
pub(crate) fn move_into_place(spool: &Path, dest: &Path, size: u64) -> Result<(), StorageError> {
    sync_spool(spool, size)?;
    match std::fs::rename(spool, dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some(dir) = dest.parent() else {
                return Err(StorageError::Backend("blob path has no parent".into()));
            };
            std::fs::create_dir_all(dir)?;
            std::fs::rename(spool, dest)?;
        }
        other => other?,
    }
    Ok(())
}

/// Free and total bytes of the filesystem holding `path`.
pub fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

/// The blobs under `root` (laid out as the fs store lays them out), least
/// recently modified first, from names and `stat` alone. Files whose names
/// are not digests are not blobs: removed. Blocking.
pub(crate) fn blobs_in(root: &Path) -> io::Result<Vec<(Digest, u64)>> {
    Ok(blobs_by_time(root, true)?
        .into_iter()
        .map(|(_, d, s)| (d, s))
        .collect())
}

/// The blobs under `root` with their modification times, oldest first;
/// stray files removed when `remove_strays`. Blocking.
pub(crate) fn blobs_by_time(
    root: &Path,
    remove_strays: bool,
) -> io::Result<Vec<(SystemTime, Digest, u64)>> {
    let mut found = Vec::new();
    let top = match std::fs::read_dir(root.join("blobs")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        other => other?,
    };
    for algorithm in top {
        let algorithm = algorithm?;
        for prefix in std::fs::read_dir(algorithm.path())? {
            for file in std::fs::read_dir(prefix?.path())? {
                let file = file?;
                let name = format!(
                    "{}:{}",
                    algorithm.file_name().to_string_lossy(),
                    file.file_name().to_string_lossy()
                );
                // A blob removed while the scan runs is simply not found.
                let meta = match file.metadata() {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    other => other?,
                };
                match Digest::parse(&name) {
                    Ok(digest) if meta.is_file() => {
                        let at = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((at, digest, meta.len()));
                    }
                    _ if meta.is_file() && remove_strays => std::fs::remove_file(file.path())?,
                    // Not ours to remove: ignored.
                    _ => {}
                }
            }
        }
    }
    found.sort_by_key(|(at, ..)| *at);
    Ok(found)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn fs_store_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::FsBlobStore::open(dir.path()).await.unwrap();
        crate::storage::suite::run(&store, &dir.path().join("scratch")).await;
    }
}
