//! SQL → [`PrivatePlan`]. An explicit compile step, not an optimizer rule:
//!
//! 1. parse one statement and plan it in DataFusion (type-coerced);
//! 2. refuse node kinds and functions that are never allowed, anywhere,
//!    including inside subqueries;
//! 3. find the release aggregate (the first aggregate under the
//!    post-processing chain of Projection / Filter (HAVING) / Sort / Limit)
//!    and analyse the relation it reads ([`relation`]): the privacy unit,
//!    rows per patient, and each column's public domain and value range;
//! 4. turn each aggregate into noisy measurements whose sensitivity follows
//!    from the policy alone, and each group key into a public domain or a
//!    DP key selection;
//! 5. rewrite: private scans become bounded scans (opt-outs removed, at most
//!    `max_rows_per_unit` rows per patient chosen at random), values are
//!    clamped to the derived bounds and summed in fixed point;
//! 6. verify: every released column passes through a mechanism and the cost
//!    charged is the cost of the mechanisms built.
//!
//! HAVING, ORDER BY, LIMIT and arithmetic over aggregates run afterwards,
//! on noisy values only (see `execute`).

mod aggregates;
mod bounds;
mod relation;
mod total;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
use datafusion::functions_window::expr_fn::{dense_rank, row_number};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder, lit, when,
};
use datafusion::prelude::{SessionContext, col};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use tre_core::{Code, Delta, Epsilon};
use tre_dp::{CONFIDENCE, DiscreteLaplace, KeySelection, Quantile};
use tre_policy::{Policy, TablePolicy};

use self::aggregates::{DpAggregate, Sensitivity};
pub(crate) use self::aggregates::{Noisy, value_cell};
use self::relation::{Analyzer, Info, Rel, expr_bounds, index};
use crate::reference::RefTables;
use crate::release::ReleaseColumn;
use crate::udf::Internal;
use crate::{Limits, QueryError};

/// Sums are computed over values clamped and scaled to this fixed-point
/// grid, as exact 128-bit decimals, so a sum's sensitivity is exact and no
/// floating-point rounding can change it (Casacuberta et al., 2022), and
/// overflow is checked when the total is read back.
pub const FIXED_POINT_SCALE: f64 = 100.0;
/// Quantiles are chosen among this many equal steps of the value's bounds.
const QUANTILE_BUCKETS: i64 = 400;

pub(crate) fn refuse(code: Code, message: impl Into<String>) -> QueryError {
    QueryError::refused(code, message)
}

pub(crate) fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

/// What one noisy measurement computes, per cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    CountRows,
    CountNonNull {
        expr: String,
    },
    CountDistinctUnits,
    /// Rows whose value of `expr` (clamped, in fixed point) is not zero:
    /// the contributors a SUM cell is judged by (disclosure control).
    Contributors {
        expr: String,
    },
    /// Σ x over x clamped to `[lo, hi]`, in fixed point.
    Sum {
        expr: String,
        lo: f64,
        hi: f64,
    },
    /// Σ (x − mid) over x clamped to `mid ± half`, in fixed point.
    CenteredSum {
        expr: String,
        mid: f64,
        half: f64,
    },
    /// Σ (x − mid)² over x clamped to `mid ± half`, in fixed point.
    CenteredSquares {
        expr: String,
        mid: f64,
        half: f64,
    },
    /// The `alpha`-quantile of x clamped to `[lo, hi]`.
    Quantile {
        expr: String,
        alpha: f64,
        lo: f64,
        hi: f64,
    },
}

impl Measure {
    fn fixed_point(&self) -> bool {
        matches!(
            self,
            Measure::Sum { .. } | Measure::CenteredSum { .. } | Measure::CenteredSquares { .. }
        )
    }

