//! The configuration model: built-in defaults (the upstream table and the
//! short-name routes), loading from a TOML file plus `PIER_*` environment
//! overrides, and validation that names every bad key at once.

mod builtin;
mod env;
mod file;
mod private;
pub(crate) use private::is_bcrypt;
pub mod redis_url;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use url::Url;

pub use builtin::{builtin_routes, builtin_upstreams};

/// The whole, validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Domains for host-prefix mode: `docker.<domain>` names docker.io.
    pub domains: Vec<String>,
    /// Registry for short names that no route matches.
    pub default_registry: String,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    pub storage: StorageConfig,
    pub metadata: MetadataConfig,
    pub timeouts: TimeoutConfig,
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub fetch: FetchConfig,
    pub egress: EgressConfig,
    pub cache: CacheConfig,
    pub cluster: ClusterConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// Short-name rules, first match wins: the file's, then the built-in ones.
    pub routes: Vec<RouteConfig>,
    /// Which images may be pulled at all.
    pub access: AccessConfig,
    pub admin: AdminConfig,
    pub sync: SyncConfig,
    pub ui: UiConfig,
    /// The namespace of the operator's own images, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private: Option<PrivateConfig>,
}

/// `[private]`: repositories under `<prefix>/` take pushes from configured
/// users and are served from what was pushed, never from an upstream.
#[derive(Clone, Debug, Serialize)]
pub struct PrivateConfig {
    /// The first path component of every private repository.
    pub prefix: String,
    /// A host prefix (`<alias>.<domain>`) whose names are all private.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<PrivateUser>,
    /// An htpasswd file (bcrypt entries) with more users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<PathBuf>,
    /// What the htpasswd file's users may push and pull, unless a
    /// `[[private.users]]` entry of the same name says otherwise.
    pub htpasswd_push: Vec<String>,
    pub htpasswd_pull: Vec<String>,
    /// Whether anyone may pull private images without credentials.
    pub anonymous_pull: bool,
    /// How long a token from the token endpoint is good for.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// How long an upload may sit idle before it is abandoned.
    #[serde(with = "humantime_serde")]
    pub upload_ttl: Duration,
    /// How often what no private manifest references is looked for.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// How long such content must have gone unused before it is removed:
    /// a push in progress uses the blobs it is about to reference.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
    /// Where clients are sent for tokens, when Pier cannot tell its own
    /// address (a TLS proxy in front that sets no `X-Forwarded-Proto`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_realm: Option<String>,
}

/// A user of the private namespace. Globs are over the repository name
/// under the prefix (`team/**`).
#[derive(Clone, Debug, Serialize)]
pub struct PrivateUser {
    pub name: String,
    /// A bcrypt hash (`htpasswd -B`, `pier users hash`); `None` for an
    /// htpasswd file's user whose rights this entry sets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<Secret>,
    pub push: Vec<String>,
    pub pull: Vec<String>,
}

/// The console's pages and read-only API (`/api/v1/explain`).
#[derive(Clone, Debug, Serialize)]
pub struct UiConfig {
    pub enabled: bool,
}

/// The admin API under `/api/v1/`: there only once a token is set.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdminConfig {
    /// What `Authorization: Bearer` must carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Client networks (CIDRs) the API answers; empty: any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<ipnet::IpNet>,
}

/// How sync jobs fetch.
#[derive(Clone, Debug, Serialize)]
pub struct SyncConfig {
    /// Blobs this replica fetches for sync jobs at once.
    pub max_concurrent: usize,
    /// Tries of an image that fails for a reason that may pass (upstream
    /// down, a timeout), `retry_after` apart.
    pub retries: u32,
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Sync waits while an upstream says fewer requests than this are left
    /// in its rate limit (Docker Hub's `ratelimit-remaining`).
    pub min_ratelimit_remaining: i64,
    /// Images kept synced: `[[sync.images]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<SyncListConfig>,
}

