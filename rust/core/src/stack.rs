//! Stacking kernels: many arrays of one dtype become one C-contiguous batch with exactly one
//! copy of their bytes, optionally padded to the largest shape.
//!
//! The caller (the bindings) describes each input by a data pointer, a shape and byte strides,
//! pushed into a [`Stacker`] while it still holds whatever keeps that memory alive; the
//! [`Stacker`] validates and remembers them, and [`Stacker::copy_into`] then does the copy,
//! which needs no Python and may run on several threads.

use std::ops::Range;
use std::sync::OnceLock;

use crate::error::{CoreError, Described};

/// Below this many bytes a batch is copied on the calling thread: spawning threads costs more.
pub const PARALLEL_MIN_BYTES: usize = 4 << 20;

/// What kind of scalar a dtype holds, as far as padding needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarKind {
    Bool,
    /// Signed integer of this many bytes.
    Signed(usize),
    /// Unsigned integer of this many bytes.
    Unsigned(usize),
    /// IEEE float of 2, 4 or 8 bytes.
    Float(usize),
    /// bfloat16 (`ml_dtypes`).
    BFloat16,
    /// Complex of 8 or 16 bytes (two floats).
    Complex(usize),
    /// Anything else: copied as bytes, but cannot be padded.
    Other,
}

/// A pad value as the caller gave it, before it is checked against the dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PadValue {
    Bool(bool),
    Int(i128),
    Float(f64),
    Complex(f64, f64),
}

impl std::fmt::Display for PadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Self::Int(v) => write!(f, "{v}"),
            Self::Float(v) => write!(f, "{v:?}"),
            Self::Complex(re, im) => write!(f, "({re:?}+{im:?}j)"),
        }
    }
}

/// The native-endian bytes of `value` in a dtype of kind `kind`, or why it cannot be held.
///
/// Integers must be whole and in range; floats may round but not overflow to infinity
/// (NaN and infinities given as such are kept); a real dtype cannot hold an imaginary part.
pub fn pad_bytes(value: PadValue, kind: ScalarKind, dtype: &str) -> Result<Vec<u8>, CoreError> {
    let refuse = |reason: &str| CoreError::PadValue {
        value: value.to_string(),
        dtype: dtype.to_string(),
        reason: reason.to_string(),
    };
    let (re, im) = match value {
        PadValue::Bool(b) => (f64::from(u8::from(b)), 0.0),
        PadValue::Int(v) => (v as f64, 0.0),
        PadValue::Float(v) => (v, 0.0),
        PadValue::Complex(re, im) => (re, im),
    };
    let whole = || -> Result<i128, CoreError> {
        match value {
            PadValue::Bool(b) => Ok(i128::from(b)),
            PadValue::Int(v) => Ok(v),
            _ if im != 0.0 => Err(refuse("an integer dtype has no imaginary part")),
            _ if !re.is_finite() || re.fract() != 0.0 => Err(refuse("not a whole number")),
            // Whole floats this large are out of every integer dtype's range anyway.
            _ if re.abs() >= 2f64.powi(127) => Err(refuse("out of range")),
            _ => Ok(re as i128),
        }
    };
    let real = || -> Result<f64, CoreError> {
        if im == 0.0 { Ok(re) } else { Err(refuse("a real dtype has no imaginary part")) }
    };
    let finite = |x: f64, y: f64| {
        if x.is_finite() && y.is_infinite() { Err(refuse("too large, it would become infinity")) } else { Ok(()) }
    };
    match kind {
        ScalarKind::Bool => match whole()? {
            0 => Ok(vec![0]),
            1 => Ok(vec![1]),
            _ => Err(refuse("bool holds only False/True (0 or 1)")),
        },
        ScalarKind::Signed(bytes @ 1..=16) | ScalarKind::Unsigned(bytes @ 1..=16) => {
            let v = whole()?;
            let bits = 8 * bytes as u32;
            let (lo, hi) = if matches!(kind, ScalarKind::Signed(_)) {
                // Arithmetic shifts: no overflow at 128 bits (found by fuzzing).
                (i128::MIN >> (128 - bits), i128::MAX >> (128 - bits))
            } else {
                (0, if bits >= 128 { i128::MAX } else { (1i128 << bits) - 1 })
            };
            if v < lo || v > hi {
                return Err(refuse(&format!("out of range [{lo}, {hi}]")));
            }
            let mut le = v.to_le_bytes()[..bytes].to_vec();
            if cfg!(target_endian = "big") {
                le.reverse();
            }
            Ok(le)
        }
        ScalarKind::Float(2) => {
            let x = real()?;
            let h = half::f16::from_f64(x);
            finite(x, h.to_f64())?;
            Ok(h.to_ne_bytes().to_vec())
        }
        ScalarKind::BFloat16 => {
            let x = real()?;
            let h = half::bf16::from_f64(x);
            finite(x, h.to_f64())?;
            Ok(h.to_ne_bytes().to_vec())
        }
        ScalarKind::Float(4) => {
            let x = real()?;
            finite(x, f64::from(x as f32))?;
            Ok((x as f32).to_ne_bytes().to_vec())
        }
        ScalarKind::Float(8) => Ok(real()?.to_ne_bytes().to_vec()),
        ScalarKind::Complex(8) => {
            finite(re, f64::from(re as f32))?;
            finite(im, f64::from(im as f32))?;
            Ok([(re as f32).to_ne_bytes(), (im as f32).to_ne_bytes()].concat())
        }
        ScalarKind::Complex(16) => Ok([re.to_ne_bytes(), im.to_ne_bytes()].concat()),
        ScalarKind::Signed(_)
        | ScalarKind::Unsigned(_)
        | ScalarKind::Float(_)
        | ScalarKind::Complex(_)
        | ScalarKind::Other => {
            Err(refuse("pad= works with bool, integer, floating and complex dtypes in native byte order"))
        }
    }
}

