//! Differential-privacy mechanisms and accounting, backed by OpenDP
//! (`contrib`, with OpenSSL randomness). Every noisy number tre releases is
//! drawn here; nothing else in the workspace may sample noise.
//!
//! All mechanisms work on integers: counts are integers, and sums are
//! computed in fixed point (see `FIXED_POINT_SCALE` in tre-query), so the
//! sensitivity is exact and immune to floating-point rounding attacks.
//!
//! This crate must never depend on arrow, DataFusion, storage or the
//! network: it sees numbers, sensitivities and epsilons only.

use std::collections::HashMap;

use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    make_laplace, make_laplace_threshold, make_noisy_max, make_private_quantile,
};
use opendp::measures::{Approximate, MaxDivergence};
use opendp::metrics::{AbsoluteDistance, L01InfDistance, LInfDistance, SymmetricDistance};
use opendp::transformations::make_quantile_score_candidates;
use tre_core::{Code, Delta, Epsilon};

/// Errors from the mechanisms. They are internal by nature: a well-formed
/// plan never produces one.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("{code} could not build the noise mechanism: {0}", code = Code::Internal)]
    Mechanism(String),
    #[error("{code} the privacy cost {actual} of a mechanism exceeds the planned {planned}", code = Code::Internal)]
    CostMismatch { planned: f64, actual: f64 },
    #[error("{code} sensitivity must be at least 1, got {0}", code = Code::Internal)]
    Sensitivity(i64),
}

/// Coverage of the intervals attached to every released cell.
pub const CONFIDENCE: f64 = 0.95;

type LaplaceMeasurement =
    opendp::core::Measurement<AtomDomain<i64>, AbsoluteDistance<i64>, MaxDivergence, i64>;

/// The discrete Laplace (two-sided geometric) mechanism over `i64`.
///
/// Holds only its calibration: OpenDP measurements are not `Send`, so the
/// measurement is rebuilt (cheaply) for each sampling call.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteLaplace {
    sensitivity: i64,
    scale: f64,
    epsilon: f64,
}

fn measurement(scale: f64) -> Result<LaplaceMeasurement, DpError> {
    make_laplace::<_, _, MaxDivergence>(
        AtomDomain::<i64>::default(),
        AbsoluteDistance::<i64>::default(),
        scale,
        None,
    )
    .map_err(|e| DpError::Mechanism(e.to_string()))
}

impl DiscreteLaplace {
    /// Calibrate to `(sensitivity, epsilon)`: scale = sensitivity / epsilon.
    ///
    /// The epsilon the mechanism reports back through OpenDP's privacy map is
    /// checked against the one planned, so a calibration bug surfaces here
    /// instead of as an unaccounted privacy loss.
    pub fn new(sensitivity: i64, epsilon: Epsilon) -> Result<Self, DpError> {
        if sensitivity < 1 {
            return Err(DpError::Sensitivity(sensitivity));
        }
        let scale = sensitivity as f64 / epsilon.value();
        let actual = measurement(scale)?
            .map(&sensitivity)
            .map_err(|e| DpError::Mechanism(e.to_string()))?;
        // OpenDP rounds the map upward; allow only that rounding.
        if actual > epsilon.value() * (1.0 + 1e-9) {
            return Err(DpError::CostMismatch {
                planned: epsilon.value(),
                actual,
            });
        }
        Ok(Self {
            sensitivity,
            scale,
            epsilon: actual,
        })
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn sensitivity(&self) -> i64 {
        self.sensitivity
    }

    /// The epsilon OpenDP's privacy map assigns to this mechanism.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Draw noisy releases of `exact` values with OpenDP's secure sampler.
    pub fn release_all(&self, exact: &[i64]) -> Result<Vec<i64>, DpError> {
        let m = measurement(self.scale)?;
        exact
            .iter()
            .map(|x| m.invoke(x).map_err(|e| DpError::Mechanism(e.to_string())))
            .collect()
    }

    /// Half-width `a` with P(|noise| >= a) <= alpha, from OpenDP's accuracy
    /// module. The interval `release ± (a - 1)` therefore covers the exact
    /// value with probability at least 1 - alpha (noise is integer).
    pub fn half_width(&self, alpha: f64) -> Result<f64, DpError> {
        let a = opendp::accuracy::discrete_laplacian_scale_to_accuracy(self.scale, alpha)
            .map_err(|e| DpError::Mechanism(e.to_string()))?;
        Ok((a.floor() - 1.0).max(0.0))
    }
}

type QuantileMeasurement =
    opendp::core::Measurement<VectorDomain<AtomDomain<i64>>, SymmetricDistance, MaxDivergence, i64>;

fn quantile_measurement(
    buckets: i64,
    alpha: f64,
    scale: f64,
) -> Result<QuantileMeasurement, DpError> {
    make_private_quantile(
        VectorDomain::new(AtomDomain::<i64>::default()),
        SymmetricDistance,
        MaxDivergence,
        (0..=buckets).collect(),
        alpha,
        scale,
    )
    .map_err(|e| DpError::Mechanism(e.to_string()))
}

/// A DP quantile by OpenDP's `make_private_quantile` (the exponential
/// mechanism by report-noisy-max) over bucket indices `0..=buckets` of a
/// bounded value. Calibrated so that a patient with up to `max_rows` rows
/// costs at most `epsilon`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantile {
    alpha: f64,
    buckets: i64,
    max_rows: u32,
    scale: f64,
    /// OpenDP's integer form of `alpha`, `num / den` (see `score_fraction`).
    alpha_num: u64,
    alpha_den: u64,
    epsilon: f64,
}

