//! The DataFusion sandbox: a session that sees only the policy's tables,
//! reads them through the vault's decryption (keys unwrapped per file, in
//! memory), has no table functions, no URL tables, no spill files and a
//! memory cap.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::TableReference;
use datafusion::common::config::{EncryptionFactoryOptions, TableParquetOptions};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::object_store::path::Path as ObjectPath;
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::ProjectionMask;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use tre_core::Code;
use tre_policy::{ColumnClass, Policy};
use tre_vault::MasterKey;

use crate::compile::Extracts;
use crate::ranged::{Ranged, RangedTable};
use crate::reference::RefTables;
use crate::udf::OptedOut;
use crate::{Limits, QueryError};

/// Name under which the vault's decryption factory is registered.
pub const FACTORY_ID: &str = "tre_vault";

pub(crate) struct Sandbox {
    /// Each dataset's directory, in the order of `Policy::covers`.
    data_dirs: Vec<PathBuf>,
    /// For compiling (which executes nothing) and the benchmark's plain
    /// sessions; every executed query gets a runtime of its own.
    runtime: Arc<RuntimeEnv>,
    master: Arc<MasterKey>,
    tables: Vec<SandboxTable>,
    /// Each table's row groups per worker, when every table is stored in
    /// the same unit ranges (see [`RangedTable`]).
    ranged: Option<Ranged>,
    /// The column every extract is sorted by, as its authenticated layout
    /// says (the privacy unit; checked at open).
    sorted_by: String,
    reference: RefTables,
    target_partitions: usize,
    /// Test hook: a seed makes the bounding sampler a function of the row.
    deterministic_seed: Option<u64>,
    extracts: Extracts,
    opted_out: OptedOut,
    /// Bytes reserved now by every executing query's pool together: for
    /// the operator's metrics, never for a researcher.
    in_use: Arc<AtomicUsize>,
}

/// One extract as a query may name it.
struct SandboxTable {
    /// The policy's name for it: `table`, or `dataset.table` across
    /// datasets.
    key: String,
    schema: SchemaRef,
    url: ListingTableUrl,
    /// The names it is registered under: `dataset.table` and
    /// `dataset.public.table` always (so a query may qualify its tables),
    /// and plain `table` for one dataset.
    names: Vec<TableReference>,
}

