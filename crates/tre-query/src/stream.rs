//! Sorting within runs the extracts' order already gives (issue #13).
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
//! its query's pool. This rule makes the same replacement for bounded
//! inputs: same rows, same order, and memory of one patient's rows instead
//! of a table's.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::Partitioning;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::partial_sort::PartialSortExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};

/// A full sort whose input is already ordered by a prefix of its keys
/// becomes a sort within each run of that prefix.
#[derive(Debug, Default)]
pub(crate) struct SortWithinOrderedRuns;

impl PhysicalOptimizerRule for SortWithinOrderedRuns {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
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
            let mut input = Arc::clone(sort.input());
            if let Some(r) = input.downcast_ref::<RepartitionExec>()
                && !r.preserve_order()
                && matches!(r.partitioning(), Partitioning::Hash(..))
            {
                let merged =
                    RepartitionExec::try_new(Arc::clone(r.input()), r.partitioning().clone())?
                        .with_preserve_order();
                if merged.preserve_order() {
                    input = Arc::new(merged);
                }
            }
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
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "tre_sort_within_ordered_runs"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
