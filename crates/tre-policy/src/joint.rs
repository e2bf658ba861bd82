//! The policy of a query across datasets (issue #15): the datasets'
//! policies merged, each rule at its strictest, their tables named
//! `dataset.table`. Datasets may be joined only when they hold one person
//! under one unit: the same privacy unit, pseudonymised from the same
//! identifier (`linkage`). Otherwise one person could be two units, and
//! bounding each unit's rows would not bound the person's.

use std::collections::BTreeSet;

use tre_core::Code;

use crate::{BudgetPolicy, Policy, ReviewMode, ReviewPolicy, TablePolicy};

/// Why datasets cannot be queried together.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JointError {
    #[error("{code} dataset '{0}' declares no linkage for its privacy unit, so no query may join it with another dataset; query one dataset at a time, or ask its custodian to declare `linkage` in its policy", code = Code::DatasetsNotLinkable)]
    NoLinkage(String),
    #[error("{code} datasets '{a}' ({a_unit}) and '{b}' ({b_unit}) do not share a privacy unit, so one person could be two units; query them one at a time", code = Code::DatasetsNotLinkable)]
    DifferentUnits {
        a: String,
        a_unit: String,
        b: String,
        b_unit: String,
    },
    #[error("{code} the per-query epsilon limits of datasets {0} do not overlap, so no query may spend what each allows; query them one at a time", code = Code::DatasetsNotLinkable)]
    Caps(String),
    /// A bug in the caller: fewer than two datasets, one twice, or a joint
    /// policy joined again.
    #[error("{code} internal error: cannot join datasets {0}", code = Code::Internal)]
    Malformed(String),
}

impl JointError {
    pub fn code(&self) -> Code {
        match self {
            JointError::NoLinkage(_) | JointError::DifferentUnits { .. } | JointError::Caps(_) => {
                Code::DatasetsNotLinkable
            }
            JointError::Malformed(_) => Code::Internal,
        }
    }
}

impl Policy {
    /// The datasets this policy covers: its parts across datasets, or
    /// itself.
    pub fn covers(&self) -> Vec<&Policy> {
        if self.parts.is_empty() {
            vec![self]
        } else {
            self.parts.iter().collect()
        }
    }

    /// The name of the datasets `names` queried together: their names in
    /// order, joined by `+` (which no dataset name may contain).
    pub fn joint_name<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
        let names: BTreeSet<&str> = names.into_iter().collect();
        names.into_iter().collect::<Vec<_>>().join("+")
    }

    /// The policy of one query over the datasets of `parts`, if they may be
    /// joined: tables as `dataset.table`, every limit at its strictest
    /// (the fewest groups per patient, the narrowest per-query epsilon
    /// range, the strictest review), opt-outs left to each part (a patient
    /// who opted out of any is left out of all). Lifetime budgets stay with
    /// each dataset: a query across them is charged to every one.
    pub fn joint(parts: &[&Policy]) -> Result<Policy, JointError> {
        let mut parts: Vec<&Policy> = parts.to_vec();
        parts.sort_by(|a, b| a.dataset.cmp(&b.dataset));
        let names: Vec<&str> = parts.iter().map(|p| p.dataset.as_str()).collect();
        let name = Policy::joint_name(names.iter().copied());
        let distinct = names.iter().collect::<BTreeSet<_>>().len();
        let (Some(first), true) = (
            parts.first(),
            parts.len() >= 2 && distinct == parts.len() && parts.iter().all(|p| p.parts.is_empty()),
        ) else {
            return Err(JointError::Malformed(name));
        };
        for p in &parts {
            let Some(linkage) = &p.linkage else {
                return Err(JointError::NoLinkage(p.dataset.clone()));
            };
            if p.privacy_unit != first.privacy_unit || Some(linkage) != first.linkage.as_ref() {
                let unit = |p: &Policy| {
                    format!(
                        "{}, a pseudonym of {}",
                        p.privacy_unit,
                        p.linkage.as_deref().unwrap_or("nothing declared")
                    )
                };
                return Err(JointError::DifferentUnits {
                    a: first.dataset.clone(),
                    a_unit: unit(first),
                    b: p.dataset.clone(),
                    b_unit: unit(p),
                });
            }
        }
        let budget = joint_budget(&parts).ok_or_else(|| JointError::Caps(names.join(", ")))?;
        let mut tables = std::collections::BTreeMap::new();
        for p in &parts {
            for (table, t) in &p.tables {
                let key = format!("{}.{table}", p.dataset);
                tables.insert(
                    key.clone(),
                    TablePolicy {
                        name: key,
                        ..t.clone()
                    },
                );
            }
        }
        let reference_tables: BTreeSet<String> = parts
            .iter()
            .flat_map(|p| p.reference_tables.iter().cloned())
            .collect();
        let profiles: BTreeSet<&str> = parts.iter().map(|p| p.sdc_profile.as_str()).collect();
        let hashes: String = parts
            .iter()
            .map(|p| format!("{}:{}\n", p.dataset, p.source_hash))
            .collect();
        Ok(Policy {
            dataset: name,
            source_hash: hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                hashes.as_bytes(),
            )),
            review: strictest_review(&parts),
            description: format!("datasets {} queried together", names.join(" and ")),
            privacy_unit: first.privacy_unit.clone(),
            linkage: first.linkage.clone(),
            sdc_profile: profiles.into_iter().collect::<Vec<_>>().join("+"),
            opt_out: None,
            max_groups_per_unit: parts
                .iter()
                .map(|p| p.max_groups_per_unit)
                .min()
                .unwrap_or(1),
            reference_tables: reference_tables.into_iter().collect(),
            budget,
            tables,
            parts: parts.into_iter().cloned().collect(),
        })
    }
}

