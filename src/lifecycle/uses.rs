//! Which blobs this replica served, gathered in memory and written to the
//! metadata store in one batch every few seconds: a warm read costs a map
//! update, not a round trip, and every replica's uses end up in one place
//! where eviction reads them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use crate::meta::MetaStore;
use crate::reference::Digest;

/// How often uses are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

pub struct UseLog {
    meta: Arc<dyn MetaStore>,
    /// Digest → its latest use not yet written (Unix ms).
    pending: Mutex<HashMap<Digest, u64>>,
    every: Duration,
}

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
            pending: Mutex::new(HashMap::new()),
            every,
        });
        tokio::spawn(flushing(Arc::downgrade(&log)));
        log
    }

    /// How long a use may wait before other replicas can see it.
    pub fn delay(&self) -> Duration {
        self.every
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Digest, u64>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The blob was served now.
    pub fn note(&self, digest: &Digest) {
        let now = now_ms();
        let mut pending = self.pending();
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
        let batch: Vec<(Digest, u64)> = std::mem::take(&mut *self.pending()).into_iter().collect();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.meta.record_uses(&batch).await {
            tracing::warn!(error = %e, uses = batch.len(), "cannot record blob uses; keeping them for the next try");
            let mut pending = self.pending();
            for (digest, at) in batch {
                let kept = pending.entry(digest).or_insert(at);
                *kept = at.max(*kept);
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
