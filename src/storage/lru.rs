//! The bookkeeping of a size-bounded cache: which keys it holds, their
//! sizes, and which were used least recently. No I/O: the caller removes
//! what `insert` says to evict.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub struct Lru<K> {
    /// key → (size, last use)
    entries: HashMap<K, (u64, u64)>,
    /// last use → key; the first entry is the one to evict next.
    by_use: BTreeMap<u64, K>,
    used: u64,
    budget: u64,
    clock: u64,
}

impl<K: Clone + Eq + Hash> Lru<K> {
    pub fn new(budget: u64) -> Self {
        Self {
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            used: 0,
            budget,
            clock: 0,
        }
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Whether an entry of `size` bytes can be held at all.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.budget
    }

    /// Every key held.
    pub fn keys(&self) -> Vec<K> {
        self.entries.keys().cloned().collect()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Marks `key` as just used; false when it is not held.
    pub fn touch(&mut self, key: &K) -> bool {
        self.clock += 1;
        let Some((_, used_at)) = self.entries.get_mut(key) else {
            return false;
        };
        if let Some(k) = self.by_use.remove(used_at) {
            self.by_use.insert(self.clock, k);
        }
        *used_at = self.clock;
        true
    }

    /// Holds `key` (as just used) and returns the keys to evict so that the
    /// total fits the budget again, least recently used first. An entry
    /// larger than the whole budget is not held: it is returned itself.
    pub fn insert(&mut self, key: K, size: u64) -> Vec<K> {
        if !self.fits(size) {
            self.remove(&key);
            return vec![key];
        }
        self.remove(&key);
        self.clock += 1;
        self.used += size;
        self.by_use.insert(self.clock, key.clone());
        self.entries.insert(key, (size, self.clock));
        self.evict_to_budget()
    }

    /// Evicts least recently used entries until the held bytes fit the
    /// budget.
    fn evict_to_budget(&mut self) -> Vec<K> {
        let mut evicted = Vec::new();
        while self.used > self.budget {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&oldest) {
                self.used -= size;
            }
            evicted.push(oldest);
        }
        evicted
    }

    /// Up to `n` keys in order of use, least recent first, after the
    /// position `after` (one this returned, with its key).
    pub fn oldest_after(&self, after: Option<u64>, n: usize) -> Vec<(u64, K)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.by_use
            .range((start, Bound::Unbounded))
            .take(n)
            .map(|(at, k)| (*at, k.clone()))
            .collect()
    }

    /// Takes the least recently used entry out; its key and size.
    pub fn pop_oldest(&mut self) -> Option<(K, u64)> {
        let (_, oldest) = self.by_use.pop_first()?;
        let (size, _) = self.entries.remove(&oldest)?;
        self.used -= size;
        Some((oldest, size))
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets `key`; false when it was not held.
    pub fn remove(&mut self, key: &K) -> bool {
        let Some((size, used_at)) = self.entries.remove(key) else {
            return false;
        };
        self.by_use.remove(&used_at);
        self.used -= size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn evicts_least_recently_used_until_the_budget_fits() {
        let mut lru = Lru::<String>::new(100);
        assert!(lru.insert("a".into(), 40).is_empty());
        assert!(lru.insert("b".into(), 40).is_empty());
        assert!(lru.touch(&"a".into()));
        // b was used least recently.
        assert_eq!(lru.insert("c".into(), 40), vec!["b".to_owned()]);
        assert_eq!(lru.used(), 80);
        assert!(
            lru.contains(&"a".into()) && lru.contains(&"c".into()) && !lru.contains(&"b".into())
        );
        // Two go for one large entry, oldest first.
        assert_eq!(
            lru.insert("d".into(), 90),
            vec!["a".to_owned(), "c".to_owned()]
        );
        assert_eq!(lru.used(), 90);
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_held() {
        let mut lru = Lru::<String>::new(100);
        lru.insert("a".into(), 50);
        assert!(!lru.fits(101));
        assert_eq!(lru.insert("big".into(), 101), vec!["big".to_owned()]);
        assert!(lru.contains(&"a".into()) && !lru.contains(&"big".into()));
        assert_eq!(lru.used(), 50);
    }

    #[test]
    fn reinserting_replaces_the_size_and_removing_frees_it() {
        let mut lru = Lru::<String>::new(100);
        lru.insert("a".into(), 50);
        lru.insert("a".into(), 30);
        assert_eq!(lru.used(), 30);
        assert!(lru.remove(&"a".into()));
        assert!(!lru.remove(&"a".into()));
        assert!(!lru.touch(&"a".into()));
        assert_eq!(lru.used(), 0);
    }

    #[test]
    fn the_oldest_entry_comes_out_first() {
        let mut lru = Lru::<String>::new(u64::MAX);
        lru.insert("a".into(), 1);
        lru.insert("b".into(), 2);
        lru.touch(&"a".into());
        assert_eq!(lru.pop_oldest(), Some(("b".to_owned(), 2)));
        assert_eq!(lru.pop_oldest(), Some(("a".to_owned(), 1)));
        assert_eq!(lru.pop_oldest(), None);
        assert_eq!((lru.used(), lru.len()), (0, 0));
    }
}