/// The review that holds a release whenever any part's would.
fn strictest_review(parts: &[&Policy]) -> ReviewPolicy {
    let rank = |m: ReviewMode| match m {
        ReviewMode::None => 0,
        ReviewMode::Flagged => 1,
        ReviewMode::Always => 2,
    };
    let mode = parts
        .iter()
        .map(|p| p.review.mode)
        .max_by_key(|m| rank(*m))
        .unwrap_or(ReviewMode::Always);
    ReviewPolicy {
        mode,
        max_cells: parts.iter().filter_map(|p| p.review.max_cells).min(),
        approvals: parts.iter().map(|p| p.review.approvals).max().unwrap_or(2),
    }
}

/// Per-query limits every part allows, or None when their epsilon ranges
/// do not overlap. Lifetime caps are each part's, charged separately; the
/// ones here are only their minimum.
fn joint_budget(parts: &[&Policy]) -> Option<BudgetPolicy> {
    fn pick<T: PartialOrd + Copy>(
        parts: &[&Policy],
        of: impl Fn(&BudgetPolicy) -> T,
        highest: bool,
    ) -> Option<T> {
        parts
            .iter()
            .map(|p| of(&p.budget))
            .reduce(|a, x| if (x > a) == highest { x } else { a })
    }
    let min_eps = pick(parts, |b| b.min_epsilon_per_query, true)?;
    let max_eps = pick(parts, |b| b.max_epsilon_per_query, false)?;
    if min_eps > max_eps {
        return None;
    }
    let default_eps = pick(parts, |b| b.default_epsilon_per_query, false)?;
    let default_eps = if default_eps < min_eps {
        min_eps
    } else {
        default_eps
    };
    Some(BudgetPolicy {
        min_epsilon_per_query: min_eps,
        default_epsilon_per_query: default_eps,
        max_epsilon_per_query: max_eps,
        project_epsilon: pick(parts, |b| b.project_epsilon, false)?,
        default_delta_per_query: pick(parts, |b| b.default_delta_per_query, false)?,
        max_delta_per_query: pick(parts, |b| b.max_delta_per_query, false)?,
        project_delta: pick(parts, |b| b.project_delta, false)?,
        lifetime_epsilon: pick(parts, |b| b.lifetime_epsilon, false)?,
        lifetime_delta: pick(parts, |b| b.lifetime_delta, false)?,
    })
}
