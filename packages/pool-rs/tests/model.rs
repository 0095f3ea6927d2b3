//! The ledger against a deliberately naive model: linear scans, one Vec for the LRU, stats summed
//! from scratch after every step. Random action sequences must agree on every result and every
//! stat; the ledger's invariants are checked on the way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use dilated_attn_pool::events::{Event, EventKind};
use dilated_attn_pool::ledger::{Grant, Ledger, Op, Refusal, Stats};
use dilated_attn_pool::rounding::{MAX_REQUEST_BYTES, MAX_RESERVED_BYTES};
use proptest::prelude::*;

/// Rounding by enumeration: the first multiple of 512 (up to 1 MiB) or the first quarter step of
/// the power-of-two interval (above) that holds the request.
fn model_round(nbytes: u64) -> u64 {
    if nbytes <= 1 << 20 {
        let mut size = 512;
        while size < nbytes {
            size += 512;
        }
        return size;
    }
    let mut floor = 1u64;
    while floor * 2 <= nbytes {
        floor *= 2;
    }
    (4..=8)
        .map(|k| floor / 4 * k)
        .find(|&size| size >= nbytes)
        .unwrap()
}

#[derive(Clone, Debug)]
struct ModelBuffer {
    id: u64,
    device: u32,
    dtype: u32,
    rounded: u64,
    requested: u64,
    serial: u64,
    leased: bool,
    pins: u32,
    /// The peaks before the allocating lease, while that lease is held.
    peaks_before: Option<(u64, u64)>,
}

#[derive(Default)]
struct Model {
    budget: Option<u64>,
    buffers: Vec<ModelBuffer>,
    /// Free ids, least recently freed first.
    lru: Vec<u64>,
    next_id: u64,
    next_serial: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    peak_reserved: u64,
    peak_in_use: u64,
}

impl Model {
    fn find(&mut self, id: u64) -> Option<&mut ModelBuffer> {
        self.buffers.iter_mut().find(|b| b.id == id)
    }

