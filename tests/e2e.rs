//! End-to-end tests: a real gateway on 127.0.0.1:0, driven over gRPC exactly
//! as a client would (issue #2).

use std::collections::HashMap;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use tre_core::{Code, Role};
use tre_e2e::{authed, fixture, start};
use tre_proto::v1 as pb;

mod audit;
mod corpus;
mod flight;
mod fuzz;
mod governance;
mod import;
mod pipeline;
mod robustness;
mod soundness;
mod tidy;
mod timing;
mod totality;

const PROJECT: &str = "p1";

fn value(c: &pb::Cell) -> &pb::Value {
    match &c.content {
        Some(pb::cell::Content::Value(v)) => v,
        other => panic!("not a value: {other:?}"),
    }
}

fn key(c: &pb::Cell) -> &str {
    match &c.content {
        Some(pb::cell::Content::Key(k)) => k,
        other => panic!("not a key: {other:?}"),
    }
}

use tre_e2e::status_code as code_of;

/// Intervals cover the exact answer about 95% of the time. The query reads
/// `patients` (one row per patient, so bounding drops nothing and the exact
/// answer is fixed). 100 releases × 7 regions = 700 count cells at scale 15
/// (expected coverage ≈ 95.5% including the rounding slack); the bounds
/// [0.925, 0.985] are more than 3.5 standard errors (0.0078) away, so a
/// false failure has probability below 1e-3. Mean intervals are Bonferroni
/// bounds and must cover at least 93%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_query_intervals_cover_the_exact_answer() {
    let server = start(&[(PROJECT, &["alice"], 1000.0)]).await;
    let (mut q, _) = server.clients().await;
    let token = server.token("alice", Role::Researcher);

    let ctx = server.state.engines.now().first().sandbox_context();
    let exact = ctx
        .sql("SELECT region, COUNT(*) AS n, AVG(year_of_birth) AS m FROM patients WHERE NOT research_opt_out GROUP BY region")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut truth: HashMap<String, (f64, f64)> = HashMap::new();
    for b in &exact {
        let regions = b
            .column(0)
            .as_string_view_opt()
            .map(|a| {
                (0..a.len())
                    .map(|i| a.value(i).to_owned())
                    .collect::<Vec<_>>()
            })
            .or_else(|| {
                b.column(0)
                    .as_string_opt::<i32>()
                    .map(|a| (0..a.len()).map(|i| a.value(i).to_owned()).collect())
            })
            .unwrap_or_else(|| panic!("region type {}", b.column(0).data_type()));
        let n = b.column(1).as_primitive::<Int64Type>();
        let m = b.column(2).as_primitive::<Float64Type>();
        for (i, r) in regions.into_iter().enumerate() {
            truth.insert(r, (n.value(i) as f64, m.value(i)));
        }
    }
    assert_eq!(truth.len(), 7);

    let (mut counts, mut count_hits, mut means, mut mean_hits) = (0, 0, 0, 0);
    for i in 0..100 {
        // An always-true filter that differs per query: an identical query
        // would get its stored release back (issue #4), not fresh noise.
        let sql = format!(
            "SELECT region, COUNT(*) AS n, AVG(year_of_birth) AS mean_yob FROM patients WHERE year_of_birth > {} GROUP BY region",
            1000 + i
        );
        let r = q
            .submit(authed(
                pb::QueryRequest {
                    project: PROJECT.into(),
                    sql,
                    epsilon: Some(0.2),
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                &token,
            ))
            .await
            .unwrap_or_else(|s| panic!("{s:?}"))
            .into_inner();
        assert_eq!(r.rows.len(), 7, "every public group is returned");
        for row in &r.rows {
            let (n, m) = truth[key(&row.cells[0])];
            let c = value(&row.cells[1]);
            let (lo, hi) = (c.ci_low.unwrap_or(f64::NAN), c.ci_high.unwrap_or(f64::NAN));
            counts += 1;
            if lo <= n && n <= hi {
                count_hits += 1;
            }
            let a = value(&row.cells[2]);
            if let (Some(lo), Some(hi)) = (a.ci_low, a.ci_high) {
                means += 1;
                if lo <= m && m <= hi {
                    mean_hits += 1;
                }
            }
            assert_eq!(c.status, pb::SdcStatus::Rounded as i32);
            assert_eq!(
                c.value.map(|v| v % 5.0),
                Some(0.0),
                "nhs_sde rounds counts to 5"
            );
        }
    }
    let coverage = count_hits as f64 / counts as f64;
    assert!(
        (0.925..=0.985).contains(&coverage),
        "count coverage {coverage}"
    );
    let mean_coverage = mean_hits as f64 / means as f64;
    assert!(
        means > 600 && mean_coverage >= 0.93,
        "mean coverage {mean_coverage} over {means}"
    );
    assert!((server.spent(PROJECT) - 20.0).abs() < 1e-6);
}

