use super::*;

const SHIPPED: &str = include_str!("../../../policies/nhs_epr.toml");

const BASE: &str = r#"
[dataset]
name = "d"
privacy_unit = "person_id"
sdc_profile = "nhs_sde"
exclude_opted_out = "patients.opt_out"

[budget]
default_epsilon_per_query = 0.5
max_epsilon_per_query = 1.0
project_epsilon = 10.0
lifetime_epsilon = 50.0

[tables.patients]
max_rows_per_unit = 1
columns.person_id = { class = "identifier" }
columns.sex = { class = "categorical", values = ["F", "M"] }
columns.opt_out = { class = "categorical", values = [true, false] }
columns.yob = { class = "numeric", bounds = [1900, 2024] }
columns.dod = { class = "date", bounds = ["2020-01-01", "2024-12-31"] }
"#;

#[test]
fn shipped_policy_is_valid() {
    let p = Policy::from_toml("policies/nhs_epr.toml", SHIPPED).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.budget.min_epsilon_per_query.value(), 0.01);
    let base = Policy::from_toml("base.toml", BASE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        base.budget.min_epsilon_per_query.value(),
        0.01,
        "the floor defaults to 0.01"
    );
    assert_eq!(p.privacy_unit, "person_id");
    assert_eq!(p.tables.len(), 4);
    assert_eq!(p.table("admissions").map(|t| t.max_rows_per_unit), Some(5));
}

#[test]
fn base_policy_parses_into_types() {
    let p = Policy::from_toml("base.toml", BASE).unwrap_or_else(|e| panic!("{e}"));
    let t = p.table("patients").unwrap_or_else(|| panic!("no patients"));
    assert_eq!(
        t.column("opt_out").map(|c| &c.class),
        Some(&ColumnClass::Categorical {
            domain: Some(vec!["true".into(), "false".into()])
        })
    );
    assert_eq!(
        t.column("dod").map(|c| &c.class),
        Some(&ColumnClass::Date {
            lo: 18262,
            hi: 20088
        })
    );
}

/// Each mutation of the base policy must fail naming this field.
#[test]
fn invalid_policies_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "max_rows_per_unit = 1",
            "max_rows_per_unit = 0",
            "tables.patients.max_rows_per_unit",
        ),
        (
            "bounds = [1900, 2024]",
            "bounds = [2024, 1900]",
            "tables.patients.columns.yob.bounds",
        ),
        (
            "bounds = [1900, 2024]",
            "bounds = [1900]",
            "tables.patients.columns.yob.bounds",
        ),
        (
            "values = [\"F\", \"M\"]",
            "values = []",
            "tables.patients.columns.sex.values",
        ),
        (
            "values = [\"F\", \"M\"]",
            "values = [\"F\", \"F\"]",
            "tables.patients.columns.sex.values",
        ),
        (
            "class = \"identifier\"",
            "class = \"numeric\", bounds = [0, 1]",
            "tables.patients.columns.person_id",
        ),
        (
            "{ class = \"categorical\", values = [\"F\", \"M\"] }",
            "{ class = \"secret\" }",
            "tables.patients.columns.sex.class",
        ),
        (
            "max_epsilon_per_query = 1.0",
            "max_epsilon_per_query = 0.1",
            "budget.default_epsilon_per_query",
        ),
        (
            "project_epsilon = 10.0",
            "project_epsilon = -1.0",
            "budget.project_epsilon",
        ),
        // Issue #10: the per-query floor is a positive epsilon no larger
        // than the default.
        (
            "default_epsilon_per_query = 0.5",
            "min_epsilon_per_query = 0.6\ndefault_epsilon_per_query = 0.5",
            "budget.min_epsilon_per_query",
        ),
        (
            "default_epsilon_per_query = 0.5",
            "min_epsilon_per_query = 0.0\ndefault_epsilon_per_query = 0.5",
            "budget.min_epsilon_per_query",
        ),
        (
            "lifetime_epsilon = 50.0",
            "lifetime_epsilon = 5.0",
            "budget.project_epsilon",
        ),
        (
            "\"patients.opt_out\"",
            "\"patients.sex\"",
            "dataset.exclude_opted_out",
        ),
        (
            "\"2020-01-01\"",
            "\"2020-13-01\"",
            "tables.patients.columns.dod.bounds",
        ),
        (
            "privacy_unit = \"person_id\"",
            "privacy_unit = \"pid\"",
            "tables.patients.columns",
        ),
        // Issue #13: a cap on distinct values is for a column without a
        // public domain, and is at least one.
        (
            "values = [\"F\", \"M\"] }",
            "values = [\"F\", \"M\"], max_distinct = 2 }",
            "tables.patients.columns.sex.max_distinct",
        ),
        (
            "{ class = \"numeric\", bounds = [1900, 2024] }",
            "{ class = \"numeric\", bounds = [1900, 2024], max_distinct = 9 }",
            "tables.patients.columns.yob.max_distinct",
        ),
        (
            "columns.sex = { class = \"categorical\", values = [\"F\", \"M\"] }",
            "columns.sex = { class = \"categorical\", max_distinct = 0 }",
            "tables.patients.columns.sex.max_distinct",
        ),
        // Issue #15: what a draft leaves to the custodian is refused until
        // decided, wherever it stands; out_of_bounds only where there are
        // bounds, and only clamp or reject.
        (
            "bounds = [1900, 2024]",
            "bounds = \"TODO: the oldest and newest plausible year of birth\"",
            "tables.patients.columns.yob.bounds",
        ),
        (
            "values = [\"F\", \"M\"]",
            "values = [\"F\", \"TODO\"]",
            "tables.patients.columns.sex.values",
        ),
        (
            "bounds = [1900, 2024] }",
            "bounds = [1900, 2024], out_of_bounds = \"drop\" }",
            "tables.patients.columns.yob.out_of_bounds",
        ),
        (
            "values = [\"F\", \"M\"] }",
            "values = [\"F\", \"M\"], out_of_bounds = \"reject\" }",
            "tables.patients.columns.sex.out_of_bounds",
        ),
    ];
    for (from, to, field) in cases {
        assert!(BASE.contains(from), "{from}");
        let text = BASE.replacen(from, to, 1);
        let err = Policy::from_toml("bad.toml", &text).expect_err(to);
        assert_eq!(&err.field, field, "{to}: {err}");
        let shown = err.to_string();
        assert!(shown.starts_with("bad.toml: TRE-P001"), "{shown}");
    }
}

