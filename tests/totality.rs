//! Totality (issue #10): every function and operator the compiler accepts
//! is called, through the real compiler and engine, on an encrypted
//! extract full of adversarial values: NULL, empty and long strings,
//! multi-byte text, text that looks like numbers and impossible dates,
//! i64::MIN and MAX, NaN, ±infinity, −0, subnormals, and dates at the ends
//! of the Date32 range. Every call is either refused with a stable code
//! before it runs, or runs without an error on every row. A few calls are
//! also checked for their value (division by zero is NULL, substr follows
//! SQL, an impossible date is NULL).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::DataType;
use tempfile::TempDir;
use tre_core::Code;
use tre_e2e::{MASTER, engine_on, write_extract};
use tre_query::{Budget, Engine, QueryError};
use tre_vault::MasterKey;

const PATIENTS: usize = 12;

fn texts() -> Vec<Option<String>> {
    vec![
        Some(String::new()),
        Some("F".into()),
        Some("é".into()),
        Some("💥 emoji".into()),
        Some("x".repeat(300)),
        Some("2024-02-30".into()),
        Some("-9223372036854775809".into()),
        Some("1e400".into()),
        Some("NaN".into()),
        Some("  padded  ".into()),
        Some("%_\\".into()),
        Some("2024-05-01".into()),
    ]
}

const INTS: [i64; PATIENTS] = [
    i64::MIN,
    i64::MIN + 1,
    -1,
    0,
    1,
    2,
    i64::MAX,
    2_147_483_648,
    -2_147_483_649,
    10,
    100,
    1950,
];

const FLOATS: [f64; PATIENTS] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -0.0,
    0.0,
    f64::MAX,
    f64::MIN,
    f64::MIN_POSITIVE,
    5e-324,
    1e300,
    -1.5,
    48.0,
];

const DATES: [i32; PATIENTS] = [
    i32::MIN,
    i32::MAX,
    0,
    -1,
    19_723,
    -719_528,
    2_932_896,
    -100_000_000,
    100_000_000,
    20_088,
    19_000,
    19_724,
];

/// One column of `rows` values for the synthetic schema's field.
fn column(dt: &DataType, name: &str, rows: usize, nullable: bool) -> ArrayRef {
    let pick = |i: usize| i % PATIENTS;
    let null = |i: usize| nullable && i % 5 == 4;
    match dt {
        DataType::Utf8 if name == "person_id" => Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("p{}", pick(i))),
        )),
        DataType::Utf8 => {
            let t = texts();
            Arc::new(StringArray::from_iter((0..rows).map(|i| {
                (!null(i)).then(|| t[pick(i * 7 + 3)].clone()).flatten()
            })))
        }
        DataType::Int64 => Arc::new(Int64Array::from_iter_values(
            (0..rows).map(|i| INTS[pick(i * 5 + 1)]),
        )),
        DataType::Float64 => Arc::new(Float64Array::from_iter_values(
            (0..rows).map(|i| FLOATS[pick(i * 5 + 2)]),
        )),
        DataType::Date32 => Arc::new(Date32Array::from_iter(
            (0..rows).map(|i| (!null(i)).then_some(DATES[pick(i * 7 + 1)])),
        )),
        DataType::Boolean if name == "research_opt_out" => {
            Arc::new(BooleanArray::from_iter((0..rows).map(|_| Some(false))))
        }
        _ => Arc::new(BooleanArray::from_iter((0..rows).map(|i| Some(i % 3 == 0)))),
    }
}

/// An encrypted dataset of adversarial values with the synthetic schema.
fn write_adversarial(dir: &Path, master: &MasterKey) {
    for table in tre_synth::TABLES {
        let schema = tre_synth::schema(table);
        let rows = if table == "patients" {
            PATIENTS
        } else {
            PATIENTS * 4
        };
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| column(f.data_type(), f.name(), rows, f.is_nullable()))
            .collect();
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), columns).unwrap_or_else(|e| panic!("{e}"));
        write_extract(dir, table, master, &[batch]);
    }
}

fn adversarial() -> &'static (TempDir, PathBuf) {
    static D: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = dir.path().join("nhs_epr");
        let master = MasterKey::from_bytes(&MASTER).unwrap_or_else(|e| panic!("{e}"));
        write_adversarial(&data, &master);
        (dir, data)
    })
}

const FROM: &str = "FROM patients p JOIN admissions a ON p.person_id = a.person_id JOIN lab_results l ON p.person_id = l.person_id";

/// Arguments of every type and extreme, as the allow-list rules admit them.
const VALUES: &[&str] = &[
    "p.year_of_birth",
    "l.value",
    "p.sex",
    "a.primary_diagnosis",
    "a.admission_date",
    "p.date_of_death",
    "p.diabetes",
    "NULL",
    "0",
    "-1",
    "9223372036854775807",
    "1e308",
    "''",
    "'2024-02-30'",
    "DATE '2024-02-29'",
    "date_trunc('month', a.admission_date)",
    "CAST(p.year_of_birth AS DECIMAL(20, 0))",
];