    /// The measure in words, for dry runs and notes.
    pub fn describe(&self, unit: &str) -> String {
        match self {
            Measure::CountRows => "COUNT(*)".into(),
            Measure::CountNonNull { expr } => format!("COUNT({expr})"),
            Measure::CountDistinctUnits => format!("COUNT(DISTINCT {unit})"),
            Measure::Contributors { expr } => {
                format!("COUNT(rows where {expr} is not 0), for disclosure control")
            }
            Measure::Sum { expr, lo, hi } => format!("SUM({expr}) clamped to [{lo}, {hi}]"),
            Measure::CenteredSum { expr, mid, half } => {
                format!("SUM({expr} − {mid}) clamped to {mid} ± {half}")
            }
            Measure::CenteredSquares { expr, mid, half } => {
                format!("SUM(({expr} − {mid})²) clamped to {mid} ± {half}")
            }
            // The 0- and 1-quantiles are how MIN and MAX are released; one
            // patient decides an exact extreme, so say what comes out.
            Measure::Quantile {
                expr, alpha, lo, ..
            } if *alpha <= 0.0 => format!(
                "MIN({expr}) as the private 0-quantile: a value between the bound {lo} and the true minimum (narrower bounds, or a low percentile, answer more sharply)"
            ),
            Measure::Quantile {
                expr, alpha, hi, ..
            } if *alpha >= 1.0 => format!(
                "MAX({expr}) as the private 1-quantile: a value between the true maximum and the bound {hi} (narrower bounds, or a high percentile, answer more sharply)"
            ),
            Measure::Quantile {
                expr,
                alpha,
                lo,
                hi,
            } => {
                format!("QUANTILE({alpha}) of {expr} over [{lo}, {hi}]")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Mechanism {
    Laplace(DiscreteLaplace),
    Quantile(Quantile),
}

impl Mechanism {
    pub(crate) fn epsilon(&self) -> f64 {
        match self {
            Mechanism::Laplace(m) => m.epsilon(),
            Mechanism::Quantile(q) => q.epsilon(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    pub(crate) measure: Measure,
    pub(crate) mechanism: Mechanism,
}

/// A group key of the release: a public domain released in full, or a key
/// chosen by DP key selection.
#[derive(Debug, Clone)]
pub(crate) struct GroupKey {
    pub(crate) name: String,
    pub(crate) domain: Option<Vec<ScalarValue>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub(crate) plan: LogicalPlan,
    /// Indexes of the selected keys among the group keys.
    pub(crate) keys: Vec<usize>,
    pub(crate) mechanism: KeySelection,
}

/// A column of the final (post-processed) table.
#[derive(Debug, Clone)]
pub(crate) struct FinalColumn {
    pub(crate) name: String,
    /// The release aggregate's output it passes through unchanged.
    pub(crate) source: Option<usize>,
}

/// A checked, rewritten query and its cost. Holds no data.
#[derive(Debug, Clone)]
pub struct PrivatePlan {
    pub(crate) sql: String,
    pub(crate) epsilon: Epsilon,
    pub(crate) delta: Delta,
    pub(crate) plan_hash: String,
    /// Keys and Laplace measurements per cell.
    pub(crate) main: LogicalPlan,
    /// Per quantile measurement: keys, bucket and row count.
    pub(crate) quantiles: Vec<(usize, LogicalPlan)>,
    pub(crate) selection: Option<Selection>,
    pub(crate) keys: Vec<GroupKey>,
    pub(crate) measurements: Vec<Measurement>,
    /// The released aggregate columns, in the release aggregate's order.
    pub(crate) aggs: Vec<Arc<dyn DpAggregate>>,
    /// The release aggregate's output schema (keys, then aggregates).
    pub(crate) agg_schema: DFSchemaRef,
    /// The researcher's plan; its release aggregate is replaced by the
    /// noisy table at execution.
    pub(crate) post: LogicalPlan,
    pub(crate) columns: Vec<FinalColumn>,
    pub(crate) description: Vec<String>,
    pub(crate) k_total: u64,
    /// The most work units one row of the aggregated relation can cost.
    pub(crate) row_work: f64,
    /// Release row, column and grand totals of the count columns.
    pub(crate) totals: bool,
    /// The privacy unit in the aggregated relation, for rules on exact
    /// per-patient contributions (opt-in per profile).
    pub(crate) unit: Option<Column>,
}

/// Tables with totals stay small enough for secondary suppression.
const MAX_CELLS_WITH_TOTALS: usize = 400;

impl PrivatePlan {
    /// Ask for totals: a grand total for one key; row, column and grand
    /// totals for two. They are sums of the noisy cells (post-processing)
    /// and get secondary suppression, so no suppressed cell can be solved
    /// from the cells and totals shown. Only plain tables qualify: one or
    /// two public keys, COUNT columns, no HAVING, ORDER BY or LIMIT.
    pub fn with_totals(mut self) -> Result<Self, QueryError> {
        let refuse_totals = |why: &str| {
            refuse(
                Code::TotalsShape,
                format!("totals need {why}; drop the totals option or simplify the query"),
            )
        };
        if !(1..=2).contains(&self.keys.len()) || self.keys.iter().any(|k| k.domain.is_none()) {
            return Err(refuse_totals("one or two group keys with public domains"));
        }
        if self.aggs.iter().any(|a| a.total().is_none()) {
            return Err(refuse_totals("COUNT columns only"));
        }
        let pass_through = self.columns.len() == self.keys.len() + self.aggs.len()
            && self
                .columns
                .iter()
                .enumerate()
                .all(|(i, c)| c.source == Some(i));
        fn plain(p: &LogicalPlan) -> bool {
            match p {
                LogicalPlan::Aggregate(_) => true,
                LogicalPlan::Projection(p) => plain(&p.input),
                LogicalPlan::SubqueryAlias(a) => plain(&a.input),
                _ => false,
            }
        }
        if !pass_through || !plain(&self.post) {
            return Err(refuse_totals(
                "the keys, then the counts, in SELECT, and no HAVING, ORDER BY or LIMIT",
            ));
        }
        if self.cells().is_none_or(|c| c > MAX_CELLS_WITH_TOTALS) {
            return Err(refuse_totals(&format!(
                "at most {MAX_CELLS_WITH_TOTALS} cells"
            )));
        }
        self.totals = true;
        self.plan_hash = hex_digest(format!("{}\ntotals", self.plan_hash).as_bytes());
        self.description.push(
            "totals: sums of the noisy cells, rounded and checked like cells; secondary suppression hides further cells so that no suppressed cell can be worked out from the cells and totals shown".into(),
        );
        Ok(self)
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }
    /// The epsilon that will be charged.
    pub fn epsilon(&self) -> Epsilon {
        self.epsilon
    }
    /// The delta that will be charged (zero unless keys are selected).
    pub fn delta(&self) -> Delta {
        self.delta
    }
    pub fn plan_hash(&self) -> &str {
        &self.plan_hash
    }
    /// The accepted plan in words, for dry runs.
    pub fn description(&self) -> &[String] {
        &self.description
    }
    /// Rows one patient can contribute to the aggregate.
    pub fn max_rows_per_unit(&self) -> u64 {
        self.k_total
    }
    /// Cells released when all keys are public; `None` when keys are
    /// selected (the count is known only after selection).
    pub fn cells(&self) -> Option<usize> {
        self.keys
            .iter()
            .map(|k| k.domain.as_ref().map(Vec::len))
            .product()
    }
    pub fn public_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| k.domain.is_some())
            .map(|k| k.name.clone())
            .collect()
    }
    pub fn selected_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| k.domain.is_none())
            .map(|k| k.name.clone())
            .collect()
    }
    /// `(measure, sensitivity, epsilon)` per measurement; for quantiles
    /// the sensitivity is the rows per patient (symmetric distance).
    pub fn measures(&self) -> Vec<(Measure, i64, f64)> {
        self.measurements
            .iter()
            .map(|m| {
                let s = match &m.mechanism {
                    Mechanism::Laplace(l) => l.sensitivity(),
                    Mechanism::Quantile(q) => i64::from(q.max_rows()),
                };
                (m.measure.clone(), s, m.mechanism.epsilon())
            })
            .collect()
    }
    /// The discrete Laplace scale of measurement `m`, in its integer units
    /// (`None` for a quantile).
    pub fn laplace_scale(&self, m: usize) -> Option<f64> {
        match self.measurements.get(m).map(|x| &x.mechanism) {
            Some(Mechanism::Laplace(l)) => Some(l.scale()),
            _ => None,
        }
    }
    /// Key selection's `(epsilon, delta)`.
    pub fn key_selection_cost(&self) -> Option<(f64, f64)> {
        self.selection
            .as_ref()
            .map(|s| (s.mechanism.epsilon(), s.mechanism.delta()))
    }
    /// Key selection's `(threshold, scale, max groups per patient)`.
    pub fn key_selection(&self) -> Option<(i64, f64, u32)> {
        self.selection.as_ref().map(|s| {
            (
                s.mechanism.threshold(),
                s.mechanism.scale(),
                s.mechanism.max_groups(),
            )
        })
    }
    /// A one-line summary of the accepted plan, compared exactly by the
    /// conformance corpus.
    pub fn shape(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| match &k.domain {
                Some(d) => format!("{}:public({})", k.name, d.len()),
                None => format!("{}:selected", k.name),
            })
            .collect();
        let measures: Vec<String> = self
            .measures()
            .into_iter()
            .map(|(m, s, _)| {
                let kind = match m {
                    Measure::CountRows => "count",
                    Measure::CountNonNull { .. } => "count_col",
                    Measure::CountDistinctUnits => "count_units",
                    Measure::Contributors { .. } => "contrib",
                    Measure::Sum { .. } => "sum",
                    Measure::CenteredSum { .. } => "csum",
                    Measure::CenteredSquares { .. } => "csq",
                    Measure::Quantile { .. } => "quantile",
                };
                format!("{kind}/{s}")
            })
            .collect();
        let mut s = format!(
            "rows/unit={} keys=[{}] measures=[{}]",
            self.k_total,
            keys.join(","),
            measures.join(",")
        );
        if let Some((t, _, g)) = self.key_selection() {
            let _ = write!(s, " select(threshold={t},groups={g})");
        }
        s
    }
    /// The released columns with their mechanisms and noise scales.
    pub fn columns(&self) -> Vec<ReleaseColumn> {
        let alpha = 1.0 - CONFIDENCE;
        let n_keys = self.keys.len();
        self.columns
            .iter()
            .map(|c| {
                let (kind, mechanism, scale, half) = match c.source {
                    Some(i) if i < n_keys => ("group_key".to_owned(), String::new(), 0.0, None),
                    Some(i) => match self.aggs.get(i - n_keys) {
                        Some(a) => {
                            let (mech, scale, half) = a.describe(&self.measurements, alpha);
                            (a.kind().to_owned(), mech, scale, half)
                        }
                        None => ("derived".to_owned(), String::new(), 0.0, None),
                    },
                    None => (
                        "derived".to_owned(),
                        "post-processing of noisy values".to_owned(),
                        0.0,
                        None,
                    ),
                };
                ReleaseColumn {
                    name: c.name.clone(),
                    kind,
                    mechanism,
                    noise_scale: scale,
                    expected_half_width: half,
                }
            })
            .collect()
    }
}

/// Researcher-chosen privacy parameters for one query.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub epsilon: Epsilon,
    pub delta: Delta,
}

/// Test hook: remove these patients from every table before bounding, to
/// compute the neighbouring dataset's exact aggregates.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exclusion(pub(crate) Vec<String>);

pub(crate) async fn compile(
    ctx: &SessionContext,
    policy: &Policy,
    reference: &RefTables,
    limits: &Limits,
    sql: &str,
    budget: Budget,
    exclusion: &Exclusion,
) -> Result<PrivatePlan, QueryError> {
    let plan = parse(ctx, sql).await?;
    check_nodes(&plan, policy)?;
    let plan = total::totalise(plan)?;
    let agg = release_aggregate(&plan)?;
    refuse_duplicate_keys(&agg.group_expr)?;
    let mut analyzer = Analyzer::new(policy, reference);
    let rel = analyzer.rel(&agg.input)?;
    if !rel.private {
        return Err(refuse(
            Code::UnsupportedShape,
            "the query reads only public reference tables; query them without tre, or aggregate a dataset table",
        ));
    }
    let k_total = rel.max_rows;
    let input_schema = agg.input.schema();
    // One patient owns at most k_total rows, each costing at most
    // `row_work`: that bounds how far one patient can move the run time.
    let row_work = total::row_work(&LogicalPlan::Aggregate(agg.clone()), policy, reference)?;
    let patient_work = row_work * k_total as f64;
    if patient_work > total::MAX_PATIENT_WORK {
        return Err(refuse(
            Code::TooMuchWork,
            format!(
                "one patient's {k_total} row(s) could cost {patient_work:.0} units of work, more than the {:.0} allowed (a bound that keeps one patient from changing how long a query takes); join fewer tables or simplify the expressions",
                total::MAX_PATIENT_WORK
            ),
        ));
    }

    // Final columns and which aggregate output each passes through.
    let columns: Vec<FinalColumn> = (0..plan.schema().fields().len())
        .map(|i| FinalColumn {
            name: plan.schema().field(i).name().clone(),
            source: trace(&plan, i),
        })
        .collect();
    let released_keys: Vec<usize> = columns
        .iter()
        .filter_map(|c| c.source)
        .filter(|i| *i < agg.group_expr.len())
        .collect();

    // Group keys.
    let mut keys = Vec::new();
    for (i, g) in agg.group_expr.iter().enumerate() {
        let name = agg.schema.field(i).name().clone();
        let bounds = match unalias(g) {
            Expr::Column(c) => match &rel.cols[index(input_schema, c)?] {
                Info::Unit | Info::Identifier if released_keys.contains(&i) => {
                    return Err(refuse(
                        Code::IdentifierInOutput,
                        format!("the identifier '{}' can never be released; remove it from SELECT", c.name),
                    ));
                }
                Info::Unit | Info::Identifier => {
                    return Err(refuse(
                        Code::IdentifierInGroupBy,
                        format!("cannot GROUP BY the identifier '{}': that would release one row per patient", c.name),
                    ));
                }
                Info::Value(b) => b.clone(),
            },
            other => expr_bounds(other, input_schema, &rel).map_err(|e| match e {
                QueryError::Refused { code: Code::IdentifierInExpression, .. }
                    if released_keys.contains(&i) =>
                {
                    refuse(Code::IdentifierInOutput, format!("the group key {name} is computed from an identifier and can never be released"))
                }
                other => other,
            })?,
        };
        keys.push(GroupKey {
            name,
            domain: bounds.domain,
        });
    }
    let public_cells = keys
        .iter()
        .filter_map(|k| k.domain.as_ref().map(Vec::len))
        .try_fold(1usize, |a, n| a.checked_mul(n))
        .filter(|c| *c <= limits.max_cells)
        .ok_or_else(|| {
            refuse(
                Code::TooManyGroups,
                format!(
                    "the public group keys multiply to more than {} cells; group by fewer or coarser columns (e.g. date_trunc('month', d) or a CASE into bands)",
                    limits.max_cells
                ),
            )
        })?;
    let selected: Vec<usize> = (0..keys.len())
        .filter(|i| keys[*i].domain.is_none())
        .collect();
    let max_groups = u64::from(policy.max_groups_per_unit).min(k_total);
    if !selected.is_empty() && budget.delta.is_zero() {
        return Err(refuse(
            Code::KeySelectionNeedsDelta,
            format!(
                "{} has no public domain, so its values must be chosen by DP key selection, which needs delta > 0; ask for a delta (e.g. 1e-7, at most {}) or group by a column with declared values",
                selected
                    .iter()
                    .map(|i| keys[*i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                policy.budget.max_delta_per_query
            ),
        ));
    }
    // Cells one patient can touch, which bounds distinct-patient counts.
    let touchable = if selected.is_empty() {
        public_cells as u64
    } else {
        max_groups.saturating_mul(public_cells as u64)
    };

    // Aggregates → measures.
    let unit_col = unit_column(&rel, input_schema);
    let scope = aggregates::Scope {
        schema: input_schema,
        rel: &rel,
        unit_col: unit_col.as_ref(),
        k: k_total,
        touchable,
        unit: &policy.privacy_unit,
    };
    let mut drafts = aggregates::Drafts::default();
    let aggs = agg
        .aggr_expr
        .iter()
        .map(|e| aggregates::aggregate(e, &scope, &mut drafts))
        .collect::<Result<Vec<_>, _>>()?;
    let drafts = drafts.all();
    if drafts.is_empty() {
        return Err(refuse(
            Code::RowLevelSelect,
            "the query releases no aggregate; ask for COUNT(*), SUM, AVG or a percentile",
        ));
    }

    // Split epsilon over every mechanism, key selection included.
    let parts = drafts.len() + usize::from(!selected.is_empty());
    let eps_each = tre_dp::split_epsilon(budget.epsilon, parts)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
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
                    Quantile::new(alpha, QUANTILE_BUCKETS, rows, eps_each).map_err(dp)?,
                )
            }
        };
        measurements.push(Measurement {
            measure: d.measure.clone(),
            mechanism,
        });
    }

    // The plan hash identifies the query's meaning, before random salts.
    let plan_hash = hex_digest(
        format!(
            "{}\nepsilon={}\ndelta={}",
            plan.display_indent(),
            budget.epsilon.as_nanos(),
            budget.delta.as_femtos()
        )
        .as_bytes(),
    );

    // Rewrite. Per-patient features whose row count relies on their keys'
    // domains get those domains enforced first.
    let input = analyzer.enforce_domains(&agg.input)?;
    let mut bounded = bound_scans(ctx, policy, &input, exclusion).await?;
    let group_exprs: Vec<Expr> = agg.group_expr.clone();
    let mut selection = None;
    if !selected.is_empty() {
        let Some(unit) = unit_col.clone() else {
            return Err(refuse(
                Code::PrivacyUnitLost,
                format!(
                    "DP key selection needs {} in FROM; keep it in every CTE",
                    policy.privacy_unit
                ),
            ));
        };
        let g = u32::try_from(max_groups).unwrap_or(u32::MAX);
        bounded = bound_groups(ctx, bounded, &unit, &group_exprs, &selected, g)?;
        let sel_exprs: Vec<Expr> = selected.iter().map(|i| group_exprs[*i].clone()).collect();
        let plan = LogicalPlanBuilder::from(bounded.clone())
            .aggregate(
                sel_exprs,
                vec![count_distinct(Expr::Column(unit)).alias("__units")],
            )
            .and_then(|b| b.build())
            .map_err(|e| QueryError::Internal(format!("building key selection: {e}")))?;
        let mechanism = KeySelection::new(g, eps_each, budget.delta).map_err(dp)?;
        selection = Some(Selection {
            plan,
            keys: selected.clone(),
            mechanism,
        });
    }
    let build = |b: datafusion::error::Result<LogicalPlanBuilder>| {
        b.and_then(|b| b.build())
            .map_err(|e| QueryError::Internal(format!("building the private plan: {e}")))
    };
    let mut laplace_exprs: Vec<Expr> = drafts
        .iter()
        .enumerate()
        .filter(|(_, d)| matches!(d.sensitivity, Sensitivity::L1(_)))
        .map(|(i, d)| d.expr.clone().alias(format!("__m{i}")))
        .collect();
    if laplace_exprs.is_empty() && group_exprs.is_empty() {
        // Only quantiles and no keys: DataFusion needs one aggregate here.
        // It is never read.
        laplace_exprs.push(count(lit(1i64)).alias("__unused"));
    }
    let main = build(
        LogicalPlanBuilder::from(bounded.clone()).aggregate(group_exprs.clone(), laplace_exprs),
    )?;
    let mut quantiles = Vec::new();
    for (i, d) in drafts.iter().enumerate() {
        if matches!(d.sensitivity, Sensitivity::Rows) {
            let mut g = group_exprs.clone();
            g.push(d.expr.clone().alias("__bucket"));
            let p = build(
                LogicalPlanBuilder::from(bounded.clone())
                    .aggregate(g, vec![count(lit(1i64)).alias("__n")]),
            )?;
            quantiles.push((i, p));
        }
    }
    let delta = match &selection {
        Some(s) => {
            Delta::new(s.mechanism.delta()).map_err(|e| QueryError::Internal(e.to_string()))?
        }
        None => Delta::ZERO,
    };
    let mut plan = PrivatePlan {
        sql: sql.to_owned(),
        epsilon: budget.epsilon,
        delta,
        plan_hash,
        main,
        quantiles,
        selection,
        keys,
        measurements,
        aggs,
        agg_schema: Arc::clone(&agg.schema),
        post: plan.clone(),
        columns,
        description: Vec::new(),
        k_total,
        row_work,
        totals: false,
        unit: unit_col.clone(),
    };
    verify(&plan, policy, analyzer.private_scans.len(), budget)?;
    plan.description = describe(&plan, policy, &analyzer, budget);
    Ok(plan)
}

fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

async fn parse(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan, QueryError> {
    let mut statements = bounds::parse_bounded(sql, bounds::SQL_LIMITS)?;
    if statements.len() != 1 {
        return Err(refuse(
            Code::MultipleStatements,
            format!(
                "send exactly one SELECT statement, not {}",
                statements.len()
            ),
        ));
    }
    let Some(statement) = statements.pop() else {
        return Err(refuse(
            Code::MultipleStatements,
            "send exactly one SELECT statement",
        ));
    };
    match &statement {
        SqlStatement::Query(_) => {}
        SqlStatement::Explain { .. } | SqlStatement::ExplainTable { .. } => {
            return Err(explain_refusal());
        }
        other => {
            let kind = other.to_string();
            let kind: String = kind
                .split_whitespace()
                .next()
                .unwrap_or("this")
                .to_uppercase();
            return Err(refuse(
                Code::StatementNotAllowed,
                format!(
                    "{kind} statements are not allowed; only SELECT queries that return aggregates are accepted"
                ),
            ));
        }
    }
    let state = ctx.state();
    let plan = state
        .statement_to_plan(DfStatement::Statement(Box::new(statement)))
        .await
        .map_err(|e| planning_refusal(&e.to_string()))?;
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| {
            refuse(
                Code::StatementNotAllowed,
                "only SELECT queries are accepted",
            )
        })?;
    // Type coercion only: the plan keeps its shape.
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| planning_refusal(&e.to_string()))
}

