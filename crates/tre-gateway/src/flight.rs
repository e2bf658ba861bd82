//! Arrow Flight SQL for stock clients (ADBC from Python and R, JDBC,
//! flightsql-dbapi), on the gateway's own address (issue #14).
//!
//! Only the transport differs from gRPC `Submit`: every call goes through
//! the same `begin`/`finish` (one audit event, the same bearer tokens and
//! authorisation rows), and a statement's release is made by the same
//! `Services::release`, so its charge and its `query.submit` event are the
//! ones a gRPC Submit would give.
//!
//! - A prepare (`CreatePreparedStatement`, which ADBC sends before every
//!   statement) is a dry run: it compiles, charges nothing and reads no
//!   data.
//! - The release runs once, at GetFlightInfo. Its table is kept here under
//!   a random handle bound to the caller, for a while; DoGet only streams a
//!   stored table to its owner. A ticket never carries SQL, and nothing a
//!   client puts in a ticket reaches the engine.
//! - A refusal keeps its code (the `tre-code` trailer); a held release is
//!   an error that says so, not an empty table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{
    GetCatalogsBuilder, GetDbSchemasBuilder, GetTablesBuilder, SqlInfoData, SqlInfoDataBuilder,
};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket,
};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use ring::rand::SecureRandom;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tre_core::Principal;
use tre_query::{Cell, ReleaseColumn};
use tre_store::ReleaseStatus;

use crate::authz::Rpc;
use crate::service::{Note, Services, Target, handle};
use crate::{GatewayError, ServerFault};

/// The catalog and schema every table is listed under. Queries name
/// tables bare; the names are what DBeaver and `adbc_get_objects` show.
const SCHEMA: &str = "public";
/// Table types: an extract, or a public reference lookup.
const EXTRACT: &str = "TABLE";
const REFERENCE: &str = "REFERENCE TABLE";

/// The headers that carry what gRPC's `QueryRequest` carries besides SQL
/// (ADBC: `adbc.flight.sql.rpc.call_header.<name>`).
pub const PROJECT_HEADER: &str = "x-tre-project";
pub const EPSILON_HEADER: &str = "x-tre-epsilon";
pub const DELTA_HEADER: &str = "x-tre-delta";
pub const TOTALS_HEADER: &str = "x-tre-totals";
pub const DATASET_HEADER: &str = "x-tre-dataset";

/// How long a stored result or prepared statement lives, and how many one
/// caller may hold (the oldest goes first).
const HANDLE_TTL: Duration = Duration::from_secs(30 * 60);
const HANDLES_PER_CALLER: usize = 64;

type DoGetStream = <Flight as FlightService>::DoGetStream;

/// What a metadata listing shows this caller.
type Listing<C> = fn(&Flight, &Principal, C) -> Result<RecordBatch, GatewayError>;

/// The Flight SQL service: the gRPC services' state plus the handles.
#[derive(Clone)]
pub(crate) struct Flight {
    services: Services,
    stash: Arc<Stash>,
    sql_info: Arc<SqlInfoData>,
}

impl Flight {
    pub(crate) fn new(services: Services) -> Result<Self, GatewayError> {
        Ok(Self {
            services,
            stash: Arc::default(),
            sql_info: Arc::new(sql_info()?),
        })
    }
}

/// A statement as a Flight SQL client asks for it: SQL from the command,
/// the rest from headers. A bad header is kept to be refused inside the
/// audited call, not before it.
struct Asked {
    project: String,
    sql: String,
    options: Result<Options, String>,
}

struct Options {
    epsilon: Option<f64>,
    delta: Option<f64>,
    totals: bool,
    /// Which of the project's datasets, when it has several.
    dataset: Option<String>,
}

impl Target for Asked {
    fn project(&self) -> &str {
        &self.project
    }
    fn sql(&self) -> &str {
        &self.sql
    }
}