/// The byte offsets `[lo, hi)` that an array of this shape and these strides touches,
/// relative to its data pointer; `None` when it has no elements.
#[must_use]
pub fn extent(shape: &[usize], strides: &[isize], itemsize: usize) -> Option<Range<isize>> {
    if shape.contains(&0) {
        return None;
    }
    let (mut lo, mut hi) = (0isize, 0isize);
    for (&n, &s) in shape.iter().zip(strides) {
        let reach = (n as isize - 1).saturating_mul(s);
        if reach < 0 { lo = lo.saturating_add(reach) } else { hi = hi.saturating_add(reach) }
    }
    Some(lo..hi.saturating_add(itemsize as isize))
}

fn is_c_contiguous(shape: &[usize], strides: &[isize], itemsize: usize) -> bool {
    let mut expected = itemsize as isize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n as isize);
    }
    true
}

/// One input, as pushed.
#[derive(Debug, Clone, Copy)]
struct Source {
    data: *const u8,
    contiguous: bool,
}

/// Collects the inputs of one stacking call, checks them against each other and copies them.
#[derive(Debug)]
pub struct Stacker {
    itemsize: usize,
    pad: bool,
    /// The shape of one element of the batch: element 0's, or the largest when padding.
    item_shape: Vec<usize>,
    sources: Vec<Source>,
    /// `ndim` strides per source.
    strides: Vec<isize>,
    /// `ndim` dims per source (only kept when padding; otherwise all equal `item_shape`).
    shapes: Vec<usize>,
}

// SAFETY: the raw pointers are only read in `copy_into`, whose caller guarantees (by the
// contract of `push`) that the memory stays valid and unmodified for the Stacker's lifetime.
unsafe impl Send for Stacker {}
// SAFETY: as above; `&Stacker` only ever reads through the pointers.
unsafe impl Sync for Stacker {}

impl Stacker {
    /// A stacker for arrays of `itemsize`-byte items shaped like `first_shape` (padded to
    /// the largest shape of each dimension when `pad`), expecting about `capacity` inputs.
    #[must_use]
    pub fn new(itemsize: usize, first_shape: &[usize], pad: bool, capacity: usize) -> Self {
        let ndim = first_shape.len();
        Self {
            itemsize,
            pad,
            item_shape: first_shape.to_vec(),
            sources: Vec::with_capacity(capacity),
            strides: Vec::with_capacity(capacity * ndim),
            shapes: if pad { Vec::with_capacity(capacity * ndim) } else { Vec::new() },
        }
    }

