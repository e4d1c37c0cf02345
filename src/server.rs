//! Builds the stores and the mirror from a config and runs the HTTP server
//! until a shutdown signal.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api::{Admin, Console};
use crate::config::{Config, MetadataConfig, ServerConfig, StorageConfig};
use crate::lifecycle::{
    BucketScrub, FLUSH_EVERY, Forgetter, Retention, SharedBudget, StoredDeadlines, UseLog,
};
use crate::limits::{ClientLimits, PeerAddr};
use crate::meta::{EmbeddedMeta, MetaStore, RedisMeta, RedisOptions};
use crate::mirror::Mirror;
use crate::pins::Pins;
use crate::storage::{
    BlobStore, Budget, BudgetedFsStore, Keep, S3BlobStore, Scrub, TieredBlobStore,
};
use crate::sync::{Jobs, Syncer};
use crate::tls::{Accepted, Certificates};
use crate::zerocopy::ClientIo;

/// Opens the configured metadata store (Redis connects on first use).
pub async fn open_meta(config: &Config) -> anyhow::Result<Arc<dyn MetaStore>> {
    Ok(match &config.metadata {
        MetadataConfig::Embedded { path } => {
            let dir = path.clone();
            let meta = tokio::task::spawn_blocking(move || EmbeddedMeta::open(&dir))
                .await
                .context("opening metadata")?
                .with_context(|| format!("opening metadata at {}", path.display()))?;
            Arc::new(meta)
        }
        MetadataConfig::Redis {
            url,
            cluster,
            tls_ca,
            sentinel_password,
            key_prefix,
            pool_size,
            timeout,
        } => {
            let tls_ca = match tls_ca {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("reading metadata.tls_ca {}", path.display()))?,
                ),
                None => None,
            };
            let options = RedisOptions {
                cluster: *cluster,
                tls_ca,
                sentinel_password: sentinel_password.clone(),
                pool_size: *pool_size,
                timeout: *timeout,
            };
            Arc::new(
                RedisMeta::connect(url.expose(), key_prefix, &options)
                    .context("setting up the Redis pool")?,
            )
        }
    })
}

/// Opens the configured stores and builds the mirror, and the client limits
/// (which share the metadata store); the metadata store too.
pub async fn build_mirror(
    config: &Config,
) -> anyhow::Result<(Arc<Mirror>, Arc<ClientLimits>, Arc<dyn MetaStore>)> {
    let meta = open_meta(config).await?;
    let retention = Retention::of(config);
    let bucket_budget = SharedBudget {
        max_size: config.cache.max_size,
        retention: retention.clone(),
    };
    let bucket_budgeted = matches!(config.storage, StorageConfig::S3(_)) && bucket_budget.is_set();
    // Uses of manifests (and of the bucket's blobs) are recorded where
    // something is forgotten by them: the fs store evicts (`min_free` at
    // least), a bucket budget, or an age.
    let fs = matches!(config.storage, StorageConfig::Fs { .. });
    let (uses, forgetter) = if fs || bucket_budget.is_set() {
        let forgetter = Arc::new(Forgetter::new(
            meta.clone(),
            pins(config, &meta),
            retention.clone(),
        ));
        forgetter.clone().spawn();
        (
            Some(UseLog::start(meta.clone(), FLUSH_EVERY, retention.clone())),
            Some(forgetter),
        )
    } else {
        (None, None)
    };
    let blobs: Arc<dyn BlobStore> = match &config.storage {
        StorageConfig::Fs { path } => {
            let budget = Budget {
                max_size: config.cache.max_size,
                min_free: config.cache.min_free,
                max_age: retention.shortest(),
                scrub: config.cache.scrub_interval.map(|interval| Scrub {
                    interval,
                    rate: config.cache.scrub_rate,
                }),
            };
            let store = BudgetedFsStore::open(path, budget, pins(config, &meta))
                .await
                .with_context(|| format!("opening blob storage at {}", path.display()))?;
            if let Some(forgetter) = &forgetter {
                store.report_evictions_to(forgetter.clone());
            }
            if retention.per_registry() {
                store.judge_age_by(Arc::new(StoredDeadlines::new(
                    meta.clone(),
                    retention.clone(),
                )));
            }
            Arc::new(store)
        }
        StorageConfig::S3(s3) => {
            let shared: Arc<dyn BlobStore> = Arc::new(S3BlobStore::new(s3).await);
            if let Some(interval) = config.cache.scrub_interval {
                let scrub = BucketScrub::new(
                    shared.clone(),
                    meta.clone(),
                    interval,
                    config.cache.scrub_rate,
                );
                Arc::new(scrub).spawn();
            }
            let store: Arc<dyn BlobStore> = if s3.local_cache_size == 0 {
                shared
            } else {
                let dir = &s3.local_cache_path;
                Arc::new(
                    TieredBlobStore::open(shared, dir, s3.local_cache_size, config.cache.min_free)
                        .await
                        .with_context(|| format!("opening the local cache at {}", dir.display()))?,
                )
            };
            match &uses {
                Some(uses) if bucket_budgeted => crate::lifecycle::budgeted(
                    store,
                    meta.clone(),
                    pins(config, &meta),
                    bucket_budget,
                    uses.clone(),
                    forgetter,
                ),
                _ => store,
            }
        }
    };
    let spool = config.storage.spool_dir();
    clear_spool(&spool).await?;
    probe_stores(blobs.clone(), meta.clone());
    if let StorageConfig::S3(s3) = &config.storage {
        crate::janitor::spawn_upload_sweeps(blobs.clone(), meta.clone(), s3.abandoned_upload_age);
    }
    let limits = ClientLimits::new(&config.server, &config.limits, meta.clone());
    let mirror = Mirror::new(config, blobs, meta.clone(), spool)
        .context("building the HTTP client")?
        .noting_uses(uses);
    Ok((Arc::new(mirror), Arc::new(limits), meta))
}

