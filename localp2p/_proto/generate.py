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
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            str(proto),
        ]
    )
    if rc != 0:
        print(f"protoc failed on {proto}", file=sys.stderr)
        return 1
    # protoc writes an absolute import; the stubs live inside this package.
    grpc_file = HERE / "backend_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import backend_pb2 as", "from . import backend_pb2 as"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
