//! One fetch per cold blob in this process, however many clients ask for it.
//! The fetch (`fetch.rs`) writes to a spool file and hashes as bytes arrive;
//! every client reads the spool at its own pace. The last byte is released
//! only once the whole blob matched its digest, so no client ever receives a
//! complete body that is wrong. The fetch runs detached from the clients:
//! one hanging up cancels nothing. A blob in the shared store that this
//! replica keeps no copy of is read the same way, once for all its
//! clients here, and the spool becomes the copy.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use crate::reference::Digest;
use crate::telemetry::metrics::metrics;
use crate::upstream::UpstreamError;
use crate::zerocopy::{FileSlice, Piece};
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
    /// The spool's disk has no room for the blob: clients are served
    /// straight from upstream instead.
    NoRoom(String),
}

/// Where a fetch keeps the bytes received so far, for its readers.
#[derive(Clone)]
pub(super) enum Spooled {
    /// A small blob, in memory: serving it costs no disk operation and no
    /// thread hop.
    Memory(Arc<Mutex<MemorySpool>>),
    /// The spool file.
    File(Arc<File>),
}

impl Spooled {
    /// Up to `max` bytes from `pos` (all of them received already).
    async fn read(&self, pos: u64, max: u64) -> io::Result<Bytes> {
        match self {
            Spooled::Memory(spool) => spool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(pos, max)
                .ok_or_else(|| io::Error::other("the spool holds fewer bytes than published")),
            Spooled::File(file) => {
                let (file, n) = (file.clone(), max.min(READ_CHUNK) as usize);
                tokio::task::spawn_blocking(move || crate::storage::fs::read_at(&file, pos, n))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
        }
    }
}

impl Spooled {
    /// [`Spooled::read`], with how many bytes it got.
    async fn read_counted(&self, pos: u64, max: u64) -> io::Result<(Bytes, u64)> {
        let b = self.read(pos, max).await?;
        let n = b.len() as u64;
        Ok((b, n))
    }
}

/// Pieces smaller than this are copied together into one read, so that an
/// upstream sending many tiny chunks does not cost a frame per chunk.
const COALESCE: u64 = 64 * 1024;

/// A small blob's bytes as upstream sent them, with where each chunk ends.
#[derive(Default)]
pub(super) struct MemorySpool {
    chunks: Vec<Bytes>,
    ends: Vec<u64>,
}

impl MemorySpool {
    pub(super) fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.ends.push(self.len() + chunk.len() as u64);
            self.chunks.push(chunk);
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub(super) fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Up to `max` bytes from `pos`: a slice of the chunk holding `pos`
    /// (no copy), or, when that chunk has only a small piece left, that
    /// piece and the following ones copied into one buffer.
    fn read(&self, pos: u64, max: u64) -> Option<Bytes> {
        let i = self.ends.partition_point(|&end| end <= pos);
        let chunk = self.chunks.get(i)?;
        let from = (pos - (self.ends[i] - chunk.len() as u64)) as usize;
        let available = max.min(self.len() - pos);
        let left = (chunk.len() - from) as u64;
        if left >= available.min(COALESCE) {
            return Some(chunk.slice(from..from + left.min(available) as usize));
        }
        let want = available.min(COALESCE) as usize;
        let mut buf = bytes::BytesMut::with_capacity(want);
        buf.extend_from_slice(&chunk[from..]);
        for next in &self.chunks[i + 1..] {
            let n = (want - buf.len()).min(next.len());
            buf.extend_from_slice(&next[..n]);
            if buf.len() == want {
                break;
            }
        }
        Some(buf.freeze())
    }
}

#[derive(Clone)]
pub(super) enum Phase {
    /// Waiting for the source's answer: upstream's response headers, a
    /// peer's, or the shared store's.
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

/// Where a flight's bytes come from; a flight starts at `upstream`, or at
/// `bucket` when it reads the shared store.
const ORIGINS: [&str; 3] = ["upstream", "bucket", "peer"];

pub struct Flight {
    pub digest: Digest,
    /// The repository the fetch was started for (upstream confirmed it, or,
    /// for a read of the shared store, the blob was linked to it or
    /// authorized for it).
    pub repo_key: String,
    pub(super) phase: watch::Sender<Phase>,
    began: std::time::Instant,
    /// Where the bytes come from: one of [`ORIGINS`].
    origin: std::sync::atomic::AtomicUsize,
    /// Clients streaming from the spool now, or waiting for the verified
    /// blob (HTTP/1.0).
    readers: watch::Sender<usize>,
}

/// One running fetch, for the console.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FlightNow {
    pub digest: String,
    pub repository: String,
    /// Bytes received so far (and readable by clients).
    pub received: u64,
    /// The blob's size, once upstream announced it.
    pub size: Option<u64>,
    /// Clients reading it or waiting for it.
    pub waiting: usize,
    /// Where the bytes come from: `upstream`, `peer` (another replica's
    /// fetch) or `bucket` (the shared store, for this replica's copy).
    #[serde(default)]
    pub origin: String,
    /// How long it has been running.
    pub seconds: f64,
}

pub struct Flights {
    spool_dir: PathBuf,
    active: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Set when the process starts shutting down.
    closing: watch::Sender<bool>,
}

impl Flights {
    pub fn new(spool_dir: PathBuf) -> Self {
        Self {
            spool_dir,
            active: Mutex::new(HashMap::new()),
            closing: watch::Sender::new(false),
        }
    }

