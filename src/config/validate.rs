//! Turns the file as written into a `Config`: fills defaults, merges the
//! built-in upstream table, and reports every problem by key.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::builtin::{DEFAULT_TAG_TTL, builtin_routes, builtin_upstreams};
use super::file::{
    ByteSize, FileAcme, FileCache, FileConfig, FileMetadata, FileServer, FileStorage,
    FileSyncImage, FileUpstream,
};
use super::redis_url::Topology;
use super::{
    AccessConfig, AcmeConfig, AdminConfig, CacheConfig, ClusterConfig, Config, ConfigError,
    EgressConfig, FetchConfig, LimitsConfig, LogFormat, MaxAge, MetadataConfig, MinFree,
    RouteConfig, S3Config, Secret, ServerConfig, StorageConfig, SyncConfig, SyncListConfig,
    TimeoutConfig, TlsFiles, UiConfig, UpstreamConfig,
};

const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
const DEFAULT_DATA: &str = "./data";

pub fn build(raw: FileConfig) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen_text.parse().unwrap_or_else(|_| {
        p.add(
            "listen",
            format!("{listen_text:?} is not an address like 0.0.0.0:5000"),
        );
        ([0, 0, 0, 0], 5000).into()
    });

    let domains: Vec<String> = raw.domains.unwrap_or_default();
    for (i, d) in domains.iter().enumerate() {
        if !is_host_name(d) {
            p.add(
                &format!("domains[{i}]"),
                format!("{d:?} is not a lowercase host name without a port"),
            );
        }
    }

    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(
                "log_format",
                format!("{other:?} is neither \"text\" nor \"json\""),
            );
            LogFormat::Text
        }
    };

    let storage = storage(raw.storage.unwrap_or_default(), &mut p);
    let data_dir = match &storage {
        StorageConfig::Fs { path } => path.clone(),
        StorageConfig::S3(_) => PathBuf::from(DEFAULT_DATA),
    };
    let metadata = metadata(raw.metadata.unwrap_or_default(), data_dir.clone(), &mut p);

    let t = raw.timeouts.unwrap_or_default();
    let timeouts = TimeoutConfig {
        connect: positive(&mut p, "timeouts.connect", t.connect, 5),
        response: positive(&mut p, "timeouts.response", t.response, 30),
        body_idle: positive(&mut p, "timeouts.body_idle", t.body_idle, 60),
    };

    let server = server(raw.server.unwrap_or_default(), &data_dir, &mut p);
    let l = raw.limits.unwrap_or_default();
    let limits = LimitsConfig {
        failed_logins: l.failed_logins.unwrap_or(10),
        requests_per_second: l.requests_per_second.unwrap_or(0),
        // A burst below the sustained rate would refuse steady clients.
        burst: l.burst.unwrap_or(0).max(l.requests_per_second.unwrap_or(0)),
        concurrent_blobs: l.concurrent_blobs.unwrap_or(0),
        bytes_per_second: size(
            &mut p,
            "limits.bytes_per_second",
            l.bytes_per_second.as_ref(),
        )
        .unwrap_or(0),
        exempt: cidrs(&mut p, "limits.exempt", l.exempt.unwrap_or_default()),
    };
    let f = raw.fetch.unwrap_or_default();
    let fetch = FetchConfig {
        max_concurrent: f.max_concurrent.unwrap_or(64),
        redirect_above: size(&mut p, "fetch.redirect_above", f.redirect_above.as_ref()),
        queue_timeout: positive(&mut p, "fetch.queue_timeout", f.queue_timeout, 30),
        max_blob_size: match size(&mut p, "fetch.max_blob_size", f.max_blob_size.as_ref()) {
            Some(0) => {
                p.add("fetch.max_blob_size", "must be more than zero".into());
                DEFAULT_MAX_BLOB_SIZE
            }
            Some(n) => n,
            None => DEFAULT_MAX_BLOB_SIZE,
        },
        min_rate: size(&mut p, "fetch.min_rate", f.min_rate.as_ref()).unwrap_or(64 * 1024),
        min_rate_window: positive(&mut p, "fetch.min_rate_window", f.min_rate_window, 60),
    };

    let egress = EgressConfig {
        refuse: cidrs(
            &mut p,
            "egress.refuse",
            raw.egress.unwrap_or_default().refuse.unwrap_or_default(),
        ),
    };

    let cache = cache(raw.cache.unwrap_or_default(), &mut p);

    let a = raw.admin.unwrap_or_default();
    let admin = AdminConfig {
        token: match a.token {
            Some(t) if t.trim().len() < 16 => {
                p.add(
                    "admin.token",
                    "must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
                );
                None
            }
            t => t.map(|t| Secret::new(t.trim())),
        },
        allow_from: cidrs(&mut p, "admin.allow_from", a.allow_from.unwrap_or_default()),
    };
    let sy = raw.sync.unwrap_or_default();
    let sync = SyncConfig {
        max_concurrent: match sy.max_concurrent {
            Some(0) => {
                p.add("sync.max_concurrent", "must be at least 1".into());
                4
            }
            other => other.unwrap_or(4),
        },
        retries: sy.retries.unwrap_or(3),
        retry_after: positive(&mut p, "sync.retry_after", sy.retry_after, 300),
        min_ratelimit_remaining: sy.min_ratelimit_remaining.unwrap_or(10),
        images: sync_images(sy.images.unwrap_or_default(), &mut p),
    };

    let c = raw.cluster.unwrap_or_default();
    let cluster = ClusterConfig {
        advertise_url: c.advertise_url.and_then(|u| match http_url(&u) {
            Ok(url) => Some(url),
            Err(why) => {
                p.add("cluster.advertise_url", why);
                None
            }
        }),
        lease_ttl: positive(&mut p, "cluster.lease_ttl", c.lease_ttl, 15),
    };

    let builtins = raw.builtin_upstreams.unwrap_or(true);
    let upstreams = upstreams(builtins, raw.upstreams, &mut p);
    let configured = |r: &str| upstreams.iter().any(|u| u.registry == r);

    let default_registry = raw.default_registry.unwrap_or_else(|| "docker.io".into());
    if !configured(&default_registry) {
        p.add(
            "default_registry",
            format!("{default_registry:?} is not a configured upstream"),
        );
    }

    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let (Some(pattern), Some(registry)) = (r.pattern, r.registry) else {
            p.add(&key, "needs both `pattern` and `registry`".into());
            continue;
        };
        if !is_route_pattern(&pattern) {
            p.add(
                &format!("{key}.pattern"),
                format!("{pattern:?} is not a glob over a repository name (a-z 0-9 . _ - / *)"),
            );
        }
        if !configured(&registry) {
            p.add(
                &format!("{key}.registry"),
                format!("{registry:?} is not a configured upstream"),
            );
        }
        routes.push(RouteConfig { pattern, registry });
    }
    // Built-in short-name rules apply whenever their registry is configured.
    routes.extend(
        builtin_routes()
            .into_iter()
            .filter(|r| configured(&r.registry)),
    );

    let a = raw.access.unwrap_or_default();
    let access = AccessConfig {
        allow: a.allow.unwrap_or_default(),
        deny: a.deny.unwrap_or_default(),
        denied_message: a.denied_message,
    };
    for (list, patterns) in [("allow", &access.allow), ("deny", &access.deny)] {
        for (i, pat) in patterns.iter().enumerate() {
            if !is_image_pattern(pat) {
                p.add(
                    &format!("access.{list}[{i}]"),
                    format!("{pat:?} is not a glob over <registry>/<repository>"),
                );
            }
        }
    }

    let private = raw
        .private
        .and_then(|r| super::private::build(r, &domains, &upstreams, &mut p));

    p.finish(Config {
        listen,
        domains,
        default_registry,
        log_format,
        storage,
        metadata,
        timeouts,
        server,
        limits,
        fetch,
        egress,
        cache,
        cluster,
        upstreams,
        routes,
        access,
        admin,
        sync,
        ui: UiConfig {
            enabled: raw.ui.and_then(|u| u.enabled).unwrap_or(true),
        },
        private,
    })
}

