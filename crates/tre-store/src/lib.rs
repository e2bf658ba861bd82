//! The durable control plane: projects and their lifecycle, members and
//! approved datasets, the (ε, δ) ledger per project and per dataset, stored
//! releases, revoked tokens, and the signed, hash-chained audit log.
//!
//! `Store` is the storage trait the gateway programs against; `SqliteStore`
//! is the embedded implementation (WAL, `synchronous=FULL`, versioned
//! migrations). The ledger is the source of truth for budgets: a reservation
//! is one IMMEDIATE transaction that checks the project's status, end date,
//! approved datasets, project budget and the dataset's lifetime cap, so
//! concurrent queries can never overspend.
//!
//! This crate must never depend on DataFusion, the query engine, tonic or
//! the network. It holds no key material: audit signatures come from the
//! `Notary` it is handed.

use chrono::NaiveDate;
use serde::Serialize;
use tre_core::{Code, Delta, Epsilon, ProjectId, UserId};

pub mod chain;
pub mod manifest;
mod migrations;
mod rules;
mod sqlite;

pub use chain::{AuditEvent, Checkpoint, Entry, Notary, StoredEvent, Tamper, VerifyReport};
pub use migrations::PRE_GOVERNANCE;
pub use rules::{Admitted, Transition};
pub use sqlite::{AuditObserver, INCIDENT_ACTOR, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{code} unknown project '{0}'; ask a custodian which projects you belong to", code = self.code())]
    UnknownProject(String),
    #[error("{code} project '{0}' already exists; choose another id", code = self.code())]
    ProjectExists(String),
    #[error("{code} project '{project}' is {status}, not active; only an approved, active project can be queried", code = self.code())]
    ProjectNotActive { project: String, status: String },
    #[error("{code} project '{project}' ended on {end}; ask a custodian to extend it", code = self.code())]
    ProjectExpired { project: String, end: NaiveDate },
    #[error("{code} project '{project}' is not approved for dataset '{dataset}'; request it from a custodian", code = self.code())]
    DatasetNotApproved { project: String, dataset: String },
    #[error("{code} cannot {action} project '{project}' while it is {status}", code = self.code())]
    InvalidTransition {
        project: String,
        status: String,
        action: &'static str,
    },
    #[error("{code} {0}", code = self.code())]
    InvalidRequest(String),
    #[error("{code} no release '{0}'; check the id", code = self.code())]
    UnknownRelease(String),
    #[error("{code} release '{id}' is {status}, not held for review", code = self.code())]
    ReleaseNotHeld { id: String, status: &'static str },
    #[error("{code} privacy budget exhausted: this query costs epsilon {cost} but project '{project}' has {remaining} left; ask for less epsilon or ask a custodian for more budget", code = self.code())]
    BudgetExhausted {
        project: String,
        cost: f64,
        remaining: f64,
    },
    #[error("{code} delta budget exhausted: this query costs delta {cost:e} but project '{project}' has {remaining:e} left; ask for less delta or ask a custodian for more", code = self.code())]
    DeltaExhausted {
        project: String,
        cost: f64,
        remaining: f64,
    },
    #[error("{code} the lifetime privacy budget of dataset '{0}' across all projects cannot pay for this query; a custodian must decide whether the dataset may be queried further", code = self.code())]
    LifetimeExhausted(String),
    #[error("{code} storage failure: {0}", code = self.code())]
    Sqlite(#[from] rusqlite::Error),
    #[error("{code} stored data is inconsistent: {0}", code = self.code())]
    Corrupt(String),
    #[error("{code} storage lock poisoned", code = self.code())]
    Poisoned,
    /// The state directory was written by a tre from before signed audit
    /// events; a caller that may discard it (the demo) matches on this.
    #[error("{code} {PRE_GOVERNANCE}", code = self.code())]
    PreGovernanceState,
}

impl StoreError {
    pub fn code(&self) -> Code {
        match self {
            StoreError::UnknownProject(_) => Code::UnknownProject,
            StoreError::ProjectExists(_) => Code::ProjectExists,
            StoreError::ProjectNotActive { .. } => Code::ProjectNotActive,
            StoreError::ProjectExpired { .. } => Code::ProjectExpired,
            StoreError::DatasetNotApproved { .. } => Code::DatasetNotApproved,
            StoreError::InvalidTransition { .. } => Code::InvalidTransition,
            StoreError::InvalidRequest(_) => Code::InvalidProjectRequest,
            StoreError::UnknownRelease(_) => Code::UnknownRelease,
            StoreError::ReleaseNotHeld { .. } => Code::ReleaseNotHeld,
            StoreError::BudgetExhausted { .. } => Code::BudgetExhausted,
            StoreError::DeltaExhausted { .. } => Code::DeltaBudgetExhausted,
            StoreError::LifetimeExhausted(_) => Code::DatasetLifetimeExhausted,
            StoreError::Sqlite(_) | StoreError::Corrupt(_) | StoreError::PreGovernanceState => {
                Code::Storage
            }
            StoreError::Poisoned => Code::Internal,
        }
    }

    /// Whether this is the operator's problem, whose text (paths, SQLite
    /// messages) must not reach a caller. Exhaustive, so a new variant
    /// must decide (issue #12).
    pub fn is_internal(&self) -> bool {
        match self {
            StoreError::Sqlite(_)
            | StoreError::Corrupt(_)
            | StoreError::Poisoned
            | StoreError::PreGovernanceState => true,
            StoreError::UnknownProject(_)
            | StoreError::ProjectExists(_)
            | StoreError::ProjectNotActive { .. }
            | StoreError::ProjectExpired { .. }
            | StoreError::DatasetNotApproved { .. }
            | StoreError::InvalidTransition { .. }
            | StoreError::InvalidRequest(_)
            | StoreError::UnknownRelease(_)
            | StoreError::ReleaseNotHeld { .. }
            | StoreError::BudgetExhausted { .. }
            | StoreError::DeltaExhausted { .. }
            | StoreError::LifetimeExhausted(_) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    /// Asked for by a researcher; no budget yet.
    Requested,
    Active,
    Rejected,
    /// Paused by a custodian; can be resumed.
    Suspended,
    /// Ended by a custodian; final.
    Revoked,
}

impl ProjectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectStatus::Requested => "requested",
            ProjectStatus::Active => "active",
            ProjectStatus::Rejected => "rejected",
            ProjectStatus::Suspended => "suspended",
            ProjectStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ProjectStatus::Requested,
            ProjectStatus::Active,
            ProjectStatus::Rejected,
            ProjectStatus::Suspended,
            ProjectStatus::Revoked,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// A researcher's application for a project.
#[derive(Debug, Clone)]
pub struct ProjectRequest {
    pub id: ProjectId,
    pub title: String,
    /// Lay summary of what the project is for.
    pub purpose: String,
    pub datasets: Vec<String>,
    pub epsilon: Epsilon,
    pub delta: Delta,
    pub members: Vec<UserId>,
    /// Last day (inclusive) on which the project may query.
    pub end_date: NaiveDate,
    pub requested_by: UserId,
}

/// An operator bootstrap: an already-active project (recorded in the
/// project's history and the audit log like any approval).
#[derive(Debug, Clone)]
pub struct ProjectSeed {
    pub id: ProjectId,
    pub title: String,
    pub dataset: String,
    pub epsilon: Epsilon,
    pub delta: Delta,
    pub members: Vec<UserId>,
    pub end_date: NaiveDate,
}

/// What a custodian decides about a project.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Grant at most what was requested, until `end_date`.
    Approve {
        epsilon: Epsilon,
        delta: Delta,
        end_date: NaiveDate,
    },
    Reject,
    Suspend,
    Resume,
    Revoke,
    /// Add budget; zero δ adds none.
    TopUp {
        epsilon: Epsilon,
        delta: Delta,
    },
}

impl Decision {
    pub fn action(&self) -> &'static str {
        match self {
            Decision::Approve { .. } => "approve",
            Decision::Reject => "reject",
            Decision::Suspend => "suspend",
            Decision::Resume => "resume",
            Decision::Revoke => "revoke",
            Decision::TopUp { .. } => "top up",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub reason: String,
    pub epsilon_nanos: i64,
    pub delta_femtos: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: ProjectId,
    pub title: String,
    pub purpose: String,
    pub status: ProjectStatus,
    pub datasets: Vec<String>,
    pub members: Vec<UserId>,
    pub requested_by: String,
    pub requested_at: String,
    pub requested_epsilon_nanos: i64,
    pub requested_delta_femtos: i64,
    pub requested_end: NaiveDate,
    pub epsilon_budget_nanos: i64,
    pub epsilon_spent_nanos: i64,
    pub delta_budget_femtos: i64,
    pub delta_spent_femtos: i64,
    /// The approved end date (inclusive); none until approved.
    pub end_date: Option<NaiveDate>,
    pub history: Vec<HistoryEntry>,
}

impl Project {
    pub fn budget(&self) -> f64 {
        Epsilon::from_nanos(self.epsilon_budget_nanos)
    }
    pub fn spent(&self) -> f64 {
        Epsilon::from_nanos(self.epsilon_spent_nanos)
    }
    pub fn remaining(&self) -> f64 {
        Epsilon::from_nanos(self.epsilon_budget_nanos - self.epsilon_spent_nanos)
    }
    pub fn delta_remaining(&self) -> f64 {
        Delta::from_femtos(self.delta_budget_femtos - self.delta_spent_femtos)
    }
    /// May this project run a query on `dataset` today? The ledger checks
    /// this again inside the reservation, atomically.
    pub fn check_queryable(&self, dataset: &str, today: NaiveDate) -> Result<(), StoreError> {
        if self.status != ProjectStatus::Active {
            return Err(StoreError::ProjectNotActive {
                project: self.id.to_string(),
                status: self.status.as_str().into(),
            });
        }
        match self.end_date {
            Some(end) if end >= today => {}
            Some(end) => {
                return Err(StoreError::ProjectExpired {
                    project: self.id.to_string(),
                    end,
                });
            }
            None => {
                return Err(StoreError::Corrupt(format!(
                    "active project '{}' has no end date",
                    self.id
                )));
            }
        }
        if !self.datasets.iter().any(|d| d == dataset) {
            return Err(StoreError::DatasetNotApproved {
                project: self.id.to_string(),
                dataset: dataset.to_owned(),
            });
        }
        Ok(())
    }

    /// Whoever asked for or works on the project; they may not decide on it.
    pub fn involves(&self, user: &UserId) -> bool {
        self.requested_by == user.as_str() || self.members.contains(user)
    }
}

/// A cost to reserve before touching data.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    pub project: &'a ProjectId,
    /// Every dataset the query reads, each with its lifetime caps: a query
    /// across datasets is charged in full to each one's lifetime ledger
    /// (issue #15), since it is that private for each.
    pub datasets: &'a [Lifetime<'a>],
    pub user: &'a UserId,
    pub epsilon: Epsilon,
    pub delta: Delta,
    pub plan_hash: &'a str,
    pub today: NaiveDate,
}

impl Charge<'_> {
    /// The name the ledger records: the dataset, or the datasets joined
    /// by `+`.
    pub fn dataset_name(&self) -> String {
        let names: Vec<&str> = self.datasets.iter().map(|d| d.dataset).collect();
        names.join("+")
    }
}

/// A dataset a query reads and its lifetime caps across all projects.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime<'a> {
    pub dataset: &'a str,
    pub epsilon: Epsilon,
    pub delta: Delta,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserved {
    pub ledger_id: i64,
    pub epsilon_remaining: f64,
    pub delta_remaining: f64,
}

/// Where a release stands in the airlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseStatus {
    Released,
    /// Waiting for custodians; invisible to the researcher.
    Held,
    Rejected,
    Withdrawn,
    ChangesRequested,
}

