"""Issue #14: the stock ADBC Flight SQL driver and flightsql-dbapi against a
real tre server. No tre code is used to query; tre_client only reads the
budget and, as an auditor, the log, to compare with the gRPC path."""

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow.flight as flight
import pytest
from flightsql import FlightSQLClient, connect as dbapi_connect

import tre_client

SQL = "SELECT region, COUNT(*) AS n FROM patients GROUP BY region"


def adbc(server, user="alice", project="p1", epsilon="0.5"):
    return flight_sql.connect(
        f"grpc://{server.address}",
        autocommit=True,
        db_kwargs={
            "adbc.flight.sql.authorization_header": "Bearer " + server.token(user),
            "adbc.flight.sql.rpc.call_header.x-tre-project": project,
            "adbc.flight.sql.rpc.call_header.x-tre-epsilon": epsilon,
        },
    )


def budget(server, project):
    c = tre_client.Client(server.address, token=server.token("alice"), project=project)
    return c.budget()["epsilon_spent"]


def submits(server):
    auditor = tre_client.Client(server.address, token=server.token("aziz", "auditor"))
    reply = auditor.call(
        auditor.audit.ListEvents, tre_client.pb.ListEventsRequest(action="query.submit")
    )
    return list(reply.events)


def trailer(err, name=b"tre-code"):
    """A header from an ADBC error's details (gRPC trailers)."""
    return dict(err.details or []).get(name, b"").decode()


def test_a_release_lands_in_pandas_with_intervals_statuses_and_metadata(server):
    with adbc(server) as conn, conn.cursor() as cur:
        cur.execute(SQL)
        table = cur.fetch_arrow_table()
    df = table.to_pandas()
    assert list(df.columns) == ["region", "n", "n_ci_low", "n_ci_high", "n_status"]
    assert len(df) == 7
    shown = df[df.n_status != "suppressed"]
    assert ((shown.n_ci_low <= shown.n) & (shown.n <= shown.n_ci_high)).all()
    assert set(df.n_status) <= {"released", "rounded", "suppressed"}
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["tre.status"] == "released"
    assert float(meta["tre.epsilon_spent"]) == 0.5
    assert meta["tre.release_id"]
    n = table.schema.field("n")
    assert n.metadata[b"tre.aggregate"] == b"count"
    assert not table.schema.field("region").nullable


def test_prepare_charges_nothing_and_execute_charges_once(server):
    before = budget(server, "p1")
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    with adbc(server, epsilon="0.25") as conn, conn.cursor() as cur:
        cur.adbc_prepare(sql)
        assert budget(server, "p1") == before
        cur.execute(sql)
        cur.fetch_df()
    assert budget(server, "p1") == pytest.approx(before + 0.25)


def test_a_refusal_raises_with_its_code(server):
    with adbc(server) as conn, conn.cursor() as cur:
        with pytest.raises(flight_sql.ProgrammingError) as err:
            cur.execute("SELECT person_id FROM patients")
    assert "TRE-Q010" in str(err.value)
    assert trailer(err.value) == "TRE-Q010"


def test_budget_exhaustion_is_distinguishable(server):
    with adbc(server, project="p2", epsilon="11") as conn, conn.cursor() as cur:
        with pytest.raises(flight_sql.Error) as err:
            cur.execute("SELECT COUNT(*) AS n FROM patients")
    assert trailer(err.value) in {"TRE-B001", "TRE-B002"}


def test_a_held_release_raises_awaiting_review(holding_server):
    with adbc(holding_server) as conn, conn.cursor() as cur:
        with pytest.raises(flight_sql.Error) as err:
            cur.execute(SQL)
    assert "awaiting review" in str(err.value)
    assert trailer(err.value) == "TRE-R004"
    assert budget(holding_server, "p1") == 0.5, "the charge stands"


