//! The bookkeeping of dilated-attn's Rust buffer pool and of its metadata cache.
//!
//! [`ledger::Ledger`] is plain Rust: it decides buffer ids, hits, the LRU, pins and evictions, and
//! never sees a storage. [`cache::CacheLedger`] is the keyed LRU under a byte budget behind
//! `dilated_attn.cache`: it decides which entry ids to evict and never sees a cached value. With the `python` feature, the private extension module
//! `dilated_attn_pool._pool_rs` wraps it behind one mutex for `dilated_attn_pool.RustBufferPool`,
//! which owns the torch storages.

pub mod cache;
pub mod events;
mod hashing;
pub mod ledger;
pub mod rounding;

#[cfg(feature = "python")]
mod python;
