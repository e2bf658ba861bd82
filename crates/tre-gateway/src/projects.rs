//! ProjectService: researchers request projects; custodians who are not
//! involved decide on them.

use chrono::NaiveDate;
use tonic::{Request, Response, Status};
use tre_core::{Delta, Epsilon, Principal, ProjectId, UserId};
use tre_proto::v1 as pb;
use tre_proto::v1::project_service_server::ProjectService;
use tre_release::off_worker;
use tre_store::{Decision, Project, ProjectRequest, ProjectStatus};

use crate::authz::{self, Rpc};
use crate::service::{Call, Note, Services, handle};
use crate::{GatewayError, convert};

fn date(field: &str, s: &str) -> Result<NaiveDate, GatewayError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
        GatewayError::BadRequest(format!("{field} '{s}' is not a date; write YYYY-MM-DD"))
    })
}

fn reason(s: &str) -> Result<&str, GatewayError> {
    if s.trim().is_empty() {
        Err(GatewayError::BadRequest(
            "give a reason; it is recorded in the project's history and the audit log".into(),
        ))
    } else {
        Ok(s)
    }
}

impl Services {
    fn request_project(
        &self,
        who: &Principal,
        req: pb::RequestProjectRequest,
        note: &mut Note,
    ) -> Result<pb::ProjectInfo, GatewayError> {
        let engines = self.state.engines.now();
        if let Some(unknown) = req.datasets.iter().find(|d| !engines.serves(d)) {
            return Err(GatewayError::BadRequest(format!(
                "no dataset '{unknown}' on this server; list datasets first"
            )));
        }
        let mut members = req
            .members
            .iter()
            .map(UserId::new)
            .collect::<Result<Vec<_>, _>>()?;
        if members.is_empty() {
            members.push(who.user.clone());
        }
        let request = ProjectRequest {
            id: ProjectId::new(&req.id)?,
            title: req.title,
            purpose: req.purpose,
            datasets: req.datasets,
            epsilon: Epsilon::requested(req.epsilon)?,
            delta: Delta::requested(req.delta)?,
            members,
            end_date: date("end_date", &req.end_date)?,
            requested_by: who.user.clone(),
        };
        note.detail = format!(
            "requested epsilon {} delta {} until {} for {}",
            request.epsilon,
            request.delta,
            request.end_date,
            request.datasets.join(",")
        );
        let p = off_worker(|| {
            self.state
                .store
                .request_project(&request, tre_store::today())
        })?;
        Ok(convert::project(&p))
    }

    fn list_projects(
        &self,
        who: &Principal,
        req: &pb::ListProjectsRequest,
    ) -> Result<pb::ListProjectsResponse, GatewayError> {
        let status = match req.status.as_str() {
            "" => None,
            s => Some(ProjectStatus::parse(s).ok_or_else(|| {
                GatewayError::BadRequest(format!(
                    "unknown status '{s}'; use requested, active, rejected, suspended or revoked"
                ))
            })?),
        };
        let projects = self
            .state
            .store
            .projects()?
            .into_iter()
            .filter(|p| status.is_none_or(|s| p.status == s))
            .filter(|p| authz::project_scope(who, p, false).is_ok())
            .map(|p| convert::project(&p))
            .collect();
        Ok(pb::ListProjectsResponse { projects })
    }

    fn get_project(&self, who: &Principal, id: &str) -> Result<pb::ProjectInfo, GatewayError> {
        let p = self.state.store.project(&ProjectId::new(id)?)?;
        authz::project_scope(who, &p, false)?;
        Ok(convert::project(&p))
    }

