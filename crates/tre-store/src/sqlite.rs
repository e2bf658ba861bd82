//! The embedded SQLite implementation of `Store`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use tre_core::{Delta, Epsilon, ProjectId, UserId};

use crate::chain::{self, GENESIS};
use crate::{
    AuditEvent, AuditFilter, AuditPage, Charge, Checkpoint, DatasetUsage, Decision, Entry,
    ExportPage, HistoryEntry, LedgerEntry, LedgerStatus, Notary, Project, ProjectRequest,
    ProjectSeed, ProjectStatus, ReleaseReview, ReleaseStatus, Reserved, ReviewAction, Settle,
    StoreError, StoredEvent, StoredRelease, VerifyReport, migrations, now,
};

pub struct SqliteStore {
    conn: Mutex<Connection>,
    notary: Arc<dyn Notary>,
    checkpoint_every: i64,
    /// Events appended by the open transaction, for the observer; `None`
    /// without one.
    pending: Option<Arc<Mutex<Vec<AuditEvent>>>>,
}

/// Told of each audit event once the transaction that wrote it commits
/// (operator metrics, issue #14). Called with the store's connection held:
/// it must be quick and must not call the store.
pub trait AuditObserver: Send + Sync {
    fn committed(&self, event: &AuditEvent);
}

const DATE: &str = "%Y-%m-%d";

