//! The accepted plan in words, for dry runs.

use super::*;

pub(super) fn describe(
    plan: &PrivatePlan,
    policy: &Policy,
    analyzer: &Analyzer<'_>,
    budget: Budget,
) -> Vec<String> {
    let mut d = Vec::new();
    if !policy.parts.is_empty() {
        let names: Vec<&str> = policy.parts.iter().map(|p| p.dataset.as_str()).collect();
        d.push(format!(
            "join datasets {} on {}, the pseudonym of {} they share, under the strictest of their rules; remove patients who opted out of any of them from every table, before anything else",
            names.join(" and "),
            policy.privacy_unit,
            policy.linkage.as_deref().unwrap_or_default()
        ));
    }
    if let Some(o) = &policy.opt_out {
        d.push(format!(
            "remove patients who opted out ({o} = true) from every table, before anything else"
        ));
    }
    d.extend(analyzer.private_scans.iter().cloned());
    d.extend(analyzer.notes.iter().cloned());
    d.push(format!(
        "each patient contributes at most {} row(s) to the aggregate",
        plan.k_total
    ));
    d.push(format!(
        "work per row at most {:.0} units, so one patient's rows cost at most {:.0} units (bounds that keep run time from depending on one patient)",
        plan.row_work,
        plan.row_work * plan.k_total as f64
    ));
    let public: Vec<String> = plan
        .keys
        .iter()
        .filter_map(|k| {
            k.domain
                .as_ref()
                .map(|d| format!("{} ({} public values)", k.name, d.len()))
        })
        .collect();
    if plan.keys.is_empty() {
        d.push("one cell (no GROUP BY)".into());
    } else if !public.is_empty() {
        d.push(format!(
            "public group keys, released in full with empty cells: {}",
            public.join(" × ")
        ));
    }
    if let Some(s) = &plan.selection {
        let names: Vec<&str> = s.keys.iter().map(|i| plan.keys[*i].name.as_str()).collect();
        d.push(format!(
            "DP key selection for {}: each patient counts towards at most {} group(s), chosen at random; a key is released if its noisy distinct-patient count (discrete Laplace, scale {}) reaches {}; epsilon {:.4}, delta {:e}",
            names.join(", "),
            s.mechanism.max_groups(),
            s.mechanism.scale(),
            s.mechanism.threshold(),
            s.mechanism.epsilon(),
            s.mechanism.delta()
        ));
    }
    let alpha = 1.0 - CONFIDENCE;
    for m in &plan.measurements {
        let what = m.measure.describe(&policy.privacy_unit);
        match &m.mechanism {
            Mechanism::Laplace(l) => {
                let unit = if m.measure.fixed_point() { FIXED_POINT_SCALE } else { 1.0 };
                let hw = l.half_width(alpha).unwrap_or(f64::NAN) / unit;
                d.push(format!(
                    "measure {what}: discrete Laplace, sensitivity {}, epsilon {:.4}, scale {}, 95% interval ±{hw} per cell",
                    l.sensitivity() as f64 / unit,
                    l.epsilon(),
                    l.scale() / unit,
                ));
            }
            Mechanism::Quantile(q) => d.push(format!(
                "measure {what}: OpenDP private quantile over {} candidates, epsilon {:.4}, scale {:.2} ranks; with 95% probability the released value's rank is within ±{:.0} of the exact one",
                QUANTILE_BUCKETS + 1,
                q.epsilon(),
                q.scale(),
                q.rank_half_width(alpha)
            )),
        }
    }
    d.push(format!(
        "total cost: epsilon {}{}",
        plan.epsilon,
        if plan.delta.is_zero() {
            String::new()
        } else {
            format!(", delta {}", plan.delta)
        }
    ));
    if plan.delta < budget.delta {
        d.push(format!(
            "requested delta {} is not needed beyond what key selection uses",
            budget.delta
        ));
    }
    d
}
