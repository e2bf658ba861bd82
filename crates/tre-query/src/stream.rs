//! Streaming over the order the extracts already have (issue #13): sorts
//! within runs, merge joins on the unit, and aggregates that end each
//! group with its run.
//!
//! Every extract is sorted by the privacy unit, a fact its authenticated
//! layout carries (see `sandbox`), and the sandbox declares that order to
//! DataFusion. Bounding groups per patient (key selection) and rows per
//! patient (a policy tighter than the stored bound) are windows partitioned
//! by the unit, so their input must be sorted by (unit, a random key, …).
//! DataFusion replaces such a sort with `PartialSortExec` (which sorts only
//! within each run of equal prefix values) for unbounded inputs only; for
//! files it sorts the whole input, in memory, because spilling is disabled
//! (spill files would hold plaintext). At 10M patients that sort did not fit
//! its query's pool. `sort_within_runs` makes the same replacement for bounded
//! inputs: same rows, same order, and memory of one patient's rows instead
//! of a table's.

use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode, SortMergeJoinExec};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::partial_sort::PartialSortExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::physical_plan::{InputOrderMode, Partitioning};

/// tre's physical rule, run after DataFusion's own: each node of the plan,
/// its inputs done first, gets the three rewrites below (each applies to
/// one kind of node and leaves the others alone).
#[derive(Debug, Default)]
pub(crate) struct StreamInUnitOrder;

type Plan = Arc<dyn ExecutionPlan>;