impl SqliteStore {
    /// Open (creating and migrating) the database. Audit events are signed
    /// by `notary`, with a signed checkpoint every `checkpoint_every` events.
    pub fn open(
        path: &Path,
        notary: Arc<dyn Notary>,
        checkpoint_every: u32,
    ) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrations::apply(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            notary,
            checkpoint_every: i64::from(checkpoint_every.max(1)),
            pending: None,
        })
    }

    /// Tell `observer` of every audit event this store commits from now
    /// on, and of none that is rolled back. (SQLite runs the commit hook
    /// just before the commit ends: one that then fails on a full disk is
    /// still told, and its call fails with `TRE-I002`.)
    pub fn observed_by(mut self, observer: Arc<dyn AuditObserver>) -> Result<Self, StoreError> {
        let pending: Arc<Mutex<Vec<AuditEvent>>> = Arc::default();
        {
            let conn = self.conn.get_mut().map_err(|_| StoreError::Poisoned)?;
            let committed = Arc::clone(&pending);
            conn.commit_hook(Some(move || {
                let events = std::mem::take(
                    &mut *committed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                for e in &events {
                    observer.committed(e);
                }
                // Never veto the commit.
                false
            }))?;
            let rolled_back = Arc::clone(&pending);
            conn.rollback_hook(Some(move || {
                rolled_back
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
            }))?;
        }
        self.pending = Some(pending);
        Ok(self)
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    fn append(&self, tx: &Transaction<'_>, e: &AuditEvent) -> Result<i64, StoreError> {
        let e = &e.capped();
        let (last_seq, prev): (i64, String) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, GENESIS.to_owned()));
        let seq = last_seq + 1;
        let hash = chain::event_hash(&prev, seq, e);
        let sig = hex::encode(self.notary.sign(&chain::event_message(&hash)));
        tx.execute(
            "INSERT INTO audit(seq, at, user_id, role, client, project, action, sql, plan_hash,
                               epsilon_nanos, delta_femtos, outcome, code, release_id,
                               release_hash, detail, prev_hash, hash, sig)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19)",
            params![
                seq,
                e.at,
                e.user,
                e.role,
                e.client,
                e.project,
                e.action,
                e.sql,
                e.plan_hash,
                e.epsilon_nanos,
                e.delta_femtos,
                e.outcome,
                e.code,
                e.release_id,
                e.release_hash,
                e.detail,
                prev,
                hash,
                sig
            ],
        )?;
        if seq % self.checkpoint_every == 0 {
            self.sign_checkpoint(tx, seq, &hash)?;
        }
        if let Some(pending) = &self.pending {
            pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(e.clone());
        }
        Ok(seq)
    }

    fn sign_checkpoint(
        &self,
        tx: &Transaction<'_>,
        seq: i64,
        hash: &str,
    ) -> Result<Checkpoint, StoreError> {
        let at = now();
        let key = chain::key_fingerprint(&self.notary.public_key());
        let sig = hex::encode(
            self.notary
                .sign(&chain::checkpoint_message(seq, hash, &at, &key)),
        );
        tx.execute(
            "INSERT INTO checkpoints(seq, hash, at, sig, key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![seq, hash, at, sig, key],
        )?;
        Ok(Checkpoint {
            seq,
            hash: hash.to_owned(),
            at,
            sig,
            key,
        })
    }

    /// A query that fails (or is cut off) after its reservation is a
    /// security incident, not a message: whether a query fails must never
    /// depend on data, so if it ever does, it may leak at most once per
    /// project. The project is suspended until a custodian reviews the
    /// incident and resumes it; the suspension is in the project's history
    /// and has its own audit event, in the transaction that settles the
    /// charge. Issue #10.
    fn suspend_for_incident(
        &self,
        tx: &Transaction<'_>,
        ledger_id: i64,
        what: &str,
    ) -> Result<(), StoreError> {
        let project: String = tx.query_row(
            "SELECT project_id FROM ledger WHERE id = ?1",
            [ledger_id],
            |r| r.get(0),
        )?;
        let id = ProjectId::new(&project).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let suspended = tx.execute(
            "UPDATE projects SET status = 'suspended' WHERE id = ?1 AND status = 'active'",
            [id.as_str()],
        )?;
        if suspended == 0 {
            return Ok(());
        }
        let reason = format!(
            "incident: a query (ledger entry {ledger_id}) {what} after touching data; the project is suspended until a custodian has reviewed the audit log and resumes it"
        );
        history(tx, &id, INCIDENT_ACTOR, "suspend", &reason, 0, 0)?;
        let mut e = AuditEvent::new(INCIDENT_ACTOR, "system", id.as_str(), "project.suspend");
        e.set_outcome(tre_core::Outcome::Allowed);
        e.detail = reason;
        self.append(tx, &e)?;
        Ok(())
    }

    fn load_project(conn: &Connection, id: &ProjectId) -> Result<Project, StoreError> {
        let mut p = conn
            .query_row(
                &format!("{PROJECT_COLUMNS} WHERE id = ?1"),
                [id.as_str()],
                project_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownProject(id.to_string()))??;
        let mut stmt = conn.prepare(
            "SELECT dataset FROM project_datasets WHERE project_id = ?1 ORDER BY dataset",
        )?;
        p.datasets = stmt
            .query_map([id.as_str()], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT user_id FROM project_members WHERE project_id = ?1 ORDER BY user_id",
        )?;
        p.members = stmt
            .query_map([id.as_str()], |r| r.get::<_, String>(0))?
            .map(|r| {
                r.map_err(StoreError::from)
                    .and_then(|u| UserId::new(u).map_err(|e| StoreError::Corrupt(e.to_string())))
            })
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT at, actor, action, reason, epsilon_nanos, delta_femtos
             FROM project_history WHERE project_id = ?1 ORDER BY id",
        )?;
        p.history = stmt
            .query_map([id.as_str()], |r| {
                Ok(HistoryEntry {
                    at: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    reason: r.get(3)?,
                    epsilon_nanos: r.get(4)?,
                    delta_femtos: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(p)
    }

    fn insert_project(
        tx: &Transaction<'_>,
        req: &ProjectRequest,
        status: ProjectStatus,
    ) -> Result<(), StoreError> {
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM projects WHERE id = ?1)",
            [req.id.as_str()],
            |r| r.get(0),
        )?;
        if exists {
            return Err(StoreError::ProjectExists(req.id.to_string()));
        }
        tx.execute(
            "INSERT INTO projects(id, title, purpose, status, requested_by, requested_at,
                                  requested_epsilon_nanos, requested_delta_femtos, requested_end)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                req.id.as_str(),
                req.title,
                req.purpose,
                status.as_str(),
                req.requested_by.as_str(),
                now(),
                req.epsilon.as_nanos(),
                req.delta.as_femtos(),
                req.end_date.format(DATE).to_string(),
            ],
        )?;
        for d in &req.datasets {
            tx.execute(
                "INSERT OR IGNORE INTO project_datasets(project_id, dataset) VALUES (?1, ?2)",
                params![req.id.as_str(), d],
            )?;
        }
        for m in &req.members {
            tx.execute(
                "INSERT OR IGNORE INTO project_members(project_id, user_id) VALUES (?1, ?2)",
                params![req.id.as_str(), m.as_str()],
            )?;
        }
        history(
            tx,
            &req.id,
            req.requested_by.as_str(),
            "request",
            &req.purpose,
            req.epsilon.as_nanos(),
            req.delta.as_femtos(),
        )?;
        Ok(())
    }

    /// Events matching `filter` in log order, read row by row until the
    /// limit or, if given, about `max_bytes` of text (at least one event).
    fn read_events(
        conn: &Connection,
        filter: &AuditFilter,
        max_bytes: Option<usize>,
    ) -> Result<AuditPage, StoreError> {
        // One row more than the limit tells whether more match.
        let limit = filter
            .limit
            .and_then(|l| i64::try_from(l).ok())
            .map_or(-1, |l| l.saturating_add(1));
        let mut stmt = conn.prepare(
            "SELECT seq, at, user_id, role, client, project, action, sql, plan_hash,
                    epsilon_nanos, delta_femtos, outcome, code, release_id, release_hash,
                    detail, prev_hash, hash, sig
             FROM audit
             WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR project = ?2)
               AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR outcome = ?4)
               AND (?5 IS NULL OR at >= ?5) AND (?6 IS NULL OR at < ?6)
               AND (?8 IS NULL OR seq > ?8) AND (?9 IS NULL OR seq <= ?9)
             ORDER BY seq LIMIT ?7",
        )?;
        let rows = stmt.query_map(
            params![
                filter.user,
                filter.project,
                filter.action,
                filter.outcome.map(tre_core::Outcome::as_str),
                filter.since.map(crate::log_time_at_or_after),
                filter.until.map(crate::log_time_at_or_after),
                limit,
                filter.after_seq,
                filter.through_seq
            ],
            |r| {
                Ok(StoredEvent {
                    seq: r.get(0)?,
                    event: AuditEvent {
                        at: r.get(1)?,
                        user: r.get(2)?,
                        role: r.get(3)?,
                        client: r.get(4)?,
                        project: r.get(5)?,
                        action: r.get(6)?,
                        sql: r.get(7)?,
                        plan_hash: r.get(8)?,
                        epsilon_nanos: r.get(9)?,
                        delta_femtos: r.get(10)?,
                        outcome: r.get(11)?,
                        code: r.get(12)?,
                        release_id: r.get(13)?,
                        release_hash: r.get(14)?,
                        detail: r.get(15)?,
                    },
                    prev_hash: r.get(16)?,
                    hash: r.get(17)?,
                    sig: r.get(18)?,
                })
            },
        )?;
        let mut page = AuditPage::default();
        let mut bytes = 0usize;
        for row in rows {
            let row = row?;
            let full = filter.limit.is_some_and(|l| page.events.len() >= l)
                || max_bytes.is_some_and(|m| !page.events.is_empty() && bytes >= m);
            if full {
                page.more = true;
                break;
            }
            bytes = bytes.saturating_add(row.event.text_bytes());
            page.events.push(row);
        }
        Ok(page)
    }

    /// Checkpoints with `after < seq <= through`, in order.
    fn read_checkpoints(
        conn: &Connection,
        after: i64,
        through: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let mut stmt = conn.prepare(
            "SELECT seq, hash, at, sig, key FROM checkpoints
             WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map([after, through], |r| {
            Ok(Checkpoint {
                seq: r.get(0)?,
                hash: r.get(1)?,
                at: r.get(2)?,
                sig: r.get(3)?,
                key: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Each checkpoint right after the event it covers; one that covers an
/// event not present goes at the end, where verify reports it.
fn interleave(events: Vec<StoredEvent>, checkpoints: Vec<Checkpoint>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(events.len() + checkpoints.len());
    let mut cps = checkpoints.into_iter().peekable();
    for e in events {
        let seq = e.seq;
        out.push(Entry::Event(Box::new(e)));
        while let Some(c) = cps.next_if(|c| c.seq <= seq) {
            out.push(Entry::Checkpoint(c));
        }
    }
    out.extend(cps.map(Entry::Checkpoint));
    out
}

const PROJECT_COLUMNS: &str = "SELECT id, title, purpose, status, requested_by, requested_at,
        requested_epsilon_nanos, requested_delta_femtos, requested_end, epsilon_budget_nanos,
        epsilon_spent_nanos, delta_budget_femtos, delta_spent_femtos, end_date FROM projects";

fn parse_date(s: &str) -> Result<NaiveDate, StoreError> {
    NaiveDate::parse_from_str(s, DATE).map_err(|_| StoreError::Corrupt(format!("bad date '{s}'")))
}

fn project_row(r: &Row<'_>) -> rusqlite::Result<Result<Project, StoreError>> {
    let id: String = r.get(0)?;
    let status: String = r.get(3)?;
    let requested_end: String = r.get(8)?;
    let end: Option<String> = r.get(13)?;
    let build = || -> Result<Project, StoreError> {
        Ok(Project {
            id: ProjectId::new(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            title: r.get(1)?,
            purpose: r.get(2)?,
            status: ProjectStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("bad status '{status}'")))?,
            datasets: vec![],
            members: vec![],
            requested_by: r.get(4)?,
            requested_at: r.get(5)?,
            requested_epsilon_nanos: r.get(6)?,
            requested_delta_femtos: r.get(7)?,
            requested_end: parse_date(&requested_end)?,
            epsilon_budget_nanos: r.get(9)?,
            epsilon_spent_nanos: r.get(10)?,
            delta_budget_femtos: r.get(11)?,
            delta_spent_femtos: r.get(12)?,
            end_date: end.as_deref().map(parse_date).transpose()?,
            history: vec![],
        })
    };
    Ok(build())
}

/// Who acts when tre itself suspends a project after an incident.
pub const INCIDENT_ACTOR: &str = "tre";

fn history(
    tx: &Transaction<'_>,
    id: &ProjectId,
    actor: &str,
    action: &str,
    reason: &str,
    epsilon_nanos: i64,
    delta_femtos: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO project_history(project_id, at, actor, action, reason, epsilon_nanos,
                                     delta_femtos)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id.as_str(),
            now(),
            actor,
            action,
            reason,
            epsilon_nanos,
            delta_femtos
        ],
    )?;
    Ok(())
}

impl crate::Store for SqliteStore {
    fn request_project(
        &self,
        req: &ProjectRequest,
        today: NaiveDate,
    ) -> Result<Project, StoreError> {
        req.validate(today)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        Self::insert_project(&tx, req, ProjectStatus::Requested)?;
        let p = Self::load_project(&tx, &req.id)?;
        tx.commit()?;
        Ok(p)
    }

    fn seed_project(&self, seed: &ProjectSeed) -> Result<Project, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let operator = "(operator)";
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM projects WHERE id = ?1)",
            [seed.id.as_str()],
            |r| r.get(0),
        )?;
        // Re-seeding keeps the ledger and the decisions already taken.
        if !exists {
            let req = ProjectRequest {
                id: seed.id.clone(),
                title: seed.title.clone(),
                purpose: format!("seeded by the operator: {}", seed.title),
                datasets: vec![seed.dataset.clone()],
                epsilon: seed.epsilon,
                delta: seed.delta,
                members: seed.members.clone(),
                end_date: seed.end_date,
                requested_by: UserId::new("operator")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            };
            Self::insert_project(&tx, &req, ProjectStatus::Active)?;
            tx.execute(
                "UPDATE projects SET epsilon_budget_nanos = ?2, delta_budget_femtos = ?3,
                        end_date = ?4 WHERE id = ?1",
                params![
                    seed.id.as_str(),
                    seed.epsilon.as_nanos(),
                    seed.delta.as_femtos(),
                    seed.end_date.format(DATE).to_string()
                ],
            )?;
            history(
                &tx,
                &seed.id,
                operator,
                "approve",
                "seeded at server start",
                seed.epsilon.as_nanos(),
                seed.delta.as_femtos(),
            )?;
            let mut e = AuditEvent::new(operator, "admin", seed.id.as_str(), "project.seed");
            e.set_outcome(tre_core::Outcome::Allowed);
            e.epsilon_nanos = seed.epsilon.as_nanos();
            e.delta_femtos = seed.delta.as_femtos();
            e.detail = format!(
                "members {}",
                seed.members
                    .iter()
                    .map(UserId::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            );
            self.append(&tx, &e)?;
        }
        let p = Self::load_project(&tx, &seed.id)?;
        tx.commit()?;
        Ok(p)
    }

    fn project(&self, id: &ProjectId) -> Result<Project, StoreError> {
        let conn = self.conn()?;
        Self::load_project(&conn, id)
    }

    fn projects(&self) -> Result<Vec<Project>, StoreError> {
        let conn = self.conn()?;
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM projects ORDER BY requested_at, id")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        ids.iter()
            .map(|id| {
                let id = ProjectId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Self::load_project(&conn, &id)
            })
            .collect()
    }

    fn decide(
        &self,
        id: &ProjectId,
        decision: &Decision,
        by: &UserId,
        reason: &str,
        event: &AuditEvent,
    ) -> Result<Project, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let t = Self::load_project(&tx, id)?.transition(decision, crate::today())?;
        tx.execute(
            "UPDATE projects SET status = ?2, epsilon_budget_nanos = ?3,
                    delta_budget_femtos = ?4, end_date = ?5 WHERE id = ?1",
            params![
                id.as_str(),
                t.status.as_str(),
                t.epsilon_budget_nanos,
                t.delta_budget_femtos,
                t.end_date.map(|d| d.format(DATE).to_string())
            ],
        )?;
        history(
            &tx,
            id,
            by.as_str(),
            decision.action(),
            reason,
            t.granted_epsilon_nanos,
            t.granted_delta_femtos,
        )?;
        let p = Self::load_project(&tx, id)?;
        self.append(&tx, event)?;
        tx.commit()?;
        Ok(p)
    }

    fn reserve(&self, c: &Charge<'_>) -> Result<Reserved, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let p = Self::load_project(&tx, c.project)?;
        let used = c
            .datasets
            .iter()
            .map(|d| usage(&tx, d.dataset))
            .collect::<Result<Vec<_>, _>>()?;
        let admitted = p.admit(c, &used)?;
        let (eps, delta) = (c.epsilon.as_nanos(), c.delta.as_femtos());
        tx.execute(
            "UPDATE projects SET epsilon_spent_nanos = epsilon_spent_nanos + ?2,
                    delta_spent_femtos = delta_spent_femtos + ?3 WHERE id = ?1",
            params![c.project.as_str(), eps, delta],
        )?;
        for d in c.datasets {
            tx.execute(
                "INSERT INTO dataset_usage(dataset, epsilon_nanos, delta_femtos) VALUES (?1, ?2, ?3)
                 ON CONFLICT(dataset) DO UPDATE SET epsilon_nanos = epsilon_nanos + ?2,
                                                    delta_femtos = delta_femtos + ?3",
                params![d.dataset, eps, delta],
            )?;
        }
        tx.execute(
            "INSERT INTO ledger(project_id, dataset, user_id, epsilon_nanos, delta_femtos,
                                plan_hash, status, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7)",
            params![
                c.project.as_str(),
                c.dataset_name(),
                c.user.as_str(),
                eps,
                delta,
                c.plan_hash,
                now()
            ],
        )?;
        let ledger_id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Reserved {
            ledger_id,
            epsilon_remaining: Epsilon::from_nanos(admitted.epsilon_remaining_nanos),
            delta_remaining: Delta::from_femtos(admitted.delta_remaining_femtos),
        })
    }

    fn fail_reservation(
        &self,
        ledger_id: i64,
        event: &AuditEvent,
        settle: Settle,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE ledger SET status = 'failed' WHERE id = ?1 AND status = 'reserved'",
            [ledger_id],
        )?;
        let seq = self.append(&tx, event)?;
        if settle == Settle::Incident {
            self.suspend_for_incident(&tx, ledger_id, "failed")?;
        }
        tx.commit()?;
        Ok(seq)
    }

    fn commit_release(
        &self,
        ledger_id: i64,
        r: &StoredRelease,
        event: &AuditEvent,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let settled = tx.execute(
            "UPDATE ledger SET status = 'released' WHERE id = ?1 AND status = 'reserved'",
            [ledger_id],
        )?;
        if settled != 1 {
            return Err(StoreError::Corrupt(format!(
                "ledger entry {ledger_id} is not an open reservation"
            )));
        }
        tx.execute(
            "INSERT INTO releases(id, ledger_id, project_id, user_id, plan_hash, body, body_hash,
                                  created_at, status, hold_reason, manifest, review_notes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                r.id,
                ledger_id,
                r.project,
                r.user,
                r.plan_hash,
                r.body,
                r.body_hash,
                r.created_at,
                r.status.as_str(),
                r.hold_reason,
                r.manifest,
                serde_json::to_string(&r.review_notes)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
            ],
        )?;
        let seq = self.append(&tx, event)?;
        tx.commit()?;
        Ok(seq)
    }

    fn find_release(
        &self,
        project: &ProjectId,
        plan_hash: &str,
    ) -> Result<Option<StoredRelease>, StoreError> {
        let conn = self.conn()?;
        Ok(load_releases(
            &conn,
            // A release that was rejected, withdrawn or sent back for
            // changes released nothing: the same query may run again (and
            // is charged again). Issue #10.
            "WHERE project_id = ?1 AND plan_hash = ?2 AND status IN ('released', 'held')
             ORDER BY created_at LIMIT 1",
            &[&project.as_str(), &plan_hash],
        )?
        .pop())
    }

    fn release(&self, id: &str) -> Result<Option<StoredRelease>, StoreError> {
        let conn = self.conn()?;
        Ok(load_releases(&conn, "WHERE id = ?1", &[&id])?.pop())
    }

    fn releases(
        &self,
        project: Option<&str>,
        status: Option<ReleaseStatus>,
    ) -> Result<Vec<StoredRelease>, StoreError> {
        let conn = self.conn()?;
        load_releases(
            &conn,
            "WHERE (?1 IS NULL OR project_id = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY created_at, id",
            &[&project, &status.map(ReleaseStatus::as_str)],
        )
    }

    fn review_release(
        &self,
        id: &str,
        action: ReviewAction,
        by: &UserId,
        reason: &str,
        required: u8,
        event: &AuditEvent,
    ) -> Result<StoredRelease, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let r = load_releases(&tx, "WHERE id = ?1", &[&id])?
            .pop()
            .ok_or_else(|| StoreError::UnknownRelease(id.to_owned()))?;
        if r.status != ReleaseStatus::Held {
            return Err(StoreError::ReleaseNotHeld {
                id: id.to_owned(),
                status: r.status.as_str(),
            });
        }
        tx.execute(
            "INSERT INTO release_reviews(release_id, reviewer, decision, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, by.as_str(), action.as_str(), reason, now()],
        )?;
        let approvers: u32 = tx.query_row(
            "SELECT COUNT(DISTINCT reviewer) FROM release_reviews
             WHERE release_id = ?1 AND decision = 'approve'",
            [id],
            |r| r.get(0),
        )?;
        let status = r
            .status
            .after(action, approvers, required)
            .map_err(|status| StoreError::ReleaseNotHeld {
                id: id.to_owned(),
                status: status.as_str(),
            })?;
        tx.execute(
            "UPDATE releases SET status = ?2 WHERE id = ?1",
            params![id, status.as_str()],
        )?;
        let r = load_releases(&tx, "WHERE id = ?1", &[&id])?
            .pop()
            .ok_or_else(|| StoreError::UnknownRelease(id.to_owned()))?;
        self.append(&tx, event)?;
        tx.commit()?;
        Ok(r)
    }

    fn dataset_usage(&self, dataset: &str) -> Result<DatasetUsage, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        usage(&tx, dataset)
    }

    fn ledger(&self, project: &ProjectId) -> Result<Vec<LedgerEntry>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT l.id, l.project_id, l.dataset, l.user_id, l.epsilon_nanos, l.delta_femtos,
                    l.plan_hash, l.status, r.id
             FROM ledger l LEFT JOIN releases r ON r.ledger_id = l.id
             WHERE l.project_id = ?1 ORDER BY l.id",
        )?;
        let rows = stmt.query_map([project.as_str()], |r| {
            let status: String = r.get(7)?;
            let Some(status) = LedgerStatus::parse(&status) else {
                return Ok(Err(StoreError::Corrupt(format!(
                    "unknown ledger status '{status}'"
                ))));
            };
            Ok(Ok(LedgerEntry {
                id: r.get(0)?,
                project: r.get(1)?,
                dataset: r.get(2)?,
                user: r.get(3)?,
                epsilon_nanos: r.get(4)?,
                delta_femtos: r.get(5)?,
                plan_hash: r.get(6)?,
                status,
                release_id: r.get(8)?,
            }))
        })?;
        rows.map(|r| r?).collect()
    }

    fn recover_interrupted(&self) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let open: Vec<(i64, String, String, i64, i64, String)> = tx
            .prepare(
                "SELECT id, project_id, user_id, epsilon_nanos, delta_femtos, plan_hash
                 FROM ledger WHERE status = 'reserved' ORDER BY id",
            )?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        for (id, project, user, eps, delta, plan_hash) in &open {
            tx.execute(
                "UPDATE ledger SET status = 'interrupted' WHERE id = ?1",
                [id],
            )?;
            let mut e = AuditEvent::new(user, "researcher", project, "query.submit");
            e.set_outcome(tre_core::Outcome::Failed);
            e.code = tre_core::Code::ExecutionFailed.as_str().into();
            e.plan_hash = plan_hash.clone();
            e.epsilon_nanos = *eps;
            e.delta_femtos = *delta;
            e.detail = format!(
                "ledger entry {id}: the server stopped while this query ran; the charge stands and nothing was released"
            );
            self.append(&tx, &e)?;
            self.suspend_for_incident(&tx, *id, "was interrupted")?;
        }
        tx.commit()?;
        Ok(open.len())
    }

    fn revoke_token(&self, jti: &str, by: &UserId, reason: &str) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO revoked_tokens(jti, revoked_by, reason, at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(jti) DO NOTHING",
            params![jti, by.as_str(), reason, now()],
        )?;
        Ok(())
    }

    fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let conn = self.conn()?;
        Ok(conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM revoked_tokens WHERE jti = ?1)",
            [jti],
            |r| r.get(0),
        )?)
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = self.append(&tx, event)?;
        tx.commit()?;
        Ok(seq)
    }

    fn audit_events(&self, filter: &AuditFilter) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.conn()?;
        Ok(Self::read_events(&conn, filter, None)?.events)
    }

    fn audit_page(&self, filter: &AuditFilter, max_bytes: usize) -> Result<AuditPage, StoreError> {
        let conn = self.conn()?;
        Self::read_events(&conn, filter, Some(max_bytes))
    }

    fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((seq, hash)) = head else {
            return Ok(None);
        };
        // The head's checkpoint, if it is already signed.
        let existing = Self::read_checkpoints(&tx, seq - 1, seq)?.pop();
        let cp = match existing {
            Some(cp) => cp,
            None => self.sign_checkpoint(&tx, seq, &hash)?,
        };
        tx.commit()?;
        Ok(Some(cp))
    }

    fn audit_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let conn = self.conn()?;
        let events = Self::read_events(&conn, &AuditFilter::default(), None)?.events;
        let checkpoints = Self::read_checkpoints(&conn, 0, i64::MAX)?;
        Ok(interleave(events, checkpoints))
    }

    fn export_page(
        &self,
        after_seq: i64,
        through_seq: i64,
        max_bytes: usize,
    ) -> Result<ExportPage, StoreError> {
        let conn = self.conn()?;
        let filter = AuditFilter {
            after_seq: Some(after_seq),
            through_seq: Some(through_seq),
            ..Default::default()
        };
        let page = Self::read_events(&conn, &filter, Some(max_bytes))?;
        // A checkpoint beyond this page's last event belongs to a later
        // page; on the last page, to the end (its event is missing).
        let upto = match (page.more, page.events.last()) {
            (true, Some(last)) => last.seq,
            _ => through_seq,
        };
        let checkpoints = Self::read_checkpoints(&conn, after_seq, upto)?;
        Ok(ExportPage {
            entries: interleave(page.events, checkpoints),
            more: page.more,
        })
    }

    fn verify_audit(&self) -> Result<VerifyReport, StoreError> {
        Ok(chain::verify(
            &self.audit_entries()?,
            &self.notary.public_key(),
        ))
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.notary.public_key()
    }
}

