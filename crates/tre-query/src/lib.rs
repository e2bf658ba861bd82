//! The query engine's API boundary: a researcher's SQL goes in, a
//! [`Release`] comes out. Inside: a DataFusion sandbox that sees only the
//! policy's tables and decrypts extracts in memory; the compiler that checks
//! a plan against the policy and rewrites it into a [`PrivatePlan`]
//! (contribution bounding, clamping, mechanisms, epsilon split); execution,
//! OpenDP noise and disclosure control; and the isolation of queries from
//! each other (admission slots, a memory pool per query that the compiler
//! bounds every query's plans to, time limits, and a runtime of its own,
//! apart from the one that serves calls).
//!
//! Exact aggregates never leave this crate: `execute` returns only noisy,
//! disclosure-checked cells. It knows nothing of gRPC or of the ledger (the
//! caller reserves budget between `compile` and `execute`), and must never
//! depend on tonic, tre-store or tre-gateway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::AbortOnDropHandle;

use tre_core::Code;
use tre_policy::Policy;
use tre_sdc::Profile;
use tre_vault::MasterKey;

mod compile;
mod execute;
mod functions;
mod memory;
mod ranged;
mod reference;
mod release;
mod sandbox;
mod stream;
mod udf;

pub use compile::{Budget, FIXED_POINT_SCALE, Measure, PrivatePlan, datasets_named};

/// A table a query may name, as catalogs list it.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub name: String,
    pub schema: datafusion::arrow::datatypes::SchemaRef,
    /// A public reference table rather than an extract.
    pub reference: bool,
}
pub use release::{Cell, Release, ReleaseColumn};
pub use sandbox::FACTORY_ID;
/// The disclosure vocabulary a `Release` carries, so its users need not
/// depend on tre-sdc.
pub use tre_sdc::{ReleaseOutcome, Status as CellStatus};
pub use udf::{FunctionInfo, functions};

/// One error enum for the engine, keeping the kinds apart: refusals are the
/// researcher's to fix and cost nothing; execution failures happen after
/// data was touched and are reported generically; setup and internal errors
/// are the operator's.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query is outside what the policy allows, or malformed.
    #[error("{code} {message}")]
    Refused { code: Code, message: String },
    /// Something failed after the query touched data. `detail` is for the
    /// audit log only and must never reach the researcher.
    #[error("{code} the query failed while running; its cost has been charged and the details are in the audit log", code = self.code())]
    Execution { detail: String },
    /// The engine could not start: a bad extract, key or policy mismatch.
    #[error("{code} {message}")]
    Setup { code: Code, message: String },
    /// Datasets a query names that may not be queried together.
    #[error(transparent)]
    Joint(#[from] tre_policy::JointError),
    #[error(transparent)]
    Vault(#[from] tre_vault::VaultError),
    /// An extract tre's writer did not write, or one that does not open.
    #[error(transparent)]
    Extract(#[from] tre_extract::ExtractError),
    /// A bug: an invariant of the compiler or the release was broken.
    #[error("{code} internal error: {0}", code = self.code())]
    Internal(String),
}

impl QueryError {
    pub(crate) fn refused(code: Code, message: impl Into<String>) -> Self {
        QueryError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> Code {
        match self {
            QueryError::Refused { code, .. } | QueryError::Setup { code, .. } => *code,
            QueryError::Execution { .. } => Code::ExecutionFailed,
            QueryError::Joint(j) => j.code(),
            QueryError::Vault(v) => v.code(),
            QueryError::Extract(e) => e.code(),
            QueryError::Internal(_) => Code::Internal,
        }
    }

    /// Whether this is the operator's problem, whose text must not reach
    /// the researcher. `Execution` is not: its text is already generic and
    /// its detail never displayed. Exhaustive, so a new variant must
    /// decide (issue #12).
    pub fn is_internal(&self) -> bool {
        match self {
            QueryError::Setup { .. }
            | QueryError::Vault(_)
            | QueryError::Extract(_)
            | QueryError::Internal(_)
            | QueryError::Joint(tre_policy::JointError::Malformed(_)) => true,
            QueryError::Refused { .. } | QueryError::Execution { .. } | QueryError::Joint(_) => {
                false
            }
        }
    }
}

/// Limits on the engine. Defaults suit the 2-core reference machine.
///
/// Queries are isolated from each other: at most `concurrent_queries`
/// execute at once, each in its own memory pool of
/// `memory_bytes / concurrent_queries` bytes, so the pools add up to the
/// process limit and one query's memory can never fail another's. One
/// tenant (a project) may hold at most `per_tenant_queries` of the slots,
/// so one researcher's heavy queries always leave room for other
/// projects. Issue #11.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory for all executing queries together.
    pub memory_bytes: usize,
    pub target_partitions: usize,
    /// Refuse plans whose public group keys multiply to more cells.
    pub max_cells: usize,
    /// Queries that may execute at once.
    pub concurrent_queries: usize,
    /// Of those, how many one tenant may hold.
    pub per_tenant_queries: usize,
    /// How long a query may wait for a slot before it is refused with
    /// `TRE-S001`, before anything is charged.
    pub queue_wait: Duration,
    /// Wall-clock limit on one query's execution. Past it the work is
    /// cancelled; as a failure after the charge it is an incident.
    pub query_timeout: Duration,
    /// Wall-clock limit on compiling one query (`TRE-Q033`, free: the
    /// compiler touches no data).
    pub compile_timeout: Duration,
    /// Worker threads of the engine's own runtime, apart from the one that
    /// serves calls, so catalog and budget calls stay responsive while
    /// queries run.
    pub engine_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 4 << 30,
            target_partitions: 2,
            max_cells: 10_000,
            concurrent_queries: 4,
            per_tenant_queries: 2,
            queue_wait: Duration::from_secs(60),
            query_timeout: Duration::from_secs(300),
            compile_timeout: Duration::from_secs(30),
            engine_threads: 2,
        }
    }
}

