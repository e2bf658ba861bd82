//! Issue #15: real data in. Fixtures generated here: a small OMOP CDM set
//! (300 persons across the standard tables) and a CSV set with deliberate
//! faults. The import report is checked exactly, every fault gives its
//! coded error or counted rejection, and the OMOP set is served and
//! answers a research question over gRPC.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tre_core::{Code, Role};
use tre_e2e::{MASTER, authed};
use tre_import::{Format, Import, ImportReport, Quiet};
use tre_policy::Policy;
use tre_proto::v1 as pb;
use tre_vault::MasterKey;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn master() -> MasterKey {
    ok(MasterKey::from_bytes(&MASTER))
}

const PERSONS: u64 = 300;
const CONDITIONS: [u32; 6] = [201826, 316866, 255573, 4329847, 432867, 80180];

/// What the OMOP fixture holds, row for row.
struct Omop {
    persons: u64,
    conditions: u64,
    deaths: u64,
    /// Exact condition rows per gender concept, for the research question.
    conditions_by_gender: BTreeMap<u32, u64>,
}

/// A small OMOP CDM v5.4 extract: person, observation_period,
/// visit_occurrence, condition_occurrence, drug_exposure, measurement,
/// death (tab-separated). Person ids are integers, as OMOP's are.
fn omop_fixture(dir: &Path) -> Omop {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut person = String::from(
        "person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,race_concept_id,ethnicity_concept_id,person_source_value\n",
    );
    let mut period = String::from(
        "observation_period_id,person_id,observation_period_start_date,observation_period_end_date,period_type_concept_id\n",
    );
    let mut visit = String::from(
        "visit_occurrence_id,person_id,visit_concept_id,visit_start_date,visit_end_date,visit_type_concept_id\n",
    );
    let mut condition = String::from(
        "condition_occurrence_id,person_id,condition_concept_id,condition_start_date,condition_type_concept_id,condition_source_value\n",
    );
    let mut drug = String::from(
        "drug_exposure_id,person_id,drug_concept_id,drug_exposure_start_date,quantity,days_supply\n",
    );
    let mut measurement = String::from(
        "measurement_id,person_id,measurement_concept_id,measurement_date,value_as_number,unit_concept_id\n",
    );
    let mut death = String::from("person_id,death_date,death_type_concept_id\n");
    let mut omop = Omop {
        persons: PERSONS,
        conditions: 0,
        deaths: 0,
        conditions_by_gender: BTreeMap::new(),
    };
    let (mut v, mut c, mut d, mut m) = (0u64, 0u64, 0u64, 0u64);
    for p in 1..=PERSONS {
        let gender = if rng.random_bool(0.5) { 8507 } else { 8532 };
        let yob = rng.random_range(1930..2010);
        let _ = writeln!(
            person,
            "{p},{gender},{yob},{},{},{},{},NHS{:010}",
            rng.random_range(1..=12),
            rng.random_range(1..=28),
            [8527, 8516, 8515][rng.random_range(0..3)],
            [38003563, 38003564][rng.random_range(0..2)],
            9_000_000_000 + p
        );
        let _ = writeln!(period, "{p},{p},2015-01-01,2024-12-31,32817");
        for _ in 0..rng.random_range(1..4) {
            v += 1;
            let day = format!(
                "20{}-0{}-1{}",
                rng.random_range(15..25),
                rng.random_range(1..10),
                rng.random_range(0..10)
            );
            let _ = writeln!(
                visit,
                "{v},{p},{},{day},{day},32817",
                [9201, 9202, 9203][rng.random_range(0..3)]
            );
        }
        for _ in 0..rng.random_range(0..6) {
            c += 1;
            *omop.conditions_by_gender.entry(gender).or_default() += 1;
            let code = CONDITIONS[rng.random_range(0..CONDITIONS.len())];
            let _ = writeln!(
                condition,
                "{c},{p},{code},20{}-0{}-0{},32020,ICD10:X{}",
                rng.random_range(15..25),
                rng.random_range(1..10),
                rng.random_range(1..10),
                rng.random_range(0..99)
            );
        }
        for _ in 0..rng.random_range(0..3) {
            d += 1;
            let _ = writeln!(
                drug,
                "{d},{p},{},2023-05-0{},{},{}",
                19019073 + rng.random_range(0..5),
                rng.random_range(1..10),
                rng.random_range(1..60),
                rng.random_range(7..90)
            );
        }
        for _ in 0..rng.random_range(0..3) {
            m += 1;
            let _ = writeln!(
                measurement,
                "{m},{p},3004410,2024-0{}-15,{:.1},8554",
                rng.random_range(1..10),
                rng.random_range(30.0..90.0)
            );
        }
        if rng.random_bool(0.1) {
            omop.deaths += 1;
            let _ = writeln!(death, "{p},2024-0{}-20,32817", rng.random_range(1..10));
        }
    }
    omop.conditions = c;
    for (name, text) in [
        ("person", person),
        ("observation_period", period),
        ("visit_occurrence", visit),
        ("condition_occurrence", condition),
        ("drug_exposure", drug),
        ("measurement", measurement),
        ("death", death),
    ] {
        // Tab-separated, as many OMOP exports come.
        if name == "death" {
            ok(std::fs::write(
                dir.join("death.tsv"),
                text.replace(',', "\t"),
            ));
        } else {
            ok(std::fs::write(dir.join(format!("{name}.csv")), text));
        }
    }
    omop
}

/// The custodian's finished OMOP policy: the draft with every TODO
/// decided (bounds, caps, rows per patient), and the columns they chose
/// not to import deleted.
const OMOP_POLICY: &str = r#"
[dataset]
name = "omop_demo"
description = "A small OMOP CDM v5.4 extract"
privacy_unit = "person_id"
sdc_profile = "nhs_sde"
max_groups_per_unit = 3

[budget]
default_epsilon_per_query = 0.5
max_epsilon_per_query = 2.0
project_epsilon = 10.0
default_delta_per_query = 1e-7
max_delta_per_query = 1e-6
project_delta = 1e-5
lifetime_epsilon = 100.0
lifetime_delta = 1e-4

[tables.person]
max_rows_per_unit = 1
columns.person_id = { class = "identifier" }
columns.gender_concept_id = { class = "categorical", values = [8507, 8532, 0] }
columns.year_of_birth = { class = "numeric", bounds = [1900, 2024] }
columns.race_concept_id = { class = "categorical", max_distinct = 100 }

[tables.observation_period]
max_rows_per_unit = 2
columns.person_id = { class = "identifier" }
columns.observation_period_start_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }
columns.observation_period_end_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }

