//! The conformance corpus and the sensitivity soundness test (issue #3).
//!
//! Cases live in `tests/corpus/*.toml`; the exact outcome of each (plan
//! shape and cost, or refusal code) is pinned in the matching `.expected`
//! file, under the case's name and with its SQL echoed. `TRE_BLESS=1
//! cargo test --workspace --test e2e corpus` rewrites those files; review
//! the diff like any other change.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use serde::Deserialize;
use tre_e2e::{engine_with, fixture};
use tre_query::soundness::ExactRelease;
use tre_query::{Budget, Engine, Measure, PrivatePlan};

#[derive(Deserialize)]
struct File {
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    /// Unique within its file: the key of its pinned outcome, so adding a
    /// case renumbers nothing (issue #12).
    name: String,
    sql: String,
    /// "accept" (default) or the expected refusal code.
    #[serde(default)]
    expect: Option<String>,
    epsilon: Option<f64>,
    delta: Option<f64>,
    #[serde(default)]
    adversarial: bool,
}

const FILES: [&str; 2] = ["accepted", "refused"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// Every case of every file: an accepted case counts wherever it sits
/// (the most adversarial accepted queries are in `refused.toml`).
fn all_cases() -> Vec<Case> {
    FILES.into_iter().flat_map(load).collect()
}

fn load(name: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(dir().join(format!("{name}.toml")))
        .unwrap_or_else(|e| panic!("{name}.toml: {e}"));
    toml::from_str::<File>(&text)
        .unwrap_or_else(|e| panic!("{name}.toml: {e}"))
        .case
}

async fn compile(engine: &Engine, c: &Case) -> Result<(PrivatePlan, Budget), String> {
    let budget = engine
        .budget(c.epsilon, c.delta)
        .map_err(|e| e.code().to_string())?;
    engine
        .compile(&c.sql, budget)
        .await
        .map(|p| (p, budget))
        .map_err(|e| e.code().to_string())
}

fn outcome(r: &Result<(PrivatePlan, Budget), String>) -> String {
    match r {
        Ok((p, _)) => format!(
            "accept epsilon={} delta={:e} {}",
            p.epsilon(),
            p.delta().value(),
            p.shape()
        ),
        Err(code) => format!("refuse {code}"),
    }
}

/// A `.expected` file: case name → (outcome, SQL). Each case is two
/// lines: `name outcome`, then its SQL indented by four spaces.
fn pinned_outcomes(text: &str) -> BTreeMap<&str, (String, &str)> {
    let mut pinned = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(head) = lines.next() {
        let (name, outcome) = head.split_once(' ').unwrap_or((head, ""));
        let sql = lines.next().unwrap_or_default().trim_start();
        pinned.insert(name, (outcome.to_owned(), sql));
    }
    pinned
}

/// Every case is accepted or refused as its author intended, with exactly
/// the pinned plan shape, cost or code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_corpus() {
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let bless = std::env::var_os("TRE_BLESS").is_some();
    let (mut accepted, mut refused, mut adversarial) = (0, 0, 0);
    let mut failures = Vec::new();
    for name in FILES {
        let cases = load(name);
        let mut actual = String::new();
        let mut pinned_now = BTreeMap::new();
        for c in &cases {
            let r = compile(&engine, c).await;
            let got = outcome(&r);
            let _ = writeln!(actual, "{} {got}\n    {}", c.name, c.sql);
            if pinned_now
                .insert(c.name.as_str(), (got.clone(), c.sql.as_str()))
                .is_some()
            {
                failures.push(format!("{name}: two cases are named {}", c.name));
            }
            let intended = c.expect.as_deref().unwrap_or("accept");
            let ok = match &r {
                Ok(_) => intended == "accept",
                Err(code) => intended == code,
            };
            if !ok {
                failures.push(format!(
                    "{name}/{} {}: wanted {intended}, got {got}",
                    c.name, c.sql
                ));
            }
            match r {
                Ok(_) => accepted += 1,
                Err(_) => refused += 1,
            }
            adversarial += usize::from(c.adversarial);
        }
        let path = dir().join(format!("{name}.expected"));
        if bless {
            std::fs::write(&path, &actual).unwrap_or_else(|e| panic!("{e}"));
        } else {
            let expected = std::fs::read_to_string(&path).unwrap_or_default();
            let pinned = pinned_outcomes(&expected);
            for (case, (got, sql)) in &pinned_now {
                match pinned.get(case) {
                    Some((want, _)) if want != got => {
                        failures.push(format!("{name}/{case}: pinned `{want}` but got `{got}`"))
                    }
                    Some((_, was)) if was != sql => failures.push(format!(
                        "{name}/{case}: its SQL changed; rerun with TRE_BLESS=1"
                    )),
                    Some(_) => {}
                    None => failures.push(format!(
                        "{name}/{case} is not pinned; rerun with TRE_BLESS=1"
                    )),
                }
            }
            for case in pinned.keys() {
                if !pinned_now.contains_key(case) {
                    failures.push(format!(
                        "{name}.expected pins {case}, which is no case; rerun with TRE_BLESS=1"
                    ));
                }
            }
        }
    }
    println!("corpus: {accepted} accepted, {refused} refused, {adversarial} adversarial");
    assert!(accepted + refused >= 150 && adversarial >= 50);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The 20 patients with the most rows across all tables.
pub(crate) async fn heaviest_patients(engine: &Engine) -> Vec<String> {
    let ctx = engine.sandbox_context();
    let batches = ctx
        .sql(
            "SELECT person_id, COUNT(*) AS n FROM (
                SELECT person_id FROM admissions UNION ALL SELECT person_id FROM lab_results
                UNION ALL SELECT person_id FROM waiting_list UNION ALL SELECT person_id FROM patients)
             GROUP BY person_id ORDER BY n DESC, person_id LIMIT 20",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for b in &batches {
        let ids = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ids = ids.as_string::<i32>();
        out.extend((0..b.num_rows()).map(|i| ids.value(i).to_owned()));
    }
    out
}

