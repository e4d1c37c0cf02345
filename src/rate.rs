//! Request-rate limiting by the generic cell rate algorithm: each key has a
//! theoretical arrival time (TAT); a request is allowed while the TAT runs
//! ahead of now by no more than the burst allows. One number per key, no
//! timers. The Redis metadata store runs the same rule in a script.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A sustained rate and a burst, as the rule needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Microseconds between requests at the sustained rate.
    pub interval_us: u64,
    /// How far (µs) the TAT may run ahead of now: `burst - 1` intervals.
    pub tolerance_us: u64,
}

impl Rate {
    /// `per_second` requests sustained, `burst` at once (at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval_us = 1_000_000 / u64::from(per_second.max(1));
        Self {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1) - 1),
        }
    }
}

/// One decision: the key's new TAT, or how long to wait before asking again.
pub fn decide(tat_us: Option<u64>, now_us: u64, rate: Rate) -> Result<u64, Duration> {
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let ahead = tat - now_us;
    if ahead > rate.tolerance_us {
        return Err(Duration::from_micros(ahead - rate.tolerance_us));
    }
    Ok(tat + rate.interval_us)
}

/// The rule over an in-process table (one replica, or Redis unreachable).
pub struct LocalRates {
    epoch: Instant,
    tats: Mutex<HashMap<String, u64>>,
}

/// Entries kept before stale ones are swept.
const SWEEP_AT: usize = 65_536;

impl Default for LocalRates {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalRates {
    /// `Ok` when `key` may make a request now, else how long to wait.
    pub fn check(&self, key: &str, rate: Rate) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut tats = self
            .tats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tats.len() >= SWEEP_AT {
            // A TAT in the past carries no state: the key starts afresh.
            tats.retain(|_, tat| *tat > now);
        }
        let tat = decide(tats.get(key).copied(), now, rate)?;
        tats.insert(key.to_owned(), tat);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let rate = Rate::new(10, 3); // every 100 ms, 3 at once
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(decide(tat, 0, rate).unwrap());
        }
        // The fourth at the same instant waits one interval.
        assert_eq!(decide(tat, 0, rate), Err(Duration::from_millis(100)));
        assert_eq!(decide(tat, 40_000, rate), Err(Duration::from_millis(60)));
        assert!(decide(tat, 100_000, rate).is_ok());
        // After a long pause the key is as new.
        assert_eq!(decide(tat, 10_000_000, rate), Ok(10_100_000));
    }

    #[test]
    fn burst_of_one_is_the_plain_rate() {
        let rate = Rate::new(2, 0);
        let tat = decide(None, 0, rate).unwrap();
        assert_eq!(decide(Some(tat), 0, rate), Err(Duration::from_millis(500)));
    }

    #[test]
    fn local_keys_are_independent() {
        let rates = LocalRates::default();
        let rate = Rate::new(1, 1);
        assert!(rates.check("a", rate).is_ok());
        assert!(rates.check("a", rate).is_err());
        assert!(rates.check("b", rate).is_ok());
    }
}
