//! The timing channel (issue #10): how long a query takes must not depend
//! on one patient beyond the bound the compiler enforces. Finding 4 made a
//! branch taken by one patient cost `lpad(.., 100000000, ..)`; now every
//! expression's work per row is bounded at compile time, and one patient's
//! rows can add at most `MAX_PATIENT_WORK` units.
//!
//! The test compares neighbouring datasets: D and D without its heaviest
//! patient, under the costliest query the bounds allow, run many times
//! interleaved. It asserts that a rank test (Mann–Whitney U) cannot tell
//! them apart (p ≥ 1e-4), and, as a positive control, that the same test
//! does tell them apart when one patient's rows are given the unbounded
//! work of finding 4 (in plain DataFusion, which tre would refuse). It
//! asserts no time; it prints the measured medians and the cost of a work
//! unit, from which ARCHITECTURE.md states the bound.

use std::sync::Arc;
use std::time::Instant;

use tre_core::Code;
use tre_e2e::{engine_with, fixture};
use tre_query::Engine;

use crate::corpus::heaviest_patients;

/// Runs per variant, interleaved.
const RUNS: usize = 15;

/// Two-sided p-value of the Mann–Whitney U test (normal approximation,
/// continuous data).
fn mann_whitney(a: &[f64], b: &[f64]) -> f64 {
    let (n, m) = (a.len() as f64, b.len() as f64);
    let u: f64 = a
        .iter()
        .map(|x| {
            b.iter()
                .map(|y| match x.partial_cmp(y) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                })
                .sum::<f64>()
        })
        .sum();
    let mean = n * m / 2.0;
    let sd = (n * m * (n + m + 1.0) / 12.0).sqrt();
    let z = ((u - mean).abs() - 0.5).max(0.0) / sd;
    // Two-sided normal tail, by the complementary error function.
    erfc(z / std::f64::consts::SQRT_2)
}

/// erfc by Numerical Recipes' Chebyshev fit (relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = t
        * (-x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { y } else { 2.0 - y }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn time_exact(engine: &Engine, sql: &str, excluded: &[String]) -> f64 {
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    engine
        .exact(sql, budget, excluded)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    start.elapsed().as_secs_f64()
}

async fn time_plain(engine: &Engine, sql: &str) -> f64 {
    let ctx = engine.sandbox_context();
    let start = Instant::now();
    ctx.sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    start.elapsed().as_secs_f64()
}

/// Issue #10, finding 4: one patient cannot move the run time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_patient_cannot_move_the_run_time() {
    let mut engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
    engine.set_deterministic_bounding(Some(7));
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));

    // The amplifier of finding 4 is refused before it runs, for free.
    let finding4 = "SELECT COUNT(*) FROM patients p WHERE length(CASE WHEN p.year_of_birth = 1950 THEN lpad(p.sex, 100000000, 'x') ELSE p.sex END) > 0";
    let refused = engine.compile(finding4, budget).await.map(|_| ());
    assert_eq!(
        refused.map_err(|e| e.code()),
        Err(Code::UnsupportedExpression),
        "finding 4's amplifier must be refused"
    );

    // The costliest text work the bounds accept: padded values concatenated
    // over a join, on every row of the heaviest patient.
    let pads = |n: usize| {
        (0..n)
            .map(|_| "lpad(p.sex, 1000, 'x')")
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut heavy_sql = None;
    for n in (1..=16).rev() {
        let sql = format!(
            "SELECT COUNT(*) FROM patients p JOIN lab_results l ON p.person_id = l.person_id WHERE length(concat({})) > 0",
            pads(n)
        );
        if let Ok(plan) = engine.compile(&sql, budget).await {
            println!(
                "timing: the costliest accepted query pads {n} times: {}",
                plan.description()
                    .iter()
                    .find(|d| d.starts_with("work per row"))
                    .cloned()
                    .unwrap_or_default()
            );
            heavy_sql = Some(sql);
            break;
        }
    }
    let heavy_sql = heavy_sql.unwrap_or_else(|| panic!("no padded query was accepted"));

    let heavy = heaviest_patients(&engine).await;
    let target = vec![heavy[0].clone()];
    let nobody = vec!["nobody".to_owned()];
    // Warm up caches and the decryption path.
    for _ in 0..2 {
        time_exact(&engine, &heavy_sql, &nobody).await;
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        with.push(time_exact(&engine, &heavy_sql, &nobody).await);
        without.push(time_exact(&engine, &heavy_sql, &target).await);
    }
    let p_neighbours = mann_whitney(&with, &without);

    // Positive control: the same comparison when one patient's rows do
    // unbounded work (plain DataFusion; tre refuses this query).
    let control = |pad: usize| {
        format!(
            "SELECT COUNT(*) FROM patients p JOIN lab_results l ON p.person_id = l.person_id WHERE length(CASE WHEN p.person_id = '{}' THEN lpad(p.sex, {pad}, 'x') ELSE p.sex END) > 0",
            heavy[0]
        )
    };
    let (mut amplified, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        amplified.push(time_plain(&engine, &control(20_000_000)).await);
        plain.push(time_plain(&engine, &control(1)).await);
    }
    let p_control = mann_whitney(&amplified, &plain);

    // The cost of one work unit: the padded query on every row against the
    // same join without the padding.
    let cheap = "SELECT COUNT(*) FROM patients p JOIN lab_results l ON p.person_id = l.person_id WHERE length(p.sex) > 0";
    let (mut full, mut base) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        full.push(time_exact(&engine, &heavy_sql, &nobody).await);
        base.push(time_exact(&engine, cheap, &nobody).await);
    }
    let plan = engine
        .compile(&heavy_sql, budget)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rows = engine
        .exact(cheap, budget, &nobody)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .laplace
        .values()
        .next()
        .map_or(1, |v| v[0].max(1));
    let ms = |s: f64| s * 1e3;
    let per_row = (median(&full) - median(&base)).max(0.0) / rows as f64;
    println!(
        "timing: neighbours (with / without the heaviest patient): median {:.2} / {:.2} ms, Mann-Whitney p = {p_neighbours:.3}",
        ms(median(&with)),
        ms(median(&without))
    );
    println!(
        "timing: positive control (one patient's rows padded to 20,000,000): median {:.2} / {:.2} ms, p = {p_control:.2e}",
        ms(median(&amplified)),
        ms(median(&plain))
    );
    println!(
        "timing: the costliest accepted row costs {:.2} µs over {rows} rows ({} rows per patient at most): one patient adds at most {:.1} µs",
        per_row * 1e6,
        plan.max_rows_per_unit(),
        per_row * 1e6 * plan.max_rows_per_unit() as f64
    );
    assert!(
        p_control < 1e-3,
        "the rank test cannot see even an unbounded amplifier (p = {p_control}); it has no power here"
    );
    assert!(
        p_neighbours >= 1e-4,
        "one patient's presence changes the run time detectably (p = {p_neighbours})"
    );
}
