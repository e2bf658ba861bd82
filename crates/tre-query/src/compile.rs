//! SQL → [`PrivatePlan`]: parse one statement, check the plan against the
//! policy, then rewrite it explicitly (this is not an optimizer rule):
//! every private table scan is replaced by a bounded scan (opt-outs removed,
//! at most `max_rows_per_unit` rows per patient kept at random), values are
//! clamped to their declared bounds in fixed point, each aggregate becomes
//! one or more noisy measurements with a sensitivity derived from the policy
//! alone, and epsilon is split across them. The result is verified before it
//! is returned: every released column passes through a mechanism and the
//! cost to be charged equals the cost computed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::provider_as_source;
use datafusion::execution::FunctionRegistry;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder,
    Operator, cast, lit, when,
};
use datafusion::prelude::{SessionContext, col};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use tre_core::{Code, Epsilon};
use tre_dp::{CONFIDENCE, DiscreteLaplace};
use tre_policy::{ColumnClass, ColumnPolicy, Policy, TablePolicy};

use crate::release::ReleaseColumn;
use crate::sandbox::SHUFFLE_UDF;
use crate::{Limits, QueryError};

/// Sums are computed over values clamped and scaled to this fixed-point
/// grid, as 64-bit integers, so that the sum's sensitivity is exact and no
/// floating-point rounding can change it (Casacuberta et al., 2022).
pub const FIXED_POINT_SCALE: f64 = 100.0;

/// Scalar functions a researcher may use in WHERE: deterministic and
/// row-local. Anything else is refused (TRE-Q020).
const ALLOWED_FUNCTIONS: &[&str] = &[
    "abs",
    "lower",
    "upper",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "length",
    "character_length",
    "char_length",
    "substr",
    "substring",
    "starts_with",
    "ends_with",
    "coalesce",
    "nullif",
    "date_trunc",
    "date_part",
    "datepart",
    "extract",
    "to_date",
    "concat",
    "strpos",
    "left",
    "right",
    "replace",
];

/// What one noisy measurement computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    CountRows,
    CountNonNull {
        column: String,
    },
    CountDistinctUnits,
    /// Sum of a numeric column clamped to `[lo, hi]`, in fixed point.
    Sum {
        column: String,
        lo: f64,
        hi: f64,
    },
}

#[derive(Debug)]
pub(crate) struct Measurement {
    pub(crate) measure: Measure,
    pub(crate) mechanism: DiscreteLaplace,
}

/// How a released column is produced from measurements.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    Key {
        index: usize,
    },
    Count {
        m: usize,
    },
    Sum {
        m: usize,
    },
    Avg {
        sum: usize,
        count: usize,
        lo: f64,
        hi: f64,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub(crate) name: String,
    pub(crate) kind: OutputKind,
    pub(crate) aggregate: &'static str,
}

#[derive(Debug, Clone)]
pub(crate) struct GroupKey {
    pub(crate) name: String,
    pub(crate) domain: Vec<String>,
}

/// A checked, rewritten query and its cost. Holds no data.
#[derive(Debug)]
pub struct PrivatePlan {
    pub(crate) sql: String,
    pub(crate) epsilon: Epsilon,
    pub(crate) plan_hash: String,
    pub(crate) exec: LogicalPlan,
    pub(crate) keys: Vec<GroupKey>,
    pub(crate) measurements: Vec<Measurement>,
    pub(crate) outputs: Vec<Output>,
    pub(crate) description: Vec<String>,
}

impl PrivatePlan {
    pub fn sql(&self) -> &str {
        &self.sql
    }
    /// The epsilon that will be charged.
    pub fn epsilon(&self) -> Epsilon {
        self.epsilon
    }
    pub fn plan_hash(&self) -> &str {
        &self.plan_hash
    }
    /// The accepted plan in words, for dry runs.
    pub fn description(&self) -> &[String] {
        &self.description
    }
    pub fn cells(&self) -> usize {
        self.keys.iter().map(|k| k.domain.len()).product()
    }
    pub fn measures(&self) -> Vec<(Measure, i64, f64)> {
        self.measurements
            .iter()
            .map(|m| {
                (
                    m.measure.clone(),
                    m.mechanism.sensitivity(),
                    m.mechanism.epsilon(),
                )
            })
            .collect()
    }
    /// The released columns with their mechanisms and noise scales.
    pub fn columns(&self) -> Vec<ReleaseColumn> {
        self.outputs
            .iter()
            .map(|o| {
                let (mechanism, scale) = match o.kind {
                    OutputKind::Key { .. } => (String::new(), 0.0),
                    OutputKind::Count { m } => (
                        "discrete Laplace".to_owned(),
                        self.measurements[m].mechanism.scale(),
                    ),
                    OutputKind::Sum { m } | OutputKind::Avg { sum: m, .. } => (
                        "discrete Laplace (fixed point)".to_owned(),
                        self.measurements[m].mechanism.scale() / FIXED_POINT_SCALE,
                    ),
                };
                ReleaseColumn {
                    name: o.name.clone(),
                    kind: o.aggregate.to_owned(),
                    mechanism,
                    noise_scale: scale,
                }
            })
            .collect()
    }
}

