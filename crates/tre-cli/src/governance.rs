//! `tre project …`, `tre audit …` and `tre token revoke`: the custodian's,
//! auditor's and admin's commands, over gRPC (offline for `audit verify
//! --export`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tre_proto::v1 as pb;
use tre_store::chain;

use crate::client::{Client, Conn, rpc};

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Ask for a project (researcher).
    Request(RequestArgs),
    /// Projects you may see: your own (researcher) or all (custodian, auditor).
    List {
        #[command(flatten)]
        conn: Conn,
        /// requested | active | rejected | suspended | revoked
        #[arg(long, default_value = "")]
        status: String,
    },
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Approve a requested project, possibly with less budget or an earlier end (custodian).
    Approve {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        epsilon: Option<f64>,
        #[arg(long)]
        delta: Option<f64>,
        /// YYYY-MM-DD; the requested end date by default.
        #[arg(long, default_value = "")]
        end_date: String,
        /// Why it is approved (e.g. the ethics reference); recorded in the
        /// project's history and the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Reject a requested project, with a reason (custodian).
    Reject(DecideArgs),
    /// Pause an active project (custodian).
    Suspend(DecideArgs),
    /// Reactivate a suspended project (custodian).
    Resume(DecideArgs),
    /// End a project for good (custodian).
    Revoke(DecideArgs),
    /// Add budget, with a reason (custodian).
    Topup {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        epsilon: f64,
        #[arg(long, default_value_t = 0.0)]
        delta: f64,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Args)]
pub struct RequestArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    id: String,
    #[arg(long)]
    title: String,
    /// A lay summary of what the project is for.
    #[arg(long)]
    purpose: String,
    #[arg(long = "dataset", default_value = "nhs_epr")]
    datasets: Vec<String>,
    #[arg(long)]
    epsilon: f64,
    #[arg(long, default_value_t = 0.0)]
    delta: f64,
    /// Repeatable; yourself when absent.
    #[arg(long = "member")]
    members: Vec<String>,
    /// YYYY-MM-DD, the last day the project may query.
    #[arg(long)]
    end_date: String,
}

#[derive(Args)]
pub struct DecideArgs {
    #[command(flatten)]
    conn: Conn,
    id: String,
    #[arg(long)]
    reason: String,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// List events, filtered (auditor).
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long, default_value = "")]
        project: String,
        #[arg(long, default_value = "")]
        action: String,
        /// allowed | refused | failed
        #[arg(long, default_value = "")]
        outcome: String,
        /// RFC 3339, inclusive.
        #[arg(long, default_value = "")]
        since: String,
        /// RFC 3339, exclusive.
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Verify the server's log, or (with --export) an exported file offline.
    /// Pin the key you hold with --public-key or --fingerprint: unpinned, a
    /// check can only use the key the server holds, which whoever holds
    /// the server's disk can swap.
    Verify(VerifyArgs),
    /// Export the log with its signed checkpoints as JSON Lines (auditor).
    Export {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct VerifyArgs {
    /// An exported log to verify offline, without the server.
    #[arg(long, requires = "public_key")]
    export: Option<PathBuf>,
    /// The audit public key you hold (hex, or a file holding it). Online,
    /// the log is exported and checked here against it.
    #[arg(long)]
    public_key: Option<String>,
    /// The key fingerprint `tre serve` printed at start-up (SHA256:...).
    /// The key used (the server's, or --public-key) must match it.
    #[arg(long)]
    fingerprint: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "TRE_SERVER")]
    server: String,
    #[arg(long, env = "TRE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

