//! One upstream fetch per cold blob in this process, however many clients ask
//! for it. The fetch writes to a spool file and hashes as bytes arrive; every
//! client reads the spool at its own pace. The last byte is released only
//! once the whole blob matched its digest, so no client ever receives a
//! complete body that is wrong. The fetch runs detached from the clients: one
//! hanging up cancels nothing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::meta::MetaStore;
use crate::reference::{Digest, Hasher};
use crate::storage::{BlobStore, BlobWriter};
use crate::upstream::{UpstreamClient, UpstreamError};

/// Bytes a reader takes from the spool per read.
const READ_CHUNK: u64 = 256 * 1024;

/// Why a fetch ended without a verified blob.
#[derive(Clone, Debug)]
pub enum FlightError {
    Upstream(UpstreamError),
    Mismatch { registry: String, expected: String },
    Failed(String),
}

#[derive(Clone)]
enum Phase {
    /// Waiting for upstream's response headers.
    Connecting,
    /// Another fetch committed the blob meanwhile: read it from the store.
    Stored,
    /// Bytes are arriving; `readable` of them may be sent to clients.
    Streaming {
        file: Arc<File>,
        size: Option<u64>,
        readable: u64,
    },
    /// Verified: all `size` bytes may be sent.
    Verified {
        file: Arc<File>,
        size: u64,
    },
    Failed(FlightError),
}

/// What a client learns once a fetch got going.
pub enum Started {
    /// Stream from the flight; the size if upstream announced it.
    Streaming(Option<u64>),
    /// Serve from the blob store instead.
    Stored,
}

pub struct Flight {
    pub digest: Digest,
    /// The repository the fetch was started for (upstream confirmed it).
    pub repo_key: String,
    phase: watch::Sender<Phase>,
}

/// Everything a fetch needs, handed to the detached task.
pub struct FetchJob {
    pub upstream: Arc<UpstreamClient>,
    /// Repository path on the upstream.
    pub repository: String,
    /// Store key (`<registry>/<repository>`) to link the blob to.
    pub repo_key: String,
    pub blobs: Arc<dyn BlobStore>,
    pub meta: Arc<dyn MetaStore>,
    pub body_idle: Duration,
}

pub struct Flights {
    spool_dir: PathBuf,
    active: Mutex<HashMap<Digest, Arc<Flight>>>,
}

impl Flights {
    pub fn new(spool_dir: PathBuf) -> Self {
        Self {
            spool_dir,
            active: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Flight>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the fetch of `digest`, starting it if none runs.
    pub fn join_or_start(self: &Arc<Self>, digest: &Digest, job: FetchJob) -> Arc<Flight> {
        let flight = {
            let mut map = self.map();
            if let Some(f) = map.get(digest) {
                return f.clone();
            }
            let f = Arc::new(Flight {
                digest: digest.clone(),
                repo_key: job.repo_key.clone(),
                phase: watch::Sender::new(Phase::Connecting),
            });
            map.insert(digest.clone(), f.clone());
            f
        };
        let guard = FlightGuard {
            flights: self.clone(),
            flight: flight.clone(),
        };
        tokio::spawn(fetch(guard, job, self.spool_dir.clone()));
        flight
    }
}

/// Ends a flight however its task ends (even by panic): readers are told,
/// and the flight leaves the map so the next request looks at the store.
struct FlightGuard {
    flights: Arc<Flights>,
    flight: Arc<Flight>,
}

impl FlightGuard {
    /// Leaves the map first, so a request arriving now starts afresh instead
    /// of joining a failure, then tells the readers.
    fn fail(&self, e: FlightError) {
        self.leave();
        self.flight.phase.send_replace(Phase::Failed(e));
    }

    fn leave(&self) {
        let mut map = self.flights.map();
        if map
            .get(&self.flight.digest)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.flight.digest);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.leave();
        self.flight.phase.send_if_modified(|p| match p {
            Phase::Connecting | Phase::Streaming { .. } => {
                *p = Phase::Failed(FlightError::Failed("the fetch stopped".into()));
                true
            }
            _ => false,
        });
    }
}

async fn fetch(guard: FlightGuard, job: FetchJob, spool_dir: PathBuf) {
    let flight = guard.flight.clone();
    let digest = flight.digest.clone();
    // A fetch that finished just before this one started has committed.
    // (An unreachable store counts as a miss: clients are served anyway.)
    if let Ok(Some(_)) = job.blobs.stat(&digest).await {
        flight.phase.send_replace(Phase::Stored);
        return;
    }
    let spool = spool_dir.join(format!(
        "{}-{:016x}.part",
        digest.hex(),
        rand::random::<u64>()
    ));
    match download(&flight, &job, &spool).await {
        Ok((size, writer)) => {
            // Clients already have every verified byte; storing is for the
            // next ones. A store that fails here only costs a refetch later.
            match writer.commit(size).await {
                Ok(()) => {
                    if let Err(e) = job
                        .meta
                        .link(&job.repo_key, std::slice::from_ref(&digest))
                        .await
                    {
                        tracing::warn!(%digest, error = %e, "linking a stored blob failed");
                    }
                }
                Err(e) => tracing::error!(%digest, error = %e, "storing a verified blob failed"),
            }
            // Gone already when the store took the file itself.
            remove_quietly(&spool).await;
        }
        Err(e) => {
            tracing::warn!(%digest, registry = job.upstream.registry(), error = ?e, "blob fetch failed");
            guard.fail(e);
            remove_quietly(&spool).await;
        }
    }
    drop(guard);
}

/// Streams the blob into `spool`, publishing progress to readers and to the
/// store's writer. Returns the verified size and the writer to commit; the
/// phase is `Verified` when it returns Ok.
async fn download(
    flight: &Flight,
    job: &FetchJob,
    spool: &Path,
) -> Result<(u64, Box<dyn BlobWriter>), FlightError> {
    let resp = job
        .upstream
        .blob(&job.repository, &flight.digest)
        .await
        .map_err(FlightError::Upstream)?;
    let size = resp.content_length();
    let file = {
        let spool = spool.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = spool.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&spool)
        })
        .await
        .map_err(|e| FlightError::Failed(e.to_string()))?
        .map_err(|e| FlightError::Failed(format!("cannot create spool file: {e}")))?
    };
    let file = Arc::new(file);
    let mut writer = job
        .blobs
        .begin_write(&flight.digest, spool)
        .await
        .map_err(|e| FlightError::Failed(format!("cannot start storing the blob: {e}")))?;
    flight.phase.send_replace(Phase::Streaming {
        file: file.clone(),
        size,
        readable: 0,
    });

    let registry = job.upstream.registry().to_owned();
    let mut hasher = Some(Hasher::new(flight.digest.algorithm()));
    let mut written: u64 = 0;
    let mut body = resp.bytes_stream();
    loop {
        let chunk = match tokio::time::timeout(job.body_idle, body.next()).await {
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
            Ok(Some(Err(e))) => {
                return Err(FlightError::Upstream(UpstreamError::Unavailable {
                    registry,
                    detail: format!(
                        "the blob body broke off after {written} bytes: {}",
                        crate::upstream::describe(&e.without_url())
                    ),
                }));
            }
            Ok(Some(Ok(c))) => c,
        };
        if size.is_some_and(|s| written + chunk.len() as u64 > s) {
            return Err(FlightError::Mismatch {
                registry,
                expected: flight.digest.to_string(),
            });
        }
        let offset = written;
        let (f, mut h) = (file.clone(), hasher.take());
        let chunk_len = chunk.len() as u64;
        h = tokio::task::spawn_blocking(move || -> io::Result<Option<Hasher>> {
            f.write_all_at(&chunk, offset)?;
            if let Some(h) = h.as_mut() {
                h.update(&chunk);
            }
            Ok(h)
        })
        .await
        .map_err(|e| FlightError::Failed(e.to_string()))?
        .map_err(|e| FlightError::Failed(format!("writing the spool file: {e}")))?;
        hasher = h;
        written += chunk_len;
        writer.progress(written);
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
        file,
        size: written,
    });
    Ok((written, writer))
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove spool file");
    }
}