pub(crate) async fn compile(
    ctx: &SessionContext,
    policy: &Policy,
    limits: &Limits,
    sql: &str,
    epsilon: Epsilon,
) -> Result<PrivatePlan, QueryError> {
    let plan = parse(ctx, sql).await?;
    check_nodes(&plan)?;
    let (projection, agg) = top_shape(&plan)?;
    let mut scopes = Vec::new();
    let mut joins = Vec::new();
    let mut filters = Vec::new();
    walk_from(&agg.input, policy, &mut scopes, &mut joins, &mut filters)?;
    for f in &filters {
        check_filter(f, &scopes)?;
    }
    // Which group keys are released: an identifier there is an identifier
    // in the output (TRE-Q011), not merely a grouping (TRE-Q012).
    let released_keys: Vec<usize> = projection
        .expr
        .iter()
        .filter_map(|e| match unalias(e) {
            Expr::Column(c) => agg
                .schema
                .index_of_column(c)
                .ok()
                .filter(|i| *i < agg.group_expr.len()),
            _ => None,
        })
        .collect();
    let keys = group_keys(agg, &scopes, &released_keys)?;
    let cells = keys
        .iter()
        .try_fold(1usize, |acc, k| acc.checked_mul(k.domain.len()))
        .filter(|c| *c <= limits.max_cells)
        .ok_or_else(|| {
            QueryError::refused(
                Code::TooManyGroups,
                format!(
                    "the group keys multiply to more than {} cells; group by fewer or coarser columns",
                    limits.max_cells
                ),
            )
        })?;
    let k_total = scopes
        .iter()
        .try_fold(1i64, |acc, s| {
            acc.checked_mul(i64::from(s.table.max_rows_per_unit))
        })
        .ok_or_else(|| QueryError::Internal("row bound overflow".into()))?;

    // Aggregates → measures.
    let mut measures: Vec<(Measure, Expr, i64)> = Vec::new();
    let mut agg_outputs: Vec<(OutputKind, &'static str)> = Vec::new();
    for e in &agg.aggr_expr {
        let (kind, name) = aggregate(
            e,
            &scopes,
            &policy.privacy_unit,
            k_total,
            cells,
            &mut measures,
        )?;
        agg_outputs.push((kind, name));
    }
    if measures.is_empty() {
        return Err(QueryError::refused(
            Code::RowLevelSelect,
            "the query releases no aggregate; ask for COUNT(*), SUM or AVG",
        ));
    }

    // Projection → released columns.
    let mut outputs = Vec::new();
    for (i, e) in projection.expr.iter().enumerate() {
        let name = projection.schema.field(i).name().clone();
        let c = match unalias(e) {
            Expr::Column(c) => c,
            _ => {
                return Err(QueryError::refused(
                    Code::UnsupportedExpression,
                    format!(
                        "output column '{name}' is an expression; select group keys and aggregates as they are (arithmetic on released values comes later)"
                    ),
                ));
            }
        };
        let idx = agg.schema.index_of_column(c).map_err(|_| {
            QueryError::refused(
                Code::UnsupportedExpression,
                format!("output column '{name}' is not an aggregate or a group key"),
            )
        })?;
        let n_keys = agg.group_expr.len();
        let (kind, aggregate) = if idx < n_keys {
            (OutputKind::Key { index: idx }, "group_key")
        } else {
            agg_outputs[idx - n_keys].clone()
        };
        outputs.push(Output {
            name,
            kind,
            aggregate,
        });
    }

    // Rewrite.
    let m = measures.len();
    let eps_each =
        tre_dp::split_epsilon(epsilon, m).map_err(|e| QueryError::Internal(e.to_string()))?;
    let mut measurements = Vec::with_capacity(m);
    let mut measure_exprs = Vec::with_capacity(m);
    for (i, (measure, expr, sensitivity)) in measures.into_iter().enumerate() {
        let mechanism = DiscreteLaplace::new(sensitivity, eps_each)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        measure_exprs.push(expr.alias(format!("__m{i}")));
        measurements.push(Measurement { measure, mechanism });
    }
    let bounded_input = bound_scans(ctx, policy, &agg.input).await?;
    let exec = LogicalPlanBuilder::from(bounded_input)
        .aggregate(agg.group_expr.clone(), measure_exprs)
        .and_then(|b| b.build())
        .map_err(|e| QueryError::Internal(format!("building the private plan: {e}")))?;

    let plan_hash = {
        let text = format!("{}\nepsilon={}", exec.display_indent(), epsilon.as_nanos());
        hex_digest(text.as_bytes())
    };
    let mut plan = PrivatePlan {
        sql: sql.to_owned(),
        epsilon,
        plan_hash,
        exec,
        keys,
        measurements,
        outputs,
        description: Vec::new(),
    };
    verify(&plan, scopes.len())?;
    plan.description = describe(&plan, policy, &scopes, &joins, &filters, k_total);
    Ok(plan)
}

fn hex_digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

async fn parse(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan, QueryError> {
    let mut statements = DFParser::parse_sql(sql).map_err(|e| {
        QueryError::refused(Code::SqlSyntax, format!("the SQL does not parse: {e}"))
    })?;
    if statements.len() != 1 {
        return Err(QueryError::refused(
            Code::MultipleStatements,
            format!(
                "send exactly one SELECT statement, not {}",
                statements.len()
            ),
        ));
    }
    let Some(statement) = statements.pop_front() else {
        return Err(QueryError::refused(
            Code::MultipleStatements,
            "send exactly one SELECT statement",
        ));
    };
    match &statement {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_) => {}
            SqlStatement::Explain { .. } | SqlStatement::ExplainTable { .. } => {
                return Err(explain_refusal());
            }
            other => {
                let kind = other.to_string();
                let kind: String = kind
                    .split_whitespace()
                    .next()
                    .unwrap_or("this")
                    .to_uppercase();
                return Err(QueryError::refused(
                    Code::StatementNotAllowed,
                    format!(
                        "{kind} statements are not allowed; only SELECT queries that return aggregates are accepted"
                    ),
                ));
            }
        },
        DfStatement::Explain(_) => return Err(explain_refusal()),
        _ => {
            return Err(QueryError::refused(
                Code::StatementNotAllowed,
                "DDL, COPY and SET are not allowed; only SELECT queries that return aggregates are accepted",
            ));
        }
    }
    let plan = ctx
        .state()
        .statement_to_plan(statement)
        .await
        .map_err(|e| planning_refusal(&e.to_string()))?;
    // Belt and braces: DataFusion's own check for DDL/DML/statements.
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| {
            QueryError::refused(
                Code::StatementNotAllowed,
                "only SELECT queries are accepted",
            )
        })?;
    Ok(plan)
}