/// A second value argument is drawn from fewer values: every type and the
/// extremes that matter in combination.
const SECOND_VALUES: &[&str] = &[
    "p.year_of_birth",
    "l.value",
    "p.sex",
    "a.admission_date",
    "NULL",
    "0",
    "-1",
    "''",
    "DATE '2024-02-29'",
];

fn arg_choices(rule: &str, position: usize) -> Vec<String> {
    if rule.starts_with("integer literal") {
        // "integer literal LO..=HI": the ends, zero, and just outside.
        let range = rule.trim_start_matches("integer literal ");
        let (lo, hi) = range.split_once("..=").unwrap_or(("0", "0"));
        let (lo, hi): (i64, i64) = (lo.parse().unwrap_or(0), hi.parse().unwrap_or(0));
        let mut v = vec![lo, hi, 0, lo - 1, hi + 1];
        v.dedup();
        return v.into_iter().map(|x| x.to_string()).collect();
    }
    if rule.starts_with("text literal") {
        return vec![
            "''".into(),
            "'x'".into(),
            "'%d/%m/%Y'".into(),
            format!("'{}'", "y".repeat(256)),
            format!("'{}'", "y".repeat(257)),
            "p.sex".into(),
        ];
    }
    if let Some(parts) = rule.strip_prefix("one of ") {
        let mut v: Vec<String> = parts.split(", ").map(str::to_owned).collect();
        v.push("'century'".into());
        v.push("p.sex".into());
        return v;
    }
    let pool = if position == 0 { VALUES } else { SECOND_VALUES };
    pool.iter().map(|s| (*s).to_owned()).collect()
}

/// Operators and casts, written as templates over `{0}` and `{1}`.
const OPERATORS: &[&str] = &[
    "({0} / {1})",
    "({0} % {1})",
    "({0} + {1})",
    "({0} - {1})",
    "({0} * {1})",
    "(- {0})",
    "({0} || {1})",
    "({0} = {1})",
    "({0} < {1})",
    "({0} IN ({1}, 1))",
    "({0} BETWEEN {1} AND 10)",
    "CASE WHEN {0} > 0 THEN {1} END",
    "({0} LIKE 'a%')",
    "CAST({0} AS BIGINT)",
    "CAST({0} AS INT)",
    "CAST({0} AS DOUBLE)",
    "CAST({0} AS VARCHAR)",
    "CAST({0} AS DATE)",
    "CAST({0} AS BOOLEAN)",
    "CAST({0} AS TIMESTAMP)",
];

/// Every call to try: (what it exercises, SQL expression).
fn calls() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in tre_query::functions() {
        let arities: Vec<usize> = (f.min_args..=f.max_args.min(f.min_args + 1)).collect();
        for n in arities {
            let choices: Vec<Vec<String>> = (0..n)
                .map(|i| {
                    let rule = f.arguments.get(i).or(f.arguments.last());
                    arg_choices(rule.map_or("value", String::as_str), i)
                })
                .collect();
            // Every combination for one or two arguments; for more, the
            // first choice of each argument with every choice of one.
            let mut combos: Vec<Vec<String>> = Vec::new();
            if n <= 2 {
                combos.push(Vec::new());
                for c in &choices {
                    combos = combos
                        .into_iter()
                        .flat_map(|p| {
                            c.iter().map(move |x| {
                                let mut q = p.clone();
                                q.push(x.clone());
                                q
                            })
                        })
                        .collect();
                }
            } else {
                for (i, c) in choices.iter().enumerate() {
                    for x in c {
                        let mut q: Vec<String> = choices.iter().map(|c| c[0].clone()).collect();
                        q[i] = x.clone();
                        combos.push(q);
                    }
                }
            }
            for args in combos {
                out.push((
                    f.name.to_owned(),
                    format!("{}({})", f.name, args.join(", ")),
                ));
            }
        }
    }
    for op in OPERATORS {
        for a in VALUES {
            for b in SECOND_VALUES {
                if !op.contains("{1}") && b != &SECOND_VALUES[0] {
                    continue;
                }
                out.push(((*op).to_owned(), op.replace("{0}", a).replace("{1}", b)));
            }
        }
    }
    out
}

async fn run(engine: &Engine, budget: Budget, exprs: &[&str]) -> Result<(), QueryError> {
    let aggs: Vec<String> = exprs.iter().map(|e| format!("COUNT({e})")).collect();
    let sql = format!("SELECT {} {FROM}", aggs.join(", "));
    engine.exact(&sql, budget, &[]).await.map(|_| ())
}

