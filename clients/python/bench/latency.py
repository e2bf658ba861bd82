"""One small release's latency from Python: the stock ADBC Flight SQL driver
(prepare, execute, fetch, close: four calls, four audit events) against
tre_client (one gRPC Submit), alternating, on the same server and data.

    TRE_BIN=target/release/tre python clients/python/bench/latency.py [patients] [queries]

Needs `pip install './clients/python[test]'`. Each query is distinct (a
repeat would be served from the store) and spends epsilon 0.05.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import adbc_driver_flightsql.dbapi as flight_sql  # noqa: E402
from conftest import Server, _bin  # noqa: E402

import tre_client  # noqa: E402


def main():
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, key = root / "data" / "nhs_epr", root / "master.key"
        subprocess.run(
            [_bin(), "dataset", "generate", "--patients", str(patients), "--out", str(data),
             "--key-file", str(key), "--quiet"],
            check=True, capture_output=True,
        )
        server = Server(root, data, key, "server")
        sqls = [
            f"SELECT region, COUNT(*) AS n FROM patients WHERE year_of_birth >= {1930 + i} "
            "GROUP BY region"
            for i in range(2 * n)
        ]
        token = server.token("alice")
        grpc_client = tre_client.Client(server.address, token=token, project="p1")
        conn = flight_sql.connect(
            f"grpc://{server.address}", autocommit=True,
            db_kwargs={
                "adbc.flight.sql.authorization_header": "Bearer " + token,
                "adbc.flight.sql.rpc.call_header.x-tre-project": "p2",
                "adbc.flight.sql.rpc.call_header.x-tre-epsilon": "0.05",
            },
        )
        cur = conn.cursor()
        via_grpc, via_flight = [], []
        for i in range(n):
            t = time.perf_counter()
            grpc_client.query(sqls[i], epsilon=0.05).to_pandas()
            via_grpc.append(time.perf_counter() - t)
            t = time.perf_counter()
            cur.execute(sqls[n + i])
            cur.fetch_df()
            via_flight.append(time.perf_counter() - t)
        cur.close()
        conn.close()
        server.stop()
    g = statistics.median(via_grpc) * 1000
    f = statistics.median(via_flight) * 1000
    print(f"{patients} patients, {n} queries each: gRPC (tre_client) p50 {g:.1f} ms; "
          f"Flight SQL (ADBC) p50 {f:.1f} ms; Flight / gRPC {f / g:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TRE_BIN", str(Path(__file__).resolve().parents[3] / "target" / "release" / "tre"))
    main()
