//! `tre bench`: on the same generated data, report ratios, not absolute
//! times:
//! - per query of a suite (the benchmark join and every question of the
//!   demo), the compile time alone, and the DP pipeline's time (compile
//!   and execute) over plain DataFusion's for the same SQL, run in a
//!   context of the sandbox's own factory (same session configuration,
//!   same decrypted extracts);
//! - encrypted over plaintext scan time, the plaintext side in a context
//!   with the sandbox's session configuration;
//! - the peak resident memory of each side.
//!
//! Each side runs in a process of its own (`--side dp|plain`, the same
//! binary), so that its peak RSS is its own; the parent generates the data
//! once (reused while patients, seed and policy are unchanged), runs the
//! two sides one after the other and prints the table (issue #13).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use tre_core::{Delta, Epsilon};
use tre_query::Budget;

use crate::setup::{self, GenerateArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 100_000)]
    pub patients: u64,
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Rounds of one DP process then one plain process; each query's time
    /// is the median over rounds of its per-process median, so a slow
    /// spell of the machine does not land on one side only. 0 skips the
    /// suite (with `--corpus`: compile times only).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=15))]
    pub rounds: u32,
    #[arg(long, default_value = ".tre/bench")]
    pub dir: PathBuf,
    /// Dataset policy to bound the extracts with and to serve (defaults to
    /// the embedded policies/nhs_epr.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Years of history to generate (with a policy that covers them, e.g.
    /// policies/nhs_epr_5y.toml).
    #[arg(long, default_value_t = 1)]
    pub years: u32,
    /// Corpus files (`[[case]]` with `name`, `sql`, optional `epsilon` and
    /// `delta`, as in tests/corpus/*.toml) whose compile times to report.
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// Run one side only and print its measurements as JSON (the parent
    /// runs each side in a process of its own).
    #[arg(long, value_enum, hide = true)]
    pub side: Option<Side>,
    /// Print the physical plans the DP side executes for each suite query
    /// (on standard error): the operator's EXPLAIN, never a researcher's.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Side {
    Dp,
    Plain,
}

/// One corpus case: only what compiling it needs.
#[derive(Deserialize)]
struct CorpusCase {
    name: String,
    sql: String,
    epsilon: Option<f64>,
    delta: Option<f64>,
}

#[derive(Deserialize)]
struct CorpusFile {
    case: Vec<CorpusCase>,
}

/// Median compile time of every case of `files` that compiles (refusals
/// are timed too: a refusal must be as quick), in this process.
async fn corpus_compile_times(args: &BenchArgs, key_file: &Path, enc: &Path) -> Result<()> {
    let engine = setup::open_engine(args.policy.as_deref(), None, enc, key_file)?;
    let mut times: Vec<(f64, String, bool)> = Vec::new();
    for file in &args.corpus {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let cases: CorpusFile =
            toml::from_str(&text).with_context(|| format!("{} is not a corpus", file.display()))?;
        for case in cases.case {
            let accepted = match engine.budget(case.epsilon, case.delta) {
                Ok(budget) => engine.compile(&case.sql, budget).await.is_ok(),
                Err(_) => false,
            };
            let budget = engine.budget(case.epsilon.or(Some(0.5)), case.delta.or(Some(1e-6)));
            let time = median(args.runs, || async {
                if let Ok(budget) = budget {
                    let _ = engine.compile(&case.sql, budget).await;
                }
                Ok(())
            })
            .await?;
            times.push((time.as_secs_f64() * 1e3, case.name, accepted));
        }
    }
    if times.is_empty() {
        return Ok(());
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let accepted = times.iter().filter(|t| t.2).count();
    let over = times.iter().filter(|t| t.0 >= 5.0).count();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].0;
    println!(
        "  corpus compile ms ({} cases, {accepted} accepted): p50 {:.2}, p90 {:.2}, max {:.2} ({}); {over} at or over 5 ms",
        times.len(),
        at(0.5),
        at(0.9),
        at(1.0),
        times.last().map_or("", |t| t.1.as_str())
    );
    for (ms, name, _) in times.iter().filter(|t| t.0 >= 5.0) {
        println!("    {ms:6.2} ms  {name}");
    }
    Ok(())
}

/// What one side's process measured.
#[derive(Serialize, Deserialize)]
struct Measured {
    /// Per suite query: median compile ms (DP side only) and median ms.
    queries: Vec<(f64, f64)>,
    /// Median scan ms of the encrypted and the plaintext extract (plain
    /// side only).
    scans: Option<(f64, f64)>,
    /// Peak resident set of the process, bytes.
    peak_rss: u64,
    /// Per suite query (DP side only): the most its memory pool held at
    /// once, bytes, over every run.
    pool_peaks: Vec<u64>,
    /// Per suite query (DP side only): the compiler's bound on that, bytes.
    memory_bounds: Vec<u64>,
}