[tables.visit_occurrence]
max_rows_per_unit = 10
columns.person_id = { class = "identifier" }
columns.visit_concept_id = { class = "categorical", values = [9201, 9202, 9203] }
columns.visit_start_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }

[tables.condition_occurrence]
max_rows_per_unit = 10
columns.person_id = { class = "identifier" }
columns.condition_concept_id = { class = "categorical", max_distinct = 100000 }
columns.condition_start_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }

[tables.drug_exposure]
max_rows_per_unit = 10
columns.person_id = { class = "identifier" }
columns.drug_concept_id = { class = "categorical", max_distinct = 100000 }
columns.drug_exposure_start_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }
columns.quantity = { class = "numeric", bounds = [0, 100] }
columns.days_supply = { class = "numeric", bounds = [0, 90] }

[tables.measurement]
max_rows_per_unit = 10
columns.person_id = { class = "identifier" }
columns.measurement_concept_id = { class = "categorical", max_distinct = 100000 }
columns.measurement_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }
columns.value_as_number = { class = "numeric", bounds = [0, 200] }

[tables.death]
max_rows_per_unit = 1
columns.person_id = { class = "identifier" }
columns.death_date = { class = "date", bounds = ["2000-01-01", "2025-12-31"] }
"#;

async fn import(
    policy: &Policy,
    from: &Path,
    out: &Path,
) -> Result<ImportReport, tre_import::ImportError> {
    let master = master();
    Import {
        policy,
        from,
        format: Format::Auto,
        out,
        master: &master,
        memory_bytes: 64 << 20,
    }
    .run(&Quiet)
    .await
}

/// A draft names the columns it knows (OMOP), leaves every bound, cap and
/// per-patient bound to the custodian, and cannot be served as it is.
#[test]
fn a_draft_leaves_every_bound_to_the_custodian() {
    let dir = ok(tempfile::tempdir());
    omop_fixture(dir.path());
    let draft = ok(tre_import::draft::draft(
        &[dir.path().to_path_buf()],
        "omop_demo",
        tre_import::draft::Flavour::Omop,
    ));
    for line in [
        "columns.person_id = { class = \"identifier\" }",
        "columns.gender_concept_id = { class = \"categorical\", values = [8507, 8532, 0] }",
        "[tables.person]\nmax_rows_per_unit = 1\n",
        "columns.person_source_value = { class = \"identifier\" }",
        "columns.year_of_birth = { class = \"numeric\", bounds = \"TODO",
        "columns.condition_start_date = { class = \"date\", bounds = \"TODO",
        "[tables.condition_occurrence]\nmax_rows_per_unit = \"TODO",
        "columns.condition_concept_id = { class = \"categorical\", max_distinct = \"TODO",
    ] {
        assert!(draft.contains(line), "{line} not in the draft:\n{draft}");
    }
    let err = Policy::from_toml("draft.toml", &draft).expect_err("a draft has TODOs");
    assert!(err.to_string().contains("TRE-P001"), "{err}");
    assert!(err.to_string().contains("TODO"), "{err}");
    // A plain CSV set: text columns need public values or a cap.
    let plain = ok(tempfile::tempdir());
    // With a byte-order mark, as spreadsheets write it.
    ok(std::fs::write(
        plain.path().join("Patients.csv"),
        "\u{feff}person_id,Sex,weight_kg,admitted,NHS_Number\nP1,F,70.5,2024-01-02,123\n",
    ));
    let draft = ok(tre_import::draft::draft(
        &[plain.path().to_path_buf()],
        "trust",
        tre_import::draft::Flavour::Plain,
    ));
    for line in [
        "[tables.patients]",
        "columns.person_id = { class = \"identifier\" }",
        "columns.sex = { class = \"categorical\", values = \"TODO",
        "columns.weight_kg = { class = \"numeric\", bounds = \"TODO",
        "columns.admitted = { class = \"date\", bounds = \"TODO",
        "columns.nhs_number = { class = \"identifier\" }",
    ] {
        assert!(draft.contains(line), "{line} not in the draft:\n{draft}");
    }
}

/// Issue #15: the OMOP fixture imports with nothing rejected and every
/// row accounted for, is served, and answers condition counts by gender
/// over gRPC within the noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_omop_extract_imports_and_answers_a_research_question() {
    let input = ok(tempfile::tempdir());
    let omop = omop_fixture(input.path());
    let data_root = ok(tempfile::tempdir());
    let out = data_root.path().join("omop_demo");
    let policy = ok(Policy::from_toml("omop.toml", OMOP_POLICY));
    let report = ok(import(&policy, input.path(), &out).await);
    let t = |name: &str| {
        report
            .tables
            .iter()
            .find(|t| t.table == name)
            .unwrap_or_else(|| panic!("no {name} in the report"))
    };
    assert_eq!(t("person").tally.rows_read, omop.persons);
    assert_eq!(t("person").rows_written, omop.persons);
    assert_eq!(t("person").patients, omop.persons);
    assert_eq!(t("death").rows_written, omop.deaths);
    assert_eq!(t("condition_occurrence").tally.rows_read, omop.conditions);
    for table in &report.tables {
        assert_eq!(
            table.tally.rows_rejected(),
            0,
            "{}: {:?}",
            table.table,
            table.tally.rejected
        );
        assert_eq!(
            table.tally.rows_read,
            table.rows_written + table.rows_removed_by_bound,
            "{}",
            table.table
        );
    }
    assert_eq!(
        t("person").columns_not_imported,
        [
            "month_of_birth",
            "day_of_birth",
            "ethnicity_concept_id",
            "person_source_value"
        ]
    );
    // The source identifiers never reach the extract.
    let opened = ok(tre_extract::open(
        &out.join("person.parquet"),
        "omop_demo/person.parquet",
        &Arc::new(master()),
    ));
    assert_eq!(opened.layout.units, omop.persons);
    assert!(
        !opened
            .schema
            .fields()
            .iter()
            .any(|f| f.name() == "person_source_value")
    );

    let server = tre_e2e::start_over(&out, policy, &[("omop1", &["olga"], 10.0)]).await;
    let (mut q, _) = server.clients().await;
    let token = server.token("olga", Role::Researcher);
    let reply = ok(q
        .submit(authed(
            pb::QueryRequest {
                project: "omop1".into(),
                sql: "SELECT p.gender_concept_id, COUNT(*) AS n FROM condition_occurrence c \
                      JOIN person p ON c.person_id = p.person_id GROUP BY p.gender_concept_id"
                    .into(),
                epsilon: Some(1.0),
                ..Default::default()
            },
            &token,
        ))
        .await)
    .into_inner();
    assert_eq!(reply.rows.len(), 3, "one row per public gender concept");
    for row in &reply.rows {
        let Some(pb::cell::Content::Key(gender)) = &row.cells[0].content else {
            panic!("no key: {row:?}");
        };
        let Some(pb::cell::Content::Value(v)) = &row.cells[1].content else {
            panic!("no value: {row:?}");
        };
        let exact = gender
            .parse::<u32>()
            .ok()
            .and_then(|g| omop.conditions_by_gender.get(&g))
            .copied()
            .unwrap_or(0) as f64;
        // Discrete Laplace at epsilon 1 with 10 rows per patient, plus the
        // profile's rounding: far inside 150 with overwhelming probability.
        if let Some(noisy) = v.value {
            assert!(
                (noisy - exact).abs() < 150.0,
                "{gender}: {noisy} vs {exact}"
            );
        }
    }
}

