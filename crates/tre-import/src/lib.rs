//! Real data in (issue #15): a data team's own extracts (CSV, Parquet, or
//! OMOP CDM's standard tables as either) drafted into a policy the
//! custodian then owns (`draft`), and imported under that policy into the
//! same encrypted, sorted, bounded extracts the generator writes.
//!
//! An import reads every table once to validate and convert it (types,
//! public values, bounds: clamped or rejected as the policy says; direct
//! identifiers replaced by their keyed pseudonym), staging the rows it
//! keeps; then sorts each table by the privacy unit in bounded memory
//! (DataFusion's external sort, spilling under the import's own temporary
//! directory) and writes it through `tre_extract::ExtractWriter`. Every row
//! read is accounted for in the report: kept, rejected by reason, or
//! removed by the per-patient bound. The dataset appears (or replaces the
//! previous one) in one rename, so an interrupted import leaves the
//! previous dataset as it was.
//!
//! `profile` describes the input's values for the custodian deciding the
//! draft's TODOs: an operator-side report that says it discloses data, and
//! that nothing here copies into a policy.
//!
//! Owns: input reading, the policy draft, the input profile, row
//! validation, the import report. Must never depend on the query engine (`tre-query`), storage
//! (`tre-store`, `rusqlite`) or the network (`tonic`, `hyper`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, StringArray};
use datafusion::arrow::csv::ReaderBuilder;
use datafusion::arrow::csv::reader::Format as CsvFormat;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;
use tre_core::Code;
use tre_extract::{ExtractError, ExtractWriter, Protection};
use tre_policy::Policy;
use tre_vault::MasterKey;

mod convert;
pub mod draft;
pub mod opt_outs;
pub mod profile;

pub use convert::Tally;

const BATCH_ROWS: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file that cannot be read as the policy says.
    #[error("{code} {file}: {reason}; {fix}", code = Code::ImportInput)]
    Input {
        file: String,
        reason: String,
        fix: String,
    },
    /// The input does not match the policy.
    #[error("{code} {0}", code = Code::ImportSchema)]
    Schema(String),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// Sorting or staging failed (disk full, the temporary directory
    /// unwritable).
    #[error("{code} the import could not stage or sort {table}: {reason}", code = Code::Internal)]
    Stage { table: String, reason: String },
}

impl ImportError {
    pub fn code(&self) -> Code {
        match self {
            ImportError::Input { .. } => Code::ImportInput,
            ImportError::Schema(_) => Code::ImportSchema,
            ImportError::Extract(e) => e.code(),
            ImportError::Stage { .. } => Code::Internal,
        }
    }
}

/// How the input is laid out: one file per table, named after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<table>.csv` (or tab-separated `<table>.tsv`) or `<table>.parquet`,
    /// whichever is there.
    Auto,
    Csv,
    Parquet,
}

/// One table's part of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub file: String,
    #[serde(flatten)]
    pub tally: Tally,
    /// Rows the per-patient bound removed (chosen at random), and the rows
    /// and patients written.
    pub rows_removed_by_bound: u64,
    pub rows_written: u64,
    pub patients: u64,
    pub max_rows_per_unit: u32,
    /// Patients by how many rows they had before the bound: "1", "2",
    /// "3-5", "6-10", "11-100", ">100".
    pub rows_per_patient: BTreeMap<String, u64>,
    pub most_rows_for_one_patient: u64,
    /// Input columns the policy does not name: not imported.
    pub columns_not_imported: Vec<String>,
}

/// What an import did. It describes the data (counts, rows per patient):
/// for the operator and the custodian, never for researchers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub dataset: String,
    pub tables: Vec<TableReport>,
}

/// Where the import is, for a progress bar.
pub trait Progress {
    fn table(&self, table: &str, stage: &str);
    fn rows(&self, rows: u64);
}

/// No progress shown.
pub struct Quiet;

impl Progress for Quiet {
    fn table(&self, _: &str, _: &str) {}
    fn rows(&self, _: u64) {}
}

/// What to import, from where, to where.
pub struct Import<'a> {
    pub policy: &'a Policy,
    pub from: &'a Path,
    pub format: Format,
    /// The dataset directory; its name must be the policy's dataset name.
    pub out: &'a Path,
    pub master: &'a MasterKey,
    /// Memory the sort may hold before it spills to disk.
    pub memory_bytes: usize,
}

