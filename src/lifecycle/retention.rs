//! How long content not served is kept: `[cache] max_age`, or a registry's
//! own `[[upstreams]] max_age`.
//!
//! One blob may be served under several registries (the same layer on
//! `docker.io` and on `ghcr.io`), each with its own rule. With any
//! registry's own rule configured, every serve records a deadline: the
//! time of the use plus that registry's age (`NEVER` for none). A digest's
//! deadline is the latest of them, so content expires only once every rule
//! it was served under has passed. Content served before deadlines were
//! recorded (or whose deadline was lost with Redis) falls back to its last
//! use against `[cache] max_age`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::uses::now_ms;
use crate::config::{Config, age_text};
use crate::meta::{MetaStore, UseKind};
use crate::reference::Digest;
use crate::storage::Expiry;

/// The deadline of content that never expires by age: the last
/// millisecond of year 9999 (exact as a Redis score, and below any bound a
/// scan of deadlines uses).
pub const NEVER: u64 = 253_402_300_799_999;

#[derive(Clone, Debug, Default)]
pub struct Retention {
    default: Option<Duration>,
    /// Registries with a rule of their own (`None`: kept whatever the age).
    own: HashMap<String, Option<Duration>>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Retention {
    pub fn new(default: Option<Duration>, own: HashMap<String, Option<Duration>>) -> Self {
        Self { default, own }
    }

    pub fn of(config: &Config) -> Self {
        Self::new(
            config.cache.max_age,
            config
                .upstreams
                .iter()
                .filter_map(|u| Some((u.registry.clone(), u.max_age?.duration())))
                // A rule the same as the default needs no deadlines.
                .filter(|(_, age)| *age != config.cache.max_age)
                .collect(),
        )
    }

    /// Whether anything expires by age.
    pub fn is_set(&self) -> bool {
        self.default.is_some() || self.own.values().any(Option::is_some)
    }

    /// Whether serves record deadlines: some registry has its own rule.
    pub fn per_registry(&self) -> bool {
        !self.own.is_empty()
    }

    /// `[cache] max_age`.
    pub fn default_age(&self) -> Option<Duration> {
        self.default
    }

    /// The shortest age anything is kept for: content used more recently
    /// than this ago has not expired under any rule.
    pub fn shortest(&self) -> Option<Duration> {
        self.default
            .into_iter()
            .chain(self.own.values().flatten().copied())
            .min()
    }

    /// The age past which content has expired under every rule, when every
    /// rule has one: what can be removed without knowing where content was
    /// served from.
    pub fn longest(&self) -> Option<Duration> {
        let default = self.default?;
        self.own
            .values()
            .try_fold(default, |longest, age| Some(longest.max((*age)?)))
    }

    /// The deadline of a use at `used_ms` of content from `registry`.
    pub fn deadline(&self, registry: &str, used_ms: u64) -> u64 {
        let age = match self.own.get(registry) {
            Some(own) => *own,
            None => self.default,
        };
        age.map_or(NEVER, |age| used_ms.saturating_add(ms(age)))
    }

    /// Whether content last used at `used_ms`, with `deadline` recorded or
    /// not, has expired at `now_ms`.
    pub fn expired(&self, deadline: Option<u64>, used_ms: u64, now_ms: u64) -> bool {
        match deadline {
            Some(deadline) => deadline < now_ms,
            None => self
                .default
                .is_some_and(|age| used_ms.saturating_add(ms(age)) < now_ms),
        }
    }

    /// Uses older than this (Unix ms) may have expired; newer ones have not.
    pub fn horizon(&self, now_ms: u64) -> Option<u64> {
        self.shortest().map(|age| now_ms.saturating_sub(ms(age)))
    }
}

/// `max_age 7d (gcr.io 90d, registry.k8s.io off)`, for people.
impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = |a: Option<Duration>| a.map_or_else(|| "off".to_owned(), age_text);
        if !self.is_set() {
            return f.write_str("no max_age");
        }
        write!(f, "max_age {}", age(self.default))?;
        let mut own: Vec<_> = self.own.iter().collect();
        own.sort();
        let own: Vec<String> = own
            .iter()
            .map(|(r, a)| format!("{r} {}", age(**a)))
            .collect();
        if !own.is_empty() {
            write!(f, " ({})", own.join(", "))?;
        }
        Ok(())
    }
}

/// The fs store's blobs judged by the deadlines their serves recorded.
pub struct StoredDeadlines {
    meta: Arc<dyn MetaStore>,
    retention: Retention,
}

impl StoredDeadlines {
    pub fn new(meta: Arc<dyn MetaStore>, retention: Retention) -> Self {
        Self { meta, retention }
    }
}

