//! Every function tre adds to DataFusion, and every function a researcher
//! may call, in one place (issue #12):
//! - the researcher-callable list (`FUNCTIONS`): each function a query may
//!   call, with the argument rules that make it total and cheap and the
//!   reason it cannot fail; the compiler (`compile/total.rs`) refuses any
//!   other function, and the catalog lists these;
//! - the internal functions the rewrite inserts (`Internal`), looked up by
//!   type and never callable: their names are not on the list;
//! - `clamp`, which researchers may call;
//! - the registration of all of them together with tre's total versions of
//!   DataFusion's partial functions (`functions.rs`).
//!
//! The test `the_callable_list_and_the_registry_agree` checks that every
//! listed function resolves in the sandbox and that no internal one is
//! listed.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{HashSet, ScalarValue};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use ring::rand::{SecureRandom, SystemRandom};

/// `clamp(expr, lo, hi)`: bounds a researcher can give where the compiler
/// cannot derive them.
pub(crate) const CLAMP_UDF: &str = "clamp";

// The researcher-callable list: every function a query may call, with
// the argument rules that make each one total. The compiler refuses any
// other function (`compile/total.rs` checks calls against it).

/// Longest text a literal argument (a pad, a replacement, a LIKE
/// pattern, a date format) may have.
pub(crate) const MAX_LITERAL_TEXT: usize = 256;
/// Largest length `lpad`/`rpad`/`left`/`right` may ask for.
pub(crate) const MAX_PAD: i64 = 1_000;

/// How an argument must look for the call to be total and cheap.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// Any value of an allowed type.
    Value,
    /// An integer literal within the bounds.
    Int(i64, i64),
    /// A non-null text literal of at most [`MAX_LITERAL_TEXT`] characters.
    Text,
    /// A text literal naming one of these date parts (any case).
    Part(&'static [&'static str]),
    /// A date or a timestamp (not an untyped NULL, which the date kernels
    /// reject).
    Temporal,
}

/// How long a function's text result can be, from its arguments' lengths.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Size {
    /// Not text.
    Value,
    /// At most `factor` times argument `i`.
    Arg(usize, f64),
    /// At most the longest argument.
    Longest,
    /// At most the sum of the arguments (separator repeated for concat_ws).
    Sum,
    /// At most the integer literal in argument `i`.
    Literal(usize),
    /// `replace(s, from, to)`.
    Replace,
}

/// One allow-listed function.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: &'static str,
    /// Positional argument rules; the last repeats for variadic functions.
    pub(crate) args: &'static [Arg],
    pub(crate) min_args: usize,
    pub(crate) max_args: usize,
    pub(crate) size: Size,
    /// Why no value of its arguments can make it fail.
    pub(crate) total_because: &'static str,
}

const TRUNC_PARTS: &[&str] = &[
    "year", "quarter", "month", "week", "day", "hour", "minute", "second",
];
const DATE_PARTS: &[&str] = &[
    "year", "quarter", "month", "week", "day", "dow", "doy", "isodow", "hour", "minute", "second",
];

const fn rule(
    name: &'static str,
    args: &'static [Arg],
    min_args: usize,
    max_args: usize,
    size: Size,
    total_because: &'static str,
) -> Rule {
    Rule {
        name,
        args,
        min_args,
        max_args,
        size,
        total_because,
    }
}

const FLOAT_MATH: &str = "floating-point arithmetic: NaN or infinity instead of an error; integers are cast to float first (TRY_CAST)";
const NO_ERROR_PATH: &str =
    "DataFusion's implementation has no error path for values of the allowed types";
const TRE_TOTAL: &str =
    "tre's own total implementation (crate::functions) returns NULL where DataFusion's would fail";

