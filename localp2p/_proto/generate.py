"""Generate ``backend_pb2.py`` and ``backend_pb2_grpc.py`` from ``proto/backend.proto``.

Run by ``scripts/install.sh``. Fails with a non-zero exit when protoc reports an error.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"


def main() -> int:
    proto = PROTO_DIR / "backend.proto"
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    outputs = [f"--python_out={HERE}", f"--grpc_python_out={HERE}", *_type_stub_args()]
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", *outputs, str(proto)])
    if rc != 0:
        print(f"protoc failed on {proto}", file=sys.stderr)
        return 1
    # protoc writes an absolute import; the stubs live inside this package.
    for grpc_file in (HERE / "backend_pb2_grpc.py", HERE / "backend_pb2_grpc.pyi"):
        if grpc_file.exists():
            text = grpc_file.read_text()
            grpc_file.write_text(text.replace("import backend_pb2 as", "from . import backend_pb2 as"))
    return 0


def _type_stub_args() -> list[str]:
    """protoc flags that write .pyi type stubs beside the code, where mypy-protobuf's plugins
    are installed (py-libp2p depends on it); none otherwise (the stubs only serve mypy)."""
    bin_dir = pathlib.Path(sys.executable).parent
    args = []
    for plugin, out in (("protoc-gen-mypy", "--mypy_out"), ("protoc-gen-mypy_grpc", "--mypy_grpc_out")):
        path = bin_dir / plugin
        if path.exists():
            args += [f"--plugin={plugin}={path}", f"{out}={HERE}"]
    return args


if __name__ == "__main__":
    sys.exit(main())
