//! `tre dataset profile`: what the input's values look like, for the
//! custodian filling in a draft's TODOs (issue #15). Per column: how many
//! values are missing, how many read as numbers or ISO dates and their
//! range, how many distinct values, and for a column with few, each value
//! with its count; per table, the rows per patient.
//!
//! This report discloses the data (extremes, small counts, rows per
//! patient). It is for the operator and the custodian only, it says so at
//! its top, and nothing in it reaches a policy unless the custodian copies
//! it there: a bound taken from the data is itself a release.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};

use crate::ImportError;

/// What the report says before anything else.
pub const NOTICE: &str = "OPERATOR-SIDE REPORT: this describes the data itself (extremes, small counts, rows per patient). Keep it with the custodian; never release it or copy it to a researcher. Choose bounds and public values from what is plausible and published, not from these figures alone.";

/// Distinct values up to which a column's values are listed with counts.
pub const LISTED_UP_TO: u64 = 30;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ColumnProfile {
    pub column: String,
    /// Empty or missing values.
    pub missing: u64,
    /// Values that read as numbers, and their range.
    pub numbers: u64,
    pub number_range: Option<(f64, f64)>,
    /// Values that read as ISO dates (`YYYY-MM-DD`), and their range.
    pub dates: u64,
    pub date_range: Option<(String, String)>,
    /// Distinct values (approximate above a few thousand).
    pub distinct: u64,
    /// Each value and its count, most frequent first, when there are at
    /// most [`LISTED_UP_TO`] and the column does not look like an
    /// identifier.
    pub values: Vec<(String, u64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TableProfile {
    pub table: String,
    pub file: String,
    pub rows: u64,
    pub columns: Vec<ColumnProfile>,
    /// With the privacy unit's column: patients, patients by their rows
    /// (the import report's buckets), the most rows one patient has, and
    /// the rows that would keep 99% of patients whole.
    pub patients: Option<u64>,
    pub rows_per_patient: BTreeMap<String, u64>,
    pub most_rows_for_one_patient: u64,
    pub rows_for_99_percent: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileReport {
    pub notice: &'static str,
    pub tables: Vec<TableProfile>,
}

/// Profile every `<table>.csv` / `.tsv` / `.parquet` in `from`, counting rows
/// per patient by `unit`, sorting in `memory_bytes` and spilling under a
/// temporary directory.
pub async fn profile(
    from: &[PathBuf],
    unit: &str,
    memory_bytes: usize,
) -> Result<ProfileReport, ImportError> {
    let files = crate::draft::table_files(from)?;
    let spill = tempfile::tempdir().map_err(|e| stage("a temporary directory", &e))?;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(memory_bytes)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![spill.path().to_owned()])),
        )
        .build_arc()
        .map_err(|e| stage("the session", &e))?;
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
    let mut tables = Vec::new();
    for (table, path) in files {
        tables.push(profile_table(&ctx, &table, &path, unit).await?);
    }
    Ok(ProfileReport {
        notice: NOTICE,
        tables,
    })
}

fn stage(what: &str, e: &dyn std::fmt::Display) -> ImportError {
    ImportError::Stage {
        table: what.to_owned(),
        reason: e.to_string(),
    }
}

fn unreadable(path: &Path, e: &dyn std::fmt::Display) -> ImportError {
    ImportError::Input {
        file: path.display().to_string(),
        reason: e.to_string(),
        fix: "check that it is CSV or TSV with a header line, or Parquet".into(),
    }
}

