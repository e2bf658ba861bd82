//! Stable error codes. A code never changes meaning once released: clients,
//! runbooks and the audit log key on it. Add new codes; never renumber.

use std::fmt;

macro_rules! codes {
    ($($(#[$m:meta])* $name:ident = $text:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code { $($(#[$m])* $name,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$name,)*];
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$name => $text,)* }
            }
            pub fn parse(s: &str) -> Option<Code> {
                Code::ALL.iter().copied().find(|c| c.as_str() == s)
            }
        }
    };
}

codes! {
    // Authentication and authorisation.
    Unauthenticated = "TRE-A001",
    PermissionDenied = "TRE-A002",
    UnknownProject = "TRE-A003",
    TokenExpired = "TRE-A004",
    TokenRevoked = "TRE-A005",
    /// A custodian deciding on a project they requested or belong to.
    OwnProject = "TRE-A006",
    /// The transport policy (mTLS) rejected the caller. Retired: a missing
    /// or untrusted client certificate fails the TLS handshake, before any
    /// call exists to carry a code.
    ClientCertificate = "TRE-A007",

    // Project governance.
    ProjectNotActive = "TRE-G001",
    ProjectExpired = "TRE-G002",
    InvalidTransition = "TRE-G003",
    ProjectExists = "TRE-G004",
    DatasetNotApproved = "TRE-G005",
    InvalidProjectRequest = "TRE-G006",

    // The airlock.
    UnknownRelease = "TRE-R001",
    ReleaseNotHeld = "TRE-R002",
    /// The release exists but was not approved (rejected, changes
    /// requested, withdrawn). gRPC answers it with its status and no rows;
    /// Flight SQL, which has no place for a status beside a table, refuses.
    ReleaseNotAvailable = "TRE-R003",
    /// The release was made and charged, and waits for a custodian's
    /// review (Flight SQL; gRPC answers with its status).
    ReleaseHeld = "TRE-R004",
    /// No stored result or prepared statement under this handle for this
    /// caller: it expired, was closed, or is someone else's.
    UnknownHandle = "TRE-R005",

    // Input validation of identifiers and parameters.
    InvalidIdentifier = "TRE-C001",
    InvalidEpsilon = "TRE-C002",
    InvalidArgument = "TRE-C003",

    // The query compiler: user errors and policy refusals.
    SqlSyntax = "TRE-Q001",
    MultipleStatements = "TRE-Q002",
    StatementNotAllowed = "TRE-Q003",
    ExplainNotAllowed = "TRE-Q004",
    TableFunction = "TRE-Q005",
    UnknownTable = "TRE-Q006",
    FilePath = "TRE-Q007",
    RowLevelSelect = "TRE-Q010",
    IdentifierInOutput = "TRE-Q011",
    IdentifierInGroupBy = "TRE-Q012",
    /// Retired (issue #3): a group key without a public domain is released
    /// through private key selection instead of being refused.
    GroupKeyNotPublic = "TRE-Q013",
    UnsupportedAggregate = "TRE-Q014",
    UnboundedColumn = "TRE-Q015",
    UnsupportedShape = "TRE-Q016",
    JoinNotOnPrivacyUnit = "TRE-Q017",
    UnsupportedJoin = "TRE-Q018",
    UnsupportedExpression = "TRE-Q019",
    FunctionNotAllowed = "TRE-Q020",
    IdentifierInFilter = "TRE-Q021",
    TooManyGroups = "TRE-Q022",
    KeySelectionNeedsDelta = "TRE-Q023",
    CrossJoin = "TRE-Q024",
    SubqueryNotAllowed = "TRE-Q025",
    PrivacyUnitLost = "TRE-Q026",
    IdentifierInExpression = "TRE-Q027",
    TotalsShape = "TRE-Q028",
    /// The expressions could cost more work per row (or per patient) than
    /// the bound that keeps run time from depending on one patient.
    TooMuchWork = "TRE-Q029",
    /// The same group key twice.
    DuplicateGroupKey = "TRE-Q030",
    /// More SQL text or tokens than one query may have.
    SqlTooLong = "TRE-Q031",
    /// Deeper expressions, or more SELECTs, tables or columns, than one
    /// query may have.
    QueryTooComplex = "TRE-Q032",
    /// Planning took longer than the compile limit.
    CompileTimeout = "TRE-Q033",
    /// The query's plans could need more memory than a query may use.
    TooMuchMemory = "TRE-Q034",
    /// A query names datasets that do not hold one person under one unit
    /// (the same privacy unit and linkage), or whose per-query limits do
    /// not overlap (issue #15).
    DatasetsNotLinkable = "TRE-Q035",

    // Budget.
    BudgetExhausted = "TRE-B001",
    EpsilonAboveCap = "TRE-B002",
    DeltaAboveCap = "TRE-B003",
    DeltaBudgetExhausted = "TRE-B004",
    DatasetLifetimeExhausted = "TRE-B005",
    /// Below the policy's per-query floor: probing must cost something.
    EpsilonBelowFloor = "TRE-B006",

    // Policy files.
    PolicyInvalid = "TRE-P001",

    // Keys and extracts.
    MasterKey = "TRE-V001",
    WrongMasterKey = "TRE-V002",
    ExtractUnreadable = "TRE-V003",
    /// An extract tre's writer did not write: plaintext, a plaintext
    /// footer, no layout, or rows out of order or without a unit.
    ExtractLayout = "TRE-V004",
    /// An import's input file cannot be read as the policy says: names the
    /// file, the line or row group, the column and the fix (issue #15).
    ImportInput = "TRE-V005",
    /// An import's input does not match its policy: a table without a
    /// file, a declared column missing, the output named otherwise than
    /// the dataset.
    ImportSchema = "TRE-V006",

    // Failures after data was touched: generic by design.
    ExecutionFailed = "TRE-E001",

    // Capacity and transport: the server's state, not the query's.
    /// Every query slot stayed busy for the queue wait; nothing charged.
    Busy = "TRE-S001",
    /// The client cancelled the call (or its deadline passed).
    Cancelled = "TRE-S002",
    /// The transport refused the request before any handler read it:
    /// undecodable, too large, bad headers or an unknown method.
    RequestRejected = "TRE-S003",

    // Bugs and infrastructure.
    Internal = "TRE-I001",
    Storage = "TRE-I002",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "duplicate {c}");
            assert_eq!(Code::parse(c.as_str()), Some(*c));
        }
    }
}
