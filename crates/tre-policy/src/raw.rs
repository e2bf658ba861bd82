//! The policy file as written. Everything here is `Option`al or loosely typed;
//! `validate` is the only way out, and it yields a `Policy`.

use std::collections::BTreeMap;

use serde::Deserialize;
use tre_core::{Delta, Epsilon};

use crate::{
    BudgetPolicy, ColumnClass, ColumnPolicy, ColumnRef, DomainValue, OutOfBounds, Policy,
    ReviewMode, ReviewPolicy, TablePolicy, parse_date,
};

type Invalid = (String, String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    dataset: RawDataset,
    budget: RawBudget,
    #[serde(default)]
    review: RawReview,
    #[serde(default)]
    tables: toml::map::Map<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReview {
    #[serde(default = "default_review_mode")]
    mode: String,
    #[serde(default)]
    max_cells: Option<i64>,
    #[serde(default = "default_approvals")]
    approvals: i64,
}

impl Default for RawReview {
    fn default() -> Self {
        Self {
            mode: default_review_mode(),
            max_cells: None,
            approvals: default_approvals(),
        }
    }
}

fn default_review_mode() -> String {
    "none".into()
}

fn default_approvals() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    #[serde(default)]
    description: String,
    privacy_unit: String,
    sdc_profile: String,
    exclude_opted_out: Option<String>,
    #[serde(default = "default_max_groups")]
    max_groups_per_unit: i64,
    #[serde(default)]
    reference_tables: Vec<String>,
    linkage: Option<String>,
}

fn default_max_groups() -> i64 {
    1
}

/// The per-query epsilon floor when a policy does not set one.
fn default_min_epsilon() -> f64 {
    0.01
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    #[serde(default = "default_min_epsilon")]
    min_epsilon_per_query: f64,
    default_epsilon_per_query: f64,
    max_epsilon_per_query: f64,
    project_epsilon: f64,
    #[serde(default)]
    default_delta_per_query: f64,
    #[serde(default)]
    max_delta_per_query: f64,
    #[serde(default)]
    project_delta: f64,
    lifetime_epsilon: f64,
    #[serde(default)]
    lifetime_delta: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default)]
    description: String,
    max_rows_per_unit: i64,
    columns: toml::map::Map<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    class: String,
    #[serde(default)]
    description: String,
    values: Option<Vec<DomainValue>>,
    bounds: Option<Vec<toml::Value>>,
    max_distinct: Option<i64>,
    out_of_bounds: Option<String>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    (field.into(), message.into())
}

fn epsilon(field: &str, v: f64) -> Result<Epsilon, Invalid> {
    Epsilon::requested(v)
        .map_err(|_| invalid(field, format!("must be a number in [1e-9, 1e6], got {v}")))
}

