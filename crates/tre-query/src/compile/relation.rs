//! What the compiler knows about a relation in FROM: which columns carry
//! the privacy unit, how many rows one patient can own, and for every other
//! column its public domain and value range as far as they can be derived
//! from the policy. Expressions propagate these facts (interval arithmetic,
//! CASE branches, and exact evaluation over small public domains).

use std::collections::HashMap;
use std::sync::Arc;

use super::table_key;

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt32Array, new_null_array};
use datafusion::arrow::compute::kernels::partition::partition;
use datafusion::arrow::compute::{sort, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::{Column, DFSchema, ScalarValue, TableReference};
use datafusion::logical_expr::expr::{AggregateFunction, Case};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{BinaryExpr, Expr, JoinType, LogicalPlan, Operator};
use datafusion::physical_expr::create_physical_expr;
use datafusion::physical_expr::execution_props::ExecutionProps;
use tre_core::Code;
use tre_policy::{ColumnClass, Policy};

use super::{refuse, unalias};
use crate::QueryError;
use crate::functions::{DIV_UDF, MOD_UDF};
use crate::reference::RefTables;
use crate::udf::CLAMP_UDF;

/// Integer and date columns with at most this many possible values have
/// an enumerable public domain.
const MAX_ENUMERATED_DOMAIN: f64 = 10_000.0;
/// Evaluate an expression over at most this many input combinations.
const MAX_EVALUATIONS: usize = 100_000;

/// What is known about one column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Info {
    /// The privacy unit itself (never null).
    Unit,
    /// Any other identifier, or the unit where it may be null: never usable.
    Identifier,
    Value(Bounds),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Bounds {
    /// Every non-null value the column can hold, when public and finite.
    pub(crate) domain: Option<Vec<ScalarValue>>,
    /// Numeric range; days since 1970-01-01 for dates.
    pub(crate) range: Option<(f64, f64)>,
    /// At most this many distinct non-null values: a column without a
    /// public domain whose extracts were written holding it to the
    /// policy's `max_distinct` (checked at start-up), passed through
    /// unchanged. Bounds the memory of grouping by it (issue #13).
    pub(crate) distinct: Option<u64>,
}

/// A relation in FROM.
#[derive(Debug, Clone)]
pub(crate) struct Rel {
    /// Aligned with the plan's schema.
    pub(crate) cols: Vec<Info>,
    /// Reads a private table.
    pub(crate) private: bool,
    /// Private: rows one patient can own. Public: total rows.
    pub(crate) max_rows: u64,
    /// Public relations: the most rows sharing one value of a column.
    pub(crate) max_dup: Vec<Option<u64>>,
}

pub(crate) struct Analyzer<'a> {
    pub(crate) policy: &'a Policy,
    pub(crate) reference: &'a RefTables,
    /// The accepted plan in words, for the dry run.
    pub(crate) notes: Vec<String>,
    pub(crate) private_scans: Vec<String>,
    /// Per-patient aggregates (by node address in the analysed plan) whose
    /// rows per patient were capped by their keys' domains: the keys, by
    /// position, and the domain each must be held to. Bounds are enforced,
    /// not trusted, so a value outside its declared domain becomes NULL.
    enforce: HashMap<usize, Vec<(usize, Vec<ScalarValue>)>>,
    /// The most rows one patient has in any private relation analysed.
    pub(crate) widest: u64,
    /// The most rows of any public relation analysed.
    pub(crate) largest_public: u64,
    /// Every name the privacy unit goes by in the relations analysed (a
    /// CTE may rename it): the memory bound treats a grouping by any of
    /// them as one group per patient.
    pub(crate) unit_names: std::collections::BTreeSet<String>,
    /// Every name a value column goes by.
    pub(crate) other_names: std::collections::BTreeSet<String>,
}

fn mul(a: u64, b: u64) -> Result<u64, QueryError> {
    a.checked_mul(b).ok_or_else(|| {
        refuse(
            Code::UnsupportedJoin,
            "these joins could multiply a patient's rows beyond any useful bound; join fewer tables",
        )
    })
}

impl<'a> Analyzer<'a> {
    pub(crate) fn new(policy: &'a Policy, reference: &'a RefTables) -> Self {
        Self {
            policy,
            reference,
            notes: Vec::new(),
            private_scans: Vec::new(),
            enforce: HashMap::new(),
            widest: 0,
            largest_public: 0,
            unit_names: std::collections::BTreeSet::new(),
            other_names: std::collections::BTreeSet::new(),
        }
    }