impl ReleaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Released => "released",
            ReleaseStatus::Held => "held",
            ReleaseStatus::Rejected => "rejected",
            ReleaseStatus::Withdrawn => "withdrawn",
            ReleaseStatus::ChangesRequested => "changes_requested",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ReleaseStatus::Released,
            ReleaseStatus::Held,
            ReleaseStatus::Rejected,
            ReleaseStatus::Withdrawn,
            ReleaseStatus::ChangesRequested,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// A step in a held release's review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewAction {
    Approve,
    Reject,
    RequestChanges,
    /// By the researcher.
    Withdraw,
}

impl ReviewAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewAction::Approve => "approve",
            ReviewAction::Reject => "reject",
            ReviewAction::RequestChanges => "request changes",
            ReviewAction::Withdraw => "withdraw",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseReview {
    pub reviewer: String,
    pub decision: String,
    pub reason: String,
    pub at: String,
}

/// A release as stored: the body exactly as released, its hash, where it
/// stands in the airlock and its signed manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRelease {
    pub id: String,
    pub project: String,
    pub user: String,
    pub plan_hash: String,
    pub body: String,
    pub body_hash: String,
    pub created_at: String,
    pub status: ReleaseStatus,
    pub hold_reason: String,
    /// `manifest::SignedManifest` as JSON.
    pub manifest: String,
    pub reviews: Vec<ReleaseReview>,
    /// What disclosure rules on exact values found, for the reviewing
    /// custodian only: never part of the body, the manifest or anything a
    /// researcher receives.
    pub review_notes: Vec<String>,
}