fn explain_refusal() -> QueryError {
    QueryError::refused(
        Code::ExplainNotAllowed,
        "EXPLAIN is not allowed (EXPLAIN ANALYZE would reveal row counts); use a dry run to see the accepted plan and its cost",
    )
}

/// Planning errors depend only on the schema and the SQL text, never on
/// data, so their substance may be shown.
fn planning_refusal(msg: &str) -> QueryError {
    let msg = msg.lines().next().unwrap_or_default();
    if msg.contains("table function") {
        return QueryError::refused(
            Code::TableFunction,
            "table functions (generate_series, range, read_parquet, ...) are not available; query the dataset's tables",
        );
    }
    if msg.contains("not found") && msg.contains("table") {
        let looks_like_path = msg.contains('/')
            || msg.contains('\\')
            || [".parquet", ".csv", ".json", ".arrow", ".avro"]
                .iter()
                .any(|x| msg.contains(x));
        return if looks_like_path {
            QueryError::refused(
                Code::FilePath,
                "files cannot be read from a query; use the dataset's tables (see `tre catalog`)",
            )
        } else {
            QueryError::refused(
                Code::UnknownTable,
                format!("{msg}; list the dataset's tables with the catalog service"),
            )
        };
    }
    QueryError::refused(
        Code::SqlSyntax,
        format!("the query cannot be planned: {msg}"),
    )
}

