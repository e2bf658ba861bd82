//! What leaves the engine: noisy, disclosure-checked cells with intervals.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseColumn {
    pub name: String,
    /// "group_key" or the aggregate, e.g. "count", "avg".
    pub kind: String,
    /// Mechanism description, e.g. "discrete Laplace"; empty for keys.
    pub mechanism: String,
    /// Noise scale in the column's units (for AVG: of the numerator; for
    /// quantiles: in ranks).
    pub noise_scale: f64,
    /// Expected half-width of a cell's 95% interval, where it does not
    /// depend on the data (counts and sums).
    pub expected_half_width: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cell {
    Key {
        value: String,
    },
    Value {
        /// `None` when suppressed.
        value: Option<f64>,
        ci_low: Option<f64>,
        ci_high: Option<f64>,
        status: tre_sdc::Status,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Release {
    pub columns: Vec<ReleaseColumn>,
    pub rows: Vec<Vec<Cell>>,
    pub epsilon: f64,
    pub delta: f64,
    pub confidence: f64,
    pub sdc_profile: String,
    /// Pass, review or fail (ACRO style): no suppression, some, or all.
    /// Bodies stored before the outcome existed read as `review`.
    #[serde(default)]
    pub sdc_outcome: tre_sdc::ReleaseOutcome,
    /// Whether the profile's rules on exact values (minimum patients,
    /// dominance, p-ratio) were evaluated for the reviewing custodian. They
    /// never change the table: a profile with them holds every release.
    #[serde(default)]
    pub exact_rules_applied: bool,
    pub notes: Vec<String>,
    /// What the rules on exact values found, cell by cell: for the
    /// reviewing custodian only. Never serialised into the released body,
    /// its hash or its manifest, and never sent to a researcher.
    #[serde(skip)]
    pub review_notes: Vec<String>,
}
