//! gRPC client commands and rendering of releases as table, JSON or CSV.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tre_proto::v1 as pb;
use tre_proto::v1::admin_service_client::AdminServiceClient;
use tre_proto::v1::audit_service_client::AuditServiceClient;
use tre_proto::v1::catalog_service_client::CatalogServiceClient;
use tre_proto::v1::project_service_client::ProjectServiceClient;
use tre_proto::v1::query_service_client::QueryServiceClient;
use tre_proto::v1::release_service_client::ReleaseServiceClient;

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

#[derive(Args)]
pub struct Conn {
    /// http://host:port on loopback; https://host:port when the gateway has TLS.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "TRE_SERVER")]
    pub server: String,
    #[arg(long, env = "TRE_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) when the gateway requires mutual TLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long)]
    pub project: String,
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Delta for DP key selection (group keys without a public domain);
    /// the policy default when absent.
    #[arg(long)]
    pub delta: Option<f64>,
    #[arg(long)]
    pub dry_run: bool,
    /// Add row, column and grand totals (one or two public keys, COUNT columns).
    #[arg(long)]
    pub totals: bool,
    /// The dataset to query, when the project is approved for several.
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    pub sql: String,
}

#[derive(Args)]
pub struct CatalogArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Describe one table instead of listing datasets.
    #[arg(long)]
    pub table: Option<String>,
}

#[derive(Args)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long)]
    pub project: String,
}

type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Authed = InterceptedService<Channel, Auth>;

pub struct Client {
    pub query: QueryServiceClient<Authed>,
    pub catalog: CatalogServiceClient<Authed>,
    pub projects: ProjectServiceClient<Authed>,
    pub audit: AuditServiceClient<Authed>,
    pub admin: AdminServiceClient<Authed>,
    pub releases: ReleaseServiceClient<Authed>,
}

/// PEM files for a TLS connection.
#[derive(Default)]
pub struct TlsFiles {
    pub ca_cert: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Client {
    pub async fn connect(server: &str, token: &str) -> Result<Self> {
        Self::connect_tls(server, token, &TlsFiles::default()).await
    }

    pub async fn connect_tls(server: &str, token: &str, tls: &TlsFiles) -> Result<Self> {
        let mut endpoint = Channel::from_shared(server.to_owned())?;
        if server.starts_with("https://") {
            let mut cfg = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca_cert {
                cfg = cfg.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(cfg)?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {server}"))?;
        let header: MetadataValue<_> = format!("Bearer {}", token.trim()).parse()?;
        let auth = move || -> Auth {
            let header = header.clone();
            Box::new(move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            })
        };
        Ok(Self {
            query: QueryServiceClient::with_interceptor(channel.clone(), auth()),
            catalog: CatalogServiceClient::with_interceptor(channel.clone(), auth()),
            projects: ProjectServiceClient::with_interceptor(channel.clone(), auth()),
            audit: AuditServiceClient::with_interceptor(channel.clone(), auth()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), auth()),
            releases: ReleaseServiceClient::with_interceptor(channel, auth()),
        })
    }

    pub async fn from_conn(conn: &Conn) -> Result<Self> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let token = std::fs::read_to_string(&conn.token_file)
            .with_context(|| format!("cannot read token file {}", conn.token_file.display()))?;
        let tls = TlsFiles {
            ca_cert: conn.ca_cert.as_ref().map(read).transpose()?,
            identity: match (&conn.client_cert, &conn.client_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        };
        Self::connect_tls(&conn.server, &token, &tls).await
    }
}

/// The reply of a call, or its refusal as the user should see it.
pub fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| anyhow::anyhow!(status_text(&s)))
}

/// A refusal as the user should see it: the status message carries the code.
pub fn status_text(s: &tonic::Status) -> String {
    s.message().to_owned()
}

