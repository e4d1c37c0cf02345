//! Blobs the store was seen to lack a moment ago. When a manifest comes
//! from upstream, its blobs are looked up in a remote store at once, all
//! together, while the client reads the manifest; a blob found missing then
//! goes straight to its fetch when the client asks for it, without another
//! round trip to the store. Clients ask for a new image's blobs mostly one
//! after another, and each such round trip (1 to 4 ms on a local S3
//! server, more across a network) added to the pull.
//!
//! Acting on a "missing" that is no longer true costs a second fetch from
//! upstream, never a wrong byte (every fetch is verified), and the answer
//! is only trusted while that cannot happen in the normal course. A fetch
//! on this replica forgets the answer when it stores the blob; a fetch on
//! another replica leaves the blob's lease to lapse after storing it, and a
//! fetch here must claim that lease first, which then sends it to the store
//! or to that replica. A lease is renewed every third of its TTL, so it
//! outlives the store by two thirds of the TTL at least: answers are
//! trusted for half (replicas sharing a bucket share the TTL). Without a
//! lease to go by (Redis failing), the fetch asks the store again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::reference::Digest;
use crate::storage::BlobStore;

/// Lookups running at once, across all manifests.
const LOOKUPS_AT_ONCE: usize = 16;
/// Answers kept at most (those younger than the trust); a manifest past
/// this is not looked up ahead.
const MAX_ENTRIES: usize = 50_000;
/// How long a request waits for a lookup of its blob before asking the
/// store itself. Its own request would go to the same store, later than
/// the one under way; the bound is for a store that does not answer.
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

pub struct SeenMissing {
    seen: Mutex<Table>,
    /// Bumped whenever a lookup ends, for requests waiting on one.
    settled: tokio::sync::watch::Sender<()>,
    lookups: Arc<tokio::sync::Semaphore>,
    /// Numbers lookups, so that an answer is recorded only for its own.
    next_lookup: AtomicU64,
    trust: Duration,
}

#[derive(Default)]
struct Table {
    by_digest: HashMap<Digest, Seen>,
    /// When each entry was made, oldest first, so that entries past the
    /// trust go as new ones come.
    made: VecDeque<(Instant, Digest)>,
}

impl Table {
    fn insert(&mut self, digest: Digest, seen: Seen) {
        self.made.push_back((seen.at(), digest.clone()));
        self.by_digest.insert(digest, seen);
    }