impl Asked {
    fn read(meta: &MetadataMap, sql: String) -> Self {
        let project = header(meta, PROJECT_HEADER);
        let options = (|| {
            let project = project.clone()?;
            if project.as_deref().unwrap_or_default().is_empty() {
                return Err(format!(
                    "no project; send the header `{PROJECT_HEADER}: <project id>` (ADBC: db_kwargs \"adbc.flight.sql.rpc.call_header.{PROJECT_HEADER}\")"
                ));
            }
            let number = |name: &str| -> Result<Option<f64>, String> {
                header(meta, name)?
                    .map(|v| {
                        v.trim()
                            .parse::<f64>()
                            .map_err(|_| format!("header `{name}` must be a number, not '{v}'"))
                    })
                    .transpose()
            };
            let totals = match header(meta, TOTALS_HEADER)?.as_deref().map(str::trim) {
                None | Some("false" | "0" | "") => false,
                Some("true" | "1") => true,
                Some(other) => {
                    return Err(format!(
                        "header `{TOTALS_HEADER}` must be true or false, not '{other}'"
                    ));
                }
            };
            Ok(Options {
                epsilon: number(EPSILON_HEADER)?,
                delta: number(DELTA_HEADER)?,
                totals,
                dataset: header(meta, DATASET_HEADER)?.filter(|d| !d.trim().is_empty()),
            })
        })();
        Self {
            project: project.ok().flatten().unwrap_or_default(),
            sql,
            options,
        }
    }

    /// The query, and the dataset it names (if any).
    fn query(&self) -> Result<(tre_release::Query, Option<String>), GatewayError> {
        let o = self
            .options
            .as_ref()
            .map_err(|e| GatewayError::BadRequest(e.clone()))?;
        Ok((
            tre_release::Query {
                sql: self.sql.clone(),
                epsilon: o.epsilon,
                delta: o.delta,
                totals: o.totals,
            },
            o.dataset.clone(),
        ))
    }
}

/// One header's value. Statement-level headers add to connection-level
/// ones in ADBC, so a header sent twice is refused rather than guessed.
fn header(meta: &MetadataMap, name: &str) -> Result<Option<String>, String> {
    let mut values = meta.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(format!(
            "header `{name}` was sent more than once; set it on the connection or on the statement, not both"
        ));
    }
    first
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| format!("header `{name}` must be text"))
        })
        .transpose()
}

/// What a handle names, and whose it is.
struct Held {
    owner: String,
    expires: Instant,
    item: Item,
}

#[derive(Clone)]
enum Item {
    Prepared(Arc<Prepared>),
    Result(Arc<Ready>),
}

/// A compiled statement: run at each GetFlightInfo on it.
struct Prepared {
    project: String,
    dataset: Option<String>,
    query: tre_release::Query,
}

/// A release's table, made once, waiting for its owner's DoGet.
struct Ready {
    release_id: String,
    project: String,
    batch: RecordBatch,
}

/// Results and prepared statements, by random handle. In memory: a
/// restart loses them, and the client runs the statement again (a repeat
/// costs nothing).
#[derive(Default)]
struct Stash(Mutex<HashMap<String, Held>>);

impl Stash {
    fn put(&self, owner: &Principal, item: Item) -> Result<String, GatewayError> {
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| ServerFault::Random)?;
        let handle = hex::encode(bytes);
        let now = Instant::now();
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|_, h| h.expires > now);
        let owner = owner.user.to_string();
        let mine: Vec<(&String, Instant)> = held
            .iter()
            .filter(|(_, h)| h.owner == owner)
            .map(|(k, h)| (k, h.expires))
            .collect();
        if mine.len() >= HANDLES_PER_CALLER
            && let Some(oldest) = mine
                .iter()
                .min_by_key(|(_, e)| *e)
                .map(|(k, _)| (*k).clone())
        {
            held.remove(&oldest);
        }
        held.insert(
            handle.clone(),
            Held {
                owner,
                expires: now + HANDLE_TTL,
                item,
            },
        );
        Ok(handle)
    }

    /// The caller's item under `handle`; anyone else's is as absent as a
    /// forged one.
    fn get(&self, owner: &Principal, handle: &[u8]) -> Option<Item> {
        let handle = std::str::from_utf8(handle).ok()?;
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(handle)
            .filter(|h| h.owner == owner.user.as_str() && h.expires > Instant::now())
            .map(|h| h.item.clone())
    }

    fn remove(&self, owner: &Principal, handle: &[u8]) {
        let Ok(handle) = std::str::from_utf8(handle) else {
            return;
        };
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if held
            .get(handle)
            .is_some_and(|h| h.owner == owner.user.as_str())
        {
            held.remove(handle);
        }
    }
}