/// A repository whose chosen tags are synced again every `interval`, by
/// one replica at a time.
#[derive(Clone, Debug, Serialize)]
pub struct SyncListConfig {
    /// A repository as a client would pull it, without a tag.
    pub image: String,
    /// These tags; or, with `tag_pattern`, those of upstream's tag list
    /// that it matches (a regular expression).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_pattern: Option<String>,
    /// Only these platforms of an index; all when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

/// Allow and deny lists of image patterns: globs over
/// `<registry>/<repository>` (`docker.io/library/*`, `ghcr.io/acme/**`).
/// An image is served when no deny pattern matches it and, if there are
/// allow patterns, one of them does. Upstream entries add their own lists.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AccessConfig {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// Told to clients refused by the lists: how to ask for an image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where blobs live.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StorageConfig {
    Fs { path: PathBuf },
    S3(Box<S3Config>),
}

/// An S3-compatible bucket for blobs.
#[derive(Clone, Debug, Serialize)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Url>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// Local directory for the spool files of in-flight fetches.
    pub spool_path: PathBuf,
    /// Local directory for this replica's copies of recently served blobs.
    pub local_cache_path: PathBuf,
    /// Bytes of local copies kept at most; 0 keeps none.
    pub local_cache_size: u64,
    /// Answer whole-blob GETs with a 307 to a presigned bucket URL, for
    /// clients that can reach the bucket.
    pub presigned_redirect: bool,
    /// How long a presigned URL stays valid.
    #[serde(with = "humantime_serde")]
    pub presigned_expiry: Duration,
    /// Multipart uploads under the prefix begun longer ago than this are
    /// taken for abandoned (by a process killed mid-upload) and aborted, at
    /// startup and hourly. It must be longer than any upload takes.
    #[serde(with = "humantime_serde")]
    pub abandoned_upload_age: Duration,
}

impl StorageConfig {
    /// The local directory where in-flight blob fetches are spooled. For the
    /// fs store it sits on the same filesystem as the blobs, so a verified
    /// spool file is committed with a rename.
    pub fn spool_dir(&self) -> PathBuf {
        match self {
            StorageConfig::Fs { path } => path.join("tmp"),
            StorageConfig::S3(s3) => s3.spool_path.clone(),
        }
    }
}

/// Where manifests, tags and repository links live.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetadataConfig {
    Embedded {
        /// The database file's directory.
        path: PathBuf,
    },
    Redis {
        /// One server (`redis://`, `rediss://` for TLS), the sentinels
        /// that name the master (`redis+sentinel://h1,h2/master`), or
        /// cluster seeds; may carry a password. See [`redis_url`].
        url: Secret,
        /// `url` names a Redis Cluster node even when it names one host.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cluster: bool,
        /// CA certificates (PEM) that `rediss://` servers are checked
        /// against, instead of the public roots.
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_ca: Option<PathBuf>,
        /// The sentinels' own password, when they have one.
        #[serde(skip_serializing_if = "Option::is_none")]
        sentinel_password: Option<Secret>,
        /// Prefix of every key, so several deployments can share a Redis.
        key_prefix: String,
        /// Connections kept open per replica.
        pool_size: usize,
        /// Deadline for one Redis command, connection included.
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
}

/// Timeouts for talking to upstreams.
#[derive(Clone, Debug, Serialize)]
pub struct TimeoutConfig {
    /// TCP + TLS connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending a request to the response headers.
    #[serde(with = "humantime_serde")]
    pub response: Duration,
    /// Longest pause between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub body_idle: Duration,
}