pub async fn project(cmd: ProjectCommand) -> Result<()> {
    let info = match cmd {
        ProjectCommand::Request(a) => {
            let mut c = Client::from_conn(&a.conn).await?;
            rpc(c
                .projects
                .request_project(pb::RequestProjectRequest {
                    id: a.id,
                    title: a.title,
                    purpose: a.purpose,
                    datasets: a.datasets,
                    epsilon: a.epsilon,
                    delta: a.delta,
                    members: a.members,
                    end_date: a.end_date,
                })
                .await)?
        }
        ProjectCommand::List { conn, status } => {
            let mut c = Client::from_conn(&conn).await?;
            let r = rpc(c
                .projects
                .list_projects(pb::ListProjectsRequest { status })
                .await)?;
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_header(["project", "status", "title", "members", "epsilon", "ends"]);
            for p in r.projects {
                t.add_row([
                    p.id,
                    p.status,
                    p.title,
                    p.members.join(", "),
                    format!("{} of {}", p.epsilon_spent, p.epsilon_budget),
                    p.end_date,
                ]);
            }
            println!("{t}");
            return Ok(());
        }
        ProjectCommand::Show { conn, id } => {
            let mut c = Client::from_conn(&conn).await?;
            rpc(c.projects.get_project(pb::GetProjectRequest { id }).await)?
        }
        ProjectCommand::Approve {
            conn,
            id,
            epsilon,
            delta,
            end_date,
            reason,
        } => {
            let mut c = Client::from_conn(&conn).await?;
            rpc(c
                .projects
                .approve_project(pb::ApproveProjectRequest {
                    id,
                    epsilon,
                    delta,
                    end_date,
                    reason,
                })
                .await)?
        }
        ProjectCommand::Reject(a) => {
            let mut c = Client::from_conn(&a.conn).await?;
            rpc(c.projects.reject_project(decide(a.id, a.reason)).await)?
        }
        ProjectCommand::Suspend(a) => {
            let mut c = Client::from_conn(&a.conn).await?;
            rpc(c.projects.suspend_project(decide(a.id, a.reason)).await)?
        }
        ProjectCommand::Resume(a) => {
            let mut c = Client::from_conn(&a.conn).await?;
            rpc(c.projects.resume_project(decide(a.id, a.reason)).await)?
        }
        ProjectCommand::Revoke(a) => {
            let mut c = Client::from_conn(&a.conn).await?;
            rpc(c.projects.revoke_project(decide(a.id, a.reason)).await)?
        }
        ProjectCommand::Topup {
            conn,
            id,
            epsilon,
            delta,
            reason,
        } => {
            let mut c = Client::from_conn(&conn).await?;
            rpc(c
                .projects
                .top_up_project(pb::TopUpProjectRequest {
                    id,
                    epsilon,
                    delta,
                    reason,
                })
                .await)?
        }
    };
    print!("{}", render_project(&info));
    Ok(())
}

fn decide(id: String, reason: String) -> pb::DecideProjectRequest {
    pb::DecideProjectRequest { id, reason }
}

pub fn render_project(p: &pb::ProjectInfo) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let rows = [
        ("project", p.id.clone()),
        ("title", p.title.clone()),
        ("purpose", p.purpose.clone()),
        ("status", p.status.clone()),
        ("datasets", p.datasets.join(", ")),
        ("members", p.members.join(", ")),
        (
            "requested",
            format!(
                "by {} at {}: epsilon {}, delta {:e}, until {}",
                p.requested_by,
                p.requested_at,
                p.requested_epsilon,
                p.requested_delta,
                p.requested_end_date
            ),
        ),
        (
            "epsilon",
            format!("{} spent of {}", p.epsilon_spent, p.epsilon_budget),
        ),
        (
            "delta",
            format!("{:e} spent of {:e}", p.delta_spent, p.delta_budget),
        ),
        ("ends", p.end_date.clone()),
    ];
    for (k, v) in rows {
        t.add_row([k.to_owned(), v]);
    }
    let mut out = format!("{t}\n");
    for h in &p.history {
        out += &format!("  {} {} {}: {}\n", h.at, h.actor, h.action, h.reason);
    }
    out
}

