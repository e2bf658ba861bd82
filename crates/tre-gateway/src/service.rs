//! The gRPC handlers. Every call goes through `begin` (authenticate, then
//! the authorisation matrix) and `finish` (exactly one audit event, then
//! the one error mapping), whatever the outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tre_core::{Principal, ProjectId};
use tre_proto::v1 as pb;
use tre_proto::v1::catalog_service_server::CatalogService;
use tre_proto::v1::query_service_server::QueryService;
use tre_query::{QueryError, Release};
use tre_store::manifest::{CellCounts, Manifest, ManifestColumn};
use tre_store::{AuditEvent, Charge, ReleaseStatus, StoredRelease, chain};

use crate::authz::{self, Rpc};
use crate::{AppState, GatewayError, ServerFault, convert};

#[derive(Clone)]
pub(crate) struct Services {
    pub(crate) state: Arc<AppState>,
    /// One lock per (project, plan hash): an identical query waits for the
    /// one in flight and then gets its stored release instead of paying
    /// twice.
    repeats: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Who is calling, from where, and what.
#[derive(Clone)]
pub(crate) struct Call {
    pub(crate) rpc: Rpc,
    pub(crate) client: String,
    pub(crate) who: Option<Principal>,
}

/// What the audit event records about a call beyond who and what.
#[derive(Default)]
pub(crate) struct Note {
    pub(crate) project: String,
    pub(crate) sql: String,
    pub(crate) plan_hash: String,
    pub(crate) epsilon_nanos: i64,
    pub(crate) delta_femtos: i64,
    pub(crate) release_id: String,
    pub(crate) release_hash: String,
    pub(crate) detail: String,
    /// An open reservation: a failure must settle it with its event.
    pub(crate) ledger_id: Option<i64>,
    /// The event was already written, atomically with the change it records.
    pub(crate) recorded: bool,
    /// A task that outlives the call writes the event (Submit, once
    /// compiled), whether or not the client waits for it.
    pub(crate) handed_off: bool,
}

/// What a request is about, for its audit event.
pub(crate) trait Target {
    fn project(&self) -> &str {
        ""
    }
    /// The SQL, or for catalog calls the table asked about.
    fn sql(&self) -> &str {
        ""
    }
    fn release_id(&self) -> &str {
        ""
    }
}

/// `impl Target` from the request's field names.
macro_rules! target {
    ($t:ty) => {
        impl Target for $t {}
    };
    ($t:ty, project = $p:ident $(, sql = $q:ident)?) => {
        impl Target for $t {
            fn project(&self) -> &str {
                &self.$p
            }
            $(fn sql(&self) -> &str {
                &self.$q
            })?
        }
    };
}

target!(pb::QueryRequest, project = project, sql = sql);
target!(pb::BudgetRequest, project = project);
target!(pb::RequestProjectRequest, project = id);
target!(pb::GetProjectRequest, project = id);
target!(pb::ApproveProjectRequest, project = id);
target!(pb::DecideProjectRequest, project = id);
target!(pb::TopUpProjectRequest, project = id);
target!(pb::ListEventsRequest, project = project);
target!(pb::ListDatasetsRequest);
target!(pb::ListProjectsRequest);
target!(pb::VerifyLogRequest);
target!(pb::ExportLogRequest);
target!(pb::RevokeTokenRequest);
target!(pb::ListReleasesRequest, project = project);

impl Target for pb::GetReleaseRequest {
    fn release_id(&self) -> &str {
        &self.id
    }
}
impl Target for pb::ReviewReleaseRequest {
    fn release_id(&self) -> &str {
        &self.id
    }
}

impl Target for pb::DescribeTableRequest {
    fn sql(&self) -> &str {
        &self.table
    }
}

/// Run one handler body between `begin` and `finish`. The call's event is
/// written exactly once: by `finish`; by a task the body handed it to; or,
/// if the client goes away first (a cancel, a deadline, a reset), when the
/// dropped `Pending` settles. A panic in the body becomes `TRE-I001` and
/// its event (issue #11).
macro_rules! handle {
    ($self:ident, $request:ident, $rpc:expr, |$call:ident, $who:ident, $req:ident, $note:ident| $body:expr) => {{
        let ($call, auth) = $self.begin(&$request, $rpc);
        let $req = $request.into_inner();
        // What the call was about is logged even when it is refused.
        let mut pending = $crate::service::Pending::new(
            $self,
            &$call,
            $crate::service::Note {
                project: $crate::service::Target::project(&$req).to_owned(),
                sql: $crate::service::Target::sql(&$req).to_owned(),
                release_id: $crate::service::Target::release_id(&$req).to_owned(),
                ..Default::default()
            },
        );
        let result = {
            let $note = &mut pending.note;
            match auth {
                Ok($who) => $crate::service::unpanicked($body).await,
                Err(e) => Err(e),
            }
        };
        pending.finish(result)
    }};
}
pub(crate) use handle;

/// A call between `begin` and `finish`. Dropped unfinished (the client
/// went away while the handler waited), it writes the call's event itself.
pub(crate) struct Pending<'a> {
    services: &'a Services,
    call: &'a Call,
    pub(crate) note: Note,
    finished: bool,
}

