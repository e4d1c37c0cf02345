//! Blob requests: serve from the store when the repository may see the blob,
//! otherwise join or start the single fetch and stream from its spool.

use std::io;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::fetch::FetchJob;
use super::flight::{FlightError, Started};
use super::{Mirror, MirrorError};
use crate::range::{ByteRange, RangeError, RangeSpec};
use crate::reference::Digest;
use crate::route::Target;
use crate::storage::{BlobBody, StorageError};
use crate::telemetry::metrics::metrics;
use crate::upstream::UpstreamError;
use crate::zerocopy::Piece;

/// A blob (or part of it) on its way to a client.
pub struct BlobResponse {
    /// Size of the whole blob, when known (upstream may stream without one).
    pub size: Option<u64>,
    /// The part being sent, for a satisfied Range request.
    pub range: Option<ByteRange>,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
    /// The same bytes, those in local files as slices of them (to send
    /// without copying), when the blob is in such a file: stored there, or
    /// in the spool of the fetch streaming it. A response uses one of the
    /// two streams.
    pub pieces: Option<BoxStream<'static, io::Result<Piece>>>,
    /// Whether the bytes come from the cache (for logs and metrics).
    pub cached: bool,
    /// Where exactly, for metrics: `local` (a file here: the fs store or a
    /// local copy), `bucket`, `upstream`, or `peer` (another replica's
    /// fetch).
    pub origin: &'static str,
}

/// What HEAD reports.
pub struct BlobInfo {
    pub size: Option<u64>,
}

impl From<BlobBody> for BlobResponse {
    fn from(b: BlobBody) -> Self {
        Self {
            origin: if b.file.is_some() { "local" } else { "bucket" },
            size: Some(b.size),
            range: b.range,
            stream: b.stream,
            pieces: b
                .file
                .map(|f| futures::stream::once(std::future::ready(Ok(Piece::File(f)))).boxed()),
            cached: true,
        }
    }
}

impl Mirror {
    /// A blob for a GET. `needs_length`: the client cannot tell a body cut
    /// short from a whole one unless told its length (HTTP/1.0, where the
    /// end of the connection ends the body): a fetch that streams without a
    /// known size is then waited for until verified.
    pub async fn blob(
        &self,
        target: &Target,
        digest: &Digest,
        range: Option<RangeSpec>,
        for_peer: bool,
        needs_length: bool,
    ) -> Result<BlobResponse, MirrorError> {
        let served = self
            .serve_blob(target, digest, range, for_peer, needs_length)
            .await;
        // A peer's request is its replica's client's, who noted it there.
        if let (Some(uses), Ok(_), false) = (&self.uses, &served, for_peer) {
            uses.note_blob_served(&target.registry, digest);
        }
        served
    }

