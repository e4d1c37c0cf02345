//! The fetch task behind a flight: decide who fetches (this replica, under
//! a lease, or a peer already fetching), stream the bytes into the spool
//! while hashing them, and commit the verified blob to the store.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use super::cluster::{Claim, Cluster, Lease};
use super::flight::{Flight, FlightError, FlightGuard, Phase, Spooled};
use crate::meta::MetaStore;
use crate::reference::Hasher;
use crate::storage::{BlobStore, BlobWriter};
use crate::telemetry::metrics::metrics;
use crate::upstream::{UpstreamClient, UpstreamError};

/// Marks a request from another replica: it is served from this replica's
/// own fetch or store, never passed on to a third.
pub const PEER_HEADER: &str = "x-pier-peer";
/// How often a replica waiting on another's fetch looks again.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Everything a fetch needs, handed to the detached task.
pub struct FetchJob {
    pub upstream: Arc<UpstreamClient>,
    /// Repository path on the upstream.
    pub repository: String,
    /// Store key (`<registry>/<repository>`) to link the blob to; also the
    /// add-a-prefix name a peer replica serves it under.
    pub repo_key: String,
    pub blobs: Arc<dyn BlobStore>,
    pub meta: Arc<dyn MetaStore>,
    pub cluster: Arc<Cluster>,
    pub peers: reqwest::Client,
    pub body_idle: Duration,
    /// The request came from a peer replica: fetch upstream, do not delegate.
    pub for_peer: bool,
    pub slots: FetchSlots,
}

/// The cap on upstream blob fetches running at once in this replica.
#[derive(Clone)]
pub struct FetchSlots {
    slots: Option<Arc<tokio::sync::Semaphore>>,
    queue_timeout: Duration,
}

impl FetchSlots {
    pub fn new(max: usize, queue_timeout: Duration) -> Self {
        Self {
            slots: (max > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max))),
            queue_timeout,
        }
    }

    /// Whether every slot is taken now.
    pub fn full(&self) -> bool {
        self.slots
            .as_ref()
            .is_some_and(|s| s.available_permits() == 0)
    }

    /// Waits (up to the queue timeout) for a slot, held until dropped.
    async fn take(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, FlightError> {
        let Some(slots) = &self.slots else {
            return Ok(None);
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        match tokio::time::timeout(self.queue_timeout, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                metrics().slots_full("waited");
                Ok(Some(permit))
            }
            _ => {
                metrics().slots_full("refused");
                Err(FlightError::Busy(format!(
                    "all upstream fetch slots stayed busy for {}",
                    humantime::format_duration(self.queue_timeout)
                )))
            }
        }
    }
}

/// Where the bytes come from.
enum Source {
    /// Upstream, by this replica, which stores the blob (holding the lease
    /// when replicas coordinate).
    Upstream(Option<Lease>),
    /// The replica that holds the lease, streaming its own fetch.
    Peer(reqwest::Response),
    /// Another fetch stored it meanwhile.
    Stored,
}