impl<'a> Pending<'a> {
    pub(crate) fn new(services: &'a Services, call: &'a Call, note: Note) -> Self {
        Self {
            services,
            call,
            note,
            finished: false,
        }
    }

    pub(crate) fn finish<R>(
        mut self,
        result: Result<R, GatewayError>,
    ) -> Result<Response<R>, Status> {
        self.finished = true;
        let note = std::mem::take(&mut self.note);
        self.services.finish(self.call, note, result)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(e) =
            self.services
                .record(self.call, &mut self.note, Some(&GatewayError::Cancelled))
        {
            tracing::error!("cannot record a cancelled call: {e}");
        }
    }
}

/// `body`'s result, or `TRE-I001` if it panicked: the call still gets its
/// event and a coded reply, and the server keeps serving.
pub(crate) async fn unpanicked<R>(
    body: impl std::future::Future<Output = Result<R, GatewayError>>,
) -> Result<R, GatewayError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(body).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(ServerFault::Panicked(what).into())
        }
    }
}

/// The principal of a valid, unrevoked `authorization` header value.
pub(crate) fn bearer_principal(state: &AppState, header: &str) -> Result<Principal, GatewayError> {
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        GatewayError::Unauthenticated("the authorization header must be `Bearer <token>`".into())
    })?;
    let (who, jti) = state.issuer.verify(token.trim())?;
    if state.store.is_revoked(&jti)? {
        return Err(GatewayError::TokenRevoked);
    }
    Ok(who)
}

