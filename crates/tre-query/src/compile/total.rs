//! Totality and bounded per-row work (issue #10).
//!
//! Whether a query fails, and how long it takes, are things a researcher
//! observes. So every expression the compiler accepts must be *total* (it
//! cannot fail on any value of any type it can meet, NULL, empty strings
//! and extreme numbers included) and *cheap* (its work per row has a small
//! bound fixed at compile time, so one patient's rows cannot move the run
//! time by more than that bound times their rows).
//!
//! Three mechanisms give this:
//!
//! - an allow-list (`udf::FUNCTIONS`): every function a query may call, each
//!   with the argument rules that make it total and bounded (length
//!   arguments are literals with a cap, date parts are literals from a
//!   fixed set) and the reason it cannot fail; anything else is refused;
//! - a rewrite ([`totalise`]): `CAST` becomes `TRY_CAST` (NULL instead of
//!   an error), `/` and `%` become total functions (NULL on a zero
//!   divisor or overflow); partial built-ins (`abs`, `power`, `substr`,
//!   `to_date`, `make_date`) are replaced in the sandbox by total versions
//!   (`crate::functions`);
//! - a work model ([`row_work`]): an upper bound on the work one row costs,
//!   in units of one value or character touched, summed over every
//!   expression of the plan; refused above [`MAX_ROW_WORK`], and together
//!   with the rows per patient above [`MAX_PATIENT_WORK`].
//!
//! Types are restricted to those whose operations are total: booleans,
//! integers, floats, text, dates and (from `date_trunc`) timestamps.
//! Arithmetic is allowed on numbers and `date - date` only; intervals,
//! decimals and other types are refused.

use std::sync::Arc;

use super::table_key;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{Case, ScalarFunction, TryCast};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator, ScalarUDF};
use tre_core::Code;
use tre_policy::{ColumnClass, Policy};

use super::refuse;
use crate::QueryError;
use crate::functions::{DIV_UDF, MOD_UDF};
use crate::reference::RefTables;
use crate::udf::{Arg, MAX_LITERAL_TEXT, MAX_PAD, Size, function_rule};

/// Longest text assumed for a text column without a declared domain
/// (e.g. a practice code or an ICD-10 code). Columns with a domain use
/// their longest declared value.
pub(crate) const DEFAULT_TEXT_LEN: f64 = 64.0;
/// Most work units one row may cost across the whole plan.
pub(crate) const MAX_ROW_WORK: f64 = 20_000.0;
/// Most work units one patient's rows may cost (rows per patient times the
/// work per row): the bound on how far one patient can move the run time.
pub(crate) const MAX_PATIENT_WORK: f64 = 1_000_000.0;
/// Width assumed for a non-text value turned into text.
const PRINTED_LEN: f64 = 32.0;

/// Value types whose operations tre can prove total. Whole-number
/// decimals of up to 20 digits appear only because type coercion compares
/// UInt64 values (e.g. `row_number()`) with integers through them; no
/// arithmetic is allowed on them (see `check_expr`).
fn allowed_type(t: &DataType) -> bool {
    use DataType::*;
    matches!(
        t,
        Null | Boolean
            | Int8
            | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Float32
            | Float64
            | Utf8
            | LargeUtf8
            | Utf8View
            | Date32
            | Timestamp(_, _)
    ) || matches!(t, Decimal128(p, 0) if *p <= 20)
}

fn numeric(t: &DataType) -> bool {
    t.is_integer() || t.is_floating() || t.is_null()
}

fn expression_refusal(message: String) -> QueryError {
    refuse(Code::UnsupportedExpression, message)
}

/// The integer a literal argument holds (through the casts that type
/// coercion adds).
fn int_literal(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(v, _) if !v.is_null() => {
            match v.cast_to(&DataType::Int64).ok()? {
                ScalarValue::Int64(Some(i)) => {
                    // A float literal such as 2.5 is not an integer literal.
                    let f = super::relation::scalar_f64(v)?;
                    (f == i as f64).then_some(i)
                }
                _ => None,
            }
        }
        Expr::Cast(c) => int_literal(&c.expr),
        Expr::TryCast(c) => int_literal(&c.expr),
        Expr::Alias(a) => int_literal(&a.expr),
        Expr::Negative(x) => int_literal(x)?.checked_neg(),
        _ => None,
    }
}

