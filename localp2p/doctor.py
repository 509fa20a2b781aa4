"""`localp2p doctor`: check this machine's setup before (or beside) a real run.

Each check is a small function returning one :class:`Check` (or a list, one per
model or worker): ``OK`` when the thing works, ``WARN`` when it may be fine but
deserves a look, ``FAIL`` when ``localp2p run`` or a worker would fail or degrade
because of it. Checks never raise: whatever goes wrong inside one becomes its
``FAIL`` line, so one broken piece never hides the report on the others.
The checks reuse the code the server runs (config loading, the RPC probe, token
parsing, the port check), so "doctor says OK" means "the server would agree".
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from localp2p import cpumode
from localp2p.config import ConfigError, ModelConfig, embedded_model_path, load_models, parse_rpc_servers
from localp2p.cpumode import CpuMode
from localp2p.errors import StartupError
from localp2p.llama import devices, rpc
from localp2p.netutil import check_port_free
from localp2p.procutil import python_module_argv

Level = Literal["OK", "WARN", "FAIL"]
OK: Level = "OK"
WARN: Level = "WARN"
FAIL: Level = "FAIL"

#: The mDNS multicast group (RFC 6762) that LAN discovery joins.
MDNS_GROUP = "224.0.0.251"
#: Seconds a static worker gets to answer the probe: a doctor run should stay quick,
#: and a healthy rpc-server answers HELLO in milliseconds.
WORKER_PROBE_TIMEOUT = 5.0
#: Seconds the one-token decode may take: loading the small embedded model and one
#: decode take about a second; a hung child is a finding too.
DECODE_CHECK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    level: Level
    text: str

    def line(self) -> str:
        return f"[{self.level}] {self.text}"


@dataclass
class DoctorSettings:
    """What to check; filled from the command line and the environment by the CLI."""

    models_path: pathlib.Path | None = None
    address: str = "127.0.0.1:8080"
    token: str | None = None
    p2p: bool = False
    rpc_servers_text: str | None = None
    cpu_mode: CpuMode = CpuMode.DEFAULT


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers content


def check_llama_rpc() -> Check:
    """llama-cpp-python is importable and was built with GGML_RPC."""
    try:
        import llama_cpp  # noqa: PLC0415 - heavy import, only here
    except ImportError as exc:
        return Check(FAIL, f"llama-cpp-python is not installed ({exc}); run `make install`")
    try:
        supported = bool(llama_cpp.llama_supports_rpc())
    except Exception as exc:
        return Check(FAIL, f"llama-cpp-python {llama_cpp.__version__}: llama_supports_rpc() failed: {exc}")
    if not supported:
        return Check(FAIL, f"llama-cpp-python {llama_cpp.__version__} was built without GGML_RPC; rerun `make install`")
    return Check(OK, f"llama-cpp-python {llama_cpp.__version__} built with RPC")


def check_rpc_protocol() -> Check:
    """The ggml-rpc library loads, and which protocol version this build speaks."""
    try:
        version = rpc.protocol_version()
    except rpc.RPCError as exc:
        return Check(FAIL, f"RPC library: {exc}")
    except Exception as exc:
        return Check(FAIL, f"RPC library could not be loaded: {exc}")
    return Check(OK, f"RPC protocol {version}")


def check_devices() -> list[Check]:
    """The ggml devices this build has (name, kind, memory), which a worker serves, and a GPU it cannot use.

    WARN when a GPU is visible (nvidia-smi, /dev/kfd, /dev/dri render nodes) but this
    build has no GPU backend: workers would serve their layers from the CPU.
    """
    try:
        available = devices.list_devices()
        served = devices.select(available)
        warning = devices.unused_gpu_warning()
    except Exception as exc:
        return [Check(FAIL, f"llama.cpp devices could not be listed: {exc}")]
    listed = "; ".join(d.text() for d in available) or "none"
    checks = [
        Check(
            OK if served else FAIL,
            f"llama.cpp devices: {listed}; a worker serves {devices.summary(served)} (pick with --device NAME)",
        )
    ]
    if warning:
        checks.append(Check(WARN, warning))
    return checks


def gguf_summary(path: pathlib.Path) -> str:
    """Parse a GGUF file's header and tensor table; return a short description.

    Raises ValueError (or OSError) when the file is not a well-formed GGUF file.
    """
    from gguf import GGUFReader  # noqa: PLC0415 - numpy import, only here

    reader = GGUFReader(path)
    parts = [f"{len(reader.tensors)} tensors"]
    field = reader.fields.get("general.architecture")
    if field is not None and field.data:
        parts.insert(0, bytes(field.parts[field.data[0]]).decode("utf-8", "replace"))
    parts.append(_size(path.stat().st_size))
    return ", ".join(parts)


def _decode_once(mode: CpuMode, model_file: pathlib.Path) -> tuple[int, dict[str, Any] | None, str]:
    """Run backends.llama_cpp.selftest in a child in ``mode``: (exit code, its JSON or None, stderr tail)."""
    argv = python_module_argv("backends.llama_cpp.selftest", str(model_file), "--threads", "1")
    try:
        done = subprocess.run(argv, env=cpumode.child_env(mode), capture_output=True, text=True, timeout=DECODE_CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return -1, None, f"no answer within {DECODE_CHECK_TIMEOUT:g} s"
    result = None
    for line in reversed(done.stdout.splitlines()):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    return done.returncode, result, done.stderr.strip()[-300:]


def check_cpu_decode(mode: CpuMode = CpuMode.DEFAULT) -> Check:
    """A one-token decode of the embedded model in a child process, in the CPU mode `run` uses.

    FAIL names the crash and the fix: safe mode (which `run` falls back to by itself)
    when that decodes, a portable rebuild when even safe mode crashes.
    """
    try:
        model_file = embedded_model_path()
    except ConfigError as exc:
        return Check(FAIL, f"CPU decode check: {exc}")
    cpu = f"{cpumode.cpu_name()} ({', '.join(cpumode.notable_features()) or 'no notable SIMD flags'})"
    code, result, tail = _decode_once(mode, model_file)
    if code == 0 and result is not None:
        buffers = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in (result.get("weight_buffers") or {}).items())
        amx = (
            "AMX allowed (opted in)"
            if mode is CpuMode.AMX
            else ("AMX off (opt in: --cpu-mode amx)" if cpumode.has_amx() else "no AMX on this CPU")
        )
        return Check(OK, f"llama.cpp decodes on this CPU in CPU mode {mode.value}: {cpu}; {amx}; weights in {buffers or '?'}")
    how = cpumode.signal_name(code) if code < 0 and code != -1 else (tail or f"exit code {code}")
    if mode is CpuMode.SAFE:
        return Check(
            FAIL,
            f"llama.cpp crashed ({how}) decoding one token even in safe CPU mode on {cpu}: this build does not run "
            "on this CPU; rebuild it portable: remove ~/.cache/localp2p/wheels and run "
            "`LOCALP2P_CMAKE_ARGS=-DGGML_NATIVE=OFF make install`",
        )
    safe_code, _, _ = _decode_once(CpuMode.SAFE, model_file)
    if safe_code == 0:
        return Check(
            FAIL,
            f"llama.cpp crashed ({how}) decoding one token in CPU mode {mode.value} on {cpu}, and works in safe mode: "
            "`localp2p run` and workers switch to safe mode by themselves after the first crash; start them with "
            f"`--cpu-mode safe` (env {cpumode.MODE_ENV}=safe) to skip the crash"
            + (" — or leave out --cpu-mode amx" if mode is CpuMode.AMX else ""),
        )
    return Check(
        FAIL,
        f"llama.cpp crashed ({how}) decoding one token on {cpu}, in safe mode too: rebuild it portable: remove "
        "~/.cache/localp2p/wheels and run `LOCALP2P_CMAKE_ARGS=-DGGML_NATIVE=OFF make install`",
    )


def check_model_file(model: ModelConfig) -> Check:
    """The model's file parses as GGUF (the magic alone was checked by load_models)."""
    try:
        summary = gguf_summary(model.model_file)
    except Exception as exc:
        return Check(FAIL, f"model {model.name}: {model.model_file} is not a valid GGUF file ({exc})")
    return Check(OK, f"model {model.name}: {model.model_file} ({summary})")


