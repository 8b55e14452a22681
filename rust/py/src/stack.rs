//! Bindings of the stacking kernels: numpy arrays in, one numpy batch out.

use std::ffi::c_void;

use beam_turbo_core::CoreError;
use beam_turbo_core::error::Described;
use beam_turbo_core::memory::{self, AlignedBuf};
use beam_turbo_core::stack::{PadValue, ScalarKind, Stacker, default_threads, extent, pad_bytes as core_pad_bytes};
use numpy::npyffi::{self, NPY_ARRAY_CARRAY, NpyTypes, PY_ARRAY_API, npy_intp};
use numpy::{PyArray1, PyArrayDescr, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyList, PyString, PyTuple};

use crate::error::{PyCoreError, detached};

/// The memory of a batch made by `stack`; numpy arrays refer to it as their `base`, and the
/// buffer is freed (or pooled) when the last of them dies.
#[pyclass(frozen, module = "beam_turbo._native")]
#[derive(Debug)]
pub struct BatchMemory {
    buf: AlignedBuf,
}

#[pymethods]
impl BatchMemory {
    /// Bytes held.
    #[getter]
    fn nbytes(&self) -> usize {
        self.buf.len()
    }
}

fn describe(array: &Bound<'_, PyUntypedArray>) -> Described {
    Described { shape: array.shape().to_vec(), dtype: array.dtype().to_string() }
}

/// Field access to a numpy array's struct (no Python calls).
fn fields(array: &Bound<'_, PyUntypedArray>) -> *const npyffi::PyArrayObject_fields {
    // SAFETY: `array` is a live numpy array; the fields pointer is valid while it is.
    unsafe { npyffi::_PyArray_GET_ITEM_DATA(array.as_array_ptr().cast_const()) }
}

pub(crate) fn data_ptr(array: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: `fields` points to the live array's struct.
    unsafe { (*fields(array)).data.cast() }
}

pub(crate) fn flags(array: &Bound<'_, PyUntypedArray>) -> i32 {
    // SAFETY: `fields` points to the live array's struct.
    unsafe { (*fields(array)).flags }
}

fn same_dtype(a: &Bound<'_, PyArrayDescr>, b: &Bound<'_, PyArrayDescr>) -> bool {
    a.is(b) || a.is_equiv_to(b)
}

/// What padding needs to know of a dtype.
fn scalar_kind(dtype: &Bound<'_, PyArrayDescr>) -> ScalarKind {
    if dtype.is_native_byteorder() == Some(false) {
        return ScalarKind::Other;
    }
    let size = dtype.itemsize();
    match dtype.kind() {
        b'b' => ScalarKind::Bool,
        b'i' => ScalarKind::Signed(size),
        b'u' => ScalarKind::Unsigned(size),
        b'f' => ScalarKind::Float(size),
        b'c' => ScalarKind::Complex(size),
        _ if size == 2 && dtype.typeobj().name().is_ok_and(|n| n == "bfloat16") => ScalarKind::BFloat16,
        _ => ScalarKind::Other,
    }
}

/// Reads a Python number as a pad value.
fn pad_value(value: &Bound<'_, PyAny>, dtype: &Bound<'_, PyArrayDescr>) -> PyResult<PadValue> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(PadValue::Bool(b.is_true()));
    }
    match value.extract::<i128>() {
        Ok(v) => return Ok(PadValue::Int(v)),
        Err(e) if e.is_instance_of::<PyOverflowError>(value.py()) => {
            return Err(PyCoreError(CoreError::PadValue {
                value: value.to_string(),
                dtype: dtype.to_string(),
                reason: "out of range".into(),
            })
            .into());
        }
        Err(_) => {}
    }
    let part = |name| value.getattr(name).and_then(|p| p.extract::<f64>());
    match (part("real"), part("imag")) {
        (Ok(re), Ok(im)) => Ok(if im == 0.0 { PadValue::Float(re) } else { PadValue::Complex(re, im) }),
        _ => Err(PyTypeError::new_err(format!(
            "pad= must be a number (bool, int, float or complex), got {}",
            value.get_type().name()?
        ))),
    }
}

/// Turns element `index` into a numpy array: itself, or whatever `coerce(obj, index)` makes.
fn as_array<'py>(
    obj: Bound<'py, PyAny>,
    index: usize,
    coerce: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    match obj.cast_into::<PyUntypedArray>() {
        Ok(array) => Ok(array),
        Err(err) => {
            let obj = err.into_inner();
            let Some(coerce) = coerce else {
                return Err(PyTypeError::new_err(format!(
                    "element {index} is {}, not a numpy array",
                    obj.get_type().name()?
                )));
            };
            let converted = coerce.call1((obj, index))?;
            converted.cast_into::<PyUntypedArray>().map_err(|e| {
                PyTypeError::new_err(format!(
                    "coerce returned {} for element {index}, not a numpy array",
                    e.into_inner()
                ))
            })
        }
    }
}

