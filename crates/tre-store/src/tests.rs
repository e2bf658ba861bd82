use std::sync::Arc;

use chrono::{Days, NaiveDate};
use rand::{Rng, SeedableRng};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rusqlite::Connection;
use tre_core::{Code, Delta, Epsilon, ProjectId, UserId};

use crate::chain::{self, Entry};
use crate::*;

struct TestNotary(Ed25519KeyPair);

impl Notary for TestNotary {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).as_ref().to_vec()
    }
    fn public_key(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
}

fn notary(seed: u8) -> Arc<dyn Notary> {
    Arc::new(TestNotary(
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap_or_else(|e| panic!("{e}")),
    ))
}

fn open(dir: &tempfile::TempDir, every: u32) -> SqliteStore {
    SqliteStore::open(&dir.path().join("tre.db"), notary(7), every)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&dir, 10);
    (dir, s)
}

/// An audit event for decisions made in these tests.
fn ev() -> AuditEvent {
    AuditEvent::new("carol", "custodian", "p", "test.decision")
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn pid(s: &str) -> ProjectId {
    ok(ProjectId::new(s))
}
fn uid(s: &str) -> UserId {
    ok(UserId::new(s))
}
fn eps(v: f64) -> Epsilon {
    ok(Epsilon::new(v))
}
fn delta(v: f64) -> Delta {
    ok(Delta::new(v))
}
fn in_days(n: u64) -> NaiveDate {
    today()
        .checked_add_days(Days::new(n))
        .unwrap_or_else(|| unreachable!())
}

fn seed(s: &SqliteStore, id: &str, budget: f64, delta_budget: f64) -> ProjectId {
    let id = pid(id);
    ok(s.seed_project(&ProjectSeed {
        id: id.clone(),
        title: "t".into(),
        dataset: "nhs_epr".into(),
        epsilon: eps(budget),
        delta: Delta::new(delta_budget).unwrap_or(Delta::ZERO),
        members: vec![uid("alice")],
        end_date: in_days(30),
    }));
    id
}

fn charge<'a>(
    p: &'a ProjectId,
    user: &'a UserId,
    e: f64,
    d: f64,
    lifetime: &'a [Lifetime<'a>],
) -> Charge<'a> {
    Charge {
        project: p,
        datasets: lifetime,
        user,
        epsilon: eps(e),
        delta: Delta::new(d).unwrap_or(Delta::ZERO),
        plan_hash: "h",
        today: today(),
    }
}

/// The lifetime caps of `nhs_epr`, as one dataset a charge reads.
fn nhs_epr(lifetime: f64) -> [Lifetime<'static>; 1] {
    [Lifetime {
        dataset: "nhs_epr",
        epsilon: eps(lifetime),
        delta: delta(1e-4),
    }]
}

#[test]
fn reservations_never_overspend_epsilon_delta_or_the_dataset_lifetime() {
    let (_d, s) = store();
    let a = seed(&s, "a", 1.0, 1e-6);
    let b = seed(&s, "b", 1.0, 0.0);
    let alice = uid("alice");
    // (project, epsilon, delta, expected error code)
    let cases: &[(&ProjectId, f64, f64, Option<Code>)] = &[
        (&a, 0.4, 0.0, None),
        (&a, 0.4, 6e-7, None),
        (&a, 0.3, 0.0, Some(Code::BudgetExhausted)),
        (&a, 0.1, 6e-7, Some(Code::DeltaBudgetExhausted)),
        (&a, 0.2, 4e-7, None),
        (&a, 0.1, 0.0, Some(Code::BudgetExhausted)),
        // The dataset's lifetime cap is 1.5 across projects: a has spent 1.0.
        (&b, 0.5, 0.0, None),
        (&b, 0.1, 0.0, Some(Code::DatasetLifetimeExhausted)),
    ];
    let caps = nhs_epr(1.5);
    for (p, e, d, want) in cases {
        let r = s.reserve(&charge(p, &alice, *e, *d, &caps));
        assert_eq!(
            r.as_ref().err().map(StoreError::code),
            *want,
            "{p} {e} {d}: {r:?}"
        );
    }
    let pa = ok(s.project(&a));
    assert_eq!(pa.epsilon_spent_nanos, 1_000_000_000);
    assert_eq!(pa.delta_spent_femtos, 1_000_000_000);
    let ledger_sum: i64 = ok(s.ledger(&a)).iter().map(|l| l.epsilon_nanos).sum();
    assert_eq!(ledger_sum, pa.epsilon_spent_nanos);
    assert_eq!(ok(s.dataset_usage("nhs_epr")).epsilon_nanos, 1_500_000_000);
}

