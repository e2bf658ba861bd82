//! An upper bound on the memory a query's physical plans can reserve,
//! decided at compile time on public facts only (issue #13).
//!
//! A query that runs out of its memory pool fails after its budget is
//! reserved, and whether it does depends on the data: an incident. So the
//! compiler bounds, before anything runs, what every operator of every
//! plan the query executes may hold, and refuses (`TRE-Q034`, free) a query
//! whose bound exceeds its pool. The facts are the policy's (rows per
//! patient, public domains, `max_distinct` caps the writer enforced), the
//! shape of the plans, and the extracts' sizes rounded up to powers of two
//! (`compile::Sizes`), never an exact count.
//!
//! The bound is structural. Each operator holds either a constant number
//! of batches, one patient's rows (operators that stream in unit order:
//! merge joins, sorted windows and aggregates, sorts within runs), a number
//! of groups bounded by the release's cells, or, for anything else, every
//! row of its input, bounded by the largest relation a query can build
//! (patients × the most rows one patient has in any relation). Rows are
//! priced from their schema: fixed-width values at their width, text at
//! the longest the scans let through, with slack for Arrow's buffer growth
//! and per-group hash table entries. Only operators that reserve from the
//! pool count (aggregates, joins, sorts, merges, repartitions); a sort
//! within runs or a window over the unit order holds a patient's rows
//! outside it. `fuzz::generated_queries_are_sound` checks the bound against
//! the pool's measured peak on every generated query it runs;
//! `a_query_that_could_outgrow_its_pool_is_refused_for_free` checks the
//! refusal.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, SortMergeJoinExec,
};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, InputOrderMode, PhysicalExpr,
};

/// Bytes a text value may take: scans turn longer text into NULL
/// (`compile::total::DEFAULT_TEXT_LEN` characters, at most 4 bytes each),
/// plus a string view.
const TEXT_BYTES: u64 = 64 * 4 + 16;
/// Arrow buffers grow by doubling; DataFusion's accounting rounds up.
const SLACK: u64 = 2;
/// A hash table entry, its index and group bookkeeping, per group.
const GROUP_OVERHEAD: u64 = 96;

/// What the bound is computed from: public facts of one query.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// Rows in one batch (the session's `batch_size`).
    pub(crate) batch_rows: u64,
    /// The most rows one patient has in any relation the query builds, or
    /// in a stored table.
    pub(crate) unit_rows: u64,
    /// The most rows any relation can have: patients (rounded up) ×
    /// `unit_rows`, or the largest public relation.
    pub(crate) rows: u64,
    /// The most rows of a relation over reference tables only.
    pub(crate) public_rows: u64,
    /// The most groups an aggregate not keyed by the unit can hold: the
    /// release's cells (NULL counted, quantile buckets included), or
    /// `rows` where a key has neither a domain nor a cap.
    pub(crate) groups: u64,
    /// Every name the privacy unit goes by in the query (its column, and
    /// what CTEs renamed it to).
    pub(crate) unit_names: std::collections::BTreeSet<String>,
    /// The names only the unit goes by: a join on them is a join on the
    /// unit (used where taking a column for the unit makes the bound
    /// smaller, so a shared name must not count).
    pub(crate) unit_only_names: std::collections::BTreeSet<String>,
}

/// Why a plan has no bound.
#[derive(Debug)]
pub(crate) struct Unbounded(pub(crate) String);

/// The most bytes `plan` can reserve, every operator holding its most at
/// once.
pub(crate) fn bound(plan: &Arc<dyn ExecutionPlan>, facts: &Facts) -> Result<u64, Unbounded> {
    Ok(walk(plan, facts)?.held)
}

struct Node {
    /// Bytes this subtree's operators may hold together.
    held: u64,
    /// Rows this subtree may output, over all its partitions.
    rows: u64,
}

