//! Eviction over a real bucket (the S3 server `tests/run.sh` starts) and a
//! real Redis: what a pass removes, and every way a decision can go stale
//! before it is acted on.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::uses::now_ms;
use super::{EvictError, Evictor, Retention, SharedBudget, UseLog};
use crate::meta::{MetaStore, RedisMeta, UseKind, blob_lease};
use crate::reference::Digest;
use crate::storage::{BlobStore, Keep};

const KIB: u64 = 1024;

struct Bench {
    store: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    uses: Arc<UseLog>,
    dir: tempfile::TempDir,
}

async fn bench() -> Option<Bench> {
    let url = crate::testenv::backend("PIER_TEST_REDIS_URL")?;
    let ns = format!("evict-{:x}", rand::random::<u64>());
    let store = crate::storage::s3::tests::test_store(&ns).await?;
    let meta: Arc<dyn MetaStore> =
        Arc::new(RedisMeta::new(&url, &format!("{ns}:"), 4, Duration::from_secs(2)).unwrap());
    let uses = UseLog::start(
        meta.clone(),
        Duration::from_millis(100),
        Retention::default(),
    );
    Some(Bench {
        store: Arc::new(store),
        meta,
        uses,
        dir: tempfile::tempdir().unwrap(),
    })
}

impl Bench {
    /// Stores `n` KiB of blob `seed`.
    async fn put(&self, seed: u32, n: u64) -> Digest {
        let bytes: Vec<u8> = (0..n * KIB)
            .map(|i| (i as u32).wrapping_mul(seed | 1) as u8 ^ seed as u8)
            .collect();
        let digest = Digest::sha256_of(&bytes);
        let spool = self.dir.path().join(format!("{seed}.part"));
        std::fs::write(&spool, &bytes).unwrap();
        self.store.store(&digest, &spool, n * KIB).await.unwrap();
        digest
    }

    /// Records a use of a blob `ago` before now.
    async fn used(&self, digest: &Digest, ago: Duration) {
        self.used_as(UseKind::Blobs, digest, ago).await;
    }

    async fn used_as(&self, kind: UseKind, digest: &Digest, ago: Duration) {
        let at = now_ms() - ago.as_millis() as u64;
        self.meta
            .record_uses(kind, &[(digest.clone(), at)])
            .await
            .unwrap();
    }

    fn evictor(&self, budget: SharedBudget, keep: Option<Arc<dyn Keep>>) -> Evictor {
        Evictor::new(
            self.store.clone(),
            self.meta.clone(),
            keep,
            budget,
            self.uses.clone(),
            None,
        )
    }

    async fn stored(&self, digest: &Digest) -> bool {
        self.store.stat(digest).await.unwrap().is_some()
    }
}

fn size_budget(kib: u64) -> SharedBudget {
    SharedBudget {
        max_size: Some(kib * KIB),
        retention: Retention::default(),
    }
}

/// A pass stopped between choosing its victims and claiming them, until
/// the test lets it go on: the window in which a decision goes stale.
struct PausedPass {
    /// The pass's value in the leases it takes.
    holder: String,
    go: Arc<Notify>,
    pass: tokio::task::JoinHandle<Result<super::Report, EvictError>>,
}