#[test]
fn only_active_unexpired_projects_on_approved_datasets_can_spend() {
    let (_d, s) = store();
    let p = seed(&s, "p", 5.0, 0.0);
    let alice = uid("alice");
    let carol = uid("carol");
    let caps = nhs_epr(100.0);
    let other = [Lifetime {
        dataset: "other",
        ..caps[0]
    }];
    let mut c = charge(&p, &alice, 0.1, 0.0, &caps);
    c.datasets = &other;
    assert_eq!(
        s.reserve(&c).err().map(|e| e.code()),
        Some(Code::DatasetNotApproved)
    );
    let mut c = charge(&p, &alice, 0.1, 0.0, &caps);
    c.today = in_days(31);
    assert_eq!(
        s.reserve(&c).err().map(|e| e.code()),
        Some(Code::ProjectExpired)
    );
    ok(s.decide(&p, &Decision::Suspend, &carol, "ethics query", &ev()));
    assert_eq!(
        s.reserve(&charge(&p, &alice, 0.1, 0.0, &caps))
            .err()
            .map(|e| e.code()),
        Some(Code::ProjectNotActive)
    );
    ok(s.decide(&p, &Decision::Resume, &carol, "resolved", &ev()));
    ok(s.reserve(&charge(&p, &alice, 0.1, 0.0, &caps)));
}

#[test]
fn project_lifecycle_follows_its_state_machine() {
    let (_d, s) = store();
    let carol = uid("carol");
    let request = |id: &str| ProjectRequest {
        id: pid(id),
        title: "Waits and deprivation".into(),
        purpose: "Do people in poorer areas wait longer for treatment?".into(),
        datasets: vec!["nhs_epr".into()],
        epsilon: eps(5.0),
        delta: delta(1e-6),
        members: vec![uid("alice"), uid("bob")],
        end_date: in_days(90),
        requested_by: uid("alice"),
    };
    let p = ok(s.request_project(&request("w1"), today()));
    assert_eq!(p.status, ProjectStatus::Requested);
    assert_eq!(p.epsilon_budget_nanos, 0);
    assert_eq!(
        s.request_project(&request("w1"), today())
            .err()
            .map(|e| e.code()),
        Some(Code::ProjectExists)
    );
    let approve = |e: f64| Decision::Approve {
        epsilon: eps(e),
        delta: delta(1e-7),
        end_date: in_days(60),
    };
    // (decision, expected status afterwards or error)
    let steps: Vec<(Decision, Result<ProjectStatus, Code>)> = vec![
        (Decision::Resume, Err(Code::InvalidTransition)),
        (approve(6.0), Err(Code::InvalidProjectRequest)),
        (approve(4.0), Ok(ProjectStatus::Active)),
        (approve(4.0), Err(Code::InvalidTransition)),
        (Decision::Suspend, Ok(ProjectStatus::Suspended)),
        (
            Decision::TopUp {
                epsilon: eps(1.5),
                delta: Delta::ZERO,
            },
            Ok(ProjectStatus::Suspended),
        ),
        (Decision::Resume, Ok(ProjectStatus::Active)),
        (Decision::Reject, Err(Code::InvalidTransition)),
        (Decision::Revoke, Ok(ProjectStatus::Revoked)),
        (Decision::Resume, Err(Code::InvalidTransition)),
        (
            Decision::TopUp {
                epsilon: eps(1.0),
                delta: Delta::ZERO,
            },
            Err(Code::InvalidTransition),
        ),
    ];
    for (d, want) in steps {
        let got = s
            .decide(&pid("w1"), &d, &carol, "because", &ev())
            .map(|p| p.status);
        assert_eq!(got.map_err(|e| e.code()), want, "{d:?}");
    }
    // Each decision commits with its audit event; a refused one leaves none.
    let decided = ok(s.audit_events(&AuditFilter {
        action: Some("test.decision".into()),
        ..AuditFilter::default()
    }));
    assert_eq!(decided.len(), 5);
    let p = ok(s.project(&pid("w1")));
    assert_eq!(p.epsilon_budget_nanos, 5_500_000_000);
    assert_eq!(p.end_date, Some(in_days(60)));
    let actions: Vec<&str> = p.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "request", "approve", "suspend", "top up", "resume", "revoke"
        ]
    );
    ok(s.request_project(&request("w2"), today()));
    ok(s.decide(
        &pid("w2"),
        &Decision::Reject,
        &carol,
        "no ethics approval",
        &ev(),
    ));
    assert_eq!(ok(s.project(&pid("w2"))).status, ProjectStatus::Rejected);
    let mut late = request("w3");
    late.end_date = today().pred_opt().unwrap_or_else(|| unreachable!());
    assert_eq!(
        s.request_project(&late, today()).err().map(|e| e.code()),
        Some(Code::InvalidProjectRequest)
    );
}