/// Cumulative spend on a dataset across all projects.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DatasetUsage {
    pub epsilon_nanos: i64,
    pub delta_femtos: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub project: String,
    pub dataset: String,
    pub user: String,
    pub epsilon_nanos: i64,
    pub delta_femtos: i64,
    pub plan_hash: String,
    pub status: LedgerStatus,
    pub release_id: Option<String>,
}

/// Where a ledger entry's charge stands. Every state but `Reserved` is
/// final, and every one of them is spent: a charge is never refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerStatus {
    /// Charged; the query is running.
    Reserved,
    /// Charged and released (or held for review).
    Released,
    /// Charged; the query failed after touching data (an incident) or its
    /// client gave up.
    Failed,
    /// Charged; the server stopped while the query ran, and recovery
    /// settled it at the next start.
    Interrupted,
}

impl LedgerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerStatus::Reserved => "reserved",
            LedgerStatus::Released => "released",
            LedgerStatus::Failed => "failed",
            LedgerStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            LedgerStatus::Reserved,
            LedgerStatus::Released,
            LedgerStatus::Failed,
            LedgerStatus::Interrupted,
        ]
        .into_iter()
        .find(|l| l.as_str() == s)
    }
}

/// Auditor's filter; every field narrows, `None` matches all.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub user: Option<String>,
    pub project: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<tre_core::Outcome>,
    /// Inclusive. A time, not text: offsets and sub-second boundaries
    /// compare as instants (issue #11).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Exclusive.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events with a larger sequence number.
    pub after_seq: Option<i64>,
    /// Only events up to this sequence number.
    pub through_seq: Option<i64>,
    pub limit: Option<usize>,
}

