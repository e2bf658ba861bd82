//! Dataset policies: the custodian's TOML (`policies/*.toml`) parsed into raw
//! structs, then validated into a [`Policy`] in which invalid states cannot be
//! represented (bounds are ordered and finite, domains non-empty, every table
//! carries the privacy unit as an identifier, budgets are ordered); and the
//! policy of a query across datasets that hold one person under one unit
//! ([`Policy::joint`], each rule at its strictest).
//!
//! Input is text; this crate never touches the file system, DataFusion, keys
//! or the network. It depends only on `tre-core`.

use std::collections::BTreeMap;

use serde::Deserialize;
use tre_core::{Code, Delta, Epsilon};

mod joint;
mod raw;

pub use joint::JointError;

/// A policy that failed validation, naming the source, the field and the fix.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{source_name}: {code} field `{field}`: {message}", code = Code::PolicyInvalid)]
pub struct PolicyError {
    pub source_name: String,
    pub field: String,
    pub message: String,
}

/// A validated dataset policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub dataset: String,
    /// SHA-256 of the policy text as loaded: its version, for manifests.
    pub source_hash: String,
    /// When a release must wait for a custodian (the airlock).
    pub review: ReviewPolicy,
    pub description: String,
    pub privacy_unit: String,
    /// The identifier the privacy unit is a keyed pseudonym of (e.g.
    /// `nhs_number`). Datasets whose policies name the same privacy unit
    /// and linkage hold one person under one unit, so a query may join
    /// them (issue #15); without it the dataset is joined with none.
    pub linkage: Option<String>,
    pub sdc_profile: String,
    /// National Data Opt-out: patients with this flag set are removed from
    /// every plan before anything else runs.
    pub opt_out: Option<ColumnRef>,
    /// DP key selection: at most this many groups per patient are kept
    /// (chosen at random) when a group key has no public domain.
    pub max_groups_per_unit: u32,
    /// Public reference tables (lookups such as ICD-10 chapters) that may be
    /// joined on any key. Their contents are public, so they need no bounding.
    pub reference_tables: Vec<String>,
    pub budget: BudgetPolicy,
    pub tables: BTreeMap<String, TablePolicy>,
    /// For a query across datasets, the policies it merges ([`Policy::joint`]);
    /// empty for one dataset's own policy.
    pub parts: Vec<Policy>,
}

