//! Each replica's share of the console's figures, written to the metadata
//! store every few seconds: its counts since the last round (added to the
//! cluster's totals and the current minute's), its manifest pulls, its
//! failed requests, and a record of what it is doing now (fetches running,
//! upstream quotas, what its store holds) that lapses if it stops. The
//! console reads only the store, so its pages show the whole cluster, and
//! reading them costs the data plane nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::meta::{MetaError, now_ms};
use crate::mirror::{FlightNow, Mirror};
use crate::telemetry::metrics::{SourceLabels, metrics};
use crate::telemetry::tally::{Taken, tally};

/// How often a replica publishes.
pub const EVERY: Duration = Duration::from_secs(2);

/// How long a replica's record outlives its last publication.
const RECORD_TTL: Duration = Duration::from_secs(10);

/// What a replica is doing, as the console reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub name: String,
    pub started_ms: u64,
    pub at_ms: u64,
    pub fetches: Vec<FlightNow>,
    /// Requests left, by registry, where upstream said and it still holds.
    pub quotas: Vec<(String, i64)>,
    /// What the blob store held at its last count (bytes, blobs).
    pub stored: (i64, i64),
}

/// Every replica's record whose time has not run out.
pub async fn replica_records(
    meta: &dyn crate::meta::MetaStore,
) -> Result<Vec<ReplicaRecord>, MetaError> {
    Ok(meta
        .replicas()
        .await?
        .iter()
        .filter_map(|r| serde_json::from_slice(r).ok())
        .collect())
}

pub struct Publisher {
    mirror: Arc<Mirror>,
    name: String,
    registries: Vec<String>,
    started_ms: u64,
    /// Bytes served (from cache, from upstream) as of the last round.
    served: Mutex<(u64, u64)>,
}

impl Publisher {
    pub fn new(mirror: Arc<Mirror>, name: String, registries: Vec<String>) -> Self {
        Self {
            mirror,
            name,
            registries,
            started_ms: now_ms(),
            served: Mutex::new((0, 0)),
        }
    }

    /// Publishes every [`EVERY`] for as long as the publisher lives.
    pub fn spawn(self: &Arc<Self>) {
        tally().start();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(publisher) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = publisher.publish(RECORD_TTL).await {
                    tracing::debug!(error = %e, "cannot publish the console's figures");
                }
            }
        });
    }

    /// The last round, as the process stops: its record lapses at once.
    pub async fn last(&self) -> Result<(), MetaError> {
        self.publish(Duration::from_millis(1)).await
    }

    /// One round; the replica's record holds for `ttl`. What cannot be
    /// written is kept for the next.
    async fn publish(&self, ttl: Duration) -> Result<(), MetaError> {
        let meta = self.mirror.meta();
        let mut taken = tally().take();
        // Read and moved on under one lock: two rounds at once (the last
        // one at shutdown) never count the same bytes.
        let (cache, upstream, before) = {
            let mut last = self.served.lock().unwrap_or_else(|p| p.into_inner());
            let m = &metrics().bytes_served;
            let served = |source, origins: [&'static str; 2]| -> u64 {
                origins
                    .iter()
                    .map(|&origin| m.get_or_create(&SourceLabels { source, origin }).get())
                    .sum()
            };
            let now = (
                served("cache", ["local", "bucket"]),
                served("upstream", ["upstream", "peer"]),
            );
            (now.0, now.1, std::mem::replace(&mut *last, now))
        };
        for (name, now, then) in [
            ("bytes.cache", cache, before.0),
            ("bytes.upstream", upstream, before.1),
        ] {
            if now > then {
                taken.counts.push((name.to_owned(), now - then));
            }
        }
        let minute = now_ms() / 60_000;
        if let Err(e) = meta.add_counts(minute, &taken.counts, &taken.pulls).await {
            tally().restore(taken);
            return Err(e);
        }
        self.failures(std::mem::take(&mut taken.failures)).await;
        let record = ReplicaRecord {
            name: self.name.clone(),
            started_ms: self.started_ms,
            at_ms: now_ms(),
            fetches: self.mirror.fetches_now(),
            quotas: self
                .registries
                .iter()
                .filter_map(|r| {
                    let (left, until) = self.mirror.upstream_quota(r)?;
                    (until > std::time::Instant::now()).then(|| (r.clone(), left))
                })
                .collect(),
            stored: (metrics().cache_bytes.get(), metrics().cache_blobs.get()),
        };
        let record = serde_json::to_vec(&record).map_err(|e| MetaError::Backend(e.to_string()))?;
        meta.put_replica(&self.name, &record, ttl).await
    }

    async fn failures(&self, failures: Vec<crate::telemetry::tally::Failure>) {
        if failures.is_empty() {
            return;
        }
        let records: Vec<Vec<u8>> = failures
            .iter()
            .filter_map(|f| {
                let mut f = f.clone();
                f.replica = self.name.clone();
                serde_json::to_vec(&f).ok()
            })
            .collect();
        if let Err(e) = self.mirror.meta().add_failures(&records).await {
            tracing::debug!(error = %e, "cannot publish failed requests");
            tally().restore(Taken {
                failures,
                ..Taken::default()
            });
        }
    }
}

/// How a replica names itself on the console: the host and port it is
/// reached at when it advertises one, else the machine's name and the port
/// it listens on.
pub fn replica_name(advertised: Option<&url::Url>, port: u16) -> String {
    if let Some(url) = advertised
        && let Some(host) = url.host_str()
    {
        return match url.port_or_known_default() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pier".to_owned());
    format!("{host}:{port}")
}