impl Quantile {
    pub fn new(alpha: f64, buckets: i64, max_rows: u32, epsilon: Epsilon) -> Result<Self, DpError> {
        if max_rows < 1 {
            return Err(DpError::Sensitivity(i64::from(max_rows)));
        }
        let map = |scale: f64| -> Result<f64, DpError> {
            quantile_measurement(buckets, alpha, scale)?
                .map(&max_rows)
                .map_err(|e| DpError::Mechanism(e.to_string()))
        };
        // The privacy map is inversely proportional to the scale.
        let mut scale = map(1.0)? / epsilon.value();
        let mut actual = map(scale)?;
        for _ in 0..8 {
            if actual <= epsilon.value() {
                break;
            }
            scale *= (actual / epsilon.value()) * (1.0 + 1e-12);
            actual = map(scale)?;
        }
        if actual > epsilon.value() * (1.0 + 1e-9) {
            return Err(DpError::CostMismatch {
                planned: epsilon.value(),
                actual,
            });
        }
        let (alpha_num, alpha_den) = score_fraction(alpha)?;
        Ok(Self {
            alpha,
            buckets,
            max_rows,
            scale,
            alpha_num,
            alpha_den,
            epsilon: actual,
        })
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    pub fn buckets(&self) -> i64 {
        self.buckets
    }

    pub fn max_rows(&self) -> u32 {
        self.max_rows
    }

    /// The noise scale in units of rank (the quantile score changes by one
    /// per rank).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Release one bucket index from a histogram of `(bucket, count)`.
    ///
    /// This is `make_private_quantile` taken apart at its seam: OpenDP's
    /// chain scores every candidate from the expanded rows (O(rows · log
    /// buckets), and a vector of every row — hundreds of megabytes for a
    /// median over ten million patients, issue #13), then releases the
    /// arg-min by report-noisy-max. The scores depend on the data only
    /// through the cumulative counts below and above each candidate, which
    /// the histogram holds, so they are computed here from it, by OpenDP's
    /// formula and constants, and handed to OpenDP's `make_noisy_max` at
    /// the scale `make_private_quantile` would use. The privacy map stays
    /// the whole chain's (`new`), and `tests` checks these scores against
    /// OpenDP's `make_quantile_score_candidates` on the expanded rows.
    pub fn release(&self, histogram: &[(i64, u64)]) -> Result<i64, DpError> {
        let scores = self.scores(histogram)?;
        let noisy_max = make_noisy_max(
            VectorDomain::new(AtomDomain::<u64>::default()).with_size(scores.len()),
            LInfDistance::<u64>::default(),
            MaxDivergence,
            self.scale * self.alpha_den as f64,
            true,
        )
        .map_err(|e| DpError::Mechanism(e.to_string()))?;
        let index = noisy_max
            .invoke(&scores)
            .map_err(|e| DpError::Mechanism(e.to_string()))?;
        i64::try_from(index).map_err(|e| DpError::Mechanism(e.to_string()))
    }

    /// OpenDP's quantile score of each candidate bucket `0..=buckets`
    /// (lower is better): `|(den − num) · #(x < c) − num · #(x > c)|`, with
    /// both counts capped at the unknown-size limit `u64::MAX / den`.
    /// Buckets outside the candidates count below or above them all, as
    /// they would in OpenDP.
    pub fn scores(&self, histogram: &[(i64, u64)]) -> Result<Vec<u64>, DpError> {
        let overflow = || DpError::Mechanism("quantile histogram count overflows".into());
        let candidates = usize::try_from(self.buckets)
            .ok()
            .and_then(|b| b.checked_add(1))
            .ok_or_else(overflow)?;
        let mut at = vec![0u64; candidates];
        let (mut below, mut total) = (0u64, 0u64);
        for &(bucket, count) in histogram {
            total = total.checked_add(count).ok_or_else(overflow)?;
            match usize::try_from(bucket) {
                Ok(b) if b < candidates => at[b] = at[b].checked_add(count).ok_or_else(overflow)?,
                _ if bucket < 0 => below = below.checked_add(count).ok_or_else(overflow)?,
                _ => {}
            }
        }
        let size_limit = u64::MAX / self.alpha_den;
        let (num, den) = (self.alpha_num, self.alpha_den);
        let mut lt = below;
        let mut scores = Vec::with_capacity(candidates);
        for count in at {
            let le = lt + count;
            let gt = total - le;
            let (lt_lim, gt_lim) = (lt.min(size_limit), gt.min(size_limit));
            scores.push(((den - num) * lt_lim).abs_diff(num * gt_lim));
            lt = le;
        }
        Ok(scores)
    }

    /// Rank error `r` such that the released value's rank is within `r` of
    /// the target rank with probability at least `1 - alpha`: report-noisy-
    /// max over `C` candidates misses the best score by more than
    /// `scale * ln(C / alpha)` with probability at most `alpha` (union bound,
    /// so conservative).
    pub fn rank_half_width(&self, alpha: f64) -> f64 {
        let c = (self.buckets + 1) as f64;
        self.scale * (c / alpha).ln()
    }
}

/// OpenDP's integer fraction `(num, den)` for `alpha` in the quantile
/// score, for inputs of unknown size. Read from OpenDP's own score
/// transformation rather than recomputed, so `Quantile::scores` cannot
/// drift from the chain whose privacy map it is charged by: with
/// candidates `[0, 1]`, the row `[1]` scores candidate 0 at `num · 1`, and
/// the row `[0]` scores candidate 1 at `(den − num) · 1`.
fn score_fraction(alpha: f64) -> Result<(u64, u64), DpError> {
    let mechanism = |e: opendp::error::Error| DpError::Mechanism(e.to_string());
    let t = make_quantile_score_candidates(
        VectorDomain::new(AtomDomain::<i64>::default()),
        SymmetricDistance,
        vec![0i64, 1],
        alpha,
    )
    .map_err(mechanism)?;
    let num = t.invoke(&vec![1]).map_err(mechanism)?[0];
    let rest = t.invoke(&vec![0]).map_err(mechanism)?[1];
    let den = num
        .checked_add(rest)
        .filter(|d| *d > 0)
        .ok_or_else(|| DpError::Mechanism("quantile fraction out of range".into()))?;
    Ok((num, den))
}

type ThresholdMeasurement = opendp::core::Measurement<
    MapDomain<AtomDomain<String>, AtomDomain<i64>>,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<String, i64>,
>;

fn threshold_measurement(scale: f64, threshold: i64) -> Result<ThresholdMeasurement, DpError> {
    make_laplace_threshold(
        MapDomain::new(
            AtomDomain::<String>::default(),
            AtomDomain::<i64>::default(),
        ),
        L01InfDistance::default(),
        scale,
        threshold,
        None,
    )
    .map_err(|e| DpError::Mechanism(e.to_string()))
}

/// DP key selection: a group key without a public domain is released only
/// if its noisy distinct-patient count clears a threshold (OpenDP's
/// `make_laplace_threshold`, an (ε, δ) mechanism). Each patient counts
/// towards at most `max_groups` keys, once each.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySelection {
    max_groups: u32,
    scale: f64,
    threshold: i64,
    epsilon: f64,
    delta: f64,
}