/// Which releases are held for human review before the researcher sees
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewMode {
    None,
    /// Releases with a suppressed cell, or more than `max_cells` cells.
    Flagged,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReviewPolicy {
    pub mode: ReviewMode,
    pub max_cells: Option<u64>,
    /// Independent custodians who must approve (1 or 2).
    pub approvals: u8,
}

impl ReviewPolicy {
    /// Must a release with `cells` cells, `flagged` if any was suppressed,
    /// wait for review? Returns why, if so. `exact_rules` (the disclosure
    /// profile checks exact values) holds every release whatever the mode:
    /// those checks may inform a custodian but must never decide a branch
    /// the researcher can see, so the hold cannot depend on them (issue
    /// #10). Both inputs here depend on noisy values only.
    pub fn hold_reason(&self, cells: usize, flagged: bool, exact_rules: bool) -> Option<String> {
        let too_big = self.max_cells.is_some_and(|m| cells as u64 > m);
        match self.mode {
            _ if exact_rules => Some(
                "the disclosure profile checks exact values, so every release is reviewed by a custodian"
                    .into(),
            ),
            ReviewMode::None => None,
            ReviewMode::Always => Some("every release of this dataset is reviewed".into()),
            ReviewMode::Flagged if flagged => {
                Some("a cell was suppressed by disclosure control".into())
            }
            ReviewMode::Flagged if too_big => Some(format!(
                "the release has {cells} cells, more than {}",
                self.max_cells.unwrap_or_default()
            )),
            ReviewMode::Flagged => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    pub table: String,
    pub column: String,
}

/// `table.column`, as the policy file writes it.
impl std::fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.table, self.column)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPolicy {
    /// The least epsilon one query may spend, so that probing costs
    /// something (defence in depth: every released value is noisy anyway).
    pub min_epsilon_per_query: Epsilon,
    /// Used when a researcher does not ask for a specific epsilon.
    pub default_epsilon_per_query: Epsilon,
    pub max_epsilon_per_query: Epsilon,
    /// Budget a new project receives unless a custodian says otherwise.
    pub project_epsilon: Epsilon,
    /// δ for queries that need one (DP key selection); zero means such
    /// queries are refused unless the researcher asks for a δ.
    pub default_delta_per_query: Delta,
    pub max_delta_per_query: Delta,
    pub project_delta: Delta,
    /// Lifetime caps for the dataset across all projects: the same patients
    /// cannot be re-queried without bound by opening new projects.
    pub lifetime_epsilon: Epsilon,
    pub lifetime_delta: Delta,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TablePolicy {
    pub name: String,
    pub description: String,
    /// Rows kept per patient; excess rows are dropped at random before any
    /// aggregate sees them. Sensitivities are derived from this.
    pub max_rows_per_unit: u32,
    pub columns: Vec<ColumnPolicy>,
}

impl TablePolicy {
    pub fn column(&self, name: &str) -> Option<&ColumnPolicy> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnPolicy {
    pub name: String,
    pub description: String,
    pub class: ColumnClass,
    /// For a categorical column without a public domain: the most distinct
    /// values it may hold, enforced by the extract writer. Bounds the
    /// memory of grouping by it (issue #13).
    pub max_distinct: Option<u64>,
    /// What an import does with a numeric or date value outside the
    /// column's bounds (queries clamp it regardless).
    pub out_of_bounds: OutOfBounds,
}

/// An imported value outside its column's bounds (issue #15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutOfBounds {
    /// Keep the row, with the value clamped to the nearer bound (what
    /// every query would do with it anyway); counted in the report.
    #[default]
    Clamp,
    /// Leave the row out; counted in the report.
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ColumnClass {
    /// Never released, never a group key, never filtered on.
    Identifier,
    /// With a public domain the key may be released in full; without one it
    /// needs DP key selection.
    Categorical { domain: Option<Vec<String>> },
    /// Values are clamped to `[lo, hi]` before any aggregate.
    Numeric { lo: f64, hi: f64 },
    /// Days since 1970-01-01, clamped to `[lo, hi]`.
    Date { lo: i32, hi: i32 },
}

impl ColumnClass {
    pub fn name(&self) -> &'static str {
        match self {
            ColumnClass::Identifier => "identifier",
            ColumnClass::Categorical { domain: Some(_) } => "categorical (public domain)",
            ColumnClass::Categorical { domain: None } => "categorical (private domain)",
            ColumnClass::Numeric { .. } => "numeric",
            ColumnClass::Date { .. } => "date",
        }
    }
}

impl Policy {
    /// Parse and validate. `source_name` (usually the file path) is quoted in
    /// every error so the operator knows which file to fix.
    pub fn from_toml(source_name: &str, text: &str) -> Result<Policy, PolicyError> {
        // A drafted policy marks what only the custodian can decide (bounds,
        // public values) as "TODO"; none may be guessed for them (issue #15).
        if let Ok(value) = toml::from_str::<toml::Value>(text)
            && let Some(field) = first_todo(&value, String::new())
        {
            return Err(PolicyError {
                source_name: source_name.to_owned(),
                field,
                message: "is still TODO: the custodian must decide it (bounds and public values are never taken from the data)".into(),
            });
        }
        let raw: raw::RawPolicy = toml::from_str(text).map_err(|e| PolicyError {
            source_name: source_name.to_owned(),
            field: toml_error_field(&e),
            message: e.message().to_owned(),
        })?;
        let mut policy = raw.validate().map_err(|(field, message)| PolicyError {
            source_name: source_name.to_owned(),
            field,
            message,
        })?;
        policy.source_hash =
            hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
        Ok(policy)
    }

    pub fn table(&self, name: &str) -> Option<&TablePolicy> {
        self.tables.get(name)
    }
}

/// The path of the first value that is, or holds, the text "TODO".
fn first_todo(value: &toml::Value, path: String) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        toml::Value::String(s) if s.trim_start().starts_with("TODO") => Some(path),
        toml::Value::Array(items) => items.iter().find_map(|v| first_todo(v, path.clone())),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| first_todo(v, join(k))),
        _ => None,
    }
}

fn toml_error_field(e: &toml::de::Error) -> String {
    // toml reports a byte span, not a path; the message names the key.
    match e.span() {
        Some(span) => format!("at bytes {}..{}", span.start, span.end),
        None => "(document)".to_owned(),
    }
}

/// Parse `YYYY-MM-DD` into days since 1970-01-01 (proleptic Gregorian).
/// A day that does not exist, such as 2024-02-31, is an error, not the
/// day it would roll over to (issue #11).
pub fn parse_date(s: &str) -> Option<i32> {
    use chrono::Datelike as _;
    let day = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| (1..=9999).contains(&d.year()))?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(day.signed_duration_since(epoch).num_days()).ok()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DomainValue {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl DomainValue {
    fn into_string(self) -> String {
        match self {
            DomainValue::Text(s) => s,
            DomainValue::Int(i) => i.to_string(),
            DomainValue::Bool(b) => b.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
