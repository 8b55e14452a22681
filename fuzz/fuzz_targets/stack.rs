//! Fuzzes the stacking kernels: `Stacker` (`push`, `batch_bytes`, `copy_into` on 1-4 threads,
//! `check_disjoint`), `extent` and `pad_bytes`, against simple reference implementations.
//!
//! Every input describes memory inside one real backing buffer (shape, byte strides of any
//! sign or size, an offset, an item size); descriptions that would reach outside it are
//! dropped before `push`, as the bindings' bounds checks do. The batch is then compared,
//! byte for byte, with a reference that reads each item by its multi-index.
#![no_main]

use arbitrary::{Result, Unstructured};
use beam_turbo_core::CoreError;
use beam_turbo_core::error::Described;
use beam_turbo_core::stack::{PadValue, ScalarKind, Stacker, extent, pad_bytes};
use libfuzzer_sys::fuzz_target;

/// Batches larger than this are not copied (the reference check is per item).
const MAX_BATCH: usize = 6 << 20;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = pad_case(&mut u);
    let _ = stack_case(&mut u);
});

fn describe() -> Described {
    Described { shape: vec![], dtype: "fuzz".into() }
}

/// One dimension: usually small, sometimes large (only a stride of 0 keeps a large one
/// inside the buffer, which is how a small buffer reaches the parallel copy).
fn dim(u: &mut Unstructured<'_>) -> Result<usize> {
    if u.ratio(1, 64)? { u.int_in_range(0..=1 << 21) } else { u.int_in_range(0..=5) }
}

fn strides_for(u: &mut Unstructured<'_>, shape: &[usize], itemsize: usize) -> Result<Vec<isize>> {
    let mode: u8 = u.int_in_range(0..=3)?;
    let mut c = vec![0isize; shape.len()];
    let mut acc = itemsize as isize;
    for d in (0..shape.len()).rev() {
        c[d] = acc;
        acc = acc.saturating_mul(shape[d].max(1) as isize);
    }
    let mut strides = Vec::with_capacity(shape.len());
    for &contiguous in &c {
        strides.push(match mode {
            0 => contiguous,
            1 => itemsize as isize * isize::from(u.int_in_range::<i8>(-6..=6)?),
            2 => isize::from(u.arbitrary::<i16>()?),
            _ => {
                if u.arbitrary()? {
                    contiguous
                } else {
                    isize::from(u.int_in_range::<i8>(-40..=40)?)
                }
            }
        });
    }
    Ok(strides)
}

/// The byte range `[lo, hi)` an array touches relative to its pointer, or None if empty.
fn reference_extent(shape: &[usize], strides: &[isize], itemsize: usize) -> Option<(i128, i128)> {
    if shape.contains(&0) {
        return None;
    }
    let (mut lo, mut hi) = (0i128, itemsize as i128);
    for (&n, &s) in shape.iter().zip(strides) {
        let reach = (n as i128 - 1) * s as i128;
        if reach < 0 { lo += reach } else { hi += reach }
    }
    Some((lo, hi))
}

struct Src {
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<isize>,
}

