//! Pinned images (`[cache] pinned`): their blobs are never evicted by size
//! or age. A blob is pinned when a repository matching a pin links it (one
//! of its manifests named it, or upstream confirmed it there), as the
//! metadata store records.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::meta::{MetaError, MetaStore};
use crate::reference::Digest;
use crate::route::glob_match;
use crate::storage::Keep;

/// How long the list of pinned repositories is reused: eviction asks for
/// every blob it considers.
const REPOSITORIES_FOR: Duration = Duration::from_secs(60);
/// Repositories read from the catalog per request.
const PAGE: usize = 1000;

pub struct Pins {
    patterns: Vec<String>,
    /// The private namespace's prefix: a repository key whose links are
    /// every digest private content holds, all kept, and whose
    /// repositories' metadata is kept.
    private: Option<String>,
    meta: Arc<dyn MetaStore>,
    /// The cached repositories the pins match, and when they were listed.
    repositories: Mutex<Option<(Instant, Arc<Vec<String>>)>>,
}

impl Pins {
    pub fn new(patterns: Vec<String>, meta: Arc<dyn MetaStore>) -> Self {
        Self {
            patterns,
            private: None,
            meta,
            repositories: Mutex::new(None),
        }
    }

    /// Also keeps everything the private namespace under `prefix` holds.
    pub fn holding(mut self, prefix: Option<String>) -> Self {
        self.private = prefix;
        self
    }

    async fn pinned_repositories(&self) -> Result<Arc<Vec<String>>, MetaError> {
        {
            let cached = self
                .repositories
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((at, repos)) = cached.as_ref()
                && at.elapsed() < REPOSITORIES_FOR
            {
                return Ok(repos.clone());
            }
        }
        let mut pinned = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.repositories(after.as_deref(), PAGE).await?;
            let done = page.len() < PAGE;
            after = page.last().cloned();
            pinned.extend(
                page.into_iter()
                    .filter(|r| self.patterns.iter().any(|p| glob_match(p, r))),
            );
            if done {
                break;
            }
        }
        let pinned = Arc::new(pinned);
        *self
            .repositories
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), pinned.clone()));
        Ok(pinned)
    }
}

#[async_trait]
impl Keep for Pins {
    fn keeps_repository(&self, repo: &str) -> bool {
        self.private
            .as_deref()
            .is_some_and(|p| repo == p || repo.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
            || self.patterns.iter().any(|p| glob_match(p, repo))
    }

    /// When the metadata cannot say, the blob is kept: a pin must hold even
    /// while Redis is down.
    async fn keep(&self, digest: &Digest) -> bool {
        if let Some(private) = &self.private {
            match self.meta.is_linked(private, digest).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether a blob is private; keeping it");
                    return true;
                }
            }
        }
        let repos = match self.pinned_repositories().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list pinned repositories; keeping the blob");
                return true;
            }
        };
        for repo in repos.iter() {
            match self.meta.is_linked(repo, digest).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether a blob is pinned; keeping it");
                    return true;
                }
            }
        }
        false
    }
}