/// The fault set: policy, files and the report they must give.
const FAULTS_POLICY: &str = r#"
[dataset]
name = "trust"
privacy_unit = "person_id"
sdc_profile = "nhs_sde"

[budget]
default_epsilon_per_query = 0.5
max_epsilon_per_query = 2.0
project_epsilon = 10.0
lifetime_epsilon = 100.0

[tables.patients]
max_rows_per_unit = 1
columns.person_id = { class = "identifier" }
columns.sex = { class = "categorical", values = ["F", "M"] }
columns.year_of_birth = { class = "numeric", bounds = [1900, 2024] }
columns.date_of_death = { class = "date", bounds = ["2020-01-01", "2024-12-31"], out_of_bounds = "reject" }

[tables.visits]
max_rows_per_unit = 3
columns.person_id = { class = "identifier" }
columns.visit_date = { class = "date", bounds = ["2020-01-01", "2024-12-31"] }
columns.cost = { class = "numeric", bounds = [0, 1000], out_of_bounds = "reject" }
"#;

/// Rows of `patients.csv`, each with the fault it carries (or none).
const PATIENTS_CSV: &str = "\
person_id,sex,year_of_birth,date_of_death,nhs_number
9434765919,F,1950,,9434765919
9434765920,M,1850,,9434765920
9434765921,F,1960,2024-02-31,9434765921
9434765922,M,1970,yesterday,9434765922
,F,1980,,
9434765923,X,1990,,9434765923
person_id,sex,year_of_birth,date_of_death,nhs_number
9434765924,F,2030,2025-06-01,9434765924
9434765925,M,1945,2023-03-03,9434765925
";

const VISITS_CSV: &str = "\
person_id,visit_date,cost
9434765919,2024-01-01,10
9434765919,2024-01-02,20
9434765919,2024-01-03,30
9434765919,2024-01-04,40
9434765919,2024-01-05,50
9434765920,2019-12-31,100
9434765920,2024-03-01,5000
9434765921,2024-03-01,abc
";

/// Issue #15: the operator-side profile describes the input's values for
/// the custodian filling in a draft (exactly, faults included), says
/// first that it discloses data, and never lists an identifier's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_describes_the_input_for_the_custodian_only() {
    let input = ok(tempfile::tempdir());
    ok(std::fs::write(
        input.path().join("patients.csv"),
        PATIENTS_CSV,
    ));
    ok(std::fs::write(input.path().join("visits.csv"), VISITS_CSV));
    // One patient with 12 lab results, one with 2; tab-separated.
    let mut labs = String::from("person_id\tresult\n");
    for i in 0..14 {
        let _ = writeln!(labs, "{}\t{i}", if i < 12 { "P1" } else { "P2" });
    }
    ok(std::fs::write(input.path().join("labs.tsv"), labs));
    let report =
        ok(tre_import::profile::profile(&[input.path().to_owned()], "person_id", 16 << 20).await);
    assert!(report.notice.starts_with("OPERATOR-SIDE REPORT"));
    let [labs, patients, visits] = report.tables.as_slice() else {
        panic!("three tables: {report:?}");
    };
    assert_eq!(
        labs.rows_per_patient,
        BTreeMap::from([("11-100".into(), 1), ("2".into(), 1)])
    );
    assert_eq!(
        (labs.most_rows_for_one_patient, labs.rows_for_99_percent),
        (12, 12)
    );
    let column = |t: &tre_import::profile::TableProfile, c: &str| {
        t.columns
            .iter()
            .find(|x| x.column == c)
            .cloned()
            .unwrap_or_else(|| panic!("no {c}"))
    };
    assert_eq!(
        (column(labs, "result").numbers, labs.columns.len()),
        (14, 2),
        "tab-separated"
    );
    // Nine lines, the repeated header among them: counted, not hidden.
    assert_eq!(patients.rows, 9);
    let id = column(patients, "person_id");
    assert_eq!((id.missing, id.numbers, id.distinct), (1, 7, 8));
    assert!(id.values.is_empty(), "identifiers are never listed");
    assert!(column(patients, "nhs_number").values.is_empty());
    let sex = column(patients, "sex");
    let listed: Vec<(&str, u64)> = sex.values.iter().map(|(v, n)| (v.as_str(), *n)).collect();
    assert_eq!(listed, [("F", 4), ("M", 3), ("X", 1), ("sex", 1)]);
    assert_eq!(
        column(patients, "year_of_birth").number_range,
        Some((1850.0, 2030.0))
    );
    let died = column(patients, "date_of_death");
    assert_eq!((died.missing, died.dates), (4, 2), "2024-02-31 is no date");
    assert_eq!(
        died.date_range,
        Some(("2023-03-03".to_owned(), "2025-06-01".to_owned()))
    );
    assert_eq!(patients.patients, Some(8));
    // Rows per patient, as the import's report buckets them.
    assert_eq!(visits.rows, 8);
    assert_eq!(visits.patients, Some(3));
    assert_eq!(
        visits.rows_per_patient,
        BTreeMap::from([("1".into(), 1), ("2".into(), 1), ("3-5".into(), 1)])
    );
    assert_eq!(
        (visits.most_rows_for_one_patient, visits.rows_for_99_percent),
        (5, 5)
    );
    let cost = column(visits, "cost");
    assert_eq!((cost.numbers, cost.number_range), (7, Some((10.0, 5000.0))));
}