pub async fn audit(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::List {
            conn,
            user,
            project,
            action,
            outcome,
            since,
            until,
            limit,
        } => {
            let mut c = Client::from_conn(&conn).await?;
            // The server answers in pages of about 1 MiB; ask until the
            // limit (the server's default of 1000 when not given).
            let want = if limit == 0 { 1_000 } else { limit as usize };
            let mut events = Vec::new();
            let mut after_seq = 0;
            loop {
                let left = u32::try_from(want - events.len()).unwrap_or(u32::MAX);
                let page = rpc(c
                    .audit
                    .list_events(pb::ListEventsRequest {
                        user: user.clone(),
                        project: project.clone(),
                        action: action.clone(),
                        outcome: outcome.clone(),
                        since: since.clone(),
                        until: until.clone(),
                        limit: left,
                        after_seq,
                    })
                    .await)?;
                events.extend(page.events);
                if !page.more || events.len() >= want {
                    break;
                }
                after_seq = page.next_after_seq;
            }
            print!("{}", render_events(&events));
        }
        AuditCommand::Verify(a) => {
            let (report_line, intact) = verify(&a).await?;
            println!("{report_line}");
            if !intact {
                bail!("the audit log does not verify");
            }
        }
        AuditCommand::Export { conn, out } => {
            let mut c = Client::from_conn(&conn).await?;
            let (jsonl, public_key) = export(&mut c).await?;
            std::fs::write(&out, &jsonl)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {} entries to {}; audit public key {public_key}",
                jsonl.lines().count(),
                out.display(),
            );
        }
    }
    Ok(())
}

/// The whole exported log (JSON Lines) and the audit public key (hex).
pub async fn export(c: &mut Client) -> Result<(String, String)> {
    let mut stream = rpc(c.audit.export_log(pb::ExportLogRequest {}).await)?;
    let (mut jsonl, mut public_key) = (String::new(), String::new());
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!(crate::client::status_text(&s)))?
    {
        jsonl.push_str(&chunk.jsonl);
        public_key = chunk.public_key;
    }
    Ok((jsonl, public_key))
}

/// `tre audit verify`: offline, or against the server. Pinned (a key or
/// a fingerprint the auditor holds), the export is checked here and
/// nothing the server says is trusted; unpinned, the server checks its log
/// against its own key, and the reply says so (issue #11).
async fn verify(a: &VerifyArgs) -> Result<(String, bool)> {
    let given = a.public_key.as_deref().map(public_key).transpose()?;
    if let Some(file) = &a.export {
        let key = given.context("--export needs --public-key: the key you hold")?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        return Ok(pinned_report(&text, &key, a.fingerprint.as_deref()));
    }
    let token_file = a.token_file.clone().context(
        "give --token-file (an auditor's), or --export FILE --public-key K to verify offline",
    )?;
    let conn = Conn {
        server: a.server.clone(),
        token_file,
        ca_cert: None,
        client_cert: None,
        client_key: None,
    };
    let mut c = Client::from_conn(&conn).await?;
    if given.is_none() && a.fingerprint.is_none() {
        let r = rpc(c.audit.verify_log(pb::VerifyLogRequest::default()).await)?;
        let line = format!(
            "{}\nNOT PINNED: checked against the key the server holds now ({}); whoever holds the server's disk can swap it, so pin the key you hold with --public-key or --fingerprint",
            render_verify(&r),
            r.key_fingerprint
        );
        return Ok((line, r.intact));
    }
    let (jsonl, server_key) = export(&mut c).await?;
    let key = match given {
        Some(k) => k,
        None => public_key(&server_key)?,
    };
    Ok(pinned_report(&jsonl, &key, a.fingerprint.as_deref()))
}

/// Verify an export against `key`, which must match `fingerprint` if one
/// is given.
fn pinned_report(text: &str, key: &[u8], fingerprint: Option<&str>) -> (String, bool) {
    let used = chain::key_fingerprint(key);
    if let Some(fp) = fingerprint
        && fp.trim() != used
    {
        return (
            format!(
                "KEY MISMATCH: the log's key is {used}, not the pinned {}",
                fp.trim()
            ),
            false,
        );
    }
    let (line, ok) = export_report(text, key);
    (format!("{line}\npinned to key {used}"), ok)
}

/// Verify an exported log with only the public key: no server involved.
pub fn verify_offline(file: &std::path::Path, key: &str) -> Result<(String, bool)> {
    let public_key = public_key(key)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(export_report(&text, &public_key))
}

fn export_report(text: &str, public_key: &[u8]) -> (String, bool) {
    let r = chain::verify_export(text, public_key);
    let line = match &r.first_bad {
        None => intact(
            r.events as u64,
            r.checkpoints as u64,
            r.checkpointed_through,
        ),
        Some(t) => format!(
            "TAMPERED at line {}{}: {}",
            t.position,
            t.seq.map(|s| format!(" (event {s})")).unwrap_or_default(),
            t.reason
        ),
    };
    (line, r.is_intact())
}