/// A page of an export: entries in log order, and whether more follow.
#[derive(Debug, Clone, Default)]
pub struct ExportPage {
    pub entries: Vec<Entry>,
    pub more: bool,
}

/// A page of events that fits a byte budget.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub events: Vec<StoredEvent>,
    /// More events match: ask again after the last one.
    pub more: bool,
}

/// How a reservation that produced no release is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The query failed after touching data: charged, and the project is
    /// suspended until a custodian has looked (issue #10).
    Incident,
    /// The client cancelled after the charge: charged, nothing released,
    /// no suspension.
    Cancelled,
}

/// The control plane, as the gateway sees it. Methods are synchronous and
/// each one is atomic.
pub trait Store: Send + Sync {
    // Projects.
    fn request_project(
        &self,
        req: &ProjectRequest,
        today: NaiveDate,
    ) -> Result<Project, StoreError>;
    fn seed_project(&self, seed: &ProjectSeed) -> Result<Project, StoreError>;
    fn project(&self, id: &ProjectId) -> Result<Project, StoreError>;
    fn projects(&self) -> Result<Vec<Project>, StoreError>;
    /// A custodian's decision, with its audit event, in one transaction.
    fn decide(
        &self,
        id: &ProjectId,
        decision: &Decision,
        by: &UserId,
        reason: &str,
        event: &AuditEvent,
    ) -> Result<Project, StoreError>;

