//! Issue #14: Arrow Flight SQL on the gateway's address, driven with the
//! raw Flight client so that statuses and their `tre-code` trailers are
//! seen as sent. (CI drives the same server with the stock Python ADBC
//! driver and flightsql-dbapi too: `clients/python/tests`.)

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt,
    TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, FlightInfo, Ticket};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float64Type, Schema};
use futures::TryStreamExt;
use prost::Message;
use tonic::transport::Channel;
use tre_core::Role;
use tre_e2e::{Server, start, status_code};
use tre_store::AuditFilter;

const SQL: &str = "SELECT region, COUNT(*) AS n FROM patients GROUP BY region";

/// A researcher's Flight connection: a token and the project headers, as
/// ADBC sends them.
struct Conn {
    client: FlightServiceClient<Channel>,
    token: String,
    headers: Vec<(&'static str, String)>,
}

impl Conn {
    async fn new(server: &Server, user: &str, project: &str, epsilon: &str) -> Self {
        Self {
            client: FlightServiceClient::new(server.channel().await),
            token: server.token(user, Role::Researcher),
            headers: vec![
                ("x-tre-project", project.to_owned()),
                ("x-tre-epsilon", epsilon.to_owned()),
            ],
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tre_e2e::authed(msg, &self.token);
        for (k, v) in &self.headers {
            if let Ok(v) = v.parse() {
                r.metadata_mut().insert(*k, v);
            }
        }
        r
    }

    async fn info(&mut self, cmd: Any) -> Result<FlightInfo, tonic::Status> {
        let d = FlightDescriptor::new_cmd(cmd.encode_to_vec());
        let r = self.request(d);
        self.client.get_flight_info(r).await.map(|r| r.into_inner())
    }

    async fn execute(&mut self, sql: &str) -> Result<FlightInfo, tonic::Status> {
        self.info(
            CommandStatementQuery {
                query: sql.into(),
                transaction_id: None,
            }
            .as_any(),
        )
        .await
    }

    async fn prepare(
        &mut self,
        sql: &str,
    ) -> Result<ActionCreatePreparedStatementResult, tonic::Status> {
        let action = Action::new(
            "CreatePreparedStatement",
            ActionCreatePreparedStatementRequest {
                query: sql.into(),
                transaction_id: None,
            }
            .as_any()
            .encode_to_vec(),
        );
        let r = self.request(action);
        let mut results = self.client.do_action(r).await?.into_inner();
        let first = results
            .message()
            .await?
            .unwrap_or_else(|| panic!("no result for a prepare"));
        let any = Any::decode(first.body).unwrap_or_else(|e| panic!("{e}"));
        Ok(any
            .unpack::<ActionCreatePreparedStatementResult>()
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("not a prepare result")))
    }

