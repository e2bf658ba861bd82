//! The empirical privacy audit (issue #10).
//!
//! For a handful of mechanisms and query shapes, run the release's
//! mechanisms many times on a dataset D and on a neighbour D' (D without
//! one patient: a canary written as the worst case the policy allows, so
//! that every measurement moves by its full sensitivity), and
//! estimate a lower bound on the privacy loss with the method of DP
//! auditing papers (Jagielski et al. 2020, Nasr et al. 2021): pick an event
//! on a pilot sample, count it on fresh samples from D and D', and turn the
//! counts into a one-sided Clopper–Pearson bound
//! `ε_lb = ln((p_lo(D) − δ) / p_hi(D'))`, which holds with confidence
//! 1 − 2α. The test fails if ε_lb exceeds the ε the compiler declared for
//! that mechanism. The exact aggregates come from the real compiler and
//! engine (deterministic bounding); the noise comes from the very function
//! `execute` uses.
//!
//! For a Laplace measurement the event is a threshold on the exact log-
//! likelihood ratio between D and D' over all cells (the most powerful
//! test, so the bound is tight when the sensitivity is right); for a
//! quantile, a threshold on the released value; for key selection, "the
//! key is released".
//!
//! `cargo test -p tre-e2e --test e2e audit` runs 2,000 trials per side;
//! `TRE_AUDIT_TRIALS=200000 cargo test --release -p tre-e2e --test e2e audit -- --nocapture`
//! the large version.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use statrs::distribution::{Beta, ContinuousCDF};
use tre_e2e::{engine_on, fixture, read_extract, write_extract};
use tre_query::soundness::{Exact, NoisyRelease};
use tre_query::{Budget, Engine, Measure, PrivatePlan};

/// One-sided confidence of each Clopper–Pearson bound; with 12 audits of
/// two bounds each, the chance of a false failure is below 3e-3.
const ALPHA: f64 = 1e-4;

struct Shape {
    name: &'static str,
    sql: &'static str,
    epsilon: f64,
    delta: Option<f64>,
    /// Trials relative to the default: cheap shapes whose loss spreads over
    /// several cells need more to bound it tightly.
    trials: usize,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "count by a public key",
        sql: "SELECT region, COUNT(*) FROM patients GROUP BY region",
        epsilon: 1.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "fixed-point sum, 5 rows per patient",
        sql: "SELECT SUM(length_of_stay_days) FROM admissions",
        epsilon: 2.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "count over a join (30 rows per patient)",
        sql: "SELECT a.admission_method, COUNT(*) FROM admissions a JOIN lab_results l ON a.person_id = l.person_id GROUP BY 1",
        epsilon: 1.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "mean: count and centred sum",
        sql: "SELECT AVG(value) FROM lab_results",
        epsilon: 2.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "distinct patients by a public key",
        sql: "SELECT specialty, COUNT(DISTINCT person_id) FROM admissions GROUP BY 1",
        epsilon: 1.0,
        delta: None,
        trials: 10,
    },
    Shape {
        name: "per-patient feature with nullable keys over a self-join (finding 3)",
        sql: "WITH c AS (SELECT l1.person_id, CASE WHEN l1.test = 'HbA1c' THEN 1 END AS k1, CASE WHEN l2.test = 'HbA1c' THEN 1 END AS k2 FROM lab_results l1 JOIN lab_results l2 ON l1.person_id = l2.person_id GROUP BY 1, 2, 3) SELECT COUNT(*) FROM c",
        epsilon: 1.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "private quantile of a small group",
        sql: "SELECT MEDIAN(rtt_weeks) FROM waiting_list WHERE rtt_weeks > 103",
        epsilon: 2.0,
        delta: None,
        trials: 1,
    },
    Shape {
        name: "DP key selection",
        sql: "SELECT gp_practice, COUNT(*) FROM patients GROUP BY 1",
        epsilon: 2.0,
        delta: Some(1e-6),
        trials: 1,
    },
];

/// The patient whose presence the audit tests: a worst case within the
/// policy, with the most rows per table and extreme values, spread so that
/// every shape's measurement moves by its full sensitivity.
const CANARY: &str = "canary";
/// Patients who share the canary's practice code, so that the key's count
/// is at key selection's threshold with the canary and one below without
/// it: the worst case for that mechanism (its threshold here is 14).
const COMPANIONS: usize = 13;
const CANARY_PRACTICE: &str = "ZZCANARY";

