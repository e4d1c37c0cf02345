//! Upkeep no request does: aborting the multipart uploads that processes
//! killed mid-upload (SIGKILL, OOM, a lost node) left open in the bucket.
//! One replica of those sharing the metadata store does it per period.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::meta::MetaStore;
use crate::storage::BlobStore;
use crate::telemetry::metrics::metrics;

/// How often each replica offers to sweep.
const PERIOD: Duration = Duration::from_secs(60 * 60);
/// Taken by the replica that sweeps and left to lapse, never released, so
/// the others skip their turns until the period is over.
const LEASE: &str = "janitor:multipart";
/// A little shorter than the period: the lease is taken a moment after the
/// tick, so with a whole period it would still be held at the sweeping
/// replica's next tick, and a lone replica would sweep every other period.
const LEASE_TTL: Duration = Duration::from_secs(55 * 60);

/// Sweeps for uploads begun more than `older_than` ago now, then every
/// period, for as long as the runtime runs.
pub fn spawn_upload_sweeps(
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    older_than: Duration,
) {
    let holder = format!("{:016x}", rand::random::<u64>());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PERIOD);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            sweep(blobs.as_ref(), meta.as_ref(), &holder, older_than).await;
        }
    });
}

async fn sweep(blobs: &dyn BlobStore, meta: &dyn MetaStore, holder: &str, older_than: Duration) {
    match meta.acquire_lease(LEASE, holder, LEASE_TTL).await {
        Ok(None) => {}
        // Another replica swept less than a period ago.
        Ok(Some(_)) => return,
        // Two replicas sweeping costs a few requests; none sweeping leaves
        // the uploads for another period.
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the upload sweep's lease; sweeping anyway")
        }
    }
    match blobs.abort_stale_uploads(older_than).await {
        Ok(0) => tracing::debug!(?older_than, "no abandoned multipart uploads"),
        Ok(n) => {
            metrics().abandoned_uploads_aborted.inc_by(n as u64);
            tracing::info!(
                aborted = n,
                ?older_than,
                "aborted abandoned multipart uploads"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot sweep abandoned multipart uploads");
            // Another replica's next tick may do better than waiting a
            // whole period for this one's.
            if let Err(e) = meta.release_lease(LEASE, holder).await {
                tracing::debug!(error = %e, "cannot give up the upload sweep's lease");
            }
        }
    }
}
