"""The HTTP connection limits of the nhle server: uvicorn's httptools protocol, bounded.

    uvicorn nhle_serving.server:create_app --factory --http nhle_serving.http:GuardedProtocol
    gunicorn -k nhle_serving.http.Worker "nhle_serving.server:create_app()"

`nhle serve` uses it. Plain uvicorn reads a request head of any size into memory and waits for it
forever, and keeps a new connection that sends nothing open forever. Here, with params.yaml's
serving settings (NHLE_* in the environment win, as for the app):
- a head (request line and headers) over max_header_bytes is answered 431 and the connection
  closed as soon as that many bytes came without the blank line that ends it;
- a head must arrive whole within header_timeout_seconds of its first byte (else 408, closed);
- a connection with no request under way is closed after keep_alive_seconds, a new one included.
Bodies are bounded by the app (nhle_serving.payloads.BodyLimit: 413 and 408).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nhle_serving.settings import Settings

log = logging.getLogger("nhle_serving.http")
HEAD_END = b"\r\n\r\n"


@functools.lru_cache(maxsize=1)
def limits() -> Settings:
    """The settings the app also reads (once per process)."""
    return Settings.from_env()


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bounded request head, a head deadline and an idle timeout from
    the first byte of a connection's life."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        settings = limits()
        self.max_header_bytes = settings.max_header_bytes
        self.header_timeout = settings.header_timeout_seconds
        self.timeout_keep_alive = settings.keep_alive_seconds
        self.awaiting_head, self.head_bytes, self.head_tail = True, 0, b""
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # uvicorn arms its idle timer only after a first response: a silent client would stay.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        self.cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.awaiting_head and not self.head_fits(data):
            return self.refuse(
                431,
                "Request Header Fields Too Large",
                f"the request line and headers exceed {self.max_header_bytes} bytes",
            )
        if self.awaiting_head and self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.header_timeout, self.head_too_slow)
        super().data_received(data)

    def head_fits(self, data: bytes) -> bool:
        """Counts `data` into the head under way: False once the limit is passed without the
        head's end. Checked before parsing, so an oversized head is never buffered."""
        room = self.max_header_bytes - self.head_bytes
        if len(data) > room:
            return HEAD_END in self.head_tail + data[:room]
        self.head_bytes += len(data)
        self.head_tail = (self.head_tail + data)[-3:]
        return True

    def on_headers_complete(self) -> None:
        self.awaiting_head, self.head_bytes, self.head_tail = False, 0, b""
        self.cancel_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.awaiting_head = True  # what comes next on this connection is another request's head
        super().on_message_complete()

    def cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        if self.awaiting_head:
            self.refuse(
                408, "Request Timeout", f"the request line and headers did not arrive within {self.header_timeout:g} s"
            )

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answers `status` with `message` as text and closes the connection."""
        client = "{}:{}".format(*self.client) if self.client else "unknown client"
        log.warning("%s: %d, %s", client, status, message)
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
        )
        self.transport.close()


def __getattr__(name: str):
    """`Worker`, gunicorn's worker class for the nhle server (gunicorn -k nhle_serving.http.Worker):
    uvicorn with GuardedProtocol; the limits are the serving settings, not gunicorn's --keep-alive.
    Made on first use, so that only a gunicorn deployment needs gunicorn (pip install "nhle[gunicorn]")."""
    if name != "Worker":
        raise AttributeError(name)
    from uvicorn_worker import UvicornWorker  # noqa: PLC0415 - lazy: uvicorn-worker: optional extra nhle[gunicorn]

    globals()["Worker"] = type(
        "Worker",
        (UvicornWorker,),
        {"__doc__": __getattr__.__doc__, "CONFIG_KWARGS": {"loop": "auto", "http": GuardedProtocol}},
    )
    return globals()["Worker"]
