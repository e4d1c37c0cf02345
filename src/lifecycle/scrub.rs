//! The bucket's blobs hashed again in the background (`[cache]
//! scrub_interval`), at `scrub_rate` bytes a second at most, by one replica
//! at a time. Each is read whole through the store's verified read, which
//! removes an object that does not match its key (`reason="corrupt"`); the
//! next request fetches the blob again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::meta::Held;
use crate::meta::MetaStore;
use crate::storage::{BlobStore, StorageError};
use crate::telemetry::metrics::metrics;

/// Held by the replica scrubbing, renewed as it goes.
const LEASE: &str = "lifecycle:scrub";
const LEASE_TTL: Duration = Duration::from_secs(60);
/// Taken for an interval by the replica that scrubs, and left to lapse.
const PERIOD_LEASE: &str = "lifecycle:scrub-period";
/// How often each replica offers to scrub.
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// What a pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scrubbed {
    pub blobs: usize,
    pub bytes: u64,
    /// Did not match their digest (and were removed).
    pub corrupt: usize,
}

pub struct BucketScrub {
    /// The bucket itself, not this replica's local copies.
    store: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    interval: Duration,
    rate: u64,
    holder: String,
}

impl BucketScrub {
    pub fn new(
        store: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        interval: Duration,
        rate: u64,
    ) -> Self {
        Self {
            store,
            meta,
            interval,
            rate,
            holder: format!("{:016x} -", rand::random::<u64>()),
        }
    }

    /// Scrubs once an interval, on one replica.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                let due = matches!(
                    self.meta
                        .acquire_lease(PERIOD_LEASE, &self.holder, self.interval)
                        .await,
                    Ok(None)
                );
                if due {
                    match self.pass().await {
                        Ok(Some(s)) => tracing::info!(
                            blobs = s.blobs,
                            bytes = s.bytes,
                            corrupt = s.corrupt,
                            "bucket scrub done"
                        ),
                        Ok(None) => tracing::debug!("another replica scrubs the bucket now"),
                        Err(e) => tracing::warn!(error = %e, "bucket scrub failed"),
                    }
                }
                tokio::time::sleep(LOOK_EVERY).await;
            }
        });
    }

    /// Hashes every blob in the bucket again, under the scrub lease (a
    /// pass whose lease went to another replica stops); `None` while
    /// another replica scrubs.
    pub async fn pass(&self) -> Result<Option<Scrubbed>, StorageError> {
        let held = Held::take(&self.meta, LEASE, &self.holder, LEASE_TTL)
            .await
            .map_err(|e| StorageError::Backend(e.to_string()))?;
        let Some(held) = held else {
            return Ok(None);
        };
        let result = self.scrub(&held).await;
        held.release().await;
        result.map(Some)
    }

    async fn scrub(&self, held: &Held) -> Result<Scrubbed, StorageError> {
        let mut found = Scrubbed::default();
        let started = Instant::now();
        for listed in self.store.inventory().await? {
            if held.lost() {
                tracing::warn!("scrub lease lost: stopping");
                break;
            }
            let body = match self.store.get(&listed.digest, None).await {
                Ok(Some(body)) => body,
                // Evicted since the listing.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(digest = %listed.digest, error = %e, "cannot scrub a blob");
                    continue;
                }
            };
            found.blobs += 1;
            let mut stream = body.stream;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => {
                        found.bytes += chunk.len() as u64;
                        metrics().scrub_bytes.inc_by(chunk.len() as u64);
                        let due =
                            Duration::from_secs_f64(found.bytes as f64 / self.rate.max(1) as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    // The verified read removed the object (and counted it)
                    // when it did not match; other errors are a read that
                    // failed, checked again next time.
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            found.corrupt += 1;
                        }
                        tracing::debug!(digest = %listed.digest, error = %e, "scrub read ended");
                        break;
                    }
                }
            }
        }
        Ok(found)
    }
}
