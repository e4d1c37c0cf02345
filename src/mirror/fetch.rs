//! The fetch task behind a flight: decide who fetches (this replica, under
//! a lease, or a peer already fetching), stream the bytes into the spool
//! while hashing them, and commit the verified blob to the store. A flight
//! may instead read a stored blob from the shared store for this
//! replica's clients, and keep the spool as the local copy.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use super::cluster::{Claim, Cluster, Lease};
use super::flight::{Flight, FlightError, FlightGuard, MemorySpool, Phase, Spooled};
use super::missing::SeenMissing;
use super::pace::Pace;
use crate::meta::MetaStore;
use crate::reference::Hasher;
use crate::storage::{BlobStore, free_space};
use crate::telemetry::metrics::metrics;
use crate::upstream::{UpstreamClient, UpstreamError};

/// Marks a request from another replica: it is served from this replica's
/// own fetch or store, never passed on to a third.
pub const PEER_HEADER: &str = "x-pier-peer";
/// How often a replica waiting on another's fetch looks again.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// How often it looks in the store meanwhile, in case the holder stored
/// the blob but could not mark its lease (a Redis error, an older replica).
const WAIT_LOOK: Duration = Duration::from_secs(2);

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
    /// The request came from a peer replica, and a fetch of the blob ran
    /// here a moment ago (it ended since): fetch upstream, do not delegate.
    pub for_peer: bool,
    /// The request found the blob missing from the store a moment ago: the
    /// fetch need not ask again before taking its lease (a round trip with
    /// S3).
    pub store_checked: bool,
    /// That answer came from a lookup ahead of the request (up to half a
    /// lease TTL old), good only together with the lease.
    pub checked_ahead: bool,
    pub slots: FetchSlots,
    /// Forgets, once the blob is stored, that the store lacked it.
    pub missing: Arc<SeenMissing>,
    /// The size the repository's manifests give the blob, if known.
    pub expected_size: Option<u64>,
    pub bounds: FetchBounds,
    /// The store said it holds the blob, then could not give it: fetch it
    /// instead of sending clients back to the store.
    pub store_unreadable: bool,
    /// The blob is in the shared store, and this replica keeps no copy of
    /// it: read it from there (for every client here at once) and keep it
    /// as the copy, or fetch it if the store does not give it.
    pub from_store: bool,
}

/// Limits on one fetch, so a hostile or broken upstream cannot fill the
/// disk or hold a fetch slot for ever.
#[derive(Clone, Copy, Debug)]
pub struct FetchBounds {
    pub max_blob_size: u64,
    /// Bytes per second a fetch no client reads must keep up (0: no floor).
    pub min_rate: u64,
    pub min_rate_window: Duration,
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