/// Each refusal returns its own stable code and charges nothing; every call
/// leaves one audit event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_return_their_code_and_cost_nothing() {
    let server = start(&[(PROJECT, &["alice"], 10.0), ("other", &["bob"], 10.0)]).await;
    let (mut q, _) = server.clients().await;
    let alice = server.token("alice", Role::Researcher);
    let cases: &[(&str, Option<f64>, Code)] = &[
        ("SELECT * FROM patients", None, Code::RowLevelSelect),
        (
            "SELECT sex, year_of_birth FROM patients WHERE sex = 'F'",
            None,
            Code::RowLevelSelect,
        ),
        (
            "SELECT person_id, COUNT(*) AS n FROM patients GROUP BY person_id",
            None,
            Code::IdentifierInOutput,
        ),
        (
            "SELECT COUNT(*) AS n FROM patients GROUP BY person_id",
            None,
            Code::IdentifierInGroupBy,
        ),
        (
            "SELECT COUNT(*) FROM admissions a, lab_results l WHERE a.person_id = l.person_id",
            None,
            Code::CrossJoin,
        ),
        (
            "SELECT COUNT(*) FROM patients WHERE person_id = 'P00'",
            None,
            Code::IdentifierInFilter,
        ),
        ("CREATE TABLE x (a INT)", None, Code::StatementNotAllowed),
        (
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp/x'",
            None,
            Code::StatementNotAllowed,
        ),
        (
            "INSERT INTO patients VALUES ('a')",
            None,
            Code::StatementNotAllowed,
        ),
        ("DROP TABLE patients", None, Code::StatementNotAllowed),
        (
            "COPY patients TO '/tmp/out.csv'",
            None,
            Code::StatementNotAllowed,
        ),
        (
            "SET datafusion.execution.batch_size = 1",
            None,
            Code::StatementNotAllowed,
        ),
        (
            "EXPLAIN SELECT COUNT(*) FROM patients",
            None,
            Code::ExplainNotAllowed,
        ),
        (
            "EXPLAIN ANALYZE SELECT COUNT(*) FROM patients",
            None,
            Code::ExplainNotAllowed,
        ),
        (
            "SELECT COUNT(*) FROM generate_series(1, 10)",
            None,
            Code::TableFunction,
        ),
        ("SELECT COUNT(*) FROM range(10)", None, Code::TableFunction),
        ("SELECT COUNT(*) FROM '/etc/passwd'", None, Code::FilePath),
        (
            "SELECT COUNT(*) FROM 'nhs_epr/patients.parquet'",
            None,
            Code::FilePath,
        ),
        ("SELECT COUNT(*) FROM secrets", None, Code::UnknownTable),
        (
            "SELECT COUNT(*) FROM patients p JOIN admissions a ON p.sex = a.specialty",
            None,
            Code::JoinNotOnPrivacyUnit,
        ),
        (
            "SELECT COUNT(*) FROM patients p, admissions a",
            None,
            Code::CrossJoin,
        ),
        (
            "SELECT MAX(DISTINCT year_of_birth) FROM patients",
            None,
            Code::UnsupportedAggregate,
        ),
        (
            "SELECT COUNT(*) FROM patients WHERE random() < 0.5",
            None,
            Code::FunctionNotAllowed,
        ),
        (
            "SELECT COUNT(*) FROM patients WHERE sex IN (SELECT sex FROM patients)",
            None,
            Code::SubqueryNotAllowed,
        ),
        (
            "SELECT SUM(CASE WHEN person_id = 'x' THEN 1 ELSE 0 END) FROM patients",
            None,
            Code::IdentifierInExpression,
        ),
        (
            "SELECT COUNT(*) FROM patients UNION SELECT COUNT(*) FROM admissions",
            None,
            Code::UnsupportedShape,
        ),
        (
            "SELECT COUNT(*) FROM patients; SELECT 1",
            None,
            Code::MultipleStatements,
        ),
        ("SELEC COUNT(*) FROM patients", None, Code::SqlSyntax),
        (
            "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
            Some(5.0),
            Code::EpsilonAboveCap,
        ),
        (
            "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
            Some(-1.0),
            Code::InvalidEpsilon,
        ),
    ];
    let mut seen = std::collections::HashSet::new();
    for (sql, eps, code) in cases {
        let before = server.audit_len();
        let s = q
            .submit(authed(
                pb::QueryRequest {
                    project: PROJECT.into(),
                    sql: (*sql).into(),
                    epsilon: *eps,
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                &alice,
            ))
            .await
            .expect_err(sql);
        assert_eq!(code_of(&s), code.as_str(), "{sql}: {}", s.message());
        assert!(
            s.message().starts_with(code.as_str()),
            "{sql}: {}",
            s.message()
        );
        assert_eq!(
            server.audit_len(),
            before + 1,
            "{sql}: one audit event per call"
        );
        seen.insert(*code);
    }
    assert_eq!(server.spent(PROJECT), 0.0, "refusals cost nothing");

    // Who may ask: unauthenticated, forged, wrong role, not a member.
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    let custodian = server.token("carol", Role::Custodian);
    let ok_sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
    let auth_cases: &[(&str, &str, Code, tonic::Code)] = &[
        (
            "",
            PROJECT,
            Code::Unauthenticated,
            tonic::Code::Unauthenticated,
        ),
        (
            &forged,
            PROJECT,
            Code::Unauthenticated,
            tonic::Code::Unauthenticated,
        ),
        (
            &custodian,
            PROJECT,
            Code::PermissionDenied,
            tonic::Code::PermissionDenied,
        ),
        // Another project's id gets the reply an unknown id gets, so a
        // researcher cannot probe which ids exist (issue #11).
        (
            &alice,
            "other",
            Code::UnknownProject,
            tonic::Code::PermissionDenied,
        ),
        (
            &alice,
            "nope",
            Code::UnknownProject,
            tonic::Code::PermissionDenied,
        ),
    ];
    for (token, project, code, grpc) in auth_cases {
        let before = server.audit_len();
        let s = q
            .submit(authed(
                pb::QueryRequest {
                    project: (*project).into(),
                    sql: ok_sql.into(),
                    epsilon: None,
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                token,
            ))
            .await
            .expect_err(project);
        assert_eq!(
            (code_of(&s), s.code()),
            (code.as_str().to_owned(), *grpc),
            "{project}: {}",
            s.message()
        );
        assert_eq!(
            s.message().matches("TRE-").count(),
            1,
            "one code per message: {}",
            s.message()
        );
        assert_eq!(server.audit_len(), before + 1);
    }
    assert_eq!(server.spent(PROJECT), 0.0);
    assert!(seen.len() >= 20, "distinct codes: {}", seen.len());
}

/// The ledger refuses what the budget cannot pay for, atomically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_exhaustion_is_refused() {
    let server = start(&[(PROJECT, &["alice"], 1.0)]).await;
    let (mut q, _) = server.clients().await;
    let t = server.token("alice", Role::Researcher);
    let sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
    let submit = |eps: f64| pb::QueryRequest {
        project: PROJECT.into(),
        sql: sql.into(),
        epsilon: Some(eps),
        delta: None,
        totals: false,
        dataset: String::new(),
    };
    let r = q
        .submit(authed(submit(0.6), &t))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!((r.epsilon_spent - 0.6).abs() < 1e-9 && (r.epsilon_remaining - 0.4).abs() < 1e-6);
    // Issue #4: the same plan at the same epsilon is the stored release, free.
    let again = q
        .submit(authed(submit(0.6), &t))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(again.repeated && again.epsilon_spent == 0.0);
    assert_eq!(
        (again.release_id.as_str(), &again.rows),
        (r.release_id.as_str(), &r.rows)
    );
    let s = q
        .submit(authed(
            pb::QueryRequest {
                sql: "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band".into(),
                ..submit(0.6)
            },
            &t,
        ))
        .await
        .expect_err("over budget");
    assert_eq!(
        (code_of(&s), s.code()),
        (
            Code::BudgetExhausted.as_str().to_owned(),
            tonic::Code::ResourceExhausted
        )
    );
    assert!(
        (server.spent(PROJECT) - 0.6).abs() < 1e-9,
        "refusal charged nothing"
    );
    q.submit(authed(submit(0.4), &t))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let s = q
        .submit(authed(submit(0.01), &t))
        .await
        .expect_err("exhausted");
    assert_eq!(code_of(&s), Code::BudgetExhausted.as_str());
    let b = q
        .budget(authed(
            pb::BudgetRequest {
                project: PROJECT.into(),
            },
            &t,
        ))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(b.epsilon_remaining.abs() < 1e-9 && (b.epsilon_spent - 1.0).abs() < 1e-9);
    let p = tre_core::ProjectId::new(PROJECT).unwrap_or_else(|e| panic!("{e}"));
    let ledger = server
        .state
        .store
        .ledger(&p)
        .unwrap_or_else(|e| panic!("{e}"));
    let charged: i64 = ledger.iter().map(|l| l.epsilon_nanos).sum();
    assert_eq!((ledger.len(), charged), (2, 1_000_000_000));
    assert!(
        ledger
            .iter()
            .all(|l| l.status == tre_store::LedgerStatus::Released && l.release_id.is_some())
    );
    assert!(
        server
            .state
            .store
            .verify_audit()
            .map(|r| r.is_intact())
            .unwrap_or(false)
    );
}

