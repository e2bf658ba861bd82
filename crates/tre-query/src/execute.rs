//! Run a private plan and turn its exact per-cell aggregates into noisy,
//! disclosure-checked cells. The exact numbers live only inside this module
//! (and, for soundness tests only, behind the `soundness-testing` feature).
//!
//! Order: DP key selection (if any) fixes the cells; every cell gets its
//! noisy measurements; SDC applies to the noisy values; then the
//! researcher's HAVING / ORDER BY / LIMIT / arithmetic run in DataFusion
//! over the noisy table alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, Int64Type, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;
use tre_dp::CONFIDENCE;
use tre_sdc::Profile;

use crate::QueryError;
use crate::compile::{Mechanism, Noisy as NoisyCells, PrivatePlan, value_cell};
use crate::release::{Cell, Release};

const CELL_ID: &str = "__tre_cell";

type Key = Vec<ScalarValue>;
/// Per cell, `(bucket, rows)` pairs of one quantile's histogram.
type Histogram = HashMap<Key, Vec<(i64, u64)>>;

fn exec_err(e: datafusion::error::DataFusionError) -> QueryError {
    QueryError::Execution {
        detail: e.to_string(),
    }
}

async fn collect(ctx: &SessionContext, plan: &LogicalPlan) -> Result<Vec<RecordBatch>, QueryError> {
    ctx.execute_logical_plan(plan.clone())
        .await
        .map_err(exec_err)?
        .collect()
        .await
        .map_err(exec_err)
}

/// `x` limited to the i64 range. Saturation is 1-Lipschitz, so a sum's
/// sensitivity survives it, and it never fails: a check that failed on
/// large sums would tell the researcher how large the exact sum is.
fn saturate(x: i128) -> i64 {
    i64::try_from(x).unwrap_or(if x < 0 { i64::MIN } else { i64::MAX })
}

/// Read an exact integer measurement (Int64 count or Decimal128 fixed-point
/// sum, saturated to i64).
fn read_i64(array: &ArrayRef, row: usize) -> Result<i64, QueryError> {
    if array.is_null(row) {
        return Ok(0);
    }
    if let Some(a) = array.as_primitive_opt::<Int64Type>() {
        return Ok(a.value(row));
    }
    if let Some(a) = array.as_primitive_opt::<Decimal128Type>() {
        return Ok(saturate(a.value(row)));
    }
    Err(QueryError::Internal(format!(
        "measurement of type {} is not an integer",
        array.data_type()
    )))
}

fn key_of(batch: &RecordBatch, cols: usize, row: usize) -> Result<Key, QueryError> {
    (0..cols)
        .map(|k| ScalarValue::try_from_array(batch.column(k), row).map_err(exec_err))
        .collect()
}

/// Exact per-cell values of every measurement: Laplace measurements as
/// integers, quantiles as histograms. Also the selected keys' exact
/// distinct-patient counts.
pub(crate) struct Exact {
    pub(crate) laplace: HashMap<Key, Vec<i64>>,
    pub(crate) histograms: Vec<(usize, Histogram)>,
    pub(crate) selection: Option<HashMap<Key, i64>>,
}

#[cfg(feature = "soundness-testing")]
pub(crate) async fn exact(ctx: &SessionContext, plan: &PrivatePlan) -> Result<Exact, QueryError> {
    exact_with(ctx, plan, None).await
}

/// Each cell's patients and, per patient, each Laplace measurement's
/// contribution (for rules on exact values).
type PerPatient = HashMap<Key, Vec<Vec<i64>>>;