/// Refuse node types that are never allowed, anywhere, including inside
/// subqueries.
fn check_nodes(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut first = FirstRefusal::default();
    let unsupported = |what: &str| {
        QueryError::refused(
            Code::UnsupportedShape,
            format!(
                "{what} is not supported; write one SELECT with aggregates over a table or a join on person_id"
            ),
        )
    };
    let _ = plan.apply_with_subqueries(|node| {
        first.visit(match node {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some(explain_refusal()),
            LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::DescribeTable(_) => Some(QueryError::refused(
                Code::StatementNotAllowed,
                "only SELECT queries are accepted",
            )),
            LogicalPlan::Window(_) => Some(unsupported("a window function")),
            LogicalPlan::Union(_) => Some(unsupported("UNION / INTERSECT / EXCEPT")),
            LogicalPlan::RecursiveQuery(_) => Some(unsupported("a recursive query")),
            LogicalPlan::Subquery(_) => Some(unsupported("a subquery")),
            LogicalPlan::Unnest(_) => Some(unsupported("UNNEST")),
            LogicalPlan::Extension(_) => Some(unsupported("this operator")),
            LogicalPlan::Sort(_) => Some(unsupported("ORDER BY (for now)")),
            LogicalPlan::Limit(_) => Some(unsupported("LIMIT (for now)")),
            LogicalPlan::Distinct(_) => Some(unsupported("SELECT DISTINCT")),
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
                Some(unsupported("a query without a table"))
            }
            _ => None,
        })
    });
    first.into_result()
}

/// Collects the first refusal met while walking a plan or an expression and
/// stops the walk there.
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

fn top_shape(
    plan: &LogicalPlan,
) -> Result<(&datafusion::logical_expr::Projection, &Aggregate), QueryError> {
    let has_aggregate = plan
        .exists(|n| Ok(matches!(n, LogicalPlan::Aggregate(_))))
        .unwrap_or(false);
    if !has_aggregate {
        return Err(QueryError::refused(
            Code::RowLevelSelect,
            "row-level results cannot leave the environment; ask for aggregates such as COUNT(*), SUM(col) or AVG(col), optionally with GROUP BY",
        ));
    }
    if let LogicalPlan::Projection(p) = plan {
        match p.input.as_ref() {
            LogicalPlan::Aggregate(a) => return Ok((p, a)),
            LogicalPlan::Filter(_) => {
                return Err(QueryError::refused(
                    Code::UnsupportedShape,
                    "HAVING is not supported yet; filter rows with WHERE, or filter the released table yourself",
                ));
            }
            _ => {}
        }
    }
    Err(QueryError::refused(
        Code::UnsupportedShape,
        "aggregates must be computed in the outermost SELECT over a table or a join on person_id",
    ))
}

/// A private table as it appears in FROM, under its qualifier.
struct Scope<'p> {
    qualifier: TableReference,
    table: &'p TablePolicy,
}

fn walk_from<'p>(
    plan: &LogicalPlan,
    policy: &'p Policy,
    scopes: &mut Vec<Scope<'p>>,
    joins: &mut Vec<String>,
    filters: &mut Vec<Expr>,
) -> Result<(), QueryError> {
    match plan {
        LogicalPlan::Filter(f) => {
            filters.push(f.predicate.clone());
            walk_from(&f.input, policy, scopes, joins, filters)
        }
        LogicalPlan::SubqueryAlias(a) => match a.input.as_ref() {
            LogicalPlan::TableScan(s) => {
                scopes.push(Scope {
                    qualifier: a.alias.clone(),
                    table: table_policy(policy, s.table_name.table())?,
                });
                Ok(())
            }
            _ => Err(QueryError::refused(
                Code::UnsupportedShape,
                "subqueries and CTEs in FROM are not supported yet; aggregate directly over the tables",
            )),
        },
        LogicalPlan::TableScan(s) => {
            scopes.push(Scope {
                qualifier: s.table_name.clone(),
                table: table_policy(policy, s.table_name.table())?,
            });
            Ok(())
        }
        LogicalPlan::Join(j) => {
            if j.join_type != JoinType::Inner {
                return Err(QueryError::refused(
                    Code::UnsupportedJoin,
                    format!(
                        "{} joins are not supported yet; use an inner JOIN ... ON a.person_id = b.person_id",
                        j.join_type
                    ),
                ));
            }
            let before = scopes.len();
            walk_from(&j.left, policy, scopes, joins, filters)?;
            let mid = scopes.len();
            walk_from(&j.right, policy, scopes, joins, filters)?;
            let unit = &policy.privacy_unit;
            let mut conds: Vec<(Expr, Expr)> = j.on.clone();
            if let Some(f) = &j.filter {
                for c in split_and(f) {
                    match c {
                        Expr::BinaryExpr(BinaryExpr {
                            left,
                            op: Operator::Eq,
                            right,
                        }) => {
                            conds.push((left.as_ref().clone(), right.as_ref().clone()));
                        }
                        _ => return Err(join_refusal(unit)),
                    }
                }
            }
            if conds.is_empty() {
                return Err(join_refusal(unit));
            }
            let (left_q, right_q): (Vec<_>, Vec<_>) = (
                scopes[before..mid]
                    .iter()
                    .map(|s| s.qualifier.clone())
                    .collect(),
                scopes[mid..].iter().map(|s| s.qualifier.clone()).collect(),
            );
            let mut linked = false;
            for (l, r) in &conds {
                let (Expr::Column(l), Expr::Column(r)) = (unalias(l), unalias(r)) else {
                    return Err(join_refusal(unit));
                };
                if &l.name != unit || &r.name != unit {
                    return Err(join_refusal(unit));
                }
                let side = |c: &Column, qs: &[TableReference]| {
                    c.relation.as_ref().is_some_and(|q| qs.contains(q))
                };
                if (side(l, &left_q) && side(r, &right_q))
                    || (side(l, &right_q) && side(r, &left_q))
                {
                    linked = true;
                }
                joins.push(format!("{l} = {r}"));
            }
            if !linked {
                return Err(join_refusal(unit));
            }
            Ok(())
        }
        LogicalPlan::Projection(_) => Err(QueryError::refused(
            Code::UnsupportedShape,
            "subqueries and CTEs in FROM are not supported yet; aggregate directly over the tables",
        )),
        _ => Err(QueryError::refused(
            Code::UnsupportedShape,
            "this query shape is not supported; aggregate over one table or tables joined on person_id",
        )),
    }
}

