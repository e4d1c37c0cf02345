//! Sync jobs that outlive the replica that accepted them: each job's record
//! lives in the metadata store, and whoever holds the job's lease drives
//! it. The accepting replica starts at once; every replica looks now and
//! then for unfinished jobs whose lease lapsed (their replica died) and
//! takes them over, resuming with the images not yet done.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;

use super::image::{ImageError, ImageRef, parse_image};
use super::job::{ImageJob, Job, State, new_id};
use super::run::{Progress, Syncer};
use crate::config::SyncConfig;
use crate::meta::{Held, MetaError, MetaStore};
use crate::reference::Platform;

/// Images one job may name.
pub const MAX_IMAGES: usize = 1000;
/// How often each replica looks for jobs nobody drives.
const LOOK_EVERY: Duration = Duration::from_secs(10);
/// A job's lease: another replica takes the job over this long after its
/// driver stops renewing it.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// Jobs looked at once, at start, for unfinished ones.
const LOOK_BACK: usize = 200;
/// How often a running job's record is brought up to date.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Told of every change to a job as it is worked on.
#[async_trait::async_trait]
pub trait Report: Send {
    /// False stops the work (the job's lease was lost).
    async fn report(&mut self, job: &Job) -> bool;
}

/// Keeps the job's record in the metadata store up to date while its
/// lease is held.
struct Recorded<'a> {
    meta: &'a dyn MetaStore,
    held: &'a Held,
}

#[async_trait::async_trait]
impl Report for Recorded<'_> {
    async fn report(&mut self, job: &Job) -> bool {
        // Another replica drives it now: its record is that replica's.
        if self.held.lost() {
            return false;
        }
        if let Err(e) = self
            .meta
            .save_job(&job.id, &job.to_json(), !job.state.finished())
            .await
        {
            tracing::warn!(job = %job.id, error = %e, "cannot record a sync job's progress");
        }
        true
    }
}

/// What `POST /api/v1/sync` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    pub images: Vec<String>,
    #[serde(default)]
    pub platforms: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("{image}: {error}")]
    Image { image: String, error: ImageError },
    #[error("{0}")]
    Meta(#[from] MetaError),
}

pub struct Jobs {
    pub(super) meta: Arc<dyn MetaStore>,
    pub(super) syncer: Arc<Syncer>,
    retries: u32,
    retry_after: Duration,
    holder: String,
    /// Jobs this replica drives now.
    driving: Mutex<HashSet<String>>,
}

impl Jobs {
    pub fn new(meta: Arc<dyn MetaStore>, syncer: Arc<Syncer>, config: &SyncConfig) -> Self {
        Self {
            meta,
            syncer,
            retries: config.retries.max(1),
            retry_after: config.retry_after,
            holder: format!("{:016x} sync", rand::random::<u64>()),
            driving: Mutex::new(HashSet::new()),
        }
    }

    /// Checks a request as pulls would be checked and makes its job, not
    /// yet stored.
    pub fn prepare(&self, request: SyncRequest, now_ms: u64) -> Result<Job, SubmitError> {
        if request.images.is_empty() {
            return Err(SubmitError::Invalid("`images` lists no image".into()));
        }
        if request.images.len() > MAX_IMAGES {
            return Err(SubmitError::Invalid(format!(
                "`images` lists {} images; at most {MAX_IMAGES} per job",
                request.images.len()
            )));
        }
        let mut platforms = Vec::new();
        for p in &request.platforms {
            let platform = Platform::parse(p).map_err(SubmitError::Invalid)?;
            platforms.push(platform.to_string());
        }
        let mut images = Vec::with_capacity(request.images.len());
        for image in request.images {
            let shown: String = image.chars().take(256).collect();
            let parsed = self.parse(&image).map_err(|error| SubmitError::Image {
                image: shown.clone(),
                error,
            })?;
            images.push(ImageJob::new(shown, parsed.to_string()));
        }
        Ok(Job {
            id: new_id(now_ms),
            state: State::Pending,
            platforms,
            images,
            created_ms: now_ms,
            updated_ms: now_ms,
            list: None,
        })
    }

    pub fn parse(&self, image: &str) -> Result<ImageRef, ImageError> {
        let mirror = self.syncer.mirror();
        parse_image(image, &mirror.router, &mirror.policy)
    }

    /// Stores a new job and starts it here.
    pub async fn submit(self: &Arc<Self>, request: SyncRequest) -> Result<Job, SubmitError> {
        let job = self.prepare(request, now_ms())?;
        self.meta
            .save_job(&job.id, &job.to_json(), !job.state.finished())
            .await?;
        tokio::spawn(self.clone().drive(job.id.clone()));
        Ok(job)
    }

    /// Stores `job` and drives it here to its end (or until another
    /// replica takes it over); the job as recorded then.
    pub async fn run(self: &Arc<Self>, job: Job) -> Result<Option<Job>, MetaError> {
        self.meta
            .save_job(&job.id, &job.to_json(), !job.state.finished())
            .await?;
        self.clone().drive(job.id.clone()).await;
        self.get(&job.id).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, MetaError> {
        Ok(self
            .meta
            .job(id)
            .await?
            .and_then(|bytes| Job::from_json(&bytes)))
    }

    /// The newest `limit` jobs, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Job>, MetaError> {
        Ok(self
            .meta
            .recent_jobs(limit)
            .await?
            .iter()
            .filter_map(|bytes| Job::from_json(bytes))
            .collect())
    }

