//! The pool's bookkeeping in plain Rust: buffers are integer ids, storages live on the Python side.
//!
//! Semantics are those of `dilated_attn.pool` (its module docstring), decision for decision: a hit
//! takes the most recently freed buffer of the bucket, free buffers form one exact LRU, a leased or
//! pinned buffer is never handed out or evicted, and the budget bounds the free bytes after every
//! release, unpin and trim. Refusal messages are the strings `dilated_attn.pool._refusal` formats.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use crate::events::{Event, EventKind, EventRing};
use crate::hashing::IdBuildHasher;
use crate::rounding::{round_bytes, MAX_REQUEST_BYTES, MAX_RESERVED_BYTES};

/// Buffers of one bucket are interchangeable: same device, same dtype, same rounded size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub device: u32,
    pub dtype: u32,
    pub rounded: u64,
}

/// What `acquire` hands out: the buffer, the lease's serial, and the bytes to allocate on a miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub buffer_id: u64,
    pub serial: u64,
    /// 0 on a hit; on a miss the rounded size of the storage the caller must allocate.
    pub alloc_bytes: u64,
}

/// The operations that take a lease, as named in refusal messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Release,
    Pin,
    Unpin,
    Abandon,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Release => "release",
            Op::Pin => "pin",
            Op::Unpin => "unpin",
            Op::Abandon => "abandon",
        }
    }
}

/// Why the ledger refused an operation; a refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request of `MAX_REQUEST_BYTES` or more.
    TooLarge {
        nbytes: u64,
    },
    /// A miss whose new buffer would take the reserved bytes above `MAX_RESERVED_BYTES`.
    OverReserve {
        nbytes: u64,
        rounded: u64,
        reserved: u64,
    },
    /// The buffer is not in this ledger: evicted, abandoned or never issued here.
    Unknown {
        op: Op,
        buffer_id: u64,
    },
    /// The lease is not (or no longer) the buffer's held lease.
    Released {
        op: Op,
        buffer_id: u64,
    },
    /// `unpin` through a lease older than the buffer's latest one.
    Stale {
        buffer_id: u64,
    },
    NotPinned {
        buffer_id: u64,
    },
    /// Pinning would make the pinned set larger than the budget.
    OverBudget {
        buffer_id: u64,
        requested: u64,
        free: u64,
        pinned: u64,
        budget: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Refusal::TooLarge { nbytes } => write!(
                f,
                "acquire: nbytes={nbytes} is too large; a request must be under 2**62 bytes"
            ),
            Refusal::OverReserve {
                nbytes,
                rounded,
                reserved,
            } => write!(
                f,
                "acquire: nbytes={nbytes} needs a new buffer of {rounded} bytes, which would make \
                 reserved_bytes {}, over the ledger's limit of 2**63; release or trim buffers first",
                u128::from(reserved) + u128::from(rounded)
            ),
            Refusal::Unknown { op, buffer_id } => write!(
                f,
                "{}: buffer {buffer_id} is not held by this pool (it was evicted, or never issued \
                 here); pass a lease that this pool issued",
                op.name()
            ),
            Refusal::Released { op, buffer_id } => {
                let advice = match op {
                    Op::Pin => "pin a lease while it is held",
                    Op::Abandon => "abandon a lease only before releasing it",
                    Op::Release | Op::Unpin => "release each lease exactly once",
                };
                write!(
                    f,
                    "{}: the lease of buffer {buffer_id} was already released; {advice}",
                    op.name()
                )
            }
            Refusal::Stale { buffer_id } => write!(
                f,
                "unpin: the lease of buffer {buffer_id} is stale (the buffer was leased again); \
                 unpin through the lease that pinned it"
            ),
            Refusal::NotPinned { buffer_id } => write!(
                f,
                "unpin: buffer {buffer_id} is not pinned; unpin once per pin"
            ),
            Refusal::OverBudget {
                buffer_id,
                requested,
                free,
                pinned,
                budget,
            } => write!(
                f,
                "pin: pinning buffer {buffer_id} of {requested} bytes would make the pinned set {} \
                 bytes, over budget_bytes={budget} (pinned_bytes={pinned}, free_bytes={free})",
                u128::from(pinned) + u128::from(requested)
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// Every `(op, rule)` refusal of a lease, formatted for buffer 7, as
    /// `dilated_attn.pool.ledger.REFUSAL_SAMPLES` lists them: the texts both ledgers must share.
    pub fn samples() -> Vec<(&'static str, &'static str, String)> {
        let buffer_id = 7;
        let unknown = |op| Refusal::Unknown { op, buffer_id };
        let released = |op| Refusal::Released { op, buffer_id };
        [
            ("release", "unknown", unknown(Op::Release)),
            ("pin", "unknown", unknown(Op::Pin)),
            ("unpin", "unknown", unknown(Op::Unpin)),
            ("abandon", "unknown", unknown(Op::Abandon)),
            ("release", "released", released(Op::Release)),
            ("pin", "released", released(Op::Pin)),
            ("abandon", "released", released(Op::Abandon)),
            ("unpin", "stale", Refusal::Stale { buffer_id }),
            ("unpin", "not pinned", Refusal::NotPinned { buffer_id }),
        ]
        .into_iter()
        .map(|(op, rule, refusal)| (op, rule, refusal.to_string()))
        .collect()
    }
}

/// Counters and byte totals, in the order of `dilated_attn.pool.STATS_KEYS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub reserved_bytes: u64,
    pub in_use_bytes: u64,
    pub requested_bytes: u64,
    pub free_bytes: u64,
    pub pinned_bytes: u64,
    pub peak_reserved_bytes: u64,
    pub peak_in_use_bytes: u64,
    pub num_buffers: u64,
    pub num_free: u64,
}

