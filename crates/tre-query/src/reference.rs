//! Public reference tables (ICD-10 chapters, NHS regions, ...): small CSV
//! lookups shipped under `datasets/reference/`, loaded into memory and
//! joinable on any key. Their values are public, so their distinct values
//! are public domains, and the compiler knows how many rows share each
//! value (a join with them multiplies a patient's rows by at most that).

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::ReaderBuilder;
use datafusion::arrow::csv::reader::Format;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use tre_core::Code;

use crate::QueryError;

/// The reference tables this build ships, by name.
const BUILTIN: &[(&str, &str)] = &[
    (
        "icd10_codes",
        include_str!("../../../datasets/reference/icd10_codes.csv"),
    ),
    (
        "nhs_regions",
        include_str!("../../../datasets/reference/nhs_regions.csv"),
    ),
];

/// What the compiler knows about one column of a reference table.
#[derive(Debug, Clone)]
pub(crate) struct RefColumn {
    /// Distinct non-null values, sorted.
    pub(crate) domain: Vec<ScalarValue>,
    /// The most rows sharing one value.
    pub(crate) max_dup: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct RefTable {
    pub(crate) schema: SchemaRef,
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) rows: u64,
    pub(crate) columns: BTreeMap<String, RefColumn>,
}

pub(crate) type RefTables = BTreeMap<String, Arc<RefTable>>;

/// Load the reference tables a policy names.
pub(crate) fn load(names: &[String]) -> Result<RefTables, QueryError> {
    let mut out = BTreeMap::new();
    for name in names {
        let Some((_, csv)) = BUILTIN.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(QueryError::Setup {
                code: Code::PolicyInvalid,
                message: format!(
                    "reference table '{name}' is not shipped; known: {}",
                    known.join(", ")
                ),
            });
        };
        let table = parse(name, csv).map_err(|e| QueryError::Setup {
            code: Code::PolicyInvalid,
            message: format!("reference table '{name}': {e}"),
        })?;
        out.insert(name.clone(), Arc::new(table));
    }
    Ok(out)
}

fn parse(name: &str, csv: &str) -> Result<RefTable, String> {
    let format = Format::default().with_header(true);
    let (schema, _) = format
        .infer_schema(Cursor::new(csv.as_bytes()), None)
        .map_err(|e| e.to_string())?;
    let schema = Arc::new(schema);
    let reader = ReaderBuilder::new(Arc::clone(&schema))
        .with_format(format)
        .build(Cursor::new(csv.as_bytes()))
        .map_err(|e| e.to_string())?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let mut columns = BTreeMap::new();
    for (i, field) in schema.fields().iter().enumerate() {
        let mut counts: HashMap<ScalarValue, u64> = HashMap::new();
        for b in &batches {
            for r in 0..b.num_rows() {
                let v = ScalarValue::try_from_array(b.column(i), r).map_err(|e| e.to_string())?;
                if !v.is_null() {
                    *counts.entry(v).or_default() += 1;
                }
            }
        }
        let max_dup = counts.values().copied().max().unwrap_or(0);
        let mut domain: Vec<ScalarValue> = counts.into_keys().collect();
        domain.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        columns.insert(field.name().clone(), RefColumn { domain, max_dup });
    }
    if rows == 0 {
        return Err(format!("{name} is empty"));
    }
    Ok(RefTable {
        schema,
        batches,
        rows,
        columns,
    })
}
