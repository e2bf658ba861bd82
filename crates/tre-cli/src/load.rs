//! `tre load`: do small queries keep their latency while heavy ones run?
//! On generated data, a gateway on a loopback port, two phases of equal
//! length: small clients alone, then the same small clients while heavy
//! clients of another project keep the engine busy. Reports p50 and p99 of
//! the small queries' Submit and of a control-plane call (Budget) in each
//! phase (issue #11). Bounded: loopback only, a fixed number of clients, a
//! fixed duration, and a disposable state directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tre_core::{Role, UserId};
use tre_proto::v1 as pb;

use crate::client::{Client, rpc};
use crate::setup::{self, GenerateArgs, ServeArgs};

#[derive(Args)]
pub struct LoadArgs {
    #[arg(long, default_value_t = 300_000)]
    pub patients: u64,
    /// Length of each phase.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Clients sending small queries (and budget calls), in both phases.
    #[arg(long, default_value_t = 2)]
    pub small_clients: usize,
    /// Clients sending heavy queries, in the second phase.
    #[arg(long, default_value_t = 2)]
    pub heavy_clients: usize,
    #[arg(long, default_value = ".tre/load")]
    pub dir: PathBuf,
}

/// A one-table count over a public key: what most researchers send.
const SMALL_SQL: &str = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
/// A four-way self-join on the privacy unit: as heavy as accepted
/// queries get (a fifth copy passes the work bound and is refused).
const HEAVY_SQL: &str = "SELECT COUNT(*) AS n FROM lab_results l \
    JOIN lab_results l1 ON l.person_id = l1.person_id \
    JOIN lab_results l2 ON l.person_id = l2.person_id \
    JOIN lab_results l3 ON l.person_id = l3.person_id";
/// ε per query; a distinct ε per call keeps the stored-release shortcut
/// for repeated queries from hiding the work.
const EPSILON: f64 = 0.01;
const STEP: f64 = 1e-6;

/// Latencies of one kind of call in one phase.
#[derive(Default)]
struct Latencies {
    ok: Vec<Duration>,
    failed: usize,
}

impl Latencies {
    fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.ok.clone();
        v.sort();
        let i = ((v.len() as f64 * q).ceil() as usize).checked_sub(1)?;
        v.get(i.min(v.len().saturating_sub(1))).copied()
    }

    fn line(&self, what: &str) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
        };
        format!(
            "{what:<28} {:>6} calls  p50 {:>10}  p99 {:>10}  failed {}",
            self.ok.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            self.failed
        )
    }
}

/// A client that sends small Submits and Budget calls until `until`.
async fn small_client(
    url: String,
    token: String,
    offset: usize,
    until: Instant,
) -> Result<(Latencies, Latencies)> {
    let mut c = Client::connect(&url, &token).await?;
    let (mut submits, mut budgets) = (Latencies::default(), Latencies::default());
    let mut i = offset;
    while Instant::now() < until {
        let t = Instant::now();
        let r = c
            .query
            .submit(pb::QueryRequest {
                project: "light".into(),
                sql: SMALL_SQL.into(),
                epsilon: Some(EPSILON + STEP * i as f64),
                delta: None,
                totals: false,
            })
            .await;
        match r {
            Ok(_) => submits.ok.push(t.elapsed()),
            Err(_) => submits.failed += 1,
        }
        let t = Instant::now();
        match c
            .query
            .budget(pb::BudgetRequest {
                project: "light".into(),
            })
            .await
        {
            Ok(_) => budgets.ok.push(t.elapsed()),
            Err(_) => budgets.failed += 1,
        }
        i += 1_000;
    }
    Ok((submits, budgets))
}

/// A client that sends heavy Submits until `until`; how many finished.
async fn heavy_client(
    url: String,
    token: String,
    offset: usize,
    until: Instant,
) -> Result<Latencies> {
    let mut c = Client::connect(&url, &token).await?;
    let mut heavy = Latencies::default();
    let mut i = offset;
    while Instant::now() < until {
        let t = Instant::now();
        let mut req = tonic::Request::new(pb::QueryRequest {
            project: "heavy".into(),
            sql: HEAVY_SQL.into(),
            epsilon: Some(EPSILON + STEP * i as f64),
            delta: None,
            totals: false,
        });
        // Stop with the phase: a cancelled heavy query frees its CPU.
        req.set_timeout(until.saturating_duration_since(Instant::now()));
        match c.query.submit(req).await {
            Ok(_) => heavy.ok.push(t.elapsed()),
            // The phase's end cut it short.
            Err(s)
                if s.code() == tonic::Code::DeadlineExceeded
                    || s.code() == tonic::Code::Cancelled =>
            {
                heavy.failed += 1
            }
            Err(s) => bail!(
                "a heavy query failed, so the load would not be heavy: {}",
                crate::client::status_text(&s)
            ),
        }
        i += 1_000;
    }
    Ok(heavy)
}

