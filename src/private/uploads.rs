//! Upload sessions that any replica can continue. A session is a record in
//! the metadata store listing the chunks received so far; each chunk is
//! stored as a blob under its own digest the moment it arrives, so nothing
//! of it lives in one replica. A chunk that is the whole blob (what Docker,
//! skopeo and podman send) is then already in place when the upload
//! finishes; several are read back in order, hashed and stored whole.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::{Private, PrivateError, Repo, spool_name};
use crate::meta::now_ms;
use crate::reference::{Algorithm, Digest, Hasher};

/// How long a request may hold an upload while it changes it.
const CHANGE_LEASE: Duration = Duration::from_secs(30);
/// How long finishing may hold it (reading back chunks takes a while).
const FINISH_LEASE: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    repo: String,
    parts: Vec<Part>,
    started_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Part {
    digest: String,
    size: u64,
}

impl Record {
    fn offset(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// Where an upload stands.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    /// Bytes received so far.
    pub offset: u64,
}

/// A request body written to a spool file.
struct Spooled {
    path: PathBuf,
    size: u64,
    digest: Digest,
    /// Set when the body broke off after `size` bytes.
    broken: Option<io::Error>,
}

impl Private {
    pub async fn start(&self, repo: &Repo) -> Result<Session, PrivateError> {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let record = Record {
            repo: repo.key.clone(),
            parts: Vec::new(),
            started_ms: now_ms(),
        };
        self.save(&id, &record).await?;
        Ok(Session { id, offset: 0 })
    }

    pub async fn status(&self, repo: &Repo, id: &str) -> Result<Session, PrivateError> {
        let record = self.load(repo, id).await?;
        Ok(Session {
            id: id.to_owned(),
            offset: record.offset(),
        })
    }

    /// Adds a chunk. `start` is where the client says it begins
    /// (`Content-Range`); what arrived before a body broke off is kept, so
    /// the client can ask where the upload stands and go on from there.
    pub async fn append<S>(
        &self,
        repo: &Repo,
        id: &str,
        start: Option<u64>,
        body: S,
    ) -> Result<Session, PrivateError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
    {
        let record = self.load(repo, id).await?;
        let offset = record.offset();
        if start.is_some_and(|s| s != offset) {
            return Err(PrivateError::RangeInvalid { offset });
        }
        // The session lapses `upload_ttl` after it was last saved: a chunk
        // starts the count again, so one as long as that still finds it.
        self.save(id, &record).await?;
        let spooled = self.spool_body(body, offset).await?;
        let broken = spooled.broken.is_some();
        let result = self.add_part(repo, id, offset, spooled).await;
        match result {
            Ok((session, Some(e))) if broken => {
                tracing::info!(
                    upload = id,
                    offset = session.offset,
                    "an upload chunk broke off; what arrived is kept"
                );
                Err(PrivateError::BodyBroken(e))
            }
            Ok((session, _)) => Ok(session),
            Err(e) => Err(e),
        }
    }

    /// Ends an upload with its last chunk (maybe empty): the blob is
    /// stored under `digest` only if what was received hashes to it.
    pub async fn finish<S>(
        &self,
        repo: &Repo,
        id: &str,
        body: S,
        digest: &Digest,
    ) -> Result<(), PrivateError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
    {
        let record = self.load(repo, id).await?;
        let spooled = self.spool_body(body, record.offset()).await?;
        if let Some(e) = spooled.broken {
            remove(&spooled.path).await;
            return Err(PrivateError::BodyBroken(e));
        }
        let path = spooled.path.clone();
        let result = self
            .holding(
                id,
                FINISH_LEASE,
                busy(),
                self.complete(repo, id, spooled, digest),
            )
            .await;
        // Left when the lease was busy and the chunk never looked at.
        remove(&path).await;
        result
    }

    /// Runs `work` holding the upload's lease: one request at a time
    /// changes a session. `Busy` when another holds it.
    async fn holding<T>(
        &self,
        id: &str,
        ttl: std::time::Duration,
        busy: PrivateError,
        work: impl std::future::Future<Output = Result<T, PrivateError>>,
    ) -> Result<T, PrivateError> {
        let holder = hex::encode(rand::random::<[u8; 8]>());
        let lease = lease_name(id);
        if self
            .meta
            .acquire_lease(&lease, &holder, ttl)
            .await?
            .is_some()
        {
            return Err(busy);
        }
        let result = work.await;
        if let Err(e) = self.meta.release_lease(&lease, &holder).await {
            tracing::debug!(error = %e, "an upload lease is left to lapse");
        }
        result
    }