    async fn serve_blob(
        &self,
        target: &Target,
        digest: &Digest,
        range: Option<RangeSpec>,
        for_peer: bool,
        needs_length: bool,
    ) -> Result<BlobResponse, MirrorError> {
        // Peers ask the replica that holds the blob's lease, which is
        // fetching it then. A request that says it comes from a peer while
        // no fetch of the blob runs here is served as a client's is, lease
        // and all: the header cannot make replicas fetch upstream side by
        // side.
        let for_peer = for_peer && self.flights.is_running(digest);
        // A blob this repository's manifests named is read straight away:
        // the read itself says whether it is stored. (Asking first cost S3 a
        // HEAD per warm blob.) Others are served only once upstream
        // confirms this repository has them. The fetch below need not ask
        // the store again when it has just said the blob is missing, nor
        // the store at all when it lacked the blob a moment ago.
        //
        // A whole blob that would be read from the shared store, because
        // this replica keeps no copy of it, is read by a flight like a
        // fetch's: once for all the clients here, who follow its spool, and
        // kept as the copy. (A read per client took a thousand bucket
        // streams, and their buffers, for a thousand nodes.)
        // While the spool's disk is full, stored blobs are read directly.
        let mut from_store =
            range.is_none() && !self.no_room.recent("") && self.blobs.reads_shared(digest);
        let mut checked_ahead = self.missing.is_missing(digest).await;
        let mut store_checked = if checked_ahead {
            from_store = false;
            true
        } else if self.linked(target, digest).await {
            match self.stored_body_unless(from_store, digest, range).await? {
                Some(body) => return Ok(body),
                None => !from_store,
            }
        } else if self.stored_size(digest).await.is_some() {
            if !self.authorized(target, digest).await? {
                return Err(unknown(target, digest));
            }
            match self.stored_body_unless(from_store, digest, range).await? {
                Some(body) => return Ok(body),
                None => false,
            }
        } else {
            from_store = false;
            true
        };
        let key = target.key();
        // A fetch started for another repository, or a blob another fetch
        // stored meanwhile, is served only once upstream confirms this
        // repository has it. If such a joined fetch fails as unknown, or on
        // the size the other repository's manifests named, this repository
        // gets a fetch of its own (once).
        let mut joined_foreign = false;
        // Set once the store said it had the blob but could not give it: the
        // next fetch goes upstream instead of back to the store.
        let mut store_unreadable = false;
        // Set once a blob found stored meanwhile was sent through a flight
        // reading the store.
        let mut read_store_once = false;
        loop {
            if self.no_room.recent("") && !self.flights.is_running(digest) {
                return self.pass_through(target, digest, needs_length).await;
            }
            let job = FetchJob {
                upstream: self.upstream(target)?.clone(),
                repository: target.repository.as_str().to_owned(),
                repo_key: key.clone(),
                blobs: self.blobs.clone(),
                meta: self.meta.clone(),
                cluster: self.cluster.clone(),
                peers: self.peers.clone(),
                body_idle: self.body_idle,
                for_peer,
                store_checked,
                checked_ahead,
                slots: self.fetch_slots.clone(),
                missing: self.missing.clone(),
                expected_size: self.sizes.get(&key, digest),
                bounds: self.bounds,
                store_unreadable,
                from_store,
            };
            (store_checked, checked_ahead, from_store) = (false, false, false);
            let (flight, started) = self.flights.join_or_start(digest, job);
            let foreign = flight.repo_key != key;
            if foreign && !self.authorized(target, digest).await? {
                return Err(unknown(target, digest));
            }
            return match flight.started().await {
                Ok(Started::Stored) => {
                    if !foreign && !self.authorized(target, digest).await? {
                        return Err(unknown(target, digest));
                    }
                    // Stored by another replica's fetch as this one began:
                    // the clients here share one read of it too (once).
                    if range.is_none()
                        && !store_unreadable
                        && !read_store_once
                        && !self.no_room.recent("")
                        && self.blobs.reads_shared(digest)
                    {
                        (from_store, read_store_once) = (true, true);
                        continue;
                    }
                    match self.blobs.get(digest, range).await {
                        Ok(Some(body)) => {
                            metrics().cache("blob", "hit");
                            Ok(body.into())
                        }
                        Err(
                            e @ (StorageError::Unsatisfiable { .. } | StorageError::MalformedRange),
                        ) => Err(e.into()),
                        // Gone since (evicted), or the store failing for a
                        // moment: the client is served from upstream.
                        failed if !store_unreadable => {
                            if let Err(e) = failed {
                                metrics().backend_error("storage");
                                tracing::warn!(%digest, error = %e, "a stored blob cannot be read; fetching it");
                            }
                            store_unreadable = true;
                            continue;
                        }
                        Ok(None) => Err(unknown(target, digest)),
                        Err(e) => Err(e.into()),
                    }
                }
                Ok(Started::Streaming(size)) => {
                    if !foreign {
                        // Upstream answered for this repository: known here
                        // even while the metadata store cannot be read.
                        self.hot.put_link(&key, digest);
                    }
                    let size = match size {
                        None if needs_length => Some(
                            flight
                                .verified()
                                .await
                                .map_err(|e| flight_error(target, digest, e))?,
                        ),
                        known => known,
                    };
                    let range = match (range, size) {
                        (Some(spec), Some(size)) => {
                            Some(spec.resolve(size).map_err(|e| match e {
                                RangeError::Unsatisfiable => StorageError::Unsatisfiable { size },
                                RangeError::Malformed => StorageError::MalformedRange,
                            })?)
                        }
                        // Without a size, ranges cannot be checked: send it all.
                        _ => None,
                    };
                    let (start, end) = range.map_or((0, None), |r| (r.start, Some(r.end + 1)));
                    let cached = flight.reads_store();
                    let outcome = match (cached, started) {
                        (true, _) => "hit",
                        (false, true) => "miss",
                        (false, false) => "joined",
                    };
                    metrics().cache("blob", outcome);
                    Ok(BlobResponse {
                        size,
                        range,
                        stream: flight.clone().stream(start, end).boxed(),
                        origin: flight.origin(),
                        pieces: Some(flight.pieces(start, end).boxed()),
                        cached,
                    })
                }
                // Also a fetch failed on the size another repository's
                // manifests named: this one's may name the right one.
                Err(
                    FlightError::Upstream(UpstreamError::NotFound { .. })
                    | FlightError::Mismatch { .. },
                ) if foreign && !joined_foreign => {
                    joined_foreign = true;
                    continue;
                }
                // No room to spool a stored blob: each client reads it
                // from the store.
                Err(FlightError::NoRoom(why)) if flight.reads_store() => {
                    tracing::warn!(%digest, %why, "no room to spool a stored blob: reading it directly");
                    self.no_room.note("");
                    self.blobs.make_room();
                    match self.stored_body(digest, range).await? {
                        Some(body) => Ok(body),
                        None => continue,
                    }
                }
                Err(FlightError::NoRoom(why)) => {
                    tracing::warn!(%digest, %why, "no room to spool a blob: passing it through");
                    self.no_room.note("");
                    self.blobs.make_room();
                    self.pass_through(target, digest, needs_length).await
                }
                Err(e) => Err(flight_error(target, digest, e)),
            };
        }
    }

