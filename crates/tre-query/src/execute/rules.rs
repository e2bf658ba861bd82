//! The profile's rules on exact values (opt-in per profile): findings for
//! the reviewing custodian, never a change to what the researcher sees.

use super::*;

/// The profile's rules on exact values, opted into per profile: minimum
/// distinct patients per cell, and n-k dominance and the p-ratio rule on
/// SUM cells, from each patient's exact contribution. They decide nothing
/// the researcher sees (a branch on exact data would be an exact oracle):
/// their findings go to the reviewing custodian, and every release of such
/// a profile is held for review. Issue #10.
pub(super) fn exact_rule_findings(
    plan: &PrivatePlan,
    profile: &Profile,
    per_cell: &PerPatient,
    cells: &[Key],
) -> Vec<String> {
    // Each SUM output and its measurement's column among the Laplace
    // measurements (the main aggregate's columns, in order).
    let sum_cols: Vec<(usize, usize)> = plan
        .aggs
        .iter()
        .enumerate()
        .filter_map(|(j, a)| {
            let m = a.exact_sum()?.index();
            let before = plan.measurements.get(..m)?;
            Some((
                j,
                before
                    .iter()
                    .filter(|x| matches!(x.mechanism, Mechanism::Laplace(_)))
                    .count(),
            ))
        })
        .collect();
    let n_keys = plan.keys.len();
    let mut findings = Vec::new();
    for key in cells {
        let patients = per_cell.get(key).map_or(&[][..], Vec::as_slice);
        let sums: Vec<(usize, Vec<f64>)> = sum_cols
            .iter()
            .map(|&(j, l)| {
                let c = patients.iter().filter_map(|p| p.get(l)).map(|v| *v as f64);
                (j, c.collect())
            })
            .collect();
        let cell: Vec<String> = key
            .iter()
            .zip(&plan.keys)
            .map(|(v, k)| {
                format!(
                    "{}={}",
                    k.name,
                    if v.is_null() {
                        String::new()
                    } else {
                        v.to_string()
                    }
                )
            })
            .collect();
        for (target, reason) in profile.exact_cell_rules(patients.len(), &sums) {
            let column = match target {
                Some(j) => plan
                    .agg_schema
                    .fields()
                    .get(n_keys + j)
                    .map_or_else(String::new, |f| f.name().clone()),
                None => "every value".to_owned(),
            };
            findings.push(format!(
                "cell ({}), {column}: {reason}",
                if cell.is_empty() {
                    "all".to_owned()
                } else {
                    cell.join(", ")
                }
            ));
        }
    }
    findings
}