    /// Ends an upload without a blob. Under the upload's lease, so a chunk
    /// being added cannot bring the session back.
    pub async fn cancel(&self, repo: &Repo, id: &str) -> Result<(), PrivateError> {
        self.load(repo, id).await?;
        self.holding(id, CHANGE_LEASE, busy(), async {
            Ok(self.meta.delete_upload(id).await?)
        })
        .await
    }

    async fn complete(
        &self,
        repo: &Repo,
        id: &str,
        last: Spooled,
        digest: &Digest,
    ) -> Result<(), PrivateError> {
        // Read again under the lease: a chunk may have landed meanwhile.
        let mut record = self.load(repo, id).await?;
        let whole_here = record.parts.is_empty() && digest.algorithm() == Algorithm::Sha256;
        if whole_here {
            // Done with, stored or refused; a storage failure leaves the
            // session for the client to try again.
            let stored = self.store_whole(repo, last, digest).await;
            if matches!(stored, Ok(()) | Err(PrivateError::DigestInvalid(_))) {
                self.meta.delete_upload(id).await?;
            }
            return stored;
        } else {
            if last.size > 0 {
                self.store_spooled(&last).await?;
                record.parts.push(Part {
                    digest: last.digest.to_string(),
                    size: last.size,
                });
            } else {
                remove(&last.path).await;
            }
            let single = match record.parts.as_slice() {
                [only] => only.digest == digest.to_string(),
                _ => false,
            };
            if single {
                self.settle(digest).await?;
                if self.blobs.stat(digest).await?.is_none() {
                    return Err(part_gone());
                }
            } else {
                self.assemble(&record, digest).await.inspect_err(|e| {
                    if matches!(e, PrivateError::DigestInvalid(_)) {
                        tracing::info!(upload = id, "an upload's bytes do not match its digest");
                    }
                })?;
            }
        }
        self.hold(repo, std::slice::from_ref(digest)).await?;
        self.meta.delete_upload(id).await?;
        Ok(())
    }

    /// A blob that came whole in one request (hashed as it spooled):
    /// stored and held by `repo` if it is `digest`, else nothing is.
    async fn store_whole(
        &self,
        repo: &Repo,
        spooled: Spooled,
        digest: &Digest,
    ) -> Result<(), PrivateError> {
        if let Some(e) = spooled.broken {
            remove(&spooled.path).await;
            return Err(PrivateError::BodyBroken(e));
        }
        if spooled.digest != *digest {
            remove(&spooled.path).await;
            return Err(mismatch(digest));
        }
        self.store_spooled(&spooled).await?;
        self.hold(repo, std::slice::from_ref(digest)).await?;
        Ok(())
    }

    /// A whole blob in one request (`POST ?digest=`): no session is kept
    /// for it. (A digest of another algorithm than the one chunks are
    /// hashed with goes through a session, to be read back and checked.)
    pub async fn put_blob<S>(
        &self,
        repo: &Repo,
        digest: &Digest,
        body: S,
    ) -> Result<(), PrivateError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
    {
        if digest.algorithm() != Algorithm::Sha256 {
            let session = self.start(repo).await?;
            return self.finish(repo, &session.id, body, digest).await;
        }
        let spooled = self.spool_body(body, 0).await?;
        self.store_whole(repo, spooled, digest).await
    }

    /// Reads the chunks back in order into one spool file, checks the
    /// digest, and stores the blob.
    async fn assemble(&self, record: &Record, digest: &Digest) -> Result<(), PrivateError> {
        let path = self.spool.join(spool_name());
        let result = async {
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(PrivateError::Spool)?;
            let mut hasher = Hasher::new(digest.algorithm());
            let mut size = 0u64;
            for part in &record.parts {
                let part = Digest::parse(&part.digest).map_err(|_| part_gone())?;
                let mut body = self.blobs.get(&part, None).await?.ok_or_else(part_gone)?;
                while let Some(chunk) = body.stream.next().await {
                    let chunk = chunk.map_err(|e| PrivateError::Storage(e.into()))?;
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                    file.write_all(&chunk).await.map_err(PrivateError::Spool)?;
                }
            }
            file.flush().await.map_err(PrivateError::Spool)?;
            drop(file);
            if hasher.finish() != *digest {
                return Err(mismatch(digest));
            }
            self.settle(digest).await?;
            self.blobs.store(digest, &path, size).await?;
            self.owned(digest).await?;
            Ok(())
        }
        .await;
        remove(&path).await;
        result
    }