/// Issue #15: every fault is a counted rejection (by reason) or a coded
/// error naming the file, the line and the fix; nothing is lost uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_rows_are_counted_by_reason_and_bad_files_refused_with_codes() {
    let input = ok(tempfile::tempdir());
    ok(std::fs::write(
        input.path().join("patients.csv"),
        PATIENTS_CSV,
    ));
    ok(std::fs::write(input.path().join("visits.csv"), VISITS_CSV));
    let root = ok(tempfile::tempdir());
    let out = root.path().join("trust");
    let policy = ok(Policy::from_toml("trust.toml", FAULTS_POLICY));
    let report = ok(import(&policy, input.path(), &out).await);
    let patients = &report.tables[0];
    assert_eq!(patients.table, "patients");
    assert_eq!(patients.tally.rows_read, 9);
    let rejected: Vec<(&str, u64)> = patients
        .tally
        .rejected
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        rejected,
        [
            ("a repeated header line", 1),
            ("date_of_death: not a date (YYYY-MM-DD)", 2),
            ("date_of_death: outside the policy's bounds", 1),
            ("person_id: missing (every row needs its patient)", 1),
            ("sex: not one of the policy's values", 1),
        ]
    );
    // 1850 clamped into [1900, 2024]; 2030 too, but its row is rejected
    // (a death after the bounds), so only kept rows count.
    assert_eq!(patients.tally.clamped.get("year_of_birth"), Some(&1));
    assert_eq!(patients.rows_written, 3);
    assert_eq!(patients.columns_not_imported, ["nhs_number"]);
    let visits = &report.tables[1];
    assert_eq!(visits.tally.rows_read, 8);
    let rejected: Vec<(&str, u64)> = visits
        .tally
        .rejected
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        rejected,
        [
            ("cost: not a number", 1),
            ("cost: outside the policy's bounds", 1),
        ]
    );
    assert_eq!(visits.tally.clamped.get("visit_date"), Some(&1));
    // Five visits of one patient, bound 3: two removed at random.
    assert_eq!(visits.rows_removed_by_bound, 2);
    assert_eq!(visits.rows_written, 4);
    assert_eq!(visits.most_rows_for_one_patient, 5);
    assert_eq!(visits.rows_per_patient.get("3-5"), Some(&1));
    for t in &report.tables {
        assert_eq!(
            t.tally.rows_read,
            t.tally.rows_rejected() + t.rows_removed_by_bound + t.rows_written
        );
    }

    // Faults that make a file unreadable are refused, coded, naming the
    // file and line, and leave the dataset imported above as it was.
    let before = ok(std::fs::read(out.join("patients.parquet")));
    let cases: &[(&str, &[u8], Code, &[&str])] = &[
        (
            "truncated line",
            b"person_id,visit_date,cost\n9434765919,2024-01-01,10\n9434765919,2024-01\n",
            Code::ImportInput,
            &["visits.csv", "line", "as many fields as the header"],
        ),
        (
            "mixed encodings",
            b"person_id,visit_date,cost\n9434765919,2024-01-01,10\n9434765919,2024-01-02,caf\xe9\n",
            Code::ImportInput,
            &["visits.csv", "UTF-8", "iconv"],
        ),
        (
            "duplicated header name",
            b"person_id,visit_date,visit_date\n",
            Code::ImportInput,
            &["visits.csv", "line 1", "twice"],
        ),
        (
            "a declared column missing",
            b"person_id,visit_date\n9434765919,2024-01-01\n",
            Code::ImportSchema,
            &["visits.csv", "cost"],
        ),
    ];
    for (what, visits, code, words) in cases {
        ok(std::fs::write(input.path().join("visits.csv"), visits));
        let err = import(&policy, input.path(), &out).await.expect_err(what);
        let shown = err.to_string();
        assert_eq!(err.code(), *code, "{what}: {shown}");
        for w in *words {
            assert!(shown.contains(w), "{what}: no '{w}' in {shown}");
        }
        assert_eq!(
            ok(std::fs::read(out.join("patients.parquet"))),
            before,
            "{what}: the previous dataset was touched"
        );
    }
    // The output must be named after the dataset.
    ok(std::fs::write(input.path().join("visits.csv"), VISITS_CSV));
    let err = import(&policy, input.path(), &root.path().join("elsewhere"))
        .await
        .expect_err("misnamed output");
    assert_eq!(err.code(), Code::ImportSchema);
    // No staging directory is left behind.
    let leftovers: Vec<_> = ok(std::fs::read_dir(root.path()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["trust"]);
    // A second import replaces the first whole.
    let again = ok(import(&policy, input.path(), &out).await);
    assert_eq!(again.tables[0].rows_written, 3);
    assert_ne!(
        ok(std::fs::read(out.join("patients.parquet"))),
        before,
        "fresh keys and bytes"
    );
}

/// A progress hook that makes the child's import last long enough to be
/// killed in the middle.
struct Slow;

impl tre_import::Progress for Slow {
    fn table(&self, _: &str, _: &str) {}
    fn rows(&self, _: u64) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Issue #15: a kill during an import (SIGKILL: no destructor runs) leaves
/// the previous dataset byte for byte as it was, and serveable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_import_leaves_the_previous_dataset_whole_and_serveable() {
    const NAME: &str = "import::a_killed_import_leaves_the_previous_dataset_whole_and_serveable";
    let policy = ok(Policy::from_toml("trust.toml", FAULTS_POLICY));
    if let Ok(root) = std::env::var("TRE_IMPORT_CHILD") {
        // The child: import the large input slowly, until killed.
        let root = std::path::PathBuf::from(root);
        let master = master();
        let _ = Import {
            policy: &policy,
            from: &root.join("input"),
            format: Format::Auto,
            out: &root.join("trust"),
            master: &master,
            memory_bytes: 64 << 20,
        }
        .run(&Slow)
        .await;
        return;
    }
    let root = ok(tempfile::tempdir());
    let input = root.path().join("input");
    ok(std::fs::create_dir_all(&input));
    ok(std::fs::write(input.join("patients.csv"), PATIENTS_CSV));
    ok(std::fs::write(input.join("visits.csv"), VISITS_CSV));
    let out = root.path().join("trust");
    ok(import(&policy, &input, &out).await);
    let files = ["patients.parquet", "visits.parquet"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| ok(std::fs::read(out.join(f))))
        .collect();