impl Limits {
    /// Each executing query's own memory pool.
    pub fn memory_per_query(&self) -> usize {
        self.memory_bytes / self.concurrent_queries.max(1)
    }
}

/// A slot to execute one query: the global and the tenant's permit, held
/// until the query's work has stopped. Take it before reserving budget, so
/// a full engine refuses (free) instead of charging and failing.
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
    memory_bytes: usize,
}

/// The engine's own tokio runtime. Dropped from async code (tests, the
/// gateway's shutdown), so it shuts down in the background instead of
/// blocking, which tokio forbids there.
struct EngineRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl EngineRuntime {
    fn new(threads: usize) -> Result<Self, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("tre-engine")
            .enable_all()
            .build()
            .map_err(|e| QueryError::Setup {
                code: Code::Internal,
                message: format!("cannot start the engine runtime: {e}"),
            })?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Run `work` on the engine's threads, within `limit`. Dropping the
    /// returned future (a client that hangs up) or passing the limit aborts
    /// the task, and with it DataFusion's own tasks, at their next yield.
    async fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        work: impl std::future::Future<Output = Result<T, QueryError>> + Send + 'static,
    ) -> Result<Result<T, QueryError>, RunStopped> {
        let task = AbortOnDropHandle::new(self.handle.spawn(work));
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(RunStopped::Panicked(e.to_string())),
            Err(_) => Err(RunStopped::TimedOut),
        }
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Why work on the engine runtime gave no result.
enum RunStopped {
    TimedOut,
    Panicked(String),
}

/// Refuse a privacy parameter above the policy's per-query cap.
fn within_cap<T: PartialOrd + std::fmt::Display>(
    what: &str,
    value: T,
    cap: T,
    code: Code,
) -> Result<(), QueryError> {
    if value > cap {
        return Err(QueryError::refused(
            code,
            format!(
                "{what} {value} is above this dataset's per-query cap of {cap}; ask for at most {cap}"
            ),
        ));
    }
    Ok(())
}

