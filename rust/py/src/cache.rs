//! Bindings of the model cache: Python keys, tags and models in the core's `ModelCache`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use beam_turbo_core::cache::{self, AcquireError, Registry};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::{PyCoreError, ReleaseGil};

type Core = cache::ModelCache<PyKey, PyTag, Py<PyAny>, PyErr>;

/// Every cache of this process by identity, for unpickling.
static REGISTRY: Registry<Core> = Registry::new();

/// A key: its Python hash, computed once, and `==` as a dict compares keys (identity first).
#[derive(Debug)]
struct PyKey {
    hash: isize,
    key: Py<PyAny>,
}

impl Hash for PyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_isize(self.hash);
    }
}

impl PartialEq for PyKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && same(&self.key, &other.key)
    }
}

impl Eq for PyKey {}

/// A tag, compared with `==` (as Beam's `Shared` compares tags, `None` included).
#[derive(Debug)]
struct PyTag(Py<PyAny>);

impl PartialEq for PyTag {
    fn eq(&self, other: &Self) -> bool {
        same(&self.0, &other.0)
    }
}

/// `a is b or a == b`. An `==` that raises (or whose result has no truth value) counts as
/// "different", and its error goes to `sys.unraisablehook`: a key then misses, a tag reloads.
fn same(a: &Py<PyAny>, b: &Py<PyAny>) -> bool {
    a.is(b)
        || Python::attach(|py| {
            let a = a.bind(py);
            a.eq(b.bind(py)).unwrap_or_else(|err| {
                err.write_unraisable(py, Some(a));
                false
            })
        })
}

fn call_loader(loader: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    if !loader.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "loader must be a callable taking no arguments, got {}",
            loader.get_type().name()?
        )));
    }
    loader.call0().map(Bound::unbind)
}

/// A process-wide cache of loaded models, shared by every thread: one model per key.
///
/// ``acquire(key, loader, tag=None)`` returns the model for ``key``, calling ``loader()`` only
/// when the cache holds none or holds one loaded for a tag that is not ``== tag``. A hit takes
/// no lock. When several threads miss at once, ``loader`` runs once and they all get its
/// model (or its exception); they wait with the GIL released. A new ``tag`` loads the new
/// model and swaps it in; callers still holding the old one keep it until they drop it.
/// With ``max_models``, the least recently used models are dropped beyond that many.
///
/// ``ModelCache.default()`` is the process's shared cache, and pickles to "the default cache
/// of whichever process unpickles it". A constructed cache pickles to a reference to itself:
/// in its own process that is the same cache, in another process a cache made there on first
/// unpickling (with the same ``max_models``) and kept for the life of that process, which all
/// copies unpickled there share.
///
/// Example:
///     >>> from beam_turbo import ModelCache
///     >>> cache = ModelCache(max_models=2)
///     >>> cache.acquire("model-a", lambda: ["weights"], tag="v1")
///     ['weights']
///     >>> cache.stats()["loads"]
///     1
#[allow(clippy::doc_markdown, clippy::doc_link_with_quotes, reason = "a Python docstring with a doctest, not rustdoc")]
#[pyclass(frozen, module = "beam_turbo._native")]
#[derive(Debug)]
pub struct ModelCache {
    core: Arc<Core>,
    /// What a pickle refers to: `None` for the default cache.
    id: Option<u128>,
}

static DEFAULT: PyOnceLock<Py<ModelCache>> = PyOnceLock::new();

#[pymethods]
impl ModelCache {
    #[new]
    #[pyo3(signature = (*, max_models=None))]
    fn new(max_models: Option<i64>) -> PyResult<Self> {
        let core = Arc::new(Core::new(cache::max_models(max_models).map_err(PyCoreError)?));
        let id = cache::new_cache_id();
        REGISTRY.register(id, &core);
        Ok(Self { core, id: Some(id) })
    }

    /// The process-wide cache (unbounded), the same object on every call.
    #[classmethod]
    fn default(cls: &Bound<'_, PyType>) -> PyResult<Py<Self>> {
        let py = cls.py();
        DEFAULT
            .get_or_try_init(py, || Py::new(py, Self { core: Arc::new(Core::new(None)), id: None }))
            .map(|d| d.clone_ref(py))
    }

    /// The model for ``key`` loaded for ``tag``, calling ``loader()`` if there is none.
    #[pyo3(signature = (key, loader, tag=None))]
    fn acquire(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        loader: &Bound<'_, PyAny>,
        tag: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let key = PyKey { hash: key.hash()?, key: key.clone().unbind() };
        let tag = PyTag(tag.map_or_else(|| py.None(), |t| t.clone().unbind()));
        self.core.acquire(key, tag, || call_loader(loader), &ReleaseGil(py), |model| model.clone_ref(py)).map_err(
            |err| match err {
                AcquireError::Load(err) => Arc::try_unwrap(err).unwrap_or_else(|shared| shared.clone_ref(py)),
                AcquireError::Interrupted(err) => err,
                AcquireError::Cache(err) => PyCoreError(err).into(),
            },
        )
    }

    /// Forgets ``key``'s model (a load of it in progress still returns to its callers but is
    /// not kept). Returns whether there was anything to forget.
    fn invalidate(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.core.invalidate(&PyKey { hash: key.hash()?, key: key.clone().unbind() }))
    }

    /// Forgets every model.
    fn clear(&self) {
        self.core.clear();
    }

    /// ``hits``, ``misses``, ``loads``, ``load_errors``, ``load_seconds``, ``evictions`` and
    /// ``models`` (held now).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.core.stats();
        let dict = PyDict::new(py);
        dict.set_item("hits", stats.hits)?;
        dict.set_item("misses", stats.misses)?;
        dict.set_item("loads", stats.loads)?;
        dict.set_item("load_errors", stats.load_errors)?;
        dict.set_item("load_seconds", stats.load_seconds)?;
        dict.set_item("evictions", stats.evictions)?;
        dict.set_item("models", stats.models)?;
        Ok(dict)
    }

    /// The bound on models held, or ``None``.
    #[getter]
    fn max_models(&self) -> Option<usize> {
        self.core.max_models().map(std::num::NonZeroUsize::get)
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let class = py.get_type::<Self>();
        match self.id {
            None => Ok((class.getattr("default")?, PyTuple::empty(py))),
            Some(id) => Ok((class.getattr("_resolve")?, (id, self.max_models()).into_pyobject(py)?)),
        }
    }

    /// The cache a pickled reference names, in this process (see the class docs).
    #[staticmethod]
    fn _resolve(id: u128, max_models: Option<i64>) -> PyResult<Self> {
        let bound = cache::max_models(max_models).map_err(PyCoreError)?;
        Ok(Self { core: REGISTRY.resolve(id, || Core::new(bound)), id: Some(id) })
    }

    fn __repr__(&self) -> String {
        let models = self.core.stats().models;
        match (self.id, self.max_models()) {
            (None, _) => format!("<ModelCache default, models={models}>"),
            (Some(_), None) => format!("<ModelCache max_models=None, models={models}>"),
            (Some(_), Some(bound)) => format!("<ModelCache max_models={bound}, models={models}>"),
        }
    }
}