fn join_refusal(unit: &str) -> QueryError {
    QueryError::refused(
        Code::JoinNotOnPrivacyUnit,
        format!(
            "joins must be on the privacy unit {unit}: write JOIN b ON a.{unit} = b.{unit} and nothing else in ON"
        ),
    )
}

fn table_policy<'p>(policy: &'p Policy, name: &str) -> Result<&'p TablePolicy, QueryError> {
    policy.table(name).ok_or_else(|| {
        QueryError::refused(
            Code::UnknownTable,
            format!("table '{name}' is not part of dataset '{}'", policy.dataset),
        )
    })
}

fn split_and(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_and(left);
            v.extend(split_and(right));
            v
        }
        other => vec![other],
    }
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

fn resolve<'p>(c: &Column, scopes: &[Scope<'p>]) -> Option<(&'p TablePolicy, &'p ColumnPolicy)> {
    let candidates = scopes.iter().filter(|s| match &c.relation {
        Some(q) => q == &s.qualifier,
        None => true,
    });
    candidates
        .filter_map(|s| s.table.column(&c.name).map(|col| (s.table, col)))
        .next()
}

fn check_filter(predicate: &Expr, scopes: &[Scope<'_>]) -> Result<(), QueryError> {
    let mut first = FirstRefusal::default();
    let _ = predicate.apply(|e| {
        first.visit(match e {
            Expr::Column(c) => match resolve(c, scopes) {
                Some((_, col)) if col.class == ColumnClass::Identifier => Some(QueryError::refused(
                    Code::IdentifierInFilter,
                    format!("WHERE may not use the identifier '{}'; filter on clinical or demographic columns", c.name),
                )),
                Some(_) => None,
                None => Some(QueryError::Internal(format!("unresolved column {c}"))),
            },
            Expr::ScalarFunction(f) => {
                let name = f.func.name().to_lowercase();
                (!ALLOWED_FUNCTIONS.contains(&name.as_str())).then(|| {
                    QueryError::refused(
                        Code::FunctionNotAllowed,
                        format!("function '{name}' is not allowed in a query; use deterministic row-level functions such as lower, coalesce or date_trunc"),
                    )
                })
            }
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) | Expr::OuterReferenceColumn(..) => {
                Some(QueryError::refused(Code::UnsupportedShape, "subqueries in WHERE are not supported"))
            }
            Expr::AggregateFunction(_) | Expr::WindowFunction(_) => Some(QueryError::refused(
                Code::UnsupportedShape,
                "aggregates and window functions cannot appear in WHERE",
            )),
            _ => None,
        })
    });
    first.into_result()
}