fn canary_rows(table: &str) -> RecordBatch {
    let schema = tre_synth::schema(table);
    let text = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let ints = |v: Vec<i64>| -> ArrayRef { Arc::new(Int64Array::from(v)) };
    let floats = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let bools = |v: Vec<bool>| -> ArrayRef { Arc::new(BooleanArray::from(v)) };
    let dates = |v: Vec<Option<i32>>| -> ArrayRef { Arc::new(Date32Array::from(v)) };
    let n = COMPANIONS + 1;
    let columns: Vec<ArrayRef> = match table {
        "patients" => {
            let ids: Vec<String> = std::iter::once(CANARY.to_owned())
                .chain((1..n).map(|i| format!("companion{i:02}")))
                .collect();
            vec![
                Arc::new(StringArray::from(ids)),
                text(vec!["F"; n]),
                ints(vec![1950; n]),
                text(vec!["60-79"; n]),
                text(vec!["White"; n]),
                ints(vec![1; n]),
                text(vec!["London"; n]),
                text(vec![CANARY_PRACTICE; n]),
                bools(vec![true; n]),
                dates(vec![None; n]),
                bools(vec![false; n]),
                bools(vec![true; n]),
            ]
        }
        "admissions" => vec![
            text(vec![CANARY; 5]),
            dates(vec![Some(19_875); 5]),
            text(vec!["2024-06"; 5]),
            text(vec!["emergency"; 5]),
            // Five specialties: distinct-patient counts move in five cells.
            text(vec![
                "general_medicine",
                "general_surgery",
                "respiratory",
                "cardiology",
                "geriatrics",
            ]),
            text(vec!["U07.1"; 5]),
            bools(vec![true; 5]),
            bools(vec![true; 5]),
            bools(vec![false; 5]),
            ints(vec![365; 5]),
            ints(vec![1; 5]),
        ],
        "lab_results" => vec![
            text(vec![CANARY; 6]),
            dates(vec![Some(19_783); 6]),
            // Both tests, so a key on the test takes both values and NULL.
            text(vec!["HbA1c", "HbA1c", "HbA1c", "eGFR", "eGFR", "eGFR"]),
            floats(vec![200.0; 6]),
        ],
        _ => vec![
            text(vec![CANARY; 3]),
            dates(vec![Some(19_732); 3]),
            text(vec!["cardiology"; 3]),
            floats(vec![104.0; 3]),
        ],
    };
    RecordBatch::try_new(schema, columns).unwrap_or_else(|e| panic!("{e}"))
}

/// The fixture's extracts with the canary added, encrypted like the rest.
fn with_canary() -> &'static (tempfile::TempDir, std::path::PathBuf) {
    static D: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = dir.path().join("nhs_epr");
        for table in tre_synth::TABLES {
            let mut batches = read_extract(&f.data, table, &f.master);
            batches.push(canary_rows(table));
            write_extract(&data, table, &f.master, &batches);
        }
        (dir, data)
    })
}

/// Looser confidence for choosing the event on the pilot samples (only
/// the fresh samples' bound is reported and tested).
const PILOT_ALPHA: f64 = 0.05;

/// One-sided Clopper–Pearson bound on a binomial proportion, `k` of `n`,
/// at confidence `1 - alpha`: the lower bound, or the `upper` one.
fn cp_bound(k: usize, n: usize, alpha: f64, upper: bool) -> f64 {
    let beta = if upper {
        if k >= n {
            return 1.0;
        }
        Beta::new((k + 1) as f64, (n - k) as f64).map(|b| b.inverse_cdf(1.0 - alpha))
    } else {
        if k == 0 {
            return 0.0;
        }
        Beta::new(k as f64, (n - k + 1) as f64).map(|b| b.inverse_cdf(alpha))
    };
    beta.unwrap_or(if upper { 1.0 } else { 0.0 })
}

/// A statistic of one noisy release, per audited mechanism.
type Statistic = Box<dyn Fn(&NoisyRelease) -> f64>;

