//! The release pipeline, free of any transport: compile → (repeat) →
//! admit → reserve → execute → sign → commit → audit, for whichever
//! endpoint carried the query (gRPC today, Flight SQL next). Each endpoint
//! authenticates and authorises its caller, parses its request into a
//! [`Query`], calls [`Pipeline::submit`] and converts the [`Released`]
//! answer; none of them reserves, settles or audits a query itself.
//!
//! The call's one audit event and the reservation it may hold live in a
//! guard (`record.rs`) that settles both on every path: a returned error,
//! a panic (caught, `TRE-I001`, the charge settled as an incident) and the
//! future being dropped because the client went away (`TRE-S002`, the
//! charge stands, no suspension).
//!
//! Must never depend on tonic, hyper, the proto types (`tre-proto`) or
//! `tre-gateway`: that is what lets it be tested without a server
//! (`tests/pipeline.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use tre_core::{Code, Principal};
use tre_query::{Cell, CellStatus, Engine, PrivatePlan, QueryError, Release};
use tre_store::manifest::{CellCounts, Manifest, ManifestColumn};
use tre_store::{
    Charge, Lifetime, Notary, Project, ReleaseStatus, Store, StoreError, StoredRelease, chain,
};

mod record;

use record::Record;

/// What a caller who went away is told, by the pipeline and by the gateway
/// alike.
pub const CANCELLED: &str = "the call was cancelled by the client before it finished; anything charged stays charged and any release can be fetched with `tre release list`";

/// What went wrong in the pipeline. A refusal (`Query`, `Store`) is the
/// caller's to act on; `Cancelled` is the caller going away; a `Fault` is
/// the server's and is shown only as `TRE-I001`.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller went away (the pipeline's future was dropped) before
    /// the query finished.
    #[error("{code} {CANCELLED}", code = self.code())]
    Cancelled,
    #[error(transparent)]
    Fault(#[from] Fault),
}

/// The pipeline's own failures, by name: never the caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// A release or its manifest could not be written as JSON.
    #[error("{code} cannot encode a release as JSON: {0}", code = self.code())]
    Json(#[from] serde_json::Error),
    /// A stored release body no longer parses: the store is damaged.
    #[error("{code} stored release {id} is unreadable: {source}", code = self.code())]
    StoredRelease {
        id: String,
        source: serde_json::Error,
    },
    #[error("{code} cannot sign a release manifest: {0}", code = self.code())]
    Signing(String),
    #[error("{code} the {0} lock is poisoned", code = self.code())]
    Poisoned(&'static str),
    /// A bug: the pipeline panicked. The message goes to the audit log.
    #[error("{code} internal error: the query panicked: {0}", code = self.code())]
    Panicked(String),
    /// A bug: a reservation was left neither committed nor failed.
    #[error("{code} internal error: a reservation ended without a release", code = self.code())]
    Unsettled,
}

impl Fault {
    /// Every fault is the server's: the caller sees only `TRE-I001`.
    pub fn code(&self) -> Code {
        match self {
            Fault::Json(_)
            | Fault::StoredRelease { .. }
            | Fault::Signing(_)
            | Fault::Poisoned(_)
            | Fault::Panicked(_)
            | Fault::Unsettled => Code::Internal,
        }
    }
}

impl ReleaseError {
    /// The stable code, written once: the message's prefix comes from here.
    pub fn code(&self) -> Code {
        match self {
            ReleaseError::Query(e) => e.code(),
            ReleaseError::Store(e) => e.code(),
            ReleaseError::Cancelled => Code::Cancelled,
            ReleaseError::Fault(f) => f.code(),
        }
    }

    /// Whether the caller sees only a generic text. Exhaustive, so a new
    /// variant must decide (issue #12).
    pub fn is_internal(&self) -> bool {
        match self {
            ReleaseError::Query(e) => e.is_internal(),
            ReleaseError::Store(e) => e.is_internal(),
            ReleaseError::Cancelled => false,
            ReleaseError::Fault(_) => true,
        }
    }

    /// What the audit event records: the engine's own words for a failed
    /// execution (never shown to the researcher), else the message.
    fn audit_detail(&self) -> String {
        match self {
            ReleaseError::Query(QueryError::Execution { detail }) => detail.clone(),
            other => other.to_string(),
        }
    }
}

/// Who is calling, from where, through which call: what every audit
/// event names.
#[derive(Debug, Clone)]
pub struct Caller {
    pub who: Principal,
    /// The caller's network address (and certificate), as the endpoint saw it.
    pub client: String,
    /// The audit log's name for the call, e.g. `query.submit`.
    pub action: &'static str,
}

/// A researcher's query, as any endpoint parses it.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub sql: String,
    /// ε and δ to spend; `None` takes the policy's default.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// Add row, column and grand totals (with secondary suppression).
    pub totals: bool,
}

