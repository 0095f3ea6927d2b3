//! A bounded ring of the ledger's most recent events, for snapshots and for checking the stats.

use std::collections::VecDeque;

/// The event kinds' names, by code (`EventKind as usize`); `dilated_attn.pool.ledger.EVENT_KINDS`
/// must list the same names in the same order (checked when `dilated_attn_pool` is imported).
pub const EVENT_KINDS: [&str; 7] = [
    "alloc", "reuse", "release", "pin", "unpin", "evict", "abandon",
];
/// The capacity of a ledger's event ring unless its caller picks another.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;
/// The largest event ring the Python module accepts: the history is for snapshots, not a log.
pub const MAX_EVENT_CAPACITY: usize = 1 << 20;

/// What happened to a buffer. The codes are the indices of `EVENT_KINDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// A miss: a new buffer, leased at once.
    Alloc = 0,
    /// A hit: a free buffer leased again.
    Reuse = 1,
    Release = 2,
    Pin = 3,
    Unpin = 4,
    Evict = 5,
    /// A missed buffer forgotten because its storage could not be allocated.
    Abandon = 6,
}

/// One event; `requested_bytes` is the lease's request for alloc, reuse, release and abandon, else 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub buffer_id: u64,
    pub rounded_bytes: u64,
    pub requested_bytes: u64,
}

/// The last `capacity` events, oldest first; older ones are dropped. The ring grows as events
/// arrive, so a large capacity costs memory only once that many events happened.
#[derive(Debug)]
pub struct EventRing {
    events: VecDeque<Event>,
    capacity: usize,
    recorded: u64,
}

impl EventRing {
    pub fn new(capacity: usize) -> Self {
        EventRing {
            events: VecDeque::with_capacity(capacity.min(DEFAULT_EVENT_CAPACITY)),
            capacity,
            recorded: 0,
        }
    }

    pub fn push(&mut self, event: Event) {
        self.recorded += 1;
        if self.capacity == 0 {
            return;
        }
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// The events held, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// Every event ever pushed, including those the ring no longer holds.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(buffer_id: u64) -> Event {
        Event {
            kind: EventKind::Pin,
            buffer_id,
            rounded_bytes: 512,
            requested_bytes: 0,
        }
    }

    #[test]
    fn keeps_the_newest_events() {
        let mut ring = EventRing::new(2);
        for id in 0..5 {
            ring.push(event(id));
        }
        let ids: Vec<u64> = ring.iter().map(|e| e.buffer_id).collect();
        assert_eq!(ids, vec![3, 4]);
        assert_eq!(ring.recorded(), 5);
    }

    #[test]
    fn a_huge_capacity_allocates_nothing_up_front() {
        let mut ring = EventRing::new(usize::MAX);
        ring.push(event(1));
        assert_eq!(ring.iter().count(), 1);
    }

    #[test]
    fn kind_names_follow_the_codes() {
        assert_eq!(EVENT_KINDS[EventKind::Alloc as usize], "alloc");
        assert_eq!(EVENT_KINDS[EventKind::Abandon as usize], "abandon");
    }

    #[test]
    fn zero_capacity_records_nothing() {
        let mut ring = EventRing::new(0);
        ring.push(event(1));
        assert_eq!(ring.iter().count(), 0);
        assert_eq!(ring.recorded(), 1);
    }
}
