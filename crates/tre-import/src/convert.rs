//! One input batch, validated against one table's policy and converted to
//! the extract's types, row by row. Every row either becomes a row of the
//! output or is counted under the reason it was left out.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tre_policy::{ColumnClass, OutOfBounds, TablePolicy};
use tre_vault::MasterKey;

/// What a column holds in the extract, and how its text is read.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A direct identifier (the privacy unit among them): replaced by its
    /// keyed pseudonym.
    Pseudonym,
    /// Text without a public domain.
    Text,
    /// Text from a public domain.
    TextIn(HashSet<String>),
    /// Whole numbers from a public domain.
    IntIn(HashSet<i64>),
    /// true or false.
    Bool,
    Number {
        lo: f64,
        hi: f64,
        reject: bool,
    },
    Date {
        lo: i32,
        hi: i32,
        reject: bool,
    },
}

impl Kind {
    pub(crate) fn of(class: &ColumnClass, out_of_bounds: OutOfBounds) -> Self {
        let reject = out_of_bounds == OutOfBounds::Reject;
        match class {
            ColumnClass::Identifier => Kind::Pseudonym,
            ColumnClass::Categorical { domain: None } => Kind::Text,
            ColumnClass::Categorical {
                domain: Some(values),
            } => {
                let ints: Option<HashSet<i64>> =
                    values.iter().map(|v| v.parse::<i64>().ok()).collect();
                let bools = values.iter().all(|v| v == "true" || v == "false");
                match ints {
                    Some(ints) => Kind::IntIn(ints),
                    None if bools => Kind::Bool,
                    None => Kind::TextIn(values.iter().cloned().collect()),
                }
            }
            ColumnClass::Numeric { lo, hi } => Kind::Number {
                lo: *lo,
                hi: *hi,
                reject,
            },
            ColumnClass::Date { lo, hi } => Kind::Date {
                lo: *lo,
                hi: *hi,
                reject,
            },
        }
    }

    fn data_type(&self) -> DataType {
        match self {
            Kind::Pseudonym | Kind::Text | Kind::TextIn(_) => DataType::Utf8,
            Kind::IntIn(_) => DataType::Int64,
            Kind::Bool => DataType::Boolean,
            Kind::Number { .. } => DataType::Float64,
            Kind::Date { .. } => DataType::Date32,
        }
    }
}

/// `x` held to the policy's `[lo, hi]`: as it is, clamped to the nearer
/// bound (its row noted in `clamped`), or, when `strict`, the reason its
/// row is rejected.
fn held<T: PartialOrd + Copy>(
    x: T,
    lo: T,
    hi: T,
    strict: bool,
    row: usize,
    clamped: &mut Vec<usize>,
) -> Result<T, &'static str> {
    if x >= lo && x <= hi {
        Ok(x)
    } else if strict {
        Err("outside the policy's bounds")
    } else {
        clamped.push(row);
        Ok(if x < lo { lo } else { hi })
    }
}

/// A table's conversion: which input column feeds each policy column.
pub(crate) struct Table {
    columns: Vec<(String, usize, Kind)>,
    unit: usize,
    /// The input's header, to recognise a header line repeated in the data.
    header: Vec<String>,
    pub(crate) schema: SchemaRef,
}

/// What a table's rows came to, so far.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tally {
    pub rows_read: u64,
    pub rows_kept: u64,
    /// Rows left out, by reason ("admission_date: not a date (YYYY-MM-DD)").
    pub rejected: BTreeMap<String, u64>,
    /// Values clamped to a bound, by column.
    pub clamped: BTreeMap<String, u64>,
}

impl Tally {
    pub fn rows_rejected(&self) -> u64 {
        self.rejected.values().sum()
    }
}

