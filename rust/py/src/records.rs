//! Records of a batch's results: one instance of a `NamedTuple` class (Beam's
//! `PredictionResult`) per row, built in one native pass. Python's way,
//! `tuple.__new__(cls, (example, inference, model_id))` mapped over a zip, costs about 110 ns
//! a row; this allocates each instance with the class's own allocator and fills its three
//! items, as `tuple.__new__` does for a subclass, at a fraction of that.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyIterator, PyList, PyTuple, PyType};

/// The items of each record.
const FIELDS: usize = 3;

/// `[cls(first[i], second[i], third) for i in ...]`, each built as `tuple.__new__` builds an
/// instance of a tuple subclass (no `__new__` of the class is called, as with `cls._make`).
/// `cls` must subclass `tuple` and add no storage of its own (a `NamedTuple`'s `__slots__ =
/// ()`); `first` and `second` must have the same length.
#[pyfunction]
pub fn records<'py>(
    cls: &Bound<'py, PyType>,
    first: &Bound<'py, PyAny>,
    second: &Bound<'py, PyAny>,
    third: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let py = cls.py();
    check_record_class(cls)?;
    let length = first.len()?;
    if second.len()? != length {
        return Err(PyValueError::new_err(format!(
            "records: first has {length} items and second {}; they must pair up",
            second.len()?
        )));
    }
    // SAFETY: `cls` is a type object; `Py_tp_alloc` is set on every type (inherited).
    let alloc = unsafe { ffi::PyType_GetSlot(cls.as_type_ptr(), ffi::Py_tp_alloc) };
    if alloc.is_null() {
        return Err(PyTypeError::new_err("records: the class has no allocator"));
    }
    // SAFETY: the slot holds an `allocfunc`, as `Py_tp_alloc` is documented to.
    let alloc: ffi::allocfunc = unsafe { std::mem::transmute(alloc) };
    // SAFETY: a new list of `length` NULL items, each set once below before it is returned
    // (`PyList_SetItem` steals the record's reference); a list left short is never returned.
    let out = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyList_New(length as ffi::Py_ssize_t))? };
    let (mut firsts, mut seconds) = (Items::of(first)?, Items::of(second)?);
    for filled in 0..length {
        let items = [firsts.get(filled)?, seconds.get(filled)?, third.clone()];
        // SAFETY: the allocator of a tuple subclass gives a new tuple of FIELDS NULL items,
        // refcount 1 (tracked by the collector, which skips NULL items); each item is set
        // once with a new reference, which `PyTuple_SetItem` steals, before anything else
        // runs. `tuple.__new__` fills a subclass's instance the same way.
        unsafe {
            let record = alloc(cls.as_type_ptr(), FIELDS as ffi::Py_ssize_t);
            if record.is_null() {
                return Err(PyErr::fetch(py));
            }
            for (index, item) in items.into_iter().enumerate() {
                ffi::PyTuple_SetItem(record, index as ffi::Py_ssize_t, item.into_ptr());
            }
            ffi::PyList_SetItem(out.as_ptr(), filled as ffi::Py_ssize_t, record);
        }
    }
    Ok(out.cast_into::<PyList>()?)
}

/// A sequence's items in order: a list's or tuple's by index (no iterator: the common cases,
/// and the fastest), any other's by iterating it (a numpy array's rows).
enum Items<'py> {
    List(Bound<'py, PyList>),
    Tuple(Bound<'py, PyTuple>),
    Iter(Bound<'py, PyIterator>),
}

impl<'py> Items<'py> {
    fn of(sequence: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(if let Ok(list) = sequence.cast::<PyList>() {
            Self::List(list.clone())
        } else if let Ok(tuple) = sequence.cast::<PyTuple>() {
            Self::Tuple(tuple.clone())
        } else {
            Self::Iter(sequence.try_iter()?)
        })
    }

    /// The item at `index`, asked for in order from 0 (the caller's length was checked).
    fn get(&mut self, index: usize) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Self::List(list) => list.get_item(index),
            Self::Tuple(tuple) => tuple.get_item(index),
            Self::Iter(iter) => iter.next().unwrap_or_else(|| {
                Err(PyValueError::new_err(format!("records: an iterable ended after {index} items")))
            }),
        }
    }
}

/// Refuses a class whose instances are not plain tuples of `FIELDS` items.
fn check_record_class(cls: &Bound<'_, PyType>) -> PyResult<()> {
    let py = cls.py();
    let tuple = py.get_type::<PyTuple>();
    let plain = cls.is_subclass(&tuple)?
        && cls.getattr("__basicsize__")?.eq(tuple.getattr("__basicsize__")?)?
        && cls.getattr("_fields").and_then(|f| f.len()).ok() == Some(FIELDS);
    if !plain {
        return Err(PyTypeError::new_err(format!("records: {} is not a NamedTuple of {FIELDS} fields", cls.name()?)));
    }
    Ok(())
}
