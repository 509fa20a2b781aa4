"""Child process that runs llama.cpp's rpc-server: ``python -m localp2p.worker.rpc_child HOST:PORT``.

Started and restarted by :func:`localp2p.worker.rpc_server.supervise_rpc_server`; not a user
command. It dies with its parent, so a killed worker leaves no server behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from localp2p import cpumode
from localp2p.llama import devices, rpc
from localp2p.procutil import die_with_parent


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m localp2p.worker.rpc_child")
    parser.add_argument("endpoint")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", action="append", default=[], help="a ggml device to serve (repeatable)")
    args = parser.parse_args(argv)
    # The C accept loop never returns to Python, so Python-level handlers would never
    # run: restore the default actions and let SIGTERM/SIGINT end the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Devices: the --device ones, else every GPU, else the CPU (localp2p.llama.devices.select).
    # On the CPU device, ggml-rpc's server allocates every tensor in its default buffer type
    # (never an extra one: it refuses tensors with backend extras), so AMX buffers do
    # not arise here; the mode still keeps AMX off and, in safe mode, ggml's fast paths.
    problem = cpumode.enter(cpumode.from_env())
    if problem:
        print(f"rpc-server: AMX could not be denied: {problem}", file=sys.stderr)
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    try:
        handles = devices.selected_handles(args.device)
        rpc.serve_forever(args.endpoint, args.cache_dir, max(1, args.threads), handles)
    except (rpc.RPCError, devices.DeviceError) as exc:
        print(f"rpc-server: {exc}", file=sys.stderr)
        return 1
    return 1  # serve_forever only returns when the server could not start


if __name__ == "__main__":
    sys.exit(main())
