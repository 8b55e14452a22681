//! Column interleaving: `k` columns of `n` numbers each (a table's feature columns) become
//! one row-major `n x k` matrix of the model's dtype, with exactly one copy of the values.
//!
//! Values convert as numpy's `astype` does: integers and bools to the nearest float, float64
//! to float32 by rounding to nearest (overflowing to infinity), NaN staying NaN. A column
//! whose dtype is already the target's is copied bit for bit.
//!
//! The caller (the bindings) describes each column by a data pointer, a length and a byte
//! stride while it holds whatever keeps that memory alive; [`interleave`] then does the copy,
//! which needs no Python and runs on several threads for large matrices.

use std::marker::PhantomData;
use std::ops::Range;

use crate::error::CoreError;
use crate::stack::PARALLEL_MIN_BYTES;

/// The dtypes a column may have, named as numpy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnDtype {
    /// One byte, 0 is false and anything else true (numpy's `bool`).
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F16,
    F32,
    F64,
}

impl ColumnDtype {
    /// Every supported dtype, in the order of [`Self::SUPPORTED`].
    pub const ALL: [Self; 12] = [
        Self::Bool,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::F16,
        Self::F32,
        Self::F64,
    ];

    /// The supported column dtypes, for error messages.
    pub const SUPPORTED: &'static str =
        "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float16, float32, float64";

    /// The supported output dtypes, for error messages.
    pub const TARGETS: &'static str = "float32 or float64 (or the columns' own dtype when they all share it)";

    /// numpy's name of the dtype.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::I64 => "int64",
            Self::U8 => "uint8",
            Self::U16 => "uint16",
            Self::U32 => "uint32",
            Self::U64 => "uint64",
            Self::F16 => "float16",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }

    /// The dtype numpy names `name`, if it is supported.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The dtype of a numpy dtype of `kind` (`b`, `i`, `u`, `f`) and `itemsize` bytes.
    #[must_use]
    pub fn from_kind(kind: u8, itemsize: usize) -> Option<Self> {
        Some(match (kind, itemsize) {
            (b'b', 1) => Self::Bool,
            (b'i', 1) => Self::I8,
            (b'i', 2) => Self::I16,
            (b'i', 4) => Self::I32,
            (b'i', 8) => Self::I64,
            (b'u', 1) => Self::U8,
            (b'u', 2) => Self::U16,
            (b'u', 4) => Self::U32,
            (b'u', 8) => Self::U64,
            (b'f', 2) => Self::F16,
            (b'f', 4) => Self::F32,
            (b'f', 8) => Self::F64,
            _ => return None,
        })
    }

    /// The dtype of column `index`, a numpy dtype of `kind` (`b`, `i`, `u`, `f`, ...) and
    /// `itemsize` bytes in native byte order (or not); or why it cannot be one, naming it by
    /// `name()` (called only then: naming a numpy dtype costs a Python call).
    pub fn of_column(
        index: usize,
        kind: u8,
        itemsize: usize,
        native: bool,
        name: impl FnOnce() -> String,
    ) -> Result<Self, CoreError> {
        Self::from_kind(kind, itemsize).filter(|_| native || itemsize == 1).ok_or_else(|| {
            let name = name();
            CoreError::ColumnDtype {
                index,
                dtype: if native { name } else { format!("{name} (non-native byte order)") },
                supported: Self::SUPPORTED,
            }
        })
    }

    /// The output dtype numpy names `name`; or why it cannot be one. Whether the columns
    /// allow it is checked by [`output_shape`].
    pub fn target(name: &str) -> Result<Self, CoreError> {
        Self::from_name(name)
            .ok_or_else(|| CoreError::OutputDtype { dtype: name.into(), reason: format!("use {}", Self::TARGETS) })
    }

    /// Bytes of one value.
    #[must_use]
    pub fn itemsize(self) -> usize {
        match self {
            Self::Bool | Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 | Self::F16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }
}

/// One input column: `len` values of `dtype`, `stride` bytes apart from `data` on.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    data: *const u8,
    len: usize,
    stride: isize,
    dtype: ColumnDtype,
    _memory: PhantomData<&'a [u8]>,
}

