//! Test harness for the end-to-end tests: one small encrypted dataset per
//! test process, and a real gateway per test on 127.0.0.1:0.
//!
//! This crate is test support only; nothing may depend on it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tempfile::TempDir;
use tonic::transport::Channel;
use tre_core::{Delta, Epsilon, ProjectId, Role, UserId};
use tre_gateway::{AppState, AuditNotary, Issuer, Tls};
use tre_policy::Policy;
use tre_proto::v1::catalog_service_client::CatalogServiceClient;
use tre_proto::v1::query_service_client::QueryServiceClient;
use tre_query::{Engine, Limits};
use tre_sdc::Profile;
use tre_store::{AuditFilter, ProjectSeed, SqliteStore, Store};
use tre_synth::Protection;
use tre_vault::MasterKey;

pub const POLICY: &str = include_str!("../policies/nhs_epr.toml");
pub const POLICY_5Y: &str = include_str!("../policies/nhs_epr_5y.toml");
pub const NHS_SDE: &str = include_str!("../policies/sdc/nhs_sde.toml");
pub const PATIENTS: u64 = 3_000;
pub const MASTER: [u8; 32] = [0x42; 32];

pub struct Fixture {
    _dir: TempDir,
    pub data: PathBuf,
    pub plaintext: PathBuf,
    pub master: Arc<MasterKey>,
}

/// One encrypted and one plaintext copy of the same synthetic data, made
/// once per test process.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let master = Arc::new(MasterKey::from_bytes(&MASTER).unwrap_or_else(|e| panic!("{e}")));
        let data = dir.path().join("enc/nhs_epr");
        let plaintext = dir.path().join("plain/nhs_epr");
        tre_synth::generate(
            &data,
            &spec(PATIENTS, 11),
            Protection::Encrypted(&master),
            &master,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        tre_synth::generate(
            &plaintext,
            &spec(PATIENTS, 11),
            Protection::Plaintext,
            &master,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Fixture {
            _dir: dir,
            data,
            plaintext,
            master,
        }
    })
}

/// A copy of the fixture's encrypted extracts in a new `nhs_epr`
/// directory, for a test that damages or replaces one of them.
pub fn copy_of_fixture() -> (TempDir, PathBuf) {
    let f = fixture();
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = copy.path().join("nhs_epr");
    std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
    for table in tre_synth::TABLES {
        let name = format!("{table}.parquet");
        std::fs::copy(f.data.join(&name), data.join(&name)).unwrap_or_else(|e| panic!("{e}"));
    }
    (copy, data)
}

/// The patients flagged `research_opt_out` in `dir`'s patients extract.
pub fn opted_out(dir: &std::path::Path) -> std::collections::HashSet<String> {
    use datafusion::arrow::array::AsArray;
    let mut out = std::collections::HashSet::new();
    for b in read_extract(dir, "patients", &fixture().master) {
        let (ids, flags) = (b.column(0).as_string::<i32>(), b.column(10).as_boolean());
        for (id, flag) in ids.iter().zip(flags.iter()) {
            if let (Some(id), Some(true)) = (id, flag) {
                out.insert(id.to_owned());
            }
        }
    }
    out
}

