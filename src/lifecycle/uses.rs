//! Which blobs and manifests this replica served, gathered in memory and written to the
//! metadata store in one batch every few seconds: a warm read costs a map
//! update, not a round trip, and every replica's uses end up in one place
//! where eviction reads them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use crate::meta::{MetaStore, UseKind};
use crate::reference::Digest;

/// How often uses are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

pub struct UseLog {
    meta: Arc<dyn MetaStore>,
    /// Digest → its latest use not yet written (Unix ms): blobs', then
    /// manifests'.
    pending: [Mutex<HashMap<Digest, u64>>; 2],
    every: Duration,
}

const KINDS: [UseKind; 2] = [UseKind::Blobs, UseKind::Manifests];

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl UseLog {
    /// A log written out every `every` (`FLUSH_EVERY` when serving) for as
    /// long as it lives.
    pub fn start(meta: Arc<dyn MetaStore>, every: Duration) -> Arc<Self> {
        let log = Arc::new(Self {
            meta,
            pending: Default::default(),
            every,
        });
        tokio::spawn(flushing(Arc::downgrade(&log)));
        log
    }

    /// How long a use may wait before other replicas can see it.
    pub fn delay(&self) -> Duration {
        self.every
    }

    fn pending(&self, kind: UseKind) -> MutexGuard<'_, HashMap<Digest, u64>> {
        let i = usize::from(kind == UseKind::Manifests);
        self.pending[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The blob was served (or stored) now.
    pub fn note(&self, digest: &Digest) {
        self.note_as(UseKind::Blobs, digest);
    }

    /// The manifest was served now.
    pub fn note_manifest(&self, digest: &Digest) {
        self.note_as(UseKind::Manifests, digest);
    }

    fn note_as(&self, kind: UseKind, digest: &Digest) {
        let now = now_ms();
        let mut pending = self.pending(kind);
        match pending.get_mut(digest) {
            Some(at) => *at = now.max(*at),
            None => {
                pending.insert(digest.clone(), now);
            }
        }
    }

    /// Writes the uses gathered so far; kept for the next try if the
    /// metadata store fails.
    pub async fn flush(&self) {
        for kind in KINDS {
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