impl Services {
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self {
            state,
            repeats: Arc::default(),
        }
    }

    pub(crate) fn begin<T>(
        &self,
        req: &Request<T>,
        rpc: Rpc,
    ) -> (Call, Result<Principal, GatewayError>) {
        // The handler owns the call's event from here on.
        if let Some(reached) = req.extensions().get::<crate::transport::Reached>() {
            reached.set();
        }
        let mut client = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Some(cert) = req.peer_certs().as_ref().and_then(|c| c.first().cloned()) {
            let fp = chain::sha256_hex(cert.as_ref());
            client.push_str(&format!(" mtls:{}", &fp[..16]));
        }
        let who = self.authenticate(req);
        let call = Call {
            rpc,
            client,
            who: who.as_ref().ok().cloned(),
        };
        let who = who.and_then(|p| authz::authorise(&p, rpc).map(|()| p));
        (call, who)
    }

    fn authenticate<T>(&self, req: &Request<T>) -> Result<Principal, GatewayError> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                GatewayError::Unauthenticated(
                    "no bearer token; send `authorization: Bearer <token>`".into(),
                )
            })?;
        bearer_principal(&self.state, header)
    }

    pub(crate) fn event(
        &self,
        call: &Call,
        note: &Note,
        error: Option<&GatewayError>,
    ) -> AuditEvent {
        let (user, role) = match &call.who {
            Some(p) => (p.user.as_str(), p.role.as_str()),
            None => ("(unauthenticated)", ""),
        };
        let mut e = AuditEvent::new(user, role, &note.project, call.rpc.action());
        e.client = call.client.clone();
        e.sql = note.sql.clone();
        e.plan_hash = note.plan_hash.clone();
        e.epsilon_nanos = note.epsilon_nanos;
        e.delta_femtos = note.delta_femtos;
        e.release_id = note.release_id.clone();
        e.release_hash = note.release_hash.clone();
        e.detail = note.detail.clone();
        match error {
            None => e.outcome = "allowed".into(),
            Some(err) => {
                e.outcome = match (err, note.ledger_id) {
                    (GatewayError::Cancelled, _) => "cancelled",
                    (_, Some(_)) => "failed",
                    (_, None) => "refused",
                }
                .into();
                e.code = err.code().as_str().into();
                if e.detail.is_empty() {
                    e.detail = err.to_string();
                }
            }
        }
        e
    }

    /// Append the call's audit event (unless it was already written or
    /// handed off) and map the result. If the log cannot be written the
    /// call fails: nothing may happen without a record.
    pub(crate) fn finish<R>(
        &self,
        call: &Call,
        mut note: Note,
        result: Result<R, GatewayError>,
    ) -> Result<Response<R>, Status> {
        if let Err(e) = self.record(call, &mut note, result.as_ref().err()) {
            return Err(e.into_status());
        }
        result.map(Response::new).map_err(GatewayError::into_status)
    }

    /// Write the call's one audit event, unless it is written or handed
    /// off. An open reservation is settled with it: a client's cancel
    /// leaves the charge, a failure is an incident.
    pub(crate) fn record(
        &self,
        call: &Call,
        note: &mut Note,
        error: Option<&GatewayError>,
    ) -> Result<(), GatewayError> {
        if note.recorded || note.handed_off {
            return Ok(());
        }
        let event = self.event(call, note, error);
        let store = &self.state.store;
        match (note.ledger_id, error) {
            (Some(id), Some(e)) => {
                let settle = match e {
                    GatewayError::Cancelled => tre_store::Settle::Cancelled,
                    _ => tre_store::Settle::Incident,
                };
                store.fail_reservation(id, &event, settle)?
            }
            _ => store.append_audit(&event)?,
        };
        note.recorded = true;
        Ok(())
    }

    fn dataset(&self) -> &str {
        &self.state.engine.policy().dataset
    }

    /// The project a researcher is querying: a member, active, unexpired,
    /// approved for this dataset.
    fn queryable_project(
        &self,
        who: &Principal,
        project: &str,
    ) -> Result<tre_store::Project, GatewayError> {
        let p = self.state.store.project(&ProjectId::new(project)?)?;
        authz::project_scope(who, &p, true)?;
        p.check_queryable(self.dataset(), tre_store::today())?;
        Ok(p)
    }

    /// The shared front of Submit and DryRun: the project, then the plan.
    async fn compile(
        &self,
        who: &Principal,
        req: &pb::QueryRequest,
        note: &mut Note,
    ) -> Result<(tre_store::Project, tre_query::PrivatePlan), GatewayError> {
        let project = self.queryable_project(who, &req.project)?;
        fault("/*tre-fault:compile*/", &req.sql);
        let budget = self.state.engine.budget(req.epsilon, req.delta)?;
        let plan = self.state.engine.compile(&req.sql, budget).await?;
        let plan = if req.totals {
            plan.with_totals()?
        } else {
            plan
        };
        note.plan_hash = plan.plan_hash().to_owned();
        Ok((project, plan))
    }

    async fn submit(
        &self,
        call: &Call,
        who: &Principal,
        req: &pb::QueryRequest,
        note: &mut Note,
    ) -> Result<pb::QueryResponse, GatewayError> {
        let (project, plan) = self.compile(who, req, note).await?;
        // Everything from admission on runs in its own task, which writes
        // the event whatever the client does. A client that hangs up
        // cancels it: before the charge nothing is spent; after it the
        // charge stands, the work stops and no release is made.
        let this = self.clone();
        let (call, who) = (call.clone(), who.clone());
        let mut owned = std::mem::take(note);
        note.handed_off = true;
        let cancel = tokio_util::sync::CancellationToken::new();
        let _cancel_when_dropped = cancel.clone().drop_guard();
        let task = tokio::spawn(async move {
            let work = unpanicked(this.submit_locked(&call, &who, &project, &plan, &mut owned));
            let reply = tokio::select! {
                biased;
                reply = work => reply,
                () = cancel.cancelled() => Err(GatewayError::Cancelled),
            };
            let reply = match this.record(&call, &mut owned, reply.as_ref().err()) {
                Ok(()) => reply,
                Err(e) => Err(e),
            };
            (reply, owned)
        });
        let (reply, owned) = task.await?;
        *note = owned;
        reply
    }

    /// One query per (project, plan hash) at a time: an identical query
    /// waits and then gets the stored release.
    async fn submit_locked(
        &self,
        call: &Call,
        who: &Principal,
        project: &tre_store::Project,
        plan: &tre_query::PrivatePlan,
        note: &mut Note,
    ) -> Result<pb::QueryResponse, GatewayError> {
        let key = format!("{}\n{}", project.id, plan.plan_hash());
        let lock = {
            let mut locks = self
                .repeats
                .lock()
                .map_err(|_| ServerFault::Poisoned("repeated-query"))?;
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        let _guard = lock.lock().await;
        let reply = self.submit_once(call, who, project, plan, note).await;
        if let Ok(mut locks) = self.repeats.lock() {
            // Drop the entry once nobody else holds or waits for it.
            if Arc::strong_count(&lock) <= 2 {
                locks.remove(&key);
            }
        }
        reply
    }

    async fn submit_once(
        &self,
        call: &Call,
        who: &Principal,
        project: &tre_store::Project,
        plan: &tre_query::PrivatePlan,
        note: &mut Note,
    ) -> Result<pb::QueryResponse, GatewayError> {
        let store = &self.state.store;
        // Re-releasing the same noisy answer is post-processing: free.
        if let Some(stored) = store.find_release(&project.id, plan.plan_hash())? {
            let release = stored_body(&stored)?;
            let now = store.project(&project.id)?;
            note.release_id = stored.id.clone();
            note.release_hash = stored.body_hash.clone();
            note.detail = format!(
                "repeat of release {} ({}); no charge",
                stored.id,
                stored.status.as_str()
            );
            let mut reply = convert::release(
                stored.id.clone(),
                &release,
                now.remaining(),
                now.delta_remaining(),
            );
            convert::set_status(&mut reply, stored.status, &stored.hold_reason);
            reply.repeated = true;
            reply.epsilon_spent = 0.0;
            reply.delta_spent = 0.0;
            return Ok(reply);
        }
        // A slot before the charge: a full engine refuses for free.
        let admission = self.state.engine.admit(project.id.as_str()).await?;
        let policy = self.state.engine.policy();
        let reserved = store.reserve(&Charge {
            project: &project.id,
            dataset: &policy.dataset,
            user: &who.user,
            epsilon: plan.epsilon(),
            delta: plan.delta(),
            plan_hash: plan.plan_hash(),
            today: tre_store::today(),
            lifetime_epsilon: policy.budget.lifetime_epsilon,
            lifetime_delta: policy.budget.lifetime_delta,
        })?;
        // From here on the budget is spent, whatever happens.
        note.ledger_id = Some(reserved.ledger_id);
        note.epsilon_nanos = plan.epsilon().as_nanos();
        note.delta_femtos = plan.delta().as_femtos();
        fault("/*tre-fault:charged*/", plan.sql());
        let release = match self.state.engine.execute_admitted(plan, &admission).await {
            Ok(r) => r,
            Err(e) => {
                if let QueryError::Execution { detail } = &e {
                    note.detail = detail.clone();
                }
                return Err(e.into());
            }
        };
        let body = serde_json::to_string(&release)?;
        let id = uuid::Uuid::new_v4().to_string();
        let created_at = tre_store::now();
        let body_hash = chain::sha256_hex(body.as_bytes());
        let cells = cell_counts(&release);
        let manifest = self.manifest(&Signed {
            id: &id,
            who,
            project,
            plan,
            release: &release,
            cells,
            created_at: &created_at,
            table_sha256: &body_hash,
        })?;
        let hold = policy.review.hold_reason(
            (cells.released + cells.rounded + cells.suppressed) as usize,
            cells.suppressed > 0,
            release.exact_rules_applied,
        );
        let stored = StoredRelease {
            id,
            project: project.id.to_string(),
            user: who.user.to_string(),
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
        };
        note.release_id = stored.id.clone();
        note.release_hash = stored.body_hash.clone();
        if stored.status == ReleaseStatus::Held {
            note.detail = format!("held for review: {}", stored.hold_reason);
        }
        let event = self.event(call, note, None);
        store.commit_release(reserved.ledger_id, &stored, &event)?;
        note.recorded = true;
        let mut reply = convert::release(
            stored.id.clone(),
            &release,
            reserved.epsilon_remaining,
            reserved.delta_remaining,
        );
        convert::set_status(&mut reply, stored.status, &stored.hold_reason);
        Ok(reply)
    }

    /// The signed manifest of a release, as JSON.
    fn manifest(&self, s: &Signed<'_>) -> Result<String, GatewayError> {
        let engine = &self.state.engine;
        let signed = Manifest {
            format: tre_store::manifest::FORMAT.to_owned(),
            release_id: s.id.to_owned(),
            project: s.project.id.to_string(),
            user: s.who.user.to_string(),
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
                    tre_query::Cell::Value { status, reason, .. } if reason.is_empty() => {
                        Some(status.as_str().to_owned())
                    }
                    tre_query::Cell::Value { status, reason, .. } => {
                        Some(format!("{}: {reason}", status.as_str()))
                    }
                    tre_query::Cell::Key { .. } => None,
                })
                .collect(),
            sdc_outcome: s.release.sdc_outcome.as_str().to_owned(),
            exact_rules_applied: s.release.exact_rules_applied,
            engine_version: concat!("tre ", env!("CARGO_PKG_VERSION")).to_owned(),
            table_sha256: s.table_sha256.to_owned(),
        }
        .sign(&*self.state.notary)
        .map_err(|e| ServerFault::Signing(format!("a release manifest: {e}")))?;
        Ok(serde_json::to_string(&signed)?)
    }

    async fn dry_run(
        &self,
        who: &Principal,
        req: &pb::QueryRequest,
        note: &mut Note,
    ) -> Result<pb::DryRunResponse, GatewayError> {
        let (project, plan) = self.compile(who, req, note).await?;
        Ok(pb::DryRunResponse {
            plan: plan.description().to_vec(),
            columns: plan.columns().iter().map(convert::column).collect(),
            epsilon: plan.epsilon().value(),
            epsilon_remaining: project.remaining(),
            cells: plan.cells().map(|c| c as u64),
            plan_hash: plan.plan_hash().to_owned(),
            delta: plan.delta().value(),
            public_keys: plan.public_keys(),
            selected_keys: plan.selected_keys(),
        })
    }

    fn budget(
        &self,
        who: &Principal,
        req: &pb::BudgetRequest,
    ) -> Result<pb::BudgetResponse, GatewayError> {
        let p = self.state.store.project(&ProjectId::new(&req.project)?)?;
        authz::project_scope(who, &p, false)?;
        Ok(convert::budget(&p))
    }

    fn describe_table(
        &self,
        req: &pb::DescribeTableRequest,
    ) -> Result<pb::DescribeTableResponse, GatewayError> {
        let policy = self.state.engine.policy();
        if !req.dataset.is_empty() && req.dataset != policy.dataset {
            return Err(GatewayError::NotFound(format!(
                "no dataset '{}'; list datasets first",
                req.dataset
            )));
        }
        policy
            .table(&req.table)
            .map(|t| convert::table(policy, t))
            .ok_or_else(|| {
                GatewayError::NotFound(format!(
                    "no table '{}' in dataset '{}'",
                    req.table, policy.dataset
                ))
            })
    }
}