/// The exact aggregates. With `per_patient`, the Laplace measurements are
/// summed from it rather than computed by a second scan, so the rules on
/// exact values judge the very rows that were released.
async fn exact_with(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    per_patient: Option<&PerPatient>,
) -> Result<Exact, QueryError> {
    let n_keys = plan.keys.len();
    // Only cells that can be released reach a mechanism: public keys inside
    // their domains, selected keys not NULL. Other groups (NULL or values
    // outside a declared domain) are dropped here, once.
    let domains: Vec<Option<HashSet<&ScalarValue>>> = plan
        .keys
        .iter()
        .map(|k| k.domain.as_ref().map(|d| d.iter().collect()))
        .collect();
    let releasable = |key: &Key| {
        key.iter().zip(&domains).all(|(v, d)| match d {
            Some(d) => d.contains(v),
            None => !v.is_null(),
        })
    };
    let mut selection = None;
    if let Some(s) = &plan.selection {
        let mut counts = HashMap::new();
        for b in collect(ctx, &s.plan).await? {
            for r in 0..b.num_rows() {
                let key = key_of(&b, s.keys.len(), r)?;
                if key.iter().any(ScalarValue::is_null) {
                    continue;
                }
                counts.insert(key, read_i64(b.column(s.keys.len()), r)?);
            }
        }
        selection = Some(counts);
    }
    let mut laplace = HashMap::new();
    match per_patient {
        Some(cells) => {
            for (key, patients) in cells.iter().filter(|(k, _)| releasable(k)) {
                // In i128 (no realistic number of patients can reach its
                // limits; it saturates all the same), then saturated to i64
                // like any other sum.
                let mut sums = vec![0i128; patients.first().map_or(0, Vec::len)];
                for p in patients {
                    for (s, v) in sums.iter_mut().zip(p) {
                        *s = s.saturating_add(i128::from(*v));
                    }
                }
                laplace.insert(key.clone(), sums.into_iter().map(saturate).collect());
            }
        }
        None => {
            for b in collect(ctx, &plan.main).await? {
                for r in 0..b.num_rows() {
                    let key = key_of(&b, n_keys, r)?;
                    if !releasable(&key) {
                        continue;
                    }
                    let values = (n_keys..b.num_columns())
                        .map(|c| read_i64(b.column(c), r))
                        .collect::<Result<Vec<_>, _>>()?;
                    laplace.insert(key, values);
                }
            }
        }
    }
    let mut histograms = Vec::new();
    for (m, p) in &plan.quantiles {
        let mut h: Histogram = HashMap::new();
        for b in collect(ctx, p).await? {
            for r in 0..b.num_rows() {
                let bucket = b.column(n_keys);
                if bucket.is_null(r) {
                    continue;
                }
                let key = key_of(&b, n_keys, r)?;
                if !releasable(&key) {
                    continue;
                }
                let bucket = read_i64(bucket, r)?;
                let n = u64::try_from(read_i64(b.column(n_keys + 1), r)?).unwrap_or(0);
                h.entry(key).or_default().push((bucket, n));
            }
        }
        histograms.push((*m, h));
    }
    Ok(Exact {
        laplace,
        histograms,
        selection,
    })
}

/// The mechanisms' output: the cells to release (public domains and the
/// keys DP key selection kept) and each measurement's noisy value per cell.
pub(crate) struct Noisy {
    pub(crate) cells: Vec<Key>,
    /// How many key tuples key selection kept.
    pub(crate) selected: usize,
    /// Per measurement, per cell: counts and fixed-point sums as integers,
    /// quantiles in the value's units.
    pub(crate) values: Vec<Vec<f64>>,
}

