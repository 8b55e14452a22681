//! Bindings of the column-interleaving kernel: 1-D numpy columns in, one `(n, k)` matrix out.

use beam_turbo_core::CoreError;
use beam_turbo_core::columns::{self as core, Column, ColumnDtype};
use beam_turbo_core::memory::AlignedBuf;
use beam_turbo_core::stack::default_threads;
use numpy::npyffi;
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::error::{PyCoreError, detached};
use crate::stack::{SendPtr, data_ptr, flags, into_ndarray};

/// The core's dtype of a numpy dtype, for column `index` (`None` for the output).
fn column_dtype(dtype: &Bound<'_, PyArrayDescr>, index: usize) -> Result<ColumnDtype, CoreError> {
    let native = dtype.is_native_byteorder() != Some(false);
    ColumnDtype::of_column(index, dtype.kind(), dtype.itemsize(), native, || dtype.to_string())
}

/// Describes column `index` (a 1-D numpy array) for the core.
fn column<'py>(array: &Bound<'py, PyUntypedArray>, index: usize) -> PyResult<Column<'py>> {
    let &[len] = array.shape() else {
        return Err(PyCoreError(CoreError::InvalidArgument(format!(
            "column {index} has shape {}, expected a 1-D array",
            beam_turbo_core::error::ShapeDisplay(array.shape())
        )))
        .into());
    };
    let dtype = column_dtype(&array.dtype(), index).map_err(PyCoreError)?;
    // SAFETY: numpy guarantees that data, length and stride describe the array's memory; the
    // caller keeps the array (and so that memory) alive while the column is used.
    Ok(unsafe { Column::from_raw(data_ptr(array), len, array.strides()[0], dtype) })
}

/// Checks that `out` can take the matrix; returns its writable bytes' start.
fn check_out(out: &Bound<'_, PyAny>, shape: [usize; 2], target: ColumnDtype) -> PyResult<*mut u8> {
    let refuse = |what, found: String, expected: String| PyCoreError(CoreError::Out { what, found, expected });
    let out = out.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "out= must be a numpy array, got {}",
            out.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    if out.shape() != shape {
        let show = |s: &[usize]| beam_turbo_core::error::ShapeDisplay(s).to_string();
        return Err(refuse("has the wrong shape", show(out.shape()), show(&shape)).into());
    }
    if column_dtype(&out.dtype(), 0).ok() != Some(target) {
        return Err(refuse("has the wrong dtype", out.dtype().to_string(), target.name().into()).into());
    }
    if flags(out) & npyffi::NPY_ARRAY_C_CONTIGUOUS == 0 {
        return Err(refuse("must be C-contiguous", "a strided array".into(), "a C-contiguous array".into()).into());
    }
    if flags(out) & npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(refuse("must be writeable", "a read-only array".into(), "a writeable array".into()).into());
    }
    Ok(data_ptr(out))
}

/// Interleaves 1-D numpy `columns` into a C-contiguous `(n, k)` matrix of `dtype` (a numpy
/// dtype name), converting as `astype` does; into `out` when given. See
/// `beam_turbo._arrays.columns.feature_matrix` for the documented surface.
#[pyfunction]
#[pyo3(signature = (columns, dtype, out=None))]
pub fn interleave<'py>(
    py: Python<'py>,
    columns: &Bound<'py, PyAny>,
    dtype: &str,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let items: Vec<Bound<'py, PyAny>> = if let Ok(list) = columns.cast::<PyList>() {
        list.iter().collect()
    } else if let Ok(tuple) = columns.cast::<PyTuple>() {
        tuple.iter().collect()
    } else {
        columns.try_iter()?.collect::<PyResult<_>>()?
    };
    let mut held = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let array = item.cast_into::<PyUntypedArray>().map_err(|e| {
            let name = e.into_inner().get_type().name().map_or_else(|_| "?".into(), |n| n.to_string());
            PyTypeError::new_err(format!("column {index} is {name}, not a numpy array"))
        })?;
        held.push(array);
    }
    let columns = held.iter().enumerate().map(|(i, a)| column(a, i)).collect::<PyResult<Vec<_>>>()?;
    let target = ColumnDtype::target(dtype).map_err(PyCoreError)?;
    let (rows, k) = core::output_shape(&columns, target).map_err(PyCoreError)?;
    let nbytes = core::output_bytes(&columns, target).map_err(PyCoreError)?;
    let threads = default_threads();
    let matrix = if let Some(out) = out {
        let dst = SendPtr(check_out(out, [rows, k], target)?);
        let columns = &columns;
        detached(py, move || {
            // SAFETY: `out` is a writeable C-contiguous array of exactly `nbytes` bytes
            // (checked), kept alive by the caller's reference for this call; the core refuses
            // it if it overlaps a column.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.get(), nbytes) };
            core::interleave(columns, target, dst, threads)
        })?;
        out.clone()
    } else {
        let buf = detached(py, || {
            let mut buf = AlignedBuf::new(nbytes)?;
            core::interleave(&columns, target, buf.as_mut_slice(), threads)?;
            Ok(buf)
        })?;
        into_ndarray(py, buf, &[rows, k], &PyArrayDescr::new(py, target.name())?)?
    };
    drop(held);
    Ok(matrix)
}
