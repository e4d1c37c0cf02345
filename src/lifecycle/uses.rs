//! Which blobs and manifests this replica served, gathered in memory and written to the
//! metadata store in one batch every few seconds: a warm read costs a map
//! update, not a round trip, and every replica's uses end up in one place
//! where eviction reads them. Where registries have their own `max_age`,
//! each serve's deadline is gathered the same way (`Retention`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use super::retention::Retention;
use crate::meta::{MetaStore, UseKind};
use crate::reference::Digest;

/// How often uses are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

pub struct UseLog {
    meta: Arc<dyn MetaStore>,
    /// Digest → its latest use (or deadline) not yet written (Unix ms), by
    /// kind in the order of `UseKind::ALL`.
    pending: [Mutex<HashMap<Digest, u64>>; 4],
    every: Duration,
    retention: Retention,
}

pub use crate::meta::now_ms;

impl UseLog {
    /// A log written out every `every` (`FLUSH_EVERY` when serving) for as
    /// long as it lives.
    pub fn start(meta: Arc<dyn MetaStore>, every: Duration, retention: Retention) -> Arc<Self> {
        let log = Arc::new(Self {
            meta,
            pending: Default::default(),
            every,
            retention,
        });
        tokio::spawn(flushing(Arc::downgrade(&log)));
        log
    }

    /// How long a use may wait before other replicas can see it.
    pub fn delay(&self) -> Duration {
        self.every
    }

    fn pending(&self, kind: UseKind) -> MutexGuard<'_, HashMap<Digest, u64>> {
        self.pending[kind as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The blob was served (or stored) now.
    pub fn note(&self, digest: &Digest) {
        self.note_as(UseKind::Blobs, digest, now_ms());
    }

    /// The manifest was served now, for `registry`.
    pub fn note_manifest(&self, registry: &str, digest: &Digest) {
        self.note_as(UseKind::Manifests, digest, now_ms());
        self.note_deadline(UseKind::ManifestDeadlines, registry, digest);
    }

    /// The blob was served for `registry` (its use is noted by the store
    /// that served it).
    pub fn note_blob_served(&self, registry: &str, digest: &Digest) {
        self.note_deadline(UseKind::BlobDeadlines, registry, digest);
    }

    fn note_deadline(&self, kind: UseKind, registry: &str, digest: &Digest) {
        if self.retention.per_registry() {
            let deadline = self.retention.deadline(registry, now_ms());
            self.note_as(kind, digest, deadline);
        }
    }

    fn note_as(&self, kind: UseKind, digest: &Digest, at: u64) {
        let mut pending = self.pending(kind);
        match pending.get_mut(digest) {
            Some(kept) => *kept = at.max(*kept),
            None => {
                pending.insert(digest.clone(), at);
            }
        }
    }

    /// Writes the uses gathered so far; kept for the next try if the
    /// metadata store fails.
    pub async fn flush(&self) {
        // Deadlines first: a pass that reads a new use also reads the
        // deadline that came with it.
        for kind in [
            UseKind::BlobDeadlines,
            UseKind::ManifestDeadlines,
            UseKind::Blobs,
            UseKind::Manifests,
        ] {
            let batch: Vec<(Digest, u64)> = std::mem::take(&mut *self.pending(kind))
                .into_iter()
                .collect();
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = self.meta.record_uses(kind, &batch).await {
                tracing::warn!(error = %e, uses = batch.len(), "cannot record uses; keeping them for the next try");
                let mut pending = self.pending(kind);
                for (digest, at) in batch {
                    let kept = pending.entry(digest).or_insert(at);
                    *kept = at.max(*kept);
                }
                // The rest waits too, so uses never arrive before their
                // deadlines.
                return;
            }
        }
    }
}

async fn flushing(log: Weak<UseLog>) {
    let Some(every) = log.upgrade().map(|l| l.every) else {
        return;
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(log) = log.upgrade() else { return };
        log.flush().await;
    }
}