/// DataFusion's own statements (CREATE EXTERNAL TABLE, COPY, SET, RESET).
fn not_sql_statement_refusal() -> QueryError {
    refuse(
        Code::StatementNotAllowed,
        "DDL, COPY and SET are not allowed; only SELECT queries that return aggregates are accepted",
    )
}

fn explain_refusal() -> QueryError {
    refuse(
        Code::ExplainNotAllowed,
        "EXPLAIN is not allowed (EXPLAIN ANALYZE would reveal row counts); use a dry run to see the accepted plan and its cost",
    )
}

/// Planning errors depend only on the schema and the SQL text, never on
/// data, so their substance may be shown.
fn planning_refusal(msg: &str) -> QueryError {
    let msg = msg.lines().next().unwrap_or_default();
    if msg.contains("table function") {
        return refuse(
            Code::TableFunction,
            "table functions (generate_series, range, read_parquet, ...) are not available; query the dataset's tables",
        );
    }
    if msg.contains("not found") && msg.contains("table") {
        let looks_like_path = msg.contains('/')
            || msg.contains('\\')
            || [".parquet", ".csv", ".json", ".arrow", ".avro"]
                .iter()
                .any(|x| msg.contains(x));
        return if looks_like_path {
            refuse(
                Code::FilePath,
                "files cannot be read from a query; use the dataset's tables (see `tre catalog`)",
            )
        } else {
            refuse(
                Code::UnknownTable,
                format!("{msg}; list the dataset's tables with the catalog service"),
            )
        };
    }
    if msg.contains("Invalid function") || msg.contains("function") && msg.contains("not found") {
        return refuse(
            Code::FunctionNotAllowed,
            format!("{msg}; see the catalog for the functions tre allows"),
        );
    }
    refuse(
        Code::SqlSyntax,
        format!("the query cannot be planned: {msg}"),
    )
}

