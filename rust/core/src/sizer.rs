//! Adaptive batch sizing: the timings of finished batches in, the size of the next batch out.
//!
//! [`BatchSizer`] takes the targets of Beam's `_BatchSizeEstimator` (a bound on the share of a
//! batch's time spent on its fixed cost, bounds on a batch's duration, a maximum size) and
//! models a batch of `n` elements as taking `a + b*n` seconds. Where Beam doubles from the
//! minimum and then jitters by +/-`variance` forever to keep its regression fed, this sizer
//! explores only while it has to, then holds one size.
//!
//! # Why it converges fast
//!
//! * **A relative fit, with a knee.** Observations are merged into bins of nearly equal size
//!   (5% apart in log size), each keeping its mean size, its mean time and a count capped at 16
//!   (so a bin follows drifting costs). The line `a + b*n` is fitted by least squares weighted
//!   by `count / time^2`, that is on relative errors, which is what timing noise is: a small
//!   batch then informs `a` as much as a large one informs `b`. Where the costs bend (flat up to
//!   a GPU's width, then linear) and a line in `max(n, knee)` leaves less than a tenth of one
//!   plain line's misfit, that model is used: the target comes from the costs where the batches
//!   will run, and the many flat bins pin the line down where it starts to rise.
//! * **Growth bounded by extrapolation, not by habit.** The next size is the fitted target,
//!   but never more than 4 times the largest size measured so far: far enough to reach 10,000
//!   from 1 in 8 batches, near enough that the fit is trusted only a little beyond its data.
//! * **Hold, don't jitter.** Once the target is within reach, the sizer holds it, and moves
//!   only when the fitted target leaves a band around the size held: 8%, or twice the
//!   target's standard error (from the bins' spread around the fit, up to 30%) where timings
//!   are noisy, so that noise in the estimate does not move the size. The bins at the
//!   sizes measured while growing keep the fit anchored, so no jitter is needed to keep it
//!   well posed. The price: the fixed cost is learned from the growth phase's small batches
//!   and is not refined later, so under heavy timing noise (tens of percent) an interior
//!   target (not capped by `max_batch_size`) is held where that first estimate puts it.
//!
//! # How cost changes are detected
//!
//! While holding, each batch's time is compared with the fit's prediction, as a log ratio
//! divided by the running noise level (at least 2%). A two-sided CUSUM (drift 0.5, threshold
//! 8, each step clipped to +/-4 so that one outlier alone never triggers) accumulates the
//! evidence; a swapped model or a slower machine moves every batch the same way and crosses
//! the threshold within two or three batches, while the noise of a steady workload takes
//! thousands of batches to. On a change the sizer forgets its bins but the last one, measures
//! a quarter, a sixteenth and a 64th of the held size (small batches that pin the new fixed
//! cost down and cost little) and goes straight to the new target.
//!
//! # How the memory ceiling works
//!
//! A memory failure at size `f` sets the ceiling to `f` (or lowers it): no later proposal is
//! at or above it. Between the largest size that succeeded below the ceiling and the ceiling
//! itself the sizer searches by halving the gap in log size, one probe per batch, until the
//! two are within 25%; it then holds the largest size that succeeded. (Growth by at most 4x
//! puts the first failure within 4x of the limit, so this takes at most three probes: from
//! one failure in all, when the limit is just below a growth step, to four, when it is just
//! above one.) A success below the ceiling raises that floor; a memory failure at a size
//! that succeeded before (memory taken by something else) restarts the search from half of
//! it. The ceiling itself is tried again only after a quiet period of successes: 1,000 batches
//! after the latest memory failure, doubling with each memory failure, so retries cost at
//! most a failure per thousand batches. A success there lifts the ceiling (the memory had been
//! held by something transient) and growth resumes. A failure that is not for memory counts in
//! `failures` and changes nothing else.
//!
//! # Pickling
//!
//! Beam's streaming batching keeps its estimator in state with a pickle coder and writes it
//! after every batch, so [`BatchSizer::to_bytes`] is a compact fixed layout of a few hundred
//! bytes, and [`BatchSizer::from_bytes`] restores everything the sizer learned.

use crate::error::CoreError;

/// Growth beyond the largest size measured so far is at most this factor.
pub const GROWTH: f64 = 4.0;
/// Width of a bin, in natural log of the batch size (5%).
const BIN_WIDTH: f64 = 0.05;
/// At most this many bins are kept; the least recently updated one makes room.
const MAX_BINS: usize = 24;
/// A bin's count stops growing here, so its mean follows costs that drift.
const BIN_COUNT_CAP: f64 = 16.0;
/// A knee is believed when it leaves less than this share of a single line's misfit.
const KNEE_GAIN: f64 = 0.1;
/// The held size moves only when the target leaves this band (log ratio)...
const HOLD_BAND: f64 = 0.08;
/// ...or twice the target's standard error, up to this.
const MAX_HOLD_BAND: f64 = 0.3;
/// The noise level assumed before any residual is seen, and its weight in pseudo-observations.
const NOISE_PRIOR: f64 = 0.25;
/// Noise below this (relative) is taken as this, so that float rounding is no evidence.
const NOISE_FLOOR: f64 = 0.02;
/// Residuals averaged plainly before the noise level becomes a moving average.
const NOISE_WARMUP: f64 = 32.0;
/// CUSUM drift, threshold and per-step clip, in units of the noise level.
const CUSUM_DRIFT: f64 = 0.5;
const CUSUM_THRESHOLD: f64 = 8.0;
const CUSUM_CLIP: f64 = 4.0;
/// Batches measured after a cost change, at a quarter, a sixteenth and a 64th of the held
/// size: small batches pin the new fixed cost down, and cost little.
const RELEARN_PROBES: usize = 3;
/// The memory search stops when the ceiling is within this factor of the largest success.
const MEMORY_RESOLUTION: f64 = 1.25;
/// Successes after a memory failure before the ceiling is probed again (doubling per failure).
const RETRY_AFTER: u64 = 1000;
/// Timings shorter than this (a coarse clock) count as this long.
const MIN_SECS: f64 = 1e-9;

