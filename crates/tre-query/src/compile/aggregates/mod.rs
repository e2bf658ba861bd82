//! The DP aggregates: one [`DpAggregate`] implementation per family, one
//! file each (issue #12). A family owns everything its aggregates need:
//! the SQL names it answers to, the measurements it asks for (with their
//! sensitivities and the rewrite of their input), how a released cell is
//! made from the noisy measurements (value, interval, disclosure control),
//! and how its column is described. The rest of the compiler and of
//! execution sees only the trait, and measurements are referred to by a
//! typed [`MeasurementId`], never a bare index.
//!
//! Adding an aggregate is one new file here plus its line in [`FAMILIES`].

mod count;
mod extremes;
mod moments;
mod quantile;
mod sum;

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams};
use datafusion::logical_expr::{Expr, lit, try_cast, when};
use tre_core::Code;
use tre_dp::DiscreteLaplace;
use tre_sdc::Profile;

use super::relation::{self, Rel, expr_range};
use super::{FIXED_POINT_SCALE, Measure, Measurement, Mechanism, refuse, unalias};
use crate::QueryError;
use crate::release::Cell;

/// One of the plan's measurements, as an aggregate refers to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MeasurementId(usize);

impl MeasurementId {
    pub(crate) fn index(self) -> usize {
        self.0
    }
}

/// One released aggregate column: what it measures and how its cells are
/// made from the noisy measurements.
pub(crate) trait DpAggregate: std::fmt::Debug + Send + Sync {
    /// The column's kind in the release (`count`, `sum`, `avg`, ...).
    fn kind(&self) -> &'static str;
    /// Every measurement the column reads; each is charged, so each must
    /// be read by some column (`verify`).
    fn measurements(&self) -> Vec<MeasurementId>;
    /// Mechanism in words, noise scale, and (where it does not depend on
    /// the data) the expected 95% half-width of a cell.
    fn describe(&self, measurements: &[Measurement], alpha: f64) -> (String, f64, Option<f64>);
    /// Cell `cell` of the column: value, interval and disclosure status,
    /// from noisy measurements only.
    fn cell(&self, noisy: &Noisy<'_>, cell: usize) -> Result<Cell, QueryError>;
    /// The count measurement totals add up, for a plain count column.
    fn total(&self) -> Option<MeasurementId> {
        None
    }
    /// The sum whose per-patient contributions the profile's rules on
    /// exact values judge (dominance, p-ratio), for a SUM column.
    fn exact_sum(&self) -> Option<MeasurementId> {
        None
    }
}

/// A family of aggregates: the SQL names it answers to and how it
/// compiles one call.
struct Family {
    names: &'static [&'static str],
    /// Takes `DISTINCT` (only COUNT(DISTINCT unit) does).
    distinct: bool,
    /// Takes `WITHIN GROUP (ORDER BY ...)` (percentiles).
    order_by: bool,
    compile: fn(&Call<'_>, &mut Drafts) -> Compiled,
}

/// A compiled aggregate column, or why it is refused.
type Compiled = Result<Arc<dyn DpAggregate>, QueryError>;

/// Every family, in the order the refusal text lists them.
const FAMILIES: &[Family] = &[
    count::FAMILY,
    sum::FAMILY,
    moments::FAMILY,
    quantile::FAMILY,
    extremes::FAMILY,
];

/// What compiling one aggregate call sees.
pub(crate) struct Scope<'a> {
    pub(crate) schema: &'a DFSchema,
    pub(crate) rel: &'a Rel,
    pub(crate) unit_col: Option<&'a Column>,
    /// Rows one patient contributes to the aggregate.
    pub(crate) k: u64,
    /// Cells one patient can touch.
    pub(crate) touchable: u64,
    /// The privacy unit's column name, for messages.
    pub(crate) unit: &'a str,
}

/// One aggregate call being compiled.
pub(crate) struct Call<'a> {
    scope: &'a Scope<'a>,
    /// Lower-case function name.
    name: String,
    params: &'a AggregateFunctionParams,
    /// `FILTER (WHERE c)`, applied as `CASE WHEN c THEN x END`.
    filter: Option<Expr>,
}

impl Call<'_> {
    fn k(&self) -> u64 {
        self.scope.k
    }

    /// Rows per patient as the L1 sensitivity of a count.
    fn rows(&self) -> Result<i64, QueryError> {
        i64::try_from(self.scope.k)
            .map_err(|_| QueryError::Internal("rows per patient overflow".into()))
    }

    fn arg(&self) -> Option<&Expr> {
        self.params.args.first().map(unalias)
    }

    /// The one argument, or a refusal naming the aggregate.
    fn required_arg(&self) -> Result<&Expr, QueryError> {
        self.arg().ok_or_else(|| {
            refuse(
                Code::UnsupportedAggregate,
                format!("{} needs an argument", self.name),
            )
        })
    }

    /// `x` under the call's FILTER, if any.
    fn gate(&self, x: Expr) -> Result<Expr, QueryError> {
        match &self.filter {
            Some(f) => when(f.clone(), x)
                .end()
                .map_err(|e| QueryError::Internal(e.to_string())),
            None => Ok(x),
        }
    }

    /// The argument with the bounds its value is clamped to.
    fn bounded(&self, a: &Expr) -> Result<(Expr, f64, f64), QueryError> {
        match expr_range(a, self.scope.schema, self.scope.rel)? {
            Some((lo, hi)) if lo < hi => Ok((a.clone(), lo, hi)),
            Some((lo, hi)) => Ok((a.clone(), lo - 0.5, hi + 0.5)),
            None => Err(refuse(
                Code::UnboundedColumn,
                format!(
                    "{}({a}) needs bounds on its argument, and none can be derived from the policy; wrap it as clamp({a}, lo, hi)",
                    self.name
                ),
            )),
        }
    }
}

