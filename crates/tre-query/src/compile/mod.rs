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
mod check;
mod describe;
mod parse;
mod relation;
pub(crate) mod rewrite;
mod shape;
mod total;
mod verify;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, ScalarValue, TableReference};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
use datafusion::functions_window::expr_fn::{dense_rank, row_number};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionContext, col};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use tre_core::{Code, Delta, Epsilon};
use tre_dp::{CONFIDENCE, DiscreteLaplace, KeySelection, Quantile};
use tre_policy::{Policy, TablePolicy};

use self::aggregates::{DpAggregate, Sensitivity};
pub(crate) use self::aggregates::{Noisy, value_cell};
use self::check::check_nodes;
pub(crate) use self::check::refuse_duplicate_keys;
use self::describe::describe;
use self::parse::{explain_refusal, not_sql_statement_refusal, parse};
use self::relation::{Analyzer, Info, Rel, expr_bounds, index};
use self::shape::{group_keys, release_aggregate, trace, unit_column};
#[cfg(feature = "soundness-testing")]
pub(crate) use self::verify::unbounded_scans_of;
use self::verify::verify;
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
    /// A sum over rows (a count is a sum of ones), so its value over a
    /// cell is the sum of its values over any partition of the cell's
    /// rows. `COUNT(DISTINCT unit)` is not.
    pub(crate) fn sums_rows(&self) -> bool {
        // Exhaustive, so that a new measure must be decided on here.
        match self {
            Measure::CountRows
            | Measure::CountNonNull { .. }
            | Measure::Contributors { .. }
            | Measure::Sum { .. }
            | Measure::CenteredSum { .. }
            | Measure::CenteredSquares { .. } => true,
            Measure::CountDistinctUnits | Measure::Quantile { .. } => false,
        }
    }

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
    /// Without a domain: the most distinct values, where capped.
    pub(crate) distinct: Option<u64>,
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
    /// What runs for `main` when it counts distinct patients: the same
    /// aggregate per patient first, then per cell (`rewrite::per_unit_first`;
    /// `verify` derives it again from `main` and compares).
    pub(crate) streamed: Option<LogicalPlan>,
    /// Per quantile measurement: keys, bucket and row count; when `fused`,
    /// the first also carries `main`'s measurements, per bucket.
    pub(crate) quantiles: Vec<(usize, LogicalPlan)>,
    /// `main` is computed by summing the first histogram plan's extra
    /// columns over its buckets, and is never run (see `rewrite`).
    pub(crate) fused: bool,
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
    /// The physical plans the preflight made, for execution to use.
    pub(crate) prepared: Prepared,
    /// What bounds the memory of the plans (`crate::memory`).
    pub(crate) memory: crate::memory::Facts,
    /// The bound itself, in bytes, once the preflight has planned them.
    pub(crate) memory_bound: u64,
}

/// Physical plans made at compile time (`execute::preflight`), each handed
/// out at most once. Executing the very plan the preflight checked saves
/// planning every plan twice (most of a small query's fixed cost, issue
/// #13) and leaves nothing to differ between the two. A plan is taken, not
/// borrowed, because DataFusion's physical plans hold execution state (a
/// hash join's build side, dynamic filters) and are not meant to run twice;
/// a clone of a `PrivatePlan` executed again, or a plan whose preparation
/// was skipped, is planned afresh.
#[derive(Clone, Default)]
pub(crate) struct Prepared(Arc<Mutex<Vec<PreparedPlan>>>);

type PreparedPlan = (LogicalPlan, Arc<dyn ExecutionPlan>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prepared({} physical plans)", self.held())
    }
}

impl Prepared {
    pub(crate) fn held(&self) -> usize {
        self.0.lock().map_or(0, |p| p.len())
    }

    pub(crate) fn put(&self, logical: LogicalPlan, physical: Arc<dyn ExecutionPlan>) {
        if let Ok(mut held) = self.0.lock() {
            held.push((logical, physical));
        }
    }

    /// The held physical plans, as DataFusion displays them.
    pub(crate) fn shown(&self) -> Vec<String> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |held| {
                held.iter()
                    .map(|(_, p)| {
                        datafusion::physical_plan::displayable(p.as_ref())
                            .indent(false)
                            .to_string()
                    })
                    .collect()
            },
        )
    }

    /// The physical plan prepared for `logical`, if one is still held.
    pub(crate) fn take(&self, logical: &LogicalPlan) -> Option<Arc<dyn ExecutionPlan>> {
        let mut held = self.0.lock().ok()?;
        let at = held.iter().position(|(l, _)| l == logical)?;
        Some(held.swap_remove(at).1)
    }
}

