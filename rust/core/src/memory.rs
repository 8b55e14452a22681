//! Batch memory: 64-byte-aligned allocations, recycled through a small bounded pool so that a
//! new large batch does not page-fault fresh memory.
//!
//! A buffer goes back to the pool only from its own `Drop`, that is once nothing refers to it
//! any more; the pool never hands out memory that is still in use. The pool lock is only ever
//! `try_lock`ed, so a lock held by a thread that did not survive a `fork` can never block the
//! child: it then just allocates and frees without the pool.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::CoreError;

/// Alignment of every batch: a cache line, and enough for any SIMD load and for `DLPack`.
pub const ALIGN: usize = 64;

/// Buffers smaller than this come straight from the allocator, which already recycles them.
const POOL_MIN_BYTES: usize = 1 << 20;
/// At most this many idle buffers are kept.
const POOL_MAX_BUFFERS: usize = 8;
/// Default bound on the bytes held idle by the pool.
pub const DEFAULT_POOL_LIMIT: usize = 256 << 20;

static POOL: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
static POOL_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_POOL_LIMIT);

/// An owned, uninitialised-on-allocation, 64-byte-aligned byte buffer.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Bytes in use by the current owner.
    len: usize,
    /// Bytes allocated (`len <= capacity`, `capacity >= ALIGN`).
    capacity: usize,
}

// SAFETY: the buffer is plain bytes owned uniquely by this value; no thread-bound state.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out `*const`/`&[u8]` views; writes need `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes whose contents are unspecified (fresh or recycled).
    pub fn new(len: usize) -> Result<Self, CoreError> {
        if len >= POOL_MIN_BYTES
            && let Some(mut buf) = take_pooled(len)
        {
            buf.len = len;
            return Ok(buf);
        }
        Self::allocate(len)
    }

    fn allocate(len: usize) -> Result<Self, CoreError> {
        let capacity = len.max(ALIGN);
        let layout = Layout::from_size_align(capacity, ALIGN).map_err(|_| CoreError::Alloc { bytes: len })?;
        // SAFETY: `layout` has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(raw).ok_or(CoreError::Alloc { bytes: len })?;
        Ok(Self { ptr, len, capacity })
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
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    #[must_use]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes in use, for writing. Their prior contents are unspecified but initialised
    /// memory as far as Rust is concerned only after a write; callers write before they read.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `capacity >= len` bytes and uniquely borrowed through
        // `&mut self`. u8 has no invalid bit patterns and the allocator's memory is readable.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity >= POOL_MIN_BYTES && give_back(self) {
            return;
        }
        // SAFETY: allocated in `allocate` with exactly this capacity and alignment.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.capacity, ALIGN)) };
    }
}

/// Takes an idle pooled buffer of at least `len` bytes and at most a quarter more.
fn take_pooled(len: usize) -> Option<AlignedBuf> {
    let mut pool = POOL.try_lock().ok()?;
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity >= len && b.capacity - len <= len / 4)
        .min_by_key(|(_, b)| b.capacity)
        .map(|(i, _)| i)?;
    Some(pool.swap_remove(best))
}

/// Moves the allocation of a dying buffer into the pool; false if the pool is full or busy.
fn give_back(buf: &mut AlignedBuf) -> bool {
    let Ok(mut pool) = POOL.try_lock() else { return false };
    let held: usize = pool.iter().map(|b| b.capacity).sum();
    if pool.len() >= POOL_MAX_BUFFERS || held + buf.capacity > POOL_LIMIT.load(Ordering::Relaxed) {
        return false;
    }
    // The pool takes over the allocation; the dying value keeps a dangling pointer that its
    // `drop` will not use again (it returns right after this call).
    pool.push(AlignedBuf { ptr: buf.ptr, len: 0, capacity: buf.capacity });
    true
}

/// Sets the bound on idle pooled bytes (0 disables pooling) and returns the previous one.
/// Idle buffers beyond the new bound are freed at once.
pub fn set_pool_limit(bytes: usize) -> usize {
    let previous = POOL_LIMIT.swap(bytes, Ordering::Relaxed);
    let freed: Vec<AlignedBuf> = {
        let Ok(mut pool) = POOL.lock() else { return previous };
        pool.sort_by_key(|b| b.capacity);
        let mut held = 0;
        let keep = pool.iter().take_while(|b| {
            held += b.capacity;
            held <= bytes
        });
        let keep = keep.count();
        pool.split_off(keep)
    };
    // Dropped outside the lock; `give_back` sees the new limit and declines them.
    for mut buf in freed {
        // SAFETY: pooled buffers were allocated in `allocate` with this capacity and alignment.
        unsafe { alloc::dealloc(buf.as_mut_ptr(), Layout::from_size_align_unchecked(buf.capacity, ALIGN)) };
        std::mem::forget(buf);
    }
    previous
}

/// Idle buffers and bytes held by the pool.
#[must_use]
pub fn pool_usage() -> (usize, usize) {
    POOL.try_lock().map_or((0, 0), |pool| (pool.len(), pool.iter().map(|b| b.capacity).sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pool is process-wide; tests that look at it serialise on this lock.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [0, 1, 63, 64, 65, 4096, 3 << 20] {
            let mut buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.len(), len);
            buf.as_mut_slice().fill(7);
            assert!(buf.as_mut_slice().iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn large_buffers_are_recycled_and_pool_is_bounded() {
        let _guard = SERIAL.lock().unwrap();
        let previous = set_pool_limit(DEFAULT_POOL_LIMIT);
        let first = AlignedBuf::new(4 << 20).unwrap();
        let addr = first.as_ptr();
        drop(first);
        let second = AlignedBuf::new(4 << 20).unwrap();
        assert_eq!(second.as_ptr(), addr, "a dropped large buffer is reused");
        drop(second);

        set_pool_limit(0);
        assert_eq!(pool_usage(), (0, 0), "a zero limit empties the pool");
        drop(AlignedBuf::new(4 << 20).unwrap());
        assert_eq!(pool_usage(), (0, 0), "a zero limit disables pooling");
        set_pool_limit(previous);
    }

    #[test]
    fn pool_does_not_hand_out_much_larger_buffers() {
        let _guard = SERIAL.lock().unwrap();
        let previous = set_pool_limit(DEFAULT_POOL_LIMIT);
        drop(AlignedBuf::new(16 << 20).unwrap());
        let small = AlignedBuf::new(2 << 20).unwrap();
        assert!(small.capacity < 16 << 20, "a 2 MiB request must not pin a 16 MiB buffer");
        drop(small);
        set_pool_limit(0);
        set_pool_limit(previous);
    }
}
