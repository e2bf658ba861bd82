//! The authorisation matrix: which role may call which RPC, plus the two
//! rules that depend on the project. Every handler goes through here; no
//! other code decides who may do what.

use tre_core::{Principal, Role, UserId};
use tre_store::Project;

use crate::GatewayError;

/// Every RPC the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Submit,
    DryRun,
    Budget,
    ListDatasets,
    DescribeTable,
    RequestProject,
    ListProjects,
    GetProject,
    ApproveProject,
    RejectProject,
    SuspendProject,
    ResumeProject,
    RevokeProject,
    TopUpProject,
    ListEvents,
    VerifyLog,
    ExportLog,
    RevokeToken,
    GetRelease,
    ListReleases,
    ApproveRelease,
    RejectRelease,
    RequestChanges,
    WithdrawRelease,
    /// Flight SQL's ClosePreparedStatement (its other calls reuse the rows
    /// above: a prepare is a dry run, an execute a submit, a fetch a
    /// release read, metadata the catalog).
    ClosePrepared,
}

impl Rpc {
    pub const ALL: [Rpc; 25] = [
        Rpc::Submit,
        Rpc::DryRun,
        Rpc::Budget,
        Rpc::ListDatasets,
        Rpc::DescribeTable,
        Rpc::RequestProject,
        Rpc::ListProjects,
        Rpc::GetProject,
        Rpc::ApproveProject,
        Rpc::RejectProject,
        Rpc::SuspendProject,
        Rpc::ResumeProject,
        Rpc::RevokeProject,
        Rpc::TopUpProject,
        Rpc::ListEvents,
        Rpc::VerifyLog,
        Rpc::ExportLog,
        Rpc::RevokeToken,
        Rpc::GetRelease,
        Rpc::ListReleases,
        Rpc::ApproveRelease,
        Rpc::RejectRelease,
        Rpc::RequestChanges,
        Rpc::WithdrawRelease,
        Rpc::ClosePrepared,
    ];

    /// The matrix: (audit action, roles allowed). Custodians cannot query
    /// data; auditors only read; admins manage identity, not projects or
    /// data. An exhaustive match, so a new RPC cannot be added without a row.
    fn row(self) -> (&'static str, &'static [Role]) {
        use Role::{Admin as A, Auditor as U, Custodian as C, Researcher as R};
        match self {
            Rpc::Submit => ("query.submit", &[R]),
            Rpc::DryRun => ("query.dry_run", &[R]),
            Rpc::Budget => ("budget.show", &[R, C, U]),
            Rpc::ListDatasets => ("catalog.list", &[R, C, U, A]),
            Rpc::DescribeTable => ("catalog.describe", &[R, C, U, A]),
            Rpc::RequestProject => ("project.request", &[R]),
            Rpc::ListProjects => ("project.list", &[R, C, U]),
            Rpc::GetProject => ("project.show", &[R, C, U]),
            Rpc::ApproveProject => ("project.approve", &[C]),
            Rpc::RejectProject => ("project.reject", &[C]),
            Rpc::SuspendProject => ("project.suspend", &[C]),
            Rpc::ResumeProject => ("project.resume", &[C]),
            Rpc::RevokeProject => ("project.revoke", &[C]),
            Rpc::TopUpProject => ("project.topup", &[C]),
            Rpc::ListEvents => ("audit.list", &[U]),
            Rpc::VerifyLog => ("audit.verify", &[U]),
            Rpc::ExportLog => ("audit.export", &[U]),
            Rpc::RevokeToken => ("token.revoke", &[A]),
            Rpc::GetRelease => ("release.show", &[R, C]),
            Rpc::ListReleases => ("release.list", &[R, C]),
            Rpc::ApproveRelease => ("release.approve", &[C]),
            Rpc::RejectRelease => ("release.reject", &[C]),
            Rpc::RequestChanges => ("release.request_changes", &[C]),
            Rpc::WithdrawRelease => ("release.withdraw", &[R]),
            Rpc::ClosePrepared => ("query.close", &[R]),
        }
    }

    /// The RPC a gRPC method name (the last part of the request path)
    /// names: the proto's method names are the variants' names.
    pub fn from_method(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|r| format!("{r:?}") == name)
    }

    /// The audit log's name for this call.
    pub fn action(self) -> &'static str {
        self.row().0
    }

    pub fn allows(self, role: Role) -> bool {
        self.row().1.contains(&role)
    }
}

/// May this caller make this call at all?
pub fn authorise(who: &Principal, rpc: Rpc) -> Result<(), GatewayError> {
    if rpc.allows(who.role) {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(format!(
            "role {} may not call {}; {}",
            who.role,
            rpc.action(),
            match who.role {
                Role::Custodian => "custodians govern projects but cannot query data",
                Role::Auditor => "auditors only read the audit log, catalog and projects",
                Role::Admin => "admins manage identity, not projects, data or the log",
                Role::Researcher => "this needs a custodian, auditor or admin",
            }
        )))
    }
}

/// Researchers see and spend only their own projects; custodians and
/// auditors see all. `spend` additionally requires membership (a requester
/// who is not a member cannot query).
///
/// A researcher who is not involved in a project gets exactly the reply an
/// unknown id gets (`TRE-A003`), so ids of other projects cannot be probed
/// (issue #11).
pub fn project_scope(who: &Principal, p: &Project, spend: bool) -> Result<(), GatewayError> {
    if who.role == Role::Researcher && !p.involves(&who.user) {
        return Err(GatewayError::Store(tre_store::StoreError::UnknownProject(
            p.id.to_string(),
        )));
    }
    let ok = match who.role {
        // Involved, from the check above.
        Role::Researcher => !spend || p.members.contains(&who.user),
        Role::Custodian | Role::Auditor => !spend,
        Role::Admin => false,
    };
    if ok {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(format!(
            "you are not a member of project '{}'; ask its custodian to add you",
            p.id
        )))
    }
}

/// May this caller read a held release's table? Only a custodian who could
/// decide on it: not the project's own people, whatever their role.
pub fn may_review(who: &Principal, p: &Project) -> bool {
    who.role == Role::Custodian && !p.involves(&who.user) && custodian_scope(who, p).is_ok()
}

/// Nobody decides on a project they requested or belong to.
/// A custodian decides only for the datasets they hold: every dataset of
/// the project must be theirs (issue #15).
pub fn custodian_scope(who: &Principal, p: &Project) -> Result<(), GatewayError> {
    let Some(held) = &who.custodian_of else {
        return Ok(());
    };
    match p.datasets.iter().find(|d| !held.contains(d)) {
        None => Ok(()),
        Some(d) => Err(GatewayError::PermissionDenied(format!(
            "project '{}' uses dataset '{d}', which you are not a custodian of (you hold {}); its own custodian must decide",
            p.id,
            if held.is_empty() {
                "none".to_owned()
            } else {
                held.join(", ")
            }
        ))),
    }
}

pub fn not_own_project(who: &UserId, p: &Project) -> Result<(), GatewayError> {
    if p.involves(who) {
        Err(GatewayError::OwnProject(format!(
            "you requested or belong to project '{}', so another custodian must decide on it",
            p.id
        )))
    } else {
        Ok(())
    }
}
