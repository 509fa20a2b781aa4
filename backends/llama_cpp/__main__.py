"""Entry point of the llama.cpp backend process.

Serves the gRPC ``Backend`` service on ``--addr`` until SIGTERM/SIGINT, then stops
accepting, lets running calls finish for a moment, and exits 0.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

from localp2p import cpumode
from localp2p.logs import configure_logging, get_logger
from localp2p.procutil import die_with_parent

#: gRPC worker threads: they only wait for and relay the engine thread's work (every
#: llama.cpp computation runs on that one thread, see engine_thread), and answer
#: Health/Status/cancellation meanwhile.
GRPC_THREADS = 8
#: Large enough for a 1 MB prompt and a batch of embeddings.
GRPC_MAX_MESSAGE = 64 * 1024 * 1024
#: Seconds that running calls get to finish after SIGTERM.
SHUTDOWN_GRACE = 5.0


def enter_cpu_mode(log: Any) -> tuple[cpumode.CpuMode, bool]:
    """Put this process into the CPU mode its supervisor chose (``LOCALP2P_CPU_MODE``),
    before llama.cpp is loaded; returns the mode and whether weights may use llama.cpp's
    extra buffer types. Shared with the doctor's one-token check (selftest).

    When AMX cannot be denied on a CPU that has it, no extra buffer type is used at all.
    """
    mode = cpumode.from_env()
    problem = cpumode.enter(mode)
    extra_bufts = mode.extra_buffer_types and not (problem and cpumode.has_amx())
    log.info(
        "llama.cpp CPU mode",
        mode=mode.describe(),
        cpu=cpumode.cpu_name(),
        amx_cpu=cpumode.has_amx(),
        extra_buffer_types=extra_bufts,
        **({"amx_not_denied": problem} if problem else {}),
    )
    return mode, extra_bufts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.llama_cpp")
    parser.add_argument("--addr", required=True, help="gRPC listen address, e.g. unix:/tmp/b.sock or 127.0.0.1:50051")
    args = parser.parse_args(argv)
    die_with_parent()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack to stderr
    configure_logging(process="backend")
    log = get_logger("backend")
    mode, extra_bufts = enter_cpu_mode(log)

    from localp2p._proto import backend_pb2_grpc as pb_grpc  # noqa: PLC0415

    from .service import LlamaBackend  # noqa: PLC0415

    options = [
        ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
        ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_THREADS), options=options)
    pb_grpc.add_BackendServicer_to_server(LlamaBackend(mode, extra_bufts), server)
    if server.add_insecure_port(args.addr) == 0 and not args.addr.startswith("unix:"):
        log.error("cannot listen", addr=args.addr)
        return 1
    server.start()
    log.info("backend listening", addr=args.addr)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(SHUTDOWN_GRACE).wait()
    log.info("backend stopped")
    # Leave without running llama.cpp's destructors: freeing a model whose RPC devices
    # sit behind a dead worker can block until the supervisor's SIGKILL (seconds that
    # every reload after a lost worker would wait). The OS frees everything anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
