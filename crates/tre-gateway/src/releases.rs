//! ReleaseService: the airlock (custodians review held releases, the
//! researcher may withdraw one) and signed release manifests.

use tonic::{Request, Response, Status};
use tre_core::{Principal, ProjectId};
use tre_proto::v1 as pb;
use tre_proto::v1::release_service_server::ReleaseService;
use tre_store::{ReleaseStatus, ReviewAction, StoredRelease};

use crate::authz::{self, Rpc};
use crate::service::{Call, Note, Services, handle};
use crate::{GatewayError, ServerFault, convert};

impl Services {
    fn stored_release(
        &self,
        id: &str,
    ) -> Result<(StoredRelease, tre_store::Project), GatewayError> {
        let r = self
            .state
            .store
            .release(id)?
            .ok_or_else(|| tre_store::StoreError::UnknownRelease(id.to_owned()))?;
        let p = self.state.store.project(&ProjectId::new(&r.project)?)?;
        Ok((r, p))
    }

    /// Independent approvals a held release needs: its dataset's policy
    /// says (its manifest names the dataset); if that cannot be read, the
    /// most any served dataset asks.
    fn approvals_for(&self, r: &StoredRelease) -> u8 {
        let engines = self.state.engines.now();
        serde_json::from_str::<tre_store::manifest::SignedManifest>(&r.manifest)
            .ok()
            .and_then(|m| engines.get(&m.manifest.dataset))
            .map(|e| e.policy().review.approvals)
            .unwrap_or_else(|| {
                engines
                    .iter()
                    .map(|e| e.policy().review.approvals)
                    .max()
                    .unwrap_or(2)
            })
    }

    fn get_release(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<pb::GetReleaseResponse, GatewayError> {
        let (r, p) = self.stored_release(id)?;
        authz::project_scope(who, &p, false)?;
        let body = tre_release::stored_body(&r).map_err(ServerFault::Release)?;
        let mut reply = convert::release(r.id.clone(), &body, p.remaining(), p.delta_remaining());
        // A custodian who may review it sees a held table; everyone else,
        // a custodian on the project included, only once released.
        let reviewer = authz::may_review(who, &p);
        let visible = r.status == ReleaseStatus::Released || reviewer;
        let rows = std::mem::take(&mut reply.rows);
        convert::set_status(&mut reply, r.status, &r.hold_reason);
        if visible {
            reply.rows = rows;
        }
        Ok(pb::GetReleaseResponse {
            release: Some(reply),
            manifest_json: if visible {
                r.manifest.clone()
            } else {
                String::new()
            },
            table_json: if visible {
                r.body.clone()
            } else {
                String::new()
            },
            public_key: hex::encode(self.state.store.audit_public_key()),
            reviews: convert::reviews(&r.reviews),
            // Findings on exact data are for the reviewing custodian alone.
            review_notes: if reviewer {
                r.review_notes.clone()
            } else {
                Vec::new()
            },
        })
    }

    fn list_releases(
        &self,
        who: &Principal,
        req: &pb::ListReleasesRequest,
    ) -> Result<pb::ListReleasesResponse, GatewayError> {
        // An unknown number (a newer client) is refused, never read as
        // "no filter".
        let status = pb::ReleaseStatus::try_from(req.status)
            .map(convert::release_status_filter)
            .map_err(|_| {
                GatewayError::BadRequest(format!(
                    "unknown release status {}; use released, held, rejected, withdrawn or changes_requested",
                    req.status
                ))
            })?;
        let project = (!req.project.is_empty()).then_some(req.project.as_str());
        let mut out = Vec::new();
        for r in self.state.store.releases(project, status)? {
            let p = self.state.store.project(&ProjectId::new(&r.project)?)?;
            if authz::project_scope(who, &p, false).is_ok() {
                out.push(convert::release_summary(&r));
            }
        }
        Ok(pb::ListReleasesResponse { releases: out })
    }

    /// One airlock step. Custodians decide only on projects they are not
    /// involved in; only a member may withdraw.
    fn review(
        &self,
        call: &Call,
        who: &Principal,
        req: &pb::ReviewReleaseRequest,
        action: ReviewAction,
        note: &mut Note,
    ) -> Result<pb::ReleaseSummary, GatewayError> {
        let (r, p) = self.stored_release(&req.id)?;
        note.project = p.id.to_string();
        if action == ReviewAction::Withdraw {
            authz::project_scope(who, &p, true)?;
        } else {
            authz::not_own_project(&who.user, &p)?;
            authz::custodian_scope(who, &p)?;
        }
        if action != ReviewAction::Approve && req.reason.trim().is_empty() {
            return Err(GatewayError::BadRequest(
                "give a reason; the researcher sees it and it is recorded in the audit log".into(),
            ));
        }
        let required = self.approvals_for(&r);
        // The decision and its audit event commit together.
        let event = self.event(call, note, None);
        let r = tre_release::off_worker(|| {
            self.state.store.review_release(
                &req.id,
                action,
                &who.user,
                &req.reason,
                required,
                &event,
            )
        })?;
        note.recorded = true;
        Ok(convert::release_summary(&r))
    }
}

impl Services {
    /// Approve, reject, request changes or withdraw: one airlock step.
    async fn reviewed(
        &self,
        request: Request<pb::ReviewReleaseRequest>,
        rpc: Rpc,
        action: ReviewAction,
    ) -> Result<Response<pb::ReleaseSummary>, Status> {
        handle!(self, request, rpc, |call, who, req, note| async {
            self.review(&call, &who, &req, action, note)
        })
    }
}

#[tonic::async_trait]
impl ReleaseService for Services {
    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::GetReleaseResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::GetRelease,
            |_call, who, req, _note| async { self.get_release(&who, &req.id) }
        )
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::ListReleases,
            |_call, who, req, _note| async { self.list_releases(&who, &req) }
        )
    }

    async fn approve_release(
        &self,
        request: Request<pb::ReviewReleaseRequest>,
    ) -> Result<Response<pb::ReleaseSummary>, Status> {
        self.reviewed(request, Rpc::ApproveRelease, ReviewAction::Approve)
            .await
    }

    async fn reject_release(
        &self,
        request: Request<pb::ReviewReleaseRequest>,
    ) -> Result<Response<pb::ReleaseSummary>, Status> {
        self.reviewed(request, Rpc::RejectRelease, ReviewAction::Reject)
            .await
    }

    async fn request_changes(
        &self,
        request: Request<pb::ReviewReleaseRequest>,
    ) -> Result<Response<pb::ReleaseSummary>, Status> {
        self.reviewed(request, Rpc::RequestChanges, ReviewAction::RequestChanges)
            .await
    }

    async fn withdraw_release(
        &self,
        request: Request<pb::ReviewReleaseRequest>,
    ) -> Result<Response<pb::ReleaseSummary>, Status> {
        self.reviewed(request, Rpc::WithdrawRelease, ReviewAction::Withdraw)
            .await
    }
}