/// A query that fails after touching data is still charged, and the
/// researcher sees only a generic message; the detail goes to the audit log.
/// It is an incident (issue #10): the project is suspended, with its own
/// audit event, until a custodian resumes it, so a failure path that ever
/// depended on data could leak at most once per project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_touching_data_is_charged_and_generic() {
    let (_copy, data) = tre_e2e::copy_of_fixture();
    let server = tre_e2e::start_on(&data, &[(PROJECT, &["alice"], 5.0)]).await;
    // Damage the ciphertext of the admissions extract after start-up: the
    // footer still decrypts, the column pages no longer authenticate.
    let path = data.join("admissions.parquet");
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
    // Every page, whichever columns the plan reads: all bytes after the
    // first 100 and before the footer (its length is the 4 bytes before
    // the closing magic).
    let n = bytes.len();
    let footer = u32::from_le_bytes([bytes[n - 8], bytes[n - 7], bytes[n - 6], bytes[n - 5]]);
    for b in &mut bytes[100..n - 8 - footer as usize] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));

    let (mut q, _) = server.clients().await;
    let t = server.token("alice", Role::Researcher);
    let sql = "SELECT admission_method, COUNT(*) AS n FROM admissions GROUP BY admission_method";
    let s = q
        .submit(authed(
            pb::QueryRequest {
                project: PROJECT.into(),
                sql: sql.into(),
                epsilon: Some(0.5),
                delta: None,
                totals: false,
                dataset: String::new(),
            },
            &t,
        ))
        .await
        .expect_err("corrupt extract");
    assert_eq!(
        (code_of(&s), s.code()),
        (
            Code::ExecutionFailed.as_str().to_owned(),
            tonic::Code::Internal
        )
    );
    assert_eq!(
        s.message(),
        "TRE-E001 the query failed while running; its cost has been charged and the details are in the audit log"
    );
    assert!(
        (server.spent(PROJECT) - 0.5).abs() < 1e-9,
        "charged even though it failed"
    );
    let events = server
        .state
        .store
        .audit_events(&tre_store::AuditFilter::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let [.., failed, suspended] = events.as_slice() else {
        panic!("two audit events expected: {events:?}");
    };
    let (failed, suspended) = (&failed.event, &suspended.event);
    assert_eq!(
        (failed.outcome.as_str(), failed.code.as_str()),
        ("failed", "TRE-E001")
    );
    assert!(!failed.detail.is_empty() && failed.epsilon_nanos == 500_000_000);
    assert_eq!(
        (
            suspended.user.as_str(),
            suspended.action.as_str(),
            suspended.project.as_str()
        ),
        (tre_store::INCIDENT_ACTOR, "project.suspend", PROJECT)
    );
    assert!(
        suspended.detail.starts_with("incident:"),
        "{}",
        suspended.detail
    );
    // Suspended: the next query is refused before it runs, at no cost.
    let again = q
        .submit(authed(
            pb::QueryRequest {
                project: PROJECT.into(),
                sql: "SELECT COUNT(*) FROM patients".into(),
                epsilon: Some(0.5),
                delta: None,
                totals: false,
                dataset: String::new(),
            },
            &t,
        ))
        .await
        .expect_err("suspended");
    assert_eq!(code_of(&again), Code::ProjectNotActive.as_str());
    assert!((server.spent(PROJECT) - 0.5).abs() < 1e-9);
    // The history says who suspended it and why.
    let p = server
        .state
        .store
        .project(&tre_core::ProjectId::new(PROJECT).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.status, tre_store::ProjectStatus::Suspended);
    assert!(
        p.history
            .iter()
            .any(|h| h.actor == tre_store::INCIDENT_ACTOR && h.action == "suspend"),
        "{:?}",
        p.history
    );
}

