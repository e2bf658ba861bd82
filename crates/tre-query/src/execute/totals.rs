//! Row, column and grand totals with secondary suppression.

use super::*;

/// The release rows followed by total rows ("Total" in the summed key),
/// per count column: primary suppression from the profile on cells and
/// totals alike, then secondary suppression until no suppressed cell can be
/// solved from what is shown.
pub(super) fn with_totals(
    plan: &PrivatePlan,
    mut rows: Vec<Vec<Cell>>,
    noisy: &[Vec<f64>],
    profile: &Profile,
) -> Result<Vec<Vec<Cell>>, QueryError> {
    use tre_sdc::secondary;
    let n_keys = plan.keys.len();
    let domain_len = |i: usize| plan.keys[i].domain.as_ref().map_or(0, Vec::len);
    let (r, c) = if n_keys == 1 {
        (1, domain_len(0))
    } else {
        (domain_len(0), domain_len(1))
    };
    let n_cells = r * c;
    if rows.len() != n_cells {
        return Err(QueryError::Internal(
            "totals: cells do not fill the table".into(),
        ));
    }
    let (n, lines) = if n_keys == 1 {
        secondary::one_way(n_cells)
    } else {
        secondary::two_way(r, c)
    };
    // Which cells each total sums: its line's members are cells or totals.
    let mut members_of: Vec<Vec<usize>> = vec![Vec::new(); n];
    for l in &lines {
        let mut cells = Vec::new();
        for m in &l.members {
            if *m < n_cells {
                cells.push(*m);
            } else {
                cells.extend(members_of[*m].iter().copied());
            }
        }
        members_of[l.total] = cells;
    }
    let key = |v: Option<&ScalarValue>| Cell::Key {
        value: v.map_or_else(|| "Total".to_owned(), ToString::to_string),
    };
    let domain = |i: usize| plan.keys[i].domain.clone().unwrap_or_default();
    let mut total_rows: Vec<Vec<Cell>> = (n_cells..n)
        .map(|t| {
            if n_keys == 1 {
                vec![key(None)]
            } else if t < n_cells + r {
                vec![key(domain(0).get(t - n_cells)), key(None)]
            } else if t < n_cells + r + c {
                vec![key(None), key(domain(1).get(t - n_cells - r))]
            } else {
                vec![key(None), key(None)]
            }
        })
        .collect();
    let z = 1.959_963_985; // two-sided 95% normal quantile
    for (j, a) in plan.aggs.iter().enumerate() {
        let Some(m) = a.total().map(|m| m.index()) else {
            return Err(QueryError::Internal("totals over a non-count".into()));
        };
        let Some(Mechanism::Laplace(lap)) = plan.measurements.get(m).map(|x| &x.mechanism) else {
            return Err(QueryError::Internal(
                "totals over a non-Laplace count".into(),
            ));
        };
        let col = n_keys + j;
        let mut values: Vec<f64> = noisy[m].iter().map(|v| v.max(0.0)).collect();
        let mut suppressed: Vec<bool> = rows
            .iter()
            .map(|row| matches!(&row[col], Cell::Value { value: None, .. }))
            .collect();
        // Variance of the discrete Laplace noise per cell.
        let q = (-1.0 / lap.scale()).exp();
        let var = 2.0 * q / (1.0 - q).powi(2);
        let mut total_cells = Vec::new();
        for members in &members_of[n_cells..] {
            let sum: f64 = members.iter().map(|i| noisy[m][*i]).sum();
            let out = profile.count_cell(sum as i64);
            values.push(sum.max(0.0));
            suppressed.push(out.status == tre_sdc::Status::Suppressed);
            let hw = z * (members.len() as f64 * var).sqrt() + profile.rounding_slack();
            total_cells.push((out, hw));
        }
        let added = secondary::protect(&values, &mut suppressed, &lines);
        let why = format!(
            "secondary suppression: otherwise a suppressed cell could be worked out from this line's other cells and total ({})",
            profile.name
        );
        for i in added.iter().copied().filter(|i| *i < n_cells) {
            rows[i][col] = value_cell(None, None, tre_sdc::Status::Suppressed, why.clone());
        }
        for (k, (out, hw)) in total_cells.into_iter().enumerate() {
            let cell = if added.contains(&(n_cells + k)) || out.value.is_none() {
                let reason = if out.value.is_none() {
                    out.reason
                } else {
                    why.clone()
                };
                value_cell(None, None, tre_sdc::Status::Suppressed, reason)
            } else {
                value_cell(
                    out.value,
                    out.value.map(|v| ((v - hw).max(0.0), v + hw)),
                    out.status,
                    out.reason,
                )
            };
            total_rows[k].push(cell);
        }
    }
    rows.extend(total_rows);
    Ok(rows)
}
