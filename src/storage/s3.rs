//! Blobs in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, LocalStack):
//! `<prefix>blobs/<algorithm>/<hex>`. A blob goes up from its verified spool
//! file: in one PutObject when small, else as a multipart upload straight to
//! the final key, completed only when every part is in (and aborted
//! otherwise). So an object under a blob key is always whole and verified.
//! Uploads left open by a process that died mid-upload are aborted by a
//! periodic sweep (`abort_stale_uploads`, run by `crate::janitor`).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use futures::StreamExt;
use tokio::task::JoinSet;

use super::{BlobBody, BlobStore, Listed, StorageError};
use crate::config::S3Config;
use crate::range::{ByteRange, RangeSpec};
use crate::reference::Digest;
use crate::telemetry::metrics::metrics;

const MIB: u64 = 1024 * 1024;
/// Size of every multipart part but the last for blobs up to 80 GB
/// (10,000 of them), and the largest blob sent in one PutObject. Larger
/// blobs get larger parts: see `part_size`.
const BASE_PART_SIZE: u64 = 8 * MIB;
// S3's limits on multipart uploads, from "Amazon S3 multipart upload
// limits" (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
/// Smallest part but the last.
const MIN_PART_SIZE: u64 = 5 * MIB;
/// Largest part.
const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// Most parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Largest object.
const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * MIB;
const _: () = assert!(BASE_PART_SIZE >= MIN_PART_SIZE);
/// Uploads asked for per ListMultipartUploads page: S3's most. Tests ask
/// for a few, so that every sweep they run goes through several pages.
#[cfg(not(test))]
const UPLOADS_PER_PAGE: i32 = 1000;
#[cfg(test)]
const UPLOADS_PER_PAGE: i32 = 2;
/// Parts uploading at once per blob. Parts stream from the spool file, so
/// this bounds connections, not memory.
const PARTS_IN_FLIGHT: usize = 4;

pub struct S3BlobStore {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3BlobStore {
    pub async fn new(cfg: &S3Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        // Outside AWS (a custom endpoint) there is no instance metadata to
        // ask for a region: do not go looking for it.
        let region = cfg
            .region
            .clone()
            .or_else(|| cfg.endpoint.as_ref().map(|_| "us-east-1".to_owned()));
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.expose().to_owned(),
                None,
                None,
                "pier-config",
            ));
        }
        let sdk = loader.load().await;
        // S3-compatible servers do not all speak the newer checksum and
        // aws-chunked upload extensions; ask for them only when required.
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // A store that is down must not hold clients for seconds per
            // request: retry briefly, then serve from upstream instead.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(50)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            )
            .interceptor(CountRequests);
        if sdk.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &cfg.endpoint {
            // Custom endpoints rarely have wildcard DNS for bucket hosts.
            builder = builder
                .endpoint_url(endpoint.as_str().trim_end_matches('/'))
                .force_path_style(cfg.path_style.unwrap_or(true));
        } else if let Some(path_style) = cfg.path_style {
            builder = builder.force_path_style(path_style);
        }
        let prefix = match cfg.prefix.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{p}/"),
            _ => String::new(),
        };
        Self {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            prefix,
        }
    }

    /// Where every blob key starts.
    fn blobs_prefix(&self) -> String {
        format!("{}blobs/", self.prefix)
    }

    fn key(&self, digest: &Digest) -> String {
        format!(
            "{}{}/{}",
            self.blobs_prefix(),
            digest.algorithm().as_str(),
            digest.hex()
        )
    }

    /// The object's HEAD answer, `None` when it is not stored.
    async fn head(&self, digest: &Digest) -> Result<Option<HeadObjectOutput>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(digest))
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(backend("HeadObject", e)),
        }
    }

    /// Aborts one upload; false when it was gone already (another replica
    /// aborted it, or its own upload finished).
    async fn abort_upload(&self, key: &str, id: &str) -> Result<bool, StorageError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(backend("AbortMultipartUpload", e)),
        }
    }
}