/// A dry run describes the plan and its cost without spending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_describes_and_costs_nothing() {
    let server = start(&[(PROJECT, &["alice"], 5.0)]).await;
    let (mut q, mut c) = server.clients().await;
    let t = server.token("alice", Role::Researcher);
    let sql = "SELECT p.region, COUNT(*) AS n, AVG(a.length_of_stay_days) AS los FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.region";
    let d = q
        .dry_run(authed(
            pb::QueryRequest {
                project: PROJECT.into(),
                sql: sql.into(),
                epsilon: Some(0.9),
                delta: None,
                totals: false,
                dataset: String::new(),
            },
            &t,
        ))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert_eq!(d.cells, Some(7));
    assert!((d.epsilon - 0.9).abs() < 1e-12);
    let text = d.plan.join("\n");
    for needle in [
        "at most 5 row(s) per patient, chosen at random",
        "opted out",
        "each patient contributes at most 5 row(s)",
        "measure COUNT(*): discrete Laplace, sensitivity 5, epsilon 0.3000, scale 16.6",
        "clamped to 182.5 ± 182.5: discrete Laplace, sensitivity 912.5",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert_eq!(server.spent(PROJECT), 0.0);

    // The catalog shows classes and bounds, never data.
    let t2 = server.token("dana", Role::Auditor);
    let ds = c
        .list_datasets(authed(pb::ListDatasetsRequest {}, &t2))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert_eq!(
        ds.datasets[0].tables,
        ["admissions", "lab_results", "patients", "waiting_list"]
    );
    let desc = c
        .describe_table(authed(
            pb::DescribeTableRequest {
                dataset: "nhs_epr".into(),
                table: "patients".into(),
            },
            &t2,
        ))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let pid = desc
        .columns
        .iter()
        .find(|c| c.name == "person_id")
        .map(|c| c.class.as_str());
    assert_eq!(pid, Some("identifier"));
    let yob = desc
        .columns
        .iter()
        .find(|c| c.name == "year_of_birth")
        .map(|c| (c.lower_bound, c.upper_bound));
    assert_eq!(yob, Some((Some(1920.0), Some(2024.0))));
}

/// Issue #13: every generated extract is sorted by person_id and holds at
/// most the policy's rows per patient, as its authenticated layout says;
/// the event tables were written without the opted-out patients.
#[test]
fn generated_extracts_are_sorted_and_bounded_as_their_layouts_say() {
    let f = fixture();
    let policy = tre_e2e::policy();
    let opted_out = tre_e2e::opted_out(&f.data);
    assert!(!opted_out.is_empty());
    for table in tre_synth::TABLES {
        let path = f.data.join(format!("{table}.parquet"));
        let layout = tre_extract::open(&path, &tre_synth::file_id("nhs_epr", table), &f.master)
            .unwrap_or_else(|e| panic!("{table}: {e}"))
            .layout;
        let bound = policy.tables[table].max_rows_per_unit;
        assert_eq!(
            (layout.sorted_by.as_str(), layout.max_rows_per_unit),
            ("person_id", bound)
        );
        let mut ids: Vec<String> = Vec::new();
        for batch in tre_e2e::read_extract(&f.data, table, &f.master) {
            let col = batch
                .column_by_name("person_id")
                .unwrap_or_else(|| panic!("{table}: no person_id"));
            ids.extend(
                col.as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap_or_default().to_owned()),
            );
        }
        assert!(ids.is_sorted(), "{table} is not sorted by person_id");
        let mut most = 0;
        for run in ids.chunk_by(|a, b| a == b) {
            most = most.max(run.len());
        }
        assert!(
            most <= bound as usize,
            "{table}: {most} rows for one patient"
        );
        assert_eq!(
            (layout.rows, layout.units),
            (ids.len() as u64, ids.chunk_by(|a, b| a == b).count() as u64),
            "{table}"
        );
        // Event tables hold no opted-out patient, and say which opt-outs
        // they left out; the patients table keeps them, flagged.
        let removed = layout.opt_outs_removed.map(|r| (r.source, r.digest));
        if table == "patients" {
            assert_eq!(removed, None);
        } else {
            assert!(ids.iter().all(|id| !opted_out.contains(id)), "{table}");
            let digest = tre_extract::opt_out_digest(opted_out.iter().map(String::as_str));
            assert_eq!(
                removed,
                Some((tre_synth::OPT_OUT_COLUMN.to_owned(), digest)),
                "{table}"
            );
        }
    }
    assert_eq!(policy.tables["patients"].max_rows_per_unit, 1);
}