pub(super) async fn run(guard: FlightGuard, job: FetchJob, spool_dir: PathBuf) {
    let flight = guard.flight.clone();
    let digest = flight.digest.clone();
    let spool = spool_dir.join(format!(
        "{}-{:016x}.part",
        digest.hex(),
        rand::random::<u64>()
    ));
    let outcome = match source(&job, &flight).await {
        Ok(Source::Stored) => {
            flight.phase.send_replace(Phase::Stored);
            return;
        }
        Ok(Source::Upstream(lease)) => {
            let result = match job.slots.take().await {
                Ok(_slot) => from_upstream(&flight, &job, &spool).await,
                Err(e) => Err(e),
            };
            if let Some(lease) = lease {
                lease.release().await;
            }
            result
        }
        Ok(Source::Peer(resp)) => {
            let from = format!("{} via a peer replica", job.upstream.registry());
            download(&flight, &job, &spool, resp, None, &from)
                .await
                .map(drop)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::warn!(%digest, registry = job.upstream.registry(), error = ?e, "blob fetch failed");
        guard.fail(e);
    }
    // Gone already when the store took the file itself.
    remove_quietly(&spool).await;
    drop(guard);
}

/// Decides where the bytes come from. With replicas sharing metadata, one
/// of them holds the blob's lease and fetches upstream; the others stream
/// from it, or wait for its commit (or for its lease to lapse, if it died).
async fn source(job: &FetchJob, flight: &Flight) -> Result<Source, FlightError> {
    let lease_name = format!("blob:{}", flight.digest);
    // Waiting on another replica is bounded: past this, fetch anyway.
    let give_up = Instant::now() + job.cluster.lease_ttl * 8;
    loop {
        // A fetch that finished just before this one started has committed.
        // (An unreachable store counts as a miss: clients are served anyway.)
        if let Ok(Some(_)) = job.blobs.stat(&flight.digest).await {
            return Ok(Source::Stored);
        }
        if job.for_peer || Instant::now() > give_up {
            return Ok(Source::Upstream(None));
        }
        match job.cluster.claim(&lease_name).await {
            Claim::Mine(lease) => {
                // The previous holder may have committed and released the
                // lease since the store was checked above.
                if let Ok(Some(_)) = job.blobs.stat(&flight.digest).await {
                    lease.release().await;
                    return Ok(Source::Stored);
                }
                return Ok(Source::Upstream(Some(lease)));
            }
            Claim::Alone => return Ok(Source::Upstream(None)),
            Claim::Theirs { peer: Some(peer) } => {
                if let Some(resp) = from_peer(job, &peer, flight).await {
                    tracing::info!(%peer, digest = %flight.digest, "streaming a blob another replica is fetching");
                    return Ok(Source::Peer(resp));
                }
            }
            Claim::Theirs { peer: None } => {}
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Asks the replica at `peer` for the blob (it streams its own fetch).
async fn from_peer(job: &FetchJob, peer: &url::Url, flight: &Flight) -> Option<reqwest::Response> {
    let url = peer
        .join(&format!("/v2/{}/blobs/{}", job.repo_key, flight.digest))
        .ok()?;
    match job.peers.get(url).header(PEER_HEADER, "1").send().await {
        Ok(r) if r.status().is_success() => Some(r),
        Ok(r) => {
            tracing::debug!(%peer, status = %r.status(), "peer cannot serve the blob");
            None
        }
        Err(e) => {
            tracing::debug!(%peer, error = %crate::upstream::describe(&e), "peer unreachable");
            None
        }
    }
}

/// Fetches from upstream into the spool and the store, then commits.
async fn from_upstream(flight: &Flight, job: &FetchJob, spool: &Path) -> Result<(), FlightError> {
    let resp = job
        .upstream
        .blob(&job.repository, &flight.digest)
        .await
        .map_err(FlightError::Upstream)?;
    let writer = job
        .blobs
        .begin_write(&flight.digest, spool)
        .await
        .map_err(|e| FlightError::Failed(format!("cannot start storing the blob: {e}")))?;
    let registry = job.upstream.registry().to_owned();
    let (size, spooled, writer) =
        download(flight, job, spool, resp, Some(writer), &registry).await?;
    let Some(mut writer) = writer else {
        return Ok(());
    };
    // Clients already have every verified byte; storing is for the next
    // ones. A store that fails here only costs a refetch later.
    let digest = &flight.digest;
    if let Spooled::Memory(chunks) = spooled {
        if let Err(e) = write_spool(spool, chunks).await {
            metrics().backend_error("storage");
            tracing::error!(%digest, error = ?e, "cannot write a verified blob to the spool");
            return Ok(());
        }
        writer.progress(size);
    }
    match writer.commit(size).await {
        Ok(()) => {
            if let Err(e) = job
                .meta
                .link(&job.repo_key, std::slice::from_ref(digest))
                .await
            {
                tracing::warn!(%digest, error = %e, "linking a stored blob failed");
            }
        }
        Err(e) => {
            metrics().backend_error("storage");
            tracing::error!(%digest, error = %e, "storing a verified blob failed");
        }
    }
    Ok(())
}

/// Blobs up to this size (as upstream announces it) are held in memory
/// while they are fetched, and written to the spool once verified: their
/// clients wait on no disk. Memory held this way is at most this times
/// the fetch slots (64 MiB with the default 64).
const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// At most this many bytes go to the spool file per trip to the blocking
/// pool (more when a single network read is larger).
const WRITE_BATCH: u64 = 1024 * 1024;

/// Streams `resp` into a spool, publishing progress to readers and, when
/// the spool is the file, to the store's writer (if any). Returns the
/// verified size, where the bytes are, and the writer to commit; the phase
/// is `Verified` when it returns Ok. `from` names the source in errors.
async fn download(
    flight: &Flight,
    job: &FetchJob,
    spool: &Path,
    resp: reqwest::Response,
    mut writer: Option<Box<dyn BlobWriter>>,
    from: &str,
) -> Result<(u64, Spooled, Option<Box<dyn BlobWriter>>), FlightError> {
    let size = resp.content_length();
    let spooled = if size.is_some_and(|s| s <= IN_MEMORY_MAX) {
        Spooled::Memory(Arc::default())
    } else {
        Spooled::File(Arc::new(create_spool(spool).await?))
    };
    flight.phase.send_replace(Phase::Streaming {
        spool: spooled.clone(),
        size,
        readable: 0,
    });

    let registry = from.to_owned();
    let broke_off = |written: u64, e: reqwest::Error| {
        FlightError::Upstream(UpstreamError::Unavailable {
            registry: registry.clone(),
            detail: format!(
                "the blob body broke off after {written} bytes: {}",
                crate::upstream::describe(&e.without_url())
            ),
        })
    };
    let mut hasher = Some(Hasher::new(flight.digest.algorithm()));
    let mut written: u64 = 0;
    let mut body = resp.bytes_stream();
    let mut ended = false;
    while !ended {
        let first = match tokio::time::timeout(job.body_idle, body.next()).await {
            Err(_) => {
                return Err(FlightError::Upstream(UpstreamError::Unavailable {
                    registry,
                    detail: format!(
                        "the blob body stalled for {}",
                        humantime::format_duration(job.body_idle)
                    ),
                }));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(broke_off(written, e)),
            Ok(Some(Ok(c))) => c,
        };
        // Chunks that arrived meanwhile go to the spool in the same trip
        // to the blocking pool: one hop per batch, not per network read.
        let mut batch_len = first.len() as u64;
        let mut batch = vec![first];
        while batch_len < WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(c))) => {
                    batch_len += c.len() as u64;
                    batch.push(c);
                }
                Some(Some(Err(e))) => return Err(broke_off(written + batch_len, e)),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if size.is_some_and(|s| written + batch_len > s) {
            return Err(FlightError::Mismatch {
                registry,
                expected: flight.digest.to_string(),
            });
        }
        match &spooled {
            Spooled::Memory(chunks) => {
                // At most IN_MEMORY_MAX bytes in all: hashing them here
                // costs less than a hop to the blocking pool.
                if let Some(h) = hasher.as_mut() {
                    batch.iter().for_each(|c| h.update(c));
                }
                chunks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(batch);
            }
            Spooled::File(file) => {
                let (f, mut h, mut offset) = (file.clone(), hasher.take(), written);
                h = tokio::task::spawn_blocking(move || -> io::Result<Option<Hasher>> {
                    for chunk in &batch {
                        f.write_all_at(chunk, offset)?;
                        offset += chunk.len() as u64;
                        if let Some(h) = h.as_mut() {
                            h.update(chunk);
                        }
                    }
                    Ok(h)
                })
                .await
                .map_err(|e| FlightError::Failed(e.to_string()))?
                .map_err(|e| FlightError::Failed(format!("writing the spool file: {e}")))?;
                hasher = h;
                if let Some(w) = writer.as_mut() {
                    w.progress(written + batch_len);
                }
            }
        }
        written += batch_len;
        // Hold back the last byte until the digest is checked.
        let readable = written.saturating_sub(1);
        flight.phase.send_modify(|p| {
            if let Phase::Streaming { readable: r, .. } = p {
                *r = readable;
            }
        });
    }
    let actual = hasher
        .map(Hasher::finish)
        .ok_or_else(|| FlightError::Failed("hash state lost".into()))?;
    if size.is_some_and(|s| s != written) || actual != flight.digest {
        return Err(FlightError::Mismatch {
            registry,
            expected: flight.digest.to_string(),
        });
    }
    flight.phase.send_replace(Phase::Verified {
        spool: spooled.clone(),
        size: written,
    });
    Ok((written, spooled, writer))
}

/// Creates the spool file (its directory too, when missing).
async fn create_spool(spool: &Path) -> Result<std::fs::File, FlightError> {
    let spool = spool.to_owned();
    tokio::task::spawn_blocking(move || new_spool_file(&spool))
        .await
        .map_err(|e| FlightError::Failed(e.to_string()))?
        .map_err(|e| FlightError::Failed(format!("cannot create spool file: {e}")))
}

fn new_spool_file(spool: &Path) -> io::Result<std::fs::File> {
    let create = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(spool)
    };
    match create() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = spool.parent() {
                std::fs::create_dir_all(dir)?;
            }
            create()
        }
        other => other,
    }
}

/// Writes a blob held in memory to the spool file, for the store's writer.
async fn write_spool(spool: &Path, chunks: Arc<Mutex<Vec<Bytes>>>) -> Result<(), FlightError> {
    let spool = spool.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = new_spool_file(&spool)?;
        let chunks = chunks.lock().unwrap_or_else(|p| p.into_inner());
        chunks.iter().try_for_each(|c| file.write_all(c))
    })
    .await
    .map_err(|e| FlightError::Failed(e.to_string()))?
    .map_err(|e| FlightError::Failed(format!("writing the spool file: {e}")))
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove spool file");
    }
}
