//! `PIER_*` environment overrides, applied to the parsed file before it is
//! typed. `__` separates nesting levels: `PIER_STORAGE__PATH` sets
//! `[storage] path`, `PIER_UPSTREAMS__DOCKER_IO__PASSWORD` sets `password` of
//! the docker.io upstream (its registry name upper-cased, non-alphanumerics
//! as `_`).
//!
//! Only variables naming a configuration key are applied. Others with the
//! prefix are left alone: Kubernetes injects `PIER_PORT`,
//! `PIER_SERVICE_HOST`, ... for a Service named `pier`, and `PIER_CONFIG`
//! names the file.

use toml::{Table, Value};

use super::ConfigError;
use super::builtin::builtin_upstreams;

const TOP_LEVEL: &[&str] = &[
    "listen",
    "domains",
    "default_registry",
    "log_format",
    "builtin_upstreams",
];
const SECTIONS: &[(&str, &[&str])] = &[
    (
        "storage",
        &[
            "kind",
            "path",
            "bucket",
            "prefix",
            "endpoint",
            "region",
            "path_style",
            "access_key_id",
            "secret_access_key",
            "spool_path",
            "local_cache_path",
            "local_cache_size",
            "presigned_redirect",
            "presigned_expiry",
            "abandoned_upload_age",
        ],
    ),
    (
        "metadata",
        &[
            "kind",
            "path",
            "url",
            "cluster",
            "tls_ca",
            "sentinel_password",
            "key_prefix",
            "pool_size",
            "timeout",
        ],
    ),
    ("timeouts", &["connect", "response", "body_idle"]),
    (
        "server",
        &[
            "header_timeout",
            "send_timeout",
            "max_header_bytes",
            "shutdown_grace",
            "zero_copy",
            "trusted_proxies",
            "tls_cert",
            "tls_key",
        ],
    ),
    (
        "limits",
        &[
            "requests_per_second",
            "burst",
            "concurrent_blobs",
            "bytes_per_second",
            "exempt",
        ],
    ),
    (
        "fetch",
        &[
            "max_concurrent",
            "redirect_above",
            "queue_timeout",
            "max_blob_size",
            "min_rate",
            "min_rate_window",
        ],
    ),
    ("egress", &["refuse"]),
    ("admin", &["token", "allow_from"]),
    ("ui", &["enabled"]),
    (
        "sync",
        &[
            "max_concurrent",
            "retries",
            "retry_after",
            "min_ratelimit_remaining",
        ],
    ),
    (
        "cache",
        &[
            "max_size",
            "min_free",
            "scrub_interval",
            "scrub_rate",
            "max_age",
            "pinned",
        ],
    ),
    ("cluster", &["advertise_url", "lease_ttl"]),
];
const UPSTREAM_KEYS: &[&str] = &[
    "aliases",
    "endpoints",
    "tag_ttl",
    "username",
    "password",
    "max_age",
    "prefetch",
];

/// Keys whose values are comma-separated lists.
const LIST_KEYS: &[&str] = &[
    "domains",
    "aliases",
    "endpoints",
    "trusted_proxies",
    "exempt",
    "refuse",
    "pinned",
    "allow_from",
];
/// Keys whose values are booleans.
const BOOL_KEYS: &[&str] = &[
    "path_style",
    "builtin_upstreams",
    "presigned_redirect",
    "zero_copy",
    "prefetch",
    "enabled",
];
/// Keys whose values are integers.
const INT_KEYS: &[&str] = &[
    "pool_size",
    "requests_per_second",
    "burst",
    "concurrent_blobs",
    "max_concurrent",
    "retries",
    "min_ratelimit_remaining",
];

/// Applies the variables that name configuration keys; returns the names of
/// `PIER_*` variables that were ignored.
pub fn apply(
    table: &mut Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut problems = Vec::new();
    let mut ignored = Vec::new();
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("PIER_"))
        .collect();
    // Deterministic order, whatever the process environment's order is.
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name["PIER_".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let result = match path.as_slice() {
            [key] if TOP_LEVEL.contains(&key.as_str()) => set(table, key, &raw),
            [section, key]
                if SECTIONS
                    .iter()
                    .any(|(s, keys)| s == section && keys.contains(&key.as_str())) =>
            {
                match section_table(table, section) {
                    Ok(t) => set(t, key, &raw),
                    Err(e) => Err(e),
                }
            }
            [section, registry, key]
                if section == "upstreams" && UPSTREAM_KEYS.contains(&key.as_str()) =>
            {
                match upstream_entry(table, registry) {
                    Ok(t) => set(t, key, &raw),
                    Err(e) => Err(e),
                }
            }
            _ => {
                ignored.push(name.clone());
                Ok(())
            }
        };
        if let Err(p) = result {
            problems.push(format!("{name}: {p}"));
        }
    }
    if problems.is_empty() {
        Ok(ignored)
    } else {
        Err(ConfigError { problems })
    }
}

fn set(table: &mut Table, key: &str, raw: &str) -> Result<(), String> {
    table.insert(key.to_owned(), typed(key, raw)?);
    Ok(())
}

fn section_table<'t>(table: &'t mut Table, section: &str) -> Result<&'t mut Table, String> {
    match table
        .entry(section.to_owned())
        .or_insert_with(|| Value::Table(Table::new()))
    {
        Value::Table(t) => Ok(t),
        _ => Err(format!("{section} is not a table")),
    }
}

/// The `[[upstreams]]` entry for the registry spelled `key` (`docker_io`),
/// created for a built-in registry the file does not mention.
fn upstream_entry<'t>(table: &'t mut Table, key: &str) -> Result<&'t mut Table, String> {
    let upstreams = table
        .entry("upstreams")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(list) = upstreams else {
        return Err("upstreams is not an array".into());
    };
    let registry_of = |v: &Value| {
        v.get("registry")
            .and_then(Value::as_str)
            .map(env_key)
            .unwrap_or_default()
    };
    let index = match list.iter().position(|v| registry_of(v) == key) {
        Some(i) => i,
        None => {
            let builtin = builtin_upstreams()
                .into_iter()
                .find(|u| env_key(&u.registry) == key)
                .ok_or_else(|| format!("no upstream registry matches {key:?}"))?;
            let mut t = Table::new();
            t.insert("registry".into(), Value::String(builtin.registry));
            list.push(Value::Table(t));
            list.len() - 1
        }
    };
    match list.get_mut(index) {
        Some(Value::Table(t)) => Ok(t),
        _ => Err("upstreams entry is not a table".into()),
    }
}

/// `docker.io` → `docker_io`, the lower-cased form of an env variable part.
fn env_key(registry: &str) -> String {
    registry
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn typed(key: &str, raw: &str) -> Result<Value, String> {
    if LIST_KEYS.contains(&key) {
        return Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ));
    }
    if BOOL_KEYS.contains(&key) {
        return match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            other => Err(format!("expected true or false, got {other:?}")),
        };
    }
    if INT_KEYS.contains(&key) {
        return raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("expected a whole number, got {raw:?}"));
    }
    Ok(Value::String(raw.to_owned()))
}