    /// Adds the next input (its index is the number pushed so far).
    ///
    /// `describe` is called only to build an error message.
    ///
    /// # Safety
    /// `data` with `shape`, `strides` (in bytes) and the stacker's item size must describe
    /// readable memory, and that memory must stay valid and unchanged until the last
    /// `copy_into` on this stacker returns.
    pub unsafe fn push(
        &mut self,
        data: *const u8,
        shape: &[usize],
        strides: &[isize],
        describe: impl FnOnce() -> Described,
    ) -> Result<(), CoreError> {
        let index = self.sources.len();
        let ndim = self.item_shape.len();
        if shape.len() != ndim || strides.len() != ndim {
            return Err(CoreError::RankMismatch { index, found: describe(), expected_ndim: ndim });
        }
        if self.pad {
            for (max, &n) in self.item_shape.iter_mut().zip(shape) {
                *max = (*max).max(n);
            }
            self.shapes.extend_from_slice(shape);
        } else if shape != self.item_shape.as_slice() {
            return Err(CoreError::ShapeMismatch { index, found: describe(), expected: self.item_shape.clone() });
        }
        let contiguous = is_c_contiguous(shape, strides, self.itemsize);
        self.sources.push(Source { data, contiguous });
        self.strides.extend_from_slice(strides);
        Ok(())
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The shape of one element of the batch.
    #[must_use]
    pub fn item_shape(&self) -> &[usize] {
        &self.item_shape
    }

    /// The batch's shape, `(n, *item_shape)`.
    #[must_use]
    pub fn batch_shape(&self) -> Vec<usize> {
        std::iter::once(self.len()).chain(self.item_shape.iter().copied()).collect()
    }

    /// Each input's original shape, `ndim` values per input (only when padding).
    #[must_use]
    pub fn shapes(&self) -> &[usize] {
        &self.shapes
    }

    /// Bytes of one element of the batch.
    pub fn element_bytes(&self) -> Result<usize, CoreError> {
        self.item_shape
            .iter()
            .try_fold(self.itemsize, |acc, &n| acc.checked_mul(n))
            .ok_or(CoreError::TooLarge { elements: 1, element_bytes: usize::MAX })
    }

    /// Bytes of the whole batch.
    pub fn batch_bytes(&self) -> Result<usize, CoreError> {
        let element_bytes = self.element_bytes()?;
        element_bytes
            .checked_mul(self.len())
            .filter(|&b| isize::try_from(b).is_ok())
            .ok_or(CoreError::TooLarge { elements: self.len(), element_bytes })
    }

    /// Errors if any input's memory overlaps `[start, start + len)` (the output's).
    pub fn check_disjoint(&self, start: *const u8, len: usize) -> Result<(), CoreError> {
        let out = start as usize..(start as usize).saturating_add(len);
        let ndim = self.item_shape.len();
        for (index, src) in self.sources.iter().enumerate() {
            let shape = if self.pad { &self.shapes[index * ndim..(index + 1) * ndim] } else { &self.item_shape };
            let strides = &self.strides[index * ndim..(index + 1) * ndim];
            if let Some(reach) = extent(shape, strides, self.itemsize) {
                let lo = (src.data as usize).wrapping_add_signed(reach.start);
                let hi = (src.data as usize).wrapping_add_signed(reach.end);
                if lo < out.end && out.start < hi {
                    return Err(CoreError::OutOverlaps { index });
                }
            }
        }
        Ok(())
    }

    /// Copies every input into `dst` (exactly [`Self::batch_bytes`] long, C-contiguous),
    /// filling the padding with `pad` (the bytes of one item), on up to `threads` threads.
    ///
    /// # Panics
    /// If `dst` has the wrong length, or padding is on and `pad` is not one item long.
    pub fn copy_into(&self, dst: &mut [u8], pad: Option<&[u8]>, threads: usize) {
        let element_bytes = self.element_bytes().expect("batch size was checked by the caller");
        assert_eq!(dst.len(), element_bytes * self.len(), "destination has the wrong length");
        if self.pad {
            assert_eq!(pad.map(<[u8]>::len), Some(self.itemsize), "padding needs one item of pad bytes");
        }
        if element_bytes == 0 {
            return;
        }
        let threads = threads.clamp(1, self.len());
        if threads == 1 || dst.len() < PARALLEL_MIN_BYTES {
            self.copy_range(0, dst, element_bytes, pad);
            return;
        }
        let per_thread = self.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (chunk, part) in dst.chunks_mut(per_thread * element_bytes).enumerate() {
                scope.spawn(move || self.copy_range(chunk * per_thread, part, element_bytes, pad));
            }
        });
    }

    /// Copies inputs `first..` into `dst`, one element's bytes after another.
    fn copy_range(&self, first: usize, dst: &mut [u8], element_bytes: usize, pad: Option<&[u8]>) {
        let ndim = self.item_shape.len();
        let mut shape_buf = self.item_shape.clone();
        for (offset, out) in dst.chunks_exact_mut(element_bytes).enumerate() {
            let index = first + offset;
            let src = self.sources[index];
            let strides = &self.strides[index * ndim..(index + 1) * ndim];
            if self.pad {
                shape_buf.copy_from_slice(&self.shapes[index * ndim..(index + 1) * ndim]);
            }
            let shape = &shape_buf;
            if shape.contains(&0) {
                // An empty source reads nothing and its strides may be anything (numpy allows
                // it), so no pointer is formed from them: all padding (found by fuzzing).
                if let Some(pattern) = pad {
                    fill(out, pattern);
                }
                continue;
            }
            if src.contiguous && shape == &self.item_shape {
                // SAFETY: a contiguous source of the item shape spans exactly `element_bytes`
                // readable bytes (contract of `push`); `out` is a distinct, writable slice of
                // that length, and `check_disjoint` rules out overlap when the caller asks.
                unsafe { std::ptr::copy_nonoverlapping(src.data, out.as_mut_ptr(), element_bytes) };
            } else {
                // SAFETY: as above; `copy_strided` stays within `shape` x `strides` of `src`
                // and within `out`, whose shape is `item_shape` (each dim >= the source's).
                unsafe { copy_strided(src.data, shape, strides, self.itemsize, out, &self.item_shape, pad) };
            }
        }
    }
}