/// What one audit found.
struct Finding {
    what: String,
    declared: f64,
    lower_bound: f64,
}

/// Releases drawn from D and from D': the first `pilot` of each choose
/// the event, the rest bound it.
struct Samples {
    d: Vec<NoisyRelease>,
    n: Vec<NoisyRelease>,
    pilot: usize,
}

/// Lower bound on the privacy loss of `stat` between the samples from D
/// and D', in both directions: choose the best threshold event `stat ≥ t`
/// or `stat ≤ t` on the pilot samples, then bound it on the fresh ones.
fn audit(samples: &Samples, delta: f64, stat: &Statistic) -> f64 {
    let values = |xs: &[NoisyRelease]| -> Vec<f64> { xs.iter().map(stat).collect() };
    let (pd, pn) = (
        values(&samples.d[..samples.pilot]),
        values(&samples.n[..samples.pilot]),
    );
    let mut candidates: Vec<f64> = pd.iter().chain(&pn).copied().collect();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    let frac = |xs: &[f64], t: f64, up: bool| {
        xs.iter()
            .filter(|x| if up { **x >= t } else { **x <= t })
            .count() as f64
            / xs.len() as f64
    };
    // Events: (threshold, upper tail?, D first?). Score each on the pilot
    // by the bound it would give there, which weighs a ratio by how often
    // the event happens (a rare event cannot be bounded tightly).
    let n = pd.len();
    let mut best = (f64::NEG_INFINITY, 0.0, true, true);
    let step = (candidates.len() / 200).max(1);
    for t in candidates.iter().step_by(step).copied() {
        for up in [true, false] {
            for d_first in [true, false] {
                let (a, b) = if d_first { (&pd, &pn) } else { (&pn, &pd) };
                let (p, q) = (frac(a, t, up), frac(b, t, up));
                let k = |f: f64| (f * n as f64).round() as usize;
                let lo = cp_bound(k(p), n, PILOT_ALPHA, false) - delta;
                if lo <= 0.0 {
                    continue;
                }
                let score = (lo / cp_bound(k(q), n, PILOT_ALPHA, true)).ln();
                if score > best.0 {
                    best = (score, t, up, d_first);
                }
            }
        }
    }
    let (_, t, up, d_first) = best;
    let (a, b) = (
        values(&samples.d[samples.pilot..]),
        values(&samples.n[samples.pilot..]),
    );
    let (a, b) = if d_first { (a, b) } else { (b, a) };
    let count = |xs: &[f64]| {
        xs.iter()
            .filter(|x| if up { **x >= t } else { **x <= t })
            .count()
    };
    let p_lo = cp_bound(count(&a), a.len(), ALPHA, false);
    let q_hi = cp_bound(count(&b), b.len(), ALPHA, true);
    if p_lo <= delta {
        return 0.0;
    }
    ((p_lo - delta) / q_hi).ln().max(0.0)
}

/// The exact log-likelihood ratio of a discrete Laplace measurement's cells
/// between D (`v`) and D' (`w`): the privacy-loss random variable.
fn llr(
    cells: &[String],
    v: &HashMap<String, f64>,
    w: &HashMap<String, f64>,
    scale: f64,
    y: &[f64],
) -> f64 {
    cells
        .iter()
        .zip(y)
        .map(|(c, y)| {
            let a = v.get(c).copied().unwrap_or(0.0);
            let b = w.get(c).copied().unwrap_or(0.0);
            ((y - b).abs() - (y - a).abs()) / scale
        })
        .sum()
}

