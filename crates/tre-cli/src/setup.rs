//! Wiring shared by `serve`, `demo` and `bench`: keys, policy, engine,
//! store, issuer; data generation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tre_core::{Epsilon, ProjectId, Role, UserId};
use tre_gateway::{AppState, AuditNotary, Issuer, Tls};
use tre_policy::Policy;
use tre_query::{Engine, Limits};
use tre_sdc::Profile;
use tre_store::{ProjectSeed, SqliteStore, Store};
use tre_synth::Protection;
use tre_vault::{MASTER_KEY_ENV, MasterKey};

/// The shipped policy and profiles, embedded so the binary works anywhere.
pub const DEFAULT_POLICY: (&str, &str) = (
    "policies/nhs_epr.toml",
    include_str!("../../../policies/nhs_epr.toml"),
);
const DEFAULT_PROFILES: &[(&str, &str)] = &[
    (
        "nhs_sde",
        include_str!("../../../policies/sdc/nhs_sde.toml"),
    ),
    (
        "opensafely",
        include_str!("../../../policies/sdc/opensafely.toml"),
    ),
    ("ukllc", include_str!("../../../policies/sdc/ukllc.toml")),
    (
        "all_of_us",
        include_str!("../../../policies/sdc/all_of_us.toml"),
    ),
    (
        "acro_default",
        include_str!("../../../policies/sdc/acro_default.toml"),
    ),
    (
        "opensafely_midpoint6",
        include_str!("../../../policies/sdc/opensafely_midpoint6.toml"),
    ),
];

#[derive(Args, Clone)]
pub struct GenerateArgs {
    #[arg(long, default_value_t = 100_000)]
    pub patients: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory; its name is the dataset name (e.g. data/nhs_epr).
    #[arg(long)]
    pub out: PathBuf,
    /// Master key file (created 0600 on first use) unless TRE_MASTER_KEY is set.
    #[arg(long, default_value = ".tre/master.key")]
    pub key_file: PathBuf,
    /// Write UNENCRYPTED Parquet, for benchmark baselines only.
    #[arg(long)]
    pub plaintext: bool,
    /// Dataset policy whose `max_rows_per_unit` each table is bounded to
    /// when written (defaults to the embedded policies/nhs_epr.toml). A
    /// policy with a `prescriptions` table gets one.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Years of history ending in 2024 (the shipped policy covers 2024; use
    /// policies/nhs_epr_5y.toml for 5).
    #[arg(long, default_value_t = 1)]
    pub years: u32,
    #[arg(long)]
    pub quiet: bool,
}

pub fn master_key(key_file: &Path, create: bool) -> Result<MasterKey> {
    let env = std::env::var(MASTER_KEY_ENV).ok();
    let (key, source) = MasterKey::resolve(env.as_deref(), key_file, create)?;
    if source == (tre_vault::KeySource::File { created: true }) {
        eprintln!(
            "created master key {} (owner-only); keep it safe",
            key_file.display()
        );
    }
    Ok(key)
}

pub fn generate(args: &GenerateArgs) -> Result<tre_synth::Counts> {
    let key = master_key(&args.key_file, true)?;
    let policy = load_policy(args.policy.as_deref())?;
    let started = std::time::Instant::now();
    if args.plaintext {
        eprintln!(
            "WARNING: writing PLAINTEXT extracts to {} — for benchmark baselines only, never for real data",
            args.out.display()
        );
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.patients)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "generating {bar:30} {pos}/{len} patients ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let protection = if args.plaintext {
        Protection::Plaintext
    } else {
        Protection::Encrypted(&key)
    };
    let spec = tre_synth::Spec::under(&policy, args.patients, args.seed, args.years);
    let counts = tre_synth::generate(&args.out, &spec, protection, &key, |done| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    if !args.quiet {
        eprintln!(
            "wrote {} patients, {} admissions, {} lab results, {} waiting-list pathways, {} prescriptions to {} in {:.1}s, {} bytes ({}); sorted by person_id, {} rows over the policy's per-patient bounds left out",
            counts.patients,
            counts.admissions,
            counts.lab_results,
            counts.waiting_list,
            counts.prescriptions,
            args.out.display(),
            started.elapsed().as_secs_f64(),
            dir_bytes(&args.out),
            if args.plaintext {
                "plaintext"
            } else {
                "encrypted, AES-256-GCM, footer encrypted"
            },
            counts.dropped
        );
    }
    Ok(counts)
}