impl Sandbox {
    /// The sandbox over the extracts of each dataset `policy` covers,
    /// `data_dirs[i]` holding those of `policy.covers()[i]`.
    pub(crate) fn open(
        policy: &Policy,
        data_dirs: &[&Path],
        master: Arc<MasterKey>,
        limits: &Limits,
        reference: RefTables,
    ) -> Result<Self, QueryError> {
        let parts = policy.covers();
        if parts.len() != data_dirs.len() {
            return Err(QueryError::Internal(format!(
                "{} datasets but {} data directories",
                parts.len(),
                data_dirs.len()
            )));
        }
        let joint = !policy.parts.is_empty();
        let mut tables = Vec::new();
        let mut bounded_at_write = BTreeSet::new();
        let mut layouts = Vec::new();
        let mut row_groups = Vec::new();
        let mut sizes = crate::compile::Sizes::default();
        let mut dirs = Vec::new();
        let mut opted_out = datafusion::common::HashSet::default();
        let mut opt_out_list = false;
        for (part, data_dir) in parts.iter().zip(data_dirs) {
            let dataset = data_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let data_dir = data_dir.canonicalize().map_err(|e| QueryError::Setup {
                code: Code::ExtractUnreadable,
                message: format!(
                    "data directory {}: {e}; run `tre dataset generate` first",
                    data_dir.display()
                ),
            })?;
            for (name, table) in &part.tables {
                let key = if joint {
                    format!("{}.{name}", part.dataset)
                } else {
                    name.clone()
                };
                let path = data_dir.join(format!("{name}.parquet"));
                let file_id = tre_extract::file_id(&dataset, name);
                let shown = path.display().to_string();
                let opened = tre_extract::open(&path, &file_id, &master)?;
                let schema = opened.schema;
                check_schema(part, name, table, &schema, &shown)?;
                let layout = opened.layout;
                row_groups.push(opened.row_groups);
                // Grouping by a column without a public domain is bounded in
                // memory by its cap, so the cap must be a fact the writer
                // enforced, not only the policy's word.
                for column in &table.columns {
                    let Some(cap) = column.max_distinct else {
                        continue;
                    };
                    if layout
                        .distinct_caps
                        .get(&column.name)
                        .is_none_or(|&c| c > cap)
                    {
                        return Err(QueryError::Setup {
                            code: Code::ExtractLayout,
                            message: format!(
                                "extract {shown} was not written holding {} to the policy's max_distinct ({cap}); write it again with `tre dataset generate`",
                                column.name
                            ),
                        });
                    }
                }
                sizes.units = sizes.units.max(layout.units.next_power_of_two());
                sizes.rows = sizes.rows.max(layout.rows.next_power_of_two());
                sizes.unit_rows = sizes.unit_rows.max(u64::from(layout.max_rows_per_unit));
                if layout.sorted_by != policy.privacy_unit {
                    return Err(QueryError::Setup {
                        code: Code::ExtractLayout,
                        message: format!(
                            "extract {shown} is bounded per {} but the policy's privacy unit is {}; write it again with `tre dataset generate`",
                            layout.sorted_by, policy.privacy_unit
                        ),
                    });
                }
                // A stored bound within the policy's needs nothing per query;
                // a policy tightened since the extract was written is enforced
                // per query, as before issue #13.
                if layout.max_rows_per_unit <= table.max_rows_per_unit {
                    bounded_at_write.insert(key.clone());
                }
                layouts.push((key.clone(), layout));
                let url = ListingTableUrl::parse(path.to_string_lossy()).map_err(|e| {
                    QueryError::Setup {
                        code: Code::ExtractUnreadable,
                        message: format!("extract {shown}: {e}"),
                    }
                })?;
                // `dataset.table`, and `dataset.public.table` as Flight SQL
                // lists it (catalog, schema, table); the bare name only for
                // one dataset.
                let mut names = vec![
                    TableReference::partial(part.dataset.as_str(), name.as_str()),
                    TableReference::full(part.dataset.as_str(), "public", name.as_str()),
                ];
                if !joint {
                    names.push(TableReference::bare(name.as_str()));
                }
                tables.push(SandboxTable {
                    key,
                    schema,
                    url,
                    names,
                });
            }
            if let Some(o) = &part.opt_out {
                opted_out.extend(read_opted_out(
                    &data_dir.join(format!("{}.parquet", o.table)),
                    &tre_extract::file_id(&dataset, &o.table),
                    &master,
                    &policy.privacy_unit,
                    Some(&o.column),
                )?);
            }
            // The latest National Data Opt-out list, replaced without a
            // re-import (`tre dataset optouts`, issue #15): its patients are
            // left out as well as those the policy's column flags. Across
            // datasets, a patient who opted out of any is left out of all.
            let list = data_dir.join(format!("{}.parquet", tre_extract::OPT_OUT_LIST));
            if list.exists() {
                opt_out_list = true;
                opted_out.extend(read_opted_out(
                    &list,
                    &tre_extract::file_id(&dataset, tre_extract::OPT_OUT_LIST),
                    &master,
                    &policy.privacy_unit,
                    None,
                )?);
            }
            dirs.push(data_dir);
        }
        let opted_out = OptedOut(Arc::new(opted_out));
        let ranged = Ranged::new(&layouts, &row_groups, limits.target_partitions);
        // A table needs no opt-out filter when nobody opted out, or when
        // its writer removed exactly the opt-outs read here (issue #13).
        // Across datasets (no single flag column) every table is filtered.
        let source = policy.opt_out.as_ref().map(ToString::to_string);
        let digest = tre_extract::opt_out_digest(opted_out.0.iter().map(String::as_str));
        let opt_outs_removed = layouts
            .into_iter()
            .filter(|(_, layout)| {
                opted_out.0.is_empty()
                    || layout.opt_outs_removed.as_ref().is_some_and(|r| {
                        source.is_some() && Some(&r.source) == source.as_ref() && r.digest == digest
                    })
            })
            .map(|(name, _)| name)
            .collect();
        let in_use = Arc::new(AtomicUsize::new(0));
        let runtime = runtime_env(&master, limits.memory_per_query(), Arc::clone(&in_use))?;
        Ok(Self {
            data_dirs: dirs,
            runtime,
            master,
            tables,
            ranged,
            sorted_by: policy.privacy_unit.clone(),
            reference,
            target_partitions: limits.target_partitions,
            deterministic_seed: None,
            extracts: Extracts {
                bounded_at_write,
                opt_outs_removed,
                excluded: Vec::new(),
                sizes,
                opt_out_list,
            },
            opted_out,
            in_use,
        })
    }