    /// The batches and the schema the stream announced.
    async fn fetch(&mut self, ticket: Ticket) -> Result<(Schema, Vec<RecordBatch>), tonic::Status> {
        let r = self.request(ticket);
        let stream = self.client.do_get(r).await?.into_inner();
        let mut batches =
            FlightRecordBatchStream::new_from_flight_data(stream.map_err(FlightError::from));
        let mut out = Vec::new();
        while let Some(b) = batches
            .try_next()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
        {
            out.push(b);
        }
        let schema = batches
            .schema()
            .map(|s| s.as_ref().clone())
            .unwrap_or_else(|| panic!("no schema in the stream"));
        Ok((schema, out))
    }
}

fn ticket(info: &FlightInfo) -> Ticket {
    info.endpoint[0]
        .ticket
        .clone()
        .unwrap_or_else(|| panic!("an endpoint without a ticket"))
}

fn events(server: &Server, action: &str) -> Vec<tre_store::AuditEvent> {
    server
        .state
        .store
        .audit_events(&AuditFilter {
            action: Some(action.into()),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (tonic::Code, String, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => (s.code(), status_code(&s), s.message().to_owned()),
    }
}

/// A prepare charges nothing; executing it releases once, with the same
/// charge and the same `query.submit` event as a gRPC Submit of the same
/// query; the FlightInfo announces exactly the stream's schema; and the
/// table carries values, intervals, statuses and the release's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_releases_once_as_submit_does() {
    let server = start(&[("p1", &["alice"], 10.0), ("p2", &["alice"], 10.0)]).await;
    let mut conn = Conn::new(&server, "alice", "p1", "0.5").await;

    let prepared = conn.prepare(SQL).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.spent("p1"), 0.0, "a prepare charges nothing");
    assert_eq!(events(&server, "query.dry_run").len(), 1);
    let announced = Schema::try_from(arrow_flight::IpcMessage(prepared.dataset_schema.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = announced
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["region", "n", "n_ci_low", "n_ci_high", "n_status"]);

    let info = conn
        .info(
            CommandPreparedStatementQuery {
                prepared_statement_handle: prepared.prepared_statement_handle.clone(),
            }
            .as_any(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        server.spent("p1"),
        0.5,
        "the release runs once, at GetFlightInfo"
    );
    let info_schema = info
        .clone()
        .try_decode_schema()
        .unwrap_or_else(|e| panic!("{e}"));
    let (stream_schema, batches) = conn
        .fetch(ticket(&info))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        info_schema, stream_schema,
        "nullability and metadata included"
    );
    let (fetched_again, _) = conn
        .fetch(ticket(&info))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fetched_again, stream_schema);
    assert_eq!(server.spent("p1"), 0.5, "fetching charges nothing");

    let meta = stream_schema.metadata();
    let release_id = meta["tre.release_id"].clone();
    assert_eq!(meta["tre.epsilon_spent"], "0.5");
    assert_eq!(meta["tre.epsilon_remaining"], "9.5");
    assert_eq!(meta["tre.status"], "released");
    assert!(["pass", "review", "fail"].contains(&meta["tre.sdc_outcome"].as_str()));
    let batch = &batches[0];
    let rows = batch.num_rows();
    assert_eq!(rows, 7, "one row per public region");
    assert_eq!(info.total_records, 7);
    let n = batch.column(1).as_primitive::<Float64Type>();
    let lo = batch.column(2).as_primitive::<Float64Type>();
    let hi = batch.column(3).as_primitive::<Float64Type>();
    let status = batch.column(4).as_string::<i32>();
    for r in 0..rows {
        if status.value(r) == "suppressed" {
            assert!(n.is_null(r));
            continue;
        }
        assert!(lo.value(r) <= n.value(r) && n.value(r) <= hi.value(r));
    }
    let field = stream_schema.field(1);
    assert_eq!(field.metadata()["tre.aggregate"], "count");
    assert!(!stream_schema.field(0).is_nullable());
    assert!(field.is_nullable());

    // The same query over gRPC, in another project: the same charge and
    // the same event, but for where and when.
    let (mut q, _) = server.clients().await;
    let token = server.token("alice", Role::Researcher);
    let reply = q
        .submit(tre_e2e::authed(
            tre_proto::v1::QueryRequest {
                project: "p2".into(),
                sql: SQL.into(),
                epsilon: Some(0.5),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(server.spent("p2"), server.spent("p1"));
    let submits = events(&server, "query.submit");
    assert_eq!(submits.len(), 2, "one event per release: {submits:?}");
    let (flight, grpc) = (&submits[0], &submits[1]);
    assert_eq!(flight.release_id, release_id);
    assert_eq!(grpc.release_id, reply.release_id);
    let same = |e: &tre_store::AuditEvent| {
        (
            e.user.clone(),
            e.role.clone(),
            e.action.clone(),
            e.sql.clone(),
            e.plan_hash.clone(),
            e.epsilon_nanos,
            e.delta_femtos,
            e.outcome.clone(),
            e.code.clone(),
            e.detail.clone(),
        )
    };
    assert_eq!(same(flight), same(grpc));
    assert_eq!(flight.project, "p1");
    let stored = server
        .state
        .store
        .release(&release_id)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("release {release_id} not stored"));
    assert_eq!(stored.project, "p1");
}

/// A client-crafted ticket never reaches the engine, another caller's
/// handle is as absent as a forged one, and refusals, budget exhaustion
/// and bad headers keep their codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_tickets_are_the_owners_and_refusals_keep_their_codes() {
    let server = start(&[("p1", &["alice", "bob"], 1.0)]).await;
    let mut alice = Conn::new(&server, "alice", "p1", "0.5").await;
    let mut bob = Conn::new(&server, "bob", "p1", "0.5").await;

    let info = alice.execute(SQL).await.unwrap_or_else(|e| panic!("{e}"));
    let spent = server.spent("p1");
    assert_eq!(spent, 0.5);

    // Bob is in the same project, but the result is Alice's.
    let (grpc, code, _) = refused(bob.fetch(ticket(&info)).await);
    assert_eq!((grpc, code.as_str()), (tonic::Code::NotFound, "TRE-R005"));
    // A forged handle, and a ticket carrying SQL (as some Flight SQL
    // servers accept): neither runs anything.
    let forged = TicketStatementQuery {
        statement_handle: hex_handle().into(),
    };
    let (grpc, code, _) = refused(
        alice
            .fetch(Ticket::new(forged.as_any().encode_to_vec()))
            .await,
    );
    assert_eq!((grpc, code.as_str()), (tonic::Code::NotFound, "TRE-R005"));
    let sql_ticket = CommandStatementQuery {
        query: "SELECT COUNT(*) AS n FROM patients".into(),
        transaction_id: None,
    };
    let (grpc, _, _) = refused(
        alice
            .fetch(Ticket::new(sql_ticket.as_any().encode_to_vec()))
            .await,
    );
    assert_eq!(grpc, tonic::Code::Unimplemented);
    let prepared_ticket = CommandPreparedStatementQuery {
        prepared_statement_handle: hex_handle().into(),
    };
    let (grpc, _, _) = refused(
        alice
            .fetch(Ticket::new(prepared_ticket.as_any().encode_to_vec()))
            .await,
    );
    assert_eq!(grpc, tonic::Code::Unimplemented);
    // Nor does executing someone else's prepared statement.
    let prepared = alice.prepare(SQL).await.unwrap_or_else(|e| panic!("{e}"));
    let theirs = CommandPreparedStatementQuery {
        prepared_statement_handle: prepared.prepared_statement_handle,
    };
    let (grpc, code, _) = refused(bob.info(theirs.as_any()).await);
    assert_eq!((grpc, code.as_str()), (tonic::Code::NotFound, "TRE-R005"));
    assert_eq!(server.spent("p1"), spent, "nothing ran");

    // A refusal, at prepare and at execute, keeps its code.
    let row_level = "SELECT person_id FROM patients";
    let (grpc, code, message) = refused(alice.prepare(row_level).await);
    assert_eq!(
        (grpc, code.as_str()),
        (tonic::Code::InvalidArgument, "TRE-Q010")
    );
    assert!(message.starts_with("TRE-Q010 "), "{message}");
    let (_, code, _) = refused(alice.execute(row_level).await);
    assert_eq!(code, "TRE-Q010");
    // The budget runs out, distinguishably.
    let mut greedy = Conn::new(&server, "alice", "p1", "0.75").await;
    let (grpc, code, _) = refused(greedy.execute("SELECT COUNT(*) AS n FROM patients").await);
    assert_eq!(
        (grpc, code.as_str()),
        (tonic::Code::ResourceExhausted, "TRE-B001")
    );
    // Headers: no project, a bad ε, a header sent twice.
    let mut nowhere = Conn::new(&server, "alice", "", "0.1").await;
    let (_, code, message) = refused(nowhere.execute(SQL).await);
    assert_eq!(code, "TRE-C003");
    assert!(message.contains("x-tre-project"), "{message}");
    let mut bad = Conn::new(&server, "alice", "p1", "lots").await;
    let (_, code, _) = refused(bad.execute(SQL).await);
    assert_eq!(code, "TRE-C003");
    let mut twice = Conn::new(&server, "alice", "p1", "0.1").await;
    twice.headers.push(("x-tre-project", "p1".into()));
    let mut r = twice.request(FlightDescriptor::new_cmd(
        CommandStatementQuery {
            query: SQL.into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec(),
    ));
    r.metadata_mut().append(
        "x-tre-project",
        "p1".parse().unwrap_or_else(|e| panic!("{e:?}")),
    );
    let (_, code, message) = refused(twice.client.get_flight_info(r).await);
    assert_eq!(code, "TRE-C003");
    assert!(message.contains("more than once"), "{message}");
    // No token, no call.
    let mut anonymous = Conn::new(&server, "alice", "p1", "0.1").await;
    anonymous.token = String::new();
    let (grpc, code, _) = refused(anonymous.execute(SQL).await);
    assert_eq!(
        (grpc, code.as_str()),
        (tonic::Code::Unauthenticated, "TRE-A001")
    );
    assert_eq!(server.spent("p1"), spent);

    // Metadata: the policy's tables with their classes, for a member.
    let tables = alice
        .info(
            CommandGetTables {
                include_schema: true,
                ..Default::default()
            }
            .as_any(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, batches) = alice
        .fetch(ticket(&tables))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listed = &batches[0];
    let names = listed.column(2).as_string::<i32>();
    let all: Vec<&str> = (0..listed.num_rows()).map(|i| names.value(i)).collect();
    assert!(
        all.contains(&"patients") && all.contains(&"icd10_codes"),
        "{all:?}"
    );
    let at = all
        .iter()
        .position(|t| *t == "patients")
        .unwrap_or_default();
    let schema_bytes = listed.column(4).as_binary::<i32>().value(at).to_vec();
    let patients = datafusion::arrow::ipc::convert::try_schema_from_ipc_buffer(&schema_bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        patients
            .field_with_name("person_id")
            .map(|f| f.metadata()["tre.class"].clone())
            .ok(),
        Some("identifier".to_owned())
    );
    // Someone with no project sees no dataset.
    let mut stranger = Conn::new(&server, "mallory", "p1", "0.1").await;
    let tables = stranger
        .info(CommandGetTables::default().as_any())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, batches) = stranger
        .fetch(ticket(&tables))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
}

/// A held release is an error that says it awaits review (its charge
/// stands), not an empty table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_flight_sql_release_is_an_error_that_says_so() {
    let server = tre_e2e::start_with_profile(
        &tre_e2e::POLICY.replace(
            "sdc_profile = \"nhs_sde\"",
            "sdc_profile = \"acro_default\"",
        ),
        include_str!("../policies/sdc/acro_default.toml"),
        &[("p1", &["alice"], 5.0)],
    )
    .await;
    let mut alice = Conn::new(&server, "alice", "p1", "0.5").await;
    let (grpc, code, message) = refused(alice.execute(SQL).await);
    assert_eq!(
        (grpc, code.as_str()),
        (tonic::Code::FailedPrecondition, "TRE-R004")
    );
    assert!(message.contains("awaiting review"), "{message}");
    assert_eq!(server.spent("p1"), 0.5);
    let submits = events(&server, "query.submit");
    assert_eq!(submits.len(), 1);
    assert!(message.contains(&submits[0].release_id), "{message}");
}

fn hex_handle() -> Vec<u8> {
    b"00112233445566778899aabbccddeeff".to_vec()
}