#[test]
fn interrupted_reservations_keep_their_charge_and_are_audited() {
    let (dir, s) = store();
    let p = seed(&s, "p", 5.0, 0.0);
    let alice = uid("alice");
    let caps = nhs_epr(100.0);
    let r = ok(s.reserve(&charge(&p, &alice, 0.5, 0.0, &caps)));
    drop(s);
    // As after kill -9: reopen and recover.
    let s = open(&dir, 10);
    assert_eq!(ok(s.recover_interrupted()), 1);
    assert_eq!(ok(s.recover_interrupted()), 0);
    let ledger = ok(s.ledger(&p));
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].id, r.ledger_id);
    assert_eq!(ledger[0].status, LedgerStatus::Interrupted);
    assert_eq!(ok(s.project(&p)).epsilon_spent_nanos, 500_000_000);
    let events = ok(s.audit_events(&AuditFilter {
        outcome: Some(tre_core::Outcome::Failed),
        ..AuditFilter::default()
    }));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.epsilon_nanos, 500_000_000);
    assert!(ok(s.verify_audit()).is_intact());
}

fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        ["alice", "bob", "carol"][i % 3],
        "researcher",
        "p1",
        ["query.submit", "query.dry_run", "budget.show"][i % 3],
    );
    e.sql = format!("SELECT sex, COUNT(*) FROM patients WHERE year_of_birth > {i} GROUP BY sex");
    e.set_outcome(if i.is_multiple_of(4) {
        tre_core::Outcome::Refused
    } else {
        tre_core::Outcome::Allowed
    });
    e.epsilon_nanos = (i as i64) * 1_000_000;
    e.client = "127.0.0.1:5000".into();
    e
}

fn log_with(s: &SqliteStore, n: usize) {
    for i in 0..n {
        ok(s.append_audit(&event(i)));
    }
}

fn time(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&chrono::Utc)
}

#[test]
fn audit_filter_and_checkpoints() {
    let (_d, s) = store();
    log_with(&s, 25);
    let bob = ok(s.audit_events(&AuditFilter {
        user: Some("bob".into()),
        ..AuditFilter::default()
    }));
    assert_eq!(bob.len(), 8);
    assert!(bob.iter().all(|e| e.event.user == "bob"));
    let refused_submits = ok(s.audit_events(&AuditFilter {
        action: Some("query.submit".into()),
        outcome: Some(tre_core::Outcome::Refused),
        ..AuditFilter::default()
    }));
    // i ≡ 0 (mod 3) and i ≡ 0 (mod 4): 0, 12, 24.
    assert_eq!(refused_submits.len(), 3);
    assert_eq!(
        ok(s.audit_events(&AuditFilter {
            since: Some(time("2000-01-01T00:00:00Z")),
            until: Some(time("2001-01-01T00:00:00Z")),
            ..AuditFilter::default()
        }))
        .len(),
        0
    );
    // Times compare as instants, not text (issue #11): the first event's
    // own time written with a +05:00 offset, and boundaries half a
    // millisecond either side of it.
    let first = ok(s.audit_events(&AuditFilter::default()))[0]
        .event
        .at
        .clone();
    let at = time(&first);
    let offset = at
        .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600).unwrap_or_else(|| unreachable!()))
        .to_rfc3339();
    assert!(offset.contains("+05:00"), "{offset}");
    let half_ms = chrono::TimeDelta::microseconds(500);
    let seqs = |since: chrono::DateTime<chrono::Utc>, until: chrono::DateTime<chrono::Utc>| {
        ok(s.audit_events(&AuditFilter {
            since: Some(since),
            until: Some(until),
            ..AuditFilter::default()
        }))
        .iter()
        .filter(|e| e.event.at == first)
        .count()
    };
    let all_at_first = seqs(at, at + half_ms);
    assert!(all_at_first >= 1);
    assert_eq!(
        seqs(time(&offset), at + half_ms),
        all_at_first,
        "offset since"
    );
    assert_eq!(
        seqs(at - half_ms, at + half_ms),
        all_at_first,
        "sub-ms since"
    );
    assert_eq!(
        seqs(at + half_ms, at + half_ms * 4),
        0,
        "since after the event"
    );
    assert_eq!(seqs(at - half_ms * 2, at), 0, "until is exclusive");
    let report = ok(s.verify_audit());
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.checkpointed_through, 20);
    let cp = ok(s.checkpoint()).unwrap_or_else(|| unreachable!());
    assert_eq!(cp.seq, 25);
    let report = ok(s.verify_audit());
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.checkpointed_through, 25);
}

