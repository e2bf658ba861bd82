//! Statistical disclosure control over a release: a custodian's profile
//! (`policies/sdc/*.toml`), the rules that turn a noisy value into a
//! released, rounded or suppressed cell with a reason, the overall outcome
//! of a release (pass, review, fail, in the style of ACRO), and the
//! strictest combination of several profiles, rule by rule.
//!
//! Rules here read noisy values only, so applying them is post-processing
//! and keeps the differential-privacy guarantee. The one exception is
//! `exact_cell_rules`, which only a profile with `exact_rules = true`
//! reaches and whose use every release reports. This crate never depends
//! on DataFusion, storage or the network.

use serde::{Deserialize, Serialize};
use tre_core::Code;

pub mod secondary;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{source_name}: {code} sdc profile: {message}", code = Code::PolicyInvalid)]
pub struct SdcError {
    pub source_name: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    None,
    /// Round to the nearest multiple of the base (halves away from zero).
    Base(u32),
    /// OpenSAFELY's `ceil(x/6)*6 - 3` for x != 0; keeps zero as zero.
    Midpoint6,
}

/// ACRO's n-k dominance rule for sums: suppress a cell where the `n`
/// largest contributors make up more than `k` of the total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dominance {
    pub n: u32,
    pub k: f64,
}

/// A validated disclosure profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// SHA-256 of the profile text as loaded: its version, for manifests.
    pub hash: String,
    /// Counts strictly below this are suppressed.
    pub suppress_below: u32,
    /// Whether a zero count may be shown (All of Us: yes; UK LLC: no).
    pub zero_allowed: bool,
    pub rounding: Rounding,
    /// A statistic (mean, variance, …) is shown only when the noisy count
    /// it rests on is at least this.
    pub min_patients: u32,
    /// Rules on sums that need exact contributions. They run only where
    /// `exact_rules` opts in; otherwise the release says they did not.
    pub dominance: Option<Dominance>,
    pub p_ratio: Option<f64>,
    pub exact_rules: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    description: String,
    suppress_below: i64,
    #[serde(default)]
    zero_allowed: bool,
    #[serde(default)]
    round_base: Option<i64>,
    #[serde(default)]
    midpoint6: bool,
    #[serde(default)]
    min_patients: Option<i64>,
    #[serde(default)]
    dominance_n: Option<i64>,
    #[serde(default)]
    dominance_k: Option<f64>,
    #[serde(default)]
    p_ratio: Option<f64>,
    #[serde(default)]
    exact_rules: bool,
}

/// How a release fared, in the style of ACRO. Serialised as `pass`,
/// `review` or `fail`, the words `as_str` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// No rule suppressed anything (rounding alone is a pass).
    Pass,
    /// Some cells were suppressed; the rest may be released, but a person
    /// may want to look at the pattern.
    Review,
    /// Every value cell was suppressed: nothing of use can be released.
    Fail,
}

/// For release bodies stored before the outcome was recorded: the cautious
/// word, never `pass`.
impl Default for ReleaseOutcome {
    fn default() -> Self {
        ReleaseOutcome::Review
    }
}

impl ReleaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseOutcome::Pass => "pass",
            ReleaseOutcome::Review => "review",
            ReleaseOutcome::Fail => "fail",
        }
    }

    /// The outcome of a release from its value cells' statuses.
    pub fn of(statuses: impl IntoIterator<Item = Status>) -> Self {
        let (mut any, mut suppressed, mut all) = (false, false, true);
        for s in statuses {
            any = true;
            let hit = s == Status::Suppressed;
            suppressed |= hit;
            all &= hit;
        }
        match (any && all, suppressed) {
            (true, _) => ReleaseOutcome::Fail,
            (false, true) => ReleaseOutcome::Review,
            (false, false) => ReleaseOutcome::Pass,
        }
    }
}

