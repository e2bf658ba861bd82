//! `tre policy draft`: a commented policy from the input's headers and
//! types, for the custodian to finish. Classes are guessed (and OMOP CDM's
//! standard tables are known); every bound, every public domain and every
//! per-patient row bound is left as an explicit "TODO", which the server
//! and `tre policy check` refuse. Nothing here reads a value to suggest a
//! bound or a domain: only names and types.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::arrow::csv::reader::Format;
use datafusion::arrow::datatypes::DataType;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::ImportError;

/// What the input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Any CSV or Parquet files, one per table.
    Plain,
    /// OMOP CDM: the standard tables' columns are known.
    Omop,
}

/// A column as the input shows it.
struct Seen {
    name: String,
    /// The type Parquet declares, or the CSV reader infers from the first
    /// rows' text (never their values' ranges).
    data_type: DataType,
}

/// Draft a policy for the tables in `from` (a directory of `*.csv` and
/// `*.parquet`, or those files themselves).
pub fn draft(from: &[PathBuf], dataset: &str, flavour: Flavour) -> Result<String, ImportError> {
    let mut tables = Vec::new();
    for (table, f) in table_files(from)? {
        tables.push((table, columns(&f)?));
    }
    Ok(render(dataset, flavour, &tables))
}

/// Each table's file in `from` (directories and files), with the table's
/// name, in name order within each directory.
pub(crate) fn table_files(from: &[PathBuf]) -> Result<Vec<(String, PathBuf)>, ImportError> {
    let mut files = Vec::new();
    for p in from {
        if p.is_dir() {
            let entries = std::fs::read_dir(p).map_err(|e| input_err(p, e))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| table_file(p).is_some())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(ImportError::Schema(
            "no .csv, .tsv or .parquet files found; name one file per table, e.g. person.csv"
                .into(),
        ));
    }
    files
        .into_iter()
        .map(|f| {
            let table = table_file(&f).ok_or_else(|| {
                ImportError::Schema(format!("{} is not .csv, .tsv or .parquet", f.display()))
            })?;
            Ok((table, f))
        })
        .collect()
}

/// A table name from a file name: `condition_occurrence.csv` →
/// `condition_occurrence`.
fn table_file(p: &Path) -> Option<String> {
    let ext = p.extension()?.to_str()?;
    if !matches!(ext, "csv" | "tsv" | "parquet") {
        return None;
    }
    Some(sanitise(p.file_stem()?.to_str()?))
}

/// A policy name for an input name: lowercase, `_` for anything else.
pub(crate) fn sanitise(name: &str) -> String {
    // Spreadsheet exports often start with a UTF-8 byte-order mark.
    let s: String = name
        .trim_start_matches('\u{feff}')
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        format!("t_{s}")
    } else {
        s
    }
}

fn input_err(p: &Path, e: impl std::fmt::Display) -> ImportError {
    ImportError::Input {
        file: p.display().to_string(),
        reason: e.to_string(),
        fix: "check the path and its permissions".into(),
    }
}

fn columns(f: &Path) -> Result<Vec<Seen>, ImportError> {
    let file = File::open(f).map_err(|e| input_err(f, e))?;
    let schema = if let Some(delimiter) = crate::delimiter(f) {
        // Types from the first rows' text, to tell numbers and dates from
        // text; no value is kept.
        Format::default()
            .with_header(true)
            .with_delimiter(delimiter)
            .infer_schema(file, Some(1000))
            .map_err(|e| input_err(f, e))?
            .0
    } else {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| input_err(f, e))?
            .schema()
            .as_ref()
            .clone()
    };
    Ok(schema
        .fields()
        .iter()
        .map(|field| Seen {
            name: field.name().clone(),
            data_type: field.data_type().clone(),
        })
        .collect())
}

/// How a column is drafted: its policy entry and a comment.
struct Guess {
    entry: String,
    comment: &'static str,
}

const BOUNDS_TODO: &str = "\"TODO: [lowest, highest] plausible values; queries clamp to them and noise scales with them\"";
const DATE_BOUNDS_TODO: &str =
    "\"TODO: [\\\"YYYY-MM-DD\\\", \\\"YYYY-MM-DD\\\"], the first and last plausible dates\"";
const VALUES_TODO: &str = "\"TODO: the public values (a published code list); or delete values and set max_distinct for a private domain\"";

fn identifier(comment: &'static str) -> Guess {
    Guess {
        entry: "{ class = \"identifier\" }".into(),
        comment,
    }
}

fn numeric(comment: &'static str) -> Guess {
    Guess {
        entry: format!("{{ class = \"numeric\", bounds = {BOUNDS_TODO} }}"),
        comment,
    }
}

fn date(comment: &'static str) -> Guess {
    Guess {
        entry: format!("{{ class = \"date\", bounds = {DATE_BOUNDS_TODO} }}"),
        comment,
    }
}

fn private_codes(comment: &'static str) -> Guess {
    Guess {
        entry: "{ class = \"categorical\", max_distinct = \"TODO: the most distinct codes this column may hold\" }".into(),
        comment,
    }
}