/// Issue #13: five years of history with prescriptions, generated under the
/// shipped five-year policy, is served by it: every table bounded to that
/// policy, and a DP query over prescriptions answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_years_of_history_are_served_under_their_policy() {
    let f = fixture();
    let policy = tre_policy::Policy::from_toml("policies/nhs_epr_5y.toml", tre_e2e::POLICY_5Y)
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("nhs_epr");
    let spec = tre_synth::Spec::under(&policy, 400, 3, 5);
    let counts = tre_synth::generate(
        &data,
        &spec,
        tre_synth::Protection::Encrypted(&f.master),
        &f.master,
        |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let events =
        counts.admissions + counts.lab_results + counts.waiting_list + counts.prescriptions;
    assert!(events > 20 * 400, "{counts:?}");
    let layout = tre_extract::open(
        &data.join("prescriptions.parquet"),
        &tre_synth::file_id("nhs_epr", "prescriptions"),
        &f.master,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .layout;
    assert_eq!(layout.max_rows_per_unit, 60);
    assert!(
        layout.rows_dropped > 0,
        "some patients have more than 60 issues in five years"
    );
    let engine = tre_e2e::engine_under(policy, &data, std::sync::Arc::clone(&f.master))
        .unwrap_or_else(|e| panic!("{e}"));
    let (plan, _) = tre_e2e::compiled(
        &engine,
        "SELECT drug, COUNT(*) AS issues FROM prescriptions WHERE issue_date < DATE '2021-01-01' GROUP BY drug",
    )
    .await;
    let release = engine
        .execute(&plan)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(release.rows.len(), 6, "one row per drug");
}

/// Issue #13: execution runs the physical plans the compile-time preflight
/// made and checked, each once (a plan holds execution state, such as a
/// hash join's build side), instead of planning every plan twice. The
/// median's histogram plan, which also computes the counts (the fused
/// plan), is held after compiling and gone after executing; a copy of the plan executed again is planned afresh and
/// releases the same cells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_runs_the_preflighted_plans_once() {
    use tre_query::soundness::prepared_plans;
    let f = fixture();
    let engine =
        tre_e2e::engine_with(std::sync::Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
    let (plan, _) = tre_e2e::compiled(
        &engine,
        "SELECT specialty, MEDIAN(rtt_weeks) AS weeks, COUNT(*) AS n FROM waiting_list GROUP BY specialty",
    )
    .await;
    assert_eq!(prepared_plans(&plan), 1);
    let again = plan.clone();
    let first = engine
        .execute(&plan)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(prepared_plans(&plan), 0);
    assert_eq!(prepared_plans(&again), 0, "copies share one set of plans");
    let second = engine
        .execute(&again)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let keys = |r: &tre_query::Release| -> Vec<String> {
        r.rows.iter().map(|row| format!("{:?}", row[0])).collect()
    };
    assert_eq!(first.rows.len(), 7, "one row per specialty");
    assert_eq!(keys(&first), keys(&second));
}

/// Issue #13: a query with a quantile reads its input once. The first
/// histogram plan also computes the Laplace measurements per bucket (the
/// NULL bucket included) and execution sums them; the exact values must be
/// those of the same measurements computed alone, cell by cell, and the
/// histogram must hold every non-NULL value once. Deterministic bounding,
/// so both queries see the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantile_and_its_counts_are_read_in_one_pass() {
    let f = fixture();
    let mut engine =
        tre_e2e::engine_with(std::sync::Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
    engine.set_deterministic_bounding(Some(13));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let measures = "COUNT(rtt_weeks) AS c, COUNT(*) AS n, SUM(rtt_weeks) AS s";
    let exact = async |select: &str| {
        let sql = format!("SELECT specialty, {select} FROM waiting_list GROUP BY specialty");
        engine
            .exact(&sql, budget, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    let fused = exact(&format!("MEDIAN(rtt_weeks) AS m, {measures}")).await;
    let alone = exact(measures).await;
    assert_eq!(fused.laplace.len(), 7, "one cell per specialty");
    // The median brings its own count of values first, then the rest.
    let rest: std::collections::HashMap<String, Vec<i64>> = fused
        .laplace
        .iter()
        .map(|(cell, v)| (cell.clone(), v[1..].to_vec()))
        .collect();
    assert_eq!(rest, alone.laplace);
    for (cell, values) in &fused.laplace {
        let in_histogram: u64 = fused.histograms[0]
            .get(cell)
            .map_or(0, |h| h.iter().map(|(_, n)| n).sum());
        assert_eq!(in_histogram as i64, values[0], "{cell}");
    }
}

/// The physical plans of every plan that reads data for `sql`, compiled
/// under `budget`, as DataFusion displays them (issue #13's plan shapes).
async fn physical_plans_of(
    engine: &tre_query::Engine,
    sql: &str,
    budget: tre_query::Budget,
) -> Vec<String> {
    let plan = engine
        .compile(sql, budget)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    engine
        .physical_plans(&plan)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Issue #13: bounding groups per patient (key selection) and rows per
/// patient (a policy tighter than the stored bound) are windows partitioned
/// by the unit. Over extracts sorted by the unit they sort only within each
/// patient's run (`PartialSortExec`), never the whole table in memory: at
/// 10M patients that sort ran out of its query's pool (`TRE-E001` on an
/// accepted query). Every plan of both shapes has no full sort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounding_per_patient_sorts_within_each_patient() {
    let f = fixture();
    let tighter = tre_e2e::POLICY.replace(
        "[tables.waiting_list]\ndescription = \"Referral-to-treatment pathways completed in 2024\"\nmax_rows_per_unit = 3",
        "[tables.waiting_list]\ndescription = \"Referral-to-treatment pathways completed in 2024\"\nmax_rows_per_unit = 2",
    );
    assert_ne!(tighter, tre_e2e::POLICY);
    let tighter =
        tre_policy::Policy::from_toml("tighter.toml", &tighter).unwrap_or_else(|e| panic!("{e}"));
    let cases = [
        (
            tre_e2e::engine_with(std::sync::Arc::clone(&f.master))
                .unwrap_or_else(|e| panic!("{e}")),
            "SELECT primary_diagnosis, COUNT(*) AS n FROM admissions GROUP BY primary_diagnosis",
        ),
        (
            tre_e2e::engine_under(tighter, &f.data, std::sync::Arc::clone(&f.master))
                .unwrap_or_else(|e| panic!("{e}")),
            "SELECT specialty, COUNT(*) AS n FROM waiting_list GROUP BY specialty",
        ),
    ];
    for (engine, sql) in cases {
        let budget = engine
            .budget(Some(1.0), Some(1e-6))
            .unwrap_or_else(|e| panic!("{e}"));
        let plans = physical_plans_of(&engine, sql, budget).await;
        assert!(!plans.is_empty());
        let all = plans.join("\n");
        assert!(all.contains("PartialSortExec"), "{sql}:\n{all}");
        assert!(
            !all.lines().any(|l| l.trim_start().starts_with("SortExec")),
            "{sql} sorts a whole input:\n{all}"
        );
    }
}

/// The first measurement's non-zero exact values of `sql`, and the first
/// column of `reference` run by plain DataFusion (hash joins, no tre rules)
/// over the plaintext copy, each sorted: the same numbers when tre's
/// streaming plans compute what DataFusion's plain ones do (issue #13).
async fn ours_and_plain_datafusions(
    engine: &tre_query::Engine,
    budget: tre_query::Budget,
    sql: &str,
    reference: &str,
) -> (Vec<i64>, Vec<i64>) {
    let f = fixture();
    let exact = engine
        .exact(sql, budget, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ours: Vec<i64> = exact
        .laplace
        .values()
        .map(|v| v[0])
        .filter(|n| *n > 0)
        .collect();
    ours.sort_unstable();
    let ctx = datafusion::prelude::SessionContext::new();
    for table in ["patients", "admissions"] {
        ctx.register_parquet(
            table,
            f.plaintext
                .join(format!("{table}.parquet"))
                .to_string_lossy()
                .as_ref(),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let codes = engine
        .sandbox_context()
        .table("icd10_codes")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ctx.register_table("icd10_codes", codes.into_view())
        .unwrap_or_else(|e| panic!("{e}"));
    let batches = ctx
        .sql(reference)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut theirs: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    theirs.sort_unstable();
    assert!(ours.len() >= 5, "{ours:?}");
    (ours, theirs)
}

/// Issue #13: a hash join holds its whole build side (at 10M patients the
/// patients table's side took 715 MB of a 1 GiB pool). A join on the unit,
/// whose inputs are both in the extracts' unit order, merges them instead;
/// a join on another key (the public ICD-10 lookup) still hashes. The
/// merged join's counts are plain DataFusion's hash join's, over the
/// plaintext copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_on_the_unit_merge_their_ordered_inputs() {
    let f = fixture();
    let engine =
        tre_e2e::engine_with(std::sync::Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let sql = "SELECT p.region, a.admission_method, COUNT(*) AS n \
        FROM patients p JOIN admissions a ON p.person_id = a.person_id \
        JOIN icd10_codes c ON a.primary_diagnosis = c.code \
        GROUP BY p.region, a.admission_method";
    let all = physical_plans_of(&engine, sql, budget).await.join("\n");
    let joins: Vec<&str> = all
        .lines()
        .map(str::trim_start)
        .filter(|l| l.contains("JoinExec"))
        .collect();
    assert_eq!(joins.len(), 2, "{all}");
    assert!(
        joins
            .iter()
            .any(|l| l.starts_with("SortMergeJoinExec")
                && l.contains("on=[(person_id@0, person_id@0)]")),
        "{all}"
    );
    assert!(
        joins
            .iter()
            .any(|l| l.starts_with("HashJoinExec") && !l.contains("person_id")),
        "{all}"
    );
    assert!(
        !all.lines().any(|l| l.trim_start().starts_with("SortExec")),
        "a merge join must not sort a whole input:\n{all}"
    );
    let (merged, hashed) = ours_and_plain_datafusions(
        &engine,
        budget,
        sql,
        "SELECT COUNT(*) AS n FROM patients p JOIN admissions a ON p.person_id = a.person_id \
         JOIN icd10_codes c ON a.primary_diagnosis = c.code \
         WHERE p.research_opt_out = false GROUP BY p.region, a.admission_method",
    )
    .await;
    assert_eq!(merged, hashed);
}

/// Issue #14: without a token, `grpcurl list` (gRPC server reflection)
/// shows tre's services, and an orchestrator's health probe (the standard
/// `grpc.health.v1.Health`) sees the server, and each service, serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_need_no_token() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = start(&[]).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tre.v1.QueryService", "tre.v1.AuditService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "tre.v1.NoSuchService".into(),
        })
        .await;
    assert_eq!(
        unknown.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::NotFound)
    );

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let ask = |request: MessageRequest| {
        futures::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut replies = reflection
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    let Some(Ok(reply)) = futures::StreamExt::next(&mut replies).await else {
        panic!("no reflection reply");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: std::collections::BTreeSet<String> =
        list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "tre.v1.QueryService",
        "tre.v1.CatalogService",
        "tre.v1.ProjectService",
        "tre.v1.AuditService",
        "tre.v1.ReleaseService",
        "tre.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(wanted), "{wanted} not listed: {names:?}");
    }
    // `grpcurl describe` needs the descriptors of a service's file.
    let mut replies = reflection
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "tre.v1.QueryService".into(),
        )))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    let Some(Ok(reply)) = futures::StreamExt::next(&mut replies).await else {
        panic!("no reflection reply");
    };
    assert!(
        matches!(
            reply.message_response,
            Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
        ),
        "{reply:?}"
    );
}