/// Tables with totals stay small enough for secondary suppression.
const MAX_CELLS_WITH_TOTALS: usize = 400;

impl PrivatePlan {
    /// The plan that computes `main`'s cells when it runs.
    pub(crate) fn main_run(&self) -> &LogicalPlan {
        self.streamed.as_ref().unwrap_or(&self.main)
    }

    /// Every plan that reads data: the private aggregate (its definition,
    /// even where a fused histogram or a per-patient-first plan computes
    /// it, and that plan), the quantiles' histograms, and key selection.
    pub(crate) fn reads(&self) -> impl Iterator<Item = &LogicalPlan> {
        std::iter::once(&self.main)
            .chain(self.streamed.iter())
            .chain(self.quantiles.iter().map(|(_, p)| p))
            .chain(self.selection.iter().map(|s| &s.plan))
    }

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
    /// The most bytes the query's plans can reserve, as the compiler
    /// bounded them (`TRE-Q034` above the pool); 0 before planning.
    pub fn memory_bound(&self) -> u64 {
        self.memory_bound
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

/// What start-up learned about the served extracts, and the test hook's
/// exclusions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Extracts {
    /// Tables whose rows per patient were bounded when written, within the
    /// policy's bound: their scans need no bounding per query (issue #13).
    pub(crate) bounded_at_write: BTreeSet<String>,
    /// Tables that hold no opted-out patient's rows: their scans need no
    /// opt-out filter.
    pub(crate) opt_outs_removed: BTreeSet<String>,
    /// Test hook: remove these patients from every table before bounding,
    /// to compute the neighbouring dataset's exact aggregates.
    pub(crate) excluded: Vec<String>,
    /// The extracts' sizes, coarsened, for bounding a query's memory.
    pub(crate) sizes: Sizes,
    /// An opt-out list (`tre dataset optouts`) adds patients the policy's
    /// flag column does not mark: every table then filters on the set.
    pub(crate) opt_out_list: bool,
}

/// How large the served extracts are, each count rounded up to a power of
/// two: public facts of the extract (as its size on disk is), coarse so
/// that a refusal on memory changes only when a table doubles (issue #13).
#[derive(Debug, Clone, Default)]
pub(crate) struct Sizes {
    /// Patients in the largest table.
    pub(crate) units: u64,
    /// Rows of the largest table.
    pub(crate) rows: u64,
    /// The most rows one patient has in a stored table (the stored bound).
    pub(crate) unit_rows: u64,
}

/// The datasets a query's SQL qualifies its tables with (`nhs_epr` in
/// `nhs_epr.patients` or `nhs_epr.public.patients`): the datasets it names, for choosing the engine
/// that runs it (issue #15). SQL that does not parse names none; compiling
/// it reports why.
pub fn datasets_named(sql: &str) -> BTreeSet<String> {
    let Ok(statements) = bounds::parse_bounded(sql, bounds::SQL_LIMITS) else {
        return BTreeSet::new();
    };
    statements
        .into_iter()
        .filter_map(|s| {
            datafusion::sql::resolve::resolve_table_references(
                &DfStatement::Statement(Box::new(s)),
                true,
            )
            .ok()
        })
        .flat_map(|(tables, _)| tables)
        .filter_map(|t| dataset_of(&t).map(str::to_owned))
        .collect()
}

/// The dataset a table reference names: `d` in `d.table`, and in
/// `d.public.table` (the catalog and schema Flight SQL lists a dataset's
/// tables under); none for a bare name.
pub(crate) fn dataset_of(name: &TableReference) -> Option<&str> {
    match name {
        TableReference::Bare { .. } => None,
        TableReference::Partial { schema, .. } => Some(schema),
        TableReference::Full {
            catalog, schema, ..
        } if catalog.as_ref() == DEFAULT_CATALOG => Some(schema),
        TableReference::Full { catalog, .. } => Some(catalog),
    }
}

/// The catalog a session resolves `schema.table` in.
pub(crate) const DEFAULT_CATALOG: &str = "datafusion";

/// The policy's name for a table a plan scans (or a column's relation):
/// `table` for one dataset; `dataset.table` across datasets, where every
/// dataset table is registered qualified (issue #15). Never a shorter name
/// than the policy's, so a private table cannot pass for a public one.
pub(crate) fn table_key(policy: &Policy, name: &TableReference) -> String {
    match dataset_of(name) {
        Some(dataset) if !policy.parts.is_empty() => format!("{dataset}.{}", name.table()),
        _ => name.table().to_owned(),
    }
}

pub(crate) async fn compile(
    ctx: &SessionContext,
    policy: &Policy,
    reference: &RefTables,
    limits: &Limits,
    sql: &str,
    budget: Budget,
    extracts: &Extracts,
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
    let row_work = total::bounded_row_work(agg, policy, reference, k_total)?;

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

    let keys = group_keys(agg, input_schema, &rel, &released_keys)?;
    let shape::KeyPlan {
        selected,
        max_groups,
        touchable,
    } = shape::KeyPlan::of(&keys, policy, limits, k_total, budget.delta)?;

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
    let measurements = aggregates::mechanisms(drafts, eps_each, k_total)?;

    // The plan hash identifies the query's meaning, before random salts,
    // and the dataset it reads: one gateway may serve two datasets with
    // tables of the same names, and a repeat must never cross them.
    let plan_hash = hex_digest(
        format!(
            "dataset={}\n{}\nepsilon={}\ndelta={}",
            policy.dataset,
            plan.display_indent(),
            budget.epsilon.as_nanos(),
            budget.delta.as_femtos()
        )
        .as_bytes(),
    );

    // Rewrite. Per-patient features whose row count relies on their keys'
    // domains get those domains enforced first.
    let input = analyzer.enforce_domains(&agg.input)?;
    let rewrite::Rewritten {
        main,
        streamed,
        quantiles,
        fused,
        selection,
    } = rewrite::Rewrite {
        ctx,
        policy,
        extracts,
        group_exprs: &agg.group_expr,
        selected: &selected,
        unit_col: unit_col.as_ref(),
        max_groups,
        eps_each,
        delta: budget.delta,
        drafts,
    }
    .run(&input)
    .await?;
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
        streamed,
        quantiles,
        fused,
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
        prepared: Prepared::default(),
        memory: crate::memory::Facts::default(),
        memory_bound: 0,
    };
    plan.memory = memory_facts(ctx, &plan, policy, &analyzer, extracts);
    verify(
        &plan,
        policy,
        extracts,
        analyzer.private_scans.len(),
        budget,
    )?;
    plan.description = describe(&plan, policy, &analyzer, budget);
    Ok(plan)
}

