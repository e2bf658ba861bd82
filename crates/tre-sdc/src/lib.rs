//! Statistical disclosure control over a release: a custodian's profile
//! (`policies/sdc/*.toml`) and the rules that turn a noisy value into a
//! released, rounded or suppressed cell with a reason.
//!
//! Rules here read noisy values only, so applying them is post-processing
//! and keeps the differential-privacy guarantee. This crate must never see
//! an exact aggregate, and never depends on DataFusion, storage or the
//! network.

use serde::Deserialize;
use tre_core::Code;

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

/// A validated disclosure profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Counts strictly below this are suppressed.
    pub suppress_below: u32,
    /// Whether a zero count may be shown (All of Us: yes; UK LLC: no).
    pub zero_allowed: bool,
    pub rounding: Rounding,
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
}

impl Profile {
    pub fn from_toml(source_name: &str, text: &str) -> Result<Profile, SdcError> {
        let err = |message: String| SdcError {
            source_name: source_name.to_owned(),
            message,
        };
        let raw: RawProfile = toml::from_str(text).map_err(|e| err(e.message().to_owned()))?;
        let suppress_below = u32::try_from(raw.suppress_below)
            .map_err(|_| err("field `suppress_below` must be between 0 and 2^32".into()))?;
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
            suppress_below,
            zero_allowed: raw.zero_allowed,
            rounding,
        })
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
                "noisy count below {} ({})",
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
    /// unrounded when the count passes the threshold, suppressed otherwise.
    pub fn derived_cell(&self, value: f64, noisy_count: i64) -> Outcome {
        if noisy_count < i64::from(self.suppress_below.max(1)) {
            Outcome::suppressed(format!(
                "based on a noisy count below {} ({})",
                self.suppress_below.max(1),
                self.name
            ))
        } else {
            Outcome::released(value)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn profile(text: &str) -> Profile {
        Profile::from_toml("test.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn profiles_apply_their_rules() {
        let nhs = profile("name = \"nhs_sde\"\nsuppress_below = 10\nround_base = 5");
        let os =
            profile("name = \"os\"\nsuppress_below = 8\nzero_allowed = true\nmidpoint6 = true");
        let aou = profile("name = \"aou\"\nsuppress_below = 21\nzero_allowed = true");
        // (profile, noisy, expected value, expected status)
        let cases = [
            (&nhs, -3, None, Status::Suppressed),
            (&nhs, 0, None, Status::Suppressed),
            (&nhs, 9, None, Status::Suppressed),
            (&nhs, 10, Some(10.0), Status::Rounded),
            (&nhs, 12, Some(10.0), Status::Rounded),
            (&nhs, 13, Some(15.0), Status::Rounded),
            (&nhs, 1234, Some(1235.0), Status::Rounded),
            (&os, 0, Some(0.0), Status::Released),
            (&os, 7, None, Status::Suppressed),
            (&os, 8, Some(9.0), Status::Rounded),
            (&os, 13, Some(15.0), Status::Rounded),
            (&aou, 0, Some(0.0), Status::Released),
            (&aou, 20, None, Status::Suppressed),
            (&aou, 21, Some(21.0), Status::Released),
        ];
        for (p, noisy, value, status) in cases {
            let o = p.count_cell(noisy);
            assert_eq!((o.value, o.status), (value, status), "{} {noisy}", p.name);
        }
    }

    #[test]
    fn derived_cells_follow_their_count() {
        let nhs = profile("name = \"nhs_sde\"\nsuppress_below = 10\nround_base = 5");
        assert_eq!(nhs.derived_cell(41.5, 9).status, Status::Suppressed);
        assert_eq!(nhs.derived_cell(41.5, 10).value, Some(41.5));
    }

    #[test]
    fn bad_profiles_are_refused() {
        for bad in [
            "name = \"x\"\nsuppress_below = -1",
            "name = \"x\"\nsuppress_below = 5\nround_base = 0",
            "name = \"x\"\nsuppress_below = 5\nround_base = 5\nmidpoint6 = true",
            "name = \"x\"\nsuppress_below = 5\nsurprise = 1",
        ] {
            assert!(Profile::from_toml("bad.toml", bad).is_err(), "{bad}");
        }
    }
}