/// Issue #14: the operators' metrics count calls exactly as the audit log
/// records them (by action, outcome and code), sum the ε charged, time
/// releases, and carry no SQL, user, project or value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_metrics_match_the_audit_log_and_name_no_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = start(&[(PROJECT, &["alice"], 10.0)]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let at = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tre_gateway::serve_metrics(
        std::sync::Arc::clone(&server.state),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));

    let (mut q, _) = server.clients().await;
    let token = server.token("alice", Role::Researcher);
    let ask = |sql: &str, epsilon: f64| {
        authed(
            pb::QueryRequest {
                project: PROJECT.into(),
                sql: sql.into(),
                epsilon: Some(epsilon),
                ..Default::default()
            },
            &token,
        )
    };
    let secret_sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
    for (sql, epsilon) in [
        (secret_sql, 0.5),
        (secret_sql, 0.5),
        (
            "SELECT region, COUNT(*) AS n FROM patients GROUP BY region",
            0.25,
        ),
    ] {
        q.submit(ask(sql, epsilon))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let refused = q.submit(ask("SELECT person_id FROM patients", 0.5)).await;
    assert_eq!(tre_e2e::code_of(refused), "TRE-Q010");
    let _ = q.dry_run(ask(secret_sql, 0.1)).await;

    let mut conn = tokio::net::TcpStream::connect(at)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reply = String::new();
    conn.read_to_string(&mut reply)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = stop.send(());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    for private in ["alice", "SELECT", PROJECT, "patients"] {
        assert!(
            !reply.contains(private),
            "{private} in the metrics:\n{reply}"
        );
    }
    let metric = |line_start: &str| -> f64 {
        reply
            .lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{reply}"))
    };
    // Every (action, outcome, code) the log holds, counted exactly.
    let events = server
        .state
        .store
        .audit_events(&tre_store::AuditFilter::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut counts: HashMap<(String, String, String), f64> = HashMap::new();
    for e in &events {
        let e = &e.event;
        *counts
            .entry((e.action.clone(), e.outcome.clone(), e.code.clone()))
            .or_default() += 1.0;
    }
    for ((action, outcome, code), n) in &counts {
        let got = metric(&format!(
            "tre_calls_total{{action=\"{action}\",outcome=\"{outcome}\",code=\"{code}\"}} "
        ));
        assert_eq!(got, *n, "{action} {outcome} {code}");
    }
    assert_eq!(
        metric("tre_calls_total{action=\"query.submit\",outcome=\"allowed\",code=\"\"} "),
        3.0
    );
    // The repeat was free: 0.5 + 0.25 charged.
    assert!((metric("tre_epsilon_charged_total ") - 0.75).abs() < 1e-9);
    assert_eq!(
        metric("tre_release_seconds_count{result=\"released\"} "),
        3.0
    );
    assert_eq!(metric("tre_release_seconds_count{result=\"error\"} "), 1.0);
    assert_eq!(metric("tre_active_queries "), 0.0);
    assert_eq!(metric("tre_query_memory_bytes "), 0.0);
}

/// Issue #13: every extract is stored in the same ranges of the unit, and
/// each worker reads the same ranges of every table, so work per patient
/// (joins on the unit, per-patient CTEs, bounding groups per patient,
/// distinct patients per cell) exchanges no rows between workers: a hash
/// repartition of rows buffers without bound when one consumer lags. The
/// only exchange left is of partial aggregates, one row per cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_per_patient_exchanges_no_rows() {
    let f = fixture();
    let engine =
        tre_e2e::engine_with(std::sync::Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), Some(1e-6))
        .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "SELECT p.region, a.admission_method, COUNT(*) AS n \
         FROM patients p JOIN admissions a ON p.person_id = a.person_id \
         GROUP BY p.region, a.admission_method",
        "WITH pp AS (SELECT person_id, COUNT(*) AS n FROM admissions GROUP BY person_id) \
         SELECT p.sex, COUNT(*) AS patients FROM pp JOIN patients p \
         ON pp.person_id = p.person_id GROUP BY p.sex",
        "SELECT primary_diagnosis, COUNT(*) AS n FROM admissions GROUP BY primary_diagnosis",
        "SELECT p.region, COUNT(DISTINCT p.person_id) AS patients \
         FROM patients p JOIN lab_results l ON p.person_id = l.person_id GROUP BY p.region",
    ] {
        let all = physical_plans_of(&engine, sql, budget).await.join("\n");
        let exchanges: Vec<&str> = all
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("RepartitionExec"))
            .collect();
        assert!(
            exchanges.iter().all(|l| !l.contains("person_id")
                && !l.contains("__tre_unit")
                && !l.contains("RoundRobin")),
            "{sql} exchanges rows:\n{all}"
        );
        // Each scan of a private table is one worker per run of ranges.
        assert!(
            all.lines()
                .filter(|l| l.contains("DataSourceExec") && l.contains(".parquet"))
                .all(|l| l.contains("file_groups={2 groups")),
            "{sql}:\n{all}"
        );
    }
}

