//! Tidy checks (issue #12), in the spirit of rust-analyzer's: what
//! ARCHITECTURE.md and the house rules promise about the code's shape,
//! checked against the code itself, so the document cannot drift.
//!
//! - every crate's `lib.rs` opens with a `//!` header;
//! - no crate depends, directly or through others, on a crate that its row
//!   of ARCHITECTURE.md's code map names (in backticks) under "must never
//!   depend on"; every workspace crate has a row;
//! - every error code in `tre-core/src/code.rs` is used or marked retired;
//! - no `match` over one of our status types has a `_ =>` arm, so a new
//!   status makes the compiler point at every place that must decide it;
//! - exact aggregates stay behind tre-query's `soundness-testing` feature,
//!   which only the tests enable;
//! - one arrow: tre-extract's direct arrow dependency resolves to the
//!   version DataFusion uses (issue #13).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("tests/ has a parent"))
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_crate_has_a_header() {
    let crates = root().join("crates");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap_or_else(|e| panic!("{e}")) {
        let dir = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let lib = dir.join("src/lib.rs");
        let main = dir.join("src/main.rs");
        let file = if lib.exists() { lib } else { main };
        if !read(&file).starts_with("//!") {
            missing.push(file.display().to_string());
        }
    }
    assert!(missing.is_empty(), "no `//!` header: {missing:?}");
}

/// The code map's "must never depend on" column: crate → the backticked
/// names in it (`datafusion*` matches every crate whose name starts so).
fn forbidden_by_architecture() -> BTreeMap<String, Vec<String>> {
    let text = read(&root().join("ARCHITECTURE.md"));
    let mut rows = BTreeMap::new();
    let mut in_map = false;
    for line in text.lines() {
        if line.starts_with("| crate | owns | must never depend on |") {
            in_map = true;
            continue;
        }
        if in_map && !line.starts_with('|') {
            break;
        }
        if !in_map || line.starts_with("|---") {
            continue;
        }
        let cols: Vec<&str> = line.split(" | ").collect();
        // The crate is the first backticked name that is a package
        // (`tests/` (`tre-e2e`) names its directory first).
        let name = cols[0]
            .split('`')
            .skip(1)
            .step_by(2)
            .find(|n| n.starts_with("tre-"))
            .unwrap_or_else(|| panic!("no crate named in {line}"));
        let never = cols.last().unwrap_or(&"");
        let names = never
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        rows.insert(name.to_owned(), names);
    }
    rows
}

/// Each workspace crate's normal (not dev or build) dependencies, its own
/// and transitively, by `cargo metadata`.
struct Dependencies {
    direct: BTreeMap<String, BTreeSet<String>>,
    closure: BTreeMap<String, BTreeSet<String>>,
}

fn dependencies() -> Dependencies {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap_or_else(|| panic!("packages"))
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let from = node["id"].as_str().unwrap_or("");
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()));
            if normal {
                edges
                    .entry(from)
                    .or_default()
                    .push(dep["pkg"].as_str().unwrap_or(""));
            }
        }
    }
    let (mut direct, mut closure) = (BTreeMap::new(), BTreeMap::new());
    for member in meta["workspace_members"].as_array().into_iter().flatten() {
        let id = member.as_str().unwrap_or("");
        direct.insert(
            name_of[id].to_owned(),
            edges
                .get(id)
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|d| name_of[d].to_owned())
                .collect(),
        );
        let (mut seen, mut stack) = (BTreeSet::new(), vec![id]);
        while let Some(next) = stack.pop() {
            for &dep in edges.get(next).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(dep) {
                    stack.push(dep);
                }
            }
        }
        closure.insert(
            name_of[id].to_owned(),
            seen.iter().map(|d| name_of[d].to_owned()).collect(),
        );
    }
    Dependencies { direct, closure }
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The dependencies of `closure` that `forbidden` rules out.
fn violations(own: &str, closure: &BTreeSet<String>, forbidden: &[String]) -> Vec<String> {
    closure
        .iter()
        .filter(|dep| dep.as_str() != own && forbidden.iter().any(|f| matches(f, dep)))
        .cloned()
        .collect()
}

