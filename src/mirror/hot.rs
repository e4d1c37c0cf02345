//! An in-process copy of the metadata a warm pull reads: tag records,
//! manifests by digest and repository links. Without it every manifest
//! request costs two metadata-store reads (blocking-pool hops for the
//! embedded store, round trips for Redis).
//!
//! It never changes what a client is told: manifests are immutable under
//! their digest, a link says upstream confirmed a digest in a repository
//! (the metadata store withdraws links only when it forgets content no
//! longer cached, which makes them misses, not wrong), and a tag record is
//! used only while it is fresh under the tag TTL, exactly as the stored
//! copy would be.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::meta::{StoredManifest, TagRecord};
use crate::reference::Digest;

/// Manifest bytes kept; the oldest entries go first past it.
const MANIFEST_BYTES: usize = 8 << 20;
/// Tag records and links kept before the table starts afresh.
const MAX_KEYS: usize = 100_000;

#[derive(Default)]
pub struct HotCache {
    tags: Mutex<HashMap<String, TagRecord>>,
    links: Mutex<HashSet<String>>,
    manifests: Mutex<Manifests>,
}

#[derive(Default)]
struct Manifests {
    by_digest: HashMap<Digest, StoredManifest>,
    order: VecDeque<Digest>,
    bytes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// Keys are built on every warm manifest request: concatenated, not
// formatted.
fn tag_key(repo: &str, tag: &str) -> String {
    [repo, ":", tag].concat()
}

fn link_key(repo: &str, digest: &Digest) -> String {
    [repo, "@", digest.algorithm().as_str(), ":", digest.hex()].concat()
}

impl HotCache {
    pub fn tag(&self, repo: &str, tag: &str) -> Option<TagRecord> {
        lock(&self.tags).get(&tag_key(repo, tag)).cloned()
    }

    pub fn put_tag(&self, repo: &str, tag: &str, record: TagRecord) {
        let mut tags = lock(&self.tags);
        if tags.len() >= MAX_KEYS {
            tags.clear();
        }
        tags.insert(tag_key(repo, tag), record);
    }

    /// Drops what a purge removed from the metadata store.
    pub fn forget(&self, repo: &str, tags: &[String], digests: &[Digest]) {
        let mut t = lock(&self.tags);
        for tag in tags {
            t.remove(&tag_key(repo, tag));
        }
        drop(t);
        let mut links = lock(&self.links);
        for d in digests {
            links.remove(&link_key(repo, d));
        }
    }

    pub fn is_linked(&self, repo: &str, digest: &Digest) -> bool {
        lock(&self.links).contains(&link_key(repo, digest))
    }

    pub fn put_link(&self, repo: &str, digest: &Digest) {
        let mut links = lock(&self.links);
        if links.len() >= MAX_KEYS {
            links.clear();
        }
        links.insert(link_key(repo, digest));
    }

    pub fn manifest(&self, digest: &Digest) -> Option<StoredManifest> {
        lock(&self.manifests).by_digest.get(digest).cloned()
    }

    pub fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) {
        let size = manifest.bytes.len() + manifest.media_type.len();
        if size > MANIFEST_BYTES / 16 {
            return;
        }
        let mut m = lock(&self.manifests);
        if m.by_digest.contains_key(digest) {
            return;
        }
        while m.bytes + size > MANIFEST_BYTES {
            let Some(old) = m.order.pop_front() else {
                break;
            };
            if let Some(gone) = m.by_digest.remove(&old) {
                m.bytes -= gone.bytes.len() + gone.media_type.len();
            }
        }
        m.bytes += size;
        m.order.push_back(digest.clone());
        m.by_digest.insert(digest.clone(), manifest.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", hex::encode([n; 32]))).unwrap()
    }

    #[test]
    fn manifests_are_bounded_by_bytes_oldest_first() {
        let hot = HotCache::default();
        let big = StoredManifest {
            media_type: "m".into(),
            bytes: Bytes::from(vec![0u8; MANIFEST_BYTES / 20]),
        };
        for n in 0..25 {
            hot.put_manifest(&digest(n), &big);
        }
        assert!(hot.manifest(&digest(0)).is_none(), "oldest evicted");
        assert!(hot.manifest(&digest(24)).is_some());
        assert!(lock(&hot.manifests).bytes <= MANIFEST_BYTES);
    }

    #[test]
    fn links_and_tags_are_per_repository() {
        let hot = HotCache::default();
        hot.put_link("docker.io/a", &digest(1));
        assert!(hot.is_linked("docker.io/a", &digest(1)));
        assert!(!hot.is_linked("docker.io/b", &digest(1)));
        let rec = TagRecord {
            digest: digest(1).to_string(),
            checked_at_ms: 5,
        };
        hot.put_tag("docker.io/a", "latest", rec.clone());
        assert_eq!(hot.tag("docker.io/a", "latest"), Some(rec));
        assert_eq!(hot.tag("docker.io/b", "latest"), None);
    }
}
