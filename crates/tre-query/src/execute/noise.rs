//! Key selection fixes the cells; every cell then gets a noisy value of
//! every measurement (OpenDP discrete Laplace, private quantile).

use super::*;

/// The mechanisms' output: the cells to release (public domains and the
/// keys DP key selection kept) and each measurement's noisy value per cell.
pub(crate) struct Noisy {
    pub(crate) cells: Vec<Key>,
    /// How many key tuples key selection kept.
    pub(crate) selected: usize,
    /// Per measurement, per cell: counts and fixed-point sums as integers,
    /// quantiles in the value's units.
    pub(crate) values: Vec<Vec<f64>>,
}

/// Run every mechanism of the plan once over the exact aggregates: key
/// selection, then discrete Laplace noise or a private quantile for every
/// cell (empty cells included). The only place noise is drawn.
pub(crate) fn noise(plan: &PrivatePlan, exact: &Exact) -> Result<Noisy, QueryError> {
    let dp = |e: tre_dp::DpError| QueryError::Internal(e.to_string());
    // Which values each key takes: public domains, or the selected keys.
    let mut selected: Vec<Key> = Vec::new();
    if let (Some(s), Some(counts)) = (&plan.selection, &exact.selection) {
        // OpenDP's threshold mechanism works on string keys; map back.
        let mut by_text: HashMap<String, Key> = HashMap::new();
        let mut text_counts = HashMap::new();
        for (k, v) in counts {
            let text = format!("{k:?}");
            text_counts.insert(text.clone(), *v);
            by_text.insert(text, k.clone());
        }
        let kept = s.mechanism.select(text_counts).map_err(dp)?;
        selected = kept.keys().filter_map(|t| by_text.remove(t)).collect();
        selected.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    }
    // Every cell, nested in group-key order. Each public key contributes
    // its domain; the selected keys enter together, as tuples, at the
    // position of the first of them.
    let n_keys = plan.keys.len();
    let selected_at: Vec<usize> = (0..n_keys)
        .filter(|i| plan.keys[*i].domain.is_none())
        .collect();
    let mut cells: Vec<Key> = vec![vec![ScalarValue::Null; n_keys]];
    for (i, k) in plan.keys.iter().enumerate() {
        let choices: Vec<Vec<(usize, ScalarValue)>> = match &k.domain {
            Some(d) => d.iter().map(|v| vec![(i, v.clone())]).collect(),
            None if selected_at.first() == Some(&i) => selected
                .iter()
                .map(|t| selected_at.iter().copied().zip(t.iter().cloned()).collect())
                .collect(),
            None => continue,
        };
        cells = cells
            .into_iter()
            .flat_map(|cell| {
                choices.iter().map(move |assign| {
                    let mut c = cell.clone();
                    for (slot, v) in assign {
                        c[*slot] = v.clone();
                    }
                    c
                })
            })
            .collect();
    }

    // Noisy measurements per cell.
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); plan.measurements.len()];
    let mut laplace_col = 0;
    for (m, measurement) in plan.measurements.iter().enumerate() {
        match &measurement.mechanism {
            Mechanism::Laplace(l) => {
                let exact_values: Vec<i64> = cells
                    .iter()
                    .map(|k| exact.laplace.get(k).map_or(0, |v| v[laplace_col]))
                    .collect();
                laplace_col += 1;
                values[m] = l
                    .release_all(&exact_values)
                    .map_err(dp)?
                    .into_iter()
                    .map(|v| v as f64)
                    .collect();
            }
            Mechanism::Quantile(q) => {
                let Some((_, hist)) = exact.histograms.iter().find(|(i, _)| *i == m) else {
                    return Err(QueryError::Internal("quantile without histogram".into()));
                };
                let crate::compile::Measure::Quantile { lo, hi, .. } = measurement.measure else {
                    return Err(QueryError::Internal("quantile measure mismatch".into()));
                };
                let width = (hi - lo) / q.buckets() as f64;
                let empty = Vec::new();
                values[m] = cells
                    .iter()
                    .map(|k| {
                        q.release(hist.get(k).unwrap_or(&empty))
                            .map(|b| lo + b as f64 * width)
                    })
                    .collect::<Result<_, _>>()
                    .map_err(dp)?;
            }
        }
    }
    Ok(Noisy {
        cells,
        selected: selected.len(),
        values,
    })
}
