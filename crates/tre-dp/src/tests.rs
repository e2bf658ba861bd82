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