def check_models(models_path: pathlib.Path | None) -> list[Check]:
    """The configured models load as the server would load them, and each file is GGUF.

    Without ``models_path`` that is the embedded model; with it, every YAML and GGUF
    file in the directory (a malformed YAML or a missing model file is one FAIL that
    names the file, exactly as ``localp2p run`` would report it).
    """
    try:
        models = load_models(models_path)
    except ConfigError as exc:
        where = f"models path {models_path}" if models_path is not None else "embedded model"
        return [Check(FAIL, f"{where}: {exc}")]
    checks = []
    if models_path is not None:
        yamls = sum(1 for m in models.values() if m.source.endswith((".yaml", ".yml")))
        checks.append(Check(OK, f"models path {models_path}: {len(models)} model(s), {yamls} YAML definition(s), all valid"))
    checks += [check_model_file(model) for model in models.values()]
    return checks


def check_http_port(address: str) -> Check:
    """The HTTP address parses and its port can be bound (WARN if taken: maybe our server)."""
    try:
        host, port = rpc.parse_endpoint(address)
    except ValueError as exc:
        return Check(FAIL, f"--address: {exc}")
    try:
        check_port_free(host, port)
    except StartupError as exc:
        return Check(
            WARN,
            f"HTTP address {address}: {exc}; a localp2p server may already be running there (see `localp2p status --address {address}`)",
        )
    return Check(OK, f"HTTP address {address} is free")


