//! The configuration file as written: every field optional, so an
//! `[[upstreams]]` entry can override just the fields it sets.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub domains: Option<Vec<String>>,
    pub default_registry: Option<String>,
    pub log_format: Option<String>,
    /// `false` drops the built-in upstream table (built-in routes stay for
    /// the registries that remain configured).
    pub builtin_upstreams: Option<bool>,
    pub storage: Option<FileStorage>,
    pub metadata: Option<FileMetadata>,
    pub timeouts: Option<FileTimeouts>,
    pub server: Option<FileServer>,
    pub limits: Option<FileLimits>,
    pub fetch: Option<FileFetch>,
    pub egress: Option<FileEgress>,
    pub cache: Option<FileCache>,
    pub cluster: Option<FileCluster>,
    pub admin: Option<FileAdmin>,
    pub sync: Option<FileSync>,
    pub ui: Option<FileUi>,
    pub private: Option<FilePrivate>,
    #[serde(default)]
    pub upstreams: Vec<FileUpstream>,
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    pub access: Option<FileAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccess {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub denied_message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStorage {
    pub kind: Option<String>,
    pub path: Option<PathBuf>,
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub spool_path: Option<PathBuf>,
    pub local_cache_path: Option<PathBuf>,
    pub local_cache_size: Option<ByteSize>,
    pub presigned_redirect: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub presigned_expiry: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub abandoned_upload_age: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetadata {
    pub kind: Option<String>,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub cluster: Option<bool>,
    pub tls_ca: Option<PathBuf>,
    pub sentinel_password: Option<String>,
    pub key_prefix: Option<String>,
    pub pool_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    #[serde(default, with = "humantime_serde")]
    pub connect: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub response: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub body_idle: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub send_timeout: Option<Duration>,
    pub max_header_bytes: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    pub zero_copy: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub acme: Option<FileAcme>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcme {
    pub domains: Option<Vec<String>>,
    pub contact: Option<Vec<String>>,
    pub directory: Option<String>,
    pub cache: Option<PathBuf>,
    pub directory_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub requests_per_second: Option<u32>,
    pub failed_logins: Option<u32>,
    pub burst: Option<u32>,
    pub concurrent_blobs: Option<u32>,
    pub bytes_per_second: Option<ByteSize>,
    pub exempt: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFetch {
    pub max_concurrent: Option<usize>,
    pub redirect_above: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    pub max_blob_size: Option<ByteSize>,
    pub min_rate: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub min_rate_window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUi {
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrivate {
    pub prefix: Option<String>,
    pub alias: Option<String>,
    pub htpasswd: Option<PathBuf>,
    pub htpasswd_push: Option<Vec<String>>,
    pub htpasswd_pull: Option<Vec<String>>,
    pub anonymous_pull: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub token_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upload_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gc_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gc_grace: Option<Duration>,
    pub token_realm: Option<String>,
    #[serde(default)]
    pub users: Vec<FilePrivateUser>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrivateUser {
    pub name: Option<String>,
    pub password_hash: Option<String>,
    pub push: Option<Vec<String>>,
    pub pull: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub token: Option<String>,
    pub allow_from: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSync {
    pub max_concurrent: Option<usize>,
    pub retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    pub min_ratelimit_remaining: Option<i64>,
    pub images: Option<Vec<FileSyncImage>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSyncImage {
    pub image: Option<String>,
    pub tags: Option<Vec<String>>,
    pub tag_pattern: Option<String>,
    pub platforms: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEgress {
    pub refuse: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    pub max_size: Option<ByteSize>,
    /// A share of the filesystem (`"10%"`) or a size.
    pub min_free: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub scrub_interval: Option<Duration>,
    pub scrub_rate: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    pub pinned: Option<Vec<String>>,
}

/// A size as a number of bytes or a string like `"64MiB"` or `"1GB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn bytes(&self) -> Result<u64, String> {
        let text = match self {
            ByteSize::Bytes(n) => return Ok(*n),
            ByteSize::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            "KiB" | "Ki" => 1 << 10,
            "MiB" | "Mi" => 1 << 20,
            "GiB" | "Gi" => 1 << 30,
            "TiB" | "Ti" => 1 << 40,
            "TB" => 1000 * 1000 * 1000 * 1000,
            _ => {
                return Err(format!(
                    "{text:?} is not a size like 65536, \"64KiB\" or \"1GB\""
                ));
            }
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| format!("{text:?} is not a size like 65536, \"64KiB\" or \"1GB\""))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub advertise_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub registry: Option<String>,
    pub aliases: Option<Vec<String>>,
    pub endpoints: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub tag_ttl: Option<Duration>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    /// A duration, or `"off"`.
    pub max_age: Option<String>,
    pub prefetch: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub pattern: Option<String>,
    pub registry: Option<String>,
}