#[test]
fn no_crate_depends_on_what_architecture_forbids() {
    let forbidden = forbidden_by_architecture();
    let Dependencies {
        direct,
        closure: closures,
    } = dependencies();
    let unmapped: Vec<&String> = closures
        .keys()
        .filter(|c| !forbidden.contains_key(*c))
        .collect();
    assert!(
        unmapped.is_empty(),
        "crates without a row in ARCHITECTURE.md's code map: {unmapped:?}"
    );
    let mut broken = Vec::new();
    for (krate, never) in &forbidden {
        let closure = closures
            .get(krate)
            .unwrap_or_else(|| panic!("the code map names {krate}, which is not in the workspace"));
        let bad = violations(krate, closure, never);
        if !bad.is_empty() {
            broken.push(format!("{krate} depends on {bad:?}"));
        }
    }
    // `anyhow` only in the binary (house rule 4); other crates may reach
    // it through their dependencies, but never use it themselves.
    for (krate, deps) in &direct {
        if krate != "tre-cli" && deps.contains("anyhow") {
            broken.push(format!("{krate} uses anyhow; only the binary may"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    // The check itself can fail: the rule `tre-core` keeps bites on a
    // closure that breaks it.
    let core = &forbidden["tre-core"];
    assert!(
        !core.is_empty(),
        "tre-core's row names nothing it must avoid"
    );
    let broken_core: BTreeSet<String> = ["tre-store".to_owned()].into();
    assert_eq!(violations("tre-core", &broken_core, core), ["tre-store"]);
}

#[test]
fn every_error_code_is_used_or_retired() {
    let code_rs = root().join("crates/tre-core/src/code.rs");
    let text = read(&code_rs);
    let mut sources = String::new();
    for file in rust_files(&root().join("crates")) {
        if file != code_rs {
            sources.push_str(&read(&file));
        }
    }
    let mut docs = String::new();
    let mut unused = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(doc) = line.strip_prefix("///") {
            docs.push_str(doc);
            continue;
        }
        if let Some((name, rest)) = line.split_once(" = \"TRE-") {
            let retired = docs.to_lowercase().contains("retired");
            if !retired && !sources.contains(&format!("Code::{name}")) {
                unused.push(format!("{name} (TRE-{})", rest.trim_end_matches("\",")));
            }
        }
        docs.clear();
    }
    assert!(
        unused.is_empty(),
        "codes no crate uses (use them or mark them `/// Retired: …`): {unused:?}"
    );
}

/// Our status and outcome types: a `match` over one of them must name
/// every variant.
const STATUS_TYPES: &[&str] = &[
    "ReleaseStatus::",
    "ProjectStatus::",
    "CellStatus::",
    "tre_sdc::Status::",
    "ReleaseOutcome::",
    "Settle::",
    "LedgerStatus::",
    // The audit log's `tre_core::Outcome` (and, by its suffix, `ReleaseOutcome`).
    "Outcome::",
];

/// The `match` blocks in `text` whose arms name a status type and which
/// also have a `_ =>` arm, by the line they start on.
fn wildcard_status_matches(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("match ") {
        let start = from + at;
        from = start + 6;
        let Some(open) = text[start..].find('{').map(|o| start + o) else {
            break;
        };
        // The block's arms at depth 1, and nothing of nested blocks.
        let (mut depth, mut end, mut top) = (0usize, open, String::new());
        for (i, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ if depth == 1 => top.push(b as char),
                _ => {}
            }
        }
        // The arms' patterns: what precedes `=>` on each line at depth 1.
        let patterns: Vec<&str> = top
            .lines()
            .filter_map(|l| l.split_once("=>").map(|(p, _)| p.trim()))
            .collect();
        let names_status = patterns
            .iter()
            .any(|p| STATUS_TYPES.iter().any(|t| p.contains(t)));
        let wildcard = patterns.iter().any(|p| *p == "_" || p.starts_with("_ if"));
        if names_status && wildcard {
            found.push(text[..start].lines().count() + 1);
        }
        if end == open {
            break;
        }
    }
    found
}

#[test]
fn no_wildcard_arm_decides_a_status() {
    let mut found = Vec::new();
    for file in rust_files(&root().join("crates")) {
        for line in wildcard_status_matches(&read(&file)) {
            found.push(format!("{}:{line}", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "a `_ =>` arm in a match over a status type: {found:?}"
    );
    // The check can fail.
    let bad = "match s {\n    ReleaseStatus::Held => 1,\n    _ => 0,\n}\n";
    assert_eq!(wildcard_status_matches(bad), [1]);
    let good = "match s {\n    ReleaseStatus::Held => 1,\n    ReleaseStatus::Released => 0,\n}\n";
    assert!(wildcard_status_matches(good).is_empty());
}

/// ARCHITECTURE.md: "exact aggregates never cross the engine's API". The
/// only public path to them is tre-query's `soundness` module, compiled
/// only with the `soundness-testing` feature, and no crate but the tests
/// turns that feature on (issue #12).
#[test]
fn exact_aggregates_stay_behind_the_test_feature() {
    let lib = read(&root().join("crates/tre-query/src/lib.rs"));
    let at = lib
        .find("pub mod soundness")
        .unwrap_or_else(|| panic!("tre-query has no soundness module"));
    let before: Vec<&str> = lib[..at].lines().rev().take(1).collect();
    assert_eq!(
        before,
        [r#"#[cfg(feature = "soundness-testing")]"#],
        "tre-query's soundness module must be compiled only for tests"
    );
    let mut enabling = Vec::new();
    for dir in ["crates", "tests"] {
        let base = root().join(dir);
        let manifests: Vec<PathBuf> = if dir == "tests" {
            vec![base.join("Cargo.toml")]
        } else {
            std::fs::read_dir(&base)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|e| {
                    e.unwrap_or_else(|e| panic!("{e}"))
                        .path()
                        .join("Cargo.toml")
                })
                .filter(|p| p.exists())
                .collect()
        };
        for m in manifests {
            let text = read(&m);
            let own = m
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str());
            // tre-query declares the feature; anyone else who names it enables it.
            if own != Some("tre-query") && text.contains("soundness-testing") {
                enabling.push(m.display().to_string());
            }
        }
    }
    assert_eq!(
        enabling,
        [root().join("tests/Cargo.toml").display().to_string()],
        "only the tests may enable soundness-testing"
    );
}

/// tre-extract uses arrow without DataFusion (issue #13); the lockfile
/// must still hold a single version of every arrow crate, or batches
/// would not pass between the writer and the engine.
#[test]
fn one_arrow_version_in_the_lockfile() {
    let lock = read(&root().join("Cargo.lock"));
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_owned());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take())
            && (n == "arrow" || n.starts_with("arrow-") || n == "parquet")
        {
            versions
                .entry(n)
                .or_default()
                .insert(v.trim_matches('"').to_owned());
        }
    }
    assert!(versions.contains_key("arrow"), "no arrow in Cargo.lock");
    let several: Vec<_> = versions.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(several.is_empty(), "more than one version of {several:?}");
}