/// The targets, with Beam's `_BatchSizeEstimator` arguments and defaults.
///
/// As in Beam, a target of `Some(0.0)` is the same as `None` (not used).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub min_batch_size: i64,
    pub max_batch_size: i64,
    pub target_batch_overhead: Option<f64>,
    pub target_batch_duration_secs: Option<f64>,
    pub target_batch_duration_secs_including_fixed_cost: Option<f64>,
    /// Beam's jitter width. Accepted and kept for compatibility; this sizer does not jitter.
    pub variance: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_batch_size: 1,
            max_batch_size: 10_000,
            target_batch_overhead: Some(0.05),
            target_batch_duration_secs: Some(10.0),
            target_batch_duration_secs_including_fixed_cost: None,
            variance: 0.25,
        }
    }
}

/// Formats a float as Python's `%s` does (`2.0`, `0.5`, `1e-05`, `nan`, `inf`).
fn py_float(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf".into() } else { "-inf".into() }
    } else if v != 0.0 && (v.abs() < 1e-4 || v.abs() >= 1e16) {
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        format!("{mantissa}e{sign}{digits:0>2}")
    } else if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

impl Config {
    /// Checks the arguments as Beam does, with Beam's messages; a target of 0 becomes `None`.
    fn validated(self) -> Result<Self, CoreError> {
        let invalid = |msg: String| Err(CoreError::InvalidArgument(msg));
        if self.min_batch_size > self.max_batch_size {
            return invalid(format!(
                "Minimum ({}) must not be greater than maximum ({})",
                self.min_batch_size, self.max_batch_size
            ));
        }
        if self.min_batch_size < 0 {
            return invalid(format!("min_batch_size ({}) must not be negative", self.min_batch_size));
        }
        if self.max_batch_size < 1 {
            return invalid(format!("max_batch_size ({}) must be at least 1", self.max_batch_size));
        }
        // Beam tests truthiness: 0 (and None) switch a target off.
        let on = |t: Option<f64>| t.filter(|&v| v != 0.0);
        let overhead = on(self.target_batch_overhead);
        let duration = on(self.target_batch_duration_secs);
        let including = on(self.target_batch_duration_secs_including_fixed_cost);
        if let Some(v) = overhead
            && !(v > 0.0 && v <= 1.0)
        {
            return invalid(format!("target_batch_overhead ({}) must be between 0 and 1", py_float(v)));
        }
        if let Some(v) = duration
            && !(v > 0.0 && v.is_finite())
        {
            return invalid(format!("target_batch_duration_secs ({}) must be positive", py_float(v)));
        }
        if let Some(v) = including
            && !(v > 0.0 && v.is_finite())
        {
            return invalid(format!(
                "target_batch_duration_secs_including_fixed_cost ({}) must be positive",
                py_float(v)
            ));
        }
        if overhead.is_none() && duration.is_none() && including.is_none() {
            return invalid(
                "At least one of target_batch_overhead or target_batch_duration_secs or \
                 target_batch_duration_secs_including_fixed_cost must be positive."
                    .into(),
            );
        }
        if !self.variance.is_finite() {
            return invalid(format!("variance ({}) must be a finite number", py_float(self.variance)));
        }
        Ok(Self {
            target_batch_overhead: overhead,
            target_batch_duration_secs: duration,
            target_batch_duration_secs_including_fixed_cost: including,
            ..self
        })
    }

    fn min(&self) -> u64 {
        self.min_batch_size.max(1) as u64
    }

    fn max(&self) -> u64 {
        self.max_batch_size as u64
    }

    /// The size the targets give for fixed cost `a` and per-element cost `b`, in `[min, max]`.
    #[must_use]
    pub fn target_size(&self, a: f64, b: f64) -> u64 {
        // A hair of slack so that an exact 19.0 computed as 18.999999 stays 19.
        let size = (self.target(a, b) * (1.0 + 1e-9)).floor();
        if size.is_nan() { self.min() } else { (size.max(0.0) as u64).clamp(self.min(), self.max()) }
    }

    /// The target size as a real number, at most `max_batch_size` (possibly below the minimum).
    fn target(&self, a: f64, b: f64) -> f64 {
        let mut target = self.max() as f64;
        if b > 0.0 {
            if let Some(d) = self.target_batch_duration_secs_including_fixed_cost {
                target = target.min((d - a) / b);
            }
            if let Some(d) = self.target_batch_duration_secs {
                target = target.min(d / b);
            }
            if let Some(o) = self.target_batch_overhead {
                target = target.min(a / b * (1.0 / o - 1.0));
            }
        } else if let Some(d) = self.target_batch_duration_secs_including_fixed_cost
            && a >= d
        {
            target = 0.0;
        }
        target
    }

    /// The relative standard error of the target given `fit` over `bins`, from the spread of
    /// the bins around the fit (delta method); 0 when the fit is exact or the target is capped.
    fn target_uncertainty(&self, bins: &[&Bin], fit: Fit) -> f64 {
        let params = if fit.knee > 0.0 { 3.0 } else { 2.0 };
        let dof = bins.len() as f64 - params;
        let target = self.target(fit.fixed, fit.per_element);
        if dof < 1.0 || target <= 0.0 || fit.per_element <= 0.0 {
            return 0.0;
        }
        let noise = misfit(bins, fit) / dof;
        let (mut sw, mut sx, mut sxx) = (0.0, 0.0, 0.0);
        for bin in bins {
            let w = bin.count / (bin.secs * bin.secs);
            let x = bin.size.max(fit.knee);
            sw += w;
            sx += w * x;
            sxx += w * x * x;
        }
        let det = sw * sxx - sx * sx;
        if det <= 0.0 {
            return 0.0;
        }
        let (var_a, var_b, cov) = (noise * sxx / det, noise * sw / det, -noise * sx / det);
        let (ha, hb) = (1e-6 * fit.fixed.max(1e-12), 1e-6 * fit.per_element);
        let da =
            (self.target(fit.fixed + ha, fit.per_element) - self.target(fit.fixed - ha, fit.per_element)) / (2.0 * ha);
        let db =
            (self.target(fit.fixed, fit.per_element + hb) - self.target(fit.fixed, fit.per_element - hb)) / (2.0 * hb);
        let var = da * da * var_a + db * db * var_b + 2.0 * da * db * cov;
        if var.is_finite() && var > 0.0 { var.sqrt() / target } else { 0.0 }
    }
}

