//! The exact per-cell aggregates, as DataFusion computes them over the
//! bounded scans: the only place exact values exist. They leave this
//! module only as noise's input (and, for soundness tests, behind the
//! `soundness-testing` feature).

use super::*;

pub(super) fn exec_err(e: datafusion::error::DataFusionError) -> QueryError {
    QueryError::Execution {
        detail: e.to_string(),
    }
}

/// Run `plan`: the physical plan the preflight prepared for it, if
/// `prepared` still holds one, else a fresh one.
pub(super) async fn collect(
    ctx: &SessionContext,
    prepared: &Prepared,
    plan: &LogicalPlan,
) -> Result<Vec<RecordBatch>, QueryError> {
    let physical = match prepared.take(plan) {
        Some(physical) => physical,
        None => ctx
            .state()
            .create_physical_plan(plan)
            .await
            .map_err(exec_err)?,
    };
    datafusion::physical_plan::collect(physical, ctx.task_ctx())
        .await
        .map_err(exec_err)
}

/// `x` limited to the i64 range. Saturation is 1-Lipschitz, so a sum's
/// sensitivity survives it, and it never fails: a check that failed on
/// large sums would tell the researcher how large the exact sum is.
pub(super) fn saturate(x: i128) -> i64 {
    i64::try_from(x).unwrap_or(if x < 0 { i64::MIN } else { i64::MAX })
}

/// Read an exact integer measurement (Int64 count or Decimal128 fixed-point
/// sum), exactly.
fn read_i128(array: &ArrayRef, row: usize) -> Result<i128, QueryError> {
    if array.is_null(row) {
        return Ok(0);
    }
    if let Some(a) = array.as_primitive_opt::<Int64Type>() {
        return Ok(i128::from(a.value(row)));
    }
    if let Some(a) = array.as_primitive_opt::<Decimal128Type>() {
        return Ok(a.value(row));
    }
    Err(QueryError::Internal(format!(
        "measurement of type {} is not an integer",
        array.data_type()
    )))
}

/// Read an exact integer measurement, saturated to i64.
pub(super) fn read_i64(array: &ArrayRef, row: usize) -> Result<i64, QueryError> {
    read_i128(array, row).map(saturate)
}

pub(super) fn key_of(batch: &RecordBatch, cols: usize, row: usize) -> Result<Key, QueryError> {
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
pub(super) type PerPatient = HashMap<Key, Vec<Vec<i64>>>;

/// The exact aggregates. With `per_patient`, the Laplace measurements are
/// summed from it rather than computed by a second scan, so the rules on
/// exact values judge the very rows that were released.
pub(super) async fn exact_with(
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
        for b in collect(ctx, &plan.prepared, &s.plan).await? {
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
    // A fused first histogram carries the Laplace measurements per bucket:
    // summed here over the buckets, in i128, then saturated like any sum.
    let mut fused: Option<HashMap<Key, Vec<i128>>> =
        (plan.fused && per_patient.is_none()).then(HashMap::new);
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
        None if plan.fused => {}
        None => {
            for b in collect(ctx, &plan.prepared, plan.main_run()).await? {
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
    for (q, (m, p)) in plan.quantiles.iter().enumerate() {
        let mut h: Histogram = HashMap::new();
        let mut sums = if q == 0 { fused.as_mut() } else { None };
        for b in collect(ctx, &plan.prepared, p).await? {
            for r in 0..b.num_rows() {
                let key = key_of(&b, n_keys, r)?;
                if !releasable(&key) {
                    continue;
                }
                if let Some(sums) = sums.as_deref_mut() {
                    let measured = n_keys + 2..b.num_columns();
                    let cell = sums
                        .entry(key.clone())
                        .or_insert_with(|| vec![0; measured.len()]);
                    for (s, c) in cell.iter_mut().zip(measured) {
                        *s = s.saturating_add(read_i128(b.column(c), r)?);
                    }
                }
                let bucket = b.column(n_keys);
                if bucket.is_null(r) {
                    continue;
                }
                let bucket = read_i64(bucket, r)?;
                let n = u64::try_from(read_i64(b.column(n_keys + 1), r)?).unwrap_or(0);
                h.entry(key).or_default().push((bucket, n));
            }
        }
        histograms.push((*m, h));
    }
    for (key, sums) in fused.into_iter().flatten() {
        laplace.insert(key, sums.into_iter().map(saturate).collect());
    }
    Ok(Exact {
        laplace,
        histograms,
        selection,
    })
}

/// Per cell and patient, each Laplace measurement's exact contribution: one
/// scan of the bounded input grouped by the keys and the privacy unit.
pub(super) async fn per_patient(
    ctx: &SessionContext,
    plan: &PrivatePlan,
) -> Result<PerPatient, QueryError> {
    let facts = per_patient_plan(plan)?;
    let n_keys = plan.keys.len();
    let mut per_cell: PerPatient = HashMap::new();
    for b in collect(ctx, &plan.prepared, &facts).await? {
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
pub(super) fn per_patient_plan(plan: &PrivatePlan) -> Result<LogicalPlan, QueryError> {
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
/// Plans every plan the query runs, keeps them for execution, and returns
/// the bound on the memory they may hold together (`crate::memory`).
pub(crate) async fn preflight(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    profile_exact_rules: bool,
) -> Result<u64, QueryError> {
    // The plans execution runs as compiled are kept for it (`Prepared`);
    // the post-processing plan is planned here over placeholder cells and
    // again at execution over the noisy ones.
    // A fused plan's `main` is never run, so it is not planned either; nor
    // is one computed per patient first (`streamed`).
    let mut plans: Vec<(LogicalPlan, bool)> = Vec::new();
    if !plan.fused {
        plans.push((plan.main_run().clone(), true));
    }
    plans.extend(plan.quantiles.iter().map(|(_, p)| (p.clone(), true)));
    plans.extend(plan.selection.iter().map(|s| (s.plan.clone(), true)));
    if !plan.totals {
        // Over placeholder cells, as many as the release can have: over
        // none, DataFusion plans less than it runs over the noisy cells (a
        // round-robin repartition under a HAVING reserved 260 KB against a
        // bound of 0; found by the generated queries of issue #15).
        let n = usize::try_from(plan.memory.groups.clamp(1, 1 << 14)).unwrap_or(1 << 14);
        let keys: Vec<Key> = vec![vec![ScalarValue::Null; plan.keys.len()]; n];
        let values = vec![
            vec![
                Cell::Key {
                    value: String::new()
                };
                plan.agg_schema.fields().len()
            ];
            n
        ];
        plans.push((post_plan(plan, &keys, &values)?, false));
    }
    if profile_exact_rules && plan.unit.is_some() {
        plans.push((per_patient_plan(plan)?, true));
    }
    // The plans are planned at once, each on a task of its own: physical
    // planning is most of a compile (issue #13), and the engine's runtime
    // has a thread per core. A dropped compile (its time limit) aborts them.
    let state = ctx.state();
    let mut bound = 0u64;
    let planning: Vec<_> = plans
        .into_iter()
        .map(|(p, keep)| {
            let state = state.clone();
            let task = tokio::spawn(async move {
                let physical = state.create_physical_plan(&p).await;
                (p, keep, physical)
            });
            tokio_util::task::AbortOnDropHandle::new(task)
        })
        .collect();
    for task in planning {
        let (p, keep, physical) = task
            .await
            .map_err(|e| QueryError::Internal(format!("physical planning stopped: {e}")))?;
        let physical = physical.map_err(|e| {
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
        // The plans run one after another, but bounding them as if
        // together costs little and assumes nothing of the order. The
        // post-processing plan reads the released cells (at most the
        // release's groups), in memory.
        let facts = if keep {
            plan.memory.clone()
        } else {
            crate::memory::Facts {
                public_rows: plan.memory.public_rows.max(plan.memory.groups),
                ..plan.memory.clone()
            }
        };
        let held = crate::memory::bound(&physical, &facts).map_err(|e| {
            QueryError::refused(
                tre_core::Code::TooMuchMemory,
                format!("the query's memory cannot be bounded: {}; simplify it", e.0),
            )
        })?;
        bound = bound.saturating_add(held);
        if keep {
            plan.prepared.put(p, physical);
        }
    }
    Ok(bound)
}