fn group_keys(
    agg: &Aggregate,
    scopes: &[Scope<'_>],
    released: &[usize],
) -> Result<Vec<GroupKey>, QueryError> {
    let mut keys = Vec::new();
    for (i, e) in agg.group_expr.iter().enumerate() {
        let Expr::Column(c) = unalias(e) else {
            return Err(QueryError::refused(
                Code::UnsupportedExpression,
                format!(
                    "GROUP BY {e} is an expression; group by columns with a public domain (expressions come later)"
                ),
            ));
        };
        let Some((table, col)) = resolve(c, scopes) else {
            return Err(QueryError::Internal(format!("unresolved group column {c}")));
        };
        match &col.class {
            ColumnClass::Identifier if released.contains(&i) => {
                return Err(QueryError::refused(
                    Code::IdentifierInOutput,
                    format!(
                        "the identifier '{}' can never be released; remove it from SELECT",
                        c.name
                    ),
                ));
            }
            ColumnClass::Identifier => {
                return Err(QueryError::refused(
                    Code::IdentifierInGroupBy,
                    format!(
                        "cannot GROUP BY the identifier '{}': that would release one row per patient",
                        c.name
                    ),
                ));
            }
            ColumnClass::Categorical {
                domain: Some(domain),
            } => keys.push(GroupKey {
                name: format!("{}.{}", table.name, col.name),
                domain: domain.clone(),
            }),
            _ => {
                return Err(QueryError::refused(
                    Code::GroupKeyNotPublic,
                    format!(
                        "'{}.{}' has no public domain, so its values cannot be released as group keys; group by a column with declared values (see the catalog), private key selection comes later",
                        table.name, col.name
                    ),
                ));
            }
        }
    }
    Ok(keys)
}

/// Map one aggregate call to its measures, pushing them onto `measures`.
fn aggregate(
    e: &Expr,
    scopes: &[Scope<'_>],
    unit: &str,
    k_total: i64,
    cells: usize,
    measures: &mut Vec<(Measure, Expr, i64)>,
) -> Result<(OutputKind, &'static str), QueryError> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(e) else {
        return Err(QueryError::refused(
            Code::UnsupportedAggregate,
            format!("{e} is not a supported aggregate"),
        ));
    };
    let name = func.name().to_lowercase();
    if params.filter.is_some() || !params.order_by.is_empty() {
        return Err(QueryError::refused(
            Code::UnsupportedAggregate,
            format!(
                "{name} with FILTER or ORDER BY is not supported; move the condition into WHERE"
            ),
        ));
    }
    let arg_col = |i: usize| -> Result<(&Column, &ColumnPolicy), QueryError> {
        match params.args.get(i).map(unalias) {
            Some(Expr::Column(c)) => resolve(c, scopes)
                .map(|(_, col)| (c, col))
                .ok_or_else(|| QueryError::Internal(format!("unresolved column {c}"))),
            _ => Err(QueryError::refused(
                Code::UnsupportedExpression,
                format!("{name}() takes a column here; expressions inside aggregates come later"),
            )),
        }
    };
    let mut push = |m: Measure, expr: Expr, s: i64| {
        measures.push((m, expr, s));
        measures.len() - 1
    };
    match name.as_str() {
        "count" => {
            let arg = params.args.first().map(unalias);
            match arg {
                None | Some(Expr::Literal(..)) if !params.distinct => {
                    let m = push(Measure::CountRows, count(lit(1i64)), k_total);
                    Ok((OutputKind::Count { m }, "count"))
                }
                _ => {
                    let (c, col) = arg_col(0)?;
                    if params.distinct {
                        if col.class == ColumnClass::Identifier && c.name == unit {
                            let s = k_total.min(i64::try_from(cells).unwrap_or(i64::MAX));
                            let m = push(
                                Measure::CountDistinctUnits,
                                count_distinct(Expr::Column(c.clone())),
                                s,
                            );
                            Ok((OutputKind::Count { m }, "count_distinct_units"))
                        } else {
                            Err(QueryError::refused(
                                Code::UnsupportedAggregate,
                                format!(
                                    "COUNT(DISTINCT {}) is not supported; COUNT(DISTINCT {unit}) counts patients",
                                    c.name
                                ),
                            ))
                        }
                    } else {
                        let m = push(
                            Measure::CountNonNull {
                                column: c.name.clone(),
                            },
                            count(Expr::Column(c.clone())),
                            k_total,
                        );
                        Ok((OutputKind::Count { m }, "count"))
                    }
                }
            }
        }
        "sum" | "avg" | "mean" => {
            if params.distinct {
                return Err(QueryError::refused(
                    Code::UnsupportedAggregate,
                    format!("{name}(DISTINCT ...) is not supported"),
                ));
            }
            let (c, col) = arg_col(0)?;
            let ColumnClass::Numeric { lo, hi } = col.class else {
                return Err(QueryError::refused(
                    Code::UnboundedColumn,
                    format!(
                        "{name}({}) needs a numeric column with declared bounds; '{}' is {}",
                        c.name,
                        c.name,
                        col.class.name()
                    ),
                ));
            };
            let bound = (lo.abs().max(hi.abs()) * FIXED_POINT_SCALE).ceil() as i64;
            let s = k_total.checked_mul(bound.max(1)).ok_or_else(|| {
                QueryError::refused(
                    Code::UnboundedColumn,
                    "the bounds are too wide to sum safely",
                )
            })?;
            let column = Expr::Column(c.clone());
            let as_float = cast(column.clone(), DataType::Float64);
            let clamped = when(as_float.clone().lt(lit(lo)), lit(lo))
                .when(as_float.clone().gt(lit(hi)), lit(hi))
                .otherwise(as_float)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            let fixed = cast(clamped * lit(FIXED_POINT_SCALE), DataType::Int64);
            let sm = push(
                Measure::Sum {
                    column: c.name.clone(),
                    lo,
                    hi,
                },
                sum(fixed),
                s,
            );
            if name == "sum" {
                Ok((OutputKind::Sum { m: sm }, "sum"))
            } else {
                let cm = push(
                    Measure::CountNonNull {
                        column: c.name.clone(),
                    },
                    count(column),
                    k_total,
                );
                Ok((
                    OutputKind::Avg {
                        sum: sm,
                        count: cm,
                        lo,
                        hi,
                    },
                    "avg",
                ))
            }
        }
        "min" | "max" => Err(QueryError::refused(
            Code::UnsupportedAggregate,
            format!(
                "{} is not released under differential privacy (one patient decides it); percentiles come later",
                name.to_uppercase()
            ),
        )),
        other => Err(QueryError::refused(
            Code::UnsupportedAggregate,
            format!(
                "aggregate '{other}' is not supported; use COUNT(*), COUNT(DISTINCT person_id), SUM or AVG"
            ),
        )),
    }
}

/// Replace every private table scan with its bounded version.
async fn bound_scans(
    ctx: &SessionContext,
    policy: &Policy,
    input: &LogicalPlan,
) -> Result<LogicalPlan, QueryError> {
    let internal =
        |e: datafusion::error::DataFusionError| QueryError::Internal(format!("bounding: {e}"));
    let mut providers: HashMap<String, Arc<dyn TableProvider>> = HashMap::new();
    for name in policy.tables.keys() {
        let p = ctx.table_provider(name.as_str()).await.map_err(internal)?;
        providers.insert(name.clone(), p);
    }
    let shuffle = ctx.udf(SHUFFLE_UDF).map_err(internal)?;
    let mut bounded: HashMap<String, LogicalPlan> = HashMap::new();
    for (name, table) in &policy.tables {
        bounded.insert(
            name.clone(),
            bounded_scan(policy, table, &providers, &shuffle).map_err(internal)?,
        );
    }
    input
        .clone()
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) => match bounded.get(scan.table_name.table()) {
                Some(plan) => Ok(Transformed::yes(plan.clone())),
                None => Err(datafusion::error::DataFusionError::Plan(format!(
                    "unknown table {}",
                    scan.table_name
                ))),
            },
            other => other.recompute_schema().map(Transformed::yes),
        })
        .map(|t| t.data)
        .map_err(internal)
}