/// Issue #4: random tampering of an exported log is always detected, at or
/// before the first position that was changed.
#[test]
fn random_tampering_of_an_export_is_always_detected() {
    let (_d, s) = store();
    log_with(&s, 60);
    ok(s.checkpoint());
    let text = ok(chain::to_jsonl(&ok(s.audit_entries())));
    let pk = s.audit_public_key();
    let clean = chain::verify_jsonl(&text, &pk);
    assert!(clean.is_intact(), "{clean:?}");
    assert_eq!((clean.events, clean.checkpoints), (60, 6));
    // Regression (issue #4): upper-casing a hex letter of a signature keeps
    // its bytes but changes the file; it must be caught.
    let first_event = text.lines().next().unwrap_or_default();
    let sig_at = first_event
        .find("\"sig\":\"")
        .unwrap_or_else(|| unreachable!())
        + 7;
    let letter = first_event[sig_at..]
        .find(|c: char| c.is_ascii_lowercase())
        .unwrap_or_else(|| unreachable!())
        + sig_at;
    let mut upper = first_event.to_owned();
    upper.replace_range(
        letter..=letter,
        &first_event[letter..=letter].to_uppercase(),
    );
    let recased = text.replacen(first_event, &upper, 1);
    assert_eq!(
        chain::verify_jsonl(&recased, &s.audit_public_key())
            .first_bad
            .map(|t| t.position),
        Some(1)
    );
    // The wrong public key verifies nothing.
    assert!(!chain::verify_jsonl(&text, &notary(9).public_key()).is_intact());

    let lines: Vec<&str> = text.lines().collect();
    let event_lines: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with(r#"{"kind":"event""#))
        .collect();
    let forger = notary(9);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut tried = [0usize; 5];
    for trial in 0..1_000 {
        let mut t: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let kind = trial % 5;
        // The first changed line (0-based).
        let first = match kind {
            0 => {
                // Change one byte to another printable byte.
                let i = rng.random_range(0..t.len());
                let mut bytes = t[i].clone().into_bytes();
                let j = rng.random_range(0..bytes.len());
                let mut b = rng.random_range(0x20u8..0x7f);
                while b == bytes[j] {
                    b = rng.random_range(0x20u8..0x7f);
                }
                bytes[j] = b;
                t[i] = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{e}"));
                i
            }
            1 => {
                let i = event_lines[rng.random_range(0..event_lines.len())];
                t.remove(i);
                i
            }
            2 => {
                let i = event_lines[rng.random_range(0..event_lines.len())];
                let mut j = event_lines[rng.random_range(0..event_lines.len())];
                while j == i {
                    j = event_lines[rng.random_range(0..event_lines.len())];
                }
                t.swap(i, j);
                i.min(j)
            }
            3 | 4 => {
                // Insert (3) or append (4) a well-formed event that chains
                // correctly but is signed with someone else's key.
                let at = if kind == 3 {
                    event_lines[rng.random_range(0..event_lines.len())]
                } else {
                    t.len()
                };
                let (seq, prev) = lines[..at]
                    .iter()
                    .rev()
                    .find_map(|l| match serde_json::from_str::<Entry>(l) {
                        Ok(Entry::Event(e)) => Some((e.seq + 1, e.hash)),
                        _ => None,
                    })
                    .unwrap_or((1, chain::GENESIS.to_owned()));
                let mut ev = event(7);
                ev.sql = "SELECT 'forged'".into();
                let hash = chain::event_hash(&prev, seq, &ev);
                let forged = Entry::Event(Box::new(StoredEvent {
                    seq,
                    prev_hash: prev,
                    sig: hex::encode(forger.sign(&chain::event_message(&hash))),
                    hash,
                    event: ev,
                }));
                t.insert(at, ok(serde_json::to_string(&forged)));
                at
            }
            _ => unreachable!(),
        };
        tried[kind] += 1;
        let r = chain::verify_jsonl(&(t.join("\n") + "\n"), &pk);
        let bad = r
            .first_bad
            .unwrap_or_else(|| panic!("trial {trial} (kind {kind}) at line {first} not detected"));
        assert_eq!(
            bad.position,
            first + 1,
            "trial {trial}: changed line {} but first bad is {bad:?}",
            first + 1
        );
    }
    assert_eq!(tried, [200; 5]);
}

/// Issue #4: tampering with the stored log itself (not an export).
#[test]
fn tampering_with_the_database_is_detected_at_its_position() {
    let (dir, s) = store();
    log_with(&s, 30);
    ok(s.checkpoint());
    drop(s);
    let db = dir.path().join("tre.db");
    // (SQL run against the stored log, first bad entry position)
    // Positions count entries: events 1–10, checkpoint 10 at 11, ...
    let cases = [
        ("UPDATE audit SET sql = 'SELECT 1' WHERE seq = 5", 5),
        ("UPDATE audit SET epsilon_nanos = 0 WHERE seq = 12", 13),
        ("DELETE FROM audit WHERE seq = 7", 7),
        // The checkpoint of event 30 now points past the end.
        ("DELETE FROM audit WHERE seq = 30", 32),
        (
            "UPDATE audit SET seq = -4 WHERE seq = 4;
             UPDATE audit SET seq = 4 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = -4;",
            3,
        ),
        ("UPDATE checkpoints SET at = '2020-01-01T00:00:00.000Z' WHERE seq = 20", 22),
        (
            "INSERT INTO audit SELECT 31, at, user_id, role, client, project, action, sql, plan_hash,
                epsilon_nanos, delta_femtos, outcome, code, release_id, release_hash, detail,
                hash, hash, sig FROM audit WHERE seq = 30",
            34,
        ),
    ];
    let pristine = ok(std::fs::read(&db));
    for (sql, position) in cases {
        ok(std::fs::write(&db, &pristine));
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("tre.db{ext}")));
        }
        let conn = ok(Connection::open(&db));
        ok(conn.execute_batch(sql));
        drop(conn);
        let s = open(&dir, 10);
        let report = ok(s.verify_audit());
        let bad = report
            .first_bad
            .unwrap_or_else(|| panic!("not detected: {sql}"));
        assert_eq!(bad.position, position, "{sql}: {bad:?}");
    }
}

