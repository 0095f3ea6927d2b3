//! Bucket sizes: PyTorch's caching-allocator rounding, with 4 power-of-two divisions above 1 MiB.

/// Every bucket size is a multiple of this many bytes.
pub const MIN_BLOCK_BYTES: u64 = 512;
/// Requests above this many bytes round to a quarter of their power-of-two interval instead.
pub const LARGE_BYTES: u64 = 1 << 20;
/// How many equal steps each power-of-two interval above `LARGE_BYTES` is cut into.
pub const ROUNDUP_DIVISIONS: u64 = 4;
/// Requests must be smaller than this, so that rounding never overflows a `u64`.
pub const MAX_REQUEST_BYTES: u64 = 1 << 62;
/// A miss that would take the ledger's reserved bytes above this is refused, so that every byte
/// total (reserved >= in use >= requested, free, pinned, the peaks) fits a `u64` and never wraps.
pub const MAX_RESERVED_BYTES: u64 = 1 << 63;

/// The bucket size of a request of `nbytes` bytes (`nbytes < MAX_REQUEST_BYTES`).
///
/// Up to 1 MiB: the next multiple of 512, at least 512. Above: a power of two stays itself,
/// anything else rounds up to a multiple of a quarter of the largest power of two below it.
pub fn round_bytes(nbytes: u64) -> u64 {
    debug_assert!(nbytes < MAX_REQUEST_BYTES);
    if nbytes <= LARGE_BYTES {
        return nbytes.div_ceil(MIN_BLOCK_BYTES).max(1) * MIN_BLOCK_BYTES;
    }
    if nbytes.is_power_of_two() {
        return nbytes;
    }
    let floor = 1u64 << (63 - nbytes.leading_zeros());
    let step = floor / ROUNDUP_DIVISIONS;
    nbytes.div_ceil(step) * step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_requests_round_to_512_multiples() {
        assert_eq!(round_bytes(0), 512);
        assert_eq!(round_bytes(1), 512);
        assert_eq!(round_bytes(512), 512);
        assert_eq!(round_bytes(513), 1024);
        assert_eq!(round_bytes(LARGE_BYTES), LARGE_BYTES);
    }

    #[test]
    fn large_requests_round_to_quarter_powers_of_two() {
        assert_eq!(round_bytes(LARGE_BYTES + 1), LARGE_BYTES + LARGE_BYTES / 4);
        assert_eq!(round_bytes(5 << 20), 5 << 20);
        assert_eq!(round_bytes((5 << 20) + 1), 6 << 20);
        assert_eq!(round_bytes((7 << 20) + 1), 8 << 20);
        assert_eq!(round_bytes(1 << 40), 1 << 40);
        assert_eq!(round_bytes(MAX_REQUEST_BYTES - 1), MAX_REQUEST_BYTES);
    }
}
