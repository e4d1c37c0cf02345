//! Replicas sharing one metadata store work together through leases: the
//! replica holding `blob:<digest>` fetches that blob from upstream, the
//! others stream it from that replica (at the URL it advertises in the
//! lease) or wait for its commit. A lease is renewed while its work runs,
//! taken up again if it lapsed meanwhile (a Redis failover), and lapses if
//! the replica dies, so another one takes over. Once a blob is stored its
//! holder marks the lease so and leaves it to lapse: a replica that found
//! the blob missing a moment earlier learns from it that the blob is in
//! the store, instead of fetching it again.
//!
//! A lease's value is `<random id> <advertised URL or -> [stored]`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use url::Url;

use crate::config::ClusterConfig;
use crate::meta::MetaStore;
use crate::telemetry::metrics::metrics;

use crate::meta::STORED;

pub struct Cluster {
    /// This replica's lease value: `<random id> <advertised URL or ->`.
    me: String,
    advertise: Option<Url>,
    pub lease_ttl: Duration,
    meta: Arc<dyn MetaStore>,
    /// Names of the leases this replica holds now.
    held: Held,
}

type Held = Arc<Mutex<HashSet<String>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashSet<String>> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outcome of claiming a piece of work.
pub enum Claim {
    /// This replica does it, holding the lease (renewed until released).
    Mine(Lease),
    /// Another replica does it (or this one, in another task); `peer` is
    /// where it can be reached, if it said. `stored`: the work is done (the
    /// blob is in the store) and the lease is left to lapse. `holder` is the
    /// lease's value, for [`Cluster::take_over`].
    Theirs {
        peer: Option<Url>,
        stored: bool,
        holder: String,
    },
    /// Do it here, unguarded: no other replica shares the metadata store,
    /// or it cannot coordinate now.
    Alone,
}

impl Cluster {
    pub fn new(config: &ClusterConfig, meta: Arc<dyn MetaStore>) -> Self {
        let url = config.advertise_url.as_ref().map_or_else(
            || "-".to_owned(),
            |u| u.as_str().trim_end_matches('/').to_owned(),
        );
        Self {
            me: format!("{:016x} {url}", rand::random::<u64>()),
            advertise: config.advertise_url.clone(),
            lease_ttl: config.lease_ttl,
            meta,
            held: Held::default(),
        }
    }

    pub async fn claim(&self, name: &str) -> Claim {
        if !self.meta.shared() {
            return Claim::Alone;
        }
        match self
            .meta
            .acquire_lease(name, &self.me, self.lease_ttl)
            .await
        {
            Ok(None) => self.mine(name),
            // This replica's, but no task here holds it: its release failed
            // (or its task ended without one). Nobody else works on it.
            Ok(Some(holder)) if holder == self.me && !lock(&self.held).contains(name) => {
                match self.meta.renew_lease(name, &self.me, self.lease_ttl).await {
                    Ok(true) => self.mine(name),
                    _ => Claim::Theirs {
                        peer: None,
                        stored: false,
                        holder,
                    },
                }
            }
            Ok(Some(holder)) => {
                metrics().lease_waits.inc();
                let (peer, stored) = parse_holder(&holder);
                Claim::Theirs {
                    peer: peer.filter(|u| Some(u) != self.advertise.as_ref() && !stored),
                    stored,
                    holder,
                }
            }
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::warn!(lease = name, error = %e, "cannot coordinate with other replicas");
                Claim::Alone
            }
        }
    }

    /// Takes over a lease whose work is done (marked stored) when what it
    /// did is gone (the blob was evicted or found corrupt since): only one
    /// replica's swap of that exact value succeeds.
    pub async fn take_over(&self, name: &str, holder: &str) -> Option<Lease> {
        match self
            .meta
            .replace_lease(name, holder, &self.me, self.lease_ttl)
            .await
        {
            Ok(true) => match self.mine(name) {
                Claim::Mine(lease) => Some(lease),
                _ => None,
            },
            Ok(false) => None,
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::warn!(lease = name, error = %e, "cannot take a finished lease over");
                None
            }
        }
    }

    fn mine(&self, name: &str) -> Claim {
        Claim::Mine(Lease::start(
            self.meta.clone(),
            name.to_owned(),
            self.me.clone(),
            self.lease_ttl,
            self.held.clone(),
        ))
    }

    /// Gives up every lease still held, so other replicas take the work
    /// over at once instead of after the leases lapse (at shutdown).
    pub async fn release_all(&self) {
        let names: Vec<String> = lock(&self.held).drain().collect();
        for name in names {
            if let Err(e) = self.meta.release_lease(&name, &self.me).await {
                tracing::warn!(lease = %name, error = %e, "cannot release lease; it will lapse");
            }
        }
    }
}

/// The URL in a lease value, if its holder advertised one, and whether the
/// holder marked its work done.
fn parse_holder(holder: &str) -> (Option<Url>, bool) {
    let mut words = holder.split(' ').skip(1);
    let url = words.next().and_then(|u| Url::parse(u).ok());
    (url, words.next() == Some(STORED))
}

/// A held lease, renewed in the background until released or dropped.
pub struct Lease {
    name: String,
    holder: String,
    meta: Arc<dyn MetaStore>,
    renewer: tokio::task::JoinHandle<()>,
    held: Held,
}