/// What eviction spares, if anything: `[cache] pinned` images, and all
/// the private namespace holds.
pub fn pins(config: &Config, meta: &Arc<dyn MetaStore>) -> Option<Arc<dyn Keep>> {
    let private = config.private.as_ref().map(|p| p.prefix.clone());
    (!config.cache.pinned.is_empty() || private.is_some()).then(|| {
        Arc::new(Pins::new(config.cache.pinned.clone(), meta.clone()).holding(private))
            as Arc<dyn Keep>
    })
}

/// Asks both stores once, in the background: a store that cannot be
/// reached is named in the log at startup rather than at the first client's
/// request, and the first requests find connections already open.
fn probe_stores(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>) {
    tokio::spawn(async move {
        let (b, m) = tokio::join!(blobs.health(), meta.health());
        if let Err(e) = b {
            tracing::warn!(error = %e, "blob storage cannot be reached yet");
        }
        if let Err(e) = m {
            tracing::warn!(error = %e, "metadata cannot be reached yet");
        }
    });
}

/// Spool files left by a previous run belong to fetches that no longer exist.
async fn clear_spool(dir: &Path) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("creating spool directory {}", dir.display()))?;
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(e) = entries.next_entry().await? {
        if e.file_name().to_string_lossy().ends_with(".part") {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
    Ok(())
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting,
/// lets in-flight responses and fetches finish for up to
/// `[server] shutdown_grace`, and gives up the leases still held.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    raise_open_files();
    let settings = config.server.clone();
    // Before anything else: a server that cannot speak TLS must not start.
    let certificates = Certificates::start(&settings)?;
    let tls = certificates
        .as_ref()
        .map(Certificates::acceptor)
        .transpose()?;
    let (mirror, limits, meta) = build_mirror(config).await?;
    let meta_store = meta.clone();
    let syncer = Arc::new(Syncer::new(mirror.clone(), &config.sync));
    if mirror.prefetches() {
        // Weak: the mirror must not keep alive what holds it.
        let weak = Arc::downgrade(&syncer);
        mirror.prefetch_with(Arc::new(move |target, digest| {
            if let Some(syncer) = weak.upgrade() {
                syncer.prefetch(target, digest);
            }
        }));
    }
    let jobs = Arc::new(Jobs::new(meta, syncer, &config.sync));
    let admin = Admin::new(config, jobs.clone(), mirror.clone()).map(Arc::new);
    if admin.is_some() || !config.sync.images.is_empty() {
        jobs.spawn_takeover();
    }
    if !config.sync.images.is_empty() {
        crate::sync::keep_lists_synced(jobs.clone(), config.sync.images.clone());
    }
    let console = Console::new(config, mirror.clone()).map(Arc::new);
    let publisher = console.is_some().then(|| {
        let name = crate::console::publish::replica_name(
            config.cluster.advertise_url.as_ref(),
            listener.local_addr().map_or(0, |a| a.port()),
        );
        let registries = config
            .upstreams
            .iter()
            .map(|u| u.registry.clone())
            .collect();
        let publisher = Arc::new(crate::console::publish::Publisher::new(
            mirror.clone(),
            name,
            registries,
        ));
        publisher.spawn();
        publisher
    });
    let private =
        crate::private::Private::new(config, meta_store.clone(), mirror.blob_store().clone())
            .context("setting up the private namespace")?
            .map(Arc::new);
    if let (Some(private), Some(c)) = (&private, &config.private) {
        private.spawn_gc(c.gc_interval, c.gc_grace);
    }
    let app = crate::api::router(mirror.clone(), limits, admin, console, private);
    // Every store has local files to send: stored blobs (fs), local copies
    // (S3 with a local cache), and the spool files of fetches. Under TLS
    // the bytes must pass through the cipher, so sendfile is for plain TCP.
    let zero_copy = settings.zero_copy && tls.is_none();
    let builder = Arc::new(http_builder(&settings));
    let graceful = GracefulShutdown::new();
    tracing::info!(
        listen = %listener.local_addr()?,
        https = tls.is_some(),
        zero_copy,
        "pier is serving"
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let io = ClientIo::new(tcp, settings.send_timeout, settings.header_timeout);
        let queue = zero_copy.then(|| io.queue());
        let app = app.clone();
        let secured = tls.is_some();
        let service = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            if secured {
                req.extensions_mut().insert(crate::tls::Secured);
            }
            if let Some(q) = &queue {
                req.extensions_mut().insert(q.clone());
            }
            app.clone().oneshot(req.map(Body::new))
        });
        let Some(acceptor) = tls.clone() else {
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        // The handshake runs in the connection's own task, so one slow
        // client cannot hold up the accept loop.
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let handshake_timeout = settings.header_timeout;
        tokio::spawn(async move {
            let tls = match crate::tls::accept(&acceptor, io, handshake_timeout).await {
                Ok(Accepted::Tls(tls)) => tls,
                Ok(Accepted::PlainHttp(io)) => return crate::tls::refuse_plain_http(io).await,
                Ok(Accepted::AcmeChallenge) => return,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    mirror.begin_shutdown();
    let deadline = tokio::time::Instant::now() + settings.shutdown_grace;
    tracing::info!(
        connections = graceful.count(),
        grace = ?settings.shutdown_grace,
        "no longer accepting; finishing in-flight requests"
    );
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    mirror.shutdown(deadline).await;
    if let Some(publisher) = publisher
        && let Err(e) = publisher.last().await
    {
        tracing::warn!(error = %e, "cannot publish the console's last figures");
    }
    Ok(())
}

/// Listens on `addr` with a queue of connections waiting to be accepted as
/// long as the kernel allows (`net.core.somaxconn`, as Go's runtime asks
/// for other registries): a fleet's nodes connect all at once, and a
/// connection refused by a full queue reaches its client as a timeout or a
/// reset (1,000 nodes overflowed tokio's default of 1,024;
/// tests/bench/fleet.py).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(4096)
        .clamp(1024, 65535);
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A fleet pulling at once is thousands of connections, and services are
/// often started with a soft limit of 1024 open files (or 256): the soft
/// limit goes up to the hard one, as Go's runtime does for other
/// registries, and the limit in force is logged.
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    /// Linux's default `fs.nr_open`, for a hard limit of "unlimited".
    const NR_OPEN: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let target = limit.maximum.unwrap_or(NR_OPEN);
    let mut in_force = limit.current;
    if limit.current.is_some_and(|soft| soft < target) {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        ) {
            Ok(()) => in_force = Some(target),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
        }
    }
    match in_force {
        Some(n) => tracing::info!(open_files = n, "open file limit"),
        None => tracing::info!("open file limit: unlimited"),
    }
}

/// HTTP/1 and HTTP/2 (prior knowledge) with the limits on request heads.
fn http_builder(settings: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(settings.header_timeout))
        .keep_alive_timeout(settings.send_timeout);
    builder
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
