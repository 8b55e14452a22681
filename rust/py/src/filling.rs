//! The gatherer's per-element path for elements that all weigh 1: append, and give the batch
//! out when its length reaches its target. It runs once per element, so it is native: a
//! Python method for it costs about 75 ns an element, most of it the call. The batches
//! themselves (their targets, what happens when one starts) are the Python gatherer's:
//! `python/beam_turbo/_gathering/gatherer.py`, whose `add_unit` this is.

use pyo3::prelude::*;
use pyo3::types::PyList;

/// The batch being filled: the gatherer's batch object, its element list, its target.
#[derive(Debug)]
struct Filling {
    window: Py<PyAny>,
    batch: Py<PyAny>,
    elements: Py<PyList>,
    target: f64,
}

/// Fills one batch at a time with elements of weight 1. `start(window)` gives each new batch
/// (an object with an `elements` list, a `target` and a `weight`), called when the first
/// element of a batch arrives.
#[pyclass(module = "beam_turbo._native")]
#[derive(Debug)]
pub struct UnitFiller {
    start: Py<PyAny>,
    filling: Option<Filling>,
}

#[pymethods]
impl UnitFiller {
    #[new]
    fn new(start: Py<PyAny>) -> Self {
        Self { start, filling: None }
    }

    /// Appends `element` to the batch being filled (starting one for `window` if none is);
    /// returns the batch when its length reached its target (its `weight` set to that
    /// length), and starts afresh, else None.
    fn add(
        &mut self,
        py: Python<'_>,
        element: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let filling = if let Some(filling) = self.filling.as_ref() {
            filling
        } else {
            let batch = self.start.call1(py, (window,))?;
            let bound = batch.bind(py);
            let elements = bound.getattr("elements")?.cast_into::<PyList>()?.unbind();
            let target = bound.getattr("target")?.extract::<f64>()?;
            self.filling.insert(Filling { window: window.clone().unbind(), batch, elements, target })
        };
        let elements = filling.elements.bind(py);
        elements.append(element)?;
        let length = elements.len();
        if (length as f64) < filling.target {
            return Ok(None);
        }
        let full = self.filling.take().map(|f| f.batch);
        if let Some(batch) = &full {
            batch.bind(py).setattr("weight", length)?;
        }
        Ok(full)
    }

    /// The batch being filled and its window, if any (at the end of a bundle), and starts
    /// afresh.
    fn take(&mut self) -> Option<(Py<PyAny>, Py<PyAny>)> {
        self.filling.take().map(|f| (f.window, f.batch))
    }
}
