"""A small Python client for tre, for what SQL over Flight SQL cannot say.

Queries from notebooks usually go through the stock ADBC Flight SQL driver
(see the README). This package speaks tre's own gRPC API, generated from
``proto/tre/v1/tre.proto`` when it is built, and adds what a driver cannot:
dry runs, the budget, the releases list and export, and offline
verification of a release's signed manifest.

    import tre_client
    tre = tre_client.Client("127.0.0.1:50051", token_file=".tre/demo/tokens/researcher.token",
                            project="demo")
    df = tre.query("SELECT region, COUNT(*) AS n FROM patients GROUP BY region",
                   epsilon=0.5).to_pandas()
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import grpc
import pyarrow as pa
from google.protobuf.json_format import MessageToDict

from ._gen.tre.v1 import tre_pb2 as pb
from ._gen.tre.v1 import tre_pb2_grpc as rpc

__all__ = [
    "Client",
    "Release",
    "TreError",
    "ReleaseHeld",
    "ManifestError",
    "verify_manifest",
    "pb",
]

MANIFEST_FORMAT = "tre-release-manifest/v1"


class TreError(Exception):
    """A call the server refused or failed, with its stable code (e.g.
    ``TRE-Q010``) and gRPC status."""

    def __init__(self, code: str, message: str, status: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class ReleaseHeld(TreError):
    """The release was made and charged, and awaits a custodian's review."""

    def __init__(self, release_id: str, reason: str):
        super().__init__(
            "TRE-R004",
            f"release {release_id} is awaiting review by a custodian ({reason}); "
            "follow it with Client.release(id)",
        )
        self.release_id = release_id
        self.reason = reason


class ManifestError(Exception):
    """An exported release does not verify."""