    /// Streams a blob from upstream to this client alone, verified as it
    /// goes (the last chunk held back until it matched) and kept nowhere:
    /// while the disk has no room, a blob still reaches its client, even
    /// one larger than the disk.
    async fn pass_through(
        &self,
        target: &Target,
        digest: &Digest,
        needs_length: bool,
    ) -> Result<BlobResponse, MirrorError> {
        let resp = self
            .upstream(target)?
            .blob(target.repository.as_str(), digest)
            .await
            .map_err(|e| flight_error(target, digest, FlightError::Upstream(e)))?;
        let size = resp
            .content_length()
            .or_else(|| self.sizes.get(&target.key(), digest));
        if size.is_none() && needs_length {
            return Err(MirrorError::Busy(
                "no room to cache this blob, and upstream did not say its length: retry later"
                    .into(),
            ));
        }
        if let Some(size) = size
            && size > self.bounds.max_blob_size
        {
            return Err(MirrorError::Fetch(super::fetch::over_max_blob_size(
                &format!("the blob is {size} bytes"),
                self.bounds.max_blob_size,
            )));
        }
        metrics().cache("blob", "passthrough");
        self.hot.put_link(&target.key(), digest);
        let registry = target.registry.clone();
        let d = digest.clone();
        let stream = resp
            .bytes_stream()
            .map(|chunk| chunk.map_err(io::Error::other))
            .boxed();
        let stream = crate::storage::verified(stream, digest.clone(), size, move || {
            tracing::warn!(digest = %d, %registry, "upstream sent other bytes than the digest names");
        });
        Ok(BlobResponse {
            size,
            range: None,
            stream,
            pieces: None,
            cached: false,
            origin: "upstream",
        })
    }

