//! Domain → proto conversions, at the edge.

use tre_core::{Delta, Epsilon};
use tre_policy::{ColumnClass, Policy, TablePolicy};
use tre_proto::v1 as pb;
use tre_query::{Cell, CellStatus, Release, ReleaseColumn, ReleaseOutcome};
use tre_store::{Project, ReleaseReview, ReleaseStatus, StoredEvent, StoredRelease};

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

fn status(s: CellStatus) -> pb::SdcStatus {
    match s {
        CellStatus::Released => pb::SdcStatus::Released,
        CellStatus::Rounded => pb::SdcStatus::Rounded,
        CellStatus::Suppressed => pb::SdcStatus::Suppressed,
    }
}

pub(crate) fn release(
    id: String,
    r: &Release,
    remaining: f64,
    delta_remaining: f64,
) -> pb::QueryResponse {
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
                                status: status(*s) as i32,
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
        delta_remaining,
        repeated: false,
        status: release_status(ReleaseStatus::Released) as i32,
        hold_reason: String::new(),
        confidence: r.confidence,
        sdc_profile: r.sdc_profile.clone(),
        sdc_outcome: sdc_outcome(r.sdc_outcome) as i32,
        notes: r.notes.clone(),
    }
}

/// A dataset as the catalog lists it, with the datasets a query may join
/// it with.
pub(crate) fn dataset(p: &Policy, joins_with: Vec<String>) -> pb::Dataset {
    pb::Dataset {
        linkage: p.linkage.clone().unwrap_or_default(),
        joins_with,
        name: p.dataset.clone(),
        description: p.description.clone(),
        privacy_unit: p.privacy_unit.clone(),
        tables: p.tables.keys().cloned().collect(),
        sdc_profile: p.sdc_profile.clone(),
        default_epsilon_per_query: p.budget.default_epsilon_per_query.value(),
        max_epsilon_per_query: p.budget.max_epsilon_per_query.value(),
        min_epsilon_per_query: p.budget.min_epsilon_per_query.value(),
        functions: tre_query::functions()
            .into_iter()
            .map(|f| pb::Function {
                name: f.name.to_owned(),
                arguments: f.signature(),
                total_because: f.total_because.to_owned(),
            })
            .collect(),
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

fn date(d: Option<chrono::NaiveDate>) -> String {
    d.map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

pub(crate) fn budget(p: &Project) -> pb::BudgetResponse {
    pb::BudgetResponse {
        project: p.id.to_string(),
        epsilon_budget: p.budget(),
        epsilon_spent: p.spent(),
        epsilon_remaining: p.remaining(),
        delta_budget: Delta::from_femtos(p.delta_budget_femtos),
        delta_spent: Delta::from_femtos(p.delta_spent_femtos),
        delta_remaining: p.delta_remaining(),
        status: p.status.as_str().to_owned(),
        end_date: date(p.end_date),
    }
}

pub(crate) fn project(p: &Project) -> pb::ProjectInfo {
    pb::ProjectInfo {
        id: p.id.to_string(),
        title: p.title.clone(),
        purpose: p.purpose.clone(),
        status: p.status.as_str().to_owned(),
        datasets: p.datasets.clone(),
        members: p.members.iter().map(ToString::to_string).collect(),
        requested_by: p.requested_by.clone(),
        requested_at: p.requested_at.clone(),
        requested_epsilon: Epsilon::from_nanos(p.requested_epsilon_nanos),
        requested_delta: Delta::from_femtos(p.requested_delta_femtos),
        requested_end_date: date(Some(p.requested_end)),
        epsilon_budget: p.budget(),
        epsilon_spent: p.spent(),
        delta_budget: Delta::from_femtos(p.delta_budget_femtos),
        delta_spent: Delta::from_femtos(p.delta_spent_femtos),
        end_date: date(p.end_date),
        history: p
            .history
            .iter()
            .map(|h| pb::ProjectHistoryEntry {
                at: h.at.clone(),
                actor: h.actor.clone(),
                action: h.action.clone(),
                reason: h.reason.clone(),
                epsilon: Epsilon::from_nanos(h.epsilon_nanos),
                delta: Delta::from_femtos(h.delta_femtos),
            })
            .collect(),
    }
}

pub(crate) fn audit_event(e: &StoredEvent) -> pb::AuditEvent {
    let v = &e.event;
    pb::AuditEvent {
        seq: e.seq,
        at: v.at.clone(),
        user: v.user.clone(),
        role: v.role.clone(),
        client: v.client.clone(),
        project: v.project.clone(),
        action: v.action.clone(),
        sql: v.sql.clone(),
        plan_hash: v.plan_hash.clone(),
        epsilon: Epsilon::from_nanos(v.epsilon_nanos),
        delta: Delta::from_femtos(v.delta_femtos),
        outcome: v.outcome.clone(),
        code: v.code.clone(),
        release_id: v.release_id.clone(),
        release_hash: v.release_hash.clone(),
        detail: v.detail.clone(),
        hash: e.hash.clone(),
    }
}

/// Mark a reply with where its release stands; only a released table keeps
/// its rows.
/// A researcher's query, as the release pipeline takes it.
pub(crate) fn query(req: pb::QueryRequest) -> tre_release::Query {
    tre_release::Query {
        sql: req.sql,
        epsilon: req.epsilon,
        delta: req.delta,
        totals: req.totals,
    }
}

/// Submit's reply: the table unless the airlock holds it, and what was
/// spent (nothing for a repeat).
pub(crate) fn released(r: &tre_release::Released) -> pb::QueryResponse {
    let mut reply = release(
        r.id.clone(),
        &r.release,
        r.epsilon_remaining,
        r.delta_remaining,
    );
    set_status(&mut reply, r.status, &r.hold_reason);
    if r.repeated {
        reply.repeated = true;
        reply.epsilon_spent = 0.0;
        reply.delta_spent = 0.0;
    }
    reply
}

fn sdc_outcome(o: ReleaseOutcome) -> pb::SdcOutcome {
    match o {
        ReleaseOutcome::Pass => pb::SdcOutcome::Pass,
        ReleaseOutcome::Review => pb::SdcOutcome::Review,
        ReleaseOutcome::Fail => pb::SdcOutcome::Fail,
    }
}

pub(crate) fn release_status(s: ReleaseStatus) -> pb::ReleaseStatus {
    match s {
        ReleaseStatus::Released => pb::ReleaseStatus::Released,
        ReleaseStatus::Held => pb::ReleaseStatus::Held,
        ReleaseStatus::Rejected => pb::ReleaseStatus::Rejected,
        ReleaseStatus::ChangesRequested => pb::ReleaseStatus::ChangesRequested,
        ReleaseStatus::Withdrawn => pb::ReleaseStatus::Withdrawn,
    }
}

/// A status filter from the wire; `UNSPECIFIED` is no filter.
pub(crate) fn release_status_filter(s: pb::ReleaseStatus) -> Option<ReleaseStatus> {
    match s {
        pb::ReleaseStatus::Unspecified => None,
        pb::ReleaseStatus::Released => Some(ReleaseStatus::Released),
        pb::ReleaseStatus::Held => Some(ReleaseStatus::Held),
        pb::ReleaseStatus::Rejected => Some(ReleaseStatus::Rejected),
        pb::ReleaseStatus::ChangesRequested => Some(ReleaseStatus::ChangesRequested),
        pb::ReleaseStatus::Withdrawn => Some(ReleaseStatus::Withdrawn),
    }
}

pub(crate) fn set_status(reply: &mut pb::QueryResponse, status: ReleaseStatus, reason: &str) {
    reply.status = release_status(status) as i32;
    reply.hold_reason = reason.to_owned();
    if status != ReleaseStatus::Released {
        reply.rows.clear();
        reply.notes = vec![match status {
            ReleaseStatus::Held => format!("awaiting review by a custodian: {reason}"),
            other => format!("not released: {}", other.as_str()),
        }];
    }
}

pub(crate) fn reviews(r: &[ReleaseReview]) -> Vec<pb::ReleaseReview> {
    r.iter()
        .map(|r| pb::ReleaseReview {
            reviewer: r.reviewer.clone(),
            decision: r.decision.clone(),
            reason: r.reason.clone(),
            at: r.at.clone(),
        })
        .collect()
}

pub(crate) fn release_summary(r: &StoredRelease) -> pb::ReleaseSummary {
    pb::ReleaseSummary {
        id: r.id.clone(),
        project: r.project.clone(),
        user: r.user.clone(),
        status: release_status(r.status) as i32,
        hold_reason: r.hold_reason.clone(),
        created_at: r.created_at.clone(),
        sql: serde_json::from_str::<tre_store::manifest::SignedManifest>(&r.manifest)
            .map(|m| m.manifest.sql)
            .unwrap_or_default(),
        reviews: reviews(&r.reviews),
    }
}
