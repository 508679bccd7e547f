"""A temporary Prefect API server that dies with the process that started it.

    from nhle.adapters.prefect_server import temporary_prefect_server
    with temporary_prefect_server():      # PREFECT_API_URL already set: starts nothing
        forget_flow(...)

With no PREFECT_API_URL, Prefect starts a temporary server of its own for the first flow run and
stops it at exit (atexit), so a SIGKILL of `nhle run` left that server running for good. This is
the same server (Prefect's app factory under uvicorn, as Prefect starts it, on the same
database), started with PR_SET_PDEATHSIG: the kernel sends it SIGTERM when the process that
started it dies, however it dies. It runs in its own session, so a Ctrl-C of the command reaches
the flow first and the server stays up while the flow records its failure.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import subprocess
import sys
import time

import httpx
import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)
from prefect.utilities.asyncutils import run_coro_as_sync

from nhle.adapters.processes import die_with, free_port, stop_process

log = logging.getLogger(__name__)
PORT_TAKEN = 3  # uvicorn's exit status when the port is already bound


def start_server(port: int) -> subprocess.Popen:

    # No task-run recorder: it writes each task's events to the database, where no UI of this
    # server reads them, and holds SQLite's write lock long enough that a subflow started right
    # after tasks (a request's forget, its evidence) waited about 2 s to be created. Flow runs,
    # their states and logs are recorded as before; a Prefect server (PREFECT_API_URL) keeps all.
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=env,
        preexec_fn=die_with(os.getpid()) if sys.platform == "linux" else None,
        start_new_session=True,
    )


def wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    """True once GET url/health answers 200; False if the process exited with PORT_TAKEN."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code == PORT_TAKEN:
            return False
        if code is not None:
            raise RuntimeError(f"the temporary Prefect server exited with status {code} while starting")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        time.sleep(0.2)
    raise RuntimeError(
        f"the temporary Prefect server did not answer within {timeout:g} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running server"
    )


def drain_to_server() -> None:
    """Send the flow-run logs and events still queued before the server stops (Prefect's test
    harness does the same), so that none is lost and no "Error logging to API" is printed at exit."""

    async def drain():
        with contextlib.suppress(RuntimeError):  # a worker that never started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    with contextlib.suppress(Exception):  # best effort: never hide the flow's own outcome
        run_coro_as_sync(drain())


@contextlib.contextmanager
def temporary_prefect_server():
    """Run the body with PREFECT_API_URL pointing at a server that cannot outlive this process
    (none is started when a Prefect API is configured already)."""
    with prefect_server_starting() as ready:
        yield ready()


@contextlib.contextmanager
def prefect_server_starting():
    """temporary_prefect_server, started at once and waited for only when the body calls the
    `ready` it yields (before its first flow): the server's few seconds of start-up overlap the
    body's own work. ready() returns the API URL (None: a configured one is used)."""
    if PREFECT_API_URL.value():
        yield lambda: None
        return
    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    server = {"port": free_port()}
    server["process"] = start_server(server["port"])

    with contextlib.ExitStack() as stack:

        def ready() -> str:
            if "url" in server:
                return server["url"]
            for _ in range(3):  # another process may take the free port before the server binds it
                url = f"http://127.0.0.1:{server['port']}/api"
                if wait_healthy(server["process"], url, timeout):
                    break
                server["port"] = free_port()
                server["process"] = start_server(server["port"])
            else:
                raise RuntimeError("the temporary Prefect server found no free port three times")
            log.info("temporary Prefect server on %s (pid %d, stops with this process)", url, server["process"].pid)
            # No flow-run heartbeats: they tell a server that outlives a crashed run, and this one
            # dies with the run (each flow's end otherwise waits up to 1 s for the heartbeat thread).
            stack.enter_context(
                temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            )
            stack.callback(drain_to_server)  # runs first at exit, while the setting still holds
            server["url"] = url
            return url

        try:
            yield ready
        finally:
            stack.close()
            stop_process(server["process"])
