import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from flow_support import nhle_argv

from nhle.adapters.processes import free_port, stop_process
from nhle.adapters.tracking import configure
from nhle.cli import main
from nhle.core.config import load_params

REPO = Path(__file__).resolve().parents[2]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@pytest.fixture(scope="module")
def blank_project(tmp_path_factory, prefect_harness, mlflow_template):
    """Make a project folder with `params` (the checkout's flows/ and serving/ linked in, an empty
    MLflow store) and point MLflow at it; returns the folder."""

    def make(name: str, params: dict) -> Path:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        root = tmp_path_factory.mktemp(name)
        shutil.copy(mlflow_template, root / "mlflow.db")
        for folder in ("flows", "serving"):
            (root / folder).symlink_to(REPO / folder)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        configure(load_params(root / "params.yaml"), root)
        return root

    return make


@pytest.fixture(scope="module")
def new_project(blank_project):
    """A blank project in which `nhle run` has run (base model, then the forget flow for params'
    `forget` class), MLflow pointed at it; returns the folder."""

    def make(name: str, params: dict) -> Path:
        root = blank_project(name, params)
        assert main(["run", "--params", str(root / "params.yaml"), "--project-dir", str(root)]) == 0
        configure(load_params(root / "params.yaml"), root)
        return root

    return make


@contextlib.contextmanager
def nhle_serve(root: Path, timeout: float = 90.0, args: tuple[str, ...] = (), ready: bool = True, **environ: str):
    """`nhle serve` of the project as a real process on a free loopback port, once /readyz (or,
    ready=False, /healthz) answers; yields an httpx client on it. `environ`: NHLE_* settings for
    the server only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHLE_") and k != "MLFLOW_TRACKING_URI"}
    log_path = root / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*nhle_argv(root, "serve"), "--port", str(port), *args],
            env={**env, **QUIET, **environ},
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nhle serve not ready:\n{log_path.read_text(errors='replace')[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz" if ready else "/healthz", timeout=2).status_code == 200:
                        break
                time.sleep(0.3)
            yield client
        finally:
            client.close()
            stop_process(process)


@pytest.fixture
def serve():
    """serve(root) -> the nhle_serve context manager (a real `nhle serve` process)."""
    return nhle_serve