fn cache(c: FileCache, p: &mut Problems) -> CacheConfig {
    let max_size = match size(p, "cache.max_size", c.max_size.as_ref()) {
        Some(0) => {
            p.add("cache.max_size", "must be more than zero".into());
            None
        }
        other => other,
    };
    let min_free = match &c.min_free {
        None => MinFree::Percent(10),
        Some(ByteSize::Text(t)) if t.trim().ends_with('%') => {
            match t.trim().trim_end_matches('%').trim().parse::<u8>() {
                Ok(n) if n <= 90 => MinFree::Percent(n),
                _ => {
                    p.add(
                        "cache.min_free",
                        format!("{t:?} is not a share from 0% to 90%"),
                    );
                    MinFree::Percent(10)
                }
            }
        }
        Some(v) => MinFree::Bytes(size(p, "cache.min_free", Some(v)).unwrap_or(0)),
    };
    let scrub_interval = match c.scrub_interval {
        Some(d) if d.is_zero() => {
            p.add("cache.scrub_interval", "must be longer than zero".into());
            None
        }
        other => other,
    };
    let scrub_rate = match size(p, "cache.scrub_rate", c.scrub_rate.as_ref()) {
        Some(0) => {
            p.add("cache.scrub_rate", "must be more than zero".into());
            32 << 20
        }
        Some(n) => n,
        None => 32 << 20,
    };
    let max_age = match c.max_age {
        Some(d) if d.is_zero() => {
            p.add("cache.max_age", "must be longer than zero".into());
            None
        }
        other => other,
    };
    let pinned = c.pinned.unwrap_or_default();
    for (i, pat) in pinned.iter().enumerate() {
        if !is_image_pattern(pat) {
            p.add(
                &format!("cache.pinned[{i}]"),
                format!("{pat:?} is not a glob over <registry>/<repository>"),
            );
        }
    }
    CacheConfig {
        max_size,
        min_free,
        scrub_interval,
        scrub_rate,
        max_age,
        pinned,
    }
}

