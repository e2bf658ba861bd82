//! The query engine's API boundary: a researcher's SQL goes in, a
//! [`Release`] comes out. Inside: a DataFusion sandbox that sees only the
//! policy's tables and decrypts extracts in memory; the compiler that checks
//! a plan against the policy and rewrites it into a [`PrivatePlan`]
//! (contribution bounding, clamping, mechanisms, epsilon split); execution,
//! OpenDP noise and disclosure control.
//!
//! Exact aggregates never leave this crate: `execute` returns only noisy,
//! disclosure-checked cells. It knows nothing of gRPC or of the ledger (the
//! caller reserves budget between `compile` and `execute`), and must never
//! depend on tonic, tre-store or tre-gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tre_core::Code;
use tre_policy::Policy;
use tre_sdc::Profile;
use tre_vault::MasterKey;

mod compile;
mod execute;
mod release;
mod sandbox;

pub use compile::{Measure, OutputKind, PrivatePlan};
pub use release::{Cell, Release, ReleaseColumn};
pub use sandbox::FACTORY_ID;

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
    #[error("{code} the query failed while running; its cost has been charged and the details are in the audit log", code = Code::ExecutionFailed)]
    Execution { detail: String },
    /// The engine could not start: a bad extract, key or policy mismatch.
    #[error("{code} {message}")]
    Setup { code: Code, message: String },
    #[error(transparent)]
    Vault(#[from] tre_vault::VaultError),
    /// A bug: an invariant of the compiler or the release was broken.
    #[error("{code} internal error: {0}", code = Code::Internal)]
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
            QueryError::Vault(v) => match v {
                tre_vault::VaultError::MasterKey(_) => Code::MasterKey,
                tre_vault::VaultError::WrongMasterKey { .. } => Code::WrongMasterKey,
                tre_vault::VaultError::Unreadable { .. } => Code::ExtractUnreadable,
                tre_vault::VaultError::Crypto(_) => Code::Internal,
            },
            QueryError::Internal(_) => Code::Internal,
        }
    }
}

/// Limits on the sandbox. Defaults suit the 2-core reference machine.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: usize,
    pub target_partitions: usize,
    /// Refuse plans whose public group keys multiply to more cells.
    pub max_cells: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 4 << 30,
            target_partitions: 2,
            max_cells: 10_000,
        }
    }
}

/// A dataset opened for private querying.
pub struct Engine {
    policy: Arc<Policy>,
    profile: Arc<Profile>,
    sandbox: sandbox::Sandbox,
    limits: Limits,
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
        let sandbox = sandbox::Sandbox::open(&policy, data_dir, master, &limits)?;
        Ok(Self {
            policy,
            profile: Arc::new(profile),
            sandbox,
            limits,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn data_dir(&self) -> &PathBuf {
        self.sandbox.data_dir()
    }

    /// A fresh sandboxed session (for benchmarks and tests that need plain
    /// DataFusion over the same decrypted extracts). Never hand it to a
    /// researcher: it executes anything.
    pub fn sandbox_context(&self) -> datafusion::prelude::SessionContext {
        self.sandbox.context()
    }

    /// Parse, check and rewrite. Touches no data and costs nothing.
    pub async fn compile(
        &self,
        sql: &str,
        epsilon: tre_core::Epsilon,
    ) -> Result<PrivatePlan, QueryError> {
        let ctx = self.sandbox.context();
        compile::compile(&ctx, &self.policy, &self.limits, sql, epsilon).await
    }

    /// Run a compiled plan and release noisy, disclosure-checked cells.
    /// Call only after the plan's cost has been reserved.
    pub async fn execute(&self, plan: &PrivatePlan) -> Result<Release, QueryError> {
        let ctx = self.sandbox.context();
        execute::execute(&ctx, plan, &self.profile).await
    }
}
