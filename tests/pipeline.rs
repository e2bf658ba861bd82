//! The release pipeline without a server (issue #12): compile → repeat →
//! admit → reserve → execute → commit → audit, called directly as an
//! endpoint would, over an in-memory store. Every path out of it (a
//! release, a repeat, a refusal, a panic before or after the charge, the
//! caller going away) leaves exactly one complete audit event and no open
//! reservation.

use std::sync::Arc;

use tre_core::{Principal, ProjectId, Role, UserId};
use tre_e2e::{engine_with, fixture, seed_projects};
use tre_query::Engine;
use tre_release::{Caller, Pipeline, Query, ReleaseError, Repeats};
use tre_store::{LedgerStatus, Notary, ProjectStatus, SqliteStore, Store, StoredEvent};

const PROJECT: &str = "p12";
const COUNT: &str = "SELECT sex, COUNT(*) AS n FROM patients p GROUP BY sex";

/// What an endpoint holds: an engine, a store (SQLite in memory), a key.
struct Desk {
    engine: Engine,
    store: SqliteStore,
    notary: Arc<dyn Notary>,
    repeats: Repeats,
    _keys: tempfile::TempDir,
}

impl Desk {
    fn new() -> Self {
        let keys = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let notary: Arc<dyn Notary> = Arc::new(
            tre_gateway::AuditNotary::load_or_create(keys.path()).unwrap_or_else(|e| panic!("{e}")),
        );
        let store = SqliteStore::open(std::path::Path::new(":memory:"), Arc::clone(&notary), 10)
            .unwrap_or_else(|e| panic!("{e}"));
        seed_projects(&store, &[(PROJECT, &["alice"], 10.0)]);
        let engine = engine_with(Arc::clone(&fixture().master)).unwrap_or_else(|e| panic!("{e}"));
        Self {
            engine,
            store,
            notary,
            repeats: Repeats::default(),
            _keys: keys,
        }
    }

    fn pipeline(&self) -> Pipeline<'_> {
        Pipeline {
            engine: &self.engine,
            store: &self.store,
            notary: &*self.notary,
            repeats: &self.repeats,
        }
    }

    fn project(&self) -> tre_store::Project {
        self.store
            .project(&ProjectId::new(PROJECT).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn submit(&self, sql: &str) -> Result<tre_release::Released, ReleaseError> {
        self.pipeline()
            .submit(&alice(), &self.project(), &query(sql))
            .await
    }

    fn ledger(&self) -> Vec<LedgerStatus> {
        self.store
            .ledger(&self.project().id)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|l| l.status)
            .collect()
    }

    fn events(&self) -> Vec<StoredEvent> {
        self.store
            .audit_events(&tre_store::AuditFilter::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter(|e| e.event.action == "query.submit")
            .collect()
    }

    fn spent(&self) -> f64 {
        self.project().spent()
    }
}

fn alice() -> Caller {
    Caller {
        who: Principal::new(
            UserId::new("alice").unwrap_or_else(|e| panic!("{e}")),
            Role::Researcher,
        ),
        client: "test".into(),
        action: "query.submit",
    }
}

fn query(sql: &str) -> Query {
    Query {
        sql: sql.to_owned(),
        epsilon: Some(0.5),
        ..Query::default()
    }
}

fn code<T>(r: &Result<T, ReleaseError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code().as_str(),
    }
}

