//! `tre bench`: on the same generated data, in one run, report
//! (1) the DP pipeline's time over plain DataFusion's for the same aggregate,
//! (2) encrypted over plaintext scan time. Ratios, not absolute times.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tre_core::Epsilon;
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
            quiet: true,
        })?;
    }
    let policy = setup::load_policy(None)?;
    let profile = setup::load_profile(None, &policy.sdc_profile)?;
    let master = Arc::new(setup::master_key(&key_file, false)?);
    let engine = Engine::open(policy, profile, &enc, master, Limits::default())?;
    let budget = Budget {
        epsilon: Epsilon::new(1.0)?,
        delta: tre_core::Delta::ZERO,
    };

    let dp = median(args.runs, || async {
        let plan = engine.compile(DP_SQL, budget).await?;
        engine.execute(&plan).await?;
        Ok(())
    })
    .await?;
    let plain_df = median(args.runs, || async {
        engine
            .sandbox_context()
            .sql(DP_SQL)
            .await?
            .collect()
            .await?;
        Ok(())
    })
    .await?;
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
    let plain_ctx = SessionContext::new();
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
        "tre bench · {} patients · median of {} runs (same data, same process)",
        args.patients, args.runs
    );
    println!(
        "  DP pipeline (compile + bound + execute + noise + SDC): {:8.1} ms",
        ms(dp)
    );
    println!(
        "  plain DataFusion, same aggregate, same extracts:       {:8.1} ms",
        ms(plain_df)
    );
    println!(
        "  ratio DP / plain:                                      {:8.2}x",
        dp.as_secs_f64() / plain_df.as_secs_f64()
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
