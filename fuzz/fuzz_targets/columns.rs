//! Fuzzes the column-interleaving kernel: `output_shape`, `output_bytes` and `interleave` on
//! 1-4 threads, against a reference that decodes each value by its dtype and converts it.
//!
//! Every column describes memory inside one real backing buffer (a dtype, a length, a byte
//! stride of any sign or size, an offset); columns that would reach outside it are dropped, as
//! numpy's own guarantees rule them out in the bindings. The matrix is then compared, byte for
//! byte, with the reference; errors are checked against the reason they must have.
#![no_main]

use arbitrary::{Result, Unstructured};
use beam_turbo_core::CoreError;
use beam_turbo_core::columns::{Column, ColumnDtype, interleave, output_bytes, output_shape};
use half::f16;
use libfuzzer_sys::fuzz_target;

/// Matrices larger than this are not made (the reference check is per value).
const MAX_MATRIX: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = case(&mut Unstructured::new(data));
});

/// One column as the fuzzer described it.
struct Spec {
    dtype: ColumnDtype,
    offset: usize,
    stride: isize,
}

/// A byte stride of any sign or size.
fn stride(u: &mut Unstructured<'_>, itemsize: usize) -> Result<isize> {
    let size = itemsize as isize;
    Ok(match u.int_in_range(0..=3u8)? {
        0 => size,
        1 => size * isize::from(u.int_in_range::<i8>(-6..=6)?),
        2 => isize::from(u.arbitrary::<i16>()?),
        _ => 0,
    })
}

/// The byte range `[lo, hi)` a column reads relative to the buffer's start, if any.
fn reach(spec: &Spec, rows: usize) -> Option<(i128, i128)> {
    if rows == 0 {
        return None;
    }
    let last = (rows as i128 - 1) * spec.stride as i128;
    let lo = spec.offset as i128 + last.min(0);
    let hi = spec.offset as i128 + last.max(0) + spec.dtype.itemsize() as i128;
    Some((lo, hi))
}

/// A value decoded exactly.
enum V {
    Int(i128),
    Float(f64),
}

/// The value in `bytes`, converted to `target` as numpy's `astype` would, as native bytes.
fn reference(bytes: &[u8], dtype: ColumnDtype, target: ColumnDtype) -> Vec<u8> {
    use ColumnDtype as D;
    if dtype == target {
        return bytes.to_vec();
    }
    let int = |signed: bool| -> i128 {
        let mut le = [0u8; 16];
        le[..bytes.len()].copy_from_slice(bytes);
        if cfg!(target_endian = "big") {
            le[..bytes.len()].reverse();
        }
        let v = i128::from_le_bytes(le);
        let bits = 8 * bytes.len() as u32;
        // Sign-extend from the value's own width.
        if signed { (v << (128 - bits)) >> (128 - bits) } else { v }
    };
    // Floats go through f64 (exact for f16 and f32); integers through i128 (exact), whose
    // conversion to f32 rounds once, as numpy's direct cast does.
    let v = match dtype {
        D::Bool => V::Int(i128::from(bytes[0] != 0)),
        D::I8 | D::I16 | D::I32 | D::I64 => V::Int(int(true)),
        D::U8 | D::U16 | D::U32 | D::U64 => V::Int(int(false)),
        D::F16 => V::Float(f16::from_ne_bytes(bytes.try_into().unwrap()).to_f64()),
        D::F32 => V::Float(f64::from(f32::from_ne_bytes(bytes.try_into().unwrap()))),
        D::F64 => V::Float(f64::from_ne_bytes(bytes.try_into().unwrap())),
    };
    match (target, v) {
        (D::F32, V::Int(i)) => (i as f32).to_ne_bytes().to_vec(),
        (D::F32, V::Float(f)) => (f as f32).to_ne_bytes().to_vec(),
        (D::F64, V::Int(i)) => (i as f64).to_ne_bytes().to_vec(),
        (D::F64, V::Float(f)) => f.to_ne_bytes().to_vec(),
        _ => unreachable!("integer targets only for columns of that dtype"),
    }
}