#[test]
fn unknown_keys_are_refused() {
    let text = BASE.replace("[budget]", "[budget]\nsurprise = 1");
    assert!(Policy::from_toml("bad.toml", &text).is_err());
}

#[test]
fn dates_parse_to_unix_days() {
    for (s, d) in [
        ("1970-01-01", Some(0)),
        ("2000-03-01", Some(11017)),
        ("2024-12-31", Some(20088)),
        ("2024-02-30x", None),
        // Days that do not exist are refused, not rolled over (issue #11).
        ("2024-02-31", None),
        ("2023-02-29", None),
        ("2024-02-29", Some(19782)),
        ("2024-04-31", None),
        ("0000-01-01", None),
    ] {
        assert_eq!(parse_date(s), d, "{s}");
    }
}

/// Issue #15: datasets may be queried together only when they hold one
/// person under one unit, and then under each rule at its strictest.
#[test]
fn joint_policies_need_one_unit_and_take_the_strictest_rules() {
    let policy = |name: &str, extra: &str| {
        let text = BASE
            .replace("name = \"d\"", &format!("name = \"{name}\"\n{extra}"))
            .replace("max_epsilon_per_query = 1.0", "max_epsilon_per_query = 0.8");
        Policy::from_toml(&format!("{name}.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
    };
    let linked = "linkage = \"nhs_number\"\nmax_groups_per_unit = 4";
    let a = policy("a", linked);
    let mut b = policy("b", "linkage = \"nhs_number\"");
    b.review.mode = ReviewMode::Always;
    b.review.approvals = 2;
    b.budget.min_epsilon_per_query = Epsilon::new(0.1).unwrap_or_else(|e| panic!("{e}"));
    let j = Policy::joint(&[&b, &a]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(j.dataset, "a+b");
    assert_eq!(
        j.tables.keys().collect::<Vec<_>>(),
        ["a.patients", "b.patients"]
    );
    assert_eq!(
        j.table("b.patients").map(|t| t.name.as_str()),
        Some("b.patients")
    );
    assert_eq!(
        j.covers()
            .iter()
            .map(|p| p.dataset.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(j.opt_out, None, "each part keeps its own opt-outs");
    assert_eq!(j.max_groups_per_unit, 1);
    assert_eq!(j.review.mode, ReviewMode::Always);
    assert_eq!(j.review.approvals, 2);
    assert_eq!(j.budget.min_epsilon_per_query.value(), 0.1);
    assert_eq!(j.budget.max_epsilon_per_query.value(), 0.8);
    assert_eq!(j.budget.default_epsilon_per_query.value(), 0.5);
    assert_eq!(a.covers().len(), 1);

    let unlinked = policy("c", "");
    let refused = Policy::joint(&[&a, &unlinked]).err();
    assert_eq!(refused, Some(JointError::NoLinkage("c".into())));
    assert!(
        refused
            .map(|e| e.to_string())
            .is_some_and(|m| m.starts_with("TRE-Q035 dataset 'c' declares no linkage")),
    );
    let other = policy("e", "linkage = \"local_mrn\"");
    assert!(matches!(
        Policy::joint(&[&a, &other]),
        Err(JointError::DifferentUnits { b, .. }) if b == "e"
    ));
    let mut apart = policy("f", "linkage = \"nhs_number\"");
    apart.budget.min_epsilon_per_query = Epsilon::new(0.9).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        Policy::joint(&[&a, &apart]),
        Err(JointError::Caps(_))
    ));
    assert!(matches!(
        Policy::joint(&[&a]),
        Err(JointError::Malformed(_))
    ));
    assert!(matches!(
        Policy::joint(&[&a, &a]),
        Err(JointError::Malformed(_))
    ));
    assert!(matches!(
        Policy::joint(&[&j, &a]),
        Err(JointError::Malformed(_))
    ));
    assert!(
        Policy::from_toml(
            "x.toml",
            &BASE.replace("name = \"d\"", "name = \"d\"\nlinkage = \"NHS\"")
        )
        .is_err()
    );
    // Names a query uses for the engine's own catalog and schemas.
    for reserved in ["public", "datafusion", "information_schema"] {
        let text = BASE.replace("name = \"d\"", &format!("name = \"{reserved}\""));
        assert!(Policy::from_toml("x.toml", &text).is_err(), "{reserved}");
    }
}