/// `[[sync.images]]` entries: a repository (no tag), and either `tags` or
/// a `tag_pattern` that compiles.
fn sync_images(file: Vec<FileSyncImage>, p: &mut Problems) -> Vec<SyncListConfig> {
    let mut list = Vec::new();
    for (i, f) in file.into_iter().enumerate() {
        let key = format!("sync.images[{i}]");
        let Some(image) = f.image.filter(|s| !s.trim().is_empty()) else {
            p.add(&format!("{key}.image"), "is required".into());
            continue;
        };
        let last = image.rsplit('/').next().unwrap_or("");
        if image.contains('@') || last.contains(':') {
            p.add(
                &format!("{key}.image"),
                format!("{image:?} names a tag or digest: name the repository, and tags in `tags`"),
            );
        }
        let tags = f.tags.unwrap_or_default();
        match (&f.tag_pattern, tags.is_empty()) {
            (Some(_), false) | (None, true) => p.add(
                &key,
                "needs either `tags` or `tag_pattern` (a regular expression over upstream's tags)"
                    .into(),
            ),
            (Some(pattern), true) => {
                if let Err(e) = regex::Regex::new(pattern) {
                    p.add(
                        &format!("{key}.tag_pattern"),
                        format!("{pattern:?} is not a regular expression: {e}"),
                    );
                }
            }
            (None, false) => {}
        }
        let platforms = f.platforms.unwrap_or_default();
        for (j, platform) in platforms.iter().enumerate() {
            if let Err(why) = crate::reference::Platform::parse(platform) {
                p.add(&format!("{key}.platforms[{j}]"), why);
            }
        }
        list.push(SyncListConfig {
            image,
            tags,
            tag_pattern: f.tag_pattern,
            platforms,
            interval: match positive(p, &format!("{key}.interval"), f.interval, 6 * 3600) {
                d if d > Duration::from_secs(366 * 86_400) => {
                    p.add(&format!("{key}.interval"), "must be a year or less".into());
                    d
                }
                d => d,
            },
        });
    }
    list
}

/// `"30d"`, or `"off"` to keep content whatever its age.
fn max_age(text: &str) -> Result<MaxAge, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(MaxAge::Off);
    }
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero (or \"off\")".into()),
        Ok(d) => Ok(MaxAge::After(d)),
        Err(_) => Err(format!(
            "{text:?} is not a duration like \"30d\", or \"off\""
        )),
    }
}