impl Profile {
    pub fn from_toml(source_name: &str, text: &str) -> Result<Profile, SdcError> {
        let err = |message: String| SdcError {
            source_name: source_name.to_owned(),
            message,
        };
        let raw: RawProfile = toml::from_str(text).map_err(|e| err(e.message().to_owned()))?;
        let count = |field: &str, v: i64| {
            u32::try_from(v).map_err(|_| err(format!("field `{field}` must be between 0 and 2^32")))
        };
        let suppress_below = count("suppress_below", raw.suppress_below)?;
        let min_patients = match raw.min_patients {
            Some(v) => count("min_patients", v)?,
            None => suppress_below,
        };
        let dominance = match (raw.dominance_n, raw.dominance_k) {
            (None, None) => None,
            (Some(n), Some(k)) if (1..=10).contains(&n) && k > 0.0 && k < 1.0 => {
                Some(Dominance { n: n as u32, k })
            }
            _ => {
                return Err(err(
                    "set both `dominance_n` (1 to 10) and `dominance_k` (between 0 and 1), or neither"
                        .into(),
                ));
            }
        };
        if raw.p_ratio.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
            return Err(err("field `p_ratio` must be between 0 and 1".into()));
        }

        let rounding = match (raw.round_base, raw.midpoint6) {
            (Some(_), true) => {
                return Err(err(
                    "set either `round_base` or `midpoint6 = true`, not both".into(),
                ));
            }
            (Some(b), false) => Rounding::Base(
                u32::try_from(b)
                    .ok()
                    .filter(|b| *b >= 1)
                    .ok_or_else(|| err("field `round_base` must be a positive integer".into()))?,
            ),
            (None, true) => Rounding::Midpoint6,
            (None, false) => Rounding::None,
        };
        Ok(Profile {
            name: raw.name,
            description: raw.description,
            hash: hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes())),
            suppress_below,
            zero_allowed: raw.zero_allowed,
            rounding,
            min_patients,
            dominance,
            p_ratio: raw.p_ratio,
            exact_rules: raw.exact_rules,
        })
    }

    /// The strictest of several profiles, rule by rule: the highest
    /// threshold, zero shown only if every profile allows it, the coarsest
    /// rounding, the highest minimum, every exact rule at its strictest.
    pub fn strictest(profiles: &[Profile]) -> Option<Profile> {
        let (first, rest) = profiles.split_first()?;
        let mut p = first.clone();
        for q in rest {
            p.description = format!("strictest of {} and {}", p.name, q.name);
            p.name = format!("{}+{}", p.name, q.name);
            p.hash = hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                format!("{}{}", p.hash, q.hash).as_bytes(),
            ));
            p.suppress_below = p.suppress_below.max(q.suppress_below);
            p.zero_allowed &= q.zero_allowed;
            if q.rounding_slack() > p.rounding_slack() {
                p.rounding = q.rounding;
            }
            p.min_patients = p.min_patients.max(q.min_patients);
            p.dominance = match (p.dominance, q.dominance) {
                (Some(a), Some(b)) => Some(Dominance {
                    n: a.n.max(b.n),
                    k: a.k.min(b.k),
                }),
                (a, b) => a.or(b),
            };
            p.p_ratio = match (p.p_ratio, q.p_ratio) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            p.exact_rules |= q.exact_rules;
        }
        Some(p)
    }

    /// Rules on one cell's exact facts: its distinct patients and, per SUM
    /// column, each patient's contribution. Returns which column each rule
    /// suppresses (`None`: the whole row) and why. Callers run this only
    /// when `exact_rules` is set.
    pub fn exact_cell_rules(
        &self,
        patients: usize,
        sums: &[(usize, Vec<f64>)],
    ) -> Vec<(Option<usize>, String)> {
        let mut out = Vec::new();
        if (patients as u64) < u64::from(self.min_patients) {
            out.push((
                None,
                format!(
                    "minimum patients (exact): fewer than {} distinct patients ({})",
                    self.min_patients, self.name
                ),
            ));
        }
        for (col, contributions) in sums {
            let mut c: Vec<f64> = contributions.iter().map(|v| v.abs()).collect();
            c.sort_by(|a, b| b.total_cmp(a));
            let total: f64 = c.iter().sum();
            if total <= 0.0 {
                continue;
            }
            if let Some(d) = self.dominance
                && c.iter().take(d.n as usize).sum::<f64>() > d.k * total
            {
                out.push((
                    Some(*col),
                    format!(
                        "dominance (exact): the {} largest contributors make up more than {}% of the sum ({})",
                        d.n,
                        d.k * 100.0,
                        self.name
                    ),
                ));
                continue;
            }
            if let Some(p) = self.p_ratio {
                let (c1, c2) = (
                    c.first().copied().unwrap_or(0.0),
                    c.get(1).copied().unwrap_or(0.0),
                );
                if total - c1 - c2 < p * c1 {
                    out.push((
                        Some(*col),
                        format!(
                            "p-ratio (exact): the other contributors add up to less than {}% of the largest ({})",
                            p * 100.0,
                            self.name
                        ),
                    ));
                }
            }
        }
        out
    }

    /// The rules on exact values this profile declares.
    pub fn exact_rule_names(&self) -> Vec<String> {
        let mut rules = vec![format!("minimum {} patients", self.min_patients)];
        if let Some(d) = self.dominance {
            rules.push(format!("{}-{} dominance", d.n, d.k));
        }
        if let Some(p) = self.p_ratio {
            rules.push(format!("p-ratio {p}"));
        }
        rules
    }

    /// What the release should say about rules that did not run.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "disclosure profile {}: {}",
            self.name, self.description
        )];
        if !self.exact_rules && (self.dominance.is_some() || self.p_ratio.is_some()) {
            let mut rules = vec![];
            if let Some(d) = self.dominance {
                rules.push(format!("{}-{} dominance", d.n, d.k));
            }
            if let Some(p) = self.p_ratio {
                rules.push(format!("p-ratio {p}"));
            }
            notes.push(format!(
                "{} not applied: they need exact contributions and this profile does not opt in; each patient's contribution to a sum is clamped and noised instead",
                rules.join(" and ")
            ));
        }
        notes
    }

    /// Half the width of the rounding step: how far a rounded value may sit
    /// from the value it was rounded from. Intervals are widened by this.
    pub fn rounding_slack(&self) -> f64 {
        match self.rounding {
            Rounding::None => 0.0,
            Rounding::Base(b) => f64::from(b) / 2.0,
            Rounding::Midpoint6 => 3.0,
        }
    }

    /// Apply the profile to a noisy count (already clamped at zero).
    pub fn count_cell(&self, noisy: i64) -> Outcome {
        let noisy = noisy.max(0);
        if noisy == 0 && self.zero_allowed {
            return Outcome::released(0.0);
        }
        if noisy < i64::from(self.suppress_below) {
            return Outcome::suppressed(format!(
                "threshold: noisy count below {} ({})",
                self.suppress_below, self.name
            ));
        }
        match self.rounding {
            Rounding::None => Outcome::released(noisy as f64),
            Rounding::Base(b) => {
                let b = i64::from(b);
                let rounded = (noisy + b / 2) / b * b;
                Outcome::rounded(
                    rounded as f64,
                    format!("rounded to base {b} ({})", self.name),
                )
            }
            Rounding::Midpoint6 => {
                let rounded = (noisy + 5) / 6 * 6 - 3;
                Outcome::rounded(
                    rounded as f64,
                    format!("midpoint-6 rounding ({})", self.name),
                )
            }
        }
    }

    /// A statistic derived from a noisy count (a mean's denominator): shown
    /// unrounded when the count reaches `min_patients`, suppressed otherwise.
    pub fn derived_cell(&self, value: f64, noisy_count: i64) -> Outcome {
        let min = self.min_patients.max(1);
        if noisy_count < i64::from(min) {
            Outcome::suppressed(format!(
                "minimum patients: based on a noisy count below {min} ({})",
                self.name
            ))
        } else {
            Outcome::released(value)
        }
    }
}

