//! `tre demo`: generate (or reuse) 100,000 synthetic patients, start the
//! gateway in-process on a loopback port, create a project with a
//! researcher, and ask real research questions through the gRPC client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tre_core::{Epsilon, ProjectId, Role, UserId};
use tre_proto::v1 as pb;
use tre_store::ProjectSeed;

use crate::client::{Client, render_dry_run, render_release, status_text};
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
const QUESTIONS: &[(&str, &str, f64)] = &[
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
        "patients={} seed={} key={}\n",
        args.patients,
        args.seed,
        key.key_id()
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
        quiet: false,
    })?;
    std::fs::write(&marker, expected)?;
    eprintln!("generated in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let key_file = args.state.join("master.key");
    let data = args.state.join("data/nhs_epr");
    ensure_data(&args, &data, &key_file)?;
    let serve_args = ServeArgs {
        state: args.state.join("server"),
        data: data.clone(),
        policy: None,
        sdc_dir: None,
        key_file,
        listen: args.listen,
        projects: vec![],
        project_epsilon: None,
    };
    let state = setup::open_state(&serve_args)?;
    // A fresh project per scripted run, so the demo can be rerun; `demo`
    // for --serve, whose ledger persists across restarts.
    let project = if args.serve {
        "demo".to_owned()
    } else {
        format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S%.3f"))
    };
    if !args.serve && state.store.project(&ProjectId::new(&project)?).is_ok() {
        anyhow::bail!("project {project} already exists; run the demo again");
    }
    let budget = if args.serve {
        state.engine.policy().budget.project_epsilon
    } else {
        Epsilon::new(DEMO_BUDGET)?
    };
    state.store.seed_project(&ProjectSeed {
        id: ProjectId::new(&project)?,
        title: "Demo: NHS service use and outcomes".into(),
        dataset: state.engine.policy().dataset.clone(),
        budget,
        members: vec![UserId::new("researcher")?],
    })?;
    let state = Arc::new(state);
    let addr = if args.serve {
        args.listen
    } else {
        "127.0.0.1:0".parse()?
    };
    let (bound, stop, handle) = tre_gateway::spawn(Arc::clone(&state), addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;

    if args.serve {
        let tokens = args.state.join("tokens");
        std::fs::create_dir_all(&tokens)?;
        for role in Role::ALL {
            let token = state
                .issuer
                .issue(&UserId::new(role.as_str())?, role, 8 * 3600)?;
            std::fs::write(tokens.join(format!("{role}.token")), token)?;
        }
        println!(
            "tre gateway on http://{bound} · project `demo` · member `researcher` · budget epsilon {budget}"
        );
        println!(
            "tokens (valid 8h) in {}/<role>.token for researcher, custodian, auditor, admin",
            tokens.display()
        );
        println!(
            "try:\n  tre query --server http://{bound} --token-file {}/researcher.token --project demo --dry-run \\\n    \"SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex\"",
            tokens.display()
        );
        println!(
            "  tre catalog --server http://{bound} --token-file {}/researcher.token --table admissions",
            tokens.display()
        );
        println!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
        let _ = stop.send(());
        let _ = handle.await;
        return Ok(());
    }

    let token = state
        .issuer
        .issue(&UserId::new("researcher")?, Role::Researcher, 3600)?;
    let mut client = Client::connect(&format!("http://{bound}"), &token).await?;
    println!(
        "\ntre demo · gateway on {bound} · project {project} · researcher `researcher` · budget epsilon {budget}\n"
    );

    let (_, sql, eps) = QUESTIONS[0];
    let dry = client
        .query
        .dry_run(pb::QueryRequest {
            project: project.clone(),
            sql: sql.into(),
            delta: None,
            epsilon: Some(eps),
        })
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    println!(
        "▶ dry run of question 1 (costs nothing)\n{}",
        render_dry_run(&dry)
    );

    for (i, (title_i, sql, eps)) in QUESTIONS.iter().enumerate() {
        println!(
            "▶ Q{}: {title_i}\n  {}\n",
            i + 1,
            sql.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let t = Instant::now();
        let r = client
            .query
            .submit(pb::QueryRequest {
                project: project.clone(),
                sql: (*sql).into(),
                delta: None,
                epsilon: Some(*eps),
            })
            .await
            .map_err(|s| anyhow::anyhow!(status_text(&s)))?
            .into_inner();
        print!("{}", render_release(&r, Some(14)));
        println!("  ({:.2}s)\n", t.elapsed().as_secs_f64());
    }

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
        let refused = client
            .query
            .submit(pb::QueryRequest {
                project: project.clone(),
                sql: sql.into(),
                delta: None,
                epsilon: eps,
            })
            .await;
        println!(
            "  {}\n",
            refused
                .err()
                .map(|s| status_text(&s))
                .unwrap_or_else(|| "UNEXPECTEDLY ACCEPTED".into())
        );
    }

    let b = client
        .query
        .budget(pb::BudgetRequest {
            project: project.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    let events = state.store.audit_events()?.len();
    let chain = match state.store.verify_chain()? {
        None => "intact".to_owned(),
        Some(seq) => format!("BROKEN at event {seq}"),
    };
    println!(
        "budget: spent {} of {}, {} left · audit log: {events} events, hash chain {chain}",
        b.epsilon_spent, b.epsilon_budget, b.epsilon_remaining
    );
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    let _ = stop.send(());
    let _ = handle.await;
    Ok(())
}
