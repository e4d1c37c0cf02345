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
    pub cluster: Option<FileCluster>,
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
    pub presigned_redirect: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub presigned_expiry: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetadata {
    pub kind: Option<String>,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub pattern: Option<String>,
    pub registry: Option<String>,
}