/// Issue #4: random tampering of the stored log (change a field, drop an
/// event, swap two, append a forged one) is always detected.
#[test]
fn random_tampering_of_the_database_is_always_detected() {
    let (dir, s) = store();
    log_with(&s, 40);
    ok(s.checkpoint());
    let last = ok(s.audit_events(&AuditFilter::default()))
        .pop()
        .unwrap_or_else(|| unreachable!());
    drop(s);
    let db = dir.path().join("tre.db");
    let pristine = ok(std::fs::read(&db));
    let columns = [
        "at",
        "user_id",
        "role",
        "client",
        "project",
        "action",
        "sql",
        "plan_hash",
        "outcome",
        "code",
        "release_id",
        "release_hash",
        "detail",
        "prev_hash",
        "hash",
        "sig",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(44);
    for trial in 0..200 {
        ok(std::fs::write(&db, &pristine));
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("tre.db{ext}")));
        }
        let conn = ok(Connection::open(&db));
        let seq = rng.random_range(1..=40);
        let sql = match trial % 4 {
            0 => {
                let col = columns[rng.random_range(0..columns.len())];
                // Change the last character of the field (or add one if empty).
                format!(
                    "UPDATE audit SET {col} = CASE WHEN {col} = '' THEN 'x'
                       ELSE substr({col}, 1, length({col}) - 1) ||
                            CASE WHEN substr({col}, -1) = 'a' THEN 'b' ELSE 'a' END END
                     WHERE seq = {seq}"
                )
            }
            1 => format!("DELETE FROM audit WHERE seq = {seq}"),
            2 => {
                let other = if seq == 40 { 1 } else { seq + 1 };
                format!(
                    "UPDATE audit SET seq = -1 WHERE seq = {seq};
                     UPDATE audit SET seq = {seq} WHERE seq = {other};
                     UPDATE audit SET seq = {other} WHERE seq = -1;"
                )
            }
            _ => {
                // A forged event chained correctly after the last one, with
                // a copied signature.
                let prev = &last.hash;
                let mut forged = last.event.clone();
                forged.sql = "SELECT 'forged'".into();
                let hash = chain::event_hash(prev, 41, &forged);
                format!(
                    "INSERT INTO audit SELECT 41, at, user_id, role, client, project, action,
                        'SELECT ''forged''', plan_hash, epsilon_nanos, delta_femtos, outcome, code,
                        release_id, release_hash, detail, '{prev}', '{hash}', sig
                     FROM audit WHERE seq = 40"
                )
            }
        };
        ok(conn.execute_batch(&sql));
        drop(conn);
        let s = open(&dir, 10);
        let report = ok(s.verify_audit());
        assert!(
            report.first_bad.is_some(),
            "trial {trial} not detected: {sql}"
        );
    }
}

