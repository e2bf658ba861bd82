//! AVG, VARIANCE and STDDEV (population and sample) from a noisy count,
//! a noisy centred sum and, for the spread, a noisy centred sum of
//! squares: centring at the middle of the bounds halves the sensitivity.
//! Intervals combine the parts' intervals at a Bonferroni-split level.

use std::sync::Arc;

use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::lit;

use super::{
    Call, Compiled, DpAggregate, Draft, Drafts, Family, MeasurementId, Noisy, Sensitivity, clamped,
    fixed, fixed_sensitivity, laplace_scale, suppressed, value_cell,
};
use crate::QueryError;
use crate::compile::{FIXED_POINT_SCALE, Measure, Measurement};
use crate::release::Cell;

pub(super) const FAMILY: Family = Family {
    names: &[
        "avg",
        "mean",
        "var",
        "var_samp",
        "var_sample",
        "var_pop",
        "var_population",
        "stddev",
        "stddev_samp",
        "stddev_pop",
    ],
    distinct: false,
    order_by: false,
    compile,
};

/// mean = mid + Σ(x − mid) / n
#[derive(Debug)]
struct Avg {
    sum: MeasurementId,
    count: MeasurementId,
    mid: f64,
    half: f64,
}

/// From n, Σ(x − mid) and Σ(x − mid)².
#[derive(Debug)]
struct Var {
    count: MeasurementId,
    s1: MeasurementId,
    s2: MeasurementId,
    half: f64,
    sample: bool,
    sqrt: bool,
}

fn compile(call: &Call<'_>, drafts: &mut Drafts) -> Compiled {
    let a = call.required_arg()?;
    let (x, lo, hi) = call.bounded(a)?;
    let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
    let c = call.gate(clamped(x.clone(), lo, hi)?)?;
    let text = a.to_string();
    let count_m = drafts.reuse_or_push(Draft {
        measure: Measure::CountNonNull { expr: text.clone() },
        expr: count(c.clone()),
        sensitivity: Sensitivity::L1(call.rows()?),
    });
    let s1 = drafts.push(Draft {
        measure: Measure::CenteredSum {
            expr: text.clone(),
            mid,
            half,
        },
        expr: sum(fixed(c.clone() - lit(mid))),
        sensitivity: Sensitivity::L1(fixed_sensitivity(call.k(), half)?),
    });
    let name = call.name.as_str();
    if matches!(name, "avg" | "mean") {
        return Ok(Arc::new(Avg {
            sum: s1,
            count: count_m,
            mid,
            half,
        }));
    }
    let centred = c - lit(mid);
    let s2 = drafts.push(Draft {
        measure: Measure::CenteredSquares {
            expr: text,
            mid,
            half,
        },
        expr: sum(fixed(centred.clone() * centred)),
        sensitivity: Sensitivity::L1(fixed_sensitivity(call.k(), half * half)?),
    });
    Ok(Arc::new(Var {
        count: count_m,
        s1,
        s2,
        half,
        sample: !name.ends_with("pop") && !name.ends_with("population"),
        sqrt: name.starts_with("stddev"),
    }))
}

