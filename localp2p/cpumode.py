"""Which of llama.cpp's CPU fast paths a process may use: ``default``, ``amx`` or ``safe``.

llama.cpp's native build puts weights into its AMX buffer type on CPUs that have AMX
(Intel Sapphire Rapids and later), and on some of them the first decode segfaults in
``ggml_backend_amx_mul_mat`` (llama.cpp #20824, unfixed upstream). A crash in one
CPU-specific kernel must cost speed, not service, so:

* ``default`` — every fast path except AMX. ggml creates its AMX buffer type only when
  the kernel grants the process AMX tile data (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); a
  seccomp filter makes that one request fail with EPERM, so ggml skips AMX exactly as
  on a CPU without it (it prints ``AMX is not ready to be used!``) while the other
  weight repacks (``CPU_REPACK``: Q4_0, Q8_0, K-quants on AVX2) stay.
* ``amx`` — the operator opted in (``--cpu-mode amx`` / ``LOCALP2P_CPU_MODE=amx``):
  nothing is filtered.
* ``safe`` — after a native crash: AMX denied, no extra buffer types at all
  (``use_extra_bufts = false``: no repacked weights), no tiled matmul and no op fusion.
  Slower, and the plainest code llama.cpp's CPU backend has.

The mode is process-wide: a supervisor passes it to its child in ``LOCALP2P_CPU_MODE``
(:func:`child_env`), and the child calls :func:`enter` first thing.
"""

from __future__ import annotations

import ctypes
import enum
import os
import platform
import signal
import struct
from collections.abc import Mapping

#: The operator's choice and what a supervisor hands its child.
MODE_ENV = "LOCALP2P_CPU_MODE"
#: Tests only: ``1`` — a backend or self-test not in safe mode kills itself with SIGSEGV
#: at its first decode, as llama.cpp's AMX kernel does on the CPUs of #20824; ``always``
#: — in safe mode too.
CRASH_FAILPOINT_ENV = "LOCALP2P_TEST_CRASH_FIRST_DECODE"
#: Signals that mean native code broke (a bad kernel, an instruction the CPU lacks), not
#: an abort: llama.cpp aborts (SIGABRT) when an RPC worker is lost, which is no CPU issue.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS})
#: ggml switches read once per process: in safe mode its tiled K-quant matmul and op
#: fusion stay off (ggml-cpu/tiled/tiled.cpp, ggml-cpu.c).
SAFE_GGML_ENV = {"GGML_CPU_TILED_MM": "0", "GGML_CPU_DISABLE_FUSION": "1"}
#: CPU flags (/proc/cpuinfo) that mean llama.cpp may use AMX on this machine.
AMX_FLAGS = frozenset({"amx_tile", "amx_int8"})
#: CPU flags worth naming when saying which features llama.cpp runs with.
NOTABLE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


class CpuMode(enum.Enum):
    DEFAULT = "default"
    AMX = "amx"
    SAFE = "safe"

    @property
    def extra_buffer_types(self) -> bool:
        """Whether llama.cpp may repack weights into its extra CPU buffer types."""
        return self is not CpuMode.SAFE

    @property
    def allows_amx(self) -> bool:
        return self is CpuMode.AMX

    def describe(self) -> str:
        """One phrase for logs, ``doctor`` and ``/api/status``."""
        return {
            CpuMode.DEFAULT: "default (all CPU fast paths but AMX)",
            CpuMode.AMX: "amx (AMX allowed: opted in)",
            CpuMode.SAFE: "safe (no AMX, no repacked weights, no tiled matmul, no op fusion)",
        }[self]


class CpuModeError(ValueError):
    """``LOCALP2P_CPU_MODE`` or ``--cpu-mode`` names no mode."""


def parse(text: str | None) -> CpuMode:
    """The mode named by ``text`` (empty: default); CpuModeError otherwise."""
    if not text:
        return CpuMode.DEFAULT
    try:
        return CpuMode(text.strip().lower())
    except ValueError:
        names = ", ".join(m.value for m in CpuMode)
        raise CpuModeError(f"unknown CPU mode {text!r} (choose one of {names})") from None


