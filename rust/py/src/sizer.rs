//! Binding of the batch sizer: the core's `BatchSizer` behind a lock, pickled as its bytes.

use std::sync::{Mutex, MutexGuard, PoisonError};

use beam_turbo_core::sizer::{self, Config};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple, PyType};

use crate::error::PyCoreError;

/// Chooses batch sizes from the timings of finished batches, for Beam's batching targets.
///
/// Takes the arguments of Beam's batch-size estimator (keyword-only, same defaults), grows at
/// most 4x past the largest size measured towards the fitted target, then holds it; it
/// explores again only when the costs change. A memory failure sets a `ceiling` that it does
/// not propose again until a long run of successes. Sizes are elements, or total weight when
/// batches are weighed. It pickles with everything it learned.
///
/// Example:
///
///     >>> from beam_turbo import BatchSizer
///     >>> sizer = BatchSizer(max_batch_size=100)
///     >>> sizer.next_size()
///     1
///     >>> sizer.record(1, 0.011)
///     >>> sizer.record(4, 0.014)
///     >>> sizer.next_size()  # 0.01 s fixed + 1 ms per element: 5% overhead at 190, capped
///     16
///     >>> sizer.record_failure(16)  # out of memory
///     >>> sizer.ceiling
///     16
#[pyclass(frozen, module = "beam_turbo._native")]
#[derive(Debug)]
pub struct BatchSizer {
    inner: Mutex<sizer::BatchSizer>,
}

impl BatchSizer {
    fn sizer(&self) -> MutexGuard<'_, sizer::BatchSizer> {
        // Every update leaves the sizer consistent, so a panic elsewhere cannot have broken it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl BatchSizer {
    #[new]
    #[pyo3(signature = (
        *,
        min_batch_size = 1,
        max_batch_size = 10_000,
        target_batch_overhead = Some(0.05),
        target_batch_duration_secs = Some(10.0),
        target_batch_duration_secs_including_fixed_cost = None,
        variance = 0.25,
    ), text_signature = "(*, min_batch_size=1, max_batch_size=10000, target_batch_overhead=0.05, \
        target_batch_duration_secs=10.0, target_batch_duration_secs_including_fixed_cost=None, variance=0.25)")]
    fn new(
        min_batch_size: i64,
        max_batch_size: i64,
        target_batch_overhead: Option<f64>,
        target_batch_duration_secs: Option<f64>,
        target_batch_duration_secs_including_fixed_cost: Option<f64>,
        variance: f64,
    ) -> PyResult<Self> {
        let config = Config {
            min_batch_size,
            max_batch_size,
            target_batch_overhead,
            target_batch_duration_secs,
            target_batch_duration_secs_including_fixed_cost,
            variance,
        };
        Ok(Self { inner: Mutex::new(sizer::BatchSizer::new(config).map_err(PyCoreError)?) })
    }

    /// The size of the next batch (elements, or total weight when batches are weighed).
    fn next_size(&self) -> u64 {
        self.sizer().next_size()
    }

    /// Records a batch of `size` whose downstream work took `seconds`. Sizes that are not
    /// positive and timings that are NaN, infinite or negative count but teach nothing.
    fn record(&self, size: f64, seconds: f64) {
        self.sizer().record(size, seconds);
    }

    /// Records a batch of `size` that failed; `memory=True` (out of memory) sets the ceiling,
    /// any other failure only counts.
    #[pyo3(signature = (size, memory = true))]
    fn record_failure(&self, size: f64, memory: bool) {
        self.sizer().record_failure(size, memory);
    }

    /// The smallest size that failed for memory, not proposed again until a long run of
    /// successes; or `None`.
    #[getter]
    fn ceiling(&self) -> Option<u64> {
        self.sizer().ceiling()
    }

    /// The fitted fixed cost of a batch in seconds, once two sizes have been measured.
    #[getter]
    fn fixed_cost(&self) -> Option<f64> {
        self.sizer().fit().map(|fit| fit.fixed)
    }

    /// The fitted cost per element (or unit of weight) in seconds.
    #[getter]
    fn per_element_cost(&self) -> Option<f64> {
        self.sizer().fit().map(|fit| fit.per_element)
    }

    /// Batches recorded, successful or not.
    #[getter]
    fn batches(&self) -> u64 {
        self.sizer().batches()
    }

    /// Batches that failed, for memory or not.
    #[getter]
    fn failures(&self) -> u64 {
        self.sizer().failures()
    }

    /// Changes of the costs detected (a model swapped, a slower machine).
    #[getter]
    fn cost_changes(&self) -> u64 {
        self.sizer().changes()
    }

    fn __repr__(&self) -> String {
        let s = self.sizer();
        format!(
            "BatchSizer(next_size={}, batches={}, failures={}, ceiling={})",
            s.next_size(),
            s.batches(),
            s.failures(),
            s.ceiling().map_or_else(|| "None".into(), |c| c.to_string())
        )
    }

    /// The whole learned state, a few hundred bytes.
    fn __getstate__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.sizer().to_bytes())
    }

    /// Restores a state made by `__getstate__`.
    fn __setstate__(&self, state: &[u8]) -> PyResult<()> {
        *self.sizer() = sizer::BatchSizer::from_bytes(state).map_err(PyCoreError)?;
        Ok(())
    }

    /// Pickled as `(BatchSizer, (), state)`: a default sizer that `__setstate__` overwrites.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let class: Bound<'py, PyType> = slf.get_type();
        PyTuple::new(py, [class.into_any(), PyTuple::empty(py).into_any(), slf.get().__getstate__(py).into_any()])
    }
}
