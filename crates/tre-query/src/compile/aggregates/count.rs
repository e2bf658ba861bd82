//! COUNT(*), COUNT(x) and COUNT(DISTINCT unit): one discrete Laplace
//! count per cell, judged by the profile's count rules (threshold and
//! rounding). Totals add up count columns only.

use std::sync::Arc;

use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
use datafusion::logical_expr::{Expr, lit};
use tre_core::Code;

use super::{
    Call, Compiled, DpAggregate, Draft, Drafts, Family, MeasurementId, Noisy, Sensitivity,
    laplace_scale, value_cell,
};
use crate::QueryError;
use crate::compile::relation::{self, Info};
use crate::compile::{Measure, Measurement, refuse};
use crate::release::Cell;

pub(super) const FAMILY: Family = Family {
    names: &["count"],
    distinct: true,
    order_by: false,
    compile,
};

#[derive(Debug)]
struct Count {
    m: MeasurementId,
    kind: &'static str,
}

fn compile(call: &Call<'_>, drafts: &mut Drafts) -> Compiled {
    let scope = call.scope;
    let kk = call.rows()?;
    let arg = call.arg();
    let is_unit = matches!(arg, Some(Expr::Column(c)) if scope.schema.index_of_column(c).ok().map(|i| &scope.rel.cols[i]) == Some(&Info::Unit));
    if call.params.distinct {
        if !is_unit {
            return Err(refuse(
                Code::UnsupportedAggregate,
                format!(
                    "COUNT(DISTINCT ...) is supported only for the privacy unit: COUNT(DISTINCT {unit}) counts patients",
                    unit = scope.unit
                ),
            ));
        }
        let Some(u) = scope.unit_col else {
            return Err(QueryError::Internal("unit column vanished".into()));
        };
        // A patient is counted once per cell it touches.
        let s = kk
            .min(i64::try_from(scope.touchable).unwrap_or(i64::MAX))
            .max(1);
        let m = drafts.push(Draft {
            measure: Measure::CountDistinctUnits,
            expr: count_distinct(call.gate(Expr::Column(u.clone()))?),
            sensitivity: Sensitivity::L1(s),
        });
        return Ok(Arc::new(Count {
            m,
            kind: "count_distinct_units",
        }));
    }
    let (measure, x) = match arg {
        None | Some(Expr::Literal(..)) => (Measure::CountRows, lit(1i64)),
        Some(a) if is_unit => (Measure::CountRows, a.clone()),
        // Counting non-null values of a column reveals no value.
        Some(Expr::Column(c)) => (
            Measure::CountNonNull {
                expr: c.to_string(),
            },
            Expr::Column(c.clone()),
        ),
        Some(a) => {
            relation::check_no_identifiers(
                a,
                scope.schema,
                scope.rel,
                Code::IdentifierInExpression,
            )?;
            (
                Measure::CountNonNull {
                    expr: a.to_string(),
                },
                a.clone(),
            )
        }
    };
    let m = drafts.push(Draft {
        measure,
        expr: count(call.gate(x)?),
        sensitivity: Sensitivity::L1(kk),
    });
    Ok(Arc::new(Count { m, kind: "count" }))
}

impl DpAggregate for Count {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn measurements(&self) -> Vec<MeasurementId> {
        vec![self.m]
    }

    fn describe(&self, measurements: &[Measurement], alpha: f64) -> (String, f64, Option<f64>) {
        let (scale, hw) = laplace_scale(measurements, self.m, 1.0, alpha);
        ("discrete Laplace".into(), scale, hw)
    }

    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError> {
        let hw = noisy.half_width(self.m, noisy.alpha)? + noisy.profile.rounding_slack();
        let out = noisy.profile.count_cell(noisy.value(self.m, cell)? as i64);
        Ok(value_cell(
            out.value,
            out.value.map(|v| ((v - hw).max(0.0), v + hw)),
            out.status,
            out.reason,
        ))
    }

    fn total(&self) -> Option<MeasurementId> {
        Some(self.m)
    }
}