fn storage(s: FileStorage, p: &mut Problems) -> StorageConfig {
    match s.kind.as_deref().unwrap_or("fs") {
        "fs" => {
            for (set, key) in [
                (s.bucket.is_some(), "bucket"),
                (s.prefix.is_some(), "prefix"),
                (s.endpoint.is_some(), "endpoint"),
                (s.region.is_some(), "region"),
                (s.path_style.is_some(), "path_style"),
                (s.access_key_id.is_some(), "access_key_id"),
                (s.secret_access_key.is_some(), "secret_access_key"),
                (s.spool_path.is_some(), "spool_path"),
                (s.local_cache_path.is_some(), "local_cache_path"),
                (s.local_cache_size.is_some(), "local_cache_size"),
                (s.presigned_redirect.is_some(), "presigned_redirect"),
                (s.presigned_expiry.is_some(), "presigned_expiry"),
                (s.abandoned_upload_age.is_some(), "abandoned_upload_age"),
            ] {
                if set {
                    p.add(
                        &format!("storage.{key}"),
                        "only applies to kind = \"s3\"".into(),
                    );
                }
            }
            StorageConfig::Fs {
                path: s.path.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
            }
        }
        "s3" => {
            if s.path.is_some() {
                p.add(
                    "storage.path",
                    "only applies to kind = \"fs\" (use spool_path for the local spool)".into(),
                );
            }
            let bucket = s.bucket.unwrap_or_else(|| {
                p.add("storage.bucket", "is required for kind = \"s3\"".into());
                String::new()
            });
            let endpoint = s.endpoint.and_then(|e| match http_url(&e) {
                Ok(u) => Some(u),
                Err(why) => {
                    p.add("storage.endpoint", why);
                    None
                }
            });
            if s.access_key_id.is_some() != s.secret_access_key.is_some() {
                p.add(
                    "storage.access_key_id",
                    "access_key_id and secret_access_key go together".into(),
                );
            }
            let spool_path = s
                .spool_path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA).join("tmp"));
            let local_cache_path = s
                .local_cache_path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA).join("cache"));
            // The spool is emptied at startup: the cache must not be in it.
            let (cache, spool) = (lexical(&local_cache_path), lexical(&spool_path));
            if cache.starts_with(&spool) || spool.starts_with(&cache) {
                p.add(
                    "storage.local_cache_path",
                    "must be a directory of its own, neither inside spool_path nor containing it"
                        .into(),
                );
            }
            StorageConfig::S3(Box::new(S3Config {
                bucket,
                prefix: s.prefix,
                endpoint,
                region: s.region,
                path_style: s.path_style,
                access_key_id: s.access_key_id,
                secret_access_key: s.secret_access_key.map(Secret::new),
                spool_path,
                local_cache_path,
                local_cache_size: size(p, "storage.local_cache_size", s.local_cache_size.as_ref())
                    .unwrap_or(0),
                presigned_redirect: s.presigned_redirect.unwrap_or(false),
                presigned_expiry: positive(p, "storage.presigned_expiry", s.presigned_expiry, 300),
                abandoned_upload_age: positive(
                    p,
                    "storage.abandoned_upload_age",
                    s.abandoned_upload_age,
                    24 * 60 * 60,
                ),
            }))
        }
        other => {
            p.add(
                "storage.kind",
                format!("{other:?} is neither \"fs\" nor \"s3\""),
            );
            StorageConfig::Fs {
                path: PathBuf::from(DEFAULT_DATA),
            }
        }
    }
}