/// The line for a log that verifies, on the server or offline.
fn intact(events: u64, checkpoints: u64, through: i64) -> String {
    format!(
        "intact: {events} events, {checkpoints} signed checkpoints, signed through event {through}"
    )
}

pub fn render_verify(r: &pb::VerifyLogResponse) -> String {
    match r.first_bad_position {
        None => intact(r.events, r.checkpoints, r.checkpointed_through),
        Some(p) => format!("TAMPERED at entry {p}: {}", r.reason),
    }
}

pub fn render_events(events: &[pb::AuditEvent]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "seq", "at", "user", "role", "action", "project", "outcome", "code", "epsilon", "client",
    ]);
    for e in events {
        t.add_row([
            e.seq.to_string(),
            e.at.clone(),
            e.user.clone(),
            e.role.clone(),
            e.action.clone(),
            e.project.clone(),
            e.outcome.clone(),
            e.code.clone(),
            e.epsilon.to_string(),
            e.client.clone(),
        ]);
    }
    format!("{t}\n")
}

pub async fn revoke_token(conn: &Conn, jti: String, reason: String) -> Result<()> {
    let mut c = Client::from_conn(conn).await?;
    rpc(c
        .admin
        .revoke_token(pb::RevokeTokenRequest {
            jti: jti.clone(),
            reason,
        })
        .await)?;
    println!("revoked token {jti}");
    Ok(())
}

#[derive(Subcommand)]
pub enum ReviewCommand {
    /// Releases waiting for review (custodian).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// A held release's table, to review it (custodian).
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Approve a held release (custodian, not on the project).
    Approve(ReviewArgs),
    /// Reject a held release, with a reason.
    Reject(ReviewArgs),
    /// Send a held release back, asking for changes, with a reason.
    Changes(ReviewArgs),
}

#[derive(Args)]
pub struct ReviewArgs {
    #[command(flatten)]
    conn: Conn,
    id: String,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Subcommand)]
pub enum ReleaseCommand {
    /// Your projects' releases and where each stands.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        project: String,
        /// released | held | rejected | withdrawn | changes_requested
        #[arg(long, default_value = "")]
        status: String,
    },
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Take back a held release (researcher).
    Withdraw(ReviewArgs),
    /// Write a released table and its signed manifest to a directory.
    Export {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an exported release offline: signature and table hash.
    Verify {
        /// Directory written by `tre release export`.
        dir: PathBuf,
        /// The server's public key: hex, or a file holding it (state/audit.pub).
        #[arg(long)]
        public_key: String,
    },
}

fn summary_table(releases: &[pb::ReleaseSummary]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["release", "project", "user", "status", "why held", "sql"]);
    for r in releases {
        t.add_row([
            r.id.clone(),
            r.project.clone(),
            r.user.clone(),
            crate::client::release_status_name(r.status),
            r.hold_reason.clone(),
            r.sql.clone(),
        ]);
    }
    format!("{t}\n")
}

fn review_req(a: ReviewArgs) -> (Conn, pb::ReviewReleaseRequest) {
    (
        a.conn,
        pb::ReviewReleaseRequest {
            id: a.id,
            reason: a.reason,
        },
    )
}

async fn show_release(conn: &Conn, id: String) -> Result<pb::GetReleaseResponse> {
    let mut c = Client::from_conn(conn).await?;
    rpc(c.releases.get_release(pb::GetReleaseRequest { id }).await)
}

fn print_release(r: &pb::GetReleaseResponse) {
    if let Some(rel) = &r.release {
        print!("{}", crate::client::render_release(rel, None));
        for n in &rel.notes {
            println!("  {n}");
        }
    }
    for v in &r.reviews {
        println!("  {} {} {}: {}", v.at, v.reviewer, v.decision, v.reason);
    }
    if !r.review_notes.is_empty() {
        println!("checks on exact values (for the reviewing custodian only):");
        for n in &r.review_notes {
            println!("  {n}");
        }
    }
}

