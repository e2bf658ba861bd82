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
use crate::compile::{Mechanism, Noisy as NoisyCells, Prepared, PrivatePlan, value_cell};
use crate::release::{Cell, Release};

const CELL_ID: &str = "__tre_cell";

type Key = Vec<ScalarValue>;
/// Per cell, `(bucket, rows)` pairs of one quantile's histogram.
type Histogram = HashMap<Key, Vec<(i64, u64)>>;

mod exact;
mod noise;
mod post;
mod rules;
mod totals;

#[cfg(feature = "soundness-testing")]
pub(crate) use self::exact::exact;
pub(crate) use self::exact::{Exact, preflight};
use self::exact::{PerPatient, collect, exact_with, per_patient};
pub(crate) use self::noise::{Noisy, noise};
use self::post::{post_plan, post_process};
use self::rules::exact_rule_findings;
use self::totals::with_totals;

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