    /// What start-up learned about the extracts, for the compiler.
    pub(crate) fn extracts(&self) -> &Extracts {
        &self.extracts
    }

    #[cfg(feature = "soundness-testing")]
    pub(crate) fn set_deterministic_seed(&mut self, seed: Option<u64>) {
        self.deterministic_seed = seed;
    }

    pub(crate) fn master(&self) -> Arc<MasterKey> {
        Arc::clone(&self.master)
    }

    /// Each dataset's directory, in the order of `Policy::covers`.
    pub(crate) fn data_dirs(&self) -> &[PathBuf] {
        &self.data_dirs
    }

    /// Bytes every executing query's pool holds now, together.
    pub(crate) fn memory_in_use(&self) -> usize {
        self.in_use.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn schemas(&self) -> impl Iterator<Item = (&str, &SchemaRef)> {
        self.tables.iter().map(|t| (t.key.as_str(), &t.schema))
    }

    /// A session for executing one query, with a memory pool of its own:
    /// no other query's allocations can make it fail (issue #11).
    pub(crate) fn context_with_memory(&self, bytes: usize) -> Result<SessionContext, QueryError> {
        Ok(self.context_in(runtime_env(&self.master, bytes, Arc::clone(&self.in_use))?))
    }

    /// A new session for compiling one query. Sessions share no state:
    /// nothing a query registers survives it.
    pub(crate) fn context(&self) -> SessionContext {
        self.context_in(Arc::clone(&self.runtime))
    }

    fn context_in(&self, runtime: Arc<RuntimeEnv>) -> SessionContext {
        let mut config = SessionConfig::new()
            .with_target_partitions(self.target_partitions)
            .with_information_schema(false);
        // The physical plan must depend on the query alone: with file
        // statistics, DataFusion picks join sides and derives constants
        // from the data, and a plan it then rejects would fail after the
        // reservation on some extracts and not on others. Issue #10.
        config.options_mut().execution.collect_statistics = false;
        // Keep the extracts' order through repartitioning, so that work per
        // patient streams rather than sorting a whole table (issue #13).
        config.options_mut().optimizer.prefer_existing_sort = true;
        // Scans range-partitioned by the unit (see `Ranged`) partition any
        // grouping that includes the unit: a per-patient aggregate by
        // (unit, key) then needs no repartition of rows either.
        config.options_mut().optimizer.subset_repartition_threshold = 1;
        // A partial aggregate that sees mostly distinct keys would pass
        // its rows on unaggregated; the memory bound (`crate::memory`)
        // counts on it emitting at most its groups.
        config
            .options_mut()
            .execution
            .skip_partial_aggregation_probe_rows_threshold = usize::MAX;
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(crate::stream::StreamInUnitOrder))
            .build();
        let ctx = SessionContext::new_with_state(state);
        // Table functions could multiply rows or read files: none are offered.
        for f in ["generate_series", "range"] {
            ctx.deregister_udtf(f);
        }
        crate::udf::register(&ctx, self.deterministic_seed, &self.opted_out);
        for (name, table) in &self.reference {
            if let Ok(t) = MemTable::try_new(Arc::clone(&table.schema), vec![table.batches.clone()])
            {
                let _ = ctx.register_table(name.as_str(), Arc::new(t));
            }
        }
        let default = ctx.catalog(&ctx.copied_config().options().catalog.default_catalog);
        for t in &self.tables {
            let mut opts = TableParquetOptions::default();
            opts.crypto
                .configure_factory(FACTORY_ID, &VaultFactoryOptions::default());
            let format = ParquetFormat::default().with_options(opts);
            // The order is the authenticated layout's (checked in `open`),
            // never Parquet's `sorting_columns`, which tre does not write.
            // Knowing it, DataFusion bounds groups per patient (a window
            // partitioned by the unit) by sorting within each patient's
            // rows, not the whole table (issue #13: key selection over
            // 10M patients' admissions ran out of its pool).
            let listing = ListingOptions::new(Arc::new(format))
                .with_file_extension(".parquet")
                .with_file_sort_order(vec![vec![
                    datafusion::prelude::col(datafusion::common::Column::new_unqualified(
                        self.sorted_by.as_str(),
                    ))
                    .sort(true, false),
                ]]);
            let config = ListingTableConfig::new(t.url.clone())
                .with_listing_options(listing)
                .with_schema(Arc::clone(&t.schema));
            // Registration cannot fail for a schema we already read; if it
            // does, the table is simply absent and planning reports it.
            let Ok(table) = ListingTable::try_new(config) else {
                continue;
            };
            let provider: Arc<dyn datafusion::catalog::TableProvider> =
                match self.ranged.as_ref().and_then(|r| r.table(&t.key)) {
                    Some(parts) => Arc::new(RangedTable {
                        inner: table,
                        parts,
                        unit: self.sorted_by.clone(),
                    }),
                    None => Arc::new(table),
                };
            for name in &t.names {
                // A dataset is a schema of the default catalog (for
                // `dataset.table`) and a catalog of its own with schema
                // `public` (for `dataset.public.table`).
                let catalog = match name {
                    TableReference::Full { catalog: c, .. } => ctx.catalog(c).or_else(|| {
                        let new = Arc::new(datafusion::catalog::MemoryCatalogProvider::new());
                        ctx.register_catalog(c.as_ref(), Arc::clone(&new) as _);
                        Some(new as _)
                    }),
                    _ => default.clone(),
                };
                if let (Some(schema), Some(catalog)) = (name.schema(), &catalog)
                    && catalog.schema(schema).is_none()
                {
                    let _ = catalog.register_schema(
                        schema,
                        Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
                    );
                }
                let _ = ctx.register_table(name.clone(), Arc::clone(&provider));
            }
        }
        ctx
    }
}

