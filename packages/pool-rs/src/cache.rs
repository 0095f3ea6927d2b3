//! The bookkeeping of `dilated_attn.cache`: entry ids, their sizes, one exact LRU and a byte budget.
//!
//! Semantics are those of `dilated_attn.pool.cache_ledger.PythonCacheLedger`, decision for
//! decision. The values cached live on the Python side; this ledger only decides which ids to
//! evict. An entry larger than the whole budget is never kept: `insert` reports it back as evicted
//! at once and counts it as `oversize`, leaving every other entry in place.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::hashing::IdBuildHasher;
use crate::rounding::MAX_REQUEST_BYTES;

/// The names of `CacheStats::to_array`'s entries, in order; `dilated_attn.pool.cache_ledger`
/// lists the same names (checked when `dilated_attn_pool` is imported).
pub const CACHE_STATS_KEYS: [&str; 8] = [
    "budget_bytes",
    "entries",
    "bytes",
    "peak_bytes",
    "hits",
    "inserts",
    "oversize",
    "evictions",
];

/// A budget must be below this (as a pool's `budget_bytes`), so the bytes held always fit a `u64`.
pub const MAX_CACHE_BUDGET_BYTES: u64 = MAX_REQUEST_BYTES;

/// Counters and totals of a cache ledger; `hits` counts `touch`es.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub budget_bytes: u64,
    pub entries: u64,
    pub bytes: u64,
    pub peak_bytes: u64,
    pub hits: u64,
    pub inserts: u64,
    pub oversize: u64,
    pub evictions: u64,
}

impl CacheStats {
    pub fn to_array(&self) -> [u64; 8] {
        [
            self.budget_bytes,
            self.entries,
            self.bytes,
            self.peak_bytes,
            self.hits,
            self.inserts,
            self.oversize,
            self.evictions,
        ]
    }
}

/// Why the cache ledger refused an operation; a refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRefusal {
    /// `insert` of an id the ledger already holds.
    Duplicate { entry_id: u64 },
    /// `touch` or `remove` of an id the ledger does not hold.
    Unknown { op: &'static str, entry_id: u64 },
    /// A budget of `MAX_CACHE_BUDGET_BYTES` or more.
    BudgetTooLarge { budget: u64 },
}

impl fmt::Display for CacheRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CacheRefusal::Duplicate { entry_id } => write!(
                f,
                "insert: entry {entry_id} is already held; insert each id once"
            ),
            CacheRefusal::Unknown { op, entry_id } => write!(
                f,
                "{op}: entry {entry_id} is not held (it was evicted, removed or never inserted)"
            ),
            CacheRefusal::BudgetTooLarge { budget } => {
                write!(f, "budget_bytes={budget} must be >= 0 and < 2**62")
            }
        }
    }
}

impl std::error::Error for CacheRefusal {}

#[derive(Debug)]
struct Entry {
    nbytes: u64,
    stamp: u64,
}

/// A keyed LRU of sizes under a byte budget. Not thread-safe by itself: callers hold a lock.
#[derive(Debug)]
pub struct CacheLedger {
    entries: HashMap<u64, Entry, IdBuildHasher>,
    /// Entries by the stamp of their last insert or touch: the first is the least recently used.
    lru: BTreeMap<u64, u64>,
    next_stamp: u64,
    stats: CacheStats,
}