fn bounded_scan(
    policy: &Policy,
    table: &TablePolicy,
    providers: &HashMap<String, Arc<dyn TableProvider>>,
    shuffle: &Arc<datafusion::logical_expr::ScalarUDF>,
) -> datafusion::error::Result<LogicalPlan> {
    let source = |name: &str| {
        providers
            .get(name)
            .map(|p| provider_as_source(Arc::clone(p)))
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Plan(format!("no provider for {name}"))
            })
    };
    let qcol = |t: &str, c: &str| Expr::Column(Column::new(Some(t), c));
    let unit = &policy.privacy_unit;
    let name = table.name.as_str();
    let scan = LogicalPlanBuilder::scan(name, source(name)?, None)?;
    let columns: Vec<Expr> = scan
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let mut b = scan;
    if let Some(opt) = &policy.opt_out {
        if opt.table == name {
            b = b.filter(qcol(name, &opt.column).eq(lit(false)))?;
        } else {
            let opted_in = LogicalPlanBuilder::scan(opt.table.as_str(), source(&opt.table)?, None)?
                .filter(qcol(&opt.table, &opt.column).eq(lit(false)))?
                .project(vec![qcol(&opt.table, unit).alias("__tre_opted_in")])?
                .build()?;
            b = b.join(
                opted_in,
                JoinType::LeftSemi,
                (
                    vec![Column::new(Some(name), unit.as_str())],
                    vec![Column::from_name("__tre_opted_in")],
                ),
                None,
            )?;
        }
    }
    let rn = row_number()
        .partition_by(vec![qcol(name, unit)])
        .order_by(vec![shuffle.call(vec![]).sort(true, false)])
        .build()?
        .alias("__tre_rn");
    b.window(vec![rn])?
        .filter(col("__tre_rn").lt_eq(lit(u64::from(table.max_rows_per_unit))))?
        .project(columns)?
        .alias(name)?
        .build()
}