fn backend<E: ProvideErrorMetadata + std::error::Error + 'static>(
    what: &str,
    e: SdkError<E, HttpResponse>,
) -> StorageError {
    let detail = match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("no message")
            )
        }
        other => crate::upstream::describe(other),
    };
    StorageError::Backend(format!("s3 {what}: {detail}"))
}

/// When an object was written, as a listing or a HEAD dates it (the epoch
/// when it does not say: such an object is the first to go).
fn written(at: Option<&DateTime>) -> SystemTime {
    at.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// The `Range` header value for a spec; S3 understands all three forms.
fn range_header(spec: RangeSpec) -> String {
    match spec {
        RangeSpec::From {
            start,
            end: Some(e),
        } => format!("bytes={start}-{e}"),
        RangeSpec::From { start, end: None } => format!("bytes={start}-"),
        RangeSpec::Suffix(n) => format!("bytes=-{n}"),
    }
}

/// `bytes a-b/total` → (range, total)
fn parse_content_range(v: &str) -> Option<(ByteRange, u64)> {
    let (span, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((
        ByteRange {
            start: a.trim().parse().ok()?,
            end: b.trim().parse().ok()?,
        },
        total.trim().parse().ok()?,
    ))
}

/// The part of the blob a ranged GetObject answered with, which must be a
/// range inside the blob as long as the body: a broken S3-compatible server
/// is a store error, never a wrong length sent on to a client.
fn answered_range(v: &str, length: u64) -> Result<(ByteRange, u64), StorageError> {
    match parse_content_range(v) {
        Some((r, total)) if r.start <= r.end && r.end < total && r.len() == length => {
            Ok((r, total))
        }
        _ => Err(StorageError::Backend(format!(
            "s3 GetObject: Content-Range {v:?} does not fit a body of {length} bytes"
        ))),
    }
}

/// Times a broken GetObject body is picked up again where it broke.
const RESUMES: u32 = 3;

impl S3BlobStore {
    /// Bytes `from..to` of `key`, from `body` and, when it breaks off (a
    /// bucket under load drops long reads), from ranged GetObjects of the
    /// rest, so a client's download does not break with it.
    fn resumable(
        &self,
        key: String,
        body: ByteStream,
        from: u64,
        to: u64,
    ) -> futures::stream::BoxStream<'static, io::Result<bytes::Bytes>> {
        struct Reading {
            client: aws_sdk_s3::Client,
            bucket: String,
            key: String,
            body: ByteStream,
            pos: u64,
            to: u64,
            resumes: u32,
        }
        let reading = Reading {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key,
            body,
            pos: from,
            to,
            resumes: RESUMES,
        };
        futures::stream::unfold(reading, |mut r| async move {
            loop {
                match r.body.next().await {
                    Some(Ok(chunk)) => {
                        r.pos += chunk.len() as u64;
                        return Some((Ok(chunk), r));
                    }
                    None => return None,
                    Some(Err(e)) if r.resumes == 0 || r.pos >= r.to => {
                        return Some((Err(io::Error::other(e)), r));
                    }
                    Some(Err(e)) => {
                        r.resumes -= 1;
                        tracing::debug!(key = %r.key, at = r.pos, error = %e, "a bucket read broke off; resuming");
                        let resumed = r
                            .client
                            .get_object()
                            .bucket(&r.bucket)
                            .key(&r.key)
                            .range(format!("bytes={}-{}", r.pos, r.to - 1))
                            .send()
                            .await;
                        let out = match resumed {
                            Ok(out) => out,
                            Err(e) => {
                                let e = io::Error::other(backend("GetObject", e).to_string());
                                return Some((Err(e), r));
                            }
                        };
                        let length = out.content_length().unwrap_or(0).max(0) as u64;
                        let fits = out
                            .content_range()
                            .and_then(|v| answered_range(v, length).ok())
                            .is_some_and(|(got, _)| got.start == r.pos && got.end + 1 == r.to);
                        if !fits {
                            let e = io::Error::other("s3 GetObject: the resumed read answered another range");
                            return Some((Err(e), r));
                        }
                        r.body = out.body;
                    }
                }
            }
        })
        .fuse()
        .boxed()
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(self
            .head(digest)
            .await?
            .map(|out| out.content_length().unwrap_or(0).max(0) as u64))
    }

    async fn get(
        &self,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, StorageError> {
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(digest));
        if let Some(spec) = range {
            req = req.range(range_header(spec));
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) if status_of(&e) == Some(416) => {
                return match self.stat(digest).await? {
                    Some(size) => Err(StorageError::Unsatisfiable { size }),
                    None => Ok(None),
                };
            }
            Err(e) => return Err(backend("GetObject", e)),
        };
        let length = out.content_length().unwrap_or(0).max(0) as u64;
        let (range, size) = match out.content_range() {
            Some(v) => {
                let (r, total) = answered_range(v, length)?;
                (Some(r), total)
            }
            // A server that ignored the range sent everything.
            None => (None, length),
        };
        let (from, to) = range.map_or((0, size), |r| (r.start, r.end + 1));
        let stream = self.resumable(self.key(digest), out.body, from, to);
        // Others can write to a bucket: a whole blob is checked as it goes
        // out, and an object that is not what its key says is removed, so
        // the next request fetches the blob again.
        let stream = if range.is_none() {
            let (client, bucket, key, d) = (
                self.client.clone(),
                self.bucket.clone(),
                self.key(digest),
                digest.clone(),
            );
            super::verify::verified(stream, digest.clone(), Some(size), move || {
                metrics().cache_eviction("corrupt", size);
                tracing::error!(digest = %d, "the bucket holds other bytes under this blob's key; removing it");
                tokio::spawn(async move {
                    if let Err(e) = client.delete_object().bucket(bucket).key(key).send().await {
                        tracing::warn!(error = %backend("DeleteObject", e), "cannot remove a corrupt object");
                    }
                });
            })
        } else {
            stream
        };
        Ok(Some(BlobBody {
            size,
            range,
            stream,
            file: None,
        }))
    }

    async fn store(&self, digest: &Digest, spool: &Path, size: u64) -> Result<(), StorageError> {
        let actual = tokio::fs::metadata(spool).await?.len();
        if actual != size {
            return Err(StorageError::Backend(format!(
                "spool file holds {actual} bytes, expected {size}"
            )));
        }
        let upload = Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key(digest),
            spool: spool.into(),
        };
        if size <= BASE_PART_SIZE {
            return upload.put_whole(size).await;
        }
        upload.multipart(size).await
    }

    fn remote(&self) -> bool {
        true
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(digest))
            .send()
            .await
            .map(drop)
            .map_err(|e| backend("DeleteObject", e))
    }

    async fn presigned_url(
        &self,
        digest: &Digest,
        expires: Duration,
    ) -> Result<Option<String>, StorageError> {
        let cfg = PresigningConfig::expires_in(expires)
            .map_err(|e| StorageError::Backend(format!("s3 presigning: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(digest))
            .presigned(cfg)
            .await
            .map_err(|e| backend("presign GetObject", e))?;
        Ok(Some(req.uri().to_owned()))
    }

    async fn abort_stale_uploads(&self, older_than: Duration) -> Result<usize, StorageError> {
        let prefix = self.blobs_prefix();
        // Start times are the bucket's clock: a skew of seconds is nothing
        // against ages meant to be hours.
        let cutoff = DateTime::from(
            SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let mut aborted = 0;
        let mut marker: Option<(Option<String>, Option<String>)> = None;
        loop {
            let (key_marker, id_marker) = marker.clone().unwrap_or_default();
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .max_uploads(UPLOADS_PER_PAGE)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| backend("ListMultipartUploads", e))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                // Keys outside Pier's (should a server ignore `prefix`) are
                // left alone, and so are uploads of unknown age: either may
                // be someone's work in progress.
                if !key.starts_with(&prefix) || upload.initiated().is_none_or(|t| *t > cutoff) {
                    continue;
                }
                match self.abort_upload(key, id).await {
                    Ok(true) => aborted += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(key, error = %e, "cannot abort an abandoned upload"),
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                return Ok(aborted);
            }
            let next = Some((
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            ));
            // A server that says there is more but names no new place to go
            // on from would have us list the same page forever.
            if next == marker || next == Some((None, None)) {
                return Err(StorageError::Backend(
                    "s3 ListMultipartUploads: a truncated page without a new marker".into(),
                ));
            }
            marker = next;
        }
    }

    async fn inventory(&self) -> Result<Vec<Listed>, StorageError> {
        let prefix = self.blobs_prefix();
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| backend("ListObjectsV2", e))?;
            for object in page.contents() {
                // Keys that name no digest are not Pier's blobs: left alone.
                let Some(digest) = object
                    .key()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(|k| k.split_once('/'))
                    .and_then(|(alg, hex)| Digest::parse(&format!("{alg}:{hex}")).ok())
                else {
                    continue;
                };
                found.push(Listed {
                    digest,
                    size: object.size().unwrap_or(0).max(0) as u64,
                    written: written(object.last_modified()),
                });
            }
            let next = page.next_continuation_token().map(str::to_owned);
            match next {
                Some(next) if page.is_truncated().unwrap_or(false) => {
                    if token.as_deref() == Some(next.as_str()) {
                        return Err(StorageError::Backend(
                            "s3 ListObjectsV2: a truncated page without a new token".into(),
                        ));
                    }
                    token = Some(next);
                }
                _ => return Ok(found),
            }
        }
    }

    async fn written_at(&self, digest: &Digest) -> Result<Option<SystemTime>, StorageError> {
        Ok(self
            .head(digest)
            .await?
            .map(|out| written(out.last_modified())))
    }

    async fn health(&self) -> Result<(), StorageError> {
        let probe = self.client.head_bucket().bucket(&self.bucket).send();
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend("HeadBucket", e)),
            Err(_) => Err(StorageError::Backend("s3 HeadBucket: timed out".into())),
        }
    }
}