fn walk(plan: &Arc<dyn ExecutionPlan>, f: &Facts) -> Result<Node, Unbounded> {
    let children = plan
        .children()
        .into_iter()
        .map(|c| walk(c, f))
        .collect::<Result<Vec<_>, _>>()?;
    let below: u64 = children.iter().fold(0, |a, c| a.saturating_add(c.held));
    let input_rows = children.first().map_or(0, |c| c.rows);
    let input_bytes = plan
        .children()
        .first()
        .map_or(Ok(0), |c| row_bytes(&c.schema()))?;
    let partitions = plan.output_partitioning().partition_count() as u64;
    let batch = f
        .batch_rows
        .saturating_mul(input_bytes.max(row_bytes(&plan.schema())?));
    // One patient's rows, and the batches they may straddle.
    let per_unit = f.unit_rows.saturating_add(f.batch_rows.saturating_mul(2));
    let whole_input = input_rows
        .saturating_mul(input_bytes)
        .saturating_mul(SLACK)
        .saturating_add(batch.saturating_mul(partitions));

    let (held, rows) = if let Some(scan) = plan.downcast_ref::<DataSourceExec>() {
        // A reference table (in memory) has at most the largest public
        // relation's rows.
        let public = scan
            .data_source()
            .downcast_ref::<MemorySourceConfig>()
            .is_some();
        (0, if public { f.public_rows } else { f.rows })
    } else if let Some(agg) = plan.downcast_ref::<AggregateExec>() {
        aggregate(agg, f, input_rows, per_unit, partitions)?
    } else if let Some(join) = plan.downcast_ref::<SortMergeJoinExec>() {
        // The buffered side's batches holding the current key's rows.
        let on_unit = join
            .on()
            .iter()
            .all(|(l, r)| surely_unit(l, f) && surely_unit(r, f));
        let buffered = if on_unit { per_unit } else { f.rows };
        let side = row_bytes(&join.right().schema())?;
        let held = buffered
            .saturating_add(f.batch_rows)
            .saturating_mul(side)
            .saturating_mul(SLACK)
            .saturating_mul(partitions);
        (held, f.rows)
    } else if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        // The build side is collected whole, once or split over the
        // partitions: its rows, whichever.
        let build = children.first().map_or(0, |c| c.rows);
        let side = row_bytes(&join.left().schema())?;
        let held = build.saturating_mul(side.saturating_mul(SLACK).saturating_add(GROUP_OVERHEAD));
        (held, f.rows)
    } else if plan.downcast_ref::<NestedLoopJoinExec>().is_some()
        || plan.downcast_ref::<CrossJoinExec>().is_some()
    {
        let build = children.first().map_or(0, |c| c.rows);
        (
            build.saturating_mul(input_bytes).saturating_mul(SLACK),
            f.rows,
        )
    } else if let Some(sort) = plan.downcast_ref::<SortExec>() {
        match sort.fetch() {
            Some(n) => (
                (n as u64)
                    .saturating_add(f.batch_rows)
                    .saturating_mul(input_bytes)
                    .saturating_mul(SLACK)
                    .saturating_mul(partitions),
                input_rows.min(n as u64),
            ),
            // Sorting, then merging the sorted runs.
            None => (whole_input.saturating_mul(SLACK), input_rows),
        }
    } else if plan.downcast_ref::<SortPreservingMergeExec>().is_some() {
        // A batch of each input at a time.
        let inputs = plan
            .children()
            .first()
            .map_or(1, |c| c.output_partitioning().partition_count() as u64);
        (
            batch.saturating_mul(SLACK).saturating_mul(inputs),
            input_rows,
        )
    } else if let Some(r) = plan.downcast_ref::<RepartitionExec>() {
        // A repartition buffers whatever its consumers have not taken,
        // up to its whole input; the merging variant also merges.
        let merge = if r.preserve_order() {
            batch
                .saturating_mul(SLACK)
                .saturating_mul(r.input().output_partitioning().partition_count() as u64)
                .saturating_mul(partitions)
        } else {
            0
        };
        (whole_input.saturating_add(merge), input_rows)
    } else if matches!(
        plan.name(),
        "ProjectionExec"
            | "FilterExec"
            | "CoalesceBatchesExec"
            | "CoalescePartitionsExec"
            | "EmptyExec"
            | "PlaceholderRowExec"
            | "GlobalLimitExec"
            | "LocalLimitExec"
            | "UnionExec"
            | "PartialSortExec"
            | "BoundedWindowAggExec"
            | "WindowAggExec"
    ) {
        // Operators that reserve nothing from the pool. (A sort within
        // runs and a window hold a patient's rows at most over the unit
        // order, outside the pool: what `tre bench` measures as RSS.)
        let rows = if plan.name() == "UnionExec" {
            children.iter().fold(0u64, |a, c| a.saturating_add(c.rows))
        } else {
            input_rows
        };
        (0, rows)
    } else {
        // An operator not known here is assumed to hold its whole input.
        (whole_input, input_rows)
    };
    Ok(Node {
        held: below.saturating_add(held),
        rows: rows.min(f.rows.max(input_rows)),
    })
}

