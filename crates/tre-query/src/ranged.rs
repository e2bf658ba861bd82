//! Extracts read one worker per run of unit ranges (issue #13): every
//! table is stored in the same ranges of the privacy unit's values (see
//! `tre_extract::UnitRanges`), so each worker can read the same ranges of
//! every table, and DataFusion, told that each scan is range-partitioned by
//! the unit, runs work per patient and joins on the unit where the rows
//! are read.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::listing::ListingTable;
use datafusion::error::Result as DfResult;

/// The extracts' unit ranges, grouped into one contiguous run of ranges
/// per worker (issue #13).
///
/// Every table was written in the same ranges of the unit's values (see
/// `tre_extract::UnitRanges`), a fact its authenticated layout carries. So
/// worker `w` can read the same ranges of every table: it then holds whole
/// patients, and DataFusion, told that each scan is range-partitioned by
/// the unit, runs work per patient and joins on the unit without
/// repartitioning rows between workers. A hash repartition buffers without
/// bound when one consumer lags (its gate closes only when every output
/// has data), and without spilling a buffer it cannot reserve fails the
/// query; a scan per range needs no exchange at all.
pub(crate) struct Ranged {
    /// Each table's row groups per worker.
    tables: std::collections::HashMap<String, Arc<TableParts>>,
}

#[derive(Debug)]
pub(crate) struct TableParts {
    row_groups: usize,
    per_worker: Vec<std::ops::Range<usize>>,
    splits: Vec<String>,
}

impl Ranged {
    /// `None` unless every table records the same ranges, and they fit
    /// its file, and there are at least two workers to give them to.
    pub(crate) fn new(
        layouts: &[(String, tre_extract::Layout)],
        row_groups: &[usize],
        workers: usize,
    ) -> Option<Self> {
        let first = layouts.first()?.1.unit_ranges.as_ref()?;
        let ranges = first.splits.len() + 1;
        let workers = workers.min(ranges);
        if workers < 2 {
            return None;
        }
        // Worker w reads ranges bounds[w]..bounds[w+1].
        let bounds: Vec<usize> = (0..=workers).map(|w| w * ranges / workers).collect();
        let splits: Vec<String> = bounds[1..workers]
            .iter()
            .map(|&b| first.splits.get(b - 1).cloned())
            .collect::<Option<_>>()?;
        let mut tables = std::collections::HashMap::new();
        for ((name, layout), &groups) in layouts.iter().zip(row_groups) {
            let ranges = layout.unit_ranges.as_ref()?;
            if ranges.splits != first.splits {
                return None;
            }
            let per_worker = bounds
                .windows(2)
                .map(|b| ranges.row_groups(b[0]..b[1], groups))
                .collect::<Option<Vec<_>>>()?;
            tables.insert(
                name.clone(),
                Arc::new(TableParts {
                    row_groups: groups,
                    per_worker,
                    splits: splits.clone(),
                }),
            );
        }
        Some(Self { tables })
    }

    pub(crate) fn table(&self, name: &str) -> Option<Arc<TableParts>> {
        self.tables.get(name).cloned()
    }
}

/// An extract scanned one worker per run of unit ranges, declared to
/// DataFusion as range-partitioned by the unit (see [`Ranged`]).
#[derive(Debug)]
pub(crate) struct RangedTable {
    pub(crate) inner: ListingTable,
    pub(crate) parts: Arc<TableParts>,
    pub(crate) unit: String,
}

#[async_trait]
impl datafusion::catalog::TableProvider for RangedTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::prelude::Expr],
    ) -> DfResult<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::prelude::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        self.by_range(plan)
    }
}

impl RangedTable {
    /// The listing table's scan, its file read one worker per run of
    /// ranges and declared range-partitioned by the unit. A scan of some
    /// other shape (no file, say) is left as DataFusion planned it.
    fn by_range(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::catalog::TableProvider;
        use datafusion::common::{ScalarValue, SplitPoint};
        use datafusion::datasource::physical_plan::parquet::ParquetAccessPlan;
        use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
        use datafusion::datasource::source::DataSourceExec;
        use datafusion::physical_expr::expressions::Column;
        use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr, RangePartitioning};
        use datafusion::physical_plan::Partitioning;