/// The Arrow schema of a release with these columns: a key column as
/// text; each value as its value, `_ci_low`, `_ci_high` (absent when
/// suppressed or not applicable) and `_status`. Field metadata says how a
/// value was made; prepare and execute derive it the same way.
fn release_schema(columns: &[ReleaseColumn], text: &[bool]) -> Schema {
    let mut fields = Vec::new();
    for (c, &text) in columns.iter().zip(text) {
        if text {
            fields.push(Field::new(&c.name, DataType::Utf8, false));
            continue;
        }
        let mut meta = HashMap::from([
            ("tre.aggregate".to_owned(), c.kind.clone()),
            ("tre.mechanism".to_owned(), c.mechanism.clone()),
            ("tre.noise_scale".to_owned(), c.noise_scale.to_string()),
        ]);
        if let Some(h) = c.expected_half_width {
            meta.insert("tre.expected_half_width".to_owned(), h.to_string());
        }
        fields.push(Field::new(&c.name, DataType::Float64, true).with_metadata(meta));
        fields.push(Field::new(
            format!("{}_ci_low", c.name),
            DataType::Float64,
            true,
        ));
        fields.push(Field::new(
            format!("{}_ci_high", c.name),
            DataType::Float64,
            true,
        ));
        fields.push(Field::new(
            format!("{}_status", c.name),
            DataType::Utf8,
            false,
        ));
    }
    Schema::new(fields)
}

/// Which columns are text: group keys, and derived columns whose cells
/// are text (a function of keys). Without rows, only the group keys.
fn text_columns(columns: &[ReleaseColumn], rows: &[Vec<Cell>]) -> Vec<bool> {
    (0..columns.len())
        .map(|i| {
            columns[i].kind == "group_key"
                || rows
                    .iter()
                    .any(|row| matches!(row.get(i), Some(Cell::Key { .. })))
        })
        .collect()
}

/// A released table as one Arrow batch, with what the gRPC reply says
/// beside its rows in the schema's metadata.
fn release_batch(r: &tre_release::Released) -> Result<RecordBatch, GatewayError> {
    let release = &r.release;
    let (spent, delta_spent) = if r.repeated {
        (0.0, 0.0)
    } else {
        (release.epsilon, release.delta)
    };
    let meta = HashMap::from([
        ("tre.release_id".to_owned(), r.id.clone()),
        ("tre.status".to_owned(), r.status.as_str().to_owned()),
        ("tre.epsilon_spent".to_owned(), spent.to_string()),
        (
            "tre.epsilon_remaining".to_owned(),
            r.epsilon_remaining.to_string(),
        ),
        ("tre.delta_spent".to_owned(), delta_spent.to_string()),
        (
            "tre.delta_remaining".to_owned(),
            r.delta_remaining.to_string(),
        ),
        (
            "tre.sdc_outcome".to_owned(),
            release.sdc_outcome.as_str().to_owned(),
        ),
        ("tre.sdc_profile".to_owned(), release.sdc_profile.clone()),
        ("tre.confidence".to_owned(), release.confidence.to_string()),
        ("tre.repeated".to_owned(), r.repeated.to_string()),
        ("tre.notes".to_owned(), release.notes.join("\n")),
    ]);
    let text = text_columns(&release.columns, &release.rows);
    let schema = Arc::new(release_schema(&release.columns, &text).with_metadata(meta));
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let cell = |row: &[Cell], i: usize| row.get(i).cloned();
    for (i, &text) in text.iter().enumerate() {
        if text {
            let keys: Vec<String> = release
                .rows
                .iter()
                .map(|row| match cell(row, i) {
                    Some(Cell::Key { value }) => value,
                    Some(Cell::Value { value: Some(v), .. }) => v.to_string(),
                    _ => String::new(),
                })
                .collect();
            arrays.push(Arc::new(StringArray::from(keys)));
            continue;
        }
        let values: Vec<_> = release
            .rows
            .iter()
            .map(|row| match cell(row, i) {
                Some(Cell::Value {
                    value,
                    ci_low,
                    ci_high,
                    status,
                    ..
                }) => (value, ci_low, ci_high, status.as_str()),
                _ => (None, None, None, tre_query::CellStatus::Suppressed.as_str()),
            })
            .collect();
        arrays.push(Arc::new(Float64Array::from_iter(
            values.iter().map(|v| v.0),
        )));
        arrays.push(Arc::new(Float64Array::from_iter(
            values.iter().map(|v| v.1),
        )));
        arrays.push(Arc::new(Float64Array::from_iter(
            values.iter().map(|v| v.2),
        )));
        arrays.push(Arc::new(StringArray::from_iter_values(
            values.iter().map(|v| v.3),
        )));
    }
    RecordBatch::try_new(schema, arrays).map_err(|e| arrow_fault("a release's table", e))
}

