//! What this process did since the console last published its figures:
//! cache outcomes, counts by name, pulls by repository, and the registry
//! requests that failed. The console's publisher drains it into the
//! metadata store, where every replica's figures add up. Bytes served are
//! read from `/metrics` instead. Until a publisher starts (the console is
//! on), nothing is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// Failures kept between two publications; older ones are dropped.
const FAILURES_HELD: usize = 100;

/// Repositories whose pulls are kept between two publications; pulls of
/// others wait for the next round (only while the store cannot be written
/// does the map fill).
const PULLS_HELD: usize = 10_000;

/// The cache outcomes of manifest and blob requests, as `/metrics` names
/// them; counted with one atomic add each, as every request has one.
pub const KINDS: [&str; 2] = ["manifest", "blob"];
pub const OUTCOMES: [&str; 6] = [
    "hit",
    "revalidated",
    "stale",
    "miss",
    "joined",
    "passthrough",
];

/// A registry request answered with an error, as the console lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub message: String,
    /// The replica that answered; set when published.
    #[serde(default)]
    pub replica: String,
}

#[derive(Default)]
pub struct Tally {
    on: AtomicBool,
    outcomes: [[AtomicU64; OUTCOMES.len()]; KINDS.len()],
    counts: Mutex<HashMap<String, u64>>,
    pulls: Mutex<HashMap<String, u64>>,
    failures: Mutex<VecDeque<Failure>>,
}

/// What [`Tally::take`] drained.
#[derive(Debug, Default)]
pub struct Taken {
    pub counts: Vec<(String, u64)>,
    pub pulls: Vec<(String, u64)>,
    pub failures: Vec<Failure>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tally {
    /// From now on, keep what is counted: a publisher drains it.
    pub fn start(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// One manifest or blob request's cache outcome.
    pub fn outcome(&self, kind: &str, outcome: &str) {
        if !self.on() {
            return;
        }
        if let (Some(k), Some(o)) = (
            KINDS.iter().position(|x| *x == kind),
            OUTCOMES.iter().position(|x| *x == outcome),
        ) {
            self.outcomes[k][o].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add(&self, name: &str, n: u64) {
        if n == 0 || !self.on() {
            return;
        }
        let mut counts = lock(&self.counts);
        match counts.get_mut(name) {
            Some(c) => *c += n,
            None => {
                counts.insert(name.to_owned(), n);
            }
        }
    }

    /// One manifest served by tag or digest for `repo` (`registry/name`).
    pub fn pull(&self, repo: &str) {
        if !self.on() {
            return;
        }
        let mut pulls = lock(&self.pulls);
        let room = pulls.len() < PULLS_HELD;
        match pulls.get_mut(repo) {
            Some(c) => *c += 1,
            None if room => {
                pulls.insert(repo.to_owned(), 1);
            }
            None => {}
        }
    }

    pub fn failure(&self, failure: Failure) {
        if !self.on() {
            return;
        }
        let mut failures = lock(&self.failures);
        if failures.len() == FAILURES_HELD {
            failures.pop_front();
        }
        failures.push_back(failure);
    }

    pub fn take(&self) -> Taken {
        let mut counts: Vec<(String, u64)> = lock(&self.counts).drain().collect();
        for (k, kind) in KINDS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.outcomes[k][o].swap(0, Ordering::Relaxed);
                if n > 0 {
                    counts.push((format!("cache.{kind}.{outcome}"), n));
                }
            }
        }
        Taken {
            counts,
            pulls: lock(&self.pulls).drain().collect(),
            failures: lock(&self.failures).drain(..).collect(),
        }
    }

    /// Puts back what could not be published, so the next round carries it.
    pub fn restore(&self, taken: Taken) {
        for (name, n) in taken.counts {
            self.add(&name, n);
        }
        let mut pulls = lock(&self.pulls);
        for (repo, n) in taken.pulls {
            if pulls.len() < PULLS_HELD || pulls.contains_key(&repo) {
                *pulls.entry(repo).or_default() += n;
            }
        }
        drop(pulls);
        let mut failures = lock(&self.failures);
        for f in taken.failures.into_iter().rev() {
            if failures.len() < FAILURES_HELD {
                failures.push_front(f);
            }
        }
    }
}

/// The process-wide tally.
pub fn tally() -> &'static Tally {
    static TALLY: OnceLock<Tally> = OnceLock::new();
    TALLY.get_or_init(Tally::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(n: u64) -> Failure {
        Failure {
            at_ms: n,
            method: "GET".into(),
            path: format!("/v2/x/manifests/{n}"),
            status: 404,
            message: "unknown".into(),
            replica: String::new(),
        }
    }

    #[test]
    fn nothing_is_kept_until_started() {
        let t = Tally::default();
        t.add("a", 1);
        t.outcome("blob", "hit");
        t.pull("docker.io/library/alpine");
        let taken = t.take();
        assert!(taken.counts.is_empty() && taken.pulls.is_empty());
    }

    #[test]
    fn outcomes_count_by_kind() {
        let t = Tally::default();
        t.start();
        t.outcome("blob", "hit");
        t.outcome("blob", "hit");
        t.outcome("manifest", "stale");
        t.outcome("blob", "nonsense");
        let mut counts = t.take().counts;
        counts.sort();
        assert_eq!(
            counts,
            vec![
                ("cache.blob.hit".to_owned(), 2),
                ("cache.manifest.stale".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn take_drains_and_restore_puts_back() {
        let t = Tally::default();
        t.start();
        t.add("a", 2);
        t.add("a", 3);
        t.add("b", 0);
        t.pull("docker.io/library/alpine");
        t.failure(failure(1));
        let taken = t.take();
        assert_eq!(taken.counts, vec![("a".to_owned(), 5)]);
        assert_eq!(
            taken.pulls,
            vec![("docker.io/library/alpine".to_owned(), 1)]
        );
        assert_eq!(taken.failures.len(), 1);
        assert!(t.take().counts.is_empty());
        t.add("a", 1);
        t.restore(taken);
        let again = t.take();
        assert_eq!(again.counts, vec![("a".to_owned(), 6)]);
        assert_eq!(again.failures, vec![failure(1)]);
    }

    #[test]
    fn failures_keep_the_newest() {
        let t = Tally::default();
        t.start();
        for n in 0..(FAILURES_HELD as u64 + 5) {
            t.failure(failure(n));
        }
        let taken = t.take();
        assert_eq!(taken.failures.len(), FAILURES_HELD);
        assert_eq!(taken.failures[0].at_ms, 5);
    }
}
