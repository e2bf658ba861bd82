//! `tre policy draft|check` and `tre dataset import` (issue #15): from a
//! directory of CSV, Parquet or OMOP CDM files to a served dataset, with
//! the custodian deciding every bound and public value in between.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::setup;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Draft a commented policy from the input's column names and types;
    /// every bound and public value is left as a TODO for the custodian.
    Draft(DraftArgs),
    /// Validate a policy as the server would; refuses any TODO left.
    Check {
        file: PathBuf,
        /// Directory of SDC profiles (defaults to the embedded ones).
        #[arg(long)]
        sdc_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DraftFormat {
    /// Any CSV or Parquet files, one per table.
    Plain,
    /// OMOP CDM's standard tables (person, condition_occurrence, ...).
    Omop,
}

#[derive(Args)]
pub struct DraftArgs {
    /// A directory of `<table>.csv` / `<table>.parquet`, or the files.
    #[arg(long, required = true, num_args = 1..)]
    from: Vec<PathBuf>,
    #[arg(long)]
    dataset: String,
    #[arg(long, value_enum, default_value = "plain")]
    format: DraftFormat,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ImportFormat {
    /// `<table>.csv` if present, else `<table>.parquet`.
    Auto,
    Csv,
    Parquet,
    /// OMOP CDM tables as `<table>.csv` or `.parquet` (as auto).
    Omop,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The dataset's policy, finished by its custodian.
    #[arg(long)]
    policy: PathBuf,
    /// Directory holding one file per table the policy declares.
    #[arg(long)]
    from: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    format: ImportFormat,
    /// The dataset directory to create or replace; named after the dataset.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = ".tre/master.key")]
    key_file: PathBuf,
    /// Memory the sort may hold before it spills to disk (MiB).
    #[arg(long, default_value_t = 512)]
    memory_mib: usize,
    /// Write the import report (JSON) here too. It describes the data:
    /// keep it with the custodian.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Draft(args) => {
            let flavour = match args.format {
                DraftFormat::Plain => tre_import::draft::Flavour::Plain,
                DraftFormat::Omop => tre_import::draft::Flavour::Omop,
            };
            let text = tre_import::draft::draft(&args.from, &args.dataset, flavour)?;
            match args.out {
                Some(path) => {
                    if path.exists() {
                        bail!(
                            "{} exists; a draft never overwrites a policy (remove it or choose another --out)",
                            path.display()
                        );
                    }
                    std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "drafted {}; fill in every TODO, then `tre policy check {}`",
                        path.display(),
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        PolicyCommand::Check { file, sdc_dir } => {
            let policy = setup::load_policy(Some(&file))?;
            setup::load_profile(sdc_dir.as_deref(), &policy.sdc_profile)?;
            println!(
                "{}: policy for dataset '{}' is valid: {} tables, privacy unit {}, profile {} (sha256 {})",
                file.display(),
                policy.dataset,
                policy.tables.len(),
                policy.privacy_unit,
                policy.sdc_profile,
                &policy.source_hash[..16]
            );
            Ok(())
        }
    }
}

struct Bar(ProgressBar);

impl tre_import::Progress for Bar {
    fn table(&self, table: &str, stage: &str) {
        self.0.set_message(format!("{table}: {stage}"));
    }
    fn rows(&self, rows: u64) {
        self.0.inc(rows);
    }
}

pub async fn import(args: ImportArgs) -> Result<()> {
    let policy = setup::load_policy(Some(&args.policy))?;
    let master = setup::master_key(&args.key_file, true)?;
    let format = match args.format {
        ImportFormat::Auto | ImportFormat::Omop => tre_import::Format::Auto,
        ImportFormat::Csv => tre_import::Format::Csv,
        ImportFormat::Parquet => tre_import::Format::Parquet,
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} · {human_pos} rows read ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let started = Instant::now();
    let report = tre_import::Import {
        policy: &policy,
        from: &args.from,
        format,
        out: &args.out,
        master: &master,
        memory_bytes: args.memory_mib.saturating_mul(1 << 20),
    }
    .run(&Bar(bar.clone()))
    .await;
    bar.finish_and_clear();
    let report = report?;
    let mut table = comfy_table::Table::new();
    table.set_header([
        "table",
        "rows read",
        "rejected",
        "clamped",
        "removed by bound",
        "written",
        "patients",
        "most rows/patient",
    ]);
    for t in &report.tables {
        table.add_row([
            t.table.clone(),
            t.tally.rows_read.to_string(),
            t.tally.rows_rejected().to_string(),
            t.tally.clamped.values().sum::<u64>().to_string(),
            t.rows_removed_by_bound.to_string(),
            t.rows_written.to_string(),
            t.patients.to_string(),
            format!(
                "{} (bound {})",
                t.most_rows_for_one_patient, t.max_rows_per_unit
            ),
        ]);
    }
    println!(
        "imported dataset '{}' into {} in {:.1}s (this report describes the data: keep it with the custodian)",
        report.dataset,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{table}");
    for t in &report.tables {
        for (reason, n) in &t.tally.rejected {
            println!("  {}: {n} rows rejected: {reason}", t.table);
        }
        for (column, n) in &t.tally.clamped {
            println!(
                "  {}: {n} values of {column} clamped to the policy's bounds",
                t.table
            );
        }
        if !t.columns_not_imported.is_empty() {
            println!(
                "  {}: columns not in the policy, not imported: {}",
                t.table,
                t.columns_not_imported.join(", ")
            );
        }
    }
    if let Some(path) = args.report {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub struct ProfileArgs {
    /// A directory of `<table>.csv` / `<table>.parquet`, or the files.
    #[arg(long, required = true, num_args = 1..)]
    from: Vec<PathBuf>,
    /// The column naming the patient, for rows per patient.
    #[arg(long, default_value = "person_id")]
    unit: String,
    /// Memory the counts may hold before they spill to disk (MiB).
    #[arg(long, default_value_t = 512)]
    memory_mib: usize,
    /// Write the report (JSON) here too.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Print what the input's values look like, under the report's notice.
pub async fn profile(args: ProfileArgs) -> Result<()> {
    let report = tre_import::profile::profile(
        &args.from,
        &args.unit,
        args.memory_mib.saturating_mul(1 << 20),
    )
    .await?;
    println!("{}\n", report.notice);
    for t in &report.tables {
        match t.patients {
            Some(p) => println!(
                "{} ({}): {} rows, {p} patients; most rows for one patient {}, 99% of patients have at most {}; patients by rows: {}",
                t.table,
                t.file,
                t.rows,
                t.most_rows_for_one_patient,
                t.rows_for_99_percent,
                tre_import::BUCKETS
                    .iter()
                    .filter_map(|b| t.rows_per_patient.get(*b).map(|n| format!("{b}: {n}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => println!(
                "{} ({}): {} rows; no {} column",
                t.table, t.file, t.rows, args.unit
            ),
        }
        let mut table = comfy_table::Table::new();
        table.set_header([
            "column", "missing", "numbers", "range", "dates", "range", "distinct", "values",
        ]);
        for c in &t.columns {
            let listed: Vec<String> = c.values.iter().map(|(v, n)| format!("{v} ({n})")).collect();
            table.add_row([
                c.column.clone(),
                c.missing.to_string(),
                c.numbers.to_string(),
                c.number_range
                    .map(|(lo, hi)| format!("{lo} .. {hi}"))
                    .unwrap_or_default(),
                c.dates.to_string(),
                c.date_range
                    .as_ref()
                    .map(|(lo, hi)| format!("{lo} .. {hi}"))
                    .unwrap_or_default(),
                c.distinct.to_string(),
                listed.join(", "),
            ]);
        }
        println!("{table}\n");
    }
    if let Some(path) = args.report {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub struct OptOutArgs {
    /// The dataset directory (named after the dataset).
    #[arg(long, visible_alias = "dataset")]
    data: PathBuf,
    /// The dataset's policy (defaults to the embedded policies/nhs_epr.toml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The new list: one NHS number (or other direct identifier) per line.
    #[arg(long)]
    from: PathBuf,
    #[arg(long, default_value = ".tre/master.key")]
    key_file: PathBuf,
    /// The gateway's state directory, whose audit log records the change.
    #[arg(long, default_value = ".tre/server")]
    state: PathBuf,
}

/// Replace the dataset's opt-out list, then record it in the audit log.
pub fn optouts(args: OptOutArgs) -> Result<()> {
    use std::sync::Arc;
    use tre_store::Store;

    let policy = setup::load_policy(args.policy.as_deref())?;
    let master = setup::master_key(&args.key_file, false)?;
    let report = tre_import::opt_outs::replace(&args.data, &policy, &master, &args.from)?;
    let notary: Arc<dyn tre_store::Notary> =
        Arc::new(tre_gateway::AuditNotary::load_or_create(&args.state)?);
    let store = tre_store::SqliteStore::open(&args.state.join("tre.db"), notary, 100)?;
    let mut event = tre_store::AuditEvent::new(setup::OPERATOR, "admin", "", "dataset.optouts");
    event.set_outcome(tre_core::Outcome::Allowed);
    event.detail = format!(
        "dataset {}: opt-out list replaced from {}: {} identifiers, {} patients (digest {}); the gateway applies it on SIGHUP or at its next start",
        policy.dataset,
        args.from.display(),
        report.identifiers,
        report.patients,
        &report.digest[..16]
    );
    store.append_audit(&event).context(
        "the opt-out list was replaced but its audit event could not be written; record it by hand",
    )?;
    println!(
        "dataset '{}': {} opted-out patients from {} identifiers (digest {}); send the gateway SIGHUP (or restart it) to apply the list",
        policy.dataset,
        report.patients,
        report.identifiers,
        &report.digest[..16]
    );
    Ok(())
}