fn arrow_fault(what: &str, e: impl std::fmt::Display) -> GatewayError {
    ServerFault::Startup(format!("cannot encode {what} as Arrow: {e}")).into()
}

/// A FlightInfo whose one endpoint's ticket is `ticket`, announcing
/// exactly the schema its DoGet streams.
fn flight_info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
    rows: Option<usize>,
) -> Result<FlightInfo, GatewayError> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| arrow_fault("a schema", e))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor)
        .with_ordered(true);
    Ok(match rows.and_then(|r| i64::try_from(r).ok()) {
        Some(r) => info.with_total_records(r),
        None => info,
    })
}

/// One batch as a Flight data stream.
fn stream(batch: RecordBatch) -> DoGetStream {
    let schema = batch.schema();
    let batches = futures::stream::iter([Ok(batch)]);
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from)
        .boxed()
}

/// What the server tells a client on connect: a read-only SQL server with
/// no transactions, no substrait and no cancel.
fn sql_info() -> Result<SqlInfoData, GatewayError> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "tre");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(SqlInfo::SqlAllTablesAreSelectable, false);
    b.build()
        .map_err(|e| arrow_fault("the server's SQL info", e))
}

impl Flight {
    fn sql_info_batch(
        &self,
        _who: &Principal,
        cmd: CommandGetSqlInfo,
    ) -> Result<RecordBatch, GatewayError> {
        cmd.into_builder(&self.sql_info)
            .build()
            .map_err(|e| arrow_fault("the server's SQL info", e))
    }

    fn catalogs(
        &self,
        who: &Principal,
        cmd: CommandGetCatalogs,
    ) -> Result<RecordBatch, GatewayError> {
        let mut b: GetCatalogsBuilder = cmd.into_builder();
        for e in self.services.visible_datasets(who)? {
            b.append(&e.policy().dataset);
        }
        b.build().map_err(|e| arrow_fault("catalogs", e))
    }

    fn schemas(
        &self,
        who: &Principal,
        cmd: CommandGetDbSchemas,
    ) -> Result<RecordBatch, GatewayError> {
        let mut b: GetDbSchemasBuilder = cmd.into_builder();
        for e in self.services.visible_datasets(who)? {
            b.append(&e.policy().dataset, SCHEMA);
        }
        b.build().map_err(|e| arrow_fault("schemas", e))
    }

    /// The tables a query may name, each schema's fields carrying their
    /// policy class (what the policy says, never what the data holds).
    fn tables(&self, who: &Principal, cmd: CommandGetTables) -> Result<RecordBatch, GatewayError> {
        let mut b: GetTablesBuilder = cmd.into_builder();
        for engine in self.services.visible_datasets(who)? {
            let policy = engine.policy();
            for t in engine.table_schemas() {
                let table_policy = policy.table(&t.name);
                let fields: Vec<Field> = t
                    .schema
                    .fields()
                    .iter()
                    .map(|f| {
                        let mut meta = f.metadata().clone();
                        let class = table_policy
                            .and_then(|tp| tp.columns.iter().find(|c| &c.name == f.name()));
                        match class {
                            Some(c) => {
                                meta.insert("tre.class".into(), c.class.name().into());
                                if !c.description.is_empty() {
                                    meta.insert("tre.description".into(), c.description.clone());
                                }
                            }
                            None if t.reference => {
                                meta.insert("tre.class".into(), "public reference".into());
                            }
                            None => {}
                        }
                        f.as_ref().clone().with_metadata(meta)
                    })
                    .collect();
                let kind = if t.reference { REFERENCE } else { EXTRACT };
                b.append(&policy.dataset, SCHEMA, &t.name, kind, &Schema::new(fields))
                    .map_err(|e| arrow_fault("a table's schema", e))?;
            }
        }
        b.build().map_err(|e| arrow_fault("tables", e))
    }