    fn acquire(&mut self, device: u32, dtype: u32, nbytes: u64) -> Result<Grant, Refusal> {
        if nbytes >= MAX_REQUEST_BYTES {
            return Err(Refusal::TooLarge { nbytes });
        }
        let rounded = model_round(nbytes);
        let buffers = &self.buffers;
        let warmest = self.lru.iter().rposition(|id| {
            let b = buffers.iter().find(|b| b.id == *id).unwrap();
            (b.device, b.dtype, b.rounded) == (device, dtype, rounded)
        });
        let reserved = self.stats().reserved_bytes;
        if warmest.is_none()
            && u128::from(reserved) + u128::from(rounded) > u128::from(MAX_RESERVED_BYTES)
        {
            return Err(Refusal::OverReserve {
                nbytes,
                rounded,
                reserved,
            });
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let grant = match warmest {
            Some(pos) => {
                let id = self.lru.remove(pos);
                let b = self.find(id).unwrap();
                assert!(
                    !b.leased && b.pins == 0,
                    "a free buffer is neither leased nor pinned"
                );
                (b.serial, b.requested, b.leased) = (serial, nbytes, true);
                self.hits += 1;
                Grant {
                    buffer_id: id,
                    serial,
                    alloc_bytes: 0,
                }
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let peaks_before = Some((self.peak_reserved, self.peak_in_use));
                self.buffers.push(ModelBuffer {
                    id,
                    device,
                    dtype,
                    rounded,
                    requested: nbytes,
                    serial,
                    leased: true,
                    pins: 0,
                    peaks_before,
                });
                self.misses += 1;
                Grant {
                    buffer_id: id,
                    serial,
                    alloc_bytes: rounded,
                }
            }
        };
        let s = self.stats();
        self.peak_reserved = self.peak_reserved.max(s.reserved_bytes);
        self.peak_in_use = self.peak_in_use.max(s.in_use_bytes);
        Ok(grant)
    }

    fn held(&mut self, id: u64, serial: u64, op: Op) -> Result<&mut ModelBuffer, Refusal> {
        match self.find(id) {
            None => Err(Refusal::Unknown { op, buffer_id: id }),
            Some(b) if b.serial != serial || !b.leased => {
                Err(Refusal::Released { op, buffer_id: id })
            }
            Some(b) => Ok(b),
        }
    }

    fn abandon(&mut self, id: u64, serial: u64) -> Result<(), Refusal> {
        let b = self.held(id, serial, Op::Abandon)?;
        if let Some((reserved, in_use)) = b.peaks_before {
            let rounded = b.rounded;
            self.peak_reserved = reserved.max(self.peak_reserved - rounded);
            self.peak_in_use = in_use.max(self.peak_in_use - rounded);
        }
        self.buffers.retain(|b| b.id != id);
        Ok(())
    }

    fn release(&mut self, id: u64, serial: u64) -> Result<Vec<u64>, Refusal> {
        let b = self.held(id, serial, Op::Release)?;
        b.leased = false;
        b.peaks_before = None;
        if b.pins > 0 {
            return Ok(vec![]);
        }
        self.lru.push(id);
        Ok(self.evict_to(self.budget))
    }

    fn pin(&mut self, id: u64, serial: u64) -> Result<(), Refusal> {
        let (free, pinned, budget) = {
            let s = self.stats();
            (s.free_bytes, s.pinned_bytes, self.budget)
        };
        let b = self.held(id, serial, Op::Pin)?;
        if b.pins == 0 && budget.is_some_and(|budget| pinned + b.rounded > budget) {
            return Err(Refusal::OverBudget {
                buffer_id: id,
                requested: b.rounded,
                free,
                pinned,
                budget: budget.unwrap(),
            });
        }
        b.pins += 1;
        Ok(())
    }

    fn unpin(&mut self, id: u64, serial: u64) -> Result<Vec<u64>, Refusal> {
        let b = self.find(id).ok_or(Refusal::Unknown {
            op: Op::Unpin,
            buffer_id: id,
        })?;
        if b.serial != serial {
            return Err(Refusal::Stale { buffer_id: id });
        }
        if b.pins == 0 {
            return Err(Refusal::NotPinned { buffer_id: id });
        }
        b.pins -= 1;
        if b.pins > 0 || b.leased {
            return Ok(vec![]);
        }
        self.lru.push(id);
        Ok(self.evict_to(self.budget))
    }

    fn trim(&mut self, target: u64) -> (u64, Vec<u64>) {
        let before = self.stats().free_bytes;
        let evicted = self.evict_to(Some(target));
        (before - self.stats().free_bytes, evicted)
    }

    fn evict_to(&mut self, limit: Option<u64>) -> Vec<u64> {
        let mut evicted = vec![];
        while limit.is_some_and(|limit| self.stats().free_bytes > limit) {
            let id = self.lru.remove(0);
            self.buffers.retain(|b| b.id != id);
            self.evictions += 1;
            evicted.push(id);
        }
        evicted
    }

    fn stats(&self) -> Stats {
        let sum = |keep: &dyn Fn(&ModelBuffer) -> bool| -> u64 {
            self.buffers
                .iter()
                .filter(|b| keep(b))
                .map(|b| b.rounded)
                .sum()
        };
        Stats {
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
            reserved_bytes: sum(&|_| true),
            in_use_bytes: sum(&|b| b.leased),
            requested_bytes: self
                .buffers
                .iter()
                .filter(|b| b.leased)
                .map(|b| b.requested)
                .sum(),
            free_bytes: sum(&|b| !b.leased && b.pins == 0),
            pinned_bytes: sum(&|b| b.pins > 0),
            peak_reserved_bytes: self.peak_reserved,
            peak_in_use_bytes: self.peak_in_use,
            num_buffers: self.buffers.len() as u64,
            num_free: self
                .buffers
                .iter()
                .filter(|b| !b.leased && b.pins == 0)
                .count() as u64,
        }
    }
}

/// Stats rebuilt from nothing but the event history.
fn replay(events: &[Event]) -> Stats {
    // Per buffer: (rounded, leased, pins), and the peaks before its allocating lease while held.
    let mut state: HashMap<u64, (u64, bool, u32)> = HashMap::new();
    let mut peaks_before: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut s = Stats::default();
    for e in events {
        let r = e.rounded_bytes;
        match e.kind {
            EventKind::Alloc | EventKind::Reuse => {
                if e.kind == EventKind::Alloc {
                    peaks_before.insert(e.buffer_id, (s.peak_reserved_bytes, s.peak_in_use_bytes));
                    s.misses += 1;
                    s.reserved_bytes += r;
                    s.num_buffers += 1;
                    state.insert(e.buffer_id, (r, true, 0));
                } else {
                    s.hits += 1;
                    s.free_bytes -= r;
                    s.num_free -= 1;
                    state.get_mut(&e.buffer_id).unwrap().1 = true;
                }
                s.in_use_bytes += r;
                s.requested_bytes += e.requested_bytes;
                s.peak_reserved_bytes = s.peak_reserved_bytes.max(s.reserved_bytes);
                s.peak_in_use_bytes = s.peak_in_use_bytes.max(s.in_use_bytes);
            }
            EventKind::Release => {
                let b = state.get_mut(&e.buffer_id).unwrap();
                b.1 = false;
                peaks_before.remove(&e.buffer_id);
                s.in_use_bytes -= r;
                s.requested_bytes -= e.requested_bytes;
                if b.2 == 0 {
                    s.free_bytes += r;
                    s.num_free += 1;
                }
            }
            EventKind::Pin => {
                let b = state.get_mut(&e.buffer_id).unwrap();
                if b.2 == 0 {
                    s.pinned_bytes += r;
                }
                b.2 += 1;
            }
            EventKind::Unpin => {
                let b = state.get_mut(&e.buffer_id).unwrap();
                b.2 -= 1;
                if b.2 == 0 {
                    s.pinned_bytes -= r;
                    if !b.1 {
                        s.free_bytes += r;
                        s.num_free += 1;
                    }
                }
            }
            EventKind::Evict => {
                let (_, leased, pins) = state.remove(&e.buffer_id).unwrap();
                assert!(!leased && pins == 0, "only free buffers are evicted");
                s.free_bytes -= r;
                s.num_free -= 1;
                s.reserved_bytes -= r;
                s.num_buffers -= 1;
                s.evictions += 1;
            }
            EventKind::Abandon => {
                let (_, _, pins) = state.remove(&e.buffer_id).unwrap();
                if let Some((reserved, in_use)) = peaks_before.remove(&e.buffer_id) {
                    s.peak_reserved_bytes = reserved.max(s.peak_reserved_bytes - r);
                    s.peak_in_use_bytes = in_use.max(s.peak_in_use_bytes - r);
                }
                s.reserved_bytes -= r;
                s.in_use_bytes -= r;
                s.requested_bytes -= e.requested_bytes;
                s.num_buffers -= 1;
                if pins > 0 {
                    s.pinned_bytes -= r;
                }
            }
        }
    }
    s
}

#[derive(Clone, Debug)]
enum Action {
    Acquire {
        device: u32,
        dtype: u32,
        nbytes: u64,
    },
    /// Lease actions pick one of the leases issued so far (held or not) by index modulo their count.
    Release(usize),
    Pin(usize),
    Unpin(usize),
    Abandon(usize),
    Trim(u64),
    /// A buffer id this ledger may never have issued.
    ReleaseUnknown(u64),
}

fn nbytes() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..2048,
        1 => prop::sample::select(vec![1 << 20, (1 << 20) + 1, 3 << 20, (5 << 20) + 1, 1 << 24]),
        1 => Just(MAX_REQUEST_BYTES),
        // Two of these reach MAX_RESERVED_BYTES: a third miss is refused.
        1 => Just(MAX_REQUEST_BYTES - 1),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0u32..2, 0u32..2, nbytes())
            .prop_map(|(device, dtype, nbytes)| Action::Acquire { device, dtype, nbytes }),
        6 => any::<usize>().prop_map(Action::Release),
        2 => any::<usize>().prop_map(Action::Pin),
        2 => any::<usize>().prop_map(Action::Unpin),
        1 => any::<usize>().prop_map(Action::Abandon),
        1 => (0u64..4096).prop_map(Action::Trim),
        1 => (0u64..64).prop_map(Action::ReleaseUnknown),
    ]
}

