"""Process plumbing shared by every supervised child: start, stop, die with the parent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import trio

#: Seconds a child gets between SIGTERM and SIGKILL.
STOP_GRACE = 5.0
#: First delay before restarting a crashed child; doubles per crash in a row, up to the max.
RESTART_BACKOFF_MIN = 0.2
RESTART_BACKOFF_MAX = 10.0
#: A child that stayed up this long counts as healthy again (backoff resets).
HEALTHY_AFTER = 30.0
#: Poll interval while waiting for a child to come up.
READY_POLL = 0.05
#: How often a child checks that its parent is still alive.
PARENT_POLL = 0.5


class ChildExited(Exception):
    """A child process exited before it became ready."""


def die_with_parent() -> None:
    """Exit this process soon after its parent dies (call first thing in a child).

    A supervisor killed with SIGKILL cannot clean up; without this its rpc-server or
    backend would live on, holding ports and worker connections. ``PR_SET_PDEATHSIG``
    is no use here: it fires when the parent *thread* that forked us exits, and trio
    spawns children from short-lived worker threads. So a daemon thread watches for
    re-parenting instead (it runs even while the main thread sits in llama.cpp).
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


async def start_child(argv: Sequence[str], env: Mapping[str, str] | None = None) -> trio.Process:
    """Start a child in its own process group (a terminal's Ctrl-C reaches only us).

    The child's stdout goes to our stderr: llama.cpp chats on stdout, and our stdout
    is kept for the lines a user copies (ready lines, tokens).
    """
    child_env = dict(env if env is not None else os.environ)
    # ggml answers an abort by attaching gdb for a backtrace: slow and pages of noise.
    child_env.setdefault("GGML_NO_BACKTRACE", "1")
    return await trio.lowlevel.open_process(
        list(argv),
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno(),
        start_new_session=True,
    )


async def stop_child(process: trio.Process, grace: float = STOP_GRACE) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit code.

    Shielded: stopping a child must complete even while the caller is being cancelled.
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            try:
                process.terminate()
            except ProcessLookupError:
                pass
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
        code = await process.wait()
    return code


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
