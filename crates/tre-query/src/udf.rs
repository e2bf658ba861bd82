//! Every function tre adds to DataFusion, in one place: the internal ones
//! the rewrite inserts (never callable by a researcher: the compiler
//! refuses any function its allow-list in `compile/total.rs` does not
//! name, and these names are not in it), `clamp`, which researchers may
//! call, and the registration of all of them together with tre's total
//! versions of DataFusion's partial functions (`functions.rs`). Issue #12.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Float64Array, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
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

/// The functions only the rewrite inserts, by type rather than by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Internal {
    /// The sampling key used for random contribution bounding.
    Shuffle,
    /// A salted hash of group keys, for bounding groups per patient.
    GroupHash,
}

impl Internal {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Internal::Shuffle => "__tre_shuffle",
            Internal::GroupHash => "__tre_group_hash",
        }
    }

    /// The instance registered in `ctx` (seeded or not, as the sandbox
    /// made it).
    pub(crate) fn udf(self, ctx: &SessionContext) -> DfResult<Arc<ScalarUDF>> {
        ctx.udf(self.name())
    }
}

/// Register every function tre adds in `ctx`. `seed` (tests only) makes the
/// bounding sampler and the group hash functions of the row.
pub(crate) fn register(ctx: &SessionContext, seed: Option<u64>) {
    ctx.register_udf(ScalarUDF::from(Shuffle::new(seed)));
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