#[test]
fn revoked_tokens_are_remembered() {
    let (_d, s) = store();
    assert!(!ok(s.is_revoked("abc")));
    ok(s.revoke_token("abc", &uid("root"), "lost laptop"));
    ok(s.revoke_token("abc", &uid("root"), "again"));
    assert!(ok(s.is_revoked("abc")));
}

fn held(s: &SqliteStore, p: &ProjectId, id: &str) {
    let alice = uid("alice");
    let caps = nhs_epr(100.0);
    let r = ok(s.reserve(&charge(p, &alice, 0.1, 0.0, &caps)));
    ok(s.commit_release(
        r.ledger_id,
        &StoredRelease {
            id: id.into(),
            project: p.to_string(),
            user: "alice".into(),
            plan_hash: id.into(),
            body: "{}".into(),
            body_hash: chain::sha256_hex(b"{}"),
            created_at: now(),
            status: ReleaseStatus::Held,
            hold_reason: "a cell was suppressed".into(),
            manifest: String::new(),
            reviews: vec![],
            review_notes: vec![],
        },
        &AuditEvent::new("alice", "researcher", p.as_str(), "query.submit"),
    ));
}

/// Issue #5: the airlock. Two approvals must come from two custodians;
/// only a held release can be decided on.
#[test]
fn held_releases_need_distinct_approvals() {
    let (_d, s) = store();
    let p = seed(&s, "p", 5.0, 0.0);
    let (carol, dan) = (uid("carol"), uid("dan"));
    for id in ["a", "b", "c", "d"] {
        held(&s, &p, id);
    }
    // (release, action, by, required approvals, status afterwards or error)
    type Step<'a> = (
        &'a str,
        ReviewAction,
        &'a UserId,
        u8,
        Result<ReleaseStatus, Code>,
    );
    let steps: &[Step] = &[
        (
            "a",
            ReviewAction::Approve,
            &carol,
            2,
            Ok(ReleaseStatus::Held),
        ),
        (
            "a",
            ReviewAction::Approve,
            &carol,
            2,
            Ok(ReleaseStatus::Held),
        ),
        (
            "a",
            ReviewAction::Approve,
            &dan,
            2,
            Ok(ReleaseStatus::Released),
        ),
        (
            "a",
            ReviewAction::Reject,
            &dan,
            2,
            Err(Code::ReleaseNotHeld),
        ),
        (
            "b",
            ReviewAction::Approve,
            &carol,
            1,
            Ok(ReleaseStatus::Released),
        ),
        (
            "c",
            ReviewAction::RequestChanges,
            &carol,
            1,
            Ok(ReleaseStatus::ChangesRequested),
        ),
        (
            "c",
            ReviewAction::Approve,
            &dan,
            1,
            Err(Code::ReleaseNotHeld),
        ),
        (
            "d",
            ReviewAction::Withdraw,
            &carol,
            1,
            Ok(ReleaseStatus::Withdrawn),
        ),
        (
            "zz",
            ReviewAction::Approve,
            &carol,
            1,
            Err(Code::UnknownRelease),
        ),
    ];
    for (id, action, by, required, want) in steps {
        let got = s.review_release(id, *action, by, "because", *required, &ev());
        assert_eq!(
            got.map(|r| r.status).map_err(|e| e.code()),
            *want,
            "{id} {action:?}"
        );
    }
    let a = ok(s.release("a")).unwrap_or_else(|| unreachable!());
    assert_eq!(a.reviews.len(), 3);
    assert_eq!(
        ok(s.releases(Some("p"), Some(ReleaseStatus::Released))).len(),
        2
    );
    assert_eq!(ok(s.releases(None, Some(ReleaseStatus::Held))).len(), 0);
}