fn delta(field: &str, v: f64) -> Result<Delta, Invalid> {
    Delta::requested(v)
        .map_err(|_| invalid(field, format!("must be 0 or in [1e-15, 1e-3], got {v}")))
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl RawPolicy {
    pub(crate) fn validate(self) -> Result<Policy, Invalid> {
        let d = self.dataset;
        if !is_name(&d.name) {
            return Err(invalid(
                "dataset.name",
                "use lowercase letters, digits and '_'",
            ));
        }
        // A query names a dataset's tables `dataset.table` or
        // `dataset.public.table`: these names are the engine's own.
        if ["datafusion", "public", "information_schema"].contains(&d.name.as_str()) {
            return Err(invalid(
                "dataset.name",
                "is reserved for the query engine's own catalog and schemas; choose another name",
            ));
        }
        if !is_name(&d.privacy_unit) {
            return Err(invalid(
                "dataset.privacy_unit",
                "name the identifier column that identifies a patient, e.g. \"person_id\"",
            ));
        }
        if d.linkage.as_deref().is_some_and(|l| !is_name(l)) {
            return Err(invalid(
                "dataset.linkage",
                "name the identifier the privacy unit is a keyed pseudonym of, e.g. \"nhs_number\", or leave it out",
            ));
        }
        if !is_name(&d.sdc_profile) {
            return Err(invalid(
                "dataset.sdc_profile",
                "name a profile under policies/sdc/, e.g. \"nhs_sde\"",
            ));
        }
        let b = self.budget;
        let budget = BudgetPolicy {
            min_epsilon_per_query: epsilon(
                "budget.min_epsilon_per_query",
                b.min_epsilon_per_query,
            )?,
            default_epsilon_per_query: epsilon(
                "budget.default_epsilon_per_query",
                b.default_epsilon_per_query,
            )?,
            max_epsilon_per_query: epsilon(
                "budget.max_epsilon_per_query",
                b.max_epsilon_per_query,
            )?,
            project_epsilon: epsilon("budget.project_epsilon", b.project_epsilon)?,
            default_delta_per_query: delta(
                "budget.default_delta_per_query",
                b.default_delta_per_query,
            )?,
            max_delta_per_query: delta("budget.max_delta_per_query", b.max_delta_per_query)?,
            project_delta: delta("budget.project_delta", b.project_delta)?,
            lifetime_epsilon: epsilon("budget.lifetime_epsilon", b.lifetime_epsilon)?,
            lifetime_delta: delta("budget.lifetime_delta", b.lifetime_delta)?,
        };
        if budget.project_epsilon > budget.lifetime_epsilon {
            return Err(invalid(
                "budget.project_epsilon",
                "must not exceed budget.lifetime_epsilon, the cap across all projects",
            ));
        }
        if budget.project_delta > budget.lifetime_delta {
            return Err(invalid(
                "budget.project_delta",
                "must not exceed budget.lifetime_delta, the cap across all projects",
            ));
        }
        if budget.default_delta_per_query > budget.max_delta_per_query {
            return Err(invalid(
                "budget.default_delta_per_query",
                "must not exceed budget.max_delta_per_query",
            ));
        }
        if budget.max_delta_per_query > budget.project_delta {
            return Err(invalid(
                "budget.max_delta_per_query",
                "must not exceed budget.project_delta",
            ));
        }
        if !(1..=1_000).contains(&d.max_groups_per_unit) {
            return Err(invalid(
                "dataset.max_groups_per_unit",
                format!("must be between 1 and 1000, got {}", d.max_groups_per_unit),
            ));
        }
        for (i, r) in d.reference_tables.iter().enumerate() {
            if !is_name(r) {
                return Err(invalid(
                    format!("dataset.reference_tables[{i}]"),
                    "name a public reference table shipped under datasets/reference/, e.g. \"icd10_codes\"",
                ));
            }
        }
        if budget.min_epsilon_per_query > budget.default_epsilon_per_query {
            return Err(invalid(
                "budget.min_epsilon_per_query",
                "must not exceed budget.default_epsilon_per_query",
            ));
        }
        if budget.default_epsilon_per_query > budget.max_epsilon_per_query {
            return Err(invalid(
                "budget.default_epsilon_per_query",
                "must not exceed budget.max_epsilon_per_query",
            ));
        }
        if budget.max_epsilon_per_query > budget.project_epsilon {
            return Err(invalid(
                "budget.max_epsilon_per_query",
                "must not exceed budget.project_epsilon",
            ));
        }

        if self.tables.is_empty() {
            return Err(invalid("tables", "declare at least one table"));
        }
        let mut tables = BTreeMap::new();
        for (name, value) in self.tables {
            let field = format!("tables.{name}");
            if !is_name(&name) {
                return Err(invalid(
                    field,
                    "table names use lowercase letters, digits and '_'",
                ));
            }
            let raw: RawTable = value
                .try_into()
                .map_err(|e: toml::de::Error| invalid(&field, e.message().to_owned()))?;
            let table = raw.validate(&field, &name, &d.privacy_unit)?;
            tables.insert(name, table);
        }

        let opt_out = match d.exclude_opted_out {
            None => None,
            Some(spec) => {
                let field = "dataset.exclude_opted_out";
                let (t, c) = spec.split_once('.').ok_or_else(|| {
                    invalid(
                        field,
                        "write it as \"table.column\", e.g. \"patients.research_opt_out\"",
                    )
                })?;
                let table: &TablePolicy = tables
                    .get(t)
                    .ok_or_else(|| invalid(field, format!("table '{t}' is not declared")))?;
                match table.column(c).map(|c| &c.class) {
                    Some(ColumnClass::Categorical { domain: Some(dom) })
                        if dom.iter().any(|v| v == "true") =>
                    {
                        Some(ColumnRef {
                            table: t.to_owned(),
                            column: c.to_owned(),
                        })
                    }
                    _ => {
                        return Err(invalid(
                            field,
                            format!(
                                "column '{t}.{c}' must be declared as a categorical boolean with values [true, false]"
                            ),
                        ));
                    }
                }
            }
        };

        let r = self.review;
        let review = ReviewPolicy {
            mode: match r.mode.as_str() {
                "none" => ReviewMode::None,
                "flagged" => ReviewMode::Flagged,
                "always" => ReviewMode::Always,
                _ => {
                    return Err(invalid(
                        "review.mode",
                        "use \"none\", \"flagged\" (suppressed cells or more than max_cells) or \"always\"",
                    ));
                }
            },
            max_cells: r
                .max_cells
                .map(|n| {
                    u64::try_from(n)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("review.max_cells", "must be a positive integer"))
                })
                .transpose()?,
            approvals: match r.approvals {
                1 => 1,
                2 => 2,
                _ => {
                    return Err(invalid(
                        "review.approvals",
                        "must be 1 or 2 independent custodians",
                    ));
                }
            },
        };
        Ok(Policy {
            dataset: d.name,
            source_hash: String::new(),
            review,
            description: d.description,
            privacy_unit: d.privacy_unit,
            linkage: d.linkage,
            sdc_profile: d.sdc_profile,
            opt_out,
            max_groups_per_unit: u32::try_from(d.max_groups_per_unit)
                .map_err(|_| invalid("dataset.max_groups_per_unit", "out of range"))?,
            reference_tables: d.reference_tables,
            budget,
            tables,
            parts: Vec::new(),
        })
    }
}

