//! `dilated_attn_pool._pool_rs`: the ledger behind one mutex, integers in and out.
//!
//! The mutex is held only inside these methods, which touch no Python object while holding it:
//! arguments are converted before locking and results after unlocking.
//!
//! Nothing here panics or aborts on any argument: every integer is checked at the boundary with
//! the classes and messages of `dilated_attn.pool.ledger.check_int` (a non-int is a `TypeError`, a
//! negative int a `ValueError`, one too wide an `OverflowError`), and every ledger refusal becomes
//! a Python exception (`ValueError`, or `MemoryError` past the reserved-bytes limit).

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::cache::{CacheLedger, CacheRefusal, CACHE_STATS_KEYS, MAX_CACHE_BUDGET_BYTES};
use crate::events::{Event, DEFAULT_EVENT_CAPACITY, EVENT_KINDS, MAX_EVENT_CAPACITY};
use crate::ledger::{Ledger, Refusal, STATS_KEYS};
use crate::rounding::{
    self, LARGE_BYTES, MAX_REQUEST_BYTES, MAX_RESERVED_BYTES, MIN_BLOCK_BYTES, ROUNDUP_DIVISIONS,
};

/// A Python integer argument as it arrived: its value when it fits a `u64`, else what to say.
///
/// Extracting one never fails, so the method that takes it names the argument in the error.
pub(crate) enum IntArg {
    Fits(u64),
    Negative(String),
    TooWide(String),
    NotInt { repr: String, type_name: String },
}

impl<'a, 'py> FromPyObject<'a, 'py> for IntArg {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let not_int = || -> PyResult<Self> {
            Ok(IntArg::NotInt {
                repr: obj.repr()?.to_string(),
                type_name: obj.get_type().name()?.to_string(),
            })
        };
        if obj.is_instance_of::<PyBool>() {
            return not_int();
        }
        match obj.extract::<u64>() {
            Ok(value) => Ok(IntArg::Fits(value)),
            Err(err) if err.is_instance_of::<PyOverflowError>(obj.py()) => {
                let text = obj.str()?.to_string();
                if obj.lt(0)? {
                    Ok(IntArg::Negative(text))
                } else {
                    Ok(IntArg::TooWide(text))
                }
            }
            Err(err) if err.is_instance_of::<PyTypeError>(obj.py()) => not_int(),
            Err(err) => Err(err),
        }
    }
}

impl IntArg {
    /// The value when it is below `2**bits`, else the error naming `op`, `name`, the value and the rule.
    pub(crate) fn check(&self, op: &str, name: &str, bits: u32) -> PyResult<u64> {
        match self {
            IntArg::Fits(value) if bits >= 64 || *value < (1u64 << bits) => Ok(*value),
            IntArg::Fits(value) => Err(too_wide(op, name, &value.to_string(), bits)),
            IntArg::TooWide(text) => Err(too_wide(op, name, text, bits)),
            IntArg::Negative(text) => Err(PyValueError::new_err(format!(
                "{op}: {name}={text} must be >= 0"
            ))),
            IntArg::NotInt { repr, type_name } => Err(PyTypeError::new_err(format!(
                "{op}: {name}={repr} must be an int (got {type_name})"
            ))),
        }
    }
}

fn too_wide(op: &str, name: &str, text: &str, bits: u32) -> PyErr {
    PyOverflowError::new_err(format!(
        "{op}: {name}={text} does not fit an unsigned {bits}-bit integer (must be < 2**{bits})"
    ))
}

