//! The one mapping from core errors to Python exceptions, and the one place that releases
//! the GIL around core work.

use beam_turbo_core::cache::Waiter;
use beam_turbo_core::{CoreError, ErrorKind};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// A core error on its way to Python (a newtype, since both `CoreError` and `PyErr` are
/// foreign to this crate).
#[derive(Debug)]
pub struct PyCoreError(pub CoreError);

impl From<CoreError> for PyCoreError {
    fn from(err: CoreError) -> Self {
        Self(err)
    }
}

/// The classes of `beam_turbo.errors`, imported once.
struct Classes {
    value: Py<PyType>,
    type_: Py<PyType>,
    memory: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || {
        let module = py.import("beam_turbo.errors")?;
        let get = |name: &str| -> PyResult<Py<PyType>> { Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind()) };
        Ok(Classes {
            value: get("InvalidInputError")?,
            type_: get("InvalidTypeError")?,
            memory: get("OutOfMemoryError")?,
        })
    })
}

impl From<PyCoreError> for PyErr {
    fn from(PyCoreError(err): PyCoreError) -> Self {
        Python::attach(|py| {
            let classes = match classes(py) {
                Ok(classes) => classes,
                Err(import_error) => return import_error,
            };
            let class = match err.kind() {
                ErrorKind::Value => &classes.value,
                ErrorKind::Type => &classes.type_,
                ErrorKind::Memory => &classes.memory,
            };
            PyErr::from_type(class.bind(py).clone(), err.to_string())
        })
    }
}

/// Runs `work` with the GIL released and turns its error into the matching Python exception.
pub fn detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> Result<T, CoreError> + Send) -> PyResult<T> {
    py.detach(work).map_err(|e| PyCoreError(e).into())
}

/// How a thread waits for another thread's model load: with the GIL released (the loader needs
/// it), running signal handlers between waits so that Ctrl-C interrupts it.
pub struct ReleaseGil<'py>(pub Python<'py>);

impl Waiter<PyErr> for ReleaseGil<'_> {
    fn block<R: Send>(&self, wait: impl FnOnce() -> R + Send) -> R {
        self.0.detach(wait)
    }

    fn interrupted(&self) -> PyResult<()> {
        self.0.check_signals()
    }
}
