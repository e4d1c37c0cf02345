//! Builds the stores and the mirror from a config and runs the HTTP server
//! until a shutdown signal.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Config, MetadataConfig, StorageConfig};
use crate::meta::{EmbeddedMeta, MetaStore, RedisMeta};
use crate::mirror::Mirror;
use crate::storage::{BlobStore, FsBlobStore, S3BlobStore};

/// Opens the configured stores and builds the mirror.
pub async fn build_mirror(config: &Config) -> anyhow::Result<Arc<Mirror>> {
    let blobs: Arc<dyn BlobStore> = match &config.storage {
        StorageConfig::Fs { path } => Arc::new(
            FsBlobStore::open(path)
                .await
                .with_context(|| format!("opening blob storage at {}", path.display()))?,
        ),
        StorageConfig::S3(s3) => Arc::new(S3BlobStore::new(s3).await),
    };
    let meta: Arc<dyn MetaStore> = match &config.metadata {
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
            key_prefix,
            pool_size,
            timeout,
        } => Arc::new(
            RedisMeta::new(url.expose(), key_prefix, *pool_size, *timeout)
                .context("setting up the Redis pool")?,
        ),
    };
    let spool = config.storage.spool_dir();
    clear_spool(&spool).await?;
    let mirror = Mirror::new(config, blobs, meta, spool).context("building the HTTP client")?;
    Ok(Arc::new(mirror))
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

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mirror = build_mirror(config).await?;
    let app = crate::api::router(mirror);
    tracing::info!(listen = %listener.local_addr()?, "pier is serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
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