    /// Stores a chunk as a blob of its own and adds it to the session, if
    /// the session still stands where the chunk began.
    async fn add_part(
        &self,
        repo: &Repo,
        id: &str,
        offset: u64,
        mut spooled: Spooled,
    ) -> Result<(Session, Option<io::Error>), PrivateError> {
        let broken = spooled.broken.take();
        if spooled.size == 0 {
            remove(&spooled.path).await;
            return Ok((
                Session {
                    id: id.to_owned(),
                    offset,
                },
                broken,
            ));
        }
        self.store_spooled(&spooled).await?;
        let change = async {
            let mut record = self.load(repo, id).await?;
            if record.offset() != offset {
                return Err(PrivateError::RangeInvalid {
                    offset: record.offset(),
                });
            }
            record.parts.push(Part {
                digest: spooled.digest.to_string(),
                size: spooled.size,
            });
            self.keep_parts(&record).await?;
            self.save(id, &record).await?;
            Ok(Session {
                id: id.to_owned(),
                offset: record.offset(),
            })
        };
        let busy = PrivateError::RangeInvalid { offset };
        let session = self.holding(id, CHANGE_LEASE, busy, change).await?;
        Ok((session, broken))
    }

    /// Puts a spooled, hashed chunk in the blob store under its digest
    /// (unless those bytes are stored already).
    async fn store_spooled(&self, spooled: &Spooled) -> Result<(), PrivateError> {
        let result = async {
            self.settle(&spooled.digest).await?;
            if self.blobs.stat(&spooled.digest).await? != Some(spooled.size) {
                self.blobs
                    .store(&spooled.digest, &spooled.path, spooled.size)
                    .await?;
                self.owned(&spooled.digest).await?;
            }
            Ok(())
        }
        .await;
        remove(&spooled.path).await;
        result
    }

    /// Writes a request body to a spool file, hashing it; refuses one that
    /// would take the upload past the largest blob.
    async fn spool_body<S>(&self, mut body: S, offset: u64) -> Result<Spooled, PrivateError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
    {
        tokio::fs::create_dir_all(&self.spool)
            .await
            .map_err(PrivateError::Spool)?;
        let path = self.spool.join(spool_name());
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(PrivateError::Spool)?;
        let mut hasher = Hasher::new(Algorithm::Sha256);
        let mut size = 0u64;
        let mut broken = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            size += chunk.len() as u64;
            if offset + size > self.max_blob_size {
                drop(file);
                remove(&path).await;
                return Err(PrivateError::SizeInvalid(format!(
                    "a blob may be at most {} bytes (fetch.max_blob_size)",
                    self.max_blob_size
                )));
            }
            hasher.update(&chunk);
            crate::telemetry::metrics::metrics()
                .pushed_bytes
                .inc_by(chunk.len() as u64);
            if let Err(e) = file.write_all(&chunk).await {
                drop(file);
                remove(&path).await;
                return Err(PrivateError::Spool(e));
            }
        }
        if let Err(e) = file.flush().await {
            drop(file);
            remove(&path).await;
            return Err(PrivateError::Spool(e));
        }
        Ok(Spooled {
            path,
            size,
            digest: hasher.finish(),
            broken,
        })
    }

    /// Chunks are held like everything private (nothing evicts them), and
    /// used now: the collection takes them once the upload is done or
    /// abandoned and the grace period has passed.
    async fn keep_parts(&self, record: &Record) -> Result<(), PrivateError> {
        let parts: Vec<Digest> = record
            .parts
            .iter()
            .filter_map(|p| Digest::parse(&p.digest).ok())
            .collect();
        self.used(&parts).await?;
        self.meta.link(&self.prefix, &parts).await?;
        Ok(())
    }

    async fn load(&self, repo: &Repo, id: &str) -> Result<Record, PrivateError> {
        let unknown = || PrivateError::UploadUnknown(self.upload_ttl);
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        let raw = self.meta.upload(id).await?.ok_or_else(unknown)?;
        let record: Record = serde_json::from_slice(&raw)
            .map_err(|_| crate::meta::MetaError::Corrupt(format!("upload {id}")))?;
        if record.repo != repo.key {
            return Err(unknown());
        }
        Ok(record)
    }

    async fn save(&self, id: &str, record: &Record) -> Result<(), PrivateError> {
        let raw = serde_json::to_vec(record)
            .map_err(|e| crate::meta::MetaError::Backend(e.to_string()))?;
        self.meta.put_upload(id, &raw, self.upload_ttl).await?;
        Ok(())
    }
}

fn busy() -> PrivateError {
    PrivateError::UploadInvalid("another request is writing to this upload".into())
}

fn lease_name(id: &str) -> String {
    format!("upload:{id}")
}

fn mismatch(digest: &Digest) -> PrivateError {
    PrivateError::DigestInvalid(format!(
        "the uploaded bytes do not hash to {digest}; nothing was stored"
    ))
}

fn part_gone() -> PrivateError {
    PrivateError::UploadInvalid(
        "a chunk of this upload is no longer stored: start the upload again".into(),
    )
}

async fn remove(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file");
    }
}
