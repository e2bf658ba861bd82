//! MIN and MAX, released as private quantiles (issue #12): MIN as the
//! 0-quantile and MAX as the 1-quantile of the clamped value, by the same
//! OpenDP mechanism as MEDIAN, as Tumult Analytics does. One patient
//! decides an exact minimum, so no mechanism can release it closely: the
//! mechanism scores every candidate at or below the smallest value (for
//! MIN) alike, so the released value lies, with high probability, between
//! the value's lower bound and its true minimum (for MAX, between the true
//! maximum and the upper bound). Tighter bounds (`clamp(x, lo, hi)`) give
//! a tighter answer; a percentile such as 0.01 or 0.99 is usually the more
//! useful question, and dry runs say so.

use std::sync::Arc;

use super::quantile::draft;
use super::{Call, Compiled, Drafts, Family};

pub(super) const FAMILY: Family = Family {
    names: &["min", "max"],
    distinct: false,
    order_by: false,
    compile,
};

fn compile(call: &Call<'_>, drafts: &mut Drafts) -> Compiled {
    let a = call.required_arg()?;
    let (alpha, kind) = if call.name == "min" {
        (0.0, "min")
    } else {
        (1.0, "max")
    };
    Ok(Arc::new(draft(call, a, alpha, kind, drafts)?))
}
