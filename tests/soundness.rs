//! Regression tests for issue #10's findings: nothing a researcher
//! observes (a reply, an error code, whether a release is held) may depend
//! on exact data except through a calibrated mechanism. Each test asks the
//! same question with a predicate that matches some patient and with one
//! that matches none, and checks that what comes back cannot tell them
//! apart except through noise. Finding 4 (timing) is in `timing.rs`, the
//! exact-rules finding (5) in `governance.rs`.

use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use tre_core::{Code, Role};
use tre_e2e::{authed, engine_with, fixture, start};
use tre_proto::v1 as pb;
use tre_proto::v1::query_service_client::QueryServiceClient;
use tre_proto::v1::release_service_client::ReleaseServiceClient;
use tre_query::Measure;

const PROJECT: &str = "p10";
/// Matches patients in the fixture / matches nobody.
const SOME: &str = "p.year_of_birth = 1950";
const NONE: &str = "p.year_of_birth = 1800";

use tre_e2e::status_code as code_of;

fn ask(sql: &str, epsilon: f64) -> pb::QueryRequest {
    pb::QueryRequest {
        project: PROJECT.into(),
        sql: sql.into(),
        epsilon: Some(epsilon),
        delta: None,
        totals: false,
        dataset: String::new(),
    }
}

/// What a researcher can see of a reply, noise aside: an answer, or the
/// refusal's code.
fn observable(r: &Result<tonic::Response<pb::QueryResponse>, tonic::Status>) -> String {
    match r {
        Ok(_) => "answered".to_owned(),
        Err(s) => format!("refused {}", code_of(s)),
    }
}

/// Issue #10, finding 1: operations that used to fail on some value are
/// total, so whether some patient matches cannot change the outcome. And a
/// vanishing epsilon is refused for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_errors_are_no_oracle() {
    let server = start(&[(PROJECT, &["alice"], 1000.0)]).await;
    let (mut q, _) = server.clients().await;
    let alice = server.token("alice", Role::Researcher);
    let oracles = [
        "SELECT COUNT(*) FROM patients p WHERE 1 / (CASE WHEN {pred} THEN 0 ELSE 1 END) = 1",
        "SELECT COUNT(*) FROM patients p WHERE p.imd_quintile % (CASE WHEN {pred} THEN 0 ELSE 7 END) = 1",
        "SELECT COUNT(*) FROM patients p WHERE CAST(CASE WHEN {pred} THEN 'x' ELSE '1' END AS BIGINT) = 1",
        "SELECT COUNT(*) FROM patients p WHERE make_date(2024, CASE WHEN {pred} THEN 13 ELSE 1 END, 1) IS NOT NULL",
        "SELECT COUNT(*) FROM patients p WHERE to_date(CASE WHEN {pred} THEN 'bad' ELSE '2024-01-01' END) IS NOT NULL",
        "SELECT COUNT(*) FROM patients p WHERE substr(p.sex, 1, CASE WHEN {pred} THEN -1 ELSE 1 END) IS NOT NULL",
        "SELECT COUNT(*) FROM patients p WHERE lpad(p.sex, CASE WHEN {pred} THEN 2147483648 ELSE 1 END, 'x') IS NOT NULL",
        "SELECT COUNT(*) FROM patients p WHERE abs(CASE WHEN {pred} THEN -9223372036854775807 - 1 ELSE 1 END) > 0",
        "SELECT COUNT(*) FROM patients p WHERE power(CASE WHEN {pred} THEN 10 ELSE 1 END, 40) > 0",
        "SELECT COUNT(*) FROM patients p WHERE sqrt(CASE WHEN {pred} THEN -1 ELSE 1 END) > 0",
    ];
    for (i, template) in oracles.iter().enumerate() {
        let mut seen = Vec::new();
        for pred in [SOME, NONE] {
            // A distinct epsilon per call, so no reply is a free repeat.
            let eps = 0.01 + 0.001 * (i * 2 + seen.len()) as f64;
            let r = q
                .submit(authed(ask(&template.replace("{pred}", pred), eps), &alice))
                .await;
            if let Err(s) = &r {
                assert_ne!(
                    code_of(s),
                    Code::ExecutionFailed.as_str(),
                    "{template}: {s:?}"
                );
            }
            seen.push(observable(&r));
        }
        assert_eq!(seen[0], seen[1], "{template}: {seen:?}");
    }
    let tiny = q
        .submit(authed(ask("SELECT COUNT(*) FROM patients", 1.5e-9), &alice))
        .await
        .expect_err("below the floor");
    assert_eq!(code_of(&tiny), Code::EpsilonBelowFloor.as_str());
}