    /// Looks for unfinished jobs nobody drives, for as long as the process
    /// runs.
    pub fn spawn_takeover(self: &Arc<Self>) {
        let jobs = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut first = true;
            loop {
                tokio::time::sleep(LOOK_EVERY).await;
                let Some(jobs) = jobs.upgrade() else { return };
                // Once, the recent jobs too: one left unfinished by a
                // version that kept no open set.
                let older = if std::mem::take(&mut first) {
                    jobs.recent(LOOK_BACK).await.unwrap_or_default()
                } else {
                    Vec::new()
                };
                let older = older
                    .into_iter()
                    .filter(|j| !j.state.finished())
                    .map(|j| j.id);
                match jobs.meta.open_jobs().await {
                    Ok(open) => {
                        for id in open.into_iter().chain(older) {
                            if !jobs.is_driving(&id) {
                                tokio::spawn(jobs.clone().drive(id));
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot look for sync jobs"),
                }
            }
        });
    }

    fn is_driving(&self, id: &str) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    /// Drives job `id` to its end while holding its lease; gives up when
    /// another replica holds it.
    async fn drive(self: Arc<Self>, id: String) {
        if !self
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone())
        {
            return;
        }
        let lease = format!("sync:{id}");
        match Held::take(&self.meta, &lease, &self.holder, LEASE_TTL).await {
            Ok(Some(held)) => {
                match self.get(&id).await {
                    Ok(Some(mut job)) if !job.state.finished() => {
                        tracing::info!(job = %id, images = job.images.len(), "sync job started");
                        let mut recorded = Recorded {
                            meta: self.meta.as_ref(),
                            held: &held,
                        };
                        self.work(&mut job, &mut recorded).await;
                        tracing::info!(job = %id, state = ?job.state, "sync job ended");
                    }
                    // Finished, or a record this version cannot read (or
                    // none): no longer open, the record left as it is.
                    Ok(found) => {
                        if found.is_none()
                            && let Err(e) = self.meta.close_job(&id).await
                        {
                            tracing::debug!(job = %id, error = %e, "cannot close a sync job");
                        }
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "cannot read a sync job"),
                }
                held.release().await;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(job = %id, error = %e, "cannot take a sync job's lease"),
        }
        self.driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Syncs every image of `job` not done yet, trying again what failed
    /// for a reason that may pass; `report` is told of every change, and
    /// stops the work by answering false.
    pub async fn work(&self, job: &mut Job, report: &mut dyn Report) {
        let platforms: Vec<Platform> = job
            .platforms
            .iter()
            .filter_map(|p| Platform::parse(p).ok())
            .collect();
        loop {
            let now = now_ms();
            let due = job.images.iter().position(|i| match i.state {
                State::Pending | State::Running => true,
                State::Retrying => i.next_try_ms.is_none_or(|t| t <= now),
                State::Done | State::Failed => false,
            });
            let Some(i) = due else {
                let next = job
                    .images
                    .iter()
                    .filter(|i| i.state == State::Retrying)
                    .filter_map(|i| i.next_try_ms)
                    .min();
                match next {
                    Some(at) => {
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
                        // Renews nothing, but finds a lost lease.
                        if !report.report(job).await {
                            return;
                        }
                        continue;
                    }
                    None => break,
                }
            };
            if !self.work_on(job, i, &platforms, report).await {
                return;
            }
        }
        job.settle();
        job.updated_ms = now_ms();
        report.report(job).await;
    }

    /// One try at image `i`; false when `report` said to stop.
    async fn work_on(
        &self,
        job: &mut Job,
        i: usize,
        platforms: &[Platform],
        report: &mut dyn Report,
    ) -> bool {
        let image = &mut job.images[i];
        // Found running (its driver died) with no tries left: it may be
        // what ends drivers; it is not tried again.
        if image.state == State::Running && image.attempts >= self.retries {
            image.state = State::Failed;
            image
                .error
                .get_or_insert_with(|| "its sync stopped with its replica, too often".into());
            job.settle();
            return report.report(job).await;
        }
        image.state = State::Running;
        image.attempts += 1;
        image.next_try_ms = None;
        let parsed = match self.parse(&image.source) {
            Ok(parsed) => parsed,
            Err(e) => {
                image.state = State::Failed;
                image.error = Some(e.to_string());
                job.settle();
                return report.report(job).await;
            }
        };
        job.settle();
        job.updated_ms = now_ms();
        if !report.report(job).await {
            return false;
        }
        let progress = Progress::default();
        let sync = self.syncer.sync(&parsed, platforms, &progress);
        tokio::pin!(sync);
        let mut ticks = tokio::time::interval(REPORT_EVERY);
        ticks.tick().await;
        let result = loop {
            tokio::select! {
                result = &mut sync => break result,
                _ = ticks.tick() => {
                    progress.apply(&mut job.images[i]);
                    job.updated_ms = now_ms();
                    if !report.report(job).await {
                        return false;
                    }
                }
            }
        };
        let image = &mut job.images[i];
        progress.apply(image);
        match result {
            Ok(()) => {
                image.state = State::Done;
                image.error = None;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, image = %image.source, attempt = image.attempts, error = %e, "syncing an image failed");
                image.error = Some(e.to_string());
                if e.may_pass() && image.attempts < self.retries {
                    image.state = State::Retrying;
                    image.next_try_ms = Some(now_ms() + self.retry_after.as_millis() as u64);
                } else {
                    image.state = State::Failed;
                }
            }
        }
        job.settle();
        job.updated_ms = now_ms();
        report.report(job).await
    }
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