/// One phase: the small clients, and (if any) the heavy ones.
async fn phase(
    url: &str,
    tokens: &(String, String),
    small: usize,
    heavy: usize,
    length: Duration,
    round: usize,
) -> Result<(Latencies, Latencies, Latencies)> {
    let until = Instant::now() + length;
    let heavy_tasks: Vec<_> = (0..heavy)
        .map(|k| {
            tokio::spawn(heavy_client(
                url.to_owned(),
                tokens.1.clone(),
                round * 100 + k,
                until,
            ))
        })
        .collect();
    if heavy > 0 {
        // Let the heavy queries take their slots first.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let small_tasks: Vec<_> = (0..small)
        .map(|k| {
            tokio::spawn(small_client(
                url.to_owned(),
                tokens.0.clone(),
                round * 100 + 50 + k,
                until,
            ))
        })
        .collect();
    let (mut submits, mut budgets, mut heavies) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    for t in small_tasks {
        let (s, b) = t.await??;
        submits.ok.extend(s.ok);
        submits.failed += s.failed;
        budgets.ok.extend(b.ok);
        budgets.failed += b.failed;
    }
    for t in heavy_tasks {
        let h = t.await??;
        heavies.ok.extend(h.ok);
        heavies.failed += h.failed;
    }
    Ok((submits, budgets, heavies))
}

pub async fn run(args: LoadArgs) -> Result<()> {
    if args.small_clients == 0 || args.seconds == 0 {
        bail!("give at least one small client and one second");
    }
    let key_file = args.dir.join("master.key");
    let data = args.dir.join("data/nhs_epr");
    let marker = data.join(".generated");
    let expected = format!(
        "patients={} generator={}\n",
        args.patients,
        tre_synth::GENERATOR_VERSION
    );
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(expected.as_str()) {
        setup::generate(&GenerateArgs {
            patients: args.patients,
            seed: 11,
            out: data.clone(),
            key_file: key_file.clone(),
            plaintext: false,
            policy: None,
            years: 1,
            quiet: true,
        })?;
        std::fs::write(&marker, &expected)?;
    }
    // A new log and ledger each run: the load spends budget.
    let state_dir = args.dir.join("server");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("cannot clear {}", state_dir.display()))?;
    }
    let mut serve = ServeArgs::local(state_dir, data, key_file, "127.0.0.1:0".parse()?);
    serve.projects = vec!["light=lena".into(), "heavy=hugo".into()];
    serve.project_epsilon = Some(50.0);
    let state = Arc::new(setup::open_state(&serve)?);
    let (bound, stop, handle) =
        tre_gateway::spawn(Arc::clone(&state), "127.0.0.1:0".parse()?, None).await?;
    let url = format!("http://{bound}");
    let token = |user: &str| -> Result<String> {
        Ok(state
            .issuer
            .issue(&UserId::new(user)?, Role::Researcher, 3600)?)
    };
    let tokens = (token("lena")?, token("hugo")?);
    // Warm up: the first query opens the extracts.
    let mut warm = Client::connect(&url, &tokens.0).await?;
    rpc(warm
        .query
        .dry_run(pb::QueryRequest {
            project: "light".into(),
            sql: SMALL_SQL.into(),
            epsilon: Some(EPSILON),
            delta: None,
            totals: false,
        })
        .await)?;
    let length = Duration::from_secs(args.seconds);
    println!(
        "tre load · {} patients · gateway on {bound} · {} s per phase · {} small clients, {} heavy clients",
        args.patients, args.seconds, args.small_clients, args.heavy_clients
    );
    let (quiet_submits, quiet_budgets, _) =
        phase(&url, &tokens, args.small_clients, 0, length, 0).await?;
    let (busy_submits, busy_budgets, heavies) = phase(
        &url,
        &tokens,
        args.small_clients,
        args.heavy_clients,
        length,
        1,
    )
    .await?;
    println!("\nwithout heavy load");
    println!("{}", quiet_submits.line("  small Submit"));
    println!("{}", quiet_budgets.line("  Budget (control plane)"));
    println!("with {} heavy clients", args.heavy_clients);
    println!("{}", busy_submits.line("  small Submit"));
    println!("{}", busy_budgets.line("  Budget (control plane)"));
    println!(
        "{}",
        heavies.line("  heavy Submit (finished; failed = cut by the phase's end)")
    );
    let ratio =
        |busy: &Latencies, quiet: &Latencies, q: f64| match (busy.quantile(q), quiet.quantile(q)) {
            (Some(b), Some(q)) if !q.is_zero() => {
                format!("{:.2}", b.as_secs_f64() / q.as_secs_f64())
            }
            _ => "-".into(),
        };
    println!(
        "\nsmall Submit under load / alone: p50 ×{}, p99 ×{}; Budget: p50 ×{}, p99 ×{}",
        ratio(&busy_submits, &quiet_submits, 0.5),
        ratio(&busy_submits, &quiet_submits, 0.99),
        ratio(&busy_budgets, &quiet_budgets, 0.5),
        ratio(&busy_budgets, &quiet_budgets, 0.99),
    );
    let _ = stop.send(());
    let _ = handle.await;
    Ok(())
}