impl RawTable {
    fn validate(self, field: &str, name: &str, unit: &str) -> Result<TablePolicy, Invalid> {
        if !(1..=10_000).contains(&self.max_rows_per_unit) {
            return Err(invalid(
                format!("{field}.max_rows_per_unit"),
                format!(
                    "must be between 1 and 10000, got {}",
                    self.max_rows_per_unit
                ),
            ));
        }
        let mut columns = Vec::new();
        for (cname, value) in self.columns {
            let cfield = format!("{field}.columns.{cname}");
            if !is_name(&cname) {
                return Err(invalid(
                    cfield,
                    "column names use lowercase letters, digits and '_'",
                ));
            }
            let raw: RawColumn = value
                .try_into()
                .map_err(|e: toml::de::Error| invalid(&cfield, e.message().to_owned()))?;
            let max_distinct = match raw.max_distinct {
                None => None,
                Some(n) if raw.class == "categorical" && raw.values.is_none() => Some(
                    u64::try_from(n)
                        .ok()
                        .filter(|n| (1..=100_000_000).contains(n))
                        .ok_or_else(|| {
                            invalid(
                                format!("{cfield}.max_distinct"),
                                format!("must be between 1 and 100000000, got {n}"),
                            )
                        })?,
                ),
                Some(_) => {
                    return Err(invalid(
                        format!("{cfield}.max_distinct"),
                        "only a categorical column without public values takes max_distinct",
                    ));
                }
            };
            let bounded = matches!(raw.class.as_str(), "numeric" | "date");
            let out_of_bounds = match raw.out_of_bounds.as_deref() {
                None => OutOfBounds::Clamp,
                Some("clamp") if bounded => OutOfBounds::Clamp,
                Some("reject") if bounded => OutOfBounds::Reject,
                Some(_) if bounded => {
                    return Err(invalid(
                        format!("{cfield}.out_of_bounds"),
                        "use \"clamp\" (keep the row, value at the nearer bound) or \"reject\" (leave the row out)",
                    ));
                }
                Some(_) => {
                    return Err(invalid(
                        format!("{cfield}.out_of_bounds"),
                        "only a numeric or date column has bounds to be outside of",
                    ));
                }
            };
            columns.push(ColumnPolicy {
                name: cname,
                description: raw.description.clone(),
                class: raw.validate(&cfield)?,
                max_distinct,
                out_of_bounds,
            });
        }
        match columns.iter().find(|c| c.name == unit) {
            Some(c) if c.class == ColumnClass::Identifier => {}
            Some(_) => {
                return Err(invalid(
                    format!("{field}.columns.{unit}"),
                    "the privacy unit must have class = \"identifier\"",
                ));
            }
            None => {
                return Err(invalid(
                    format!("{field}.columns"),
                    format!("every table must carry the privacy unit column '{unit}'"),
                ));
            }
        }
        Ok(TablePolicy {
            name: name.to_owned(),
            description: self.description,
            max_rows_per_unit: u32::try_from(self.max_rows_per_unit)
                .map_err(|_| invalid(field, "max_rows_per_unit out of range"))?,
            columns,
        })
    }
}