    // Twenty batches of visits: the child takes at least four seconds.
    let mut visits = String::from("person_id,visit_date,cost\n");
    for i in 0..20 * 8192 {
        let _ = writeln!(
            visits,
            "94347659{:02},2024-01-0{},{}",
            19 + i % 7,
            1 + i % 9,
            i % 1000
        );
    }
    ok(std::fs::write(input.join("visits.csv"), visits));
    let mut child = ok(std::process::Command::new(ok(std::env::current_exe()))
        .args([NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env("TRE_IMPORT_CHILD", root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn());
    let staging = || {
        ok(std::fs::read_dir(root.path()))
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".trust.importing-")
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !staging() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never started importing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    ok(child.kill());
    let status = ok(child.wait());
    assert!(!status.success(), "the child was killed, not finished");

    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| ok(std::fs::read(out.join(f))))
        .collect();
    assert!(before == after, "the previous dataset changed");
    let server = tre_e2e::start_over(&out, policy.clone(), &[("t1", &["tess"], 10.0)]).await;
    let (mut q, _) = server.clients().await;
    let token = server.token("tess", Role::Researcher);
    ok(q.submit(authed(
        pb::QueryRequest {
            project: "t1".into(),
            sql: "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(),
            epsilon: Some(0.5),
            ..Default::default()
        },
        &token,
    ))
    .await);
    // The next import (with the killed one's staging left behind) works.
    let report = ok(import(&policy, &input, &out).await);
    assert_eq!(report.tables[1].tally.rows_read, 20 * 8192);
}

/// The OMOP fixture, imported as `omop_demo` under `OMOP_POLICY`.
struct ImportedOmop {
    input: tempfile::TempDir,
    root: tempfile::TempDir,
    out: std::path::PathBuf,
    policy: Policy,
    omop: Omop,
}

async fn imported_omop() -> ImportedOmop {
    let input = ok(tempfile::tempdir());
    let omop = omop_fixture(input.path());
    let root = ok(tempfile::tempdir());
    let out = root.path().join("omop_demo");
    let policy = ok(Policy::from_toml("omop.toml", OMOP_POLICY));
    ok(import(&policy, input.path(), &out).await);
    ImportedOmop {
        input,
        root,
        out,
        policy,
        omop,
    }
}

/// The exact number of rows `sql`'s one count measures, on `engine`.
async fn exact_count(engine: &tre_query::Engine, sql: &str) -> i64 {
    let (_, budget) = tre_e2e::compiled(engine, sql).await;
    let exact = ok(engine.exact(sql, budget, &[]).await);
    let counts: Vec<i64> = exact.laplace.values().flatten().copied().collect();
    assert_eq!(counts.len(), 1, "{sql}: {:?}", exact.laplace);
    counts[0]
}

/// Issue #15: a new National Data Opt-out list replaces the old one
/// without a re-import; its patients leave every table, the dataset's
/// version (snapshot hash, which manifests carry) changes, and the list
/// stays with the dataset when it is imported again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_list_applies_without_a_reimport_and_makes_a_new_version() {
    let ImportedOmop {
        input,
        root,
        out,
        policy,
        omop,
    } = imported_omop().await;
    let key = Arc::new(master());
    let persons = "SELECT COUNT(*) AS n FROM person";
    let conditions = "SELECT COUNT(*) AS n FROM condition_occurrence";
    let before = ok(tre_e2e::engine_under(
        policy.clone(),
        &out,
        Arc::clone(&key),
    ));
    assert_eq!(exact_count(&before, persons).await, omop.persons as i64);
    let all_conditions = exact_count(&before, conditions).await;

    // Persons 1 to 100 opt out (OMOP's ids are the direct identifiers
    // here); a comment, a blank line and a repeat are not patients.
    let mut list = String::from("# National Data Opt-out, this week\n\n");
    for p in 1..=100 {
        let _ = writeln!(list, "{p}");
    }
    list.push_str("7\n");
    let list_file = root.path().join("optouts.txt");
    ok(std::fs::write(&list_file, list));
    let report = ok(tre_import::opt_outs::replace(
        &out, &policy, &key, &list_file,
    ));
    assert_eq!((report.identifiers, report.patients), (101, 100));

    let after = ok(tre_e2e::engine_under(
        policy.clone(),
        &out,
        Arc::clone(&key),
    ));
    assert_eq!(
        exact_count(&after, persons).await,
        omop.persons as i64 - 100
    );
    let kept_conditions = exact_count(&after, conditions).await;
    assert!(
        kept_conditions < all_conditions && kept_conditions > 0,
        "{kept_conditions} of {all_conditions} condition rows kept"
    );
    assert_ne!(
        before.snapshot_hash(),
        after.snapshot_hash(),
        "a new version"
    );

    // Imported again, the dataset keeps its list.
    ok(import(&policy, input.path(), &out).await);
    let reimported = ok(tre_e2e::engine_under(
        policy.clone(),
        &out,
        Arc::clone(&key),
    ));
    assert_eq!(
        exact_count(&reimported, persons).await,
        omop.persons as i64 - 100
    );
    // A list for another dataset's directory is refused.
    let err = tre_import::opt_outs::replace(&root.path().join("other"), &policy, &key, &list_file)
        .expect_err("wrong directory");
    assert_eq!(err.code(), Code::ImportSchema);
}

/// Issue #15: a running gateway serves a new opt-out list from a reload
/// (what SIGHUP does in `tre serve`), without a restart: queries after it
/// leave the new opt-outs out and their manifests name the new version,
/// while a query that began before it finishes on the old engines. A
/// reload that would serve other datasets is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_new_opt_out_list_without_a_restart() {
    let ImportedOmop {
        root,
        out,
        policy,
        omop,
        ..
    } = imported_omop().await;
    let key = Arc::new(master());
    let server = tre_e2e::start_over(&out, policy.clone(), &[("o1", &["olga"], 10.0)]).await;
    let persons = "SELECT COUNT(*) AS n FROM person";
    let before = server.state.engines.now();
    assert_eq!(
        exact_count(before.first(), persons).await,
        omop.persons as i64
    );

    let mut list = String::new();
    for p in 1..=50 {
        let _ = writeln!(list, "{p}");
    }
    let list_file = root.path().join("optouts.txt");
    ok(std::fs::write(&list_file, list));
    ok(tre_import::opt_outs::replace(
        &out, &policy, &key, &list_file,
    ));
    let reloaded = ok(server.state.engines.reload(vec![ok(tre_e2e::engine_under(
        policy.clone(),
        &out,
        Arc::clone(&key),
    ))]));
    let after = server.state.engines.now();
    assert!(Arc::ptr_eq(&reloaded, &after));
    assert_ne!(
        before.first().snapshot_hash(),
        after.first().snapshot_hash()
    );
    assert_eq!(
        exact_count(after.first(), persons).await,
        omop.persons as i64 - 50
    );
    // Held by a query that began before the reload, the old engine still
    // answers as it did.
    assert_eq!(
        exact_count(before.first(), persons).await,
        omop.persons as i64
    );
    // A query now is served by the new version, which its manifest names.
    let (mut q, _) = server.clients().await;
    let reply = ok(q
        .submit(authed(
            pb::QueryRequest {
                project: "o1".into(),
                sql: persons.into(),
                epsilon: Some(0.5),
                ..Default::default()
            },
            &server.token("olga", Role::Researcher),
        ))
        .await)
    .into_inner();
    let stored = ok(server.state.store.release(&reply.release_id))
        .unwrap_or_else(|| panic!("no release {}", reply.release_id));
    let manifest: tre_store::manifest::SignedManifest = ok(serde_json::from_str(&stored.manifest));
    assert_eq!(
        manifest.manifest.dataset_snapshot_sha256,
        after.first().snapshot_hash()
    );
    // Serving other datasets needs a restart; the reload changes nothing.
    let other = ok(tre_e2e::engine_on(
        &tre_e2e::fixture().data,
        Arc::clone(&key),
    ));
    assert!(server.state.engines.reload(vec![other]).is_err());
    assert!(Arc::ptr_eq(&server.state.engines.now(), &after));
}

