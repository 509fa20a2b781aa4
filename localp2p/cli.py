"""Command line: argument parsing only; each command calls one function.

Flag and variable names follow LocalAI where it has one (``LLAMACPP_GRPC_SERVERS``,
``MODELS_PATH``, ``THREADS``, ``ADDRESS``). A bad start-up prints one line and exits
non-zero; it never shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import trio

from localp2p import __version__, cpumode
from localp2p.config import DEFAULT_PARALLEL, RPC_SERVERS_ENV, ConfigError, env_threads, load_models, parse_rpc_servers
from localp2p.cpumode import CpuMode
from localp2p.errors import StartupError
from localp2p.logs import FORMATS, LOG_FORMAT_ENV, LOG_LEVEL_ENV, configure_logging, get_logger

#: Exit code for a configuration or start-up error (argparse uses 2 for usage errors).
EXIT_STARTUP = 1
#: Exit code after Ctrl-C outside the service loop (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: --log-level choices (structlog's filtering levels).
LOG_LEVELS = ("debug", "info", "warning", "error")


class CLIError(Exception):
    """A user error found while turning arguments into settings."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds: {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``localp2p run: error: ...``), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _log_options(*, defaults: bool) -> argparse.ArgumentParser:
    """A parent parser with --log-format and --log-level.

    The top level takes it with ``defaults`` (the env variables, else console/info);
    every subcommand takes it without: there the defaults are SUPPRESSed, so a value
    given after the subcommand replaces the top level's and an absent one leaves it.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--log-format",
        choices=FORMATS,
        default=_env(LOG_FORMAT_ENV, "console") if defaults else argparse.SUPPRESS,
        help=f"console lines or JSON lines on stderr (env {LOG_FORMAT_ENV}; default console)",
    )
    options.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=_env(LOG_LEVEL_ENV, "info") if defaults else argparse.SUPPRESS,
        help=f"least important level logged (env {LOG_LEVEL_ENV}; default info)",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="localp2p",
        description="Distributed llama.cpp inference, OpenAI-compatible.",
        parents=[_log_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"localp2p {__version__}")
    log_options = _log_options(defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        """A subcommand that also takes the log options."""
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, parents=[log_options])
        return sub

    run = command(commands, "run", "serve the OpenAI-compatible API")
    run.add_argument("--address", default=_env("ADDRESS", "127.0.0.1:8080"), help="HTTP listen address (env ADDRESS)")
    run.add_argument(
        "--models-path",
        type=pathlib.Path,
        default=_env("MODELS_PATH"),
        help="directory of model YAML/GGUF files (env MODELS_PATH); default: the embedded SmolLM2",
    )
    run.add_argument("--threads", type=_positive_int, default=env_threads(), help="threads for llama.cpp (env THREADS)")
    run.add_argument(
        "--parallel",
        type=_positive_int,
        default=_env("LLAMACPP_PARALLEL"),
        help=f"requests decoded together by continuous batching (env LLAMACPP_PARALLEL; default {DEFAULT_PARALLEL}; "
        "YAML 'parallel' per model)",
    )
    run.add_argument("--ready-timeout", type=float, default=120.0, help="seconds a request waits for a (re)starting backend before 503")
    run.add_argument("--p2p", action="store_true", default=_env("P2P") in ("1", "true"), help="find workers over libp2p (env P2P=true)")
    run.add_argument("--p2ptoken", default=None, help="network token (env P2P_TOKEN or TOKEN); generated when absent")
    run.add_argument(
        "--min-workers",
        type=_positive_int,
        default=int(_env("MIN_WORKERS", "0") or 0),
        help="wait for N workers before the first model load",
    )
    run.add_argument(
        "--max-queue",
        type=_positive_int,
        default=_env("MAX_QUEUE"),
        help="requests waiting or running at once before new ones get 429 (env MAX_QUEUE; default 64; 0: no limit)",
    )
    run.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require this key (Authorization: Bearer KEY) on /v1/* and /api/* (repeatable; env API_KEY, comma-separated)",
    )
    run.add_argument(
        "--protect-metrics",
        action="store_true",
        default=_env("PROTECT_METRICS") in ("1", "true"),
        help="/metrics needs an API key too (env PROTECT_METRICS=true)",
    )
    run.add_argument(
        "--cors",
        action="store_true",
        default=_env("CORS") in ("1", "true"),
        help="answer browsers on other origins (CORS headers, preflights; env CORS=true)",
    )
    run.add_argument(
        "--cors-allow-origins",
        default=_env("CORS_ALLOW_ORIGINS"),
        metavar="ORIGINS",
        help="with --cors: the origins allowed, comma-separated (env CORS_ALLOW_ORIGINS; default *: any)",
    )
    run.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=_env("SHUTDOWN_GRACE"),
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT (env SHUTDOWN_GRACE; default 10)",
    )
    run.add_argument(
        "--failover-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=_env("FAILOVER_TIMEOUT"),
        help="seconds a generation whose backend died may take to continue on the workers left (or locally) "
        "before it fails (env FAILOVER_TIMEOUT; default 60; 0: off)",
    )
    mesh = run.add_argument_group("mesh (with --p2p)")
    mesh.add_argument(
        "--delegate-to",
        default=_env("DELEGATE_TO"),
        metavar="PEER_ID",
        help="send every inference request to this server of the network (env DELEGATE_TO)",
    )
    mesh.add_argument(
        "--delegate-timeout",
        type=_seconds,
        default=_env("DELEGATE_TIMEOUT"),
        metavar="SECONDS",
        help="seconds to reach the --delegate-to provider and hand it a request (env DELEGATE_TIMEOUT; default 10)",
    )
    mesh.add_argument(
        "--fallback-to-local",
        action="store_true",
        default=_env("FALLBACK_TO_LOCAL") in ("1", "true"),
        help="serve here when the provider is unreachable, refuses or times out (env FALLBACK_TO_LOCAL=true); "
        "without it such a request gets 503",
    )
    mesh.add_argument(
        "--allow-peer",
        action="append",
        default=[p.strip() for p in (_env("ALLOW_PEERS") or "").split(",") if p.strip()],
        metavar="PEER_ID",
        help="only these peers may use this server's API over the network (repeatable; env ALLOW_PEERS, comma-separated)",
    )
    mesh.add_argument(
        "--deny-peer",
        action="append",
        default=[p.strip() for p in (_env("DENY_PEERS") or "").split(",") if p.strip()],
        metavar="PEER_ID",
        help="these peers may not use this server's API over the network (repeatable; env DENY_PEERS, comma-separated)",
    )
    _add_cpu_mode_arg(run)
    _add_p2p_args(run)
    run.set_defaults(func=cmd_run)

    client = command(commands, "client", "serve the network's OpenAI API here, with no model (a lite client)")
    client.add_argument("--address", default=_env("ADDRESS", "127.0.0.1:8080"), help="HTTP listen address (env ADDRESS)")
    client.add_argument("--token", default=None, help="network token (env TOKEN or P2P_TOKEN)")
    _add_p2p_args(client)
    client.set_defaults(func=cmd_client)

    worker = command(commands, "worker", "run a worker that lends this machine to a server")
    kinds = worker.add_subparsers(dest="kind", metavar="KIND", required=True)
    static = command(kinds, "llama-cpp-rpc", "a llama.cpp rpc-server on ADDRESS:PORT (static mode)")
    static.add_argument("address", help="listen address; keep 127.0.0.1 unless the network is trusted")
    static.add_argument("port", type=_port)
    static.add_argument("--threads", type=_positive_int, default=env_threads(), help="CPU threads for the rpc-server")
    static.add_argument("--cache-dir", default=_env("LOCALP2P_RPC_CACHE"), help="llama.cpp tensor cache: weights are not re-sent on reload")
    _add_worker_models_arg(static)
    _add_cpu_mode_arg(static)
    _add_device_arg(static)
    static.set_defaults(func=cmd_worker_static)

    p2p = command(kinds, "p2p-llama-cpp-rpc", "a llama.cpp rpc-server lent to the network of TOKEN over libp2p")
    p2p.add_argument("--token", default=None, help="network token (env TOKEN or P2P_TOKEN)")
    p2p.add_argument("--threads", type=_positive_int, default=env_threads(), help="CPU threads for the rpc-server")
    p2p.add_argument("--cache-dir", default=_env("LOCALP2P_RPC_CACHE"), help="llama.cpp tensor cache: weights are not re-sent on reload")
    _add_worker_models_arg(p2p)
    _add_cpu_mode_arg(p2p)
    _add_device_arg(p2p)
    _add_p2p_args(p2p)
    p2p.set_defaults(func=cmd_worker_p2p)

    relay = command(commands, "relay", "relay for the network of TOKEN: nodes behind NAT reach each other through it")
    relay.add_argument("--token", default=None, help="network token (env TOKEN or P2P_TOKEN)")
    _add_p2p_args(relay)
    relay.set_defaults(func=cmd_relay)

    token = command(commands, "token", "network tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    token_new = command(token_commands, "new", "print a fresh network token")
    token_new.set_defaults(func=cmd_token_new)

    status = command(commands, "status", "ask a running server what it is doing")
    status.add_argument("--address", default=_env("ADDRESS", "127.0.0.1:8080"), help="the server's HOST:PORT or URL (env ADDRESS)")
    status.add_argument("--api-key", default=_env("API_KEY"), help="sent as a Bearer token (env API_KEY)")
    status.add_argument("--json", action="store_true", help="print /api/status and /api/p2p as one JSON object")
    status.set_defaults(func=cmd_status)

    doctor = command(commands, "doctor", "check this machine's setup: llama.cpp, models, ports, token, workers")
    doctor.add_argument(
        "--models-path",
        type=pathlib.Path,
        default=_env("MODELS_PATH"),
        help="check these models (env MODELS_PATH); default: the embedded model",
    )
    doctor.add_argument("--address", default=_env("ADDRESS", "127.0.0.1:8080"), help="HTTP address whose port should be free (env ADDRESS)")
    doctor.add_argument("--p2ptoken", default=None, help="check this network token (env P2P_TOKEN or TOKEN)")
    doctor.add_argument("--p2p", action="store_true", default=_env("P2P") in ("1", "true"), help="check mDNS even without a token")
    _add_cpu_mode_arg(doctor)
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _cpu_mode(text: str) -> CpuMode:
    try:
        return cpumode.parse(text)
    except cpumode.CpuModeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_cpu_mode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-mode",
        type=_cpu_mode,
        default=_env(cpumode.MODE_ENV, CpuMode.DEFAULT.value),
        metavar="MODE",
        help=f"llama.cpp's CPU fast paths: default (all but AMX), amx (AMX too: opt in), safe (the plainest code) (env {cpumode.MODE_ENV})",
    )


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        action="append",
        default=[d.strip() for d in (_env("LOCALP2P_DEVICE") or "").split(",") if d.strip()],
        metavar="NAME",
        help="a ggml device the rpc-server serves, e.g. CUDA1 or Vulkan0 (repeatable; env LOCALP2P_DEVICE, comma-separated); "
        "default: every GPU, else the CPU (`localp2p doctor` lists them)",
    )


def _add_p2p_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("p2p")
    group.add_argument(
        "--p2p-bootstrap",
        action="append",
        default=[b for b in (_env("P2P_BOOTSTRAP") or "").split(",") if b.strip()],
        metavar="MULTIADDR",
        help="DHT bootstrap peer, e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo... (repeatable; env P2P_BOOTSTRAP, comma-separated)",
    )
    group.add_argument(
        "--p2p-listen",
        action="append",
        default=None,
        metavar="MULTIADDR",
        help="libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/0; env P2P_LISTEN)",
    )
    group.add_argument("--p2p-no-mdns", action="store_true", default=_env("P2P_NO_MDNS") in ("1", "true"), help="no LAN discovery")
    group.add_argument("--p2p-no-dht", action="store_true", default=_env("P2P_NO_DHT") in ("1", "true"), help="no DHT discovery")
    group.add_argument("--state-dir", type=pathlib.Path, default=None, help="where the node identity is kept (env LOCALP2P_STATE_DIR)")
    group.add_argument("--node-name", default=_env("NODE_NAME"), help="name shown to other nodes (default: host name)")
    group.add_argument(
        "--p2p-relay",
        action="store_true",
        default=_env("P2P_RELAY") in ("1", "true"),
        help="relay for token holders behind NAT (env P2P_RELAY=true; `localp2p relay` does only that)",
    )
    group.add_argument(
        "--p2p-relay-limits",
        default=_env("P2P_RELAY_LIMITS"),
        metavar="KEY=N,...",
        help="relay limits: reservations=32,circuits=8,seconds=0,bytes=0 (0: none; env P2P_RELAY_LIMITS)",
    )


def _p2p_settings(args: argparse.Namespace, token_text: str | None) -> Any:
    from localp2p.p2p.network import DEFAULT_LISTEN, P2PSettings, default_state_dir  # noqa: PLC0415
    from localp2p.p2p.token import NetworkToken, TokenError  # noqa: PLC0415

    try:
        token = NetworkToken.parse(token_text or "")
    except TokenError as exc:
        raise CLIError(f"network token: {exc}") from None
    listen = args.p2p_listen or [a for a in (_env("P2P_LISTEN") or "").split(",") if a.strip()] or list(DEFAULT_LISTEN)
    settings = P2PSettings(
        token=token,
        state_dir=args.state_dir or default_state_dir(),
        listen=tuple(listen),
        bootstrap=tuple(args.p2p_bootstrap),
        mdns=not args.p2p_no_mdns,
        dht=not args.p2p_no_dht,
    )
    if args.node_name:
        settings.name = args.node_name
    if args.p2p_relay or args.p2p_relay_limits or args.command == "relay":
        settings.relay = _relay_limits(args.p2p_relay_limits)
    if not settings.mdns and not settings.dht:
        raise CLIError("--p2p-no-mdns and --p2p-no-dht together leave no way to find peers")
    return settings


#: ``--p2p-relay-limits`` keys and the RelayLimits fields they set.
_RELAY_LIMIT_KEYS = {
    "reservations": "max_reservations",
    "circuits": "max_circuits",
    "seconds": "circuit_seconds",
    "bytes": "circuit_bytes",
}


def _relay_limits(text: str | None) -> Any:
    """RelayLimits from ``reservations=32,circuits=8,seconds=0,bytes=0`` (any subset; the rest default)."""
    from localp2p.p2p.relay import RelayLimits  # noqa: PLC0415

    values: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        field_name = _RELAY_LIMIT_KEYS.get(key.strip())
        if field_name is None or not value.strip().isdigit():
            raise CLIError(f"--p2p-relay-limits: expected KEY=N with KEY one of {', '.join(_RELAY_LIMIT_KEYS)}, got {item!r}")
        values[field_name] = int(value)
    return RelayLimits(**values)


def _run_service(service: Callable[..., Awaitable[Any]], *args: Any, graceful_limit: float | None = None) -> int:
    """Run ``service(*args)`` until it returns or SIGINT/SIGTERM arrives; map start-up errors.

    With ``graceful_limit`` the service is called with ``shutdown=<trio.Event>``: the
    first signal sets it and the service winds down by itself (e.g. finishes in-flight
    requests); a second signal, or ``graceful_limit`` seconds, cancel it. Without it,
    the first signal cancels the service.

    The service is awaited, not ``nursery.start``-ed: a signal may come at any point
    of its start-up, and a service that winds down before it is ready returns without
    ``task_status.started`` (which ``start`` would turn into a RuntimeError).
    """
    log = get_logger("localp2p")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                shutdown = trio.Event()
                kwargs = {"shutdown": shutdown} if graceful_limit is not None else {}

                async def run_then_stop() -> None:
                    await service(*args, **kwargs)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run_then_stop)
                async for signum in signals:
                    if graceful_limit is not None and not shutdown.is_set():
                        log.info("stopping gracefully", signal=signal.Signals(signum).name, limit_s=graceful_limit)
                        shutdown.set()
                        nursery.cancel_scope.deadline = trio.current_time() + graceful_limit
                        continue
                    log.info("stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        user_errors, _rest = group.split((ConfigError, StartupError, CLIError))
        if user_errors is None:
            raise
        raise _first_leaf(user_errors) from None
    return 0


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def cmd_run(args: argparse.Namespace) -> int:
    from localp2p.server.run import ServerSettings, serve  # noqa: PLC0415 - keep --help fast

    settings = ServerSettings(
        address=args.address,
        models=load_models(args.models_path),
        rpc_servers=parse_rpc_servers(_env(RPC_SERVERS_ENV)),
        threads=args.threads,
        parallel=args.parallel,
        ready_wait=args.ready_timeout,
        models_path=args.models_path,
        min_workers=args.min_workers,
        cpu_mode=args.cpu_mode,
    )
    if args.p2p:
        token_text = args.p2ptoken or _env("P2P_TOKEN") or _env("TOKEN")
        if not token_text:
            token_text = _announce_new_token()
        settings.p2p = _p2p_settings(args, token_text)
    elif args.min_workers:
        raise CLIError("--min-workers needs --p2p")
    elif args.p2p_relay:
        raise CLIError("--p2p-relay needs --p2p")
    _mesh_settings(args, settings)
    if args.max_queue is not None:
        settings.max_queue = args.max_queue
    if args.shutdown_grace is not None:
        settings.shutdown_grace = args.shutdown_grace
    if args.failover_timeout is not None:
        settings.failover_timeout = args.failover_timeout
    settings.api_keys = tuple(k.strip() for k in (args.api_key or (_env("API_KEY") or "").split(",")) if k.strip())
    if args.protect_metrics and not settings.api_keys:
        raise CLIError("--protect-metrics needs an API key (--api-key or API_KEY)")
    settings.protect_metrics = args.protect_metrics
    settings.cors_origins = _cors_origins(args.cors, args.cors_allow_origins)
    return _run_service(serve, settings, graceful_limit=settings.shutdown_limit)


def _peer_id(text: str, flag: str) -> str:
    """``text`` if it is a libp2p peer id; CLIError otherwise."""
    from libp2p.peer.id import ID  # noqa: PLC0415

    try:
        raw = ID.from_base58(text).to_bytes()
    except Exception:
        raw = b""
    # A multihash: identity (0x00) or sha2-256 (0x12), its length byte, then the digest.
    if len(raw) < 34 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        raise CLIError(f"{flag}: not a peer id: {text!r} (`localp2p status` and GET /api/p2p show them)")
    return text


def _mesh_settings(args: argparse.Namespace, settings: Any) -> None:
    """--delegate-to, --delegate-timeout, --fallback-to-local, --allow-peer, --deny-peer into ``settings``."""
    from localp2p.server.forwarding import Delegation, PeerFirewall  # noqa: PLC0415

    given = [
        flag
        for flag, value in (
            ("--delegate-to", args.delegate_to),
            ("--delegate-timeout", args.delegate_timeout),
            ("--fallback-to-local", args.fallback_to_local),
            ("--allow-peer", args.allow_peer),
            ("--deny-peer", args.deny_peer),
        )
        if value
    ]
    if given and not args.p2p:
        raise CLIError(f"{given[0]} needs --p2p")
    if (args.delegate_timeout is not None or args.fallback_to_local) and not args.delegate_to:
        raise CLIError(f"{'--fallback-to-local' if args.fallback_to_local else '--delegate-timeout'} needs --delegate-to")
    settings.firewall = PeerFirewall(
        allow=frozenset(_peer_id(p, "--allow-peer") for p in args.allow_peer),
        deny=frozenset(_peer_id(p, "--deny-peer") for p in args.deny_peer),
    )
    if args.delegate_to:
        delegation = Delegation(_peer_id(args.delegate_to, "--delegate-to"), fallback_to_local=args.fallback_to_local)
        if args.delegate_timeout is not None:
            if args.delegate_timeout <= 0:
                raise CLIError("--delegate-timeout: must be more than 0 seconds")
            delegation = Delegation(delegation.provider, args.delegate_timeout, args.fallback_to_local)
        settings.delegation = delegation


def cmd_client(args: argparse.Namespace) -> int:
    from localp2p.client.main import ClientSettings, run_client  # noqa: PLC0415 - keep --help fast

    token_text = args.token or _env("TOKEN") or _env("P2P_TOKEN")
    if not token_text:
        raise CLIError("a client needs the network token: TOKEN=... localp2p client (or --token)")
    settings = ClientSettings(p2p=_p2p_settings(args, token_text), address=args.address)
    return _run_service(run_client, settings)


def _cors_origins(enabled: bool, allowed: str | None) -> tuple[str, ...]:
    """The origins CORS allows: none when off; ``allowed`` (comma-separated) or any ("*") when on."""
    if not enabled:
        if allowed:
            raise CLIError("--cors-allow-origins needs --cors (or CORS=true)")
        return ()
    origins = tuple(o.strip() for o in (allowed or "*").split(",") if o.strip())
    return origins or ("*",)


def _announce_new_token() -> str:
    """Generate a network token and print it once, with the command that starts a worker."""
    from localp2p.p2p.token import NetworkToken  # noqa: PLC0415

    text = NetworkToken.generate().encode()
    print(
        "No network token given; generated one. Keep it secret, and pass it again with\n"
        "--p2ptoken or P2P_TOKEN to keep this network:\n\n"
        f"  {text}\n\n"
        "Start workers with:\n\n"
        f"  TOKEN={text} localp2p worker p2p-llama-cpp-rpc\n",
        flush=True,
    )
    return text


def _add_worker_models_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-path",
        default=_env("WORKER_MODELS_PATH"),
        help="directory of GGUF files this worker holds (env WORKER_MODELS_PATH): their tensors go into the tensor "
        "cache (default dir: STATE_DIR/tensor-cache) before a load instead of over the network; indexed once",
    )


def _worker_models_path(args: argparse.Namespace) -> str | None:
    """``--models-path`` of a worker, checked: a directory, else one line and exit 2."""
    path = args.models_path
    if path and not os.path.isdir(path):
        raise CLIError(f"--models-path: not a directory: {path}")
    return str(path) if path else None


def cmd_worker_p2p(args: argparse.Namespace) -> int:
    from localp2p.worker.main import run_p2p_worker  # noqa: PLC0415

    token_text = args.token or _env("TOKEN") or _env("P2P_TOKEN")
    if not token_text:
        raise CLIError("no network token: set TOKEN (printed by `localp2p run --p2p`) or pass --token")
    settings = _p2p_settings(args, token_text)
    models_path = _worker_models_path(args)
    return _run_service(
        run_p2p_worker, settings, args.threads, args.cache_dir, args.cpu_mode, tuple(args.device), models_path
    )


def cmd_relay(args: argparse.Namespace) -> int:
    from localp2p.relay_node import run_relay_node  # noqa: PLC0415

    token_text = args.token or _env("TOKEN") or _env("P2P_TOKEN")
    if not token_text:
        raise CLIError("no network token: set TOKEN (printed by `localp2p run --p2p`) or pass --token")
    return _run_service(run_relay_node, _p2p_settings(args, token_text))


def cmd_token_new(args: argparse.Namespace) -> int:
    from localp2p.p2p.token import NetworkToken  # noqa: PLC0415

    print(NetworkToken.generate().encode())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from localp2p.status import StatusError, show  # noqa: PLC0415

    try:
        return show(args.address, args.api_key, args.json)
    except StatusError as exc:
        raise CLIError(str(exc)) from None


def cmd_doctor(args: argparse.Namespace) -> int:
    from localp2p.doctor import DoctorSettings, report  # noqa: PLC0415

    settings = DoctorSettings(
        models_path=args.models_path,
        address=args.address,
        token=args.p2ptoken or _env("P2P_TOKEN") or _env("TOKEN"),
        p2p=args.p2p,
        rpc_servers_text=_env(RPC_SERVERS_ENV),
        cpu_mode=args.cpu_mode,
    )
    return report(settings)


def cmd_worker_static(args: argparse.Namespace) -> int:
    from localp2p.worker.main import run_static_worker  # noqa: PLC0415
    from localp2p.worker.rpc_server import RpcServerSpec  # noqa: PLC0415

    spec = RpcServerSpec(
        host=args.address,
        port=args.port,
        threads=args.threads,
        cache_dir=args.cache_dir,
        cpu_mode=args.cpu_mode,
        devices=tuple(args.device),
    )
    return _run_service(run_static_worker, spec, _worker_models_path(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run its command; returns the exit code.

    A user error prints one line (no traceback) and returns EXIT_STARTUP; Ctrl-C before
    a command's service loop has its own signal handling returns EXIT_INTERRUPTED.
    """
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args.log_format, args.log_level)
        # The first line a process logs (at debug): from here on a signal ends it without a traceback.
        get_logger("localp2p").debug("starting", command=args.command, version=__version__, pid=os.getpid())
        return int(args.func(args))
    except (ConfigError, StartupError, CLIError) as exc:
        print(f"localp2p: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