// SAFETY: a column is a read-only view of memory that its creator keeps alive and unchanged
// for `'a` (contract of `from_raw`, or a shared borrow); reading it from several threads is fine.
unsafe impl Send for Column<'_> {}
// SAFETY: as above: only reads, never writes.
unsafe impl Sync for Column<'_> {}

impl<'a> Column<'a> {
    /// A contiguous column over `bytes` (native-endian values of `dtype`).
    pub fn contiguous(bytes: &'a [u8], dtype: ColumnDtype) -> Result<Self, CoreError> {
        let size = dtype.itemsize();
        if bytes.len() % size != 0 {
            return Err(CoreError::InvalidArgument(format!(
                "a {}-byte buffer does not hold whole {} values",
                bytes.len(),
                dtype.name()
            )));
        }
        Ok(Self { data: bytes.as_ptr(), len: bytes.len() / size, stride: size as isize, dtype, _memory: PhantomData })
    }

    /// A column of `len` values of `dtype` at `data + i * stride` (`stride` in bytes, any sign).
    ///
    /// # Safety
    /// Those `len` values must be readable, and stay alive and unwritten for `'a`.
    #[must_use]
    pub unsafe fn from_raw(data: *const u8, len: usize, stride: isize, dtype: ColumnDtype) -> Self {
        Self { data, len, stride, dtype, _memory: PhantomData }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[must_use]
    pub fn dtype(&self) -> ColumnDtype {
        self.dtype
    }

    /// The addresses this column reads, or `None` when it reads nothing.
    fn reach(&self) -> Option<Range<usize>> {
        let last = (self.len.checked_sub(1)? as isize).wrapping_mul(self.stride);
        let start = (self.data as usize).wrapping_add_signed(last.min(0));
        let end = (self.data as usize).wrapping_add_signed(last.max(0)) + self.dtype.itemsize();
        Some(start..end)
    }
}

/// Checks the columns and the target; returns the output's shape `(rows, columns)`.
///
/// The target must be float32 or float64, or the dtype every column has.
pub fn output_shape(columns: &[Column<'_>], target: ColumnDtype) -> Result<(usize, usize), CoreError> {
    let Some(first) = columns.first() else { return Err(CoreError::NoColumns) };
    let rows = first.len;
    for (index, column) in columns.iter().enumerate() {
        if column.len != rows {
            return Err(CoreError::ColumnLength { index, len: column.len, expected: rows });
        }
    }
    if !matches!(target, ColumnDtype::F32 | ColumnDtype::F64)
        && let Some(index) = columns.iter().position(|c| c.dtype != target)
    {
        return Err(CoreError::OutputDtype {
            dtype: target.name().into(),
            reason: format!("column {index} has dtype {}; use {}", columns[index].dtype.name(), ColumnDtype::TARGETS),
        });
    }
    Ok((rows, columns.len()))
}

/// Bytes of the output matrix for `columns` converted to `target`.
pub fn output_bytes(columns: &[Column<'_>], target: ColumnDtype) -> Result<usize, CoreError> {
    let (rows, k) = output_shape(columns, target)?;
    let row_bytes = k.checked_mul(target.itemsize());
    row_bytes
        .and_then(|b| b.checked_mul(rows))
        .filter(|&b| isize::try_from(b).is_ok())
        .ok_or(CoreError::TooLarge { elements: rows, element_bytes: row_bytes.unwrap_or(usize::MAX) })
}

/// Writes `columns`, converted to `target`, into `out` as a row-major `n x k` matrix, on up
/// to `threads` threads (one when the matrix is small).
///
/// `out` must be exactly [`output_bytes`] long and must not overlap any column's memory.
pub fn interleave(
    columns: &[Column<'_>],
    target: ColumnDtype,
    out: &mut [u8],
    threads: usize,
) -> Result<(), CoreError> {
    let expected = output_bytes(columns, target)?;
    if out.len() != expected {
        return Err(CoreError::Out {
            what: "has the wrong size",
            found: format!("{} bytes", out.len()),
            expected: format!(
                "{expected} bytes ({} rows x {} columns of {})",
                columns[0].len,
                columns.len(),
                target.name()
            ),
        });
    }
    let out_range = out.as_ptr() as usize..out.as_ptr() as usize + out.len();
    if let Some(index) =
        columns.iter().position(|c| c.reach().is_some_and(|r| r.start < out_range.end && out_range.start < r.end))
    {
        return Err(CoreError::OutOverlapsColumn { index });
    }
    let kernels: Vec<Kernels> = columns.iter().map(|c| kernel(c.dtype, target)).collect::<Option<_>>().ok_or_else(
        // `output_shape` let through only float targets and the columns' own dtype.
        || CoreError::InvalidArgument("no conversion kernel for these dtypes".into()),
    )?;
    let rows = columns[0].len;
    let row_bytes = columns.len() * target.itemsize();
    if out.is_empty() {
        return Ok(());
    }
    let threads = threads.clamp(1, rows);
    if threads == 1 || out.len() < PARALLEL_MIN_BYTES {
        interleave_rows(columns, &kernels, 0..rows, out, target.itemsize());
        return Ok(());
    }
    let per_thread = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (chunk, part) in out.chunks_mut(per_thread * row_bytes).enumerate() {
            let first = chunk * per_thread;
            let range = first..first + part.len() / row_bytes;
            let kernels = &kernels;
            scope.spawn(move || interleave_rows(columns, kernels, range, part, target.itemsize()));
        }
    });
    Ok(())
}

/// Output bytes one block of rows aims for: small enough to stay in the L1/L2 cache while
/// each column is written into it, so every output line is filled before it is evicted.
const BLOCK_BYTES: usize = 32 << 10;

/// Writes rows `rows` of the matrix into `out` (exactly those rows' bytes).
fn interleave_rows(columns: &[Column<'_>], kernels: &[Kernels], rows: Range<usize>, out: &mut [u8], out_size: usize) {
    if columns.iter().all(|c| c.dtype == columns[0].dtype) {
        // One dtype (the common case): row by row, reading k columns side by side and
        // writing the output in order; measured faster than the blocks below (1M x 16
        // float32, one thread: about 25-35 ms against 40-45 ms, noisy 2-core machine).
        // SAFETY: every column has the dtype `kernels[0]` reads, and rows `rows` (checked by
        // `interleave`); `out` holds exactly those rows.
        unsafe { (kernels[0].rows)(columns, rows, out) };
        return;
    }
    // Mixed dtypes: block by block, one column after another within a block (each column is
    // read sequentially by its own kernel).
    let k = columns.len();
    let row_bytes = k * out_size;
    let block_rows = (BLOCK_BYTES / row_bytes).max(16);
    for (block, dst) in out.chunks_mut(block_rows * row_bytes).enumerate() {
        let first = rows.start + block * block_rows;
        let n = dst.len() / row_bytes;
        for (j, (column, kernels)) in columns.iter().zip(kernels).enumerate() {
            // SAFETY: rows `first..first + n` are within the column (`interleave` checked every
            // column's length against `rows.end`), so the offset stays inside its memory.
            let src = unsafe { column.data.offset(first as isize * column.stride) };
            // SAFETY: the column's `n` values from `src` on are readable (as above); `dst`
            // holds `n` rows of `k` values of `out_size` bytes, and `j < k`.
            unsafe { (kernels.column)(src, column.stride, n, dst.as_mut_ptr().add(j * out_size), row_bytes) };
        }
    }
}

/// The two kernels of one (source, target) pair.
#[derive(Clone, Copy)]
struct Kernels {
    /// Converts `n` values at `src + i * stride` into `dst + i * dst_stride`.
    ///
    /// Safety: those source values are readable and those destination values writable.
    column: unsafe fn(src: *const u8, stride: isize, n: usize, dst: *mut u8, dst_stride: usize),
    /// Converts rows `rows` of `columns` (all of the source dtype) into `out`, row-major.
    ///
    /// Safety: every column has the source dtype and at least `rows.end` values; `out` is
    /// exactly `rows.len()` rows of `columns.len()` target values.
    rows: unsafe fn(columns: &[Column<'_>], rows: Range<usize>, out: &mut [u8]),
}

impl Kernels {
    fn of<S: Stored + Cast<T>, T: Written>() -> Self {
        Self { column: convert::<S, T>, rows: gather::<S, T> }
    }
}

/// A value as stored in a column (read unaligned: columns need not be aligned).
trait Stored: Copy {
    /// # Safety
    /// `at` points to a readable value of this type.
    unsafe fn load(at: *const u8) -> Self;
}

/// A value as written to the output.
trait Written: Copy {
    /// # Safety
    /// `at` points to writable memory for a value of this type.
    unsafe fn store(self, at: *mut u8);
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            unsafe fn load(at: *const u8) -> Self {
                // SAFETY: contract of `load`.
                unsafe { at.cast::<$t>().read_unaligned() }
            }
        }
        impl Written for $t {
            unsafe fn store(self, at: *mut u8) {
                // SAFETY: contract of `store`.
                unsafe { at.cast::<$t>().write_unaligned(self) }
            }
        }
    )*};
}
plain!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

/// numpy's bool: a byte, true when not zero (numpy's `astype` reads it so).
#[derive(Clone, Copy)]
struct Bool(bool);

impl Stored for Bool {
    unsafe fn load(at: *const u8) -> Self {
        // SAFETY: contract of `load`.
        Self(unsafe { at.read() } != 0)
    }
}

impl Stored for half::f16 {
    unsafe fn load(at: *const u8) -> Self {
        // SAFETY: contract of `load`.
        Self::from_bits(unsafe { at.cast::<u16>().read_unaligned() })
    }
}

/// Conversion as numpy's `astype` does it.
trait Cast<T> {
    fn cast(self) -> T;
}

macro_rules! cast_as {
    ($($t:ty),*) => {$(
        // `as` from an integer or float to a float rounds to nearest, ties to even, and
        // overflows to infinity: what numpy's C casts do. (One `as` for every pair: `From`
        // exists only for the lossless ones.)
        #[allow(clippy::cast_lossless)]
        impl Cast<f32> for $t {
            fn cast(self) -> f32 { self as f32 }
        }
        #[allow(clippy::cast_lossless)]
        impl Cast<f64> for $t {
            fn cast(self) -> f64 { self as f64 }
        }
    )*};
}
cast_as!(i8, i16, i32, i64, u8, u16, u32, u64, f32, f64);

impl Cast<f32> for Bool {
    fn cast(self) -> f32 {
        f32::from(u8::from(self.0))
    }
}

impl Cast<f64> for Bool {
    fn cast(self) -> f64 {
        f64::from(u8::from(self.0))
    }
}

impl Cast<f32> for half::f16 {
    fn cast(self) -> f32 {
        self.to_f32()
    }
}

impl Cast<f64> for half::f16 {
    fn cast(self) -> f64 {
        self.to_f64()
    }
}

/// The column kernel for one (source, target) pair: `S` read, cast to `T`, written.
///
/// # Safety
/// See [`Kernels::column`].
unsafe fn convert<S: Stored + Cast<T>, T: Written>(
    src: *const u8,
    stride: isize,
    n: usize,
    dst: *mut u8,
    dst_stride: usize,
) {
    if stride == size_of::<S>() as isize {
        // The common case, kept apart so the compiler sees unit-stride loads.
        for i in 0..n {
            // SAFETY: value `i` of `n` is readable, and row `i` of the output writable (contract).
            unsafe { S::load(src.add(i * size_of::<S>())).cast().store(dst.add(i * dst_stride)) };
        }
    } else {
        for i in 0..n {
            // SAFETY: as above, with the source's own stride.
            unsafe { S::load(src.offset(i as isize * stride)).cast().store(dst.add(i * dst_stride)) };
        }
    }
}

/// The row-major kernel for one (source, target) pair: see [`Kernels::rows`].
///
/// # Safety
/// See [`Kernels::rows`].
unsafe fn gather<S: Stored + Cast<T>, T: Written>(columns: &[Column<'_>], rows: Range<usize>, out: &mut [u8]) {
    let k = columns.len();
    // SAFETY: `rows.start` is within every column (contract), so each offset stays inside it.
    let starts: Vec<*const u8> =
        columns.iter().map(|c| unsafe { c.data.offset(rows.start as isize * c.stride) }).collect();
    let dst = out.as_mut_ptr();
    if columns.iter().all(|c| c.stride == size_of::<S>() as isize) {
        for i in 0..rows.len() {
            for (j, &src) in starts.iter().enumerate() {
                // SAFETY: row `i` of the range is readable in every column, and value `j` of
                // row `i` is inside `out` (contract).
                unsafe { S::load(src.add(i * size_of::<S>())).cast().store(dst.add((i * k + j) * size_of::<T>())) };
            }
        }
    } else {
        for i in 0..rows.len() {
            for (j, (&src, column)) in starts.iter().zip(columns).enumerate() {
                // SAFETY: as above, with each column's own stride.
                let value = unsafe { S::load(src.offset(i as isize * column.stride)) };
                // SAFETY: value `j` of row `i` is inside `out` (contract).
                unsafe { value.cast().store(dst.add((i * k + j) * size_of::<T>())) };
            }
        }
    }
}

/// `T` to `T`: the bits as they are.
impl<T: Copy> Cast<T> for Same<T> {
    fn cast(self) -> T {
        self.0
    }
}

/// A value copied without conversion.
#[derive(Clone, Copy)]
struct Same<T>(T);

impl<T: Stored> Stored for Same<T> {
    unsafe fn load(at: *const u8) -> Self {
        // SAFETY: contract of `load`.
        Self(unsafe { T::load(at) })
    }
}

/// The kernel converting `source` to `target`, if there is one.
fn kernel(source: ColumnDtype, target: ColumnDtype) -> Option<Kernels> {
    use ColumnDtype as D;
    macro_rules! to_float {
        ($t:ty) => {
            match source {
                D::Bool => Kernels::of::<Bool, $t>(),
                D::I8 => Kernels::of::<i8, $t>(),
                D::I16 => Kernels::of::<i16, $t>(),
                D::I32 => Kernels::of::<i32, $t>(),
                D::I64 => Kernels::of::<i64, $t>(),
                D::U8 => Kernels::of::<u8, $t>(),
                D::U16 => Kernels::of::<u16, $t>(),
                D::U32 => Kernels::of::<u32, $t>(),
                D::U64 => Kernels::of::<u64, $t>(),
                D::F16 => Kernels::of::<half::f16, $t>(),
                D::F32 => Kernels::of::<f32, $t>(),
                D::F64 => Kernels::of::<f64, $t>(),
            }
        };
    }
    Some(match target {
        D::F32 => to_float!(f32),
        D::F64 => to_float!(f64),
        _ if source != target => return None,
        // Same dtype: copy the bits, as numpy copies a column to its own dtype.
        _ => match target.itemsize() {
            1 => Kernels::of::<Same<u8>, u8>(),
            2 => Kernels::of::<Same<u16>, u16>(),
            4 => Kernels::of::<Same<u32>, u32>(),
            _ => Kernels::of::<Same<u64>, u64>(),
        },
    })
}

#[cfg(test)]
// Conversions are meant to be exact (numpy's), so exact float comparison is the point.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use ColumnDtype as D;

    /// The bytes of a slice of plain numbers.
    fn bytes_of<T: Copy>(values: &[T]) -> &[u8] {
        // SAFETY: plain numbers have no padding; the view covers exactly their memory.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), size_of_val(values)) }
    }

    fn col(bytes: &[u8], dtype: D) -> Column<'_> {
        Column::contiguous(bytes, dtype).unwrap()
    }

    /// Interleaves into a fresh buffer.
    fn run(columns: &[Column<'_>], target: D, threads: usize) -> Vec<u8> {
        let mut out = vec![0u8; output_bytes(columns, target).unwrap()];
        interleave(columns, target, &mut out, threads).unwrap();
        out
    }

    fn as_f64(out: &[u8], target: D) -> Vec<f64> {
        match target {
            D::F32 => out.chunks_exact(4).map(|c| f64::from(f32::from_ne_bytes(c.try_into().unwrap()))).collect(),
            D::F64 => out.chunks_exact(8).map(|c| f64::from_ne_bytes(c.try_into().unwrap())).collect(),
            _ => unreachable!(),
        }
    }

    /// Sample values of `dtype` (bytes) and each one's exact value. Integers stay within
    /// 2^53, so the exact value converts to float32 through float64 with one rounding.
    fn samples(dtype: D) -> (Vec<u8>, Vec<f64>) {
        fn of<T: Copy + Into<f64>>(v: &[T]) -> (Vec<u8>, Vec<f64>) {
            (bytes_of(v).to_vec(), v.iter().map(|&x| x.into()).collect())
        }
        match dtype {
            D::Bool => (vec![0, 1, 1, 0, 1], vec![0.0, 1.0, 1.0, 0.0, 1.0]),
            D::I8 => of(&[0i8, 1, -1, i8::MIN, i8::MAX]),
            D::I16 => of(&[0i16, 7, -300, i16::MIN, i16::MAX]),
            D::I32 => of(&[0i32, 16_777_217, -5, i32::MIN, i32::MAX]),
            D::I64 => {
                let v = [0i64, 1 << 53, -(1 << 53), 16_777_219, -9];
                (bytes_of(&v).to_vec(), v.iter().map(|&x| x as f64).collect())
            }
            D::U8 => of(&[0u8, 1, 128, 254, u8::MAX]),
            D::U16 => of(&[0u16, 1, 40_000, 3, u16::MAX]),
            D::U32 => of(&[0u32, 16_777_217, 3_000_000_000, 3, u32::MAX]),
            D::U64 => {
                let v = [0u64, 1 << 53, 16_777_219, 2, 1];
                (bytes_of(&v).to_vec(), v.iter().map(|&x| x as f64).collect())
            }
            D::F16 => {
                let v = [0.5f32, -2.0, 65504.0, f32::NAN, f32::NEG_INFINITY].map(half::f16::from_f32);
                (bytes_of(&v).to_vec(), v.iter().map(|x| x.to_f64()).collect())
            }
            D::F32 => of(&[0.1f32, -2.5, f32::MAX, f32::NAN, f32::INFINITY]),
            D::F64 => of(&[0.1f64, -2.5, 1e300, f64::NAN, -1e-300]),
        }
    }

    fn same(a: f64, b: f64) -> bool {
        a == b || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn every_dtype_pair_converts_like_astype() {
        for source in D::ALL {
            let (bytes, exact) = samples(source);
            // A second column around it checks the interleaving too.
            let marker: Vec<f64> = (0..exact.len()).map(|i| -(i as f64)).collect();
            for target in [D::F32, D::F64] {
                let columns = [col(bytes_of(&marker), D::F64), col(&bytes, source)];
                let got = as_f64(&run(&columns, target, 1), target);
                for (i, &want) in exact.iter().enumerate() {
                    let want = if target == D::F32 { f64::from(want as f32) } else { want };
                    assert!(
                        same(got[2 * i + 1], want),
                        "{source:?} -> {target:?} row {i}: {} != {want}",
                        got[2 * i + 1]
                    );
                    assert_eq!(got[2 * i], marker[i]);
                }
            }
            // Two columns of the one dtype take the row-by-row kernel: the same values.
            for target in [D::F32, D::F64] {
                let got = as_f64(&run(&[col(&bytes, source), col(&bytes, source)], target, 1), target);
                for (i, &want) in exact.iter().enumerate() {
                    let want = if target == D::F32 { f64::from(want as f32) } else { want };
                    assert!(same(got[2 * i], want) && same(got[2 * i + 1], want), "{source:?} -> {target:?} row {i}");
                }
            }
            // To its own dtype: the bits as they are, interleaved.
            let columns = [col(&bytes, source), col(&bytes, source)];
            let got = run(&columns, source, 1);
            let size = source.itemsize();
            for (i, value) in bytes.chunks_exact(size).enumerate() {
                assert_eq!(&got[2 * i * size..(2 * i + 1) * size], value, "{source:?} row {i}");
                assert_eq!(&got[(2 * i + 1) * size..(2 * i + 2) * size], value, "{source:?} row {i}");
            }
        }
    }

    #[test]
    fn rounding_and_overflow_follow_numpy() {
        let ints = [16_777_217i64, 16_777_219, i64::MAX, i64::MIN];
        let got = as_f64(&run(&[col(bytes_of(&ints), D::I64)], D::F32, 1), D::F32);
        // Ties go to even; 2^63 - 1 rounds up to 2^63.
        assert_eq!(got, [16_777_216.0, 16_777_220.0, 9_223_372_036_854_775_808.0, -9_223_372_036_854_775_808.0]);
        let big = [u64::MAX];
        assert_eq!(as_f64(&run(&[col(bytes_of(&big), D::U64)], D::F32, 1), D::F32), [18_446_744_073_709_551_616.0]);
        assert_eq!(as_f64(&run(&[col(bytes_of(&big), D::U64)], D::F64, 1), D::F64), [18_446_744_073_709_551_616.0]);
        let doubles = [0.1f64, 1e39, -1e39, 1e-50, 3.402_823_466_385_288_6e38];
        let got = run(&[col(bytes_of(&doubles), D::F64)], D::F32, 1);
        let got: Vec<f32> = got.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [0.1f32, f32::INFINITY, f32::NEG_INFINITY, 0.0, f32::MAX]);
        // numpy reads any non-zero byte of a bool array as True.
        let bools = [0u8, 2, 255];
        assert_eq!(as_f64(&run(&[col(&bools, D::Bool)], D::F64, 1), D::F64), [0.0, 1.0, 1.0]);
    }

    #[test]
    fn strided_and_reversed_columns_are_read_in_order() {
        // A (3, 2) row-major matrix: its columns have stride 16 bytes.
        let matrix = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let base = matrix.as_ptr().cast::<u8>();
        // SAFETY: rows 0..3 of column 0 and 1 lie inside `matrix`; the reversed view of
        // column 0 starts at its last row and steps back.
        let (a, b, reversed) = unsafe {
            (
                Column::from_raw(base, 3, 16, D::F64),
                Column::from_raw(base.add(8), 3, 16, D::F64),
                Column::from_raw(base.add(32), 3, -16, D::F64),
            )
        };
        let got = as_f64(&run(&[b, a, reversed], D::F64, 1), D::F64);
        assert_eq!(got, [2.0, 1.0, 5.0, 4.0, 3.0, 3.0, 6.0, 5.0, 1.0]);
    }

    #[test]
    fn empty_columns_and_rows() {
        let empty: [f32; 0] = [];
        assert_eq!(output_shape(&[col(bytes_of(&empty), D::F32); 3], D::F64).unwrap(), (0, 3));
        assert!(run(&[col(bytes_of(&empty), D::F32); 3], D::F64, 4).is_empty());
        assert_eq!(output_shape(&[], D::F32).unwrap_err(), CoreError::NoColumns);
    }

    #[test]
    fn parallel_matches_serial_across_blocks() {
        // 16 columns of every dtype, 70,001 rows (past the threshold even as float32): several
        // threads, uneven blocks and chunks. Small enough for valgrind (scripts/reliability.sh).
        let rows = 70_001;
        let data: Vec<(Vec<u8>, D)> = (0..16)
            .map(|j| {
                let dtype = D::ALL[j % D::ALL.len()];
                let bytes = (0..rows * dtype.itemsize()).map(|i| (i * 31 + j * 7) as u8).collect();
                (bytes, dtype)
            })
            .collect();
        let columns: Vec<Column<'_>> = data.iter().map(|(b, d)| col(b, *d)).collect();
        for target in [D::F32, D::F64] {
            assert!(output_bytes(&columns, target).unwrap() >= PARALLEL_MIN_BYTES, "must go parallel");
            let serial = run(&columns, target, 1);
            let parallel = run(&columns, target, 3);
            // Bytes, not values: NaNs from the float columns compare equal this way.
            assert!(serial == parallel, "{target:?}: parallel differs from serial");
            // Spot-check a value against its column: the last row, column 5 (uint8).
            let last = as_f64(&serial[(rows - 1) * 16 * target.itemsize()..], target);
            assert_eq!(last[5], f64::from(data[5].0[rows - 1]));
        }
        // One dtype: the row-by-row kernel, contiguous and strided (every other value).
        let values: Vec<Vec<f32>> = (0..16).map(|j| (0..2 * rows).map(|i| (i * 16 + j) as f32).collect()).collect();
        let contiguous: Vec<Column<'_>> = values.iter().map(|v| col(bytes_of(&v[..rows]), D::F32)).collect();
        // SAFETY: `rows` values 8 bytes apart lie inside each vector of `2 * rows` floats.
        let strided: Vec<Column<'_>> =
            values.iter().map(|v| unsafe { Column::from_raw(v.as_ptr().cast(), rows, 8, D::F32) }).collect();
        for columns in [contiguous, strided] {
            let step = if columns[0].stride == 4 { 1 } else { 2 };
            let values = &values;
            let want: Vec<f64> = (0..rows).flat_map(|i| (0..16).map(move |j| f64::from(values[j][i * step]))).collect();
            assert_eq!(as_f64(&run(&columns, D::F64, 1), D::F64), want);
            assert_eq!(as_f64(&run(&columns, D::F64, 3), D::F64), want);
        }
    }

    #[test]
    fn mismatched_lengths_name_the_column() {
        let a = [1.0f32; 4];
        let b = [1.0f32; 3];
        let err =
            output_shape(&[col(bytes_of(&a), D::F32), col(bytes_of(&a), D::F32), col(bytes_of(&b), D::F32)], D::F32)
                .unwrap_err();
        assert_eq!(err, CoreError::ColumnLength { index: 2, len: 3, expected: 4 });
        assert_eq!(err.to_string(), "column 2 has 3 rows, expected 4 (the length of column 0)");
    }

    #[test]
    fn unsupported_dtypes_are_named_with_what_is_supported() {
        let err = D::of_column(3, b'c', 8, true, || "complex64".into()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("column 3 has dtype complex64, which cannot be a feature"), "{msg}");
        assert!(msg.contains(D::SUPPORTED), "{msg}");
        assert_eq!(err.kind(), crate::ErrorKind::Type);
        let msg = D::of_column(0, b'f', 4, false, || ">f4".into()).unwrap_err().to_string();
        assert!(msg.contains(">f4 (non-native byte order)"), "{msg}");
        assert_eq!(D::of_column(0, b'u', 1, false, || "|u1".into()).unwrap(), D::U8);
        assert_eq!(D::of_column(0, b'i', 8, true, || "int64".into()).unwrap(), D::I64);

        let msg = D::target("complex64").unwrap_err().to_string();
        assert!(msg.starts_with("dtype=complex64 cannot be the output's dtype: use float32 or float64"), "{msg}");
        // An integer target only when every column already has it.
        let ints = [1i32, 2];
        let floats = [1.0f32, 2.0];
        assert_eq!(output_shape(&[col(bytes_of(&ints), D::I32)], D::I32).unwrap(), (2, 1));
        let err = output_shape(&[col(bytes_of(&ints), D::I32), col(bytes_of(&floats), D::F32)], D::I32).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("column 1 has dtype float32; use float32 or float64"), "{msg}");
        assert_eq!(err.kind(), crate::ErrorKind::Type);
    }

    #[test]
    fn wrong_output_size_and_overlap_are_refused() {
        let a = [1.0f32, 2.0];
        let mut small = vec![0u8; 4];
        let err = interleave(&[col(bytes_of(&a), D::F32)], D::F32, &mut small, 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("got 4 bytes, expected 8 bytes (2 rows x 1 columns of float32)"), "{msg}");
        // A column that reads the output's own memory.
        let mut buf = [0u8; 16];
        let ptr = buf.as_ptr();
        // SAFETY: two f32 values at the start of `buf`; never read, the overlap is refused first.
        let inside = unsafe { Column::from_raw(ptr, 2, 4, D::F32) };
        let err = interleave(&[inside, inside], D::F32, &mut buf, 1).unwrap_err();
        assert_eq!(err, CoreError::OutOverlapsColumn { index: 0 });
        assert!(Column::contiguous(&[0u8; 3], D::F32).is_err());
    }
}