/// The names of `Stats::to_array`'s entries, in order.
pub const STATS_KEYS: [&str; 12] = [
    "hits",
    "misses",
    "evictions",
    "reserved_bytes",
    "in_use_bytes",
    "requested_bytes",
    "free_bytes",
    "pinned_bytes",
    "peak_reserved_bytes",
    "peak_in_use_bytes",
    "num_buffers",
    "num_free",
];

impl Stats {
    pub fn to_array(&self) -> [u64; 12] {
        [
            self.hits,
            self.misses,
            self.evictions,
            self.reserved_bytes,
            self.in_use_bytes,
            self.requested_bytes,
            self.free_bytes,
            self.pinned_bytes,
            self.peak_reserved_bytes,
            self.peak_in_use_bytes,
            self.num_buffers,
            self.num_free,
        ]
    }
}

#[derive(Debug)]
struct Buffer {
    key: BucketKey,
    /// The serial of the buffer's latest lease (held or released).
    serial: u64,
    /// The latest lease's requested bytes.
    requested: u64,
    leased: bool,
    pins: u64,
    /// Position in the LRU while free.
    stamp: u64,
    /// The peaks (reserved, in use) before this buffer's allocating lease, while that lease is
    /// held: abandoning it (the storage could not be allocated) restores them.
    peaks_before: Option<(u64, u64)>,
}

/// The bookkeeping of one pool. Not thread-safe by itself: callers hold it under one mutex.
#[derive(Debug)]
pub struct Ledger {
    budget: Option<u64>,
    buffers: HashMap<u64, Buffer, IdBuildHasher>,
    /// Free ids per bucket, oldest first. A bucket's order is the LRU's order restricted to it, so
    /// the LRU's oldest buffer is always the front of its bucket.
    free: HashMap<BucketKey, VecDeque<u64>, IdBuildHasher>,
    /// Free buffers by the stamp of the moment they became free: the first entry is the LRU one.
    lru: BTreeMap<u64, u64>,
    next_id: u64,
    next_serial: u64,
    next_stamp: u64,
    stats: Stats,
    events: EventRing,
}

