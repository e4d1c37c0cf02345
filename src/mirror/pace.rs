//! The pace a fetch nobody reads must keep. A fetch goes on after its
//! clients hang up, so the next client finds the blob stored; but an
//! upstream that trickles bytes would then hold a fetch slot, a lease and
//! a spool file for as long as it likes. Once no client reads the fetch,
//! it must bring at least `min_rate` bytes per second, averaged over a
//! window, or it is abandoned.

use std::time::{Duration, Instant};

pub struct Pace {
    /// Bytes per second; 0 never abandons.
    min_rate: u64,
    window: Duration,
    /// Since when nobody reads, and how many bytes had arrived then; `None`
    /// while someone reads.
    unread_since: Option<(Instant, u64)>,
}

impl Pace {
    pub fn new(min_rate: u64, window: Duration) -> Self {
        Self {
            min_rate,
            window,
            unread_since: None,
        }
    }

    /// Whether to abandon the fetch at `now`, with `received` bytes in and
    /// `readers` clients reading it.
    pub fn too_slow(&mut self, now: Instant, received: u64, readers: usize) -> bool {
        if self.min_rate == 0 || readers > 0 {
            self.unread_since = None;
            return false;
        }
        let (since, at) = *self.unread_since.get_or_insert((now, received));
        let elapsed = now.saturating_duration_since(since);
        if elapsed < self.window {
            return false;
        }
        let want = (self.min_rate as f64 * elapsed.as_secs_f64()) as u64;
        if received - at < want {
            return true;
        }
        // Fast enough over this window: the next one starts now.
        self.unread_since = Some((now, received));
        false
    }

    /// When `too_slow` should be asked next even if no bytes arrive.
    pub fn next_check(&self, now: Instant) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        Some(match self.unread_since {
            Some((since, _)) => (since + self.window).max(now),
            None => now + self.window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unread_fetch_below_the_rate_over_a_whole_window_is_abandoned() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut pace = Pace::new(1000, 10 * s);
        // Read by a client: never.
        assert!(!pace.too_slow(t0, 0, 1));
        assert!(!pace.too_slow(t0 + 100 * s, 0, 1));
        // Unread from 100 s on: not before the window is over.
        assert!(!pace.too_slow(t0 + 100 * s, 0, 0));
        assert!(!pace.too_slow(t0 + 109 * s, 5, 0));
        assert_eq!(pace.next_check(t0 + 109 * s), Some(t0 + 110 * s));
        // 10,000 bytes in the window is the rate: kept, and a new window.
        assert!(!pace.too_slow(t0 + 110 * s, 10_000, 0));
        // 9,999 in the next is not.
        assert!(pace.too_slow(t0 + 120 * s, 19_999, 0));
        // A client coming back resets it.
        assert!(!pace.too_slow(t0 + 121 * s, 19_999, 2));
        assert!(!pace.too_slow(t0 + 122 * s, 19_999, 0));
        assert!(!pace.too_slow(t0 + 131 * s, 19_999, 0));
        assert!(pace.too_slow(t0 + 132 * s, 19_999, 0));
        // A rate of 0 never abandons.
        let mut off = Pace::new(0, s);
        assert!(!off.too_slow(t0 + 1000 * s, 0, 0));
        assert_eq!(off.next_check(t0), None);
    }
}
