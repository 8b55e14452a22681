//! The model cache: one loaded model per key per process, shared by every thread.
//!
//! # How it is built, and why
//!
//! The whole cache is one immutable [`Snapshot`] (key hash -> entries) behind an
//! [`arc_swap::ArcSwap`]. A hit loads the snapshot (arc-swap's thread-local debt slots: no lock,
//! no write to a shared reference count), finds the entry, compares the tag and hands out the
//! model. Every change (a load starting, a load finishing, an eviction, `invalidate`, `clear`)
//! builds a new snapshot and publishes it with one compare-and-swap, retrying if another change
//! got there first. Models are few and change rarely, so copying the map on a change costs
//! nothing that matters, and in exchange:
//!
//! - there is no lock anywhere in the map, so there is none for a `fork` to copy while held,
//!   and none under which user code (a key's `==`, a tag's `==`, a model's destructor) could
//!   run and re-enter the cache or wait for the GIL (which is how such caches deadlock);
//! - a model is freed the moment the last snapshot or caller holding it lets go, not at some
//!   later epoch (a concurrent map with deferred reclamation, such as papaya, frees removed
//!   values when its garbage collector gets round to it; GPU memory should not wait for that).
//!
//! Key comparisons happen while reading a snapshot; the publishing compare-and-swap only checks
//! that the snapshot is still the one that was read, and entries are then found again by the
//! identity of their [`Slot`], never by comparing keys.
//!
//! **Single flight.** A miss publishes an entry with a [`Flight`] and runs the loader outside
//! every lock. Threads that miss meanwhile find the flight and block on it (the only blocking
//! in the cache, through [`Waiter::block`], where the bindings release the GIL); they get the
//! loader's model, or its error, straight from the flight. A flight for another tag is waited
//! out too, so one key never loads two versions at once; then the waiter tries again. A failed
//! load leaves no entry behind (or the previous model, if it was a refresh that failed).
//!
//! **Refresh.** A new tag loads beside the old model, which stays in the snapshot (and keeps
//! serving acquires that still ask for its tag) until the new one is published in its place.
//! Callers holding the old model keep it; it is freed when the last of them drops it.
//!
//! **Recency.** Each key has a `last_used` stamp from a per-cache clock. A hit writes only when
//! its key is not the last one stamped, so threads hitting the same hot model write nothing
//! shared; the order is exact for a single thread and approximate under races. Eviction (only
//! when a load finishes over `max_models`) drops the models with the oldest stamps, never one
//! that is being loaded or refreshed.
//!
//! **Fork.** A child process inherits the snapshot, including flights whose loader threads did
//! not survive the fork. A `pthread_atfork` child handler bumps a process-wide fork generation;
//! a flight from an older generation is treated as absent, so the child loads for itself. The
//! only locks (one mutex per flight, for its waiters) are never touched across generations.
//! arc-swap itself takes no locks.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError, Weak};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustc_hash::FxBuildHasher;

use crate::error::CoreError;

/// How long a waiter blocks before it checks [`Waiter::interrupted`] again.
pub const WAIT_SLICE: Duration = Duration::from_millis(50);

/// How a thread waits for another thread's load.
pub trait Waiter<E> {
    /// Runs `wait`, which blocks for at most [`WAIT_SLICE`]. The Python bindings release the
    /// GIL here, since the loader needs it.
    fn block<R: Send>(&self, wait: impl FnOnce() -> R + Send) -> R;

    /// Called between waits; an error stops waiting and is returned by `acquire` (the bindings
    /// run signal handlers here, so Ctrl-C interrupts a waiter).
    fn interrupted(&self) -> Result<(), E> {
        Ok(())
    }
}

/// Waits on the calling thread, with nothing to release and nothing to interrupt it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Blocking;

impl<E> Waiter<E> for Blocking {
    fn block<R: Send>(&self, wait: impl FnOnce() -> R + Send) -> R {
        wait()
    }
}

/// Why `acquire` returned no model.
#[derive(Debug)]
pub enum AcquireError<E> {
    /// The loader failed; every thread that waited for that load gets the same error.
    Load(Arc<E>),
    /// [`Waiter::interrupted`] stopped the wait.
    Interrupted(E),
    /// The cache refused (a loader acquiring its own key).
    Cache(CoreError),
}

/// Counters of a cache, read with [`ModelCache::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CacheStats {
    /// Acquires answered from the cache without waiting.
    pub hits: u64,
    /// Acquires that found no model with their tag (they loaded, or waited for a load).
    pub misses: u64,
    /// Loader calls that returned a model.
    pub loads: u64,
    /// Loader calls that failed.
    pub load_errors: u64,
    /// Seconds spent in loader calls that returned a model.
    pub load_seconds: f64,
    /// Models dropped to keep within `max_models`.
    pub evictions: u64,
    /// Models held now.
    pub models: usize,
}

/// Validates a `max_models` argument: `None` (no bound) or at least 1.
pub fn max_models(bound: Option<i64>) -> Result<Option<NonZeroUsize>, CoreError> {
    bound
        .map(|n| {
            usize::try_from(n).ok().and_then(NonZeroUsize::new).ok_or_else(|| {
                CoreError::InvalidArgument(format!("max_models must be at least 1 (or None for no bound), got {n}"))
            })
        })
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Fork generation

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// The number of `fork`s between the process that started this program and this one.
#[must_use]
pub fn fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Acquire)
}

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add.
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
}