/// Issue #5: a signed manifest verifies against its table and fails on any
/// change to the table, the epsilon or the SQL.
#[test]
fn manifests_fail_on_any_change() {
    use crate::manifest::{CellCounts, FORMAT, Manifest, SignedManifest};
    let table = br#"{"rows":[[{"type":"key","value":"F"},{"type":"value","value":1510.0}]]}"#;
    let signed = ok(Manifest {
        format: FORMAT.into(),
        release_id: "r1".into(),
        project: "p".into(),
        user: "alice".into(),
        created_at: now(),
        sql: "SELECT sex, COUNT(*) FROM patients GROUP BY sex".into(),
        plan_hash: "ab".repeat(32),
        dataset: "nhs_epr".into(),
        policy_sha256: "cd".repeat(32),
        sdc_profile: "nhs_sde".into(),
        sdc_profile_sha256: "ef".repeat(32),
        dataset_snapshot_sha256: "01".repeat(32),
        epsilon_nanos: 500_000_000,
        delta_femtos: 0,
        columns: vec![],
        cells: CellCounts {
            released: 0,
            rounded: 2,
            suppressed: 0,
        },
        cell_outcomes: vec!["rounded: rounded to base 5 (nhs_sde)".into(); 2],
        sdc_outcome: "pass".into(),
        exact_rules_applied: false,
        engine_version: "tre 0.1.0".into(),
        table_sha256: chain::sha256_hex(table),
    }
    .sign(&*notary(7)));
    let pk = notary(7).public_key();
    assert_eq!(signed.verify(table, &pk), Ok(()));
    let json = ok(serde_json::to_string(&signed));
    // (what changed, manifest JSON, table)
    let changed_table = String::from_utf8_lossy(table).replace("1510.0", "1515.0");
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("a cell", json.clone(), changed_table.into_bytes()),
        (
            "the epsilon",
            json.replace("\"epsilon_nanos\":500000000", "\"epsilon_nanos\":50000000"),
            table.to_vec(),
        ),
        (
            "the SQL",
            json.replace("GROUP BY sex", "GROUP BY sex, region"),
            table.to_vec(),
        ),
        (
            "the outcome",
            json.replace("\"sdc_outcome\":\"pass\"", "\"sdc_outcome\":\"fail\""),
            table.to_vec(),
        ),
    ];
    for (what, m, t) in cases {
        assert!(m != json || t != table, "{what}: no change made");
        let m: SignedManifest = ok(serde_json::from_str(&m));
        assert!(m.verify(&t, &pk).is_err(), "{what}");
    }
    assert!(
        signed.verify(table, &notary(9).public_key()).is_err(),
        "another key"
    );
}

/// The form an event is hashed in is a format that offline verifiers
/// re-implement, so it is pinned (issue #12): serde_json's compact output
/// of `AuditEvent`, fields in declaration order, ε and δ as integer ledger
/// units. Reordering or renaming a field breaks every stored chain; this
/// test fails first.
#[test]
fn the_hashed_form_of_an_event_is_pinned() {
    let mut e = AuditEvent::new("alice", "researcher", "p1", "query.submit");
    e.at = "2026-12-02T10:00:00.000Z".into();
    e.client = "127.0.0.1:5000".into();
    e.sql = "SELECT COUNT(*) FROM patients".into();
    e.plan_hash = "ab".into();
    e.epsilon_nanos = 500_000_000;
    e.set_outcome(tre_core::Outcome::Allowed);
    e.release_id = "r1".into();
    assert_eq!(
        ok(serde_json::to_string(&e)),
        r#"{"at":"2026-12-02T10:00:00.000Z","user":"alice","role":"researcher","client":"127.0.0.1:5000","project":"p1","action":"query.submit","sql":"SELECT COUNT(*) FROM patients","plan_hash":"ab","epsilon_nanos":500000000,"delta_femtos":0,"outcome":"allowed","code":"","release_id":"r1","release_hash":"","detail":""}"#
    );
    assert_eq!(
        chain::event_hash("", 1, &e),
        chain::event_hash("", 1, &e.clone()),
        "deterministic"
    );
}