impl Ledger {
    /// A ledger whose free bytes stay within `budget` (`None`: unbounded), keeping the last
    /// `event_capacity` events.
    pub fn new(budget: Option<u64>, event_capacity: usize) -> Self {
        Ledger {
            budget,
            buffers: HashMap::default(),
            free: HashMap::default(),
            lru: BTreeMap::new(),
            next_id: 0,
            next_serial: 0,
            next_stamp: 0,
            stats: Stats::default(),
            events: EventRing::new(event_capacity),
        }
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The events held by the ring, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// Every event recorded since the ledger was made, including those the ring dropped.
    pub fn events_recorded(&self) -> u64 {
        self.events.recorded()
    }

    /// Lease a buffer for `nbytes` bytes of `(device, dtype)`: the bucket's most recently freed
    /// buffer (a hit), else a new id whose storage the caller allocates (a miss).
    pub fn acquire(&mut self, device: u32, dtype: u32, nbytes: u64) -> Result<Grant, Refusal> {
        if nbytes >= MAX_REQUEST_BYTES {
            return Err(Refusal::TooLarge { nbytes });
        }
        let key = BucketKey {
            device,
            dtype,
            rounded: round_bytes(nbytes),
        };
        let reused = self.free.get_mut(&key).and_then(VecDeque::pop_back);
        if reused.is_none() && self.stats.reserved_bytes > MAX_RESERVED_BYTES - key.rounded {
            return Err(Refusal::OverReserve {
                nbytes,
                rounded: key.rounded,
                reserved: self.stats.reserved_bytes,
            });
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let (buffer_id, alloc_bytes, kind) = match reused {
            Some(buffer_id) => {
                let buffer = self
                    .buffers
                    .get_mut(&buffer_id)
                    .expect("a free id names a buffer");
                self.lru.remove(&buffer.stamp);
                buffer.serial = serial;
                buffer.requested = nbytes;
                buffer.leased = true;
                self.stats.free_bytes -= key.rounded;
                self.stats.num_free -= 1;
                self.stats.hits += 1;
                (buffer_id, 0, EventKind::Reuse)
            }
            None => {
                let buffer_id = self.next_id;
                self.next_id += 1;
                self.buffers.insert(
                    buffer_id,
                    Buffer {
                        key,
                        serial,
                        requested: nbytes,
                        leased: true,
                        pins: 0,
                        stamp: 0,
                        peaks_before: Some((
                            self.stats.peak_reserved_bytes,
                            self.stats.peak_in_use_bytes,
                        )),
                    },
                );
                self.stats.reserved_bytes += key.rounded;
                self.stats.peak_reserved_bytes = self
                    .stats
                    .peak_reserved_bytes
                    .max(self.stats.reserved_bytes);
                self.stats.num_buffers += 1;
                self.stats.misses += 1;
                (buffer_id, key.rounded, EventKind::Alloc)
            }
        };
        self.stats.in_use_bytes += key.rounded;
        self.stats.peak_in_use_bytes = self.stats.peak_in_use_bytes.max(self.stats.in_use_bytes);
        self.stats.requested_bytes += nbytes;
        self.record(kind, buffer_id, key.rounded, nbytes);
        Ok(Grant {
            buffer_id,
            serial,
            alloc_bytes,
        })
    }

    /// Forget a missed buffer whose storage could not be allocated (it was never usable).
    pub fn abandon(&mut self, buffer_id: u64, serial: u64) -> Result<(), Refusal> {
        let buffer = held(&mut self.buffers, buffer_id, serial, Op::Abandon)?;
        let (rounded, requested, pinned) = (buffer.key.rounded, buffer.requested, buffer.pins > 0);
        let peaks_before = buffer.peaks_before;
        self.buffers.remove(&buffer_id);
        self.stats.reserved_bytes -= rounded;
        self.stats.in_use_bytes -= rounded;
        self.stats.requested_bytes -= requested;
        self.stats.num_buffers -= 1;
        if pinned {
            self.stats.pinned_bytes -= rounded;
        }
        if let Some((reserved_before, in_use_before)) = peaks_before {
            // The storage never existed: take it out of the peaks it raised. A peak set by another
            // lease since then counted these bytes too, so it drops by them as well.
            let stats = &mut self.stats;
            stats.peak_reserved_bytes = reserved_before.max(stats.peak_reserved_bytes - rounded);
            stats.peak_in_use_bytes = in_use_before.max(stats.peak_in_use_bytes - rounded);
        }
        self.record(EventKind::Abandon, buffer_id, rounded, requested);
        Ok(())
    }

    /// End a lease. The buffer becomes free unless pinned; returns the ids the budget evicted.
    pub fn release(&mut self, buffer_id: u64, serial: u64) -> Result<Vec<u64>, Refusal> {
        let buffer = held(&mut self.buffers, buffer_id, serial, Op::Release)?;
        buffer.leased = false;
        buffer.peaks_before = None;
        let (rounded, requested, pinned) = (buffer.key.rounded, buffer.requested, buffer.pins > 0);
        self.stats.in_use_bytes -= rounded;
        self.stats.requested_bytes -= requested;
        self.record(EventKind::Release, buffer_id, rounded, requested);
        if pinned {
            return Ok(Vec::new());
        }
        self.make_free(buffer_id);
        Ok(self.evict_to(self.budget))
    }

    /// Add a pin to a held lease's buffer. The first pin is refused when the pinned set would
    /// outgrow the budget.
    pub fn pin(&mut self, buffer_id: u64, serial: u64) -> Result<(), Refusal> {
        let buffer = held(&mut self.buffers, buffer_id, serial, Op::Pin)?;
        let rounded = buffer.key.rounded;
        if buffer.pins == 0 {
            if let Some(budget) = self.budget {
                if self.stats.pinned_bytes + rounded > budget {
                    return Err(Refusal::OverBudget {
                        buffer_id,
                        requested: rounded,
                        free: self.stats.free_bytes,
                        pinned: self.stats.pinned_bytes,
                        budget,
                    });
                }
            }
            self.stats.pinned_bytes += rounded;
        }
        buffer.pins += 1;
        self.record(EventKind::Pin, buffer_id, rounded, 0);
        Ok(())
    }

    /// Remove one pin, through the lease that pinned (held or released). The last pin of a
    /// released buffer frees it; returns the ids the budget evicted.
    pub fn unpin(&mut self, buffer_id: u64, serial: u64) -> Result<Vec<u64>, Refusal> {
        let buffer = self.buffers.get_mut(&buffer_id).ok_or(Refusal::Unknown {
            op: Op::Unpin,
            buffer_id,
        })?;
        if buffer.serial != serial {
            return Err(Refusal::Stale { buffer_id });
        }
        if buffer.pins == 0 {
            return Err(Refusal::NotPinned { buffer_id });
        }
        buffer.pins -= 1;
        let (rounded, pins, leased) = (buffer.key.rounded, buffer.pins, buffer.leased);
        self.record(EventKind::Unpin, buffer_id, rounded, 0);
        if pins > 0 {
            return Ok(Vec::new());
        }
        self.stats.pinned_bytes -= rounded;
        if leased {
            return Ok(Vec::new());
        }
        self.make_free(buffer_id);
        Ok(self.evict_to(self.budget))
    }

    /// Evict least recently used free buffers until `free_bytes <= target_bytes`; returns the
    /// bytes evicted and the evicted ids.
    pub fn trim(&mut self, target_bytes: u64) -> (u64, Vec<u64>) {
        let before = self.stats.free_bytes;
        let evicted = self.evict_to(Some(target_bytes));
        (before - self.stats.free_bytes, evicted)
    }

    fn make_free(&mut self, buffer_id: u64) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let buffer = self
            .buffers
            .get_mut(&buffer_id)
            .expect("make_free of a known buffer");
        buffer.stamp = stamp;
        let key = buffer.key;
        self.free.entry(key).or_default().push_back(buffer_id);
        self.lru.insert(stamp, buffer_id);
        self.stats.free_bytes += key.rounded;
        self.stats.num_free += 1;
    }

    fn evict_to(&mut self, limit: Option<u64>) -> Vec<u64> {
        let mut evicted = Vec::new();
        let Some(limit) = limit else {
            return evicted;
        };
        while self.stats.free_bytes > limit {
            let (_, buffer_id) = self
                .lru
                .pop_first()
                .expect("free bytes above zero means a free buffer");
            let buffer = self
                .buffers
                .remove(&buffer_id)
                .expect("an LRU id names a buffer");
            let key = buffer.key;
            let bucket = self.free.get_mut(&key).expect("a free buffer has a bucket");
            let front = bucket.pop_front();
            debug_assert_eq!(front, Some(buffer_id), "LRU and bucket order agree");
            if bucket.is_empty() {
                self.free.remove(&key);
            }
            self.stats.free_bytes -= key.rounded;
            self.stats.num_free -= 1;
            self.stats.reserved_bytes -= key.rounded;
            self.stats.num_buffers -= 1;
            self.stats.evictions += 1;
            self.record(EventKind::Evict, buffer_id, key.rounded, 0);
            evicted.push(buffer_id);
        }
        evicted
    }

    fn record(
        &mut self,
        kind: EventKind,
        buffer_id: u64,
        rounded_bytes: u64,
        requested_bytes: u64,
    ) {
        self.events.push(Event {
            kind,
            buffer_id,
            rounded_bytes,
            requested_bytes,
        });
    }
}

/// The buffer held by the lease `(buffer_id, serial)`, or why there is none.
fn held(
    buffers: &mut HashMap<u64, Buffer, IdBuildHasher>,
    buffer_id: u64,
    serial: u64,
    op: Op,
) -> Result<&mut Buffer, Refusal> {
    match buffers.get_mut(&buffer_id) {
        None => Err(Refusal::Unknown { op, buffer_id }),
        Some(buffer) if buffer.serial != serial || !buffer.leased => {
            Err(Refusal::Released { op, buffer_id })
        }
        Some(buffer) => Ok(buffer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(budget: Option<u64>) -> Ledger {
        Ledger::new(budget, 64)
    }

    #[test]
    fn a_released_buffer_is_reused_warm_first() {
        let mut l = ledger(None);
        let a = l.acquire(0, 0, 100).unwrap();
        let b = l.acquire(0, 0, 200).unwrap();
        assert_eq!((a.alloc_bytes, b.alloc_bytes), (512, 512));
        l.release(a.buffer_id, a.serial).unwrap();
        l.release(b.buffer_id, b.serial).unwrap();
        let c = l.acquire(0, 0, 300).unwrap();
        assert_eq!((c.buffer_id, c.alloc_bytes), (b.buffer_id, 0));
        let s = l.stats();
        assert_eq!((s.hits, s.misses, s.num_free, s.free_bytes), (1, 2, 1, 512));
        assert_eq!((s.in_use_bytes, s.requested_bytes), (512, 300));
    }

    #[test]
    fn buckets_separate_device_dtype_and_size() {
        let mut l = ledger(None);
        let a = l.acquire(0, 0, 100).unwrap();
        l.release(a.buffer_id, a.serial).unwrap();
        for (device, dtype, nbytes) in [(1, 0, 100), (0, 1, 100), (0, 0, 600)] {
            assert_ne!(l.acquire(device, dtype, nbytes).unwrap().alloc_bytes, 0);
        }
        assert_eq!(l.acquire(0, 0, 512).unwrap().buffer_id, a.buffer_id);
    }

    #[test]
    fn the_budget_evicts_least_recently_freed_first() {
        let mut l = ledger(Some(1024));
        let grants: Vec<Grant> = (0..3).map(|_| l.acquire(0, 0, 512).unwrap()).collect();
        assert!(l
            .release(grants[1].buffer_id, grants[1].serial)
            .unwrap()
            .is_empty());
        assert!(l
            .release(grants[0].buffer_id, grants[0].serial)
            .unwrap()
            .is_empty());
        let evicted = l.release(grants[2].buffer_id, grants[2].serial).unwrap();
        assert_eq!(evicted, vec![grants[1].buffer_id]);
        assert_eq!(l.stats().free_bytes, 1024);
        assert_eq!(
            l.trim(0),
            (1024, vec![grants[0].buffer_id, grants[2].buffer_id])
        );
        assert_eq!(l.stats().reserved_bytes, 0);
    }

    #[test]
    fn double_release_and_stale_leases_are_refused() {
        let mut l = ledger(None);
        let a = l.acquire(0, 0, 1).unwrap();
        l.release(a.buffer_id, a.serial).unwrap();
        let again = l.release(a.buffer_id, a.serial).unwrap_err();
        assert_eq!(
            again.to_string(),
            "release: the lease of buffer 0 was already released; release each lease exactly once"
        );
        let b = l.acquire(0, 0, 1).unwrap();
        assert_eq!(b.buffer_id, a.buffer_id);
        assert_eq!(
            l.release(a.buffer_id, a.serial),
            Err(Refusal::Released {
                op: Op::Release,
                buffer_id: 0
            })
        );
        assert_eq!(
            l.release(7, 0),
            Err(Refusal::Unknown {
                op: Op::Release,
                buffer_id: 7
            })
        );
        assert_eq!(l.stats().in_use_bytes, 512);
    }

    #[test]
    fn a_pinned_buffer_outlives_its_lease() {
        let mut l = ledger(Some(0));
        let a = l.acquire(0, 0, 1).unwrap();
        assert_eq!(
            l.pin(a.buffer_id, a.serial),
            Err(Refusal::OverBudget {
                buffer_id: 0,
                requested: 512,
                free: 0,
                pinned: 0,
                budget: 0
            })
        );
        let mut l = ledger(Some(512));
        let a = l.acquire(0, 0, 1).unwrap();
        l.pin(a.buffer_id, a.serial).unwrap();
        l.pin(a.buffer_id, a.serial).unwrap();
        assert!(l.release(a.buffer_id, a.serial).unwrap().is_empty());
        assert_ne!(l.acquire(0, 0, 1).unwrap().buffer_id, a.buffer_id);
        assert!(l.unpin(a.buffer_id, a.serial).unwrap().is_empty());
        assert_eq!(l.stats().pinned_bytes, 512);
        assert!(l.unpin(a.buffer_id, a.serial).unwrap().is_empty());
        assert_eq!(
            l.unpin(a.buffer_id, a.serial),
            Err(Refusal::NotPinned { buffer_id: 0 })
        );
        assert_eq!((l.stats().pinned_bytes, l.stats().free_bytes), (0, 512));
    }

    #[test]
    fn abandon_undoes_a_miss() {
        let mut l = ledger(None);
        let a = l.acquire(0, 0, 1000).unwrap();
        l.abandon(a.buffer_id, a.serial).unwrap();
        let s = l.stats();
        assert_eq!((s.reserved_bytes, s.in_use_bytes, s.num_buffers), (0, 0, 0));
        assert_eq!(s.misses, 1);
        assert!(l.release(a.buffer_id, a.serial).is_err());
    }

    #[test]
    fn reserved_bytes_stop_at_the_limit_and_never_wrap() {
        let mut l = ledger(None);
        let big = MAX_REQUEST_BYTES - 1;
        let a = l.acquire(0, 0, big).unwrap();
        let b = l.acquire(0, 0, big).unwrap();
        assert_eq!(l.stats().reserved_bytes, MAX_RESERVED_BYTES);
        let before = l.stats();
        assert_eq!(
            l.acquire(0, 0, big),
            Err(Refusal::OverReserve {
                nbytes: big,
                rounded: MAX_REQUEST_BYTES,
                reserved: MAX_RESERVED_BYTES
            })
        );
        let refusal = l.acquire(1, 0, 0).unwrap_err().to_string();
        assert!(
            refusal.contains("over the ledger's limit of 2**63"),
            "{refusal}"
        );
        assert_eq!(l.stats(), before);
        // A hit adds no reserved bytes, so it is granted at the limit.
        l.release(a.buffer_id, a.serial).unwrap();
        assert_eq!(l.acquire(0, 0, big).unwrap().buffer_id, a.buffer_id);
        l.release(b.buffer_id, b.serial).unwrap();
        assert_eq!(l.stats().peak_in_use_bytes, MAX_RESERVED_BYTES);
    }

    #[test]
    fn abandon_takes_back_the_peaks_of_its_miss() {
        let mut l = ledger(None);
        let a = l.acquire(0, 0, 1 << 20).unwrap();
        l.release(a.buffer_id, a.serial).unwrap();
        let huge = l.acquire(0, 0, MAX_REQUEST_BYTES - 1).unwrap();
        let small = l.acquire(0, 0, 100).unwrap();
        assert_eq!(
            l.stats().peak_reserved_bytes,
            (1 << 20) + MAX_REQUEST_BYTES + 512
        );
        l.abandon(huge.buffer_id, huge.serial).unwrap();
        let s = l.stats();
        assert_eq!(
            (s.peak_reserved_bytes, s.peak_in_use_bytes),
            ((1 << 20) + 512, 1 << 20)
        );
        // A reused buffer's storage existed: abandoning its lease leaves the peaks alone.
        l.release(small.buffer_id, small.serial).unwrap();
        let again = l.acquire(0, 0, 100).unwrap();
        l.abandon(again.buffer_id, again.serial).unwrap();
        assert_eq!(l.stats().peak_reserved_bytes, (1 << 20) + 512);
    }

    #[test]
    fn refusal_samples_cover_every_lease_rule() {
        let samples = Refusal::samples();
        assert_eq!(samples.len(), 9);
        assert!(samples
            .iter()
            .all(|(op, _, text)| text.starts_with(&format!("{op}: "))));
    }

    #[test]
    fn oversized_requests_are_refused() {
        let mut l = ledger(None);
        assert_eq!(
            l.acquire(0, 0, MAX_REQUEST_BYTES),
            Err(Refusal::TooLarge {
                nbytes: MAX_REQUEST_BYTES
            })
        );
        assert_eq!(l.stats(), Stats::default());
    }
}
