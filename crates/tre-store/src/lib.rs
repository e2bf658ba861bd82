//! The durable control plane: projects and their members, the privacy-budget
//! ledger, stored releases and the hash-chained audit log, in embedded
//! SQLite (WAL, `synchronous=FULL`) with versioned migrations.
//!
//! The ledger is the source of truth for budgets: a reservation is one
//! conditional UPDATE inside a transaction, so concurrent queries can never
//! overspend. This crate must never depend on DataFusion, the query engine,
//! keys or the network; it stores what it is given.

use std::path::Path;
use std::sync::Mutex;

use ring::digest;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use tre_core::{Code, Epsilon, ProjectId, Role, UserId};

mod migrations;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{code} unknown project '{0}'; ask a custodian which projects you belong to", code = Code::UnknownProject)]
    UnknownProject(String),
    #[error("{code} privacy budget exhausted: this query costs epsilon {cost} but project '{project}' has {remaining} left; ask for less epsilon or ask a custodian for more budget", code = Code::BudgetExhausted)]
    BudgetExhausted {
        project: String,
        cost: f64,
        remaining: f64,
    },
    #[error("{code} storage failure: {0}", code = Code::Storage)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{code} storage lock poisoned", code = Code::Internal)]
    Poisoned,
}

/// A project as seeded from configuration (governance comes later).
#[derive(Debug, Clone)]
pub struct ProjectSeed {
    pub id: ProjectId,
    pub title: String,
    pub dataset: String,
    pub budget: Epsilon,
    pub members: Vec<UserId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: ProjectId,
    pub title: String,
    pub dataset: String,
    pub budget_nanos: i64,
    pub spent_nanos: i64,
    pub members: Vec<UserId>,
}

impl Project {
    pub fn remaining(&self) -> f64 {
        Epsilon::from_nanos(self.budget_nanos - self.spent_nanos)
    }
    pub fn spent(&self) -> f64 {
        Epsilon::from_nanos(self.spent_nanos)
    }
}

