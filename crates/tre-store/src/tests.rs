use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Store::open(&dir.path().join("tre.db")).unwrap_or_else(|e| panic!("{e}"));
    (dir, s)
}

fn seed(s: &Store, budget: f64) -> ProjectId {
    let id = ProjectId::new("p1").unwrap_or_else(|e| panic!("{e}"));
    s.seed_project(&ProjectSeed {
        id: id.clone(),
        title: "t".into(),
        dataset: "nhs_epr".into(),
        budget: Epsilon::new(budget).unwrap_or_else(|e| panic!("{e}")),
        members: vec![UserId::new("alice").unwrap_or_else(|e| panic!("{e}"))],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    id
}

fn eps(v: f64) -> Epsilon {
    Epsilon::new(v).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn reservations_never_overspend() {
    let (_d, s) = store();
    let p = seed(&s, 1.0);
    // (cost, expect ok)
    for (cost, ok) in [
        (0.4, true),
        (0.4, true),
        (0.3, false),
        (0.2, true),
        (0.1, false),
    ] {
        let r = s.reserve(&p, eps(cost), "h");
        assert_eq!(r.is_ok(), ok, "cost {cost}: {r:?}");
        if !ok {
            assert!(matches!(r, Err(StoreError::BudgetExhausted { .. })));
        }
    }
    let proj = s.project(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(proj.spent_nanos, 1_000_000_000);
    assert_eq!(s.ledger_total(&p).ok(), Some(1.0));
}

#[test]
fn reseeding_keeps_the_ledger() {
    let (_d, s) = store();
    let p = seed(&s, 1.0);
    s.reserve(&p, eps(0.5), "h")
        .unwrap_or_else(|e| panic!("{e}"));
    seed(&s, 1.0);
    let proj = s.project(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(proj.remaining(), 0.5);
    assert_eq!(proj.members.len(), 1);
}

#[test]
fn audit_chain_detects_edits() {
    let (dir, s) = store();
    for i in 0..5 {
        let mut e = AuditEvent::new("alice", Some(Role::Researcher), "p1", "query.submit");
        e.sql = format!("SELECT {i}");
        s.append_audit(&e).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(s.verify_chain().ok(), Some(None));
    drop(s);
    let conn = Connection::open(dir.path().join("tre.db")).unwrap_or_else(|e| panic!("{e}"));
    conn.execute("UPDATE audit SET sql = 'SELECT 42' WHERE seq = 3", [])
        .unwrap_or_else(|e| panic!("{e}"));
    drop(conn);
    let s = Store::open(&dir.path().join("tre.db")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.verify_chain().ok(), Some(Some(3)));
}
