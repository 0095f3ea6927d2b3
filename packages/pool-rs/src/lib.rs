//! The bookkeeping of dilated-attn's Rust buffer pool.
//!
//! [`ledger::Ledger`] is plain Rust: it decides buffer ids, hits, the LRU, pins and evictions, and
//! never sees a storage. With the `python` feature, the private extension module
//! `dilated_attn_pool._pool_rs` wraps it behind one mutex for `dilated_attn_pool.RustBufferPool`,
//! which owns the torch storages.

pub mod events;
mod hashing;
pub mod ledger;
pub mod rounding;

#[cfg(feature = "python")]
mod python;