/// Test builds only (`fault-injection`): panic where a query's SQL holds
/// `marker`, so tests can show a panic still leaves its audit event and
/// settles its charge. Compiled out of every other build.
#[cfg(feature = "fault-injection")]
fn fault(marker: &str, sql: &str) {
    if sql.contains(marker) {
        panic!("injected fault {marker}");
    }
}

#[cfg(not(feature = "fault-injection"))]
fn fault(_marker: &str, _sql: &str) {}

/// The release a stored body holds; one that no longer parses means the
/// store is damaged.
pub(crate) fn stored_body(stored: &StoredRelease) -> Result<Release, GatewayError> {
    serde_json::from_str(&stored.body).map_err(|source| {
        ServerFault::StoredRelease {
            id: stored.id.clone(),
            source,
        }
        .into()
    })
}

/// Value cells of a release by disclosure status.
fn cell_counts(release: &Release) -> CellCounts {
    let mut c = CellCounts::default();
    for cell in release.rows.iter().flatten() {
        if let tre_query::Cell::Value { status, .. } = cell {
            match status {
                tre_query::CellStatus::Suppressed => c.suppressed += 1,
                tre_query::CellStatus::Rounded => c.rounded += 1,
                tre_query::CellStatus::Released => c.released += 1,
            }
        }
    }
    c
}

