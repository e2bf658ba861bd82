//! Total versions of the operators and functions that DataFusion
//! implements as partial: each returns NULL where DataFusion's would fail
//! (division by zero, overflow, an impossible date, a string that does not
//! parse, a negative length). An accepted query must not be able to fail
//! on any value, because whether a query fails is something the researcher
//! sees (issue #10). The sandbox registers these under DataFusion's own
//! names (`abs`, `power`, `sqrt`, `substr`, `to_date`, `make_date`), and
//! the compiler replaces every call of the built-ins by them, even where
//! the SQL planner hard-wires a built-in; `/` and `%` are rewritten into
//! `__tre_div` and `__tre_mod`.
//!
//! Per-row work is bounded too: `to_date` leaves strings longer than
//! [`MAX_PARSED_TEXT`] unparsed, so no value can make one row slow.

use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, StringArray,
};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// `a / b`, NULL where `b` is zero or the quotient overflows.
pub(crate) const DIV_UDF: &str = "__tre_div";
/// `a % b`, NULL where `b` is zero or the remainder overflows.
pub(crate) const MOD_UDF: &str = "__tre_mod";
/// `to_date` parses at most this many characters; longer text gives NULL.
pub(crate) const MAX_PARSED_TEXT: usize = 64;

use DataType::{Date32, Float64, Int64, Utf8};

/// Every total function, to register in each session.
pub(crate) fn all() -> Vec<ScalarUDF> {
    let any2 = || Signature::any(2, Volatility::Immutable);
    let floats = |n| Signature::uniform(n, vec![Float64], Volatility::Immutable);
    let coerced = || Signature::user_defined(Volatility::Immutable);
    [
        Total::new(DIV_UDF, any2(), None, same_number, div),
        Total::new(MOD_UDF, any2(), None, same_number, modulo),
        Total::new(
            "abs",
            Signature::uniform(1, vec![Int64, Float64], Volatility::Immutable),
            None,
            same_number,
            abs,
        ),
        Total::new("power", floats(2), None, |_| Ok(Float64), power).alias("pow"),
        Total::new("sqrt", floats(1), None, |_| Ok(Float64), sqrt),
        Total::new(
            "substr",
            coerced(),
            Some(Coerce::new(&[Utf8, Int64, Int64], 2, 3)),
            |_| Ok(Utf8),
            substr_all,
        )
        .alias("substring"),
        Total::new(
            "to_date",
            coerced(),
            Some(Coerce::new(&[Utf8], 1, 5)),
            |_| Ok(Date32),
            to_date,
        ),
        Total::new(
            "make_date",
            coerced(),
            Some(Coerce::new(&[Int64, Int64, Int64], 3, 3)),
            |_| Ok(Date32),
            make_date,
        ),
    ]
    .into_iter()
    .map(ScalarUDF::from)
    .collect()
}

/// Argument coercion for a `user_defined` signature: each argument to the
/// type at its position (the last repeating), with `min..=max` arguments.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Coerce {
    types: &'static [DataType],
    min: usize,
    max: usize,
}

impl Coerce {
    fn new(types: &'static [DataType], min: usize, max: usize) -> Self {
        Self { types, min, max }
    }
}

/// One total function: its name, how its arguments are typed, and a
/// per-batch evaluation that cannot fail on any value. Identified by its
/// name (function pointers have no meaningful equality).
#[derive(Debug)]
struct Total {
    name: &'static str,
    aliases: Vec<String>,
    signature: Signature,
    coerce: Option<Coerce>,
    returns: fn(&[DataType]) -> DfResult<DataType>,
    /// The arguments as arrays of the batch's length, and the return type.
    eval: fn(&[ArrayRef], &DataType) -> DfResult<ArrayRef>,
}

impl Total {
    fn new(
        name: &'static str,
        signature: Signature,
        coerce: Option<Coerce>,
        returns: fn(&[DataType]) -> DfResult<DataType>,
        eval: fn(&[ArrayRef], &DataType) -> DfResult<ArrayRef>,
    ) -> Self {
        Self {
            name,
            aliases: Vec::new(),
            signature,
            coerce,
            returns,
            eval,
        }
    }

    fn alias(mut self, alias: &str) -> Self {
        self.aliases.push(alias.to_owned());
        self
    }
}