    /// [`Mirror::stored_body`], unless `flight`: the caller reads the blob
    /// through a flight then.
    async fn stored_body_unless(
        &self,
        flight: bool,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobResponse>, MirrorError> {
        if flight {
            return Ok(None);
        }
        self.stored_body(digest, range).await
    }

    /// The stored blob (or the asked part of it), `None` when it is not
    /// stored or the store cannot be read (the caller fetches it then).
    async fn stored_body(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobResponse>, MirrorError> {
        match self.blobs.get(digest, range).await {
            Ok(Some(body)) => {
                metrics().cache("blob", "hit");
                Ok(Some(body.into()))
            }
            Ok(None) => Ok(None),
            Err(e @ (StorageError::Unsatisfiable { .. } | StorageError::MalformedRange)) => {
                Err(e.into())
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "blob storage read failed");
                Ok(None)
            }
        }
    }

    /// Where to send the client instead of streaming the blob: the store's
    /// presigned URL, or upstream's own CDN while every fetch slot is busy.
    pub async fn blob_redirect(&self, target: &Target, digest: &Digest) -> Option<String> {
        if let Some(url) = self.presigned_redirect(target, digest).await {
            return Some(url);
        }
        self.saturated_redirect(target, digest).await
    }

    /// When the store hands out presigned URLs and the blob is stored and
    /// may be served under this repository.
    async fn presigned_redirect(&self, target: &Target, digest: &Digest) -> Option<String> {
        let expires = self.presign?;
        self.stored_size(digest).await?;
        if !matches!(self.authorized(target, digest).await, Ok(true)) {
            return None;
        }
        match self.blobs.presigned_url(digest, expires).await {
            Ok(url) => {
                if let (Some(uses), Some(_)) = (&self.uses, &url) {
                    uses.note_blob_served(&target.registry, digest);
                }
                url
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot presign; streaming instead");
                None
            }
        }
    }

    /// While every upstream fetch slot is busy, a large uncached blob that
    /// no fetch is bringing in goes to where upstream serves it from, so a
    /// few huge pulls cannot make everyone wait. Small blobs queue for a
    /// slot instead: they are quick, and upstream may serve them itself.
    async fn saturated_redirect(&self, target: &Target, digest: &Digest) -> Option<String> {
        let threshold = self.redirect_above?;
        if !self.fetch_slots.full() || self.flights.is_running(digest) {
            return None;
        }
        if self.stored_size(digest).await.is_some() {
            return None;
        }
        let upstream = self.upstream(target).ok()?;
        let repo = target.repository.as_str();
        let size = upstream.blob_size(repo, digest).await.ok()??;
        if size < threshold {
            return None;
        }
        match upstream.blob_location(repo, digest).await {
            Ok(Some(url)) => {
                metrics().slots_full("redirected");
                tracing::info!(%digest, size, "fetch slots full: client sent to upstream's storage");
                Some(url.to_string())
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "no upstream location to redirect to");
                None
            }
        }
    }