/// A DataFusion runtime with a memory pool of `bytes`, no disk to spill to,
/// and the vault's decryption.
fn runtime_env(
    master: &Arc<MasterKey>,
    bytes: usize,
    in_use: Arc<AtomicUsize>,
) -> Result<Arc<RuntimeEnv>, QueryError> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(PeakPool::new(bytes, in_use)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    runtime.register_parquet_encryption_factory(
        FACTORY_ID,
        Arc::new(VaultFactory {
            master: Arc::clone(master),
        }),
    );
    Ok(runtime)
}

/// The units whose opt-out `flag` is true or NULL, read from the opt-out
/// table's two columns only; without a flag, every unit of an opt-out
/// list.
fn read_opted_out(
    path: &Path,
    file_id: &str,
    master: &Arc<MasterKey>,
    unit: &str,
    flag: Option<&str>,
) -> Result<datafusion::common::HashSet<String>, QueryError> {
    let shown = path.display().to_string();
    let unreadable = |e: &dyn std::fmt::Display| QueryError::Setup {
        code: Code::ExtractUnreadable,
        message: format!("opt-outs from {shown}: {e}"),
    };
    let builder = tre_extract::reader(path, file_id, master)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), [unit].into_iter().chain(flag));
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| unreadable(&e))?;
    let mut set = datafusion::common::HashSet::default();
    for batch in reader {
        let batch = batch.map_err(|e| unreadable(&e))?;
        let Some(Some(units)) = batch.column_by_name(unit).map(|c| c.as_string_opt::<i32>()) else {
            return Err(unreadable(&format!("{unit} must be text")));
        };
        let Some(flag) = flag else {
            set.extend(units.iter().flatten().map(str::to_owned));
            continue;
        };
        let Some(Some(flags)) = batch.column_by_name(flag).map(|c| c.as_boolean_opt()) else {
            return Err(unreadable(&format!("{flag} must be true or false")));
        };
        for (u, f) in units.iter().zip(flags.iter()) {
            if let (Some(u), Some(true) | None) = (u, f) {
                set.insert(u.to_owned());
            }
        }
    }
    Ok(set)
}

