//! What the cluster is doing now, for the activity page: every replica's
//! cold fetches (progress, speed, how long until done, who waits), the sync
//! jobs running and the last ones finished, and the registry requests that
//! failed lately with their reasons.

use serde::Serialize;

use crate::meta::{MetaError, MetaStore, now_ms};
use crate::sync::Job;
use crate::telemetry::tally::Failure;

/// Finished jobs listed beside the running ones.
const RECENT_JOBS: usize = 10;

#[derive(Debug, Serialize)]
pub struct Activity {
    pub now_ms: u64,
    pub fetches: Vec<Fetch>,
    pub jobs: Vec<Job>,
    pub failures: Vec<Failure>,
}

#[derive(Debug, Serialize)]
pub struct Fetch {
    /// The replica fetching it (it holds the blob's lease, or reads the
    /// bucket for its own copy).
    pub replica: String,
    /// `upstream`, `peer` (streaming another replica's fetch) or `bucket`.
    pub origin: String,
    pub repository: String,
    pub digest: String,
    pub received: u64,
    pub size: Option<u64>,
    pub waiting: usize,
    pub seconds: f64,
    pub bytes_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

pub async fn activity(meta: &dyn MetaStore, failures: usize) -> Result<Activity, MetaError> {
    let replicas = super::publish::replica_records(meta).await?;
    let mut fetches: Vec<Fetch> = replicas
        .iter()
        .flat_map(|r| {
            r.fetches.iter().map(|f| {
                let speed =
                    (f.seconds > 0.0 && f.received > 0).then(|| f.received as f64 / f.seconds);
                Fetch {
                    replica: r.name.clone(),
                    origin: f.origin.clone(),
                    repository: f.repository.clone(),
                    digest: f.digest.clone(),
                    received: f.received,
                    size: f.size,
                    waiting: f.waiting,
                    seconds: f.seconds,
                    bytes_per_second: speed,
                    eta_seconds: match (f.size, speed) {
                        (Some(size), Some(speed)) => {
                            Some(size.saturating_sub(f.received) as f64 / speed)
                        }
                        _ => None,
                    },
                }
            })
        })
        .collect();
    fetches.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let open = meta.open_jobs().await?;
    let mut jobs: Vec<Job> = Vec::new();
    for id in &open {
        if let Some(job) = meta
            .job(id)
            .await?
            .and_then(|r| serde_json::from_slice(&r).ok())
        {
            jobs.push(job);
        }
    }
    let finished = meta
        .recent_jobs(RECENT_JOBS + open.len())
        .await?
        .iter()
        .filter_map(|r| serde_json::from_slice::<Job>(r).ok())
        // One that finished since `open_jobs` is listed once.
        .filter(|j| j.state.finished() && !open.contains(&j.id))
        .take(RECENT_JOBS)
        .collect::<Vec<_>>();
    jobs.extend(finished);
    let failures = meta
        .failures(failures)
        .await?
        .iter()
        .filter_map(|r| serde_json::from_slice(r).ok())
        .collect();
    Ok(Activity {
        now_ms: now_ms(),
        fetches,
        jobs,
        failures,
    })
}