/// The checks that make the rewrite trustworthy.
fn verify(plan: &PrivatePlan, scopes: usize) -> Result<(), QueryError> {
    let bug = |m: String| {
        Err(QueryError::Internal(format!(
            "private plan check failed: {m}"
        )))
    };
    let n = plan.measurements.len();
    let mut used = vec![false; n];
    for o in &plan.outputs {
        let ms: Vec<usize> = match o.kind {
            OutputKind::Key { index } => {
                if index >= plan.keys.len() {
                    return bug(format!("key output {} has no public domain", o.name));
                }
                vec![]
            }
            OutputKind::Count { m } | OutputKind::Sum { m } => vec![m],
            OutputKind::Avg { sum, count, .. } => vec![sum, count],
        };
        for m in ms {
            match used.get_mut(m) {
                Some(u) => *u = true,
                None => return bug(format!("output {} has no mechanism", o.name)),
            }
        }
    }
    if used.iter().any(|u| !u) {
        return bug("a measurement is charged but never released".into());
    }
    let charged: f64 = plan
        .measurements
        .iter()
        .map(|m| m.mechanism.epsilon())
        .sum();
    if charged > plan.epsilon.value() * (1.0 + 1e-9) {
        return bug(format!(
            "mechanisms cost {charged} but the plan charges {}",
            plan.epsilon
        ));
    }
    if plan.exec.schema().fields().len() != plan.keys.len() + n {
        return bug("the executed aggregate does not match keys and measurements".into());
    }
    let mut windows = 0;
    let _ = plan.exec.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::Window(_)) {
            windows += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if windows != scopes {
        return bug(format!("{scopes} private scans but {windows} bounded"));
    }
    Ok(())
}

fn describe(
    plan: &PrivatePlan,
    policy: &Policy,
    scopes: &[Scope<'_>],
    joins: &[String],
    filters: &[Expr],
    k_total: i64,
) -> Vec<String> {
    let mut d = Vec::new();
    for s in scopes {
        d.push(format!(
            "read {} as {}: at most {} row(s) per patient, chosen at random",
            s.table.name, s.qualifier, s.table.max_rows_per_unit
        ));
    }
    if let Some(o) = &policy.opt_out {
        d.push(format!(
            "remove patients who opted out ({}.{} = true) from every table",
            o.table, o.column
        ));
    }
    for j in joins {
        d.push(format!("join on {j}"));
    }
    for f in filters {
        d.push(format!("keep rows where {f}"));
    }
    d.push(format!(
        "each patient contributes at most {k_total} row(s) to the aggregate"
    ));
    if plan.keys.is_empty() {
        d.push("one cell (no GROUP BY)".into());
    } else {
        let keys: Vec<String> = plan
            .keys
            .iter()
            .map(|k| format!("{} ({} public values)", k.name, k.domain.len()))
            .collect();
        d.push(format!(
            "group by {}: {} cells, empty cells included",
            keys.join(" × "),
            plan.cells()
        ));
    }
    let alpha = 1.0 - CONFIDENCE;
    for m in &plan.measurements {
        let what = match &m.measure {
            Measure::CountRows => "COUNT(*)".to_owned(),
            Measure::CountNonNull { column } => format!("COUNT({column})"),
            Measure::CountDistinctUnits => format!("COUNT(DISTINCT {})", policy.privacy_unit),
            Measure::Sum { column, lo, hi } => format!("SUM({column}) clamped to [{lo}, {hi}]"),
        };
        let unit = if matches!(m.measure, Measure::Sum { .. }) {
            FIXED_POINT_SCALE
        } else {
            1.0
        };
        let hw = m.mechanism.half_width(alpha).unwrap_or(f64::NAN) / unit;
        d.push(format!(
            "measure {what}: discrete Laplace, sensitivity {}, epsilon {:.4}, scale {}, 95% interval ±{}",
            m.mechanism.sensitivity() as f64 / unit,
            m.mechanism.epsilon(),
            m.mechanism.scale() / unit,
            hw
        ));
    }
    d.push(format!("total cost: epsilon {}", plan.epsilon));
    d
}