/// What a Submit answers.
#[derive(Debug, Clone)]
pub struct Released {
    pub id: String,
    pub release: Release,
    pub status: ReleaseStatus,
    /// Why the airlock holds it; empty unless `status` is `Held`.
    pub hold_reason: String,
    /// The project's budget after this call.
    pub epsilon_remaining: f64,
    pub delta_remaining: f64,
    /// An identical query was released before: this is that release again,
    /// and nothing was charged.
    pub repeated: bool,
}

/// One turn per (project, plan hash): an identical query waits for the one
/// in flight and then gets its stored release instead of paying twice.
/// Shared by every call, so it outlives any one [`Pipeline`].
#[derive(Default)]
pub struct Repeats(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// A held turn; dropping it lets the next identical query in.
struct Turn<'a> {
    repeats: &'a Repeats,
    key: String,
    held: tokio::sync::OwnedMutexGuard<()>,
}

impl Repeats {
    async fn turn(&self, project: &str, plan_hash: &str) -> Result<Turn<'_>, Fault> {
        let key = format!("{project}\n{plan_hash}");
        let lock = {
            let mut locks = self
                .0
                .lock()
                .map_err(|_| Fault::Poisoned("repeated-query"))?;
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        Ok(Turn {
            repeats: self,
            key,
            held: lock.lock_owned().await,
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Ok(mut locks) = self.repeats.0.lock() {
            // The map's handle and ours: nobody else holds or waits for it.
            if Arc::strong_count(tokio::sync::OwnedMutexGuard::mutex(&self.held)) <= 2 {
                locks.remove(&self.key);
            }
        }
    }
}

/// The pipeline over one engine, store and signing key.
#[derive(Clone, Copy)]
pub struct Pipeline<'a> {
    pub engine: &'a Engine,
    pub store: &'a dyn Store,
    /// Signs release manifests.
    pub notary: &'a dyn Notary,
    pub repeats: &'a Repeats,
}

impl Pipeline<'_> {
    /// Compile a query into its private plan (what DryRun shows and Submit
    /// runs). Touches no data and charges nothing.
    pub async fn plan(&self, query: &Query) -> Result<PrivatePlan, ReleaseError> {
        fault::panic_at("/*tre-fault:compile*/", &query.sql);
        let budget = self.engine.budget(query.epsilon, query.delta)?;
        let plan = self.engine.compile(&query.sql, budget).await?;
        Ok(if query.totals {
            plan.with_totals()?
        } else {
            plan
        })
    }

