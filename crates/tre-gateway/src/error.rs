//! Gateway errors and their one mapping to gRPC status.

use tonic::{Code as GrpcCode, Status};
use tre_core::Code;
use tre_query::QueryError;
use tre_store::StoreError;

/// What went wrong on the server's side, by name: never the caller's to
/// fix, always shown to them as the generic `TRE-I001`.
#[derive(Debug, thiserror::Error)]
pub enum ServerFault {
    /// The server cannot start or keep serving (listening address, TLS,
    /// plaintext off loopback). The operator's to fix.
    #[error("{code} the server cannot serve: {0}", code = self.code())]
    Startup(String),
    /// A key file could not be read, created or parsed.
    #[error("{code} key file {path}: {reason}", code = self.code())]
    KeyFile { path: String, reason: String },
    #[error("{code} the system random source failed", code = self.code())]
    Random,
    #[error("{code} cannot sign: {0}", code = self.code())]
    Signing(String),
    /// A release, manifest or log page could not be written as JSON.
    #[error("{code} cannot encode JSON: {0}", code = self.code())]
    Json(#[from] serde_json::Error),
    /// The release pipeline's own failure (a stored release unreadable, a
    /// manifest unsigned, a panic in a query).
    #[error(transparent)]
    Release(#[from] tre_release::Fault),
    /// The task running a Submit ended without an answer.
    #[error("{code} the query task failed: {0}", code = self.code())]
    TaskFailed(#[from] tokio::task::JoinError),
    /// A bug: the handler panicked. The details go to the audit log.
    #[error("{code} internal error: the handler panicked: {0}", code = self.code())]
    Panicked(String),
}

impl ServerFault {
    /// Every server fault shows the caller only `TRE-I001`.
    pub fn code(&self) -> Code {
        match self {
            ServerFault::Startup(_)
            | ServerFault::KeyFile { .. }
            | ServerFault::Random
            | ServerFault::Signing(_)
            | ServerFault::Json(_)
            | ServerFault::Release(_)
            | ServerFault::TaskFailed(_)
            | ServerFault::Panicked(_) => Code::Internal,
        }
    }
}

impl From<serde_json::Error> for GatewayError {
    fn from(e: serde_json::Error) -> Self {
        GatewayError::Server(ServerFault::Json(e))
    }
}

/// The pipeline's errors keep their codes: a refusal stays the caller's,
/// a fault stays the server's.
impl From<tre_release::ReleaseError> for GatewayError {
    fn from(e: tre_release::ReleaseError) -> Self {
        match e {
            tre_release::ReleaseError::Query(e) => GatewayError::Query(e),
            tre_release::ReleaseError::Store(e) => GatewayError::Store(e),
            tre_release::ReleaseError::Cancelled => GatewayError::Cancelled,
            tre_release::ReleaseError::Fault(f) => GatewayError::Server(ServerFault::Release(f)),
        }
    }
}

impl From<tokio::task::JoinError> for GatewayError {
    fn from(e: tokio::task::JoinError) -> Self {
        GatewayError::Server(ServerFault::TaskFailed(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{code} {0}", code = self.code())]
    Unauthenticated(String),
    #[error("{code} the token has expired; ask the operator for a new one", code = self.code())]
    TokenExpired,
    #[error("{code} the token has been revoked; ask the operator for a new one", code = self.code())]
    TokenRevoked,
    #[error("{code} {0}", code = self.code())]
    PermissionDenied(String),
    #[error("{code} {0}", code = self.code())]
    OwnProject(String),
    #[error("{code} {0}", code = self.code())]
    NotFound(String),
    #[error("{code} {0}", code = self.code())]
    BadRequest(String),
    #[error(transparent)]
    Core(#[from] tre_core::CoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server's own failure; the caller sees only a generic text.
    #[error(transparent)]
    Server(#[from] ServerFault),
    /// The client cancelled the call, or its deadline passed, before the
    /// call finished.
    #[error("{code} {}", tre_release::CANCELLED, code = self.code())]
    Cancelled,
    /// Flight SQL: the release was made (and charged) but is not released
    /// to the researcher; a table cannot carry that, so it is an error.
    #[error("{code} {}", not_released(id, *status, reason), code = self.code())]
    NotReleased {
        id: String,
        status: tre_store::ReleaseStatus,
        reason: String,
    },
    /// Flight SQL: a ticket or prepared-statement handle this caller does
    /// not hold (expired, closed, forged or someone else's).
    #[error("{code} no {0} under this handle for you: it expired or was closed; run the statement again (an identical query is not charged twice)", code = self.code())]
    UnknownHandle(&'static str),
    /// The transport refused the request before a handler read it.
    #[error("{code} the request was refused before it was read ({message}); send a well-formed request, within the server's size limit, to a method tre serves", code = self.code())]
    Rejected { grpc: GrpcCode, message: String },
}

fn not_released(id: &str, status: tre_store::ReleaseStatus, reason: &str) -> String {
    match status {
        tre_store::ReleaseStatus::Held => format!(
            "release {id} is awaiting review by a custodian ({reason}); its charge stands; follow it with `tre release show {id}`"
        ),
        other => format!(
            "release {id} is not released ({}); see `tre release show {id}`",
            other.as_str()
        ),
    }
}

impl GatewayError {
    pub fn code(&self) -> Code {
        match self {
            GatewayError::Unauthenticated(_) => Code::Unauthenticated,
            GatewayError::TokenExpired => Code::TokenExpired,
            GatewayError::TokenRevoked => Code::TokenRevoked,
            GatewayError::PermissionDenied(_) => Code::PermissionDenied,
            GatewayError::OwnProject(_) => Code::OwnProject,
            GatewayError::NotFound(_) => Code::UnknownTable,
            GatewayError::BadRequest(_) => Code::InvalidArgument,
            GatewayError::Core(e) => e.code(),
            GatewayError::Query(q) => q.code(),
            GatewayError::Store(s) => s.code(),
            GatewayError::Server(f) => f.code(),
            GatewayError::Cancelled => Code::Cancelled,
            GatewayError::NotReleased {
                status: tre_store::ReleaseStatus::Held,
                ..
            } => Code::ReleaseHeld,
            GatewayError::NotReleased { .. } => Code::ReleaseNotAvailable,
            GatewayError::UnknownHandle(_) => Code::UnknownHandle,
            GatewayError::Rejected { .. } => Code::RequestRejected,
        }
    }

    /// Whether the caller sees only a generic text (the details go to the
    /// operator's log and the audit event). Exhaustive, so a new variant
    /// must decide (issue #12).
    pub fn is_internal(&self) -> bool {
        match self {
            GatewayError::Query(q) => q.is_internal(),
            GatewayError::Store(s) => s.is_internal(),
            GatewayError::Server(_) => true,
            GatewayError::Unauthenticated(_)
            | GatewayError::TokenExpired
            | GatewayError::TokenRevoked
            | GatewayError::PermissionDenied(_)
            | GatewayError::OwnProject(_)
            | GatewayError::NotFound(_)
            | GatewayError::BadRequest(_)
            | GatewayError::Core(_)
            | GatewayError::Cancelled
            | GatewayError::NotReleased { .. }
            | GatewayError::UnknownHandle(_)
            | GatewayError::Rejected { .. } => false,
        }
    }

    /// The one place errors become statuses. The message always starts with
    /// the stable code; internal details are replaced by a generic text.
    pub fn into_status(self) -> Status {
        let code = self.code();
        let internal = self.is_internal();
        if internal {
            // For the operator; the caller sees a generic message.
            tracing::error!("internal error: {self}");
        }
        let grpc = match &self {
            GatewayError::Unauthenticated(_)
            | GatewayError::TokenExpired
            | GatewayError::TokenRevoked => GrpcCode::Unauthenticated,
            GatewayError::PermissionDenied(_) | GatewayError::OwnProject(_) => {
                GrpcCode::PermissionDenied
            }
            GatewayError::Core(_) | GatewayError::BadRequest(_) => GrpcCode::InvalidArgument,
            GatewayError::NotFound(_) => GrpcCode::NotFound,
            GatewayError::Query(q) => match q {
                QueryError::Refused {
                    code: Code::Busy, ..
                } => GrpcCode::Unavailable,
                QueryError::Refused { .. } => GrpcCode::InvalidArgument,
                QueryError::Joint(tre_policy::JointError::Malformed(_)) => GrpcCode::Internal,
                QueryError::Joint(_) => GrpcCode::FailedPrecondition,
                QueryError::Execution { .. } => GrpcCode::Internal,
                QueryError::Setup { .. }
                | QueryError::Vault(_)
                | QueryError::Extract(_)
                | QueryError::Internal(_) => GrpcCode::Internal,
            },
            GatewayError::Store(s) => match s {
                StoreError::UnknownProject(_) | StoreError::DatasetNotApproved { .. } => {
                    GrpcCode::PermissionDenied
                }
                StoreError::ProjectExists(_) => GrpcCode::AlreadyExists,
                StoreError::UnknownRelease(_) => GrpcCode::NotFound,
                StoreError::ReleaseNotHeld { .. } => GrpcCode::FailedPrecondition,
                StoreError::ProjectNotActive { .. }
                | StoreError::ProjectExpired { .. }
                | StoreError::InvalidTransition { .. } => GrpcCode::FailedPrecondition,
                StoreError::InvalidRequest(_) => GrpcCode::InvalidArgument,
                StoreError::BudgetExhausted { .. }
                | StoreError::DeltaExhausted { .. }
                | StoreError::LifetimeExhausted(_) => GrpcCode::ResourceExhausted,
                StoreError::Sqlite(_)
                | StoreError::Corrupt(_)
                | StoreError::Poisoned
                | StoreError::PreGovernanceState => GrpcCode::Internal,
            },
            GatewayError::Server(_) => GrpcCode::Internal,
            GatewayError::Cancelled => GrpcCode::Cancelled,
            GatewayError::NotReleased { .. } => GrpcCode::FailedPrecondition,
            GatewayError::UnknownHandle(_) => GrpcCode::NotFound,
            GatewayError::Rejected { grpc, .. } => *grpc,
        };
        let message = if internal {
            format!("{code} internal error; the operator can find the details in the audit log")
        } else {
            self.to_string()
        };
        let mut status = Status::new(grpc, message);
        if let Ok(v) = code.as_str().parse() {
            status.metadata_mut().insert("tre-code", v);
        }
        status
    }
}