/// Issue #15: one gateway serves the synthetic `nhs_epr` and an imported
/// OMOP set. Each project queries the dataset it is approved for; one
/// approved for both must say which; a custodian decides only on projects
/// of the datasets they hold; each researcher's catalog shows only what
/// their projects cover; and a join across the two datasets is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_datasets_one_gateway_with_scoped_custodians() {
    use tre_proto::v1::catalog_service_client::CatalogServiceClient;
    use tre_proto::v1::project_service_client::ProjectServiceClient;

    let input = ok(tempfile::tempdir());
    omop_fixture(input.path());
    let root = ok(tempfile::tempdir());
    let out = root.path().join("omop_demo");
    let omop_policy = ok(Policy::from_toml("omop.toml", OMOP_POLICY));
    ok(import(&omop_policy, input.path(), &out).await);
    let key = Arc::new(master());
    let engines = vec![
        ok(tre_e2e::engine_on(
            &tre_e2e::fixture().data,
            Arc::clone(&key),
        )),
        ok(tre_e2e::engine_under(omop_policy, &out, Arc::clone(&key))),
    ];
    let server = tre_e2e::start_datasets(
        engines,
        &[
            ("pn", &["alice"], "nhs_epr", 10.0),
            ("po", &["olga"], "omop_demo", 10.0),
        ],
    )
    .await;
    let ch = server.channel().await;
    let mut q = tre_proto::v1::query_service_client::QueryServiceClient::new(ch.clone());
    let catalog = CatalogServiceClient::new(ch.clone());
    let mut projects = ProjectServiceClient::new(ch);
    let alice = server.token("alice", Role::Researcher);
    let olga = server.token("olga", Role::Researcher);
    let ask = |project: &str, dataset: &str, sql: &str| pb::QueryRequest {
        project: project.into(),
        sql: sql.into(),
        epsilon: Some(0.5),
        dataset: dataset.into(),
        ..Default::default()
    };
    let nhs_sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
    let omop_sql = "SELECT gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";
    let code = |r: Result<tonic::Response<pb::QueryResponse>, tonic::Status>| tre_e2e::code_of(r);

    // Each project queries its own dataset, named or not.
    assert_eq!(
        code(q.submit(authed(ask("pn", "", nhs_sql), &alice)).await),
        "ok"
    );
    assert_eq!(
        code(
            q.submit(authed(ask("po", "omop_demo", omop_sql), &olga))
                .await
        ),
        "ok"
    );
    // Not the other's: that dataset is not approved, or its tables unknown.
    assert_eq!(
        code(
            q.submit(authed(ask("pn", "omop_demo", omop_sql), &alice))
                .await
        ),
        Code::DatasetNotApproved.as_str()
    );
    assert_eq!(
        code(q.submit(authed(ask("pn", "", omop_sql), &alice)).await),
        Code::UnknownTable.as_str()
    );
    // Each catalog shows what the caller's projects cover.
    let listed = |token: String| {
        let mut catalog = catalog.clone();
        async move {
            let r = ok(catalog
                .list_datasets(authed(pb::ListDatasetsRequest {}, &token))
                .await)
            .into_inner();
            r.datasets.into_iter().map(|d| d.name).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(alice.clone()).await, ["nhs_epr"]);
    assert_eq!(listed(olga.clone()).await, ["omop_demo"]);
    assert_eq!(
        listed(server.token("aziz", Role::Auditor)).await,
        ["nhs_epr", "omop_demo"]
    );

    // A project over both datasets: only a custodian of both may approve.
    let rita = server.token("rita", Role::Researcher);
    ok(projects
        .request_project(authed(rita_asks("both", &["nhs_epr", "omop_demo"]), &rita))
        .await);
    let scoped = |user: &str, held: &[&str]| {
        let mut claims = ok(tre_gateway::Issuer::claims(
            &ok(tre_core::UserId::new(user)),
            Role::Custodian,
            3600,
        ));
        claims.custodian_of = Some(held.iter().map(|d| (*d).to_owned()).collect());
        ok(server.state.issuer.sign(&claims))
    };
    let approve = pb::ApproveProjectRequest {
        id: "both".into(),
        epsilon: None,
        delta: None,
        end_date: "2099-01-01".into(),
        reason: "ethics ref 1".into(),
    };
    let refused = projects
        .approve_project(authed(approve.clone(), &scoped("carl", &["omop_demo"])))
        .await;
    assert_eq!(tre_e2e::code_of(refused), Code::PermissionDenied.as_str());
    ok(projects
        .approve_project(authed(approve, &scoped("cora", &["nhs_epr", "omop_demo"])))
        .await);
    // Approved for both, a query must say which.
    assert_eq!(
        code(q.submit(authed(ask("both", "", nhs_sql), &rita)).await),
        Code::InvalidArgument.as_str()
    );
    assert_eq!(
        code(
            q.submit(authed(ask("both", "nhs_epr", nhs_sql), &rita))
                .await
        ),
        "ok"
    );
    assert_eq!(
        code(
            q.submit(authed(ask("both", "omop_demo", omop_sql), &rita))
                .await
        ),
        "ok"
    );
    // A join across the two datasets is refused: OMOP's person_id is not
    // a pseudonym of the NHS number, as nhs_epr's is, so one person could
    // be two units. Unqualified, the other dataset's table is unknown.
    let across = "SELECT p.sex, COUNT(*) AS n FROM nhs_epr.patients p JOIN omop_demo.person q ON p.person_id = q.person_id GROUP BY p.sex";
    let refused = q.submit(authed(ask("both", "", across), &rita)).await;
    assert_eq!(
        refused.as_ref().err().map(tonic::Status::code),
        Some(tonic::Code::FailedPrecondition)
    );
    assert!(
        refused.as_ref().err().is_some_and(|s| s
            .message()
            .starts_with("TRE-Q035 dataset 'omop_demo' declares no linkage")),
        "{refused:?}"
    );
    let unqualified = "SELECT p.sex, COUNT(*) AS n FROM patients p JOIN person q ON p.person_id = q.person_id GROUP BY p.sex";
    assert_eq!(
        code(
            q.submit(authed(ask("both", "nhs_epr", unqualified), &rita))
                .await
        ),
        Code::UnknownTable.as_str()
    );
    assert!(server.state.engines.now().joint_names().next().is_none());
    // Each dataset keeps its own lifetime ledger.
    let usage = |d: &str| ok(server.state.store.dataset_usage(d)).epsilon_nanos;
    assert!(usage("nhs_epr") > 0 && usage("omop_demo") > 0);
}