    /// Waits for a slot as long as it takes, held until dropped.
    async fn wait(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone()?.acquire_owned().await.ok()
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

pub(super) async fn run(guard: FlightGuard, mut job: FetchJob, spool_dir: PathBuf) {
    let flight = guard.flight.clone();
    let digest = flight.digest.clone();
    let spool = spool_dir.join(format!(
        "{}-{:016x}.part",
        digest.hex(),
        rand::random::<u64>()
    ));
    let outcome = match read_shared(&flight, &mut job, &spool).await {
        Some(outcome) => outcome,
        None => fetch(&guard, &job, &spool).await,
    };
    if let Err(e) = outcome {
        // A blob upstream does not have is the client's answer (a 404 on its
        // request line), not a failure of the mirror.
        if matches!(e, FlightError::Upstream(UpstreamError::NotFound { .. })) {
            tracing::debug!(%digest, registry = job.upstream.registry(), "blob not on upstream");
        } else {
            tracing::warn!(%digest, registry = job.upstream.registry(), error = ?e, "blob fetch failed");
        }
        guard.fail(e);
    }
    // The flight leaves the map first: a request arriving now looks at the
    // store afresh instead of joining a flight that has ended.
    drop(guard);
    // Gone already when the store took the file itself.
    remove_quietly(&spool).await;
}

/// Reads the blob from the shared store into the spool, for this
/// replica's clients, and keeps it as the local copy. `None` when the job
/// is no such read, or the store does not give the blob: it is fetched
/// then, as a missing blob is.
async fn read_shared(
    flight: &Arc<Flight>,
    job: &mut FetchJob,
    spool: &Path,
) -> Option<Result<(), FlightError>> {
    if !job.from_store {
        return None;
    }
    let body = match job.blobs.get_shared(&flight.digest).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            job.store_checked = true;
            flight.set_origin("upstream");
            return None;
        }
        Err(e) => {
            metrics().backend_error("storage");
            tracing::warn!(digest = %flight.digest, error = %e, "a stored blob cannot be read; fetching it");
            job.store_unreadable = true;
            flight.set_origin("upstream");
            return None;
        }
    };
    let incoming = Incoming {
        length: Some(body.size),
        chunks: body.stream.map(|c| c.map_err(|e| e.to_string())).boxed(),
        from: Feed::Store,
    };
    let (size, spooled) = match download(flight, job, spool, incoming).await {
        Ok(read) => read,
        Err(e) => {
            metrics().backend_error("storage");
            return Some(Err(e));
        }
    };
    if let Spooled::Memory(chunks) = spooled
        && let Err(e) = write_spool(spool, chunks).await
    {
        tracing::warn!(digest = %flight.digest, error = ?e, "cannot write a stored blob to the spool");
        return Some(Ok(()));
    }
    if let Err(e) = job.blobs.keep_copy(&flight.digest, spool, size).await {
        tracing::warn!(digest = %flight.digest, error = %e, "cannot keep a local copy of a stored blob");
    }
    Some(Ok(()))
}

