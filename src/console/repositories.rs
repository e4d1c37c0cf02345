//! What the cache holds, by repository: a search over cached repositories
//! by substring, and a repository's tags with what each names. Repositories
//! `[access]` hides stay hidden. Reads the metadata store only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::descriptors::references;
use crate::meta::{MetaError, UseKind};
use crate::mirror::Mirror;
use crate::reference::{Digest, RepoName};
use crate::route::Target;
use crate::sync::index_entries;

/// Repositories read from the metadata store per round trip when the
/// list is loaded.
const PAGE: usize = 10_000;

/// How long a loaded list of repositories answers searches: typing a
/// query costs one load, and a repository pulled a moment ago shows after
/// at most this long.
const FRESH_FOR: Duration = Duration::from_secs(5);

/// Every cached repository's name, in order, as last loaded from the
/// metadata store. A search is a scan of this list in memory, which takes
/// milliseconds at 100,000 repositories; loading it takes one round trip
/// per `PAGE` names, and happens at most once per `FRESH_FOR`.
#[derive(Default)]
pub struct RepoNames {
    loaded: tokio::sync::Mutex<Option<(Instant, Arc<Vec<String>>)>>,
}

impl RepoNames {
    async fn names(&self, mirror: &Mirror) -> Result<Arc<Vec<String>>, MetaError> {
        // Held while loading: concurrent searches wait for one load.
        let mut loaded = self.loaded.lock().await;
        if let Some((at, names)) = loaded.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return Ok(names.clone());
        }
        let mut names = Vec::new();
        loop {
            let page = mirror
                .meta()
                .repositories(names.last().map(String::as_str), PAGE)
                .await?;
            let end = page.len() < PAGE;
            names.extend(page);
            if end {
                break;
            }
        }
        let names = Arc::new(names);
        *loaded = Some((Instant::now(), names.clone()));
        Ok(names)
    }
}

#[derive(Debug, Serialize)]
pub struct RepoPage {
    pub repositories: Vec<String>,
    /// Where the next page starts (pass as `last`), when there may be more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TagInfo {
    pub tag: String,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// How long ago upstream last confirmed the tag, in seconds.
    pub confirmed_secs_ago: u64,
    /// How long ago the manifest was last served, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled_secs_ago: Option<u64>,
    /// An image's config and layers, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// An index's platforms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
}

/// `<registry>/<repository>` as a target, if it is one.
fn target_of(name: &str) -> Option<Target> {
    let (registry, repository) = name.split_once('/')?;
    Some(Target {
        registry: registry.to_owned(),
        repository: RepoName::parse(repository).ok()?,
    })
}

pub(super) fn visible(mirror: &Mirror, name: &str) -> bool {
    target_of(name).is_some_and(|t| mirror.policy.check(&t).is_ok())
}

/// Cached repositories whose name contains `q`, in name order after
/// `last`: `n` at most.
pub async fn search(
    mirror: &Mirror,
    names: &RepoNames,
    q: &str,
    last: Option<&str>,
    n: usize,
) -> Result<RepoPage, MetaError> {
    let q = q.trim().to_ascii_lowercase();
    let all = names.names(mirror).await?;
    let from = last.map_or(0, |l| all.partition_point(|name| name.as_str() <= l));
    let mut found = Vec::new();
    for name in &all[from..] {
        if name.contains(&q) && visible(mirror, name) {
            if found.len() == n {
                return Ok(RepoPage {
                    next: found.last().cloned(),
                    repositories: found,
                });
            }
            found.push(name.clone());
        }
    }
    Ok(RepoPage {
        repositories: found,
        next: None,
    })
}

/// A cached repository's tags, `None` when it is not cached or hidden.
pub async fn repository(mirror: &Mirror, name: &str) -> Result<Option<Vec<TagInfo>>, MetaError> {
    if !visible(mirror, name) {
        return Ok(None);
    }
    let meta = mirror.meta();
    let tags = meta.tags(name).await?;
    if tags.is_empty() && meta.links(name).await?.is_empty() {
        return Ok(None);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut out = Vec::new();
    for tag in tags {
        let Some(record) = meta.tag(name, &tag).await? else {
            continue;
        };
        let Ok(digest) = Digest::parse(&record.digest) else {
            continue;
        };
        let manifest = meta.manifest(&digest).await?;
        let pulled = meta
            .last_uses(UseKind::Manifests, std::slice::from_ref(&digest))
            .await?
            .first()
            .copied()
            .flatten();
        let (mut size, mut platforms) = (None, Vec::new());
        if let Some(m) = &manifest {
            match index_entries(&m.bytes) {
                Some(entries) => {
                    platforms = entries
                        .iter()
                        .filter_map(|e| e.platform.as_ref().map(ToString::to_string))
                        .collect();
                }
                None => size = Some(references(&m.bytes).sizes.iter().map(|(_, s)| s).sum()),
            }
        }
        out.push(TagInfo {
            tag,
            digest: record.digest,
            media_type: manifest.map(|m| m.media_type),
            confirmed_secs_ago: now.saturating_sub(record.checked_at_ms) / 1000,
            pulled_secs_ago: pulled.map(|at| now.saturating_sub(at) / 1000),
            size,
            platforms,
        });
    }
    Ok(Some(out))
}
