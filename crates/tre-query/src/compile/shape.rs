//! Stage 3: the release aggregate under the post-processing chain, the
//! final columns it feeds, and the privacy unit's column.

use super::*;

/// The first aggregate under the post-processing chain.
pub(super) fn release_aggregate(plan: &LogicalPlan) -> Result<&Aggregate, QueryError> {
    match plan {
        LogicalPlan::Aggregate(a) => Ok(a),
        LogicalPlan::Projection(p) => release_aggregate(&p.input),
        LogicalPlan::Filter(f) => release_aggregate(&f.input),
        LogicalPlan::Sort(s) => release_aggregate(&s.input),
        LogicalPlan::Limit(l) => release_aggregate(&l.input),
        LogicalPlan::SubqueryAlias(a) => release_aggregate(&a.input),
        LogicalPlan::Window(w) => release_aggregate(&w.input),
        _ => Err(refuse(
            Code::RowLevelSelect,
            "row-level results cannot leave the environment; ask for aggregates such as COUNT(*), SUM(col), AVG(col) or MEDIAN(col), optionally with GROUP BY",
        )),
    }
}

/// The release aggregate's output that column `i` of `plan` passes
/// through unchanged, if any.
pub(super) fn trace(plan: &LogicalPlan, i: usize) -> Option<usize> {
    match plan {
        LogicalPlan::Aggregate(_) => Some(i),
        LogicalPlan::Projection(p) => match unalias(p.expr.get(i)?) {
            Expr::Column(c) => trace(&p.input, p.input.schema().index_of_column(c).ok()?),
            _ => None,
        },
        LogicalPlan::Filter(f) => trace(&f.input, i),
        LogicalPlan::Sort(s) => trace(&s.input, i),
        LogicalPlan::Limit(l) => trace(&l.input, i),
        LogicalPlan::SubqueryAlias(a) => trace(&a.input, i),
        // A window node passes its input's columns through, then appends
        // its own (computed from released values).
        LogicalPlan::Window(w) if i < w.input.schema().fields().len() => trace(&w.input, i),
        _ => None,
    }
}

pub(super) fn unit_column(rel: &Rel, schema: &datafusion::common::DFSchema) -> Option<Column> {
    rel.cols
        .iter()
        .position(|c| *c == Info::Unit)
        .map(|i| Column::from(schema.qualified_field(i)))
}

/// The release's group keys, each with its public domain (released in
/// full) or none (chosen by DP key selection). An identifier is never a
/// key; one in SELECT is named as such.
pub(super) fn group_keys(
    agg: &Aggregate,
    input_schema: &datafusion::common::DFSchema,
    rel: &Rel,
    released_keys: &[usize],
) -> Result<Vec<GroupKey>, QueryError> {
    let mut keys = Vec::new();
    for (i, g) in agg.group_expr.iter().enumerate() {
        let name = agg.schema.field(i).name().clone();
        let bounds = match unalias(g) {
            Expr::Column(c) => match &rel.cols[index(input_schema, c)?] {
                Info::Unit | Info::Identifier if released_keys.contains(&i) => {
                    return Err(refuse(
                        Code::IdentifierInOutput,
                        format!("the identifier '{}' can never be released; remove it from SELECT", c.name),
                    ));
                }
                Info::Unit | Info::Identifier => {
                    return Err(refuse(
                        Code::IdentifierInGroupBy,
                        format!("cannot GROUP BY the identifier '{}': that would release one row per patient", c.name),
                    ));
                }
                Info::Value(b) => b.clone(),
            },
            other => expr_bounds(other, input_schema, rel).map_err(|e| match e {
                QueryError::Refused { code: Code::IdentifierInExpression, .. }
                    if released_keys.contains(&i) =>
                {
                    refuse(Code::IdentifierInOutput, format!("the group key {name} is computed from an identifier and can never be released"))
                }
                other => other,
            })?,
        };
        keys.push(GroupKey {
            name,
            domain: bounds.domain,
            distinct: bounds.distinct,
        });
    }
    Ok(keys)
}

/// How the release's cells are keyed: which keys DP key selection chooses,
/// how many groups a patient may count towards, and how many cells one
/// patient can touch (which bounds distinct-patient counts).
pub(super) struct KeyPlan {
    pub(super) selected: Vec<usize>,
    pub(super) max_groups: u64,
    pub(super) touchable: u64,
}

impl KeyPlan {
    /// Refuses too many public cells, and selected keys without a δ.
    pub(super) fn of(
        keys: &[GroupKey],
        policy: &Policy,
        limits: &Limits,
        k_total: u64,
        delta: Delta,
    ) -> Result<Self, QueryError> {
        let public_cells = keys
            .iter()
            .filter_map(|k| k.domain.as_ref().map(Vec::len))
            .try_fold(1usize, |a, n| a.checked_mul(n))
            .filter(|c| *c <= limits.max_cells)
            .ok_or_else(|| {
                refuse(
                    Code::TooManyGroups,
                    format!(
                        "the public group keys multiply to more than {} cells; group by fewer or coarser columns (e.g. date_trunc('month', d) or a CASE into bands)",
                        limits.max_cells
                    ),
                )
            })?;
        let selected: Vec<usize> = (0..keys.len())
            .filter(|i| keys[*i].domain.is_none())
            .collect();
        let max_groups = u64::from(policy.max_groups_per_unit).min(k_total);
        if !selected.is_empty() && delta.is_zero() {
            return Err(refuse(
                Code::KeySelectionNeedsDelta,
                format!(
                    "{} has no public domain, so its values must be chosen by DP key selection, which needs delta > 0; ask for a delta (e.g. 1e-7, at most {}) or group by a column with declared values",
                    selected
                        .iter()
                        .map(|i| keys[*i].name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    policy.budget.max_delta_per_query
                ),
            ));
        }
        // Cells one patient can touch, which bounds distinct-patient counts.
        let touchable = if selected.is_empty() {
            public_cells as u64
        } else {
            max_groups.saturating_mul(public_cells as u64)
        };
        Ok(KeyPlan {
            selected,
            max_groups,
            touchable,
        })
    }
}