pub async fn query(args: QueryArgs) -> Result<()> {
    let mut c = Client::from_conn(&args.conn).await?;
    let req = pb::QueryRequest {
        project: args.project,
        sql: args.sql,
        epsilon: args.epsilon,
        delta: args.delta,
        totals: args.totals,
        dataset: args.dataset.unwrap_or_default(),
    };
    if args.dry_run {
        let r = rpc(c.query.dry_run(req).await)?;
        match args.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&dry_run_json(&r))?),
            _ => print!("{}", render_dry_run(&r)),
        }
        return Ok(());
    }
    let r = rpc(c.query.submit(req).await)?;
    match args.format {
        Format::Table => print!("{}", render_release(&r, None)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&release_json(&r))?),
        Format::Csv => print!("{}", render_csv(&r)),
    }
    Ok(())
}

pub async fn catalog(args: CatalogArgs) -> Result<()> {
    let mut c = Client::from_conn(&args.conn).await?;
    match args.table {
        None => {
            let r = rpc(c.catalog.list_datasets(pb::ListDatasetsRequest {}).await)?;
            for d in r.datasets {
                println!(
                    "{} — {}\n  privacy unit: {}; sdc profile: {}; epsilon per query: min {}, default {}, max {}\n  tables: {}",
                    d.name,
                    d.description,
                    d.privacy_unit,
                    d.sdc_profile,
                    d.min_epsilon_per_query,
                    d.default_epsilon_per_query,
                    d.max_epsilon_per_query,
                    d.tables.join(", ")
                );
                if !d.joins_with.is_empty() {
                    println!(
                        "  joins with: {} (the same {}, a pseudonym of {}); name each table with its dataset, as in {}.{}",
                        d.joins_with.join(", "),
                        d.privacy_unit,
                        d.linkage,
                        d.name,
                        d.tables.first().map(String::as_str).unwrap_or("<table>")
                    );
                }
                println!("  functions (each cannot fail on any value):");
                for f in &d.functions {
                    println!("    {}", f.arguments);
                }
            }
        }
        Some(t) => {
            let r = rpc(c
                .catalog
                .describe_table(pb::DescribeTableRequest {
                    dataset: String::new(),
                    table: t,
                })
                .await)?;
            println!(
                "{}.{} — {} (at most {} rows per patient)",
                r.dataset, r.table, r.description, r.max_rows_per_unit
            );
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED).set_header([
                "column",
                "class",
                "domain / bounds",
                "description",
            ]);
            for col in r.columns {
                let dom = if !col.domain.is_empty() {
                    col.domain.join(", ")
                } else if let (Some(lo), Some(hi)) = (col.lower_bound, col.upper_bound) {
                    format!("[{lo}, {hi}]")
                } else {
                    String::new()
                };
                table.add_row([col.name, col.class, dom, col.description]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

pub async fn budget(args: BudgetArgs) -> Result<()> {
    let mut c = Client::from_conn(&args.conn).await?;
    let r = rpc(c
        .query
        .budget(pb::BudgetRequest {
            project: args.project,
        })
        .await)?;
    println!(
        "project {} ({}, ends {}): epsilon budget {}, spent {}, remaining {}; delta budget {:e}, spent {:e}, remaining {:e}",
        r.project,
        r.status,
        r.end_date,
        r.epsilon_budget,
        r.epsilon_spent,
        r.epsilon_remaining,
        r.delta_budget,
        r.delta_spent,
        r.delta_remaining
    );
    Ok(())
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn cell_text(c: &pb::Cell) -> String {
    match &c.content {
        Some(pb::cell::Content::Key(k)) => k.clone(),
        Some(pb::cell::Content::Value(v)) => match v.value {
            None => "suppressed".to_owned(),
            Some(x) => match (v.ci_low, v.ci_high) {
                (Some(lo), Some(hi)) => format!("{} [{}, {}]", num(x), num(lo), num(hi)),
                _ => num(x),
            },
        },
        None => String::new(),
    }
}

/// A readable table. `max_rows` truncates long releases (the demo).
pub fn render_release(r: &pb::QueryResponse, max_rows: Option<usize>) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(r.columns.iter().map(|c| {
        if c.kind == pb::ColumnKind::Aggregate as i32 {
            format!("{} [95% CI]", c.name)
        } else {
            c.name.clone()
        }
    }));
    let shown = max_rows.unwrap_or(usize::MAX).min(r.rows.len());
    for row in &r.rows[..shown] {
        table.add_row(row.cells.iter().map(cell_text));
    }
    let (mut rounded, mut suppressed) = (0, 0);
    for row in &r.rows {
        for c in &row.cells {
            if let Some(pb::cell::Content::Value(v)) = &c.content {
                if v.status == pb::SdcStatus::Rounded as i32 {
                    rounded += 1
                }
                if v.status == pb::SdcStatus::Suppressed as i32 {
                    suppressed += 1
                }
            }
        }
    }
    let mut out = format!("{table}\n");
    if shown < r.rows.len() {
        out += &format!(
            "… {} more rows (use --format csv for all)\n",
            r.rows.len() - shown
        );
    }
    out += &format!(
        "{} rows · sdc {} ({}): {} cells rounded, {} suppressed · epsilon spent {} · remaining {} · release {}\n",
        r.rows.len(),
        r.sdc_profile,
        sdc_outcome_name(r.sdc_outcome),
        rounded,
        suppressed,
        r.epsilon_spent,
        num(r.epsilon_remaining),
        r.release_id
    );
    if r.repeated {
        out += "(an identical earlier query: its stored release, returned at no cost)\n";
    }
    out
}

pub fn render_dry_run(r: &pb::DryRunResponse) -> String {
    let mut out = String::from("accepted plan:\n");
    for line in &r.plan {
        out += &format!("  - {line}\n");
    }
    for c in &r.columns {
        if c.kind == pb::ColumnKind::Aggregate as i32 {
            out += &format!(
                "  column {}: {} (noise scale {}{})\n",
                c.name,
                c.mechanism,
                num(c.noise_scale),
                c.expected_half_width
                    .map(|h| format!(", 95% interval ±{} per cell", num(h)))
                    .unwrap_or_default()
            );
        }
    }
    if !r.public_keys.is_empty() {
        out += &format!(
            "public keys (released in full): {}\n",
            r.public_keys.join(", ")
        );
    }
    if !r.selected_keys.is_empty() {
        out += &format!(
            "selected keys (DP key selection): {}\n",
            r.selected_keys.join(", ")
        );
    }
    out += &format!(
        "cells: {} · epsilon {} · delta {} · remaining before this query {} · plan {}\n",
        r.cells
            .map_or("chosen by key selection".to_owned(), |c| c.to_string()),
        r.epsilon,
        r.delta,
        num(r.epsilon_remaining),
        &r.plan_hash[..12.min(r.plan_hash.len())]
    );
    out
}

fn render_csv(r: &pb::QueryResponse) -> String {
    let mut header = Vec::new();
    for c in &r.columns {
        if c.kind == pb::ColumnKind::Aggregate as i32 {
            header.extend([
                c.name.clone(),
                format!("{}_ci_low", c.name),
                format!("{}_ci_high", c.name),
                format!("{}_status", c.name),
            ]);
        } else {
            header.push(c.name.clone());
        }
    }
    let esc = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    let mut out = header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(",") + "\n";
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for row in &r.rows {
        let mut fields = Vec::new();
        for c in &row.cells {
            match &c.content {
                Some(pb::cell::Content::Key(k)) => fields.push(esc(k)),
                Some(pb::cell::Content::Value(v)) => fields.extend([
                    opt(v.value),
                    opt(v.ci_low),
                    opt(v.ci_high),
                    status_name(v.status).to_owned(),
                ]),
                None => fields.push(String::new()),
            }
        }
        out += &(fields.join(",") + "\n");
    }
    out
}

/// A release's airlock status, as the CLI prints it (`held`).
pub fn release_status_name(s: i32) -> String {
    wire_word(
        pb::ReleaseStatus::try_from(s).map(|s| s.as_str_name()),
        "RELEASE_STATUS_",
    )
}

/// A `--status` filter (`held`, `released`, ...; empty for all) as the
/// wire's enum.
pub fn release_status_arg(s: &str) -> Result<i32> {
    if s.is_empty() {
        return Ok(pb::ReleaseStatus::Unspecified as i32);
    }
    pb::ReleaseStatus::from_str_name(&format!("RELEASE_STATUS_{}", s.to_uppercase()))
        .filter(|s| *s != pb::ReleaseStatus::Unspecified)
        .map(|s| s as i32)
        .with_context(|| {
            format!(
                "unknown status '{s}'; use released, held, rejected, withdrawn or changes_requested"
            )
        })
}

/// A release's disclosure-control outcome, as the CLI prints it (`pass`).
fn sdc_outcome_name(s: i32) -> String {
    wire_word(
        pb::SdcOutcome::try_from(s).map(|o| o.as_str_name()),
        "SDC_OUTCOME_",
    )
}

/// A proto enum value's name as the CLI prints it: `RELEASE_STATUS_HELD`
/// is `held`; a number this CLI does not know is `unknown`.
fn wire_word<E>(name: Result<&str, E>, prefix: &str) -> String {
    match name {
        Ok(n) => n.trim_start_matches(prefix).to_lowercase(),
        Err(_) => "unknown".into(),
    }
}

fn status_name(s: i32) -> &'static str {
    match pb::SdcStatus::try_from(s) {
        Ok(pb::SdcStatus::Released) => "released",
        Ok(pb::SdcStatus::Rounded) => "rounded",
        Ok(pb::SdcStatus::Suppressed) => "suppressed",
        _ => "unspecified",
    }
}

fn release_json(r: &pb::QueryResponse) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            serde_json::Value::Array(
                row.cells
                    .iter()
                    .map(|c| match &c.content {
                        Some(pb::cell::Content::Key(k)) => serde_json::json!(k),
                        Some(pb::cell::Content::Value(v)) => serde_json::json!({
                            "value": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high,
                            "status": status_name(v.status), "reason": v.reason,
                        }),
                        None => serde_json::Value::Null,
                    })
                    .collect(),
            )
        })
        .collect();
    serde_json::json!({
        "release_id": r.release_id,
        "columns": r.columns.iter().map(|c| serde_json::json!({"name": c.name, "aggregate": c.aggregate, "mechanism": c.mechanism, "noise_scale": c.noise_scale})).collect::<Vec<_>>(),
        "rows": rows,
        "epsilon_spent": r.epsilon_spent,
        "epsilon_remaining": r.epsilon_remaining,
        "delta_spent": r.delta_spent,
        "delta_remaining": r.delta_remaining,
        "repeated": r.repeated,
        "confidence": r.confidence,
        "sdc_profile": r.sdc_profile,
        "sdc_outcome": sdc_outcome_name(r.sdc_outcome),
        "status": release_status_name(r.status),
        "notes": r.notes,
    })
}

fn dry_run_json(r: &pb::DryRunResponse) -> serde_json::Value {
    serde_json::json!({
        "plan": r.plan, "epsilon": r.epsilon, "epsilon_remaining": r.epsilon_remaining,
        "cells": r.cells, "plan_hash": r.plan_hash, "delta": r.delta,
        "public_keys": r.public_keys, "selected_keys": r.selected_keys,
        "columns": r.columns.iter().map(|c| serde_json::json!({"name": c.name, "aggregate": c.aggregate, "mechanism": c.mechanism, "noise_scale": c.noise_scale})).collect::<Vec<_>>(),
    })
}