/// Copies a strided source of `shape` into the C-contiguous `dst` of `dst_shape`
/// (`dst_shape[d] >= shape[d]`), filling what the source does not cover with `pad`.
///
/// # Safety
/// `src` with `shape` and `strides` must describe readable memory of `itemsize`-byte items,
/// and the source must not be empty (no dimension of 0).
unsafe fn copy_strided(
    src: *const u8,
    shape: &[usize],
    strides: &[isize],
    itemsize: usize,
    dst: &mut [u8],
    dst_shape: &[usize],
    pad: Option<&[u8]>,
) {
    let Some((&n, rest_shape)) = shape.split_first() else {
        // A 0-d element: one item.
        // SAFETY: `src` points to one readable item (contract of this function).
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), itemsize) };
        return;
    };
    let (&stride, rest_strides) = strides.split_first().expect("strides match shape");
    let rest_dst_shape = &dst_shape[1..];
    let row_bytes = dst.len() / dst_shape[0].max(1);
    let (filled, tail) = dst.split_at_mut(n * row_bytes);
    if rest_shape.is_empty() {
        // SAFETY: the source row holds `n` items `stride` bytes apart (contract).
        unsafe { copy_row(src, n, stride, itemsize, filled) };
    } else {
        for (i, out) in filled.chunks_exact_mut(row_bytes).enumerate() {
            // SAFETY: `i < n`, so the offset stays inside the source (contract).
            let row = unsafe { src.offset(i as isize * stride) };
            // SAFETY: the sub-array at `row` has `rest_shape` x `rest_strides` (contract).
            unsafe { copy_strided(row, rest_shape, rest_strides, itemsize, out, rest_dst_shape, pad) };
        }
    }
    if let Some(pattern) = pad {
        fill(tail, pattern);
    }
}