/// The temporary directory of an import; removed unless it became the
/// dataset.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Import<'_> {
    /// Run it: validate and stage every table, then sort and write each,
    /// then put the dataset in place in one rename.
    pub async fn run(&self, progress: &dyn Progress) -> Result<ImportReport, ImportError> {
        let dataset = &self.policy.dataset;
        if self.out.file_name().and_then(|n| n.to_str()) != Some(dataset.as_str()) {
            return Err(ImportError::Schema(format!(
                "the output directory must be named after the dataset '{dataset}' (the server binds that name into each file); use --out <dir>/{dataset}"
            )));
        }
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| stage_err("the dataset's parent", e))?;
        let staging = Staging(parent.join(format!(".{dataset}.importing-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&staging.0);
        let data = staging.0.join(dataset);
        for d in [&data, &staging.0.join("staged"), &staging.0.join("spill")] {
            std::fs::create_dir_all(d).map_err(|e| stage_err("the staging directory", e))?;
        }

        // Pass 1: validate, convert and stage every table, so that a fault
        // anywhere stops the import before any extract is written.
        let mut staged = Vec::new();
        for (name, table) in &self.policy.tables {
            progress.table(name, "reading");
            let input = self.input(name)?;
            let path = staging.0.join("staged").join(format!("{name}.parquet"));
            let (converted, tally) = self.stage(table, &input, &path, progress)?;
            staged.push((name.clone(), input, path, converted, tally));
        }
        // Ranges of the pseudonym space, from how many patients there are
        // (the layout of the file, as the generator's; never released).
        let patients = staged
            .iter()
            .filter(|(n, ..)| self.policy.tables[n].max_rows_per_unit == 1)
            .map(|(.., t)| t.rows_kept)
            .max()
            .or_else(|| staged.iter().map(|(.., t)| t.rows_kept).max())
            .unwrap_or(0);
        let splits = tre_vault::pseudonym_splits(patients);

        // Pass 2: sort each staged table by the unit and write its extract.
        let mut tables = Vec::new();
        for (name, input, path, converted, tally) in staged {
            progress.table(&name, "sorting and writing");
            let policy = &self.policy.tables[&name];
            let report = self
                .write(&name, policy, &converted, &path, &data, &splits, &staging.0)
                .await?;
            let _ = std::fs::remove_file(&path);
            let written = report.0.rows;
            let removed = report.0.rows_dropped;
            if tally.rows_read != tally.rows_rejected() + removed + written {
                return Err(ImportError::Stage {
                    table: name,
                    reason: format!(
                        "rows do not add up: {} read, {} rejected, {removed} removed by the bound, {written} written",
                        tally.rows_read,
                        tally.rows_rejected()
                    ),
                });
            }
            tables.push(TableReport {
                table: name.clone(),
                file: input.path.display().to_string(),
                rows_removed_by_bound: removed,
                rows_written: written,
                patients: report.0.units,
                max_rows_per_unit: policy.max_rows_per_unit,
                rows_per_patient: report.1,
                most_rows_for_one_patient: report.2,
                columns_not_imported: converted.ignored(),
                tally,
            });
        }
        self.put_in_place(&data)?;
        Ok(ImportReport {
            dataset: dataset.clone(),
            tables,
        })
    }

    /// The input file of `table`.
    fn input(&self, table: &str) -> Result<Input, ImportError> {
        let file = |ext: &str| self.from.join(format!("{table}.{ext}"));
        let text = if file("tsv").exists() && !file("csv").exists() {
            file("tsv")
        } else {
            file("csv")
        };
        let path = match self.format {
            Format::Csv => text,
            Format::Parquet => file("parquet"),
            Format::Auto if text.exists() => text,
            Format::Auto => file("parquet"),
        };
        if !path.exists() {
            return Err(ImportError::Schema(format!(
                "the policy declares table '{table}' but {} has no {}; add the file or remove the table from the policy",
                self.from.display(),
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )));
        }
        Ok(Input {
            delimiter: delimiter(&path),
            path,
        })
    }

    /// Pass 1 for one table: every row validated and converted; the kept
    /// ones staged (plain Parquet, under the import's own directory, gone
    /// when it ends).
    fn stage(
        &self,
        table: &tre_policy::TablePolicy,
        input: &Input,
        staged: &Path,
        progress: &dyn Progress,
    ) -> Result<(convert::Table, Tally), ImportError> {
        let shown = input.path.display().to_string();
        let bad = |reason: String, fix: &str| ImportError::Input {
            file: shown.clone(),
            reason,
            fix: fix.to_owned(),
        };
        let (header, batches) = input.open().map_err(|(reason, fix)| bad(reason, &fix))?;
        let converted = convert::Table::new(table, &self.policy.privacy_unit, &header)
            .map_err(|missing| {
                ImportError::Schema(format!(
                    "{shown} has no column {} that the policy declares for table '{}'; add it to the file or remove it from the policy",
                    missing.join(", "),
                    table.name
                ))
            })?;
        let file = File::create(staged).map_err(|e| stage_err(&table.name, e))?;
        let mut writer = ArrowWriter::try_new(file, Arc::clone(&converted.schema), None)
            .map_err(|e| stage_err(&table.name, e))?;
        let mut tally = Tally::default();
        for batch in batches {
            let raw = batch.map_err(|(reason, fix)| bad(reason, &fix))?;
            let out = converted
                .convert(&raw, self.master, &mut tally)
                .map_err(|e| bad(e, "check the file is the table the policy describes"))?;
            writer.write(&out).map_err(|e| stage_err(&table.name, e))?;
            progress.rows(raw.num_rows() as u64);
        }
        writer.close().map_err(|e| stage_err(&table.name, e))?;
        Ok((converted, tally))
    }

    /// Pass 2 for one table: sort the staged rows by the unit in bounded
    /// memory and write the extract. Returns its layout and the rows per
    /// patient before the bound.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        name: &str,
        policy: &tre_policy::TablePolicy,
        converted: &convert::Table,
        staged: &Path,
        data: &Path,
        splits: &[String],
        staging: &Path,
    ) -> Result<(tre_extract::Layout, BTreeMap<String, u64>, u64), ImportError> {
        let err = |e: &dyn std::fmt::Display| ImportError::Stage {
            table: name.to_owned(),
            reason: e.to_string(),
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(self.memory_bytes)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![staging.join("spill")])),
            )
            .build_arc()
            .map_err(|e| err(&e))?;
        let ctx = SessionContext::new_with_config_rt(
            // Read text back as the extract declares it (Utf8), not as
            // DataFusion's default view type.
            SessionConfig::new().with_batch_size(BATCH_ROWS).set_bool(
                "datafusion.execution.parquet.schema_force_view_types",
                false,
            ),
            runtime,
        );
        ctx.register_parquet(
            "staged",
            staged.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )
        .await
        .map_err(|e| err(&e))?;
        let unit = &self.policy.privacy_unit;
        let mut stream = ctx
            .sql(&format!("SELECT * FROM staged ORDER BY \"{unit}\""))
            .await
            .map_err(|e| err(&e))?
            .execute_stream()
            .await
            .map_err(|e| err(&e))?;
        let seed = sampler_seed(name)?;
        let caps = policy
            .columns
            .iter()
            .filter_map(|c| c.max_distinct.map(|m| (c.name.clone(), m)));
        let file_id = tre_extract::file_id(&self.policy.dataset, name);
        let mut writer = ExtractWriter::create(
            &data.join(format!("{name}.parquet")),
            Arc::clone(&converted.schema),
            unit,
            policy.max_rows_per_unit,
            Protection::Encrypted {
                master: self.master,
                file_id: &file_id,
            },
            seed,
        )?
        .with_unit_ranges(splits.to_vec())?
        .with_distinct_caps(caps)?;
        let unit_index = converted.schema.index_of(unit).map_err(|e| err(&e))?;
        let mut runs = Runs::default();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| err(&e))?;
            runs.count(&batch, unit_index);
            writer.write(&batch)?;
        }
        let layout = writer.close()?;
        let (histogram, most) = runs.finish();
        Ok((layout, histogram, most))
    }

    /// Put `data` where the dataset goes: a rename if there is none yet,
    /// else an atomic exchange with the previous one, which is then
    /// removed. A kill at any point leaves one whole dataset in place.
    fn put_in_place(&self, data: &Path) -> Result<(), ImportError> {
        let err = |e: &dyn std::fmt::Display| ImportError::Stage {
            table: "(all)".into(),
            reason: format!(
                "cannot put the dataset in place at {}: {e}",
                self.out.display()
            ),
        };
        if self.out.exists() {
            // The latest opt-out list stays with the dataset across imports.
            let list = format!("{}.parquet", tre_extract::OPT_OUT_LIST);
            if self.out.join(&list).exists() {
                std::fs::copy(self.out.join(&list), data.join(&list)).map_err(|e| err(&e))?;
            }
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                data,
                rustix::fs::CWD,
                self.out,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| err(&e))?;
            // `data` now holds the previous dataset; dropping the staging
            // directory removes it.
        } else {
            std::fs::rename(data, self.out).map_err(|e| err(&e))?;
        }
        Ok(())
    }
}