/// Issue #10: no accepted expression can fail on any value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_allowed_function_is_total_on_adversarial_values() {
    let master = Arc::new(MasterKey::from_bytes(&MASTER).unwrap_or_else(|e| panic!("{e}")));
    let engine = engine_on(&adversarial().1, master).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let calls = calls();
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (what, expr) in &calls {
        let sql = format!("SELECT COUNT({expr}) {FROM}");
        match engine.compile(&sql, budget).await {
            Ok(_) => accepted.entry(what.clone()).or_default().push(expr.clone()),
            Err(e @ QueryError::Refused { .. }) => {
                *refused.entry(e.code().to_string()).or_default() += 1;
            }
            Err(e) => failures.push(format!("{expr}: compile: {e}")),
        }
    }
    // Run the accepted calls in batches; a failing batch is rerun call by
    // call to name the culprit.
    let mut evaluated = 0;
    for list in accepted.values() {
        for batch in list.chunks(8) {
            let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
            if run(&engine, budget, &batch).await.is_ok() {
                evaluated += batch.len();
                continue;
            }
            for e in batch {
                match run(&engine, budget, &[e]).await {
                    Ok(()) => evaluated += 1,
                    Err(err) => failures.push(format!("{e}: {err:?}")),
                }
            }
        }
    }
    let functions = tre_query::functions();
    let untested: Vec<&str> = functions
        .iter()
        .map(|f| f.name)
        .chain(OPERATORS.iter().copied())
        .filter(|f| !accepted.contains_key(*f))
        .collect();
    println!(
        "totality: {} calls over {} functions and {} operators: {evaluated} accepted and run on every adversarial row, refused {refused:?}",
        calls.len(),
        functions.len(),
        OPERATORS.len()
    );
    assert!(
        untested.is_empty(),
        "never accepted, so never shown total: {untested:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        !refused.contains_key(Code::Internal.as_str()),
        "internal errors: {refused:?}"
    );
}

/// The total semantics, value by value: each condition holds on every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_functions_keep_sql_semantics() {
    let master = Arc::new(MasterKey::from_bytes(&MASTER).unwrap_or_else(|e| panic!("{e}")));
    let engine = engine_on(&adversarial().1, master).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let count = |cond: &str| {
        let sql = format!("SELECT COUNT(*) FROM patients p WHERE {cond}");
        let engine = &engine;
        async move {
            let e = engine
                .exact(&sql, budget, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            e.laplace.values().next().map_or(0, |v| v[0])
        }
    };
    let all = count("TRUE").await;
    assert_eq!(all, PATIENTS as i64);
    for cond in [
        "(p.year_of_birth / 0) IS NULL",
        "(p.year_of_birth % 0) IS NULL",
        "7 / 2 = 3",
        "-7 % 3 = -1",
        "substr('abcdef', 2, 3) = 'bcd'",
        "substr('abcdef', 0, 3) = 'ab'",
        "substr('abcdef', -1, 3) = 'a'",
        "substr('abcdef', 3) = 'cdef'",
        "substr('abcdef', 1, -1) IS NULL",
        "substr('héllo', 2, 2) = 'él'",
        "make_date(2024, 2, 30) IS NULL",
        "make_date(2024, 2, 29) = DATE '2024-02-29'",
        "make_date(2024, 13, 1) IS NULL",
        "to_date('2024-02-30') IS NULL",
        "to_date('2024-05-01') = DATE '2024-05-01'",
        "to_date('01/05/2024', '%d/%m/%Y') = DATE '2024-05-01'",
        "power(2, 10) = 1024",
        "abs(-3) = 3",
        "CAST('abc' AS BIGINT) IS NULL",
        "(CASE WHEN p.year_of_birth < 0 THEN 1 / 0 ELSE 1 END) IS NULL OR p.year_of_birth >= 0",
        // Bounds are enforced at the scan: text longer than its column's
        // limit (its longest declared value, or 64) and dates outside the
        // policy's bounds are NULL, whatever the extract holds (it holds
        // 300-character text and dates at both ends of Date32).
        "p.gp_practice IS NULL OR character_length(p.gp_practice) <= 64",
        "p.sex IS NULL OR character_length(p.sex) <= 1",
        "p.date_of_death IS NULL OR p.date_of_death BETWEEN DATE '2024-01-01' AND DATE '2025-12-31'",
    ] {
        assert_eq!(count(cond).await, all, "{cond}");
    }
}

/// The researcher-callable list (`udf::FUNCTIONS`) and the functions the
/// sandbox registers agree (issue #12): every listed function resolves in
/// the sandbox, so none is listed by a name DataFusion does not know, and
/// none of tre's internal functions (the rewrite's `__tre_*`, which see
/// sampling keys and salted hashes) is listed, nor callable from SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callable_list_and_the_registry_agree() {
    let engine = tre_e2e::engine_with(Arc::clone(&tre_e2e::fixture().master))
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = engine.sandbox_context();
    let listed: Vec<&str> = tre_query::functions().iter().map(|f| f.name).collect();
    use datafusion::execution::FunctionRegistry;
    let unknown: Vec<&&str> = listed.iter().filter(|n| ctx.udf(n).is_err()).collect();
    assert!(unknown.is_empty(), "listed but not registered: {unknown:?}");
    let state = ctx.state();
    let internal: Vec<&String> = state
        .scalar_functions()
        .keys()
        .filter(|n| n.starts_with("__tre"))
        .collect();
    assert!(internal.len() >= 4, "the rewrite's functions: {internal:?}");
    for name in internal {
        assert!(!listed.contains(&name.as_str()), "{name} is listed");
        let budget = engine
            .budget(Some(1.0), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let sql = format!("SELECT SUM({name}(year_of_birth)) FROM patients");
        match engine.compile(&sql, budget).await {
            Err(QueryError::Refused { .. }) => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
}