impl PhysicalOptimizerRule for StreamInUnitOrder {
    fn optimize(&self, plan: Plan, _config: &ConfigOptions) -> Result<Plan> {
        plan.transform_up(|node| {
            merge_join(node)?
                .transform_data(sort_within_runs)?
                .transform_data(stream_aggregate)
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "tre_stream_in_unit_order"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A full sort whose input is already ordered by a prefix of its keys
/// becomes a sort within each run of that prefix.
fn sort_within_runs(node: Plan) -> Result<Transformed<Plan>> {
    let Some(sort) = node.downcast_ref::<SortExec>() else {
        return Ok(Transformed::no(node));
    };
    // A sort with a limit keeps only its top rows already.
    if sort.fetch().is_some() {
        return Ok(Transformed::no(node));
    }
    let keys = sort.expr();
    // A hash repartition (for a window partitioned by the unit, in
    // parallel) loses the order unless it merges its inputs; the
    // merging variant keeps each output partition ordered.
    let input = merging(sort.input())?;
    let ordered = input.equivalence_properties();
    let mut prefix = 0;
    while prefix < keys.len() && ordered.ordering_satisfy(keys[..=prefix].to_vec())? {
        prefix += 1;
    }
    // Nothing ordered: a full sort is needed. All ordered: DataFusion
    // has already removed the sort, or will.
    if prefix == 0 || prefix == keys.len() {
        return Ok(Transformed::no(node));
    }
    let partial = PartialSortExec::new(keys.clone(), input, prefix)
        .with_preserve_partitioning(sort.preserve_partitioning());
    Ok(Transformed::yes(Arc::new(partial) as Arc<dyn ExecutionPlan>))
}

/// A hash join on keys both inputs are already ordered by (the privacy
/// unit, in the extracts' declared order) becomes a merge join.
///
/// A hash join holds its whole build side in memory: at 10M patients, the
/// patients table's unit and one column took 715 MB of a 1 GiB pool, and
/// four of the nine suite queries join on the unit. A merge join over the
/// ordered inputs holds one unit's rows at a time. Each hash repartition
/// under the join becomes its merging variant, which keeps every output
/// partition ordered; both sides are still partitioned by the same hash of
/// the same keys, so the pairs of partitions are the hash join's.
fn merge_join(node: Plan) -> Result<Transformed<Plan>> {
    let Some(join) = node.downcast_ref::<HashJoinExec>() else {
        return Ok(Transformed::no(node));
    };
    // A null-aware anti join (`NOT IN`) has semantics a merge join
    // does not implement, and a join with a row limit would lose it.
    if *join.partition_mode() != PartitionMode::Partitioned
        || join.null_aware
        || join.fetch().is_some()
    {
        return Ok(Transformed::no(node));
    }
    let ascending = SortOptions {
        descending: false,
        nulls_first: false,
    };
    let ordered_side = |side: &Arc<dyn ExecutionPlan>,
                        keys: Vec<Arc<dyn PhysicalExpr>>|
     -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let side = merging(side)?;
        let wanted = keys.into_iter().map(|expr| PhysicalSortExpr {
            expr,
            options: ascending,
        });
        let Some(ordering) = LexOrdering::new(wanted) else {
            return Ok(None);
        };
        Ok(side
            .equivalence_properties()
            .ordering_satisfy(ordering)?
            .then_some(side))
    };
    let (left_keys, right_keys): (Vec<_>, Vec<_>) = join
        .on()
        .iter()
        .map(|(l, r)| (Arc::clone(l), Arc::clone(r)))
        .unzip();
    let (Some(left), Some(right)) = (
        ordered_side(join.left(), left_keys)?,
        ordered_side(join.right(), right_keys)?,
    ) else {
        return Ok(Transformed::no(node));
    };
    // A join type the merge join does not take stays a hash join.
    let Ok(merge) = SortMergeJoinExec::try_new(
        left,
        right,
        join.on().to_vec(),
        join.filter().cloned(),
        *join.join_type(),
        vec![ascending; join.on().len()],
        join.null_equality(),
    ) else {
        return Ok(Transformed::no(node));
    };
    let merge: Arc<dyn ExecutionPlan> = Arc::new(merge);
    let Some(projection) = &join.projection else {
        return Ok(Transformed::yes(merge));
    };
    let schema = merge.schema();
    if projection.iter().any(|&i| i >= schema.fields().len()) {
        return Ok(Transformed::no(node));
    }
    let exprs = projection
        .iter()
        .map(|&i| {
            let name = schema.field(i).name().clone();
            ProjectionExpr {
                expr: Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>,
                alias: name,
            }
        })
        .collect::<Vec<_>>();
    Ok(Transformed::yes(
        Arc::new(ProjectionExec::try_new(exprs, merge)?) as Arc<dyn ExecutionPlan>,
    ))
}

/// An aggregate whose input, once a hash repartition under it keeps order,
/// is ordered by some of its keys streams: DataFusion then ends each group
/// with its run. Used for the per-patient-first aggregates of distinct
/// patients per cell (`compile::rewrite::per_unit_first`), whose keys start
/// with the unit: without it, their final stage held every (patient, cell)
/// group at once.
fn stream_aggregate(node: Plan) -> Result<Transformed<Plan>> {
    let Some(agg) = node.downcast_ref::<AggregateExec>() else {
        return Ok(Transformed::no(node));
    };
    if *agg.input_order_mode() != InputOrderMode::Linear || agg.group_expr().expr().is_empty() {
        return Ok(Transformed::no(node));
    }
    let input = merging(agg.input())?;
    if Arc::ptr_eq(&input, agg.input()) {
        return Ok(Transformed::no(node));
    }
    let streamed = Arc::clone(&node).replace_children(
        vec![input],
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )?;
    match streamed.downcast_ref::<AggregateExec>() {
        Some(a) if *a.input_order_mode() != InputOrderMode::Linear => {
            Ok(Transformed::yes(streamed))
        }
        _ => Ok(Transformed::no(node)),
    }
}

/// `plan`, with a hash repartition at its top made the merging variant,
/// which keeps each output partition in its inputs' order.
fn merging(plan: &Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(r) = plan.downcast_ref::<RepartitionExec>()
        && !r.preserve_order()
        && matches!(r.partitioning(), Partitioning::Hash(..))
    {
        let merged = RepartitionExec::try_new(Arc::clone(r.input()), r.partitioning().clone())?
            .with_preserve_order();
        if merged.preserve_order() {
            return Ok(Arc::new(merged));
        }
    }
    Ok(Arc::clone(plan))
}