/// The batches of one encrypted extract, `dir/<table>.parquet`.
pub fn read_extract(
    dir: &std::path::Path,
    table: &str,
    master: &Arc<MasterKey>,
) -> Vec<datafusion::arrow::array::RecordBatch> {
    let dataset = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    tre_extract::reader(
        &dir.join(format!("{table}.parquet")),
        &tre_synth::file_id(dataset, table),
        master,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .build()
    .unwrap_or_else(|e| panic!("{e}"))
    .collect::<Result<Vec<_>, _>>()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The shipped policy's bound on `table`'s rows per patient, as the
/// generator applies it.
pub fn bound(table: &str) -> Option<u32> {
    policy().tables.get(table).map(|t| t.max_rows_per_unit)
}

/// What `tre dataset generate` makes of `patients` and `seed` under the
/// shipped policy.
pub fn spec(patients: u64, seed: u64) -> tre_synth::Spec {
    tre_synth::Spec::under(&policy(), patients, seed, 1)
}

/// Write `batches` as the encrypted extract `dir/<table>.parquet`, as the
/// generator would: sorted by `person_id` (stably), then bounded to the
/// policy's rows per patient by the extract writer.
pub fn write_extract(
    dir: &std::path::Path,
    table: &str,
    master: &MasterKey,
    batches: &[datafusion::arrow::array::RecordBatch],
) {
    use datafusion::arrow::compute::{
        SortColumn, SortOptions, concat_batches, lexsort_to_indices, take_record_batch,
    };
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    let dataset = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let schema = tre_synth::schema(table);
    let all = concat_batches(&schema, batches).unwrap_or_else(|e| panic!("{e}"));
    let unit = all
        .column_by_name("person_id")
        .unwrap_or_else(|| panic!("{table} has no person_id"));
    // Sorting on the unit and then the row number keeps each patient's
    // rows in their original order.
    let position = std::sync::Arc::new(datafusion::arrow::array::UInt64Array::from_iter_values(
        0..all.num_rows() as u64,
    ));
    let order = lexsort_to_indices(
        &[
            SortColumn {
                values: std::sync::Arc::clone(unit),
                options: Some(SortOptions::default()),
            },
            SortColumn {
                values: position,
                options: None,
            },
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sorted = take_record_batch(&all, &order).unwrap_or_else(|e| panic!("{e}"));
    let file_id = tre_synth::file_id(dataset, table);
    let mut w = tre_extract::ExtractWriter::create(
        &dir.join(format!("{table}.parquet")),
        schema,
        "person_id",
        bound(table).unwrap_or_else(|| panic!("no bound for {table}")),
        tre_extract::Protection::Encrypted {
            master,
            file_id: &file_id,
        },
        [5; 32],
    )
    .and_then(|w| {
        w.with_distinct_caps(
            spec(1, 1)
                .distinct_caps
                .get(table)
                .cloned()
                .unwrap_or_default(),
        )
    })
    .unwrap_or_else(|e| panic!("{e}"));
    w.write(&sorted).unwrap_or_else(|e| panic!("{e}"));
    w.close().unwrap_or_else(|e| panic!("{e}"));
}

pub fn policy() -> Policy {
    Policy::from_toml("policies/nhs_epr.toml", POLICY).unwrap_or_else(|e| panic!("{e}"))
}

pub fn engine_with(master: Arc<MasterKey>) -> Result<Engine, tre_query::QueryError> {
    engine_on(&fixture().data, master)
}

pub fn engine_on(
    data: &std::path::Path,
    master: Arc<MasterKey>,
) -> Result<Engine, tre_query::QueryError> {
    engine_under(policy(), data, master)
}

/// An engine serving `data` under `policy`, with the shipped profile.
pub fn engine_under(
    policy: Policy,
    data: &std::path::Path,
    master: Arc<MasterKey>,
) -> Result<Engine, tre_query::QueryError> {
    engine_limited(policy, data, master, Limits::default())
}

/// An engine serving `data` under `policy` within `limits`.
pub fn engine_limited(
    policy: Policy,
    data: &std::path::Path,
    master: Arc<MasterKey>,
    limits: Limits,
) -> Result<Engine, tre_query::QueryError> {
    let profile =
        Profile::from_toml("policies/sdc/nhs_sde.toml", NHS_SDE).unwrap_or_else(|e| panic!("{e}"));
    Engine::open(policy, profile, data, master, limits)
}

/// `sql` compiled at ε = 1 (no δ), with its budget; panics on a refusal.
pub async fn compiled(engine: &Engine, sql: &str) -> (tre_query::PrivatePlan, tre_query::Budget) {
    let budget = engine
        .budget(Some(1.0), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let plan = engine
        .compile(sql, budget)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (plan, budget)
}

pub struct Server {
    pub url: String,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    pub state_dir: TempDir,
}

/// Audit checkpoints in tests come every this many events.
pub const CHECKPOINT_EVERY: u32 = 10;

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Start a gateway with the given projects: (id, members, budget).
pub async fn start(projects: &[(&str, &[&str], f64)]) -> Server {
    start_on(&fixture().data, projects).await
}

/// Start a gateway over the extracts in `data` (encrypted under `MASTER`).
pub async fn start_on(data: &std::path::Path, projects: &[(&str, &[&str], f64)]) -> Server {
    let state_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    start_in(state_dir, data, projects, None).await
}

/// Open the state in `state_dir` (its store, keys and projects) as the
/// server binary would.
pub fn open_state(
    state_dir: &std::path::Path,
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
) -> AppState {
    open_state_with(state_dir, data, projects, policy())
}

/// `open_state` under another policy (same SDC profile).
pub fn open_state_with(
    state_dir: &std::path::Path,
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
    policy: Policy,
) -> AppState {
    let profile =
        Profile::from_toml("policies/sdc/nhs_sde.toml", NHS_SDE).unwrap_or_else(|e| panic!("{e}"));
    open_state_profiled(state_dir, data, projects, policy, profile)
}

/// `open_state` under another policy and disclosure profile.
pub fn open_state_profiled(
    state_dir: &std::path::Path,
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
    policy: Policy,
    profile: Profile,
) -> AppState {
    open_state_limited(
        state_dir,
        data,
        projects,
        policy,
        profile,
        Limits::default(),
    )
}

/// `open_state` under another policy, profile and engine limits.
pub fn open_state_limited(
    state_dir: &std::path::Path,
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
    policy: Policy,
    profile: Profile,
    limits: Limits,
) -> AppState {
    // Not `fixture().master`: a child server process must not generate data.
    let master = Arc::new(MasterKey::from_bytes(&MASTER).unwrap_or_else(|e| panic!("{e}")));
    let engine =
        Engine::open(policy, profile, data, master, limits).unwrap_or_else(|e| panic!("{e}"));
    let dataset = engine.policy().dataset.clone();
    let state = open_state_engines(state_dir, vec![engine]);
    seed_projects_on(&*state.store, &dataset, projects);
    state
}

/// Seed `projects` (id, members, ε budget) on the fixture's dataset, active
/// for 30 days.
pub fn seed_projects(store: &dyn Store, projects: &[(&str, &[&str], f64)]) {
    seed_projects_on(store, "nhs_epr", projects);
}

/// Seed `projects` on `dataset`.
pub fn seed_projects_on(store: &dyn Store, dataset: &str, projects: &[(&str, &[&str], f64)]) {
    for (id, members, budget) in projects {
        store
            .seed_project(&ProjectSeed {
                id: ProjectId::new(*id).unwrap_or_else(|e| panic!("{e}")),
                title: (*id).to_owned(),
                dataset: dataset.into(),
                epsilon: Epsilon::new(*budget).unwrap_or_else(|e| panic!("{e}")),
                delta: Delta::new(1e-5).unwrap_or_else(|e| panic!("{e}")),
                members: members
                    .iter()
                    .map(|m| UserId::new(*m).unwrap_or_else(|e| panic!("{e}")))
                    .collect(),
                end_date: tre_store::today()
                    .checked_add_days(chrono::Days::new(30))
                    .unwrap_or_else(|| unreachable!()),
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Start a gateway keeping its state in `state_dir`, optionally with TLS.
pub async fn start_in(
    state_dir: TempDir,
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
    tls: Option<Tls>,
) -> Server {
    let state = open_state(state_dir.path(), data, projects);
    serve_state(state_dir, state, tls).await
}

/// Start a gateway over the extracts in `data` under `policy`, with the
/// projects approved for its dataset.
pub async fn start_over(
    data: &std::path::Path,
    policy: Policy,
    projects: &[(&str, &[&str], f64)],
) -> Server {
    let state_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = open_state_with(state_dir.path(), data, projects, policy);
    serve_state(state_dir, state, None).await
}

/// Start one gateway serving every engine in `engines`, with projects
/// seeded as (id, members, dataset, ε budget).
pub async fn start_datasets(engines: Vec<Engine>, seeds: &[(&str, &[&str], &str, f64)]) -> Server {
    let state_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = open_state_engines(state_dir.path(), engines);
    for (id, members, dataset, budget) in seeds {
        seed_projects_on(&*state.store, dataset, &[(id, members, *budget)]);
    }
    serve_state(state_dir, state, None).await
}

/// The state of a gateway over `engines`, with no project.
fn open_state_engines(state_dir: &std::path::Path, engines: Vec<Engine>) -> AppState {
    let notary: Arc<dyn tre_store::Notary> =
        Arc::new(AuditNotary::load_or_create(state_dir).unwrap_or_else(|e| panic!("{e}")));
    let metrics = tre_gateway::Metrics::new();
    let store = SqliteStore::open(
        &state_dir.join("tre.db"),
        Arc::clone(&notary),
        CHECKPOINT_EVERY,
    )
    .and_then(|s| s.observed_by(Arc::clone(&metrics) as Arc<dyn tre_store::AuditObserver>))
    .unwrap_or_else(|e| panic!("{e}"));
    // A crash's interrupted queries are settled before serving.
    store
        .recover_interrupted()
        .unwrap_or_else(|e| panic!("{e}"));
    AppState {
        engines: tre_gateway::Served::new(
            tre_gateway::Datasets::new(engines).unwrap_or_else(|e| panic!("{e}")),
        ),
        store: Box::new(store),
        issuer: Issuer::load_or_create(state_dir).unwrap_or_else(|e| panic!("{e}")),
        notary,
        connections: Default::default(),
        metrics,
    }
}

/// Start a gateway under the policy text `policy_toml`.
pub async fn start_with_policy(policy_toml: &str, projects: &[(&str, &[&str], f64)]) -> Server {
    start_with_profile(policy_toml, NHS_SDE, projects).await
}

/// Start a gateway under the policy text `policy_toml` and the disclosure
/// profile text `profile_toml`.
pub async fn start_with_profile(
    policy_toml: &str,
    profile_toml: &str,
    projects: &[(&str, &[&str], f64)],
) -> Server {
    let state_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let policy =
        Policy::from_toml("test-policy.toml", policy_toml).unwrap_or_else(|e| panic!("{e}"));
    let profile =
        Profile::from_toml("test-profile.toml", profile_toml).unwrap_or_else(|e| panic!("{e}"));
    let state = open_state_profiled(state_dir.path(), &fixture().data, projects, policy, profile);
    serve_state(state_dir, state, None).await
}

/// Start a gateway over the fixture with engine and connection limits of
/// the test's choosing.
pub async fn start_limited(
    projects: &[(&str, &[&str], f64)],
    limits: Limits,
    connections: tre_gateway::ConnectionLimits,
) -> Server {
    start_limited_on(&fixture().data, projects, limits, connections).await
}

/// `start_limited` over the extracts in `data` (encrypted under `MASTER`).
pub async fn start_limited_on(
    data: &std::path::Path,
    projects: &[(&str, &[&str], f64)],
    limits: Limits,
    connections: tre_gateway::ConnectionLimits,
) -> Server {
    let state_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let profile =
        Profile::from_toml("policies/sdc/nhs_sde.toml", NHS_SDE).unwrap_or_else(|e| panic!("{e}"));
    let mut state = open_state_limited(state_dir.path(), data, projects, policy(), profile, limits);
    state.connections = connections;
    serve_state(state_dir, state, None).await
}

/// Run the calling test again, alone, in a child process, so that what it
/// measures of its process (CPU time) is its own. Returns true in the child, which then runs the test's body;
/// in the parent, asserts that the child passed and returns false.
pub fn in_own_process(name: &str) -> bool {
    if std::env::var("TRE_OWN_PROCESS").as_deref() == Ok(name) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap_or_else(|e| panic!("{e}")))
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env("TRE_OWN_PROCESS", name)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{name} failed in its own process:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// CPU time this process has used (user + system), from /proc: a query's
/// work shows here whichever thread runs it.
pub fn process_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, so 11 and 12 after the name
    // and state; the kernel counts in USER_HZ, 100 on Linux.
    std::time::Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

async fn serve_state(state_dir: TempDir, state: AppState, tls: Option<Tls>) -> Server {
    let state = Arc::new(state);
    let (addr, stop, handle) = tre_gateway::spawn(
        Arc::clone(&state),
        "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        tls.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let scheme = if tls.is_some() { "https" } else { "http" };
    Server {
        url: format!("{scheme}://{addr}"),
        state,
        stop: Some(stop),
        handle: Some(handle),
        state_dir,
    }
}

impl Server {
    pub fn token(&self, user: &str, role: Role) -> String {
        self.state
            .issuer
            .issue(
                &UserId::new(user).unwrap_or_else(|e| panic!("{e}")),
                role,
                3600,
            )
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap_or_else(|e| panic!("{e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn clients(&self) -> (QueryServiceClient<Channel>, CatalogServiceClient<Channel>) {
        let ch = self.channel().await;
        (
            QueryServiceClient::new(ch.clone()),
            CatalogServiceClient::new(ch),
        )
    }

    /// Stop the server and wait until it has shut down (and signed its
    /// shutdown checkpoint).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    pub fn spent(&self, project: &str) -> f64 {
        self.state
            .store
            .project(&ProjectId::new(project).unwrap_or_else(|e| panic!("{e}")))
            .map(|p| p.spent())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn audit_len(&self) -> usize {
        self.state
            .store
            .audit_events(&AuditFilter::default())
            .map(|e| e.len())
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Wrap a message with a bearer token.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// A status's stable code (its `tre-code` header), or "" without one.
pub fn status_code(s: &tonic::Status) -> String {
    s.metadata()
        .get("tre-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The reply's stable code, "ok", or "no code".
pub fn code_of<T>(r: Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(s) => match status_code(&s) {
            c if c.is_empty() => "no code".to_owned(),
            c => c,
        },
    }
}

/// Sends raw bytes as a gRPC message, so a test can send what no
/// generated client would.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

/// Send `body` to `path` as a unary call; the reply's code.
pub async fn raw_call(
    channel: &tonic::transport::Channel,
    path: &str,
    body: Vec<u8>,
    token: &str,
) -> String {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(e) = grpc.ready().await {
        return format!("not ready: {e}");
    }
    let r = grpc
        .unary(
            authed(body, token),
            http::uri::PathAndQuery::try_from(path).unwrap_or_else(|e| panic!("{e}")),
            RawCodec,
        )
        .await;
    code_of(r)
}