/// Run every mechanism of the plan once over the exact aggregates: key
/// selection, then discrete Laplace noise or a private quantile for every
/// cell (empty cells included). The only place noise is drawn.
pub(crate) fn noise(plan: &PrivatePlan, exact: &Exact) -> Result<Noisy, QueryError> {
    let dp = |e: tre_dp::DpError| QueryError::Internal(e.to_string());
    // Which values each key takes: public domains, or the selected keys.
    let mut selected: Vec<Key> = Vec::new();
    if let (Some(s), Some(counts)) = (&plan.selection, &exact.selection) {
        // OpenDP's threshold mechanism works on string keys; map back.
        let mut by_text: HashMap<String, Key> = HashMap::new();
        let mut text_counts = HashMap::new();
        for (k, v) in counts {
            let text = format!("{k:?}");
            text_counts.insert(text.clone(), *v);
            by_text.insert(text, k.clone());
        }
        let kept = s.mechanism.select(text_counts).map_err(dp)?;
        selected = kept.keys().filter_map(|t| by_text.remove(t)).collect();
        selected.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    }
    // Every cell, nested in group-key order. Each public key contributes
    // its domain; the selected keys enter together, as tuples, at the
    // position of the first of them.
    let n_keys = plan.keys.len();
    let selected_at: Vec<usize> = (0..n_keys)
        .filter(|i| plan.keys[*i].domain.is_none())
        .collect();
    let mut cells: Vec<Key> = vec![vec![ScalarValue::Null; n_keys]];
    for (i, k) in plan.keys.iter().enumerate() {
        let choices: Vec<Vec<(usize, ScalarValue)>> = match &k.domain {
            Some(d) => d.iter().map(|v| vec![(i, v.clone())]).collect(),
            None if selected_at.first() == Some(&i) => selected
                .iter()
                .map(|t| selected_at.iter().copied().zip(t.iter().cloned()).collect())
                .collect(),
            None => continue,
        };
        cells = cells
            .into_iter()
            .flat_map(|cell| {
                choices.iter().map(move |assign| {
                    let mut c = cell.clone();
                    for (slot, v) in assign {
                        c[*slot] = v.clone();
                    }
                    c
                })
            })
            .collect();
    }

    // Noisy measurements per cell.
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); plan.measurements.len()];
    let mut laplace_col = 0;
    for (m, measurement) in plan.measurements.iter().enumerate() {
        match &measurement.mechanism {
            Mechanism::Laplace(l) => {
                let exact_values: Vec<i64> = cells
                    .iter()
                    .map(|k| exact.laplace.get(k).map_or(0, |v| v[laplace_col]))
                    .collect();
                laplace_col += 1;
                values[m] = l
                    .release_all(&exact_values)
                    .map_err(dp)?
                    .into_iter()
                    .map(|v| v as f64)
                    .collect();
            }
            Mechanism::Quantile(q) => {
                let Some((_, hist)) = exact.histograms.iter().find(|(i, _)| *i == m) else {
                    return Err(QueryError::Internal("quantile without histogram".into()));
                };
                let crate::compile::Measure::Quantile { lo, hi, .. } = measurement.measure else {
                    return Err(QueryError::Internal("quantile measure mismatch".into()));
                };
                let width = (hi - lo) / q.buckets() as f64;
                let empty = Vec::new();
                values[m] = cells
                    .iter()
                    .map(|k| {
                        q.release(hist.get(k).unwrap_or(&empty))
                            .map(|b| lo + b as f64 * width)
                    })
                    .collect::<Result<_, _>>()
                    .map_err(dp)?;
            }
        }
    }
    Ok(Noisy {
        cells,
        selected: selected.len(),
        values,
    })
}

pub(crate) async fn execute(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    profile: &Profile,
) -> Result<Release, QueryError> {
    let per_patient = if profile.exact_rules {
        Some(per_patient(ctx, plan).await?)
    } else {
        None
    };
    let exact = exact_with(ctx, plan, per_patient.as_ref()).await?;
    let Noisy {
        cells,
        selected,
        values: noisy,
    } = noise(plan, &exact)?;
    let alpha = 1.0 - CONFIDENCE;

    // Cells of the release aggregate, after SDC.
    let noisy_cells = NoisyCells {
        profile,
        measurements: &plan.measurements,
        values: &noisy,
        alpha,
    };
    let mut agg_cells: Vec<Vec<Cell>> = Vec::with_capacity(cells.len());
    for (ci, key) in cells.iter().enumerate() {
        let mut row: Vec<Cell> = key
            .iter()
            .map(|v| Cell::Key {
                value: if v.is_null() {
                    String::new()
                } else {
                    v.to_string()
                },
            })
            .collect();
        for a in &plan.aggs {
            row.push(a.cell(&noisy_cells, ci)?);
        }
        agg_cells.push(row);
    }

    let review_notes = match &per_patient {
        Some(facts) => exact_rule_findings(plan, profile, facts, &cells),
        None => Vec::new(),
    };
    let rows = if plan.totals {
        with_totals(plan, agg_cells, &noisy, profile)?
    } else {
        post_process(ctx, plan, &cells, &agg_cells).await?
    };
    let outcome = tre_sdc::ReleaseOutcome::of(rows.iter().flatten().filter_map(|c| match c {
        Cell::Value { status, .. } => Some(*status),
        Cell::Key { .. } => None,
    }));

    let mut notes = vec![format!(
        "each patient contributes at most {} row(s); counts and sums carry discrete Laplace noise; intervals are {}%",
        plan.max_rows_per_unit(),
        (CONFIDENCE * 100.0).round()
    )];
    if plan.measurements.iter().any(|m| {
        matches!(
            m.measure,
            crate::compile::Measure::Sum { .. } | crate::compile::Measure::CenteredSum { .. }
        )
    }) {
        notes.push("sums are computed in fixed point over values clamped to their bounds".into());
    }
    for m in &plan.measurements {
        if let Mechanism::Quantile(q) = &m.mechanism {
            notes.push(format!(
                "{}: with 95% probability the released value's rank is within ±{:.0} of the exact quantile's",
                m.measure.describe("person_id"),
                q.rank_half_width(alpha)
            ));
        }
    }
    if let Some(s) = &plan.selection {
        notes.push(format!(
            "{} key(s) released by DP key selection (threshold {} patients before noise)",
            selected,
            s.mechanism.threshold()
        ));
    }
    if profile.exact_rules {
        notes.push(format!(
            "this profile checks exact values ({}); they decide nothing automatically: every release waits for a custodian, who alone sees what the checks found",
            profile.exact_rule_names().join(", ")
        ));
    }
    if plan.totals {
        notes.push("totals are sums of the noisy cells, rounded on their own, so a total may differ from the sum of its rounded cells; their intervals use the normal approximation; cells marked secondary suppression are hidden so that no suppressed cell can be worked out from the cells and totals shown".into());
    }
    notes.extend(profile.notes());
    Ok(Release {
        columns: plan.columns(),
        rows,
        epsilon: plan.epsilon().value(),
        delta: plan.delta().value(),
        confidence: CONFIDENCE,
        sdc_profile: profile.name.clone(),
        sdc_outcome: outcome,
        exact_rules_applied: profile.exact_rules,
        notes,
        review_notes,
    })
}