def check_token(text: str) -> Check:
    """The network token parses (the message never echoes the token)."""
    from localp2p.p2p.token import NetworkToken, TokenError  # noqa: PLC0415

    try:
        token = NetworkToken.parse(text)
    except TokenError as exc:
        return Check(FAIL, f"network token: {exc}")
    return Check(OK, f"network token is well-formed (network {token.network_id})")


def multicast_interfaces() -> list[tuple[str, str]]:
    """``(interface, IPv4 address)`` of each non-loopback interface that can join mDNS's group.

    Joining is tried for real (IP_ADD_MEMBERSHIP on a throw-away UDP socket), which is
    what zeroconf does when it starts; nothing is sent.
    """
    import ifaddr  # noqa: PLC0415 - a zeroconf dependency

    usable = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str) or ipaddress.ip_address(ip.ip).is_loopback:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                try:
                    mreq = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(ip.ip)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                except OSError:
                    continue
            usable.append((adapter.nice_name, ip.ip))
    return usable


def check_mdns() -> Check:
    """Some non-loopback interface can do multicast, so LAN discovery can work."""
    try:
        usable = multicast_interfaces()
    except Exception as exc:
        return Check(WARN, f"mDNS: could not list network interfaces ({exc})")
    if not usable:
        return Check(
            WARN,
            "mDNS: no non-loopback interface can join multicast; workers on the LAN will not be found "
            "by mDNS (the DHT still works with --p2p-bootstrap)",
        )
    listed = ", ".join(f"{name} ({ip})" for name, ip in usable)
    return Check(OK, f"mDNS: multicast usable on {listed}")


def check_worker(endpoint: str, timeout: float = WORKER_PROBE_TIMEOUT) -> Check:
    """One static rpc-server answers HELLO with a protocol version this build accepts."""
    try:
        info = rpc.probe(endpoint, timeout=timeout)
    except rpc.RPCError as exc:
        hint = ""
        if "timed out" in str(exc):
            hint = " (an rpc-server serves one client at a time: is a server already using it?)"
        text = str(exc) if str(exc).startswith(endpoint) else f"{endpoint}: {exc}"
        return Check(FAIL, f"worker {text}{hint}")
    return Check(
        OK,
        f"worker {endpoint}: protocol {info.version_text}, {len(info.devices)} device(s), "
        f"{_size(info.memory_free)} free of {_size(info.memory_total)}",
    )


def check_workers(rpc_servers_text: str | None, models: Iterable[ModelConfig] = ()) -> list[Check]:
    """Every static worker, from LLAMACPP_GRPC_SERVERS and the models' own ``rpc_servers``."""
    try:
        endpoints: list[str] = list(parse_rpc_servers(rpc_servers_text))
    except ConfigError as exc:
        return [Check(FAIL, str(exc))]
    for model in models:
        endpoints += [e for e in model.rpc_servers if e not in endpoints]
    return [check_worker(endpoint) for endpoint in endpoints]


def _models_or_none(models_path: pathlib.Path | None) -> Sequence[ModelConfig]:
    try:
        return list(load_models(models_path).values())
    except ConfigError:
        return ()  # already reported by check_models


def run_checks(settings: DoctorSettings) -> list[Check]:
    """All checks for ``settings``, in report order."""
    checks = [check_llama_rpc(), check_rpc_protocol(), *check_devices(), check_cpu_decode(settings.cpu_mode)]
    checks += check_models(settings.models_path)
    checks.append(check_http_port(settings.address))
    if settings.token:
        checks.append(check_token(settings.token))
    if settings.token or settings.p2p:
        checks.append(check_mdns())
    checks += check_workers(settings.rpc_servers_text, _models_or_none(settings.models_path))
    return checks


def report(settings: DoctorSettings) -> int:
    """Print one line per check; return 1 if any check failed, else 0."""
    failed = False
    for check in run_checks(settings):
        print(check.line(), flush=True)
        failed |= check.level == FAIL
    return 1 if failed else 0