/// Issue #10, finding 2: a sum that exceeds 64 bits saturates instead of
/// failing, so the overflow check is no counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_saturate_instead_of_failing() {
    let server = start(&[(PROJECT, &["alice"], 100.0)]).await;
    let (mut q, _) = server.clients().await;
    let alice = server.token("alice", Role::Researcher);
    for (i, pred) in ["TRUE", NONE].iter().enumerate() {
        let sql = format!(
            "SELECT SUM(CASE WHEN {pred} THEN 89000000000000 ELSE 0 END) AS s FROM patients p"
        );
        let r = q
            .submit(authed(ask(&sql, 0.5 + i as f64 * 0.1), &alice))
            .await;
        assert!(r.is_ok(), "{sql}: {r:?}");
    }
}

/// Issue #10, finding 3: NULL is a group too. A per-patient feature keyed
/// by CASE ... END (NULL when no branch matches) over a self-join is
/// credited with the rows a patient can really own (two keys, two values
/// each: 4), and a key that is always NULL is no internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_keys_count_as_groups() {
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    for (sql, rows) in [
        (
            "WITH c AS (SELECT l1.person_id, CASE WHEN l1.value > 40 THEN 1 END AS k1, CASE WHEN l2.value > 40 THEN 1 END AS k2 FROM lab_results l1 JOIN lab_results l2 ON l1.person_id = l2.person_id GROUP BY 1, 2, 3) SELECT COUNT(*) FROM c",
            4,
        ),
        (
            "WITH c AS (SELECT person_id, NULLIF(test, 'HbA1c') AS t FROM lab_results GROUP BY 1, 2) SELECT COUNT(*) FROM c",
            3,
        ),
        (
            "WITH c AS (SELECT person_id, CASE WHEN value > 40 THEN NULL END AS k FROM lab_results GROUP BY 1, 2) SELECT COUNT(*) FROM c",
            1,
        ),
    ] {
        let plan = engine
            .compile(sql, budget)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(plan.max_rows_per_unit(), rows, "{sql}");
        assert!(
            plan.description()
                .iter()
                .any(|d| d.contains(&format!("at most {rows} row(s) per patient"))),
            "{:?}",
            plan.description()
        );
    }
}

