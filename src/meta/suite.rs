//! The behaviour every `MetaStore` must show, run against each backend.

use std::time::Duration;

use bytes::Bytes;

use super::{MetaStore, StoredManifest, TagRecord};
use crate::reference::Digest;

const REPO: &str = "docker.io/library/nginx";

fn manifest() -> (Digest, StoredManifest) {
    let bytes = Bytes::from_static(b"{\"schemaVersion\":2,\n\"x\":1}");
    (
        Digest::sha256_of(&bytes),
        StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        },
    )
}

pub async fn run(meta: &dyn MetaStore) {
    meta.health().await.unwrap();
    let (digest, m) = manifest();
    let layer = Digest::sha256_of(b"layer");
    assert_eq!(meta.manifest(&digest).await.unwrap(), None);
    assert!(!meta.is_linked(REPO, &digest).await.unwrap());

    meta.put_manifest(REPO, &digest, &m, std::slice::from_ref(&layer))
        .await
        .unwrap();
    assert_eq!(meta.manifest(&digest).await.unwrap(), Some(m.clone()));
    assert!(meta.is_linked(REPO, &digest).await.unwrap());
    assert!(meta.is_linked(REPO, &layer).await.unwrap());
    // Links are per repository: another repository may not serve it.
    assert!(
        !meta
            .is_linked("docker.io/library/other", &layer)
            .await
            .unwrap()
    );
    assert!(
        !meta
            .is_linked("docker.io/library/ngin", &layer)
            .await
            .unwrap()
    );

    let rec = TagRecord {
        digest: digest.to_string(),
        checked_at_ms: 1234,
    };
    assert_eq!(meta.tag(REPO, "latest").await.unwrap(), None);
    meta.put_tag(REPO, "latest", &rec).await.unwrap();
    meta.put_tag(REPO, "1.25", &rec).await.unwrap();
    meta.put_tag("docker.io/library/nginx2", "zzz", &rec)
        .await
        .unwrap();
    assert_eq!(meta.tag(REPO, "latest").await.unwrap(), Some(rec.clone()));
    assert_eq!(meta.tags(REPO).await.unwrap(), vec!["1.25", "latest"]);

    let other = Digest::sha256_of(b"other");
    meta.link("gcr.io/distroless/static", std::slice::from_ref(&other))
        .await
        .unwrap();
    assert!(
        meta.is_linked("gcr.io/distroless/static", &other)
            .await
            .unwrap()
    );

    let all = meta.repositories(None, 100).await.unwrap();
    assert_eq!(
        all,
        vec![
            "docker.io/library/nginx",
            "docker.io/library/nginx2",
            "gcr.io/distroless/static"
        ]
    );
    assert_eq!(meta.repositories(None, 1).await.unwrap(), vec![REPO]);
    assert_eq!(
        meta.repositories(Some(REPO), 1).await.unwrap(),
        vec!["docker.io/library/nginx2"]
    );
    assert!(
        meta.repositories(Some("gcr.io/distroless/static"), 5)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Leases: one holder at a time, renewable and releasable only by it, and
/// free again once expired.
pub async fn leases(meta: &dyn MetaStore) {
    let name = format!("blob:test-{:x}", rand::random::<u64>());
    let long = Duration::from_secs(30);
    assert_eq!(meta.acquire_lease(&name, "a", long).await.unwrap(), None);
    assert_eq!(
        meta.acquire_lease(&name, "b", long)
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    assert!(meta.renew_lease(&name, "a", long).await.unwrap());
    assert!(!meta.renew_lease(&name, "b", long).await.unwrap());
    assert_eq!(meta.lease(&name).await.unwrap().as_deref(), Some("a"));
    assert_eq!(meta.lease(&format!("{name}-none")).await.unwrap(), None);
    meta.release_lease(&name, "b").await.unwrap();
    assert_eq!(
        meta.acquire_lease(&name, "b", long)
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    // Only the holder changes what it says, and is then known by that.
    assert!(
        !meta
            .replace_lease(&name, "b", "b done", long)
            .await
            .unwrap()
    );
    assert!(
        meta.replace_lease(&name, "a", "a done", long)
            .await
            .unwrap()
    );
    assert_eq!(
        meta.acquire_lease(&name, "b", long)
            .await
            .unwrap()
            .as_deref(),
        Some("a done")
    );
    assert!(!meta.renew_lease(&name, "a", long).await.unwrap());
    meta.release_lease(&name, "a done").await.unwrap();
    assert_eq!(meta.acquire_lease(&name, "b", long).await.unwrap(), None);
    // Expiry frees it (a holder that died).
    let short = format!("{name}-short");
    assert_eq!(
        meta.acquire_lease(&short, "a", Duration::from_millis(100))
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!meta.renew_lease(&short, "a", long).await.unwrap());
    assert_eq!(meta.acquire_lease(&short, "b", long).await.unwrap(), None);
}

/// What `run` wrote, read back (after a restart for durable stores).
pub async fn check_persisted(meta: &dyn MetaStore) {
    let (digest, m) = manifest();
    assert_eq!(meta.manifest(&digest).await.unwrap(), Some(m));
    assert_eq!(
        meta.tag(REPO, "latest")
            .await
            .unwrap()
            .map(|r| r.checked_at_ms),
        Some(1234)
    );
    assert!(meta.is_linked(REPO, &digest).await.unwrap());
}

/// Rates: a burst is allowed, the next request waits about one interval,
/// and keys do not share a budget.
pub async fn throttle(meta: &dyn MetaStore) {
    use std::time::Duration;
    let rate = crate::rate::Rate::new(2, 3);
    let key = format!("test-{:x}", rand::random::<u64>());
    for i in 0..3 {
        assert_eq!(
            meta.throttle(&key, rate).await.unwrap(),
            Ok(()),
            "burst {i}"
        );
    }
    let wait = meta.throttle(&key, rate).await.unwrap().unwrap_err();
    assert!(
        wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    let other = format!("{key}-other");
    assert_eq!(meta.throttle(&other, rate).await.unwrap(), Ok(()));
    tokio::time::sleep(wait).await;
    assert_eq!(meta.throttle(&key, rate).await.unwrap(), Ok(()));
}

/// Uses only move forward; the usage counts add up; a removal is claimed
/// only by the eviction lease's holder, for a blob nobody fetches and
/// nobody used since the decision.
pub async fn uses_and_removals(meta: &dyn MetaStore) {
    use std::time::Duration;

    use super::{Claimed, Removal, UseKind, blob_lease};
    let tag = format!("{:x}", rand::random::<u64>());
    let (a, b, c) = (
        Digest::sha256_of(format!("a{tag}").as_bytes()),
        Digest::sha256_of(format!("b{tag}").as_bytes()),
        Digest::sha256_of(format!("c{tag}").as_bytes()),
    );
    meta.record_uses(UseKind::Blobs, &[(a.clone(), 2000), (b.clone(), 1000)])
        .await
        .unwrap();
    // A late batch never moves a use back.
    meta.record_uses(UseKind::Blobs, &[(a.clone(), 1500)])
        .await
        .unwrap();
    assert_eq!(
        meta.last_uses(UseKind::Blobs, &[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap(),
        vec![Some(2000), Some(1000), None]
    );
    meta.forget_uses(UseKind::Blobs, std::slice::from_ref(&b))
        .await
        .unwrap();
    assert_eq!(
        meta.last_uses(UseKind::Blobs, std::slice::from_ref(&b))
            .await
            .unwrap(),
        vec![None]
    );
    // Deadlines are kept apart from uses; the latest stays, and one that
    // never comes (year 9999) reads back exactly.
    let never = crate::lifecycle::NEVER;
    meta.record_uses(
        UseKind::BlobDeadlines,
        &[(a.clone(), 9000), (c.clone(), 3000)],
    )
    .await
    .unwrap();
    meta.record_uses(
        UseKind::BlobDeadlines,
        &[(a.clone(), never), (c.clone(), 2000)],
    )
    .await
    .unwrap();
    assert_eq!(
        meta.last_uses(UseKind::BlobDeadlines, &[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap(),
        vec![Some(never), None, Some(3000)]
    );
    assert_eq!(
        meta.last_uses(UseKind::ManifestDeadlines, std::slice::from_ref(&a))
            .await
            .unwrap(),
        vec![None]
    );
    assert_eq!(
        meta.used_before(UseKind::BlobDeadlines, u64::MAX, 0, 10)
            .await
            .unwrap(),
        vec![c.clone(), a.clone()]
    );
    meta.forget_uses(UseKind::BlobDeadlines, &[a.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(
        meta.last_uses(UseKind::Blobs, std::slice::from_ref(&a))
            .await
            .unwrap(),
        vec![Some(2000)]
    );

    let (bytes, blobs) = meta.add_usage(0, 0).await.unwrap();
    assert_eq!(
        meta.add_usage(100, 2).await.unwrap(),
        (bytes + 100, blobs + 2)
    );
    assert_eq!(
        meta.add_usage(-40, -1).await.unwrap(),
        (bytes + 60, blobs + 1)
    );

    let fence = format!("evict-{tag}");
    let long = Duration::from_secs(30);
    let removal = |digest, seen_ms| Removal {
        fence: &fence,
        holder: "evictor",
        digest,
        seen_ms,
        ttl: long,
    };
    // Without the eviction lease, nothing is claimed.
    assert_eq!(
        meta.claim_removal(&removal(&a, 2000)).await.unwrap(),
        Claimed::Fenced
    );
    assert_eq!(
        meta.acquire_lease(&fence, "evictor", long).await.unwrap(),
        None
    );
    // Used since the decision saw 1000.
    assert_eq!(
        meta.claim_removal(&removal(&a, 1000)).await.unwrap(),
        Claimed::Wanted
    );
    // Being fetched.
    assert_eq!(
        meta.acquire_lease(&blob_lease(&c), "fetcher", long)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        meta.claim_removal(&removal(&c, 0)).await.unwrap(),
        Claimed::Wanted
    );
    // As decided: the blob's lease is the remover's, so a fetch waits.
    assert_eq!(
        meta.claim_removal(&removal(&a, 2000)).await.unwrap(),
        Claimed::Yes
    );
    assert_eq!(
        meta.acquire_lease(&blob_lease(&a), "fetcher", long)
            .await
            .unwrap()
            .as_deref(),
        Some("evictor")
    );
    meta.release_lease(&blob_lease(&a), "evictor")
        .await
        .unwrap();
    assert_eq!(
        meta.claim_removal(&removal(&b, 0)).await.unwrap(),
        Claimed::Yes
    );
    // Another holder now has the eviction lease: the first is fenced off.
    meta.release_lease(&fence, "evictor").await.unwrap();
    assert_eq!(
        meta.acquire_lease(&fence, "other", long).await.unwrap(),
        None
    );
    assert_eq!(
        meta.claim_removal(&removal(&c, u64::MAX)).await.unwrap(),
        Claimed::Fenced
    );
}

/// What forgetting the metadata of expired content does: only manifests
/// still unused are removed, tags and links go one by one, and a
/// repository goes with all it holds.
pub async fn forgetting(meta: &dyn MetaStore) {
    let repo = format!("docker.io/forget/x{:x}", rand::random::<u32>());
    let manifest = |n: u8| {
        let bytes = Bytes::from(format!("{{\"schemaVersion\":2,\"n\":{n}}}"));
        (
            Digest::sha256_of(&bytes),
            StoredManifest {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes,
            },
        )
    };
    let ((m1, s1), (m2, s2)) = (manifest(1), manifest(2));
    let (l1, l2) = (
        Digest::sha256_of(repo.as_bytes()),
        Digest::sha256_of(format!("{repo}2").as_bytes()),
    );
    meta.put_manifest(&repo, &m1, &s1, std::slice::from_ref(&l1))
        .await
        .unwrap();
    meta.put_manifest(&repo, &m2, &s2, std::slice::from_ref(&l2))
        .await
        .unwrap();
    for (tag, d) in [("a", &m1), ("b", &m2)] {
        let rec = TagRecord {
            digest: d.to_string(),
            checked_at_ms: 1,
        };
        meta.put_tag(&repo, tag, &rec).await.unwrap();
    }
    use super::UseKind::{Blobs, Manifests};
    meta.record_uses(Manifests, &[(m1.clone(), 1000), (m2.clone(), 5000)])
        .await
        .unwrap();
    meta.record_uses(Blobs, &[(l1.clone(), 1001)])
        .await
        .unwrap();

    // Blobs' and manifests' uses are apart.
    let old = meta.used_before(Manifests, 3000, 0, 100).await.unwrap();
    assert!(
        old.contains(&m1) && !old.contains(&m2) && !old.contains(&l1),
        "{old:?}"
    );
    let old = meta.used_before(Blobs, 3000, 0, 100).await.unwrap();
    assert!(old.contains(&l1) && !old.contains(&m1), "{old:?}");
    // Oldest first, a page at a time.
    let first = meta.used_before(Blobs, 3000, 0, 1).await.unwrap();
    let second = meta.used_before(Blobs, 3000, 1, 1).await.unwrap();
    assert_eq!(first.len() + second.len(), old.len().min(2));
    assert!(first != second);
    // Not a manifest's record: stays; a manifest used since the cutoff
    // stays.
    assert_eq!(
        meta.forget_manifests(&[m1.clone(), l1.clone(), m2.clone()], 3000)
            .await
            .unwrap(),
        vec![m1.clone()]
    );
    assert_eq!(
        meta.has_manifests(&[m1.clone(), m2.clone()]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(
        meta.last_uses(Manifests, &[m1.clone(), m2.clone()])
            .await
            .unwrap(),
        vec![None, Some(5000)]
    );
    assert_eq!(
        meta.last_uses(Blobs, std::slice::from_ref(&l1))
            .await
            .unwrap(),
        vec![Some(1001)]
    );
    meta.forget_uses(Blobs, std::slice::from_ref(&l1))
        .await
        .unwrap();
    assert_eq!(
        meta.last_uses(Blobs, std::slice::from_ref(&l1))
            .await
            .unwrap(),
        vec![None]
    );

    let mut links = meta.links(&repo).await.unwrap();
    links.sort();
    let mut all = vec![m1.clone(), m2.clone(), l1.clone(), l2.clone()];
    all.sort();
    assert_eq!(links, all);
    meta.unlink(&repo, &[m1.clone(), l1.clone()]).await.unwrap();
    assert!(!meta.is_linked(&repo, &l1).await.unwrap());
    assert!(meta.is_linked(&repo, &l2).await.unwrap());
    meta.delete_tag(&repo, "a").await.unwrap();
    assert_eq!(meta.tags(&repo).await.unwrap(), vec!["b"]);
    assert_eq!(meta.tag(&repo, "a").await.unwrap(), None);

    // A record with no use (written before uses were kept) is given one;
    // one with a use keeps it.
    let (m3, s3) = manifest(3);
    meta.put_manifest(&repo, &m3, &s3, &[]).await.unwrap();
    assert!(meta.adopt_manifests(7000).await.unwrap() >= 1);
    assert_eq!(
        meta.last_uses(Manifests, &[m2.clone(), m3.clone()])
            .await
            .unwrap(),
        vec![Some(5000), Some(7000)]
    );
    assert_eq!(meta.adopt_manifests(8000).await.unwrap(), 0);
    meta.forget_manifests(std::slice::from_ref(&m3), 9000)
        .await
        .unwrap();

    meta.forget_repository(&repo).await.unwrap();
    assert!(meta.links(&repo).await.unwrap().is_empty());
    assert!(meta.tags(&repo).await.unwrap().is_empty());
    assert_eq!(meta.tag(&repo, "b").await.unwrap(), None);
    let catalog = meta.repositories(None, 10_000).await.unwrap();
    assert!(!catalog.contains(&repo), "{catalog:?}");
}

/// Sync job records: stored, replaced, listed newest first; `JOBS_KEPT`
/// kept, the oldest finished ones dropped first, open ones never.
pub async fn jobs(meta: &dyn MetaStore) {
    use super::JOBS_KEPT;
    let run = format!("{:x}", rand::random::<u32>());
    let id = |n: usize| format!("job-{run}-{n:06}");
    assert_eq!(meta.job(&id(0)).await.unwrap(), None);
    meta.save_job(&id(0), b"first", true).await.unwrap();
    meta.save_job(&id(1), b"second", false).await.unwrap();
    meta.save_job(&id(0), b"first, again", true).await.unwrap();
    assert_eq!(
        meta.job(&id(0)).await.unwrap().as_deref(),
        Some(&b"first, again"[..])
    );
    let recent = meta.recent_jobs(2).await.unwrap();
    assert_eq!(recent, vec![b"second".to_vec(), b"first, again".to_vec()]);
    assert_eq!(meta.open_jobs().await.unwrap(), vec![id(0)]);
    meta.close_job(&id(0)).await.unwrap();
    assert!(meta.open_jobs().await.unwrap().is_empty());
    assert!(
        meta.job(&id(0)).await.unwrap().is_some(),
        "the record stays"
    );
    meta.save_job(&id(0), b"first, again", true).await.unwrap();
    for n in 2..JOBS_KEPT + 5 {
        meta.save_job(&id(n), format!("{n}").as_bytes(), false)
            .await
            .unwrap();
    }
    // The open job stays, however old; the oldest finished ones go.
    assert!(meta.job(&id(0)).await.unwrap().is_some());
    assert_eq!(meta.job(&id(1)).await.unwrap(), None);
    assert_eq!(meta.job(&id(5)).await.unwrap(), None);
    assert!(meta.job(&id(6)).await.unwrap().is_some());
    let all = meta.recent_jobs(JOBS_KEPT + 100).await.unwrap();
    assert_eq!(all.len(), JOBS_KEPT);
    assert_eq!(all[0], format!("{}", JOBS_KEPT + 4).into_bytes());
    meta.save_job(&id(0), b"finished", false).await.unwrap();
    assert!(meta.open_jobs().await.unwrap().is_empty());
    meta.save_job(&id(JOBS_KEPT + 5), b"newest", false)
        .await
        .unwrap();
    assert_eq!(
        meta.job(&id(0)).await.unwrap(),
        None,
        "dropped once finished"
    );
}

/// Upload sessions: stored, replaced, lapsed and removed; referrers.
pub async fn uploads(meta: &dyn MetaStore) {
    let id = format!("up-{:x}", rand::random::<u64>());
    assert_eq!(meta.upload(&id).await.unwrap(), None);
    meta.put_upload(&id, b"one", Duration::from_secs(60))
        .await
        .unwrap();
    meta.put_upload(&id, b"two", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        meta.upload(&id).await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    meta.delete_upload(&id).await.unwrap();
    assert_eq!(meta.upload(&id).await.unwrap(), None);
    meta.put_upload(&id, b"short", Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(meta.upload(&id).await.unwrap(), None, "lapsed");

    let repo = format!("private/{id}");
    let subject = Digest::sha256_of(b"subject");
    let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
    meta.add_referrer(&repo, &subject, &a).await.unwrap();
    meta.add_referrer(&repo, &subject, &b).await.unwrap();
    meta.add_referrer(&format!("{repo}x"), &subject, &b)
        .await
        .unwrap();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(meta.referrers(&repo, &subject).await.unwrap(), both);
    meta.remove_referrer(&repo, &subject, &a).await.unwrap();
    assert_eq!(meta.referrers(&repo, &subject).await.unwrap(), vec![b]);
    assert!(meta.referrers(&repo, &a).await.unwrap().is_empty());
}

/// The console's figures: counts add up across calls (as they do across
/// replicas), by minute too; pulls rank; replica records lapse; failures
/// keep the newest.
pub async fn console_figures(meta: &dyn MetaStore) {
    use super::FAILURES_KEPT;
    use std::time::Duration;
    let c = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    };
    let before = meta.counts(1000, 1003).await.unwrap();
    let base = |name: &str| before.total.get(name).copied().unwrap_or(0);
    meta.add_counts(1000, &c(&[("hits", 2), ("misses", 1)]), &c(&[("r/a", 1)]))
        .await
        .unwrap();
    meta.add_counts(1000, &c(&[("hits", 3)]), &c(&[("r/b", 5), ("r/a", 1)]))
        .await
        .unwrap();
    meta.add_counts(1002, &c(&[("hits", 1)]), &[])
        .await
        .unwrap();
    let got = meta.counts(1000, 1003).await.unwrap();
    assert_eq!(got.total.get("hits"), Some(&(base("hits") + 6)));
    assert_eq!(got.total.get("misses"), Some(&(base("misses") + 1)));
    let minutes: Vec<u64> = got.minutes.iter().map(|(m, _)| *m).collect();
    assert_eq!(
        minutes,
        vec![1000, 1002],
        "minutes without counts are left out"
    );
    assert_eq!(got.minutes[0].1.get("hits"), Some(&5));
    assert_eq!(got.minutes[1].1.get("hits"), Some(&1));
    let top = meta.top_pulls(10).await.unwrap();
    let rank = |repo: &str| top.iter().position(|(r, _)| r == repo);
    assert!(rank("r/b") < rank("r/a"), "{top:?}");
    assert!(top.iter().any(|(r, n)| r == "r/a" && *n >= 2), "{top:?}");

    meta.put_replica("one", b"busy", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(meta.replicas().await.unwrap().contains(&b"busy".to_vec()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!meta.replicas().await.unwrap().contains(&b"busy".to_vec()));

    let records: Vec<Vec<u8>> = (0..FAILURES_KEPT + 3)
        .map(|n| format!("f{n}").into_bytes())
        .collect();
    meta.add_failures(&records).await.unwrap();
    let failures = meta.failures(FAILURES_KEPT + 10).await.unwrap();
    assert_eq!(failures.len(), FAILURES_KEPT);
    assert_eq!(failures[0], format!("f{}", FAILURES_KEPT + 2).into_bytes());
    assert_eq!(meta.failures(2).await.unwrap().len(), 2);
}