fn metadata(m: FileMetadata, data_dir: PathBuf, p: &mut Problems) -> MetadataConfig {
    match m.kind.as_deref().unwrap_or("embedded") {
        "embedded" => {
            for (set, key) in [
                (m.url.is_some(), "url"),
                (m.key_prefix.is_some(), "key_prefix"),
                (m.cluster.is_some(), "cluster"),
                (m.tls_ca.is_some(), "tls_ca"),
                (m.sentinel_password.is_some(), "sentinel_password"),
            ] {
                if set {
                    p.add(
                        &format!("metadata.{key}"),
                        "only applies to kind = \"redis\"".into(),
                    );
                }
            }
            MetadataConfig::Embedded {
                path: m.path.unwrap_or(data_dir),
            }
        }
        "redis" => {
            if m.path.is_some() {
                p.add(
                    "metadata.path",
                    "only applies to kind = \"embedded\"".into(),
                );
            }
            let url = m.url.unwrap_or_default();
            let cluster = m.cluster.unwrap_or(false);
            match super::redis_url::parse(&url, cluster) {
                _ if url.is_empty() => {
                    p.add("metadata.url", "is required for kind = \"redis\"".into())
                }
                Err(why) => p.add("metadata.url", why),
                Ok(target) => {
                    if m.tls_ca.is_some() && !target.tls {
                        p.add(
                            "metadata.tls_ca",
                            "applies to rediss:// URLs; this one is plain redis://".into(),
                        );
                    }
                    let sentinels = matches!(target.topology, Topology::Sentinel { .. });
                    if m.sentinel_password.is_some() && !sentinels {
                        p.add(
                            "metadata.sentinel_password",
                            "applies to redis+sentinel:// URLs".into(),
                        );
                    }
                }
            }
            if m.pool_size == Some(0) {
                p.add("metadata.pool_size", "must be at least 1".into());
            }
            MetadataConfig::Redis {
                url: Secret::new(url),
                cluster,
                tls_ca: m.tls_ca,
                sentinel_password: m.sentinel_password.map(Secret::new),
                key_prefix: m.key_prefix.unwrap_or_else(|| "pier:".into()),
                pool_size: m.pool_size.unwrap_or(32),
                timeout: positive(p, "metadata.timeout", m.timeout, 2),
            }
        }
        other => {
            p.add(
                "metadata.kind",
                format!("{other:?} is neither \"embedded\" nor \"redis\""),
            );
            MetadataConfig::Embedded { path: data_dir }
        }
    }
}

/// The built-in table (when enabled) with the file's entries merged in: an
/// entry for a built-in registry overrides only the fields it sets.
fn upstreams(builtins: bool, file: Vec<FileUpstream>, p: &mut Problems) -> Vec<UpstreamConfig> {
    let mut list = if builtins {
        builtin_upstreams()
    } else {
        Vec::new()
    };
    let mut seen = Vec::new();
    for (i, f) in file.into_iter().enumerate() {
        let key = format!("upstreams[{i}]");
        let Some(registry) = f.registry.clone() else {
            p.add(&format!("{key}.registry"), "is required".into());
            continue;
        };
        let key = format!("upstreams[{i}] ({registry})");
        if !is_registry_name(&registry) {
            p.add(
                &format!("{key}.registry"),
                "must be a lowercase host name with a '.' (or `localhost`), without a port: \
                 it is the first path component in add-a-prefix pulls"
                    .into(),
            );
        }
        if seen.contains(&registry) {
            p.add(&format!("{key}.registry"), "appears twice".into());
            continue;
        }
        seen.push(registry.clone());
        let index = match list.iter().position(|u| u.registry == registry) {
            Some(i) => i,
            None => {
                if f.endpoints.is_none() {
                    p.add(
                        &format!("{key}.endpoints"),
                        "is required for a registry that is not built in".into(),
                    );
                }
                list.push(UpstreamConfig {
                    registry: registry.clone(),
                    aliases: Vec::new(),
                    endpoints: Vec::new(),
                    tag_ttl: DEFAULT_TAG_TTL,
                    username: None,
                    password: None,
                    allow: Vec::new(),
                    deny: Vec::new(),
                    max_age: None,
                    prefetch: false,
                });
                list.len() - 1
            }
        };
        let u = &mut list[index];
        if let Some(aliases) = f.aliases {
            for (j, a) in aliases.iter().enumerate() {
                if !is_dns_label(a) {
                    p.add(
                        &format!("{key}.aliases[{j}]"),
                        format!("{a:?} is not a lowercase DNS label"),
                    );
                }
            }
            u.aliases = aliases;
        }
        if let Some(endpoints) = f.endpoints {
            if endpoints.is_empty() {
                p.add(&format!("{key}.endpoints"), "must not be empty".into());
            }
            u.endpoints = endpoints
                .iter()
                .enumerate()
                .filter_map(|(j, e)| match http_url(e) {
                    Ok(url) => Some(url),
                    Err(why) => {
                        p.add(&format!("{key}.endpoints[{j}]"), why);
                        None
                    }
                })
                .collect();
        }
        if let Some(ttl) = f.tag_ttl {
            u.tag_ttl = ttl;
        }
        if let Some(prefetch) = f.prefetch {
            u.prefetch = prefetch;
        }
        if let Some(age) = &f.max_age {
            match max_age(age) {
                Ok(age) => u.max_age = Some(age),
                Err(why) => p.add(&format!("{key}.max_age"), why),
            }
        }
        if f.username.is_some() != f.password.is_some() {
            p.add(
                &format!("{key}.username"),
                "username and password go together".into(),
            );
        }
        if f.username.is_some() {
            u.username = f.username;
            u.password = f.password.map(Secret::new);
        }
        for (list, given, dest) in [
            ("allow", f.allow, &mut u.allow),
            ("deny", f.deny, &mut u.deny),
        ] {
            let Some(patterns) = given else { continue };
            for (j, pat) in patterns.iter().enumerate() {
                if !is_route_pattern(pat) {
                    p.add(
                        &format!("{key}.{list}[{j}]"),
                        format!("{pat:?} is not a glob over a repository name"),
                    );
                }
            }
            *dest = patterns;
        }
    }
    // One alias names one registry.
    let mut aliases: Vec<(&str, &str)> = Vec::new();
    for u in &list {
        for a in &u.aliases {
            if let Some((_, other)) = aliases.iter().find(|(x, _)| x == a) {
                p.add(
                    &format!("upstreams ({}).aliases", u.registry),
                    format!("alias {a:?} is also used by {other}"),
                );
            }
            aliases.push((a, &u.registry));
        }
    }
    list
}