    /// Run a query for `project` (already checked queryable for the caller)
    /// through to a stored, audited release. Writes the call's one audit
    /// event whatever happens, and settles any charge: on an error, on a
    /// panic (caught and returned as `TRE-I001`), and when this future is
    /// dropped unfinished (the caller went away).
    pub async fn submit(
        &self,
        caller: &Caller,
        project: &Project,
        query: &Query,
    ) -> Result<Released, ReleaseError> {
        use futures::FutureExt;
        let mut record = Record::new(self.store, caller, project.id.as_str(), &query.sql);
        let result = std::panic::AssertUnwindSafe(self.run(caller, project, query, &mut record))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(Fault::Panicked(panic_message(&*panic)).into()));
        record.finish(result)
    }

    async fn run(
        &self,
        caller: &Caller,
        project: &Project,
        query: &Query,
        record: &mut Record<'_>,
    ) -> Result<Released, ReleaseError> {
        let plan = self.plan(query).await?;
        record.planned(&plan);
        let _turn = self
            .repeats
            .turn(project.id.as_str(), plan.plan_hash())
            .await?;
        // Re-releasing the same noisy answer is post-processing: free.
        if let Some(stored) = off_worker(|| self.store.find_release(&project.id, plan.plan_hash()))?
        {
            return self.repeat(project, stored, record);
        }
        // A slot before the charge: a full engine refuses for free.
        let admission = self.engine.admit(project.id.as_str()).await?;
        // Every dataset the query reads pays from its own lifetime cap.
        let lifetimes: Vec<Lifetime<'_>> = self
            .engine
            .policy()
            .covers()
            .into_iter()
            .map(|p| Lifetime {
                dataset: &p.dataset,
                epsilon: p.budget.lifetime_epsilon,
                delta: p.budget.lifetime_delta,
            })
            .collect();
        let charge = Charge {
            project: &project.id,
            datasets: &lifetimes,
            user: &caller.who.user,
            epsilon: plan.epsilon(),
            delta: plan.delta(),
            plan_hash: plan.plan_hash(),
            today: tre_store::today(),
        };
        let reserved = off_worker(|| self.store.reserve(&charge))?;
        // From here on the budget is spent, whatever happens: the record
        // settles the reservation on every path.
        record.reserved(reserved.ledger_id, &plan);
        fault::panic_at("/*tre-fault:charged*/", plan.sql());
        fault::stall_at("/*tre-fault:stall*/", plan.sql()).await;
        let release = self.engine.execute_admitted(&plan, &admission).await?;
        let stored = self.stored(caller, project, &plan, &release)?;
        record.commit(&stored)?;
        Ok(Released {
            id: stored.id,
            release,
            status: stored.status,
            hold_reason: stored.hold_reason,
            epsilon_remaining: reserved.epsilon_remaining,
            delta_remaining: reserved.delta_remaining,
            repeated: false,
        })
    }

    /// The earlier release of an identical query, again, at no charge.
    fn repeat(
        &self,
        project: &Project,
        stored: StoredRelease,
        record: &mut Record<'_>,
    ) -> Result<Released, ReleaseError> {
        let release = stored_body(&stored)?;
        let now = off_worker(|| self.store.project(&project.id))?;
        record.repeated(&stored);
        Ok(Released {
            id: stored.id,
            release,
            status: stored.status,
            hold_reason: stored.hold_reason,
            epsilon_remaining: now.remaining(),
            delta_remaining: now.delta_remaining(),
            repeated: true,
        })
    }

    /// The release as stored: body, hash, airlock status and signed manifest.
    fn stored(
        &self,
        caller: &Caller,
        project: &Project,
        plan: &PrivatePlan,
        release: &Release,
    ) -> Result<StoredRelease, ReleaseError> {
        let body = serde_json::to_string(release).map_err(Fault::Json)?;
        let id = uuid::Uuid::new_v4().to_string();
        let created_at = tre_store::now();
        let body_hash = chain::sha256_hex(body.as_bytes());
        let cells = cell_counts(release);
        let manifest = self.manifest(&Signed {
            id: &id,
            caller,
            project,
            plan,
            release,
            cells,
            created_at: &created_at,
            table_sha256: &body_hash,
        })?;
        let hold = self.engine.policy().review.hold_reason(
            (cells.released + cells.rounded + cells.suppressed) as usize,
            cells.suppressed > 0,
            release.exact_rules_applied,
        );
        Ok(StoredRelease {
            id,
            project: project.id.to_string(),
            user: caller.who.user.to_string(),
            plan_hash: plan.plan_hash().to_owned(),
            body_hash,
            body,
            created_at,
            status: if hold.is_some() {
                ReleaseStatus::Held
            } else {
                ReleaseStatus::Released
            },
            hold_reason: hold.unwrap_or_default(),
            manifest,
            reviews: vec![],
            review_notes: release.review_notes.clone(),
        })
    }

    /// The signed manifest of a release, as JSON.
    fn manifest(&self, s: &Signed<'_>) -> Result<String, ReleaseError> {
        let engine = self.engine;
        let signed = Manifest {
            format: tre_store::manifest::FORMAT.to_owned(),
            release_id: s.id.to_owned(),
            project: s.project.id.to_string(),
            user: s.caller.who.user.to_string(),
            created_at: s.created_at.to_owned(),
            sql: s.plan.sql().to_owned(),
            plan_hash: s.plan.plan_hash().to_owned(),
            dataset: engine.policy().dataset.clone(),
            policy_sha256: engine.policy().source_hash.clone(),
            sdc_profile: engine.profile().name.clone(),
            sdc_profile_sha256: engine.profile().hash.clone(),
            dataset_snapshot_sha256: engine.snapshot_hash().to_owned(),
            epsilon_nanos: s.plan.epsilon().as_nanos(),
            delta_femtos: s.plan.delta().as_femtos(),
            columns: s
                .release
                .columns
                .iter()
                .map(|c| ManifestColumn {
                    name: c.name.clone(),
                    kind: c.kind.clone(),
                    mechanism: c.mechanism.clone(),
                    noise_scale: c.noise_scale,
                })
                .collect(),
            cells: s.cells,
            cell_outcomes: s
                .release
                .rows
                .iter()
                .flatten()
                .filter_map(|c| match c {
                    Cell::Value { status, reason, .. } if reason.is_empty() => {
                        Some(status.as_str().to_owned())
                    }
                    Cell::Value { status, reason, .. } => {
                        Some(format!("{}: {reason}", status.as_str()))
                    }
                    Cell::Key { .. } => None,
                })
                .collect(),
            sdc_outcome: s.release.sdc_outcome.as_str().to_owned(),
            exact_rules_applied: s.release.exact_rules_applied,
            engine_version: concat!("tre ", env!("CARGO_PKG_VERSION")).to_owned(),
            table_sha256: s.table_sha256.to_owned(),
        }
        .sign(self.notary)
        .map_err(|e| Fault::Signing(e.to_string()))?;
        Ok(serde_json::to_string(&signed).map_err(Fault::Json)?)
    }
}