/// How Pier treats the connections of its own clients.
#[derive(Clone, Debug, Serialize)]
pub struct ServerConfig {
    /// Time a client has to send a request's headers; an idle keep-alive
    /// connection is closed after it too.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A client that accepts no response bytes for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Largest request head (request line and headers) accepted.
    pub max_header_bytes: usize,
    /// After SIGTERM: how long in-flight responses and fetches may take to
    /// finish before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Send blobs held in local files (stored blobs, local copies, spool
    /// files of fetches) with sendfile, to HTTP/1 clients.
    pub zero_copy: bool,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` headers name the client
    /// (CIDRs). From anyone else these headers are ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve HTTPS on `listen` with this certificate chain and key (PEM);
    /// changed files are read again without a restart.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub tls: Option<TlsFiles>,
    /// Certificates from an ACME CA instead of files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

/// Certificates obtained and renewed from an ACME CA (RFC 8555), answering
/// its TLS-ALPN-01 challenges on `listen`.
#[derive(Clone, Debug, Serialize)]
pub struct AcmeConfig {
    /// The names the certificate covers (no wildcards: those need DNS-01).
    pub domains: Vec<String>,
    /// `mailto:` addresses the CA may write to about the account.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// Where the account key, certificate and key are kept across restarts.
    pub cache: PathBuf,
    /// CA certificate (PEM) the directory's own HTTPS is checked against,
    /// for a private ACME CA; the system roots otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_ca: Option<PathBuf>,
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// A certificate chain (leaf first) and its private key, as PEM files.
#[derive(Clone, Debug, Serialize)]
pub struct TlsFiles {
    #[serde(rename = "tls_cert")]
    pub cert: PathBuf,
    #[serde(rename = "tls_key")]
    pub key: PathBuf,
}

/// Per-client limits, keyed by client IP; 0 turns a limit off. Shared by
/// all replicas through Redis when metadata is in Redis.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LimitsConfig {
    /// Failed logins a client may make per minute before it is refused
    /// for a while (0: unlimited).
    pub failed_logins: u32,
    /// Sustained requests per second.
    pub requests_per_second: u32,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Blob downloads one client may have running at once (per replica).
    pub concurrent_blobs: u32,
    /// Response bytes per second to one client (per replica).
    pub bytes_per_second: u64,
    /// Clients no limit applies to (CIDRs): other replicas, CI networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exempt: Vec<ipnet::IpNet>,
}

/// Guards on the upstream side, so a few huge pulls cannot starve everyone.
#[derive(Clone, Debug, Serialize)]
pub struct FetchConfig {
    /// Upstream blob fetches one replica runs at once, and uploads of
    /// fetched blobs to S3; 0 is unlimited.
    pub max_concurrent: usize,
    /// While all fetch slots are busy, clients asking for an uncached blob of
    /// at least this many bytes are redirected to where upstream serves it
    /// (its CDN) instead of waiting for a slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_above: Option<u64>,
    /// How long a fetch waits for a free slot before the client gets 503.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The largest blob Pier fetches. A blob announced larger (by its
    /// manifest or upstream's `Content-Length`) is refused, and a body of
    /// unknown length is cut off past it, so an endless upstream body
    /// cannot fill the disk.
    pub max_blob_size: u64,
    /// Bytes per second a fetch no client is reading any more must keep
    /// up, averaged over `min_rate_window`, or it is abandoned (0: never).
    pub min_rate: u64,
    #[serde(with = "humantime_serde")]
    pub min_rate_window: Duration,
}

/// Where upstreams may send Pier. Redirects and token realms never reach
/// link-local or cloud metadata addresses (169.254.0.0/16, fe80::/10,
/// fd00:ec2::254, 100.100.100.200, ...), in any spelling (IPv4-mapped
/// included), whether written as an address or reached through a name.
/// Hosts of configured endpoints are exempt, as written.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EgressConfig {
    /// More networks (CIDRs) refused in the same way, in addition to the
    /// built-in ones (which always apply): internal networks, say.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refuse: Vec<ipnet::IpNet>,
}

/// What the cache may take: of the fs store's disk, or of the bucket.
#[derive(Clone, Debug, Serialize)]
pub struct CacheConfig {
    /// Bytes of blobs the store may hold (the fs store, or every blob under
    /// the bucket's prefix); past it, the least recently served go until it
    /// holds 90 % of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// Free space kept on the store's filesystem: the least recently served
    /// blobs go before it fills.
    pub min_free: MinFree,
    /// How often every stored blob is hashed again (off when unset); one
    /// that no longer matches its digest is removed.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub scrub_interval: Option<Duration>,
    /// Bytes per second the scrub reads at most, so it never competes with
    /// clients.
    pub scrub_rate: u64,
    /// Blobs not served for this long are removed, whatever the size (off
    /// when unset).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "age_option")]
    pub max_age: Option<Duration>,
    /// Images (globs over `<registry>/<repository>`, as in `[access]`) whose
    /// blobs are never evicted by size or age.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<String>,
}

/// Free space to keep on a filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MinFree {
    /// This share of the filesystem, in percent.
    #[serde(serialize_with = "percent")]
    Percent(u8),
    Bytes(u64),
}

fn percent<S: serde::Serializer>(p: &u8, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{p}%"))
}

impl MinFree {
    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Percent(p) => total / 100 * u64::from(p),
            MinFree::Bytes(b) => b,
        }
    }
}

/// How replicas sharing Redis work together.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterConfig {
    /// The URL other replicas reach this one at (e.g. the pod IP), so they
    /// can stream a blob this replica is fetching instead of waiting for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<Url>,
    /// How long a replica's claim on a fetch lasts without renewal; another
    /// replica takes over this long after one dies mid-fetch.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

/// One upstream registry.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamConfig {
    /// The registry's name as clients write it: `docker.io`, `gcr.io`.
    pub registry: String,
    /// Host prefixes: `docker` makes `docker.<domain>` name this registry.
    pub aliases: Vec<String>,
    /// Base URLs, tried in order (failover).
    pub endpoints: Vec<Url>,
    /// How long a tag is served from cache before it is revalidated.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Image patterns allowed from this upstream (added to `[access] allow`;
    /// relative patterns are taken under this registry).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// What this registry's content is kept for when not served, instead of
    /// `[cache] max_age` (unset: that one applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<MaxAge>,
    /// The first time an image manifest comes from this upstream, its
    /// blobs are fetched in the background.
    pub prefetch: bool,
}

/// How long content not served is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxAge {
    /// Kept whatever its age (size still applies).
    Off,
    After(Duration),
}

impl MaxAge {
    pub fn duration(self) -> Option<Duration> {
        match self {
            MaxAge::Off => None,
            MaxAge::After(d) => Some(d),
        }
    }
}

impl Serialize for MaxAge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxAge::Off => s.serialize_str("off"),
            MaxAge::After(d) => s.serialize_str(&age_text(*d)),
        }
    }
}

/// An age as people write it: `90d`, `12h`, `90s` (humantime would say
/// `2months 29days 2h 52m 48s` for 90 days).
pub fn age_text(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    for (unit, per) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs.is_multiple_of(per) {
            return format!("{}{unit}", secs / per);
        }
    }
    format!("{secs}s")
}

fn age_option<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&age_text(*d)),
        None => s.serialize_none(),
    }
}

/// A short-name rule: repository names matching `pattern` go to `registry`.
#[derive(Clone, Debug, Serialize)]
pub struct RouteConfig {
    /// A glob over the repository name: `*` matches within one path
    /// component, `**` across components.
    pub pattern: String,
    pub registry: String,
}

/// A value that is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"********\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

/// Every problem found while loading, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(p: impl Into<String>) -> Self {
        Self {
            problems: vec![p.into()],
        }
    }
}

impl Config {
    /// Loads `path` (if any) and applies `PIER_*` variables from `vars`.
    /// Pure apart from reading the file, so tests pass their own variables.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError::one(format!("{}: {e}", p.display())))?,
            None => String::new(),
        };
        Self::from_toml(&text, vars)
    }

    /// Parses TOML text, applies `PIER_*` variables, fills defaults, validates.
    pub fn from_toml(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::one(format!("invalid TOML: {}", e.to_string().trim_end())))?;
        // PIER_* variables that name no key (Kubernetes service links) are
        // not configuration; they are left alone.
        env::apply(&mut table, vars)?;
        let raw: file::FileConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::one(e.message().to_owned()))?;
        validate::build(raw)
    }

    /// The upstream for `registry`, if configured.
    pub fn upstream(&self, registry: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.registry == registry)
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