pub async fn review(cmd: ReviewCommand) -> Result<()> {
    let summary = match cmd {
        ReviewCommand::List { conn } => {
            let mut c = Client::from_conn(&conn).await?;
            let r = rpc(c
                .releases
                .list_releases(pb::ListReleasesRequest {
                    project: String::new(),
                    status: pb::ReleaseStatus::Held as i32,
                })
                .await)?;
            print!("{}", summary_table(&r.releases));
            return Ok(());
        }
        ReviewCommand::Show { conn, id } => {
            print_release(&show_release(&conn, id).await?);
            return Ok(());
        }
        ReviewCommand::Approve(a) => {
            let (conn, req) = review_req(a);
            let mut c = Client::from_conn(&conn).await?;
            rpc(c.releases.approve_release(req).await)?
        }
        ReviewCommand::Reject(a) => {
            let (conn, req) = review_req(a);
            let mut c = Client::from_conn(&conn).await?;
            rpc(c.releases.reject_release(req).await)?
        }
        ReviewCommand::Changes(a) => {
            let (conn, req) = review_req(a);
            let mut c = Client::from_conn(&conn).await?;
            rpc(c.releases.request_changes(req).await)?
        }
    };
    print!("{}", summary_table(&[summary]));
    Ok(())
}

pub async fn release(cmd: ReleaseCommand) -> Result<()> {
    match cmd {
        ReleaseCommand::List {
            conn,
            project,
            status,
        } => {
            let mut c = Client::from_conn(&conn).await?;
            let r = rpc(c
                .releases
                .list_releases(pb::ListReleasesRequest {
                    project,
                    status: crate::client::release_status_arg(&status)?,
                })
                .await)?;
            print!("{}", summary_table(&r.releases));
        }
        ReleaseCommand::Show { conn, id } => print_release(&show_release(&conn, id).await?),
        ReleaseCommand::Withdraw(a) => {
            let (conn, req) = review_req(a);
            let mut c = Client::from_conn(&conn).await?;
            let r = rpc(c.releases.withdraw_release(req).await)?;
            print!("{}", summary_table(&[r]));
        }
        ReleaseCommand::Export { conn, id, out } => {
            let r = show_release(&conn, id.clone()).await?;
            if r.manifest_json.is_empty() {
                bail!("release {id} is not released yet, so there is nothing to export");
            }
            export_release(&r, &out)?;
            println!(
                "wrote {0}/release.json, {0}/manifest.json and {0}/public_key.hex",
                out.display()
            );
        }
        ReleaseCommand::Verify { dir, public_key } => {
            let line = verify_release(&dir, &public_key)?;
            println!("{line}");
        }
    }
    Ok(())
}

/// The files `tre release verify` checks.
pub fn export_release(r: &pb::GetReleaseResponse, out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("release.json"), &r.table_json)?;
    std::fs::write(out.join("manifest.json"), &r.manifest_json)?;
    std::fs::write(out.join("public_key.hex"), &r.public_key)?;
    Ok(())
}

/// Verify an exported release with the public key alone.
pub fn verify_release(dir: &std::path::Path, key: &str) -> Result<String> {
    let public_key = public_key(key)?;
    let table = std::fs::read(dir.join("release.json"))
        .with_context(|| format!("cannot read {}/release.json", dir.display()))?;
    let manifest = std::fs::read_to_string(dir.join("manifest.json"))
        .with_context(|| format!("cannot read {}/manifest.json", dir.display()))?;
    let signed: tre_store::manifest::SignedManifest =
        serde_json::from_str(&manifest).context("manifest.json is not a release manifest")?;
    signed
        .verify(&table, &public_key)
        .map_err(|e| anyhow::anyhow!("release does NOT verify: {e}"))?;
    let m = &signed.manifest;
    Ok(format!(
        "release {} verifies: project {}, epsilon {}, profile {} ({}), {} cells rounded, {} suppressed, signed by the server",
        m.release_id,
        m.project,
        tre_core::Epsilon::from_nanos(m.epsilon_nanos),
        m.sdc_profile,
        m.sdc_outcome,
        m.cells.rounded,
        m.cells.suppressed
    ))
}

/// A public key given as hex or as a file holding hex.
fn public_key(key: &str) -> Result<Vec<u8>> {
    let key_hex = match std::fs::read_to_string(key) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => key.trim().to_owned(),
    };
    hex::decode(&key_hex)
        .ok()
        .filter(|k| k.len() == 32)
        .context("--public-key must be 64 hex digits (an Ed25519 key) or a file holding them")
}