/// Compile one aggregate of the release into measurements (added to
/// `drafts`) and the column that reads them.
pub(crate) fn aggregate(e: &Expr, scope: &Scope<'_>, drafts: &mut Drafts) -> Compiled {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(e) else {
        return Err(refuse(
            Code::UnsupportedAggregate,
            format!("{e} is not a supported aggregate"),
        ));
    };
    let name = func.name().to_lowercase();
    let family = FAMILIES.iter().find(|f| f.names.contains(&name.as_str()));
    // FILTER (WHERE c) becomes CASE WHEN c THEN arg END.
    let filter = match &params.filter {
        Some(f) => {
            relation::check_no_identifiers(f, scope.schema, scope.rel, Code::IdentifierInFilter)?;
            Some(f.as_ref().clone())
        }
        None => None,
    };
    if !params.order_by.is_empty() && !family.is_some_and(|f| f.order_by) {
        return Err(refuse(
            Code::UnsupportedAggregate,
            format!("{name} with ORDER BY is not supported"),
        ));
    }
    let unit = scope.unit;
    if params.distinct && !family.is_some_and(|f| f.distinct) {
        return Err(refuse(
            Code::UnsupportedAggregate,
            format!("{name}(DISTINCT ...) is not supported; only COUNT(DISTINCT {unit}) is"),
        ));
    }
    let Some(family) = family else {
        return Err(refuse(
            Code::UnsupportedAggregate,
            format!(
                "aggregate '{name}' is not supported; use COUNT, COUNT(DISTINCT {unit}), SUM, AVG, VARIANCE, STDDEV, MEDIAN, percentile_cont, MIN or MAX"
            ),
        ));
    };
    let call = Call {
        scope,
        name,
        params,
        filter,
    };
    (family.compile)(&call, drafts)
}

/// How a measurement's sensitivity is stated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sensitivity {
    /// L1 sensitivity over all cells, for discrete Laplace.
    L1(i64),
    /// Quantile: a patient changes at most `k_total` rows.
    Rows,
}

/// A measurement before its share of ε is known.
pub(crate) struct Draft {
    pub(crate) measure: Measure,
    /// The aggregate computed per cell (Laplace), or the bucket expression
    /// (quantile).
    pub(crate) expr: Expr,
    pub(crate) sensitivity: Sensitivity,
}

/// The measurements the release's aggregates ask for, in order.
#[derive(Default)]
pub(crate) struct Drafts(Vec<Draft>);

impl Drafts {
    fn push(&mut self, d: Draft) -> MeasurementId {
        self.0.push(d);
        MeasurementId(self.0.len() - 1)
    }

    /// A measurement that disclosure control needs (a cell's noisy count)
    /// may already be asked for, e.g. by AVG of the same value: share it.
    fn reuse_or_push(&mut self, d: Draft) -> MeasurementId {
        match self
            .0
            .iter()
            .position(|x| x.expr == d.expr && x.sensitivity == d.sensitivity)
        {
            Some(i) => MeasurementId(i),
            None => self.push(d),
        }
    }

    pub(crate) fn all(&self) -> &[Draft] {
        &self.0
    }
}

/// Each drafted measurement's mechanism at its share `eps_each` of ε:
/// discrete Laplace at its L1 sensitivity, or OpenDP's private quantile
/// calibrated for `k_total` rows per patient.
pub(crate) fn mechanisms(
    drafts: &[Draft],
    eps_each: tre_core::Epsilon,
    k_total: u64,
) -> Result<Vec<Measurement>, QueryError> {
    let dp = |e: tre_dp::DpError| QueryError::Internal(e.to_string());
    let mut measurements = Vec::with_capacity(drafts.len());
    for d in drafts {
        let mechanism = match &d.sensitivity {
            Sensitivity::L1(s) => {
                Mechanism::Laplace(DiscreteLaplace::new(*s, eps_each).map_err(dp)?)
            }
            Sensitivity::Rows => {
                let rows = u32::try_from(k_total).map_err(|_| {
                    refuse(
                        Code::UnsupportedAggregate,
                        "too many rows per patient for a quantile; join fewer tables",
                    )
                })?;
                let Measure::Quantile { alpha, .. } = d.measure else {
                    return Err(QueryError::Internal("quantile sensitivity on a sum".into()));
                };
                Mechanism::Quantile(
                    tre_dp::Quantile::new(alpha, super::QUANTILE_BUCKETS, rows, eps_each)
                        .map_err(dp)?,
                )
            }
        };
        measurements.push(Measurement {
            measure: d.measure.clone(),
            mechanism,
        });
    }
    Ok(measurements)
}