/// Every function a query may call. Anything else is refused (TRE-Q020).
pub(crate) const FUNCTIONS: &[Rule] = &[
    rule("abs", &[Arg::Value], 1, 1, Size::Value, TRE_TOTAL),
    rule(
        "round",
        &[Arg::Value, Arg::Int(-16, 16)],
        1,
        2,
        Size::Value,
        "the number of decimal places is a small literal",
    ),
    rule("floor", &[Arg::Value], 1, 1, Size::Value, NO_ERROR_PATH),
    rule("ceil", &[Arg::Value], 1, 1, Size::Value, NO_ERROR_PATH),
    rule(
        "trunc",
        &[Arg::Value, Arg::Int(-16, 16)],
        1,
        2,
        Size::Value,
        "the precision is a small literal",
    ),
    rule("sqrt", &[Arg::Value], 1, 1, Size::Value, TRE_TOTAL),
    rule("ln", &[Arg::Value], 1, 1, Size::Value, FLOAT_MATH),
    rule("log", &[Arg::Value], 1, 2, Size::Value, FLOAT_MATH),
    rule("log10", &[Arg::Value], 1, 1, Size::Value, FLOAT_MATH),
    rule("log2", &[Arg::Value], 1, 1, Size::Value, FLOAT_MATH),
    rule("exp", &[Arg::Value], 1, 1, Size::Value, FLOAT_MATH),
    rule("signum", &[Arg::Value], 1, 1, Size::Value, FLOAT_MATH),
    rule("power", &[Arg::Value], 2, 2, Size::Value, TRE_TOTAL),
    rule(
        "greatest",
        &[Arg::Value],
        1,
        32,
        Size::Longest,
        NO_ERROR_PATH,
    ),
    rule("least", &[Arg::Value], 1, 32, Size::Longest, NO_ERROR_PATH),
    rule("nanvl", &[Arg::Value], 2, 2, Size::Value, NO_ERROR_PATH),
    rule("isnan", &[Arg::Value], 1, 1, Size::Value, NO_ERROR_PATH),
    rule("iszero", &[Arg::Value], 1, 1, Size::Value, NO_ERROR_PATH),
    rule(
        CLAMP_UDF,
        &[Arg::Value],
        3,
        3,
        Size::Value,
        "tre's own clamp: NULL for NULL or NaN",
    ),
    rule(
        "coalesce",
        &[Arg::Value],
        1,
        32,
        Size::Longest,
        NO_ERROR_PATH,
    ),
    rule("nullif", &[Arg::Value], 2, 2, Size::Longest, NO_ERROR_PATH),
    rule("nvl", &[Arg::Value], 2, 2, Size::Longest, NO_ERROR_PATH),
    rule("ifnull", &[Arg::Value], 2, 2, Size::Longest, NO_ERROR_PATH),
    rule(
        "lower",
        &[Arg::Value],
        1,
        1,
        Size::Arg(0, 3.0),
        "Unicode case mapping of valid UTF-8",
    ),
    rule(
        "upper",
        &[Arg::Value],
        1,
        1,
        Size::Arg(0, 3.0),
        "Unicode case mapping of valid UTF-8",
    ),
    rule(
        "btrim",
        &[Arg::Value, Arg::Text],
        1,
        2,
        Size::Arg(0, 1.0),
        NO_ERROR_PATH,
    ),
    rule(
        "ltrim",
        &[Arg::Value, Arg::Text],
        1,
        2,
        Size::Arg(0, 1.0),
        NO_ERROR_PATH,
    ),
    rule(
        "rtrim",
        &[Arg::Value, Arg::Text],
        1,
        2,
        Size::Arg(0, 1.0),
        NO_ERROR_PATH,
    ),
    rule(
        "character_length",
        &[Arg::Value],
        1,
        1,
        Size::Value,
        NO_ERROR_PATH,
    ),
    rule("length", &[Arg::Value], 1, 1, Size::Value, NO_ERROR_PATH),
    rule("substr", &[Arg::Value], 2, 3, Size::Arg(0, 1.0), TRE_TOTAL),
    rule(
        "starts_with",
        &[Arg::Value],
        2,
        2,
        Size::Value,
        NO_ERROR_PATH,
    ),
    rule("ends_with", &[Arg::Value], 2, 2, Size::Value, NO_ERROR_PATH),
    rule("concat", &[Arg::Value], 1, 32, Size::Sum, NO_ERROR_PATH),
    rule("concat_ws", &[Arg::Value], 2, 32, Size::Sum, NO_ERROR_PATH),
    rule("strpos", &[Arg::Value], 2, 2, Size::Value, NO_ERROR_PATH),
    rule(
        "left",
        &[Arg::Value, Arg::Int(-MAX_PAD, MAX_PAD)],
        2,
        2,
        Size::Arg(0, 1.0),
        "the length is a literal within ±1000",
    ),
    rule(
        "right",
        &[Arg::Value, Arg::Int(-MAX_PAD, MAX_PAD)],
        2,
        2,
        Size::Arg(0, 1.0),
        "the length is a literal within ±1000",
    ),
    rule(
        "replace",
        &[Arg::Value, Arg::Text, Arg::Text],
        3,
        3,
        Size::Replace,
        "the pattern and the replacement are short literals",
    ),
    rule(
        "lpad",
        &[Arg::Value, Arg::Int(0, MAX_PAD), Arg::Text],
        2,
        3,
        Size::Literal(1),
        "the length is a literal in 0..=1000 and the fill a short literal",
    ),
    rule(
        "rpad",
        &[Arg::Value, Arg::Int(0, MAX_PAD), Arg::Text],
        2,
        3,
        Size::Literal(1),
        "the length is a literal in 0..=1000 and the fill a short literal",
    ),
    rule(
        "date_trunc",
        &[Arg::Part(TRUNC_PARTS), Arg::Temporal],
        2,
        2,
        Size::Value,
        "the unit is a literal from a fixed list; dates outside the timestamp range become NULL by TRY_CAST",
    ),
    rule(
        "date_part",
        &[Arg::Part(DATE_PARTS), Arg::Temporal],
        2,
        2,
        Size::Value,
        "the part is a literal from a fixed list",
    ),
    rule(
        "to_date",
        &[Arg::Value, Arg::Text],
        1,
        5,
        Size::Value,
        TRE_TOTAL,
    ),
    rule("make_date", &[Arg::Value], 3, 3, Size::Value, TRE_TOTAL),
];