/// Checks `out` against the batch and returns its data pointer.
fn check_out(out: &Bound<'_, PyUntypedArray>, stacker: &Stacker, dtype: &Bound<'_, PyArrayDescr>) -> PyResult<*mut u8> {
    let refuse = |what, found: String, expected: String| PyCoreError(CoreError::Out { what, found, expected });
    let shape = stacker.batch_shape();
    if out.shape() != shape.as_slice() {
        let show = |s: &[usize]| beam_turbo_core::error::ShapeDisplay(s).to_string();
        return Err(refuse("has the wrong shape", show(out.shape()), show(&shape)).into());
    }
    if !same_dtype(&out.dtype(), dtype) {
        return Err(refuse("has the wrong dtype", out.dtype().to_string(), dtype.to_string()).into());
    }
    if flags(out) & npyffi::NPY_ARRAY_C_CONTIGUOUS == 0 {
        return Err(refuse("must be C-contiguous", "a strided array".into(), "a C-contiguous array".into()).into());
    }
    if flags(out) & npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(refuse("must be writeable", "a read-only array".into(), "a writeable array".into()).into());
    }
    let data = data_ptr(out);
    stacker.check_disjoint(data, stacker.batch_bytes().map_err(PyCoreError)?).map_err(PyCoreError)?;
    Ok(data)
}

/// Wraps `buf` (holding a batch of `shape` and `dtype`) as a numpy array that owns it.
pub(crate) fn into_ndarray<'py>(
    py: Python<'py>,
    mut buf: AlignedBuf,
    shape: &[usize],
    dtype: &Bound<'py, PyArrayDescr>,
) -> PyResult<Bound<'py, PyAny>> {
    let data = buf.as_mut_ptr();
    let owner = Bound::new(py, BatchMemory { buf })?;
    let mut dims: Vec<npy_intp> = shape.iter().map(|&d| d as npy_intp).collect();
    // SAFETY: `dtype` is a valid descriptor (NewFromDescr steals the new reference we give
    // it); `data` is a 64-byte-aligned allocation of exactly the batch's bytes, kept alive by
    // `owner`, which becomes the array's base (SetBaseObject steals that reference).
    unsafe {
        let array_type = npyffi::get_type_object(py, NpyTypes::PyArray_Type);
        let array = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            array_type,
            dtype.clone().into_dtype_ptr(),
            dims.len() as i32,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data.cast::<c_void>(),
            NPY_ARRAY_CARRAY,
            std::ptr::null_mut(),
        );
        let array = Bound::from_owned_ptr_or_err(py, array)?;
        if PY_ARRAY_API.PyArray_SetBaseObject(py, array.as_ptr().cast(), owner.into_ptr()) != 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(array)
    }
}

/// Stacks `arrays` into one batch. See `beam_turbo.stack` for the documented surface; this
/// takes numpy arrays, and hands anything else to `coerce(obj, index)` to make it one.
#[pyfunction]
#[pyo3(signature = (arrays, *, out=None, pad=None, coerce=None))]
pub fn stack<'py>(
    py: Python<'py>,
    arrays: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    pad: Option<&Bound<'py, PyAny>>,
    coerce: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let items: Vec<Bound<'py, PyAny>> = if let Ok(list) = arrays.cast::<PyList>() {
        list.iter().collect()
    } else if let Ok(tuple) = arrays.cast::<PyTuple>() {
        tuple.iter().collect()
    } else {
        arrays.try_iter()?.collect::<PyResult<_>>()?
    };
    let mut items = items.into_iter().enumerate();
    let Some((_, first)) = items.next() else {
        return Err(PyCoreError(CoreError::Empty).into());
    };
    let first = as_array(first, 0, coerce)?;
    let dtype = first.dtype();
    if dtype.has_object() {
        return Err(PyCoreError(CoreError::UnsupportedDtype {
            index: 0,
            found: describe(&first),
            reason: "object arrays hold references, not values, and cannot be stacked".into(),
        })
        .into());
    }
    let mut stacker = Stacker::new(dtype.itemsize(), first.shape(), pad.is_some(), items.len() + 1);
    let mut held = Vec::with_capacity(items.len() + 1);
    let rest = items.map(|(index, obj)| as_array(obj, index, coerce).map(|array| (index, array)));
    for element in std::iter::once(Ok((0, first))).chain(rest) {
        let (index, array) = element?;
        let element_dtype = array.dtype();
        if !same_dtype(&element_dtype, &dtype) {
            return Err(PyCoreError(CoreError::DtypeMismatch {
                index,
                found: describe(&array),
                expected: dtype.to_string(),
            })
            .into());
        }
        // SAFETY: numpy guarantees that data, shape and strides describe the array's memory;
        // `held` keeps every array (and so its memory) alive until the copy is done.
        unsafe { stacker.push(data_ptr(&array), array.shape(), array.strides(), || describe(&array)) }
            .map_err(PyCoreError)?;
        held.push(array);
    }
    let pad_bytes = match pad {
        Some(value) => Some(
            core_pad_bytes(pad_value(value, &dtype)?, scalar_kind(&dtype), &dtype.to_string()).map_err(PyCoreError)?,
        ),
        None => None,
    };
    let nbytes = stacker.batch_bytes().map_err(PyCoreError)?;
    let threads = default_threads();

    let batch = if let Some(out) = out {
        let out_array = out.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err(format!(
                "out= must be a numpy array, got {}",
                out.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
            ))
        })?;
        let data = check_out(out_array, &stacker, &dtype)?;
        let dst = SendPtr(data);
        let (stacker, pad_bytes) = (&stacker, pad_bytes.as_deref());
        detached(py, move || {
            // SAFETY: `out` is a writeable C-contiguous array of exactly `nbytes` bytes (checked),
            // kept alive by the caller's reference for the duration of this call, and disjoint
            // from every input (checked).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.get(), nbytes) };
            stacker.copy_into(dst, pad_bytes, threads);
            Ok(())
        })?;
        out.clone()
    } else {
        let buf = detached(py, || {
            let mut buf = AlignedBuf::new(nbytes)?;
            stacker.copy_into(buf.as_mut_slice(), pad_bytes.as_deref(), threads);
            Ok(buf)
        })?;
        into_ndarray(py, buf, &stacker.batch_shape(), &dtype)?
    };
    drop(held);
    if pad.is_none() {
        return Ok(batch);
    }
    let ndim = stacker.item_shape().len();
    let shapes: Vec<i64> = stacker.shapes().iter().map(|&d| d as i64).collect();
    let shapes = PyArray1::from_vec(py, shapes).reshape([stacker.len(), ndim])?;
    Ok(PyTuple::new(py, [batch, shapes.into_any()])?.into_any())
}