fn snapshot_hash<'a>(
    data_dir: &Path,
    tables: impl Iterator<Item = &'a String>,
) -> Result<String, QueryError> {
    use std::io::Read;
    let mut all = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    for t in tables {
        let path = data_dir.join(format!("{t}.parquet"));
        let unreadable = |e: std::io::Error| QueryError::Setup {
            code: Code::ExtractUnreadable,
            message: format!("cannot read {}: {e}", path.display()),
        };
        let mut f = std::fs::File::open(&path).map_err(unreadable)?;
        all.update(t.as_bytes());
        loop {
            let n = f.read(&mut buf).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            all.update(&buf[..n]);
        }
    }
    Ok(hex::encode(all.finish().as_ref()))
}

/// A dataset opened for private querying.
pub struct Engine {
    policy: Arc<Policy>,
    profile: Arc<Profile>,
    snapshot: String,
    sandbox: sandbox::Sandbox,
    limits: Limits,
    reference: reference::RefTables,
    runtime: EngineRuntime,
    admission: Arc<Slots>,
}

/// Who may execute now: the slots for all queries and each tenant's
/// share of them. One gateway's engines share one (`Engine::share_slots`,
/// `Engine::join`), so `Limits` bound the process, not each dataset.
struct Slots {
    all: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Slots {
    fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(limits.concurrent_queries.max(1))),
            tenants: Mutex::default(),
        })
    }
}

impl Engine {
    /// Open the extracts in `data_dir` (one `<table>.parquet` per policy
    /// table), check that each decrypts under `master` and that its schema
    /// matches the policy exactly.
    pub fn open(
        policy: Policy,
        profile: Profile,
        data_dir: &Path,
        master: Arc<MasterKey>,
        limits: Limits,
    ) -> Result<Self, QueryError> {
        if profile.name != policy.sdc_profile {
            return Err(QueryError::Setup {
                code: Code::PolicyInvalid,
                message: format!(
                    "policy '{}' names sdc profile '{}' but profile '{}' was loaded",
                    policy.dataset, policy.sdc_profile, profile.name
                ),
            });
        }
        let policy = Arc::new(policy);
        let reference = reference::load(&policy.reference_tables)?;
        let sandbox =
            sandbox::Sandbox::open(&policy, &[data_dir], master, &limits, reference.clone())?;
        // The opt-out list is part of what is served: replacing it makes a
        // new version, which releases and manifests name.
        let list = tre_extract::OPT_OUT_LIST.to_owned();
        let snapshot = snapshot_hash(
            data_dir,
            policy.tables.keys().chain(
                data_dir
                    .join(format!("{list}.parquet"))
                    .exists()
                    .then_some(&list),
            ),
        )?;
        let runtime = EngineRuntime::new(limits.engine_threads)?;
        Ok(Self {
            policy,
            profile: Arc::new(profile),
            snapshot,
            sandbox,
            admission: Slots::new(&limits),
            limits,
            reference,
            runtime,
        })
    }

    /// Admit this engine's queries from `other`'s slots, so that one
    /// gateway's engines together run at most `Limits::concurrent_queries`
    /// queries, and one tenant at most its share, whatever datasets they
    /// read.
    pub fn share_slots(&mut self, other: &Engine) {
        self.admission = Arc::clone(&other.admission);
    }

