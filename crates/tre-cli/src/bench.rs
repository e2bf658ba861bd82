//! `tre bench`: on the same generated data, in one run, report ratios, not
//! absolute times:
//! - per query of a suite (the benchmark join and every question of the
//!   demo), the compile time alone, and the DP pipeline's time (compile
//!   and execute) over plain DataFusion's for the same SQL,
//!   run in a context of the sandbox's own factory (same session
//!   configuration, same decrypted extracts);
//! - encrypted over plaintext scan time, the plaintext side in a context
//!   with the sandbox's session configuration.
//!
//! Issue #13 extends this (scales up to 10M patients, peak memory per
//! side); this is its first step (issue #12 asked for one configuration on
//! both sides).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tre_core::{Delta, Epsilon};
use tre_query::{Budget, Engine, Limits};

use crate::setup::{self, GenerateArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 100_000)]
    pub patients: u64,
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    #[arg(long, default_value = ".tre/bench")]
    pub dir: PathBuf,
}

const DP_SQL: &str = "SELECT p.region, a.admission_method, COUNT(*) AS n, AVG(a.length_of_stay_days) AS los \
    FROM patients p JOIN admissions a ON p.person_id = a.person_id GROUP BY p.region, a.admission_method";
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

pub async fn run(args: BenchArgs) -> Result<()> {
    let key_file = args.dir.join("master.key");
    let enc = args.dir.join("encrypted/nhs_epr");
    let plain = args.dir.join("plaintext/nhs_epr");
    for (out, plaintext) in [(&enc, false), (&plain, true)] {
        setup::generate(&GenerateArgs {
            patients: args.patients,
            seed: 7,
            out: out.clone(),
            key_file: key_file.clone(),
            plaintext,
            policy: None,
            quiet: true,
        })?;
    }
    let policy = setup::load_policy(None)?;
    let profile = setup::load_profile(None, &policy.sdc_profile)?;
    let master = Arc::new(setup::master_key(&key_file, false)?);
    let engine = Engine::open(policy, profile, &enc, master, Limits::default())?;
    let suite: Vec<(&str, &str, f64)> = std::iter::once(("benchmark join", DP_SQL, 1.0))
        .chain(crate::demo::QUESTIONS.iter().copied())
        .collect();
    let mut rows = Vec::with_capacity(suite.len());
    for (title, sql, epsilon) in &suite {
        let budget = Budget {
            epsilon: Epsilon::new(*epsilon)?,
            // Charged only where key selection needs it.
            delta: Delta::new(1e-6)?,
        };
        let compile = median(args.runs, || async {
            engine.compile(sql, budget).await?;
            Ok(())
        })
        .await
        .with_context(|| format!("compile: {title}"))?;
        let dp = median(args.runs, || async {
            let plan = engine.compile(sql, budget).await?;
            engine.execute(&plan).await?;
            Ok(())
        })
        .await
        .with_context(|| format!("DP pipeline: {title}"))?;
        let plain = median(args.runs, || async {
            engine.sandbox_context().sql(sql).await?.collect().await?;
            Ok(())
        })
        .await
        .with_context(|| format!("plain DataFusion: {title}"))?;
        rows.push((*title, compile, dp, plain));
    }
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
    let plain_ctx = SessionContext::new_with_config(engine.sandbox_context().copied_config());
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

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "tre bench · {} patients · median of {} runs (same data, same process, same session configuration)",
        args.patients, args.runs
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "query",
        "compile ms",
        "DP pipeline ms",
        "plain DataFusion ms",
        "DP / plain",
    ]);
    let mut log_sum = 0.0;
    for (title, compile, dp, plain) in &rows {
        let ratio = dp.as_secs_f64() / plain.as_secs_f64();
        log_sum += ratio.ln();
        t.add_row([
            (*title).to_owned(),
            format!("{:.2}", ms(*compile)),
            format!("{:.1}", ms(*dp)),
            format!("{:.1}", ms(*plain)),
            format!("{ratio:.2}x"),
        ]);
    }
    println!("{t}");
    println!(
        "  geometric mean DP / plain over {} queries:          {:8.2}x",
        rows.len(),
        (log_sum / rows.len() as f64).exp()
    );
    println!(
        "  scan of admissions, encrypted:                         {:8.1} ms",
        ms(enc_scan)
    );
    println!(
        "  scan of admissions, plaintext:                         {:8.1} ms",
        ms(plain_scan)
    );
    println!(
        "  ratio encrypted / plaintext:                           {:8.2}x",
        enc_scan.as_secs_f64() / plain_scan.as_secs_f64()
    );
    Ok(())
}