/// Window functions that may post-process the noisy table (share of
/// total, ranks, running sums): they see released values only.
const POST_WINDOW_FUNCTIONS: &[&str] = &[
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "first_value",
    "last_value",
];

/// Window nodes between the root and the release aggregate (by address):
/// they run over the noisy cells, so they are post-processing.
fn post_windows(plan: &LogicalPlan) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = plan;
    loop {
        p = match p {
            LogicalPlan::Projection(x) => &x.input,
            LogicalPlan::Filter(x) => &x.input,
            LogicalPlan::Sort(x) => &x.input,
            LogicalPlan::Limit(x) => &x.input,
            LogicalPlan::SubqueryAlias(x) => &x.input,
            LogicalPlan::Window(x) => {
                out.push(std::ptr::from_ref(p) as usize);
                &x.input
            }
            // Only windows over an aggregate's output post-process noisy
            // values; windows over rows are refused.
            LogicalPlan::Aggregate(_) => return out,
            _ => return Vec::new(),
        };
    }
}

/// Refuse node kinds, functions and expressions that are never allowed,
/// anywhere, including inside subqueries: anything that could fail on
/// some value or cost unbounded work per row (see [`total`]).
fn check_nodes(plan: &LogicalPlan, policy: &Policy) -> Result<(), QueryError> {
    let mut first = FirstRefusal::default();
    let unsupported = |what: &str| {
        refuse(
            Code::UnsupportedShape,
            format!(
                "{what} is not supported; aggregate over tables joined on person_id, with CTEs that keep person_id"
            ),
        )
    };
    let post = post_windows(plan);
    let _ = plan.apply_with_subqueries(|node| {
        let post_window = post.contains(&(std::ptr::from_ref(node) as usize));
        let refusal = match node {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some(explain_refusal()),
            LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::DescribeTable(_) => {
                Some(refuse(Code::StatementNotAllowed, "only SELECT queries are accepted"))
            }
            LogicalPlan::Window(_) if post_window => None,
            LogicalPlan::Window(_) => Some(unsupported(
                "a window function over rows (OVER ...) before aggregation",
            )),
            LogicalPlan::Union(_) => Some(unsupported("UNION / INTERSECT / EXCEPT")),
            LogicalPlan::RecursiveQuery(_) => Some(unsupported("a recursive CTE")),
            LogicalPlan::Unnest(_) => Some(unsupported("UNNEST")),
            LogicalPlan::Extension(_) => Some(unsupported("this operator")),
            LogicalPlan::Subquery(s) => subquery_refusal(&s.subquery, policy),
            _ => None,
        };
        let refusal = refusal.or_else(|| {
            let mut inner = FirstRefusal::default();
            let _ = node.apply_expressions(|e| {
                e.apply(|e| {
                    inner.visit(match e {
                        Expr::WindowFunction(w) if post_window => {
                            let name = w.fun.name().to_lowercase();
                            (!POST_WINDOW_FUNCTIONS.contains(&name.as_str())).then(|| {
                                refuse(
                                    Code::FunctionNotAllowed,
                                    format!(
                                        "window function '{name}' is not allowed over released values; use one of {}",
                                        POST_WINDOW_FUNCTIONS.join(", ")
                                    ),
                                )
                            })
                        }
                        Expr::WindowFunction(_) => Some(unsupported(
                            "a window function over rows (OVER ...) before aggregation",
                        )),
                        Expr::ScalarSubquery(s) => subquery_refusal(&s.subquery, policy),
                        Expr::Exists(s) => subquery_refusal(&s.subquery.subquery, policy),
                        Expr::InSubquery(s) => subquery_refusal(&s.subquery.subquery, policy),
                        other => total::check_name(other),
                    })
                })
            });
            inner.0
        });
        first.visit(refusal)
    });
    first.into_result()?;
    // Then, with every node and function known to be allowed, the rules
    // that make each call total and cheap (argument literals, types).
    total::check_totality(plan)
}