/// The public facts the memory bound of `plan` is computed from.
fn memory_facts(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    policy: &Policy,
    analyzer: &Analyzer<'_>,
    extracts: &Extracts,
) -> crate::memory::Facts {
    let sizes = &extracts.sizes;
    let unit_rows = analyzer
        .widest
        .max(plan.k_total)
        .max(sizes.unit_rows)
        .max(1);
    let rows = sizes
        .units
        .saturating_mul(unit_rows)
        .max(sizes.rows)
        .max(analyzer.largest_public);
    // Every key's values, NULL included; a key with neither a public
    // domain nor a cap could have as many as there are rows.
    let cells = plan.keys.iter().fold(1u64, |cells, k| {
        let values = match (&k.domain, k.distinct) {
            (Some(d), _) => d.len() as u64,
            (None, Some(cap)) => cap,
            (None, None) => rows,
        };
        cells.saturating_mul(values.saturating_add(1))
    });
    // A quantile's histogram groups by the keys and a bucket (the steps,
    // below and above the bounds, and NULL).
    let buckets = if plan.quantiles.is_empty() {
        1
    } else {
        QUANTILE_BUCKETS as u64 + 3
    };
    crate::memory::Facts {
        // Read in place: `ctx.state()` would clone the whole session.
        batch_rows: ctx.state_ref().read().config().batch_size() as u64,
        unit_rows,
        rows,
        public_rows: analyzer.largest_public.max(1),
        groups: cells.saturating_mul(buckets).min(rows),
        unit_names: analyzer
            .unit_names
            .iter()
            .cloned()
            .chain([policy.privacy_unit.clone()])
            .collect(),
        unit_only_names: analyzer
            .unit_names
            .difference(&analyzer.other_names)
            .cloned()
            .collect(),
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}
