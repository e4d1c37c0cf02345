//! The cache within its budget when its blobs live in a store that
//! replicas share (a bucket): `[cache] max_size` and `max_age` (or a
//! registry's own, `retention`) over every blob under the prefix, whoever
//! stored it. (The fs store keeps its own:
//! `storage::BudgetedFsStore`.)
//!
//! - Uses are shared: each replica notes the blobs it serves or stores and
//!   writes them to the metadata store in batches (`uses`).
//! - One pass at a time across the cluster, under a lease, lists the store
//!   and removes the least recently used blobs (`evict`); every removal is
//!   fenced by an atomic claim on the blob's fetch lease.
//! - Storing a blob counts it, and wakes eviction past the budget
//!   (`store`).
//! - The metadata of what went is forgotten (`forget`).
//! - A registry's own `max_age` decides for what was served under it, by
//!   deadlines recorded beside the uses (`retention`; the fs store asks
//!   them through `StoredDeadlines`).
//! - One replica hashes the bucket's blobs again now and then (`scrub`).

mod evict;
mod forget;
mod retention;
mod scrub;
mod store;
mod uses;

use std::sync::Arc;

pub use evict::{EvictError, Evictor, Inventory, Report, Seen, SharedBudget, Victim};
pub use forget::{Cutoff, Forgetter, Forgotten, forget};
pub use retention::{NEVER, Retention, StoredDeadlines};
pub use scrub::{BucketScrub, Scrubbed};
pub use store::BudgetedSharedStore;
pub use uses::{FLUSH_EVERY, UseLog};

use crate::meta::MetaStore;
use crate::storage::{BlobStore, Keep};

/// `store` within `budget`, with eviction running in the background; uses
/// noted in `uses`, and `forgetter` told how far eviction reached.
pub fn budgeted(
    store: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    keep: Option<Arc<dyn Keep>>,
    budget: SharedBudget,
    uses: Arc<UseLog>,
    forgetter: Option<Arc<Forgetter>>,
) -> Arc<dyn BlobStore> {
    let evictor = Arc::new(Evictor::new(
        store.clone(),
        meta.clone(),
        keep,
        budget,
        uses.clone(),
        forgetter,
    ));
    evictor.clone().spawn();
    Arc::new(BudgetedSharedStore::new(store, meta, uses, evictor))
}

#[cfg(test)]
mod tests;