/// Subqueries in expressions may read only public reference tables, and
/// may not be correlated.
fn subquery_refusal(plan: &LogicalPlan, policy: &Policy) -> Option<QueryError> {
    let mut private = false;
    let mut correlated = false;
    let _ = plan.apply_with_subqueries(|n| {
        if let LogicalPlan::TableScan(s) = n {
            private |= policy.table(s.table_name.table()).is_some();
        }
        let _ = n.apply_expressions(|e| {
            e.apply(|e| {
                correlated |= matches!(e, Expr::OuterReferenceColumn(..));
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(TreeNodeRecursion::Continue)
    });
    (private || correlated).then(|| {
        refuse(
            Code::SubqueryNotAllowed,
            "subqueries in expressions (IN, EXISTS, scalar) may only read public reference tables and may not refer to the outer query; join the private table on person_id instead",
        )
    })
}

/// Collects the first refusal met while walking and stops the walk there.
#[derive(Default)]
struct FirstRefusal(Option<QueryError>);

impl FirstRefusal {
    fn visit(
        &mut self,
        refusal: Option<QueryError>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(match refusal {
            Some(e) => {
                self.0 = Some(e);
                TreeNodeRecursion::Stop
            }
            None => TreeNodeRecursion::Continue,
        })
    }

    fn into_result(self) -> Result<(), QueryError> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The same group key twice would make two output columns of one cell;
/// refuse it with a code rather than fail later.
pub(crate) fn refuse_duplicate_keys(keys: &[Expr]) -> Result<(), QueryError> {
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].iter().any(|j| unalias(j) == unalias(k)) {
            return Err(refuse(
                Code::DuplicateGroupKey,
                format!(
                    "the group key {} appears more than once; group by each key once",
                    unalias(k)
                ),
            ));
        }
    }
    Ok(())
}

/// The first aggregate under the post-processing chain.
fn release_aggregate(plan: &LogicalPlan) -> Result<&Aggregate, QueryError> {
    match plan {
        LogicalPlan::Aggregate(a) => Ok(a),
        LogicalPlan::Projection(p) => release_aggregate(&p.input),
        LogicalPlan::Filter(f) => release_aggregate(&f.input),
        LogicalPlan::Sort(s) => release_aggregate(&s.input),
        LogicalPlan::Limit(l) => release_aggregate(&l.input),
        LogicalPlan::SubqueryAlias(a) => release_aggregate(&a.input),
        LogicalPlan::Window(w) => release_aggregate(&w.input),
        _ => Err(refuse(
            Code::RowLevelSelect,
            "row-level results cannot leave the environment; ask for aggregates such as COUNT(*), SUM(col), AVG(col) or MEDIAN(col), optionally with GROUP BY",
        )),
    }
}

/// The release aggregate's output that column `i` of `plan` passes
/// through unchanged, if any.
fn trace(plan: &LogicalPlan, i: usize) -> Option<usize> {
    match plan {
        LogicalPlan::Aggregate(_) => Some(i),
        LogicalPlan::Projection(p) => match unalias(p.expr.get(i)?) {
            Expr::Column(c) => trace(&p.input, p.input.schema().index_of_column(c).ok()?),
            _ => None,
        },
        LogicalPlan::Filter(f) => trace(&f.input, i),
        LogicalPlan::Sort(s) => trace(&s.input, i),
        LogicalPlan::Limit(l) => trace(&l.input, i),
        LogicalPlan::SubqueryAlias(a) => trace(&a.input, i),
        // A window node passes its input's columns through, then appends
        // its own (computed from released values).
        LogicalPlan::Window(w) if i < w.input.schema().fields().len() => trace(&w.input, i),
        _ => None,
    }
}

fn unit_column(rel: &Rel, schema: &datafusion::common::DFSchema) -> Option<Column> {
    rel.cols
        .iter()
        .position(|c| *c == Info::Unit)
        .map(|i| Column::from(schema.qualified_field(i)))
}

/// Replace every private table scan with its bounded version.
async fn bound_scans(
    ctx: &SessionContext,
    policy: &Policy,
    input: &LogicalPlan,
    exclusion: &Exclusion,
) -> Result<LogicalPlan, QueryError> {
    let internal =
        |e: datafusion::error::DataFusionError| QueryError::Internal(format!("bounding: {e}"));
    let mut providers: HashMap<String, Arc<dyn TableProvider>> = HashMap::new();
    for name in policy.tables.keys() {
        let p = ctx.table_provider(name.as_str()).await.map_err(internal)?;
        providers.insert(name.clone(), p);
    }
    let shuffle = Internal::Shuffle.udf(ctx).map_err(internal)?;
    let mut bounded: HashMap<String, LogicalPlan> = HashMap::new();
    for (name, table) in &policy.tables {
        bounded.insert(
            name.clone(),
            bounded_scan(policy, table, &providers, &shuffle, exclusion).map_err(internal)?,
        );
    }
    input
        .clone()
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) => match bounded.get(scan.table_name.table()) {
                // Keep the researcher's qualifier (alias or table name).
                Some(plan) => LogicalPlanBuilder::from(plan.clone())
                    .alias(scan.table_name.clone())
                    .and_then(|b| b.build())
                    .map(Transformed::yes),
                None => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
            },
            other => other.recompute_schema().map(Transformed::yes),
        })
        .map(|t| t.data)
        .map_err(internal)
}