impl PartialEq for Total {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Total {}

impl std::hash::Hash for Total {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for Total {
    fn name(&self) -> &str {
        self.name
    }
    fn aliases(&self) -> &[String] {
        &self.aliases
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let Some(c) = &self.coerce else {
            return Err(bad_types(self.name, arg_types));
        };
        if !(c.min..=c.max).contains(&arg_types.len()) {
            return Err(bad_types(self.name, arg_types));
        }
        arg_types
            .iter()
            .enumerate()
            .map(|(i, have)| {
                let want = c.types.get(i).or(c.types.last()).unwrap_or(&Utf8);
                let ok = have.is_null()
                    || match want {
                        Utf8 => matches!(have, Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
                        Int64 => have.is_integer(),
                        other => have == other,
                    };
                if ok {
                    Ok(want.clone())
                } else {
                    Err(bad_types(self.name, arg_types))
                }
            })
            .collect()
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        (self.returns)(arg_types).map_err(|_| bad_types(self.name, arg_types))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = batch_arrays(&args)?;
        let out = (self.eval)(&arrays, args.return_field.data_type())?;
        Ok(ColumnarValue::Array(out))
    }
}

/// Every argument as an array of the batch's length. A literal argument
/// arrives as a scalar; `values_to_arrays` would make it a length-1 array
/// when no argument is an array, and indexing that by row would panic.
pub(crate) fn batch_arrays(args: &ScalarFunctionArgs) -> DfResult<Vec<ArrayRef>> {
    args.args
        .iter()
        .map(|a| a.to_array(args.number_rows))
        .collect()
}

fn bad_types(name: &str, types: &[DataType]) -> DataFusionError {
    DataFusionError::Plan(format!("{name} does not take arguments of types {types:?}"))
}

/// Cast without failing: values that do not fit become NULL.
fn cast_safe(a: &ArrayRef, to: &DataType) -> DfResult<ArrayRef> {
    let safe = CastOptions {
        safe: true,
        ..Default::default()
    };
    Ok(cast_with_options(a, to, &safe)?)
}

/// The operands' (already coerced) number type; NULL takes the other's.
fn same_number(types: &[DataType]) -> DfResult<DataType> {
    let number = |t: &DataType| t.is_integer() || t.is_floating();
    match types {
        [a] if number(a) || a.is_null() => Ok(if a.is_null() { Int64 } else { a.clone() }),
        [a, b] if a == b && number(a) => Ok(a.clone()),
        [DataType::Null, b] | [b, DataType::Null] if number(b) => Ok(b.clone()),
        [DataType::Null, DataType::Null] => Ok(Int64),
        other => Err(bad_types("arithmetic", other)),
    }
}

/// Apply `f` to the operands as i64 or f64, NULL where it gives `None`,
/// and cast back to `out` (a value that no longer fits becomes NULL).
fn binary(
    a: &[ArrayRef],
    out: &DataType,
    int: fn(i64, i64) -> Option<i64>,
    float: fn(f64, f64) -> Option<f64>,
) -> DfResult<ArrayRef> {
    let result: ArrayRef = if out.is_floating() {
        let (x, y) = (cast_safe(&a[0], &Float64)?, cast_safe(&a[1], &Float64)?);
        let (x, y) = (
            x.as_primitive::<Float64Type>(),
            y.as_primitive::<Float64Type>(),
        );
        Arc::new(
            x.iter()
                .zip(y.iter())
                .map(|(x, y)| float(x?, y?))
                .collect::<Float64Array>(),
        )
    } else {
        let (x, y) = (cast_safe(&a[0], &Int64)?, cast_safe(&a[1], &Int64)?);
        let (x, y) = (x.as_primitive::<Int64Type>(), y.as_primitive::<Int64Type>());
        Arc::new(
            x.iter()
                .zip(y.iter())
                .map(|(x, y)| int(x?, y?))
                .collect::<Int64Array>(),
        )
    };
    cast_safe(&result, out)
}

fn div(a: &[ArrayRef], out: &DataType) -> DfResult<ArrayRef> {
    binary(a, out, i64::checked_div, |x, y| (y != 0.0).then(|| x / y))
}

fn modulo(a: &[ArrayRef], out: &DataType) -> DfResult<ArrayRef> {
    binary(a, out, i64::checked_rem, |x, y| (y != 0.0).then(|| x % y))
}

/// Apply `f` to one argument in floating point.
fn float_unary(a: &[ArrayRef], f: fn(f64) -> f64) -> DfResult<ArrayRef> {
    let x = cast_safe(&a[0], &Float64)?;
    Ok(Arc::new(
        x.as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(f))
            .collect::<Float64Array>(),
    ))
}

/// `abs(x)`: NULL for the one integer whose absolute value overflows.
fn abs(a: &[ArrayRef], out: &DataType) -> DfResult<ArrayRef> {
    if out.is_floating() {
        return float_unary(a, f64::abs);
    }
    let x = cast_safe(&a[0], &Int64)?;
    Ok(Arc::new(
        x.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.and_then(i64::checked_abs))
            .collect::<Int64Array>(),
    ))
}

/// `power(x, y)` in floating point (DataFusion's integer power fails on
/// overflow).
fn power(a: &[ArrayRef], _out: &DataType) -> DfResult<ArrayRef> {
    binary(a, &Float64, |_, _| None, |x, y| Some(x.powf(y)))
}

/// `sqrt(x)` in floating point: NaN for a negative number (DataFusion's
/// fails on negative integers and decimals).
fn sqrt(a: &[ArrayRef], _out: &DataType) -> DfResult<ArrayRef> {
    float_unary(a, f64::sqrt)
}

/// `substr(s, start [, length])` with SQL semantics for every integer:
/// characters from position `start` (1-based; positions before 1 count
/// towards the length) for `length` characters; a negative length gives
/// NULL.
fn substr(s: &str, start: i64, length: Option<i64>) -> Option<String> {
    let end = match length {
        Some(l) if l < 0 => return None,
        Some(l) => Some(start.saturating_add(l)),
        None => None,
    };
    let from = usize::try_from(start.max(1) - 1).unwrap_or(usize::MAX);
    let take = match end {
        Some(e) => usize::try_from((e - 1).max(0))
            .unwrap_or(usize::MAX)
            .saturating_sub(from),
        None => usize::MAX,
    };
    Some(s.chars().skip(from).take(take).collect())
}

fn substr_all(a: &[ArrayRef], _out: &DataType) -> DfResult<ArrayRef> {
    let s = cast_safe(&a[0], &Utf8)?;
    let s = s.as_string::<i32>();
    let start = cast_safe(&a[1], &Int64)?;
    let start = start.as_primitive::<Int64Type>();
    let length = a.get(2).map(|l| cast_safe(l, &Int64)).transpose()?;
    let length = length.as_ref().map(|l| l.as_primitive::<Int64Type>());
    let out: StringArray = (0..s.len())
        .map(|r| {
            if s.is_null(r) || start.is_null(r) {
                return None;
            }
            let len = match length {
                Some(l) if l.is_null(r) => return None,
                Some(l) => Some(l.value(r)),
                None => None,
            };
            substr(s.value(r), start.value(r), len)
        })
        .collect();
    Ok(Arc::new(out))
}

/// Days since 1970-01-01 of a calendar date, if it fits a Date32.
fn days(d: NaiveDate) -> Option<i32> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(d.signed_duration_since(epoch).num_days()).ok()
}