/// Fetches the blob from upstream or a peer replica, and stores it when
/// this replica fetched it upstream.
async fn fetch(guard: &FlightGuard, job: &FetchJob, spool: &Path) -> Result<(), FlightError> {
    let flight = &guard.flight;
    match source(job, flight).await {
        Ok(Source::Stored) => {
            flight.phase.send_replace(Phase::Stored);
            Ok(())
        }
        Ok(Source::Upstream(lease)) => {
            // The slot bounds fetches from upstream, not the commits after.
            let fetched = match job.slots.take().await {
                Ok(_slot) => from_upstream(flight, job, spool).await,
                Err(e) => Err(e),
            };
            let result = match fetched {
                Ok((size, spooled)) => Ok(commit(guard, job, spool, size, spooled).await),
                Err(e) => Err(e),
            };
            match (lease, &result) {
                // Stored: the lease says so and is left to lapse instead of
                // released, so a replica that found the blob missing a
                // moment before the commit, and claims it now, learns that
                // it is stored instead of fetching it a second time.
                (Some(lease), Ok(true)) => lease.mark_stored(job.cluster.lease_ttl).await,
                (Some(lease), _) => lease.release().await,
                (None, _) => {}
            }
            result.map(drop)
        }
        Ok(Source::Peer(resp)) => {
            flight.set_origin("peer");
            let from = format!("{} via a peer replica", job.upstream.registry());
            let incoming = Incoming::response(resp, Feed::Upstream(from));
            download(flight, job, spool, incoming).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Decides where the bytes come from. With replicas sharing metadata, one
/// of them holds the blob's lease and fetches upstream; the others stream
/// from it, or wait for its commit (or for its lease to lapse, if it died)
/// for as long as it keeps the lease.
async fn source(job: &FetchJob, flight: &Flight) -> Result<Source, FlightError> {
    let lease_name = crate::meta::blob_lease(&flight.digest);
    // A peer asks this replica because it holds (or just held) the lease:
    // the fetch it held may have stored the blob and left between this
    // request's look and its joining, so a peer's request always looks.
    let look = (!job.store_checked || job.for_peer) && !job.store_unreadable;
    if look && stored(job, flight).await {
        return Ok(Source::Stored);
    }
    // A peer's request never goes on to a third replica, nor waits: the
    // asking replica finds the holder, or the store, itself.
    let not_here = || FlightError::Busy("this replica does not fetch this blob".into());
    // Whether another replica held the lease at some point: once it is
    // gone, the blob may have been stored meanwhile.
    let mut waited = false;
    // Waiting replicas learn of the commit from the lease; the store is
    // looked at now and then too, for a holder that could not mark it.
    let mut next_look = Instant::now() + WAIT_LOOK;
    loop {
        match job.cluster.claim(&lease_name).await {
            Claim::Mine(lease) => {
                if waited && !job.store_unreadable && stored(job, flight).await {
                    lease.release().await;
                    return Ok(Source::Stored);
                }
                return Ok(Source::Upstream(Some(lease)));
            }
            Claim::Alone if job.for_peer && job.meta.shared() => return Err(not_here()),
            // Replicas share metadata but it fails now: no lease says
            // whether another replica stored the blob since an answer from
            // ahead of the request, so ask the store.
            Claim::Alone => {
                if job.meta.shared() {
                    let look = (job.checked_ahead || waited) && !job.store_unreadable;
                    if look && stored(job, flight).await {
                        return Ok(Source::Stored);
                    }
                    metrics().fetch_unguarded("metadata_error");
                }
                return Ok(Source::Upstream(None));
            }
            // The store cannot give what it holds, and no fetch runs: one
            // more from upstream serves the clients.
            Claim::Theirs { stored: true, .. } if job.store_unreadable => {
                metrics().fetch_unguarded("store_error");
                return Ok(Source::Upstream(None));
            }
            // The holder stored it: the store has it, or it has gone since
            // (evicted, or removed as corrupt). Then one replica takes the
            // finished lease over and fetches it again.
            Claim::Theirs {
                stored: true,
                holder,
                ..
            } => {
                if stored(job, flight).await {
                    return Ok(Source::Stored);
                }
                if job.for_peer {
                    return Err(not_here());
                }
                if let Some(lease) = job.cluster.take_over(&lease_name, &holder).await {
                    return Ok(Source::Upstream(Some(lease)));
                }
            }
            Claim::Theirs { .. } if job.for_peer => return Err(not_here()),
            Claim::Theirs {
                peer: Some(peer), ..
            } => {
                if let Some(resp) = from_peer(job, &peer, flight).await? {
                    tracing::info!(%peer, digest = %flight.digest, "streaming a blob another replica is fetching");
                    return Ok(Source::Peer(resp));
                }
            }
            Claim::Theirs { peer: None, .. } => {}
        }
        waited = true;
        if Instant::now() >= next_look && !job.store_unreadable {
            if stored(job, flight).await {
                return Ok(Source::Stored);
            }
            next_look = Instant::now() + WAIT_LOOK;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Whether the store has the blob now; an unreachable store counts as a
/// miss (clients are served from upstream anyway).
async fn stored(job: &FetchJob, flight: &Flight) -> bool {
    matches!(job.blobs.stat(&flight.digest).await, Ok(Some(_)))
}

/// Asks the replica at `peer` for the blob (it streams its own fetch).
/// `None` when it cannot serve it now (the wait goes on); an error when it
/// says upstream does not have the blob in this repository.
async fn from_peer(
    job: &FetchJob,
    peer: &url::Url,
    flight: &Flight,
) -> Result<Option<reqwest::Response>, FlightError> {
    let Ok(url) = peer.join(&format!("/v2/{}/blobs/{}", job.repo_key, flight.digest)) else {
        return Ok(None);
    };
    match job.peers.get(url).header(PEER_HEADER, "1").send().await {
        Ok(r) if r.status().is_success() => Ok(Some(r)),
        // The peer asked upstream (under this repository) and was told no:
        // asking again until its fetch ends would only repeat that.
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
            Err(FlightError::Upstream(UpstreamError::NotFound {
                registry: job.upstream.registry().to_owned(),
                status: 404,
            }))
        }
        Ok(r) => {
            tracing::debug!(%peer, status = %r.status(), "peer cannot serve the blob");
            Ok(None)
        }
        Err(e) => {
            tracing::debug!(%peer, error = %crate::upstream::describe(&e), "peer unreachable");
            Ok(None)
        }
    }
}

/// Fetches from upstream into the spool; the verified size and bytes.
async fn from_upstream(
    flight: &Arc<Flight>,
    job: &FetchJob,
    spool: &Path,
) -> Result<(u64, Spooled), FlightError> {
    let resp = job
        .upstream
        .blob(&job.repository, &flight.digest)
        .await
        .map_err(FlightError::Upstream)?;
    let from = Feed::Upstream(job.upstream.registry().to_owned());
    let fetched = download(flight, job, spool, Incoming::response(resp, from)).await?;
    crate::telemetry::tally::tally().add("bytes.fetched", fetched.0);
    Ok(fetched)
}

/// How long a verified blob waits for the clients still reading it before
/// it is uploaded anyway.
const UPLOAD_WAIT_MAX: Duration = Duration::from_secs(30);

/// Stores a verified blob and links it to its repository; true when it is
/// stored. A store that fails here only costs a refetch later.
async fn commit(
    guard: &FlightGuard,
    job: &FetchJob,
    spool: &Path,
    size: u64,
    spooled: Spooled,
) -> bool {
    let digest = &guard.flight.digest;
    // Storing is for the next clients. Clients reading slower than upstream
    // sent are still streaming the spool: an upload waits for them (up to
    // UPLOAD_WAIT_MAX, or until shutdown begins), so that it takes neither
    // this replica's bandwidth nor the store's CPU from them. Meanwhile the
    // flight goes on serving the blob, to new clients here and to other
    // replicas, and its lease is held. The upload then takes a fetch slot
    // again: slots bound the uploads running at once, as they bound the
    // fetches, and so the store's load.
    let _slot = if job.blobs.remote() {
        if !guard.clients_done(UPLOAD_WAIT_MAX).await {
            tracing::debug!(%digest, "clients still reading; uploading anyway");
        }
        job.slots.wait().await
    } else {
        None
    };
    if let Spooled::Memory(chunks) = spooled
        && let Err(e) = write_spool(spool, chunks).await
    {
        metrics().backend_error("storage");
        tracing::error!(%digest, error = ?e, "cannot write a verified blob to the spool");
        return false;
    }
    let stored = job.blobs.store(digest, spool, size).await;
    // Even a store that reports failure may have landed.
    job.missing.stored(digest);
    match stored {
        Ok(()) => {
            if let Err(e) = job
                .meta
                .link(&job.repo_key, std::slice::from_ref(digest))
                .await
            {
                tracing::warn!(%digest, error = %e, "linking a stored blob failed");
            }
            true
        }
        Err(e) => {
            metrics().backend_error("storage");
            tracing::error!(%digest, error = %e, "storing a verified blob failed");
            false
        }
    }
}

/// Blobs up to this size (as upstream announces it) are held in memory
/// while they are fetched, and written to the spool once verified: their
/// clients wait on no disk. The memory lives as long as the fetch and the
/// client streams reading it; with the default 64 fetch slots, fetches
/// from upstream and uploads hold at most 64 MiB this way, plus the blobs
/// whose clients are still reading before their upload (for at most
/// UPLOAD_WAIT_MAX), plus reads of small stored blobs from the shared
/// store (no slot bounds those: one per blob this replica lacks a copy
/// of, for as long as its clients read it).
const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// A body to spool: its announced length, its chunks, and who sends it.
struct Incoming {
    length: Option<u64>,
    chunks: futures::stream::BoxStream<'static, Result<Bytes, String>>,
    from: Feed,
}

enum Feed {
    /// Upstream (named so in errors), or a peer replica's fetch from it.
    Upstream(String),
    /// The shared store, which holds only verified blobs.
    Store,
}

impl Feed {
    fn name(&self) -> &str {
        match self {
            Feed::Upstream(name) => name,
            Feed::Store => "the shared blob store",
        }
    }

    /// The body failed to arrive.
    fn unavailable(&self, detail: String) -> FlightError {
        match self {
            Feed::Upstream(registry) => FlightError::Upstream(UpstreamError::Unavailable {
                registry: registry.clone(),
                detail,
            }),
            Feed::Store => FlightError::Failed(format!("{}: {detail}", self.name())),
        }
    }
}

impl Incoming {
    fn response(resp: reqwest::Response, from: Feed) -> Self {
        Self {
            length: resp.content_length(),
            chunks: resp
                .bytes_stream()
                .map(|c| c.map_err(|e| crate::upstream::describe(&e.without_url())))
                .boxed(),
            from,
        }
    }
}

/// Streams `incoming` into a spool, publishing progress to readers.
/// Returns the verified size and where the bytes are; the phase is
/// `Verified` when it returns Ok.
async fn download(
    flight: &Arc<Flight>,
    job: &FetchJob,
    spool: &Path,
    incoming: Incoming,
) -> Result<(u64, Spooled), FlightError> {
    let Incoming {
        length,
        chunks,
        from,
    } = incoming;
    let mismatch = || FlightError::Mismatch {
        registry: from.name().to_owned(),
        expected: flight.digest.to_string(),
    };
    // The manifest's word and upstream's must agree; either gives the
    // length clients are told, and the point past which the body is wrong.
    // A stored blob was verified and let in once already: its length is
    // the store's.
    let (size, max) = match (&from, job.expected_size, length) {
        (Feed::Store, _, stored) => (stored, u64::MAX),
        (_, Some(named), Some(sent)) if named != sent => return Err(mismatch()),
        (_, named, sent) => (named.or(sent), job.bounds.max_blob_size),
    };
    let too_large = |what: String| {
        metrics().fetch_abandoned("too_large");
        FlightError::Failed(over_max_blob_size(&what, max))
    };
    if let Some(size) = size
        && size > max
    {
        return Err(too_large(format!("the blob is {size} bytes")));
    }
    let spooled = if size.is_some_and(|s| s <= IN_MEMORY_MAX) {
        Spooled::Memory(Arc::default())
    } else {
        if let Some(size) = size
            && let Some((free, _)) = spool.parent().and_then(|dir| free_space(dir).ok())
            && size.saturating_add(SPOOL_MARGIN) > free
        {
            return Err(FlightError::NoRoom(format!(
                "a blob of {size} bytes does not fit in the {free} bytes free for the spool"
            )));
        }
        Spooled::File(Arc::new(create_spool(spool).await?))
    };
    flight.phase.send_replace(Phase::Streaming {
        spool: spooled.clone(),
        size,
        readable: 0,
    });

    let broke_off = |received: u64, e: String| {
        from.unavailable(format!(
            "the blob body broke off after {received} bytes: {e}"
        ))
    };
    // A spool file is written and hashed by a task of its own, so that
    // receiving from upstream never waits for the disk.
    let hasher = Hasher::new(flight.digest.algorithm());
    let mut sink = match &spooled {
        Spooled::File(file) => Sink::File(SpoolWriter::start(file.clone(), hasher, flight.clone())),
        Spooled::Memory(memory) => Sink::Memory(memory.clone(), Box::new(hasher)),
    };
    let mut received: u64 = 0;
    let mut body = chunks;
    let mut pace = Pace::new(job.bounds.min_rate, job.bounds.min_rate_window);
    let mut idle_until = Instant::now() + job.body_idle;
    loop {
        let wake = pace
            .next_check(Instant::now())
            .map_or(idle_until, |check| check.min(idle_until));
        let next = tokio::time::timeout_at(wake.into(), body.next()).await;
        let now = Instant::now();
        if pace.too_slow(now, received, flight.readers()) {
            metrics().fetch_abandoned("too_slow");
            return Err(FlightError::Failed(format!(
                "abandoned: no client read it for {}, and upstream sent under [fetch] min_rate",
                humantime::format_duration(job.bounds.min_rate_window)
            )));
        }
        let chunk = match next {
            Err(_) if now >= idle_until => {
                return Err(from.unavailable(format!(
                    "the blob body stalled for {}",
                    humantime::format_duration(job.body_idle)
                )));
            }
            Err(_) => continue,
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(broke_off(received, e)),
            Ok(Some(Ok(c))) => c,
        };
        idle_until = now + job.body_idle;
        received += chunk.len() as u64;
        match size {
            Some(s) if received > s => return Err(mismatch()),
            None if received > max => {
                return Err(too_large(format!("the body ran past {max} bytes")));
            }
            _ => {}
        }
        match &mut sink {
            Sink::File(spool) => {
                if !spool.send(chunk).await {
                    // The writer stopped on an error; `finish` reports it.
                    break;
                }
            }
            Sink::Memory(memory, hasher) => {
                // At most IN_MEMORY_MAX bytes in all: hashing them here
                // costs less than a hop to the blocking pool.
                hasher.update(&chunk);
                memory.lock().unwrap_or_else(|p| p.into_inner()).push(chunk);
                publish(flight, received);
            }
        }
    }
    let (hasher, written) = match sink {
        Sink::File(spool) => spool.finish().await?,
        Sink::Memory(_, hasher) => (*hasher, received),
    };
    let actual = hasher.finish();
    if written != received || size.is_some_and(|s| s != written) || actual != flight.digest {
        return Err(mismatch());
    }
    flight.phase.send_replace(Phase::Verified {
        spool: spooled.clone(),
        size: written,
    });
    Ok((written, spooled))
}

/// Lets readers have the first `written` bytes, holding back the last one
/// until the digest is checked.
fn publish(flight: &Flight, written: u64) {
    let readable = written.saturating_sub(1);
    flight.phase.send_modify(|p| {
        if let Phase::Streaming { readable: r, .. } = p {
            *r = readable;
        }
    });
}

/// Where a download puts the bytes it receives.
enum Sink {
    /// Into memory, hashed as they come.
    Memory(Arc<Mutex<MemorySpool>>, Box<Hasher>),
    /// To the spool writer.
    File(SpoolWriter),
}

/// Chunks waiting for the spool writer at most (each one network read).
const SPOOL_QUEUE: usize = 4;

/// Bytes the spool writer gathers into one write at most: readers hear
/// about new bytes after each write, and a fetch whose writes wait holds
/// no more than this (besides the queue).
const BATCH_MAX: u64 = 256 * 1024;

/// Spool writes running at once in the process, across all fetches. Each
/// holds a blocking-pool thread while it writes and hashes; one thread
/// hashes about 1.5 GB/s, so a few outrun any network. The rest of the pool
/// (512 threads by default) is left to store reads, metadata calls and
/// commits, however many fetches run.
const SPOOL_WRITES: usize = 16;
static WRITE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SPOOL_WRITES);

/// Writes a fetch's bytes to the spool file and hashes them, off the task
/// that receives them, so that receiving never waits for the disk.
///
/// The bytes go to the blocking pool a batch at a time (what arrived while
/// the previous batch was written), under [`WRITE_SLOTS`]. A fetch thus
/// holds a thread only while it writes, not for as long as upstream takes
/// to send: a thread held for a fetch's whole length let slow fetches take
/// the whole pool (600 slow cold blobs on one replica held 512 threads,
/// and a stored blob read or a redb call waited for a fetch to end;
/// tests/bench/threads.py). Bounding peer downloads by the fetch slots
/// instead would leave `max_concurrent = 0` (or a large one) unbounded, and
/// could stall two replicas on each other: each one's slots taken by
/// downloads from the other, whose fetches wait for a slot to start.
struct SpoolWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<io::Result<WriterOutcome>>,
}

/// The hasher, and the bytes written.
type WriterOutcome = (Hasher, u64);

impl SpoolWriter {
    fn start(file: Arc<std::fs::File>, hasher: Hasher, flight: Arc<Flight>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(SPOOL_QUEUE);
        let done = tokio::spawn(write_batches(file, hasher, flight, rx));
        Self { tx, done }
    }

    /// Queues a chunk; false when the writer has stopped (on an error).
    async fn send(&self, chunk: Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Waits for everything queued to be written.
    async fn finish(self) -> Result<WriterOutcome, FlightError> {
        drop(self.tx);
        self.done
            .await
            .map_err(|e| FlightError::Failed(e.to_string()))?
            .map_err(|e| spool_error("writing the spool file", &e))
    }
}

/// Why a blob is refused by `[fetch] max_blob_size`: `what` went past `max`.
pub(super) fn over_max_blob_size(what: &str, max: u64) -> String {
    format!("{what}, more than this mirror's [fetch] max_blob_size of {max} bytes")
}

/// Room a spool file leaves on its disk at least, beyond the blob.
const SPOOL_MARGIN: u64 = 16 * 1024 * 1024;

/// A spool write that failed; for lack of space, a `NoRoom`.
fn spool_error(what: &str, e: &io::Error) -> FlightError {
    if e.kind() == io::ErrorKind::StorageFull {
        FlightError::NoRoom(format!("{what}: {e}"))
    } else {
        FlightError::Failed(format!("{what}: {e}"))
    }
}

/// The spool writer's task: receives chunks while the previous batch is
/// written, so the disk and the network work at the same time.
async fn write_batches(
    file: Arc<std::fs::File>,
    hasher: Hasher,
    flight: Arc<Flight>,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> io::Result<WriterOutcome> {
    let mut written = 0u64;
    // The hasher is with the write under way, if any.
    let mut hasher = Some(hasher);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0u64;
    let mut writing = None;
    let mut open = true;
    loop {
        if let Some(h) = hasher.take_if(|_| !batch.is_empty()) {
            let chunks = std::mem::take(&mut batch);
            writing = Some(Box::pin(write_batch(file.clone(), h, written, chunks)));
            batched = 0;
        }
        // With no write under way, everything received is written: wait
        // for more, or the end (a closed queue keeps answering None).
        let Some(write) = writing.as_mut() else {
            match rx.recv().await {
                Some(chunk) => {
                    batched += chunk.len() as u64;
                    batch.push(chunk);
                    continue;
                }
                _ => break,
            }
        };
        tokio::select! {
            chunk = rx.recv(), if open && batched < BATCH_MAX => match chunk {
                Some(chunk) => {
                    batched += chunk.len() as u64;
                    batch.push(chunk);
                }
                None => open = false,
            },
            done = write => {
                let (h, end) = done?;
                (hasher, written, writing) = (Some(h), end, None);
                publish(&flight, written);
            }
        }
    }
    let hasher = hasher.ok_or_else(|| io::Error::other("the spool writer lost its hasher"))?;
    Ok((hasher, written))
}

/// Writes `chunks` at `at` and hashes them, on the blocking pool once a
/// write slot is free; the hasher and where the bytes end.
async fn write_batch(
    file: Arc<std::fs::File>,
    mut hasher: Hasher,
    at: u64,
    chunks: Vec<Bytes>,
) -> io::Result<(Hasher, u64)> {
    // The semaphore is never closed; if it were, that is an error, not a
    // panic.
    let _slot = WRITE_SLOTS.acquire().await.map_err(io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        let mut end = at;
        for chunk in &chunks {
            file.write_all_at(chunk, end)?;
            hasher.update(chunk);
            end += chunk.len() as u64;
        }
        Ok((hasher, end))
    })
    .await
    .map_err(io::Error::other)?
}

/// Creates the spool file (its directory too, when missing).
async fn create_spool(spool: &Path) -> Result<std::fs::File, FlightError> {
    let spool = spool.to_owned();
    tokio::task::spawn_blocking(move || new_spool_file(&spool))
        .await
        .map_err(|e| FlightError::Failed(e.to_string()))?
        .map_err(|e| spool_error("cannot create spool file", &e))
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

/// Writes a blob held in memory to the spool file, for the store.
async fn write_spool(spool: &Path, memory: Arc<Mutex<MemorySpool>>) -> Result<(), FlightError> {
    // Readers lock the same spool on async workers: copy the (reference
    // counted) chunks out instead of holding the lock over disk writes.
    let chunks = memory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .chunks()
        .to_vec();
    let spool = spool.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = new_spool_file(&spool)?;
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