    fn table_types(
        &self,
        _who: &Principal,
        cmd: CommandGetTableTypes,
    ) -> Result<RecordBatch, GatewayError> {
        let mut b = cmd.into_builder();
        b.append(EXTRACT);
        b.append(REFERENCE);
        b.build().map_err(|e| arrow_fault("table types", e))
    }

    /// A listing's FlightInfo. Its ticket is the command itself: a
    /// listing shows only policy (never SQL, never data), so a client may
    /// craft one freely.
    async fn listing_info<C: ProstMessageExt + Clone>(
        &self,
        request: Request<FlightDescriptor>,
        rpc: Rpc,
        cmd: C,
        list: Listing<C>,
    ) -> Result<Response<FlightInfo>, Status> {
        let services = &self.services;
        let descriptor = request.get_ref().clone();
        handle!(
            services,
            request,
            rpc,
            _req = About::default(),
            |_call, who, _note| async {
                let batch = list(self, &who, cmd.clone())?;
                flight_info(
                    &batch.schema(),
                    cmd.as_any().encode_to_vec(),
                    descriptor,
                    Some(batch.num_rows()),
                )
            }
        )
    }

    /// A listing's rows, for its ticket.
    async fn listing<C: ProstMessageExt>(
        &self,
        request: Request<Ticket>,
        rpc: Rpc,
        cmd: C,
        list: Listing<C>,
    ) -> Result<Response<DoGetStream>, Status> {
        let services = &self.services;
        handle!(
            services,
            request,
            rpc,
            _req = About::default(),
            |_call, who, _note| async { Ok(stream(list(self, &who, cmd)?)) }
        )
    }

    /// Run a statement's release (once) and keep its table for its owner.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        call: &crate::service::Call,
        who: &Principal,
        project: &str,
        dataset: Option<&str>,
        query: tre_release::Query,
        descriptor: FlightDescriptor,
        note: &mut Note,
    ) -> Result<FlightInfo, GatewayError> {
        let released = self
            .services
            .release(call, who, project, dataset, query, note)
            .await?;
        if released.status != ReleaseStatus::Released {
            return Err(GatewayError::NotReleased {
                id: released.id,
                status: released.status,
                reason: released.hold_reason,
            });
        }
        let batch = release_batch(&released)?;
        let rows = batch.num_rows();
        let schema = batch.schema();
        let handle = self.stash.put(
            who,
            Item::Result(Arc::new(Ready {
                release_id: released.id,
                project: project.to_owned(),
                batch,
            })),
        )?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        flight_info(
            &schema,
            ticket.as_any().encode_to_vec(),
            descriptor,
            Some(rows),
        )
    }
}

/// What a metadata or handle call is about, for its event: nothing beyond
/// who and which call, or the release it reads.
#[derive(Default)]
struct About {
    project: String,
    release_id: String,
}

impl Target for About {
    fn project(&self) -> &str {
        &self.project
    }
    fn release_id(&self) -> &str {
        &self.release_id
    }
}

