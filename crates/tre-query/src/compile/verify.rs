//! Stage 6: the private plan's own checks, after the rewrite: every released
//! column passes through a mechanism, the cost charged is the cost built,
//! every private scan is bounded, and no partial operation is left.

use super::*;

/// The checks that make the rewrite trustworthy.
pub(super) fn verify(
    plan: &PrivatePlan,
    policy: &Policy,
    extracts: &Extracts,
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
    // A fused histogram plan computes exactly `main`'s measurements over the
    // same input, per bucket, and only sums over rows are added up.
    if plan.fused {
        let (LogicalPlan::Aggregate(main), Some((_, LogicalPlan::Aggregate(fused)))) =
            (&plan.main, plan.quantiles.first())
        else {
            return bug("a fused plan needs an aggregate and a histogram".into());
        };
        let summable = plan.measurements.iter().all(|m| match m.mechanism {
            Mechanism::Laplace(_) => m.measure.sums_rows(),
            Mechanism::Quantile(_) => true,
        });
        let same = fused.input == main.input
            && fused.group_expr.len() == main.group_expr.len() + 1
            && fused.group_expr[..main.group_expr.len()] == main.group_expr[..]
            && fused.aggr_expr.len() == laplace + 1
            && fused.aggr_expr[1..] == main.aggr_expr[..laplace];
        if !summable || !same {
            return bug("the fused histogram plan does not compute the private aggregate".into());
        }
    }
    // A plan run per patient first is `main`'s mechanical derivation.
    if let Some(streamed) = &plan.streamed {
        let derived = match &plan.unit {
            Some(unit) => super::rewrite::per_unit_first(&plan.main, unit),
            None => None,
        };
        if derived.as_ref() != Some(streamed) {
            return bug("the per-patient-first plan does not compute the private aggregate".into());
        }
    }
    // Every scan of a dataset table, in every plan that reads data, is
    // bounded: directly under the opt-out filter when the extract was
    // bounded at write, else under a filter on the shuffled row number per
    // patient (issue #12: this used to be a count of window nodes).
    for p in plan.reads() {
        let mut unbounded = Vec::new();
        unbounded_scans(p, policy, extracts, false, &mut unbounded);
        if !unbounded.is_empty() {
            return bug(format!("unbounded scans of {}", unbounded.join(", ")));
        }
    }
    // And the analyzer's count of private scans matches the plan's: each
    // is bounded at write or by a window of its own.
    let (mut windows, mut at_write) = (0, 0);
    let _ = plan.main.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::Window(_) => windows += 1,
            LogicalPlan::TableScan(scan)
                if extracts
                    .bounded_at_write
                    .contains(&table_key(policy, &scan.table_name)) =>
            {
                at_write += 1
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let expected = private_scans + usize::from(plan.selection.is_some());
    if windows + at_write != expected {
        return bug(format!(
            "{expected} bounding steps expected but {windows} windows and {at_write} scans bounded at write planned"
        ));
    }
    // Totality: no operation that can fail on a value survives the rewrite.
    let mut partial = None;
    for p in plan.reads().chain(std::iter::once(&plan.post)) {
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
/// them. A bounding step is either
/// - `bounded_scan`'s filter `__tre_rn <= k` over a window that numbers
///   each patient's rows in the order of the internal shuffle key
///   (everything under it is bounded), or
/// - for a table whose extract was bounded when written, the opt-out
///   filter `__tre_admitted(unit)` directly over its scan, or nothing if
///   the writer also removed the opt-outs the sandbox read.
pub(super) fn unbounded_scans(
    plan: &LogicalPlan,
    policy: &Policy,
    extracts: &Extracts,
    bounded: bool,
    out: &mut Vec<String>,
) {
    let bounded = bounded || is_bounding_step(plan);
    if !bounded && admits_a_scan_bounded_at_write(plan, policy, extracts) {
        return;
    }
    if let LogicalPlan::TableScan(scan) = plan
        && !bounded
        && policy
            .tables
            .contains_key(&table_key(policy, &scan.table_name))
        && !clean_at_write(&table_key(policy, &scan.table_name), extracts)
    {
        out.push(scan.table_name.to_string());
    }
    for input in plan.inputs() {
        unbounded_scans(input, policy, extracts, bounded, out);
    }
}

/// A table both bounded and cleared of opt-outs when its extract was
/// written: any scan of it is bounded.
fn clean_at_write(table: &str, extracts: &Extracts) -> bool {
    extracts.bounded_at_write.contains(table) && extracts.opt_outs_removed.contains(table)
}

/// `plan` is `Filter(__tre_admitted(t.unit))`, or on the opt-out table
/// `Filter(t.flag = false)`, over a scan of a table `t`
/// bounded when its extract was written.
fn admits_a_scan_bounded_at_write(
    plan: &LogicalPlan,
    policy: &Policy,
    extracts: &Extracts,
) -> bool {
    let LogicalPlan::Filter(filter) = plan else {
        return false;
    };
    let LogicalPlan::TableScan(scan) = filter.input.as_ref() else {
        return false;
    };
    let table = table_key(policy, &scan.table_name);
    let table = table.as_str();
    let admits_unit = matches!(
        &filter.predicate,
        Expr::ScalarFunction(f)
            if f.func.name() == Internal::Admitted.name()
                && matches!(f.args.as_slice(), [Expr::Column(c)] if c.name == policy.privacy_unit && c.relation.as_ref().is_some_and(|r| table_key(policy, r) == table))
    );
    let flag_clear = policy.opt_out.as_ref().is_some_and(|o| {
        o.table == table && filter.predicate == super::rewrite::opt_out_flag_clear(table, &o.column)
    });
    (admits_unit || flag_clear) && extracts.bounded_at_write.contains(table)
}

/// `unbounded_scans` from the top of `plan`, for the soundness tests.
#[cfg(feature = "soundness-testing")]
pub(crate) fn unbounded_scans_of(
    policy: &Policy,
    extracts: &Extracts,
    plan: &LogicalPlan,
) -> Vec<String> {
    let mut out = Vec::new();
    unbounded_scans(plan, policy, extracts, false, &mut out);
    out
}

pub(super) fn is_bounding_step(plan: &LogicalPlan) -> bool {
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
