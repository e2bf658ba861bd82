//! The gRPC handlers. Every call goes through `begin` (authenticate, then
//! the authorisation matrix) and `finish` (exactly one audit event, then
//! the one error mapping), whatever the outcome.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tre_core::{Principal, ProjectId};
use tre_proto::v1 as pb;
use tre_proto::v1::catalog_service_server::CatalogService;
use tre_proto::v1::query_service_server::QueryService;
use tre_release::{Pipeline, Repeats};
use tre_store::{AuditEvent, chain};

use crate::authz::{self, Rpc};
use crate::{AppState, GatewayError, ServerFault, convert};

#[derive(Clone)]
pub(crate) struct Services {
    pub(crate) state: Arc<AppState>,
    /// One turn per (project, plan hash), shared by every Submit.
    repeats: Arc<Repeats>,
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
    /// The event was already written, atomically with the change it records.
    pub(crate) recorded: bool,
    /// The release pipeline writes the event (Submit, once its project is
    /// checked), whether or not the client waits for it.
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
    ($self:ident, $request:ident, $rpc:expr, |$call:ident, $who:ident, $req:ident, $note:ident| $body:expr) => {
        handle!(
            $self,
            $request,
            $rpc,
            $req = $request.into_inner(),
            |$call, $who, $note| $body
        )
    };
    // What the call is about is `$value` rather than the request's message
    // (Flight SQL: a command decoded beside the request, its headers).
    ($self:ident, $request:ident, $rpc:expr, $req:ident = $value:expr, |$call:ident, $who:ident, $note:ident| $body:expr) => {{
        let ($call, auth) = $self.begin(&$request, $rpc);
        let $req = $value;
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
        Err(panic) => Err(ServerFault::Panicked(tre_release::panic_message(&*panic)).into()),
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
            None => e.set_outcome(tre_core::Outcome::Allowed),
            Some(err) => {
                // The gateway never holds a charge: the pipeline settles it.
                e.set_outcome(tre_core::Outcome::of_failure(
                    matches!(err, GatewayError::Cancelled),
                    false,
                ));
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
        // Off the async worker: the event's commit waits for the disk. The
        // dropped-`Pending` path writes with a plain call instead.
        if let Err(e) =
            tre_release::off_worker(|| self.record(call, &mut note, result.as_ref().err()))
        {
            return Err(e.into_status());
        }
        result.map(Response::new).map_err(GatewayError::into_status)
    }

    /// Write the call's one audit event, unless it is written or handed
    /// off (a charge is only ever settled by the release pipeline).
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
        self.state.store.append_audit(&event)?;
        note.recorded = true;
        Ok(())
    }

    /// The project a researcher is querying, and the engine of the
    /// datasets the query runs on: a member, the project active, unexpired
    /// and approved for each of them (those `dataset` and `sql` name, or
    /// the project's only one served here).
    fn queryable_project(
        &self,
        who: &Principal,
        project: &str,
        dataset: Option<&str>,
        sql: &str,
    ) -> Result<(tre_store::Project, Arc<tre_query::Engine>), GatewayError> {
        let p = self.state.store.project(&ProjectId::new(project)?)?;
        authz::project_scope(who, &p, true)?;
        let today = tre_store::today();
        let served = self.state.engines.now();
        match served.for_project(&p, dataset, sql).map(Arc::clone) {
            Ok(engine) => {
                for part in engine.policy().covers() {
                    p.check_queryable(&part.dataset, today)?;
                }
                Ok((p, engine))
            }
            Err(e) => {
                // A suspended or expired project says so first.
                let named = dataset.unwrap_or(&served.first().policy().dataset);
                p.check_queryable(named, today)?;
                Err(e)
            }
        }
    }

    /// The release pipeline over `engine` and this server's store and key.
    fn pipeline<'a>(&'a self, engine: &'a tre_query::Engine) -> Pipeline<'a> {
        Pipeline {
            engine,
            store: &*self.state.store,
            notary: &*self.state.notary,
            repeats: &self.repeats,
        }
    }

    async fn submit(
        &self,
        call: &Call,
        who: &Principal,
        req: pb::QueryRequest,
        note: &mut Note,
    ) -> Result<pb::QueryResponse, GatewayError> {
        let project = req.project.clone();
        let dataset = (!req.dataset.is_empty()).then(|| req.dataset.clone());
        let released = self
            .release(
                call,
                who,
                &project,
                dataset.as_deref(),
                convert::query(req),
                note,
            )
            .await?;
        Ok(convert::released(&released))
    }

    /// Submit, whatever the transport: the one path from a researcher's
    /// query to a release (gRPC `Submit` and Flight SQL alike).
    pub(crate) async fn release(
        &self,
        call: &Call,
        who: &Principal,
        project: &str,
        dataset: Option<&str>,
        query: tre_release::Query,
        note: &mut Note,
    ) -> Result<tre_release::Released, GatewayError> {
        let (project, engine) = self.queryable_project(who, project, dataset, &query.sql)?;
        // From here the pipeline writes the event and settles any charge,
        // in a task of its own that runs whatever the client does. A client
        // that hangs up cancels it: before the charge nothing is spent;
        // after it the charge stands, the work stops and no release is made.
        note.handed_off = true;
        let caller = tre_release::Caller {
            who: who.clone(),
            client: call.client.clone(),
            action: call.rpc.action(),
        };
        let this = self.clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        let _cancel_when_dropped = cancel.clone().drop_guard();
        let started = std::time::Instant::now();
        let task = tokio::spawn(async move {
            let pipeline = this.pipeline(&engine);
            tokio::select! {
                biased;
                released = pipeline.submit(&caller, &project, &query) => released,
                // Dropping the pipeline's future records the cancel.
                () = cancel.cancelled() => Err(tre_release::ReleaseError::Cancelled),
            }
        });
        let released = task.await?;
        let result = match &released {
            Ok(r) if r.status == tre_store::ReleaseStatus::Released => "released",
            Ok(r) if r.status == tre_store::ReleaseStatus::Held => "held",
            Ok(_) => "not_released",
            Err(_) => "error",
        };
        self.state.metrics.release_took(started.elapsed(), result);
        Ok(released?)
    }

    /// Compile a researcher's query for a project they may query: what a
    /// dry run (and a Flight SQL prepare) does. Free, and touches no data.
    pub(crate) async fn plan(
        &self,
        who: &Principal,
        project: &str,
        dataset: Option<&str>,
        query: &tre_release::Query,
        note: &mut Note,
    ) -> Result<(tre_store::Project, tre_query::PrivatePlan), GatewayError> {
        let (project, engine) = self.queryable_project(who, project, dataset, &query.sql)?;
        let plan = self.pipeline(&engine).plan(query).await?;
        note.plan_hash = plan.plan_hash().to_owned();
        Ok((project, plan))
    }

    async fn dry_run(
        &self,
        who: &Principal,
        req: &pb::QueryRequest,
        note: &mut Note,
    ) -> Result<pb::DryRunResponse, GatewayError> {
        let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
        let (project, plan) = self
            .plan(
                who,
                &req.project,
                dataset,
                &convert::query(req.clone()),
                note,
            )
            .await?;
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
        let engines = self.state.engines.now();
        let policy = if req.dataset.is_empty() {
            // The first dataset that has the table (the only one, on a
            // single-dataset gateway).
            engines
                .iter()
                .map(tre_query::Engine::policy)
                .find(|p| p.table(&req.table).is_some())
                .unwrap_or_else(|| engines.first().policy())
        } else {
            engines
                .dataset(&req.dataset)
                .map(tre_query::Engine::policy)
                .ok_or_else(|| {
                    GatewayError::NotFound(format!(
                        "no dataset '{}'; list datasets first",
                        req.dataset
                    ))
                })?
        };
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

    /// The datasets a caller may see in the catalog: a researcher those
    /// their projects may query today; a custodian those they hold;
    /// auditors and admins every one served.
    pub(crate) fn visible_datasets(
        &self,
        who: &Principal,
    ) -> Result<Vec<Arc<tre_query::Engine>>, GatewayError> {
        let engines = self.state.engines.now();
        if who.role != tre_core::Role::Researcher {
            // A scoped custodian sees the datasets they hold.
            return Ok(engines
                .arcs()
                .filter(|e| {
                    who.role != tre_core::Role::Custodian
                        || who
                            .custodian_of
                            .as_ref()
                            .is_none_or(|held| held.contains(&e.policy().dataset))
                })
                .cloned()
                .collect());
        }
        let today = tre_store::today();
        let projects = self.state.store.projects()?;
        Ok(engines
            .arcs()
            .filter(|e| {
                projects.iter().any(|p| {
                    p.members.contains(&who.user)
                        && p.check_queryable(&e.policy().dataset, today).is_ok()
                })
            })
            .cloned()
            .collect())
    }
}

#[tonic::async_trait]
impl QueryService for Services {
    async fn submit(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        handle!(self, request, Rpc::Submit, |call, who, req, note| self
            .submit(&call, &who, req, note))
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
            |_call, who, _req, _note| async {
                let visible = self.visible_datasets(&who)?;
                let names: Vec<&str> = visible
                    .iter()
                    .map(|e| e.policy().dataset.as_str())
                    .collect();
                // Only datasets the caller may see are named as joinable.
                let joins_with = |name: &str| {
                    let mut joins = self.state.engines.now().joins_with(name);
                    joins.retain(|d| names.contains(&d.as_str()));
                    joins
                };
                Ok(pb::ListDatasetsResponse {
                    datasets: visible
                        .iter()
                        .map(|e| convert::dataset(e.policy(), joins_with(&e.policy().dataset)))
                        .collect(),
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
