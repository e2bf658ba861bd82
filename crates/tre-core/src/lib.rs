//! The shared vocabulary of tre: validated privacy parameters (`Epsilon`),
//! identifiers (`ProjectId`, `UserId`), roles and principals, and the stable
//! error codes every crate reports with.
//!
//! This crate owns no behaviour and does no IO. It must never depend on any
//! other tre crate, on DataFusion, on tonic or on a database: everything else
//! depends on it, so it has to stay small and cheap to compile.

use std::fmt;

use serde::{Deserialize, Serialize};

mod code;

pub use code::Code;

/// Errors raised while validating raw values into domain types.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoreError {
    #[error("{code} epsilon must be a finite number greater than 0 and at most 1e6, got {value}; pass a positive epsilon such as 0.5", code = self.code())]
    InvalidEpsilon { value: f64 },
    #[error("{code} {what} '{value}' is not valid: {why}", code = self.code())]
    InvalidId {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{code} delta must be a finite number in [0, 1e-3], got {value}; pass a small delta such as 1e-7, or 0 for pure epsilon", code = self.code())]
    InvalidDelta { value: f64 },
    /// A budget someone asked for, smaller than the ledger can record.
    #[error("{code} {what} {value} is below the smallest amount the ledger records, {min}; ask for at least {min}{or_zero}", code = self.code())]
    BelowLedgerGrain {
        what: &'static str,
        value: f64,
        min: f64,
        or_zero: &'static str,
    },
    #[error("{code} unknown role '{0}'; use one of researcher, custodian, auditor, admin", code = self.code())]
    UnknownRole(String),
}

impl CoreError {
    /// The stable code, written once: the message's prefix comes from here.
    pub fn code(&self) -> Code {
        match self {
            CoreError::InvalidEpsilon { .. }
            | CoreError::InvalidDelta { .. }
            | CoreError::BelowLedgerGrain { .. } => Code::InvalidEpsilon,
            CoreError::InvalidId { .. } | CoreError::UnknownRole(_) => Code::InvalidIdentifier,
        }
    }
}

/// A privacy-loss parameter: finite and strictly positive.
///
/// Budgets are kept in the ledger as integer nano-epsilon (`as_nanos`) so that
/// composition by addition is exact and a budget can never drift by rounding.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Epsilon(f64);

impl Epsilon {
    pub const NANOS_PER_UNIT: f64 = 1e9;
    /// The largest ε any budget or query may name. Far beyond any privacy
    /// guarantee, it keeps `as_nanos` exact: a larger value would saturate
    /// the ledger's integer (issue #11: 1e300 became about 9.2e9).
    pub const MAX: f64 = 1e6;

    pub fn new(value: f64) -> Result<Self, CoreError> {
        if value.is_finite() && value > 0.0 && value <= Self::MAX {
            Ok(Self(value))
        } else {
            Err(CoreError::InvalidEpsilon { value })
        }
    }

    /// An ε a person asks for (a query's, a project's, a policy's cap): also
    /// at least one unit of the ledger, so it is recorded as asked rather
    /// than rounded up (issue #11). Splits of it inside a query may be
    /// smaller; they use [`Epsilon::new`].
    pub fn requested(value: f64) -> Result<Self, CoreError> {
        let e = Self::new(value)?;
        if value < 1.0 / Self::NANOS_PER_UNIT {
            return Err(CoreError::BelowLedgerGrain {
                what: "epsilon",
                value,
                min: 1.0 / Self::NANOS_PER_UNIT,
                or_zero: "",
            });
        }
        Ok(e)
    }

    pub fn value(self) -> f64 {
        self.0
    }

    /// The ledger's integer representation, rounded up so that charging
    /// never undercounts.
    pub fn as_nanos(self) -> i64 {
        (self.0 * Self::NANOS_PER_UNIT).ceil() as i64
    }

    pub fn from_nanos(nanos: i64) -> f64 {
        nanos as f64 / Self::NANOS_PER_UNIT
    }
}

impl TryFrom<f64> for Epsilon {
    type Error = CoreError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Epsilon> for f64 {
    fn from(e: Epsilon) -> f64 {
        e.0
    }
}

impl fmt::Display for Epsilon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The probability δ with which an (ε, δ) guarantee may fail: finite, in
/// `[0, 1e-3]` (anything larger is not a privacy guarantee worth the name).
/// Zero means pure ε-DP.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Delta(f64);

impl Delta {
    pub const ZERO: Delta = Delta(0.0);
    /// The ledger keeps δ in units of 1e-15 so sums are exact integers.
    pub const FEMTOS_PER_UNIT: f64 = 1e15;

    pub fn new(value: f64) -> Result<Self, CoreError> {
        if value.is_finite() && (0.0..=1e-3).contains(&value) {
            Ok(Self(value))
        } else {
            Err(CoreError::InvalidDelta { value })
        }
    }