/// What disclosure control made of one value cell. Serialised as
/// `released`, `rounded` or `suppressed`, the words `as_str` gives, so a
/// stored release body reads (and hashes) as it did when this was a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Released,
    Rounded,
    Suppressed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Released => "released",
            Status::Rounded => "rounded",
            Status::Suppressed => "suppressed",
        }
    }
}

/// What the profile made of one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `None` when suppressed.
    pub value: Option<f64>,
    pub status: Status,
    pub reason: String,
}

impl Outcome {
    fn released(v: f64) -> Self {
        Self {
            value: Some(v),
            status: Status::Released,
            reason: String::new(),
        }
    }
    fn rounded(v: f64, reason: String) -> Self {
        Self {
            value: Some(v),
            status: Status::Rounded,
            reason,
        }
    }
    fn suppressed(reason: String) -> Self {
        Self {
            value: None,
            status: Status::Suppressed,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &[(&str, &str)] = &[
        (
            "nhs_sde",
            include_str!("../../../policies/sdc/nhs_sde.toml"),
        ),
        (
            "opensafely",
            include_str!("../../../policies/sdc/opensafely.toml"),
        ),
        (
            "opensafely_midpoint6",
            include_str!("../../../policies/sdc/opensafely_midpoint6.toml"),
        ),
        ("ukllc", include_str!("../../../policies/sdc/ukllc.toml")),
        (
            "acro_default",
            include_str!("../../../policies/sdc/acro_default.toml"),
        ),
        (
            "all_of_us",
            include_str!("../../../policies/sdc/all_of_us.toml"),
        ),
    ];

    fn shipped(name: &str) -> Profile {
        let (_, text) = SHIPPED
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no profile {name}"));
        let p = Profile::from_toml(name, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.name, name);
        p
    }

    fn profile(text: &str) -> Profile {
        Profile::from_toml("test.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Worked examples from each custodian's published rules: (noisy count,
    /// released value, status).
    #[test]
    fn shipped_profiles_follow_their_published_rules() {
        use Status::{Released as R, Rounded as O, Suppressed as S};
        type Example = (i64, Option<f64>, Status);
        let cases: &[(&str, &[Example])] = &[
            // NHS England SDE: counts < 10 suppressed (zero too), others to 5.
            (
                "nhs_sde",
                &[
                    (-3, None, S),
                    (0, None, S),
                    (9, None, S),
                    (10, Some(10.0), O),
                    (12, Some(10.0), O),
                    (13, Some(15.0), O),
                    (1234, Some(1235.0), O),
                ],
            ),
            // OpenSAFELY: <= 7 redacted, others rounded to 5.
            (
                "opensafely",
                &[
                    (0, None, S),
                    (7, None, S),
                    (8, Some(10.0), O),
                    (13, Some(15.0), O),
                    (22, Some(20.0), O),
                ],
            ),
            // OpenSAFELY midpoint-6: 0 -> 0, 1-6 -> 3, 7-12 -> 9, 13-18 -> 15.
            (
                "opensafely_midpoint6",
                &[
                    (0, Some(0.0), R),
                    (1, Some(3.0), O),
                    (6, Some(3.0), O),
                    (7, Some(9.0), O),
                    (12, Some(9.0), O),
                    (13, Some(15.0), O),
                    (18, Some(15.0), O),
                    (19, Some(21.0), O),
                ],
            ),
            // UK LLC: threshold 10 including zero; no rounding.
            (
                "ukllc",
                &[
                    (0, None, S),
                    (9, None, S),
                    (10, Some(10.0), R),
                    (11, Some(11.0), R),
                ],
            ),
            // ACRO defaults: threshold 10, round to base 5.
            (
                "acro_default",
                &[
                    (0, None, S),
                    (9, None, S),
                    (10, Some(10.0), O),
                    (17, Some(15.0), O),
                    (18, Some(20.0), O),
                ],
            ),
            // All of Us: no count from 1 to 20; zero may be shown.
            (
                "all_of_us",
                &[
                    (0, Some(0.0), R),
                    (1, None, S),
                    (20, None, S),
                    (21, Some(21.0), R),
                ],
            ),
        ];
        assert_eq!(cases.len(), SHIPPED.len());
        for (name, examples) in cases {
            let p = shipped(name);
            for (noisy, value, status) in *examples {
                let o = p.count_cell(*noisy);
                assert_eq!((o.value, o.status), (*value, *status), "{name} {noisy}");
                assert_eq!(
                    o.reason.is_empty(),
                    *status == R,
                    "{name} {noisy}: {}",
                    o.reason
                );
            }
        }
    }

    #[test]
    fn midpoint6_table() {
        let p = shipped("opensafely_midpoint6");
        for x in 1..=60i64 {
            let want = ((x + 5) / 6) * 6 - 3;
            assert_eq!(p.count_cell(x).value, Some(want as f64), "{x}");
            // Never more than 3 from the input.
            assert!((want - x).abs() <= 3);
        }
    }

    #[test]
    fn statistics_need_their_minimum_count() {
        // (profile, noisy count, suppressed?)
        let cases = [
            ("nhs_sde", 9, true),
            ("nhs_sde", 10, false),
            ("opensafely_midpoint6", 7, true),
            ("opensafely_midpoint6", 8, false),
            ("all_of_us", 20, true),
            ("acro_default", 10, false),
        ];
        for (name, n, suppressed) in cases {
            let o = shipped(name).derived_cell(41.5, n);
            assert_eq!(o.status == Status::Suppressed, suppressed, "{name} {n}");
            assert_eq!(o.value.is_none(), suppressed);
        }
    }

    #[test]
    fn exact_rules_run_only_where_a_profile_opts_in() {
        let acro = shipped("acro_default");
        assert!(acro.exact_rules);
        assert_eq!(acro.dominance, Some(Dominance { n: 2, k: 0.9 }));
        assert_eq!(acro.p_ratio, Some(0.1));
        assert_eq!(
            acro.exact_rule_names(),
            ["minimum 10 patients", "2-0.9 dominance", "p-ratio 0.1"]
        );
        assert!(!acro.notes().join("").contains("not applied"));
        let declared = profile(
            "name = \"x\"\nsuppress_below = 10\ndominance_n = 2\ndominance_k = 0.9\np_ratio = 0.1",
        );
        assert!(!declared.exact_rules);
        let notes = declared.notes().join("\n");
        assert!(
            notes.contains("2-0.9 dominance and p-ratio 0.1 not applied"),
            "{notes}"
        );
        for name in [
            "nhs_sde",
            "opensafely",
            "opensafely_midpoint6",
            "ukllc",
            "all_of_us",
        ] {
            assert!(!shipped(name).exact_rules, "{name}");
        }
    }

    /// ACRO's worked logic: n-k dominance (n = 2, k = 0.9) and the p-ratio
    /// (p = 0.1) on each contributor's share of a sum.
    #[test]
    fn exact_cell_rules_follow_acro() {
        let acro = shipped("acro_default");
        // (patients, contributions to one SUM column, expected rule or none)
        let many = vec![10.0; 12];
        let cases: &[(usize, Vec<f64>, Option<&str>)] = &[
            (12, many.clone(), None),
            (9, many.clone(), Some("minimum patients")),
            // Two contributors hold 95% > 90%.
            (
                12,
                [vec![50.0, 45.0], vec![0.5; 10]].concat(),
                Some("dominance"),
            ),
            // Top two hold 80%: dominance passes; the rest (20) is more
            // than 10% of the largest (50): p-ratio passes.
            (12, [vec![50.0, 30.0], vec![2.0; 10]].concat(), None),
            // Signs do not hide a contributor.
            (
                12,
                [vec![-50.0, 45.0], vec![0.5; 10]].concat(),
                Some("dominance"),
            ),
        ];
        for (patients, c, want) in cases {
            let got = acro.exact_cell_rules(*patients, &[(3, c.clone())]);
            match want {
                None => assert!(got.is_empty(), "{c:?}: {got:?}"),
                Some(rule) => {
                    assert_eq!(got.len(), 1, "{c:?}: {got:?}");
                    assert!(got[0].1.starts_with(rule), "{c:?}: {got:?}");
                    let target = if *rule == "minimum patients" {
                        None
                    } else {
                        Some(3)
                    };
                    assert_eq!(got[0].0, target);
                }
            }
        }
        // With n = 2 and k = 0.9, failing the 0.1 p-ratio implies failing
        // dominance (the top two then hold more than 1/1.1 of the sum), so
        // the p-ratio is seen alone in a profile without dominance: the
        // rest (5) is less than 10% of the largest (60).
        let p_only =
            profile("name = \"p\"\nsuppress_below = 10\np_ratio = 0.1\nexact_rules = true");
        let c = [vec![60.0, 26.0], vec![0.5; 10]].concat();
        let got = p_only.exact_cell_rules(12, &[(3, c)]);
        assert_eq!(got.len(), 1);
        assert!(got[0].1.starts_with("p-ratio (exact)"), "{got:?}");
        let c = [vec![60.0, 26.0], vec![1.0; 10]].concat();
        assert!(p_only.exact_cell_rules(12, &[(3, c)]).is_empty());
    }

    #[test]
    fn the_strictest_profile_wins_rule_by_rule() {
        let p = Profile::strictest(&[
            shipped("opensafely_midpoint6"),
            shipped("ukllc"),
            shipped("all_of_us"),
        ])
        .unwrap_or_else(|| unreachable!());
        // Threshold from All of Us, zero suppressed because UK LLC says so,
        // midpoint-6 (the only rounding), minimum 21.
        assert_eq!(
            (p.suppress_below, p.zero_allowed, p.rounding, p.min_patients),
            (21, false, Rounding::Midpoint6, 21)
        );
        let q = Profile::strictest(&[shipped("nhs_sde"), shipped("acro_default")])
            .unwrap_or_else(|| unreachable!());
        assert_eq!(q.rounding, Rounding::Base(5));
        assert_eq!(q.dominance, Some(Dominance { n: 2, k: 0.9 }));
        assert_ne!(q.hash, shipped("nhs_sde").hash);
        assert!(Profile::strictest(&[]).is_none());
    }

    #[test]
    fn release_outcomes() {
        use Status::*;
        assert_eq!(
            ReleaseOutcome::of([Released, Rounded]),
            ReleaseOutcome::Pass
        );
        assert_eq!(
            ReleaseOutcome::of([Rounded, Suppressed]),
            ReleaseOutcome::Review
        );
        assert_eq!(
            ReleaseOutcome::of([Suppressed, Suppressed]),
            ReleaseOutcome::Fail
        );
        assert_eq!(ReleaseOutcome::of([]), ReleaseOutcome::Pass);
    }

    #[test]
    fn profile_versions_are_hashes_of_their_text() {
        let a = profile("name = \"x\"\nsuppress_below = 10");
        let b = profile("name = \"x\"\nsuppress_below = 11");
        assert_eq!(a.hash.len(), 64);
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn bad_profiles_are_refused() {
        for bad in [
            "name = \"x\"\nsuppress_below = -1",
            "name = \"x\"\nsuppress_below = 5\nround_base = 0",
            "name = \"x\"\nsuppress_below = 5\nround_base = 5\nmidpoint6 = true",
            "name = \"x\"\nsuppress_below = 5\nsurprise = 1",
            "name = \"x\"\nsuppress_below = 5\ndominance_n = 2",
            "name = \"x\"\nsuppress_below = 5\ndominance_n = 2\ndominance_k = 1.5",
            "name = \"x\"\nsuppress_below = 5\np_ratio = 0",
        ] {
            assert!(Profile::from_toml("bad.toml", bad).is_err(), "{bad}");
        }
    }
}