impl Flight {
    /// Waits until upstream answered.
    pub async fn started(&self) -> Result<Started, FlightError> {
        let mut rx = self.phase.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::Connecting))
            .await
            .map_err(|_| FlightError::Failed("the fetch stopped".into()))?
            .clone();
        match phase {
            Phase::Connecting => Err(FlightError::Failed("the fetch stopped".into())),
            Phase::Stored => Ok(Started::Stored),
            Phase::Streaming { size, .. } => Ok(Started::Streaming(size)),
            Phase::Verified { size, .. } => Ok(Started::Streaming(Some(size))),
            Phase::Failed(e) => Err(e),
        }
    }

    /// Bytes `start..end` (or to the end) as they become readable.
    pub fn stream(
        self: Arc<Self>,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let rx = self.phase.subscribe();
        // The state is `None` once the stream failed: one error, then the end.
        futures::stream::unfold(Some((self, rx, start)), move |state| async move {
            let (flight, mut rx, pos) = state?;
            if end.is_some_and(|e| pos >= e) {
                return None;
            }
            loop {
                // While unverified, the last byte of the blob (held back by
                // the fetch) and the last byte of the requested range stay
                // unsent, so no response completes on unchecked bytes.
                let (file, limit, total) = match &*rx.borrow_and_update() {
                    Phase::Streaming { file, readable, .. } => {
                        let cap = end.map_or(*readable, |e| (*readable).min(e - 1));
                        (file.clone(), cap, None)
                    }
                    Phase::Verified { file, size } => (
                        file.clone(),
                        end.map_or(*size, |e| e.min(*size)),
                        Some(*size),
                    ),
                    Phase::Failed(e) => {
                        let e = io::Error::other(format!("upstream fetch failed: {e:?}"));
                        return Some((Err(e), None));
                    }
                    Phase::Connecting | Phase::Stored => {
                        return Some((Err(io::Error::other("the fetch is not streaming")), None));
                    }
                };
                if pos < limit {
                    let n = (limit - pos).min(READ_CHUNK) as usize;
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0; n];
                        file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                    return Some(match read {
                        Ok(b) => (Ok(b), Some((flight, rx, pos + n as u64))),
                        Err(e) => (Err(e), None),
                    });
                }
                if total.is_some_and(|t| pos >= t) {
                    return None;
                }
                if rx.changed().await.is_err() {
                    return Some((Err(io::Error::other("the fetch stopped")), None));
                }
            }
        })
    }
}