    // Budgets and releases.
    fn reserve(&self, charge: &Charge<'_>) -> Result<Reserved, StoreError>;
    /// Mark a reservation failed (the charge stands) and record why. A
    /// failure of the query itself is an incident and suspends the project
    /// (`Settle::Incident`); a client that hung up after the charge is not
    /// (`Settle::Cancelled`): the query's data had no say in it.
    fn fail_reservation(
        &self,
        ledger_id: i64,
        event: &AuditEvent,
        settle: Settle,
    ) -> Result<i64, StoreError>;
    /// Store a release, settle its reservation and append its audit event,
    /// in one transaction.
    fn commit_release(
        &self,
        ledger_id: i64,
        release: &StoredRelease,
        event: &AuditEvent,
    ) -> Result<i64, StoreError>;
    /// The release of an earlier identical query (same project and plan
    /// hash, which covers ε and δ).
    fn find_release(
        &self,
        project: &ProjectId,
        plan_hash: &str,
    ) -> Result<Option<StoredRelease>, StoreError>;
    fn dataset_usage(&self, dataset: &str) -> Result<DatasetUsage, StoreError>;
    fn release(&self, id: &str) -> Result<Option<StoredRelease>, StoreError>;
    /// Releases of one project (or all), optionally with one status, oldest first.
    fn releases(
        &self,
        project: Option<&str>,
        status: Option<ReleaseStatus>,
    ) -> Result<Vec<StoredRelease>, StoreError>;
    /// One step of the airlock on a held release, with its audit event, in
    /// one transaction. An approval releases it once `required` distinct
    /// custodians have approved.
    fn review_release(
        &self,
        id: &str,
        action: ReviewAction,
        by: &UserId,
        reason: &str,
        required: u8,
        event: &AuditEvent,
    ) -> Result<StoredRelease, StoreError>;
    fn ledger(&self, project: &ProjectId) -> Result<Vec<LedgerEntry>, StoreError>;
    /// After a crash: settle reservations whose query never finished (the
    /// charge stands) and record each in the audit log. Call once at start.
    fn recover_interrupted(&self) -> Result<usize, StoreError>;

    // Tokens.
    fn revoke_token(&self, jti: &str, by: &UserId, reason: &str) -> Result<(), StoreError>;
    fn is_revoked(&self, jti: &str) -> Result<bool, StoreError>;

    // Audit.
    fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError>;
    fn audit_events(&self, filter: &AuditFilter) -> Result<Vec<StoredEvent>, StoreError>;
    /// Events in log order up to the filter's limit and about `max_bytes`
    /// of text (always at least one), read row by row so a page never
    /// holds more than that in memory.
    fn audit_page(&self, filter: &AuditFilter, max_bytes: usize) -> Result<AuditPage, StoreError>;
    /// Sign a checkpoint at the head of the log unless one exists.
    fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Events and checkpoints in log order, as exported.
    fn audit_entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// One page of an export of the log up to `through_seq`: the events
    /// after `after_seq`, about `max_bytes` of them (at least one), each
    /// followed by the checkpoints that cover it. The last page also
    /// carries checkpoints up to `through_seq` whose event is missing, as
    /// `audit_entries` does, so deleted events still show. Exports are
    /// read page by page and never held whole (issue #11).
    fn export_page(
        &self,
        after_seq: i64,
        through_seq: i64,
        max_bytes: usize,
    ) -> Result<ExportPage, StoreError>;
    fn verify_audit(&self) -> Result<VerifyReport, StoreError>;
    fn audit_public_key(&self) -> Vec<u8>;
}

pub fn now() -> String {
    log_time(chrono::Utc::now())
}

/// The log's fixed-width text form of a time (UTC, milliseconds, `Z`), in
/// which text order is time order.
fn log_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The earliest logged time at or after `t`: events are stamped in whole
/// milliseconds, so `at >= t` holds exactly when `at >= ceil_ms(t)`, and
/// likewise for `<`.
pub(crate) fn log_time_at_or_after(t: chrono::DateTime<chrono::Utc>) -> String {
    let sub_ms = i64::from(t.timestamp_subsec_nanos() % 1_000_000);
    let up = if sub_ms == 0 {
        t
    } else {
        t.checked_add_signed(chrono::TimeDelta::nanoseconds(1_000_000 - sub_ms))
            .unwrap_or(t)
    };
    log_time(up)
}

pub fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

impl AuditEvent {
    /// An event skeleton for `action` by `user` acting as `role`.
    pub fn new(user: &str, role: &str, project: &str, action: &str) -> Self {
        Self {
            at: now(),
            user: user.to_owned(),
            role: role.to_owned(),
            project: project.to_owned(),
            action: action.to_owned(),
            ..Self::default()
        }
    }

    pub fn set_outcome(&mut self, outcome: tre_core::Outcome) {
        self.outcome = outcome.as_str().to_owned();
    }

    /// The recorded outcome; `None` for text that is no outcome (a damaged
    /// or tampered event).
    pub fn outcome(&self) -> Option<tre_core::Outcome> {
        tre_core::Outcome::parse(&self.outcome)
    }
}

#[cfg(test)]
mod tests;