pub(crate) fn text_literal(e: &Expr) -> Option<&str> {
    match e {
        Expr::Literal(ScalarValue::Utf8(Some(s)), _)
        | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _)
        | Expr::Literal(ScalarValue::Utf8View(Some(s)), _) => Some(s),
        Expr::Cast(c) => text_literal(&c.expr),
        Expr::TryCast(c) => text_literal(&c.expr),
        Expr::Alias(a) => text_literal(&a.expr),
        _ => None,
    }
}

/// Refuse a call to a function that is not allow-listed.
pub(crate) fn check_name(e: &Expr) -> Option<QueryError> {
    let Expr::ScalarFunction(f) = e else {
        return None;
    };
    let name = f.func.name().to_lowercase();
    function_rule(&name).is_none().then(|| {
        refuse(
            Code::FunctionNotAllowed,
            format!(
                "function '{name}' is not allowed: queries may use only deterministic row-level functions that cannot fail, such as round, coalesce, substr, date_trunc or clamp (the catalog lists them)"
            ),
        )
    })
}

/// Every expression of the plan (subqueries included) must pass
/// [`check_expr`].
pub(crate) fn check_totality(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut refusal = None;
    let _ = plan.apply_with_subqueries(|node| {
        let schema = match node.inputs().as_slice() {
            [] => None,
            [one] => Some(Arc::clone(one.schema())),
            _ => Some(Arc::clone(node.schema())),
        };
        let _ = node.apply_expressions(|e| {
            e.apply(|e| {
                refusal = check_expr(e, schema.as_deref());
                Ok(if refusal.is_some() {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        });
        Ok(if refusal.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    refusal.map_or(Ok(()), Err)
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn check_call(
    f: &ScalarFunction,
    type_of: &dyn Fn(&Expr) -> Option<DataType>,
) -> Option<QueryError> {
    let name = f.func.name().to_lowercase();
    let rule = function_rule(&name)?;
    let n = f.args.len();
    if n < rule.min_args || n > rule.max_args {
        return Some(expression_refusal(format!(
            "{name} takes {} to {} arguments, not {n}",
            rule.min_args, rule.max_args
        )));
    }
    for (i, a) in f.args.iter().enumerate() {
        let want = rule.args.get(i).or(rule.args.last()).copied()?;
        let ok = match want {
            Arg::Value => true,
            Arg::Int(lo, hi) => int_literal(a).is_some_and(|v| (lo..=hi).contains(&v)),
            Arg::Text => text_literal(a).is_some_and(|s| s.chars().count() <= MAX_LITERAL_TEXT),
            Arg::Part(parts) => {
                text_literal(a).is_some_and(|s| parts.contains(&s.to_lowercase().as_str()))
            }
            Arg::Temporal => {
                type_of(a).is_none_or(|t| matches!(t, DataType::Date32 | DataType::Timestamp(_, _)))
            }
        };
        if !ok {
            let what = match want {
                Arg::Value => String::new(),
                Arg::Int(lo, hi) => format!("an integer literal from {lo} to {hi}"),
                Arg::Text => format!("a text literal of at most {MAX_LITERAL_TEXT} characters"),
                Arg::Part(parts) => format!("one of the literals '{}'", parts.join("', '")),
                Arg::Temporal => "a date or a timestamp".to_owned(),
            };
            return Some(expression_refusal(format!(
                "argument {} of {name} must be {what}, so that the call cannot fail and its cost per row is known before the query runs",
                i + 1
            )));
        }
    }
    None
}

/// A cast is total if arrow can convert the types at all (then `TRY_CAST`
/// gives NULL for a value that does not fit) and it cannot make a date
/// outside the calendar: dates come from text, dates or timestamps, never
/// from a bare number of days (use `make_date`).
fn check_cast(from: Option<DataType>, to: &DataType) -> Option<QueryError> {
    if !allowed_type(to) {
        return Some(expression_refusal(format!(
            "casts to {to} are not supported; use integers, floats, text, dates or booleans"
        )));
    }
    let from = from?;
    if !datafusion::arrow::compute::can_cast_types(&from, to) {
        return Some(expression_refusal(format!(
            "{from} cannot be converted to {to}"
        )));
    }
    let dated = is_text(&from)
        || from.is_null()
        || matches!(from, DataType::Date32 | DataType::Timestamp(_, _));
    (*to == DataType::Date32 && !dated).then(|| {
        expression_refusal(format!(
            "{from} cannot be converted to a date; use make_date(year, month, day) or a text date"
        ))
    })
}

/// Refuse an expression node that could fail on some value or cost
/// unbounded work. `schema` is the schema the node's columns refer to
/// (`None` where it cannot be typed, e.g. in a subquery over outer
/// columns, which is refused elsewhere).
pub(crate) fn check_expr(e: &Expr, schema: Option<&DFSchema>) -> Option<QueryError> {
    let type_of = |x: &Expr| schema.and_then(|s| x.get_type(s).ok());
    match e {
        Expr::ScalarFunction(f) => check_call(f, &type_of),
        Expr::Cast(datafusion::logical_expr::Cast { expr, field })
        | Expr::TryCast(TryCast { expr, field }) => check_cast(type_of(expr), field.data_type()),
        Expr::Negative(x) => type_of(x)
            .filter(|t| !numeric(t))
            .map(|t| expression_refusal(format!("'-' is supported on numbers, not on {t}"))),
        Expr::Literal(v, _) if !allowed_type(&v.data_type()) => Some(expression_refusal(format!(
            "literals of type {} (such as INTERVAL) are not supported; compare dates directly, subtract two dates for a number of days, or use date_part",
            v.data_type()
        ))),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            use Operator::*;
            match op {
                Eq | NotEq | Lt | LtEq | Gt | GtEq | And | Or | IsDistinctFrom
                | IsNotDistinctFrom | StringConcat => None,
                Plus | Minus | Multiply | Divide | Modulo => {
                    let (l, r) = (type_of(left), type_of(right));
                    let ok = match (&l, &r) {
                        (Some(l), Some(r)) => {
                            (numeric(l) && numeric(r))
                                || (*op == Minus
                                    && l == &DataType::Date32
                                    && r == &DataType::Date32)
                        }
                        // Untypable here: the planner already typed it.
                        _ => true,
                    };
                    (!ok).then(|| {
                        expression_refusal(format!(
                            "'{op}' is supported on numbers (and '-' between two dates, giving days), not on {} and {}; use date_part or compare values instead",
                            l.map(|t| t.to_string()).unwrap_or_default(),
                            r.map(|t| t.to_string()).unwrap_or_default()
                        ))
                    })
                }
                other => Some(expression_refusal(format!(
                    "the operator '{other}' is not supported; use comparisons, AND/OR, arithmetic, || or LIKE"
                ))),
            }
        }
        Expr::Like(l) => {
            let ok =
                text_literal(&l.pattern).is_some_and(|p| p.chars().count() <= MAX_LITERAL_TEXT);
            (!ok).then(|| {
                expression_refusal(format!(
                    "the pattern of LIKE must be a text literal of at most {MAX_LITERAL_TEXT} characters"
                ))
            })
        }
        Expr::SimilarTo(_) => Some(expression_refusal(
            "SIMILAR TO and regular expressions are not supported; use LIKE with a literal pattern"
                .into(),
        )),
        Expr::GroupingSet(_) => Some(refuse(
            Code::UnsupportedShape,
            "GROUP BY ROLLUP, CUBE and GROUPING SETS are not supported; ask one query per grouping, or ask for totals (the totals option)",
        )),
        Expr::Placeholder(_) | Expr::ScalarVariable(..) => Some(expression_refusal(
            "parameters and variables are not supported; write the values into the query".into(),
        )),
        Expr::SetComparison(_) => Some(refuse(
            Code::SubqueryNotAllowed,
            "ANY / ALL comparisons with a subquery are not supported; use IN over a reference table",
        )),
        Expr::Unnest(_) => Some(refuse(Code::UnsupportedShape, "UNNEST is not supported")),
        _ => None,
    }
}

/// Rewrite every expression of the plan (subqueries included) into its
/// total form: `CAST` → `TRY_CAST`, `/` and `%` → `__tre_div`/`__tre_mod`
/// (NULL on a zero divisor or on overflow), and every call of a partial
/// built-in → tre's total version of it (`crate::functions`; the SQL
/// planner hard-wires some built-ins, e.g. `SUBSTR` syntax, so resolving
/// names through the registry is not enough). Output names are kept.
pub(crate) fn totalise(plan: LogicalPlan) -> Result<LogicalPlan, QueryError> {
    let total: std::collections::HashMap<String, Arc<ScalarUDF>> = crate::functions::all()
        .into_iter()
        .flat_map(|f| {
            let f = Arc::new(f);
            let names: Vec<String> = std::iter::once(f.name().to_owned())
                .chain(f.aliases().iter().cloned())
                .collect();
            names.into_iter().map(move |n| (n, Arc::clone(&f)))
        })
        .collect();
    let (div, modulo) = match (total.get(DIV_UDF), total.get(MOD_UDF)) {
        (Some(d), Some(m)) => (Arc::clone(d), Arc::clone(m)),
        _ => return Err(QueryError::Internal("total division is missing".into())),
    };
    let rewrite = |e: Expr| -> datafusion::error::Result<Transformed<Expr>> {
        Ok(match e {
            Expr::ScalarFunction(ScalarFunction { func, args }) => {
                match total.get(&func.name().to_lowercase()) {
                    Some(t) if t.as_ref() != func.as_ref() => Transformed::yes(
                        Expr::ScalarFunction(ScalarFunction::new_udf(Arc::clone(t), args)),
                    ),
                    _ => Transformed::no(Expr::ScalarFunction(ScalarFunction { func, args })),
                }
            }
            Expr::Cast(c) => Transformed::yes(Expr::TryCast(TryCast {
                expr: c.expr,
                field: c.field,
            })),
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: op @ (Operator::Divide | Operator::Modulo),
                right,
            }) => {
                let f = if op == Operator::Divide {
                    &div
                } else {
                    &modulo
                };
                Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                    Arc::clone(f),
                    vec![*left, *right],
                )))
            }
            other => Transformed::no(other),
        })
    };
    plan.transform_up_with_subqueries(|node| {
        let names = NamePreserver::new(&node);
        let node = node.map_expressions(|e| {
            let saved = names.save(&e);
            Ok(e.transform_up(rewrite)?.update_data(|e| saved.restore(e)))
        })?;
        if node.transformed {
            node.data.recompute_schema().map(Transformed::yes)
        } else {
            Ok(node)
        }
    })
    .map(|t| t.data)
    .map_err(|e| QueryError::Internal(format!("making expressions total: {e}")))
}

/// Upper bounds, per output column of a plan node, on the characters of a
/// text value (non-text values count as their printed width).
type Lens = Vec<f64>;

/// The work bound of a plan: the most work units one row can cost,
/// summed over every expression of every node, and each output column's
/// longest text.
pub(crate) fn row_work(
    plan: &LogicalPlan,
    policy: &Policy,
    reference: &RefTables,
) -> Result<f64, QueryError> {
    let (_, work) = plan_work(plan, policy, reference)?;
    if work > MAX_ROW_WORK {
        return Err(refuse(
            Code::TooMuchWork,
            format!(
                "the query's expressions could cost up to {work:.0} units of work per row, more than the {MAX_ROW_WORK:.0} allowed (a bound that keeps one patient from changing how long a query takes); use fewer or shorter text functions, smaller pads and shorter CASE lists"
            ),
        ));
    }
    Ok(work)
}

fn plan_work(
    plan: &LogicalPlan,
    policy: &Policy,
    reference: &RefTables,
) -> Result<(Lens, f64), QueryError> {
    let mut work = 0.0;
    let mut inputs: Vec<Lens> = Vec::new();
    for input in plan.inputs() {
        let (l, w) = plan_work(input, policy, reference)?;
        work += w;
        inputs.push(l);
    }
    let input_lens: Lens = inputs.concat();
    let input_schema: Option<&DFSchema> = match plan.inputs().as_slice() {
        [one] => Some(one.schema().as_ref()),
        _ => Some(plan.schema().as_ref()),
    };
    let lens = |e: &Expr, w: &mut f64| -> f64 {
        let (len, cost) = expr_work(e, input_schema, &input_lens);
        *w += cost;
        len
    };
    let out: Lens = match plan {
        LogicalPlan::TableScan(scan) => scan
            .projected_schema
            .fields()
            .iter()
            .map(|f| {
                column_len(
                    policy,
                    reference,
                    &table_key(policy, &scan.table_name),
                    f.name(),
                )
            })
            .collect(),
        LogicalPlan::Projection(p) => p.expr.iter().map(|e| lens(e, &mut work)).collect(),
        LogicalPlan::Aggregate(a) => {
            let mut out: Lens = a.group_expr.iter().map(|e| lens(e, &mut work)).collect();
            for e in &a.aggr_expr {
                // MIN/MAX of text keep its length; other aggregates give
                // numbers. Their arguments cost like any expression.
                let mut len = PRINTED_LEN;
                e.apply_children(|c| {
                    len = len.max(lens(c, &mut work));
                    Ok(TreeNodeRecursion::Continue)
                })
                .map_err(|e| QueryError::Internal(e.to_string()))?;
                out.push(len);
            }
            out
        }
        LogicalPlan::Window(w) => {
            let mut out = input_lens.clone();
            for e in &w.window_expr {
                let _ = lens(e, &mut work);
                out.push(PRINTED_LEN);
            }
            out
        }
        other => {
            // Filters, joins, sorts, limits and aliases keep their input's
            // columns; their expressions still cost work per row.
            let _ = other.apply_expressions(|e| {
                let _ = lens(e, &mut work);
                Ok(TreeNodeRecursion::Continue)
            });
            let n = other.schema().fields().len();
            let mut out = input_lens.clone();
            out.resize(n, PRINTED_LEN);
            out
        }
    };
    Ok((out, work))
}

/// The most characters a categorical text value may have: its column's
/// longest declared value, or [`DEFAULT_TEXT_LEN`] without a domain. A
/// longer value becomes NULL at the scan (`bounded_scan`), so the work
/// bound holds whatever the data holds.
pub(crate) fn text_limit(class: &ColumnClass) -> Option<usize> {
    match class {
        ColumnClass::Categorical { domain: Some(d) } => Some(
            d.iter()
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
                .max(1),
        ),
        ColumnClass::Categorical { domain: None } => Some(DEFAULT_TEXT_LEN as usize),
        _ => None,
    }
}

/// Longest text of a table column: its [`text_limit`], or for identifiers
/// (keyed pseudonyms of fixed length) [`DEFAULT_TEXT_LEN`]; for reference
/// tables, the longest value shipped.
fn column_len(policy: &Policy, reference: &RefTables, table: &str, column: &str) -> f64 {
    if let Some(t) = policy.table(table) {
        return match t.column(column).map(|c| &c.class) {
            Some(ColumnClass::Identifier) => DEFAULT_TEXT_LEN,
            Some(class) => text_limit(class).map_or(PRINTED_LEN, |l| l as f64),
            None => PRINTED_LEN,
        };
    }
    reference
        .get(table)
        .and_then(|r| r.columns.get(column))
        .map_or(DEFAULT_TEXT_LEN, |c| {
            c.domain
                .iter()
                .map(|v| v.to_string().chars().count() as f64)
                .fold(PRINTED_LEN, f64::max)
        })
}

/// `(longest text, work)` of one expression over input columns whose
/// longest texts are `lens`. Work counts one unit per node plus every
/// character read and written.
fn expr_work(e: &Expr, schema: Option<&DFSchema>, lens: &[f64]) -> (f64, f64) {
    let sub = |x: &Expr| expr_work(x, schema, lens);
    let all = |xs: &[Expr]| -> (Vec<f64>, f64) {
        let mut w = 0.0;
        let v = xs
            .iter()
            .map(|x| {
                let (l, c) = sub(x);
                w += c;
                l
            })
            .collect();
        (v, w)
    };
    let (len, child_work, read) = match e {
        Expr::Alias(a) => return sub(&a.expr),
        Expr::Column(c) => {
            let len = schema
                .and_then(|s| s.index_of_column(c).ok())
                .and_then(|i| lens.get(i).copied())
                .unwrap_or(DEFAULT_TEXT_LEN);
            return (len, 1.0);
        }
        Expr::Literal(v, _) => {
            let len = match v {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)) => s.chars().count() as f64,
                _ => PRINTED_LEN,
            };
            return (len, 1.0);
        }
        Expr::ScalarFunction(f) => {
            let (args, w) = all(&f.args);
            let read: f64 = args.iter().sum();
            let name = f.func.name().to_lowercase();
            let len = match function_rule(&name).map(|r| r.size) {
                None | Some(Size::Value) => PRINTED_LEN,
                Some(Size::Arg(i, k)) => k * args.get(i).copied().unwrap_or(0.0),
                Some(Size::Longest) => args.iter().copied().fold(0.0, f64::max),
                Some(Size::Sum) => {
                    // concat_ws repeats its separator between values.
                    let sep = if name == "concat_ws" {
                        args.first().copied().unwrap_or(0.0) * args.len() as f64
                    } else {
                        0.0
                    };
                    read + sep
                }
                Some(Size::Literal(i)) => {
                    f.args.get(i).and_then(int_literal).unwrap_or(MAX_PAD) as f64
                }
                Some(Size::Replace) => {
                    let s = args.first().copied().unwrap_or(0.0);
                    let from = f.args.get(1).and_then(text_literal).map_or(0, str::len) as f64;
                    let to = f.args.get(2).and_then(text_literal).map_or(0, str::len) as f64;
                    if from == 0.0 {
                        s * (1.0 + to) + to
                    } else {
                        s * (to / from).max(1.0).ceil()
                    }
                }
            };
            (len, w, read)
        }
        Expr::Case(Case {
            expr,
            when_then_expr,
            else_expr,
        }) => {
            let mut w = 0.0;
            let mut read = 0.0;
            let mut len: f64 = 0.0;
            if let Some(x) = expr {
                let (l, c) = sub(x);
                w += c;
                read += l * when_then_expr.len() as f64;
            }
            for (when, then) in when_then_expr {
                let (_, c) = sub(when);
                let (l, d) = sub(then);
                w += c + d;
                len = len.max(l);
            }
            if let Some(x) = else_expr {
                let (l, c) = sub(x);
                w += c;
                len = len.max(l);
            }
            (len, w, read)
        }
        Expr::TryCast(TryCast { expr, field }) => {
            let (l, w) = sub(expr);
            // Text keeps its length; anything else prints within the width.
            let len = if matches!(
                field.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) {
                l.max(PRINTED_LEN)
            } else {
                PRINTED_LEN
            };
            (len, w, l)
        }
        Expr::Cast(c) => {
            let (l, w) = sub(&c.expr);
            (l.max(PRINTED_LEN), w, l)
        }
        Expr::Like(l) => {
            let (a, w) = sub(&l.expr);
            let p = text_literal(&l.pattern).map_or(0, str::len) as f64;
            // Matching reads the value about twice plus the pattern.
            (PRINTED_LEN, w, 2.0 * a + p)
        }
        Expr::InList(i) => {
            let (a, w1) = sub(&i.expr);
            let (items, w2) = all(&i.list);
            (PRINTED_LEN, w1 + w2, a + items.iter().sum::<f64>())
        }
        Expr::BinaryExpr(b) => {
            let (l, w1) = sub(&b.left);
            let (r, w2) = sub(&b.right);
            let len = if b.op == Operator::StringConcat {
                l + r
            } else {
                PRINTED_LEN
            };
            (len, w1 + w2, l + r)
        }
        Expr::AggregateFunction(a) => {
            let (args, w) = all(&a.params.args);
            let mut w = w;
            if let Some(f) = &a.params.filter {
                w += sub(f).1;
            }
            (PRINTED_LEN, w, args.iter().sum())
        }
        other => {
            // Not, IS NULL, BETWEEN, Negative, subqueries (evaluated once),
            // window functions: one unit plus their children.
            let mut w = 0.0;
            let mut read = 0.0;
            let _ = other.apply_children(|c| {
                let (l, cw) = sub(c);
                w += cw;
                read += l;
                Ok(TreeNodeRecursion::Continue)
            });
            (PRINTED_LEN, w, read)
        }
    };
    (len, child_work + 1.0 + read + len)
}

/// The work one row of the release aggregate's input can cost, refused
/// (`TRE-Q029`) when one patient's `k_total` rows could cost more than
/// [`MAX_PATIENT_WORK`]: the bound on how far one patient can move the
/// run time.
pub(crate) fn bounded_row_work(
    agg: &datafusion::logical_expr::Aggregate,
    policy: &Policy,
    reference: &RefTables,
    k_total: u64,
) -> Result<f64, QueryError> {
    let row_work = row_work(&LogicalPlan::Aggregate(agg.clone()), policy, reference)?;
    let patient_work = row_work * k_total as f64;
    if patient_work > MAX_PATIENT_WORK {
        return Err(refuse(
            Code::TooMuchWork,
            format!(
                "one patient's {k_total} row(s) could cost {patient_work:.0} units of work, more than the {:.0} allowed (a bound that keeps one patient from changing how long a query takes); join fewer tables or simplify the expressions",
                MAX_PATIENT_WORK
            ),
        ));
    }
    Ok(row_work)
}