    fn drop_older_than(&mut self, trust: Duration) {
        while let Some((at, _)) = self.made.front()
            && at.elapsed() >= trust
        {
            let Some((at, digest)) = self.made.pop_front() else {
                break;
            };
            // Unless a newer entry replaced it.
            if self.by_digest.get(&digest).is_some_and(|s| s.at() == at) {
                self.by_digest.remove(&digest);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Seen {
    /// Lookup number `id`, asked at `at`, is under way (or queued).
    LookingUp { at: Instant, id: u64 },
    /// A lookup asked at this time found the blob missing.
    Missing(Instant),
}

impl SeenMissing {
    /// Answers are trusted for `trust`: half the lease TTL.
    pub fn new(trust: Duration) -> Self {
        Self {
            seen: Mutex::default(),
            settled: tokio::sync::watch::Sender::new(()),
            lookups: Arc::new(tokio::sync::Semaphore::new(LOOKUPS_AT_ONCE)),
            next_lookup: AtomicU64::new(0),
            trust,
        }
    }

    fn seen(&self) -> MutexGuard<'_, Table> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `digests` up in `store` in the background, when the store is
    /// remote (a local lookup costs nothing worth saving).
    pub fn look_up(self: &Arc<Self>, store: &Arc<dyn BlobStore>, digests: Vec<Digest>) {
        if !store.remote() || digests.is_empty() {
            return;
        }
        let asked = Instant::now();
        let digests: Vec<(Digest, u64)> = {
            let mut seen = self.seen();
            seen.drop_older_than(self.trust);
            if seen.made.len() + digests.len() > MAX_ENTRIES {
                return;
            }
            let mut queued = Vec::with_capacity(digests.len());
            for d in digests {
                // A fresh answer, or a lookup under way, serves as well.
                if seen.by_digest.contains_key(&d) {
                    continue;
                }
                let id = self.next_lookup.fetch_add(1, Ordering::Relaxed);
                seen.insert(d.clone(), Seen::LookingUp { at: asked, id });
                queued.push((d, id));
            }
            queued
        };
        let (this, store) = (self.clone(), store.clone());
        tokio::spawn(async move {
            futures::stream::iter(digests)
                .for_each_concurrent(None, |(digest, id)| {
                    let (this, store) = (&this, &store);
                    async move {
                        let Ok(_slot) = this.lookups.acquire().await else {
                            return;
                        };
                        // A failed lookup (the store down) answers nothing.
                        let missing = matches!(store.stat(&digest).await, Ok(None));
                        this.settle(&digest, id, asked, missing);
                    }
                })
                .await;
        });
    }

    /// Records a lookup's answer, unless the blob was stored (and so
    /// forgotten) while it ran.
    fn settle(&self, digest: &Digest, id: u64, asked: Instant, missing: bool) {
        {
            let mut seen = self.seen();
            if let Some(entry) = seen.by_digest.get_mut(digest)
                && matches!(entry, Seen::LookingUp { id: running, .. } if *running == id)
            {
                if missing {
                    // Made at the same time: `made` stays in order.
                    *entry = Seen::Missing(asked);
                } else {
                    seen.by_digest.remove(digest);
                }
            }
        }
        self.settled.send_replace(());
    }

    /// This replica stored the blob.
    pub fn stored(&self, digest: &Digest) {
        if self.seen().by_digest.remove(digest).is_some() {
            self.settled.send_replace(());
        }
    }

    /// Whether the store lacked the blob a moment ago; waits for a lookup
    /// of it that is under way.
    pub async fn is_missing(&self, digest: &Digest) -> bool {
        let give_up = tokio::time::Instant::now() + LOOKUP_WAIT;
        loop {
            let mut settled = {
                let seen = self.seen();
                match seen.by_digest.get(digest) {
                    Some(Seen::Missing(at)) => return at.elapsed() < self.trust,
                    Some(Seen::LookingUp { at, .. }) if at.elapsed() < self.trust => {
                        // Subscribed under the lock: an answer recorded
                        // after this look is announced after it too.
                        self.settled.subscribe()
                    }
                    _ => return false,
                }
            };
            if tokio::time::timeout_at(give_up, settled.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

impl Seen {
    fn at(&self) -> Instant {
        match self {
            Seen::LookingUp { at, .. } | Seen::Missing(at) => *at,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use async_trait::async_trait;

    use super::*;
    use crate::range::RangeSpec;
    use crate::storage::{BlobBody, StorageError};

    /// A remote store holding the blobs in `held`, whose lookups wait for
    /// `gate` to open.
    struct Remote {
        held: Vec<Digest>,
        gate: tokio::sync::watch::Receiver<bool>,
        lookups: Mutex<usize>,
    }

    #[async_trait]
    impl BlobStore for Remote {
        async fn stat(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
            *self.lookups.lock().unwrap() += 1;
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open).await.unwrap();
            Ok(self.held.contains(d).then_some(1))
        }
        async fn get(
            &self,
            _: &Digest,
            _: Option<RangeSpec>,
        ) -> Result<Option<BlobBody>, StorageError> {
            Ok(None)
        }
        async fn store(&self, _: &Digest, _: &Path, _: u64) -> Result<(), StorageError> {
            Ok(())
        }
        fn remote(&self) -> bool {
            true
        }
        async fn delete(&self, _: &Digest) -> Result<(), StorageError> {
            Ok(())
        }
        async fn health(&self) -> Result<(), StorageError> {
            Ok(())
        }
    }

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn remote(held: Vec<Digest>) -> (Arc<Remote>, tokio::sync::watch::Sender<bool>) {
        let (open, gate) = tokio::sync::watch::channel(false);
        let store = Remote {
            held,
            gate,
            lookups: Mutex::new(0),
        };
        (Arc::new(store), open)
    }

    #[tokio::test]
    async fn a_request_waits_for_the_lookup_under_way() {
        let (store, open) = remote(vec![digest(2)]);
        let seen = Arc::new(SeenMissing::new(Duration::from_secs(30)));
        let dyn_store: Arc<dyn BlobStore> = store.clone();
        seen.look_up(&dyn_store, vec![digest(1), digest(2)]);
        let waiting = {
            let seen = seen.clone();
            tokio::spawn(async move { seen.is_missing(&digest(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        open.send_replace(true);
        assert!(waiting.await.unwrap());
        assert!(!seen.is_missing(&digest(2)).await, "held");
        assert!(!seen.is_missing(&digest(3)).await, "never looked up");
        // Looked up again while the answer is fresh: no second lookup.
        seen.look_up(&dyn_store, vec![digest(1)]);
        assert_eq!(*store.lookups.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_store_here_overrides_a_lookup_and_answers_expire() {
        let (store, open) = remote(Vec::new());
        let dyn_store: Arc<dyn BlobStore> = store;
        let seen = Arc::new(SeenMissing::new(Duration::from_millis(300)));
        seen.look_up(&dyn_store, vec![digest(1), digest(2)]);
        // Stored while the lookup (which will answer "missing") runs.
        seen.stored(&digest(1));
        open.send_replace(true);
        assert!(!seen.is_missing(&digest(1)).await);
        assert!(seen.is_missing(&digest(2)).await);
        seen.stored(&digest(2));
        assert!(!seen.is_missing(&digest(2)).await);

        seen.look_up(&dyn_store, vec![digest(3)]);
        assert!(seen.is_missing(&digest(3)).await);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!seen.is_missing(&digest(3)).await, "past the trust");
        // Entries past the trust go when new ones come.
        seen.look_up(&dyn_store, vec![digest(4)]);
        assert!(seen.is_missing(&digest(4)).await);
        let table = seen.seen();
        assert_eq!(table.by_digest.keys().collect::<Vec<_>>(), [&digest(4)]);
        assert_eq!(table.made.len(), 1);
    }

    #[tokio::test]
    async fn a_local_store_is_not_looked_up_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> =
            Arc::new(crate::storage::FsBlobStore::open(dir.path()).await.unwrap());
        let seen = Arc::new(SeenMissing::new(Duration::from_secs(30)));
        seen.look_up(&store, vec![digest(1)]);
        assert!(!seen.is_missing(&digest(1)).await);
    }
}