/// Batches of nearly one size: their mean size and time, and how many (capped).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bin {
    size: f64,
    secs: f64,
    count: f64,
    /// The batch count when this bin was last updated (for eviction).
    touched: u64,
}

/// A fitted `secs = fixed + per_element * max(size, knee)`: linear, or flat below a knee
/// (a device that costs the same until its width is used).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub fixed: f64,
    pub per_element: f64,
    /// Batches smaller than this cost as much as this many (0: a plain line).
    pub knee: f64,
}

impl Fit {
    fn predict(&self, size: f64) -> f64 {
        self.fixed + self.per_element * size.max(self.knee)
    }
}

/// Least squares on relative errors over `bins`, of a line in `max(size, knee)`; `None` with
/// fewer than two distinct such sizes.
fn fit(bins: &[&Bin], knee: f64) -> Option<Fit> {
    let (mut sw, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for bin in bins {
        let w = bin.count / (bin.secs * bin.secs);
        let x = bin.size.max(knee);
        sw += w;
        sx += w * x;
        sy += w * bin.secs;
        sxx += w * x * x;
        sxy += w * x * bin.secs;
    }
    let (mx, my) = (sx / sw, sy / sw);
    let var = sxx / sw - mx * mx;
    if bins.len() < 2 || var.is_nan() || var <= 1e-12 * mx * mx {
        return None;
    }
    let per_element = (sxy / sw - mx * my) / var;
    let fixed = my - per_element * mx;
    let found = if per_element <= 0.0 {
        // Time does not grow with size (noise, or a device not yet full): all fixed cost.
        Fit { fixed: my, per_element: 0.0, knee }
    } else if fixed < 0.0 {
        Fit { fixed: 0.0, per_element: sxy / sxx, knee }
    } else {
        Fit { fixed, per_element, knee }
    };
    (found.fixed.is_finite() && found.per_element.is_finite()).then_some(found)
}

/// Count-weighted sum of squared log residuals of `bins` from `line`.
fn misfit(bins: &[&Bin], line: Fit) -> f64 {
    bins.iter()
        .map(|b| {
            let predicted = line.predict(b.size).max(MIN_SECS);
            b.count * (b.secs / predicted).ln().powi(2)
        })
        .sum()
}

/// What the sizer knows about memory: the ceiling and the search below it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Memory {
    /// The smallest size that failed for memory; no proposal reaches it.
    ceiling: Option<u64>,
    /// The largest size that succeeded below the ceiling (0: none yet).
    safe: u64,
    /// Successes since the latest memory failure or retry probe.
    quiet: u64,
    /// Memory failures so far (sets the quiet period before a retry).
    failures: u32,
}

impl Memory {
    fn retry_due(&self) -> bool {
        self.quiet >= RETRY_AFTER << self.failures.saturating_sub(1).min(20)
    }

    /// `desired`, or the size to try instead under the ceiling.
    fn limit(&self, desired: u64, min: u64) -> u64 {
        let Some(ceiling) = self.ceiling else { return desired };
        if desired < ceiling || ceiling <= min {
            return desired.min(ceiling.saturating_sub(1)).max(min);
        }
        let floor = self.safe.max(min);
        if self.retry_due() {
            // A long run of successes: the failure may have been memory held by something
            // transient, so the failed size itself is tried once more.
            return ceiling;
        }
        let gap = ceiling as f64 / floor as f64;
        if gap <= MEMORY_RESOLUTION || ceiling - floor <= 1 {
            return floor;
        }
        let probe = (floor as f64 * gap.sqrt()).floor() as u64;
        probe.clamp(floor + 1, ceiling - 1)
    }

    fn success(&mut self, size: u64) {
        self.quiet += 1;
        match self.ceiling {
            Some(ceiling) if size >= ceiling => {
                // The failed size worked after all: the memory had been taken by something else.
                self.ceiling = None;
                self.safe = size;
                self.quiet = 0;
            }
            _ => self.safe = self.safe.max(size),
        }
    }

    fn failure(&mut self, size: u64, min: u64) {
        self.failures += 1;
        self.quiet = 0;
        self.ceiling = Some(self.ceiling.map_or(size, |c| c.min(size)));
        if self.safe >= size {
            // It worked before: something else holds memory now. Search again from half.
            self.safe = (size / 2).max(min.min(size.saturating_sub(1)));
        }
    }
}

/// Chooses batch sizes from the timings of finished batches. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSizer {
    config: Config,
    bins: Vec<Bin>,
    /// The next size to propose (what `next_size` returns).
    planned: u64,
    /// Whether `planned` is the fitted target (not bounded by growth): cost changes are
    /// watched only then.
    holding: bool,
    /// Whether the bins were just reset by a detected cost change.
    after_change: bool,
    fit: Option<Fit>,
    /// Mean squared log residual while holding, and how many residuals made it.
    noise_var: f64,
    noise_n: f64,
    cusum_up: f64,
    cusum_down: f64,
    memory: Memory,
    batches: u64,
    failures: u64,
    changes: u64,
}

