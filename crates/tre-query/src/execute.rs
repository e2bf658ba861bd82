//! Run a private plan and turn its exact per-cell aggregates into noisy,
//! disclosure-checked cells. The exact numbers live only inside `execute`.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::common::ScalarValue;
use datafusion::prelude::SessionContext;
use tre_dp::CONFIDENCE;
use tre_sdc::Profile;

use crate::QueryError;
use crate::compile::{FIXED_POINT_SCALE, Measure, OutputKind, PrivatePlan};
use crate::release::{Cell, Release};

pub(crate) async fn execute(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    profile: &Profile,
) -> Result<Release, QueryError> {
    let exec_err = |e: datafusion::error::DataFusionError| QueryError::Execution {
        detail: e.to_string(),
    };
    let batches = ctx
        .execute_logical_plan(plan.exec.clone())
        .await
        .map_err(exec_err)?
        .collect()
        .await
        .map_err(exec_err)?;

    let n_keys = plan.keys.len();
    let n_m = plan.measurements.len();
    // Exact aggregates per cell key. Rows whose key is outside the public
    // domain (NULL, unexpected values) are never released.
    let mut exact: HashMap<Vec<String>, Vec<i64>> = HashMap::new();
    for batch in &batches {
        for row in 0..batch.num_rows() {
            let mut key = Vec::with_capacity(n_keys);
            for k in 0..n_keys {
                let v = ScalarValue::try_from_array(batch.column(k), row).map_err(|e| {
                    QueryError::Execution {
                        detail: e.to_string(),
                    }
                })?;
                key.push(if v.is_null() {
                    String::new()
                } else {
                    v.to_string()
                });
            }
            let mut values = Vec::with_capacity(n_m);
            for m in 0..n_m {
                let array = batch.column(n_keys + m);
                let array = array.as_primitive_opt::<Int64Type>().ok_or_else(|| {
                    QueryError::Internal(format!(
                        "measurement {m} is {}, not Int64",
                        array.data_type()
                    ))
                })?;
                values.push(if array.is_null(row) {
                    0
                } else {
                    array.value(row)
                });
            }
            exact.insert(key, values);
        }
    }

    // Every public cell, in domain order, empty ones included.
    let mut cells: Vec<Vec<String>> = vec![Vec::new()];
    for k in &plan.keys {
        cells = cells
            .into_iter()
            .flat_map(|prefix| {
                k.domain.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push(v.clone());
                    p
                })
            })
            .collect();
    }

    let alpha = 1.0 - CONFIDENCE;
    let dp = |e: tre_dp::DpError| QueryError::Internal(e.to_string());
    let slack = profile.rounding_slack();
    // noisy[m][cell]: each measurement's vector over all cells.
    let mut noisy_by_measure = Vec::with_capacity(n_m);
    for (m, measurement) in plan.measurements.iter().enumerate() {
        let values: Vec<i64> = cells
            .iter()
            .map(|key| exact.get(key).map_or(0, |v| v[m]))
            .collect();
        noisy_by_measure.push(measurement.mechanism.release_all(&values).map_err(dp)?);
    }
    drop(exact);
    let mut rows = Vec::with_capacity(cells.len());
    for (ci, key) in cells.iter().enumerate() {
        let noisy: Vec<i64> = noisy_by_measure.iter().map(|v| v[ci]).collect();
        let mut row = Vec::with_capacity(plan.outputs.len());
        for o in &plan.outputs {
            let cell = match o.kind {
                OutputKind::Key { index } => Cell::Key {
                    value: key[index].clone(),
                },
                OutputKind::Count { m } => {
                    let hw = plan.measurements[m]
                        .mechanism
                        .half_width(alpha)
                        .map_err(dp)?
                        + slack;
                    let out = profile.count_cell(noisy[m]);
                    value_cell(
                        out.value,
                        out.value.map(|v| ((v - hw).max(0.0), v + hw)),
                        out.status,
                        out.reason,
                    )
                }
                OutputKind::Sum { m } => {
                    let hw = plan.measurements[m]
                        .mechanism
                        .half_width(alpha)
                        .map_err(dp)?
                        / FIXED_POINT_SCALE;
                    let v = noisy[m] as f64 / FIXED_POINT_SCALE;
                    value_cell(
                        Some(v),
                        Some((v - hw, v + hw)),
                        tre_sdc::Status::Released,
                        String::new(),
                    )
                }
                OutputKind::Avg { sum, count, lo, hi } => {
                    // Each half at alpha/2, so the ratio's interval covers
                    // with probability at least 1 - alpha (Bonferroni).
                    let hs = plan.measurements[sum]
                        .mechanism
                        .half_width(alpha / 2.0)
                        .map_err(dp)?
                        / FIXED_POINT_SCALE;
                    let hc = plan.measurements[count]
                        .mechanism
                        .half_width(alpha / 2.0)
                        .map_err(dp)?;
                    let s = noisy[sum] as f64 / FIXED_POINT_SCALE;
                    let c = noisy[count] as f64;
                    let mean = if c > 0.0 {
                        (s / c).clamp(lo, hi)
                    } else {
                        f64::NAN
                    };
                    let interval = if c - hc > 0.0 {
                        let ratios = [
                            (s - hs) / (c - hc),
                            (s - hs) / (c + hc),
                            (s + hs) / (c - hc),
                            (s + hs) / (c + hc),
                        ];
                        let low = ratios
                            .iter()
                            .copied()
                            .fold(f64::INFINITY, f64::min)
                            .clamp(lo, hi);
                        let high = ratios
                            .iter()
                            .copied()
                            .fold(f64::NEG_INFINITY, f64::max)
                            .clamp(lo, hi);
                        (low, high)
                    } else {
                        (lo, hi)
                    };
                    if mean.is_nan() {
                        value_cell(
                            None,
                            None,
                            tre_sdc::Status::Suppressed,
                            "noisy denominator is not positive".into(),
                        )
                    } else {
                        let out = profile.derived_cell(mean, noisy[count]);
                        value_cell(
                            out.value,
                            out.value.map(|_| interval),
                            out.status,
                            out.reason,
                        )
                    }
                }
            };
            row.push(cell);
        }
        rows.push(row);
    }
    let mut notes = vec![format!(
        "each patient contributes at most the policy's rows per table; counts and sums carry discrete Laplace noise; intervals are {}%",
        (CONFIDENCE * 100.0).round()
    )];
    if plan
        .measurements
        .iter()
        .any(|m| matches!(m.measure, Measure::Sum { .. }))
    {
        notes.push(
            "sums are computed in fixed point over values clamped to their declared bounds".into(),
        );
    }
    Ok(Release {
        columns: plan.columns(),
        rows,
        epsilon: plan.epsilon.value(),
        confidence: CONFIDENCE,
        sdc_profile: profile.name.clone(),
        notes,
    })
}

fn value_cell(
    value: Option<f64>,
    interval: Option<(f64, f64)>,
    status: tre_sdc::Status,
    reason: String,
) -> Cell {
    Cell::Value {
        value,
        ci_low: interval.map(|i| i.0),
        ci_high: interval.map(|i| i.1),
        status: status.as_str().to_owned(),
        reason,
    }
}