/// Counts every request sent to the bucket (each attempt), by operation:
/// on AWS they are billed, and each one on a client's path is a round trip.
#[derive(Debug)]
struct CountRequests;

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_before_transmit(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
        metrics().bucket_request(operation);
        Ok(())
    }
}

/// One blob's upload from its spool file.
struct Upload {
    client: Client,
    bucket: String,
    key: String,
    /// Shared with the part tasks while they run.
    spool: Arc<Path>,
}

impl Upload {
    async fn multipart(&self, size: u64) -> Result<(), StorageError> {
        // A blob S3 cannot hold is refused before anything is begun.
        let part_size = part_size(size)?;
        let id = self.create().await?;
        let sent = match self.parts(&id, size, part_size).await {
            Ok(parts) => self.complete(&id, parts).await,
            Err(e) => Err(e),
        };
        if sent.is_err() {
            self.abort(&id).await;
        }
        sent
    }

    /// Sends every part, PARTS_IN_FLIGHT at a time; the parts in order.
    /// When one fails, no part is still being sent once this returns.
    async fn parts(
        &self,
        id: &str,
        size: u64,
        part_size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let mut running = JoinSet::new();
        let sent = self.send_parts(&mut running, id, size, part_size).await;
        if sent.is_err() {
            // Dropping the set only asks its tasks to stop, so a part could
            // still be on its way when the caller aborts the upload, and one
            // that lands after the abort keeps its storage (S3 documents
            // this). Stop them, and wait until every one has ended.
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
        sent
    }

    async fn send_parts(
        &self,
        running: &mut JoinSet<Result<CompletedPart, StorageError>>,
        id: &str,
        size: u64,
        part_size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let mut done = Vec::new();
        for (number, start) in (1..).zip((0..size).step_by(part_size as usize)) {
            while running.len() >= PARTS_IN_FLIGHT {
                done.push(join(running).await?);
            }
            let len = part_size.min(size - start);
            running.spawn(self.part(id.to_owned(), number, start, len));
        }
        while !running.is_empty() {
            done.push(join(running).await?);
        }
        done.sort_by_key(|p| p.part_number());
        Ok(done)
    }

    async fn create(&self) -> Result<String, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(|e| backend("CreateMultipartUpload", e))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StorageError::Backend("s3: no upload id".into()))
    }
    fn part(
        &self,
        upload_id: String,
        number: i32,
        start: u64,
        len: u64,
    ) -> impl Future<Output = Result<CompletedPart, StorageError>> + Send + 'static {
        let (client, bucket, key, spool) = (
            self.client.clone(),
            self.bucket.clone(),
            self.key.clone(),
            self.spool.clone(),
        );
        async move {
            let body = spool_slice(&spool, start, len).await?;
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| backend("UploadPart", e))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build())
        }
    }

    async fn put_whole(&self, size: u64) -> Result<(), StorageError> {
        let body = spool_slice(&self.spool, 0, size).await?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/octet-stream")
            .content_length(size as i64)
            .body(body)
            .send()
            .await
            .map(drop)
            .map_err(|e| backend("PutObject", e))
    }

    async fn complete(&self, id: &str, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(drop)
            .map_err(|e| backend("CompleteMultipartUpload", e))
    }

    async fn abort(&self, id: &str) {
        let res = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(id)
            .send()
            .await;
        if let Err(e) = res {
            tracing::warn!(key = %self.key, error = %backend("AbortMultipartUpload", e), "cannot abort an upload");
        }
    }
}