async fn inputs(
    engine: &Engine,
    shape: &Shape,
    budget: Budget,
    without: &[String],
) -> (PrivatePlan, Exact) {
    engine
        .exact_inputs(shape.sql, budget, without)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", shape.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empirical_privacy_audit() {
    let trials: usize = std::env::var("TRE_AUDIT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let pilot = (trials / 4).max(500);
    let mut engine = engine_on(&with_canary().1, Arc::clone(&fixture().master))
        .unwrap_or_else(|e| panic!("{e}"));
    engine.set_deterministic_bounding(Some(7));
    let mut findings: Vec<Finding> = Vec::new();
    for shape in SHAPES {
        let budget = engine
            .budget(Some(shape.epsilon), shape.delta)
            .unwrap_or_else(|e| panic!("{e}"));
        // D has the canary, D' does not (an exclusion either way, so both
        // run the same plan).
        let (with, without) = (vec!["nobody".to_owned()], vec![CANARY.to_owned()]);
        let (plan, d) = inputs(&engine, shape, budget, &with).await;
        let (_, n) = inputs(&engine, shape, budget, &without).await;
        let exact_d = engine
            .exact(shape.sql, budget, &with)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let exact_n = engine
            .exact(shape.sql, budget, &without)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let trials = trials * shape.trials;
        let pilot = pilot * shape.trials;
        let draw = |x: &Exact| -> Vec<NoisyRelease> {
            (0..pilot + trials)
                .map(|_| engine.noisy(&plan, x).unwrap_or_else(|e| panic!("{e}")))
                .collect()
        };
        let samples = Samples {
            d: draw(&d),
            n: draw(&n),
            pilot,
        };
        let measures = plan.measures();
        let mut laplace_col = 0;
        // Where key selection decides which cells exist, every cell's
        // statistic also reflects the selection: bound it by both.
        let (sel_eps, sel_delta) = plan.key_selection_cost().unwrap_or((0.0, 0.0));
        for (m, (measure, _, eps)) in measures.iter().enumerate() {
            let (stat, what): (Statistic, String) = match measure {
                Measure::Quantile { .. } => (
                    Box::new(move |r: &NoisyRelease| r.values[m].first().copied().unwrap_or(0.0)),
                    format!("{}: {}", shape.name, measure.describe("person_id")),
                ),
                _ => {
                    let col = laplace_col;
                    laplace_col += 1;
                    let scale = plan.laplace_scale(m).unwrap_or(1.0);
                    let v: HashMap<String, f64> = exact_d
                        .laplace
                        .iter()
                        .map(|(k, x)| (k.clone(), x[col] as f64))
                        .collect();
                    let w: HashMap<String, f64> = exact_n
                        .laplace
                        .iter()
                        .map(|(k, x)| (k.clone(), x[col] as f64))
                        .collect();
                    (
                        Box::new(move |r: &NoisyRelease| {
                            llr(&r.cells, &v, &w, scale, &r.values[m])
                        }),
                        format!("{}: {}", shape.name, measure.describe("person_id")),
                    )
                }
            };
            let lb = audit(&samples, sel_delta, &stat);
            findings.push(Finding {
                what,
                declared: eps + sel_eps,
                lower_bound: lb,
            });
        }
        if let Some((threshold, _, _)) = plan.key_selection() {
            assert_eq!(
                threshold,
                COMPANIONS as i64 + 1,
                "the canary's practice no longer sits at the threshold; set COMPANIONS to threshold - 1"
            );
            // The canary's practice: released or not is the event.
            let key = exact_d
                .selection
                .keys()
                .find(|k| k.contains(CANARY_PRACTICE))
                .cloned();
            if let Some(key) = key {
                let stat: Statistic =
                    Box::new(move |r: &NoisyRelease| f64::from(u8::from(r.cells.contains(&key))));
                let (eps, delta) = plan.key_selection_cost().unwrap_or((0.0, 0.0));
                let lb = audit(&samples, delta, &stat);
                findings.push(Finding {
                    what: format!("{}: key selection (threshold {threshold})", shape.name),
                    declared: eps,
                    lower_bound: lb,
                });
            }
        }
    }
    let mut failures = Vec::new();
    println!(
        "privacy audit: {trials} trials per side, one-sided confidence {} per bound",
        1.0 - ALPHA
    );
    for f in &findings {
        println!(
            "  {:<100} declared ε {:.4}, lower bound {:.4} ({:.0}%)",
            f.what,
            f.declared,
            f.lower_bound,
            100.0 * f.lower_bound / f.declared
        );
        if f.lower_bound > f.declared {
            failures.push(format!(
                "{}: the privacy loss is at least {:.4} but only {:.4} was declared",
                f.what, f.lower_bound, f.declared
            ));
        }
    }
    assert!(
        findings.len() >= 10,
        "only {} mechanisms audited",
        findings.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
