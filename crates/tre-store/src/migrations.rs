//! Versioned schema migrations, applied in order inside one transaction and
//! recorded in SQLite's `user_version`. Never edit a released migration;
//! append a new one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: projects, ledger, releases, audit chain.
    "CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        dataset TEXT NOT NULL,
        budget_nanos INTEGER NOT NULL CHECK (budget_nanos >= 0),
        spent_nanos INTEGER NOT NULL CHECK (spent_nanos >= 0),
        created_at TEXT NOT NULL,
        CHECK (spent_nanos <= budget_nanos)
     );
     CREATE TABLE project_members (
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL,
        PRIMARY KEY (project_id, user_id)
     );
     CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id TEXT NOT NULL REFERENCES projects(id),
        charged_nanos INTEGER NOT NULL CHECK (charged_nanos > 0),
        plan_hash TEXT NOT NULL,
        at TEXT NOT NULL
     );
     CREATE TABLE releases (
        id TEXT PRIMARY KEY,
        ledger_id INTEGER NOT NULL REFERENCES ledger(id),
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL,
        sql TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL
     );
     CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        project TEXT NOT NULL,
        action TEXT NOT NULL,
        sql TEXT NOT NULL,
        outcome TEXT NOT NULL,
        code TEXT NOT NULL,
        epsilon_nanos INTEGER NOT NULL,
        release_id TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
     );",
    // 2: governance. Project lifecycle, approved datasets, the (ε, δ) ledger
    // per project and per dataset, revoked tokens, and the signed audit log
    // with checkpoints. Replaces the tables of 1, which only ever held
    // seeded projects; see `apply` for why an old audit log stops it.
    "DROP TABLE releases;
     DROP TABLE ledger;
     DROP TABLE project_members;
     DROP TABLE projects;
     DROP TABLE audit;
     CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        purpose TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('requested', 'active', 'rejected', 'suspended', 'revoked')),
        requested_by TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        requested_epsilon_nanos INTEGER NOT NULL CHECK (requested_epsilon_nanos > 0),
        requested_delta_femtos INTEGER NOT NULL CHECK (requested_delta_femtos >= 0),
        requested_end TEXT NOT NULL,
        epsilon_budget_nanos INTEGER NOT NULL DEFAULT 0,
        epsilon_spent_nanos INTEGER NOT NULL DEFAULT 0,
        delta_budget_femtos INTEGER NOT NULL DEFAULT 0,
        delta_spent_femtos INTEGER NOT NULL DEFAULT 0,
        end_date TEXT,
        CHECK (0 <= epsilon_spent_nanos AND epsilon_spent_nanos <= epsilon_budget_nanos),
        CHECK (0 <= delta_spent_femtos AND delta_spent_femtos <= delta_budget_femtos)
     );
     CREATE TABLE project_datasets (
        project_id TEXT NOT NULL REFERENCES projects(id),
        dataset TEXT NOT NULL,
        PRIMARY KEY (project_id, dataset)
     );
     CREATE TABLE project_members (
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL,
        PRIMARY KEY (project_id, user_id)
     );
     CREATE TABLE project_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id TEXT NOT NULL REFERENCES projects(id),
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        reason TEXT NOT NULL,
        epsilon_nanos INTEGER NOT NULL,
        delta_femtos INTEGER NOT NULL
     );
     CREATE TABLE dataset_usage (
        dataset TEXT PRIMARY KEY,
        epsilon_nanos INTEGER NOT NULL CHECK (epsilon_nanos >= 0),
        delta_femtos INTEGER NOT NULL CHECK (delta_femtos >= 0)
     );
     CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id TEXT NOT NULL REFERENCES projects(id),
        dataset TEXT NOT NULL,
        user_id TEXT NOT NULL,
        epsilon_nanos INTEGER NOT NULL CHECK (epsilon_nanos > 0),
        delta_femtos INTEGER NOT NULL CHECK (delta_femtos >= 0),
        plan_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'released', 'failed', 'interrupted')),
        at TEXT NOT NULL
     );
     CREATE TABLE releases (
        id TEXT PRIMARY KEY,
        ledger_id INTEGER NOT NULL UNIQUE REFERENCES ledger(id),
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        body TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
     );
     CREATE INDEX releases_by_plan ON releases(project_id, plan_hash);
     CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        revoked_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
     );
     CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        client TEXT NOT NULL,
        project TEXT NOT NULL,
        action TEXT NOT NULL,
        sql TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        epsilon_nanos INTEGER NOT NULL,
        delta_femtos INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        code TEXT NOT NULL,
        release_id TEXT NOT NULL,
        release_hash TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        sig TEXT NOT NULL
     );
     CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        at TEXT NOT NULL,
        sig TEXT NOT NULL
     );",
    // 3: the airlock and signed manifests. A release is released or held
    // for review; custodians' decisions on held releases are kept.
    "ALTER TABLE releases ADD COLUMN status TEXT NOT NULL DEFAULT 'released'
        CHECK (status IN ('released', 'held', 'rejected', 'withdrawn', 'changes_requested'));
     ALTER TABLE releases ADD COLUMN hold_reason TEXT NOT NULL DEFAULT '';
     ALTER TABLE releases ADD COLUMN manifest TEXT NOT NULL DEFAULT '';
     CREATE INDEX releases_by_status ON releases(status);
     CREATE TABLE release_reviews (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        release_id TEXT NOT NULL REFERENCES releases(id),
        reviewer TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
     );",
    // 4: findings of disclosure rules on exact values, for the reviewing
    // custodian only (a JSON array of strings; issue #10).
    "ALTER TABLE releases ADD COLUMN review_notes TEXT NOT NULL DEFAULT '[]';",
    // 5: the fingerprint of the key that signed each checkpoint (issue #11).
    "ALTER TABLE checkpoints ADD COLUMN key TEXT NOT NULL DEFAULT '';",
];

/// Why a state directory cannot be opened by this version.
pub const PRE_GOVERNANCE: &str = "this state directory holds an audit log written before signed audit events (schema 1); its events cannot be re-signed, so move the directory away and start a new one";

pub(crate) fn apply(conn: &mut Connection) -> Result<(), crate::StoreError> {
    let tx = conn.transaction()?;
    let current: usize = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    // Migration 2 drops schema 1's tables. That is only safe while they hold
    // no audit history: a log must never be silently discarded.
    if current == 1 {
        let events: i64 = tx.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?;
        if events > 0 {
            return Err(crate::StoreError::PreGovernanceState);
        }
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #12: an audit log from schema 1 stops the migration with its
    /// own variant, which the demo matches instead of searching the text.
    #[test]
    fn a_schema_1_audit_log_is_refused_by_name() {
        let mut conn = Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        conn.execute_batch(MIGRATIONS[0])
            .unwrap_or_else(|e| panic!("{e}"));
        conn.pragma_update(None, "user_version", 1)
            .unwrap_or_else(|e| panic!("{e}"));
        apply(&mut conn).unwrap_or_else(|e| panic!("an empty schema 1 migrates: {e}"));
        let mut old = Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        old.execute_batch(MIGRATIONS[0])
            .unwrap_or_else(|e| panic!("{e}"));
        old.pragma_update(None, "user_version", 1)
            .unwrap_or_else(|e| panic!("{e}"));
        old.execute(
            "INSERT INTO audit VALUES (1, 'at', 'u', 'r', 'p', 'a', '', 'allowed', '', 0, '', '', '', '')",
            [],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            apply(&mut old),
            Err(crate::StoreError::PreGovernanceState)
        ));
    }
}