/// Cells present in either release, once each.
fn union_keys<'a, V>(a: &'a HashMap<String, V>, b: &'a HashMap<String, V>) -> Vec<&'a String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys
}

fn l1(a: &HashMap<String, Vec<i64>>, b: &HashMap<String, Vec<i64>>, col: usize) -> i64 {
    union_keys(a, b)
        .iter()
        .map(|k| {
            let x = a.get(*k).map_or(0, |v| v[col]);
            let y = b.get(*k).map_or(0, |v| v[col]);
            (x - y).abs()
        })
        .sum()
}

/// What breaks between the exact aggregates of `sql` on the dataset
/// (`full`) and on the dataset without `patient`: a Laplace measure that
/// moves by more than its L1 sensitivity over all cells, a quantile
/// histogram that changes by more than the rows per patient, or a key
/// selection that touches more than `max_groups_per_unit` keys or moves one
/// by more than 1. Each with its class, and a run that fails is a failure.
pub(crate) async fn neighbour_failures(
    engine: &Engine,
    sql: &str,
    budget: Budget,
    plan: &PrivatePlan,
    full: &ExactRelease,
    patient: &str,
) -> Vec<(&'static str, String)> {
    let mut failures = Vec::new();
    let without = match engine.exact(sql, budget, &[patient.to_owned()]).await {
        Ok(w) => w,
        Err(e) => {
            return vec![(
                "execution error",
                format!("{sql} (without {patient}): {e:?}"),
            )];
        }
    };
    let laplace: Vec<(Measure, i64)> = plan
        .measures()
        .into_iter()
        .filter(|(m, _, _)| !matches!(m, Measure::Quantile { .. }))
        .map(|(m, s, _)| (m, s))
        .collect();
    for (col, (m, s)) in laplace.iter().enumerate() {
        let d = l1(&full.laplace, &without.laplace, col);
        if d > *s {
            failures.push((
                "sensitivity exceeded",
                format!("{sql}: {m:?} changed by {d} > sensitivity {s}"),
            ));
        }
    }
    let k = plan.max_rows_per_unit();
    for (h, hw) in full.histograms.iter().zip(&without.histograms) {
        let mut rows = 0u64;
        for key in union_keys(h, hw) {
            let mut counts: HashMap<i64, i64> = HashMap::new();
            for (b, n) in h.get(key).into_iter().flatten() {
                *counts.entry(*b).or_default() += *n as i64;
            }
            for (b, n) in hw.get(key).into_iter().flatten() {
                *counts.entry(*b).or_default() -= *n as i64;
            }
            rows += counts.values().map(|v| v.unsigned_abs()).sum::<u64>();
        }
        if rows > k {
            failures.push((
                "sensitivity exceeded",
                format!("{sql}: quantile rows changed {rows} > {k}"),
            ));
        }
    }
    if let Some((_, _, g)) = plan.key_selection() {
        let diffs: Vec<i64> = union_keys(&full.selection, &without.selection)
            .iter()
            .map(|key| {
                full.selection.get(*key).copied().unwrap_or(0)
                    - without.selection.get(*key).copied().unwrap_or(0)
            })
            .collect();
        let touched = diffs.iter().filter(|d| **d != 0).count() as u64;
        if touched > u64::from(g) || diffs.iter().any(|d| d.abs() > 1) {
            failures.push((
                "sensitivity exceeded",
                format!("{sql}: key selection changed {touched} keys > {g}"),
            ));
        }
    }
    failures
}

/// For every accepted case, in any file (issue #12): the exact pre-noise aggregates on the dataset
/// and on the dataset without each of the 20 patients with the most rows
/// never differ by more than the sensitivity the compiler declared (L1 over
/// all cells for Laplace measurements; rows changed for quantiles; groups
/// touched for key selection). Bounding is made a deterministic function of
/// each row so that removing one patient leaves everyone else's rows alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitivity_is_sound() {
    let mut engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    engine.set_deterministic_bounding(Some(7));
    let heavy = heaviest_patients(&engine).await;
    assert_eq!(heavy.len(), 20);
    let mut checked = 0;
    let mut failures = Vec::new();
    for c in all_cases() {
        let Ok((plan, budget)) = compile(&engine, &c).await else {
            continue;
        };
        let full = engine
            .exact(&c.sql, budget, &[])
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.sql));
        for p in &heavy {
            for (_, f) in neighbour_failures(&engine, &c.sql, budget, &plan, &full, p).await {
                failures.push(f);
            }
        }
        checked += 1;
    }
    println!(
        "sensitivity checked for {checked} accepted queries × {} patients",
        heavy.len()
    );
    assert!(checked >= 90, "only {checked} accepted queries checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every accepted case, in any file, runs end to end (noise, SDC, post-processing) and
/// releases exactly the columns it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_corpus_executes() {
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for c in all_cases() {
        let Ok((plan, _)) = compile(&engine, &c).await else {
            continue;
        };
        match engine.execute(&plan).await {
            Ok(r) => {
                if r.rows.iter().any(|row| row.len() != r.columns.len()) {
                    failures.push(format!("{}: ragged release", c.sql));
                }
            }
            Err(e) => failures.push(format!("{}: {e:?}", c.sql)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