    /// Every custodian decision: the caller must not be involved. The
    /// decision and its audit event commit together.
    fn decide(
        &self,
        call: &Call,
        who: &Principal,
        id: &str,
        reason: &str,
        note: &mut Note,
        decision: impl FnOnce(&Project) -> Result<Decision, GatewayError>,
    ) -> Result<pb::ProjectInfo, GatewayError> {
        let id = ProjectId::new(id)?;
        let p = self.state.store.project(&id)?;
        authz::not_own_project(&who.user, &p)?;
        authz::custodian_scope(who, &p)?;
        let decision = decision(&p)?;
        note.detail = match &decision {
            Decision::Approve {
                epsilon,
                delta,
                end_date,
            } => format!("approve epsilon {epsilon} delta {delta} until {end_date}: {reason}"),
            Decision::TopUp { epsilon, delta } => {
                format!("top up epsilon {epsilon} delta {delta}: {reason}")
            }
            d => format!("{}: {reason}", d.action()),
        };
        let event = self.event(call, note, None);
        let p = off_worker(|| {
            self.state
                .store
                .decide(&id, &decision, &who.user, reason, &event)
        })?;
        note.recorded = true;
        Ok(convert::project(&p))
    }
}

impl Services {
    /// Reject, suspend, resume or revoke: a status change with a reason.
    async fn change_status(
        &self,
        request: Request<pb::DecideProjectRequest>,
        rpc: Rpc,
        decision: Decision,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        handle!(self, request, rpc, |call, who, req, note| async {
            let why = reason(&req.reason)?;
            self.decide(&call, &who, &req.id, why, note, |_| Ok(decision))
        })
    }
}

#[tonic::async_trait]
impl ProjectService for Services {
    async fn request_project(
        &self,
        request: Request<pb::RequestProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        handle!(
            self,
            request,
            Rpc::RequestProject,
            |_call, who, req, note| async { self.request_project(&who, req, note) }
        )
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::ListProjects,
            |_call, who, req, _note| async { self.list_projects(&who, &req) }
        )
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        handle!(
            self,
            request,
            Rpc::GetProject,
            |_call, who, req, _note| async { self.get_project(&who, &req.id) }
        )
    }

    async fn approve_project(
        &self,
        request: Request<pb::ApproveProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        handle!(
            self,
            request,
            Rpc::ApproveProject,
            |call, who, req, note| async {
                let why = reason(&req.reason)?;
                self.decide(&call, &who, &req.id, why, note, |p| {
                    Ok(Decision::Approve {
                        epsilon: match req.epsilon {
                            Some(e) => Epsilon::requested(e)?,
                            None => Epsilon::new(Epsilon::from_nanos(p.requested_epsilon_nanos))?,
                        },
                        delta: match req.delta {
                            Some(d) => Delta::requested(d)?,
                            None => Delta::new(Delta::from_femtos(p.requested_delta_femtos))?,
                        },
                        end_date: if req.end_date.is_empty() {
                            p.requested_end
                        } else {
                            date("end_date", &req.end_date)?
                        },
                    })
                })
            }
        )
    }

    async fn reject_project(
        &self,
        request: Request<pb::DecideProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        self.change_status(request, Rpc::RejectProject, Decision::Reject)
            .await
    }

    async fn suspend_project(
        &self,
        request: Request<pb::DecideProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        self.change_status(request, Rpc::SuspendProject, Decision::Suspend)
            .await
    }

    async fn resume_project(
        &self,
        request: Request<pb::DecideProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        self.change_status(request, Rpc::ResumeProject, Decision::Resume)
            .await
    }

    async fn revoke_project(
        &self,
        request: Request<pb::DecideProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        self.change_status(request, Rpc::RevokeProject, Decision::Revoke)
            .await
    }

    async fn top_up_project(
        &self,
        request: Request<pb::TopUpProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        handle!(
            self,
            request,
            Rpc::TopUpProject,
            |call, who, req, note| async {
                let why = reason(&req.reason)?;
                self.decide(&call, &who, &req.id, why, note, |_| {
                    Ok(Decision::TopUp {
                        epsilon: Epsilon::requested(req.epsilon)?,
                        delta: Delta::requested(req.delta)?,
                    })
                })
            }
        )
    }
}