/// Issue #13: the compiler bounds what every plan of a query may reserve,
/// on public facts only (the policy, the plans' shape, extract sizes
/// rounded up to powers of two), and refuses for free, with `TRE-Q034`, a
/// query whose bound exceeds its pool, instead of letting it fail after
/// the charge. Key selection over a column with a cap the writer enforced
/// is bounded by the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_could_outgrow_its_pool_is_refused_for_free() {
    let f = fixture();
    let open = |pool: u64| {
        tre_e2e::engine_limited(
            tre_e2e::policy(),
            &f.data,
            std::sync::Arc::clone(&f.master),
            tre_query::Limits {
                memory_bytes: pool as usize,
                concurrent_queries: 1,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let engine = open(1 << 30);
    let budget = engine
        .budget(Some(1.0), Some(1e-6))
        .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "SELECT primary_diagnosis, COUNT(*) AS n FROM admissions GROUP BY primary_diagnosis",
        "SELECT p.region, a.admission_method, COUNT(*) AS n, AVG(a.length_of_stay_days) AS los \
         FROM patients p JOIN admissions a ON p.person_id = a.person_id \
         GROUP BY p.region, a.admission_method",
    ] {
        let bound = engine
            .compile(sql, budget)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .memory_bound();
        assert!(bound > 0, "{sql}");
        // Within the pool exactly: accepted; a byte over: refused.
        let at = open(bound).compile(sql, budget).await;
        assert!(at.is_ok(), "{sql}: {at:?}");
        let over = open(bound - 1).compile(sql, budget).await;
        assert_eq!(
            over.map(|_| ()).map_err(|e| e.code()),
            Err(Code::TooMuchMemory),
            "{sql}"
        );
    }
}

/// Issue #13: `COUNT(DISTINCT person_id)` per cell held a set of every
/// patient of every cell (580 MB of a 1 GiB pool for the mean HbA1c at 10M
/// patients; 666 MB for key selection's counts). The compiler runs it per
/// patient first, then per cell. On generated tables (the unit in order or
/// shuffled, NULL keys and values, a gated unit as `COUNT(DISTINCT …)
/// FILTER`, no keys over no rows) the per-patient-first plan gives exactly
/// the one-level aggregate's rows, with every aggregate the compiler emits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_patients_per_cell_are_counted_per_patient_first() {
    use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use datafusion::functions_aggregate::expr_fn::{count, count_distinct, sum};
    use datafusion::logical_expr::{col, lit, when};
    use rand::{Rng, SeedableRng, seq::SliceRandom};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut streamed = 0;
    for case in 0..60 {
        // The first case without keys has no rows: one cell, counts 0.
        let n = if case == 3 {
            0
        } else {
            rng.random_range(0..400usize)
        };
        let units = rng.random_range(1..40usize);
        // (unit, k1, k2, v)
        type Row = (String, Option<i64>, Option<String>, Option<i64>);
        let mut rows: Vec<Row> = (0..n)
            .map(|_| {
                (
                    format!("P{:03}", rng.random_range(0..units)),
                    rng.random_bool(0.8).then(|| rng.random_range(0..3i64)),
                    rng.random_bool(0.9)
                        .then(|| ["a", "b", "c"][rng.random_range(0..3usize)].to_owned()),
                    rng.random_bool(0.85).then(|| rng.random_range(-5..50i64)),
                )
            })
            .collect();
        if case % 2 == 0 {
            rows.sort_by(|a, b| a.0.cmp(&b.0));
        } else {
            rows.shuffle(&mut rng);
        }
        let columns: Vec<ArrayRef> = vec![
            std::sync::Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
            std::sync::Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.1))),
            std::sync::Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2.as_deref()))),
            std::sync::Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.3))),
        ];
        let batch =
            RecordBatch::try_from_iter(["person_id", "k1", "k2", "v"].into_iter().zip(columns))
                .unwrap_or_else(|e| panic!("{e}"));
        let ctx = datafusion::prelude::SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(1 + case % 3),
        );
        ctx.register_batch("t", batch)
            .unwrap_or_else(|e| panic!("{e}"));
        let keys = match case % 4 {
            0 => vec![col("k1")],
            1 => vec![col("k1"), col("k2")],
            2 => vec![col("k2")],
            _ => vec![],
        };
        let gated = when(col("v").gt(lit(10i64)), col("person_id"))
            .end()
            .unwrap_or_else(|e| panic!("{e}"));
        let aggs = vec![
            count_distinct(col("person_id")).alias("__m0"),
            count(lit(1i64)).alias("__m1"),
            count(col("v")).alias("__m2"),
            sum(col("v")).alias("__m3"),
            count_distinct(gated).alias("__m4"),
        ];
        let agg = ctx
            .table("t")
            .await
            .and_then(|t| t.aggregate(keys, aggs))
            .unwrap_or_else(|e| panic!("{e}"))
            .into_unoptimized_plan();
        let unit = datafusion::common::Column::new(Some("t"), "person_id");
        let Some(per_unit) = tre_query::soundness::per_unit_first(&agg, &unit) else {
            panic!("case {case}: every aggregate here can be computed per patient first");
        };
        streamed += 1;
        let rows_of = async |plan| {
            let batches = ctx
                .execute_logical_plan(plan)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_string();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(rows_of(per_unit).await, rows_of(agg).await, "case {case}");
    }
    assert_eq!(streamed, 60);
}