#[async_trait]
impl Expiry for StoredDeadlines {
    async fn expired(&self, blobs: &[(Digest, SystemTime)]) -> Vec<bool> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        let deadlines = match self.meta.last_uses(UseKind::BlobDeadlines, &digests).await {
            Ok(deadlines) => deadlines,
            Err(e) => {
                // Not knowing, nothing is removed.
                tracing::debug!(error = %e, "cannot read the deadlines of blobs");
                return vec![false; blobs.len()];
            }
        };
        let now = now_ms();
        blobs
            .iter()
            .zip(deadlines)
            .map(|((_, used), deadline)| {
                let used = used.duration_since(SystemTime::UNIX_EPOCH).map_or(0, ms);
                self.retention.expired(deadline, used, now)
            })
            .collect()
    }

    async fn removed(&self, digests: &[Digest]) {
        if let Err(e) = self.meta.forget_uses(UseKind::BlobDeadlines, digests).await {
            tracing::debug!(error = %e, "cannot forget the deadlines of removed blobs");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: u64 = 86_400_000;

    fn days(n: u64) -> Duration {
        Duration::from_millis(n * DAY)
    }

    fn rules() -> Retention {
        Retention::new(
            Some(days(7)),
            HashMap::from([
                ("gcr.io".to_owned(), Some(days(90))),
                ("registry.k8s.io".to_owned(), None),
                ("quay.io".to_owned(), Some(days(1))),
            ]),
        )
    }

    #[test]
    fn each_registry_keeps_content_for_its_own_age() {
        let r = rules();
        let now = 1000 * DAY;
        assert_eq!(r.deadline("docker.io", now), now + 7 * DAY);
        assert_eq!(r.deadline("gcr.io", now), now + 90 * DAY);
        assert_eq!(r.deadline("quay.io", now), now + DAY);
        assert_eq!(r.deadline("registry.k8s.io", now), NEVER);
        assert_eq!(r.shortest(), Some(days(1)));
        // registry.k8s.io keeps content forever: no age is safe for all.
        assert_eq!(r.longest(), None);
        assert!(r.per_registry());
        assert_eq!(r.horizon(now), Some(now - DAY));
        assert_eq!(
            r.to_string(),
            "max_age 7d (gcr.io 90d, quay.io 1d, registry.k8s.io off)"
        );
    }

    #[test]
    fn a_deadline_decides_and_without_one_the_default_does() {
        let r = rules();
        let now = 1000 * DAY;
        // Served under gcr.io 10 days ago: kept although past the default.
        assert!(!r.expired(Some(now - 10 * DAY + 90 * DAY), now - 10 * DAY, now));
        assert!(r.expired(Some(now - DAY), now - 91 * DAY, now));
        assert!(!r.expired(Some(NEVER), 0, now));
        // No deadline recorded: `[cache] max_age` against the last use.
        assert!(r.expired(None, now - 8 * DAY, now));
        assert!(!r.expired(None, now - 6 * DAY, now));
        let off = Retention::new(None, HashMap::from([("gcr.io".to_owned(), Some(days(3)))]));
        assert!(!off.expired(None, 0, now));
        assert!(off.is_set());
        assert_eq!(off.deadline("docker.io", now), NEVER);
    }

    /// The fs store with its metadata (both real, in a temporary
    /// directory): blobs not served for the shortest age go only when their
    /// deadlines say so, and their deadlines go with them.
    #[tokio::test]
    async fn the_fs_store_removes_by_each_registry_age() {
        use crate::config::MinFree;
        use crate::meta::EmbeddedMeta;
        use crate::storage::{BlobStore, Budget, BudgetedFsStore, FsBlobStore};
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetaStore> =
            Arc::new(EmbeddedMeta::open(&dir.path().join("meta")).unwrap());
        let r = rules();
        let budget = Budget {
            max_size: None,
            min_free: MinFree::Bytes(0),
            max_age: r.shortest(),
            scrub: None,
        };
        let root = dir.path().join("store");
        let store = BudgetedFsStore::open(&root, budget, None).await.unwrap();
        store.judge_age_by(Arc::new(StoredDeadlines::new(meta.clone(), r.clone())));
        let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
        let used = ms(two_days_ago.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        let mut blobs = Vec::new();
        // docker.io (7 days), gcr.io (90), quay.io (1), and no deadline.
        for (i, registry) in ["docker.io", "gcr.io", "quay.io", ""].iter().enumerate() {
            let bytes = vec![i as u8; 1000];
            let digest = Digest::sha256_of(&bytes);
            let spool = dir.path().join(format!("{i}.part"));
            std::fs::write(&spool, &bytes).unwrap();
            store.store(&digest, &spool, 1000).await.unwrap();
            if !registry.is_empty() {
                meta.record_uses(
                    UseKind::BlobDeadlines,
                    &[(digest.clone(), r.deadline(registry, used))],
                )
                .await
                .unwrap();
            }
            let file = std::fs::File::open(FsBlobStore::at(&root).path_of(&digest)).unwrap();
            file.set_modified(two_days_ago).unwrap();
            blobs.push(digest);
        }
        assert_eq!(store.evict().await, 1000);
        let mut stored = Vec::new();
        for d in &blobs {
            stored.push(store.stat(d).await.unwrap().is_some());
        }
        // Only quay.io's is past its age: without a deadline, the default
        // (7 days) keeps the last.
        assert_eq!(stored, vec![true, true, false, true]);
        let deadlines = meta
            .last_uses(UseKind::BlobDeadlines, &blobs)
            .await
            .unwrap();
        assert_eq!(
            deadlines.iter().map(Option::is_some).collect::<Vec<_>>(),
            vec![true, true, false, false]
        );
    }

    #[test]
    fn the_longest_age_covers_every_rule() {
        let r = Retention::new(
            Some(days(7)),
            HashMap::from([("gcr.io".to_owned(), Some(days(90)))]),
        );
        assert_eq!(r.longest(), Some(days(90)));
        assert_eq!(
            Retention::new(Some(days(7)), HashMap::new()).longest(),
            Some(days(7))
        );
        assert!(!Retention::default().is_set());
        assert_eq!(Retention::default().horizon(5), None);
    }
}
