//! One fetch per cold blob in this process, however many clients ask for it.
//! The fetch (`fetch.rs`) writes to a spool file and hashes as bytes arrive;
//! every client reads the spool at its own pace. The last byte is released
//! only once the whole blob matched its digest, so no client ever receives a
//! complete body that is wrong. The fetch runs detached from the clients:
//! one hanging up cancels nothing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use rustix::buffer::spare_capacity;
use tokio::sync::watch;

use crate::reference::Digest;
use crate::telemetry::metrics::metrics;
use crate::upstream::UpstreamError;
use tracing::Instrument;

/// Bytes a reader takes from the spool per read.
const READ_CHUNK: u64 = 256 * 1024;

/// Why a fetch ended without a verified blob.
#[derive(Clone, Debug)]
pub enum FlightError {
    Upstream(UpstreamError),
    Mismatch {
        registry: String,
        expected: String,
    },
    Failed(String),
    /// Too many fetches at once; worth retrying shortly.
    Busy(String),
}

/// Where a fetch keeps the bytes received so far, for its readers.
#[derive(Clone)]
pub(super) enum Spooled {
    /// A small blob: upstream's chunks, in order. Readers take slices of
    /// them, so serving it costs no disk operation and no thread hop.
    Memory(Arc<Mutex<Vec<Bytes>>>),
    /// The spool file.
    File(Arc<File>),
}

impl Spooled {
    /// Up to `max` bytes from `pos` (all of them received already).
    async fn read(&self, pos: u64, max: u64) -> io::Result<Bytes> {
        match self {
            Spooled::Memory(chunks) => {
                let chunks = chunks.lock().unwrap_or_else(|p| p.into_inner());
                slice_of(&chunks, pos, max)
                    .ok_or_else(|| io::Error::other("the spool holds fewer bytes than published"))
            }
            Spooled::File(file) => {
                let (file, n) = (file.clone(), max.min(READ_CHUNK) as usize);
                tokio::task::spawn_blocking(move || {
                    // Positional reads: readers share the file. Into spare
                    // capacity, so the buffer is not zeroed first.
                    let mut buf = Vec::with_capacity(n);
                    while buf.len() < n {
                        let at = pos + buf.len() as u64;
                        let got = rustix::io::pread(&*file, spare_capacity(&mut buf), at)?;
                        if got == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    Ok(Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
        }
    }
}

/// The bytes at `pos` up to the end of the chunk holding them (at most
/// `max`), without copying.
fn slice_of(chunks: &[Bytes], pos: u64, max: u64) -> Option<Bytes> {
    let mut start = 0u64;
    for chunk in chunks {
        let end = start + chunk.len() as u64;
        if pos < end {
            let from = (pos - start) as usize;
            let to = (end.min(pos.saturating_add(max)) - start) as usize;
            return Some(chunk.slice(from..to));
        }
        start = end;
    }
    None
}

#[derive(Clone)]
pub(super) enum Phase {
    /// Waiting for upstream's response headers.
    Connecting,
    /// Another fetch committed the blob meanwhile: read it from the store.
    Stored,
    /// Bytes are arriving; `readable` of them may be sent to clients.
    Streaming {
        spool: Spooled,
        size: Option<u64>,
        readable: u64,
    },
    /// Verified: all `size` bytes may be sent.
    Verified {
        spool: Spooled,
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
    pub(super) phase: watch::Sender<Phase>,
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

    /// Whether a fetch of `digest` runs now.
    pub fn is_running(&self, digest: &Digest) -> bool {
        self.map().contains_key(digest)
    }

    /// How many fetches run now.
    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Joins the fetch of `digest`, starting it if none runs. The flag
    /// tells whether this call started it.
    pub fn join_or_start(
        self: &Arc<Self>,
        digest: &Digest,
        job: super::fetch::FetchJob,
    ) -> (Arc<Flight>, bool) {
        let flight = {
            let mut map = self.map();
            if let Some(f) = map.get(digest) {
                metrics().fetch_joins.inc();
                return (f.clone(), false);
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
        metrics().fetches_in_flight.inc();
        // A span of its own, under the request that started it: the fetch
        // outlives that request when its client hangs up.
        let span = tracing::info_span!(
            "blob fetch",
            registry = job.upstream.registry(),
            repository = %job.repository,
            %digest,
        );
        tokio::spawn(super::fetch::run(guard, job, self.spool_dir.clone()).instrument(span));
        (flight, true)
    }
}

/// Ends a flight however its task ends (even by panic): readers are told,
/// and the flight leaves the map so the next request looks at the store.
pub(super) struct FlightGuard {
    flights: Arc<Flights>,
    pub(super) flight: Arc<Flight>,
}

impl FlightGuard {
    /// Leaves the map first, so a request arriving now starts afresh instead
    /// of joining a failure, then tells the readers.
    pub(super) fn fail(&self, e: FlightError) {
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
        metrics().fetches_in_flight.dec();
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
                let (spool, limit, total) = match &*rx.borrow_and_update() {
                    Phase::Streaming {
                        spool, readable, ..
                    } => {
                        let cap = end.map_or(*readable, |e| (*readable).min(e - 1));
                        (spool.clone(), cap, None)
                    }
                    Phase::Verified { spool, size } => (
                        spool.clone(),
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
                    return Some(match spool.read(pos, limit - pos).await {
                        Ok(b) => {
                            let next = pos + b.len() as u64;
                            (Ok(b), Some((flight, rx, next)))
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_spool_slices_stay_within_one_chunk_and_the_limit() {
        let chunks = [Bytes::from_static(b"abc"), Bytes::from_static(b"defgh")];
        assert_eq!(slice_of(&chunks, 0, 10).unwrap(), "abc");
        assert_eq!(slice_of(&chunks, 1, 1).unwrap(), "b");
        assert_eq!(slice_of(&chunks, 3, 10).unwrap(), "defgh");
        assert_eq!(slice_of(&chunks, 5, 2).unwrap(), "fg");
        assert_eq!(slice_of(&chunks, 7, u64::MAX).unwrap(), "h");
        assert!(slice_of(&chunks, 8, 1).is_none());
        assert!(slice_of(&[], 0, 1).is_none());
    }
}