/// A GP patient survey keyed by NHS number, as a second trust would hold
/// it: its unit is the same pseudonym as `nhs_epr`'s, so the two may be
/// joined. Its own rules are stricter than `nhs_epr`'s on purpose: a
/// stricter disclosure profile, two approvals, a lower per-query cap and a
/// small lifetime budget.
const SURVEY_POLICY: &str = r#"
[dataset]
name = "gp_survey"
privacy_unit = "person_id"
linkage = "nhs_number"
sdc_profile = "all_of_us"

[budget]
default_epsilon_per_query = 0.5
max_epsilon_per_query = 1.0
project_epsilon = 1.0
lifetime_epsilon = 1.2

[review]
mode = "flagged"
approvals = 2

[tables.responses]
max_rows_per_unit = 1
columns.person_id = { class = "identifier", description = "NHS number until imported" }
columns.smoker = { class = "categorical", values = [true, false] }
columns.wellbeing = { class = "numeric", bounds = [0, 10] }
"#;

/// Issue #15: a query may join datasets the project is approved for that
/// hold one person under one unit. It runs under every rule at its
/// strictest, leaves out whoever opted out of either, is charged to each
/// dataset's lifetime budget, and is refused with a code otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_across_linked_datasets_runs_under_the_strictest_rules() {
    use tre_proto::v1::project_service_client::ProjectServiceClient;

    // The first 1,000 of the fixture's patients answered the survey, and
    // 200 people the EPR does not hold.
    let mut rng = ChaCha8Rng::seed_from_u64(151);
    let mut csv = String::from("person_id,smoker,wellbeing\n");
    let mut answers = BTreeMap::new();
    for i in (0..1_000).chain(10_000..10_200) {
        let nhs = tre_synth::nhs_number(i);
        let smoker = rng.random_bool(0.3);
        let _ = writeln!(csv, "{nhs},{smoker},{}", rng.random_range(0..=10));
        answers.insert(master().pseudonymise(&nhs), smoker);
    }
    let input = ok(tempfile::tempdir());
    ok(std::fs::write(input.path().join("responses.csv"), csv));
    let root = ok(tempfile::tempdir());
    let out = root.path().join("gp_survey");
    let survey_policy = ok(Policy::from_toml("gp_survey.toml", SURVEY_POLICY));
    ok(import(&survey_policy, input.path(), &out).await);
    let key = Arc::new(master());
    let all_of_us = ok(tre_sdc::Profile::from_toml(
        "policies/sdc/all_of_us.toml",
        include_str!("../policies/sdc/all_of_us.toml"),
    ));
    let nhs_epr = ok(tre_e2e::engine_on(
        &tre_e2e::fixture().data,
        Arc::clone(&key),
    ));
    // Who a join may count: the EPR's patients who did not opt out, by sex.
    let batches = ok(ok(nhs_epr
        .sandbox_context()
        .sql("SELECT person_id, sex FROM patients WHERE research_opt_out = false")
        .await)
    .collect()
    .await);
    let text = |a: &datafusion::arrow::array::ArrayRef| -> Vec<String> {
        use datafusion::arrow::array::AsArray;
        let a = ok(datafusion::arrow::compute::cast(
            a,
            &datafusion::arrow::datatypes::DataType::Utf8,
        ));
        a.as_string::<i32>()
            .iter()
            .map(|v| v.unwrap_or_default().to_owned())
            .collect()
    };
    let mut exact: BTreeMap<(String, String), f64> = BTreeMap::new();
    for b in &batches {
        let ids = text(b.column(0));
        let sexes = text(b.column(1));
        for (id, sex) in ids.iter().zip(&sexes) {
            if let Some(smoker) = answers.get(id) {
                *exact.entry((sex.clone(), smoker.to_string())).or_default() += 1.0;
            }
        }
    }
    let server = tre_e2e::start_datasets(
        vec![
            nhs_epr,
            ok(tre_query::Engine::open(
                survey_policy,
                all_of_us,
                &out,
                Arc::clone(&key),
                tre_query::Limits::default(),
            )),
        ],
        &[("pn", &["alice"], "nhs_epr", 10.0)],
    )
    .await;
    let served = server.state.engines.now();
    assert_eq!(
        served.joint_names().collect::<Vec<_>>(),
        ["gp_survey+nhs_epr"]
    );
    // The joint engine's rules are each at its strictest.
    let joint = served
        .get("gp_survey+nhs_epr")
        .unwrap_or_else(|| panic!("no joint engine"));
    assert_eq!(joint.profile().suppress_below, 21, "all_of_us's threshold");
    assert!(!joint.profile().zero_allowed, "nhs_sde shows no zero");
    assert_eq!(
        joint.profile().rounding,
        tre_sdc::Rounding::Base(5),
        "nhs_sde rounds"
    );
    assert_eq!(joint.policy().review.approvals, 2);
    // One admission for the gateway: a query running on the joint engine
    // holds a slot every engine counts.
    let held = ok(joint.admit("linked").await);
    let running = |d: &str| served.get(d).map(|e| e.load().0);
    assert_eq!(
        (running("nhs_epr"), running("gp_survey")),
        (Some(1), Some(1))
    );
    drop(held);
    assert_eq!(running("nhs_epr"), Some(0));
    assert_eq!(joint.policy().budget.max_epsilon_per_query.value(), 1.0);

    let ch = server.channel().await;
    let mut q = tre_proto::v1::query_service_client::QueryServiceClient::new(ch.clone());
    let mut projects = ProjectServiceClient::new(ch);
    let rita = server.token("rita", Role::Researcher);
    ok(projects
        .request_project(authed(
            rita_asks("linked", &["nhs_epr", "gp_survey"]),
            &rita,
        ))
        .await);
    ok(projects
        .approve_project(authed(
            pb::ApproveProjectRequest {
                id: "linked".into(),
                epsilon: None,
                delta: None,
                end_date: "2099-01-01".into(),
                reason: "ethics ref 2".into(),
            },
            &server.token("cora", Role::Custodian),
        ))
        .await);
    // The catalog says which datasets join, among those the caller sees.
    let (_, mut catalog) = server.clients().await;
    for (token, want) in [
        (
            &rita,
            vec![
                ("gp_survey", vec!["nhs_epr"]),
                ("nhs_epr", vec!["gp_survey"]),
            ],
        ),
        (&alice_token(&server), vec![("nhs_epr", vec![])]),
    ] {
        let listed = ok(catalog
            .list_datasets(authed(pb::ListDatasetsRequest {}, token))
            .await)
        .into_inner();
        let got: Vec<(String, Vec<String>)> = listed
            .datasets
            .into_iter()
            .map(|d| (d.name, d.joins_with))
            .collect();
        let want: Vec<(String, Vec<String>)> = want
            .into_iter()
            .map(|(d, j)| (d.to_owned(), j.into_iter().map(str::to_owned).collect()))
            .collect();
        assert_eq!(got, want);
    }
    let ask = |project: &str, sql: &str, epsilon: f64| pb::QueryRequest {
        project: project.into(),
        sql: sql.into(),
        epsilon: Some(epsilon),
        ..Default::default()
    };
    let code = |r: Result<tonic::Response<pb::QueryResponse>, tonic::Status>| tre_e2e::code_of(r);
    let usage = |d: &str| ok(server.state.store.dataset_usage(d)).epsilon_nanos;

    let join = "SELECT p.sex, s.smoker, COUNT(*) AS n FROM nhs_epr.patients p \
                JOIN gp_survey.responses s ON p.person_id = s.person_id GROUP BY p.sex, s.smoker";
    let reply = ok(q.submit(authed(ask("linked", join, 0.5), &rita)).await).into_inner();
    assert_eq!(reply.sdc_profile, "all_of_us+nhs_sde");
    assert_eq!(reply.rows.len(), 4, "sex by smoker: {reply:?}");
    for row in &reply.rows {
        let key = |i: usize| match &row.cells[i].content {
            Some(pb::cell::Content::Key(k)) => k.clone(),
            other => panic!("no key: {other:?}"),
        };
        let Some(pb::cell::Content::Value(v)) = &row.cells[2].content else {
            panic!("no value: {row:?}");
        };
        let want = exact.get(&(key(0), key(1))).copied().unwrap_or(0.0);
        assert!(want > 100.0, "every cell is large: {exact:?}");
        // Discrete Laplace of scale 2 (epsilon 0.5, one row per patient in
        // each table) and rounding to 5: 40 is over 15 scales away.
        let noisy = v.value.unwrap_or_else(|| panic!("suppressed: {row:?}"));
        assert!((noisy - want).abs() < 40.0, "{row:?}: {noisy} vs {want}");
    }
    // Charged once to the project, in full to each dataset's lifetime
    // ledger; the ledger and the manifest name both datasets.
    assert_eq!(
        (usage("nhs_epr"), usage("gp_survey")),
        (500_000_000, 500_000_000)
    );
    let linked = ok(tre_core::ProjectId::new("linked"));
    let entries = ok(server.state.store.ledger(&linked));
    assert_eq!(
        entries
            .iter()
            .map(|e| e.dataset.as_str())
            .collect::<Vec<_>>(),
        ["gp_survey+nhs_epr"]
    );
    let stored = ok(server.state.store.release(&reply.release_id))
        .unwrap_or_else(|| panic!("no release {}", reply.release_id));
    let manifest: tre_store::manifest::SignedManifest = ok(serde_json::from_str(&stored.manifest));
    assert_eq!(manifest.manifest.dataset, "gp_survey+nhs_epr");
    assert_eq!(manifest.manifest.sdc_profile, "all_of_us+nhs_sde");

    // Then, in order, each with what it must give: refusals are free.
    let alice = alice_token(&server);
    // As Flight SQL lists them: catalog (the dataset), schema, table.
    let join_by_sex = "SELECT p.sex, COUNT(*) AS n FROM nhs_epr.public.patients p \
                       JOIN gp_survey.public.responses s ON p.person_id = s.person_id GROUP BY p.sex";
    let join_by_smoker = "SELECT s.smoker, COUNT(*) AS n FROM nhs_epr.patients p \
                          JOIN gp_survey.responses s ON p.person_id = s.person_id GROUP BY s.smoker";
    let one = "SELECT sex, COUNT(*) AS n FROM nhs_epr.patients GROUP BY sex";
    let one_full = "SELECT sex, COUNT(*) AS n FROM nhs_epr.public.patients GROUP BY sex";
    let steps = [
        // A project approved for nhs_epr alone: gp_survey's tables are
        // unknown to it, as if the dataset were not served.
        ("pn", join, 0.5, &alice, Code::UnknownTable.as_str()),
        // Across datasets, every table is named with its dataset.
        (
            "linked",
            "SELECT s.smoker, COUNT(*) AS n FROM patients p JOIN gp_survey.responses s \
             ON p.person_id = s.person_id GROUP BY s.smoker",
            0.5,
            &rita,
            Code::UnknownTable.as_str(),
        ),
        // Joined on the unit, as within one dataset.
        (
            "linked",
            "SELECT s.smoker, COUNT(*) AS n FROM nhs_epr.patients p JOIN gp_survey.responses s \
             ON p.imd_quintile = s.wellbeing GROUP BY s.smoker",
            0.5,
            &rita,
            Code::JoinNotOnPrivacyUnit.as_str(),
        ),
        // Above gp_survey's per-query cap, though nhs_epr allows 2.
        ("linked", join, 1.5, &rita, Code::EpsilonAboveCap.as_str()),
        // Qualified names work within one dataset too.
        ("pn", one, 0.5, &alice, "ok"),
        // gp_survey's lifetime budget (1.2) ends the joins, whatever
        // nhs_epr and the project have left; nhs_epr alone goes on.
        ("linked", join_by_sex, 0.5, &rita, "ok"),
        (
            "linked",
            join_by_smoker,
            0.5,
            &rita,
            Code::DatasetLifetimeExhausted.as_str(),
        ),
        ("linked", one_full, 0.5, &rita, "ok"),
    ];
    for (project, sql, epsilon, token, want) in steps {
        assert_eq!(
            code(q.submit(authed(ask(project, sql, epsilon), token)).await),
            want,
            "{sql}"
        );
    }
    assert_eq!(
        (usage("nhs_epr"), usage("gp_survey")),
        (2_000_000_000, 1_000_000_000)
    );
}

/// Rita's request for a project `id` over `datasets`.
fn rita_asks(id: &str, datasets: &[&str]) -> pb::RequestProjectRequest {
    pb::RequestProjectRequest {
        id: id.into(),
        title: format!("Across {}", datasets.join(" and ")),
        purpose: "Compare what the datasets hold on the same patients".into(),
        datasets: datasets.iter().map(|d| (*d).to_owned()).collect(),
        epsilon: 5.0,
        delta: 1e-6,
        members: vec!["rita".into()],
        end_date: "2099-01-01".into(),
    }
}

fn alice_token(server: &tre_e2e::Server) -> String {
    server.token("alice", Role::Researcher)
}