def from_env(env: Mapping[str, str] | None = None) -> CpuMode:
    return parse((os.environ if env is None else env).get(MODE_ENV))


def child_env(mode: CpuMode, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) for a child that must run in ``mode``."""
    child = dict(os.environ if env is None else env)
    child[MODE_ENV] = mode.value
    if mode is CpuMode.SAFE:
        child.update(SAFE_GGML_ENV)
    return child


def is_native_crash(returncode: int | None) -> bool:
    """Whether a child's exit code says it died of a native crash (see CRASH_SIGNALS)."""
    return returncode is not None and returncode < 0 and -returncode in {int(s) for s in CRASH_SIGNALS}


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx(flags: frozenset[str] | None = None) -> bool:
    return AMX_FLAGS <= (cpu_flags() if flags is None else flags)


# --- the AMX filter ------------------------------------------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP_X86_64 = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1  # every thread of the process, not just the caller
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_ARCH_PRCTL_X86_64 = 158
#: arch_prctl code that asks the kernel for an extended state feature (AMX tile data).
ARCH_REQ_XCOMP_PERM = 0x1023
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_EPERM = 1
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _deny_xcomp_program() -> bytes:
    """Classic BPF: ``arch_prctl(ARCH_REQ_XCOMP_PERM, …)`` fails with EPERM, all else passes.

    Offsets into ``struct seccomp_data``: 0 the syscall number, 4 the audit arch,
    16 the low word of the first argument.
    """
    insns = [
        (_BPF_LD_W_ABS, 0, 0, 4),
        (_BPF_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),
        (_BPF_LD_W_ABS, 0, 0, 0),
        (_BPF_JEQ_K, 0, 3, _NR_ARCH_PRCTL_X86_64),
        (_BPF_LD_W_ABS, 0, 0, 16),
        (_BPF_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def deny_amx() -> str | None:
    """Make this process unable to obtain AMX, so ggml never creates its AMX buffer type.

    Returns None when the filter is in place (or not needed: not x86-64 Linux), else
    why it could not be installed. Irreversible for the process and its children;
    call before llama.cpp loads a model.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
    program = _deny_xcomp_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    rc = libc.syscall(_SYS_SECCOMP_X86_64, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if rc != 0:
        return f"seccomp filter refused: {os.strerror(ctypes.get_errno())}"
    return None


def request_amx_errno() -> int:
    """errno of asking the kernel for AMX tile data now (0: granted). For tests and doctor."""
    libc = ctypes.CDLL(None, use_errno=True)
    xfeature_xtiledata = 18
    rc = libc.syscall(_NR_ARCH_PRCTL_X86_64, ARCH_REQ_XCOMP_PERM, xfeature_xtiledata)
    return 0 if rc == 0 else ctypes.get_errno()


def enter(mode: CpuMode) -> str | None:
    """Put this process into ``mode`` (call first thing in a child that runs llama.cpp).

    Returns a warning when AMX could not be denied: the caller then has llama.cpp load
    without extra buffer types (that leaves AMX unused too, at the cost of the repacks).
    The safe mode's ggml switches come from the environment (:func:`child_env`).
    """
    if mode.allows_amx:
        return None
    return deny_amx()


def crash_failpoint(mode: CpuMode) -> None:
    """Tests only: die of SIGSEGV now when ``LOCALP2P_TEST_CRASH_FIRST_DECODE`` says so for
    ``mode`` (callers call this at their first decode, where llama.cpp #20824 crashes)."""
    value = os.environ.get(CRASH_FAILPOINT_ENV)
    if value == "always" or (value == "1" and mode is not CpuMode.SAFE):
        os.kill(os.getpid(), signal.SIGSEGV)


def notable_features(flags: frozenset[str] | None = None) -> list[str]:
    have = cpu_flags() if flags is None else flags
    return [f for f in NOTABLE_FLAGS if f in have]