/// The L1 sensitivity of a fixed-point sum of values within `±bound`.
fn fixed_sensitivity(k: u64, bound: f64) -> Result<i64, QueryError> {
    let per_row = (bound * FIXED_POINT_SCALE).ceil().max(1.0);
    let k = i64::try_from(k).ok();
    let per_row = (per_row < 9.0e15).then_some(per_row as i64);
    k.zip(per_row)
        .and_then(|(k, p)| k.checked_mul(p))
        .ok_or_else(|| {
            refuse(
                Code::UnboundedColumn,
                "the value bounds times the rows per patient are too large to sum safely; clamp(expr, lo, hi) to a narrower range",
            )
        })
}

/// `x` as Float64, clamped to `[lo, hi]`. The cast cannot fail
/// (`TRY_CAST`), and NaN (which compares above every number) becomes `hi`.
fn clamped(x: Expr, lo: f64, hi: f64) -> Result<Expr, QueryError> {
    let x = try_cast(x, DataType::Float64);
    when(
        x.clone().gt_eq(lit(lo)).and(x.clone().lt_eq(lit(hi))),
        x.clone(),
    )
    .when(x.clone().lt(lit(lo)), lit(lo))
    .when(x.gt(lit(hi)), lit(hi))
    .end()
    .map_err(|e| QueryError::Internal(e.to_string()))
}

/// Round to the fixed-point grid as an exact decimal. `x` is clamped to
/// bounds whose fixed-point value fits an i64 (`fixed_sensitivity`), so
/// the cast always succeeds; it is a `TRY_CAST` all the same.
fn fixed(x: Expr) -> Expr {
    let scaled = x * lit(FIXED_POINT_SCALE);
    try_cast(
        datafusion::functions::math::expr_fn::round(vec![scaled]),
        DataType::Decimal128(38, 0),
    )
}

/// The noisy measurements of every cell, and what turning them into
/// released cells needs.
pub(crate) struct Noisy<'a> {
    pub(crate) profile: &'a Profile,
    pub(crate) measurements: &'a [Measurement],
    /// Per measurement, per cell.
    pub(crate) values: &'a [Vec<f64>],
    /// 1 − the intervals' confidence.
    pub(crate) alpha: f64,
}

impl Noisy<'_> {
    fn value(&self, m: MeasurementId, cell: usize) -> Result<f64, QueryError> {
        self.values
            .get(m.0)
            .and_then(|v| v.get(cell))
            .copied()
            .ok_or_else(|| QueryError::Internal(format!("no noisy value for measurement {}", m.0)))
    }

    fn laplace(&self, m: MeasurementId) -> Result<&DiscreteLaplace, QueryError> {
        laplace(self.measurements, m)
            .ok_or_else(|| QueryError::Internal("expected a Laplace measurement".into()))
    }

    /// The 95% half-width of a Laplace measurement at confidence
    /// `1 − alpha`, in the measurement's units.
    fn half_width(&self, m: MeasurementId, alpha: f64) -> Result<f64, QueryError> {
        self.laplace(m)?
            .half_width(alpha)
            .map_err(|e| QueryError::Internal(e.to_string()))
    }
}

/// Measurement `m`'s discrete Laplace mechanism, if it has one.
pub(crate) fn laplace(measurements: &[Measurement], m: MeasurementId) -> Option<&DiscreteLaplace> {
    match measurements.get(m.0).map(|m| &m.mechanism) {
        Some(Mechanism::Laplace(l)) => Some(l),
        _ => None,
    }
}

/// Noise scale and expected half-width of a Laplace measurement, in units
/// of `unit` (fixed-point measurements are scaled back).
fn laplace_scale(
    measurements: &[Measurement],
    m: MeasurementId,
    unit: f64,
    alpha: f64,
) -> (f64, Option<f64>) {
    let l = laplace(measurements, m);
    (
        l.map_or(0.0, |l| l.scale() / unit),
        l.and_then(|l| l.half_width(alpha).ok()).map(|h| h / unit),
    )
}

pub(crate) fn value_cell(
    value: Option<f64>,
    interval: Option<(f64, f64)>,
    status: tre_sdc::Status,
    reason: String,
) -> Cell {
    Cell::Value {
        value,
        ci_low: interval.map(|i| i.0),
        ci_high: interval.map(|i| i.1),
        status,
        reason,
    }
}

/// A cell whose noisy denominator leaves no value to release.
fn suppressed(reason: &str) -> Cell {
    value_cell(None, None, tre_sdc::Status::Suppressed, reason.into())
}