/// An aggregate's memory and output rows.
fn aggregate(
    agg: &AggregateExec,
    f: &Facts,
    input_rows: u64,
    per_unit: u64,
    partitions: u64,
) -> Result<(u64, u64), Unbounded> {
    let keyed_by_unit = agg.group_expr().expr().iter().any(|(e, _)| is_unit(e, f));
    let streams = *agg.input_order_mode() != InputOrderMode::Linear;
    let no_keys = agg.group_expr().expr().is_empty();
    // Groups held at once, over all partitions: each partition holds at
    // most the groups of the rows it sees, and streaming ones only the
    // groups of the current batch and patient.
    let groups = if no_keys {
        partitions
    } else if streams {
        per_unit.saturating_mul(partitions)
    } else if keyed_by_unit {
        input_rows
    } else if *agg.mode() == AggregateMode::Partial {
        f.groups.saturating_mul(partitions).min(input_rows)
    } else {
        f.groups.min(input_rows)
    };
    let group_bytes = row_bytes(&agg.schema())?
        .saturating_mul(SLACK)
        .saturating_add(GROUP_OVERHEAD);
    let mut held = groups.saturating_mul(group_bytes);
    // Accumulators that keep values (DISTINCT sets, medians, lists) hold
    // at most every input row's value, over all groups.
    let keeps_values = agg.aggr_expr().iter().any(|a| {
        a.is_distinct()
            || !matches!(
                a.fun().name(),
                "count"
                    | "sum"
                    | "avg"
                    | "min"
                    | "max"
                    | "bool_and"
                    | "bool_or"
                    | "var"
                    | "var_samp"
                    | "var_pop"
                    | "stddev"
                    | "stddev_samp"
                    | "stddev_pop"
            )
    });
    if keeps_values {
        let values = if streams { per_unit } else { input_rows };
        held = held.saturating_add(values.saturating_mul(TEXT_BYTES.saturating_mul(SLACK)));
    }
    let rows = match agg.mode() {
        _ if keyed_by_unit || streams => input_rows,
        AggregateMode::Partial => input_rows.min(groups),
        _ => input_rows.min(f.groups),
    };
    Ok((held, rows))
}

/// Whether `e` is surely the privacy unit: a column by a name only the
/// unit goes by.
fn surely_unit(e: &Arc<dyn PhysicalExpr>, f: &Facts) -> bool {
    e.downcast_ref::<Column>()
        .is_some_and(|c| f.unit_only_names.contains(c.name()))
}

/// Whether `e` may be the privacy unit: a column by any name the unit
/// goes by in the query, or as the per-patient aggregates name it. A
/// column that merely shares such a name is counted as the unit too,
/// which only makes the bound larger.
fn is_unit(e: &Arc<dyn PhysicalExpr>, f: &Facts) -> bool {
    e.downcast_ref::<Column>().is_some_and(|c| {
        f.unit_names.contains(c.name()) || c.name() == crate::compile::rewrite::UNIT_GROUP
    })
}

/// The most bytes one row of `schema` takes in memory.
fn row_bytes(schema: &Schema) -> Result<u64, Unbounded> {
    schema.fields().iter().try_fold(0u64, |total, field| {
        Ok(total.saturating_add(value_bytes(field.data_type())?))
    })
}

fn value_bytes(t: &DataType) -> Result<u64, Unbounded> {
    Ok(match t {
        DataType::Null => 0,
        DataType::Utf8
        | DataType::Utf8View
        | DataType::LargeUtf8
        | DataType::Binary
        | DataType::BinaryView
        | DataType::LargeBinary => TEXT_BYTES,
        DataType::Dictionary(_, v) => value_bytes(v)?.saturating_add(8),
        DataType::Boolean => 1,
        // The value and its validity.
        other => match other.primitive_width() {
            Some(width) => width as u64 + 1,
            None => {
                return Err(Unbounded(format!(
                    "a value of type {other} has no size the memory bound knows"
                )));
            }
        },
    })
}
