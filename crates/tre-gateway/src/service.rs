//! The gRPC handlers. Each call authenticates, authorises, does its work and
//! appends exactly one audit event, whatever the outcome.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tre_core::{Epsilon, Principal, ProjectId, Role};
use tre_proto::v1 as pb;
use tre_proto::v1::catalog_service_server::CatalogService;
use tre_proto::v1::query_service_server::QueryService;
use tre_query::Budget;
use tre_query::QueryError;
use tre_store::{AuditEvent, Project};

use crate::{AppState, GatewayError, convert};

#[derive(Clone)]
pub(crate) struct Services {
    pub(crate) state: Arc<AppState>,
}

/// What the audit event records about a finished call.
#[derive(Default)]
struct Outcome {
    epsilon: f64,
    release_id: String,
    detail: String,
}

impl Services {
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
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            GatewayError::Unauthenticated(
                "the authorization header must be `Bearer <token>`".into(),
            )
        })?;
        self.state.issuer.verify(token.trim())
    }

    /// The authorisation rule for project calls: a researcher who is a
    /// member of the project, and the project is on this server's dataset.
    fn authorise_project(&self, who: &Principal, project: &str) -> Result<Project, GatewayError> {
        if who.role != Role::Researcher {
            return Err(GatewayError::PermissionDenied(format!(
                "role {} cannot query data; only researchers in an approved project can",
                who.role
            )));
        }
        let id = ProjectId::new(project)?;
        let p = self.state.store.project(&id)?;
        if !p.members.contains(&who.user) {
            return Err(GatewayError::PermissionDenied(format!(
                "you are not a member of project '{project}'; ask its custodian to add you"
            )));
        }
        if p.dataset != self.state.engine.policy().dataset {
            return Err(GatewayError::PermissionDenied(format!(
                "project '{project}' is not approved for dataset '{}'",
                self.state.engine.policy().dataset
            )));
        }
        Ok(p)
    }

    fn budget(&self, req: &pb::QueryRequest) -> Result<Budget, GatewayError> {
        Ok(self.state.engine.budget(req.epsilon, req.delta)?)
    }

    /// Append the call's audit event. If the log cannot be written the call
    /// fails: nothing may happen without a record.
    fn audit(
        &self,
        who: Option<&Principal>,
        project: &str,
        action: &str,
        sql: &str,
        result: &Result<(), &GatewayError>,
        outcome: Outcome,
    ) -> Result<(), Status> {
        let mut e = AuditEvent::new(
            who.map(|p| p.user.as_str()).unwrap_or("(unauthenticated)"),
            who.map(|p| p.role),
            project,
            action,
        );
        e.sql = sql.to_owned();
        e.epsilon_charged = outcome.epsilon;
        e.release_id = outcome.release_id;
        e.detail = outcome.detail;
        match result {
            Ok(()) => e.outcome = "allowed".into(),
            Err(err) => {
                e.outcome = if outcome.epsilon > 0.0 {
                    "failed"
                } else {
                    "refused"
                }
                .into();
                e.code = err.code().as_str().into();
                if e.detail.is_empty() {
                    e.detail = err.to_string();
                }
            }
        }
        self.state
            .store
            .append_audit(&e)
            .map(|_| ())
            .map_err(|err| GatewayError::from(err).into_status())
    }

    async fn submit(
        &self,
        who: &Principal,
        req: &pb::QueryRequest,
        outcome: &mut Outcome,
    ) -> Result<pb::QueryResponse, GatewayError> {
        let project = self.authorise_project(who, &req.project)?;
        let budget = self.budget(req)?;
        let plan = self.state.engine.compile(&req.sql, budget).await?;
        let (ledger_id, remaining) =
            self.state
                .store
                .reserve(&project.id, plan.epsilon(), plan.plan_hash())?;
        // From here on the budget is spent, whatever happens.
        outcome.epsilon = plan.epsilon().value();
        let release = match self.state.engine.execute(&plan).await {
            Ok(r) => r,
            Err(e) => {
                if let QueryError::Execution { detail } = &e {
                    outcome.detail = detail.clone();
                }
                return Err(e.into());
            }
        };
        let release_id = uuid::Uuid::new_v4().to_string();
        let body =
            serde_json::to_string(&release).map_err(|e| GatewayError::Setup(e.to_string()))?;
        let mut event = AuditEvent::new(
            who.user.as_str(),
            Some(who.role),
            project.id.as_str(),
            "query.submit",
        );
        event.sql = req.sql.clone();
        event.outcome = "allowed".into();
        event.epsilon_charged = plan.epsilon().value();
        event.release_id = release_id.clone();
        event.detail = format!("plan {} delta {}", plan.plan_hash(), plan.delta());
        self.state
            .store
            .commit_release(&release_id, ledger_id, &body, &event)?;
        outcome.release_id = release_id.clone();
        Ok(convert::release(release_id, &release, remaining))
    }
}