/// `name` as a SQL identifier, whatever it holds.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn profile_table(
    ctx: &SessionContext,
    table: &str,
    path: &Path,
    unit: &str,
) -> Result<TableProfile, ImportError> {
    let shown = path.to_string_lossy();
    // One table at a time, deregistered when profiled.
    let registered = "profiled";
    let header: Vec<String> = if let Some(delimiter) = crate::delimiter(path) {
        let file = std::fs::File::open(path).map_err(|e| unreadable(path, &e))?;
        let (inferred, _) = datafusion::arrow::csv::reader::Format::default()
            .with_header(true)
            .with_delimiter(delimiter)
            .infer_schema(file, Some(0))
            .map_err(|e| unreadable(path, &e))?;
        let header: Vec<String> = inferred.fields().iter().map(|f| f.name().clone()).collect();
        // Every column as text: the profile reads what is there, not what
        // the first rows suggest.
        let schema = Schema::new(
            header
                .iter()
                .map(|h| Field::new(h, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        );
        ctx.register_csv(
            registered,
            shown.as_ref(),
            CsvReadOptions::new()
                .has_header(true)
                .delimiter(delimiter)
                .schema(&schema)
                .file_extension(if delimiter == b'\t' { ".tsv" } else { ".csv" }),
        )
        .await
        .map_err(|e| unreadable(path, &e))?;
        header
    } else {
        ctx.register_parquet(registered, shown.as_ref(), ParquetReadOptions::default())
            .await
            .map_err(|e| unreadable(path, &e))?;
        let provider = ctx
            .table_provider(registered)
            .await
            .map_err(|e| unreadable(path, &e))?;
        provider
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    };
    let text = |c: &str| format!("NULLIF(TRIM(CAST({} AS VARCHAR)), '')", quoted(c));
    // Each column's text, number and date first, under names of their
    // own, then one aggregate over them all: one scan per table.
    let mut inner = Vec::new();
    let mut select = vec!["COUNT(*)".to_owned()];
    for (k, c) in header.iter().enumerate() {
        let v = text(c);
        inner.extend([
            format!("{v} AS v{k}"),
            format!("TRY_CAST({v} AS DOUBLE) AS n{k}"),
            format!("TRY_CAST({v} AS DATE) AS d{k}"),
        ]);
        select.extend([
            format!("SUM(CASE WHEN v{k} IS NULL THEN 1 ELSE 0 END)"),
            format!("COUNT(n{k})"),
            format!("MIN(n{k})"),
            format!("MAX(n{k})"),
            format!("COUNT(d{k})"),
            format!("CAST(MIN(d{k}) AS VARCHAR)"),
            format!("CAST(MAX(d{k}) AS VARCHAR)"),
            format!("approx_distinct(v{k})"),
        ]);
    }
    let select: Vec<String> = select
        .into_iter()
        .enumerate()
        .map(|(i, e)| format!("{e} AS a{i}"))
        .collect();
    let sql = format!(
        "SELECT {} FROM (SELECT {} FROM {registered})",
        select.join(", "),
        if inner.is_empty() {
            "1 AS one".to_owned()
        } else {
            inner.join(", ")
        }
    );
    let row = one_row(ctx, &sql, path).await?;
    let number = |i: usize| -> Option<f64> {
        let c = cast(row.get(i)?, &DataType::Float64).ok()?;
        let c = c.as_primitive_opt::<datafusion::arrow::datatypes::Float64Type>()?;
        (!c.is_null(0)).then(|| c.value(0))
    };
    let word = |i: usize| -> Option<String> {
        let c = cast(row.get(i)?, &DataType::Utf8).ok()?;
        let c = c.as_string_opt::<i32>()?;
        (!c.is_null(0)).then(|| c.value(0).to_owned())
    };
    let count = |i: usize| number(i).map_or(0, |v| v as u64);
    let rows = count(0);
    let mut columns = Vec::new();
    for (k, c) in header.iter().enumerate() {
        let at = 1 + k * 8;
        let range = |lo: Option<f64>, hi: Option<f64>| lo.zip(hi);
        let mut profile = ColumnProfile {
            column: crate::draft::sanitise(c),
            missing: count(at),
            numbers: count(at + 1),
            number_range: range(number(at + 2), number(at + 3)),
            dates: count(at + 4),
            date_range: word(at + 5).zip(word(at + 6)),
            distinct: count(at + 7),
            values: Vec::new(),
        };
        // An identifier's values are never listed, even here.
        if profile.distinct <= LISTED_UP_TO && !crate::draft::looks_like_identifier(&profile.column)
        {
            let v = text(c);
            let sql = format!(
                "SELECT COALESCE({v}, '(missing)'), COUNT(*) FROM {registered} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {}",
                LISTED_UP_TO + 1
            );
            profile.values = pairs(ctx, &sql, path).await?;
        }
        columns.push(profile);
    }
    let mut report = TableProfile {
        table: table.to_owned(),
        file: shown.into_owned(),
        rows,
        columns,
        patients: None,
        rows_per_patient: BTreeMap::new(),
        most_rows_for_one_patient: 0,
        rows_for_99_percent: 0,
    };
    if let Some(u) = header.iter().find(|h| crate::draft::sanitise(h) == unit) {
        let v = text(u);
        let sql = format!(
            "SELECT CAST(n AS VARCHAR), COUNT(*) FROM (SELECT {v} AS u, COUNT(*) AS n FROM {registered} WHERE {v} IS NOT NULL GROUP BY 1) GROUP BY n"
        );
        let mut by_rows: Vec<(u64, u64)> = pairs(ctx, &sql, path)
            .await?
            .into_iter()
            .filter_map(|(n, patients)| Some((n.parse().ok()?, patients)))
            .collect();
        by_rows.sort_unstable();
        let patients: u64 = by_rows.iter().map(|(_, p)| p).sum();
        let mut kept = 0;
        for &(n, p) in &by_rows {
            *report
                .rows_per_patient
                .entry(crate::bucket(n).to_owned())
                .or_default() += p;
            report.most_rows_for_one_patient = n;
            if kept * 100 < patients * 99 {
                report.rows_for_99_percent = n;
            }
            kept += p;
        }
        report.patients = Some(patients);
    }
    ctx.deregister_table(registered)
        .map_err(|e| stage(table, &e))?;
    Ok(report)
}

async fn batches(
    ctx: &SessionContext,
    sql: &str,
    path: &Path,
) -> Result<Vec<RecordBatch>, ImportError> {
    ctx.sql(sql)
        .await
        .map_err(|e| unreadable(path, &e))?
        .collect()
        .await
        .map_err(|e| unreadable(path, &e))
}

/// The one row of an aggregate without GROUP BY, column by column.
async fn one_row(
    ctx: &SessionContext,
    sql: &str,
    path: &Path,
) -> Result<Vec<Arc<dyn Array>>, ImportError> {
    let batches = batches(ctx, sql, path).await?;
    let batch = batches
        .iter()
        .find(|b| b.num_rows() == 1)
        .ok_or_else(|| stage("the profile", &"an aggregate gave no row"))?;
    Ok(batch.columns().to_vec())
}

/// A (text, count) pair per row of a two-column result.
async fn pairs(
    ctx: &SessionContext,
    sql: &str,
    path: &Path,
) -> Result<Vec<(String, u64)>, ImportError> {
    let mut out = Vec::new();
    for b in batches(ctx, sql, path).await? {
        let keys = cast(b.column(0), &DataType::Utf8).map_err(|e| stage("the profile", &e))?;
        let counts = cast(b.column(1), &DataType::UInt64).map_err(|e| stage("the profile", &e))?;
        let (Some(keys), Some(counts)) = (
            keys.as_string_opt::<i32>(),
            counts.as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>(),
        ) else {
            return Err(stage("the profile", &"unexpected column types"));
        };
        for i in 0..b.num_rows() {
            out.push((keys.value(i).to_owned(), counts.value(i)));
        }
    }
    Ok(out)
}