/// `budget_bytes` as `dilated_attn.pool.check_budget` takes it: `None` or an int in `[0, 2**62)`.
fn check_budget(budget: Option<IntArg>) -> PyResult<Option<u64>> {
    let out_of_range = |text: &str| {
        PyValueError::new_err(format!(
            "budget_bytes={text} must be >= 0 and < 2**62 (or None: unbounded)"
        ))
    };
    match budget {
        None => Ok(None),
        Some(IntArg::Fits(value)) if value < MAX_REQUEST_BYTES => Ok(Some(value)),
        Some(IntArg::Fits(value)) => Err(out_of_range(&value.to_string())),
        Some(IntArg::Negative(text) | IntArg::TooWide(text)) => Err(out_of_range(&text)),
        Some(IntArg::NotInt { repr, type_name }) => Err(PyTypeError::new_err(format!(
            "budget_bytes={repr} must be an int or None (got {type_name})"
        ))),
    }
}

fn check_request(op: &str, nbytes: &IntArg) -> PyResult<u64> {
    let nbytes = nbytes.check(op, "nbytes", 64)?;
    if nbytes >= MAX_REQUEST_BYTES {
        return Err(refused(Refusal::TooLarge { nbytes }));
    }
    Ok(nbytes)
}

fn lease(op: &str, buffer_id: &IntArg, serial: &IntArg) -> PyResult<(u64, u64)> {
    Ok((
        buffer_id.check(op, "buffer_id", 64)?,
        serial.check(op, "serial", 64)?,
    ))
}

/// The thread-safe ledger of one `RustBufferPool` (see `dilated_attn.pool.PoolLedger`).
#[pyclass(name = "Ledger", module = "dilated_attn_pool._pool_rs", frozen)]
struct PyLedger {
    inner: Mutex<Ledger>,
    budget: Option<u64>,
}

fn refused(refusal: Refusal) -> PyErr {
    match refusal {
        Refusal::OverReserve { .. } => PyMemoryError::new_err(refusal.to_string()),
        _ => PyValueError::new_err(refusal.to_string()),
    }
}

impl PyLedger {
    fn lock(&self) -> PyResult<MutexGuard<'_, Ledger>> {
        self.inner.lock().map_err(|_| {
            PyRuntimeError::new_err("the pool's ledger is unusable: a panic interrupted an update")
        })
    }
}

