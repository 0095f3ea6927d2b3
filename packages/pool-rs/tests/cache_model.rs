//! The cache ledger against a naive model: a Vec in LRU order, sums recomputed after every step.

use dilated_attn_pool::cache::{CacheLedger, CacheRefusal, CacheStats};
use proptest::prelude::*;

#[derive(Default)]
struct Model {
    budget: u64,
    /// (id, nbytes), least recently used first.
    lru: Vec<(u64, u64)>,
    peak: u64,
    hits: u64,
    inserts: u64,
    oversize: u64,
    evictions: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.lru.iter().map(|e| e.1).sum()
    }

    fn evict_to(&mut self, limit: u64) -> Vec<u64> {
        let mut evicted = vec![];
        while self.bytes() > limit {
            evicted.push(self.lru.remove(0).0);
            self.evictions += 1;
        }
        evicted
    }

    fn insert(&mut self, id: u64, nbytes: u64) -> Result<Vec<u64>, CacheRefusal> {
        if self.lru.iter().any(|e| e.0 == id) {
            return Err(CacheRefusal::Duplicate { entry_id: id });
        }
        if nbytes > self.budget {
            self.oversize += 1;
            return Ok(vec![id]);
        }
        self.lru.push((id, nbytes));
        self.inserts += 1;
        self.peak = self.peak.max(self.bytes());
        Ok(self.evict_to(self.budget))
    }

    fn take(&mut self, op: &'static str, id: u64) -> Result<(u64, u64), CacheRefusal> {
        match self.lru.iter().position(|e| e.0 == id) {
            Some(pos) => Ok(self.lru.remove(pos)),
            None => Err(CacheRefusal::Unknown { op, entry_id: id }),
        }
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            budget_bytes: self.budget,
            entries: self.lru.len() as u64,
            bytes: self.bytes(),
            peak_bytes: self.peak,
            hits: self.hits,
            inserts: self.inserts,
            oversize: self.oversize,
            evictions: self.evictions,
        }
    }
}

#[derive(Clone, Debug)]
enum Action {
    Insert(u64, u64),
    Touch(u64),
    Remove(u64),
    SetBudget(u64),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u64..24, prop_oneof![8 => 0u64..400, 1 => Just(u64::MAX)]).prop_map(|(i, n)| Action::Insert(i, n)),
        4 => (0u64..24).prop_map(Action::Touch),
        1 => (0u64..24).prop_map(Action::Remove),
        1 => (0u64..2000).prop_map(Action::SetBudget),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cache_ledger_matches_the_model(budget in 0u64..2000, actions in prop::collection::vec(action(), 1..200)) {
        let mut ledger = CacheLedger::new(budget).unwrap();
        let mut model = Model { budget, ..Model::default() };
        for action in actions {
            match action {
                Action::Insert(id, nbytes) => {
                    prop_assert_eq!(ledger.insert(id, nbytes), model.insert(id, nbytes));
                }
                Action::Touch(id) => {
                    let expected = model.take("touch", id).map(|entry| {
                        model.lru.push(entry);
                        model.hits += 1;
                    });
                    prop_assert_eq!(ledger.touch(id), expected);
                }
                Action::Remove(id) => {
                    let expected = model.take("remove", id).map(|entry| entry.1);
                    prop_assert_eq!(ledger.remove(id), expected);
                }
                Action::SetBudget(b) => {
                    model.budget = b;
                    prop_assert_eq!(ledger.set_budget(b), Ok(model.evict_to(b)));
                }
            }
            prop_assert_eq!(ledger.stats(), model.stats());
            prop_assert!(ledger.stats().bytes <= ledger.stats().budget_bytes);
            let order: Vec<u64> = model.lru.iter().map(|e| e.0).collect();
            prop_assert_eq!(ledger.order(), order);
        }
    }
}