fn watch_forks() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only does an atomic add, which is async-signal-safe
        // and so allowed in a child of a multi-threaded process; handlers are never unregistered
        // and the function is a `'static` item.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Counters

const STRIPES: usize = 16;

/// A counter bumped on the hit path: threads add to their own cache line, and a read sums.
#[derive(Debug, Default)]
struct StripedCounter([Stripe; STRIPES]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

impl StripedCounter {
    fn add_one(&self) {
        let stripe = STRIPE.try_with(|s| *s).unwrap_or(0);
        self.0[stripe].0.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshot

/// A key's place in the cache: shared by every version of its entry until it is removed.
#[derive(Debug)]
struct Slot<K> {
    key: K,
    hash: u64,
    last_used: AtomicU64,
}

/// A loaded model and the tag it was loaded for.
#[derive(Debug)]
struct Ready<T, V> {
    tag: Arc<T>,
    value: V,
}

/// What a finished load left for the threads that waited on it.
#[derive(Debug)]
enum Outcome<T, V, E> {
    Pending,
    Loaded(Arc<Ready<T, V>>),
    Failed(Arc<E>),
    /// The loader panicked; waiters try again.
    Abandoned,
}

impl<T, V, E> Clone for Outcome<T, V, E> {
    fn clone(&self) -> Self {
        match self {
            Self::Pending => Self::Pending,
            Self::Loaded(ready) => Self::Loaded(Arc::clone(ready)),
            Self::Failed(err) => Self::Failed(Arc::clone(err)),
            Self::Abandoned => Self::Abandoned,
        }
    }
}

/// One load in progress, for one key and tag.
#[derive(Debug)]
struct Flight<T, V, E> {
    tag: Arc<T>,
    generation: u64,
    loader: ThreadId,
    outcome: Mutex<Outcome<T, V, E>>,
    done: Condvar,
}

impl<T, V, E> Flight<T, V, E> {
    fn new(tag: Arc<T>, generation: u64) -> Self {
        Self {
            tag,
            generation,
            loader: thread::current().id(),
            outcome: Mutex::new(Outcome::Pending),
            done: Condvar::new(),
        }
    }

    /// Publishes the outcome and wakes the waiters. Nothing but a move happens under the lock.
    fn finish(&self, outcome: Outcome<T, V, E>) {
        if self.generation != fork_generation() {
            // A loader that forked: this child has no waiters on the flight (they treat it as
            // absent), and a parent's waiter may have held its lock at the fork.
            return;
        }
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = outcome;
        self.done.notify_all();
    }

    /// Blocks until the load is over (or the waiter is interrupted).
    fn wait(&self, waiter: &impl Waiter<E>) -> Result<Outcome<T, V, E>, AcquireError<E>>
    where
        T: Send + Sync,
        V: Send + Sync,
        E: Send + Sync,
    {
        loop {
            if let Some(outcome) = waiter.block(|| self.wait_for(WAIT_SLICE)) {
                return Ok(outcome);
            }
            waiter.interrupted().map_err(AcquireError::Interrupted)?;
        }
    }

    /// The outcome, or `None` if the load is still running after `timeout`. Only `Arc`s are
    /// cloned under the lock.
    fn wait_for(&self, timeout: Duration) -> Option<Outcome<T, V, E>> {
        let outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        let (outcome, _) = self
            .done
            .wait_timeout_while(outcome, timeout, |o| matches!(o, Outcome::Pending))
            .unwrap_or_else(PoisonError::into_inner);
        match &*outcome {
            Outcome::Pending => None,
            done => Some(done.clone()),
        }
    }
}

/// One version of a key's entry: its model, its load in progress, or both (a refresh).
#[derive(Debug)]
struct Entry<K, T, V, E> {
    slot: Arc<Slot<K>>,
    ready: Option<Arc<Ready<T, V>>>,
    flight: Option<Arc<Flight<T, V, E>>>,
}

impl<K, T, V, E> Clone for Entry<K, T, V, E> {
    fn clone(&self) -> Self {
        Self { slot: Arc::clone(&self.slot), ready: self.ready.clone(), flight: self.flight.clone() }
    }
}

/// The whole cache at one moment. Never changed once published.
#[derive(Debug)]
struct Snapshot<K, T, V, E> {
    buckets: HashMap<u64, Bucket<K, T, V, E>, FxBuildHasher>,
}

/// The entries whose keys share one hash.
type Bucket<K, T, V, E> = Vec<Entry<K, T, V, E>>;

impl<K, T, V, E> Default for Snapshot<K, T, V, E> {
    fn default() -> Self {
        Self { buckets: HashMap::default() }
    }
}

impl<K: Eq, T, V, E> Snapshot<K, T, V, E> {
    /// The entry whose key equals `key` (this is where keys are compared).
    fn find(&self, hash: u64, key: &K) -> Option<&Entry<K, T, V, E>> {
        self.buckets.get(&hash)?.iter().find(|e| e.slot.key == *key)
    }
}

impl<K, T, V, E> Snapshot<K, T, V, E> {
    /// The entry of `slot`, found by identity.
    fn entry_of(&self, slot: &Arc<Slot<K>>) -> Option<&Entry<K, T, V, E>> {
        self.buckets.get(&slot.hash)?.iter().find(|e| Arc::ptr_eq(&e.slot, slot))
    }

    /// A copy with `slot`'s entry replaced by `entry` (added if absent, removed if `None`).
    fn with(&self, slot: &Arc<Slot<K>>, entry: Option<Entry<K, T, V, E>>) -> Self {
        let mut buckets = self.buckets.clone();
        let bucket = buckets.entry(slot.hash).or_default();
        bucket.retain(|e| !Arc::ptr_eq(&e.slot, slot));
        bucket.extend(entry);
        if bucket.is_empty() {
            buckets.remove(&slot.hash);
        }
        Self { buckets }
    }

    fn entries(&self) -> impl Iterator<Item = &Entry<K, T, V, E>> {
        self.buckets.values().flatten()
    }

    fn models(&self) -> usize {
        self.entries().filter(|e| e.ready.is_some()).count()
    }
}

// ---------------------------------------------------------------------------------------------
// The cache

/// One model per key, shared by every thread of the process. See the module docs.
///
/// `K` is the key (compared with `==` after its hash), `T` the tag a model was loaded for
/// (compared with `==`), `V` the model and `E` a loader's error.
///
/// ```
/// use beam_turbo_core::cache::{Blocking, ModelCache};
///
/// let cache: ModelCache<&str, u32, String, ()> = ModelCache::new(None);
/// let model = cache.acquire("bert", 1, || Ok("loaded".to_string()), &Blocking, String::clone);
/// assert_eq!(model.unwrap(), "loaded");
/// let again = cache.acquire("bert", 1, || unreachable!(), &Blocking, String::clone);
/// assert_eq!(again.unwrap(), "loaded");
/// assert_eq!(cache.stats().hits, 1);
/// ```
#[derive(Debug)]
pub struct ModelCache<K, T, V, E> {
    snapshot: ArcSwap<Snapshot<K, T, V, E>>,
    max_models: Option<NonZeroUsize>,
    /// The recency clock: the latest `last_used` stamp handed out.
    clock: AtomicU64,
    hits: StripedCounter,
    misses: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    load_nanos: AtomicU64,
    evictions: AtomicU64,
}

impl<K, T, V, E> ModelCache<K, T, V, E>
where
    K: Hash + Eq,
    T: PartialEq + Send + Sync,
    V: Send + Sync,
    E: Send + Sync,
{
    /// An empty cache holding at most `max_models` models (`None`: no bound).
    #[must_use]
    pub fn new(max_models: Option<NonZeroUsize>) -> Self {
        watch_forks();
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            max_models,
            clock: AtomicU64::new(0),
            hits: StripedCounter::default(),
            misses: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            load_nanos: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The bound given to [`ModelCache::new`].
    #[must_use]
    pub fn max_models(&self) -> Option<NonZeroUsize> {
        self.max_models
    }

    /// The model for `key` loaded for `tag`, passed through `out`.
    ///
    /// Calls `load` (at most once, on this thread, outside every lock) when the cache holds no
    /// model for `key` or holds one loaded for another tag and no other thread is loading it;
    /// otherwise waits for that thread's load through `waiter`. The loaded model replaces any
    /// model `key` had, unless `invalidate` or `clear` forgot the key meanwhile: then the model
    /// is returned but not kept.
    pub fn acquire<R>(
        &self,
        key: K,
        tag: T,
        load: impl FnOnce() -> Result<V, E>,
        waiter: &impl Waiter<E>,
        out: impl Fn(&V) -> R,
    ) -> Result<R, AcquireError<E>> {
        let hash = FxBuildHasher.hash_one(&key);
        if let Some(found) = self.hit(hash, &key, &tag, &out) {
            self.hits.add_one();
            return Ok(found);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.acquire_slow(
            &Arc::new(Slot { key, hash, last_used: AtomicU64::new(0) }),
            &Arc::new(tag),
            load,
            waiter,
            &out,
        )
    }

    /// The hit path: one snapshot load, no lock, no shared write unless the key was not the
    /// last one stamped.
    fn hit<R>(&self, hash: u64, key: &K, tag: &T, out: &impl Fn(&V) -> R) -> Option<R> {
        let snapshot = self.snapshot.load();
        let entry = snapshot.find(hash, key)?;
        let ready = entry.ready.as_ref()?;
        if *ready.tag != *tag {
            return None;
        }
        self.touch(&entry.slot);
        Some(out(&ready.value))
    }

    fn acquire_slow<R>(
        &self,
        candidate: &Arc<Slot<K>>,
        tag: &Arc<T>,
        load: impl FnOnce() -> Result<V, E>,
        waiter: &impl Waiter<E>,
        out: &impl Fn(&V) -> R,
    ) -> Result<R, AcquireError<E>> {
        loop {
            let generation = fork_generation();
            let snapshot = self.snapshot.load_full();
            let entry = snapshot.find(candidate.hash, &candidate.key).cloned();
            if let Some(entry) = &entry {
                if let Some(ready) = &entry.ready
                    && ready.tag == *tag
                {
                    self.touch(&entry.slot);
                    return Ok(out(&ready.value));
                }
                if let Some(flight) = &entry.flight
                    && flight.generation == generation
                {
                    if flight.loader == thread::current().id() {
                        return Err(AcquireError::Cache(CoreError::ReentrantLoad));
                    }
                    let joins = flight.tag == *tag;
                    let flight = Arc::clone(flight);
                    drop((snapshot, entry));
                    match flight.wait(waiter)? {
                        Outcome::Loaded(ready) if joins => return Ok(out(&ready.value)),
                        Outcome::Failed(err) if joins => return Err(AcquireError::Load(err)),
                        _ => continue,
                    }
                }
            }
            // Nothing loaded for this tag and nobody loading in this process: load it here.
            let slot = entry.as_ref().map_or_else(|| Arc::clone(candidate), |e| Arc::clone(&e.slot));
            let flight = Arc::new(Flight::new(Arc::clone(tag), generation));
            let ready = entry.and_then(|e| e.ready);
            let next =
                snapshot.with(&slot, Some(Entry { slot: Arc::clone(&slot), ready, flight: Some(Arc::clone(&flight)) }));
            if self.publish(&snapshot, next) {
                return self.run_load(LoadGuard { cache: self, slot, flight, settled: false }, load, out);
            }
        }
    }

    fn run_load<R>(
        &self,
        mut guard: LoadGuard<'_, K, T, V, E>,
        load: impl FnOnce() -> Result<V, E>,
        out: &impl Fn(&V) -> R,
    ) -> Result<R, AcquireError<E>> {
        let started = Instant::now();
        let loaded = load();
        let elapsed = started.elapsed();
        match loaded {
            Ok(value) => {
                let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
                self.load_nanos.fetch_add(nanos, Ordering::Relaxed);
                self.loads.fetch_add(1, Ordering::Relaxed);
                let ready = Arc::new(Ready { tag: Arc::clone(&guard.flight.tag), value });
                let model = out(&ready.value);
                guard.settle(Outcome::Loaded(ready));
                Ok(model)
            }
            Err(err) => {
                self.load_errors.fetch_add(1, Ordering::Relaxed);
                let err = Arc::new(err);
                guard.settle(Outcome::Failed(Arc::clone(&err)));
                Err(AcquireError::Load(err))
            }
        }
    }

    /// Publishes what a flight ended with: the new model in place of the old (then evicts over
    /// the bound), or, if it failed, the entry as it was before the load (gone if it had no
    /// model). Does nothing if the entry no longer carries this flight (invalidated, cleared,
    /// or taken over after a fork).
    fn settle(&self, slot: &Arc<Slot<K>>, flight: &Arc<Flight<T, V, E>>, outcome: &Outcome<T, V, E>) {
        loop {
            let snapshot = self.snapshot.load_full();
            let Some(entry) = snapshot.entry_of(slot) else { return };
            if !entry.flight.as_ref().is_some_and(|f| Arc::ptr_eq(f, flight)) {
                return;
            }
            let (next, evicted) = if let Outcome::Loaded(ready) = outcome {
                slot.last_used.fetch_max(self.tick(), Ordering::Relaxed);
                let loaded = Entry { slot: Arc::clone(slot), ready: Some(Arc::clone(ready)), flight: None };
                let mut next = snapshot.with(slot, Some(loaded));
                let evicted = self.evict_over_bound(&mut next, slot);
                (next, evicted)
            } else {
                let before =
                    entry.ready.clone().map(|ready| Entry { slot: Arc::clone(slot), ready: Some(ready), flight: None });
                (snapshot.with(slot, before), 0)
            };
            if self.publish(&snapshot, next) {
                self.evictions.fetch_add(evicted, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Drops the least recently used models of `next` (never `keep`, never one being loaded)
    /// until it is within the bound; returns how many it dropped.
    fn evict_over_bound(&self, next: &mut Snapshot<K, T, V, E>, keep: &Arc<Slot<K>>) -> u64 {
        let Some(bound) = self.max_models else { return 0 };
        let mut evicted = 0;
        while next.models() > bound.get() {
            let oldest = next
                .entries()
                .filter(|e| e.ready.is_some() && e.flight.is_none() && !Arc::ptr_eq(&e.slot, keep))
                .min_by_key(|e| e.slot.last_used.load(Ordering::Relaxed))
                .map(|e| Arc::clone(&e.slot));
            let Some(oldest) = oldest else { break };
            *next = next.with(&oldest, None);
            evicted += 1;
        }
        evicted
    }

    /// Publishes `next` if the cache still is `current`.
    fn publish(&self, current: &Arc<Snapshot<K, T, V, E>>, next: Snapshot<K, T, V, E>) -> bool {
        let previous = self.snapshot.compare_and_swap(current, Arc::new(next));
        Arc::ptr_eq(&previous, current)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Marks `slot` used now. Writes only if another key was stamped since `slot` last was.
    fn touch(&self, slot: &Slot<K>) {
        if slot.last_used.load(Ordering::Relaxed) < self.clock.load(Ordering::Relaxed) {
            slot.last_used.fetch_max(self.tick(), Ordering::Relaxed);
        }
    }

    /// Forgets `key`'s model (and any load of it in progress, whose result is then returned to
    /// its callers but not kept). True if there was anything to forget.
    pub fn invalidate(&self, key: &K) -> bool {
        let hash = FxBuildHasher.hash_one(key);
        loop {
            let snapshot = self.snapshot.load_full();
            let Some(entry) = snapshot.find(hash, key) else { return false };
            let next = snapshot.with(&Arc::clone(&entry.slot), None);
            if self.publish(&snapshot, next) {
                return true;
            }
        }
    }

    /// Forgets every model (loads in progress finish for their callers but are not kept).
    pub fn clear(&self) {
        drop(self.snapshot.swap(Arc::new(Snapshot::default())));
    }

    /// The counters, and the number of models held now.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.sum(),
            misses: self.misses.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
            load_errors: self.load_errors.load(Ordering::Relaxed),
            load_seconds: Duration::from_nanos(self.load_nanos.load(Ordering::Relaxed)).as_secs_f64(),
            evictions: self.evictions.load(Ordering::Relaxed),
            models: self.snapshot.load().models(),
        }
    }
}

/// The loader's side of a flight: settles it exactly once, even if the loader panics (then the
/// entry is put back as it was and the waiters try again).
struct LoadGuard<'c, K, T, V, E>
where
    K: Hash + Eq,
    T: PartialEq + Send + Sync,
    V: Send + Sync,
    E: Send + Sync,
{
    cache: &'c ModelCache<K, T, V, E>,
    slot: Arc<Slot<K>>,
    flight: Arc<Flight<T, V, E>>,
    settled: bool,
}

impl<K, T, V, E> LoadGuard<'_, K, T, V, E>
where
    K: Hash + Eq,
    T: PartialEq + Send + Sync,
    V: Send + Sync,
    E: Send + Sync,
{
    /// The snapshot first, then the waiters: a woken waiter that tries again sees the result.
    fn settle(&mut self, outcome: Outcome<T, V, E>) {
        self.settled = true;
        self.cache.settle(&self.slot, &self.flight, &outcome);
        self.flight.finish(outcome);
    }
}

impl<K, T, V, E> Drop for LoadGuard<'_, K, T, V, E>
where
    K: Hash + Eq,
    T: PartialEq + Send + Sync,
    V: Send + Sync,
    E: Send + Sync,
{
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Outcome::Abandoned);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// References that survive pickling

/// A new identity for a cache, unique across processes and machines (with overwhelming
/// probability), so that a reference to it made in one process names one cache in another.
#[must_use]
pub fn new_cache_id() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = (std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed), thread::current().id());
    // Each RandomState has its own random keys (seeded from the OS once per thread).
    let high = RandomState::new().hash_one(seed);
    let low = RandomState::new().hash_one(seed);
    (u128::from(high) << 64) | u128::from(low)
}

/// How the registry holds a cache.
#[derive(Debug)]
enum Held<C> {
    /// Made here: alive as long as its owners keep it.
    Owned(Weak<C>),
    /// Made by resolving a reference from another process: alive for the rest of this one,
    /// as a worker expects a model to survive between bundles.
    Resolved(Arc<C>),
}

impl<C> Held<C> {
    fn get(&self) -> Option<Arc<C>> {
        match self {
            Self::Owned(weak) => weak.upgrade(),
            Self::Resolved(cache) => Some(Arc::clone(cache)),
        }
    }
}

impl<C> Clone for Held<C> {
    fn clone(&self) -> Self {
        match self {
            Self::Owned(weak) => Self::Owned(Weak::clone(weak)),
            Self::Resolved(cache) => Self::Resolved(Arc::clone(cache)),
        }
    }
}

/// The caches of this process by identity, so that a reference (an id) resolves to the same
/// cache everywhere in a process. Lock-free like the cache, so a fork cannot leave it locked.
#[derive(Debug)]
pub struct Registry<C> {
    held: ArcSwapOption<Vec<(u128, Held<C>)>>,
}

impl<C> Default for Registry<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> Registry<C> {
    #[must_use]
    pub const fn new() -> Self {
        Self { held: ArcSwapOption::const_empty() }
    }

    /// Records a cache made in this process, without keeping it alive.
    pub fn register(&self, id: u128, cache: &Arc<C>) {
        self.update(|held| held.push((id, Held::Owned(Arc::downgrade(cache)))));
    }

    /// The live cache called `id` in this process, or one made now by `make` and kept for the
    /// life of the process.
    pub fn resolve(&self, id: u128, make: impl FnOnce() -> C) -> Arc<C> {
        if let Some(found) = self.find(id) {
            return found;
        }
        let fresh = Arc::new(make());
        let mut winner = None;
        self.update(|held| {
            winner = held.iter().find(|(i, _)| *i == id).and_then(|(_, h)| h.get());
            if winner.is_none() {
                held.retain(|(i, _)| *i != id);
                held.push((id, Held::Resolved(Arc::clone(&fresh))));
            }
        });
        winner.unwrap_or(fresh)
    }

    fn find(&self, id: u128) -> Option<Arc<C>> {
        let held = self.held.load();
        held.as_ref()?.iter().find(|(i, _)| *i == id).and_then(|(_, h)| h.get())
    }

    /// Applies `change` to a copy of the list (without the dead entries) and publishes it.
    fn update(&self, mut change: impl FnMut(&mut Vec<(u128, Held<C>)>)) {
        self.held.rcu(|current| {
            let mut next: Vec<_> =
                current.iter().flat_map(|held| held.iter()).filter(|(_, h)| h.get().is_some()).cloned().collect();
            change(&mut next);
            Some(Arc::new(next))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    type Cache = ModelCache<String, u32, Arc<String>, String>;
    type Acquired = Result<Arc<String>, AcquireError<String>>;

    /// A thread loading with a loader that blocks: `started` says it is loading, `go` ends it.
    struct Gated {
        handle: thread::JoinHandle<Acquired>,
        go: mpsc::Sender<Result<(), String>>,
        started: mpsc::Receiver<()>,
    }

    fn cache(bound: Option<usize>) -> Cache {
        ModelCache::new(bound.map(|b| NonZeroUsize::new(b).unwrap()))
    }

    fn get(cache: &Cache, key: &str, tag: u32, loads: &AtomicUsize) -> Acquired {
        cache.acquire(
            key.to_string(),
            tag,
            || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(format!("{key}@{tag}")))
            },
            &Blocking,
            Arc::clone,
        )
    }

    fn fail(cache: &Cache, key: &str) -> Acquired {
        cache.acquire(key.to_string(), 0, || Err(format!("no {key}")), &Blocking, Arc::clone)
    }

    #[test]
    fn loads_once_then_hits() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        assert_eq!(*get(&cache, "a", 1, &loads).unwrap(), "a@1");
        assert_eq!(*get(&cache, "a", 1, &loads).unwrap(), "a@1");
        assert_eq!(*get(&cache, "b", 1, &loads).unwrap(), "b@1");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.loads, stats.models), (1, 2, 2, 2));
        assert!(stats.load_seconds >= 0.0);
    }

    #[test]
    fn a_new_tag_reloads_and_old_holders_keep_their_model() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        let old = get(&cache, "a", 1, &loads).unwrap();
        let weak_old = Arc::downgrade(&old);
        let new = get(&cache, "a", 2, &loads).unwrap();
        assert_eq!((old.as_str(), new.as_str()), ("a@1", "a@2"));
        assert_eq!(cache.stats().models, 1);
        assert!(weak_old.upgrade().is_some(), "a holder keeps the old model");
        drop(old);
        assert!(weak_old.upgrade().is_none(), "the old model is freed once nobody holds it");
        assert_eq!(*get(&cache, "a", 2, &loads).unwrap(), "a@2");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_load_leaves_no_entry_and_the_next_acquire_retries() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        match fail(&cache, "a") {
            Err(AcquireError::Load(err)) => assert_eq!(*err, "no a"),
            other => panic!("expected the loader's error, got {other:?}"),
        }
        let stats = cache.stats();
        assert_eq!((stats.models, stats.load_errors, stats.loads), (0, 1, 0));
        assert!(cache.snapshot.load().buckets.is_empty(), "no entry left behind");
        assert_eq!(*get(&cache, "a", 0, &loads).unwrap(), "a@0");
    }

    #[test]
    fn a_failed_refresh_keeps_the_previous_model() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        get(&cache, "a", 0, &loads).unwrap();
        let refresh = cache.acquire("a".into(), 1, || Err("bad".into()), &Blocking, Arc::clone);
        assert!(matches!(refresh, Err(AcquireError::Load(_))));
        assert_eq!(*get(&cache, "a", 0, &loads).unwrap(), "a@0");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn lru_bound_evicts_the_least_recently_used_and_frees_it() {
        let (cache, loads) = (cache(Some(2)), AtomicUsize::new(0));
        let a = Arc::downgrade(&get(&cache, "a", 0, &loads).unwrap());
        let b = Arc::downgrade(&get(&cache, "b", 0, &loads).unwrap());
        get(&cache, "a", 0, &loads).unwrap(); // a is now more recent than b
        get(&cache, "c", 0, &loads).unwrap();
        assert!(b.upgrade().is_none(), "b was least recently used: evicted and freed");
        assert!(a.upgrade().is_some());
        let stats = cache.stats();
        assert_eq!((stats.models, stats.evictions), (2, 1));
        get(&cache, "a", 0, &loads).unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 3, "a stayed cached");
    }

    #[test]
    fn invalidate_and_clear_forget_models() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        let a = Arc::downgrade(&get(&cache, "a", 0, &loads).unwrap());
        get(&cache, "b", 0, &loads).unwrap();
        assert!(cache.invalidate(&"a".to_string()));
        assert!(!cache.invalidate(&"a".to_string()));
        assert!(a.upgrade().is_none());
        assert_eq!(cache.stats().models, 1);
        cache.clear();
        assert_eq!(cache.stats().models, 0);
        get(&cache, "b", 0, &loads).unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn hot_hits_write_no_recency() {
        let (cache, loads) = (cache(None), AtomicUsize::new(0));
        get(&cache, "a", 0, &loads).unwrap();
        let clock = cache.clock.load(Ordering::SeqCst);
        for _ in 0..100 {
            get(&cache, "a", 0, &loads).unwrap();
        }
        assert_eq!(cache.clock.load(Ordering::SeqCst), clock, "repeated hits on one key stamp nothing");
        get(&cache, "b", 0, &loads).unwrap();
        get(&cache, "a", 0, &loads).unwrap();
        assert!(cache.clock.load(Ordering::SeqCst) > clock + 1, "switching keys stamps");
    }

    fn gated(cache: &Arc<Cache>, key: &'static str, tag: u32) -> Gated {
        let (go, wait_go) = mpsc::channel::<Result<(), String>>();
        let (started, wait_started) = mpsc::channel();
        let cache = Arc::clone(cache);
        let handle = thread::spawn(move || {
            cache.acquire(
                key.to_string(),
                tag,
                || {
                    started.send(()).unwrap();
                    wait_go.recv().unwrap()?;
                    Ok(Arc::new(format!("{key}@{tag}")))
                },
                &Blocking,
                Arc::clone,
            )
        });
        Gated { handle, go, started: wait_started }
    }

    #[test]
    fn racing_threads_load_once_and_all_get_the_model() {
        let cache = Arc::new(cache(None));
        let loads = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, loads, barrier) = (Arc::clone(&cache), Arc::clone(&loads), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    cache
                        .acquire(
                            "k".to_string(),
                            0,
                            || {
                                loads.fetch_add(1, Ordering::SeqCst);
                                thread::sleep(Duration::from_millis(50));
                                Ok(Arc::new("model".to_string()))
                            },
                            &Blocking,
                            Arc::clone,
                        )
                        .unwrap()
                })
            })
            .collect();
        let models: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])), "every thread got the one model");
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 8);
        assert_eq!(stats.loads, 1);
    }

    #[test]
    fn waiters_get_the_loaders_error_and_no_entry_is_left() {
        let cache = Arc::new(cache(None));
        let Gated { handle: loader, go, started } = gated(&cache, "k", 0);
        started.recv().unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let cache = Arc::clone(&cache);
                thread::spawn(move || {
                    cache.acquire("k".into(), 0, || Ok(Arc::new("other".into())), &Blocking, Arc::clone)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        go.send(Err("boom".into())).unwrap();
        assert!(matches!(loader.join().unwrap(), Err(AcquireError::Load(e)) if *e == "boom"));
        for waiter in waiters {
            match waiter.join().unwrap() {
                Err(AcquireError::Load(e)) => assert_eq!(*e, "boom"),
                // A waiter that came after the failure loads for itself.
                Ok(model) => assert_eq!(*model, "other"),
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(cache.stats().load_errors, 1);
    }

    #[test]
    fn a_waiter_for_another_tag_waits_then_loads_its_own() {
        let cache = Arc::new(cache(None));
        let Gated { handle: loader, go, started } = gated(&cache, "k", 1);
        started.recv().unwrap();
        let other = {
            let cache = Arc::clone(&cache);
            thread::spawn(move || cache.acquire("k".into(), 2, || Ok(Arc::new("k@2".into())), &Blocking, Arc::clone))
        };
        thread::sleep(Duration::from_millis(30));
        go.send(Ok(())).unwrap();
        assert_eq!(*loader.join().unwrap().unwrap(), "k@1");
        assert_eq!(*other.join().unwrap().unwrap(), "k@2");
        assert_eq!(cache.stats().loads, 2);
    }

    #[test]
    fn the_old_model_serves_its_tag_while_a_refresh_loads() {
        let cache = Arc::new(cache(None));
        let loads = AtomicUsize::new(0);
        get(&cache, "k", 0, &loads).unwrap();
        let Gated { handle: loader, go, started } = gated(&cache, "k", 1);
        started.recv().unwrap();
        assert_eq!(*get(&cache, "k", 0, &loads).unwrap(), "k@0", "no wait for the old tag");
        go.send(Ok(())).unwrap();
        assert_eq!(*loader.join().unwrap().unwrap(), "k@1");
        assert_eq!(cache.stats().models, 1);
    }

    #[test]
    fn invalidate_during_a_load_returns_the_model_but_does_not_keep_it() {
        let cache = Arc::new(cache(None));
        let Gated { handle: loader, go, started } = gated(&cache, "k", 0);
        started.recv().unwrap();
        assert!(cache.invalidate(&"k".to_string()));
        go.send(Ok(())).unwrap();
        assert_eq!(*loader.join().unwrap().unwrap(), "k@0");
        assert_eq!(cache.stats().models, 0);
    }

    #[test]
    fn a_loader_acquiring_its_own_key_is_refused() {
        let cache = cache(None);
        let inner = cache.acquire(
            "k".to_string(),
            0,
            || match cache.acquire("k".into(), 0, || Ok(Arc::new(String::new())), &Blocking, Arc::clone) {
                Err(AcquireError::Cache(CoreError::ReentrantLoad)) => Ok(Arc::new("refused".into())),
                other => Err(format!("{other:?}")),
            },
            &Blocking,
            Arc::clone,
        );
        assert_eq!(*inner.unwrap(), "refused");
    }

    #[test]
    fn a_panicking_loader_lets_waiters_load() {
        let cache = Arc::new(cache(None));
        let barrier = Arc::new(Barrier::new(2));
        let panicker = {
            let (cache, barrier) = (Arc::clone(&cache), Arc::clone(&barrier));
            thread::spawn(move || {
                let _ = cache.acquire(
                    "k".to_string(),
                    0,
                    || -> Result<Arc<String>, String> {
                        barrier.wait();
                        thread::sleep(Duration::from_millis(30));
                        panic!("loader panicked")
                    },
                    &Blocking,
                    Arc::clone,
                );
            })
        };
        barrier.wait();
        let loads = AtomicUsize::new(0);
        assert_eq!(*get(&cache, "k", 0, &loads).unwrap(), "k@0");
        assert!(panicker.join().is_err());
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    /// Interrupts every wait: the waiter gives up with the interrupt's error.
    struct Impatient;
    impl Waiter<String> for Impatient {
        fn block<R: Send>(&self, wait: impl FnOnce() -> R + Send) -> R {
            wait()
        }
        fn interrupted(&self) -> Result<(), String> {
            Err("interrupted".into())
        }
    }

    #[test]
    fn an_interrupted_waiter_returns_the_interrupt() {
        let cache = Arc::new(cache(None));
        let Gated { handle: loader, go, started } = gated(&cache, "k", 0);
        started.recv().unwrap();
        let waited = cache.acquire("k".into(), 0, || Ok(Arc::new(String::new())), &Impatient, Arc::clone);
        assert!(matches!(waited, Err(AcquireError::Interrupted(e)) if e == "interrupted"));
        go.send(Ok(())).unwrap();
        loader.join().unwrap().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_forked_child_loads_although_the_parent_was_loading() {
        let cache = Arc::new(cache(None));
        let loads = AtomicUsize::new(0);
        get(&cache, "warm", 0, &loads).unwrap();
        let Gated { handle: loader, go, started } = gated(&cache, "k", 0);
        started.recv().unwrap();
        // SAFETY: the child only uses the cache (allocation is fork-safe with glibc) and leaves
        // with `_exit`, never returning into the test harness; `alarm` ends it if it hangs.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: alarm and _exit are async-signal-safe.
            unsafe { libc::alarm(10) };
            let loads = AtomicUsize::new(0);
            let ok = get(&cache, "k", 0, &loads).is_ok_and(|m| *m == "k@0")
                && get(&cache, "warm", 0, &loads).is_ok()
                && loads.load(Ordering::SeqCst) == 1;
            // SAFETY: leaves the child at once, without running the parent's atexit handlers.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we just forked; `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert_eq!(waited, pid);
        go.send(Ok(())).unwrap();
        loader.join().unwrap().unwrap();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: status {status}");
    }

    #[test]
    fn many_threads_stress_keeps_every_answer_right() {
        let cache = Arc::new(cache(Some(3)));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..12u32)
            .map(|t| {
                let (cache, stop) = (Arc::clone(&cache), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut acquires = 0u64;
                    let mut n = u64::from(t) * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        let key = format!("k{}", (n >> 33) % 6);
                        let tag = ((n >> 40) % 2) as u32;
                        match (n >> 50) % 50 {
                            0 => {
                                cache.invalidate(&key);
                            }
                            1 => cache.clear(),
                            2 => {
                                // Its own tag, so that good loads never join it (joiners rightly get its error).
                                let _ = cache.acquire(key, 9, || Err("flaky".into()), &Blocking, Arc::clone);
                                acquires += 1;
                            }
                            _ => {
                                let expected = format!("{key}@{tag}");
                                let model = cache
                                    .acquire(key, tag, || Ok(Arc::new(expected.clone())), &Blocking, Arc::clone)
                                    .unwrap();
                                assert_eq!(*model, expected);
                                acquires += 1;
                            }
                        }
                    }
                    acquires
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let acquires: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, acquires);
        assert!(stats.models <= 3, "{stats:?}");
    }

    #[test]
    fn max_models_is_validated() {
        assert_eq!(max_models(None).unwrap(), None);
        assert_eq!(max_models(Some(2)).unwrap(), NonZeroUsize::new(2));
        for bad in [0, -1] {
            let err = max_models(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("max_models must be at least 1"), "{err}");
        }
    }

    #[test]
    fn registry_resolves_one_cache_per_id() {
        let registry: Registry<Cache> = Registry::new();
        let local = Arc::new(cache(None));
        registry.register(1, &local);
        assert!(Arc::ptr_eq(&registry.resolve(1, || cache(None)), &local));
        let remote = registry.resolve(2, || cache(None));
        assert!(Arc::ptr_eq(&registry.resolve(2, || cache(None)), &remote));
        let weak_remote = Arc::downgrade(&remote);
        drop(remote);
        assert!(weak_remote.upgrade().is_some(), "a resolved cache lives on in the registry");
        let weak_local = Arc::downgrade(&local);
        drop(local);
        assert!(weak_local.upgrade().is_none(), "a local cache dies with its owners");
        let fresh = registry.resolve(1, || cache(Some(1)));
        assert_eq!(fresh.max_models(), NonZeroUsize::new(1));
        assert_ne!(new_cache_id(), new_cache_id());
    }
}