/// The part size for a blob of `size` bytes: the smallest whole number of
/// MiB, at least `BASE_PART_SIZE`, that carries it in `MAX_PARTS` parts.
/// Without it, blobs over 80 GB could never be stored, and every pull of
/// one would fetch it from upstream again.
fn part_size(size: u64) -> Result<u64, StorageError> {
    if size > MAX_OBJECT_SIZE {
        return Err(StorageError::Backend(format!(
            "s3: a blob of {size} bytes is larger than S3's largest object \
             ({MAX_OBJECT_SIZE} bytes, 5 TiB)"
        )));
    }
    let part = (size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB).max(BASE_PART_SIZE);
    // 5 TiB in 10,000 parts takes 525 MiB parts, well under the largest
    // part; checked all the same, should the constants ever change.
    if part > MAX_PART_SIZE {
        return Err(StorageError::Backend(format!(
            "s3: a blob of {size} bytes needs parts of {part} bytes, \
             over S3's largest part ({MAX_PART_SIZE} bytes)"
        )));
    }
    Ok(part)
}

async fn join(
    parts: &mut JoinSet<Result<CompletedPart, StorageError>>,
) -> Result<CompletedPart, StorageError> {
    match parts.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(StorageError::Backend(format!("s3 part task: {e}"))),
        None => Err(StorageError::Backend("s3: no part to wait for".into())),
    }
}