/// Copies `n` items `stride` bytes apart from `src` into the contiguous `dst`.
///
/// # Safety
/// The `n` items at `src + i * stride` must be readable.
unsafe fn copy_row(src: *const u8, n: usize, stride: isize, itemsize: usize, dst: &mut [u8]) {
    if stride == itemsize as isize {
        // SAFETY: the row is contiguous: `n * itemsize` readable bytes (contract).
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), n * itemsize) };
        return;
    }
    macro_rules! gather {
        ($t:ty) => {{
            for (i, out) in dst.chunks_exact_mut(size_of::<$t>()).take(n).enumerate() {
                // SAFETY: item `i` is readable (contract). Unaligned, because numpy arrays
                // need not be aligned.
                let item = unsafe { src.offset(i as isize * stride).cast::<$t>().read_unaligned() };
                out.copy_from_slice(&item.to_ne_bytes());
            }
        }};
    }
    match itemsize {
        1 => gather!(u8),
        2 => gather!(u16),
        4 => gather!(u32),
        8 => gather!(u64),
        16 => gather!(u128),
        _ => {
            for (i, out) in dst.chunks_exact_mut(itemsize).take(n).enumerate() {
                // SAFETY: item `i` is `itemsize` readable bytes (contract).
                unsafe { std::ptr::copy_nonoverlapping(src.offset(i as isize * stride), out.as_mut_ptr(), itemsize) };
            }
        }
    }
}

/// Fills `dst` with repetitions of `pattern` (one item's bytes).
fn fill(dst: &mut [u8], pattern: &[u8]) {
    if dst.is_empty() {
        return;
    }
    if pattern.iter().all(|&b| b == pattern[0]) {
        dst.fill(pattern[0]);
        return;
    }
    let first = pattern.len().min(dst.len());
    dst[..first].copy_from_slice(&pattern[..first]);
    let mut done = first;
    while done < dst.len() {
        let n = done.min(dst.len() - done);
        dst.copy_within(..n, done);
        done += n;
    }
}

/// Threads to use for a large copy: the cores this process may run on.
#[must_use]
pub fn default_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

