"""Child processes that nhle starts (servers for flows, tests and benchmarks): a free loopback
port, a stop that cannot hang, and a child that dies with its parent.

    from nhle.adapters.processes import free_port, stop_process, die_with
    proc = subprocess.Popen([...], preexec_fn=die_with(os.getpid()))   # Linux: SIGTERM when we die
    stop_process(proc)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process has not exited 15 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def die_with(parent: int):
    """A preexec_fn (it runs in the child between fork and exec, Linux only): the kernel sends the
    child SIGTERM when `parent` dies, however it dies (PR_SET_PDEATHSIG)."""

    def arm():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm
