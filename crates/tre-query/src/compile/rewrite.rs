//! Stage 5: the rewrite. Every private scan becomes a bounded scan: opt-outs
//! removed, out-of-bounds dates and over-long text NULL, and at most
//! `max_rows_per_unit` rows per patient. That bound was enforced when the
//! extract was written (issue #13); only a table whose policy is tighter
//! than its stored bound is bounded again here, by the shuffle key.
//! Selected keys are bounded per patient.

use super::*;

/// Replace every private table scan with its bounded version.
pub(super) async fn bound_scans(
    ctx: &SessionContext,
    policy: &Policy,
    input: &LogicalPlan,
    extracts: &Extracts,
) -> Result<LogicalPlan, QueryError> {
    let internal =
        |e: datafusion::error::DataFusionError| QueryError::Internal(format!("bounding: {e}"));
    let mut providers: HashMap<String, Arc<dyn TableProvider>> = HashMap::new();
    for name in policy.tables.keys() {
        let p = ctx.table_provider(name.as_str()).await.map_err(internal)?;
        providers.insert(name.clone(), p);
    }
    let udfs = BoundingUdfs {
        shuffle: Internal::Shuffle.udf(ctx).map_err(internal)?,
        admitted: Internal::Admitted.udf(ctx).map_err(internal)?,
    };
    let mut bounded: HashMap<String, LogicalPlan> = HashMap::new();
    for (name, table) in &policy.tables {
        bounded.insert(
            name.clone(),
            bounded_scan(policy, table, &providers, &udfs, extracts).map_err(internal)?,
        );
    }
    input
        .clone()
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) => match bounded.get(&table_key(policy, &scan.table_name))
            {
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

/// `table.flag = false`: true only for a patient who did not opt out (a
/// NULL flag counts as opted out, as in the set).
pub(super) fn opt_out_flag_clear(table: &str, flag: &str) -> Expr {
    Expr::Column(Column::new(Some(table), flag)).eq(lit(false))
}

/// The internal functions a bounded scan calls.
pub(super) struct BoundingUdfs {
    shuffle: Arc<datafusion::logical_expr::ScalarUDF>,
    admitted: Arc<datafusion::logical_expr::ScalarUDF>,
}

pub(super) fn bounded_scan(
    policy: &Policy,
    table: &TablePolicy,
    providers: &HashMap<String, Arc<dyn TableProvider>>,
    udfs: &BoundingUdfs,
    extracts: &Extracts,
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
    // Opted-out patients go first, directly above the scan, unless the
    // extract holds none. `verify` recognises a scan bounded at write by
    // this filter over it, or by its table holding no opt-outs.
    let mut b = match &policy.opt_out {
        _ if extracts.opt_outs_removed.contains(name) => scan,
        // The opt-out table's own flag says the same as the set read from
        // it, more cheaply than a lookup per row.
        Some(o) if o.table == name && !extracts.opt_out_list => {
            scan.filter(opt_out_flag_clear(name, &o.column))?
        }
        _ => scan.filter(udfs.admitted.call(vec![qcol(name, unit)]))?,
    };
    if !extracts.excluded.is_empty() {
        let list: Vec<Expr> = extracts.excluded.iter().map(|p| lit(p.as_str())).collect();
        b = b.filter(qcol(name, unit).in_list(list, true))?;
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
    let b = b.project(bounded)?;
    if extracts.bounded_at_write.contains(name) {
        return b.build();
    }
    // The shuffle key sees the whole row so that a deterministic (test)
    // sampler picks the same rows whoever else is in the dataset.
    let rn = row_number()
        .partition_by(vec![qcol(name, unit)])
        .order_by(vec![udfs.shuffle.call(columns.clone()).sort(true, false)])
        .build()?
        .alias("__tre_rn");
    b.window(vec![rn])?
        .filter(col("__tre_rn").lt_eq(lit(u64::from(table.max_rows_per_unit))))?
        .project(columns)?
        .build()
}

/// Keep at most `g` groups (of the selected keys) per patient, chosen at
/// random per query by a salted hash, so that key selection's sensitivity
/// follows from `max_groups_per_unit`.
pub(super) fn bound_groups(
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

/// What the rewrite needs beyond the plan it rewrites.
#[derive(Clone, Copy)]
pub(super) struct Rewrite<'a> {
    pub(super) ctx: &'a SessionContext,
    pub(super) policy: &'a Policy,
    pub(super) extracts: &'a Extracts,
    /// The release aggregate's group keys.
    pub(super) group_exprs: &'a [Expr],
    /// Which of them DP key selection chooses.
    pub(super) selected: &'a [usize],
    pub(super) unit_col: Option<&'a Column>,
    /// Groups one patient may count towards under key selection.
    pub(super) max_groups: u64,
    pub(super) eps_each: Epsilon,
    pub(super) delta: Delta,
    pub(super) drafts: &'a [aggregates::Draft],
}

/// The plans that read data: the release aggregate over bounded scans,
/// one histogram plan per quantile, and key selection's plan.
pub(super) struct Rewritten {
    pub(super) main: LogicalPlan,
    /// `main`, per patient first (`per_unit_first`), when that is what runs.
    pub(super) streamed: Option<LogicalPlan>,
    pub(super) quantiles: Vec<(usize, LogicalPlan)>,
    pub(super) fused: bool,
    pub(super) selection: Option<Selection>,
}

impl Rewrite<'_> {
    /// Rewrite the release aggregate's `input` (its domains already
    /// enforced) into the plans that read data.
    pub(super) async fn run(&self, input: &LogicalPlan) -> Result<Rewritten, QueryError> {
        let Rewrite {
            ctx,
            policy,
            extracts,
            group_exprs,
            selected,
            unit_col,
            max_groups,
            eps_each,
            delta,
            drafts,
        } = *self;
        let mut bounded = bound_scans(ctx, policy, input, extracts).await?;
        let mut selection = None;
        if !selected.is_empty() {
            let Some(unit) = unit_col.cloned() else {
                return Err(refuse(
                    Code::PrivacyUnitLost,
                    format!(
                        "DP key selection needs {} in FROM; keep it in every CTE",
                        policy.privacy_unit
                    ),
                ));
            };
            let g = u32::try_from(max_groups).unwrap_or(u32::MAX);
            bounded = bound_groups(ctx, bounded, &unit, group_exprs, selected, g)?;
            let sel_exprs: Vec<Expr> = selected.iter().map(|i| group_exprs[*i].clone()).collect();
            let plan = LogicalPlanBuilder::from(bounded.clone())
                .aggregate(
                    sel_exprs,
                    vec![count_distinct(Expr::Column(unit.clone())).alias("__units")],
                )
                .and_then(|b| b.build())
                .map_err(|e| QueryError::Internal(format!("building key selection: {e}")))?;
            let plan = per_unit_first(&plan, &unit).unwrap_or(plan);
            let mechanism = KeySelection::new(g, eps_each, delta)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            selection = Some(Selection {
                plan,
                keys: selected.to_vec(),
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
        let measured = laplace_exprs.clone();
        if laplace_exprs.is_empty() && group_exprs.is_empty() {
            // Only quantiles and no keys: DataFusion needs one aggregate here.
            // It is never read.
            laplace_exprs.push(count(lit(1i64)).alias("__unused"));
        }
        let main = build(
            LogicalPlanBuilder::from(bounded.clone())
                .aggregate(group_exprs.to_vec(), laplace_exprs),
        )?;
        // A quantile needs a histogram, a second pass over the bounded
        // input grouped by the keys and the bucket. When every Laplace
        // measurement is a sum over rows, the first histogram plan computes
        // them too, per bucket, and execution sums them over the buckets
        // (the NULL bucket included), so the input is read once, not twice
        // (issue #13: a median at 2.4× of plain DataFusion). `main` stays
        // the plan's definition and `verify` checks the fused plan against
        // it.
        let fuse = drafts
            .iter()
            .all(|d| matches!(d.sensitivity, Sensitivity::Rows) || d.measure.sums_rows());
        let mut quantiles = Vec::new();
        for (i, d) in drafts.iter().enumerate() {
            if matches!(d.sensitivity, Sensitivity::Rows) {
                let mut g = group_exprs.to_vec();
                g.push(d.expr.clone().alias("__bucket"));
                let mut aggregates = vec![count(lit(1i64)).alias("__n")];
                if fuse && quantiles.is_empty() {
                    aggregates.extend(measured.iter().cloned());
                }
                let p = build(LogicalPlanBuilder::from(bounded.clone()).aggregate(g, aggregates))?;
                quantiles.push((i, p));
            }
        }
        let fused = fuse && !quantiles.is_empty();
        // Distinct patients per cell are counted per patient first, so
        // that no set of every patient is held (see `per_unit_first`).
        let streamed = match unit_col {
            Some(unit)
                if !fused
                    && drafts
                        .iter()
                        .any(|d| matches!(d.measure, Measure::CountDistinctUnits)) =>
            {
                per_unit_first(&main, unit)
            }
            _ => None,
        };
        Ok(Rewritten {
            main,
            streamed,
            quantiles,
            fused,
            selection,
        })
    }
}

/// Name of the unit's column in a per-patient-first aggregate.
pub(crate) const UNIT_GROUP: &str = "__tre_unit";

/// `agg` computed per patient first, then per cell: the inner aggregate
/// groups by (the unit, `agg`'s keys) and the outer one by the keys alone.
///
/// Why (issue #13): `COUNT(DISTINCT unit)` keeps a set of every patient of
/// every cell (at 10M patients, 580 MB of a query's pool for the mean
/// HbA1c, 666 MB for key selection). Over input in the extracts' unit
/// order the inner aggregate is streamed by DataFusion (its groups end
/// with each patient's run), and the outer one holds one row per cell.
/// The values are the same: a distinct count of the unit (or of a gated
/// unit, `CASE WHEN filter THEN unit END`) is the number of
/// (cell, patient) groups with a non-null value; a count or a sum is the
/// sum of its per-patient counts or sums.
///
/// `None` when an aggregate is not one of these, or the result's columns
/// would differ from `agg`'s in name or type; the caller then runs `agg`.
pub(crate) fn per_unit_first(agg: &LogicalPlan, unit: &Column) -> Option<LogicalPlan> {
    use datafusion::functions_aggregate::expr_fn::sum;
    let LogicalPlan::Aggregate(agg) = agg else {
        return None;
    };
    /// How the outer aggregate combines an inner (per-patient) column.
    enum Outer {
        /// Sum the per-patient sums.
        Sum,
        /// Sum the per-patient counts; 0, as a count is, over no rows (a
        /// cell-less aggregate over an empty input).
        SumOfCounts,
        /// Count the patients whose count of non-null values is positive.
        Touched,
    }
    let mut inner_aggs = Vec::new();
    let mut outer_of: Vec<(String, Outer)> = Vec::new();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let Expr::Alias(alias) = e else {
            return None;
        };
        let Expr::AggregateFunction(f) = alias.expr.as_ref() else {
            return None;
        };
        let p = &f.params;
        if p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != 1 {
            return None;
        }
        let arg = p.args[0].clone();
        let inner_name = format!("__tre_p{i}");
        let (inner, outer) = match (f.func.name(), p.distinct) {
            ("count", true) if counts_only_the_unit(&arg, unit) => (count(arg), Outer::Touched),
            ("count", false) => (count(arg), Outer::SumOfCounts),
            ("sum", false) => (sum(arg), Outer::Sum),
            _ => return None,
        };
        inner_aggs.push(inner.alias(inner_name));
        outer_of.push((alias.name.clone(), outer));
    }
    let mut inner_groups = vec![Expr::Column(unit.clone()).alias(UNIT_GROUP)];
    inner_groups.extend(agg.group_expr.iter().cloned());
    // A plan that cannot be built this way (a key named like an inner
    // column) runs as it is: this form saves memory, it changes no value.
    let Ok(inner) = LogicalPlanBuilder::from(Arc::clone(&agg.input))
        .aggregate(inner_groups, inner_aggs)
        .and_then(|b| b.build())
    else {
        return None;
    };
    let fields = inner.schema().columns();
    let outer_groups: Vec<Expr> = fields[1..=agg.group_expr.len()]
        .iter()
        .map(|c| Expr::Column(c.clone()))
        .collect();
    let outer_aggs: Vec<Expr> = outer_of
        .into_iter()
        .enumerate()
        .map(|(i, (name, outer))| {
            let c = col(format!("__tre_p{i}"));
            match outer {
                Outer::Sum => sum(c),
                Outer::SumOfCounts => {
                    datafusion::functions::expr_fn::coalesce(vec![sum(c), lit(0i64)])
                }
                Outer::Touched => count(Expr::Case(datafusion::logical_expr::expr::Case::new(
                    None,
                    vec![(Box::new(c.gt(lit(0i64))), Box::new(lit(1i64)))],
                    None,
                ))),
            }
            .alias(name)
        })
        .collect();
    let Ok(outer) = LogicalPlanBuilder::from(inner)
        .aggregate(outer_groups, outer_aggs)
        .and_then(|b| b.build())
    else {
        return None;
    };
    let same_columns = |a: &DFSchemaRef, b: &DFSchemaRef| {
        a.fields().len() == b.fields().len()
            && a.iter().zip(b.iter()).all(|((qa, fa), (qb, fb))| {
                qa == qb && fa.name() == fb.name() && fa.data_type() == fb.data_type()
            })
    };
    same_columns(outer.schema(), &agg.schema).then_some(outer)
}

/// `arg` is the unit, or the unit behind a filter (`CASE WHEN f THEN unit
/// END`), so counting its distinct non-null values counts patients.
fn counts_only_the_unit(arg: &Expr, unit: &Column) -> bool {
    match arg {
        Expr::Column(c) => c == unit,
        Expr::Case(case) => {
            case.expr.is_none()
                && case.else_expr.is_none()
                && case.when_then_expr.len() == 1
                && matches!(case.when_then_expr[0].1.as_ref(), Expr::Column(c) if c == unit)
        }
        _ => false,
    }
}
