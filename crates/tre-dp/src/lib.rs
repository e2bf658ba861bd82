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

use opendp::domains::AtomDomain;
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::AbsoluteDistance;
use tre_core::{Code, Epsilon};

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

/// Split `total` evenly across `parts` mechanisms (sequential composition).
pub fn split_epsilon(total: Epsilon, parts: usize) -> Result<Epsilon, DpError> {
    let parts = parts.max(1) as f64;
    Epsilon::new(total.value() / parts).map_err(|e| DpError::Mechanism(e.to_string()))
}

#[cfg(test)]
mod tests;