/// (outcome, code) of each Submit event, in log order.
fn outcomes(events: &[StoredEvent]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|e| (e.event.outcome.as_str(), e.event.code.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_commits_its_charge_and_its_event_together() {
    let desk = Desk::new();
    let released = desk.submit(COUNT).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!released.repeated);
    assert_eq!(released.status, tre_store::ReleaseStatus::Released);
    assert_eq!(desk.ledger(), [LedgerStatus::Released]);
    let events = desk.events();
    assert_eq!(outcomes(&events), [("allowed", "")]);
    let e = &events[0].event;
    assert_eq!(
        (e.project.as_str(), e.sql.as_str(), e.user.as_str()),
        (PROJECT, COUNT, "alice")
    );
    assert_eq!(e.release_id, released.id);
    assert_eq!(e.epsilon_nanos, 500_000_000);
    assert!(!e.plan_hash.is_empty() && !e.release_hash.is_empty());
    assert!((desk.spent() - 0.5).abs() < 1e-9);
    assert!((released.epsilon_remaining - 9.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_query_is_the_same_release_again_for_free() {
    let desk = Desk::new();
    let first = desk.submit(COUNT).await.unwrap_or_else(|e| panic!("{e}"));
    let again = desk.submit(COUNT).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(again.repeated);
    assert_eq!(again.id, first.id);
    assert_eq!(again.release.rows, first.release.rows);
    assert_eq!(desk.ledger(), [LedgerStatus::Released], "charged once");
    let events = desk.events();
    assert_eq!(outcomes(&events), [("allowed", ""), ("allowed", "")]);
    assert!(events[1].event.detail.starts_with("repeat of release"));
    assert!((desk.spent() - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_charges_nothing_and_is_recorded() {
    let desk = Desk::new();
    let sql = "SELECT * FROM patients p";
    let r = desk.submit(sql).await;
    assert_eq!(code(&r), "TRE-Q010");
    assert!(desk.ledger().is_empty());
    let events = desk.events();
    assert_eq!(outcomes(&events), [("refused", code(&r))]);
    assert_eq!(events[0].event.sql, sql);
    assert_eq!(desk.spent(), 0.0);
}

/// A panic inside a query after its charge (issue #12): the ledger row is
/// settled, the event is complete (project, SQL, plan, cost, the panic),
/// and the project is suspended as for any incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_after_the_charge_settles_it_with_a_complete_event() {
    let desk = Desk::new();
    let sql = format!("{COUNT} /*tre-fault:charged*/");
    let r = desk.submit(&sql).await;
    assert_eq!(code(&r), "TRE-I001");
    assert!(matches!(r, Err(ReleaseError::Fault(_))));
    assert_eq!(
        desk.ledger(),
        [LedgerStatus::Failed],
        "settled, not reserved"
    );
    let events = desk.events();
    assert_eq!(outcomes(&events), [("failed", "TRE-I001")]);
    let e = &events[0].event;
    assert_eq!(
        (e.project.as_str(), e.sql.as_str()),
        (PROJECT, sql.as_str())
    );
    assert!(!e.plan_hash.is_empty());
    assert_eq!(e.epsilon_nanos, 500_000_000);
    assert!(e.detail.contains("injected fault"), "{}", e.detail);
    assert!((desk.spent() - 0.5).abs() < 1e-9, "the charge stands");
    assert_eq!(desk.project().status, ProjectStatus::Suspended);
}

/// A panic before the charge (while compiling) charges nothing and is
/// still one event naming the query (issue #12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_charge_charges_nothing() {
    let desk = Desk::new();
    let sql = format!("{COUNT} /*tre-fault:compile*/");
    let r = desk.submit(&sql).await;
    assert_eq!(code(&r), "TRE-I001");
    assert!(desk.ledger().is_empty());
    let events = desk.events();
    assert_eq!(outcomes(&events), [("refused", "TRE-I001")]);
    assert_eq!(events[0].event.sql, sql);
    assert_eq!(desk.project().status, ProjectStatus::Active);
}

/// The caller goes away after the charge: dropping the pipeline's future
/// settles the reservation as cancelled (the charge stands, no
/// suspension) with one event (issue #12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_going_away_after_the_charge_settles_it_as_cancelled() {
    let desk = Desk::new();
    let sql = format!("{COUNT} /*tre-fault:stall*/");
    {
        let submit = desk.submit(&sql);
        tokio::pin!(submit);
        // Drive the query until it is charged; it then stalls for ever.
        loop {
            tokio::select! {
                r = &mut submit => panic!("a stalled query finished: {}", code(&r)),
                () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
            if desk.ledger() == [LedgerStatus::Reserved] {
                break;
            }
        }
    }
    assert_eq!(desk.ledger(), [LedgerStatus::Failed], "settled on drop");
    let events = desk.events();
    assert_eq!(outcomes(&events), [("cancelled", "TRE-S002")]);
    assert_eq!(events[0].event.sql, sql);
    assert_eq!(events[0].event.epsilon_nanos, 500_000_000);
    assert!((desk.spent() - 0.5).abs() < 1e-9);
    assert_eq!(desk.project().status, ProjectStatus::Active);
}