    /// A δ a person asks for: zero, or at least one unit of the ledger
    /// (issue #11: 5e-324 reached the key-selection threshold as an
    /// internal error). Splits inside a query use [`Delta::new`].
    pub fn requested(value: f64) -> Result<Self, CoreError> {
        let d = Self::new(value)?;
        if value != 0.0 && value < 1.0 / Self::FEMTOS_PER_UNIT {
            return Err(CoreError::BelowLedgerGrain {
                what: "delta",
                value,
                min: 1.0 / Self::FEMTOS_PER_UNIT,
                or_zero: ", or 0 for pure epsilon",
            });
        }
        Ok(d)
    }

    pub fn value(self) -> f64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }

    /// Rounded up so that charging never undercounts.
    pub fn as_femtos(self) -> i64 {
        (self.0 * Self::FEMTOS_PER_UNIT).ceil() as i64
    }

    pub fn from_femtos(femtos: i64) -> f64 {
        femtos as f64 / Self::FEMTOS_PER_UNIT
    }
}

impl TryFrom<f64> for Delta {
    type Error = CoreError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Delta> for f64 {
    fn from(d: Delta) -> f64 {
        d.0
    }
}

impl fmt::Display for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}", self.0)
    }
}

fn validate_name(what: &'static str, value: &str) -> Result<(), CoreError> {
    let bad = |why| CoreError::InvalidId {
        what,
        value: value.chars().take(64).collect(),
        why,
    };
    if value.is_empty() || value.len() > 64 {
        return Err(bad("it must be 1 to 64 characters long"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
    {
        return Err(bad("use only letters, digits, '_', '-', '.' and '@'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, CoreError> {
                let value = value.into();
                validate_name($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = CoreError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A research project: the unit that owns a privacy budget.
    ProjectId,
    "project id"
);
name_type!(
    /// A person who calls the service.
    UserId,
    "user id"
);

/// What a caller may do. The authorisation matrix lives in the gateway; this
/// is only the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Researcher,
    Custodian,
    Auditor,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Researcher,
        Role::Custodian,
        Role::Auditor,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::Custodian => "custodian",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| CoreError::UnknownRole(s.chars().take(32).collect()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a call, as its audit event records it: the audit log's
/// vocabulary, shared by every crate that writes or filters events
/// (issue #12). The log keeps it as text, so that a tampered event stays
/// readable and is reported as tampered by the chain check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The call did what it asked (a release, a decision, a read).
    Allowed,
    /// Refused before anything was charged or changed.
    Refused,
    /// Failed after its charge: the charge stands, and it is an incident.
    Failed,
    /// The caller went away before the call finished.
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Allowed,
        Outcome::Refused,
        Outcome::Failed,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The outcome of a call that did not succeed: cancelled if the caller
    /// went away, failed once something was charged, refused otherwise.
    pub fn of_failure(cancelled: bool, charged: bool) -> Self {
        match (cancelled, charged) {
            (true, _) => Outcome::Cancelled,
            (false, true) => Outcome::Failed,
            (false, false) => Outcome::Refused,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub role: Role,
    /// For a custodian: the datasets they hold, whose projects and
    /// releases they may decide on. `None` (a token issued without a
    /// scope) holds every dataset the gateway serves.
    pub custodian_of: Option<Vec<String>>,
}

impl Principal {
    /// A principal whose token carries no dataset scope.
    pub fn new(user: UserId, role: Role) -> Self {
        Self {
            user,
            role,
            custodian_of: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_is_cancelled_then_failed_then_refused() {
        assert_eq!(Outcome::of_failure(true, true), Outcome::Cancelled);
        assert_eq!(Outcome::of_failure(true, false), Outcome::Cancelled);
        assert_eq!(Outcome::of_failure(false, true), Outcome::Failed);
        assert_eq!(Outcome::of_failure(false, false), Outcome::Refused);
    }

    #[test]
    fn epsilon_rejects_non_positive_and_non_finite() {
        // 1e300 and just above the maximum: issue #11, where a saturating
        // cast turned 1e300 into a ledger entry of about 9.2e9.
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1.000_001e6] {
            assert!(Epsilon::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Epsilon::new(0.5).map(Epsilon::value), Ok(0.5));
        let max = Epsilon::new(Epsilon::MAX).unwrap_or_else(|_| unreachable!());
        assert_eq!(max.as_nanos(), 1_000_000_000_000_000);
    }

    #[test]
    fn epsilon_nanos_round_up() {
        let e = Epsilon::new(0.1).unwrap_or_else(|_| unreachable!());
        assert_eq!(e.as_nanos(), 100_000_000);
        let third = Epsilon::new(1.0 / 3.0).unwrap_or_else(|_| unreachable!());
        assert_eq!(third.as_nanos(), 333_333_334);
    }

    #[test]
    fn names_are_validated() {
        assert!(ProjectId::new("demo").is_ok());
        assert!(ProjectId::new("").is_err());
        assert!(ProjectId::new("a b").is_err());
        assert!(UserId::new("x".repeat(65)).is_err());
        assert_eq!("auditor".parse::<Role>(), Ok(Role::Auditor));
        assert!("root".parse::<Role>().is_err());
    }
}