fn bounded_scan(
    policy: &Policy,
    table: &TablePolicy,
    providers: &HashMap<String, Arc<dyn TableProvider>>,
    shuffle: &Arc<datafusion::logical_expr::ScalarUDF>,
    exclusion: &Exclusion,
) -> datafusion::error::Result<LogicalPlan> {
    let source = |name: &str| {
        providers
            .get(name)
            .map(|p| provider_as_source(Arc::clone(p)))
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Plan(format!("no provider for {name}"))
            })
    };
    let qcol = |t: &str, c: &str| Expr::Column(Column::new(Some(t), c));
    let unit = &policy.privacy_unit;
    let name = table.name.as_str();
    let scan = LogicalPlanBuilder::scan(name, source(name)?, None)?;
    let scan_schema = Arc::clone(scan.schema());
    let columns: Vec<Expr> = scan
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let mut b = scan;
    if !exclusion.0.is_empty() {
        let list: Vec<Expr> = exclusion.0.iter().map(|p| lit(p.as_str())).collect();
        b = b.filter(qcol(name, unit).in_list(list, true))?;
    }
    if let Some(opt) = &policy.opt_out {
        if opt.table == name {
            b = b.filter(qcol(name, &opt.column).eq(lit(false)))?;
        } else {
            let opted_in = LogicalPlanBuilder::scan(opt.table.as_str(), source(&opt.table)?, None)?
                .filter(qcol(&opt.table, &opt.column).eq(lit(false)))?
                .project(vec![qcol(&opt.table, unit).alias("__tre_opted_in")])?
                .build()?;
            b = b.join(
                opted_in,
                JoinType::LeftSemi,
                (
                    vec![Column::new(Some(name), unit.as_str())],
                    vec![Column::from_name("__tre_opted_in")],
                ),
                None,
            )?;
        }
    }
    // Dates outside the policy's bounds, and text longer than its column's
    // limit, become NULL here, before any expression sees them: a date at
    // the end of the Date32 range cannot even be printed, and the work
    // bound assumes the limit. Bounds are enforced at the source, below the
    // row cap, so that a query's filters see plain columns: DataFusion
    // loses a filter's constants on a computed expression when it embeds a
    // projection in the filter, then rejects its own plan (issue #10).
    let text = |c: &Column| {
        scan_schema
            .field_with_unqualified_name(&c.name)
            .is_ok_and(|f| {
                matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
            })
    };
    let bounded: Vec<Expr> = columns
        .iter()
        .cloned()
        .map(|c| {
            let Expr::Column(column) = &c else {
                return Ok(c);
            };
            let keep = match table.column(&column.name).map(|p| &p.class) {
                Some(tre_policy::ColumnClass::Date { lo, hi }) => {
                    let day = |d: i32| lit(ScalarValue::Date32(Some(d)));
                    c.clone().between(day(*lo), day(*hi))
                }
                Some(class) if text(column) => match total::text_limit(class) {
                    Some(limit) => {
                        datafusion::functions::unicode::expr_fn::character_length(c.clone())
                            .lt_eq(lit(i32::try_from(limit).unwrap_or(i32::MAX)))
                    }
                    None => return Ok(c),
                },
                _ => return Ok(c),
            };
            let (relation, name) = (column.relation.clone(), column.name.clone());
            when(keep, c)
                .end()
                .map(|e| e.alias_qualified(relation, name))
        })
        .collect::<datafusion::error::Result<_>>()?;
    // The shuffle key sees the whole row so that a deterministic (test)
    // sampler picks the same rows whoever else is in the dataset.
    let rn = row_number()
        .partition_by(vec![qcol(name, unit)])
        .order_by(vec![shuffle.call(columns.clone()).sort(true, false)])
        .build()?
        .alias("__tre_rn");
    b.project(bounded)?
        .window(vec![rn])?
        .filter(col("__tre_rn").lt_eq(lit(u64::from(table.max_rows_per_unit))))?
        .project(columns)?
        .build()
}

/// Keep at most `g` groups (of the selected keys) per patient, chosen at
/// random per query by a salted hash, so that key selection's sensitivity
/// follows from `max_groups_per_unit`.
fn bound_groups(
    ctx: &SessionContext,
    input: LogicalPlan,
    unit: &Column,
    group_exprs: &[Expr],
    selected: &[usize],
    g: u32,
) -> Result<LogicalPlan, QueryError> {
    let internal = |e: datafusion::error::DataFusionError| {
        QueryError::Internal(format!("group bounding: {e}"))
    };
    let hash = Internal::GroupHash.udf(ctx).map_err(internal)?;
    let mut salt = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| QueryError::Internal("system random source failed".into()))?;
    let keys: Vec<Expr> = selected
        .iter()
        .map(|i| unalias(&group_exprs[*i]).clone())
        .collect();
    let mut args = vec![lit(u64::from_le_bytes(salt))];
    args.extend(keys.iter().cloned());
    let mut order = vec![hash.call(args).sort(true, false)];
    // Ties on the hash fall back to the key itself, so distinct keys
    // always get distinct ranks.
    order.extend(keys.iter().map(|k| k.clone().sort(true, false)));
    let columns: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let rank = dense_rank()
        .partition_by(vec![Expr::Column(unit.clone())])
        .order_by(order)
        .build()
        .map_err(internal)?
        .alias("__tre_group_rank");
    LogicalPlanBuilder::from(input)
        .window(vec![rank])
        .and_then(|b| b.filter(col("__tre_group_rank").lt_eq(lit(u64::from(g)))))
        .and_then(|b| b.project(columns))
        .and_then(|b| b.build())
        .map_err(internal)
}