#[tonic::async_trait]
impl QueryService for Services {
    async fn submit(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        handle!(self, request, Rpc::Submit, |call, who, req, note| self
            .submit(&call, &who, &req, note))
    }

    async fn dry_run(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        handle!(self, request, Rpc::DryRun, |_call, who, req, note| self
            .dry_run(&who, &req, note))
    }

    async fn budget(
        &self,
        request: Request<pb::BudgetRequest>,
    ) -> Result<Response<pb::BudgetResponse>, Status> {
        handle!(self, request, Rpc::Budget, |_call, who, req, _note| async {
            self.budget(&who, &req)
        })
    }
}

#[tonic::async_trait]
impl CatalogService for Services {
    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::ListDatasets,
            |_call, _who, _req, _note| async {
                Ok(pb::ListDatasetsResponse {
                    datasets: vec![convert::dataset(self.state.engine.policy())],
                })
            }
        )
    }

    async fn describe_table(
        &self,
        request: Request<pb::DescribeTableRequest>,
    ) -> Result<Response<pb::DescribeTableResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::DescribeTable,
            |_call, _who, req, _note| async { self.describe_table(&req) }
        )
    }
}

/// What a release manifest is made from.
struct Signed<'a> {
    id: &'a str,
    who: &'a Principal,
    project: &'a tre_store::Project,
    plan: &'a tre_query::PrivatePlan,
    release: &'a Release,
    cells: CellCounts,
    created_at: &'a str,
    table_sha256: &'a str,
}
