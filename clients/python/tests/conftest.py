"""Start real tre servers for the Python tests: the binary from `cargo
build` (TRE_BIN, default target/debug/tre), over a small generated dataset,
on free loopback ports. One server releases under the NHS SDE profile;
another under acro_default, whose airlock holds every release."""

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _bin() -> str:
    path = os.environ.get("TRE_BIN") or str(REPO / "target" / "debug" / "tre")
    if not Path(path).is_file():
        pytest.fail(f"no tre binary at {path}; run `cargo build -p tre-cli` or set TRE_BIN")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, data: Path, key: Path, name: str, policy=None,
                 config=None, env=None):
        """`tre serve` with flags, or, given `config`, with that file and
        `env` (the config's own state directory must be `root / name`)."""
        self.bin = _bin()
        self.state = root / name
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        if config is None:
            args = [
                self.bin, "serve",
                "--state", str(self.state),
                "--data", str(data),
                "--key-file", str(key),
                "--listen", self.address,
                "--project", "p1=alice,bob",
                "--project", "p2=alice",
                "--project-epsilon", "10",
            ]
            if policy is not None:
                args += ["--policy", str(policy)]
        else:
            args = [self.bin, "serve", "--config", str(config)]
        env = dict(os.environ, TRE_LISTEN=self.address, **(env or {}))
        self.log = open(root / f"{name}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tre serve exited: {(root / f'{name}.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("tre serve did not start listening")

    def token(self, user: str, role: str = "researcher") -> str:
        out = subprocess.run(
            [self.bin, "token", "issue", "--state", str(self.state), "--user", user,
             "--role", role, "--ttl", "1h"],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tre")
    data, key = root / "data" / "nhs_epr", root / "master.key"
    subprocess.run(
        [_bin(), "dataset", "generate", "--patients", "2000", "--out", str(data),
         "--key-file", str(key), "--quiet"],
        check=True, capture_output=True,
    )
    return root, data, key


@pytest.fixture(scope="session")
def server(dataset):
    s = Server(*dataset, "released")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def holding_server(dataset):
    root, data, key = dataset
    policy = (REPO / "policies" / "nhs_epr.toml").read_text()
    held = re.sub(r'sdc_profile = "[a-z_]+"', 'sdc_profile = "acro_default"', policy, count=1)
    path = root / "held_policy.toml"
    path.write_text(held)
    s = Server(root, data, key, "held", policy=path)
    yield s
    s.stop()
