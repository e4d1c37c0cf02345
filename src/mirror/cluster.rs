//! Replicas sharing one metadata store work together through leases: the
//! replica holding `blob:<digest>` fetches that blob from upstream, the
//! others stream it from that replica (at the URL it advertises in the
//! lease) or wait for its commit. A lease is renewed while its work runs and
//! lapses if the replica dies, so another one takes over. A blob's lease is
//! also left to lapse once the blob is stored, so that a replica that found
//! it missing a moment earlier does not fetch it again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use url::Url;

use crate::config::ClusterConfig;
use crate::meta::MetaStore;
use crate::telemetry::metrics::metrics;

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
    /// Another replica does it; `peer` is where it can be reached, if it
    /// said. `own`: the lease is this replica's, left to lapse after its
    /// work was done (no task here holds it).
    Theirs { peer: Option<Url>, own: bool },
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
            Ok(Some(holder)) => {
                metrics().lease_waits.inc();
                Claim::Theirs {
                    peer: peer_url(&holder).filter(|u| Some(u) != self.advertise.as_ref()),
                    own: holder == self.me && !lock(&self.held).contains(name),
                }
            }
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::warn!(lease = name, error = %e, "cannot coordinate with other replicas");
                Claim::Alone
            }
        }
    }
}

impl Cluster {
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

/// The URL in a lease value, if its holder advertised one.
fn peer_url(holder: &str) -> Option<Url> {
    let (_, url) = holder.split_once(' ')?;
    Url::parse(url).ok()
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
            let (meta, name, holder) = (meta.clone(), name.clone(), holder.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match meta.renew_lease(&name, &holder, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(lease = %name, "lease lost to another replica");
                            return;
                        }
                        Err(e) => tracing::warn!(lease = %name, error = %e, "cannot renew lease"),
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
        lock(&self.held).remove(&self.name);
        if let Err(e) = self.meta.release_lease(&self.name, &self.holder).await {
            tracing::warn!(lease = %self.name, error = %e, "cannot release lease; it will lapse");
        }
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
    fn holders_name_their_url() {
        assert_eq!(
            peer_url("00ff http://10.0.0.5:5000").map(|u| u.to_string()),
            Some("http://10.0.0.5:5000/".into())
        );
        assert_eq!(peer_url("00ff -"), None);
        assert_eq!(peer_url("garbage"), None);
    }

    /// A lease its holder left to lapse says so to the holder; another
    /// replica waits for it (Redis from `tests/run.sh`).
    #[tokio::test]
    async fn a_lapsing_lease_is_known_to_its_holder() {
        let Some(url) = crate::testenv::backend("PIER_TEST_REDIS_URL") else {
            return;
        };
        let prefix = format!("cluster-{:x}:", rand::random::<u64>());
        let meta: Arc<dyn MetaStore> = Arc::new(
            crate::meta::RedisMeta::new(&url, &prefix, 2, Duration::from_secs(2)).unwrap(),
        );
        let config = ClusterConfig {
            advertise_url: Some("http://10.0.0.1:5000".parse().unwrap()),
            lease_ttl: Duration::from_secs(30),
        };
        let (a, b) = (
            Cluster::new(&config, meta.clone()),
            Cluster::new(&config, meta),
        );
        let Claim::Mine(lease) = a.claim("blob:x").await else {
            panic!("a fresh lease is free");
        };
        let own = |c: Claim| match c {
            Claim::Theirs { own, .. } => own,
            _ => panic!("the lease is taken"),
        };
        assert!(!own(a.claim("blob:x").await), "held by a task of a");
        assert!(!own(b.claim("blob:x").await));
        // Left to lapse (dropped, not released).
        drop(lease);
        assert!(own(a.claim("blob:x").await));
        assert!(!own(b.claim("blob:x").await));
    }
}