/// Bytes of the extracts in `dir`, for the operator's record.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    tre_synth::extract_paths(dir)
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// `tre serve`'s settings. Each comes, first found, from its flag, its
/// `TRE_*` environment variable, the `--config` file (the same names in
/// snake_case, e.g. `key_file = "/etc/tre/master.key"`), or its default.
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// A TOML file of these settings, so that a deployment is not twenty
    /// flags. Relative paths in it are relative to the file.
    #[arg(long, env = "TRE_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory: SQLite ledger and audit log, token issuer key.
    #[arg(long, env = "TRE_STATE", default_value = ".tre/server")]
    pub state: PathBuf,
    /// Directory of the dataset's extracts (its name is the dataset name).
    #[arg(long, env = "TRE_DATA", default_value = ".tre/data/nhs_epr")]
    pub data: PathBuf,
    /// Dataset policy (defaults to the embedded policies/nhs_epr.toml).
    #[arg(long, env = "TRE_POLICY")]
    pub policy: Option<PathBuf>,
    /// Directory of SDC profiles (defaults to the embedded policies/sdc).
    #[arg(long, env = "TRE_SDC_DIR")]
    pub sdc_dir: Option<PathBuf>,
    #[arg(long, env = "TRE_KEY_FILE", default_value = ".tre/master.key")]
    pub key_file: PathBuf,
    /// Researchers' address: gRPC and Arrow Flight SQL.
    #[arg(long, env = "TRE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve another dataset beside --data: DATA_DIR=POLICY_FILE
    /// (repeatable; in TRE_ALSO_SERVE, separate them with ';'). Each has its
    /// own policy, disclosure profile, keys and lifetime budget.
    #[arg(long = "also-serve", env = "TRE_ALSO_SERVE", value_delimiter = ';')]
    pub also_serve: Vec<String>,
    /// Seed a project: ID=USER[,USER...] (repeatable; in TRE_PROJECTS,
    /// separate projects with ';').
    #[arg(long = "project", env = "TRE_PROJECTS", value_delimiter = ';')]
    pub projects: Vec<String>,
    /// Budget for seeded projects (defaults to the policy's project_epsilon).
    #[arg(long, env = "TRE_PROJECT_EPSILON")]
    pub project_epsilon: Option<f64>,
    /// Days a seeded project stays open.
    #[arg(long, env = "TRE_PROJECT_DAYS", default_value_t = 365)]
    pub project_days: u64,
    /// Server certificate (PEM). Without TLS the gateway serves loopback only.
    #[arg(long, env = "TRE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TRE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) for client certificates: turns on mutual TLS.
    #[arg(long, env = "TRE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Sign an audit checkpoint every N events (and always at shutdown).
    #[arg(long, env = "TRE_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u32,
    /// Serve Prometheus metrics (off by default) on --metrics-listen.
    #[arg(long, env = "TRE_METRICS")]
    pub metrics: bool,
    /// The operators' metrics address: plain HTTP `GET /metrics`. Keep it
    /// off the researchers' network.
    #[arg(long, env = "TRE_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
}

/// The `--config` file: every setting optional, unknown keys refused.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServeConfig {
    state: Option<PathBuf>,
    data: Option<PathBuf>,
    policy: Option<PathBuf>,
    sdc_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    also_serve: Option<Vec<String>>,
    projects: Option<Vec<String>>,
    project_epsilon: Option<f64>,
    project_days: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    checkpoint_every: Option<u32>,
    metrics: Option<bool>,
    metrics_listen: Option<SocketAddr>,
}

/// Fill in, from `args.config`, every setting that neither a flag nor an
/// environment variable gave (`matches` says which did).
pub fn apply_config(args: &mut ServeArgs, matches: &clap::ArgMatches) -> Result<()> {
    use clap::parser::ValueSource;
    let Some(path) = args.config.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let config: ServeConfig = toml::from_str(&text)
        .with_context(|| format!("config {}: not valid tre serve settings", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let unset = |id: &str| {
        !matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    macro_rules! fill {
        ($($field:ident),* ; paths $($path:ident),* ; optional paths $($opt:ident),*) => {
            $(if let (true, Some(v)) = (unset(stringify!($field)), config.$field) {
                args.$field = v;
            })*
            $(if let (true, Some(v)) = (unset(stringify!($path)), config.$path) {
                args.$path = resolve(v);
            })*
            $(if let (true, Some(v)) = (unset(stringify!($opt)), config.$opt) {
                args.$opt = Some(resolve(v));
            })*
        };
    }
    fill!(listen, also_serve, projects, project_days, checkpoint_every, metrics, metrics_listen;
          paths state, data, key_file;
          optional paths policy, sdc_dir, tls_cert, tls_key, tls_client_ca);
    if let (true, Some(e)) = (unset("project_epsilon"), config.project_epsilon) {
        args.project_epsilon = Some(e);
    }
    Ok(())
}

impl ServeArgs {
    /// Defaults for an in-process gateway over `data`, keeping state in `state`.
    pub fn local(state: PathBuf, data: PathBuf, key_file: PathBuf, listen: SocketAddr) -> Self {
        Self {
            config: None,
            state,
            data,
            policy: None,
            sdc_dir: None,
            key_file,
            listen,
            also_serve: vec![],
            projects: vec![],
            project_epsilon: None,
            project_days: 365,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            checkpoint_every: 100,
            metrics: false,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }

    pub fn tls(&self) -> Result<Option<Tls>> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        Ok(match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Tls {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                client_ca_pem: self.tls_client_ca.as_ref().map(read).transpose()?,
            }),
            (None, None) if self.tls_client_ca.is_none() => None,
            _ => bail!(
                "TLS needs both tls_cert and tls_key (and tls_client_ca only with them); set the missing one"
            ),
        })
    }
}

pub fn load_policy(path: Option<&Path>) -> Result<Policy> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read policy {}", p.display()))?,
        ),
        None => (DEFAULT_POLICY.0.to_owned(), DEFAULT_POLICY.1.to_owned()),
    };
    Ok(Policy::from_toml(&name, &text)?)
}

