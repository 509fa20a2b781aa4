"""`localp2p status`: ask a running server what it is doing and print it for people.

The server is the only source of truth: this module reads ``GET /api/status`` and
``GET /api/p2p`` (404 there means p2p mode is off) over plain HTTP and formats what
it gets. Fields that an older or newer server lacks are skipped, never guessed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

#: Seconds to wait for each answer: the status routes answer from memory, so a server
#: that takes longer than this is in trouble and saying so is the useful answer.
HTTP_TIMEOUT = 10.0
#: How many recent requests the summary lists (the server may keep more).
RECENT_SHOWN = 10
#: Peer ids are ~52 characters; this many from each end tell them apart in a table.
PEER_ID_KEEP = 6


class StatusError(Exception):
    """The server could not be asked; the message is one line for the user."""


def base_url(address: str) -> str:
    """``http://HOST:PORT`` for ``address`` (``HOST:PORT`` or a URL).

    A wildcard listen address (``0.0.0.0``, ``::``) is what ``ADDRESS`` often holds on
    the server's machine; it is asked on loopback instead.
    """
    address = address.strip().rstrip("/")
    if address.startswith(("http://", "https://")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, "8080"
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _get(url: str, api_key: str | None) -> dict[str, Any] | None:
    """GET ``url`` as JSON; None for 404. Raises StatusError for anything unusable."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code in (401, 403):
            hint = "the API key was refused" if api_key else "an API key is needed"
            raise StatusError(f"{url}: {hint} (pass --api-key or set API_KEY)") from None
        raise StatusError(f"{url}: HTTP {exc.code} {_error_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        base = url.rsplit("/api/", 1)[0]
        raise StatusError(f"no localp2p server answers at {base}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON (is this a localp2p server?)") from None
    if not isinstance(data, dict):
        raise StatusError(f"{url}: unexpected answer (is this a localp2p server?)")
    return data


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or ""


def fetch(address: str, api_key: str | None = None) -> dict[str, Any]:
    """``{"url", "status", "p2p"}`` from a running server; ``p2p`` is None when p2p mode is off.

    Raises StatusError when the server is unreachable, refuses the key, or answers
    something that is not a localp2p status.
    """
    url = base_url(address)
    status = _get(f"{url}/api/status", api_key)
    if status is None:
        raise StatusError(f"{url} has no /api/status: is this a localp2p server?")
    return {"url": url, "status": status, "p2p": _get(f"{url}/api/p2p", api_key)}


# --- formatting -------------------------------------------------------------------------


def size(n: Any) -> str:
    """Bytes for people (``1.5 GiB``); ``?`` for a missing value."""
    if not isinstance(n, (int, float)):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def short_peer_id(peer_id: str) -> str:
    keep = PEER_ID_KEEP
    return peer_id if len(peer_id) <= 2 * keep + 2 else f"{peer_id[:keep]}..{peer_id[-keep:]}"


def _clock(value: Any) -> str:
    if isinstance(value, (int, float)):
        return time.strftime("%H:%M:%S", time.localtime(value))
    return str(value) if value is not None else "?"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _backend_lines(status: dict[str, Any]) -> list[str]:
    backend = status.get("backend") or {}
    parts = [str(backend.get("state", "?"))]
    if backend.get("pid") is not None:
        parts.append(f"pid {backend['pid']}")
    if "restarts" in backend:
        parts.append(f"{backend['restarts']} restart(s)")
    if backend.get("load_seconds"):
        parts.append(f"loaded in {backend['load_seconds']:.1f} s")
    lines = ["backend:  " + ", ".join(parts)]
    if backend.get("cpu_mode"):
        reason = f" ({backend['cpu_mode_reason']})" if backend.get("cpu_mode_reason") else ""
        lines.append(f"          cpu mode: {backend['cpu_mode']}{reason}")
    if backend.get("last_error"):
        lines.append(f"          last error: {backend['last_error']}")
    return lines


def _load_progress_lines(status: dict[str, Any]) -> list[str]:
    progress = status.get("load_progress")
    if not isinstance(progress, dict) or not progress.get("active"):
        return []
    text = f"loading:  {100 * float(progress.get('fraction') or 0):.0f}%"
    if progress.get("bytes_total"):
        text += f", {size(progress.get('bytes_sent'))} of {size(progress.get('bytes_total'))}"
    if progress.get("rate_bytes_per_s"):
        text += f" at {size(progress['rate_bytes_per_s'])}/s"
    if progress.get("eta_s") is not None:
        text += f", about {float(progress['eta_s']):.0f} s left"
    if progress.get("from_cache"):
        text += " (workers' tensor cache)"
    lines = [text]
    weights = progress.get("weights")
    for name, w in sorted(weights.items()) if isinstance(weights, dict) else []:
        if not isinstance(w, dict):
            continue
        parts = [f"{size(w.get(k))} {label}" for k, label in _WEIGHT_SOURCES if w.get(k)]
        line = f"          {name}: {', '.join(parts) or 'nothing yet'} of {size(w.get('total'))}"
        if w.get("error"):
            line += " (no plan: llama.cpp sends it)"
        lines.append(line)
    return lines


#: load_progress.weights fields, as the status lines name them (issue 16).
_WEIGHT_SOURCES = (("local", "own copy"), ("peers", "peers"), ("server", "server"), ("cached", "cache"))


def _device_lines(status: dict[str, Any]) -> list[str]:
    devices = status.get("devices") or []
    if not devices:
        return []
    rows = []
    for device in devices:
        used = "used" if device.get("used") else "skipped"
        memory = f"{size(device.get('memory_free'))} free of {size(device.get('memory_total'))}"
        row = [str(device.get("endpoint", "?")), used, f"{device.get('layers', 0)} layers", memory]
        if device.get("skipped_reason"):
            row.append(str(device["skipped_reason"]))
        rows.append(row)
    width = max(len(r) for r in rows)
    return ["devices:", *_table([r + [""] * (width - len(r)) for r in rows])]


def _worker_lines(p2p: dict[str, Any]) -> list[str]:
    lines = []
    node = p2p.get("node") or {}
    head = f"p2p:      network {p2p.get('network_id', '?')}"
    if node.get("peer_id"):
        head += f", this node {short_peer_id(str(node['peer_id']))}"
    lines.append(head)
    workers = p2p.get("workers") or []
    if not workers:
        return [*lines, "workers:  none yet"]
    rows = []
    for worker in workers:
        state = str(worker.get("state") or ("online" if worker.get("online") else "offline"))
        rows.append(
            [
                short_peer_id(str(worker.get("peer_id", "?"))),
                str(worker.get("name") or "-"),
                state,
                f"{size(worker.get('memory_free'))} free of {size(worker.get('memory_total'))}",
                _devices_text(worker),
                f"{worker.get('layers', 0)} layers",
                f"sent {size(worker.get('bytes_sent'))}",
                f"received {size(worker.get('bytes_received'))}",
                _link_text(worker),
            ]
        )
    return [*lines, "workers:", *_table(rows)]


def _mesh_lines(p2p: dict[str, Any]) -> list[str]:
    """The other API servers (models, load, our requests to each) and the peers using this API."""
    lines = []
    servers = p2p.get("servers") or []
    if servers:
        rows = [
            [
                short_peer_id(str(s.get("peer_id", "?"))),
                str(s.get("name") or "-"),
                "online" if s.get("online") else str(s.get("state") or "offline"),
                ", ".join(map(str, s.get("models") or [])) or "-",
                f"{s.get('admitted', 0)} queued or running",
                f"{s.get('requests_forwarded', 0)} sent there",
            ]
            for s in servers
        ]
        lines += ["servers:", *_table(rows)]
    clients = p2p.get("clients") or []
    if clients:
        rows = [
            [
                short_peer_id(str(c.get("peer_id", "?"))),
                str(c.get("name") or "-"),
                str(c.get("role") or "peer"),
                f"{c.get('requests_served', 0)} served",
                f"{c.get('requests_in_flight', 0)} in flight",
                "" if c.get("admitted", True) else "refused by the firewall",
            ]
            for c in clients
        ]
        lines += ["clients:", *_table(rows)]
    return lines


def _devices_text(worker: dict[str, Any]) -> str:
    """``Vulkan0 GPU`` or ``CPU``: the ggml devices the worker's rpc-server serves (``-`` when it did not say)."""
    names = []
    for device in (d for d in worker.get("devices") or [] if isinstance(d, dict)):
        name, kind = str(device.get("name", "?")), device.get("kind")
        names.append(f"{name} {kind}" if kind and kind != name else name)
    return "+".join(names) or "-"


def _link_text(worker: dict[str, Any]) -> str:
    """``direct 0.4 ms``, ``hole-punched 1.2 ms``, ``relayed via 12D3…abcd 3.1 ms`` (``-`` when unknown)."""
    link = worker.get("link")
    if not link:
        return "-"
    if link == "relayed" and worker.get("relay"):
        link += f" via {short_peer_id(str(worker['relay']))}"
    rtt = worker.get("rtt_ms")
    return f"{link} {rtt:.1f} ms" if isinstance(rtt, int | float) else str(link)


def _request_lines(status: dict[str, Any]) -> list[str]:
    recent = status.get("recent_requests")
    if not isinstance(recent, list):
        return []
    if not recent:
        return ["recent requests: none yet"]
    rows = []
    for req in recent[:RECENT_SHOWN]:
        tokens = f"{req.get('prompt_tokens', '?')}+{req.get('completion_tokens', '?')} tok"
        rate = req.get("tokens_per_second")
        ttft = req.get("ttft_ms")
        duration = req.get("duration_ms")
        rows.append(
            [
                _clock(req.get("time")),
                str(req.get("endpoint", "?")),
                str(req.get("model", "?")),
                str(req.get("status", "?")),
                "stream" if req.get("stream") else "",
                tokens,
                f"ttft {ttft:.0f} ms" if isinstance(ttft, (int, float)) else "",
                f"{duration / 1000:.2f} s" if isinstance(duration, (int, float)) else "",
                f"{rate:.1f} tok/s" if isinstance(rate, (int, float)) else "",
            ]
        )
    return ["recent requests (newest first):", *_table(rows)]


def render(data: dict[str, Any]) -> str:
    """The readable summary of what :func:`fetch` returned."""
    status = data["status"]
    models = status.get("models") or []
    model = f"model:    {status.get('model') or '(none loaded)'}"
    others = [m for m in models if m != status.get("model")]
    if others:
        model += f" (also: {', '.join(map(str, others))})"
    lines = [f"localp2p server at {data['url']}", model, *_backend_lines(status)]
    layers = status.get("layers") or {}
    if layers.get("total"):
        lines.append(f"layers:   {layers['total']} total, {layers.get('local', '?')} on this machine")
    lines += _load_progress_lines(status)
    lines += _device_lines(status)
    if data.get("p2p") is not None:
        lines += _worker_lines(data["p2p"])
        lines += _mesh_lines(data["p2p"])
    lines += _request_lines(status)
    return "\n".join(lines)


def show(address: str, api_key: str | None = None, as_json: bool = False) -> int:
    """Fetch and print (JSON or the summary); raises StatusError with one line on failure."""
    data = fetch(address, api_key)
    print(json.dumps(data, indent=2) if as_json else render(data), flush=True)
    return 0
