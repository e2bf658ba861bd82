"""Issue #14: the tre-client package against a real server."""

import json

import pytest

import tre_client

SQL = "SELECT region, COUNT(*) AS n FROM patients GROUP BY region"


@pytest.fixture
def tre(server):
    with tre_client.Client(server.address, token=server.token("alice"), project="p2") as c:
        yield c


def test_query_returns_a_table_with_intervals_and_statuses(tre):
    before = tre.budget()["epsilon_spent"]
    release = tre.query(SQL, epsilon=0.4)
    df = release.to_pandas()
    assert list(df.columns) == ["region", "n", "n_ci_low", "n_ci_high", "n_status"]
    assert len(df) == 7
    assert df.attrs["release_id"] == release.id
    assert release.epsilon_spent == 0.4
    assert tre.budget()["epsilon_spent"] == pytest.approx(before + 0.4)
    again = tre.query(SQL, epsilon=0.4)
    assert again.repeated and again.epsilon_spent == 0.0


def test_dry_run_is_free_and_describes_the_release(tre):
    before = tre.budget()["epsilon_spent"]
    plan = tre.dry_run("SELECT sex, AVG(year_of_birth) AS y FROM patients GROUP BY sex", epsilon=0.3)
    assert plan["epsilon"] == 0.3
    assert [c["name"] for c in plan["columns"]] == ["sex", "y"]
    assert tre.budget()["epsilon_spent"] == before


def test_a_refusal_carries_its_code(tre):
    with pytest.raises(tre_client.TreError) as err:
        tre.query("SELECT person_id FROM patients")
    assert err.value.code == "TRE-Q010"


def test_a_held_release_raises(holding_server):
    c = tre_client.Client(holding_server.address, token=holding_server.token("alice"), project="p2")
    with pytest.raises(tre_client.ReleaseHeld) as err:
        c.query(SQL, epsilon=0.5)
    assert err.value.code == "TRE-R004"
    assert [r["id"] for r in c.releases(status="held")] == [err.value.release_id]


def test_export_verifies_offline_and_any_change_fails(tre, server, tmp_path):
    release = tre.query("SELECT imd_quintile, COUNT(*) AS n FROM patients GROUP BY imd_quintile",
                        epsilon=0.2)
    assert release.id in [r["id"] for r in tre.releases(status="released")]
    out = tre.export_release(release.id, tmp_path / "rel")
    pinned = server.state / "audit.pub"
    manifest = tre_client.verify_manifest(out, public_key=str(pinned))
    assert manifest["release_id"] == release.id
    assert manifest["epsilon_nanos"] == 200_000_000

    table = out / "release.json"
    body = json.loads(table.read_text())
    body["rows"][0][1]["value"] = (body["rows"][0][1]["value"] or 0) + 1
    table.write_text(json.dumps(body))
    with pytest.raises(tre_client.ManifestError, match="does not match"):
        tre_client.verify_manifest(out, public_key=str(pinned))

    out = tre.export_release(release.id, tmp_path / "rel2")
    text = (out / "manifest.json").read_text().replace('"epsilon_nanos":200000000', '"epsilon_nanos":100000000')
    (out / "manifest.json").write_text(text)
    with pytest.raises(tre_client.ManifestError, match="signature"):
        tre_client.verify_manifest(out, public_key=str(pinned))
    wrong = "00" * 32
    with pytest.raises(tre_client.ManifestError):
        tre_client.verify_manifest(tmp_path / "rel", public_key=wrong)