impl Measured {
    /// Per query and scan, the median over rounds; the largest peak RSS.
    fn median_of(rounds: Vec<Measured>) -> Result<Measured> {
        let Some(first) = rounds.first() else {
            bail!("no rounds measured");
        };
        if rounds
            .iter()
            .any(|r| r.queries.len() != first.queries.len())
        {
            bail!("rounds measured different suites");
        }
        let mid = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let queries = (0..first.queries.len())
            .map(|q| {
                (
                    mid(rounds.iter().map(|r| r.queries[q].0).collect()),
                    mid(rounds.iter().map(|r| r.queries[q].1).collect()),
                )
            })
            .collect();
        let scans: Option<Vec<(f64, f64)>> = rounds.iter().map(|r| r.scans).collect();
        let scans = scans.map(|s| {
            (
                mid(s.iter().map(|x| x.0).collect()),
                mid(s.iter().map(|x| x.1).collect()),
            )
        });
        Ok(Measured {
            queries,
            scans,
            peak_rss: rounds.iter().map(|r| r.peak_rss).max().unwrap_or(0),
            pool_peaks: (0..first.pool_peaks.len())
                .map(|q| {
                    rounds
                        .iter()
                        .filter_map(|r| r.pool_peaks.get(q).copied())
                        .max()
                        .unwrap_or(0)
                })
                .collect(),
            memory_bounds: first.memory_bounds.clone(),
        })
    }
}

const DP_SQL: &str = "SELECT p.region, a.admission_method, COUNT(*) AS n, AVG(a.length_of_stay_days) AS los \
    FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.region, a.admission_method";
/// A group key without a public domain: DP key selection, and the per-patient
/// group bounding before it.
const KEY_SELECTION_SQL: &str =
    "SELECT primary_diagnosis, COUNT(*) AS admissions FROM admissions GROUP BY primary_diagnosis";
const SCAN_SQL: &str =
    "SELECT COUNT(*), SUM(length_of_stay_days), COUNT(DISTINCT person_id) FROM admissions";

