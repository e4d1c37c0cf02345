//! Prometheus metrics, served at `/metrics`: one process-wide registry,
//! updated from the request path with atomic adds.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// manifest, blob, tags, catalog, referrers, base, health, metrics, other
    pub endpoint: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// manifest or blob
    pub kind: &'static str,
    /// hit, revalidated, miss, joined, stale
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// cache or upstream
    pub source: &'static str,
    /// Within those: local (a file here) or bucket; upstream or peer
    /// (another replica's fetch).
    pub origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub registry: String,
    /// The HTTP status, or `error` when no response came.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// requests, concurrent_blobs
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// fetch slots: waited, redirected, refused; local copies: hit, miss,
    /// evicted; TLS reloads: loaded, refused
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncListLabels {
    /// The `[[sync.images]]` entry's image.
    pub image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncStateLabels {
    pub image: String,
    /// done, failed (the images of the entry's last run)
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The S3 operation: HeadObject, GetObject, PutObject, UploadPart, ...
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why it happened (see each metric's help).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// storage or metadata
    pub backend: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<EndpointLabels, Histogram>,
    pub cache: Family<CacheLabels, Counter>,
    pub bytes_served: Family<SourceLabels, Counter>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_seconds: Family<RegistryLabels, Histogram>,
    pub upstream_ratelimit_remaining: Family<RegistryLabels, Gauge>,
    pub fetches_in_flight: Gauge,
    pub fetch_joins: Counter,
    pub lease_waits: Counter,
    pub backend_errors: Family<BackendLabels, Counter>,
    pub zero_copy_bytes: Counter,
    pub client_limited: Family<LimitLabels, Counter>,
    pub fetch_slots_full: Family<OutcomeLabels, Counter>,
    pub local_copies: Family<OutcomeLabels, Counter>,
    pub local_copy_bytes: Gauge,
    pub bucket_requests: Family<OperationLabels, Counter>,
    pub fetches_abandoned: Family<ReasonLabels, Counter>,
    pub bodies_broken: Counter,
    pub failed_logins: Counter,
    pub pushed_bytes: Counter,
    pub private_reclaimed_bytes: Counter,
    pub scrub_bytes: Counter,
    pub cache_bytes: Gauge,
    pub cache_blobs: Gauge,
    pub cache_evictions: Family<ReasonLabels, Counter>,
    pub cache_evicted_bytes: Counter,
    pub gc_runs: Counter,
    pub gc_seconds: Histogram,
    pub fetches_unguarded: Family<ReasonLabels, Counter>,
    pub abandoned_uploads_aborted: Counter,
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    pub tls_certificate_expiry: Gauge,
    pub sync_images: Family<SyncStateLabels, Gauge>,
    pub sync_last_success: Family<SyncListLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("pier");
        let m = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            cache: Family::default(),
            bytes_served: Family::default(),
            upstream_requests: Family::default(),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            upstream_ratelimit_remaining: Family::default(),
            fetches_in_flight: Gauge::default(),
            fetch_joins: Counter::default(),
            lease_waits: Counter::default(),
            backend_errors: Family::default(),
            zero_copy_bytes: Counter::default(),
            client_limited: Family::default(),
            fetch_slots_full: Family::default(),
            local_copies: Family::default(),
            local_copy_bytes: Gauge::default(),
            bucket_requests: Family::default(),
            fetches_abandoned: Family::default(),
            bodies_broken: Counter::default(),
            failed_logins: Counter::default(),
            pushed_bytes: Counter::default(),
            private_reclaimed_bytes: Counter::default(),
            scrub_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_blobs: Gauge::default(),
            cache_evictions: Family::default(),
            cache_evicted_bytes: Counter::default(),
            gc_runs: Counter::default(),
            gc_seconds: Histogram::new([0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            fetches_unguarded: Family::default(),
            abandoned_uploads_aborted: Counter::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            sync_images: Family::default(),
            sync_last_success: Family::default(),
            registry: Registry::default(),
        };
        registry.register("http_requests", "Requests served", m.requests.clone());
        registry.register(
            "http_request_seconds",
            "Time to the response headers",
            m.request_seconds.clone(),
        );
        registry.register(
            "cache_lookups",
            "Manifest and blob requests by cache outcome",
            m.cache.clone(),
        );
        registry.register(
            "blob_bytes_served",
            "Blob bytes sent to clients, from the cache or straight from upstream",
            m.bytes_served.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests to upstream registries by status",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_seconds",
            "Upstream time to response headers",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "The ratelimit-remaining an upstream (Docker Hub) last reported",
            m.upstream_ratelimit_remaining.clone(),
        );
        registry.register(
            "blob_fetches_in_flight",
            "Blob fetches running in this replica: from upstream, from another replica's fetch, or from the bucket for a local copy",
            m.fetches_in_flight.clone(),
        );
        registry.register(
            "blob_fetch_joins",
            "Clients that joined a fetch already running",
            m.fetch_joins.clone(),
        );
        registry.register(
            "lease_waits",
            "Times this replica found another one holding a fetch or tag lease",
            m.lease_waits.clone(),
        );
        registry.register(
            "backend_errors",
            "Failed blob storage or metadata operations",
            m.backend_errors.clone(),
        );
        registry.register(
            "blob_bytes_zero_copy",
            "Stored blob bytes sent to clients with sendfile (part of blob_bytes_served)",
            m.zero_copy_bytes.clone(),
        );
        registry.register(
            "client_limit_refusals",
            "Requests refused with 429 by a per-client limit",
            m.client_limited.clone(),
        );
        registry.register(
            "fetch_slots_full",
            "Cold blob requests that found every upstream fetch slot busy, by what happened",
            m.fetch_slots_full.clone(),
        );
        registry.register(
            "local_copies",
            "This replica's local blob copies (S3 store with a local cache): reads that found one (hit) or not (miss), copies evicted",
            m.local_copies.clone(),
        );
        registry.register(
            "local_copy_bytes",
            "Bytes of blobs this replica keeps as local copies",
            m.local_copy_bytes.clone(),
        );
        registry.register(
            "bucket_requests",
            "Requests sent to the S3 bucket (each attempt), by operation",
            m.bucket_requests.clone(),
        );
        registry.register(
            "blob_fetches_abandoned",
            "Blob fetches given up before the end: too_large (past [fetch] max_blob_size or the size its manifest names), too_slow (no client left and under [fetch] min_rate)",
            m.fetches_abandoned.clone(),
        );
        registry.register(
            "blob_fetches_unguarded",
            "Blob fetches from upstream without the blob's lease although replicas share metadata: metadata_error (the lease could not be claimed), store_error (the blob is stored but the store could not give it)",
            m.fetches_unguarded.clone(),
        );
        registry.register(
            "abandoned_uploads_aborted",
            "Multipart uploads left open in the S3 bucket (by a process that died mid-upload) that this replica aborted",
            m.abandoned_uploads_aborted.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Connections to the HTTPS port that did not complete a TLS handshake: plain_http (answered 400), timeout, error (bad or untrusted handshake)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_certificate_reloads",
            "New TLS certificates taken up, from changed files or an ACME CA: loaded (new connections get them), refused (unusable files or a failed ACME order; the certificate in use is kept)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate last loaded expires (Unix time)",
            m.tls_certificate_expiry.clone(),
        );
        registry.register(
            "failed_logins",
            "Requests to the private namespace or its token endpoint with credentials that are wrong",
            m.failed_logins.clone(),
        );
        registry.register(
            "private_reclaimed_bytes",
            "Bytes of private blobs that no manifest referenced, removed after the grace period",
            m.private_reclaimed_bytes.clone(),
        );
        registry.register(
            "pushed_bytes",
            "Bytes of blobs received by pushes to the private namespace",
            m.pushed_bytes.clone(),
        );
        registry.register(
            "response_bodies_broken",
            "Blob responses whose body broke off after the head went out (a failed fetch, a full disk)",
            m.bodies_broken.clone(),
        );
        registry.register(
            "scrub_bytes",
            "Bytes of stored blobs hashed again by the scrub",
            m.scrub_bytes.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes of blobs stored (the fs store, or the bucket: all replicas' count)",
            m.cache_bytes.clone(),
        );
        registry.register(
            "cache_blobs",
            "Blobs stored (the fs store, or the bucket: all replicas' count)",
            m.cache_blobs.clone(),
        );
        registry.register(
            "cache_evictions",
            "Blobs evicted: size (past [cache] max_size), free (below [cache] min_free), age (not served for [cache] max_age), corrupt (stored bytes that do not match the digest)",
            m.cache_evictions.clone(),
        );
        registry.register(
            "cache_evicted_bytes",
            "Bytes of blobs evicted",
            m.cache_evicted_bytes.clone(),
        );
        registry.register(
            "gc_runs",
            "Eviction passes this replica ran over the blob store",
            m.gc_runs.clone(),
        );
        registry.register(
            "gc_seconds",
            "How long each eviction pass took",
            m.gc_seconds.clone(),
        );
        registry.register(
            "sync_images",
            "Images of each [[sync.images]] entry's last run, by how they ended",
            m.sync_images.clone(),
        );
        registry.register(
            "sync_last_success_timestamp_seconds",
            "When each [[sync.images]] entry last synced every image it names",
            m.sync_last_success.clone(),
        );
        Self { registry, ..m }
    }

    pub fn cache_eviction(&self, reason: &'static str, bytes: u64) {
        self.cache_evictions
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.cache_evicted_bytes.inc_by(bytes);
        let t = super::tally::tally();
        t.add("evictions", 1);
        t.add("evicted_bytes", bytes);
    }

    pub fn fetch_abandoned(&self, reason: &'static str) {
        self.fetches_abandoned
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn fetch_unguarded(&self, reason: &'static str) {
        self.fetches_unguarded
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn request(&self, endpoint: &'static str, method: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                method: method.to_owned(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
    }

    /// Counts a cache outcome, and notes it for the request's log line.
    pub fn cache(&self, kind: &'static str, outcome: &'static str) {
        super::access::note_cache(outcome);
        super::tally::tally().outcome(kind, outcome);
        self.cache
            .get_or_create(&CacheLabels { kind, outcome })
            .inc();
    }

    pub fn slots_full(&self, outcome: &'static str) {
        self.fetch_slots_full
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn local_copy(&self, outcome: &'static str) {
        self.local_copies
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn bucket_request(&self, operation: &str) {
        self.bucket_requests
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .inc();
    }

    pub fn backend_error(&self, backend: &'static str) {
        self.backend_errors
            .get_or_create(&BackendLabels { backend })
            .inc();
    }

    pub fn upstream(&self, registry: &str, status: Option<u16>, took: Duration) {
        let t = super::tally::tally();
        t.add(&format!("upstream.{registry}.requests"), 1);
        if status.is_none_or(|s| s >= 500 || s == 429) {
            t.add(&format!("upstream.{registry}.errors"), 1);
        }
        t.add(
            &format!("upstream.{registry}.ms"),
            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        );
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                registry: registry.to_owned(),
                status: status.map_or_else(|| "error".to_owned(), |s| s.to_string()),
            })
            .inc();
        self.upstream_seconds
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records Docker Hub's `ratelimit-remaining: 76;w=21600`.
    pub fn ratelimit(&self, registry: &str, header: &str) {
        if let Some(n) = header
            .split(';')
            .next()
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            self.upstream_ratelimit_remaining
                .get_or_create(&RegistryLabels {
                    registry: registry.to_owned(),
                })
                .set(n);
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new();
        m.request("blob", "GET", 200, Duration::from_millis(3));
        m.cache("blob", "hit");
        m.ratelimit("docker.io", "76;w=21600");
        m.upstream("docker.io", None, Duration::from_millis(1));
        let text = m.encode();
        for line in [
            "pier_http_requests_total{endpoint=\"blob\",method=\"GET\",status=\"200\"} 1",
            "pier_cache_lookups_total{kind=\"blob\",outcome=\"hit\"} 1",
            "pier_upstream_ratelimit_remaining{registry=\"docker.io\"} 76",
            "pier_upstream_requests_total{registry=\"docker.io\",status=\"error\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
