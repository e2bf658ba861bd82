//! SUM(x): a fixed-point discrete Laplace sum of x clamped to its bounds,
//! judged by the noisy number of rows contributing to it. A sum of values
//! in [0, 1] counts something, so it is judged like a count.

use std::sync::Arc;

use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{lit, when};

use super::{
    Call, Compiled, DpAggregate, Draft, Drafts, Family, MeasurementId, Noisy, Sensitivity, clamped,
    fixed, fixed_sensitivity, laplace_scale, value_cell,
};
use crate::QueryError;
use crate::compile::relation::expr_range;
use crate::compile::{FIXED_POINT_SCALE, Measure, Measurement};
use crate::release::Cell;

pub(super) const FAMILY: Family = Family {
    names: &["sum"],
    distinct: false,
    order_by: false,
    compile,
};

#[derive(Debug)]
struct Sum {
    m: MeasurementId,
    /// Rows whose value is not zero: what disclosure control judges.
    contributors: MeasurementId,
    count_like: bool,
}

fn compile(call: &Call<'_>, drafts: &mut Drafts) -> Compiled {
    let a = call.required_arg()?;
    let count_like = expr_range(a, call.scope.schema, call.scope.rel)?
        .is_some_and(|(lo, hi)| lo >= 0.0 && hi <= 1.0);
    let (x, lo, hi) = call.bounded(a)?;
    let s = fixed_sensitivity(call.k(), lo.abs().max(hi.abs()))?;
    let value = fixed(call.gate(clamped(x, lo, hi)?)?);
    let m = drafts.push(Draft {
        measure: Measure::Sum {
            expr: a.to_string(),
            lo,
            hi,
        },
        expr: sum(value.clone()),
        sensitivity: Sensitivity::L1(s),
    });
    let zero = lit(ScalarValue::Decimal128(Some(0), 38, 0));
    let contributors = drafts.reuse_or_push(Draft {
        measure: Measure::Contributors {
            expr: a.to_string(),
        },
        expr: count(
            when(value.not_eq(zero), lit(1i64))
                .end()
                .map_err(|e| QueryError::Internal(e.to_string()))?,
        ),
        sensitivity: Sensitivity::L1(call.rows()?),
    });
    Ok(Arc::new(Sum {
        m,
        contributors,
        count_like,
    }))
}

impl DpAggregate for Sum {
    fn kind(&self) -> &'static str {
        "sum"
    }

    fn measurements(&self) -> Vec<MeasurementId> {
        vec![self.m, self.contributors]
    }

    fn describe(&self, measurements: &[Measurement], alpha: f64) -> (String, f64, Option<f64>) {
        let (scale, hw) = laplace_scale(measurements, self.m, FIXED_POINT_SCALE, alpha);
        ("discrete Laplace (fixed point)".into(), scale, hw)
    }

    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError> {
        let profile = noisy.profile;
        let hw = noisy.half_width(self.m, noisy.alpha)? / FIXED_POINT_SCALE;
        let v = noisy.value(self.m, cell)? / FIXED_POINT_SCALE;
        let out = if self.count_like {
            profile.count_cell(v.round() as i64)
        } else {
            profile.derived_cell(v, noisy.value(self.contributors, cell)? as i64)
        };
        let hw = if self.count_like {
            hw + profile.rounding_slack()
        } else {
            hw
        };
        Ok(value_cell(
            out.value,
            out.value.map(|v| (v - hw, v + hw)),
            out.status,
            out.reason,
        ))
    }

    fn exact_sum(&self) -> Option<MeasurementId> {
        Some(self.m)
    }
}
