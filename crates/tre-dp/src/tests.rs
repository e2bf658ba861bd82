use super::*;

fn eps(v: f64) -> Epsilon {
    Epsilon::new(v).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn calibration_matches_opendp_privacy_map() {
    // (sensitivity, epsilon, expected scale)
    let cases = [(1, 1.0, 1.0), (5, 0.5, 10.0), (365_000, 0.25, 1_460_000.0)];
    for (s, e, scale) in cases {
        let m = DiscreteLaplace::new(s, eps(e)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.scale(), scale);
        assert!(
            (m.epsilon() - e).abs() <= e * 1e-9,
            "{} vs {e}",
            m.epsilon()
        );
    }
}

#[test]
fn rejects_zero_sensitivity() {
    assert!(matches!(
        DiscreteLaplace::new(0, eps(1.0)),
        Err(DpError::Sensitivity(0))
    ));
}

/// Noise is centred and has the declared spread, and the stated interval
/// covers 95%. With n = 20_000 draws at scale 10 (sd = 14.1), the standard
/// error of the mean is 0.1, so |mean| < 0.6 fails with probability < 1e-8;
/// the empirical sd of a Laplace sample with n = 20_000 is within 5% of
/// sqrt(2)·scale except with probability < 1e-6; coverage 0.95 has standard
/// error 0.0015, so [0.94, 0.96] fails with probability < 1e-10.
#[test]
fn noise_is_centred_with_declared_spread_and_coverage() {
    let m = DiscreteLaplace::new(5, eps(0.5)).unwrap_or_else(|e| panic!("{e}"));
    let half = m
        .half_width(1.0 - CONFIDENCE)
        .unwrap_or_else(|e| panic!("{e}"));
    let n = 20_000;
    let exact = 1_000;
    let (mut sum, mut sq, mut covered) = (0.0, 0.0, 0);
    let draws = m
        .release_all(&vec![exact; n])
        .unwrap_or_else(|e| panic!("{e}"));
    for noisy in draws {
        let d = (noisy - exact) as f64;
        sum += d;
        sq += d * d;
        if d.abs() <= half {
            covered += 1;
        }
    }
    let mean = sum / n as f64;
    let sd = (sq / n as f64 - mean * mean).sqrt();
    let expected_sd = std::f64::consts::SQRT_2 * m.scale();
    assert!(mean.abs() < 0.6, "mean {mean}");
    assert!(
        (sd / expected_sd - 1.0).abs() < 0.05,
        "sd {sd} vs {expected_sd}"
    );
    let coverage = covered as f64 / n as f64;
    assert!((0.94..=0.96).contains(&coverage), "coverage {coverage}");
}

/// The quantile mechanism is calibrated through OpenDP's own privacy map
/// and its cost grows no faster than linearly with rows per patient.
#[test]
fn quantile_calibration_matches_opendp_privacy_map() {
    for (rows, e) in [(1u32, 1.0), (5, 0.5), (6, 0.1)] {
        let q = Quantile::new(0.5, 200, rows, eps(e)).unwrap_or_else(|e| panic!("{e}"));
        assert!(q.epsilon() <= e * (1.0 + 1e-9), "{} > {e}", q.epsilon());
        assert!(q.epsilon() >= e * 0.999, "{} wastes budget", q.epsilon());
    }
    let one = Quantile::new(0.5, 200, 1, eps(1.0)).unwrap_or_else(|e| panic!("{e}"));
    let five = Quantile::new(0.5, 200, 5, eps(1.0)).unwrap_or_else(|e| panic!("{e}"));
    assert!((five.scale() / one.scale() - 5.0).abs() < 1e-6);
}

/// Released quantiles are centred on the exact one in rank, and the stated
/// rank interval covers it. Data: 4,001 distinct values 0..=4000 over 4,000
/// buckets, so rank = value; 1,000 releases of the median at scale ≈ 4.
/// The stated interval is a union bound (conservative), so coverage must be
/// at least 0.95 − 3.5 standard errors (0.007) → ≥ 0.925, failure < 1e-3;
/// the mean rank error has standard error ≈ 0.2, so |mean| < 1.5 fails with
/// probability < 1e-10.
#[test]
fn quantile_is_centred_and_its_rank_interval_covers() {
    let q = Quantile::new(0.5, 4000, 1, eps(0.5)).unwrap_or_else(|e| panic!("{e}"));
    let histogram: Vec<(i64, u64)> = (0..=4000).map(|b| (b, 1)).collect();
    let r = q.rank_half_width(1.0 - CONFIDENCE);
    let (mut sum, mut covered) = (0.0, 0);
    let n = 1_000;
    for _ in 0..n {
        let b = q.release(&histogram).unwrap_or_else(|e| panic!("{e}"));
        let err = (b - 2000) as f64;
        sum += err;
        if err.abs() <= r {
            covered += 1;
        }
    }
    let mean = sum / f64::from(n);
    assert!(mean.abs() < 1.5, "mean rank error {mean}");
    let coverage = f64::from(covered) / f64::from(n);
    assert!(coverage >= 0.925, "coverage {coverage} of ±{r}");
}

/// Issue #13: the quantile is scored from its histogram, not from the
/// expanded rows, so the scores must be OpenDP's, exactly. For fractions
/// with a small exact denominator (0.5, 0.25) and without one (0.9, 1/3,
/// 0.001), and for 200 seeded random histograms each — including buckets
/// below and above the candidates, empty buckets and an empty histogram —
/// `Quantile::scores` equals `make_quantile_score_candidates` invoked on
/// the rows the histogram stands for.
#[test]
fn quantile_scores_from_the_histogram_are_opendps_scores() {
    use rand::{Rng, SeedableRng};
    let buckets = 20i64;
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(13);
    for alpha in [0.5, 0.25, 0.9, 1.0 / 3.0, 0.001, 0.0, 1.0] {
        let q = Quantile::new(alpha, buckets, 3, eps(1.0)).unwrap_or_else(|e| panic!("{e}"));
        let opendp = make_quantile_score_candidates(
            VectorDomain::new(AtomDomain::<i64>::default()),
            SymmetricDistance,
            (0..=buckets).collect(),
            alpha,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for case in 0..200 {
            let cells = if case == 0 {
                0
            } else {
                rng.random_range(1..30)
            };
            let histogram: Vec<(i64, u64)> = (0..cells)
                .map(|_| (rng.random_range(-2..=buckets + 2), rng.random_range(0..50)))
                .collect();
            let rows: Vec<i64> = histogram
                .iter()
                .flat_map(|&(b, c)| std::iter::repeat_n(b, c as usize))
                .collect();
            let expected = opendp.invoke(&rows).unwrap_or_else(|e| panic!("{e}"));
            let scores = q.scores(&histogram).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(scores, expected, "alpha {alpha}, histogram {histogram:?}");
        }
    }
}

/// A median over ten million rows is released from its histogram without
/// a row-sized vector: the counts are summed, never expanded (issue #13).
#[test]
fn a_quantile_over_billions_of_rows_is_released_from_counts() {
    let q = Quantile::new(0.5, 100, 10, eps(1.0)).unwrap_or_else(|e| panic!("{e}"));
    let histogram: Vec<(i64, u64)> = (0..=100).map(|b| (b, 40_000_000)).collect();
    let b = q.release(&histogram).unwrap_or_else(|e| panic!("{e}"));
    assert!((49..=51).contains(&b), "median bucket {b}");
}

/// Key selection: the threshold is set by OpenDP's privacy map for the
/// requested (ε, δ); a key held by a single patient is released with
/// probability at most δ (never, in 2,000 tries at δ = 1e-6), and a key
/// far above the threshold always is.
#[test]
fn key_selection_meets_delta_and_keeps_large_keys() {
    let delta = Delta::new(1e-6).unwrap_or_else(|e| panic!("{e}"));
    let ks = KeySelection::new(3, eps(0.5), delta).unwrap_or_else(|e| panic!("{e}"));
    assert!(ks.delta() <= 1e-6 && ks.epsilon() <= 0.5 * (1.0 + 1e-9));
    assert!(ks.threshold() > 1);
    let big = ks.threshold() + 40 * ks.scale().ceil() as i64;
    for _ in 0..2_000 {
        let counts = HashMap::from([("lonely".to_owned(), 1i64), ("common".to_owned(), big)]);
        let kept = ks.select(counts).unwrap_or_else(|e| panic!("{e}"));
        assert!(!kept.contains_key("lonely"));
        assert!(kept.contains_key("common"));
    }
    assert!(KeySelection::new(3, eps(0.5), Delta::ZERO).is_err());
}

/// Issue #13: the bracketed search finds the same threshold as a search of
/// the whole range, for the guess OpenDP's map makes right, wrong low,
/// wrong high and useless; the result is checked against the map itself.
#[test]
fn the_bracketed_threshold_search_matches_the_whole_range() {
    let whole = |fits: &dyn Fn(i64) -> Result<bool, DpError>| {
        let (mut lo, mut hi) = (1i64, MAX_THRESHOLD);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid).unwrap_or_else(|e| panic!("{e}")) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    };
    for (g, e, d) in [
        (1u32, 0.1, 1e-6),
        (3, 0.5, 1e-7),
        (3, 2.0, 1e-9),
        (20, 1.0, 1e-12),
    ] {
        let delta = Delta::new(d).unwrap_or_else(|e| panic!("{e}"));
        let scale = f64::from(g) / e;
        let d_in = (g, i64::from(g), 1i64);
        let fits = |t: i64| -> Result<bool, DpError> {
            threshold_measurement(scale, t)?
                .map(&d_in)
                .map(|(_, del)| del <= d)
                .map_err(|e| DpError::Mechanism(e.to_string()))
        };
        let expected = whole(&fits);
        let guess = threshold_guess(g, scale, delta);
        for start in [guess, guess / 10, guess * 10, 1, MAX_THRESHOLD] {
            let found = smallest_threshold(&fits, start).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(found, expected, "g={g} ε={e} δ={d} start={start}");
        }
        let ks = KeySelection::new(g, eps(e), delta).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ks.threshold(), expected);
        // Issue #13: the remembered answer is the searched one.
        let again = KeySelection::new(g, eps(e), delta).unwrap_or_else(|e| panic!("{e}"));
        let searched = KeySelection::search(g, eps(e), delta).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((&again, &again), (&ks, &searched));
    }
}