/// Issue #10, finding 6: a count written as a sum is judged as a count, and
/// a sum or a median is judged by a noisy count of its contributors: small
/// groups are suppressed whatever the aggregate is called.
///
/// Which cells are suppressed is itself noisy, so it is compared
/// statistically: each small-group query runs `RUNS` times, and the number
/// of releases must stay within the binomial tail (1e-6) of the release
/// probability that the deciding measurement's discrete Laplace noise
/// gives for the cell's exact count. (The first version asserted one draw
/// and failed in CI: a noisy count of 0 contributors, at scale 5, clears 10
/// about one time in 15.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_in_disguise_meet_the_profile() {
    const RUNS: u64 = 30;
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(2.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = |sql: &'static str| {
        let engine = &engine;
        async move {
            let plan = engine
                .compile(sql, budget)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let r = engine
                .execute(&plan)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            match &r.rows[0][0] {
                tre_query::Cell::Value { status, reason, .. } => (*status, reason.clone()),
                other => panic!("{other:?}"),
            }
        }
    };
    // (query, the measurement that decides, the reason a suppression gives)
    type Decides = fn(&Measure) -> bool;
    let small: [(&str, Decides, &str); 3] = [
        // A handful of patients (fewer than 10 for certain): judged as a
        // count would be.
        (
            "SELECT SUM(CASE WHEN TRUE THEN 1 ELSE 0 END) FROM patients p WHERE p.year_of_birth = 1950 AND p.region = 'London' AND p.sex = 'F'",
            |m| matches!(m, Measure::Sum { .. }),
            "threshold",
        ),
        (
            "SELECT MEDIAN(rtt_weeks) FROM waiting_list WHERE rtt_weeks > 103.9",
            |m| matches!(m, Measure::CountRows | Measure::CountNonNull { .. }),
            "minimum patients",
        ),
        (
            "SELECT SUM(length_of_stay_days * 3 + 1) FROM admissions WHERE length_of_stay_days > 360",
            |m| matches!(m, Measure::Contributors { .. }),
            "minimum patients",
        ),
    ];
    let threshold = 10.0;
    for (sql, decides, why_prefix) in small {
        let plan = engine
            .compile(sql, budget)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let exact = engine
            .exact(sql, budget, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let measures = plan.measures();
        let m = measures
            .iter()
            .position(|(measure, ..)| decides(measure))
            .unwrap_or_else(|| panic!("{sql}: no deciding measure in {measures:?}"));
        let col = measures[..m]
            .iter()
            .filter(|(measure, ..)| !matches!(measure, Measure::Quantile { .. }))
            .count();
        let unit = if matches!(measures[m].0, Measure::Sum { .. }) {
            tre_query::FIXED_POINT_SCALE
        } else {
            1.0
        };
        let c = exact.laplace.values().next().map_or(0, |v| v[col]) as f64;
        assert!(
            c < (threshold - 1.0) * unit,
            "{sql}: the group is not small ({c})"
        );
        let scale = plan.laplace_scale(m).unwrap_or_else(|| panic!("{sql}"));
        // P(X ≥ k) = t^k / (1 + t) for discrete Laplace, t = e^(−1/scale);
        // k is one unit short of the threshold to cover rounding.
        let t = (-1.0 / scale).exp();
        let k = ((threshold - 1.0) * unit - c).ceil();
        let p = t.powf(k) / (1.0 + t);
        let most = binomial_upper(RUNS, p, 1e-6);
        let mut released = 0;
        for _ in 0..RUNS {
            let (s, why) = run(sql).await;
            if s == tre_query::CellStatus::Suppressed {
                assert!(why.starts_with(why_prefix), "{sql}: {why}");
            } else {
                released += 1;
            }
        }
        eprintln!(
            "{sql}: exact {c}, scale {scale:.2}, p {p:.4}, released {released}/{RUNS}, bound {most}"
        );
        assert!(
            released <= most,
            "{sql}: released {released} of {RUNS} times; at most {most} expected (p = {p:.3})"
        );
    }
    // And large groups are released.
    let (s, _) = run("SELECT SUM(length_of_stay_days) FROM admissions").await;
    assert_eq!(s, tre_query::CellStatus::Released);
    let (s, _) = run("SELECT SUM(died_28d) FROM admissions").await;
    assert_eq!(
        s,
        tre_query::CellStatus::Rounded,
        "a sum of 0/1 values is a count: rounded"
    );
}

/// The least `x` with P(Binomial(n, p) > x) < `tail`.
fn binomial_upper(n: u64, p: f64, tail: f64) -> u64 {
    use statrs::distribution::{Binomial, DiscreteCDF};
    let b = Binomial::new(p.clamp(0.0, 1.0), n).unwrap_or_else(|e| panic!("{e}"));
    (0..=n).find(|&x| b.sf(x) < tail).unwrap_or(n)
}

