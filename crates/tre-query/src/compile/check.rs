//! Stage 2: node kinds, subqueries and post-processing windows that are
//! never allowed, anywhere in the plan.

use super::*;

/// Window functions that may post-process the noisy table (share of
/// total, ranks, running sums): they see released values only.
pub(super) const POST_WINDOW_FUNCTIONS: &[&str] = &[
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "first_value",
    "last_value",
];

/// Window nodes between the root and the release aggregate (by address):
/// they run over the noisy cells, so they are post-processing.
pub(super) fn post_windows(plan: &LogicalPlan) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = plan;
    loop {
        p = match p {
            LogicalPlan::Projection(x) => &x.input,
            LogicalPlan::Filter(x) => &x.input,
            LogicalPlan::Sort(x) => &x.input,
            LogicalPlan::Limit(x) => &x.input,
            LogicalPlan::SubqueryAlias(x) => &x.input,
            LogicalPlan::Window(x) => {
                out.push(std::ptr::from_ref(p) as usize);
                &x.input
            }
            // Only windows over an aggregate's output post-process noisy
            // values; windows over rows are refused.
            LogicalPlan::Aggregate(_) => return out,
            _ => return Vec::new(),
        };
    }
}

/// Refuse node kinds, functions and expressions that are never allowed,
/// anywhere, including inside subqueries: anything that could fail on
/// some value or cost unbounded work per row (see [`total`]).
pub(super) fn check_nodes(plan: &LogicalPlan, policy: &Policy) -> Result<(), QueryError> {
    let mut first = FirstRefusal::default();
    let unsupported = |what: &str| {
        refuse(
            Code::UnsupportedShape,
            format!(
                "{what} is not supported; aggregate over tables joined on person_id, with CTEs that keep person_id"
            ),
        )
    };
    let post = post_windows(plan);
    let _ = plan.apply_with_subqueries(|node| {
        let post_window = post.contains(&(std::ptr::from_ref(node) as usize));
        let refusal = match node {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some(explain_refusal()),
            LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::DescribeTable(_) => {
                Some(refuse(Code::StatementNotAllowed, "only SELECT queries are accepted"))
            }
            LogicalPlan::Window(_) if post_window => None,
            LogicalPlan::Window(_) => Some(unsupported(
                "a window function over rows (OVER ...) before aggregation",
            )),
            LogicalPlan::Union(_) => Some(unsupported("UNION / INTERSECT / EXCEPT")),
            LogicalPlan::RecursiveQuery(_) => Some(unsupported("a recursive CTE")),
            LogicalPlan::Unnest(_) => Some(unsupported("UNNEST")),
            LogicalPlan::Extension(_) => Some(unsupported("this operator")),
            LogicalPlan::Subquery(s) => subquery_refusal(&s.subquery, policy),
            _ => None,
        };
        let refusal = refusal.or_else(|| {
            let mut inner = FirstRefusal::default();
            let _ = node.apply_expressions(|e| {
                e.apply(|e| {
                    inner.visit(match e {
                        Expr::WindowFunction(w) if post_window => {
                            let name = w.fun.name().to_lowercase();
                            (!POST_WINDOW_FUNCTIONS.contains(&name.as_str())).then(|| {
                                refuse(
                                    Code::FunctionNotAllowed,
                                    format!(
                                        "window function '{name}' is not allowed over released values; use one of {}",
                                        POST_WINDOW_FUNCTIONS.join(", ")
                                    ),
                                )
                            })
                        }
                        Expr::WindowFunction(_) => Some(unsupported(
                            "a window function over rows (OVER ...) before aggregation",
                        )),
                        Expr::ScalarSubquery(s) => subquery_refusal(&s.subquery, policy),
                        Expr::Exists(s) => subquery_refusal(&s.subquery.subquery, policy),
                        Expr::InSubquery(s) => subquery_refusal(&s.subquery.subquery, policy),
                        other => total::check_name(other),
                    })
                })
            });
            inner.0
        });
        first.visit(refusal)
    });
    first.into_result()?;
    // Then, with every node and function known to be allowed, the rules
    // that make each call total and cheap (argument literals, types).
    total::check_totality(plan)
}

/// Subqueries in expressions may read only public reference tables, and
/// may not be correlated.
pub(super) fn subquery_refusal(plan: &LogicalPlan, policy: &Policy) -> Option<QueryError> {
    let mut private = false;
    let mut correlated = false;
    let _ = plan.apply_with_subqueries(|n| {
        if let LogicalPlan::TableScan(s) = n {
            private |= policy.table(&table_key(policy, &s.table_name)).is_some();
        }
        let _ = n.apply_expressions(|e| {
            e.apply(|e| {
                correlated |= matches!(e, Expr::OuterReferenceColumn(..));
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(TreeNodeRecursion::Continue)
    });
    (private || correlated).then(|| {
        refuse(
            Code::SubqueryNotAllowed,
            "subqueries in expressions (IN, EXISTS, scalar) may only read public reference tables and may not refer to the outer query; join the private table on person_id instead",
        )
    })
}

/// Collects the first refusal met while walking and stops the walk there.
#[derive(Default)]
struct FirstRefusal(Option<QueryError>);

impl FirstRefusal {
    fn visit(
        &mut self,
        refusal: Option<QueryError>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(match refusal {
            Some(e) => {
                self.0 = Some(e);
                TreeNodeRecursion::Stop
            }
            None => TreeNodeRecursion::Continue,
        })
    }

    fn into_result(self) -> Result<(), QueryError> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The same group key twice would make two output columns of one cell;
/// refuse it with a code rather than fail later.
pub(crate) fn refuse_duplicate_keys(keys: &[Expr]) -> Result<(), QueryError> {
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].iter().any(|j| unalias(j) == unalias(k)) {
            return Err(refuse(
                Code::DuplicateGroupKey,
                format!(
                    "the group key {} appears more than once; group by each key once",
                    unalias(k)
                ),
            ));
        }
    }
    Ok(())
}