fn budget() -> impl Strategy<Value = Option<u64>> {
    // Multiples of 512 land exactly on bucket sizes, where `>` and `>=` part ways.
    prop_oneof![
        Just(None),
        (0u64..6144).prop_map(Some),
        (0u64..12).prop_map(|k| Some(k * 512)),
        Just(Some(1 << 26)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ledger_matches_the_model(budget in budget(), actions in prop::collection::vec(action(), 1..160)) {
        let mut ledger = Ledger::new(budget, 4096);
        let mut model = Model { budget, ..Model::default() };
        let mut leases: Vec<(u64, u64)> = vec![];
        let mut held: HashSet<u64> = HashSet::new();
        let pick = |leases: &Vec<(u64, u64)>, i: usize| leases[i % leases.len()];
        for action in actions {
            let needs_lease = matches!(
                action,
                Action::Release(_) | Action::Pin(_) | Action::Unpin(_) | Action::Abandon(_)
            );
            if needs_lease && leases.is_empty() {
                continue;
            }
            let mut evicted: Vec<u64> = vec![];
            match action {
                Action::Acquire { device, dtype, nbytes } => {
                    let got = ledger.acquire(device, dtype, nbytes);
                    prop_assert_eq!(got, model.acquire(device, dtype, nbytes));
                    if let Ok(grant) = got {
                        prop_assert!(held.insert(grant.buffer_id), "buffer {} handed out twice", grant.buffer_id);
                        leases.push((grant.buffer_id, grant.serial));
                    }
                }
                Action::Release(i) => {
                    let (id, serial) = pick(&leases, i);
                    let got = ledger.release(id, serial);
                    prop_assert_eq!(&got, &model.release(id, serial));
                    if let Ok(ids) = got {
                        held.remove(&id);
                        evicted = ids;
                        if let Some(budget) = budget {
                            prop_assert!(ledger.stats().free_bytes <= budget);
                        }
                    }
                }
                Action::Abandon(i) => {
                    let (id, serial) = pick(&leases, i);
                    let got = ledger.abandon(id, serial);
                    prop_assert_eq!(got, model.abandon(id, serial));
                    if got.is_ok() {
                        held.remove(&id);
                    }
                }
                Action::Pin(i) => {
                    let (id, serial) = pick(&leases, i);
                    prop_assert_eq!(ledger.pin(id, serial), model.pin(id, serial));
                }
                Action::Unpin(i) => {
                    let (id, serial) = pick(&leases, i);
                    let got = ledger.unpin(id, serial);
                    prop_assert_eq!(&got, &model.unpin(id, serial));
                    if let (Ok(ids), Some(budget)) = (got, budget) {
                        evicted = ids;
                        prop_assert!(ledger.stats().free_bytes <= budget);
                    }
                }
                Action::Trim(target) => {
                    let got = ledger.trim(target);
                    prop_assert_eq!(&got, &model.trim(target));
                    prop_assert!(ledger.stats().free_bytes <= target);
                    evicted = got.1;
                }
                Action::ReleaseUnknown(id) => {
                    let id = id + 1_000;
                    prop_assert_eq!(
                        ledger.release(id, 0),
                        Err(Refusal::Unknown { op: Op::Release, buffer_id: id })
                    );
                }
            }
            for id in &evicted {
                prop_assert!(!held.contains(id), "held buffer {} evicted", id);
            }
            let stats = ledger.stats();
            prop_assert_eq!(stats, model.stats());
            prop_assert_eq!(stats.reserved_bytes, stats.in_use_bytes + stats.free_bytes
                + model.buffers.iter().filter(|b| !b.leased && b.pins > 0).map(|b| b.rounded).sum::<u64>());
        }
        let events: Vec<Event> = ledger.events().copied().collect();
        prop_assert_eq!(events.len() as u64, ledger.events_recorded());
        prop_assert_eq!(replay(&events), ledger.stats());
    }

    #[test]
    fn rounding_matches_enumeration(nbytes in prop_oneof![0u64..(4 << 20), 0u64..(1 << 40)]) {
        let rounded = dilated_attn_pool::rounding::round_bytes(nbytes);
        prop_assert_eq!(rounded, model_round(nbytes));
        prop_assert!(rounded >= nbytes && rounded % 512 == 0);
        prop_assert!(nbytes <= 1 << 20 || rounded - nbytes < rounded / 4);
    }
}

#[test]
fn threads_never_share_a_buffer() {
    const THREADS: u64 = 8;
    const OPS: u64 = 20_000;
    let ledger = Arc::new(Mutex::new(Ledger::new(Some(16 * 1024), 0)));
    let held = Arc::new(Mutex::new(HashSet::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ledger, held) = (Arc::clone(&ledger), Arc::clone(&held));
            std::thread::spawn(move || {
                let mut acquired = 0u64;
                let mut mine: Vec<Grant> = vec![];
                let mut x = t * 2_654_435_761 + 1;
                for _ in 0..OPS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if mine.len() < 4 && (x % 3 != 0 || mine.is_empty()) {
                        let grant = ledger.lock().unwrap().acquire(0, 0, x % 3000).unwrap();
                        assert!(held.lock().unwrap().insert(grant.buffer_id));
                        acquired += 1;
                        mine.push(grant);
                    } else {
                        let grant = mine.swap_remove((x % mine.len() as u64) as usize);
                        // Forget the id before the ledger may hand it to another thread.
                        assert!(held.lock().unwrap().remove(&grant.buffer_id));
                        ledger
                            .lock()
                            .unwrap()
                            .release(grant.buffer_id, grant.serial)
                            .unwrap();
                    }
                }
                for grant in mine {
                    assert!(held.lock().unwrap().remove(&grant.buffer_id));
                    ledger
                        .lock()
                        .unwrap()
                        .release(grant.buffer_id, grant.serial)
                        .unwrap();
                }
                acquired
            })
        })
        .collect();
    let acquired: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let stats = ledger.lock().unwrap().stats();
    assert_eq!(stats.hits + stats.misses, acquired);
    assert!(
        stats.hits > stats.misses,
        "a small working set is mostly reused"
    );
    assert_eq!((stats.in_use_bytes, stats.requested_bytes), (0, 0));
    assert!(stats.free_bytes <= 16 * 1024);
    assert_eq!(stats.reserved_bytes, stats.free_bytes);
}