/// Issue #10, finding 7: ROLLUP/CUBE/GROUPING SETS are refused with a code;
/// a share of the total over released cells is post-processing and runs;
/// and a withdrawn release does not block the same query forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_windows_and_withdrawn_releases() {
    let server = start(&[(PROJECT, &["alice"], 100.0)]).await;
    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut r = ReleaseServiceClient::new(ch);
    let alice = server.token("alice", Role::Researcher);
    for sql in [
        "SELECT region, COUNT(*) FROM patients GROUP BY ROLLUP(region)",
        "SELECT region, sex, COUNT(*) FROM patients GROUP BY CUBE(region, sex)",
        "SELECT region, sex, COUNT(*) FROM patients GROUP BY GROUPING SETS ((region), (sex))",
    ] {
        let s = q
            .submit(authed(ask(sql, 0.5), &alice))
            .await
            .expect_err(sql);
        assert_eq!(code_of(&s), Code::UnsupportedShape.as_str(), "{sql}");
    }
    assert!((server.spent(PROJECT)).abs() < 1e-12, "refusals are free");

    let share = "SELECT region, n, n * 1.0 / SUM(n) OVER () AS share FROM (SELECT region, COUNT(*) AS n FROM patients GROUP BY region) t";
    let reply = q
        .submit(authed(ask(share, 1.0), &alice))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .into_inner();
    assert_eq!(reply.status(), pb::ReleaseStatus::Released);
    assert_eq!(reply.rows.len(), 7);
    let total: f64 = reply
        .rows
        .iter()
        .filter_map(|row| match &row.cells[2].content {
            Some(pb::cell::Content::Value(v)) => v.value,
            _ => None,
        })
        .sum();
    assert!(
        (total - 1.0).abs() < 1e-9,
        "shares of released cells: {total}"
    );

    // Small cells: held. Withdraw it, and the same query runs again.
    let small = "SELECT age_band, sex, COUNT(*) AS n FROM patients WHERE year_of_birth > 2010 GROUP BY age_band, sex";
    let first = q
        .submit(authed(ask(small, 0.5), &alice))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .into_inner();
    assert_eq!(first.status(), pb::ReleaseStatus::Held);
    r.withdraw_release(authed(
        pb::ReviewReleaseRequest {
            id: first.release_id.clone(),
            reason: "wrong bands".into(),
        },
        &alice,
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    let spent = server.spent(PROJECT);
    let again = q
        .submit(authed(ask(small, 0.5), &alice))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .into_inner();
    assert!(
        !again.repeated,
        "a withdrawn release must not answer for the query"
    );
    assert_ne!(again.release_id, first.release_id);
    assert!(
        (server.spent(PROJECT) - spent - 0.5).abs() < 1e-9,
        "charged again"
    );
}

/// Issue #10, found by the fuzzer in CI: an equality filter on a text column
/// (which the scan NULLs past its length limit) above DP key selection made
/// DataFusion drop a sort it then refused to run without, after the
/// reservation. Whatever DataFusion's physical planner decides must be
/// decided at compile time, free, and on the query alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_selection_under_an_equality_filter_runs() {
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), Some(1e-7))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut failed = Vec::new();
    for sql in [
        "SELECT t.*, t.a0 * 1.0 / SUM(t.a0) OVER () AS share FROM (SELECT COALESCE(t1.specialty, 'none') AS g0, SUM(CASE WHEN t1.referral_date > DATE '2025-12-31' THEN 1 ELSE 0 END) AS a0, AVG(clamp(date_part('year', COALESCE(t1.referral_date, DATE '2024-01-01')), 0, 200)) AS a1 FROM waiting_list t1 WHERE t1.specialty IN ('obstetrics', 'obstetrics') GROUP BY 1) t",
        "SELECT COALESCE(w.specialty, 'none') AS g, COUNT(*) FROM waiting_list w WHERE w.specialty = 'obstetrics' GROUP BY 1",
        "SELECT COALESCE(a.primary_diagnosis, 'none') AS g, COUNT(*) FROM admissions a WHERE a.primary_diagnosis = 'U07.1' GROUP BY 1",
        "SELECT a.admission_date, COUNT(*) FROM admissions a WHERE a.admission_date = DATE '2024-03-01' GROUP BY 1",
    ] {
        let plan = engine
            .compile(sql, budget)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        if let Err(e) = engine.execute(&plan).await {
            failed.push(format!("{sql}: {e:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// DP MIN and MAX (issue #12) are OpenDP's private 0- and 1-quantiles.
/// The released MIN is always within the column's bounds, and at or below
/// the exact value of rank `RANKS` (counting from the smallest) unless the
/// mechanism's rank error exceeds `RANKS`, up to one step of its candidate
/// grid; likewise MAX from the top. The tolerance: at most 2 of 20 runs
/// may miss. (Measured on the fixture at
/// ε = 2: 20 of 20 MINs fell between the bound 1920 and the exact minimum
/// 1925, and every MAX within 0.3 of the exact maximum, the bound 2024.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_and_max_land_between_the_bound_and_the_extreme() {
    const RUNS: usize = 20;
    const RANKS: usize = 50;
    let (lo, hi) = (1920.0, 2024.0); // the policy's bounds on year_of_birth
    // The mechanism's candidates are 401 equal steps of the bounds.
    let step = (hi - lo) / 400.0;
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let batches = engine
        .sandbox_context()
        .sql("SELECT CAST(year_of_birth AS DOUBLE) AS y FROM patients WHERE year_of_birth IS NOT NULL ORDER BY y")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let years: Vec<f64> = batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
                .values()
                .to_vec()
        })
        .collect();
    assert!(years.len() > 2 * RANKS);
    let (low, high) = (years[RANKS], years[years.len() - 1 - RANKS]);
    let budget = engine
        .budget(Some(2.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let plan = engine
        .compile(
            "SELECT MIN(year_of_birth) AS earliest, MAX(year_of_birth) AS latest FROM patients",
            budget,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<String> = plan.columns().into_iter().map(|c| c.kind).collect();
    assert_eq!(kinds, ["min", "max"]);
    let mut close = 0;
    for _ in 0..RUNS {
        let r = engine
            .execute(&plan)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let value = |i: usize| match &r.rows[0][i] {
            tre_query::Cell::Value { value: Some(v), .. } => *v,
            other => panic!("not released: {other:?}"),
        };
        let (min, max) = (value(0), value(1));
        assert!(
            (lo..=hi).contains(&min) && (lo..=hi).contains(&max),
            "{min} {max}"
        );
        close += usize::from(min <= low + step && max >= high - step);
    }
    assert!(
        close >= RUNS - 2,
        "only {close} of {RUNS} runs released MIN ≤ {low} + {step} and MAX ≥ {high} − {step}"
    );
}

/// The compiler's check that every private scan is bounded (issue #12:
/// it used to count window nodes) finds an unbounded scan in a plain
/// DataFusion plan, and none in any plan it accepts. Since issue #13 the
/// admissions extract is bounded and cleared of opt-outs when written, so
/// even a raw scan of it is bounded; the patients extract keeps its
/// opted-out patients, flagged, so a raw scan of it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_private_scan_is_bounded() {
    use tre_query::soundness::{executed_plan, unbounded_scans};
    let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    let sql = "SELECT p.sex, COUNT(*) FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.sex";
    let raw = engine
        .sandbox_context()
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_unoptimized_plan();
    let mut found = unbounded_scans(&engine, &raw);
    found.sort();
    assert_eq!(found, ["patients"]);
    let (plan, _) = tre_e2e::compiled(&engine, sql).await;
    assert!(unbounded_scans(&engine, executed_plan(&plan)).is_empty());
}

/// Issue #13: a policy tightened below the extract's stored bound is
/// enforced per query. The tightened table's scan gets the shuffled window
/// again, no patient contributes more rows than the new bound, and a table
/// whose stored bound is within the policy needs no window at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_tighter_than_the_extract_is_bounded_per_query() {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::LogicalPlan;
    use tre_query::soundness::{executed_plan, unbounded_scans};
    let master = Arc::clone(&fixture().master);
    let tight_text = tre_e2e::POLICY.replace("max_rows_per_unit = 6", "max_rows_per_unit = 1");
    assert_ne!(tight_text, tre_e2e::POLICY, "the lab results bound is 6");
    let tight_policy =
        tre_policy::Policy::from_toml("tight.toml", &tight_text).unwrap_or_else(|e| panic!("{e}"));
    let tight = tre_e2e::engine_under(tight_policy, &fixture().data, Arc::clone(&master))
        .unwrap_or_else(|e| panic!("{e}"));
    let normal = engine_with(master).unwrap_or_else(|e| panic!("{e}"));
    let sql =
        "SELECT COUNT(*) AS n FROM lab_results l JOIN patients p ON l.person_id = p.person_id";
    let mut rows = Vec::new();
    for engine in [&tight, &normal] {
        let (plan, budget) = tre_e2e::compiled(engine, sql).await;
        let executed = executed_plan(&plan);
        assert!(unbounded_scans(engine, executed).is_empty());
        let mut windows = 0;
        let _ = executed.apply(|node| {
            if matches!(node, LogicalPlan::Window(_)) {
                windows += 1;
            }
            Ok(TreeNodeRecursion::Continue)
        });
        rows.push(windows);
        let exact = engine
            .exact(sql, budget, &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let n = exact
            .laplace
            .values()
            .next()
            .and_then(|v| v.first().copied())
            .unwrap_or_else(|| panic!("one cell: {exact:?}"));
        rows.push(usize::try_from(n).unwrap_or_else(|e| panic!("{e}")));
    }
    let (tight_windows, tight_n, normal_windows, normal_n) = (rows[0], rows[1], rows[2], rows[3]);
    assert_eq!(
        (tight_windows, normal_windows),
        (1, 0),
        "only lab_results is bounded again"
    );
    assert!(
        tight_n <= tre_e2e::PATIENTS as usize && tight_n < normal_n,
        "{tight_n} lab results under a bound of 1 (of {normal_n})"
    );
}

/// Issue #13: where an extract still holds opted-out patients (written
/// without removing them, or before the opt-out list changed), every scan
/// filters them out per query. Rows added for an opted-out patient change
/// no exact aggregate; rows added for a patient who did not opt out do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_outs_an_extract_still_holds_are_filtered_per_query() {
    use datafusion::arrow::array::RecordBatch;
    let f = fixture();
    let opted_out = tre_e2e::opted_out(&f.data);
    let one_out = opted_out
        .iter()
        .min()
        .cloned()
        .unwrap_or_else(|| panic!("nobody opted out"));
    let one_in = tre_e2e::read_extract(&f.data, "patients", &f.master)[0]
        .column(0)
        .as_string::<i32>()
        .iter()
        .flatten()
        .find(|id| !opted_out.contains(*id))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("everybody opted out"));
    let base = tre_e2e::read_extract(&f.data, "admissions", &f.master);
    let sql = "SELECT COUNT(*) AS n FROM admissions";
    let mut counts = Vec::new();
    for extra in [None, Some(&one_out), Some(&one_in)] {
        let (_copy, data) = tre_e2e::copy_of_fixture();
        let mut batches = base.clone();
        if let Some(id) = extra {
            // Two admissions copied from the first rows, under `id`.
            let first = base[0].slice(0, 2);
            let mut columns = first.columns().to_vec();
            columns[0] = Arc::new(datafusion::arrow::array::StringArray::from(vec![
                id.as_str();
                2
            ]));
            batches.push(
                RecordBatch::try_new(first.schema(), columns).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        tre_e2e::write_extract(&data, "admissions", &f.master, &batches);
        let engine =
            tre_e2e::engine_on(&data, Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
        let (plan, budget) = tre_e2e::compiled(&engine, sql).await;
        let exact = engine
            .exact(sql, budget, &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!(
            "{}",
            tre_query::soundness::executed_plan(&plan).display_indent()
        );
        // Rewritten without removing opt-outs, the extract needs the filter.
        assert!(shown.contains("__tre_admitted"), "{shown}");
        counts.push(
            exact
                .laplace
                .values()
                .next()
                .and_then(|v| v.first().copied()),
        );
    }
    assert_eq!(
        counts[0], counts[1],
        "an opted-out patient's rows were counted"
    );
    assert_eq!(
        counts[0].map(|n| n + 2),
        counts[2],
        "a patient's own rows were not counted"
    );
}
