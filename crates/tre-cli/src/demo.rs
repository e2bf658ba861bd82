//! `tre demo`: generate (or reuse) 100,000 synthetic patients, start the
//! gateway in-process on a loopback port, and play every role through the
//! gRPC client: a researcher requests a project, a custodian approves it,
//! the researcher asks real research questions, and an auditor lists,
//! verifies and exports the log, then verifies the export offline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tre_core::{ProjectId, Role, UserId};
use tre_gateway::AppState;
use tre_proto::v1 as pb;
use tre_store::ProjectSeed;

use crate::client::{Client, render_dry_run, render_release, rpc, status_text};
use crate::governance::{
    export, export_release, render_events, render_project, render_verify, verify_offline,
    verify_release,
};
use crate::setup::{self, GenerateArgs, ServeArgs};

#[derive(Args)]
pub struct DemoArgs {
    /// Leave the gateway running (project `demo`) instead of running questions.
    #[arg(long)]
    pub serve: bool,
    #[arg(long, default_value = ".tre/demo")]
    pub state: PathBuf,
    /// Address for --serve (the scripted demo uses a free loopback port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[arg(long, default_value_t = 100_000)]
    pub patients: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// (title, SQL, epsilon)
pub(crate) const QUESTIONS: &[(&str, &str, f64)] = &[
    (
        "Emergency admissions by NHS region and month, 2024",
        "SELECT p.region, a.admission_month, COUNT(*) AS admissions \
         FROM patients p JOIN admissions a ON p.person_id = a.person_id \
         WHERE a.admission_method = 'emergency' \
         GROUP BY p.region, a.admission_month",
        1.0,
    ),
    (
        "Mean HbA1c (mmol/mol) by diabetes status and deprivation quintile (1 = most deprived)",
        "SELECT p.diabetes, p.imd_quintile, AVG(l.value) AS mean_hba1c, COUNT(DISTINCT p.person_id) AS patients \
         FROM patients p JOIN lab_results l ON p.person_id = l.person_id \
         WHERE l.test = 'HbA1c' \
         GROUP BY p.diabetes, p.imd_quintile",
        1.0,
    ),
    (
        "28-day mortality of COVID-19 admissions by ventilation and dexamethasone",
        "SELECT ventilated, dexamethasone, AVG(died_28d) AS mortality_28d, COUNT(*) AS admissions \
         FROM admissions WHERE covid19 \
         GROUP BY ventilated, dexamethasone",
        2.0,
    ),
    (
        "Referral-to-treatment time (weeks) by NHS region",
        "SELECT p.region, AVG(w.rtt_weeks) AS mean_rtt_weeks, COUNT(*) AS pathways \
         FROM patients p JOIN waiting_list w ON p.person_id = w.person_id \
         GROUP BY p.region",
        0.5,
    ),
    (
        "Emergency admissions by ICD-10 chapter and sex (three tables: admissions, patients, the public ICD-10 lookup)",
        "SELECT c.chapter_title, p.sex, COUNT(*) AS admissions \
         FROM admissions a JOIN patients p ON a.person_id = p.person_id \
         JOIN icd10_codes c ON a.primary_diagnosis = c.code \
         WHERE a.admission_method = 'emergency' \
         GROUP BY c.chapter_title, p.sex ORDER BY c.chapter_title, p.sex",
        0.5,
    ),
    (
        "Median referral-to-treatment time (weeks) by specialty",
        "SELECT specialty, MEDIAN(rtt_weeks) AS median_weeks, COUNT(*) AS pathways \
         FROM waiting_list GROUP BY specialty",
        0.5,
    ),
    (
        "Patients by number of 2024 admissions (a per-patient feature) and deprivation quintile",
        "WITH per_patient AS (SELECT person_id, COUNT(*) AS n FROM admissions GROUP BY person_id) \
         SELECT CASE WHEN pp.n >= 3 THEN '3+' ELSE CAST(pp.n AS VARCHAR) END AS admissions_2024, \
                p.imd_quintile, COUNT(*) AS patients \
         FROM per_patient pp JOIN patients p ON pp.person_id = p.person_id \
         GROUP BY 1, 2 ORDER BY 2, 1",
        0.5,
    ),
];
const DEMO_BUDGET: f64 = 6.5;

fn ensure_data(args: &DemoArgs, data: &Path, key_file: &Path) -> Result<()> {
    let key = setup::master_key(key_file, true)?;
    let marker = data.join(".generated");
    let expected = format!(
        // The generator's version is part of the marker: extracts written
        // before issue #13 carry no layout and are not served.
        "patients={} seed={} key={} generator={}\n",
        args.patients,
        args.seed,
        key.key_id(),
        tre_synth::GENERATOR_VERSION
    );
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(expected.as_str()) {
        eprintln!(
            "reusing {} synthetic patients in {}",
            args.patients,
            data.display()
        );
        return Ok(());
    }
    let started = Instant::now();
    setup::generate(&GenerateArgs {
        patients: args.patients,
        seed: args.seed,
        out: data.to_path_buf(),
        key_file: key_file.to_path_buf(),
        plaintext: false,
        policy: None,
        years: 1,
        quiet: false,
    })?;
    std::fs::write(&marker, expected)?;
    eprintln!("generated in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn days_from_today(n: u64) -> Result<chrono::NaiveDate> {
    tre_store::today()
        .checked_add_days(chrono::Days::new(n))
        .context("date out of range")
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let key_file = args.state.join("master.key");
    let data = args.state.join("data/nhs_epr");
    ensure_data(&args, &data, &key_file)?;
    let serve_args = ServeArgs::local(args.state.join("server"), data, key_file, args.listen);
    let state = match setup::open_state(&serve_args) {
        Err(e)
            if matches!(
                e.downcast_ref::<tre_store::StoreError>(),
                Some(tre_store::StoreError::PreGovernanceState)
            ) =>
        {
            // The demo's state is disposable; keep the old log aside
            // rather than refuse to run.
            let aside = args.state.join(format!(
                "server.schema1-{}",
                chrono::Utc::now().format("%Y%m%d%H%M%S")
            ));
            std::fs::rename(&serve_args.state, &aside)?;
            eprintln!("moved demo state from an older tre to {}", aside.display());
            setup::open_state(&serve_args)?
        }
        other => other?,
    };
    let state = Arc::new(state);
    if args.serve {
        return serve_forever(&args, state).await;
    }
    let (bound, stop, handle) =
        tre_gateway::spawn(Arc::clone(&state), "127.0.0.1:0".parse()?, None).await?;
    let url = format!("http://{bound}");
    let token = |user: &str, role: Role| -> Result<String> {
        Ok(state.issuer.issue(&UserId::new(user)?, role, 3600)?)
    };
    let mut researcher = Client::connect(&url, &token("rhea", Role::Researcher)?).await?;
    let mut custodian = Client::connect(&url, &token("cara", Role::Custodian)?).await?;
    let mut auditor = Client::connect(&url, &token("aziz", Role::Auditor)?).await?;
    // A fresh project per run, so the demo can be rerun on the same state.
    let project = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S%.3f"));
    println!("\ntre demo · gateway on {bound} · researcher rhea · custodian cara · auditor aziz\n");

    println!("▶ researcher rhea requests project {project} (epsilon {DEMO_BUDGET}, 90 days)");
    rpc(researcher
        .projects
        .request_project(pb::RequestProjectRequest {
            id: project.clone(),
            title: "NHS service use and outcomes".into(),
            purpose: "How do admissions, diabetes control, COVID-19 treatment and waiting times vary across England?".into(),
            datasets: vec![state.engines.now().first().policy().dataset.clone()],
            epsilon: DEMO_BUDGET,
            delta: 1e-6,
            members: vec!["rhea".into()],
            end_date: days_from_today(90)?.to_string(),
        })
        .await)?;
    let ask = |sql: &str, eps: Option<f64>| pb::QueryRequest {
        project: project.clone(),
        sql: sql.into(),
        epsilon: eps,
        delta: None,
        totals: false,
        dataset: String::new(),
    };
    let early = researcher
        .query
        .submit(ask(QUESTIONS[0].1, Some(QUESTIONS[0].2)))
        .await;
    println!(
        "  a query before approval: {}\n",
        early
            .err()
            .map(|s| status_text(&s))
            .unwrap_or_else(|| "UNEXPECTEDLY ACCEPTED".into())
    );

    println!("▶ custodian cara approves it, for 30 days rather than 90");
    let approved = rpc(custodian
        .projects
        .approve_project(pb::ApproveProjectRequest {
            id: project.clone(),
            epsilon: None,
            delta: None,
            end_date: days_from_today(30)?.to_string(),
            reason: "public-interest purpose; aggregate outputs only".into(),
        })
        .await)?;
    println!("{}", render_project(&approved));

    let (_, sql, eps) = QUESTIONS[0];
    let dry = rpc(researcher.query.dry_run(ask(sql, Some(eps))).await)?;
    println!(
        "▶ dry run of question 1 (costs nothing)\n{}",
        render_dry_run(&dry)
    );
    let mut held = Vec::new();
    for (i, (title, sql, eps)) in QUESTIONS.iter().enumerate() {
        println!(
            "▶ Q{}: {title}\n  {}\n",
            i + 1,
            sql.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let t = Instant::now();
        let r = rpc(researcher.query.submit(ask(sql, Some(*eps))).await)?;
        if r.status() == pb::ReleaseStatus::Held {
            println!(
                "  held in the airlock ({}); rhea sees only: {}",
                r.hold_reason,
                r.notes.join("; ")
            );
            held.push((i + 1, r.release_id.clone()));
        } else {
            print!("{}", render_release(&r, Some(14)));
        }
        println!("  ({:.2}s)\n", t.elapsed().as_secs_f64());
    }

    println!("▶ custodian cara reviews the airlock queue");
    let queue = rpc(custodian
        .releases
        .list_releases(pb::ListReleasesRequest {
            project: project.clone(),
            status: pb::ReleaseStatus::Held as i32,
        })
        .await)?;
    println!("  {} release(s) held", queue.releases.len());
    for (q, id) in &held {
        let decided = rpc(custodian
            .releases
            .approve_release(pb::ReviewReleaseRequest {
                id: id.clone(),
                reason: "small cells are suppressed consistently; safe to release".into(),
            })
            .await)?;
        println!(
            "  Q{q}: {} → {}",
            decided.id,
            crate::client::release_status_name(decided.status)
        );
    }
    if let Some((q, id)) = held.first() {
        let got = rpc(researcher
            .releases
            .get_release(pb::GetReleaseRequest { id: id.clone() })
            .await)?;
        if let Some(r) = &got.release {
            println!("\n▶ rhea fetches Q{q}, now released");
            print!("{}", render_release(r, Some(8)));
        }
        let dir = args.state.join(format!("release-{id}"));
        export_release(&got, &dir)?;
        println!(
            "  exported to {}; offline: {}\n",
            dir.display(),
            verify_release(&dir, &got.public_key)?
        );
    }
    let again = rpc(researcher.query.submit(ask(sql, Some(eps))).await)?;
    println!(
        "▶ Q1 asked again: its stored release {} comes back, epsilon spent {}\n",
        again.release_id, again.epsilon_spent
    );
    let researcher_token = token("rhea", Role::Researcher)?;
    let table = flight_release(&url, &researcher_token, &project, sql, eps).await?;
    let meta = table.schema().metadata().clone();
    let field = |k: &str| meta.get(k).cloned().unwrap_or_default();
    println!(
        "▶ Q1 over Arrow Flight SQL, as ADBC from Python or R asks it: release {} again, epsilon spent {}, {} rows with intervals and statuses",
        field("tre.release_id"),
        field("tre.epsilon_spent"),
        table.num_rows()
    );
    println!(
        "{}\n",
        datafusion::arrow::util::pretty::pretty_format_batches(&[
            table.slice(0, table.num_rows().min(3))
        ])?
    );

    for (title, sql, eps) in [
        (
            "a row-level select",
            "SELECT person_id, date_of_death FROM patients",
            None,
        ),
        (
            "a query the remaining budget cannot pay for (epsilon 1.0)",
            "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
            Some(1.0),
        ),
    ] {
        println!("▶ refusal: {title}");
        let refused = researcher.query.submit(ask(sql, eps)).await;
        println!(
            "  {}\n",
            refused
                .err()
                .map(|s| status_text(&s))
                .unwrap_or_else(|| "UNEXPECTEDLY ACCEPTED".into())
        );
    }
    let b = rpc(researcher
        .query
        .budget(pb::BudgetRequest {
            project: project.clone(),
        })
        .await)?;
    println!(
        "budget: spent {} of {}, {} left\n",
        b.epsilon_spent, b.epsilon_budget, b.epsilon_remaining
    );

    println!("▶ auditor aziz lists the project's events, verifies the log and exports it");
    let events = rpc(auditor
        .audit
        .list_events(pb::ListEventsRequest {
            project: project.clone(),
            ..Default::default()
        })
        .await)?;
    print!("{}", render_events(&events.events));
    // The auditor pins the key they wrote down when the server started
    // (its fingerprint), so a key swapped on the server's disk would fail.
    let pinned = hex::encode(state.store.audit_public_key());
    let verified = rpc(auditor
        .audit
        .verify_log(pb::VerifyLogRequest {
            pinned_public_key: pinned.clone(),
        })
        .await)?;
    println!(
        "  on the server, pinned to key {}: {}",
        verified.key_fingerprint,
        render_verify(&verified)
    );
    let (jsonl, _) = export(&mut auditor).await?;
    let file = args.state.join("audit-export.jsonl");
    std::fs::write(&file, &jsonl)?;
    let (offline, _) = verify_offline(&file, &pinned)?;
    println!(
        "  offline, from {} and the pinned public key alone: {offline}",
        file.display()
    );
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    let _ = stop.send(());
    let _ = handle.await;
    Ok(())
}

/// `tre demo --serve`: an operator-seeded project `demo` and a token per
/// role on disk, until Ctrl-C.
/// One release over the gateway's Arrow Flight SQL endpoint, the way the
/// stock ADBC driver asks for it: GetFlightInfo (the release runs), then
/// DoGet of the ticket (the stored table).
async fn flight_release(
    url: &str,
    token: &str,
    project: &str,
    sql: &str,
    epsilon: f64,
) -> Result<datafusion::arrow::array::RecordBatch> {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use futures::TryStreamExt;

    let headers = [
        ("authorization", format!("Bearer {token}")),
        (tre_gateway::PROJECT_HEADER, project.to_owned()),
        (tre_gateway::EPSILON_HEADER, epsilon.to_string()),
    ];
    fn request<T>(msg: T, headers: &[(&'static str, String)]) -> Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        for (k, v) in headers {
            r.metadata_mut().insert(*k, v.parse()?);
        }
        Ok(r)
    }
    let channel = tonic::transport::Channel::from_shared(url.to_owned())?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let mut client = FlightServiceClient::new(channel);
    let command = CommandStatementQuery {
        query: sql.to_owned(),
        transaction_id: None,
    };
    let descriptor =
        arrow_flight::FlightDescriptor::new_cmd(prost::Message::encode_to_vec(&command.as_any()));
    let info = client
        .get_flight_info(request(descriptor, &headers)?)
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    let ticket = info
        .endpoint
        .first()
        .and_then(|e| e.ticket.clone())
        .context("the FlightInfo has no ticket")?;
    let stream = client
        .do_get(request(ticket, &headers)?)
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    let batches: Vec<_> = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
        stream.map_err(arrow_flight::error::FlightError::from),
    )
    .try_collect()
    .await?;
    let schema = info.try_decode_schema()?;
    Ok(datafusion::arrow::compute::concat_batches(
        &std::sync::Arc::new(schema),
        &batches,
    )?)
}

/// What a researcher pastes into Python to query this server with the
/// stock ADBC Flight SQL driver (issue #14): no tre code needed.
fn python_snippet(bound: &SocketAddr, token_file: &Path) -> String {
    let token_file = std::fs::canonicalize(token_file).unwrap_or_else(|_| token_file.to_path_buf());
    format!(
        r#"from Python (pip install adbc-driver-flightsql pandas pyarrow):
  import adbc_driver_flightsql.dbapi as flight_sql
  token = open("{token}").read().strip()
  conn = flight_sql.connect("grpc://{bound}", autocommit=True, db_kwargs={{
      "adbc.flight.sql.authorization_header": "Bearer " + token,
      "adbc.flight.sql.rpc.call_header.x-tre-project": "demo",
      "adbc.flight.sql.rpc.call_header.x-tre-epsilon": "0.5"}})
  cur = conn.cursor(); cur.execute("SELECT region, COUNT(*) AS n FROM patients GROUP BY region")
  df = cur.fetch_df()   # n, n_ci_low, n_ci_high, n_status per region"#,
        token = token_file.display(),
    )
}

async fn serve_forever(args: &DemoArgs, state: Arc<AppState>) -> Result<()> {
    let budget = state.engines.now().first().policy().budget;
    state.store.seed_project(&ProjectSeed {
        id: ProjectId::new("demo")?,
        title: "Demo: NHS service use and outcomes".into(),
        dataset: state.engines.now().first().policy().dataset.clone(),
        epsilon: budget.project_epsilon,
        delta: budget.project_delta,
        members: vec![UserId::new("researcher")?],
        end_date: days_from_today(365)?,
    })?;
    let (bound, stop, handle) = tre_gateway::spawn(Arc::clone(&state), args.listen, None)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let tokens = args.state.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    for role in Role::ALL {
        let token = state
            .issuer
            .issue(&UserId::new(role.as_str())?, role, 8 * 3600)?;
        std::fs::write(tokens.join(format!("{role}.token")), token)?;
    }
    println!(
        "tre gateway on http://{bound} · project `demo` · member `researcher` · budget epsilon {}",
        budget.project_epsilon
    );
    println!(
        "tokens (valid 8h) in {}/<role>.token for researcher, custodian, auditor, admin; audit public key in {}",
        tokens.display(),
        args.state.join("server/audit.pub").display()
    );
    println!(
        "try:\n  tre query --server http://{bound} --token-file {}/researcher.token --project demo --dry-run \\\n    \"SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex\"",
        tokens.display()
    );
    println!(
        "  tre audit verify --server http://{bound} --token-file {}/auditor.token",
        tokens.display()
    );
    println!(
        "{}",
        python_snippet(&bound, &tokens.join("researcher.token"))
    );
    println!("press Ctrl-C to stop");
    tre_gateway::shutdown_signal().await;
    let _ = stop.send(());
    let _ = handle.await;
    Ok(())
}