/// A function a query may call, for the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionInfo {
    pub name: &'static str,
    /// The rule for each argument, in words; the last one repeats up to
    /// `max_args`.
    pub arguments: Vec<String>,
    pub min_args: usize,
    pub max_args: usize,
    pub total_because: &'static str,
}

impl FunctionInfo {
    /// e.g. `lpad(value; integer literal 0..=1000; text literal)`.
    pub fn signature(&self) -> String {
        let more = if self.max_args > self.arguments.len() {
            format!("; ... up to {} arguments", self.max_args)
        } else {
            String::new()
        };
        format!("{}({}{more})", self.name, self.arguments.join("; "))
    }
}

/// Every allow-listed function with its argument rules, for the catalog
/// and for the test that calls each on adversarial values.
pub fn functions() -> Vec<FunctionInfo> {
    FUNCTIONS
        .iter()
        .map(|r| FunctionInfo {
            name: r.name,
            arguments: r
                .args
                .iter()
                .take(r.max_args)
                .map(|a| match a {
                    Arg::Value => "value".to_owned(),
                    Arg::Int(lo, hi) => format!("integer literal {lo}..={hi}"),
                    Arg::Text => {
                        format!("text literal of at most {MAX_LITERAL_TEXT} characters")
                    }
                    Arg::Part(parts) => format!("one of '{}'", parts.join("', '")),
                    Arg::Temporal => "date or timestamp".to_owned(),
                })
                .collect(),
            min_args: r.min_args,
            max_args: r.max_args,
            total_because: r.total_because,
        })
        .collect()
}