#[tonic::async_trait]
impl FlightSqlService for Flight {
    type FlightService = Flight;

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}

    async fn get_flight_info_statement(
        &self,
        cmd: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let services = &self.services;
        let asked = Asked::read(request.metadata(), cmd.query);
        let descriptor = request.get_ref().clone();
        handle!(
            services,
            request,
            Rpc::Submit,
            req = asked,
            |call, who, note| async {
                let (query, dataset) = req.query()?;
                self.execute(
                    &call,
                    &who,
                    &req.project,
                    dataset.as_deref(),
                    query,
                    descriptor,
                    note,
                )
                .await
            }
        )
    }

    async fn do_action_create_prepared_statement(
        &self,
        cmd: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let services = &self.services;
        let asked = Asked::read(request.metadata(), cmd.query);
        handle!(
            services,
            request,
            Rpc::DryRun,
            req = asked,
            |_call, who, note| async {
                let (query, dataset) = req.query()?;
                let (_, plan) = self
                    .services
                    .plan(&who, &req.project, dataset.as_deref(), &query, note)
                    .await?;
                let columns = plan.columns();
                let schema = release_schema(&columns, &text_columns(&columns, &[]));
                let IpcMessage(dataset_schema) =
                    SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
                        .try_into()
                        .map_err(|e| arrow_fault("a schema", e))?;
                let handle = self.stash.put(
                    &who,
                    Item::Prepared(Arc::new(Prepared {
                        project: req.project.clone(),
                        dataset,
                        query,
                    })),
                )?;
                Ok(ActionCreatePreparedStatementResult {
                    prepared_statement_handle: handle.into_bytes().into(),
                    dataset_schema,
                    parameter_schema: Default::default(),
                })
            }
        )
        .map(Response::into_inner)
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let services = &self.services;
        let descriptor = request.get_ref().clone();
        handle!(
            services,
            request,
            Rpc::Submit,
            _req = About::default(),
            |call, who, note| async {
                let Some(Item::Prepared(p)) = self.stash.get(&who, &cmd.prepared_statement_handle)
                else {
                    return Err(GatewayError::UnknownHandle("prepared statement"));
                };
                note.project = p.project.clone();
                note.sql = p.query.sql.clone();
                self.execute(
                    &call,
                    &who,
                    &p.project,
                    p.dataset.as_deref(),
                    p.query.clone(),
                    descriptor,
                    note,
                )
                .await
            }
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let services = &self.services;
        handle!(
            services,
            request,
            Rpc::GetRelease,
            _req = About::default(),
            |_call, who, note| async {
                let Some(Item::Result(r)) = self.stash.get(&who, &ticket.statement_handle) else {
                    return Err(GatewayError::UnknownHandle("result"));
                };
                note.project = r.project.clone();
                note.release_id = r.release_id.clone();
                Ok(stream(r.batch.clone()))
            }
        )
    }

    async fn do_action_close_prepared_statement(
        &self,
        cmd: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let services = &self.services;
        handle!(
            services,
            request,
            Rpc::ClosePrepared,
            _req = About::default(),
            |_call, who, _note| async {
                self.stash.remove(&who, &cmd.prepared_statement_handle);
                Ok(())
            }
        )
        .map(Response::into_inner)
    }

    async fn get_flight_info_sql_info(
        &self,
        cmd: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.listing_info(request, Rpc::ListDatasets, cmd, Self::sql_info_batch)
            .await
    }

    async fn do_get_sql_info(
        &self,
        cmd: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.listing(request, Rpc::ListDatasets, cmd, Self::sql_info_batch)
            .await
    }

    async fn get_flight_info_catalogs(
        &self,
        cmd: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.listing_info(request, Rpc::ListDatasets, cmd, Self::catalogs)
            .await
    }

    async fn do_get_catalogs(
        &self,
        cmd: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.listing(request, Rpc::ListDatasets, cmd, Self::catalogs)
            .await
    }

    async fn get_flight_info_schemas(
        &self,
        cmd: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.listing_info(request, Rpc::ListDatasets, cmd, Self::schemas)
            .await
    }

    async fn do_get_schemas(
        &self,
        cmd: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.listing(request, Rpc::ListDatasets, cmd, Self::schemas)
            .await
    }

    async fn get_flight_info_tables(
        &self,
        cmd: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.listing_info(request, Rpc::DescribeTable, cmd, Self::tables)
            .await
    }

    async fn do_get_tables(
        &self,
        cmd: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.listing(request, Rpc::DescribeTable, cmd, Self::tables)
            .await
    }

    async fn get_flight_info_table_types(
        &self,
        cmd: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.listing_info(request, Rpc::ListDatasets, cmd, Self::table_types)
            .await
    }

    async fn do_get_table_types(
        &self,
        cmd: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.listing(request, Rpc::ListDatasets, cmd, Self::table_types)
            .await
    }
}
