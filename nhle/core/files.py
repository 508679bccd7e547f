"""Files written whole or not at all: a crash mid-write never leaves half a checkpoint, dataset
or report behind.

    from nhle.core.files import atomic_write, write_json
    write_json("out/report.json", report)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# The evidence files' names: in the CLI's output folders and in each version's MLflow run alike.
REPORT = "report.json"
"""A forget's report (nhle.core.experiment.forget_and_measure): every metric, the relearn shares."""
PARITY = "parity.json"
"""ONNX Runtime against PyTorch (nhle.core.export.check_parity)."""
GATES = "gates.json"
"""Each gate with its value, bound and result (nhle.core.gates)."""
ATTEMPTS = "attempts.json"
"""A forget's unlearning attempts, one per recipe tried."""
NOTIFIED = "notified_servers.json"
"""What each server answered when told of a promotion."""
STEP_SECONDS = "step_seconds.json"
"""A flow's time breakdown, step by step."""


def as_tag(value) -> str:
    """A tag's text (MLflow tags are strings): a str as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def from_tag(tags: dict, key: str, default=None):
    """The JSON value as_tag wrote under `key` in `tags`; `default` when the tag is missing or empty."""
    text = tags.get(key)
    return json.loads(text) if text else default


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file beside path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload) -> Path:
    """Pretty JSON written atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))
    return path