/// The rule for a function, by the name DataFusion resolved it to (aliases
/// resolve to the canonical name).
pub(crate) fn function_rule(name: &str) -> Option<&'static Rule> {
    let name = match name {
        "pow" => "power",
        "substring" => "substr",
        "char_length" => "character_length",
        "datepart" => "date_part",
        "trim" => "btrim",
        other => other,
    };
    FUNCTIONS.iter().find(|r| r.name == name)
}

/// The functions only the rewrite inserts, by type rather than by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Internal {
    /// The sampling key used for random contribution bounding.
    Shuffle,
    /// A salted hash of group keys, for bounding groups per patient.
    GroupHash,
    /// Whether a patient may be used: not opted out (issue #13).
    Admitted,
}

impl Internal {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Internal::Shuffle => "__tre_shuffle",
            Internal::GroupHash => "__tre_group_hash",
            Internal::Admitted => "__tre_admitted",
        }
    }

    /// The instance registered in `ctx` (seeded or not, as the sandbox
    /// made it).
    pub(crate) fn udf(self, ctx: &SessionContext) -> DfResult<Arc<ScalarUDF>> {
        ctx.udf(self.name())
    }
}

/// Register every function tre adds in `ctx`. `seed` (tests only) makes the
/// bounding sampler and the group hash functions of the row; `opted_out`
/// are the patients every plan leaves out.
pub(crate) fn register(ctx: &SessionContext, seed: Option<u64>, opted_out: &OptedOut) {
    ctx.register_udf(ScalarUDF::from(Shuffle::new(seed)));
    ctx.register_udf(ScalarUDF::from(Admitted {
        signature: Signature::any(1, Volatility::Immutable),
        opted_out: opted_out.clone(),
    }));
    ctx.register_udf(ScalarUDF::from(GroupHash::new(seed)));
    ctx.register_udf(ScalarUDF::from(Clamp::new()));
    // Total versions of DataFusion's partial functions, under their
    // names: no accepted expression can fail on a value.
    for f in crate::functions::all() {
        ctx.register_udf(f);
    }
    // VARIANCE is the SQL-standard spelling of the sample variance.
    ctx.register_udaf(
        datafusion::functions_aggregate::variance::var_samp_udaf()
            .as_ref()
            .clone()
            .with_aliases(["variance"]),
    );
}

/// A per-row random key from the operating system's CSPRNG, used to pick
/// which of a patient's rows survive contribution bounding. Not callable by
/// researchers: the compiler refuses any function it does not allow.
///
/// With a seed (tests only) the key is a hash of the seed and the row, so
/// removing one patient leaves every other patient's choice unchanged.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Shuffle {
    signature: Signature,
    seed: Option<u64>,
}

impl Shuffle {
    fn new(seed: Option<u64>) -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Volatile),
            seed,
        }
    }
}

/// Hash row `row` of `arrays` after `seed`.
fn hash_row(seed: u64, arrays: &[ArrayRef], row: usize) -> DfResult<u64> {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    for a in arrays {
        ScalarValue::try_from_array(a, row)?.hash(&mut h);
    }
    Ok(h.finish())
}

impl ScalarUDFImpl for Shuffle {
    fn name(&self) -> &str {
        Internal::Shuffle.name()
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        if let Some(seed) = self.seed {
            let arrays = crate::functions::batch_arrays(&args)?;
            let values = (0..n)
                .map(|r| hash_row(seed, &arrays, r))
                .collect::<DfResult<Vec<u64>>>()?;
            return Ok(ColumnarValue::Array(Arc::new(UInt64Array::from(values))));
        }
        let mut bytes = vec![0u8; n * 8];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| DataFusionError::Execution("system random source failed".into()))?;
        let values: UInt64Array = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(values) as ArrayRef))
    }
}

/// `__tre_group_hash(salt, k1, k2, ...)`: the same for every row of a group
/// within one query, unpredictable across queries (the salt is random).
///
/// With a seed (tests only) the per-query salt is replaced by the seed.
#[derive(Debug, PartialEq, Eq, Hash)]
struct GroupHash {
    signature: Signature,
    seed: Option<u64>,
}

