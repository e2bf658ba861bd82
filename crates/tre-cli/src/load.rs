//! `tre load`: do small queries keep their latency while heavy ones run?
//! On generated data, a gateway on a loopback port, two phases of equal
//! length: small clients alone, then the same small clients while heavy
//! clients of another project keep the engine busy. Reports p50 and p99 of
//! the small queries' Submit and of a control-plane call (Budget) in each
//! phase (issue #11). Bounded: loopback only, a fixed number of clients, a
//! fixed duration, and a disposable state directory.
//!
//! With `--throughput` (issue #13) it measures capacity instead: the small
//! clients send distinct small queries (no stored release can answer them)
//! for the phase, and one client then alternates the same kind of query
//! through the gateway and through the release pipeline called in-process,
//! to give the gateway's cost per query.

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
    /// Measure queries per second and the gateway's cost per query instead
    /// (at most 20 s, so the phase fits the project's budget).
    #[arg(long)]
    pub throughput: bool,
}

/// The distinct small query number `k`: one table, a public key, a range
/// of birth years. 125,000 distinct texts, so no two calls of a run share
/// a plan hash.
fn distinct_small(k: usize) -> String {
    const KEYS: [&str; 5] = ["sex", "region", "age_band", "ethnicity", "imd_quintile"];
    let key = KEYS[k % 5];
    let k = k / 5;
    let lo = 1920 + k % 100;
    let k = k / 100;
    let hi = 2024 - k % 50;
    let imd = 1 + (k / 50) % 5;
    format!(
        "SELECT {key}, COUNT(*) AS n FROM patients \
         WHERE year_of_birth >= {lo} AND year_of_birth <= {hi} AND imd_quintile >= {imd} \
         GROUP BY {key}"
    )
}

/// ε of each throughput query: the policy's floor, so the phase fits the
/// budget.
const THROUGHPUT_EPSILON: f64 = 0.01;
/// The longest throughput phase: 20 s at 200 queries/s spends 40 ε.
const THROUGHPUT_SECONDS: u64 = 20;
/// Calls each way in the gateway-versus-in-process comparison.
const OVERHEAD_CALLS: usize = 100;

/// A client sending distinct small queries until `until`.
async fn distinct_client(
    url: String,
    token: String,
    client: usize,
    clients: usize,
    until: Instant,
) -> Result<Latencies> {
    let mut c = Client::connect(&url, &token).await?;
    let mut submits = Latencies::default();
    let mut k = client;
    while Instant::now() < until {
        let t = Instant::now();
        let r = c
            .query
            .submit(light(distinct_small(k), THROUGHPUT_EPSILON))
            .await;
        submits.record(t, &r);
        k += clients;
    }
    Ok(submits)
}

/// Queries per second from `args.small_clients` clients, then the
/// gateway's cost per query against the pipeline in-process.
async fn throughput(
    args: &LoadArgs,
    state: &tre_gateway::AppState,
    url: &str,
    token: &str,
) -> Result<()> {
    let seconds = args.seconds.min(THROUGHPUT_SECONDS);
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let clients: Vec<_> = (0..args.small_clients)
        .map(|k| {
            tokio::spawn(distinct_client(
                url.to_owned(),
                token.to_owned(),
                k,
                args.small_clients,
                until,
            ))
        })
        .collect();
    let mut submits = Latencies::default();
    for c in clients {
        let l = c.await??;
        submits.ok.extend(l.ok);
        submits.failed += l.failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "\n{} clients, distinct small queries for {seconds} s",
        args.small_clients
    );
    println!("{}", submits.line("  small Submit"));
    println!(
        "  throughput: {:.0} released queries/s",
        submits.ok.len() as f64 / elapsed
    );

    // One caller, alternating: the gateway, then the same pipeline the
    // gateway calls, in this process (no transport, no authentication).
    let mut c = Client::connect(url, token).await?;
    let repeats = tre_release::Repeats::default();
    let served = state.engines.now();
    let pipeline = tre_release::Pipeline {
        engine: served.first(),
        store: &*state.store,
        notary: &*state.notary,
        repeats: &repeats,
    };
    let caller = tre_release::Caller {
        who: tre_core::Principal::new(UserId::new("lena")?, Role::Researcher),
        client: "in-process".into(),
        action: "query.submit",
    };
    let project = state.store.project(&tre_core::ProjectId::new("light")?)?;
    let (mut gateway, mut in_process) = (Latencies::default(), Latencies::default());
    for i in 0..OVERHEAD_CALLS {
        let k = 100_000 + 2 * i;
        let t = Instant::now();
        let r = c
            .query
            .submit(light(distinct_small(k), THROUGHPUT_EPSILON))
            .await;
        gateway.record(t, &r);
        let query = tre_release::Query {
            sql: distinct_small(k + 1),
            epsilon: Some(THROUGHPUT_EPSILON),
            delta: None,
            totals: false,
        };
        let t = Instant::now();
        let r = pipeline.submit(&caller, &project, &query).await;
        in_process.record(t, &r);
    }
    println!("\none client, {OVERHEAD_CALLS} calls each way, alternating");
    println!("{}", gateway.line("  through the gateway"));
    println!("{}", in_process.line("  pipeline in-process"));
    if let (Some(g), Some(p)) = (gateway.quantile(0.5), in_process.quantile(0.5)) {
        println!(
            "  gateway / in-process, p50: ×{:.2}",
            g.as_secs_f64() / p.as_secs_f64()
        );
    }
    Ok(())
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

/// A Submit of `sql` to the small clients' project.
fn light(sql: String, epsilon: f64) -> pb::QueryRequest {
    pb::QueryRequest {
        project: "light".into(),
        sql,
        epsilon: Some(epsilon),
        delta: None,
        totals: false,
        dataset: String::new(),
    }
}

impl Latencies {
    /// Count one call that started at `started`.
    fn record<T, E>(&mut self, started: Instant, result: &Result<T, E>) {
        match result {
            Ok(_) => self.ok.push(started.elapsed()),
            Err(_) => self.failed += 1,
        }
    }

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
            .submit(light(SMALL_SQL.into(), EPSILON + STEP * i as f64))
            .await;
        submits.record(t, &r);
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
            dataset: String::new(),
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
    // The throughput phase spends up to 42 ε (the policy's lifetime cap for
    // the dataset is 100); the latency phases far less.
    serve.project_epsilon = Some(if args.throughput { 90.0 } else { 50.0 });
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
            dataset: String::new(),
        })
        .await)?;
    if args.throughput {
        println!(
            "tre load --throughput · {} patients · gateway on {bound}",
            args.patients
        );
        let result = throughput(&args, &state, &url, &tokens.0).await;
        let _ = stop.send(());
        let _ = handle.await;
        return result;
    }
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