/// One call, allowed or refused. Never holds an exact aggregate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    pub at: String,
    pub user: String,
    pub role: String,
    pub project: String,
    pub action: String,
    pub sql: String,
    pub outcome: String,
    pub code: String,
    pub epsilon_charged: f64,
    pub release_id: String,
    /// Internal detail for auditors (e.g. the engine error behind a generic
    /// TRE-E001). Never shown to the researcher.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrations::apply(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Create the project if it does not exist (keeping its ledger if it
    /// does) and make its member list exactly `members`.
    pub fn seed_project(&self, seed: &ProjectSeed) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO projects(id, title, dataset, budget_nanos, spent_nanos, created_at)
             VALUES (?1, ?2, ?3, ?4, 0, ?5)
             ON CONFLICT(id) DO UPDATE SET title = excluded.title, dataset = excluded.dataset",
            params![
                seed.id.as_str(),
                seed.title,
                seed.dataset,
                seed.budget.as_nanos(),
                now()
            ],
        )?;
        tx.execute(
            "DELETE FROM project_members WHERE project_id = ?1",
            [seed.id.as_str()],
        )?;
        for m in &seed.members {
            tx.execute(
                "INSERT INTO project_members(project_id, user_id) VALUES (?1, ?2)",
                params![seed.id.as_str(), m.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn project(&self, id: &ProjectId) -> Result<Project, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                "SELECT title, dataset, budget_nanos, spent_nanos FROM projects WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownProject(id.to_string()))?;
        let mut stmt = conn.prepare(
            "SELECT user_id FROM project_members WHERE project_id = ?1 ORDER BY user_id",
        )?;
        let members = stmt
            .query_map([id.as_str()], |r| r.get::<_, String>(0))?
            .filter_map(|r| r.ok().and_then(|u| UserId::new(u).ok()))
            .collect();
        Ok(Project {
            id: id.clone(),
            title: row.0,
            dataset: row.1,
            budget_nanos: row.2,
            spent_nanos: row.3,
            members,
        })
    }

    /// Charge `cost` to the project, atomically, or refuse without charging.
    /// Returns the ledger entry id and the remaining budget.
    pub fn reserve(
        &self,
        project: &ProjectId,
        cost: Epsilon,
        plan_hash: &str,
    ) -> Result<(i64, f64), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let nanos = cost.as_nanos();
        let updated = tx.execute(
            "UPDATE projects SET spent_nanos = spent_nanos + ?2
             WHERE id = ?1 AND spent_nanos + ?2 <= budget_nanos",
            params![project.as_str(), nanos],
        )?;
        if updated == 0 {
            let left: Option<i64> = tx
                .query_row(
                    "SELECT budget_nanos - spent_nanos FROM projects WHERE id = ?1",
                    [project.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            return Err(match left {
                None => StoreError::UnknownProject(project.to_string()),
                Some(left) => StoreError::BudgetExhausted {
                    project: project.to_string(),
                    cost: cost.value(),
                    remaining: Epsilon::from_nanos(left),
                },
            });
        }
        tx.execute(
            "INSERT INTO ledger(project_id, charged_nanos, plan_hash, at) VALUES (?1, ?2, ?3, ?4)",
            params![project.as_str(), nanos, plan_hash, now()],
        )?;
        let id = tx.last_insert_rowid();
        let left: i64 = tx.query_row(
            "SELECT budget_nanos - spent_nanos FROM projects WHERE id = ?1",
            [project.as_str()],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((id, Epsilon::from_nanos(left)))
    }

    /// Store a release (its noisy, disclosure-checked cells as JSON) and its
    /// audit event in one transaction.
    pub fn commit_release(
        &self,
        release_id: &str,
        ledger_id: i64,
        release_json: &str,
        event: &AuditEvent,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO releases(id, ledger_id, project_id, user_id, sql, body, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                release_id,
                ledger_id,
                event.project,
                event.user,
                event.sql,
                release_json,
                event.at
            ],
        )?;
        let seq = append_event(&tx, event)?;
        tx.commit()?;
        Ok(seq)
    }

    pub fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = append_event(&tx, event)?;
        tx.commit()?;
        Ok(seq)
    }

    pub fn audit_events(&self) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT seq, at, user_id, role, project, action, sql, outcome, code, epsilon_nanos,
                    release_id, detail, prev_hash, hash FROM audit ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredEvent {
                seq: r.get(0)?,
                event: AuditEvent {
                    at: r.get(1)?,
                    user: r.get(2)?,
                    role: r.get(3)?,
                    project: r.get(4)?,
                    action: r.get(5)?,
                    sql: r.get(6)?,
                    outcome: r.get(7)?,
                    code: r.get(8)?,
                    epsilon_charged: Epsilon::from_nanos(r.get(9)?),
                    release_id: r.get(10)?,
                    detail: r.get(11)?,
                },
                prev_hash: r.get(12)?,
                hash: r.get(13)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sum of all ledger charges for a project (for consistency checks).
    pub fn ledger_total(&self, project: &ProjectId) -> Result<f64, StoreError> {
        let conn = self.conn()?;
        let n: i64 = conn.query_row(
            "SELECT COALESCE(SUM(charged_nanos), 0) FROM ledger WHERE project_id = ?1",
            [project.as_str()],
            |r| r.get(0),
        )?;
        Ok(Epsilon::from_nanos(n))
    }

    /// Recompute the hash chain; returns the first bad sequence number.
    pub fn verify_chain(&self) -> Result<Option<i64>, StoreError> {
        let mut prev = GENESIS.to_owned();
        for e in self.audit_events()? {
            if e.prev_hash != prev || event_hash(&prev, e.seq, &e.event) != e.hash {
                return Ok(Some(e.seq));
            }
            prev = e.hash;
        }
        Ok(None)
    }
}

fn append_event(tx: &rusqlite::Transaction<'_>, e: &AuditEvent) -> Result<i64, StoreError> {
    let (last_seq, prev): (i64, String) = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, GENESIS.to_owned()));
    let seq = last_seq + 1;
    let hash = event_hash(&prev, seq, e);
    tx.execute(
        "INSERT INTO audit(seq, at, user_id, role, project, action, sql, outcome, code,
                           epsilon_nanos, release_id, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            seq,
            e.at,
            e.user,
            e.role,
            e.project,
            e.action,
            e.sql,
            e.outcome,
            e.code,
            charged_nanos(e.epsilon_charged),
            e.release_id,
            e.detail,
            prev,
            hash
        ],
    )?;
    Ok(seq)
}

fn charged_nanos(eps: f64) -> i64 {
    Epsilon::new(eps).map(Epsilon::as_nanos).unwrap_or(0)
}

/// Each event commits to its predecessor: h_i = SHA-256(h_{i-1} ‖ seq ‖ event).
fn event_hash(prev: &str, seq: i64, e: &AuditEvent) -> String {
    let mut normalised = e.clone();
    normalised.epsilon_charged = Epsilon::from_nanos(charged_nanos(e.epsilon_charged));
    let body = serde_json::to_string(&normalised).unwrap_or_default();
    let mut buf = Vec::with_capacity(prev.len() + body.len() + 24);
    buf.extend_from_slice(prev.as_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(body.as_bytes());
    hex::encode(digest::digest(&digest::SHA256, &buf).as_ref())
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl AuditEvent {
    /// An event skeleton for `action` by `user` acting as `role`.
    pub fn new(user: &str, role: Option<Role>, project: &str, action: &str) -> Self {
        Self {
            at: now(),
            user: user.to_owned(),
            role: role.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            project: project.to_owned(),
            action: action.to_owned(),
            sql: String::new(),
            outcome: String::new(),
            code: String::new(),
            epsilon_charged: 0.0,
            release_id: String::new(),
            detail: String::new(),
        }
    }
}

#[cfg(test)]
mod tests;