impl RawColumn {
    fn validate(self, field: &str) -> Result<ColumnClass, Invalid> {
        let no_bounds = |what: &str| {
            if self.bounds.is_some() {
                Err(invalid(
                    format!("{field}.bounds"),
                    format!("a {what} column takes no bounds"),
                ))
            } else {
                Ok(())
            }
        };
        match self.class.as_str() {
            "identifier" => {
                no_bounds("identifier")?;
                if self.values.is_some() {
                    return Err(invalid(
                        format!("{field}.values"),
                        "an identifier has no public domain",
                    ));
                }
                Ok(ColumnClass::Identifier)
            }
            "categorical" => {
                no_bounds("categorical")?;
                let domain = match self.values {
                    None => None,
                    Some(v) if v.is_empty() => {
                        return Err(invalid(
                            format!("{field}.values"),
                            "a public domain needs at least one value; omit `values` if the domain is private",
                        ));
                    }
                    Some(v) => {
                        let vals: Vec<String> =
                            v.into_iter().map(DomainValue::into_string).collect();
                        let mut sorted = vals.clone();
                        sorted.sort();
                        sorted.dedup();
                        if sorted.len() != vals.len() {
                            return Err(invalid(
                                format!("{field}.values"),
                                "values must be distinct",
                            ));
                        }
                        Some(vals)
                    }
                };
                Ok(ColumnClass::Categorical { domain })
            }
            "numeric" => {
                let b = self
                    .bounds
                    .ok_or_else(|| invalid(field, "a numeric column needs bounds = [lo, hi]"))?;
                let num =
                    |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                match b.as_slice() {
                    [lo, hi] => match (num(lo), num(hi)) {
                        (Some(lo), Some(hi)) if lo.is_finite() && hi.is_finite() && lo < hi => {
                            Ok(ColumnClass::Numeric { lo, hi })
                        }
                        _ => Err(invalid(
                            format!("{field}.bounds"),
                            "bounds must be two finite numbers with lo < hi",
                        )),
                    },
                    _ => Err(invalid(
                        format!("{field}.bounds"),
                        "write bounds as [lo, hi]",
                    )),
                }
            }
            "date" => {
                let b = self.bounds.ok_or_else(|| {
                    invalid(
                        field,
                        "a date column needs bounds = [\"YYYY-MM-DD\", \"YYYY-MM-DD\"]",
                    )
                })?;
                let day = |v: &toml::Value| v.as_str().and_then(parse_date);
                match b.as_slice() {
                    [lo, hi] => match (day(lo), day(hi)) {
                        (Some(lo), Some(hi)) if lo < hi => Ok(ColumnClass::Date { lo, hi }),
                        _ => Err(invalid(
                            format!("{field}.bounds"),
                            "bounds must be two dates \"YYYY-MM-DD\" with lo < hi",
                        )),
                    },
                    _ => Err(invalid(
                        format!("{field}.bounds"),
                        "write bounds as [lo, hi]",
                    )),
                }
            }
            other => Err(invalid(
                format!("{field}.class"),
                format!("unknown class '{other}'; use identifier, categorical, numeric or date"),
            )),
        }
    }
}
