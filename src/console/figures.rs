//! The dashboard's figures for the whole cluster, from what every replica
//! published (`publish.rs`): hit ratios and bytes saved, all time and over
//! the last hour, a per-minute series for the charts, each upstream's
//! requests, errors, latency, stale serves and quota, storage against the
//! budget, the most pulled images, and what runs now.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::meta::{MetaError, now_ms};
use crate::mirror::Mirror;

/// Cache outcomes that served from the cache.
const FROM_CACHE: [&str; 3] = ["hit", "revalidated", "stale"];

/// Minutes in the "last hour" window and its chart.
const HOUR: u64 = 60;

/// Most pulled images listed.
const TOP: usize = 10;

#[derive(Debug, Serialize)]
pub struct Stats {
    pub now_ms: u64,
    pub replicas: Vec<ReplicaSeen>,
    pub all_time: Window,
    pub last_hour: Window,
    /// One point per minute of the last hour, oldest first.
    pub minutes: Vec<Point>,
    pub upstreams: Vec<UpstreamFigures>,
    pub storage: Storage,
    pub top_images: Vec<Pulled>,
    pub in_flight: InFlight,
}

#[derive(Debug, Serialize)]
pub struct ReplicaSeen {
    pub name: String,
    pub started_ms: u64,
    pub seen_ms: u64,
}

/// Requests and bytes over a span of time.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Window {
    /// Manifest and blob requests the cache answered, by outcome.
    pub outcomes: BTreeMap<String, u64>,
    pub requests: u64,
    pub from_cache: u64,
    pub hit_ratio: Option<f64>,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
    pub byte_hit_ratio: Option<f64>,
    /// Blob bytes fetched from upstreams.
    pub bytes_fetched: u64,
}