/// `to_date(text [, format, ...])`: ISO `YYYY-MM-DD` or the first of the
/// given chrono formats that parses; NULL if none does.
fn to_date(a: &[ArrayRef], _out: &DataType) -> DfResult<ArrayRef> {
    let texts: Vec<ArrayRef> = a
        .iter()
        .map(|x| cast_safe(x, &Utf8))
        .collect::<DfResult<_>>()?;
    let s = texts[0].as_string::<i32>();
    let formats: Vec<_> = texts[1..].iter().map(|f| f.as_string::<i32>()).collect();
    let out: Date32Array = (0..s.len())
        .map(|r| {
            let text = (!s.is_null(r)).then(|| s.value(r))?;
            if text.len() > MAX_PARSED_TEXT {
                return None;
            }
            let parsed = if formats.is_empty() {
                NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
            } else {
                formats.iter().find_map(|f| {
                    let f = (!f.is_null(r)).then(|| f.value(r))?;
                    (f.len() <= MAX_PARSED_TEXT).then(|| NaiveDate::parse_from_str(text, f).ok())?
                })
            };
            parsed.and_then(days)
        })
        .collect();
    Ok(Arc::new(out))
}

/// `make_date(year, month, day)`: NULL where the date does not exist.
fn make_date(a: &[ArrayRef], _out: &DataType) -> DfResult<ArrayRef> {
    let parts: Vec<ArrayRef> = a
        .iter()
        .map(|x| cast_safe(x, &Int64))
        .collect::<DfResult<_>>()?;
    let (y, m, d) = (
        parts[0].as_primitive::<Int64Type>(),
        parts[1].as_primitive::<Int64Type>(),
        parts[2].as_primitive::<Int64Type>(),
    );
    let out: Date32Array = (0..y.len())
        .map(|r| {
            if y.is_null(r) || m.is_null(r) || d.is_null(r) {
                return None;
            }
            let date = NaiveDate::from_ymd_opt(
                i32::try_from(y.value(r)).ok()?,
                u32::try_from(m.value(r)).ok()?,
                u32::try_from(d.value(r)).ok()?,
            )?;
            days(date)
        })
        .collect();
    Ok(Arc::new(out))
}