impl Table {
    /// Map `policy`'s columns onto the input's `header`; the missing ones
    /// are returned by name.
    pub(crate) fn new(
        policy: &TablePolicy,
        unit: &str,
        header: &[String],
    ) -> Result<Self, Vec<String>> {
        let mut columns = Vec::new();
        let mut missing = Vec::new();
        for c in &policy.columns {
            match header
                .iter()
                .position(|h| crate::draft::sanitise(h) == c.name)
            {
                Some(i) => columns.push((c.name.clone(), i, Kind::of(&c.class, c.out_of_bounds))),
                None => missing.push(c.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(missing);
        }
        let unit = columns
            .iter()
            .position(|(n, _, _)| n == unit)
            .ok_or_else(|| vec![unit.to_owned()])?;
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, (name, _, kind))| Field::new(name, kind.data_type(), i != unit))
            .collect();
        Ok(Self {
            columns,
            unit,
            header: header.to_vec(),
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// Input columns the policy does not name: not imported.
    pub(crate) fn ignored(&self) -> Vec<String> {
        self.header
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.columns.iter().any(|(_, j, _)| j == i))
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// Convert `raw` (every column as text, in the input's order) into the
    /// extract's columns, leaving out and counting the rows that do not
    /// meet the policy.
    pub(crate) fn convert(
        &self,
        raw: &RecordBatch,
        master: &MasterKey,
        tally: &mut Tally,
    ) -> Result<RecordBatch, String> {
        let n = raw.num_rows();
        let text: Vec<Arc<StringArray>> = raw
            .columns()
            .iter()
            .map(|c| {
                let c = cast(c, &DataType::Utf8).map_err(|e| e.to_string())?;
                c.as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .map(Arc::new)
                    .ok_or_else(|| "a column did not read as text".to_owned())
            })
            .collect::<Result<_, _>>()?;
        let value = |col: usize, row: usize| -> Option<&str> {
            let a = &text[col];
            (!a.is_null(row))
                .then(|| a.value(row).trim())
                .filter(|s| !s.is_empty())
        };
        let mut reason: Vec<Option<String>> = vec![None; n];
        // A header line repeated in the data (files concatenated).
        for (row, r) in reason.iter_mut().enumerate() {
            if (0..self.header.len()).all(|c| value(c, row) == Some(self.header[c].as_str())) {
                *r = Some("a repeated header line".into());
            }
        }
        let unit_input = self.columns[self.unit].1;
        for (row, r) in reason.iter_mut().enumerate() {
            if r.is_none() && value(unit_input, row).is_none() {
                *r = Some(format!(
                    "{}: missing (every row needs its patient)",
                    self.columns[self.unit].0
                ));
            }
        }
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        // Rows whose value was clamped, by column: counted only for the
        // rows that are kept.
        let mut clamped_rows: Vec<(&str, Vec<usize>)> = Vec::new();
        for (name, input, kind) in &self.columns {
            let reject = |row: usize, why: &str, reason: &mut Vec<Option<String>>| {
                if reason[row].is_none() {
                    reason[row] = Some(format!("{name}: {why}"));
                }
            };
            let mut clamped: Vec<usize> = Vec::new();
            let array: ArrayRef = match kind {
                Kind::Pseudonym => Arc::new(StringArray::from_iter(
                    (0..n).map(|row| value(*input, row).map(|v| master.pseudonymise(v))),
                )),
                Kind::Text => {
                    Arc::new(StringArray::from_iter((0..n).map(|row| value(*input, row))))
                }
                Kind::TextIn(domain) => Arc::new(StringArray::from_iter((0..n).map(|row| {
                    let v = value(*input, row)?;
                    if domain.contains(v) {
                        Some(v)
                    } else {
                        reject(row, "not one of the policy's values", &mut reason);
                        None
                    }
                }))),
                Kind::IntIn(domain) => Arc::new(Int64Array::from_iter((0..n).map(|row| {
                    let v = value(*input, row)?;
                    match v.parse::<i64>() {
                        Ok(i) if domain.contains(&i) => Some(i),
                        Ok(_) => {
                            reject(row, "not one of the policy's values", &mut reason);
                            None
                        }
                        Err(_) => {
                            reject(row, "not a whole number", &mut reason);
                            None
                        }
                    }
                }))),
                Kind::Bool => Arc::new(BooleanArray::from_iter((0..n).map(|row| {
                    let v = value(*input, row)?;
                    match v.to_ascii_lowercase().as_str() {
                        "true" | "t" | "1" | "yes" | "y" => Some(true),
                        "false" | "f" | "0" | "no" | "n" => Some(false),
                        _ => {
                            reject(row, "not true or false", &mut reason);
                            None
                        }
                    }
                }))),
                Kind::Number {
                    lo,
                    hi,
                    reject: strict,
                } => Arc::new(Float64Array::from_iter((0..n).map(|row| {
                    let v = value(*input, row)?;
                    let Some(x) = v.parse::<f64>().ok().filter(|x| x.is_finite()) else {
                        reject(row, "not a number", &mut reason);
                        return None;
                    };
                    held(x, *lo, *hi, *strict, row, &mut clamped)
                        .map_err(|why| reject(row, why, &mut reason))
                        .ok()
                }))),
                Kind::Date {
                    lo,
                    hi,
                    reject: strict,
                } => {
                    Arc::new(Date32Array::from_iter((0..n).map(|row| {
                        let v = value(*input, row)?;
                        // A date, or the date of a date-time (OMOP's
                        // *_datetime columns).
                        let day = v
                            .get(..10)
                            .filter(|_| {
                                v.len() == 10 || matches!(v.as_bytes().get(10), Some(b'T' | b' '))
                            })
                            .and_then(tre_policy::parse_date);
                        let Some(d) = day else {
                            reject(row, "not a date (YYYY-MM-DD)", &mut reason);
                            return None;
                        };
                        held(d, *lo, *hi, *strict, row, &mut clamped)
                            .map_err(|why| reject(row, why, &mut reason))
                            .ok()
                    })))
                }
            };
            if !clamped.is_empty() {
                clamped_rows.push((name, clamped));
            }
            arrays.push(array);
        }
        for (name, rows) in clamped_rows {
            let kept = rows.iter().filter(|&&r| reason[r].is_none()).count() as u64;
            if kept > 0 {
                *tally.clamped.entry(name.to_owned()).or_default() += kept;
            }
        }
        let keep = BooleanArray::from_iter(reason.iter().map(|r| Some(r.is_none())));
        for r in reason.into_iter().flatten() {
            *tally.rejected.entry(r).or_default() += 1;
        }
        tally.rows_read += n as u64;
        // Rejected rows may lack the unit: filter them out under a schema
        // where every column may be null, then declare the unit non-null.
        let loose = Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(loose, arrays)
            .and_then(|b| filter_record_batch(&b, &keep))
            .and_then(|b| RecordBatch::try_new(Arc::clone(&self.schema), b.columns().to_vec()))
            .map_err(|e| e.to_string())?;
        tally.rows_kept += batch.num_rows() as u64;
        Ok(batch)
    }
}