#[derive(Debug, Serialize)]
pub struct Point {
    pub minute_ms: u64,
    pub requests: u64,
    pub from_cache: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct UpstreamFigures {
    pub registry: String,
    pub requests: u64,
    pub errors: u64,
    pub mean_latency_ms: Option<f64>,
    pub stale_serves: u64,
    /// Requests left in its rate-limit window, when it says.
    pub ratelimit_remaining: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Storage {
    pub used_bytes: i64,
    pub blobs: i64,
    pub budget_bytes: Option<u64>,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Pulled {
    pub repository: String,
    pub pulls: u64,
}

#[derive(Debug, Serialize)]
pub struct InFlight {
    pub fetches: usize,
    pub sync_jobs: usize,
}

/// Adds up the counts of one span of time.
fn window(counts: &BTreeMap<String, u64>) -> Window {
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let mut w = Window::default();
    for (name, n) in counts {
        let Some(rest) = name.strip_prefix("cache.") else {
            continue;
        };
        let Some((_kind, outcome)) = rest.split_once('.') else {
            continue;
        };
        *w.outcomes.entry(outcome.to_owned()).or_default() += n;
        w.requests += n;
        if FROM_CACHE.contains(&outcome) {
            w.from_cache += n;
        }
    }
    w.hit_ratio = ratio(w.from_cache, w.requests);
    w.bytes_from_cache = get("bytes.cache");
    w.bytes_from_upstream = get("bytes.upstream");
    w.byte_hit_ratio = ratio(
        w.bytes_from_cache,
        w.bytes_from_cache + w.bytes_from_upstream,
    );
    w.bytes_fetched = get("bytes.fetched");
    w
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Each registry's figures from counts named `upstream.<registry>.<what>`.
fn upstreams(counts: &BTreeMap<String, u64>, registries: &[String]) -> Vec<UpstreamFigures> {
    let mut by: BTreeMap<&str, UpstreamFigures> = registries
        .iter()
        .map(|r| {
            (
                r.as_str(),
                UpstreamFigures {
                    registry: r.clone(),
                    ..UpstreamFigures::default()
                },
            )
        })
        .collect();
    let mut latency: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, n) in counts {
        let Some((registry, what)) = name
            .strip_prefix("upstream.")
            .and_then(|r| r.rsplit_once('.'))
        else {
            continue;
        };
        // Registries no longer configured keep their counts but leave the
        // dashboard.
        let Some(f) = by.get_mut(registry) else {
            continue;
        };
        match what {
            "requests" => f.requests += n,
            "errors" => f.errors += n,
            "stale" => f.stale_serves += n,
            "ms" => *latency.entry(registry).or_default() += n,
            _ => {}
        }
    }
    for (registry, f) in &mut by {
        let ms = latency.get(registry).copied().unwrap_or(0);
        f.mean_latency_ms = (f.requests > 0).then(|| ms as f64 / f.requests as f64);
    }
    by.into_values().collect()
}

/// The dashboard's figures; `registries` are the configured upstreams and
/// `budget` is `[cache] max_size`.
pub async fn stats(
    mirror: &Mirror,
    registries: &[String],
    budget: Option<u64>,
) -> Result<Stats, MetaError> {
    let meta = mirror.meta().as_ref();
    let now = now_ms();
    let minute = now / 60_000;
    let first = minute.saturating_sub(HOUR - 1);
    let counts = meta.counts(first, minute).await?;
    let mut hour: BTreeMap<String, u64> = BTreeMap::new();
    for (_, m) in &counts.minutes {
        for (k, v) in m {
            *hour.entry(k.clone()).or_default() += v;
        }
    }
    let by_minute: BTreeMap<u64, Window> = counts
        .minutes
        .iter()
        .map(|(m, c)| (*m, window(c)))
        .collect();
    let minutes = (first..=minute)
        .map(|m| {
            let w = by_minute.get(&m);
            Point {
                minute_ms: m * 60_000,
                requests: w.map_or(0, |w| w.requests),
                from_cache: w.map_or(0, |w| w.from_cache),
                bytes_from_cache: w.map_or(0, |w| w.bytes_from_cache),
                bytes_from_upstream: w.map_or(0, |w| w.bytes_from_upstream),
            }
        })
        .collect();
    let replicas = super::publish::replica_records(meta).await?;
    let mut upstream_figures = upstreams(&counts.total, registries);
    for f in &mut upstream_figures {
        // The newest word on a quota wins: replicas hear it at different
        // times.
        f.ratelimit_remaining = replicas
            .iter()
            .filter_map(|r| {
                let left = r.quotas.iter().find(|(reg, _)| *reg == f.registry)?.1;
                Some((r.at_ms, left))
            })
            .max_by_key(|(at, _)| *at)
            .map(|(_, left)| left);
    }
    // Every replica counts the same shared store; the newest count wins.
    let stored = replicas
        .iter()
        .filter(|r| r.stored != (0, 0))
        .max_by_key(|r| r.at_ms)
        .map_or((0, 0), |r| r.stored);
    // What [access] hides now stays hidden, whatever was pulled before.
    let top_images = meta
        .top_pulls(TOP + 20)
        .await?
        .into_iter()
        .filter(|(repository, _)| super::repositories::visible(mirror, repository))
        .take(TOP)
        .map(|(repository, pulls)| Pulled { repository, pulls })
        .collect();
    let total = |k: &str| counts.total.get(k).copied().unwrap_or(0);
    Ok(Stats {
        now_ms: now,
        all_time: window(&counts.total),
        last_hour: window(&hour),
        minutes,
        upstreams: upstream_figures,
        storage: Storage {
            used_bytes: stored.0,
            blobs: stored.1,
            budget_bytes: budget,
            evictions: total("evictions"),
            evicted_bytes: total("evicted_bytes"),
        },
        top_images,
        in_flight: InFlight {
            fetches: replicas.iter().map(|r| r.fetches.len()).sum(),
            sync_jobs: meta.open_jobs().await?.len(),
        },
        replicas: replicas
            .into_iter()
            .map(|r| ReplicaSeen {
                name: r.name,
                started_ms: r.started_ms,
                seen_ms: r.at_ms,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn a_window_adds_outcomes_of_both_kinds() {
        let w = window(&counts(&[
            ("cache.blob.hit", 6),
            ("cache.manifest.revalidated", 1),
            ("cache.manifest.stale", 1),
            ("cache.blob.miss", 2),
            ("bytes.cache", 300),
            ("bytes.upstream", 100),
            ("bytes.fetched", 100),
            ("evictions", 4),
        ]));
        assert_eq!(w.requests, 10);
        assert_eq!(w.from_cache, 8);
        assert_eq!(w.hit_ratio, Some(0.8));
        assert_eq!(w.byte_hit_ratio, Some(0.75));
        assert_eq!(w.outcomes.get("miss"), Some(&2));
        assert_eq!(window(&BTreeMap::new()).hit_ratio, None);
    }

    #[test]
    fn upstream_counts_split_at_the_last_dot() {
        let figures = upstreams(
            &counts(&[
                ("upstream.docker.io.requests", 4),
                ("upstream.docker.io.errors", 1),
                ("upstream.docker.io.ms", 200),
                ("upstream.docker.io.stale", 2),
                ("upstream.gone.example.requests", 9),
            ]),
            &["docker.io".to_owned(), "quay.io".to_owned()],
        );
        assert_eq!(
            figures,
            vec![
                UpstreamFigures {
                    registry: "docker.io".into(),
                    requests: 4,
                    errors: 1,
                    mean_latency_ms: Some(50.0),
                    stale_serves: 2,
                    ratelimit_remaining: None,
                },
                UpstreamFigures {
                    registry: "quay.io".into(),
                    ..UpstreamFigures::default()
                },
            ]
        );
    }
}
