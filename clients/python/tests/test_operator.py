"""Issue #14: what an operator and an orchestrator see. `tre serve` from a
TOML config with environment overrides; Prometheus metrics on their own
address; the standard gRPC health check and server reflection (what
grpcurl uses: grpcurl itself is not on PyPI), without a token."""

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import tre_client
from conftest import Server, _free_port


@pytest.fixture(scope="module")
def configured(dataset):
    root, data, key = dataset
    metrics_port = _free_port()
    config = root / "tre.toml"
    # Relative paths are relative to the file; the listen address and the
    # budget come from the environment, which wins over the file.
    config.write_text(
        f"""
state = "configured"
data = "{data.relative_to(root)}"
key_file = "{key.relative_to(root)}"
listen = "127.0.0.1:1"
projects = ["ops=alice"]
project_epsilon = 1.0
metrics = true
metrics_listen = "127.0.0.1:{metrics_port}"
"""
    )
    s = Server(root, data, key, "configured", config=config,
               env={"TRE_PROJECT_EPSILON": "3"})
    s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield s
    s.stop()


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def value(text, prefix):
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):].strip())
    raise AssertionError(f"no {prefix!r} in\n{text}")


def test_config_file_with_environment_overrides(configured):
    tre = tre_client.Client(configured.address, token=configured.token("alice"), project="ops")
    assert tre.budget()["epsilon_budget"] == 3.0, "TRE_PROJECT_EPSILON beats the file"


def test_metrics_count_queries_by_outcome_and_code_and_name_no_one(configured):
    tre = tre_client.Client(configured.address, token=configured.token("alice"), project="ops")
    tre.query("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex", epsilon=0.5)
    with pytest.raises(tre_client.TreError):
        tre.query("SELECT person_id FROM patients")
    text = scrape(configured.metrics_url)
    assert value(text, 'tre_calls_total{action="query.submit",outcome="allowed",code=""} ') == 1
    assert value(text, 'tre_calls_total{action="query.submit",outcome="refused",code="TRE-Q010"} ') == 1
    assert value(text, "tre_epsilon_charged_total ") == 0.5
    assert value(text, 'tre_release_seconds_count{result="released"} ') == 1
    assert value(text, "tre_active_queries ") == 0
    for private in ("alice", "SELECT", "ops", "person_id"):
        assert private not in text


def test_health_and_reflection_need_no_token(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tre.v1.QueryService", "arrow.flight.protocol.FlightService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"tre.v1.QueryService", "tre.v1.ReleaseService", "grpc.health.v1.Health"} <= services