/// The reason an authentication failed, without its code, so that each use
/// can wrap it once.
fn bare_reason(e: GatewayError) -> String {
    match e {
        GatewayError::Unauthenticated(reason) => reason,
        other => other.to_string(),
    }
}

#[tonic::async_trait]
impl QueryService for Services {
    async fn submit(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let who = self.authenticate(&request).map_err(bare_reason);
        let req = request.into_inner();
        let mut outcome = Outcome::default();
        let result = match &who {
            Ok(p) => self.submit(p, &req, &mut outcome).await,
            Err(_) => Err(GatewayError::Unauthenticated(String::new())),
        };
        match result {
            // The release and its audit event were committed together.
            Ok(resp) => Ok(Response::new(resp)),
            Err(err) => {
                let err = match (who.as_ref().err(), err) {
                    (Some(reason), _) => GatewayError::Unauthenticated(reason.clone()),
                    (None, e) => e,
                };
                self.audit(
                    who.as_ref().ok(),
                    &req.project,
                    "query.submit",
                    &req.sql,
                    &Err(&err),
                    outcome,
                )?;
                Err(err.into_status())
            }
        }
    }

    async fn dry_run(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        let who = self.authenticate(&request).map_err(bare_reason);
        let req = request.into_inner();
        let result = async {
            let who = who
                .as_ref()
                .map_err(|reason| GatewayError::Unauthenticated(reason.clone()))?;
            let project = self.authorise_project(who, &req.project)?;
            let budget = self.budget(&req)?;
            let plan = self.state.engine.compile(&req.sql, budget).await?;
            Ok::<_, GatewayError>(pb::DryRunResponse {
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
        .await;
        self.audit(
            who.as_ref().ok(),
            &req.project,
            "query.dry_run",
            &req.sql,
            &result.as_ref().map(|_| ()),
            Outcome::default(),
        )?;
        result.map(Response::new).map_err(GatewayError::into_status)
    }

    async fn budget(
        &self,
        request: Request<pb::BudgetRequest>,
    ) -> Result<Response<pb::BudgetResponse>, Status> {
        let who = self.authenticate(&request).map_err(bare_reason);
        let req = request.into_inner();
        let result = who
            .as_ref()
            .map_err(|reason| GatewayError::Unauthenticated(reason.clone()))
            .and_then(|who| self.authorise_project(who, &req.project))
            .map(|p| pb::BudgetResponse {
                project: p.id.to_string(),
                epsilon_budget: Epsilon::from_nanos(p.budget_nanos),
                epsilon_spent: p.spent(),
                epsilon_remaining: p.remaining(),
            });
        self.audit(
            who.as_ref().ok(),
            &req.project,
            "budget.show",
            "",
            &result.as_ref().map(|_| ()),
            Outcome::default(),
        )?;
        result.map(Response::new).map_err(GatewayError::into_status)
    }
}

#[tonic::async_trait]
impl CatalogService for Services {
    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let who = self.authenticate(&request).map_err(bare_reason);
        let result = who
            .as_ref()
            .map_err(|reason| GatewayError::Unauthenticated(reason.clone()))
            .map(|_| pb::ListDatasetsResponse {
                datasets: vec![convert::dataset(self.state.engine.policy())],
            });
        self.audit(
            who.as_ref().ok(),
            "",
            "catalog.list",
            "",
            &result.as_ref().map(|_| ()),
            Outcome::default(),
        )?;
        result.map(Response::new).map_err(GatewayError::into_status)
    }

    async fn describe_table(
        &self,
        request: Request<pb::DescribeTableRequest>,
    ) -> Result<Response<pb::DescribeTableResponse>, Status> {
        let who = self.authenticate(&request).map_err(bare_reason);
        let req = request.into_inner();
        let policy = self.state.engine.policy();
        let result = who
            .as_ref()
            .map_err(|reason| GatewayError::Unauthenticated(reason.clone()))
            .and_then(|_| {
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
            });
        self.audit(
            who.as_ref().ok(),
            "",
            "catalog.describe",
            &req.table,
            &result.as_ref().map(|_| ()),
            Outcome::default(),
        )?;
        result.map(Response::new).map_err(GatewayError::into_status)
    }
}
