"""Hostile connections cannot hold the server: request heads are bounded in size (431) and time
(408), idle connections are closed, under `nhle_serving.http.GuardedProtocol` with uvicorn and
with gunicorn (docs/deploy.md), each a real process spoken to over raw sockets.

    .venv/bin/python -m pytest -q tests/serving/test_connection_limits.py
"""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serving_support import Server

from nhle.adapters.processes import free_port, stop_process

LIMITS = dict(header_timeout_seconds=1, keep_alive_seconds=1)
IMG = [[0.5] * 8 for _ in range(8)]


@pytest.fixture(scope="module")
def guarded(champion_registry, start_server):
    return start_server(champion_registry.root, **LIMITS)


def exchange(port: int, data: bytes, timeout: float = 30) -> tuple[bytes, float]:
    """Sends `data` (as far as the server takes it), then reads until the server closes the
    connection: what came back and after how many seconds."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused midway: the answer was written before the close
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def head_of(size: int) -> bytes:
    """A GET /healthz whose head is about `size` bytes (one long header)."""
    start = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Pad: "
    return start + b"a" * max(0, size - len(start) - 4) + b"\r\n\r\n"


def assert_limits_hold(port: int):
    received, _ = exchange(port, head_of(100 * 1024))
    assert received.startswith(b"HTTP/1.1 431"), received[:200]
    assert b"exceed 65536 bytes" in received
    received, _ = exchange(port, head_of(60 * 1024))  # under the limit
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    received, waited = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: test\r\n")  # then nothing
    assert received.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in received, received[:200]
    assert 0.8 < waited < 10, waited
    received, waited = exchange(port, b"")  # a connection that sends nothing
    assert received == b"" and 0.8 < waited < 10, (received, waited)


def test_request_heads_are_bounded_in_size_and_time_and_idle_connections_closed(guarded):
    assert_limits_hold(guarded.port)
    assert "431, the request line and headers exceed 65536 bytes" in guarded.log()


def test_a_32_mib_header_is_refused_at_64_kib_while_others_are_served(guarded):
    """The server stops reading at the limit, so the client cannot push 32 MiB into it, and a
    client beside it is answered at once."""
    before = time.monotonic()
    received, _ = exchange(guarded.port, head_of(32 * 1024 * 1024))
    assert received.startswith(b"HTTP/1.1 431"), received[:200]
    assert guarded.http.post("/predict", json={"instances": [IMG]}).status_code == 200
    assert time.monotonic() - before < 20


def test_a_large_body_in_the_same_packet_as_its_head_is_not_counted_as_head(guarded):
    body = json.dumps({"instances": [IMG] * 250}).encode()  # about 80 KB
    assert len(body) > 64 * 1024
    head = (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    received, _ = exchange(guarded.port, head + body)
    assert received.startswith(b"HTTP/1.1 200"), received[:300]


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while not first.endswith(b'{"alive":true}'):  # the whole response, head and body
            first += conn.recv(65536)
        started = time.monotonic()
        rest = conn.recv(65536)  # b"" once the server closes
        idle = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200") and rest == b"" and 0.5 < idle < 10, (first[:100], rest, idle)


def test_gunicorn_with_the_nhle_worker_holds_the_same_limits(champion_registry, tmp_path):
    """docs/deploy.md's gunicorn start: the limits come from the serving settings."""
    port = free_port()
    env = Server.environment(champion_registry.root, **LIMITS)
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "nhle_serving.http.Worker",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "nhle_serving.server:create_app()",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=champion_registry.root,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            time.sleep(0.2)
        assert_limits_hold(port)
    finally:
        stop_process(proc)
        log.close()