/// Releases matching `clause` (parameters `params`), with their reviews.
fn load_releases(
    conn: &Connection,
    clause: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<StoredRelease>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT id, project_id, user_id, plan_hash, body, body_hash, created_at, status,
                hold_reason, manifest, review_notes FROM releases {clause}"
    ))?;
    let rows: Vec<(StoredRelease, String, String)> = stmt
        .query_map(params, |r| {
            Ok((
                StoredRelease {
                    id: r.get(0)?,
                    project: r.get(1)?,
                    user: r.get(2)?,
                    plan_hash: r.get(3)?,
                    body: r.get(4)?,
                    body_hash: r.get(5)?,
                    created_at: r.get(6)?,
                    status: ReleaseStatus::Released,
                    hold_reason: r.get(8)?,
                    manifest: r.get(9)?,
                    reviews: vec![],
                    review_notes: vec![],
                },
                r.get::<_, String>(7)?,
                r.get::<_, String>(10)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut reviews = conn.prepare(
        "SELECT reviewer, decision, reason, at FROM release_reviews WHERE release_id = ?1
         ORDER BY id",
    )?;
    rows.into_iter()
        .map(|(mut r, status, notes)| {
            r.status = ReleaseStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("bad release status '{status}'")))?;
            r.review_notes = serde_json::from_str(&notes)
                .map_err(|e| StoreError::Corrupt(format!("bad review notes: {e}")))?;
            r.reviews = reviews
                .query_map([&r.id], |x| {
                    Ok(ReleaseReview {
                        reviewer: x.get(0)?,
                        decision: x.get(1)?,
                        reason: x.get(2)?,
                        at: x.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(r)
        })
        .collect()
}

fn usage(tx: &Transaction<'_>, dataset: &str) -> Result<DatasetUsage, StoreError> {
    Ok(tx
        .query_row(
            "SELECT epsilon_nanos, delta_femtos FROM dataset_usage WHERE dataset = ?1",
            [dataset],
            |r| {
                Ok(DatasetUsage {
                    epsilon_nanos: r.get(0)?,
                    delta_femtos: r.get(1)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}
