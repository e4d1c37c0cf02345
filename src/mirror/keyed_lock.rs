//! Per-key coordination inside one process: an async mutex per key, created
//! on demand and dropped when unused, so concurrent requests for one tag
//! revalidate it once; and a memory of keys whose upstream just failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    map.retain(|_, w| w.strong_count() > 0);
                    let l = Arc::new(AsyncMutex::new(()));
                    map.insert(key.to_owned(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Keys whose upstream failed recently, so the next requests serve their
/// cached copy at once instead of waiting out the same failure.
pub struct RecentFailures {
    until: Mutex<HashMap<String, Instant>>,
    window: Duration,
}

impl RecentFailures {
    pub fn new(window: Duration) -> Self {
        Self {
            until: Mutex::new(HashMap::new()),
            window,
        }
    }

    pub fn note(&self, key: &str) {
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        map.insert(key.to_owned(), now + self.window);
    }

    pub fn recent(&self, key: &str) -> bool {
        let map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).is_some_and(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_remembered_for_a_window() {
        let f = RecentFailures::new(Duration::from_millis(50));
        assert!(!f.recent("a"));
        f.note("a");
        assert!(f.recent("a"));
        assert!(!f.recent("b"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!f.recent("a"));
    }

    #[tokio::test]
    async fn same_key_serializes_other_keys_do_not() {
        let locks = Arc::new(KeyedLocks::default());
        let a = locks.lock("a").await;
        let _b = locks.lock("b").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock("a").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
    }
}