    /// The relation `plan` computes, remembering the widest (for the
    /// memory bound, `crate::memory`).
    pub(crate) fn rel(&mut self, plan: &LogicalPlan) -> Result<Rel, QueryError> {
        let rel = self.rel_of(plan)?;
        for (field, info) in plan.schema().fields().iter().zip(&rel.cols) {
            // A unit made nullable by an outer join is an identifier: it is
            // still no other column's name.
            match info {
                Info::Unit => {
                    self.unit_names.insert(field.name().clone());
                }
                Info::Value(_) => {
                    self.other_names.insert(field.name().clone());
                }
                Info::Identifier => {}
            }
        }
        if rel.private {
            self.widest = self.widest.max(rel.max_rows);
        } else {
            self.largest_public = self.largest_public.max(rel.max_rows);
        }
        Ok(rel)
    }

    fn rel_of(&mut self, plan: &LogicalPlan) -> Result<Rel, QueryError> {
        match plan {
            LogicalPlan::TableScan(scan) => self.scan(scan),
            LogicalPlan::SubqueryAlias(a) => self.rel(&a.input),
            LogicalPlan::Filter(f) => {
                let rel = self.rel(&f.input)?;
                check_no_identifiers(
                    &f.predicate,
                    f.input.schema(),
                    &rel,
                    Code::IdentifierInFilter,
                )?;
                self.notes.push(format!("keep rows where {}", f.predicate));
                Ok(rel)
            }
            LogicalPlan::Sort(s) if s.fetch.is_none() => self.rel(&s.input),
            LogicalPlan::Projection(p) => {
                let input = self.rel(&p.input)?;
                let mut cols = Vec::with_capacity(p.expr.len());
                let mut max_dup = Vec::with_capacity(p.expr.len());
                for e in &p.expr {
                    let (info, dup) = match unalias(e) {
                        Expr::Column(c) => {
                            let i = index(p.input.schema(), c)?;
                            (
                                input.cols[i].clone(),
                                input.max_dup.get(i).copied().flatten(),
                            )
                        }
                        other => (
                            Info::Value(expr_bounds(other, p.input.schema(), &input)?),
                            None,
                        ),
                    };
                    cols.push(info);
                    max_dup.push(dup);
                }
                Ok(Rel {
                    cols,
                    private: input.private,
                    max_rows: input.max_rows,
                    max_dup,
                })
            }
            LogicalPlan::Aggregate(a) => {
                let input = self.rel(&a.input)?;
                if !input.private {
                    return Ok(public_of(plan, input.max_rows));
                }
                let schema = a.input.schema();
                super::refuse_duplicate_keys(&a.group_expr)?;
                let mut cols = Vec::new();
                let mut has_unit = false;
                // Distinct key combinations one patient can have. NULL is a
                // group too: a key with a domain of n values takes n + 1.
                let mut other_groups = 1u64;
                let mut domains = Vec::new();
                for (i, g) in a.group_expr.iter().enumerate() {
                    let info = match unalias(g) {
                        Expr::Column(c) => input.cols[index(schema, c)?].clone(),
                        other => Info::Value(expr_bounds(other, schema, &input)?),
                    };
                    match &info {
                        Info::Unit => has_unit = true,
                        Info::Value(b) => {
                            let n = b
                                .domain
                                .as_ref()
                                .map_or(u64::MAX, |d| (d.len() as u64).saturating_add(1));
                            other_groups = other_groups.saturating_mul(n);
                            if let Some(d) = &b.domain {
                                domains.push((i, d.clone()));
                            }
                        }
                        Info::Identifier => {
                            return Err(refuse(
                                Code::IdentifierInGroupBy,
                                "a subquery may group by the privacy unit, but not by another identifier",
                            ));
                        }
                    }
                    cols.push(info);
                }
                if !has_unit {
                    return Err(refuse(
                        Code::UnsupportedShape,
                        format!(
                            "an aggregate inside FROM or a CTE must GROUP BY {unit} (one row per patient); aggregate across patients only in the outermost SELECT",
                            unit = self.policy.privacy_unit
                        ),
                    ));
                }
                let k = input.max_rows;
                for e in &a.aggr_expr {
                    cols.push(Info::Value(per_unit_aggregate(e, schema, &input, k)?));
                }
                self.notes.push(format!(
                    "derive one row per patient{}: {}",
                    if a.group_expr.len() > 1 {
                        " and group"
                    } else {
                        ""
                    },
                    a.aggr_expr
                        .iter()
                        .map(|e| e.schema_name().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                if other_groups < k {
                    // The cap relies on the keys' domains: enforce them.
                    self.enforce
                        .insert(std::ptr::from_ref(plan) as usize, domains);
                    self.notes.push(format!(
                        "at most {other_groups} row(s) per patient from the keys' public values (and NULL); values outside them count as NULL"
                    ));
                }
                let max_dup = vec![None; cols.len()];
                Ok(Rel {
                    cols,
                    private: true,
                    max_rows: k.min(other_groups),
                    max_dup,
                })
            }
            LogicalPlan::Distinct(d) => {
                let input = self.rel(d.input())?;
                Ok(Rel {
                    max_dup: vec![None; input.cols.len()],
                    ..input
                })
            }
            LogicalPlan::Join(j) => self.join(j),
            LogicalPlan::Limit(_) | LogicalPlan::Sort(_) => Err(refuse(
                Code::UnsupportedShape,
                "LIMIT inside FROM or a CTE picks rows by data; filter with WHERE instead and order or limit the released table",
            )),
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Err(refuse(
                Code::UnsupportedShape,
                "VALUES or a SELECT without FROM cannot be aggregated privately; query the dataset's tables",
            )),
            other => Err(refuse(
                Code::UnsupportedShape,
                format!(
                    "{} is not supported inside FROM; use tables, joins on the privacy unit, and CTEs that keep it",
                    other.display()
                ),
            )),
        }
    }

    /// `plan` (the one analysed) with the domains of capped per-patient
    /// keys enforced: each such key becomes `CASE WHEN k IN (domain) THEN
    /// k END`, under its old name.
    pub(crate) fn enforce_domains(&self, plan: &LogicalPlan) -> Result<LogicalPlan, QueryError> {
        if self.enforce.is_empty() {
            return Ok(plan.clone());
        }
        let internal = |e: datafusion::error::DataFusionError| {
            QueryError::Internal(format!("enforcing key domains: {e}"))
        };
        let inputs = plan
            .inputs()
            .into_iter()
            .map(|p| self.enforce_domains(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut exprs = plan.expressions();
        if let Some(keys) = self.enforce.get(&(std::ptr::from_ref(plan) as usize)) {
            for (i, domain) in keys {
                let Some(g) = exprs.get_mut(*i) else {
                    return Err(QueryError::Internal("enforced key out of range".into()));
                };
                let (relation, name) = g.qualified_name();
                let k = unalias(g).clone();
                let allowed = domain
                    .iter()
                    .map(|v| Expr::Literal(v.clone(), None))
                    .collect();
                *g = datafusion::logical_expr::when(k.clone().in_list(allowed, false), k)
                    .end()
                    .map_err(internal)?
                    .alias_qualified(relation, name);
            }
        }
        plan.with_new_exprs(exprs, inputs).map_err(internal)
    }

    fn scan(&mut self, scan: &datafusion::logical_expr::TableScan) -> Result<Rel, QueryError> {
        let name = table_key(self.policy, &scan.table_name);
        let name = name.as_str();
        let schema = &scan.projected_schema;
        if let Some(table) = self.policy.table(name) {
            let unit = &self.policy.privacy_unit;
            let mut cols = Vec::new();
            for (_, field) in schema.iter() {
                let col = table.column(field.name()).ok_or_else(|| {
                    QueryError::Internal(format!("column {name}.{} not in policy", field.name()))
                })?;
                cols.push(column_info(
                    &col.class,
                    col.max_distinct,
                    field.name() == unit,
                    field.data_type(),
                ));
            }
            self.private_scans.push(format!(
                "read {name}: at most {} row(s) per patient, chosen at random",
                table.max_rows_per_unit
            ));
            return Ok(Rel {
                max_dup: vec![None; cols.len()],
                cols,
                private: true,
                max_rows: u64::from(table.max_rows_per_unit),
            });
        }
        let Some(r) = self.reference.get(name) else {
            return Err(refuse(
                Code::UnknownTable,
                format!(
                    "table '{name}' is not part of dataset '{}'",
                    self.policy.dataset
                ),
            ));
        };
        let mut cols = Vec::new();
        let mut max_dup = Vec::new();
        for (_, field) in schema.iter() {
            let c = r.columns.get(field.name()).ok_or_else(|| {
                QueryError::Internal(format!("column {name}.{} missing", field.name()))
            })?;
            let range = numeric_range(&c.domain);
            cols.push(Info::Value(Bounds {
                domain: Some(c.domain.clone()),
                range,
                distinct: None,
            }));
            max_dup.push(Some(c.max_dup));
        }
        self.notes.push(format!(
            "read public reference table {name} ({} rows)",
            r.rows
        ));
        Ok(Rel {
            cols,
            private: false,
            max_rows: r.rows,
            max_dup,
        })
    }

    fn join(&mut self, j: &datafusion::logical_expr::Join) -> Result<Rel, QueryError> {
        let unit = self.policy.privacy_unit.clone();
        let left = self.rel(&j.left)?;
        let right = self.rel(&j.right)?;
        let (ls, rs) = (j.left.schema(), j.right.schema());
        if j.on.is_empty() && j.filter.is_none() {
            return Err(refuse(
                Code::CrossJoin,
                format!(
                    "cross joins (and FROM a, b) could multiply each patient's rows; write JOIN b ON a.{unit} = b.{unit}"
                ),
            ));
        }
        match j.join_type {
            JoinType::Inner => {}
            JoinType::Left if left.private || !right.private => {}
            JoinType::Left => {
                return Err(refuse(
                    Code::UnsupportedJoin,
                    "a LEFT JOIN must keep the private side on the left; put the reference table on the right",
                ));
            }
            other => {
                return Err(refuse(
                    Code::UnsupportedJoin,
                    format!("{other} joins are not supported; use JOIN or LEFT JOIN"),
                ));
            }
        }
        // The SQL planner leaves ON in the join filter; split it into
        // equalities between the two sides and other conditions.
        let mut pairs: Vec<(Expr, Expr)> = j.on.clone();
        let mut rest: Vec<Expr> = Vec::new();
        if let Some(f) = &j.filter {
            for c in split_and(f) {
                if let Expr::BinaryExpr(BinaryExpr {
                    left: l,
                    op: Operator::Eq,
                    right: r,
                }) = c
                {
                    let side = |e: &Expr, s: &DFSchema| match unalias(e) {
                        Expr::Column(c) => s.index_of_column(c).is_ok(),
                        _ => false,
                    };
                    if side(l, ls) && side(r, rs) {
                        pairs.push((l.as_ref().clone(), r.as_ref().clone()));
                        continue;
                    }
                    if side(l, rs) && side(r, ls) {
                        pairs.push((r.as_ref().clone(), l.as_ref().clone()));
                        continue;
                    }
                }
                rest.push(c.clone());
            }
        }
        let mut linked = false;
        let mut on_pairs = Vec::new();
        for (l, r) in &pairs {
            let li = col_info(l, ls, &left);
            let ri = col_info(r, rs, &right);
            match (li, ri) {
                (Some(Info::Unit), Some(Info::Unit)) => linked = true,
                (Some(Info::Unit | Info::Identifier), _)
                | (_, Some(Info::Unit | Info::Identifier)) => {
                    return Err(join_refusal(&unit));
                }
                _ => {
                    check_no_identifiers(l, ls, &left, Code::JoinNotOnPrivacyUnit)?;
                    check_no_identifiers(r, rs, &right, Code::JoinNotOnPrivacyUnit)?;
                }
            }
            on_pairs.push((l, r));
        }
        let mut cols: Vec<Info> = left.cols.clone();
        let right_cols: Vec<Info> = match j.join_type {
            // The right side's unit is null where nothing matched: it can no
            // longer stand for a patient.
            JoinType::Left => right
                .cols
                .iter()
                .map(|c| {
                    if *c == Info::Unit {
                        Info::Identifier
                    } else {
                        c.clone()
                    }
                })
                .collect(),
            _ => right.cols.clone(),
        };
        cols.extend(right_cols);
        let rel_for_filter = Rel {
            cols: cols.clone(),
            private: left.private || right.private,
            max_rows: 0,
            max_dup: vec![None; cols.len()],
        };
        for f in &rest {
            check_no_identifiers(f, &j.schema, &rel_for_filter, Code::JoinNotOnPrivacyUnit)?;
        }
        let on_text = pairs
            .iter()
            .map(|(l, r)| format!("{l} = {r}"))
            .chain(rest.iter().map(|f| f.to_string()))
            .collect::<Vec<_>>()
            .join(" AND ");
        let kind = if j.join_type == JoinType::Left {
            "left join"
        } else {
            "join"
        };
        let max_rows = match (left.private, right.private) {
            (true, true) => {
                if !linked {
                    return Err(join_refusal(&unit));
                }
                mul(left.max_rows, right.max_rows)?
            }
            (true, false) | (false, true) => {
                let (private, public, public_schema, public_is_right) = if left.private {
                    (&left, &right, rs, true)
                } else {
                    (&right, &left, ls, false)
                };
                // Each private row meets at most this many public rows.
                let mut fanout = public.max_rows;
                for (l, r) in &on_pairs {
                    let e = if public_is_right { r } else { l };
                    if let Expr::Column(c) = unalias(e)
                        && let Some(Some(d)) = public.max_dup.get(index(public_schema, c)?)
                    {
                        fanout = fanout.min((*d).max(1));
                    }
                }
                self.notes.push(format!(
                    "each private row matches at most {fanout} reference row(s)"
                ));
                mul(private.max_rows, fanout)?
            }
            (false, false) => mul(left.max_rows, right.max_rows)?,
        };
        self.notes.push(format!("{kind} on {on_text}"));
        Ok(Rel {
            max_dup: vec![None; cols.len()],
            cols,
            private: left.private || right.private,
            max_rows,
        })
    }
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

fn join_refusal(unit: &str) -> QueryError {
    refuse(
        Code::JoinNotOnPrivacyUnit,
        format!(
            "private tables must be joined on the privacy unit {unit}: write JOIN b ON a.{unit} = b.{unit}; other identifiers cannot appear in ON"
        ),
    )
}

/// A public relation derived from reference tables by grouping.
fn public_of(plan: &LogicalPlan, rows: u64) -> Rel {
    let n = plan.schema().fields().len();
    Rel {
        cols: vec![Info::Value(Bounds::default()); n],
        private: false,
        max_rows: rows,
        max_dup: vec![None; n],
    }
}

pub(crate) fn index(schema: &DFSchema, c: &Column) -> Result<usize, QueryError> {
    schema
        .index_of_column(c)
        .map_err(|_| QueryError::Internal(format!("unresolved column {c}")))
}

fn col_info<'r>(e: &Expr, schema: &DFSchema, rel: &'r Rel) -> Option<&'r Info> {
    match unalias(e) {
        Expr::Column(c) => schema.index_of_column(c).ok().and_then(|i| rel.cols.get(i)),
        _ => None,
    }
}

/// The facts a policy column class gives.
pub(crate) fn column_info(
    class: &ColumnClass,
    max_distinct: Option<u64>,
    is_unit: bool,
    dt: &DataType,
) -> Info {
    match class {
        ColumnClass::Identifier if is_unit => Info::Unit,
        ColumnClass::Identifier => Info::Identifier,
        ColumnClass::Categorical { domain } => Info::Value(Bounds {
            domain: domain.as_ref().map(|d| {
                d.iter()
                    .filter_map(|v| ScalarValue::Utf8(Some(v.clone())).cast_to(dt).ok())
                    .collect()
            }),
            range: None,
            distinct: max_distinct,
        }),
        ColumnClass::Numeric { lo, hi } => {
            let domain = (dt.is_integer() && hi - lo <= MAX_ENUMERATED_DOMAIN).then(|| {
                let (lo, hi) = (lo.ceil() as i64, hi.floor() as i64);
                (lo..=hi)
                    .filter_map(|v| ScalarValue::Int64(Some(v)).cast_to(dt).ok())
                    .collect()
            });
            Info::Value(Bounds {
                domain,
                range: Some((*lo, *hi)),
                distinct: None,
            })
        }
        ColumnClass::Date { lo, hi } => Info::Value(Bounds {
            domain: (f64::from(hi - lo) <= MAX_ENUMERATED_DOMAIN)
                .then(|| (*lo..=*hi).map(|d| ScalarValue::Date32(Some(d))).collect()),
            range: Some((f64::from(*lo), f64::from(*hi))),
            distinct: None,
        }),
    }
}

/// Refuse an expression that mentions an identifier (the unit included):
/// `CASE WHEN person_id = 42 ...` would single a patient out.
pub(crate) fn check_no_identifiers(
    e: &Expr,
    schema: &DFSchema,
    rel: &Rel,
    code: Code,
) -> Result<(), QueryError> {
    for c in e.column_refs() {
        let Ok(i) = schema.index_of_column(c) else {
            // Outer references and subquery columns are checked elsewhere.
            continue;
        };
        if matches!(rel.cols.get(i), Some(Info::Unit | Info::Identifier)) {
            let what = match code {
                Code::IdentifierInFilter => "filter on",
                Code::JoinNotOnPrivacyUnit => "join on",
                _ => "use",
            };
            return Err(refuse(
                code,
                format!(
                    "cannot {what} the identifier '{}' here: identifiers may only link tables (a.{u} = b.{u}), be grouped on inside a per-patient CTE, or be counted with COUNT(DISTINCT {u})",
                    c.name,
                    u = "person_id"
                ),
            ));
        }
    }
    Ok(())
}

/// Domain and range of an expression over a relation's columns.
pub(crate) fn expr_bounds(e: &Expr, schema: &DFSchema, rel: &Rel) -> Result<Bounds, QueryError> {
    check_no_identifiers(e, schema, rel, Code::IdentifierInExpression)?;
    let mut b = Bounds {
        domain: domain_of(e, schema, rel),
        range: range_of(e, schema, rel),
        distinct: match col_info(e, schema, rel) {
            Some(Info::Value(b)) => b.distinct,
            _ => None,
        },
    };
    if (b.domain.is_none() || b.range.is_none())
        && let Some(values) = evaluate(e, schema, rel)
    {
        if b.range.is_none() {
            b.range = numeric_range(&values);
        }
        if b.domain.is_none() {
            b.domain = Some(values);
        }
    }
    Ok(b)
}

/// The value range of `e` alone, as [`expr_bounds`] would give it, without
/// enumerating a domain where interval arithmetic already gives the range:
/// what clamping and sensitivities need (issue #13: enumerating 38k date
/// combinations for an AVG's range was half of its compile).
pub(crate) fn expr_range(
    e: &Expr,
    schema: &DFSchema,
    rel: &Rel,
) -> Result<Option<(f64, f64)>, QueryError> {
    check_no_identifiers(e, schema, rel, Code::IdentifierInExpression)?;
    if let Some(r) = range_of(e, schema, rel) {
        return Ok(Some(r));
    }
    Ok(evaluate(e, schema, rel).and_then(|values| numeric_range(&values)))
}

fn domain_of(e: &Expr, schema: &DFSchema, rel: &Rel) -> Option<Vec<ScalarValue>> {
    match e {
        Expr::Alias(a) => domain_of(&a.expr, schema, rel),
        Expr::Column(c) => match rel.cols.get(schema.index_of_column(c).ok()?)? {
            Info::Value(b) => b.domain.clone(),
            _ => None,
        },
        Expr::Literal(v, _) if !v.is_null() => Some(vec![v.clone()]),
        Expr::Case(Case {
            when_then_expr,
            else_expr,
            ..
        }) => {
            let mut out: Vec<ScalarValue> = Vec::new();
            for t in non_null(
                when_then_expr
                    .iter()
                    .map(|(_, t)| t.as_ref())
                    .chain(else_expr.as_deref()),
            ) {
                for v in domain_of(t, schema, rel)? {
                    if !out.contains(&v) {
                        out.push(v);
                    }
                }
            }
            Some(out)
        }
        _ => None,
    }
}

fn lit_f64(e: &Expr) -> Option<f64> {
    match unalias(e) {
        Expr::Literal(v, _) => scalar_f64(v),
        Expr::Cast(c) => lit_f64(&c.expr),
        Expr::TryCast(c) => lit_f64(&c.expr),
        Expr::Negative(x) => lit_f64(x).map(|v| -v),
        _ => None,
    }
}

pub(crate) fn scalar_f64(v: &ScalarValue) -> Option<f64> {
    match v {
        ScalarValue::Date32(Some(d)) => Some(f64::from(*d)),
        ScalarValue::Boolean(Some(b)) => Some(f64::from(u8::from(*b))),
        v if v.data_type().is_numeric() => match v.cast_to(&DataType::Float64).ok()? {
            ScalarValue::Float64(Some(f)) if f.is_finite() => Some(f),
            _ => None,
        },
        _ => None,
    }
}

fn numeric_range(values: &[ScalarValue]) -> Option<(f64, f64)> {
    let nums: Vec<f64> = values.iter().map(scalar_f64).collect::<Option<_>>()?;
    let lo = nums.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = nums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo <= hi).then_some((lo, hi))
}

/// Branches or arguments other than a literal NULL (which adds no value).
fn non_null<'e>(exprs: impl Iterator<Item = &'e Expr>) -> impl Iterator<Item = &'e Expr> {
    exprs.filter(|e| !matches!(unalias(e), Expr::Literal(v, _) if v.is_null()))
}

/// The smallest range holding every expression's range; `None` if any has
/// none, or there are none.
fn hull_of<'e>(
    exprs: impl Iterator<Item = &'e Expr>,
    range: impl Fn(&Expr) -> Option<(f64, f64)>,
) -> Option<(f64, f64)> {
    let mut acc: Option<(f64, f64)> = None;
    for e in exprs {
        let (lo, hi) = range(e)?;
        acc = Some(acc.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
    }
    acc
}

fn range_of(e: &Expr, schema: &DFSchema, rel: &Rel) -> Option<(f64, f64)> {
    let r = |x: &Expr| range_of(x, schema, rel);
    let out = match e {
        Expr::Alias(a) => r(&a.expr)?,
        Expr::Column(c) => match rel.cols.get(schema.index_of_column(c).ok()?)? {
            Info::Value(b) => b.range?,
            _ => return None,
        },
        Expr::Literal(v, _) => {
            let f = scalar_f64(v)?;
            (f, f)
        }
        Expr::Negative(x) => {
            let (lo, hi) = r(x)?;
            (-hi, -lo)
        }
        Expr::Cast(c) if c.field.data_type().is_numeric() => {
            widen_if_integer(r(&c.expr)?, c.field.data_type())
        }
        Expr::TryCast(c) if c.field.data_type().is_numeric() => {
            widen_if_integer(r(&c.expr)?, c.field.data_type())
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Plus => {
                let (a, b) = (r(left)?, r(right)?);
                (a.0 + b.0, a.1 + b.1)
            }
            Operator::Minus => {
                let (a, b) = (r(left)?, r(right)?);
                (a.0 - b.1, a.1 - b.0)
            }
            Operator::Multiply => {
                let (a, b) = (r(left)?, r(right)?);
                let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                (
                    p.iter().copied().fold(f64::INFINITY, f64::min),
                    p.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                )
            }
            Operator::Divide => divide_range(r(left)?, r(right)?)?,
            Operator::Modulo => modulo_range(r(left)?, right)?,
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::And
            | Operator::Or
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom => (0.0, 1.0),
            _ => return None,
        },
        Expr::Not(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::Between(_)
        | Expr::InList(_)
        | Expr::Like(_) => (0.0, 1.0),
        Expr::Case(Case {
            when_then_expr,
            else_expr,
            ..
        }) => {
            let branches = when_then_expr.iter().map(|(_, t)| t.as_ref());
            hull_of(non_null(branches.chain(else_expr.as_deref())), r)?
        }
        Expr::ScalarFunction(f) => {
            let name = f.func.name();
            let args = &f.args;
            match name {
                n if n == CLAMP_UDF => (lit_f64(args.get(1)?)?, lit_f64(args.get(2)?)?),
                n if n == DIV_UDF => divide_range(r(args.first()?)?, r(args.get(1)?)?)?,
                n if n == MOD_UDF => modulo_range(r(args.first()?)?, args.get(1)?)?,
                "coalesce" | "nvl" | "ifnull" | "greatest" | "least" => {
                    hull_of(non_null(args.iter()), r)?
                }
                "abs" => {
                    let (lo, hi) = r(args.first()?)?;
                    if lo >= 0.0 {
                        (lo, hi)
                    } else if hi <= 0.0 {
                        (-hi, -lo)
                    } else {
                        (0.0, hi.max(-lo))
                    }
                }
                "round" | "floor" | "ceil" | "trunc" => {
                    let (lo, hi) = r(args.first()?)?;
                    (lo.floor() - 1.0, hi.ceil() + 1.0)
                }
                "sqrt" => {
                    let (lo, hi) = r(args.first()?)?;
                    if lo < 0.0 {
                        return None;
                    }
                    (lo.sqrt(), hi.sqrt())
                }
                "date_part" | "datepart" => {
                    let Expr::Literal(ScalarValue::Utf8(Some(part)), _) = unalias(args.first()?)
                    else {
                        return None;
                    };
                    match part.to_lowercase().as_str() {
                        "month" => (1.0, 12.0),
                        "day" => (1.0, 31.0),
                        "dow" => (0.0, 6.0),
                        "isodow" => (1.0, 7.0),
                        "doy" => (1.0, 366.0),
                        "quarter" => (1.0, 4.0),
                        "week" => (1.0, 53.0),
                        "hour" => (0.0, 23.0),
                        "minute" | "second" => (0.0, 60.0),
                        "year" => {
                            let (lo, hi) = r(args.get(1)?)?;
                            (year_of_day(lo), year_of_day(hi))
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    (out.0.is_finite() && out.1.is_finite() && out.0 <= out.1).then_some(out)
}

/// Range of `a / b` (NULL where `b` is zero, so a divisor range through
/// zero gives no bound).
fn divide_range(a: (f64, f64), b: (f64, f64)) -> Option<(f64, f64)> {
    if b.0 <= 0.0 && b.1 >= 0.0 {
        return None;
    }
    let p = [a.0 / b.0, a.0 / b.1, a.1 / b.0, a.1 / b.1];
    // Integer division truncates towards zero: widen by one.
    let lo = p.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo.floor().min(lo), hi.ceil().max(hi)))
}

/// Range of `a % m` for a literal `m`.
fn modulo_range(a: (f64, f64), m: &Expr) -> Option<(f64, f64)> {
    let m = lit_f64(m)?.abs();
    Some(if a.0 >= 0.0 { (0.0, m) } else { (-m, m) })
}

fn widen_if_integer(r: (f64, f64), dt: &DataType) -> (f64, f64) {
    if dt.is_integer() {
        (r.0.floor(), r.1.ceil())
    } else {
        r
    }
}

/// Calendar year of a day number (days since 1970-01-01), conservatively.
fn year_of_day(d: f64) -> f64 {
    (1970.0 + d / 365.2425).floor()
}

/// Evaluate `e` on every combination of its columns' public values (and
/// NULL), returning the distinct non-null results, sorted. `None` when a
/// column has no public domain or there are too many combinations.
fn evaluate(e: &Expr, schema: &DFSchema, rel: &Rel) -> Option<Vec<ScalarValue>> {
    let refs: Vec<&Column> = {
        let mut v: Vec<&Column> = e.column_refs().into_iter().collect();
        v.sort_by_key(|c| c.flat_name());
        v
    };
    let mut inputs: Vec<(usize, Vec<ScalarValue>)> = Vec::new();
    let mut combos = 1usize;
    for c in refs {
        let i = schema.index_of_column(c).ok()?;
        let Info::Value(Bounds {
            domain: Some(d), ..
        }) = rel.cols.get(i)?
        else {
            return None;
        };
        let mut values = d.clone();
        values.push(ScalarValue::try_from(schema.field(i).data_type()).ok()?);
        combos = combos.checked_mul(values.len())?;
        inputs.push((i, values));
    }
    if combos > MAX_EVALUATIONS {
        return None;
    }
    let fields: Vec<(Option<TableReference>, Arc<Field>)> = schema
        .iter()
        .map(|(q, f)| (q.cloned(), Arc::new(f.as_ref().clone().with_nullable(true))))
        .collect();
    let nullable = DFSchema::new_with_metadata(fields, HashMap::new()).ok()?;
    let arrow_schema: Arc<Schema> = Arc::new(nullable.as_arrow().clone());
    let mut columns: Vec<ArrayRef> = arrow_schema
        .fields()
        .iter()
        .map(|f| new_null_array(f.data_type(), combos))
        .collect();
    // Every combination of the inputs' values, built by index: cloning a
    // `ScalarValue` per cell was most of a compile over two dates' domains
    // (issue #13: 38k combinations took 10 ms).
    let mut stride = 1usize;
    for (i, values) in &inputs {
        let n = values.len();
        let domain = ScalarValue::iter_to_array(values.iter().cloned()).ok()?;
        let at: UInt32Array = (0..combos)
            .map(|r| u32::try_from((r / stride) % n).ok())
            .collect();
        stride = stride.checked_mul(n)?;
        columns[*i] = take(&domain, &at, None).ok()?;
    }
    let batch = RecordBatch::try_new(arrow_schema, columns).ok()?;
    let phys = create_physical_expr(
        e,
        &nullable,
        &ExecutionProps::new(),
        &PhysicalPlanningContext::default(),
    )
    .ok()?;
    let out = phys.evaluate(&batch).ok()?.into_array(combos).ok()?;
    // Distinct non-null values in order: sort, then one value per run.
    let sorted = sort(&out, None).ok()?;
    let mut values = Vec::new();
    for run in partition(&[Arc::clone(&sorted)]).ok()?.ranges() {
        let v = ScalarValue::try_from_array(&sorted, run.start).ok()?;
        if !v.is_null() {
            values.push(v);
        }
    }
    Some(values)
}

/// Bounds of a per-patient aggregate over at most `k` rows.
fn per_unit_aggregate(
    e: &Expr,
    schema: &DFSchema,
    rel: &Rel,
    k: u64,
) -> Result<Bounds, QueryError> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(e) else {
        return Err(refuse(
            Code::UnsupportedAggregate,
            format!("{e} is not an aggregate"),
        ));
    };
    let name = func.name().to_lowercase();
    let kf = k as f64;
    let counts = || Bounds {
        domain: (kf <= MAX_ENUMERATED_DOMAIN).then(|| {
            (0..=k)
                .map(|v| ScalarValue::Int64(Some(v as i64)))
                .collect()
        }),
        range: Some((0.0, kf)),
        distinct: None,
    };
    let arg = params.args.first().map(unalias);
    // COUNT(*), COUNT(person_id) and COUNT(DISTINCT x) only count rows.
    if name == "count" {
        if let Some(a) = arg
            && !matches!(a, Expr::Literal(..) | Expr::Column(_))
        {
            check_no_identifiers(a, schema, rel, Code::IdentifierInExpression)?;
        }
        return Ok(counts());
    }
    let Some(a) = arg else {
        return Ok(Bounds::default());
    };
    Ok(match name.as_str() {
        "sum" => Bounds {
            domain: None,
            range: expr_range(a, schema, rel)?.map(|(lo, hi)| (lo.min(kf * lo), hi.max(kf * hi))),
            distinct: None,
        },
        "avg" | "mean" | "median" => Bounds {
            domain: None,
            range: expr_range(a, schema, rel)?,
            distinct: None,
        },
        // A per-patient minimum or maximum is one of the patient's values.
        "min" | "max" | "first_value" | "last_value" => expr_bounds(a, schema, rel)?,
        "bool_and" | "bool_or" => Bounds {
            domain: Some(vec![
                ScalarValue::Boolean(Some(false)),
                ScalarValue::Boolean(Some(true)),
            ]),
            range: Some((0.0, 1.0)),
            distinct: None,
        },
        _ => Bounds::default(),
    })
}