/// The largest threshold key selection searches.
const MAX_THRESHOLD: i64 = 1 << 40;

/// Where the smallest fitting threshold should be: the Laplace tail bound
/// `g + scale · ln(g / δ)`. Only a starting point; OpenDP's map decides.
fn threshold_guess(max_groups: u32, scale: f64, delta: Delta) -> i64 {
    let g = f64::from(max_groups);
    let t = (g + scale * (g / delta.value()).ln()).ceil();
    if t.is_finite() && t >= 1.0 {
        (t as i64).min(MAX_THRESHOLD)
    } else {
        1
    }
}

/// The smallest threshold in `1..=MAX_THRESHOLD` that `fits`, which is
/// monotone (delta falls as the threshold rises). Searches a bracket
/// around `guess` first, about a dozen privacy maps instead of forty
/// (each map costs hundreds of microseconds, issue #13); the answer is the
/// same as a search of the whole range, because the bracket is used only
/// when its ends show the answer lies inside it.
fn smallest_threshold(
    fits: &dyn Fn(i64) -> Result<bool, DpError>,
    guess: i64,
) -> Result<i64, DpError> {
    let (mut lo, mut hi) = (1i64, MAX_THRESHOLD);
    let (near_lo, near_hi) = (
        (guess / 4).max(1),
        guess.saturating_mul(4).min(MAX_THRESHOLD),
    );
    if fits(near_hi)? {
        hi = near_hi;
        if near_lo > 1 && !fits(near_lo - 1)? {
            lo = near_lo;
        }
    } else if !fits(hi)? {
        return Err(DpError::Mechanism("no threshold reaches this delta".into()));
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

impl KeySelection {
    /// The smallest threshold that keeps key selection within `delta`.
    /// Finding it takes a dozen OpenDP privacy maps, a sixth of a
    /// key-selection query's compile time (issue #13), and depends on the
    /// three public parameters alone, so each answer is remembered.
    pub fn new(max_groups: u32, epsilon: Epsilon, delta: Delta) -> Result<Self, DpError> {
        type Memo = HashMap<(u32, u64, u64), KeySelection>;
        static MEMO: std::sync::LazyLock<std::sync::Mutex<Memo>> =
            std::sync::LazyLock::new(Default::default);
        let key = (
            max_groups,
            epsilon.value().to_bits(),
            delta.value().to_bits(),
        );
        if let Some(known) = MEMO.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(known);
        }
        let found = Self::search(max_groups, epsilon, delta)?;
        if let Ok(mut memo) = MEMO.lock() {
            // Researchers choose epsilon freely: keep the memo small.
            if memo.len() >= 4096 {
                memo.clear();
            }
            memo.insert(key, found.clone());
        }
        Ok(found)
    }

    fn search(max_groups: u32, epsilon: Epsilon, delta: Delta) -> Result<Self, DpError> {
        if max_groups < 1 || delta.is_zero() {
            return Err(DpError::Mechanism(
                "key selection needs max_groups >= 1 and delta > 0".into(),
            ));
        }
        let d_in = (max_groups, i64::from(max_groups), 1i64);
        let scale = f64::from(max_groups) / epsilon.value();
        let cost = |t: i64| -> Result<(f64, f64), DpError> {
            threshold_measurement(scale, t)?
                .map(&d_in)
                .map_err(|e| DpError::Mechanism(e.to_string()))
        };
        let fits = |t: i64| cost(t).map(|(_, d)| d <= delta.value());
        let lo = smallest_threshold(&fits, threshold_guess(max_groups, scale, delta))?;
        let (eps, del) = cost(lo)?;
        if eps > epsilon.value() * (1.0 + 1e-9) || del > delta.value() {
            return Err(DpError::CostMismatch {
                planned: epsilon.value(),
                actual: eps,
            });
        }
        Ok(Self {
            max_groups,
            scale,
            threshold: lo,
            epsilon: eps,
            delta: del,
        })
    }

    pub fn threshold(&self) -> i64 {
        self.threshold
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    pub fn delta(&self) -> f64 {
        self.delta
    }

    pub fn max_groups(&self) -> u32 {
        self.max_groups
    }

    /// Keys whose noisy count clears the threshold, with that noisy count.
    pub fn select(&self, counts: HashMap<String, i64>) -> Result<HashMap<String, i64>, DpError> {
        threshold_measurement(self.scale, self.threshold)?
            .invoke(&counts)
            .map_err(|e| DpError::Mechanism(e.to_string()))
    }
}

/// Split `total` evenly across `parts` mechanisms (sequential composition).
pub fn split_epsilon(total: Epsilon, parts: usize) -> Result<Epsilon, DpError> {
    let parts = parts.max(1) as f64;
    Epsilon::new(total.value() / parts).map_err(|e| DpError::Mechanism(e.to_string()))
}

#[cfg(test)]
mod tests;