/// Fresh OS randomness for the writer's choice of rows kept for a patient
/// over the bound: real data is never made again from a seed.
fn sampler_seed(table: &str) -> Result<[u8; 32], ImportError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| stage_err(table, "the system random source failed"))?;
    Ok(seed)
}

fn stage_err(what: &str, e: impl std::fmt::Display) -> ImportError {
    ImportError::Stage {
        table: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Rows per patient, counted off the sorted stream.
#[derive(Default)]
struct Runs {
    last: Option<String>,
    run: u64,
    histogram: BTreeMap<String, u64>,
    most: u64,
}

impl Runs {
    fn count(&mut self, batch: &RecordBatch, unit: usize) {
        let Some(units) = batch.column(unit).as_any().downcast_ref::<StringArray>() else {
            return;
        };
        for i in 0..units.len() {
            let u = units.value(i);
            if self.last.as_deref() == Some(u) {
                self.run += 1;
            } else {
                self.close_run();
                self.last = Some(u.to_owned());
                self.run = 1;
            }
        }
    }

    fn close_run(&mut self) {
        if self.run == 0 {
            return;
        }
        *self
            .histogram
            .entry(bucket(self.run).to_owned())
            .or_default() += 1;
        self.most = self.most.max(self.run);
    }

    fn finish(mut self) -> (BTreeMap<String, u64>, u64) {
        self.close_run();
        (self.histogram, self.most)
    }
}

/// The buckets of rows per patient the reports count patients in, in
/// order.
pub const BUCKETS: [&str; 6] = ["1", "2", "3-5", "6-10", "11-100", ">100"];

/// The report's bucket for a patient with `rows` rows.
pub(crate) fn bucket(rows: u64) -> &'static str {
    match rows {
        0 | 1 => "1",
        2 => "2",
        3..=5 => "3-5",
        6..=10 => "6-10",
        11..=100 => "11-100",
        _ => ">100",
    }
}

/// The field separator of a text input by its extension: `,` for `.csv`,
/// a tab for `.tsv` (as OMOP vocabularies and many EPR exports come);
/// none for Parquet.
pub(crate) fn delimiter(path: &Path) -> Option<u8> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Some(b','),
        Some("tsv") => Some(b'\t'),
        _ => None,
    }
}