def _enum(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


@dataclass
class Release:
    """A released table and what was spent on it."""

    id: str
    status: str
    table: pa.Table
    epsilon_spent: float
    epsilon_remaining: float
    delta_spent: float
    delta_remaining: float
    sdc_outcome: str
    sdc_profile: str
    repeated: bool
    notes: List[str] = field(default_factory=list)
    hold_reason: str = ""

    def to_arrow(self) -> pa.Table:
        return self.table

    def to_pandas(self):
        """The table as a DataFrame; the release's facts in ``df.attrs``."""
        df = self.table.to_pandas()
        df.attrs.update(
            release_id=self.id,
            epsilon_spent=self.epsilon_spent,
            epsilon_remaining=self.epsilon_remaining,
            sdc_outcome=self.sdc_outcome,
            notes=self.notes,
        )
        return df


def _table(reply: pb.QueryResponse) -> pa.Table:
    """Keys as text; each value as value, ``_ci_low``, ``_ci_high`` and
    ``_status`` columns (the layout Flight SQL returns too)."""
    arrays, names = [], []
    for i, col in enumerate(reply.columns):
        cells = [row.cells[i] for row in reply.rows]
        if col.kind == pb.COLUMN_KIND_GROUP_KEY or any(c.HasField("key") for c in cells):
            names.append(col.name)
            arrays.append(pa.array([c.key for c in cells], pa.string()))
            continue
        values = [c.value for c in cells]
        opt = lambda v, f: getattr(v, f) if v.HasField(f) else None  # noqa: E731
        names += [col.name, f"{col.name}_ci_low", f"{col.name}_ci_high", f"{col.name}_status"]
        arrays += [
            pa.array([opt(v, "value") for v in values], pa.float64()),
            pa.array([opt(v, "ci_low") for v in values], pa.float64()),
            pa.array([opt(v, "ci_high") for v in values], pa.float64()),
            pa.array([_enum(pb.SdcStatus, v.status, "SDC_STATUS_") for v in values], pa.string()),
        ]
    return pa.table(arrays, names=names)


def _release(reply: pb.QueryResponse) -> Release:
    return Release(
        id=reply.release_id,
        status=_enum(pb.ReleaseStatus, reply.status, "RELEASE_STATUS_"),
        table=_table(reply),
        epsilon_spent=reply.epsilon_spent,
        epsilon_remaining=reply.epsilon_remaining,
        delta_spent=reply.delta_spent,
        delta_remaining=reply.delta_remaining,
        sdc_outcome=_enum(pb.SdcOutcome, reply.sdc_outcome, "SDC_OUTCOME_"),
        sdc_profile=reply.sdc_profile,
        repeated=reply.repeated,
        notes=list(reply.notes),
        hold_reason=reply.hold_reason,
    )


def _dict(message) -> Dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class Client:
    """A connection to a tre gateway as one user (one bearer token)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
        project: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
    ):
        if token is None and token_file is not None:
            token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError("give token= or token_file= (tre token issue, or the demo's tokens/)")
        address = re.sub(r"^(grpc|https?)://", "", address)
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.project = project
        self._query = rpc.QueryServiceStub(self._channel)
        self._releases = rpc.ReleaseServiceStub(self._channel)
        self.audit = rpc.AuditServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method, request):
        """Call any generated stub method with this client's token; a
        refusal becomes a :class:`TreError` carrying its code."""
        try:
            return method(request, metadata=self._metadata)
        except grpc.RpcError as e:
            trailers = dict(e.trailing_metadata() or ())
            raise TreError(trailers.get("tre-code", ""), e.details(), e.code()) from None

    def _project(self, project: Optional[str]) -> str:
        p = project or self.project
        if not p:
            raise ValueError("give project= here or to Client(...)")
        return p

    def _request(self, sql, epsilon, delta, totals, project, dataset) -> pb.QueryRequest:
        return pb.QueryRequest(
            project=self._project(project),
            sql=sql,
            epsilon=epsilon,
            delta=delta,
            totals=totals,
            dataset=dataset or "",
        )

    def query(
        self,
        sql: str,
        *,
        epsilon: Optional[float] = None,
        delta: Optional[float] = None,
        totals: bool = False,
        project: Optional[str] = None,
        dataset: Optional[str] = None,
    ) -> Release:
        """Submit a query and return its release. Spends epsilon (the
        policy's default when not given) unless an identical query was
        released before. ``dataset`` names the dataset when the project is
        approved for several. A held release raises :class:`ReleaseHeld`."""
        reply = self.call(
            self._query.Submit, self._request(sql, epsilon, delta, totals, project, dataset)
        )
        release = _release(reply)
        if release.status == "held":
            raise ReleaseHeld(release.id, release.hold_reason)
        if release.status != "released":
            raise TreError("TRE-R003", f"release {release.id} is {release.status}")
        return release

    def dry_run(
        self, sql: str, *, epsilon=None, delta=None, totals=False, project=None, dataset=None
    ) -> dict:
        """What a query would cost and release, without running it: free."""
        return _dict(
            self.call(
                self._query.DryRun, self._request(sql, epsilon, delta, totals, project, dataset)
            )
        )

    def budget(self, project: Optional[str] = None) -> dict:
        return _dict(
            self.call(self._query.Budget, pb.BudgetRequest(project=self._project(project)))
        )

    def releases(self, project: Optional[str] = None, status: Optional[str] = None) -> List[dict]:
        """The project's releases, optionally only those in ``status``
        (released, held, rejected, changes_requested, withdrawn)."""
        wanted = pb.ReleaseStatus.Value(f"RELEASE_STATUS_{status.upper()}") if status else 0
        reply = self.call(
            self._releases.ListReleases,
            pb.ListReleasesRequest(project=self._project(project), status=wanted),
        )
        out = []
        for r in reply.releases:
            d = _dict(r)
            d["status"] = _enum(pb.ReleaseStatus, r.status, "RELEASE_STATUS_")
            out.append(d)
        return out

    def release(self, release_id: str) -> Release:
        """A stored release again (its table only once it is released)."""
        reply = self.call(self._releases.GetRelease, pb.GetReleaseRequest(id=release_id))
        return _release(reply.release)

    def export_release(self, release_id: str, directory) -> Path:
        """Write the release's table, signed manifest and the server's
        public key, as ``tre release export`` does, for offline checks."""
        reply = self.call(self._releases.GetRelease, pb.GetReleaseRequest(id=release_id))
        if not reply.manifest_json:
            raise TreError("TRE-R003", f"release {release_id} has no manifest you may export")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "release.json").write_text(reply.table_json)
        (out / "manifest.json").write_text(reply.manifest_json)
        (out / "public_key.hex").write_text(reply.public_key)
        return out


def verify_manifest(directory, public_key: Optional[str] = None) -> dict:
    """Check an exported release offline: the manifest's Ed25519 signature
    under the server's public key (hex, or a file holding it; by default
    the export's own ``public_key.hex``, which only proves integrity; pin
    the key you trust), and that ``release.json`` is the table it signed.
    Returns the manifest; raises :class:`ManifestError` on any change."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    d = Path(directory)
    key_text = public_key if public_key is not None else (d / "public_key.hex").read_text()
    if Path(key_text.strip()).is_file():
        key_text = Path(key_text.strip()).read_text()
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_text.strip()))
    except ValueError as e:
        raise ManifestError(f"the public key must be 64 hex digits: {e}") from None
    text = (d / "manifest.json").read_text()
    # The signature covers the manifest's JSON exactly as the server wrote
    # it, so take those bytes rather than re-encoding them.
    m = re.fullmatch(r'\{"manifest":(\{.*\}),"signature":"([0-9a-f]{128})"\}\s*', text, re.S)
    if not m:
        raise ManifestError("manifest.json is not a signed tre release manifest")
    body, signature = m.group(1), m.group(2)
    manifest = json.loads(body)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"unknown manifest format {manifest.get('format')!r}")
    try:
        key.verify(bytes.fromhex(signature), f"{MANIFEST_FORMAT}\n{body}".encode())
    except InvalidSignature:
        raise ManifestError(
            "the manifest's signature does not verify: it was changed or not signed by this server"
        ) from None
    actual = hashlib.sha256((d / "release.json").read_bytes()).hexdigest()
    if actual != manifest["table_sha256"]:
        raise ManifestError(
            f"the table does not match the manifest (SHA-256 {actual}, "
            f"manifest says {manifest['table_sha256']})"
        )
    return manifest
