//! Fuzzes `BatchSizer`: any configuration, then any sequence of `next_size`, `record`,
//! `record_failure` and pickled-state round trips, with sizes and timings that may be NaN,
//! infinite, zero or negative; and `from_bytes` on corrupted states.
//!
//! Invariants checked after every step: no panic; `next_size` is within
//! `[max(min_batch_size, 1), max_batch_size]`; right after a memory failure at `f` the next
//! size is below `f` (or the minimum, when `f` is at or below it) and the ceiling is at most
//! `f`; the next size never exceeds the ceiling (it equals it only when the ceiling is
//! retried); the batch and failure counters count; a state round trip is accepted and gives
//! the same bytes back; a corrupted state is refused or gives a sizer that keeps the same
//! invariants.
#![no_main]

use arbitrary::{Result, Unstructured};
use beam_turbo_core::sizer::{BatchSizer, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

/// A number as a hostile caller might pass one: small, large, special, or any bit pattern.
fn number(u: &mut Unstructured<'_>) -> Result<f64> {
    Ok(match u.int_in_range(0..=4)? {
        0 => f64::from(u.int_in_range::<u16>(0..=20_000)?),
        1 => *u.choose(&[0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e-300, 1e300, 0.5])?,
        2 => f64::from(u.arbitrary::<u32>()?) * 1e-6,
        3 => f64::from(u.arbitrary::<i32>()?),
        _ => f64::from_bits(u.arbitrary()?),
    })
}

fn target(u: &mut Unstructured<'_>) -> Result<Option<f64>> {
    Ok(if u.arbitrary()? { Some(number(u)?) } else { None })
}

fn bound(u: &mut Unstructured<'_>) -> Result<i64> {
    Ok(if u.ratio(1, 8)? { u.arbitrary()? } else { u.int_in_range(-2..=5000)? })
}

struct Checked {
    sizer: BatchSizer,
    lo: u64,
    hi: u64,
    batches: u64,
    failures: u64,
}

impl Checked {
    fn check(&self, what: &str) {
        let n = self.sizer.next_size();
        assert!((self.lo..=self.hi).contains(&n), "{what}: next_size {n} outside [{}, {}]", self.lo, self.hi);
        if let Some(ceiling) = self.sizer.ceiling()
            && ceiling > self.lo
        {
            assert!(n <= ceiling, "{what}: next_size {n} above the ceiling {ceiling}");
        }
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let config = Config {
        min_batch_size: bound(u)?,
        max_batch_size: bound(u)?,
        target_batch_overhead: target(u)?,
        target_batch_duration_secs: target(u)?,
        target_batch_duration_secs_including_fixed_cost: target(u)?,
        variance: number(u)?,
    };
    let Ok(sizer) = BatchSizer::new(config) else { return Ok(()) };
    let (lo, hi) = (config.min_batch_size.max(1) as u64, config.max_batch_size as u64);
    let mut s = Checked { sizer, lo, hi, batches: 0, failures: 0 };
    s.check("new");
    let steps: usize = u.int_in_range(0..=400)?;
    for _ in 0..steps {
        match u.int_in_range(0..=9)? {
            0..=5 => {
                // Mostly the size proposed, as a caller would run it; sometimes anything.
                let size = if u.ratio(3, 4)? { s.sizer.next_size() as f64 } else { number(u)? };
                let secs = if u.ratio(3, 4)? { 0.001 + size.abs().min(1e6) * 1e-5 } else { number(u)? };
                s.sizer.record(size, secs);
                s.batches += 1;
                s.check("record");
            }
            6 | 7 => {
                let size = if u.ratio(3, 4)? { s.sizer.next_size() as f64 } else { number(u)? };
                let memory: bool = u.arbitrary()?;
                s.sizer.record_failure(size, memory);
                s.batches += 1;
                s.failures += 1;
                s.check("record_failure");
                if memory && size > 0.0 && size.is_finite() {
                    let failed = size.ceil() as u64;
                    let n = s.sizer.next_size();
                    if failed > lo {
                        assert!(n < failed, "next_size {n} right after a memory failure at {failed}");
                    } else {
                        assert_eq!(n, lo, "a memory failure at or below the minimum keeps the minimum");
                    }
                    assert!(s.sizer.ceiling().is_some_and(|c| c <= failed), "ceiling after a failure at {failed}");
                }
            }
            8 => {
                let state = s.sizer.to_bytes();
                let restored = BatchSizer::from_bytes(&state).expect("a sizer's own state is accepted");
                assert_eq!(restored.to_bytes(), state, "a round trip changes nothing");
                assert_eq!(restored.next_size(), s.sizer.next_size());
                s.sizer = restored;
                s.check("round trip");
            }
            _ => {
                // A corrupted state: refused, or a sizer that keeps the invariants.
                let mut state = s.sizer.to_bytes();
                let at = u.choose_index(state.len())?;
                state[at] ^= u.int_in_range(1..=255)?;
                if u.ratio(1, 8)? {
                    state.truncate(at);
                }
                if let Ok(mut other) = BatchSizer::from_bytes(&state) {
                    let c = *other.config();
                    let (lo, hi) = (c.min_batch_size.max(1) as u64, c.max_batch_size as u64);
                    let n = other.next_size();
                    assert!((lo..=hi).contains(&n), "corrupt state: next_size {n} outside [{lo}, {hi}]");
                    for _ in 0..8 {
                        let n = other.next_size();
                        other.record(n as f64, 0.001 + n as f64 * 1e-5);
                        let n = other.next_size();
                        assert!((lo..=hi).contains(&n), "corrupt state, after a batch: {n} outside [{lo}, {hi}]");
                        other.record_failure(n as f64, true);
                        let m = other.next_size();
                        assert!((lo..=hi).contains(&m), "corrupt state, after a failure: {m} outside [{lo}, {hi}]");
                    }
                }
            }
        }
        assert_eq!(s.sizer.batches(), s.batches);
        assert_eq!(s.sizer.failures(), s.failures);
    }
    Ok(())
}