/// A raw pointer that may cross into the GIL-released closure.
pub(crate) struct SendPtr(pub(crate) *mut u8);
// SAFETY: the pointee is a buffer the calling thread keeps alive and does not touch while
// the closure runs; see the SAFETY comment where it is dereferenced.
unsafe impl Send for SendPtr {}
impl SendPtr {
    pub(crate) fn get(&self) -> *mut u8 {
        self.0
    }
}

/// Checks that `array` (element `index`, made from an `__array_interface__`) lies inside the
/// bytes of `buffer`, the memory its exporter named: numpy itself does not check this.
#[pyfunction]
pub fn check_bounds(
    array: &Bound<'_, PyUntypedArray>,
    buffer: &Bound<'_, PyUntypedArray>,
    index: usize,
) -> PyResult<()> {
    let itemsize = array.dtype().itemsize();
    let Some(reach) = extent(array.shape(), array.strides(), itemsize) else { return Ok(()) };
    let start = data_ptr(buffer) as usize;
    let len = buffer.shape().iter().product::<usize>() * buffer.dtype().itemsize();
    let data = data_ptr(array) as usize;
    let inside = |offset: isize| data.checked_add_signed(offset).is_some_and(|at| at >= start && at <= start + len);
    if inside(reach.start) && inside(reach.end) {
        return Ok(());
    }
    Err(PyCoreError(CoreError::OutOfBounds { index, found: describe(array), strides: array.strides().to_vec(), len })
        .into())
}

/// The index of the first item whose type, or whose attribute `attr`, is not the very object
/// item 0 has (compared by identity); `None` when all are alike. One pass, no Python loop.
#[pyfunction]
pub fn first_unlike(items: &Bound<'_, PyAny>, attr: &Bound<'_, PyString>) -> PyResult<Option<usize>> {
    let items = items
        .cast::<PyList>()
        .map(|l| l.iter().collect::<Vec<_>>())
        .or_else(|_| items.try_iter()?.collect::<PyResult<Vec<_>>>())?;
    let Some(first) = items.first() else { return Ok(None) };
    let (kind, value) = (first.get_type(), first.getattr(attr)?);
    for (index, item) in items.iter().enumerate().skip(1) {
        if !item.get_type().is(&kind) || !item.getattr(attr)?.is(&value) {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

/// An uninitialised, 64-byte-aligned batch of `shape` and `dtype` (for writing into).
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // pyo3 extracts a sequence into a Vec, not a slice
pub fn empty<'py>(py: Python<'py>, shape: Vec<usize>, dtype: &Bound<'py, PyArrayDescr>) -> PyResult<Bound<'py, PyAny>> {
    let too_large = || {
        PyCoreError(CoreError::TooLarge {
            elements: shape.first().copied().unwrap_or(1),
            element_bytes: dtype.itemsize(),
        })
    };
    let nbytes = shape
        .iter()
        .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d))
        .filter(|&b| isize::try_from(b).is_ok())
        .ok_or_else(too_large)?;
    let buf = AlignedBuf::new(nbytes).map_err(PyCoreError)?;
    into_ndarray(py, buf, &shape, dtype)
}

/// Sets the bound on idle pooled batch memory in bytes (0 disables pooling); returns the old one.
#[pyfunction]
pub fn set_pool_limit(bytes: usize) -> usize {
    memory::set_pool_limit(bytes)
}

/// Idle buffers and bytes held by the batch-memory pool.
#[pyfunction]
pub fn pool_usage() -> (usize, usize) {
    memory::pool_usage()
}