impl DpAggregate for Avg {
    fn kind(&self) -> &'static str {
        "avg"
    }

    fn measurements(&self) -> Vec<MeasurementId> {
        vec![self.sum, self.count]
    }

    fn describe(&self, measurements: &[Measurement], alpha: f64) -> (String, f64, Option<f64>) {
        let (scale, _) = laplace_scale(measurements, self.sum, FIXED_POINT_SCALE, alpha);
        (
            "noisy sum / noisy count (discrete Laplace)".into(),
            scale,
            None,
        )
    }

    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError> {
        // Each half at alpha/2, so the ratio's interval covers with
        // probability at least 1 - alpha (Bonferroni).
        let hs = noisy.half_width(self.sum, noisy.alpha / 2.0)? / FIXED_POINT_SCALE;
        let hc = noisy.half_width(self.count, noisy.alpha / 2.0)?;
        let s = noisy.value(self.sum, cell)? / FIXED_POINT_SCALE;
        let c = noisy.value(self.count, cell)?;
        let (mid, half) = (self.mid, self.half);
        let (lo, hi) = (mid - half, mid + half);
        if c <= 0.0 {
            return Ok(suppressed("noisy denominator is not positive"));
        }
        let mean = (mid + s / c).clamp(lo, hi);
        let interval = ratio_interval(s, hs, c, hc).map_or((lo, hi), |(a, b)| {
            ((mid + a).clamp(lo, hi), (mid + b).clamp(lo, hi))
        });
        let out = noisy.profile.derived_cell(mean, c as i64);
        Ok(value_cell(
            out.value,
            out.value.map(|_| interval),
            out.status,
            out.reason,
        ))
    }
}

impl DpAggregate for Var {
    fn kind(&self) -> &'static str {
        if self.sqrt { "stddev" } else { "variance" }
    }

    fn measurements(&self) -> Vec<MeasurementId> {
        vec![self.count, self.s1, self.s2]
    }

    fn describe(&self, measurements: &[Measurement], alpha: f64) -> (String, f64, Option<f64>) {
        let (scale, _) = laplace_scale(measurements, self.s2, FIXED_POINT_SCALE, alpha);
        (
            "from noisy count, sum and sum of squares (discrete Laplace)".into(),
            scale,
            None,
        )
    }

    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError> {
        let third = noisy.alpha / 3.0;
        let hc = noisy.half_width(self.count, third)?;
        let h1 = noisy.half_width(self.s1, third)? / FIXED_POINT_SCALE;
        let h2 = noisy.half_width(self.s2, third)? / FIXED_POINT_SCALE;
        let c = noisy.value(self.count, cell)?;
        let a1 = noisy.value(self.s1, cell)? / FIXED_POINT_SCALE;
        let a2 = noisy.value(self.s2, cell)? / FIXED_POINT_SCALE;
        if c <= 1.0 {
            return Ok(suppressed("noisy denominator is too small"));
        }
        let max_var = self.half * self.half;
        let correction = if self.sample { c / (c - 1.0) } else { 1.0 };
        let var = ((a2 / c - (a1 / c).powi(2)) * correction).clamp(0.0, max_var);
        let interval = match (ratio_interval(a1, h1, c, hc), ratio_interval(a2, h2, c, hc)) {
            (Some((m1lo, m1hi)), Some((m2lo, m2hi))) => {
                let sq_min = if m1lo <= 0.0 && m1hi >= 0.0 {
                    0.0
                } else {
                    m1lo.powi(2).min(m1hi.powi(2))
                };
                let sq_max = m1lo.powi(2).max(m1hi.powi(2));
                (
                    ((m2lo - sq_max) * correction).clamp(0.0, max_var),
                    ((m2hi - sq_min) * correction).clamp(0.0, max_var),
                )
            }
            _ => (0.0, max_var),
        };
        let (v, iv) = if self.sqrt {
            (var.sqrt(), (interval.0.sqrt(), interval.1.sqrt()))
        } else {
            (var, interval)
        };
        let out = noisy.profile.derived_cell(v, c as i64);
        Ok(value_cell(
            out.value,
            out.value.map(|_| iv),
            out.status,
            out.reason,
        ))
    }
}

/// The interval of `s / c` given `s ± hs` and `c ± hc`, when `c - hc > 0`.
fn ratio_interval(s: f64, hs: f64, c: f64, hc: f64) -> Option<(f64, f64)> {
    if c - hc <= 0.0 {
        return None;
    }
    let r = [
        (s - hs) / (c - hc),
        (s - hs) / (c + hc),
        (s + hs) / (c - hc),
        (s + hs) / (c + hc),
    ];
    Some((
        r.iter().copied().fold(f64::INFINITY, f64::min),
        r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ))
}