pub fn load_profile(dir: Option<&Path>, name: &str) -> Result<Profile> {
    match dir {
        Some(d) => {
            let p = d.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read sdc profile {}", p.display()))?;
            Ok(Profile::from_toml(&p.display().to_string(), &text)?)
        }
        None => match DEFAULT_PROFILES.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Ok(Profile::from_toml(&format!("policies/sdc/{n}.toml"), text)?),
            None => bail!("no embedded sdc profile '{name}'; pass --sdc-dir"),
        },
    }
}

/// The engine over the extracts in `data`, under the policy at `policy`
/// (or the embedded one) and its disclosure profile from `sdc_dir` (or the
/// embedded ones).
pub fn open_engine(
    policy: Option<&Path>,
    sdc_dir: Option<&Path>,
    data: &Path,
    key_file: &Path,
) -> Result<Engine> {
    let policy = load_policy(policy)?;
    let profile = load_profile(sdc_dir, &policy.sdc_profile)?;
    let master = Arc::new(master_key(key_file, false)?);
    Ok(Engine::open(
        policy,
        profile,
        data,
        master,
        Limits::default(),
    )?)
}

/// The engine of every dataset `args` serves: `--data` under `--policy`,
/// then each `--also-serve`.
pub fn open_engines(args: &ServeArgs) -> Result<Vec<Engine>> {
    let mut engines = vec![open_engine(
        args.policy.as_deref(),
        args.sdc_dir.as_deref(),
        &args.data,
        &args.key_file,
    )?];
    for spec in &args.also_serve {
        let (data, policy) = spec
            .split_once('=')
            .with_context(|| format!("--also-serve {spec}: write DATA_DIR=POLICY_FILE"))?;
        engines.push(open_engine(
            Some(Path::new(policy)),
            args.sdc_dir.as_deref(),
            Path::new(data),
            &args.key_file,
        )?);
    }
    Ok(engines)
}

/// Open everything the gateway needs, failing with the precise reason.
pub fn open_state(args: &ServeArgs) -> Result<AppState> {
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("cannot create {}", args.state.display()))?;
    let engines = open_engines(args)?;
    let engine = engines.first().context("no dataset to serve")?;
    let notary: Arc<dyn tre_store::Notary> = Arc::new(AuditNotary::load_or_create(&args.state)?);
    let metrics = tre_gateway::Metrics::new();
    let store = SqliteStore::open(
        &args.state.join("tre.db"),
        Arc::clone(&notary),
        args.checkpoint_every,
    )?
    .observed_by(Arc::clone(&metrics) as Arc<dyn tre_store::AuditObserver>)?;
    let interrupted = store.recover_interrupted()?;
    if interrupted > 0 {
        eprintln!(
            "recovered {interrupted} queries interrupted by the last shutdown: their charges stand and each is now in the audit log"
        );
    }
    let issuer = Issuer::load_or_create(&args.state)?;
    let budget = engine.policy().budget;
    let epsilon = match args.project_epsilon {
        Some(e) => Epsilon::requested(e)?,
        None => budget.project_epsilon,
    };
    let end_date = tre_store::today()
        .checked_add_days(chrono::Days::new(args.project_days))
        .context("--project-days is too large")?;
    for spec in &args.projects {
        let (id, members) = spec
            .split_once('=')
            .with_context(|| format!("--project {spec}: write ID=USER[,USER...]"))?;
        store.seed_project(&ProjectSeed {
            id: ProjectId::new(id)?,
            title: id.to_owned(),
            dataset: engine.policy().dataset.clone(),
            epsilon,
            delta: budget.project_delta,
            members: members
                .split(',')
                .map(UserId::new)
                .collect::<Result<_, _>>()?,
            end_date,
        })?;
    }
    let engines = tre_gateway::Served::new(
        tre_gateway::Datasets::new(engines).map_err(|e| anyhow::anyhow!(e))?,
    );
    Ok(AppState {
        engines,
        store: Box::new(store),
        issuer,
        notary,
        connections: Default::default(),
        metrics,
    })
}