    /// The process is shutting down: fetches commit what they have at once.
    pub fn close(&self) {
        self.closing.send_replace(true);
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

    /// The fetches running now, as the console's activity page shows them.
    pub fn now(&self) -> Vec<FlightNow> {
        let flights: Vec<Arc<Flight>> = self.map().values().cloned().collect();
        flights
            .iter()
            .map(|f| {
                let (received, size) = match &*f.phase.borrow() {
                    Phase::Streaming { size, readable, .. } => (*readable, *size),
                    Phase::Verified { size, .. } => (*size, Some(*size)),
                    _ => (0, None),
                };
                FlightNow {
                    digest: f.digest.to_string(),
                    repository: f.repo_key.clone(),
                    received,
                    size,
                    waiting: f.readers(),
                    origin: f.origin().to_owned(),
                    seconds: f.began.elapsed().as_secs_f64(),
                }
            })
            .collect()
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
                began: std::time::Instant::now(),
                origin: std::sync::atomic::AtomicUsize::new(usize::from(job.from_store)),
                readers: watch::Sender::new(0),
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

    /// Waits until no client streams from the spool, for at most `max`,
    /// or until the process starts shutting down (the clients are being
    /// drained then, and the grace period is for committing). False when
    /// clients were still reading.
    pub(super) async fn clients_done(&self, max: std::time::Duration) -> bool {
        let mut readers = self.flight.readers.subscribe();
        let mut closing = self.flights.closing.subscribe();
        let done = async {
            tokio::select! {
                r = readers.wait_for(|n| *n == 0) => r.is_ok(),
                _ = closing.wait_for(|c| *c) => false,
            }
        };
        tokio::time::timeout(max, done).await.unwrap_or(false)
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
    /// Where the bytes come from, for metrics: `upstream`, `bucket` (the
    /// shared store, read once for this replica's clients) or `peer`
    /// (another replica's fetch).
    pub fn origin(&self) -> &'static str {
        ORIGINS[self.origin.load(std::sync::atomic::Ordering::SeqCst) % ORIGINS.len()]
    }

    /// Whether the bytes come from the shared store: the clients' blob is
    /// in the cache.
    pub fn reads_store(&self) -> bool {
        self.origin() == "bucket"
    }

    pub(super) fn set_origin(&self, origin: &'static str) {
        let i = ORIGINS.iter().position(|o| *o == origin).unwrap_or(0);
        self.origin.store(i, std::sync::atomic::Ordering::SeqCst);
    }

    /// Clients streaming from the spool now (or waiting for the verified
    /// blob).
    pub(super) fn readers(&self) -> usize {
        *self.readers.borrow()
    }

    /// Waits until the whole blob is verified; its size. The wait counts
    /// as a reader: a client is waiting on the fetch.
    pub async fn verified(self: &Arc<Self>) -> Result<u64, FlightError> {
        let mut reading = Reading::new(self.clone());
        reading.count();
        let mut rx = self.phase.subscribe();
        let phase = rx
            .wait_for(|p| matches!(p, Phase::Verified { .. } | Phase::Failed(_) | Phase::Stored))
            .await
            .map_err(|_| FlightError::Failed("the fetch stopped".into()))?
            .clone();
        match phase {
            Phase::Verified { size, .. } => Ok(size),
            Phase::Failed(e) => Err(e),
            _ => Err(FlightError::Failed("the fetch stopped".into())),
        }
    }

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
        self.readable(start, end, |spool, pos, len| async move {
            spool.read_counted(pos, len).await
        })
    }

    /// The same bytes as [`Flight::stream`], those in a spool file as
    /// slices of it, for a connection that sends files without copying.
    pub fn pieces(
        self: Arc<Self>,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = io::Result<Piece>> + Send + 'static {
        self.readable(start, end, |spool, pos, len| async move {
            match spool {
                Spooled::File(file) => Ok((
                    Piece::File(FileSlice {
                        file,
                        start: pos,
                        len,
                    }),
                    len,
                )),
                memory => {
                    let (b, n) = memory.read_counted(pos, len).await?;
                    Ok((Piece::Bytes(b), n))
                }
            }
        })
    }

    /// Items `take` makes of the readable bytes from `start` on, each
    /// with how many bytes it holds (at least one).
    fn readable<T, F, Fut>(
        self: Arc<Self>,
        start: u64,
        end: Option<u64>,
        take: F,
    ) -> impl Stream<Item = io::Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: Fn(Spooled, u64, u64) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = io::Result<(T, u64)>> + Send,
    {
        let rx = self.phase.subscribe();
        let reading = Reading::new(self);
        // The state is `None` once the stream failed: one error, then the end.
        futures::stream::unfold(Some((reading, rx, start)), move |state| {
            let take = take.clone();
            async move {
                let (mut reading, mut rx, pos) = state?;
                if end.is_some_and(|e| pos >= e) {
                    return None;
                }
                reading.count();
                loop {
                    // While unverified, the last byte of the blob (held back
                    // by the fetch) and the last byte of the requested range
                    // stay unsent, so no response completes on unchecked
                    // bytes.
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
                            let e = io::Error::other(format!("the blob's fetch failed: {e:?}"));
                            return Some((Err(e), None));
                        }
                        Phase::Connecting | Phase::Stored => {
                            let e = io::Error::other("the fetch is not streaming");
                            return Some((Err(e), None));
                        }
                    };
                    if pos < limit {
                        return Some(match take(spool, pos, limit - pos).await {
                            Ok((item, n)) if n > 0 => (Ok(item), Some((reading, rx, pos + n))),
                            Ok(_) => (Err(io::Error::other("an empty read of the spool")), None),
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
            }
        })
    }
}

/// Counts a client among the flight's readers from its first read until
/// its stream ends or is dropped (a stream made and never read counts for
/// nothing). A stream sent with sendfile ends once its last slice is
/// queued: up to a frame and the socket's buffer may still be on their way.
struct Reading {
    flight: Arc<Flight>,
    counted: bool,
}

impl Reading {
    fn new(flight: Arc<Flight>) -> Self {
        Self {
            flight,
            counted: false,
        }
    }

    fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            self.flight.readers.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        if self.counted {
            self.flight
                .readers
                .send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(chunks: &[&'static [u8]]) -> MemorySpool {
        let mut s = MemorySpool::default();
        chunks.iter().for_each(|c| s.push(Bytes::from_static(c)));
        s
    }

    #[test]
    fn memory_spool_reads_stay_within_the_limit_and_the_bytes_received() {
        let s = spool(&[b"abc", b"", b"defgh"]);
        assert_eq!(s.len(), 8);
        // Small pieces are gathered across chunks, up to `max`.
        assert_eq!(s.read(0, 100).unwrap(), "abcdefgh");
        assert_eq!(s.read(1, 1).unwrap(), "b");
        assert_eq!(s.read(2, 3).unwrap(), "cde");
        assert_eq!(s.read(3, 100).unwrap(), "defgh");
        assert_eq!(s.read(5, 2).unwrap(), "fg");
        assert_eq!(s.read(7, u64::MAX).unwrap(), "h");
        assert!(s.read(8, 1).is_none());
        assert!(MemorySpool::default().read(0, 1).is_none());
    }

    #[test]
    fn memory_spool_slices_large_chunks_without_copying() {
        let big = Bytes::from(vec![7u8; 3 * COALESCE as usize]);
        let mut s = MemorySpool::default();
        s.push(big.clone());
        s.push(Bytes::from_static(b"tail"));
        let got = s.read(10, u64::MAX).unwrap();
        // A slice of the chunk itself, however much is asked for.
        assert_eq!(got.as_ptr(), big[10..].as_ptr());
        assert_eq!(got.len(), big.len() - 10);
        // Many tiny chunks come back as few reads.
        let mut tiny = MemorySpool::default();
        (0..100_000).for_each(|_| tiny.push(Bytes::from_static(b"x")));
        let (mut pos, mut reads) = (0, 0);
        while let Some(b) = tiny.read(pos, u64::MAX) {
            pos += b.len() as u64;
            reads += 1;
        }
        assert_eq!((pos, reads), (100_000, 2));
    }
}