impl Lease {
    fn start(
        meta: Arc<dyn MetaStore>,
        name: String,
        holder: String,
        ttl: Duration,
        held: Held,
    ) -> Self {
        lock(&held).insert(name.clone());
        let renewer = {
            let (meta, name, holder, held) =
                (meta.clone(), name.clone(), holder.clone(), held.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match meta.renew_lease(&name, &holder, ttl).await {
                        Ok(true) => continue,
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "cannot renew lease");
                            continue;
                        }
                        Ok(false) => {}
                    }
                    // Lapsed (renewals failed for too long, or Redis lost
                    // it): claim it again, or another replica starts the
                    // same work. If one already has, this replica goes on
                    // for its own clients only.
                    match meta.acquire_lease(&name, &holder, ttl).await {
                        Ok(None) => {
                            tracing::warn!(lease = %name, "lease had lapsed; claimed it again")
                        }
                        Ok(Some(other)) if other == holder => {}
                        Ok(Some(_)) => {
                            tracing::warn!(lease = %name, "lease lost to another replica");
                            lock(&held).remove(&name);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "cannot claim a lapsed lease again")
                        }
                    }
                }
            })
        };
        Self {
            name,
            holder,
            meta,
            renewer,
            held,
        }
    }

    pub async fn release(self) {
        self.renewer.abort();
        // Still counted as held while the release runs: a claim here meanwhile
        // must not take it up as a leftover.
        if let Err(e) = self.meta.release_lease(&self.name, &self.holder).await {
            tracing::warn!(lease = %self.name, error = %e, "cannot release lease; it will lapse");
        }
        lock(&self.held).remove(&self.name);
    }

    /// The work is done (the blob is stored): the lease says so, and is
    /// left to lapse one TTL from now.
    pub async fn mark_stored(self, ttl: Duration) {
        self.renewer.abort();
        let done = format!("{} {STORED}", self.holder);
        match self
            .meta
            .replace_lease(&self.name, &self.holder, &done, ttl)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(lease = %self.name, "lease lost before the blob was stored")
            }
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot mark a lease done; it will lapse")
            }
        }
        lock(&self.held).remove(&self.name);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Released explicitly on every normal path; otherwise it lapses.
        self.renewer.abort();
        lock(&self.held).remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn holders_name_their_url_and_whether_they_are_done() {
        let url = |h: &str| parse_holder(h).0.map(|u| u.to_string());
        assert_eq!(
            url("00ff http://10.0.0.5:5000").as_deref(),
            Some("http://10.0.0.5:5000/")
        );
        assert_eq!(url("00ff -"), None);
        assert_eq!(url("garbage"), None);
        assert!(!parse_holder("00ff http://10.0.0.5:5000").1);
        assert!(parse_holder("00ff http://10.0.0.5:5000 stored").1);
        assert!(parse_holder("00ff - stored").1);
    }

    fn redis_meta() -> Option<Arc<dyn MetaStore>> {
        let url = crate::testenv::backend("PIER_TEST_REDIS_URL")?;
        let prefix = format!("cluster-{:x}:", rand::random::<u64>());
        Some(Arc::new(
            crate::meta::RedisMeta::new(&url, &prefix, 2, Duration::from_secs(2)).unwrap(),
        ))
    }

    fn config(ttl: Duration) -> ClusterConfig {
        ClusterConfig {
            advertise_url: Some("http://10.0.0.1:5000".parse().unwrap()),
            lease_ttl: ttl,
        }
    }

    /// A lease marked done says so to every replica (Redis from
    /// `tests/run.sh`).
    #[tokio::test]
    async fn a_stored_lease_tells_every_replica() {
        let Some(meta) = redis_meta() else {
            return;
        };
        let config = config(Duration::from_secs(30));
        let (a, b) = (
            Cluster::new(&config, meta.clone()),
            Cluster::new(&config, meta),
        );
        let Claim::Mine(lease) = a.claim("blob:x").await else {
            panic!("a fresh lease is free");
        };
        let theirs = |c: Claim| match c {
            Claim::Theirs { peer, stored, .. } => (peer.is_some(), stored),
            _ => panic!("the lease is taken"),
        };
        // Held by a task of a: a waits; b may stream from a (same URL in
        // this test, so no peer).
        assert_eq!(theirs(a.claim("blob:x").await), (false, false));
        lease.mark_stored(Duration::from_secs(30)).await;
        assert_eq!(theirs(a.claim("blob:x").await), (false, true));
        assert_eq!(theirs(b.claim("blob:x").await), (false, true));
    }

    /// A lease of this replica's that no task holds (its release failed) is
    /// taken up again at once, not waited out.
    #[tokio::test]
    async fn a_leftover_lease_of_this_replica_is_taken_up_again() {
        let Some(meta) = redis_meta() else {
            return;
        };
        let a = Cluster::new(&config(Duration::from_secs(30)), meta.clone());
        // What a failed release leaves: the value, and no holder here.
        assert_eq!(
            meta.acquire_lease("blob:y", &a.me, Duration::from_secs(30))
                .await
                .unwrap(),
            None
        );
        let Claim::Mine(lease) = a.claim("blob:y").await else {
            panic!("a leftover of this replica's is taken up again");
        };
        lease.release().await;
    }

    /// A lease that lapsed under its holder (Redis lost the key) is claimed
    /// again by the renewer, so no other replica starts the same work.
    #[tokio::test]
    async fn a_lapsed_lease_is_claimed_again_by_its_holder() {
        let Some(meta) = redis_meta() else {
            return;
        };
        let ttl = Duration::from_millis(600);
        let (a, b) = (
            Cluster::new(&config(ttl), meta.clone()),
            Cluster::new(&config(ttl), meta.clone()),
        );
        let Claim::Mine(lease) = a.claim("blob:z").await else {
            panic!("free");
        };
        meta.release_lease("blob:z", &a.me).await.unwrap();
        // The renewer runs every ttl/3.
        tokio::time::sleep(ttl / 2).await;
        assert!(matches!(b.claim("blob:z").await, Claim::Theirs { .. }));
        lease.release().await;
        assert!(matches!(b.claim("blob:z").await, Claim::Mine(_)));
    }
}
