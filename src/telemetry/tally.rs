//! What this process did since the console last published its figures:
//! counts by name, pulls by repository, and the registry requests that
//! failed. The console's publisher drains it into the metadata store, where
//! every replica's figures add up. Counters that `/metrics` already keeps
//! with fixed labels (bytes served, cache outcomes) are read from there
//! instead of being counted twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// Failures kept between two publications; older ones are dropped.
const FAILURES_HELD: usize = 100;

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
    pub fn add(&self, name: &str, n: u64) {
        if n == 0 {
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
        let mut pulls = lock(&self.pulls);
        match pulls.get_mut(repo) {
            Some(c) => *c += 1,
            None => {
                pulls.insert(repo.to_owned(), 1);
            }
        }
    }

    pub fn failure(&self, failure: Failure) {
        let mut failures = lock(&self.failures);
        if failures.len() == FAILURES_HELD {
            failures.pop_front();
        }
        failures.push_back(failure);
    }

    pub fn take(&self) -> Taken {
        Taken {
            counts: lock(&self.counts).drain().collect(),
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
            *pulls.entry(repo).or_default() += n;
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
    fn take_drains_and_restore_puts_back() {
        let t = Tally::default();
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
        for n in 0..(FAILURES_HELD as u64 + 5) {
            t.failure(failure(n));
        }
        let taken = t.take();
        assert_eq!(taken.failures.len(), FAILURES_HELD);
        assert_eq!(taken.failures[0].at_ms, 5);
    }
}