async fn median<F, Fut>(runs: usize, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    f().await?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f().await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn suite() -> Vec<(&'static str, &'static str, f64)> {
    [
        ("benchmark join", DP_SQL, 1.0),
        ("benchmark key selection", KEY_SELECTION_SQL, 1.0),
    ]
    .into_iter()
    .chain(crate::demo::QUESTIONS.iter().copied())
    .collect()
}

/// Generate the encrypted and plaintext copies unless this directory
/// already holds them for the same patients and policy.
fn ensure_data(args: &BenchArgs, key_file: &Path, enc: &Path, plain: &Path) -> Result<()> {
    let policy = setup::load_policy(args.policy.as_deref())?;
    let marker = args.dir.join("generated");
    let expected = format!(
        "patients={} years={} seed=7 generator={} policy={}\n",
        args.patients,
        args.years,
        tre_synth::GENERATOR_VERSION,
        policy.source_hash
    );
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(expected.as_str()) {
        eprintln!(
            "reusing the {} patients in {}",
            args.patients,
            args.dir.display()
        );
        return Ok(());
    }
    for (out, plaintext) in [(enc, false), (plain, true)] {
        let started = Instant::now();
        let counts = setup::generate(&GenerateArgs {
            patients: args.patients,
            seed: 7,
            out: out.to_path_buf(),
            key_file: key_file.to_path_buf(),
            plaintext,
            policy: args.policy.clone(),
            years: args.years,
            quiet: true,
        })?;
        eprintln!(
            "generated {} ({} patients, {} event rows, {} bytes) in {:.1} s",
            out.display(),
            counts.patients,
            counts.admissions + counts.lab_results + counts.waiting_list + counts.prescriptions,
            setup::dir_bytes(out),
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::write(&marker, expected)?;
    Ok(())
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let key_file = args.dir.join("master.key");
    let enc = args.dir.join("encrypted/nhs_epr");
    let plain = args.dir.join("plaintext/nhs_epr");
    if let Some(side) = args.side {
        let measured = measure(&args, side, &key_file, &enc, &plain).await?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    ensure_data(&args, &key_file, &enc, &plain)?;
    if args.rounds == 0 {
        return corpus_compile_times(&args, &key_file, &enc).await;
    }
    let (mut dps, mut plains) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        dps.push(run_side(&args, Side::Dp)?);
        plains.push(run_side(&args, Side::Plain)?);
    }
    let (dp, plain_side) = (Measured::median_of(dps)?, Measured::median_of(plains)?);
    let Some((enc_scan, plain_scan)) = plain_side.scans else {
        bail!("the plain side measured no scans");
    };
    let suite = suite();
    if dp.queries.len() != suite.len() || plain_side.queries.len() != suite.len() {
        bail!("a side measured a different suite");
    }
    println!(
        "tre bench · {} patients · median of {} rounds of a median of {} runs (same data, same session configuration, sides in alternating processes)",
        args.patients, args.rounds, args.runs
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "query",
        "compile ms",
        "DP pipeline ms",
        "plain DataFusion ms",
        "DP / plain",
        "DP pool peak MiB",
        "DP bound MiB",
    ]);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut log_sum = 0.0;
    for (((((title, _, _), (compile, dp_ms)), (_, plain_ms)), pool_peak), bound) in suite
        .iter()
        .zip(&dp.queries)
        .zip(&plain_side.queries)
        .zip(&dp.pool_peaks)
        .zip(&dp.memory_bounds)
    {
        let ratio = dp_ms / plain_ms;
        log_sum += ratio.ln();
        t.add_row([
            (*title).to_owned(),
            format!("{compile:.2}"),
            format!("{dp_ms:.1}"),
            format!("{plain_ms:.1}"),
            format!("{ratio:.2}x"),
            format!("{:.1}", mib(*pool_peak)),
            format!("{:.0}", mib(*bound)),
        ]);
    }
    println!("{t}");
    println!(
        "  geometric mean DP / plain over {} queries:          {:8.2}x",
        suite.len(),
        (log_sum / suite.len() as f64).exp()
    );
    println!(
        "  peak RSS, DP side:                                     {:8.0} MiB",
        mib(dp.peak_rss)
    );
    println!(
        "  peak RSS, plain side:                                  {:8.0} MiB",
        mib(plain_side.peak_rss)
    );
    println!("  scan of admissions, encrypted:                         {enc_scan:8.1} ms");
    println!("  scan of admissions, plaintext:                         {plain_scan:8.1} ms");
    println!(
        "  ratio encrypted / plaintext:                           {:8.2}x",
        enc_scan / plain_scan
    );
    corpus_compile_times(&args, &key_file, &enc).await
}

/// Run this binary as one side and read what it measured.
fn run_side(args: &BenchArgs, side: Side) -> Result<Measured> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench")
        .args(["--patients", &args.patients.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--years", &args.years.to_string()])
        .arg("--dir")
        .arg(&args.dir)
        .args(args.explain.then_some("--explain"))
        .args([
            "--side",
            match side {
                Side::Dp => "dp",
                Side::Plain => "plain",
            },
        ]);
    if let Some(p) = &args.policy {
        cmd.arg("--policy").arg(p);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run the {side:?} side"))?;
    if !out.status.success() {
        bail!("the {side:?} side failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the {side:?} side printed no measurements"))
}

/// One side's measurements, in this process.
async fn measure(
    args: &BenchArgs,
    side: Side,
    key_file: &Path,
    enc: &Path,
    plain: &Path,
) -> Result<Measured> {
    let engine = setup::open_engine(args.policy.as_deref(), None, enc, key_file)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut queries = Vec::new();
    let mut pool_peaks = Vec::new();
    let mut memory_bounds = Vec::new();
    for (title, sql, epsilon) in suite() {
        let budget = Budget {
            epsilon: Epsilon::new(epsilon)?,
            // Charged only where key selection needs it.
            delta: Delta::new(1e-6)?,
        };
        let measured = match side {
            Side::Dp => {
                let compile = median(args.runs, || async {
                    engine.compile(sql, budget).await?;
                    Ok(())
                })
                .await
                .with_context(|| format!("compile: {title}"))?;
                if args.explain {
                    let plan = engine.compile(sql, budget).await?;
                    eprintln!("== {title}");
                    for p in tre_query::Engine::physical_plans_shown(&plan) {
                        eprintln!("{p}");
                    }
                }
                memory_bounds.push(engine.compile(sql, budget).await?.memory_bound());
                let pool_peak = std::cell::Cell::new(0usize);
                let dp = median(args.runs, || async {
                    let plan = engine.compile(sql, budget).await?;
                    let admission = engine.admit("bench").await?;
                    let (release, peak) = engine.execute_measured(&plan, &admission).await;
                    release?;
                    pool_peak.set(pool_peak.get().max(peak));
                    Ok(())
                })
                .await
                .with_context(|| format!("DP pipeline: {title}"))?;
                pool_peaks.push(pool_peak.get() as u64);
                (ms(compile), ms(dp))
            }
            Side::Plain => {
                let plain = median(args.runs, || async {
                    engine.sandbox_context().sql(sql).await?.collect().await?;
                    Ok(())
                })
                .await
                .with_context(|| format!("plain DataFusion: {title}"))?;
                (0.0, ms(plain))
            }
        };
        queries.push(measured);
    }
    let scans = match side {
        Side::Dp => None,
        Side::Plain => {
            let enc_scan = median(args.runs, || async {
                engine
                    .sandbox_context()
                    .sql(SCAN_SQL)
                    .await?
                    .collect()
                    .await?;
                Ok(())
            })
            .await?;
            // The sandbox's session configuration, over the plaintext copy.
            let plain_ctx =
                SessionContext::new_with_config(engine.sandbox_context().copied_config());
            plain_ctx
                .register_parquet(
                    "admissions",
                    plain.join("admissions.parquet").to_string_lossy().as_ref(),
                    ParquetReadOptions::default(),
                )
                .await?;
            let plain_scan = median(args.runs, || async {
                plain_ctx.sql(SCAN_SQL).await?.collect().await?;
                Ok(())
            })
            .await?;
            Some((ms(enc_scan), ms(plain_scan)))
        }
    };
    Ok(Measured {
        queries,
        scans,
        peak_rss: peak_rss(),
        pool_peaks,
        memory_bounds,
    })
}

/// This process's peak resident set (`VmHWM`), in bytes; 0 where the
/// kernel does not say.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