fn check_schema(
    policy: &Policy,
    name: &str,
    table: &tre_policy::TablePolicy,
    schema: &SchemaRef,
    shown: &str,
) -> Result<(), QueryError> {
    let bad = |message: String| QueryError::Setup {
        code: Code::PolicyInvalid,
        message: format!(
            "extract {shown} does not match policy '{}': {message}",
            policy.dataset
        ),
    };
    for field in schema.fields() {
        let Some(col) = table.column(field.name()) else {
            return Err(bad(format!(
                "column '{name}.{}' is not declared; every column needs a class in the policy",
                field.name()
            )));
        };
        let ok = match &col.class {
            ColumnClass::Numeric { .. } => field.data_type().is_numeric(),
            ColumnClass::Date { .. } => matches!(field.data_type(), DataType::Date32),
            ColumnClass::Identifier | ColumnClass::Categorical { .. } => true,
        };
        if !ok {
            return Err(bad(format!(
                "column '{name}.{}' is {} in the extract but declared {}",
                field.name(),
                field.data_type(),
                col.class.name()
            )));
        }
    }
    for col in &table.columns {
        if schema.field_with_name(&col.name).is_err() {
            return Err(bad(format!(
                "declared column '{name}.{}' is missing from the extract",
                col.name
            )));
        }
    }
    Ok(())
}

datafusion::common::extensions_options! {
    /// The vault factory needs no options; file identity comes from the path.
    pub struct VaultFactoryOptions {
        /// Reserved.
        pub version: u32, default = 1
    }
}

/// Hands parquet the vault's key retriever for each file; the file identity
/// (dataset directory and file name) is bound in as the AAD prefix.
#[derive(Debug)]
struct VaultFactory {
    master: Arc<MasterKey>,
}

#[async_trait]
impl EncryptionFactory for VaultFactory {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _path: &ObjectPath,
    ) -> DfResult<Option<Arc<FileEncryptionProperties>>> {
        Err(DataFusionError::Plan(
            "the sandbox never writes files".into(),
        ))
    }

    async fn get_file_decryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        path: &ObjectPath,
    ) -> DfResult<Option<Arc<FileDecryptionProperties>>> {
        let parts: Vec<_> = path.parts().collect();
        let file_id = match parts.as_slice() {
            [.., dir, file] => format!("{}/{}", dir.as_ref(), file.as_ref()),
            _ => {
                return Err(DataFusionError::Plan(format!(
                    "unexpected extract path {path}"
                )));
            }
        };
        self.master
            .file_decryption(&file_id)
            .map(Some)
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }
}

/// DataFusion's fair pool, remembering the most it ever held at once: what
/// an executed query really reserved, for the benchmark and the test that
/// the compile-time bound holds (issue #13). Data-dependent: never shown to
/// a researcher.
#[derive(Debug)]
pub(crate) struct PeakPool {
    inner: FairSpillPool,
    /// What is reserved now, counted here rather than read under the inner
    /// pool's lock, since every reservation of every operator passes by.
    held: AtomicUsize,
    peak: AtomicUsize,
    /// What every pool of the engine holds now, together.
    engine: Arc<AtomicUsize>,
}

impl PeakPool {
    fn new(bytes: usize, engine: Arc<AtomicUsize>) -> Self {
        Self {
            inner: FairSpillPool::new(bytes),
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            engine,
        }
    }

    fn grew(&self, additional: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.engine.fetch_add(additional, Relaxed);
        let now = self
            .held
            .fetch_add(additional, Relaxed)
            .saturating_add(additional);
        self.peak.fetch_max(now, Relaxed);
    }

    /// The most `ctx`'s pool held at once, when it is a `PeakPool`.
    pub(crate) fn peak_of(ctx: &SessionContext) -> Option<usize> {
        let pool = Arc::clone(&ctx.runtime_env().memory_pool);
        let any: Arc<dyn std::any::Any + Send + Sync> = pool;
        any.downcast_ref::<PeakPool>()
            .map(|p| p.peak.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl std::fmt::Display for PeakPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl MemoryPool for PeakPool {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional);
        self.grew(additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink);
        self.held
            .fetch_sub(shrink, std::sync::atomic::Ordering::Relaxed);
        self.engine
            .fetch_sub(shrink, std::sync::atomic::Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        self.inner.try_grow(reservation, additional)?;
        self.grew(additional);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}