        let Some(exec) = plan.downcast_ref::<DataSourceExec>() else {
            return Ok(plan);
        };
        let Some(config) = exec
            .data_source()
            .downcast_ref::<datafusion::datasource::physical_plan::FileScanConfig>()
        else {
            return Ok(plan);
        };
        let Some(file) = config.file_groups.iter().flat_map(FileGroup::iter).next() else {
            return Ok(plan);
        };
        let schema = self.inner.schema();
        let Ok(unit) = schema.index_of(&self.unit) else {
            return Ok(plan);
        };
        let groups = self
            .parts
            .per_worker
            .iter()
            .map(|rows| {
                let mut access = ParquetAccessPlan::new_none(self.parts.row_groups);
                rows.clone().for_each(|g| access.scan(g));
                let mut part = file.clone();
                part.range = None;
                FileGroup::new(vec![part.with_extension(access)])
            })
            .collect();
        let ordering = LexOrdering::new([PhysicalSortExpr {
            expr: Arc::new(Column::new(&self.unit, unit)),
            options: datafusion::arrow::compute::SortOptions {
                descending: false,
                nulls_first: false,
            },
        }]);
        let Some(ordering) = ordering else {
            return Ok(plan);
        };
        let splits = self
            .parts
            .splits
            .iter()
            .map(|s| SplitPoint::new(vec![ScalarValue::Utf8(Some(s.clone()))]))
            .collect();
        let partitioning = Partitioning::Range(RangePartitioning::try_new(ordering, splits)?);
        let config = FileScanConfigBuilder::from(config.clone())
            .with_file_groups(groups)
            .with_output_partitioning(Some(partitioning))
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tre_extract::{Layout, UnitRanges};

    fn layout(splits: Option<&[&str]>, first_row_group: &[u64]) -> Layout {
        Layout {
            format: 1,
            sorted_by: "person_id".into(),
            max_rows_per_unit: 1,
            rows: 0,
            units: 0,
            rows_dropped: 0,
            opt_outs_removed: None,
            unit_ranges: splits.map(|s| UnitRanges {
                splits: s.iter().map(|x| (*x).to_owned()).collect(),
                first_row_group: first_row_group.to_vec(),
            }),
            distinct_caps: Default::default(),
        }
    }

    /// Issue #13: two workers read ranges 0..2 and 2..4 of every table,
    /// split at the same unit value; tables stored in other ranges, or in
    /// none, are read as before.
    #[test]
    fn workers_read_the_same_ranges_of_every_table() {
        let splits = ["P4", "P8", "Pc"];
        let tables = vec![
            ("a".to_owned(), layout(Some(&splits), &[0, 1, 3, 3])),
            ("b".to_owned(), layout(Some(&splits), &[0, 0, 0, 2])),
        ];
        let Some(ranged) = Ranged::new(&tables, &[5, 4], 2) else {
            panic!("the tables share their ranges");
        };
        let a = ranged.table("a").unwrap_or_else(|| panic!("no a"));
        assert_eq!(a.per_worker, vec![0..3, 3..5]);
        assert_eq!(a.splits, vec!["P8".to_owned()]);
        let b = ranged.table("b").unwrap_or_else(|| panic!("no b"));
        assert_eq!(b.per_worker, vec![0..0, 0..4]);

        let other = vec![
            tables[0].clone(),
            (
                "b".to_owned(),
                layout(Some(&["P4", "P9", "Pc"]), &[0, 0, 0, 2]),
            ),
        ];
        assert!(Ranged::new(&other, &[5, 4], 2).is_none());
        let unranged = vec![tables[0].clone(), ("b".to_owned(), layout(None, &[]))];
        assert!(Ranged::new(&unranged, &[5, 4], 2).is_none());
        assert!(Ranged::new(&tables, &[5, 4], 1).is_none());
        // Starts past the file's row groups do not fit it.
        assert!(Ranged::new(&tables, &[2, 4], 2).is_none());
    }
}