impl PausedPass {
    async fn start(b: &Bench, budget: SharedBudget) -> PausedPass {
        let mut evictor = b.evictor(budget, None);
        let (chosen, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (c, g) = (chosen.clone(), go.clone());
        evictor.hook = Some(Arc::new(move || {
            let (c, g) = (c.clone(), g.clone());
            Box::pin(async move {
                c.notify_one();
                g.notified().await;
            })
        }));
        let holder = evictor.holder.clone();
        let pass = tokio::spawn(async move { evictor.pass(false).await });
        chosen.notified().await;
        PausedPass { holder, go, pass }
    }

    async fn finish(self) -> super::Report {
        self.go.notify_one();
        self.pass.await.unwrap().unwrap()
    }
}

#[tokio::test]
async fn a_pass_removes_the_least_recently_used_down_to_ninety_percent() {
    let Some(b) = bench().await else { return };
    let mut blobs = Vec::new();
    for i in 0..10 {
        let d = b.put(i, 100).await;
        // Blob 0 is the least recently used, blob 9 the most...
        b.used(&d, Duration::from_secs(3600 - u64::from(i) * 60))
            .await;
        blobs.push(d);
    }
    // ...but blob 1 was pulled a moment ago, from another replica.
    b.used(&blobs[1], Duration::from_secs(5)).await;
    let evictor = b.evictor(size_budget(500), None);

    let plan = evictor.pass(true).await.unwrap();
    assert_eq!((plan.blobs, plan.bytes), (10, 1000 * KIB));
    assert_eq!((plan.removed, plan.removed_bytes), (6, 600 * KIB));
    for d in &blobs {
        assert!(b.stored(d).await, "a dry run removes nothing");
    }

    let done = evictor.pass(false).await.unwrap();
    assert_eq!((done.removed, done.removed_bytes), (6, 600 * KIB));
    let kept: Vec<usize> = {
        let mut kept = Vec::new();
        for (i, d) in blobs.iter().enumerate() {
            if b.stored(d).await {
                kept.push(i);
            }
        }
        kept
    };
    assert_eq!(
        kept,
        vec![1, 7, 8, 9],
        "down to 90 % of 500 KiB, oldest first"
    );
    // What went is forgotten; the shared count is the bucket's.
    assert_eq!(
        b.meta.last_uses(UseKind::Blobs, &blobs[..1]).await.unwrap(),
        vec![None]
    );
    assert_eq!(b.meta.add_usage(0, 0).await.unwrap(), (400 * 1024, 4));
    let again = evictor.pass(false).await.unwrap();
    assert_eq!((again.blobs, again.removed), (4, 0));
}

#[tokio::test]
async fn blobs_no_metadata_knows_count_and_go_oldest_written_first() {
    let Some(b) = bench().await else { return };
    // Stored with no use ever recorded (Redis was flushed since): their
    // write times order them. S3 dates objects to the second.
    let old = b.put(1, 300).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = b.put(2, 300).await;
    let evictor = b.evictor(size_budget(500), None);
    let done = evictor.pass(false).await.unwrap();
    assert_eq!((done.blobs, done.bytes), (2, 600 * KIB));
    assert_eq!(done.removed, 1);
    assert!(!b.stored(&old).await && b.stored(&new).await);
}

#[tokio::test]
async fn max_age_removes_what_was_not_used_for_that_long() {
    let Some(b) = bench().await else { return };
    let stale = b.put(1, 10).await;
    let fresh = b.put(2, 10).await;
    b.used(&stale, Duration::from_secs(2 * 86_400)).await;
    b.used(&fresh, Duration::from_secs(60)).await;
    let budget = SharedBudget {
        max_size: None,
        retention: Retention::new(Some(Duration::from_secs(86_400)), HashMap::new()),
    };
    let done = b.evictor(budget, None).pass(false).await.unwrap();
    assert_eq!(done.removed, 1);
    assert!(!b.stored(&stale).await && b.stored(&fresh).await);
}

struct KeepOne(Digest);

#[async_trait::async_trait]
impl Keep for KeepOne {
    async fn keep(&self, digest: &Digest) -> bool {
        *digest == self.0
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// Whether each digest has a `kind` recorded.
async fn recorded(meta: &dyn MetaStore, kind: UseKind, digests: &[Digest]) -> Vec<bool> {
    meta.last_uses(kind, digests)
        .await
        .unwrap()
        .iter()
        .map(Option::is_some)
        .collect()
}

/// gcr.io keeps content 90 days, registry.k8s.io whatever its age, the
/// rest a day.
fn per_registry() -> Retention {
    Retention::new(
        Some(DAY),
        HashMap::from([
            ("gcr.io".to_owned(), Some(90 * DAY)),
            ("registry.k8s.io".to_owned(), None),
        ]),
    )
}

impl Bench {
    /// Records a serve of `digest` for `registry`, `ago` before now: its
    /// use and its deadline, as a replica's log writes them.
    async fn served_for(&self, kind: UseKind, digest: &Digest, registry: &str, ago: Duration) {
        let at = now_ms() - ago.as_millis() as u64;
        let deadline = per_registry().deadline(registry, at);
        let deadlines = match kind {
            UseKind::Manifests => UseKind::ManifestDeadlines,
            _ => UseKind::BlobDeadlines,
        };
        for (kind, value) in [(kind, at), (deadlines, deadline)] {
            self.meta
                .record_uses(kind, &[(digest.clone(), value)])
                .await
                .unwrap();
        }
    }
}

/// Each registry's age decides for what was served under it; a blob
/// served under two registries stays until both have passed, and one
/// served before deadlines were kept is judged by `[cache] max_age`.
#[tokio::test]
async fn each_registry_keeps_its_blobs_for_its_own_age() {
    let Some(b) = bench().await else { return };
    let blobs: Vec<Digest> = futures::future::join_all((1..=6).map(|i| b.put(i, 4))).await;
    let [hub, gcr, both, k8s, old_gcr, legacy] = <[Digest; 6]>::try_from(blobs).unwrap();
    let use_ = UseKind::Blobs;
    b.served_for(use_, &hub, "docker.io", 2 * DAY).await;
    b.served_for(use_, &gcr, "gcr.io", 2 * DAY).await;
    b.served_for(use_, &both, "gcr.io", 30 * DAY).await;
    b.served_for(use_, &both, "docker.io", 2 * DAY).await;
    b.served_for(use_, &k8s, "registry.k8s.io", 400 * DAY).await;
    b.served_for(use_, &old_gcr, "gcr.io", 91 * DAY).await;
    b.used(&legacy, 2 * DAY).await;
    let budget = SharedBudget {
        max_size: None,
        retention: per_registry(),
    };
    let evictor = b.evictor(budget, None);
    let mut report = super::Report::default();
    let inventory = evictor.inventory().await.unwrap();
    let chosen = evictor.choose(&inventory, &mut report).await;
    assert!(chosen.iter().all(|v| v.reason == "age"));
    assert_eq!(chosen.len(), 3);
    let done = evictor.pass(false).await.unwrap();
    assert_eq!(done.removed, 3);
    // Removed by age: how far size eviction reached is not moved.
    assert_eq!(done.newest_ms, None);
    for (digest, kept) in [
        (&hub, false),
        (&gcr, true),
        (&both, true),
        (&k8s, true),
        (&old_gcr, false),
        (&legacy, false),
    ] {
        assert_eq!(b.stored(digest).await, kept, "{digest}");
    }
    // The removed blobs' deadlines went with them.
    assert_eq!(
        recorded(b.meta.as_ref(), UseKind::BlobDeadlines, &[hub, gcr]).await,
        vec![false, true]
    );
}

#[tokio::test]
async fn pinned_blobs_survive_any_budget() {
    let Some(b) = bench().await else { return };
    let pinned = b.put(1, 200).await;
    let other = b.put(2, 200).await;
    b.used(&pinned, Duration::from_secs(7200)).await;
    b.used(&other, Duration::from_secs(3600)).await;
    let keep: Arc<dyn Keep> = Arc::new(KeepOne(pinned.clone()));
    let done = b
        .evictor(size_budget(100), Some(keep))
        .pass(false)
        .await
        .unwrap();
    assert_eq!((done.removed, done.pinned), (1, 1));
    assert!(b.stored(&pinned).await && !b.stored(&other).await);
}

/// Rule 3: a blob fetched and stored again by another replica after the
/// pass chose it stays, whether that replica still holds the blob's lease
/// (the claim finds it taken) or let it lapse (its write is newer than the
/// listing) — and a blob chosen and not wanted again goes.
#[tokio::test]
async fn a_blob_stored_again_after_eviction_chose_it_stays() {
    let Some(b) = bench().await else { return };
    let held = b.put(1, 100).await;
    let lapsed = b.put(2, 100).await;
    let idle = b.put(3, 100).await;
    for d in [&held, &lapsed, &idle] {
        b.used(d, Duration::from_secs(3600)).await;
    }
    // S3 dates objects to the second: the writes below must date later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let paused = PausedPass::start(&b, size_budget(10)).await;

    // Another replica fetches two of them again meanwhile, as a fetch
    // does: under the blob's lease, marked stored once done; and notes no
    // use (its batch has not gone out yet).
    let fetcher = "0123456789abcdef http://10.0.0.2:5000";
    for (seed, digest) in [(1, &held), (2, &lapsed)] {
        let lease = blob_lease(digest);
        assert_eq!(
            b.meta
                .acquire_lease(&lease, fetcher, Duration::from_secs(30))
                .await
                .unwrap(),
            None
        );
        b.put(seed, 100).await;
        let ttl = if seed == 1 {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(50)
        };
        let done = format!("{fetcher} stored");
        assert!(
            b.meta
                .replace_lease(&lease, fetcher, &done, ttl)
                .await
                .unwrap()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let report = paused.finish().await;
    assert_eq!((report.removed, report.spared), (1, 2), "{report:?}");
    assert!(b.stored(&held).await, "stored again under its lease");
    assert!(b.stored(&lapsed).await, "stored again, lease lapsed");
    assert!(!b.stored(&idle).await, "not wanted again: evicted");
}

/// A use recorded after the decision, from any replica, keeps the blob.
#[tokio::test]
async fn a_blob_served_after_eviction_chose_it_stays() {
    let Some(b) = bench().await else { return };
    let served = b.put(1, 100).await;
    b.used(&served, Duration::from_secs(3600)).await;
    let paused = PausedPass::start(&b, size_budget(10)).await;
    // Served by this replica: noted, written out within the log's delay,
    // which the pass waits for after claiming.
    b.uses.note(&served);
    let report = paused.finish().await;
    assert_eq!((report.removed, report.spared), (0, 1));
    assert!(b.stored(&served).await);
}

/// Rule 4: one pass at a time, and a pass that lost the eviction lease
/// while paused removes nothing on what it decided.
#[tokio::test]
async fn a_pass_that_lost_its_lease_removes_nothing() {
    let Some(b) = bench().await else { return };
    let blob = b.put(1, 100).await;
    b.used(&blob, Duration::from_secs(3600)).await;
    let first = PausedPass::start(&b, size_budget(10)).await;
    let second = b.evictor(size_budget(10), None);
    assert!(matches!(second.pass(false).await, Err(EvictError::Busy)));

    // The first replica stalls past its lease (as a paused process does);
    // another takes the lease over.
    b.meta
        .release_lease("lifecycle:evict", &first.holder)
        .await
        .unwrap();
    assert_eq!(
        b.meta
            .acquire_lease("lifecycle:evict", "another", Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    let report = first.finish().await;
    assert_eq!(report.removed, 0);
    assert!(b.stored(&blob).await);
}

/// A fetch that finds the blob claimed waits, and the claim goes with the
/// removal: the next fetch takes the lease.
#[tokio::test]
async fn removal_releases_the_blob_lease() {
    let Some(b) = bench().await else { return };
    let blob = b.put(1, 100).await;
    b.used(&blob, Duration::from_secs(3600)).await;
    let done = b.evictor(size_budget(10), None).pass(false).await.unwrap();
    assert_eq!(done.removed, 1);
    assert_eq!(
        b.meta
            .acquire_lease(&blob_lease(&blob), "fetcher", Duration::from_secs(5))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn uses_noted_are_written_in_batches_and_never_move_back() {
    let Some(b) = bench().await else { return };
    let d = Digest::sha256_of(b"served");
    b.uses.note(&d);
    let noted = now_ms();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let at = b
        .meta
        .last_uses(UseKind::Blobs, std::slice::from_ref(&d))
        .await
        .unwrap()[0]
        .unwrap();
    assert!(at.abs_diff(noted) < 1000, "{at} vs {noted}");
    b.meta
        .record_uses(UseKind::Blobs, &[(d.clone(), at - 10_000)])
        .await
        .unwrap();
    assert_eq!(
        b.meta
            .last_uses(UseKind::Blobs, std::slice::from_ref(&d))
            .await
            .unwrap(),
        vec![Some(at)]
    );
}

/// Rule 2: a client reading a blob from the bucket when it is evicted gets
/// every byte (a GET in flight outlives the object's removal).
#[tokio::test]
async fn a_read_in_progress_outlives_eviction() {
    use futures::StreamExt;
    let Some(b) = bench().await else { return };
    let digest = b.put(7, 16 * 1024).await;
    b.used(&digest, Duration::from_secs(3600)).await;
    let body = b.store.get(&digest, None).await.unwrap().unwrap();
    let mut stream = body.stream;
    let mut hasher = crate::reference::Hasher::new(digest.algorithm());
    let first = stream.next().await.unwrap().unwrap();
    hasher.update(&first);
    let mut read = first.len();

    let done = b
        .evictor(size_budget(1024), None)
        .pass(false)
        .await
        .unwrap();
    assert_eq!(done.removed, 1);
    assert!(!b.stored(&digest).await);

    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        hasher.update(&chunk);
        read += chunk.len();
    }
    assert_eq!(read as u64, 16 * 1024 * KIB);
    assert_eq!(hasher.finish(), digest);
}

struct PinRepo(String, Digest);

#[async_trait::async_trait]
impl Keep for PinRepo {
    async fn keep(&self, digest: &Digest) -> bool {
        *digest == self.1
    }

    fn keeps_repository(&self, repo: &str) -> bool {
        repo == self.0
    }
}

/// Metadata goes with what it described: manifests not used since the
/// cutoff, the tags that named them, the links only they made, and a
/// repository left with nothing; what was used since stays, and so does a
/// pinned repository's.
#[tokio::test]
async fn forgetting_removes_the_metadata_of_what_went() {
    use crate::meta::{StoredManifest, TagRecord};
    let Some(b) = bench().await else { return };
    let meta = b.meta.as_ref();
    let blob = |s: &str| Digest::sha256_of(s.as_bytes());
    let put = |repo: &'static str, tag: &'static str, layer: Digest| async move {
        let bytes = bytes::Bytes::from(format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{layer}","size":1}},"layers":[]}}"#
        ));
        let digest = Digest::sha256_of(&bytes);
        let manifest = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        meta.put_manifest(repo, &digest, &manifest, std::slice::from_ref(&layer))
            .await
            .unwrap();
        let record = TagRecord {
            digest: digest.to_string(),
            checked_at_ms: 1,
        };
        meta.put_tag(repo, tag, &record).await.unwrap();
        digest
    };
    let (l1, l2, l3, l4) = (blob("l1"), blob("l2"), blob("l3"), blob("l4"));
    let m1 = put("docker.io/app/a", "old", l1.clone()).await;
    let m2 = put("docker.io/app/a", "new", l2.clone()).await;
    let m3 = put("docker.io/app/b", "only", l3.clone()).await;
    let m4 = put("docker.io/pinned/c", "v1", l4.clone()).await;
    let hour = Duration::from_secs(3600);
    for (d, ago) in [
        (&m1, 2 * hour),
        (&m2, hour / 60),
        (&m3, 2 * hour),
        (&m4, 2 * hour),
    ] {
        b.used_as(UseKind::Manifests, d, ago).await;
    }
    let keep = PinRepo("docker.io/pinned/c".into(), m4.clone());
    let retention = super::Retention::default();
    let cutoff = super::Cutoff {
        evicted_ms: now_ms() - hour.as_millis() as u64,
        retention: &retention,
        now_ms: now_ms(),
    };
    let done = super::forget(meta, Some(&keep), &cutoff).await.unwrap();
    assert_eq!(
        done,
        super::Forgotten {
            manifests: 2,
            tags: 2,
            links: 4,
            repositories: 1
        }
    );
    assert_eq!(
        meta.has_manifests(&[m1, m2.clone(), m3, m4.clone()])
            .await
            .unwrap(),
        vec![false, true, false, true]
    );
    assert_eq!(meta.tags("docker.io/app/a").await.unwrap(), vec!["new"]);
    let mut links = meta.links("docker.io/app/a").await.unwrap();
    links.sort();
    let mut want = vec![m2, l2];
    want.sort();
    assert_eq!(links, want);
    let repos = meta.repositories(None, 100).await.unwrap();
    assert_eq!(repos, vec!["docker.io/app/a", "docker.io/pinned/c"]);
    assert_eq!(meta.tags("docker.io/pinned/c").await.unwrap(), vec!["v1"]);
    assert!(meta.is_linked("docker.io/pinned/c", &l4).await.unwrap());
    // Nothing more to forget.
    let again = super::forget(meta, Some(&keep), &cutoff).await.unwrap();
    assert_eq!(again, super::Forgotten::default());
}

/// Manifests are forgotten by the age of the registry they were served
/// for, and with them their deadlines.
#[tokio::test]
async fn manifests_are_forgotten_by_their_registry_age() {
    use crate::meta::StoredManifest;
    let Some(b) = bench().await else { return };
    let meta = b.meta.as_ref();
    let put = |repo: &'static str| async move {
        let bytes = bytes::Bytes::from(format!(r#"{{"schemaVersion":2,"repo":"{repo}"}}"#));
        let digest = Digest::sha256_of(&bytes);
        let manifest = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        meta.put_manifest(repo, &digest, &manifest, &[])
            .await
            .unwrap();
        digest
    };
    let hub = put("docker.io/library/a").await;
    let gcr = put("gcr.io/p/b").await;
    let legacy = put("docker.io/library/c").await;
    b.served_for(UseKind::Manifests, &hub, "docker.io", 2 * DAY)
        .await;
    b.served_for(UseKind::Manifests, &gcr, "gcr.io", 2 * DAY)
        .await;
    b.used_as(UseKind::Manifests, &legacy, 2 * DAY).await;
    let retention = per_registry();
    let cutoff = super::Cutoff {
        evicted_ms: 0,
        retention: &retention,
        now_ms: now_ms(),
    };
    let done = super::forget(meta, None, &cutoff).await.unwrap();
    assert_eq!(done.manifests, 2);
    assert_eq!(
        meta.has_manifests(&[hub.clone(), gcr.clone(), legacy])
            .await
            .unwrap(),
        vec![false, true, false]
    );
    assert_eq!(
        recorded(meta, UseKind::ManifestDeadlines, &[hub, gcr.clone()]).await,
        vec![false, true]
    );
    // The one kept keeps its use, and stays on the next pass.
    assert!(
        meta.last_uses(UseKind::Manifests, std::slice::from_ref(&gcr))
            .await
            .unwrap()[0]
            .is_some()
    );
    let again = super::forget(meta, None, &cutoff).await.unwrap();
    assert_eq!(again.manifests, 0);
    assert_eq!(meta.has_manifests(&[gcr]).await.unwrap(), vec![true]);
}

/// The scrub reads the bucket back: an object whose bytes no longer match
/// its key is removed, the others stay.
#[tokio::test]
async fn the_bucket_scrub_removes_a_blob_with_a_flipped_byte() {
    let Some(b) = bench().await else { return };
    let good = b.put(1, 300).await;
    // What another writer (or rot) leaves: other bytes under the key.
    let mut bytes: Vec<u8> = (0..300 * KIB).map(|i| (i % 251) as u8).collect();
    let bad = Digest::sha256_of(&bytes);
    bytes[1000] ^= 1;
    let spool = b.dir.path().join("bad.part");
    std::fs::write(&spool, &bytes).unwrap();
    b.store.store(&bad, &spool, 300 * KIB).await.unwrap();

    let scrub = super::BucketScrub::new(
        b.store.clone(),
        b.meta.clone(),
        Duration::from_secs(3600),
        64 << 20,
    );
    let found = scrub.pass().await.unwrap().unwrap();
    assert_eq!((found.blobs, found.corrupt), (2, 1), "{found:?}");
    // All of the good one; the bad one's last chunk is held back.
    assert!(
        found.bytes >= 300 * KIB && found.bytes < 600 * KIB,
        "{found:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.stored(&good).await);
    assert!(!b.stored(&bad).await);
}

/// A client is never sent to a bucket URL for a blob claimed for removal
/// (it is streamed instead); a finished fetch's lease does not stop it.
#[tokio::test]
async fn no_presigned_redirect_to_a_blob_being_removed() {
    let Some(b) = bench().await else { return };
    let blob = b.put(1, 10).await;
    let evictor = Arc::new(b.evictor(size_budget(1 << 20), None));
    let store =
        super::BudgetedSharedStore::new(b.store.clone(), b.meta.clone(), b.uses.clone(), evictor);
    let expires = Duration::from_secs(60);
    assert!(store.presigned_url(&blob, expires).await.unwrap().is_some());
    let lease = blob_lease(&blob);
    let long = Duration::from_secs(30);
    assert_eq!(
        b.meta.acquire_lease(&lease, "0123 -", long).await.unwrap(),
        None
    );
    assert!(store.presigned_url(&blob, expires).await.unwrap().is_none());
    assert!(
        b.meta
            .replace_lease(&lease, "0123 -", "0123 - stored", long)
            .await
            .unwrap()
    );
    assert!(store.presigned_url(&blob, expires).await.unwrap().is_some());
}