def test_forged_tickets_and_other_users_handles_get_nothing(server):
    alice = FlightSQLClient(host="127.0.0.1", port=server.port, insecure=True,
                            token=server.token("alice"),
                            metadata={"x-tre-project": "p1", "x-tre-epsilon": "0.1"})
    info = alice.execute("SELECT imd_quintile, COUNT(*) AS n FROM patients GROUP BY imd_quintile")
    ticket = info.endpoints[0].ticket
    assert alice.do_get(ticket).read_all().num_rows > 0
    spent = budget(server, "p1")

    raw = flight.FlightClient(f"grpc+tcp://{server.address}")
    bob = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {server.token('bob')}".encode())])
    # pyarrow raises NOT_FOUND as a KeyError-like ArrowException.
    with pytest.raises(Exception, match="TRE-R005"):
        raw.do_get(ticket, bob).read_all()
    mine = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {server.token('alice')}".encode())])
    forged = flight.Ticket(ticket.ticket[:-4] + b"0000")
    with pytest.raises(Exception, match="TRE-R005"):
        raw.do_get(forged, mine).read_all()
    assert budget(server, "p1") == spent


def test_budget_and_audit_match_the_grpc_path(server):
    sql = "SELECT diabetes, COUNT(*) AS n FROM patients GROUP BY diabetes"
    before = (budget(server, "p1"), budget(server, "p2"), len(submits(server)))
    with adbc(server, project="p1", epsilon="0.3") as conn, conn.cursor() as cur:
        cur.execute(sql)
        cur.fetch_arrow_table()
    mid = len(submits(server))
    via_grpc = tre_client.Client(server.address, token=server.token("alice"), project="p2")
    via_grpc.query(sql, epsilon=0.3)
    events = submits(server)
    assert (mid, len(events)) == (before[2] + 1, before[2] + 2), "one event per release"
    assert budget(server, "p1") - before[0] == pytest.approx(0.3)
    assert budget(server, "p2") - before[1] == pytest.approx(0.3)
    flight_event, grpc_event = events[-2], events[-1]
    same = ("user", "role", "action", "sql", "plan_hash", "epsilon", "delta", "outcome", "code")
    assert [getattr(flight_event, f) for f in same] == [getattr(grpc_event, f) for f in same]
    assert (flight_event.project, grpc_event.project) == ("p1", "p2")


def test_catalog_metadata_shows_the_policy(server):
    with adbc(server) as conn:
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        schema = conn.adbc_get_table_schema("patients", catalog_filter="nhs_epr", db_schema_filter="public")
    assert [o["catalog_name"] for o in objects] == ["nhs_epr"]
    tables = {t["table_name"] for s in objects[0]["catalog_db_schemas"] for t in s["db_schema_tables"]}
    assert {"patients", "admissions", "icd10_codes"} <= tables
    assert schema.field("person_id").metadata[b"tre.class"] == b"identifier"


def test_a_table_named_as_the_catalog_lists_it_is_queried(server):
    # Issue #15: catalog.schema.table, as GUI tools write it from the listing.
    with adbc(server, epsilon="0.3") as conn, conn.cursor() as cur:
        cur.execute('SELECT sex, COUNT(*) AS n FROM "nhs_epr"."public"."patients" GROUP BY sex')
        df = cur.fetch_arrow_table().to_pandas()
    assert {"F", "M"} <= set(df.sex)


def test_flightsql_dbapi_is_a_second_client_stack(server):
    client = FlightSQLClient(host="127.0.0.1", port=server.port, insecure=True,
                             token=server.token("alice"),
                             metadata={"x-tre-project": "p1", "x-tre-epsilon": "0.2"})
    cur = dbapi_connect(client).cursor()
    cur.execute("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
    assert [d[0] for d in cur.description] == ["sex", "n", "n_ci_low", "n_ci_high", "n_status"]
    assert len(cur.fetchall()) >= 2
    with pytest.raises(Exception, match="TRE-Q010"):
        cur.execute("SELECT person_id FROM patients")