/// An input file: delimited text (every column read as text) or Parquet.
struct Input {
    path: PathBuf,
    /// The field separator of a text file; none for Parquet.
    delimiter: Option<u8>,
}

type Fault = (String, String);
type Batches = Box<dyn Iterator<Item = Result<RecordBatch, Fault>>>;

impl Input {
    /// The header and the batches. Faults name the line (CSV) or row
    /// group (Parquet) and the fix.
    fn open(&self) -> Result<(Vec<String>, Batches), Fault> {
        let file = || {
            File::open(&self.path).map_err(|e| {
                (
                    format!("cannot open: {e}"),
                    "check the path and its permissions".to_owned(),
                )
            })
        };
        if let Some(delimiter) = self.delimiter {
            let (inferred, _) = CsvFormat::default()
                .with_header(true)
                .with_delimiter(delimiter)
                .infer_schema(file()?, Some(0))
                .map_err(|e| csv_fault(&e.to_string()))?;
            let header: Vec<String> = inferred.fields().iter().map(|f| f.name().clone()).collect();
            if let Some(dup) = header
                .iter()
                .enumerate()
                .find(|(i, h)| header[..*i].contains(h))
                .map(|(_, h)| h.clone())
            {
                return Err((
                    format!("line 1: the header names column '{dup}' twice"),
                    "give each column one name".into(),
                ));
            }
            let schema = Arc::new(Schema::new(
                header
                    .iter()
                    .map(|h| Field::new(h, DataType::Utf8, true))
                    .collect::<Vec<_>>(),
            ));
            let reader = ReaderBuilder::new(schema)
                .with_header(true)
                .with_delimiter(delimiter)
                .with_batch_size(BATCH_ROWS)
                .build(file()?)
                .map_err(|e| csv_fault(&e.to_string()))?;
            let batches = reader.map(|b| b.map_err(|e| csv_fault(&e.to_string())));
            Ok((header, Box::new(batches)))
        } else {
            let fault = |e: &dyn std::fmt::Display| {
                (
                    format!("not a readable Parquet file: {e}"),
                    "write it again with a Parquet writer (plaintext; tre encrypts on import)"
                        .to_owned(),
                )
            };
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(file()?).map_err(|e| fault(&e))?;
            let header = builder
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            let reader = builder
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| fault(&e))?;
            let batches = reader.map(move |b| {
                b.map_err(|e| {
                    (
                        format!("a row group cannot be read: {e}"),
                        "write the file again; it may be truncated".to_owned(),
                    )
                })
            });
            Ok((header, Box::new(batches)))
        }
    }
}

/// A CSV reader's error, with the fix for the usual causes. Arrow's
/// messages name the line (and the field, for bad UTF-8).
fn csv_fault(message: &str) -> Fault {
    let fix = if message.contains("UTF-8") || message.contains("utf-8") || message.contains("utf8")
    {
        "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    } else if message.contains("number of fields") {
        "every line needs as many fields as the header; the file may be truncated or a field may hold an unquoted comma"
    } else {
        "check the file is comma-separated with a header line"
    };
    (message.to_owned(), fix.to_owned())
}