/// OMOP CDM v5.4's meaning of a column, where it has one.
fn omop(table: &str, column: &str) -> Option<Guess> {
    Some(match column {
        "person_id" => identifier("the privacy unit; replaced by a keyed pseudonym on import"),
        "gender_concept_id" => Guess {
            entry: "{ class = \"categorical\", values = [8507, 8532, 0] }".into(),
            comment: "OMOP standard concepts: 8507 male, 8532 female, 0 unknown (public vocabulary)",
        },
        "year_of_birth" => numeric("year of birth"),
        "month_of_birth" => Guess {
            entry: "{ class = \"categorical\", values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }"
                .into(),
            comment: "month of birth",
        },
        "day_of_birth" | "birth_datetime" => identifier(
            "exact birth date: a quasi-identifier, never released; delete it to leave it out",
        ),
        "race_concept_id" | "ethnicity_concept_id" => private_codes("OMOP concept"),
        c if c.ends_with("_source_value") || c.ends_with("_source_concept_id") => identifier(
            "local source code or text: may identify; never released. Delete it to leave it out",
        ),
        c if c.ends_with("_concept_id") => private_codes(
            "OMOP concept id (a private domain: released only through DP key selection unless you list public values)",
        ),
        c if c.ends_with("_date") || c.ends_with("_datetime") => {
            date("date (a date-time is imported as its date)")
        }
        c if c.ends_with("_id") => identifier("a record or provider id; never released"),
        "quantity" | "days_supply" | "refills" | "value_as_number" | "range_low" | "range_high" => {
            numeric("a measured quantity")
        }
        "value_as_string" | "sig" | "lot_number" | "stop_reason" => {
            identifier("free text: may identify; never released. Delete it to leave it out")
        }
        _ => {
            let _ = table;
            return None;
        }
    })
}

/// A column name that names people or records rather than describing
/// them: an NHS number, an id, a postcode, a name.
pub(crate) fn looks_like_identifier(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("nhs_number") || n.ends_with("_id") || n.contains("postcode") || n.contains("name")
}

/// A column's guess from its name and type alone.
fn generic(column: &Seen, unit: &str) -> Guess {
    let n = column.name.to_ascii_lowercase();
    if n == unit {
        return identifier("the privacy unit; replaced by a keyed pseudonym on import");
    }
    if looks_like_identifier(&n) {
        return identifier(
            "looks like an identifier: replaced by a keyed pseudonym on import and never released. Delete it to leave it out",
        );
    }
    match &column.data_type {
        DataType::Boolean => Guess {
            entry: "{ class = \"categorical\", values = [true, false] }".into(),
            comment: "true or false",
        },
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) => date("date"),
        t if t.is_numeric() => numeric("number"),
        _ => Guess {
            entry: format!("{{ class = \"categorical\", values = {VALUES_TODO} }}"),
            comment: "text",
        },
    }
}

fn render(dataset: &str, flavour: Flavour, tables: &[(String, Vec<Seen>)]) -> String {
    let unit = "person_id";
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Draft policy for dataset '{dataset}', written by `tre policy draft` from the\n\
         # input's column names and types only. You, the custodian, own it: every\n\
         # \"TODO\" is a decision only you can make (bounds, public values, rows per\n\
         # patient), and the server and `tre policy check` refuse the file while any\n\
         # remains. Delete a column to leave it out of the import.\n\
         \n\
         [dataset]\n\
         name = \"{dataset}\"\n\
         description = \"TODO: what this dataset is, for researchers\"\n\
         # The column that identifies a patient in every table (guessed).\n\
         privacy_unit = \"{unit}\"\n\
         sdc_profile = \"nhs_sde\"\n\
         # National Data Opt-out: name a true/false column, e.g. \"person.opt_out\".\n\
         # exclude_opted_out = \"person.opt_out\"\n\
         max_groups_per_unit = 3\n\
         \n\
         [budget]\n\
         # The shipped defaults; review them for this dataset.\n\
         min_epsilon_per_query = 0.01\n\
         default_epsilon_per_query = 0.5\n\
         max_epsilon_per_query = 2.0\n\
         project_epsilon = 10.0\n\
         default_delta_per_query = 1e-7\n\
         max_delta_per_query = 1e-6\n\
         project_delta = 1e-5\n\
         lifetime_epsilon = 100.0\n\
         lifetime_delta = 1e-4\n\
         \n\
         [review]\n\
         mode = \"flagged\"\n\
         max_cells = 2000\n\
         approvals = 1"
    );
    for (table, columns) in tables {
        let known_omop = flavour == Flavour::Omop;
        let one_row = known_omop && matches!(table.as_str(), "person" | "death");
        let _ = writeln!(out, "\n[tables.{table}]");
        if one_row {
            let _ = writeln!(out, "max_rows_per_unit = 1");
        } else {
            let _ = writeln!(
                out,
                "max_rows_per_unit = \"TODO: the most rows one patient may contribute (more are dropped at random on import)\""
            );
        }
        for c in columns {
            let name = sanitise(&c.name);
            let guess = known_omop
                .then(|| omop(table, &name))
                .flatten()
                .unwrap_or_else(|| generic(c, unit));
            let _ = writeln!(out, "# {}: {}", name, guess.comment);
            let _ = writeln!(out, "columns.{name} = {}", guess.entry);
        }
    }
    out
}
