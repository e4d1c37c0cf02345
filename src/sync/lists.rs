//! `[[sync.images]]`: repositories whose chosen tags are synced again every
//! interval. One replica a period runs each entry (a lease renewed while
//! the run lasts, then left to lapse),
//! as a job like any other, so the API lists it; a tag pattern costs one
//! tag list, and each tag one look upstream (less within its `tag_ttl`);
//! only what the cache lacks is fetched.

use std::sync::Arc;
use std::time::Duration;

use super::job::State;
use super::jobs::{Jobs, MAX_IMAGES, SyncRequest, now_ms};
use crate::config::SyncListConfig;
use crate::meta::Held;
use crate::telemetry::metrics::{SyncListLabels, SyncStateLabels, metrics};

/// Keeps every entry synced, for as long as the process runs.
pub fn spawn(jobs: Arc<Jobs>, entries: Vec<SyncListConfig>) {
    let holder = format!("{:016x} sync-list", rand::random::<u64>());
    for entry in entries {
        tokio::spawn(keep_synced(jobs.clone(), entry, holder.clone()));
    }
}

async fn keep_synced(jobs: Arc<Jobs>, entry: SyncListConfig, holder: String) {
    // The lease names all the entry asks for: an entry changed in the
    // config is a new one, run at once.
    let lease = format!(
        "sync-list:{}:{}:{}:{}:{}",
        entry.image,
        entry.tags.join(","),
        entry.tag_pattern.as_deref().unwrap_or(""),
        entry.platforms.join(","),
        entry.interval.as_secs()
    );
    let look_every = (entry.interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        // Held (renewed) while the run lasts, then left to lapse: the next
        // run starts about an interval after this one ended, on some
        // replica.
        match Held::take(&jobs.meta, &lease, &holder, entry.interval).await {
            Ok(Some(held)) => {
                if run_once(&jobs, &entry).await {
                    drop(held);
                } else {
                    // Failed before it could sync: tried again soon.
                    held.release().await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(image = %entry.image, error = %e, "cannot take a sync list's lease")
            }
        }
        tokio::time::sleep(look_every).await;
    }
}

/// The tags the entry names now.
async fn tags(jobs: &Jobs, entry: &SyncListConfig) -> Result<Vec<String>, String> {
    let Some(pattern) = &entry.tag_pattern else {
        return Ok(entry.tags.clone());
    };
    let pattern = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
    let image = jobs
        .parse(&format!("{}:latest", entry.image))
        .map_err(|e| e.to_string())?;
    let mut all = jobs
        .syncer
        .mirror()
        .tags(&image.target)
        .await
        .map_err(|e| e.to_string())?;
    all.retain(|t| pattern.is_match(t));
    if all.len() > MAX_IMAGES {
        tracing::warn!(image = %entry.image, matched = all.len(), "a sync list's pattern matches more tags than a job takes; syncing the last {MAX_IMAGES} in tag order");
        all.drain(..all.len() - MAX_IMAGES);
    }
    Ok(all)
}

/// One run; false when it could not start (the tags or the job could not
/// be had).
async fn run_once(jobs: &Arc<Jobs>, entry: &SyncListConfig) -> bool {
    let tags = match tags(jobs, entry).await {
        Ok(tags) if tags.is_empty() => {
            tracing::warn!(image = %entry.image, "a sync list names no tag upstream has");
            return true;
        }
        Ok(tags) => tags,
        Err(e) => {
            tracing::warn!(image = %entry.image, error = %e, "cannot list the tags to sync");
            record(entry, 0, 1, false);
            return false;
        }
    };
    let request = SyncRequest {
        images: tags
            .iter()
            .map(|t| format!("{}:{t}", entry.image))
            .collect(),
        platforms: entry.platforms.clone(),
    };
    let mut job = match jobs.prepare(request, now_ms()) {
        Ok(job) => job,
        Err(e) => {
            tracing::warn!(image = %entry.image, error = %e, "a sync list cannot be synced");
            record(entry, 0, tags.len(), false);
            return true;
        }
    };
    job.list = Some(entry.image.clone());
    match jobs.run(job).await {
        Ok(Some(job)) if job.state.finished() => {
            let done = job.images.iter().filter(|i| i.state == State::Done).count();
            let failed = job.images.len() - done;
            record(entry, done, failed, failed == 0);
            true
        }
        // Another replica took it over; it goes on there.
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(image = %entry.image, error = %e, "cannot record a sync list's job");
            false
        }
    }
}

fn record(entry: &SyncListConfig, done: usize, failed: usize, success: bool) {
    let m = metrics();
    for (state, n) in [("done", done), ("failed", failed)] {
        m.sync_images
            .get_or_create(&SyncStateLabels {
                image: entry.image.clone(),
                state,
            })
            .set(n as i64);
    }
    if success {
        m.sync_last_success
            .get_or_create(&SyncListLabels {
                image: entry.image.clone(),
            })
            .set((now_ms() / 1000) as i64);
    }
}
