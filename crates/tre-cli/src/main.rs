//! The `tre` binary: generate and protect data, serve the gateway, issue
//! tokens, query, and run the end-to-end demo and benchmark.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod client;
mod demo;
mod governance;
mod import;
mod load;
mod setup;

#[derive(Parser)]
#[command(
    name = "tre",
    version,
    about = "A trusted research environment: private, disclosure-checked aggregates over encrypted health records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate synthetic data, or import a data team's own.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Draft a dataset policy from its files, or check one.
    Policy {
        #[command(subcommand)]
        command: import::PolicyCommand,
    },
    /// Start the gRPC gateway.
    Serve(setup::ServeArgs),
    /// Issue signed bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Submit (or dry-run) a query against a running gateway.
    Query(client::QueryArgs),
    /// Show the catalog: datasets, tables, column classes. Never data.
    Catalog(client::CatalogArgs),
    /// Show a project's privacy budget.
    Budget(client::BudgetArgs),
    /// Request, review and govern projects.
    Project {
        #[command(subcommand)]
        command: governance::ProjectCommand,
    },
    /// Review held releases (custodians).
    Review {
        #[command(subcommand)]
        command: governance::ReviewCommand,
    },
    /// List, show, withdraw, export and verify releases.
    Release {
        #[command(subcommand)]
        command: governance::ReleaseCommand,
    },
    /// Read, verify and export the audit log.
    Audit {
        #[command(subcommand)]
        command: governance::AuditCommand,
    },
    /// Run the end-to-end demo (or, with --serve, leave it running).
    Demo(demo::DemoArgs),
    /// Benchmark the DP pipeline against plain DataFusion, and encrypted
    /// against plaintext scans, on the same generated data.
    Bench(bench::BenchArgs),
    /// Show whether small queries keep their latency while heavy ones run:
    /// p50/p99 with and without heavy load, on a loopback gateway.
    Load(load::LoadArgs),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Write synthetic NHS-style records as encrypted Parquet extracts.
    Generate(setup::GenerateArgs),
    /// Import CSV, Parquet or OMOP CDM files under a custodian's policy
    /// into encrypted, sorted, bounded extracts, with a report.
    Import(import::ImportArgs),
    /// Replace a dataset's National Data Opt-out list without a re-import
    /// (audited; the gateway applies it on SIGHUP or at its next start).
    Optouts(import::OptOutArgs),
    /// Describe the input's values for the custodian finishing a draft:
    /// missing values, ranges, values with counts, rows per patient. It
    /// discloses the data: for the operator and custodian only.
    Profile(import::ProfileArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Sign a token for a user and role with the server's issuer key.
    Issue {
        #[arg(long, default_value = ".tre/server")]
        state: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 30m, 8h, 7d or 1h 30m.
        #[arg(long, default_value = "8h")]
        ttl: humantime::Duration,
        /// For a custodian: the datasets they hold (comma-separated); they
        /// decide only on projects and releases of those. Without it, every
        /// dataset the gateway serves.
        #[arg(long, value_delimiter = ',')]
        custodian_of: Option<Vec<String>>,
    },
    /// Revoke a token by its id (printed when it was issued); needs an admin token.
    Revoke {
        #[command(flatten)]
        conn: client::Conn,
        #[arg(long)]
        jti: String,
        #[arg(long)]
        reason: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    if let (Command::Serve(args), Some(m)) = (&mut cli.command, matches.subcommand_matches("serve"))
    {
        setup::apply_config(args, m)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Dataset {
                command: DatasetCommand::Generate(args),
            } => setup::generate(&args).map(|_| ()),
            Command::Dataset {
                command: DatasetCommand::Import(args),
            } => import::import(args).await,
            Command::Dataset {
                command: DatasetCommand::Optouts(args),
            } => import::optouts(args),
            Command::Dataset {
                command: DatasetCommand::Profile(args),
            } => import::profile(args).await,
            Command::Policy { command } => import::policy(command),
            Command::Serve(args) => setup::serve(args).await,
            Command::Token {
                command:
                    TokenCommand::Issue {
                        state,
                        user,
                        role,
                        ttl,
                        custodian_of,
                    },
            } => {
                let (token, jti) =
                    setup::issue_token(&state, &user, &role, ttl.into(), custodian_of)?;
                eprintln!("token id (for `tre token revoke --jti`): {jti}");
                println!("{token}");
                Ok(())
            }
            Command::Token {
                command: TokenCommand::Revoke { conn, jti, reason },
            } => governance::revoke_token(&conn, jti, reason).await,
            Command::Project { command } => governance::project(command).await,
            Command::Audit { command } => governance::audit(command).await,
            Command::Review { command } => governance::review(command).await,
            Command::Release { command } => governance::release(command).await,
            Command::Query(args) => client::query(args).await,
            Command::Catalog(args) => client::catalog(args).await,
            Command::Budget(args) => client::budget(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Load(args) => load::run(args).await,
        }
    })
}