#[pymethods]
impl PyLedger {
    #[new]
    #[pyo3(
        signature = (budget_bytes=None, event_capacity=IntArg::Fits(DEFAULT_EVENT_CAPACITY as u64)),
        text_signature = "(budget_bytes=None, event_capacity=1024)"
    )]
    fn new(budget_bytes: Option<IntArg>, event_capacity: IntArg) -> PyResult<Self> {
        let budget = check_budget(budget_bytes)?;
        let capacity = event_capacity.check("Ledger", "event_capacity", 64)?;
        if capacity > MAX_EVENT_CAPACITY as u64 {
            return Err(PyValueError::new_err(format!(
                "Ledger: event_capacity={capacity} must be <= {MAX_EVENT_CAPACITY} (2**20): the event \
                 history is a bounded ring"
            )));
        }
        Ok(PyLedger {
            inner: Mutex::new(Ledger::new(budget, capacity as usize)),
            budget,
        })
    }

    #[getter]
    fn budget_bytes(&self) -> Option<u64> {
        self.budget
    }

    /// `(buffer_id, serial, alloc_bytes)`; `alloc_bytes` is 0 on a hit.
    fn acquire(&self, device: IntArg, dtype: IntArg, nbytes: IntArg) -> PyResult<(u64, u64, u64)> {
        let device = device.check("acquire", "device", 32)? as u32;
        let dtype = dtype.check("acquire", "dtype", 32)? as u32;
        let nbytes = check_request("acquire", &nbytes)?;
        let grant = self
            .lock()?
            .acquire(device, dtype, nbytes)
            .map_err(refused)?;
        Ok((grant.buffer_id, grant.serial, grant.alloc_bytes))
    }

    fn abandon(&self, buffer_id: IntArg, serial: IntArg) -> PyResult<()> {
        let (buffer_id, serial) = lease("abandon", &buffer_id, &serial)?;
        self.lock()?.abandon(buffer_id, serial).map_err(refused)
    }

    /// The ids the budget evicted.
    fn release(&self, buffer_id: IntArg, serial: IntArg) -> PyResult<Vec<u64>> {
        let (buffer_id, serial) = lease("release", &buffer_id, &serial)?;
        self.lock()?.release(buffer_id, serial).map_err(refused)
    }

    /// `None`, or the budget's refusal `(requested, free, pinned, budget)` in bytes.
    fn pin(&self, buffer_id: IntArg, serial: IntArg) -> PyResult<Option<(u64, u64, u64, u64)>> {
        let (buffer_id, serial) = lease("pin", &buffer_id, &serial)?;
        let result = self.lock()?.pin(buffer_id, serial);
        match result {
            Ok(()) => Ok(None),
            Err(Refusal::OverBudget {
                requested,
                free,
                pinned,
                budget,
                ..
            }) => Ok(Some((requested, free, pinned, budget))),
            Err(refusal) => Err(refused(refusal)),
        }
    }

    /// The ids the budget evicted.
    fn unpin(&self, buffer_id: IntArg, serial: IntArg) -> PyResult<Vec<u64>> {
        let (buffer_id, serial) = lease("unpin", &buffer_id, &serial)?;
        self.lock()?.unpin(buffer_id, serial).map_err(refused)
    }

    /// `(bytes evicted, evicted ids)`.
    fn trim(&self, target_bytes: IntArg) -> PyResult<(u64, Vec<u64>)> {
        let target_bytes = target_bytes.check("trim", "target_bytes", 64)?;
        Ok(self.lock()?.trim(target_bytes))
    }

    /// Values in `STATS_KEYS` order.
    fn stats(&self) -> PyResult<[u64; 12]> {
        Ok(self.lock()?.stats().to_array())
    }

    /// `(kind, buffer_id, rounded_bytes, requested_bytes)` of the last events, oldest first.
    fn events(&self) -> PyResult<Vec<(u8, u64, u64, u64)>> {
        let events: Vec<Event> = self.lock()?.events().copied().collect();
        Ok(events
            .into_iter()
            .map(|e| {
                (
                    e.kind as u8,
                    e.buffer_id,
                    e.rounded_bytes,
                    e.requested_bytes,
                )
            })
            .collect())
    }

    /// Time `iterations` acquire+release pairs of one request inside Rust, each call taking the
    /// mutex as the Python-facing methods do; returns the elapsed nanoseconds. For benchmarks.
    fn time_pairs(
        &self,
        device: IntArg,
        dtype: IntArg,
        nbytes: IntArg,
        iterations: IntArg,
    ) -> PyResult<u64> {
        let device = device.check("time_pairs", "device", 32)? as u32;
        let dtype = dtype.check("time_pairs", "dtype", 32)? as u32;
        let nbytes = check_request("time_pairs", &nbytes)?;
        let iterations = iterations.check("time_pairs", "iterations", 64)?;
        let start = Instant::now();
        for _ in 0..iterations {
            let grant = self
                .lock()?
                .acquire(device, dtype, nbytes)
                .map_err(refused)?;
            let evicted = self
                .lock()?
                .release(grant.buffer_id, grant.serial)
                .map_err(refused)?;
            std::hint::black_box(evicted);
        }
        Ok(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The thread-safe keyed LRU behind `dilated_attn.cache` (see
/// `dilated_attn.pool.cache_ledger.CacheLedger`).
#[pyclass(name = "CacheLedger", module = "dilated_attn_pool._pool_rs", frozen)]
struct PyCacheLedger {
    inner: Mutex<CacheLedger>,
}

fn cache_refused(refusal: CacheRefusal) -> PyErr {
    PyValueError::new_err(refusal.to_string())
}

fn cache_budget(op: &str, budget: &IntArg) -> PyResult<u64> {
    let budget = budget.check(op, "budget_bytes", 64)?;
    if budget >= MAX_CACHE_BUDGET_BYTES {
        return Err(PyValueError::new_err(format!(
            "{op}: budget_bytes={budget} must be < 2**62"
        )));
    }
    Ok(budget)
}

impl PyCacheLedger {
    fn lock(&self) -> PyResult<MutexGuard<'_, CacheLedger>> {
        self.inner.lock().map_err(|_| {
            PyRuntimeError::new_err("the cache's ledger is unusable: a panic interrupted an update")
        })
    }
}

#[pymethods]
impl PyCacheLedger {
    #[new]
    fn new(budget_bytes: IntArg) -> PyResult<Self> {
        let budget = cache_budget("CacheLedger", &budget_bytes)?;
        let ledger = CacheLedger::new(budget).map_err(cache_refused)?;
        Ok(PyCacheLedger {
            inner: Mutex::new(ledger),
        })
    }

    /// The evicted ids; `[entry_id]` alone when the entry is larger than the budget.
    fn insert(&self, entry_id: IntArg, nbytes: IntArg) -> PyResult<Vec<u64>> {
        let entry_id = entry_id.check("insert", "entry_id", 64)?;
        let nbytes = nbytes.check("insert", "nbytes", 64)?;
        self.lock()?.insert(entry_id, nbytes).map_err(cache_refused)
    }

    fn touch(&self, entry_id: IntArg) -> PyResult<()> {
        let entry_id = entry_id.check("touch", "entry_id", 64)?;
        self.lock()?.touch(entry_id).map_err(cache_refused)
    }

    /// The removed entry's size.
    fn remove(&self, entry_id: IntArg) -> PyResult<u64> {
        let entry_id = entry_id.check("remove", "entry_id", 64)?;
        self.lock()?.remove(entry_id).map_err(cache_refused)
    }

    /// The evicted ids.
    fn set_budget(&self, budget_bytes: IntArg) -> PyResult<Vec<u64>> {
        let budget = cache_budget("set_budget", &budget_bytes)?;
        self.lock()?.set_budget(budget).map_err(cache_refused)
    }

    /// Values in `CACHE_STATS_KEYS` order.
    fn stats(&self) -> PyResult<[u64; 8]> {
        Ok(self.lock()?.stats().to_array())
    }

    /// Held ids, least recently used first.
    fn order(&self) -> PyResult<Vec<u64>> {
        Ok(self.lock()?.order())
    }
}

/// The bucket size in bytes of a request of `nbytes` bytes.
#[pyfunction]
fn round_bytes(nbytes: IntArg) -> PyResult<u64> {
    Ok(rounding::round_bytes(check_request(
        "round_bytes",
        &nbytes,
    )?))
}

#[pymodule]
fn _pool_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The constants and texts `dilated_attn_pool` compares with core's at import.
    m.add("STATS_KEYS", STATS_KEYS.to_vec())?;
    m.add("EVENT_KINDS", EVENT_KINDS.to_vec())?;
    m.add("MIN_BLOCK_BYTES", MIN_BLOCK_BYTES)?;
    m.add("LARGE_BYTES", LARGE_BYTES)?;
    m.add("ROUNDUP_DIVISIONS", ROUNDUP_DIVISIONS)?;
    m.add("MAX_REQUEST_BYTES", MAX_REQUEST_BYTES)?;
    m.add("MAX_RESERVED_BYTES", MAX_RESERVED_BYTES)?;
    m.add("DEFAULT_EVENT_CAPACITY", DEFAULT_EVENT_CAPACITY)?;
    m.add("MAX_EVENT_CAPACITY", MAX_EVENT_CAPACITY)?;
    m.add("REFUSAL_SAMPLES", Refusal::samples())?;
    m.add("CACHE_STATS_KEYS", CACHE_STATS_KEYS.to_vec())?;
    m.add("MAX_CACHE_BUDGET_BYTES", MAX_CACHE_BUDGET_BYTES)?;
    m.add_class::<PyCacheLedger>()?;
    m.add_class::<PyLedger>()?;
    m.add_function(wrap_pyfunction!(round_bytes, m)?)?;
    Ok(())
}
