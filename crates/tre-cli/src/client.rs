//! gRPC client commands and rendering of releases as table, JSON or CSV.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tre_proto::v1 as pb;
use tre_proto::v1::catalog_service_client::CatalogServiceClient;
use tre_proto::v1::query_service_client::QueryServiceClient;

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

#[derive(Args)]
pub struct Conn {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    #[arg(long)]
    pub token_file: PathBuf,
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

pub struct Client {
    pub query: QueryServiceClient<InterceptedService<Channel, Auth>>,
    pub catalog: CatalogServiceClient<InterceptedService<Channel, Auth>>,
}

impl Client {
    pub async fn connect(server: &str, token: &str) -> Result<Self> {
        let channel = Channel::from_shared(server.to_owned())?
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
            catalog: CatalogServiceClient::with_interceptor(channel, auth()),
        })
    }

    pub async fn from_conn(conn: &Conn) -> Result<Self> {
        let token = std::fs::read_to_string(&conn.token_file)
            .with_context(|| format!("cannot read token file {}", conn.token_file.display()))?;
        Self::connect(&conn.server, &token).await
    }
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
    };
    if args.dry_run {
        let r = c
            .query
            .dry_run(req)
            .await
            .map_err(|s| anyhow::anyhow!(status_text(&s)))?
            .into_inner();
        match args.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&dry_run_json(&r))?),
            _ => print!("{}", render_dry_run(&r)),
        }
        return Ok(());
    }
    let r = c
        .query
        .submit(req)
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
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
            let r = c
                .catalog
                .list_datasets(pb::ListDatasetsRequest {})
                .await
                .map_err(|s| anyhow::anyhow!(status_text(&s)))?
                .into_inner();
            for d in r.datasets {
                println!(
                    "{} — {}\n  privacy unit: {}; sdc profile: {}; epsilon per query: default {}, max {}\n  tables: {}",
                    d.name,
                    d.description,
                    d.privacy_unit,
                    d.sdc_profile,
                    d.default_epsilon_per_query,
                    d.max_epsilon_per_query,
                    d.tables.join(", ")
                );
            }
        }
        Some(t) => {
            let r = c
                .catalog
                .describe_table(pb::DescribeTableRequest {
                    dataset: String::new(),
                    table: t,
                })
                .await
                .map_err(|s| anyhow::anyhow!(status_text(&s)))?
                .into_inner();
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
    let r = c
        .query
        .budget(pb::BudgetRequest {
            project: args.project,
        })
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    println!(
        "project {}: epsilon budget {}, spent {}, remaining {}",
        r.project, r.epsilon_budget, r.epsilon_spent, r.epsilon_remaining
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
        "{} rows · sdc {}: {} cells rounded, {} suppressed · epsilon spent {} · remaining {} · release {}\n",
        r.rows.len(),
        r.sdc_profile,
        rounded,
        suppressed,
        r.epsilon_spent,
        num(r.epsilon_remaining),
        r.release_id
    );
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
        "confidence": r.confidence,
        "sdc_profile": r.sdc_profile,
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
