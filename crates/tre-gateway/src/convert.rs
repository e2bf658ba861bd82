//! Domain → proto conversions, at the edge.

use tre_policy::{ColumnClass, Policy, TablePolicy};
use tre_proto::v1 as pb;
use tre_query::{Cell, Release, ReleaseColumn};

pub(crate) fn column(c: &ReleaseColumn) -> pb::Column {
    let kind = if c.kind == "group_key" {
        pb::ColumnKind::GroupKey
    } else {
        pb::ColumnKind::Aggregate
    };
    pb::Column {
        name: c.name.clone(),
        kind: kind as i32,
        aggregate: c.kind.clone(),
        mechanism: c.mechanism.clone(),
        noise_scale: c.noise_scale,
        expected_half_width: c.expected_half_width,
    }
}

fn status(s: &str) -> pb::SdcStatus {
    match s {
        "released" => pb::SdcStatus::Released,
        "rounded" => pb::SdcStatus::Rounded,
        "suppressed" => pb::SdcStatus::Suppressed,
        _ => pb::SdcStatus::Unspecified,
    }
}

pub(crate) fn release(id: String, r: &Release, remaining: f64) -> pb::QueryResponse {
    pb::QueryResponse {
        release_id: id,
        columns: r.columns.iter().map(column).collect(),
        rows: r
            .rows
            .iter()
            .map(|row| pb::Row {
                cells: row
                    .iter()
                    .map(|c| pb::Cell {
                        content: Some(match c {
                            Cell::Key { value } => pb::cell::Content::Key(value.clone()),
                            Cell::Value {
                                value,
                                ci_low,
                                ci_high,
                                status: s,
                                reason,
                            } => pb::cell::Content::Value(pb::Value {
                                value: *value,
                                ci_low: *ci_low,
                                ci_high: *ci_high,
                                status: status(s) as i32,
                                reason: reason.clone(),
                            }),
                        }),
                    })
                    .collect(),
            })
            .collect(),
        epsilon_spent: r.epsilon,
        delta_spent: r.delta,
        epsilon_remaining: remaining,
        confidence: r.confidence,
        sdc_profile: r.sdc_profile.clone(),
        notes: r.notes.clone(),
    }
}

pub(crate) fn dataset(p: &Policy) -> pb::Dataset {
    pb::Dataset {
        name: p.dataset.clone(),
        description: p.description.clone(),
        privacy_unit: p.privacy_unit.clone(),
        tables: p.tables.keys().cloned().collect(),
        sdc_profile: p.sdc_profile.clone(),
        default_epsilon_per_query: p.budget.default_epsilon_per_query.value(),
        max_epsilon_per_query: p.budget.max_epsilon_per_query.value(),
    }
}

pub(crate) fn table(p: &Policy, t: &TablePolicy) -> pb::DescribeTableResponse {
    pb::DescribeTableResponse {
        dataset: p.dataset.clone(),
        table: t.name.clone(),
        description: t.description.clone(),
        max_rows_per_unit: t.max_rows_per_unit,
        columns: t
            .columns
            .iter()
            .map(|c| {
                let (domain, lo, hi) = match &c.class {
                    ColumnClass::Categorical { domain: Some(d) } => (d.clone(), None, None),
                    ColumnClass::Numeric { lo, hi } => (vec![], Some(*lo), Some(*hi)),
                    ColumnClass::Date { lo, hi } => {
                        (vec![], Some(f64::from(*lo)), Some(f64::from(*hi)))
                    }
                    _ => (vec![], None, None),
                };
                pb::ColumnInfo {
                    name: c.name.clone(),
                    class: c.class.name().to_owned(),
                    description: c.description.clone(),
                    domain,
                    lower_bound: lo,
                    upper_bound: hi,
                }
            })
            .collect(),
    }
}