impl BatchSizer {
    /// A sizer with these targets, or Beam's error for invalid ones.
    ///
    /// ```
    /// use beam_turbo_core::sizer::{BatchSizer, Config};
    /// let mut sizer = BatchSizer::new(Config::default()).unwrap();
    /// assert_eq!(sizer.next_size(), 1);
    /// sizer.record(1.0, 0.01);
    /// assert_eq!(sizer.next_size(), 4);
    /// ```
    pub fn new(config: Config) -> Result<Self, CoreError> {
        let config = config.validated()?;
        let mut sizer = Self {
            config,
            bins: Vec::new(),
            planned: config.min(),
            holding: false,
            after_change: false,
            fit: None,
            noise_var: NOISE_PRIOR * NOISE_PRIOR,
            noise_n: 0.0,
            cusum_up: 0.0,
            cusum_down: 0.0,
            memory: Memory::default(),
            batches: 0,
            failures: 0,
            changes: 0,
        };
        sizer.replan();
        Ok(sizer)
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The size of the next batch: elements, or total weight when batches are weighed.
    #[must_use]
    pub fn next_size(&self) -> u64 {
        self.planned
    }

    /// Records a batch of `size` that took `secs`. Sizes that are not positive and finite,
    /// and times that are negative, NaN or infinite, count as a batch but teach nothing.
    pub fn record(&mut self, size: f64, secs: f64) {
        self.batches += 1;
        if !(size > 0.0 && size.is_finite()) {
            return;
        }
        self.memory.success(size.ceil() as u64);
        if secs >= 0.0 && secs.is_finite() {
            let secs = secs.max(MIN_SECS);
            if self.holding
                && let Some(fit) = self.fit
                && self.watch(fit, size, secs)
            {
                self.changes += 1;
                self.bins.clear();
                self.after_change = true;
                self.reset_watch();
            }
            self.add(size, secs);
        }
        self.replan();
    }

    /// Records a batch of `size` that failed; `memory` says it ran out of memory.
    pub fn record_failure(&mut self, size: f64, memory: bool) {
        self.batches += 1;
        self.failures += 1;
        if memory && size > 0.0 && size.is_finite() {
            self.memory.failure(size.ceil() as u64, self.config.min());
            self.replan();
        }
    }

    /// The smallest size that failed for memory and will not be proposed, if any.
    #[must_use]
    pub fn ceiling(&self) -> Option<u64> {
        self.memory.ceiling
    }

    /// The fitted cost model near the planned size, once two sizes have been measured.
    #[must_use]
    pub fn fit(&self) -> Option<Fit> {
        self.fit
    }

    /// Batches recorded, successful or not.
    #[must_use]
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Batches that failed, for memory or not.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Cost changes detected.
    #[must_use]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Whether the sizer holds its target (rather than exploring towards it).
    #[must_use]
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Feeds one residual to the change detector; true when the costs have changed.
    fn watch(&mut self, fit: Fit, size: f64, secs: f64) -> bool {
        let predicted = fit.predict(size);
        if predicted.is_nan() || predicted <= 0.0 {
            return false;
        }
        let residual = (secs / predicted).ln();
        let sigma = (self.noise_var.sqrt()).max(NOISE_FLOOR);
        let z = (residual / sigma).clamp(-CUSUM_CLIP, CUSUM_CLIP);
        self.cusum_up = (self.cusum_up + z - CUSUM_DRIFT).max(0.0);
        self.cusum_down = (self.cusum_down - z - CUSUM_DRIFT).max(0.0);
        if self.cusum_up > CUSUM_THRESHOLD || self.cusum_down > CUSUM_THRESHOLD {
            return true;
        }
        // Winsorised, so that the start of a change does not pass for noise.
        let clipped = residual.clamp(-3.0 * sigma, 3.0 * sigma);
        self.noise_n += 1.0;
        let weight = 1.0 / (self.noise_n + 1.0).min(NOISE_WARMUP);
        self.noise_var += weight * (clipped * clipped - self.noise_var);
        false
    }

    fn reset_watch(&mut self) {
        self.noise_var = NOISE_PRIOR * NOISE_PRIOR;
        self.noise_n = 0.0;
        self.cusum_up = 0.0;
        self.cusum_down = 0.0;
    }

    fn add(&mut self, size: f64, secs: f64) {
        let key = bin_key(size);
        let touched = self.batches;
        if let Some(bin) = self.bins.iter_mut().find(|b| bin_key(b.size) == key) {
            bin.count = (bin.count + 1.0).min(BIN_COUNT_CAP);
            bin.size += (size - bin.size) / bin.count;
            bin.secs += (secs - bin.secs) / bin.count;
            bin.touched = touched;
            return;
        }
        if self.bins.len() == MAX_BINS
            && let Some(oldest) = (0..self.bins.len()).min_by_key(|&i| self.bins[i].touched)
        {
            self.bins.swap_remove(oldest);
        }
        self.bins.push(Bin { size, secs, count: 1.0, touched });
    }

    /// The cost model: one line through every bin, or, where the costs bend (flat up to a
    /// device's width, then linear) and a knee explains the bins far better, a line that is
    /// flat below the knee. The flat bins then pin the line down where it starts to rise.
    fn model(&self) -> Option<Fit> {
        let mut bins: Vec<&Bin> = self.bins.iter().collect();
        bins.sort_by(|x, y| x.size.total_cmp(&y.size));
        let line = fit(&bins, 0.0)?;
        let wide = misfit(&bins, line);
        let count: f64 = bins.iter().map(|b| b.count).sum();
        if bins.len() < 4 || wide <= NOISE_FLOOR * NOISE_FLOOR * count {
            return Some(line);
        }
        let best = bins[1..bins.len() - 1]
            .iter()
            .filter_map(|knee| fit(&bins, knee.size))
            .map(|bent| (misfit(&bins, bent), bent))
            .min_by(|x, y| x.0.total_cmp(&y.0));
        // Once a knee is believed it stays while it fits better, so noise does not flip models.
        let gain = if self.fit.is_some_and(|f| f.knee > 0.0) { 1.0 } else { KNEE_GAIN };
        match best {
            Some((m, knee_fit)) if m < gain * wide => Some(knee_fit),
            _ => Some(line),
        }
    }

    /// Works out the next size from what is known now.
    fn replan(&mut self) {
        let (min, max) = (self.config.min(), self.config.max());
        if min >= max {
            self.planned = min;
            self.holding = true;
            return;
        }
        let largest = self.bins.iter().map(|b| b.size).fold(0.0, f64::max);
        let relearn = |k: usize| largest / GROWTH.powi(k as i32);
        let desired = match self.bins.len() {
            0 => {
                self.holding = false;
                self.fit = None;
                min
            }
            k if self.after_change && k <= RELEARN_PROBES && relearn(k) >= min as f64 => {
                // A change: measure smaller batches to tell the fixed cost from the rest.
                self.holding = false;
                self.fit = self.model();
                relearn(k).floor() as u64
            }
            1 => {
                self.holding = false;
                grown(largest, max)
            }
            _ => {
                self.after_change = false;
                self.fit = self.model();
                let target = self.fit.map_or(max, |f| self.config.target_size(f.fixed, f.per_element));
                let reach = grown(largest, max);
                let was_holding = self.holding;
                self.holding = target <= reach;
                if self.holding && !was_holding {
                    self.reset_watch();
                }
                let wanted = target.min(reach);
                // The held size moves when the target leaves the band, widened where the fit
                // itself is that uncertain (noisy timings), so noise does not move it.
                let band = self.fit.map_or(HOLD_BAND, |fit| {
                    let bins: Vec<&Bin> = self.bins.iter().collect();
                    (2.0 * self.config.target_uncertainty(&bins, fit)).clamp(HOLD_BAND, MAX_HOLD_BAND)
                });
                let stay = was_holding && (wanted as f64 / self.planned as f64).ln().abs() <= band;
                if stay { self.planned } else { wanted }
            }
        };
        if self.bins.len() < 2 {
            self.fit = None;
        }
        self.planned = self.memory.limit(desired.clamp(min, max), min);
    }

    /// The sizer's whole state, for pickling: a fixed little-endian layout.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.bins.len() * 32);
        out.extend_from_slice(STATE_MAGIC);
        let c = &self.config;
        put_i64(&mut out, c.min_batch_size);
        put_i64(&mut out, c.max_batch_size);
        for t in
            [c.target_batch_overhead, c.target_batch_duration_secs, c.target_batch_duration_secs_including_fixed_cost]
        {
            put_f64(&mut out, t.unwrap_or(0.0));
        }
        put_f64(&mut out, c.variance);
        put_u64(&mut out, self.planned);
        out.push(u8::from(self.holding) | u8::from(self.after_change) << 1 | u8::from(self.fit.is_some()) << 2);
        let fit = self.fit.unwrap_or(Fit { fixed: 0.0, per_element: 0.0, knee: 0.0 });
        for v in [fit.fixed, fit.per_element, fit.knee, self.noise_var, self.noise_n, self.cusum_up, self.cusum_down] {
            put_f64(&mut out, v);
        }
        put_u64(&mut out, self.memory.ceiling.unwrap_or(0));
        put_u64(&mut out, self.memory.safe);
        put_u64(&mut out, self.memory.quiet);
        put_u64(&mut out, u64::from(self.memory.failures));
        for v in [self.batches, self.failures, self.changes, self.bins.len() as u64] {
            put_u64(&mut out, v);
        }
        for bin in &self.bins {
            for v in [bin.size, bin.secs, bin.count] {
                put_f64(&mut out, v);
            }
            put_u64(&mut out, bin.touched);
        }
        out
    }