#[cfg(test)]
// Copies are meant to be bit-exact, so exact float comparison is the point.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    /// A test input: values, shape, strides in items, offset of element 0 in items.
    type Input<'a> = (&'a [f32], &'a [usize], &'a [isize], usize);

    fn describe() -> Described {
        Described { shape: vec![], dtype: "test".into() }
    }

    /// Stacks f32 arrays given as (values, shape, strides in items, offset of element 0).
    fn stack_f32(inputs: &[Input<'_>], pad: Option<f32>, threads: usize) -> (Vec<usize>, Vec<f32>) {
        let mut stacker = Stacker::new(4, inputs[0].1, pad.is_some(), inputs.len());
        for (values, shape, strides, offset) in inputs {
            let strides: Vec<isize> = strides.iter().map(|s| s * 4).collect();
            // SAFETY: the test's inputs describe in-bounds views of `values`.
            unsafe { stacker.push(values.as_ptr().add(*offset).cast(), shape, &strides, describe) }.unwrap();
        }
        let mut out = vec![0u8; stacker.batch_bytes().unwrap()];
        let pad_bytes = pad.map(f32::to_ne_bytes);
        stacker.copy_into(&mut out, pad_bytes.as_ref().map(|p| &p[..]), threads);
        let values = out.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect();
        (stacker.batch_shape(), values)
    }

    #[test]
    fn contiguous_inputs_are_concatenated() {
        let a = [1.0, 2.0, 3.0];
        let b = [4.0, 5.0, 6.0];
        let (shape, values) = stack_f32(&[(&a, &[3], &[1], 0), (&b, &[3], &[1], 0)], None, 1);
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn transposed_negative_and_sliced_strides_are_honoured() {
        // [[0, 1, 2], [3, 4, 5]] in memory.
        let matrix = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        // Its transpose (3, 2) with strides (1, 3).
        let (_, transposed) = stack_f32(&[(&matrix, &[3, 2], &[1, 3], 0)], None, 1);
        assert_eq!(transposed, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // Reversed rows: start at row 1, stride -3.
        let (_, reversed) = stack_f32(&[(&matrix, &[2, 3], &[-3, 1], 3)], None, 1);
        assert_eq!(reversed, vec![3.0, 4.0, 5.0, 0.0, 1.0, 2.0]);
        // Every other column: (2, 2) with strides (3, 2).
        let (_, sliced) = stack_f32(&[(&matrix, &[2, 2], &[3, 2], 0)], None, 1);
        assert_eq!(sliced, vec![0.0, 2.0, 3.0, 5.0]);
        // A broadcast (stride 0) row.
        let (_, broadcast) = stack_f32(&[(&matrix, &[2, 3], &[0, 1], 0)], None, 1);
        assert_eq!(broadcast, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    }

    #[test]
    fn zero_d_and_zero_size_elements() {
        let a = [7.0f32];
        let (shape, values) = stack_f32(&[(&a, &[], &[], 0), (&a, &[], &[], 0)], None, 1);
        assert_eq!(shape, vec![2]);
        assert_eq!(values, vec![7.0, 7.0]);
        let (shape, values) = stack_f32(&[(&a, &[2, 0], &[0, 1], 0), (&a, &[2, 0], &[0, 1], 0)], None, 1);
        assert_eq!(shape, vec![2, 2, 0]);
        assert!(values.is_empty());
    }

    #[test]
    fn padding_fills_to_the_largest_shape() {
        let a = [1.0, 2.0];
        let b = [3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let (shape, values) = stack_f32(&[(&a, &[1, 2], &[2, 1], 0), (&b, &[2, 3], &[3, 1], 0)], Some(-1.0), 1);
        assert_eq!(shape, vec![2, 2, 3]);
        assert_eq!(values, vec![1.0, 2.0, -1.0, -1.0, -1.0, -1.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let empty: [f32; 0] = [];
        let (shape, values) = stack_f32(&[(&empty, &[0], &[1], 0), (&a, &[2], &[1], 0)], Some(9.0), 1);
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(values, vec![9.0, 9.0, 1.0, 2.0]);
    }

    #[test]
    fn empty_sources_with_wild_strides_are_all_padding() {
        let a = [1.0f32, 2.0];
        // numpy allows any strides on an array with a 0 dimension; none may be followed.
        let (shape, values) =
            stack_f32(&[(&a, &[3, 0], &[isize::MIN / 8, 1], 0), (&a, &[1, 2], &[2, 1], 0)], Some(0.5), 1);
        assert_eq!(shape, vec![2, 3, 2]);
        assert_eq!(values[..6], [0.5; 6]);
        assert_eq!(values[6..8], [1.0, 2.0]);
    }

    #[test]
    fn parallel_copy_matches_serial() {
        let big: Vec<f32> = (0..(1 << 20)).map(|i| i as f32).collect();
        let inputs: Vec<Input<'_>> = (0..8).map(|_| (&big[..], &[1 << 20][..], &[1][..], 0)).collect();
        let (_, serial) = stack_f32(&inputs, None, 1);
        let (_, parallel) = stack_f32(&inputs, None, 3);
        assert_eq!(serial, parallel);
        assert_eq!(parallel[(1 << 20) + 5], 5.0);
    }

    #[test]
    fn mismatches_name_the_element() {
        let a = [0.0f32; 6];
        let mut stacker = Stacker::new(4, &[3], false, 2);
        // SAFETY: in-bounds views of `a`.
        unsafe {
            stacker.push(a.as_ptr().cast(), &[3], &[4], describe).unwrap();
            let err = stacker.push(a.as_ptr().cast(), &[6], &[4], describe).unwrap_err();
            assert!(matches!(err, CoreError::ShapeMismatch { index: 1, .. }), "{err}");
            let err = stacker.push(a.as_ptr().cast(), &[3, 2], &[8, 4], describe).unwrap_err();
            assert!(matches!(err, CoreError::RankMismatch { index: 1, expected_ndim: 1, .. }), "{err}");
        }
    }

    #[test]
    fn overlap_with_output_is_detected() {
        let a = [0.0f32; 8];
        let mut stacker = Stacker::new(4, &[4], false, 1);
        // SAFETY: in-bounds view of `a`.
        unsafe { stacker.push(a.as_ptr().add(2).cast(), &[4], &[4], describe) }.unwrap();
        assert!(stacker.check_disjoint(a.as_ptr().cast(), 16).is_err());
        assert!(stacker.check_disjoint(a.as_ptr().cast(), 8).is_ok());
        // SAFETY: pointer arithmetic within `a`'s allocation (one past its end at most).
        assert!(stacker.check_disjoint(unsafe { a.as_ptr().add(6) }.cast(), 8).is_ok());
    }

    #[test]
    fn extent_covers_negative_strides() {
        assert_eq!(extent(&[3], &[-4], 4), Some(-8..4));
        assert_eq!(extent(&[2, 3], &[12, 4], 4), Some(0..24));
        assert_eq!(extent(&[2, 0], &[12, 4], 4), None);
        assert_eq!(extent(&[], &[], 8), Some(0..8));
    }

    #[test]
    fn fill_repeats_patterns() {
        let mut buf = [0u8; 7];
        fill(&mut buf, &[1, 2, 3]);
        assert_eq!(buf, [1, 2, 3, 1, 2, 3, 1]);
        fill(&mut buf, &[5, 5]);
        assert_eq!(buf, [5; 7]);
    }

    #[test]
    fn pad_values_are_checked_against_the_dtype() {
        let ok = |v, k| pad_bytes(v, k, "t").unwrap();
        let err = |v, k| pad_bytes(v, k, "t").unwrap_err().to_string();
        assert_eq!(ok(PadValue::Int(-1), ScalarKind::Signed(1)), vec![0xff]);
        assert_eq!(ok(PadValue::Int(255), ScalarKind::Unsigned(1)), vec![0xff]);
        assert_eq!(ok(PadValue::Int(-2), ScalarKind::Signed(8)), (-2i64).to_ne_bytes().to_vec());
        assert_eq!(ok(PadValue::Float(3.0), ScalarKind::Signed(4)), 3i32.to_ne_bytes().to_vec());
        assert_eq!(ok(PadValue::Bool(true), ScalarKind::Bool), vec![1]);
        assert_eq!(ok(PadValue::Int(0), ScalarKind::Bool), vec![0]);
        assert_eq!(ok(PadValue::Float(0.5), ScalarKind::Float(4)), 0.5f32.to_ne_bytes().to_vec());
        assert_eq!(ok(PadValue::Float(f64::NAN), ScalarKind::Float(2)).len(), 2);
        assert_eq!(
            ok(PadValue::Float(f64::NEG_INFINITY), ScalarKind::Float(4)),
            f32::NEG_INFINITY.to_ne_bytes().to_vec()
        );
        assert_eq!(ok(PadValue::Float(1.0), ScalarKind::BFloat16), half::bf16::ONE.to_ne_bytes().to_vec());
        assert_eq!(
            ok(PadValue::Complex(1.0, -2.0), ScalarKind::Complex(8)),
            [1f32.to_ne_bytes(), (-2f32).to_ne_bytes()].concat()
        );
        assert_eq!(ok(PadValue::Int(u64::MAX.into()), ScalarKind::Unsigned(8)), u64::MAX.to_ne_bytes().to_vec());

        assert!(err(PadValue::Int(-1), ScalarKind::Unsigned(1)).contains("out of range [0, 255]"));
        assert!(err(PadValue::Int(128), ScalarKind::Signed(1)).contains("out of range [-128, 127]"));
        assert!(err(PadValue::Float(1.5), ScalarKind::Signed(4)).contains("whole"));
        assert!(err(PadValue::Float(f64::NAN), ScalarKind::Signed(4)).contains("whole"));
        assert!(err(PadValue::Int(2), ScalarKind::Bool).contains("bool"));
        assert!(err(PadValue::Float(1e5), ScalarKind::Float(2)).contains("infinity"));
        assert!(err(PadValue::Float(1e39), ScalarKind::Float(4)).contains("infinity"));
        assert!(err(PadValue::Complex(0.0, 1.0), ScalarKind::Float(8)).contains("imaginary"));
        assert!(err(PadValue::Complex(1.0, 1.0), ScalarKind::Signed(8)).contains("imaginary"));
        assert!(err(PadValue::Int(0), ScalarKind::Other).contains("pad= works with"));
        // Integer widths no numpy dtype has are refused, not a panic (found by fuzzing).
        assert_eq!(ok(PadValue::Int(i128::MIN), ScalarKind::Signed(16)), i128::MIN.to_ne_bytes().to_vec());
        assert!(err(PadValue::Int(1), ScalarKind::Signed(0)).contains("pad= works with"));
        assert!(err(PadValue::Int(1), ScalarKind::Unsigned(17)).contains("pad= works with"));
        let msg = pad_bytes(PadValue::Int(300), ScalarKind::Unsigned(1), "uint8").unwrap_err().to_string();
        assert!(msg.starts_with("pad=300 cannot be held by dtype uint8"), "{msg}");
    }
}
