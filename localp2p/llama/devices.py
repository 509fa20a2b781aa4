"""The ggml devices this llama.cpp build can use, and which of them a worker serves.

llama-cpp-python 0.3.36 does not wrap ggml's device registry, so it is read through
ctypes from the same ``libggml.so.0`` llama.cpp links (see :func:`localp2p.llama.rpc._libs`).
A worker's rpc-server serves the devices :func:`select` picks, the rule of llama.cpp's
own ``rpc-server`` tool: the ones named with ``--device``, else every GPU, else the CPU.

``python -m localp2p.llama.devices [--device NAME ...]`` prints the selection as JSON
(one line); workers run it once at start so a broken GPU driver fails a child, not them.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from localp2p.llama import rpc

#: ggml_backend_dev_type (ggml-backend.h) to the kinds localp2p reports.
KINDS = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
#: Registered ggml backends that run on a GPU (ggml_backend_reg_name).
GPU_BACKENDS = frozenset({"CUDA", "ROCm", "HIP", "Vulkan", "Metal", "SYCL", "MUSA", "CANN", "OpenCL"})
#: Where :func:`visible_gpus` looks for GPU device nodes; tests point it at a fake tree.
DEV_ROOT_ENV = "LOCALP2P_DEV_ROOT"
#: At most this many devices are taken from a peer's announcement.
MAX_DEVICES = 16


class DeviceError(Exception):
    """A ``--device`` name this build does not have, or the device list could not be read."""


@dataclass(frozen=True)
class Device:
    """One ggml device: its registry name (``CPU``, ``Vulkan0``, ``CUDA0``), description, kind and memory."""

    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int

    @property
    def accelerated(self) -> bool:
        """Whether llama.cpp's rpc-server prefers it over the CPU (a GPU of any sort)."""
        return self.kind not in ("CPU", "ACCEL")

    def text(self) -> str:
        """``Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits), IGPU, 7.6 GiB free of 15.5 GiB)``."""
        return f"{self.name} ({self.description}, {self.kind}, {_gib(self.memory_free)} free of {_gib(self.memory_total)})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Device | None:
        """A device from a peer's announcement; None when it is not one (fields bounded)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                name=str(data.get("name", ""))[:64],
                description=str(data.get("description", ""))[:128],
                kind=str(data.get("kind", ""))[:8],
                memory_free=max(0, int(data.get("memory_free", 0) or 0)),
                memory_total=max(0, int(data.get("memory_total", 0) or 0)),
            )
        except (TypeError, ValueError):
            return None


def announced_devices(data: Any) -> list[dict[str, Any]]:
    """The devices in a peer's announcement, as dicts: malformed entries dropped, at most MAX_DEVICES."""
    if not isinstance(data, list):
        return []
    devices = (Device.from_dict(item) for item in data[:MAX_DEVICES])
    return [d.as_dict() for d in devices if d is not None]


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def summary(devices: Sequence[Device]) -> str:
    """``CPU`` or ``Vulkan0+Vulkan1``: the names, for one-line reports."""
    return "+".join(d.name for d in devices) or "none"


@functools.cache
def _ggml() -> ctypes.CDLL:
    ggml, _ = rpc._libs()
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_count.argtypes = []
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_count.argtypes = []
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    return ggml


def _handles() -> list[tuple[int, Device]]:
    ggml = _ggml()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if not dev:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = KINDS.get(ggml.ggml_backend_dev_type(dev), "?")
        name = (ggml.ggml_backend_dev_name(dev) or b"?").decode(errors="replace")
        description = (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
        found.append((int(dev), Device(name, description, kind, free.value, total.value)))
    return found


def list_devices() -> list[Device]:
    """Every device in this build's ggml registry (RPC devices too, once registered)."""
    return [device for _, device in _handles()]


def backends() -> list[str]:
    """The ggml backends this build registered: ``CPU``, ``RPC``, ``Vulkan``, ``CUDA`` ..."""
    ggml = _ggml()
    names = []
    for i in range(ggml.ggml_backend_reg_count()):
        reg = ggml.ggml_backend_reg_get(i)
        if reg:
            names.append((ggml.ggml_backend_reg_name(reg) or b"?").decode(errors="replace"))
    return names


def select(available: Sequence[Device], names: Sequence[str] = ()) -> list[Device]:
    """The devices an rpc-server serves: ``names`` (all must exist), else every GPU, else the CPU.

    Raises :class:`DeviceError` naming the unknown device and what this build has.
    """
    if names:
        by_name = {d.name: d for d in available}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            have = ", ".join(d.name for d in available) or "none"
            raise DeviceError(f"unknown device {', '.join(unknown)}: this llama.cpp build has {have}")
        return [by_name[n] for n in names]
    gpus = [d for d in available if d.accelerated and d.kind != "META"]
    return gpus or [d for d in available if d.kind == "CPU"][:1]


def selected_handles(names: Sequence[str] = ()) -> list[int]:
    """ggml device handles for :func:`select` (for ``ggml_backend_rpc_start_server``)."""
    pairs = _handles()
    chosen = select([d for _, d in pairs], names)
    return [handle for handle, d in pairs if d in chosen]


def visible_gpus() -> list[str]:
    """GPUs this machine shows, whatever llama.cpp was built for: ``NVIDIA (nvidia-smi)``, ``/dev/kfd`` ..."""
    root = pathlib.Path(os.environ.get(DEV_ROOT_ENV, "/dev"))
    seen = []
    if shutil.which("nvidia-smi"):
        seen.append("NVIDIA (nvidia-smi)")
    if (root / "kfd").exists():
        seen.append(f"AMD ({root / 'kfd'})")
    render = sorted((root / "dri").glob("renderD*")) if (root / "dri").is_dir() else []
    if render:
        seen.append(f"{len(render)} render node(s) in {root / 'dri'}")
    return seen


def unused_gpu_warning() -> str | None:
    """One line when a GPU is visible but this build has no GPU backend; else None."""
    gpus = visible_gpus()
    if not gpus:
        return None
    built = backends()
    if GPU_BACKENDS.intersection(built):
        return None
    return (
        f"a GPU is visible ({'; '.join(gpus)}) but llama.cpp was built without a GPU backend "
        f"(backends: {', '.join(built) or 'none'}): layers run on the CPU; rebuild with `LOCALP2P_GPU=cuda|vulkan make install`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localp2p.llama.devices")
    parser.add_argument("--device", action="append", default=[], help="a device name to select (repeatable)")
    args = parser.parse_args(argv)
    try:
        chosen = select(list_devices(), args.device)
    except (DeviceError, rpc.RPCError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"devices": [d.as_dict() for d in chosen], "warning": unused_gpu_warning()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