/// On each SIGHUP, open every dataset again (a new opt-out list, a new
/// import) and serve the new engines from then on; queries already running
/// finish on the old ones. Each reload is in the audit log, with the
/// version (snapshot hash) now served, or why it failed, in which case the
/// old engines stay.
async fn reload_on_hangup(state: Arc<AppState>, args: ServeArgs) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        eprintln!("cannot listen for SIGHUP; restart the gateway to serve new versions");
        return;
    };
    while hangups.recv().await.is_some() {
        let args = args.clone();
        let opened = tokio::task::spawn_blocking(move || open_engines(&args)).await;
        let mut event = tre_store::AuditEvent::new(OPERATOR, "admin", "", "dataset.reload");
        match opened
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|r| r)
            .and_then(|engines| {
                state
                    .engines
                    .reload(engines)
                    .map_err(|e| anyhow::anyhow!(e))
            }) {
            Ok(served) => {
                let versions: Vec<String> = served
                    .iter()
                    .map(|e| format!("{} {}", e.policy().dataset, e.snapshot_hash()))
                    .collect();
                eprintln!("reloaded: {}", versions.join(", "));
                event.set_outcome(tre_core::Outcome::Allowed);
                event.detail = format!("serving {}", versions.join(", "));
            }
            Err(e) => {
                eprintln!("reload failed, still serving the previous versions: {e:#}");
                event.set_outcome(tre_core::Outcome::Refused);
                event.detail = format!("reload failed: {e:#}");
            }
        }
        if let Err(e) = state.store.append_audit(&event) {
            eprintln!("cannot record the reload in the audit log: {e}");
        }
    }
}

/// Who the audit log names for what the operator does at the server.
pub const OPERATOR: &str = "(operator)";

pub async fn serve(args: ServeArgs) -> Result<()> {
    let tls = args.tls()?;
    let state = Arc::new(open_state(&args)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "tre gateway listening on {} (datasets {}, {}); audit public key in {}",
        listener.local_addr()?,
        state.engines.now().names().collect::<Vec<_>>().join(", "),
        match &tls {
            Some(t) if t.client_ca_pem.is_some() => "mutual TLS",
            Some(_) => "TLS",
            None => "plaintext, loopback only",
        },
        args.state.join("audit.pub").display()
    );
    let served = state.engines.now();
    let joints: Vec<&str> = served.joint_names().collect();
    if !joints.is_empty() {
        eprintln!(
            "datasets a query may join (one privacy unit and linkage; tables named dataset.table): {}",
            joints.join(", ")
        );
    }
    drop(served);
    eprintln!(
        "after `tre dataset optouts` or an import, send SIGHUP (kill -HUP {}) to serve the new versions without a restart",
        std::process::id()
    );
    tokio::spawn(reload_on_hangup(Arc::clone(&state), args.clone()));
    // Written down by the auditor now, it pins later verification to this
    // key: a key swapped on disk no longer passes (issue #11).
    eprintln!(
        "audit key fingerprint {}; auditors: note it and verify with `tre audit verify --fingerprint`",
        tre_store::chain::key_fingerprint(&state.store.audit_public_key())
    );
    // One signal stops both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tre_gateway::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if args.metrics {
        let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("cannot listen for metrics on {}", args.metrics_listen))?;
        let at = metrics.local_addr()?;
        eprintln!(
            "metrics on http://{at}/metrics{}",
            if at.ip().is_loopback() {
                ""
            } else {
                " (not loopback: keep this address to operators)"
            }
        );
        let state = Arc::clone(&state);
        let shutdown = until_stopped(stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = tre_gateway::serve_metrics(state, metrics, shutdown).await {
                eprintln!("{e}");
            }
        });
    }
    tre_gateway::serve(state, listener, tls, until_stopped(stopped)).await?;
    Ok(())
}

/// A signed token and its id (for revocation).
pub fn issue_token(
    state: &Path,
    user: &str,
    role: &str,
    ttl: Duration,
    custodian_of: Option<Vec<String>>,
) -> Result<(String, String)> {
    let issuer = Issuer::load_or_create(state)?;
    let role: Role = role.parse()?;
    if custodian_of.is_some() && role != Role::Custodian {
        bail!("--custodian-of scopes a custodian's token; this token is for a {role}");
    }
    let mut claims = Issuer::claims(&UserId::new(user)?, role, ttl.as_secs())?;
    claims.custodian_of = custodian_of;
    Ok((issuer.sign(&claims)?, claims.jti))
}
