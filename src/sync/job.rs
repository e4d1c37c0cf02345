//! A sync job as the API shows it and the metadata store keeps it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Running,
    /// Failed for a reason that may pass; tried again at `next_try_ms`.
    Retrying,
    Done,
    Failed,
}

impl State {
    pub fn finished(self) -> bool {
        matches!(self, State::Done | State::Failed)
    }
}

/// One image of a job and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageJob {
    /// As it was asked for.
    pub image: String,
    /// Where it comes from: `<registry>/<repository>:<tag>` (or `@digest`).
    pub source: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The platforms taken from an index (empty for a single image).
    #[serde(default)]
    pub platforms: Vec<String>,
    pub blobs_done: u64,
    pub blobs_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_try_ms: Option<u64>,
}

impl ImageJob {
    pub fn new(image: String, source: String) -> Self {
        Self {
            image,
            source,
            state: State::Pending,
            digest: None,
            platforms: Vec::new(),
            blobs_done: 0,
            blobs_total: 0,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
            attempts: 0,
            next_try_ms: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub state: State,
    /// The platforms asked for; empty: all.
    #[serde(default)]
    pub platforms: Vec<String>,
    pub images: Vec<ImageJob>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The `[[sync.images]]` entry (its image) that made the job, if one
    /// did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
}

impl Job {
    /// The job's state from its images'.
    pub fn settle(&mut self) {
        let states = || self.images.iter().map(|i| i.state);
        self.state = if states().all(|s| s == State::Pending) {
            State::Pending
        } else if !states().all(State::finished) {
            State::Running
        } else if states().any(|s| s == State::Failed) {
            State::Failed
        } else {
            State::Done
        };
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A new job id: the creation time in ms and a random part, in hex, so ids
/// sort by age.
pub fn new_id(now_ms: u64) -> String {
    format!("{now_ms:012x}{:08x}", rand::random::<u32>())
}

/// Whether `id` could be one `new_id` made (anything else is not looked up).
pub fn is_id(id: &str) -> bool {
    (16..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_job_is_as_far_as_its_images() {
        let mut job = Job {
            id: new_id(1),
            state: State::Pending,
            platforms: Vec::new(),
            images: vec![
                ImageJob::new("a".into(), "docker.io/library/a:latest".into()),
                ImageJob::new("b".into(), "docker.io/library/b:latest".into()),
            ],
            created_ms: 1,
            updated_ms: 1,
            list: None,
        };
        job.settle();
        assert_eq!(job.state, State::Pending);
        job.images[0].state = State::Done;
        job.settle();
        assert_eq!(job.state, State::Running);
        job.images[1].state = State::Failed;
        job.settle();
        assert_eq!(job.state, State::Failed);
        job.images[1].state = State::Done;
        job.settle();
        assert_eq!(job.state, State::Done);
        let back = Job::from_json(&job.to_json()).unwrap();
        assert_eq!(back, job);
        assert!(is_id(&job.id));
        assert!(!is_id("../../etc") && !is_id("abc"));
        assert!(new_id(2) > new_id(1));
    }
}