impl GroupHash {
    fn new(seed: Option<u64>) -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
            seed,
        }
    }
}

impl ScalarUDFImpl for GroupHash {
    fn name(&self) -> &str {
        Internal::GroupHash.name()
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = crate::functions::batch_arrays(&args)?;
        let arrays = match self.seed {
            Some(_) => arrays.get(1..).unwrap_or_default(),
            None => &arrays[..],
        };
        let seed = self.seed.unwrap_or(0);
        let values = (0..args.number_rows)
            .map(|r| hash_row(seed, arrays, r))
            .collect::<DfResult<Vec<u64>>>()?;
        Ok(ColumnarValue::Array(Arc::new(UInt64Array::from(values))))
    }
}

/// The patients who opted out, read once at start-up from the policy's
/// opt-out column: a set a small fraction the size of the patients table.
/// DataFusion's hash set (foldhash): its members are keyed pseudonyms, not
/// input an attacker chooses, and SipHash cost a third of a simple query's
/// time at 1M patients (issue #13).
#[derive(Debug, Clone, Default)]
pub(crate) struct OptedOut(pub(crate) Arc<HashSet<String>>);

/// `__tre_admitted(unit)`: false for a patient who opted out (or a NULL
/// unit). A hash lookup per row, where a semi-join against the patients
/// table used to build a table of every patient for every scan.
#[derive(Debug)]
struct Admitted {
    signature: Signature,
    opted_out: OptedOut,
}

// One instance per session; equal when they share the set.
impl PartialEq for Admitted {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.opted_out.0, &other.opted_out.0)
    }
}
impl Eq for Admitted {}
impl Hash for Admitted {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Internal::Admitted.name().hash(state);
        self.opted_out.0.len().hash(state);
    }
}

impl ScalarUDFImpl for Admitted {
    fn name(&self) -> &str {
        Internal::Admitted.name()
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = crate::functions::batch_arrays(&args)?;
        let Some(units) = arrays.first() else {
            return Err(DataFusionError::Internal(
                "__tre_admitted takes the unit".into(),
            ));
        };
        let set = &self.opted_out.0;
        let admitted = |unit: Option<&str>| unit.map(|u| !set.contains(u));
        let out: BooleanArray = if let Some(a) = units.as_string_opt::<i32>() {
            a.iter().map(admitted).collect()
        } else if let Some(a) = units.as_string_view_opt() {
            a.iter().map(admitted).collect()
        } else if let Some(a) = units.as_string_opt::<i64>() {
            a.iter().map(admitted).collect()
        } else {
            (0..units.len())
                .map(|r| {
                    let v = ScalarValue::try_from_array(units, r)?;
                    Ok((!v.is_null()).then(|| !set.contains(&v.to_string())))
                })
                .collect::<DfResult<BooleanArray>>()?
        };
        // NULL (no unit) is not admitted either: a filter keeps only true.
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `clamp(x, lo, hi)`: x limited to `[lo, hi]` (NULL and NaN give NULL).
/// Researchers use it to give bounds the compiler cannot derive.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Clamp {
    signature: Signature,
}

impl Clamp {
    fn new() -> Self {
        Self {
            signature: Signature::uniform(3, vec![DataType::Float64], Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Clamp {
    fn name(&self) -> &str {
        CLAMP_UDF
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = crate::functions::batch_arrays(&args)?;
        let f = |i: usize| {
            arrays[i]
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| DataFusionError::Execution("clamp takes numbers".into()))
        };
        let (x, lo, hi) = (f(0)?, f(1)?, f(2)?);
        let out: Float64Array = (0..args.number_rows)
            .map(|r| {
                if x.is_null(r) || lo.is_null(r) || hi.is_null(r) || x.value(r).is_nan() {
                    None
                } else {
                    Some(x.value(r).max(lo.value(r)).min(hi.value(r)))
                }
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