impl CacheLedger {
    /// An empty ledger holding at most `budget` bytes of entries.
    pub fn new(budget: u64) -> Result<Self, CacheRefusal> {
        check_budget(budget)?;
        Ok(CacheLedger {
            entries: HashMap::default(),
            lru: BTreeMap::new(),
            next_stamp: 0,
            stats: CacheStats {
                budget_bytes: budget,
                ..CacheStats::default()
            },
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Add `entry_id` of `nbytes` as the most recently used entry and evict least recently used
    /// ones until the bytes held fit the budget; returns the evicted ids. An entry larger than the
    /// budget is not kept: the result is `[entry_id]` and nothing else changes but `oversize`.
    pub fn insert(&mut self, entry_id: u64, nbytes: u64) -> Result<Vec<u64>, CacheRefusal> {
        if self.entries.contains_key(&entry_id) {
            return Err(CacheRefusal::Duplicate { entry_id });
        }
        if nbytes > self.stats.budget_bytes {
            self.stats.oversize += 1;
            return Ok(vec![entry_id]);
        }
        let stamp = self.stamp();
        self.entries.insert(entry_id, Entry { nbytes, stamp });
        self.lru.insert(stamp, entry_id);
        self.stats.inserts += 1;
        self.stats.entries += 1;
        // bytes <= budget < 2**62 before, nbytes <= budget: the sum fits.
        self.stats.bytes += nbytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
        Ok(self.evict_to(self.stats.budget_bytes))
    }

    /// Mark `entry_id` as the most recently used (a hit).
    pub fn touch(&mut self, entry_id: u64) -> Result<(), CacheRefusal> {
        let stamp = self.stamp();
        let entry = self
            .entries
            .get_mut(&entry_id)
            .ok_or(CacheRefusal::Unknown {
                op: "touch",
                entry_id,
            })?;
        self.lru.remove(&entry.stamp);
        entry.stamp = stamp;
        self.lru.insert(stamp, entry_id);
        self.stats.hits += 1;
        Ok(())
    }

    /// Forget `entry_id` (not an eviction); returns its size.
    pub fn remove(&mut self, entry_id: u64) -> Result<u64, CacheRefusal> {
        let entry = self
            .entries
            .remove(&entry_id)
            .ok_or(CacheRefusal::Unknown {
                op: "remove",
                entry_id,
            })?;
        self.lru.remove(&entry.stamp);
        self.stats.entries -= 1;
        self.stats.bytes -= entry.nbytes;
        Ok(entry.nbytes)
    }

    /// A new budget; evicts least recently used entries until the bytes held fit it.
    pub fn set_budget(&mut self, budget: u64) -> Result<Vec<u64>, CacheRefusal> {
        check_budget(budget)?;
        self.stats.budget_bytes = budget;
        Ok(self.evict_to(budget))
    }

    /// Held ids, least recently used first.
    pub fn order(&self) -> Vec<u64> {
        self.lru.values().copied().collect()
    }

    fn stamp(&mut self) -> u64 {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        stamp
    }

    fn evict_to(&mut self, limit: u64) -> Vec<u64> {
        let mut evicted = Vec::new();
        while self.stats.bytes > limit {
            let Some((_, entry_id)) = self.lru.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&entry_id) {
                self.stats.bytes -= entry.nbytes;
            }
            self.stats.entries -= 1;
            self.stats.evictions += 1;
            evicted.push(entry_id);
        }
        evicted
    }
}

fn check_budget(budget: u64) -> Result<(), CacheRefusal> {
    if budget >= MAX_CACHE_BUDGET_BYTES {
        return Err(CacheRefusal::BudgetTooLarge { budget });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first() {
        let mut c = CacheLedger::new(300).unwrap();
        assert!(c.insert(1, 100).unwrap().is_empty());
        assert!(c.insert(2, 100).unwrap().is_empty());
        assert!(c.insert(3, 100).unwrap().is_empty());
        c.touch(1).unwrap();
        assert_eq!(c.insert(4, 150).unwrap(), vec![2, 3]);
        assert_eq!(c.order(), vec![1, 4]);
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.evictions, s.hits), (2, 250, 2, 1));
    }

    #[test]
    fn an_entry_over_the_budget_is_not_kept() {
        let mut c = CacheLedger::new(100).unwrap();
        c.insert(1, 60).unwrap();
        assert_eq!(c.insert(2, 101).unwrap(), vec![2]);
        assert_eq!(c.order(), vec![1]);
        assert_eq!((c.stats().oversize, c.stats().evictions), (1, 0));
        assert_eq!(
            c.touch(2),
            Err(CacheRefusal::Unknown {
                op: "touch",
                entry_id: 2
            })
        );
    }

    #[test]
    fn misuse_is_refused_and_changes_nothing() {
        let mut c = CacheLedger::new(100).unwrap();
        c.insert(1, 10).unwrap();
        let before = c.stats();
        assert_eq!(
            c.insert(1, 10),
            Err(CacheRefusal::Duplicate { entry_id: 1 })
        );
        assert_eq!(
            c.remove(9),
            Err(CacheRefusal::Unknown {
                op: "remove",
                entry_id: 9
            })
        );
        assert_eq!(
            c.set_budget(u64::MAX),
            Err(CacheRefusal::BudgetTooLarge { budget: u64::MAX })
        );
        assert_eq!(c.stats(), before);
        assert!(CacheLedger::new(MAX_CACHE_BUDGET_BYTES).is_err());
        assert_eq!(c.insert(2, u64::MAX).unwrap(), vec![2]);
    }

    #[test]
    fn a_lower_budget_evicts_at_once() {
        let mut c = CacheLedger::new(1000).unwrap();
        for id in 0..10 {
            c.insert(id, 100).unwrap();
        }
        assert_eq!(c.set_budget(250).unwrap(), (0..8).collect::<Vec<u64>>());
        assert_eq!(c.remove(9).unwrap(), 100);
        assert_eq!((c.stats().bytes, c.stats().peak_bytes), (100, 1000));
    }
}