/// The checks that make the rewrite trustworthy.
fn verify(
    plan: &PrivatePlan,
    policy: &Policy,
    private_scans: usize,
    budget: Budget,
) -> Result<(), QueryError> {
    let bug = |m: String| {
        Err(QueryError::Internal(format!(
            "private plan check failed: {m}"
        )))
    };
    let n = plan.measurements.len();
    let mut used = vec![false; n];
    for a in &plan.aggs {
        for m in a.measurements() {
            match used.get_mut(m.index()) {
                Some(u) => *u = true,
                None => return bug(format!("aggregate {} has no mechanism", a.kind())),
            }
        }
    }
    if used.iter().any(|u| !u) {
        return bug("a measurement is charged but never released".into());
    }
    let n_keys = plan.keys.len();
    for c in &plan.columns {
        if let Some(i) = c.source
            && i >= n_keys + plan.aggs.len()
        {
            return bug(format!("column {} has no source", c.name));
        }
    }
    let mut charged: f64 = plan
        .measurements
        .iter()
        .map(|m| m.mechanism.epsilon())
        .sum();
    if let Some(s) = &plan.selection {
        charged += s.mechanism.epsilon();
        if s.mechanism.delta() > plan.delta.value() || plan.delta > budget.delta {
            return bug("key selection's delta exceeds the delta charged".into());
        }
    } else if !plan.delta.is_zero() {
        return bug("delta charged without key selection".into());
    }
    if charged > plan.epsilon.value() * (1.0 + 1e-9) {
        return bug(format!(
            "mechanisms cost {charged} but the plan charges {}",
            plan.epsilon
        ));
    }
    let laplace = plan
        .measurements
        .iter()
        .filter(|m| matches!(m.mechanism, Mechanism::Laplace(_)))
        .count();
    let placeholder = usize::from(laplace == 0 && n_keys == 0);
    if plan.main.schema().fields().len() != n_keys + laplace + placeholder {
        return bug("the executed aggregate does not match keys and measurements".into());
    }
    if plan.quantiles.len() + laplace != n {
        return bug("every quantile needs its own histogram plan".into());
    }
    // Every scan of a dataset table, in every plan that reads data, sits
    // under a bounding step: a filter on the shuffled row number per
    // patient (issue #12: this used to be a count of window nodes).
    let reads = std::iter::once(&plan.main)
        .chain(plan.quantiles.iter().map(|(_, p)| p))
        .chain(plan.selection.iter().map(|s| &s.plan));
    for p in reads {
        let mut unbounded = Vec::new();
        unbounded_scans(p, policy, false, &mut unbounded);
        if !unbounded.is_empty() {
            return bug(format!("unbounded scans of {}", unbounded.join(", ")));
        }
    }
    let mut windows = 0;
    let _ = plan.main.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::Window(_)) {
            windows += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let expected = private_scans + usize::from(plan.selection.is_some());
    if windows != expected {
        return bug(format!(
            "{expected} bounding steps expected but {windows} planned"
        ));
    }
    // Totality: no operation that can fail on a value survives the rewrite.
    let mut partial = None;
    let plans = std::iter::once(&plan.main)
        .chain(plan.quantiles.iter().map(|(_, p)| p))
        .chain(plan.selection.iter().map(|s| &s.plan))
        .chain(std::iter::once(&plan.post));
    for p in plans {
        let _ = p.apply_with_subqueries(|node| {
            let _ = node.apply_expressions(|e| {
                e.apply(|e| {
                    if matches!(
                        e,
                        Expr::Cast(_)
                            | Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr {
                                op: datafusion::logical_expr::Operator::Divide
                                    | datafusion::logical_expr::Operator::Modulo,
                                ..
                            })
                    ) {
                        partial = Some(e.to_string());
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            });
            Ok(TreeNodeRecursion::Continue)
        });
    }
    if let Some(e) = partial {
        return bug(format!("a partial operation survived the rewrite: {e}"));
    }
    Ok(())
}

/// The dataset tables scanned in `plan` without a bounding step above
/// them. A bounding step is `bounded_scan`'s filter `__tre_rn <= k` over a
/// window that numbers each patient's rows in the order of the internal
/// shuffle key; everything under it, the opt-out semi-join included, is
/// bounded.
fn unbounded_scans(plan: &LogicalPlan, policy: &Policy, bounded: bool, out: &mut Vec<String>) {
    let bounded = bounded || is_bounding_step(plan);
    if let LogicalPlan::TableScan(scan) = plan
        && !bounded
        && policy.tables.contains_key(scan.table_name.table())
    {
        out.push(scan.table_name.to_string());
    }
    for input in plan.inputs() {
        unbounded_scans(input, policy, bounded, out);
    }
}

/// `unbounded_scans` from the top of `plan`, for the soundness tests.
#[cfg(feature = "soundness-testing")]
pub(crate) fn unbounded_scans_of(policy: &Policy, plan: &LogicalPlan) -> Vec<String> {
    let mut out = Vec::new();
    unbounded_scans(plan, policy, false, &mut out);
    out
}

fn is_bounding_step(plan: &LogicalPlan) -> bool {
    let LogicalPlan::Filter(filter) = plan else {
        return false;
    };
    let caps_row_number = matches!(
        &filter.predicate,
        Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr {
            left,
            op: datafusion::logical_expr::Operator::LtEq,
            right,
        }) if matches!(left.as_ref(), Expr::Column(c) if c.name == "__tre_rn")
            && matches!(right.as_ref(), Expr::Literal(..))
    );
    let LogicalPlan::Window(window) = filter.input.as_ref() else {
        return false;
    };
    let mut shuffled = false;
    for e in &window.window_expr {
        let _ = e.apply(|x| {
            if let Expr::ScalarFunction(f) = x
                && f.func.name() == Internal::Shuffle.name()
            {
                shuffled = true;
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    caps_row_number && shuffled
}

fn describe(
    plan: &PrivatePlan,
    policy: &Policy,
    analyzer: &Analyzer<'_>,
    budget: Budget,
) -> Vec<String> {
    let mut d = Vec::new();
    if let Some(o) = &policy.opt_out {
        d.push(format!(
            "remove patients who opted out ({}.{} = true) from every table, before anything else",
            o.table, o.column
        ));
    }
    d.extend(analyzer.private_scans.iter().cloned());
    d.extend(analyzer.notes.iter().cloned());
    d.push(format!(
        "each patient contributes at most {} row(s) to the aggregate",
        plan.k_total
    ));
    d.push(format!(
        "work per row at most {:.0} units, so one patient's rows cost at most {:.0} units (bounds that keep run time from depending on one patient)",
        plan.row_work,
        plan.row_work * plan.k_total as f64
    ));
    let public: Vec<String> = plan
        .keys
        .iter()
        .filter_map(|k| {
            k.domain
                .as_ref()
                .map(|d| format!("{} ({} public values)", k.name, d.len()))
        })
        .collect();
    if plan.keys.is_empty() {
        d.push("one cell (no GROUP BY)".into());
    } else if !public.is_empty() {
        d.push(format!(
            "public group keys, released in full with empty cells: {}",
            public.join(" × ")
        ));
    }
    if let Some(s) = &plan.selection {
        let names: Vec<&str> = s.keys.iter().map(|i| plan.keys[*i].name.as_str()).collect();
        d.push(format!(
            "DP key selection for {}: each patient counts towards at most {} group(s), chosen at random; a key is released if its noisy distinct-patient count (discrete Laplace, scale {}) reaches {}; epsilon {:.4}, delta {:e}",
            names.join(", "),
            s.mechanism.max_groups(),
            s.mechanism.scale(),
            s.mechanism.threshold(),
            s.mechanism.epsilon(),
            s.mechanism.delta()
        ));
    }
    let alpha = 1.0 - CONFIDENCE;
    for m in &plan.measurements {
        let what = m.measure.describe(&policy.privacy_unit);
        match &m.mechanism {
            Mechanism::Laplace(l) => {
                let unit = if m.measure.fixed_point() { FIXED_POINT_SCALE } else { 1.0 };
                let hw = l.half_width(alpha).unwrap_or(f64::NAN) / unit;
                d.push(format!(
                    "measure {what}: discrete Laplace, sensitivity {}, epsilon {:.4}, scale {}, 95% interval ±{hw} per cell",
                    l.sensitivity() as f64 / unit,
                    l.epsilon(),
                    l.scale() / unit,
                ));
            }
            Mechanism::Quantile(q) => d.push(format!(
                "measure {what}: OpenDP private quantile over {} candidates, epsilon {:.4}, scale {:.2} ranks; with 95% probability the released value's rank is within ±{:.0} of the exact one",
                QUANTILE_BUCKETS + 1,
                q.epsilon(),
                q.scale(),
                q.rank_half_width(alpha)
            )),
        }
    }
    d.push(format!(
        "total cost: epsilon {}{}",
        plan.epsilon,
        if plan.delta.is_zero() {
            String::new()
        } else {
            format!(", delta {}", plan.delta)
        }
    ));
    if plan.delta < budget.delta {
        d.push(format!(
            "requested delta {} is not needed beyond what key selection uses",
            budget.delta
        ));
    }
    d
}
