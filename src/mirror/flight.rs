//! One fetch per cold blob in this process, however many clients ask for it.
//! The fetch (`fetch.rs`) writes to a spool file and hashes as bytes arrive;
//! every client reads the spool at its own pace. The last byte is released
//! only once the whole blob matched its digest, so no client ever receives a
//! complete body that is wrong. The fetch runs detached from the clients:
//! one hanging up cancels nothing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
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

#[derive(Clone)]
pub(super) enum Phase {
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