    /// A sizer from [`BatchSizer::to_bytes`]' output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CoreError> {
        let bad = || CoreError::InvalidArgument("not a BatchSizer state (corrupt or from another version)".into());
        let mut r = Reader(bytes.strip_prefix(STATE_MAGIC).ok_or_else(bad)?);
        let target = |v: f64| (v != 0.0).then_some(v);
        let config = Config {
            min_batch_size: r.i64()?,
            max_batch_size: r.i64()?,
            target_batch_overhead: target(r.f64()?),
            target_batch_duration_secs: target(r.f64()?),
            target_batch_duration_secs_including_fixed_cost: target(r.f64()?),
            variance: r.f64()?,
        }
        .validated()?;
        let planned = r.u64()?;
        let flags = r.byte()?;
        let (fixed, per_element, knee) = (r.f64()?, r.f64()?, r.f64()?);
        let mut sizer = Self {
            config,
            bins: Vec::new(),
            planned,
            holding: flags & 1 != 0,
            after_change: flags & 2 != 0,
            fit: (flags & 4 != 0).then_some(Fit { fixed, per_element, knee }),
            noise_var: r.f64()?,
            noise_n: r.f64()?,
            cusum_up: r.f64()?,
            cusum_down: r.f64()?,
            memory: Memory {
                ceiling: Some(r.u64()?).filter(|&c| c != 0),
                safe: r.u64()?,
                quiet: r.u64()?,
                failures: u32::try_from(r.u64()?).map_err(|_| bad())?,
            },
            batches: r.u64()?,
            failures: r.u64()?,
            changes: r.u64()?,
        };
        let bins = usize::try_from(r.u64()?).ok().filter(|&n| n <= MAX_BINS).ok_or_else(bad)?;
        for _ in 0..bins {
            let bin = Bin { size: r.f64()?, secs: r.f64()?, count: r.f64()?, touched: r.u64()? };
            if !(bin.size > 0.0 && bin.secs > 0.0 && bin.count >= 1.0) {
                return Err(bad());
            }
            sizer.bins.push(bin);
        }
        // The largest success lies below the ceiling; a state where it does not would propose
        // sizes beyond max_batch_size (found by fuzzing).
        let memory_consistent = sizer.memory.ceiling.is_none_or(|c| sizer.memory.safe < c);
        if !r.0.is_empty() || !(config.min()..=config.max()).contains(&planned) || !memory_consistent {
            return Err(bad());
        }
        Ok(sizer)
    }
}