fn stack_case(u: &mut Unstructured<'_>) -> Result<()> {
    let itemsize = *u.choose(&[1usize, 2, 4, 8, 16, 3, 5, 12])?;
    let buf_len: usize = u.int_in_range(0..=2048)?;
    let backing: Vec<u8> = (0..buf_len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let ndim: usize = u.int_in_range(0..=4)?;
    let padding: bool = u.arbitrary()?;
    let inputs: usize = u.int_in_range(1..=8)?;
    let first: Vec<usize> = (0..ndim).map(|_| dim(u)).collect::<Result<_>>()?;

    let mut stacker: Option<Stacker> = None;
    let mut pushed: Vec<Src> = Vec::new();
    for _ in 0..inputs {
        let rank = if u.ratio(1, 16)? { u.int_in_range(0..=5)? } else { ndim };
        let shape: Vec<usize> = if rank == ndim && !padding && !u.ratio(1, 16)? {
            first.clone()
        } else {
            (0..rank).map(|_| dim(u)).collect::<Result<_>>()?
        };
        let strides = strides_for(u, &shape, itemsize)?;
        let offset: usize = u.int_in_range(0..=buf_len)?;
        let reach = reference_extent(&shape, &strides, itemsize);
        if let Some((lo, hi)) = reach {
            let got = extent(&shape, &strides, itemsize).expect("a non-empty array has an extent");
            if let (Ok(lo), Ok(hi)) = (isize::try_from(lo), isize::try_from(hi)) {
                assert_eq!(got, lo..hi, "{shape:?} {strides:?}");
            } else {
                // Beyond isize, `extent` saturates: no real array is that large.
                assert!(got.start == isize::MIN || got.end == isize::MAX, "{shape:?} {strides:?}: {got:?}");
            }
            if offset as i128 + lo < 0 || offset as i128 + hi > buf_len as i128 {
                continue; // Not inside the buffer: the bindings refuse such an array.
            }
        } else {
            assert_eq!(extent(&shape, &strides, itemsize), None);
        }
        let stacker = stacker.get_or_insert_with(|| Stacker::new(itemsize, &first, padding, inputs));
        let index = stacker.len();
        // SAFETY: the array lies inside `backing` (checked above; an empty one reads nothing),
        // which outlives the stacker and is not modified.
        let result = unsafe { stacker.push(backing.as_ptr().add(offset), &shape, &strides, describe) };
        match result {
            Ok(()) => {
                assert_eq!(rank, ndim);
                assert!(padding || shape == first);
                pushed.push(Src { offset, shape, strides });
            }
            Err(CoreError::RankMismatch { index: i, expected_ndim, .. }) => {
                assert_eq!((i, expected_ndim), (index, ndim));
                assert_ne!(rank, ndim);
            }
            Err(CoreError::ShapeMismatch { index: i, expected, .. }) => {
                assert_eq!((i, &expected), (index, &first));
                assert!(!padding && rank == ndim && shape != first);
            }
            Err(other) => panic!("unexpected error {other:?}"),
        }
        assert_eq!(stacker.len(), pushed.len(), "a refused push must leave the stacker as it was");
    }
    let Some(stacker) = stacker else { return Ok(()) };
    if pushed.is_empty() {
        return Ok(());
    }

    let item_shape: Vec<usize> = if padding {
        (0..ndim).map(|d| pushed.iter().map(|s| s.shape[d]).fold(first[d], usize::max)).collect()
    } else {
        first.clone()
    };
    assert_eq!(stacker.item_shape(), item_shape.as_slice());
    let element_items = item_shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    let expected_bytes = element_items
        .and_then(|n| n.checked_mul(itemsize))
        .and_then(|b| b.checked_mul(pushed.len()))
        .filter(|&b| isize::try_from(b).is_ok());
    match (stacker.batch_bytes(), expected_bytes) {
        (Ok(got), Some(want)) => assert_eq!(got, want),
        (Err(CoreError::TooLarge { .. }), None) => return Ok(()),
        (got, want) => panic!("batch_bytes gave {got:?}, expected {want:?}"),
    }
    let element_items = element_items.expect("checked above");
    let Some(total) = expected_bytes.filter(|&b| b <= MAX_BATCH) else {
        return Ok(());
    };
    if padding {
        let shapes: Vec<usize> = pushed.iter().flat_map(|s| s.shape.iter().copied()).collect();
        assert_eq!(stacker.shapes(), shapes.as_slice());
    }

    let pad: Vec<u8> = (0..itemsize).map(|_| u.arbitrary::<u8>()).collect::<Result<_>>()?;
    let threads: usize = u.int_in_range(1..=4)?;
    let mut dst = vec![0xA5u8; total];
    stacker.copy_into(&mut dst, padding.then_some(&pad[..]), threads);

    // The reference: each item of each element, by its multi-index.
    let element_bytes = element_items * itemsize;
    let mut index = vec![0usize; ndim];
    for (k, src) in pushed.iter().enumerate() {
        for j in 0..element_items {
            let mut rest = j;
            for d in (0..ndim).rev() {
                index[d] = rest % item_shape[d];
                rest /= item_shape[d];
            }
            let at = k * element_bytes + j * itemsize;
            let got = &dst[at..at + itemsize];
            if index.iter().zip(&src.shape).all(|(i, n)| i < n) {
                let offset: isize = index.iter().zip(&src.strides).map(|(&i, &s)| i as isize * s).sum();
                let from = (src.offset as isize + offset) as usize;
                assert_eq!(got, &backing[from..from + itemsize], "element {k} item {index:?}");
            } else {
                assert_eq!(got, &pad[..], "element {k} item {index:?} should be padding");
            }
        }
    }

    // The output is disjoint from the inputs; a window of the backing buffer overlaps exactly
    // the inputs whose byte range meets it.
    assert!(stacker.check_disjoint(dst.as_ptr(), dst.len()).is_ok());
    let start: usize = u.int_in_range(0..=buf_len)?;
    let len: usize = u.int_in_range(0..=buf_len - start)?;
    let first_overlap = pushed.iter().position(|s| {
        reference_extent(&s.shape, &s.strides, itemsize).is_some_and(|(lo, hi)| {
            let (lo, hi) = (s.offset as i128 + lo, s.offset as i128 + hi);
            lo < (start + len) as i128 && (start as i128) < hi
        })
    });
    // SAFETY: `start <= buf_len`: at most one past the end of `backing`.
    let window = unsafe { backing.as_ptr().add(start) };
    match (stacker.check_disjoint(window, len), first_overlap) {
        (Ok(()), None) => {}
        (Err(CoreError::OutOverlaps { index }), Some(i)) => assert_eq!(index, i),
        (got, want) => panic!("check_disjoint gave {got:?}, expected overlap at {want:?}"),
    }
    Ok(())
}

fn kind_size(kind: ScalarKind) -> Option<usize> {
    match kind {
        ScalarKind::Bool => Some(1),
        ScalarKind::BFloat16 => Some(2),
        ScalarKind::Signed(b) | ScalarKind::Unsigned(b) | ScalarKind::Float(b) | ScalarKind::Complex(b) => Some(b),
        ScalarKind::Other => None,
    }
}

fn pad_case(u: &mut Unstructured<'_>) -> Result<()> {
    let kind = match u.int_in_range(0..=6)? {
        0 => ScalarKind::Bool,
        1 => ScalarKind::Signed(*u.choose(&[1, 2, 4, 8, 0, 3, 16, 17, 32])?),
        2 => ScalarKind::Unsigned(*u.choose(&[1, 2, 4, 8, 0, 3, 16, 17, 32])?),
        3 => ScalarKind::Float(*u.choose(&[2, 4, 8, 0, 10, 16])?),
        4 => ScalarKind::BFloat16,
        5 => ScalarKind::Complex(*u.choose(&[8, 16, 4, 32])?),
        _ => ScalarKind::Other,
    };
    let value = match u.int_in_range(0..=4)? {
        0 => PadValue::Bool(u.arbitrary()?),
        1 => PadValue::Int(i128::from(u.arbitrary::<i64>()?)),
        2 => PadValue::Int(u.arbitrary()?),
        3 => PadValue::Float(f64::from_bits(u.arbitrary()?)),
        _ => PadValue::Complex(f64::from_bits(u.arbitrary()?), f64::from_bits(u.arbitrary()?)),
    };
    let Ok(bytes) = pad_bytes(value, kind, "fuzz") else {
        // Refusals are fine, but an integer in range of a numpy integer dtype must be held.
        if let (PadValue::Int(v), ScalarKind::Signed(b @ (1 | 2 | 4 | 8))) = (value, kind) {
            assert!(v < -(1i128 << (8 * b - 1)) || v >= 1i128 << (8 * b - 1), "{v} refused by int{}", 8 * b);
        }
        if let (PadValue::Int(v), ScalarKind::Unsigned(b @ (1 | 2 | 4 | 8))) = (value, kind) {
            assert!(v < 0 || v >= 1i128 << (8 * b), "{v} refused by uint{}", 8 * b);
        }
        return Ok(());
    };
    assert_eq!(Some(bytes.len()), kind_size(kind), "{value:?} as {kind:?}");
    match (value, kind) {
        (PadValue::Int(v), ScalarKind::Signed(b)) => {
            let mut le = [if v < 0 { 0xff } else { 0 }; 16];
            le[..b].copy_from_slice(&bytes);
            assert_eq!(i128::from_ne_bytes(le), v);
        }
        (PadValue::Int(v), ScalarKind::Unsigned(b)) => {
            let mut le = [0u8; 16];
            le[..b].copy_from_slice(&bytes);
            assert_eq!(i128::from_ne_bytes(le), v);
        }
        (PadValue::Float(v), ScalarKind::Float(8)) => assert_eq!(bytes, v.to_ne_bytes()),
        (PadValue::Float(v), ScalarKind::Float(4)) => assert_eq!(bytes, (v as f32).to_ne_bytes()),
        (PadValue::Bool(v), ScalarKind::Bool) => assert_eq!(bytes, [u8::from(v)]),
        _ => {}
    }
    Ok(())
}