/// What a release manifest is made from.
struct Signed<'a> {
    id: &'a str,
    caller: &'a Caller,
    project: &'a Project,
    plan: &'a PrivatePlan,
    release: &'a Release,
    cells: CellCounts,
    created_at: &'a str,
    table_sha256: &'a str,
}

/// The release a stored body holds; one that no longer parses means the
/// store is damaged.
pub fn stored_body(stored: &StoredRelease) -> Result<Release, Fault> {
    serde_json::from_str(&stored.body).map_err(|source| Fault::StoredRelease {
        id: stored.id.clone(),
        source,
    })
}

/// Value cells of a release by disclosure status.
fn cell_counts(release: &Release) -> CellCounts {
    let mut c = CellCounts::default();
    for cell in release.rows.iter().flatten() {
        if let Cell::Value { status, .. } = cell {
            match status {
                CellStatus::Suppressed => c.suppressed += 1,
                CellStatus::Rounded => c.rounded += 1,
                CellStatus::Released => c.released += 1,
            }
        }
    }
    c
}

/// Run a synchronous store call (SQLite, with a full fsync per commit)
/// without holding up the async worker it is called on: on a
/// multi-threaded runtime the worker first hands its other tasks to
/// another thread (`block_in_place`), so calls being served are not
/// starved while a commit waits for the disk. Elsewhere (a current-thread
/// runtime, no runtime, or while unwinding from a panic) it simply runs.
pub fn off_worker<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread && !std::thread::panicking() => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// A panic's message, for the audit log.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Test builds only (`fault-injection`): where a query's SQL holds a
/// marker, panic or stall at a chosen point, so tests can show that a
/// panic and a cancel still settle the charge and leave the call's event.
/// Compiled out of every other build.
mod fault {
    #[cfg(feature = "fault-injection")]
    pub(crate) fn panic_at(marker: &str, sql: &str) {
        if sql.contains(marker) {
            panic!("injected fault {marker}");
        }
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) async fn stall_at(marker: &str, sql: &str) {
        if sql.contains(marker) {
            std::future::pending::<()>().await;
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub(crate) fn panic_at(_marker: &str, _sql: &str) {}

    #[cfg(not(feature = "fault-injection"))]
    pub(crate) async fn stall_at(_marker: &str, _sql: &str) {}
}