fn case(u: &mut Unstructured<'_>) -> Result<()> {
    // Usually a few rows from the fuzzer's bytes; sometimes enough rows for the parallel copy
    // (4 MiB of output), from a large buffer of hashed bytes, so that no two rows look alike.
    let (n, buffer): (usize, Vec<u8>) = if u.ratio(1, 8)? {
        let n = u.int_in_range(1 << 16..=1 << 19)?;
        let seed: u64 = u.arbitrary()?;
        let words = (0..2 * n as u64 + 256).map(|i| (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29));
        (n, words.flat_map(u64::to_ne_bytes).collect())
    } else {
        (u.int_in_range(0..=40)?, (0..u.int_in_range(0..=2048)?).map(|_| u.arbitrary()).collect::<Result<_>>()?)
    };
    let mut specs = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let dtype = *u.choose(&ColumnDtype::ALL)?;
        let spec =
            Spec { dtype, offset: u.int_in_range(0..=buffer.len().min(4096))?, stride: stride(u, dtype.itemsize())? };
        // A column of another length now and then (must be refused).
        let len = if u.ratio(1, 20)? { u.int_in_range(0..=40)? } else { n };
        if reach(&spec, len).is_some_and(|(lo, hi)| lo < 0 || hi > buffer.len() as i128) {
            continue;
        }
        specs.push((spec, len));
    }
    let target = match u.int_in_range(0..=3u8)? {
        0 => ColumnDtype::F32,
        1 => ColumnDtype::F64,
        2 => specs.first().map_or(ColumnDtype::I32, |(s, _)| s.dtype),
        _ => *u.choose(&ColumnDtype::ALL)?,
    };
    let columns: Vec<Column<'_>> = specs
        .iter()
        // SAFETY: the column's reach lies inside `buffer` (checked above), which outlives it.
        .map(|(s, len)| unsafe { Column::from_raw(buffer.as_ptr().add(s.offset), *len, s.stride, s.dtype) })
        .collect();

    let shape = output_shape(&columns, target);
    let expected_shape = if columns.is_empty() {
        Err("none")
    } else if specs.iter().any(|(_, len)| *len != specs[0].1) {
        Err("length")
    } else if !matches!(target, ColumnDtype::F32 | ColumnDtype::F64) && specs.iter().any(|(s, _)| s.dtype != target) {
        Err("dtype")
    } else {
        Ok((specs[0].1, specs.len()))
    };
    match (&shape, expected_shape) {
        (Ok(got), Ok(want)) => assert_eq!(*got, want),
        (Err(CoreError::NoColumns), Err("none"))
        | (Err(CoreError::ColumnLength { .. }), Err("length"))
        | (Err(CoreError::OutputDtype { .. }), Err("dtype")) => return Ok(()),
        (got, want) => panic!("output_shape gave {got:?}, expected {want:?}"),
    }
    let (rows, k) = shape.unwrap();
    let size = target.itemsize();
    let nbytes = output_bytes(&columns, target).expect("the shape was fine");
    assert_eq!(nbytes, rows * k * size);
    if nbytes > MAX_MATRIX {
        return Ok(());
    }
    let threads = u.int_in_range(1..=4)?;
    if u.ratio(1, 20)? {
        let mut wrong = vec![0u8; nbytes + size];
        assert!(matches!(interleave(&columns, target, &mut wrong, threads), Err(CoreError::Out { .. })));
    }
    let mut out = vec![0xa5u8; nbytes];
    interleave(&columns, target, &mut out, threads).expect("a valid matrix");
    for (i, row) in out.chunks_exact(k * size).enumerate() {
        for (j, ((spec, _), got)) in specs.iter().zip(row.chunks_exact(size)).enumerate() {
            let at = (spec.offset as isize + i as isize * spec.stride) as usize;
            let want = reference(&buffer[at..at + spec.dtype.itemsize()], spec.dtype, target);
            assert_eq!(got, &want[..], "row {i} column {j}: {:?} to {:?}", spec.dtype, target);
        }
    }
    Ok(())
}