/// Which bin a size falls in: its log in steps of `BIN_WIDTH`.
fn bin_key(size: f64) -> i64 {
    (size.ln() / BIN_WIDTH).round() as i64
}

/// The largest size the fit may be trusted at: `GROWTH` times the largest measured.
fn grown(largest: f64, max: u64) -> u64 {
    let reach = (largest * GROWTH).floor();
    if reach >= max as f64 { max } else { reach as u64 }
}

const STATE_MAGIC: &[u8] = b"BTSZ\x02";

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads the fields of a state back, failing on a short input.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], CoreError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or_else(|| {
            CoreError::InvalidArgument("not a BatchSizer state (corrupt or from another version)".into())
        })?;
        self.0 = rest;
        Ok(*head)
    }

    fn byte(&mut self) -> Result<u8, CoreError> {
        Ok(self.take::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, CoreError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, CoreError> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    fn f64(&mut self) -> Result<f64, CoreError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizer() -> BatchSizer {
        BatchSizer::new(Config::default()).unwrap()
    }

    fn message(config: Config) -> String {
        match BatchSizer::new(config) {
            Err(CoreError::InvalidArgument(msg)) => msg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// A small deterministic generator (xorshift) with standard normal draws.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
        }
    }

    /// Runs `batches` batches with `cost(size, batch index)`, failing for memory above `limit`;
    /// returns the sizes proposed.
    fn drive(sizer: &mut BatchSizer, batches: usize, limit: u64, mut cost: impl FnMut(f64, usize) -> f64) -> Vec<u64> {
        let mut proposed = Vec::with_capacity(batches);
        for i in 0..batches {
            let n = sizer.next_size();
            proposed.push(n);
            if n > limit {
                sizer.record_failure(n as f64, true);
            } else {
                sizer.record(n as f64, cost(n as f64, i));
            }
        }
        proposed
    }

    /// The index of the first batch from which every size is within 10% of `oracle`.
    fn settled_at(sizes: &[u64], oracle: u64) -> usize {
        let near = |&n: &u64| (n as f64 - oracle as f64).abs() <= 0.1 * oracle as f64;
        sizes.iter().rposition(|n| !near(n)).map_or(0, |i| i + 1)
    }

    #[test]
    fn invalid_arguments_get_beams_messages() {
        let base = Config::default();
        assert_eq!(
            message(Config { min_batch_size: 10, max_batch_size: 5, ..base }),
            "Minimum (10) must not be greater than maximum (5)"
        );
        assert_eq!(
            message(Config { target_batch_overhead: Some(1.5), ..base }),
            "target_batch_overhead (1.5) must be between 0 and 1"
        );
        assert_eq!(
            message(Config { target_batch_overhead: Some(-2.0), ..base }),
            "target_batch_overhead (-2.0) must be between 0 and 1"
        );
        assert_eq!(
            message(Config { target_batch_duration_secs: Some(-1.0), ..base }),
            "target_batch_duration_secs (-1.0) must be positive"
        );
        assert_eq!(
            message(Config { target_batch_duration_secs_including_fixed_cost: Some(-0.5), ..base }),
            "target_batch_duration_secs_including_fixed_cost (-0.5) must be positive"
        );
        assert_eq!(
            message(Config { target_batch_overhead: None, target_batch_duration_secs: Some(0.0), ..base }),
            "At least one of target_batch_overhead or target_batch_duration_secs or \
             target_batch_duration_secs_including_fixed_cost must be positive."
        );
        assert_eq!(
            message(Config { target_batch_duration_secs: Some(f64::NAN), ..base }),
            "target_batch_duration_secs (nan) must be positive"
        );
        assert_eq!(message(Config { min_batch_size: -1, ..base }), "min_batch_size (-1) must not be negative");
        assert_eq!(
            message(Config { min_batch_size: 0, max_batch_size: 0, ..base }),
            "max_batch_size (0) must be at least 1"
        );
        assert_eq!(message(Config { variance: f64::INFINITY, ..base }), "variance (inf) must be a finite number");
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(2.0), "2.0");
        assert_eq!(py_float(0.05), "0.05");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(1.5e-7), "1.5e-07");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn zero_targets_are_off_as_in_beam() {
        let config = Config { target_batch_overhead: Some(0.0), ..Config::default() };
        let sizer = BatchSizer::new(config).unwrap();
        assert_eq!(sizer.config().target_batch_overhead, None);
    }

    #[test]
    fn targets_match_beams_worked_examples() {
        // Beam's util_test: a batch of n takes 1 + 0.7 n seconds.
        let only = |overhead, duration, including| Config {
            target_batch_overhead: overhead,
            target_batch_duration_secs: duration,
            target_batch_duration_secs_including_fixed_cost: including,
            ..Config::default()
        };
        assert_eq!(only(None, Some(10.0), None).target_size(1.0, 0.7), 14);
        assert_eq!(only(None, None, Some(10.0)).target_size(1.0, 0.7), 12);
        assert_eq!(only(Some(0.05), None, None).target_size(1.0, 0.7), 27);
        // No per-element cost: bigger batches are free.
        assert_eq!(Config::default().target_size(1.0, 0.0), 10_000);
        // The fixed cost alone exceeds the duration including it: the smallest batches.
        assert_eq!(only(None, None, Some(0.5)).target_size(1.0, 0.0), 1);
        assert_eq!(only(None, None, Some(0.5)).target_size(1.0, 0.7), 1);
        assert_eq!(only(Some(0.05), None, None).target_size(0.01, 0.01), 19);
    }

    #[test]
    fn reaches_and_holds_the_target_for_linear_costs() {
        // (fixed, per element, oracle): Beam's defaults bound by overhead, max size, duration.
        for (a, b, oracle) in [(0.01, 1e-5, 10_000), (0.5, 1e-3, 9500), (0.01, 0.01, 19), (1.0, 0.7, 14)] {
            let mut s = sizer();
            let sizes = drive(&mut s, 60, u64::MAX, |n, _| a + b * n);
            assert!(settled_at(&sizes, oracle) <= 9, "a={a} b={b}: {sizes:?}");
            assert!(sizes[20..].iter().all(|&n| n == sizes[20]), "holds steadily: {sizes:?}");
            assert!(s.holding());
            let fit = s.fit().unwrap();
            assert!((fit.per_element - b).abs() < 1e-9 * b.max(1.0), "{fit:?}");
            assert_eq!(s.changes(), 0);
        }
    }

    #[test]
    fn grows_by_four_from_the_minimum() {
        let mut s = sizer();
        let sizes = drive(&mut s, 8, u64::MAX, |n, _| 0.01 + 1e-5 * n);
        assert_eq!(sizes, [1, 4, 16, 64, 256, 1024, 4096, 10_000]);
    }

    #[test]
    fn fits_locally_where_costs_bend() {
        // Flat to 256 like a GPU, then linear: the target (950) is read off the linear part.
        let mut s = sizer();
        let sizes = drive(&mut s, 40, u64::MAX, |n, _| 0.005 + 1e-4 * n.max(256.0));
        assert!(settled_at(&sizes, 950) <= 8, "{sizes:?}");
    }

    #[test]
    fn holds_steadily_under_noise_without_false_alarms() {
        let mut rng = Rng(42);
        let mut s = sizer();
        let sizes = drive(&mut s, 3000, u64::MAX, |n, _| (0.01 + 1e-5 * n) * (0.2 * rng.normal()).exp());
        assert!(settled_at(&sizes, 10_000) <= 12, "{:?}", &sizes[..20]);
        assert_eq!(s.changes(), 0, "20% noise is not a cost change");
    }

    #[test]
    fn noise_in_the_estimate_does_not_move_the_held_size() {
        // An interior target (9,500) under 5% timing noise: the estimate wanders by about
        // that much, the held size should not.
        let mut rng = Rng(11);
        let mut s = sizer();
        let sizes = drive(&mut s, 600, u64::MAX, |n, _| (0.5 + 1e-3 * n) * (0.05 * rng.normal()).exp());
        let moves = sizes[10..].windows(2).filter(|w| w[0] != w[1]).count();
        assert!(moves <= 2, "{moves} moves");
        assert!(settled_at(&sizes, 9500) <= 12, "{:?}", &sizes[..20]);
        assert_eq!(s.changes(), 0);
    }

    #[test]
    fn an_exact_fit_has_no_uncertainty() {
        let config = Config::default();
        let bins: Vec<Bin> = [100.0, 1000.0, 4000.0, 9000.0]
            .iter()
            .map(|&n| Bin { size: n, secs: 0.5 + 1e-3 * n, count: 1.0, touched: 0 })
            .collect();
        let refs: Vec<&Bin> = bins.iter().collect();
        let exact = fit(&refs, 0.0).unwrap();
        assert!(config.target_uncertainty(&refs, exact) < 1e-6);
        let mut noisy = bins.clone();
        noisy[1].secs *= 1.1;
        let refs: Vec<&Bin> = noisy.iter().collect();
        let rough = fit(&refs, 0.0).unwrap();
        assert!(config.target_uncertainty(&refs, rough) > 0.01);
    }

    #[test]
    fn detects_a_cost_change_and_retargets() {
        let mut s = sizer();
        let mut done = 0.0;
        let mut change_at = None;
        let sizes = drive(&mut s, 200, u64::MAX, |n, i| {
            let b = if done >= 500_000.0 { 2e-3 } else { 1e-3 };
            if b > 1e-3 && change_at.is_none() {
                change_at = Some(i);
            }
            done += n;
            0.5 + b * n
        });
        let change_at = change_at.unwrap();
        assert_eq!(s.changes(), 1);
        let after = &sizes[change_at..change_at + 10];
        assert!(settled_at(&sizes[change_at..], 4750) <= 8, "{after:?}");
        assert!(after.iter().any(|&n| n < 1000), "small batches relearn the fixed cost: {after:?}");
    }

    #[test]
    fn detects_a_faster_machine_too() {
        let mut s = sizer();
        let sizes = drive(&mut s, 120, u64::MAX, |n, i| if i < 40 { 0.5 + 2e-3 * n } else { 0.5 + 1e-3 * n });
        assert_eq!(s.changes(), 1);
        assert!(settled_at(&sizes[40..], 9500) <= 8, "{:?}", &sizes[38..50]);
    }

    #[test]
    fn memory_failures_set_a_ceiling_that_is_never_reached() {
        let mut s = sizer();
        let sizes = drive(&mut s, 400, 3000, |n, _| 0.01 + 1e-5 * n);
        let failed: Vec<u64> = sizes.iter().copied().filter(|&n| n > 3000).collect();
        assert!(failed.len() <= 2, "{failed:?}");
        assert_eq!(s.failures(), failed.len() as u64);
        assert!(settled_at(&sizes, 3000) <= 12, "{sizes:?}");
        assert!(s.ceiling().unwrap() > 3000);
        // After each failure, nothing at or above the failed size is proposed.
        for (i, &n) in sizes.iter().enumerate().filter(|&(_, &n)| n > 3000) {
            assert!(sizes[i + 1..].iter().all(|&m| m < n), "{sizes:?}");
        }
    }

    #[test]
    fn memory_search_costs_at_most_four_failures() {
        for limit in [5, 17, 1100, 2047, 2900, 4095, 7000] {
            let mut s = sizer();
            let sizes = drive(&mut s, 300, limit, |n, _| 0.01 + 1e-5 * n);
            let failed = sizes.iter().filter(|&&n| n > limit).count();
            assert!(failed <= 4, "limit {limit}: {failed} failures");
            let held = *sizes.last().unwrap();
            assert!(held <= limit && held as f64 >= limit as f64 / 1.25, "limit {limit}: holds {held}");
        }
    }

    #[test]
    fn a_non_memory_failure_changes_nothing() {
        let mut s = sizer();
        drive(&mut s, 5, u64::MAX, |n, _| 0.01 + 1e-5 * n);
        let before = s.next_size();
        s.record_failure(before as f64, false);
        assert_eq!(s.ceiling(), None);
        assert_eq!(s.next_size(), before);
        assert_eq!((s.failures(), s.batches()), (1, 6));
    }

    #[test]
    fn the_ceiling_is_retried_after_a_quiet_period_and_lifted_on_success() {
        let mut s = sizer();
        drive(&mut s, 10, u64::MAX, |n, _| 0.01 + 1e-5 * n);
        assert_eq!(s.next_size(), 10_000);
        // Something else took the memory for a while: 10,000 fails once.
        s.record_failure(10_000.0, true);
        assert_eq!(s.ceiling(), Some(10_000));
        let sizes = drive(&mut s, 5000, u64::MAX, |n, _| 0.01 + 1e-5 * n);
        let retried = sizes.iter().position(|&n| n == 10_000).expect("the ceiling is retried");
        assert!(retried >= 1000, "not before the quiet period: {retried}");
        assert_eq!(s.ceiling(), None, "a success at the ceiling lifts it");
        assert!(sizes[retried..].iter().all(|&n| n == 10_000));
    }

    #[test]
    fn a_failure_below_an_earlier_success_restarts_the_search() {
        let mut s = sizer();
        drive(&mut s, 10, u64::MAX, |n, _| 0.01 + 1e-5 * n);
        s.record_failure(4000.0, true);
        assert_eq!(s.ceiling(), Some(4000));
        let next = s.next_size();
        assert!((2000..4000).contains(&next), "{next}");
        let sizes = drive(&mut s, 50, 3500, |n, _| 0.01 + 1e-5 * n);
        assert!(sizes.iter().all(|&n| n < 4000));
    }

    #[test]
    fn memory_failures_at_or_below_the_minimum_keep_the_minimum() {
        let mut s = BatchSizer::new(Config { min_batch_size: 8, ..Config::default() }).unwrap();
        s.record_failure(8.0, true);
        assert_eq!(s.next_size(), 8);
        s.record_failure(2.0, true);
        assert_eq!(s.next_size(), 8);
    }

    #[test]
    fn fixed_size_when_min_equals_max() {
        let mut s = BatchSizer::new(Config { min_batch_size: 10, max_batch_size: 10, ..Config::default() }).unwrap();
        let sizes = drive(&mut s, 5, u64::MAX, |n, _| 1.0 + n);
        assert_eq!(sizes, [10; 5]);
    }

    #[test]
    fn bad_timings_and_sizes_count_but_teach_nothing() {
        let mut s = sizer();
        s.record(1.0, 0.01);
        let planned = s.next_size();
        for (size, secs) in [
            (4.0, f64::NAN),
            (4.0, f64::INFINITY),
            (4.0, f64::NEG_INFINITY),
            (4.0, -1.0),
            (0.0, 1.0),
            (-3.0, 1.0),
            (f64::NAN, 1.0),
            (f64::INFINITY, 1.0),
        ] {
            s.record(size, secs);
            assert_eq!(s.next_size(), planned, "({size}, {secs})");
        }
        assert_eq!(s.batches(), 9);
        assert!(s.fit().is_none());
        s.record_failure(f64::NAN, true);
        s.record_failure(-1.0, true);
        assert_eq!(s.ceiling(), None);
    }

    #[test]
    fn zero_second_batches_are_usable() {
        let mut s = sizer();
        let sizes = drive(&mut s, 12, u64::MAX, |_, _| 0.0);
        assert_eq!(sizes.last(), Some(&10_000), "free batches grow to the maximum: {sizes:?}");
    }

    #[test]
    fn weighted_sizes_that_vary_still_converge() {
        // Batches by weight overshoot the planned size a little, as whole elements do.
        let mut s = sizer();
        let mut rng = Rng(7);
        let mut sizes = Vec::new();
        for _ in 0..60 {
            let n = s.next_size() as f64 * (1.0 - 0.05 * rng.uniform());
            sizes.push(n as u64);
            s.record(n, 0.5 + 1e-3 * n);
        }
        assert!(settled_at(&sizes, 9500) <= 12, "{sizes:?}");
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let mut rng = Rng(3);
        let mut s = sizer();
        drive(&mut s, 30, 3000, |n, _| (0.5 + 1e-3 * n) * (0.1 * rng.normal()).exp());
        s.record_failure(5.0, false);
        let bytes = s.to_bytes();
        assert!(bytes.len() < 1024, "compact: {} bytes", bytes.len());
        let mut restored = BatchSizer::from_bytes(&bytes).unwrap();
        assert_eq!(restored, s);
        let cost = |n: f64, _| 0.5 + 1e-3 * n;
        assert_eq!(drive(&mut restored, 20, 3000, cost), drive(&mut s, 20, 3000, cost));
    }

    #[test]
    fn corrupt_states_are_refused() {
        let bytes = sizer().to_bytes();
        for bad in [&b""[..], b"nope", &bytes[..bytes.len() - 1], &[bytes.as_slice(), b"x"].concat()] {
            assert!(matches!(BatchSizer::from_bytes(bad), Err(CoreError::InvalidArgument(_))));
        }
        let mut wrong = bytes.clone();
        wrong[5..13].copy_from_slice(&20i64.to_le_bytes()); // min above max
        assert!(BatchSizer::from_bytes(&wrong).is_err());
        // A largest success at or above the ceiling.
        let mut failed = sizer();
        failed.record_failure(100.0, true);
        let mut wrong = failed.to_bytes();
        assert_eq!(wrong[118..126], 100u64.to_le_bytes(), "the ceiling's offset in the layout");
        wrong[126..134].copy_from_slice(&10_000_000u64.to_le_bytes());
        assert!(BatchSizer::from_bytes(&wrong).is_err());
    }
}
