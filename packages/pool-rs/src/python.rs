//! `dilated_attn_pool._pool_rs`: the ledger behind one mutex, integers in and out.
//!
//! The mutex is held only inside these methods, which touch no Python object while holding it:
//! arguments are converted before locking and results after unlocking.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::events::Event;
use crate::ledger::{Ledger, Refusal, STATS_KEYS};
use crate::rounding::{self, MAX_REQUEST_BYTES};

/// The thread-safe ledger of one `RustBufferPool` (see `dilated_attn.pool.PoolLedger`).
#[pyclass(name = "Ledger", module = "dilated_attn_pool._pool_rs", frozen)]
struct PyLedger {
    inner: Mutex<Ledger>,
    budget: Option<u64>,
}

fn refused(refusal: Refusal) -> PyErr {
    PyValueError::new_err(refusal.to_string())
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
    #[pyo3(signature = (budget_bytes=None, event_capacity=1024))]
    fn new(budget_bytes: Option<u64>, event_capacity: usize) -> PyResult<Self> {
        if let Some(budget) = budget_bytes {
            if budget >= MAX_REQUEST_BYTES {
                return Err(PyValueError::new_err(format!(
                    "budget_bytes={budget} must be >= 0 and < 2**62 (or None: unbounded)"
                )));
            }
        }
        Ok(PyLedger {
            inner: Mutex::new(Ledger::new(budget_bytes, event_capacity)),
            budget: budget_bytes,
        })
    }

    #[getter]
    fn budget_bytes(&self) -> Option<u64> {
        self.budget
    }

    /// `(buffer_id, serial, alloc_bytes)`; `alloc_bytes` is 0 on a hit.
    fn acquire(&self, device: u32, dtype: u32, nbytes: u64) -> PyResult<(u64, u64, u64)> {
        let grant = self
            .lock()?
            .acquire(device, dtype, nbytes)
            .map_err(refused)?;
        Ok((grant.buffer_id, grant.serial, grant.alloc_bytes))
    }

    fn abandon(&self, buffer_id: u64, serial: u64) -> PyResult<()> {
        self.lock()?.abandon(buffer_id, serial).map_err(refused)
    }

    /// The ids the budget evicted.
    fn release(&self, buffer_id: u64, serial: u64) -> PyResult<Vec<u64>> {
        self.lock()?.release(buffer_id, serial).map_err(refused)
    }

    /// `None`, or the budget's refusal `(requested, free, pinned, budget)` in bytes.
    fn pin(&self, buffer_id: u64, serial: u64) -> PyResult<Option<(u64, u64, u64, u64)>> {
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
    fn unpin(&self, buffer_id: u64, serial: u64) -> PyResult<Vec<u64>> {
        self.lock()?.unpin(buffer_id, serial).map_err(refused)
    }

    /// `(bytes evicted, evicted ids)`.
    fn trim(&self, target_bytes: u64) -> PyResult<(u64, Vec<u64>)> {
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
    fn time_pairs(&self, device: u32, dtype: u32, nbytes: u64, iterations: u64) -> PyResult<u64> {
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

/// The bucket size in bytes of a request of `nbytes` bytes.
#[pyfunction]
fn round_bytes(nbytes: u64) -> PyResult<u64> {
    if nbytes >= MAX_REQUEST_BYTES {
        return Err(refused(Refusal::TooLarge { nbytes }));
    }
    Ok(rounding::round_bytes(nbytes))
}

#[pymodule]
fn _pool_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("STATS_KEYS", STATS_KEYS.to_vec())?;
    m.add("MAX_REQUEST_BYTES", MAX_REQUEST_BYTES)?;
    m.add_class::<PyLedger>()?;
    m.add_function(wrap_pyfunction!(round_bytes, m)?)?;
    Ok(())
}