    pub async fn blob_info(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<BlobInfo, MirrorError> {
        // What GET would serve from the store, HEAD answers from it.
        if let Some(size) = self.stored_size(digest).await {
            if !self.authorized(target, digest).await? {
                return Err(unknown(target, digest));
            }
            return Ok(BlobInfo { size: Some(size) });
        }
        match self
            .upstream(target)?
            .blob_size(target.repository.as_str(), digest)
            .await
        {
            // Upstream may not say (it streams the blob chunked); the size
            // this repository's manifests give it is then the answer.
            Ok(size) => Ok(BlobInfo {
                size: size.or_else(|| self.sizes.get(&target.key(), digest)),
            }),
            Err(UpstreamError::NotFound { .. }) => Err(unknown(target, digest)),
            Err(e) => Err(e.into()),
        }
    }
}

fn unknown(target: &Target, digest: &Digest) -> MirrorError {
    MirrorError::BlobUnknown(format!(
        "{digest} is not a blob of {} on {}",
        target.repository, target.registry
    ))
}

fn flight_error(target: &Target, digest: &Digest, e: FlightError) -> MirrorError {
    match e {
        FlightError::Upstream(UpstreamError::NotFound { status, .. }) => MirrorError::BlobUnknown(
            super::manifests::not_on_upstream(target, &digest.to_string(), status),
        ),
        FlightError::Upstream(u) => MirrorError::Upstream(u),
        FlightError::Mismatch { registry, expected } => {
            MirrorError::DigestMismatch { registry, expected }
        }
        FlightError::Failed(why) => MirrorError::Fetch(why),
        FlightError::Busy(why) | FlightError::NoRoom(why) => MirrorError::Busy(why),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures::TryStreamExt;

    use super::*;
    use crate::storage::{BlobBody, BlobStore, FsBlobStore};

    /// A store that says it holds every blob the inner one holds, and then
    /// cannot give it (a transient failure of S3, say).
    struct Unreadable(FsBlobStore);

    #[async_trait]
    impl BlobStore for Unreadable {
        async fn stat(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
            self.0.stat(d).await
        }
        async fn get(
            &self,
            _: &Digest,
            _: Option<RangeSpec>,
        ) -> Result<Option<BlobBody>, StorageError> {
            Err(StorageError::Backend("the store is failing".into()))
        }
        async fn store(&self, d: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
            self.0.store(d, spool, size).await
        }
        async fn delete(&self, d: &Digest) -> Result<(), StorageError> {
            self.0.delete(d).await
        }
        async fn health(&self) -> Result<(), StorageError> {
            Ok(())
        }
    }

    /// An upstream serving `bytes` at every path, counting GETs.
    async fn upstream(bytes: Bytes, gets: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (bytes, gets) = (bytes.clone(), gets.clone());
            async move {
                if req.method() == http::Method::GET {
                    gets.fetch_add(1, Ordering::Relaxed);
                }
                bytes
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// The store held the blob but could not give it: the client is served
    /// from upstream rather than told the mirror is unavailable.
    #[tokio::test]
    async fn a_stored_blob_the_store_cannot_give_is_fetched() {
        let bytes = Bytes::from(vec![7u8; 50_000]);
        let digest = Digest::sha256_of(&bytes);
        let gets = Arc::new(AtomicUsize::new(0));
        let url = upstream(bytes.clone(), gets.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::from_toml(
            &format!(
                "builtin_upstreams = false\ndefault_registry = \"corp.example\"\n\
                 [storage]\nkind = \"fs\"\npath = \"{}\"\n\
                 [[upstreams]]\nregistry = \"corp.example\"\nendpoints = [\"{url}\"]\n",
                dir.path().display()
            ),
            Vec::new(),
        )
        .unwrap();
        let fs = FsBlobStore::open(dir.path()).await.unwrap();
        let spool = dir.path().join("in");
        std::fs::write(&spool, &bytes).unwrap();
        fs.store(&digest, &spool, bytes.len() as u64).await.unwrap();
        let meta = Arc::new(crate::meta::EmbeddedMeta::open(&dir.path().join("meta")).unwrap());
        let mirror = Mirror::new(
            &config,
            Arc::new(Unreadable(fs)),
            meta,
            dir.path().join("tmp"),
        )
        .unwrap();
        let target = mirror
            .router
            .resolve(None, "corp.example/team/app", None)
            .unwrap();
        let body = mirror
            .blob(&target, &digest, None, false, false)
            .await
            .unwrap();
        let got: Vec<Bytes> = body.stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), bytes);
        assert_eq!(gets.load(Ordering::Relaxed), 1);
    }
}
