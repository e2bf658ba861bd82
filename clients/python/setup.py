"""Generate the gRPC stubs from tre's proto when the package is built.

The proto lives at the repository's ``proto/`` (two levels up), or where
``TRE_PROTO_DIR`` says. The generated modules go into ``tre_client/_gen``
inside the build, never into the source tree.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def proto_root() -> Path:
    root = Path(os.environ.get("TRE_PROTO_DIR", HERE.parent.parent / "proto"))
    if not (root / "tre" / "v1" / "tre.proto").is_file():
        raise SystemExit(
            f"tre.proto not found under {root}; build from a clone of tre "
            "(pip install ./clients/python) or set TRE_PROTO_DIR"
        )
    return root


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc

        root = proto_root()
        out = Path(self.build_lib) / "tre_client" / "_gen"
        out.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(root / "tre" / "v1" / "tre.proto"),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on tre.proto")
        # The generated modules import each other as the top-level package
        # `tre.v1`; inside tre_client they are `tre_client._gen.tre.v1`.
        for d in (out, out / "tre", out / "tre" / "v1"):
            (d / "__init__.py").touch()
        grpc_stub = out / "tre" / "v1" / "tre_pb2_grpc.py"
        text = grpc_stub.read_text()
        grpc_stub.write_text(
            text.replace("from tre.v1 import", "from tre_client._gen.tre.v1 import")
        )


setup(cmdclass={"build_py": BuildWithStubs})