fn server(s: FileServer, data_dir: &Path, p: &mut Problems) -> ServerConfig {
    const MIN_HEADER_BYTES: u64 = 8 * 1024;
    let max_header_bytes = match size(p, "server.max_header_bytes", s.max_header_bytes.as_ref()) {
        Some(n) if n < MIN_HEADER_BYTES => {
            p.add(
                "server.max_header_bytes",
                format!("{n} is below the smallest usable head ({MIN_HEADER_BYTES} bytes)"),
            );
            MIN_HEADER_BYTES as usize
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => 64 * 1024,
    };
    let trusted_proxies = cidrs(
        p,
        "server.trusted_proxies",
        s.trusted_proxies.unwrap_or_default(),
    );
    let acme = s.acme.map(|a| acme(a, data_dir, p));
    if acme.is_some() && (s.tls_cert.is_some() || s.tls_key.is_some()) {
        p.add(
            "server.acme",
            "certificates come from files (tls_cert, tls_key) or from ACME, not both".into(),
        );
    }
    ServerConfig {
        header_timeout: positive(p, "server.header_timeout", s.header_timeout, 30),
        send_timeout: positive(p, "server.send_timeout", s.send_timeout, 60),
        max_header_bytes,
        shutdown_grace: s.shutdown_grace.unwrap_or(Duration::from_secs(30)),
        zero_copy: s.zero_copy.unwrap_or(true),
        trusted_proxies,
        tls: tls_files(s.tls_cert, s.tls_key, p),
        acme,
    }
}

fn acme(a: FileAcme, data_dir: &Path, p: &mut Problems) -> AcmeConfig {
    let domains = a.domains.unwrap_or_default();
    if domains.is_empty() {
        p.add(
            "server.acme.domains",
            "names no domain to get a certificate for".into(),
        );
    }
    for (i, d) in domains.iter().enumerate() {
        if d.starts_with("*.") {
            p.add(
                &format!("server.acme.domains[{i}]"),
                format!(
                    "{d:?} is a wildcard, which needs DNS-01: list each host-prefix name instead"
                ),
            );
        } else if !is_host_name(d) {
            p.add(
                &format!("server.acme.domains[{i}]"),
                format!("{d:?} is not a lowercase host name"),
            );
        }
    }
    let contact = a.contact.unwrap_or_default();
    for (i, c) in contact.iter().enumerate() {
        if !c.starts_with("mailto:") {
            p.add(
                &format!("server.acme.contact[{i}]"),
                format!("{c:?} is not a mailto: address"),
            );
        }
    }
    let directory = a.directory.unwrap_or_else(|| super::LETS_ENCRYPT.into());
    if !Url::parse(&directory).is_ok_and(|u| u.scheme() == "https" && u.host().is_some()) {
        p.add(
            "server.acme.directory",
            format!("{directory:?} is not an https:// URL"),
        );
    }
    AcmeConfig {
        domains,
        contact,
        directory,
        cache: a.cache.unwrap_or_else(|| data_dir.join("acme")),
        directory_ca: a.directory_ca,
    }
}

/// Both files or neither: half a pair would serve nothing.
fn tls_files(cert: Option<PathBuf>, key: Option<PathBuf>, p: &mut Problems) -> Option<TlsFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), None) => {
            p.add(
                "server.tls_key",
                "tls_cert is set: name its private key too".into(),
            );
            None
        }
        (None, Some(_)) => {
            p.add(
                "server.tls_cert",
                "tls_key is set: name its certificate too".into(),
            );
            None
        }
    }
}

