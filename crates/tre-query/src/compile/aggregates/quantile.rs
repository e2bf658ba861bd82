//! MEDIAN and percentile_cont: OpenDP's private quantile (the exponential
//! mechanism) over a histogram of the clamped value in equal buckets,
//! judged by the noisy count of the values. Its sensitivity is the rows
//! one patient has, not a value bound.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{Expr, lit, try_cast};
use tre_core::Code;

use super::{
    Call, Compiled, DpAggregate, Draft, Drafts, Family, MeasurementId, Noisy, Sensitivity, clamped,
    value_cell,
};
use crate::QueryError;
use crate::compile::relation::scalar_f64;
use crate::compile::{Measure, Measurement, Mechanism, QUANTILE_BUCKETS, refuse, unalias};
use crate::release::Cell;

pub(super) const FAMILY: Family = Family {
    names: &[
        "median",
        "approx_median",
        "percentile_cont",
        "quantile_cont",
        "approx_percentile_cont",
    ],
    distinct: false,
    order_by: true,
    compile,
};

/// A private quantile, judged by the noisy count of its values.
#[derive(Debug)]
pub(super) struct Quantile {
    m: MeasurementId,
    count: MeasurementId,
    /// `quantile`, or the name of an aggregate defined as one (`min`).
    pub(super) kind: &'static str,
}

fn compile(call: &Call<'_>, drafts: &mut Drafts) -> Compiled {
    let name = call.name.as_str();
    let a = call.required_arg()?;
    let mut alpha = if name.contains("median") {
        0.5
    } else {
        match call.params.args.get(1).map(unalias) {
            Some(Expr::Literal(v, _)) => scalar_f64(v).filter(|p| (0.0..=1.0).contains(p)),
            _ => None,
        }
        .ok_or_else(|| {
            refuse(
                Code::UnsupportedAggregate,
                format!("{name} needs a literal fraction between 0 and 1, e.g. percentile_cont(0.9) WITHIN GROUP (ORDER BY x)"),
            )
        })?
    };
    if call.params.order_by.first().is_some_and(|s| !s.asc) {
        alpha = 1.0 - alpha;
    }
    Ok(Arc::new(draft(call, a, alpha, "quantile", drafts)?))
}

/// The `alpha`-quantile of `a`, as the column `kind`: its histogram
/// measurement and the count of its values.
pub(super) fn draft(
    call: &Call<'_>,
    a: &Expr,
    alpha: f64,
    kind: &'static str,
    drafts: &mut Drafts,
) -> Result<Quantile, QueryError> {
    let (x, lo, hi) = call.bounded(a)?;
    let width = (hi - lo) / QUANTILE_BUCKETS as f64;
    let c = call.gate(clamped(x, lo, hi)?)?;
    let bucket = try_cast(
        datafusion::functions::math::expr_fn::floor((c.clone() - lit(lo)) * lit(1.0 / width)),
        DataType::Int64,
    );
    let m = drafts.push(Draft {
        measure: Measure::Quantile {
            expr: a.to_string(),
            alpha,
            lo,
            hi,
        },
        expr: bucket,
        sensitivity: Sensitivity::Rows,
    });
    let count = drafts.reuse_or_push(Draft {
        measure: Measure::CountNonNull {
            expr: a.to_string(),
        },
        expr: count(c),
        sensitivity: Sensitivity::L1(call.rows()?),
    });
    Ok(Quantile { m, count, kind })
}

impl DpAggregate for Quantile {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn measurements(&self) -> Vec<MeasurementId> {
        vec![self.m, self.count]
    }

    fn describe(&self, measurements: &[Measurement], _alpha: f64) -> (String, f64, Option<f64>) {
        match measurements.get(self.m.index()).map(|m| &m.mechanism) {
            Some(Mechanism::Quantile(q)) => (
                "exponential mechanism (OpenDP private quantile)".into(),
                q.scale(),
                None,
            ),
            _ => (String::new(), 0.0, None),
        }
    }

    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError> {
        let out = noisy.profile.derived_cell(
            noisy.value(self.m, cell)?,
            noisy.value(self.count, cell)? as i64,
        );
        Ok(value_cell(out.value, None, out.status, out.reason))
    }
}