    /// The engine for one query over several datasets' engines (issue
    /// #15): their policies merged by [`Policy::joint`] (refused with
    /// `TRE-Q035` unless they hold one person under one unit), the
    /// strictest of their disclosure profiles, and a sandbox over all
    /// their extracts, each named `dataset.table`.
    pub fn join(parts: &[&Engine]) -> Result<Self, QueryError> {
        let policies: Vec<&Policy> = parts.iter().map(|e| e.policy()).collect();
        let policy = Policy::joint(&policies)?;
        let ordered: Vec<&Engine> = policy
            .covers()
            .iter()
            .filter_map(|p| parts.iter().find(|e| e.policy.dataset == p.dataset))
            .copied()
            .collect();
        let (Some(first), true) = (ordered.first(), ordered.len() == parts.len()) else {
            return Err(QueryError::Internal("joined engines out of step".into()));
        };
        let mut profiles: Vec<Profile> = Vec::new();
        for e in &ordered {
            if profiles.iter().all(|p| p.hash != e.profile.hash) {
                profiles.push((*e.profile).clone());
            }
        }
        let mut profile = Profile::strictest(&profiles)
            .ok_or_else(|| QueryError::Internal("no profile to join".into()))?;
        profile.name = policy.sdc_profile.clone();
        let dirs: Vec<&Path> = ordered
            .iter()
            .flat_map(|e| e.sandbox.data_dirs())
            .map(PathBuf::as_path)
            .collect();
        let limits = first.limits.clone();
        let reference = reference::load(&policy.reference_tables)?;
        let sandbox = sandbox::Sandbox::open(
            &policy,
            &dirs,
            first.sandbox.master(),
            &limits,
            reference.clone(),
        )?;
        let snapshots: String = ordered
            .iter()
            .map(|e| format!("{}:{}\n", e.policy.dataset, e.snapshot))
            .collect();
        Ok(Self {
            policy: Arc::new(policy),
            profile: Arc::new(profile),
            snapshot: hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                snapshots.as_bytes(),
            )),
            sandbox,
            runtime: EngineRuntime::new(limits.engine_threads)?,
            admission: Arc::clone(&first.admission),
            limits,
            reference,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// SHA-256 over the extracts as served (each table's name and bytes, in
    /// name order): which data a release came from, for its manifest.
    pub fn snapshot_hash(&self) -> &str {
        &self.snapshot
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Where the extracts are: one directory per dataset, in the order of
    /// `Policy::covers`.
    pub fn data_dirs(&self) -> &[PathBuf] {
        self.sandbox.data_dirs()
    }

    /// A fresh sandboxed session (for benchmarks and tests that need plain
    /// DataFusion over the same decrypted extracts). Never hand it to a
    /// researcher: it executes anything.
    pub fn sandbox_context(&self) -> datafusion::prelude::SessionContext {
        self.sandbox.context()
    }

    /// Parse, check, rewrite and plan. Touches no data and costs nothing.
    /// Runs on the engine's threads within `Limits::compile_timeout`.
    pub async fn compile(&self, sql: &str, budget: Budget) -> Result<PrivatePlan, QueryError> {
        let ctx = self.sandbox.context();
        let (policy, reference, limits) = (
            Arc::clone(&self.policy),
            self.reference.clone(),
            self.limits.clone(),
        );
        let exact_rules = self.profile.exact_rules;
        let sql = sql.to_owned();
        let extracts = self.extracts(Vec::new());
        let work = async move {
            let mut plan =
                compile::compile(&ctx, &policy, &reference, &limits, &sql, budget, &extracts)
                    .await?;
            plan.memory_bound = execute::preflight(&ctx, &plan, exact_rules).await?;
            let pool = limits.memory_per_query() as u64;
            if plan.memory_bound > pool {
                return Err(QueryError::refused(
                    Code::TooMuchMemory,
                    format!(
                        "the query could need up to {} MiB, more than the {} MiB one query may use; group by fewer keys or keys with a public domain, and join private tables on {}",
                        plan.memory_bound.div_ceil(1 << 20),
                        pool >> 20,
                        policy.privacy_unit
                    ),
                ));
            }
            Ok(plan)
        };
        match self.runtime.run(self.limits.compile_timeout, work).await {
            Ok(result) => result,
            Err(RunStopped::TimedOut) => Err(QueryError::refused(
                Code::CompileTimeout,
                format!(
                    "the query took more than {} s to plan; simplify it (fewer CTEs, joins, columns or branches)",
                    self.limits.compile_timeout.as_secs()
                ),
            )),
            Err(RunStopped::Panicked(e)) => {
                Err(QueryError::Internal(format!("the compiler stopped: {e}")))
            }
        }
    }

    #[cfg(feature = "soundness-testing")]
    async fn compile_in(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        sql: &str,
        budget: Budget,
        extracts: &compile::Extracts,
    ) -> Result<PrivatePlan, QueryError> {
        compile::compile(
            ctx,
            &self.policy,
            &self.reference,
            &self.limits,
            sql,
            budget,
            extracts,
        )
        .await
    }

    /// What the compiler needs to know about the served extracts, with
    /// `excluded` patients (tests only) left out.
    fn extracts(&self, excluded: Vec<String>) -> compile::Extracts {
        compile::Extracts {
            excluded,
            ..self.sandbox.extracts().clone()
        }
    }

    /// The privacy parameters for one query: the researcher's request
    /// within the policy's per-query caps, or the policy defaults.
    pub fn budget(&self, epsilon: Option<f64>, delta: Option<f64>) -> Result<Budget, QueryError> {
        let caps = &self.policy.budget;
        let invalid =
            |e: tre_core::CoreError| QueryError::refused(Code::InvalidEpsilon, e.to_string());
        let epsilon = match epsilon {
            None => caps.default_epsilon_per_query,
            Some(v) => tre_core::Epsilon::requested(v).map_err(invalid)?,
        };
        within_cap(
            "epsilon",
            epsilon,
            caps.max_epsilon_per_query,
            Code::EpsilonAboveCap,
        )?;
        if epsilon < caps.min_epsilon_per_query {
            return Err(QueryError::refused(
                Code::EpsilonBelowFloor,
                format!(
                    "epsilon {epsilon} is below this dataset's per-query floor of {}; ask for at least {}",
                    caps.min_epsilon_per_query, caps.min_epsilon_per_query
                ),
            ));
        }
        let delta = match delta {
            None => caps.default_delta_per_query,
            Some(v) => tre_core::Delta::requested(v).map_err(invalid)?,
        };
        within_cap(
            "delta",
            delta,
            caps.max_delta_per_query,
            Code::DeltaAboveCap,
        )?;
        Ok(Budget { epsilon, delta })
    }

    /// Every table a query may name, with its Arrow schema: the extracts
    /// (`reference` false), then the public reference tables. What the
    /// policy and the shipped lookups fix, never data; for catalog
    /// listings (Flight SQL's GetTables).
    pub fn table_schemas(&self) -> Vec<TableSchema> {
        let extracts = self.sandbox.schemas().map(|(name, schema)| TableSchema {
            name: name.to_owned(),
            schema: Arc::clone(schema),
            reference: false,
        });
        let reference = self.reference.iter().map(|(name, t)| TableSchema {
            name: name.clone(),
            schema: Arc::clone(&t.schema),
            reference: true,
        });
        extracts.chain(reference).collect()
    }

    /// Queries executing now (holding an admission slot, on any engine
    /// sharing this one's slots), and bytes the pools of this engine's
    /// queries hold together: for the operator's metrics only. Both depend
    /// on what is running, so never on a researcher's path.
    pub fn load(&self) -> (usize, usize) {
        let running = self
            .limits
            .concurrent_queries
            .max(1)
            .saturating_sub(self.admission.all.available_permits());
        (running, self.sandbox.memory_in_use())
    }

    /// Names of the public reference tables.
    pub fn reference_tables(&self) -> Vec<String> {
        self.reference.keys().cloned().collect()
    }

    /// Wait for a slot to execute one query of `tenant` (a project), at
    /// most `Limits::queue_wait`; then refuse with `TRE-S001`. The wait
    /// depends on other queries' run times only, which issue #10 bounds
    /// per patient.
    pub async fn admit(&self, tenant: &str) -> Result<Admission, QueryError> {
        let tenant_slots =
            {
                let mut tenants =
                    self.admission.tenants.lock().map_err(|_| {
                        QueryError::Internal("the admission table is poisoned".into())
                    })?;
                Arc::clone(tenants.entry(tenant.to_owned()).or_insert_with(|| {
                    Arc::new(Semaphore::new(self.limits.per_tenant_queries.max(1)))
                }))
            };
        let permits = async {
            let tenant = tenant_slots.acquire_owned().await;
            let slot = Arc::clone(&self.admission.all).acquire_owned().await;
            (tenant, slot)
        };
        let busy = || {
            QueryError::refused(
                Code::Busy,
                format!(
                    "the engine is busy: no query slot came free within {} s; nothing was charged, try again later",
                    self.limits.queue_wait.as_secs()
                ),
            )
        };
        match tokio::time::timeout(self.limits.queue_wait, permits).await {
            Ok((Ok(tenant), Ok(slot))) => Ok(Admission {
                _slot: slot,
                _tenant: tenant,
                memory_bytes: self.limits.memory_per_query(),
            }),
            _ => Err(busy()),
        }
    }

    /// Run a compiled plan and release noisy, disclosure-checked cells,
    /// once a slot is free. Call only after the plan's cost has been
    /// reserved.
    pub async fn execute(&self, plan: &PrivatePlan) -> Result<Release, QueryError> {
        let admission = self.admit("").await?;
        self.execute_admitted(plan, &admission).await
    }

    /// Run a compiled plan in its admission's own memory pool, on the
    /// engine's threads, within `Limits::query_timeout`. Past the limit, or
    /// when the caller drops this future, the work is cancelled and stops
    /// using CPU at its next yield. Call only after the plan's cost has
    /// been reserved: every failure here happened after data was touched.
    pub async fn execute_admitted(
        &self,
        plan: &PrivatePlan,
        admission: &Admission,
    ) -> Result<Release, QueryError> {
        self.execute_measured(plan, admission).await.0
    }

    /// The physical plans a compiled `plan` will execute, as DataFusion
    /// displays them: for the operator and the benchmark (their shape
    /// depends on the query and the extract's file layout, not on values).
    pub fn physical_plans_shown(plan: &PrivatePlan) -> Vec<String> {
        plan.prepared.shown()
    }

    /// [`Engine::execute_admitted`], also returning the most memory the
    /// query's pool held at once. That peak depends on the data: it is for
    /// the operator and the benchmark, never for a researcher.
    pub async fn execute_measured(
        &self,
        plan: &PrivatePlan,
        admission: &Admission,
    ) -> (Result<Release, QueryError>, usize) {
        let ctx = match self.sandbox.context_with_memory(admission.memory_bytes) {
            Ok(ctx) => ctx,
            Err(e) => return (Err(e), 0),
        };
        let peak = || sandbox::PeakPool::peak_of(&ctx).unwrap_or(0);
        let (plan, profile, run_ctx) = (plan.clone(), Arc::clone(&self.profile), ctx.clone());
        let work = async move { execute::execute(&run_ctx, &plan, &profile).await };
        let result = match self.runtime.run(self.limits.query_timeout, work).await {
            Ok(result) => result,
            Err(RunStopped::TimedOut) => Err(QueryError::Execution {
                detail: format!(
                    "the query ran past the {} s limit and was cancelled",
                    self.limits.query_timeout.as_secs()
                ),
            }),
            Err(RunStopped::Panicked(e)) => Err(QueryError::Execution {
                detail: format!("the query stopped: {e}"),
            }),
        };
        (result, peak())
    }
}

/// Test-only access to exact, pre-noise aggregates, for the sensitivity
/// soundness test. Never enable `soundness-testing` in a deployment: it
/// exists to prove bounds, and it returns what must never leave.
#[cfg(feature = "soundness-testing")]
pub mod soundness {
    use super::*;

    /// Exact per-cell values of each measurement, keyed by cell.
    #[derive(Debug, Default, PartialEq)]
    pub struct ExactRelease {
        /// Laplace measurements: cell → one integer per measurement.
        pub laplace: std::collections::HashMap<String, Vec<i64>>,
        /// Quantile histograms: per quantile, cell → (bucket, rows).
        pub histograms: Vec<std::collections::HashMap<String, Vec<(i64, u64)>>>,
        /// Key selection: key → distinct patients.
        pub selection: std::collections::HashMap<String, i64>,
    }

    /// The dataset tables `plan` scans without a bounding step above
    /// them: what the compiler's `verify` refuses (issue #12).
    pub fn unbounded_scans(
        engine: &Engine,
        plan: &datafusion::logical_expr::LogicalPlan,
    ) -> Vec<String> {
        compile::unbounded_scans_of(&engine.policy, &engine.extracts(Vec::new()), plan)
    }

    /// An aggregate computed per patient first, then per cell, as the
    /// compiler runs distinct patients per cell (issue #13); `None` where
    /// the compiler would run `agg` as it is.
    pub fn per_unit_first(
        agg: &datafusion::logical_expr::LogicalPlan,
        unit: &datafusion::common::Column,
    ) -> Option<datafusion::logical_expr::LogicalPlan> {
        compile::rewrite::per_unit_first(agg, unit)
    }

    /// How many of the preflight's physical plans `plan` still holds for
    /// execution (issue #13).
    pub fn prepared_plans(plan: &PrivatePlan) -> usize {
        plan.prepared.held()
    }

    /// The aggregate a private plan executes (over bounded scans).
    pub fn executed_plan(plan: &PrivatePlan) -> &datafusion::logical_expr::LogicalPlan {
        &plan.main
    }

    impl Engine {
        /// The physical plans of every plan of `plan` that reads data (see
        /// `PrivatePlan::reads`), as DataFusion displays them.
        pub async fn physical_plans(&self, plan: &PrivatePlan) -> Result<Vec<String>, QueryError> {
            let state = self.sandbox.context().state();
            let mut shown = Vec::new();
            for p in plan.reads() {
                let physical = state
                    .create_physical_plan(p)
                    .await
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                shown.push(
                    datafusion::physical_plan::displayable(physical.as_ref())
                        .indent(false)
                        .to_string(),
                );
            }
            Ok(shown)
        }

        /// Make contribution bounding a deterministic function of each row
        /// (so neighbouring datasets keep every other patient's rows).
        pub fn set_deterministic_bounding(&mut self, seed: Option<u64>) {
            self.sandbox.set_deterministic_seed(seed);
        }

        /// Compile `sql` with `excluded` patients removed from every table,
        /// and return its exact aggregates.
        pub async fn exact(
            &self,
            sql: &str,
            budget: Budget,
            excluded: &[String],
        ) -> Result<ExactRelease, QueryError> {
            let (_, e) = self.exact_inputs(sql, budget, excluded).await?;
            Ok(e.release())
        }

        /// The compiled plan (with `excluded` patients removed) and its
        /// exact aggregates, as the mechanisms receive them.
        pub async fn exact_inputs(
            &self,
            sql: &str,
            budget: Budget,
            excluded: &[String],
        ) -> Result<(PrivatePlan, Exact), QueryError> {
            // Not preflighted: tests compile the query itself first.
            let ctx = self.sandbox.context();
            let plan = self
                .compile_in(&ctx, sql, budget, &self.extracts(excluded.to_vec()))
                .await?;
            let e = execute::exact(&ctx, &plan).await?;
            Ok((plan, Exact(e)))
        }

        /// One draw of every mechanism of `plan` over `exact`: exactly what
        /// `execute` would add noise to, before disclosure control (which
        /// only post-processes it). For the empirical privacy audit.
        pub fn noisy(&self, plan: &PrivatePlan, exact: &Exact) -> Result<NoisyRelease, QueryError> {
            let n = execute::noise(plan, &exact.0)?;
            Ok(NoisyRelease {
                cells: n.cells.iter().map(|k| format!("{k:?}")).collect(),
                values: n.values,
            })
        }
    }

    /// A query's exact aggregates, opaque outside the engine.
    pub struct Exact(execute::Exact);

    /// One run of a query's mechanisms.
    #[derive(Debug)]
    pub struct NoisyRelease {
        /// The released cells (keys as text): public domains and the keys
        /// DP key selection kept.
        pub cells: Vec<String>,
        /// Per measurement (in `PrivatePlan::measures` order), per cell.
        pub values: Vec<Vec<f64>>,
    }

    impl Exact {
        fn release(&self) -> ExactRelease {
            let e = &self.0;
            let text = |k: &Vec<datafusion::common::ScalarValue>| format!("{k:?}");
            ExactRelease {
                laplace: e
                    .laplace
                    .iter()
                    .map(|(k, v)| (text(k), v.clone()))
                    .collect(),
                histograms: e
                    .histograms
                    .iter()
                    .map(|(_, h)| h.iter().map(|(k, v)| (text(k), v.clone())).collect())
                    .collect(),
                selection: e
                    .selection
                    .iter()
                    .flatten()
                    .map(|(k, v)| (text(k), *v))
                    .collect(),
            }
        }
    }
}