/// `len` bytes of the spool from `start`, streamed from disk.
async fn spool_slice(spool: &Path, start: u64, len: u64) -> Result<ByteStream, StorageError> {
    ByteStream::read_from()
        .path(spool)
        .offset(start)
        .length(Length::Exact(len))
        .build()
        .await
        .map_err(|e| StorageError::Backend(format!("reading the spool: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Secret;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 10-99/1000"),
            Some((ByteRange { start: 10, end: 99 }, 1000))
        );
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(range_header(RangeSpec::Suffix(5)), "bytes=-5");
    }

    #[test]
    fn a_broken_content_range_is_a_store_error() {
        assert_eq!(
            answered_range("bytes 10-99/1000", 90).unwrap(),
            (ByteRange { start: 10, end: 99 }, 1000)
        );
        for (v, len) in [
            ("bytes 10-5/1000", 0),
            ("bytes 10-5/1000", u64::MAX),
            ("bytes 10-99/50", 90),
            ("bytes 10-99/1000", 89),
            ("bytes */1000", 0),
        ] {
            assert!(
                matches!(answered_range(v, len), Err(StorageError::Backend(_))),
                "{v} for {len} bytes"
            );
        }
    }

    /// The S3 server `tests/run.sh` starts (SeaweedFS, which checks SigV4
    /// signatures as AWS does).
    pub(crate) async fn test_store(prefix: &str) -> Option<S3BlobStore> {
        let endpoint = crate::testenv::backend("PIER_TEST_S3_ENDPOINT")?;
        let key = std::env::var("PIER_TEST_S3_ACCESS_KEY").unwrap_or_default();
        let secret = std::env::var("PIER_TEST_S3_SECRET_KEY").unwrap_or_default();
        let bucket = std::env::var("PIER_TEST_S3_BUCKET").unwrap_or_else(|_| "pier-test".into());
        Some(store_at(&endpoint, &bucket, prefix, &key, &secret).await)
    }

    fn config_at(endpoint: &str, bucket: &str, prefix: &str, key: &str, secret: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_owned(),
            prefix: Some(prefix.to_owned()),
            endpoint: Some(endpoint.parse().unwrap()),
            region: Some("us-east-1".into()),
            path_style: None,
            access_key_id: Some(key.to_owned()),
            secret_access_key: Some(Secret::new(secret)),
            spool_path: PathBuf::from("unused"),
            local_cache_path: PathBuf::from("unused"),
            local_cache_size: 0,
            presigned_redirect: false,
            presigned_expiry: Duration::from_secs(60),
            abandoned_upload_age: Duration::from_secs(86_400),
        }
    }

    async fn store_at(
        endpoint: &str,
        bucket: &str,
        prefix: &str,
        key: &str,
        secret: &str,
    ) -> S3BlobStore {
        let store = S3BlobStore::new(&config_at(endpoint, bucket, prefix, key, secret)).await;
        // The bucket may exist already (shared by tests).
        let _ = store
            .client
            .create_bucket()
            .bucket(&store.bucket)
            .send()
            .await;
        store
    }

    /// The same suite against LocalStack's S3 (`tests/localstack.sh`).
    #[tokio::test]
    async fn s3_store_passes_the_suite_on_localstack() {
        let Some(endpoint) = crate::testenv::backend("PIER_TEST_LOCALSTACK_ENDPOINT") else {
            return;
        };
        let prefix = format!("suite-{:x}", rand::random::<u64>());
        let store = store_at(&endpoint, "pier-suite", &prefix, "test", "test").await;
        let dir = tempfile::tempdir().unwrap();
        crate::storage::suite::run(&store, dir.path()).await;
    }

    #[tokio::test]
    async fn s3_store_passes_the_suite() {
        let Some(store) = test_store(&format!("suite-{:x}", rand::random::<u64>())).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        crate::storage::suite::run(&store, dir.path()).await;
    }

    #[tokio::test]
    async fn requests_with_a_wrong_secret_are_refused() {
        let Some(good) = test_store("sig").await else {
            return;
        };
        let endpoint = std::env::var("PIER_TEST_S3_ENDPOINT").unwrap();
        let cfg = S3Config {
            bucket: good.bucket.clone(),
            prefix: None,
            endpoint: Some(endpoint.parse().unwrap()),
            region: Some("us-east-1".into()),
            path_style: None,
            access_key_id: std::env::var("PIER_TEST_S3_ACCESS_KEY").ok(),
            secret_access_key: Some(Secret::new("not-the-secret")),
            spool_path: PathBuf::from("unused"),
            local_cache_path: PathBuf::from("unused"),
            local_cache_size: 0,
            presigned_redirect: false,
            presigned_expiry: Duration::from_secs(60),
            abandoned_upload_age: Duration::from_secs(86_400),
        };
        let bad = S3BlobStore::new(&cfg).await;
        // The server checks signatures: the store is not healthy, and a
        // lookup is an error rather than "not found".
        assert!(bad.health().await.is_err());
        assert!(bad.stat(&Digest::sha256_of(b"x")).await.is_err());
        good.health().await.unwrap();
    }

    #[test]
    fn parts_grow_with_the_blob_so_ten_thousand_carry_it() {
        const GB: u64 = 1000 * 1000 * 1000;
        const TIB: u64 = 1024 * 1024 * MIB;
        for (size, want) in [
            (BASE_PART_SIZE + 1, BASE_PART_SIZE),
            (80 * GB, BASE_PART_SIZE),
            // The most 8 MiB parts carry, and a byte more.
            (BASE_PART_SIZE * MAX_PARTS, BASE_PART_SIZE),
            (BASE_PART_SIZE * MAX_PARTS + 1, 9 * MIB),
            (100 * GB, 10 * MIB),
            (1000 * GB, 96 * MIB),
            (5 * TIB, 525 * MIB),
        ] {
            let part = part_size(size).unwrap();
            assert_eq!(part, want, "a blob of {size} bytes");
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}");
            assert!((MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part), "{size}");
            // The smallest whole MiB that fits: one less would not.
            assert!(
                part == BASE_PART_SIZE || size.div_ceil(part - MIB) > MAX_PARTS,
                "{size}"
            );
        }
        let e = part_size(5 * TIB + 1).unwrap_err().to_string();
        assert!(e.contains("largest object"), "{e}");
    }

    /// Begins an upload of `key` and leaves it open, as a process killed
    /// mid-upload does.
    async fn leave_upload(store: &S3BlobStore, key: &str) -> String {
        let out = store
            .client
            .create_multipart_upload()
            .bucket(&store.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        out.upload_id().unwrap().to_owned()
    }

    /// The keys and ids of the open uploads whose keys start with `prefix`.
    async fn uploads_with_ids(store: &S3BlobStore, prefix: &str) -> Vec<(String, String)> {
        let out = store
            .client
            .list_multipart_uploads()
            .bucket(&store.bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        out.uploads()
            .iter()
            .map(|u| {
                let key = u.key().unwrap_or_default().to_owned();
                (key, u.upload_id().unwrap_or_default().to_owned())
            })
            .collect()
    }

    async fn open_uploads(store: &S3BlobStore, prefix: &str) -> Vec<String> {
        let uploads = uploads_with_ids(store, prefix).await;
        uploads.into_iter().map(|(key, _)| key).collect()
    }

    #[tokio::test]
    async fn uploads_begun_longer_ago_than_the_age_are_aborted() {
        let Some(store) = test_store(&format!("sweep-{:x}", rand::random::<u64>())).await else {
            return;
        };
        // More than one page of them (UPLOADS_PER_PAGE in tests).
        let keys: Vec<String> = (0..5u8)
            .map(|i| store.key(&Digest::sha256_of(&[i])))
            .collect();
        for key in &keys {
            leave_upload(&store, key).await;
        }
        let blobs = store.blobs_prefix();
        // They may be another replica's uploads in progress.
        let day = Duration::from_secs(86_400);
        assert_eq!(store.abort_stale_uploads(day).await.unwrap(), 0);
        assert_eq!(open_uploads(&store, &blobs).await.len(), keys.len());

        assert_eq!(
            store.abort_stale_uploads(Duration::ZERO).await.unwrap(),
            keys.len()
        );
        assert_eq!(open_uploads(&store, &blobs).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn uploads_outside_the_blob_keys_are_left_alone() {
        let ns = format!("sweep-{:x}", rand::random::<u64>());
        let Some(store) = test_store(&ns).await else {
            return;
        };
        let blob = store.key(&Digest::sha256_of(b"blob"));
        // Another deployment whose prefix starts with this one's, a key of
        // this prefix that is not a blob's, and a key of no prefix at all.
        let outside = [
            format!("{ns}x/blobs/sha256/00"),
            format!("{ns}/elsewhere/sha256/00"),
            format!("{ns}-blobs/sha256/00"),
        ];
        for key in outside.iter().chain([&blob]) {
            leave_upload(&store, key).await;
        }
        assert_eq!(store.abort_stale_uploads(Duration::ZERO).await.unwrap(), 1);
        assert!(open_uploads(&store, &blob).await.is_empty());
        for key in &outside {
            assert_eq!(open_uploads(&store, key).await, vec![key.clone()]);
        }
        // Not left behind in the shared bucket.
        for key in &outside {
            for (key, id) in uploads_with_ids(&store, key).await {
                store.abort_upload(&key, &id).await.unwrap();
            }
        }
    }

    /// When a part fails, the parts still being sent are stopped, and have
    /// ended before the upload is aborted: one landing after the abort
    /// would keep its storage.
    #[tokio::test]
    async fn a_failed_part_stops_the_others_before_the_upload_is_aborted() {
        // A bucket that accepts connections and never answers: parts sent
        // to it stay in flight.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                held.push(conn);
            }
        });
        let store = S3BlobStore::new(&config_at(&endpoint, "b", "p", "k", "s")).await;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        // Parts 1 and 2 go out; part 3 cannot be read.
        std::fs::write(&spool, vec![7u8; (BASE_PART_SIZE * 2 + 10) as usize]).unwrap();
        let upload = Upload {
            client: store.client.clone(),
            bucket: store.bucket.clone(),
            key: store.key(&Digest::sha256_of(b"x")),
            spool: spool.as_path().into(),
        };
        let size = BASE_PART_SIZE * 5 / 2;
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            upload.parts("id", size, BASE_PART_SIZE),
        )
        .await
        .expect("the parts in flight were waited for, not stopped");
        assert!(sent.is_err());
        // Every part task holds the spool path while it runs.
        assert_eq!(Arc::strong_count(&upload.spool), 1, "part tasks still run");
    }

    #[tokio::test]
    async fn multipart_uploads_go_up_whole_or_not_at_all() {
        let Some(store) = test_store(&format!("mp-{:x}", rand::random::<u64>())).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        // Two and a half parts.
        let data: Vec<u8> = (0..(BASE_PART_SIZE * 5 / 2))
            .map(|i| (i % 251) as u8)
            .collect();
        let digest = Digest::sha256_of(&data);

        // The last part cannot be read (the spool is short): the parts that
        // went up are discarded with the upload, nothing is visible.
        std::fs::write(&spool, &data[..(BASE_PART_SIZE * 2 + 10) as usize]).unwrap();
        let upload = Upload {
            client: store.client.clone(),
            bucket: store.bucket.clone(),
            key: store.key(&digest),
            spool: spool.as_path().into(),
        };
        assert!(upload.multipart(data.len() as u64).await.is_err());
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        let uploads = store
            .client
            .list_multipart_uploads()
            .bucket(&store.bucket)
            .prefix(store.key(&digest))
            .send()
            .await
            .unwrap();
        assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());

        crate::storage::suite::write(&store, &digest, &spool, &data).await;
        assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
        let body = store.get(&digest, None).await.unwrap().unwrap();
        let got: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(body.stream)
            .await
            .unwrap();
        assert_eq!(got.concat(), data);
        store.delete(&digest).await.unwrap();
    }
}