/// Issue #13: the compiler runs a query's distinct patients per cell, and
/// key selection's, per patient first; over the extracts' unit order
/// DataFusion streams the per-patient aggregate (`PartiallySorted`), and no
/// plan keeps a set of patients. Its counts are plain DataFusion's
/// `COUNT(DISTINCT …)` over the plaintext copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_patients_stream_in_the_unit_order() {
    let f = fixture();
    let engine =
        tre_e2e::engine_with(std::sync::Arc::clone(&f.master)).unwrap_or_else(|e| panic!("{e}"));
    let budget = engine
        .budget(Some(1.0), Some(1e-6))
        .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "SELECT p.region, COUNT(DISTINCT p.person_id) AS patients \
         FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.region",
        "SELECT primary_diagnosis, COUNT(*) AS n FROM admissions GROUP BY primary_diagnosis",
    ] {
        let all = physical_plans_of(&engine, sql, budget).await;
        // The executed plan (the last that groups by the unit) streams.
        let executed: Vec<&String> = all.iter().filter(|p| p.contains("__tre_unit")).collect();
        assert!(!executed.is_empty(), "{sql}:\n{}", all.join("\n"));
        for p in executed {
            assert!(
                !p.contains("DISTINCT"),
                "{sql} keeps a set of patients:\n{p}"
            );
            let per_patient: Vec<&str> = p
                .lines()
                .filter(|l| l.contains("AggregateExec") && l.contains("as __tre_unit"))
                .collect();
            assert!(!per_patient.is_empty(), "{p}");
            for l in per_patient {
                assert!(l.contains("ordering_mode=PartiallySorted"), "{sql}: {l}");
            }
        }
    }
    let (ours, theirs) = ours_and_plain_datafusions(
        &engine,
        budget,
        "SELECT p.region, COUNT(DISTINCT p.person_id) AS patients \
         FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.region",
        "SELECT COUNT(DISTINCT p.person_id) FROM patients p JOIN admissions a \
         ON p.person_id = a.person_id WHERE p.research_opt_out = false GROUP BY p.region",
    )
    .await;
    assert_eq!(ours, theirs);
}

/// Issue #13: the server serves only extracts tre's writer wrote. A
/// plaintext file, or an encrypted one written around the writer (so with
/// no layout, and no checked order), stops start-up with `TRE-V004`.
#[test]
fn extracts_tre_did_not_write_are_not_served() {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::file::properties::WriterProperties;
    let f = fixture();
    for case in ["plaintext", "no layout"] {
        let (_copy, data) = tre_e2e::copy_of_fixture();
        let target = data.join("admissions.parquet");
        if case == "plaintext" {
            std::fs::copy(f.plaintext.join("admissions.parquet"), &target)
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            let batches = tre_e2e::read_extract(&f.data, "admissions", &f.master);
            let props = WriterProperties::builder()
                .with_file_encryption_properties(
                    f.master
                        .file_encryption("nhs_epr/admissions.parquet")
                        .unwrap_or_else(|e| panic!("{e}")),
                )
                .build();
            let file = std::fs::File::create(&target).unwrap_or_else(|e| panic!("{e}"));
            let mut w = ArrowWriter::try_new(file, tre_synth::schema("admissions"), Some(props))
                .unwrap_or_else(|e| panic!("{e}"));
            for b in &batches {
                w.write(b).unwrap_or_else(|e| panic!("{e}"));
            }
            w.close().unwrap_or_else(|e| panic!("{e}"));
        }
        let err = match tre_e2e::engine_on(&data, std::sync::Arc::clone(&f.master)) {
            Ok(_) => panic!("{case}: served"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::ExtractLayout, "{case}: {err}");
        assert!(
            err.to_string().contains("admissions.parquet"),
            "{case}: {err}"
        );
    }
}

/// A wrong master key stops the engine with a clear, coded error.
#[test]
fn wrong_master_key_gives_a_clear_error() {
    let _ = fixture();
    let wrong = std::sync::Arc::new(
        tre_vault::MasterKey::from_bytes(&[7; 32]).unwrap_or_else(|e| panic!("{e}")),
    );
    let err = match tre_e2e::engine_with(wrong) {
        Ok(_) => panic!("opened with the wrong key"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::WrongMasterKey);
    let msg = err.to_string();
    assert!(
        msg.starts_with("TRE-V002 the master key does not match"),
        "{msg}"
    );
    assert!(msg.contains("TRE_MASTER_KEY"), "{msg}");
}

/// The bytes of an encrypted extract contain none of the generated values;
/// the plaintext copy of the same data does (so the search can fail).
#[test]
fn encrypted_extracts_hide_every_value() {
    let f = fixture();
    let pseudonym = f.master.pseudonymise(&tre_synth::nhs_number(0));
    let needles: [&[u8]; 4] = [
        pseudonym.as_bytes(),
        b"U07.1",
        b"North East and Yorkshire",
        b"person_id",
    ];
    let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
    let mut plain_all = Vec::new();
    for table in tre_synth::TABLES {
        let enc = std::fs::read(f.data.join(format!("{table}.parquet")))
            .unwrap_or_else(|e| panic!("{e}"));
        for n in needles {
            assert!(
                !contains(&enc, n),
                "{table}: found {:?}",
                String::from_utf8_lossy(n)
            );
        }
        plain_all.extend(
            std::fs::read(f.plaintext.join(format!("{table}.parquet")))
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    for n in needles {
        assert!(
            contains(&plain_all, n),
            "control: plaintext lacks {:?}",
            String::from_utf8_lossy(n)
        );
    }
}
