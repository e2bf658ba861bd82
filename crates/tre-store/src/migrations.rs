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
];

pub(crate) fn apply(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let current: usize = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()
}
