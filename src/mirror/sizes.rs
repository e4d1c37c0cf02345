//! Blob sizes named by the descriptors of manifests this replica has read,
//! per repository. A fetch knows from them how long the blob must be even
//! when upstream streams it without a `Content-Length`: it announces that
//! length to its clients and cuts off a body that runs past it.
//!
//! Kept per repository, not per digest alone: a manifest in one repository
//! naming a wrong size for a blob they share fails only the fetches started
//! for that repository (a client of another that joined one gets a fetch
//! of its own).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::reference::Digest;

/// Entries kept before the table starts afresh (a lost hint only costs a
/// fetch its early length).
const MAX_ENTRIES: usize = 200_000;

#[derive(Default)]
pub struct KnownSizes {
    sizes: Mutex<HashMap<String, u64>>,
}

fn key(repo: &str, digest: &Digest) -> String {
    [repo, "@", digest.algorithm().as_str(), ":", digest.hex()].concat()
}

impl KnownSizes {
    fn table(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.sizes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what one manifest of `repo` says. Two manifests that name
    /// different sizes for one blob cannot both be right: the blob's size
    /// is then left unknown.
    pub fn learn(&self, repo: &str, sizes: &[(Digest, u64)]) {
        if sizes.is_empty() {
            return;
        }
        let mut table = self.table();
        if table.len() + sizes.len() > MAX_ENTRIES {
            table.clear();
        }
        for (digest, size) in sizes {
            let k = key(repo, digest);
            match table.get(&k) {
                Some(&u64::MAX) => {}
                Some(known) if known != size => {
                    tracing::warn!(repository = repo, %digest, known, named = size, "manifests disagree on a blob's size");
                    table.insert(k, u64::MAX);
                }
                _ => {
                    table.insert(k, *size);
                }
            }
        }
    }

    /// The size `repo`'s manifests give `digest`, if they agree on one.
    pub fn get(&self, repo: &str, digest: &Digest) -> Option<u64> {
        self.table()
            .get(&key(repo, digest))
            .copied()
            .filter(|&s| s != u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_per_repository_and_conflicts_forget_them() {
        let sizes = KnownSizes::default();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        sizes.learn("r/one", &[(a.clone(), 10), (b.clone(), 20)]);
        assert_eq!(sizes.get("r/one", &a), Some(10));
        assert_eq!(sizes.get("r/two", &a), None);
        sizes.learn("r/one", &[(a.clone(), 10)]);
        assert_eq!(sizes.get("r/one", &a), Some(10));
        sizes.learn("r/one", &[(a.clone(), 11)]);
        assert_eq!(sizes.get("r/one", &a), None);
        // Once in conflict, agreeing again does not bring it back.
        sizes.learn("r/one", &[(a.clone(), 10)]);
        assert_eq!(sizes.get("r/one", &a), None);
        assert_eq!(sizes.get("r/one", &b), Some(20));
    }
}
