"""Telling the running servers that something changed: POST /admin/reload with the admin token.

    from nhle.adapters.servers import notify_servers
    told = notify_servers(params.serving.notify, version="7")   # after a promotion
    told = notify_servers(params.serving.notify)                # a request accepted or withdrawn

A server that cannot be told is reported, never an error: it still finds the change at its poll.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import httpx


def notify_servers(urls, version: str | None = None, timeout: float = 120.0) -> list[dict]:
    """Tell each running server to read the registry and the ledger now (POST /admin/reload):
    the champion moved to `version`, or a forget request was accepted or withdrawn (None).
    Returns, per server, its outcome, what it serves and suppresses, when it answered (`at`, UTC)
    and the seconds it took. A server that cannot be told is reported, never an error: it still
    finds the change at its poll."""
    token = os.environ.get("NHLE_ADMIN_TOKEN")
    results = []
    for url in urls:
        started = time.perf_counter()
        entry = {"url": url}
        try:
            if not token:
                raise RuntimeError("NHLE_ADMIN_TOKEN is not set in the flow's environment")
            response = httpx.post(
                f"{url.rstrip('/')}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=timeout
            )
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {body.get('detail', response.text[:200])}")
            entry.update(
                outcome=body.get("outcome"),
                serving_version=body.get("serving_version"),
                suppressed_classes=body.get("suppressed_classes"),
            )
        except Exception as err:  # noqa: BLE001 - any failure to tell a server is only reported
            entry.update(outcome="not_told", error=f"{type(err).__name__}: {err}")
        if version is not None:
            entry["serving_new_version"] = str(entry.get("serving_version")) == version
        entry["seconds"] = round(time.perf_counter() - started, 3)
        entry["at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        results.append(entry)
    return results


__all__ = ["notify_servers"]