/// The researcher's plan with its release aggregate replaced by a table of
/// the noisy cells: HAVING, ORDER BY, LIMIT, windows and arithmetic then
/// see released values only. Each output row carries its cell's id.
fn post_plan(
    plan: &PrivatePlan,
    cells: &[Key],
    agg_cells: &[Vec<Cell>],
) -> Result<LogicalPlan, QueryError> {
    let internal = |e: datafusion::error::DataFusionError| {
        QueryError::Internal(format!("post-processing: {e}"))
    };
    let n_keys = plan.keys.len();
    let schema = &plan.agg_schema;
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (i, (_, f)) in schema.iter().enumerate() {
        let values: Vec<ScalarValue> = (0..cells.len())
            .map(|r| {
                let v = if i < n_keys {
                    cells[r][i].clone()
                } else {
                    match &agg_cells[r][i] {
                        Cell::Value { value: Some(v), .. } => ScalarValue::Float64(Some(*v)),
                        _ => ScalarValue::Float64(None),
                    }
                };
                v.cast_to(f.data_type())
                    .or_else(|_| ScalarValue::try_from(f.data_type()))
            })
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        let array = if values.is_empty() {
            datafusion::arrow::array::new_empty_array(f.data_type())
        } else {
            ScalarValue::iter_to_array(values).map_err(internal)?
        };
        fields.push(Field::new(format!("__c{i}"), f.data_type().clone(), true));
        arrays.push(array);
    }
    fields.push(Field::new(CELL_ID, DataType::UInt64, false));
    arrays.push(Arc::new(UInt64Array::from_iter_values(
        0..cells.len() as u64,
    )));
    let arrow_schema = Arc::new(Schema::new(fields));
    let batch =
        RecordBatch::try_new(Arc::clone(&arrow_schema), arrays).map_err(|e| internal(e.into()))?;
    let table = MemTable::try_new(arrow_schema, vec![vec![batch]]).map_err(internal)?;
    // The noisy table, shaped exactly like the release aggregate's output.
    let mut exprs: Vec<Expr> = schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::from_name(format!("__c{i}"))).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    exprs.push(Expr::Column(Column::new(Some("__tre_noisy"), CELL_ID)).alias(CELL_ID));
    let noisy = LogicalPlanBuilder::scan("__tre_noisy", provider_as_source(Arc::new(table)), None)
        .and_then(|b| b.project(exprs))
        .and_then(|b| b.build())
        .map_err(internal)?;
    let mut replaced = false;
    let post = plan
        .post
        .clone()
        .transform_down(|node| match node {
            LogicalPlan::Aggregate(_) if !replaced => {
                replaced = true;
                Ok(Transformed::new(
                    noisy.clone(),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            }
            other => Ok(Transformed::no(other)),
        })
        .map_err(internal)?
        .data
        .transform_up(|node| match node {
            LogicalPlan::Projection(mut p) => {
                let id = Expr::Column(Column::from_name(CELL_ID));
                let has_id = p.schema.fields().iter().any(|f| f.name() == CELL_ID);
                if !has_id {
                    p.expr.push(id);
                }
                LogicalPlan::Projection(p)
                    .recompute_schema()
                    .map(Transformed::yes)
            }
            other => other.recompute_schema().map(Transformed::yes),
        })
        .map_err(internal)?
        .data;
    Ok(post)
}

/// Run the researcher's post-processing (HAVING, ORDER BY, LIMIT,
/// arithmetic) over the noisy cells, in DataFusion, and map each output
/// column back to its noisy cell where it passes one through unchanged.
async fn post_process(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    cells: &[Key],
    agg_cells: &[Vec<Cell>],
) -> Result<Vec<Vec<Cell>>, QueryError> {
    let internal = |e: datafusion::error::DataFusionError| {
        QueryError::Internal(format!("post-processing: {e}"))
    };
    let post = post_plan(plan, cells, agg_cells)?;
    let batches = collect(ctx, &post).await.map_err(|e| match e {
        QueryError::Execution { detail } => {
            QueryError::Internal(format!("post-processing: {detail}"))
        }
        other => other,
    })?;
    let mut rows = Vec::new();
    for b in &batches {
        let id_col = b
            .schema()
            .index_of(CELL_ID)
            .map_err(|e| internal(e.into()))?;
        let ids = b
            .column(id_col)
            .as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>()
            .ok_or_else(|| QueryError::Internal("cell id type".into()))?;
        for r in 0..b.num_rows() {
            let cell_row = usize::try_from(ids.value(r))
                .ok()
                .and_then(|i| agg_cells.get(i));
            let mut row = Vec::with_capacity(plan.columns.len());
            for (c, col) in plan.columns.iter().enumerate() {
                let passed = col.source.and_then(|s| cell_row.and_then(|cr| cr.get(s)));
                row.push(match passed {
                    Some(cell) => cell.clone(),
                    None => {
                        let v = ScalarValue::try_from_array(b.column(c), r).map_err(internal)?;
                        let value = relation_f64(&v);
                        match value {
                            Some(x) => value_cell(
                                Some(x),
                                None,
                                tre_sdc::Status::Released,
                                "computed from released values".into(),
                            ),
                            None if v.is_null() => value_cell(
                                None,
                                None,
                                tre_sdc::Status::Suppressed,
                                "computed from a suppressed value".into(),
                            ),
                            None => Cell::Key {
                                value: v.to_string(),
                            },
                        }
                    }
                });
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

fn relation_f64(v: &ScalarValue) -> Option<f64> {
    if v.is_null() || !v.data_type().is_numeric() {
        return None;
    }
    match v.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(f)) => Some(f),
        _ => None,
    }
}

/// Per cell and patient, each Laplace measurement's exact contribution: one
/// scan of the bounded input grouped by the keys and the privacy unit.
async fn per_patient(ctx: &SessionContext, plan: &PrivatePlan) -> Result<PerPatient, QueryError> {
    let facts = per_patient_plan(plan)?;
    let n_keys = plan.keys.len();
    let mut per_cell: PerPatient = HashMap::new();
    for b in collect(ctx, &facts).await? {
        for r in 0..b.num_rows() {
            let key = key_of(&b, n_keys, r)?;
            let values = (n_keys + 1..b.num_columns())
                .map(|c| read_i64(b.column(c), r))
                .collect::<Result<Vec<_>, _>>()?;
            per_cell.entry(key).or_default().push(values);
        }
    }
    Ok(per_cell)
}

/// The main aggregate grouped by the privacy unit as well.
fn per_patient_plan(plan: &PrivatePlan) -> Result<LogicalPlan, QueryError> {
    let (LogicalPlan::Aggregate(main), Some(unit)) = (&plan.main, &plan.unit) else {
        return Err(QueryError::Internal(
            "rules on exact values need the privacy unit in the aggregated relation".into(),
        ));
    };
    let mut groups = main.group_expr.clone();
    groups.push(Expr::Column(unit.clone()).alias("__unit"));
    LogicalPlanBuilder::from(Arc::clone(&main.input))
        .aggregate(groups, main.aggr_expr.clone())
        .and_then(|b| b.build())
        .map_err(|e| QueryError::Internal(format!("building exact-rule facts: {e}")))
}

/// Plan every plan the engine will run for `plan` physically, through all
/// of DataFusion's optimizers and its final sanity check, at compile time,
/// before anything is charged. Planning depends on the query alone (the
/// sessions collect no file statistics), so a planning failure must be a
/// free refusal, never a failure after the reservation (an incident).
pub(crate) async fn preflight(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    profile_exact_rules: bool,
) -> Result<(), QueryError> {
    let mut plans: Vec<LogicalPlan> = vec![plan.main.clone()];
    plans.extend(plan.quantiles.iter().map(|(_, p)| p.clone()));
    plans.extend(plan.selection.iter().map(|s| s.plan.clone()));
    if !plan.totals {
        plans.push(post_plan(plan, &[], &[])?);
    }
    if profile_exact_rules && plan.unit.is_some() {
        plans.push(per_patient_plan(plan)?);
    }
    let state = ctx.state();
    for p in &plans {
        state.create_physical_plan(p).await.map_err(|e| {
            let msg = e.to_string();
            // A physical-plan dump names server paths and says nothing a
            // researcher can act on: keep only short reasons.
            let reason = msg
                .lines()
                .last()
                .filter(|l| l.len() <= 200 && !l.contains("Plan: ["))
                .unwrap_or("the engine's physical planner rejected the plan");
            QueryError::refused(
                tre_core::Code::UnsupportedExpression,
                format!("the query cannot be planned: {reason}; simplify the expression"),
            )
        })?;
    }
    Ok(())
}

/// The profile's rules on exact values, opted into per profile: minimum
/// distinct patients per cell, and n-k dominance and the p-ratio rule on
/// SUM cells, from each patient's exact contribution. They decide nothing
/// the researcher sees (a branch on exact data would be an exact oracle):
/// their findings go to the reviewing custodian, and every release of such
/// a profile is held for review. Issue #10.
fn exact_rule_findings(
    plan: &PrivatePlan,
    profile: &Profile,
    per_cell: &PerPatient,
    cells: &[Key],
) -> Vec<String> {
    // Each SUM output and its measurement's column among the Laplace
    // measurements (the main aggregate's columns, in order).
    let sum_cols: Vec<(usize, usize)> = plan
        .aggs
        .iter()
        .enumerate()
        .filter_map(|(j, a)| {
            let m = a.exact_sum()?.index();
            let before = plan.measurements.get(..m)?;
            Some((
                j,
                before
                    .iter()
                    .filter(|x| matches!(x.mechanism, Mechanism::Laplace(_)))
                    .count(),
            ))
        })
        .collect();
    let n_keys = plan.keys.len();
    let mut findings = Vec::new();
    for key in cells {
        let patients = per_cell.get(key).map_or(&[][..], Vec::as_slice);
        let sums: Vec<(usize, Vec<f64>)> = sum_cols
            .iter()
            .map(|&(j, l)| {
                let c = patients.iter().filter_map(|p| p.get(l)).map(|v| *v as f64);
                (j, c.collect())
            })
            .collect();
        let cell: Vec<String> = key
            .iter()
            .zip(&plan.keys)
            .map(|(v, k)| {
                format!(
                    "{}={}",
                    k.name,
                    if v.is_null() {
                        String::new()
                    } else {
                        v.to_string()
                    }
                )
            })
            .collect();
        for (target, reason) in profile.exact_cell_rules(patients.len(), &sums) {
            let column = match target {
                Some(j) => plan
                    .agg_schema
                    .fields()
                    .get(n_keys + j)
                    .map_or_else(String::new, |f| f.name().clone()),
                None => "every value".to_owned(),
            };
            findings.push(format!(
                "cell ({}), {column}: {reason}",
                if cell.is_empty() {
                    "all".to_owned()
                } else {
                    cell.join(", ")
                }
            ));
        }
    }
    findings
}

/// The release rows followed by total rows ("Total" in the summed key),
/// per count column: primary suppression from the profile on cells and
/// totals alike, then secondary suppression until no suppressed cell can be
/// solved from what is shown.
fn with_totals(
    plan: &PrivatePlan,
    mut rows: Vec<Vec<Cell>>,
    noisy: &[Vec<f64>],
    profile: &Profile,
) -> Result<Vec<Vec<Cell>>, QueryError> {
    use tre_sdc::secondary;
    let n_keys = plan.keys.len();
    let domain_len = |i: usize| plan.keys[i].domain.as_ref().map_or(0, Vec::len);
    let (r, c) = if n_keys == 1 {
        (1, domain_len(0))
    } else {
        (domain_len(0), domain_len(1))
    };
    let n_cells = r * c;
    if rows.len() != n_cells {
        return Err(QueryError::Internal(
            "totals: cells do not fill the table".into(),
        ));
    }
    let (n, lines) = if n_keys == 1 {
        secondary::one_way(n_cells)
    } else {
        secondary::two_way(r, c)
    };
    // Which cells each total sums: its line's members are cells or totals.
    let mut members_of: Vec<Vec<usize>> = vec![Vec::new(); n];
    for l in &lines {
        let mut cells = Vec::new();
        for m in &l.members {
            if *m < n_cells {
                cells.push(*m);
            } else {
                cells.extend(members_of[*m].iter().copied());
            }
        }
        members_of[l.total] = cells;
    }
    let key = |v: Option<&ScalarValue>| Cell::Key {
        value: v.map_or_else(|| "Total".to_owned(), ToString::to_string),
    };
    let domain = |i: usize| plan.keys[i].domain.clone().unwrap_or_default();
    let mut total_rows: Vec<Vec<Cell>> = (n_cells..n)
        .map(|t| {
            if n_keys == 1 {
                vec![key(None)]
            } else if t < n_cells + r {
                vec![key(domain(0).get(t - n_cells)), key(None)]
            } else if t < n_cells + r + c {
                vec![key(None), key(domain(1).get(t - n_cells - r))]
            } else {
                vec![key(None), key(None)]
            }
        })
        .collect();
    let z = 1.959_963_985; // two-sided 95% normal quantile
    for (j, a) in plan.aggs.iter().enumerate() {
        let Some(m) = a.total().map(|m| m.index()) else {
            return Err(QueryError::Internal("totals over a non-count".into()));
        };
        let Some(Mechanism::Laplace(lap)) = plan.measurements.get(m).map(|x| &x.mechanism) else {
            return Err(QueryError::Internal(
                "totals over a non-Laplace count".into(),
            ));
        };
        let col = n_keys + j;
        let mut values: Vec<f64> = noisy[m].iter().map(|v| v.max(0.0)).collect();
        let mut suppressed: Vec<bool> = rows
            .iter()
            .map(|row| matches!(&row[col], Cell::Value { value: None, .. }))
            .collect();
        // Variance of the discrete Laplace noise per cell.
        let q = (-1.0 / lap.scale()).exp();
        let var = 2.0 * q / (1.0 - q).powi(2);
        let mut total_cells = Vec::new();
        for members in &members_of[n_cells..] {
            let sum: f64 = members.iter().map(|i| noisy[m][*i]).sum();
            let out = profile.count_cell(sum as i64);
            values.push(sum.max(0.0));
            suppressed.push(out.status == tre_sdc::Status::Suppressed);
            let hw = z * (members.len() as f64 * var).sqrt() + profile.rounding_slack();
            total_cells.push((out, hw));
        }
        let added = secondary::protect(&values, &mut suppressed, &lines);
        let why = format!(
            "secondary suppression: otherwise a suppressed cell could be worked out from this line's other cells and total ({})",
            profile.name
        );
        for i in added.iter().copied().filter(|i| *i < n_cells) {
            rows[i][col] = value_cell(None, None, tre_sdc::Status::Suppressed, why.clone());
        }
        for (k, (out, hw)) in total_cells.into_iter().enumerate() {
            let cell = if added.contains(&(n_cells + k)) || out.value.is_none() {
                let reason = if out.value.is_none() {
                    out.reason
                } else {
                    why.clone()
                };
                value_cell(None, None, tre_sdc::Status::Suppressed, reason)
            } else {
                value_cell(
                    out.value,
                    out.value.map(|v| ((v - hw).max(0.0), v + hw)),
                    out.status,
                    out.reason,
                )
            };
            total_rows[k].push(cell);
        }
    }
    rows.extend(total_rows);
    Ok(rows)
}