fn cidrs(p: &mut Problems, key: &str, list: Vec<String>) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for (i, cidr) in list.iter().enumerate() {
        match parse_cidr(cidr) {
            Some(net) => nets.push(net),
            None => p.add(
                &format!("{key}[{i}]"),
                format!("{cidr:?} is not an address or a CIDR like 10.0.0.0/8"),
            ),
        }
    }
    nets
}

/// `10.0.0.0/8`, `fd00::/8`, or a single address.
fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Larger than any single layer in the public registries (the largest,
/// model weights baked into an image, run to tens of GB), and past the
/// 80 GB a fixed part size once allowed in S3.
const DEFAULT_MAX_BLOB_SIZE: u64 = 100 << 30;

fn size(p: &mut Problems, key: &str, v: Option<&ByteSize>) -> Option<u64> {
    match v.map(ByteSize::bytes) {
        Some(Ok(n)) => Some(n),
        Some(Err(why)) => {
            p.add(key, why);
            None
        }
        None => None,
    }
}

/// `path` made absolute against the working directory, with `.` and `..`
/// taken out by name (symlinks are not followed: the paths need not exist
/// yet).
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

pub(super) fn positive(
    p: &mut Problems,
    key: &str,
    v: Option<Duration>,
    default_secs: u64,
) -> Duration {
    match v {
        Some(d) if d.is_zero() => {
            p.add(key, "must be longer than zero".into());
            Duration::from_secs(default_secs)
        }
        Some(d) => d,
        None => Duration::from_secs(default_secs),
    }
}

fn http_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{s:?} is not an http:// or https:// URL"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?} must be a base URL (scheme, host, port) without a path"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials go in username/password, not in the URL".into());
    }
    Ok(url)
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_host_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_registry_name(s: &str) -> bool {
    s == "localhost" || (s.contains('.') && is_host_name(s))
}

/// `<registry>/<glob over the repository>`
fn is_image_pattern(s: &str) -> bool {
    match s.split_once('/') {
        Some((registry, rest)) => {
            (registry == "*" || registry == "**" || is_registry_name(registry))
                && is_route_pattern(rest)
        }
        None => s == "**",
    }
}

pub(super) fn is_route_pattern(s: &str) -> bool {
    // A handful of stars keeps matching cheap (it backtracks).
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().filter(|&c| c == b'*').count() <= 8
        && s.bytes().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'.' | b'_' | b'-' | b'/' | b'*')
        })
}

#[derive(Default)]
pub(super) struct Problems(Vec<String>);

impl Problems {
    pub(super) fn add(&mut self, key: &str, why: String) {
        self.0.push(format!("{key}: {why}"));
    }

    fn finish(self, config: Config) -> Result<Config, ConfigError> {
        if self.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems: self.0 })
        }
    }
}
