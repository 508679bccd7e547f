"""Fixtures of the serving tests: masked models exported to ONNX, throwaway MLflow registries,
and the server started as a real uvicorn process on a free loopback port.

    .venv/bin/python -m pytest -q tests/serving
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving_support import Registry, Server, masked, preprocessing

from nhle.core.export import export_onnx


@pytest.fixture(scope="session")
def models(trained):
    """The trained SmallCNN with class 3 masked, and with classes 3 and 5 masked."""
    return {(3,): masked(trained, [3]), (3, 5): masked(trained, [3, 5])}


@pytest.fixture(scope="session")
def onnx_files(models, digits, tmp_path_factory):
    """Each masked model as model.onnx with its preprocessing json beside it."""
    files = {}
    for classes, model in models.items():
        folder = tmp_path_factory.mktemp("onnx-" + "-".join(map(str, classes)))
        path = export_onnx(model, folder / "model.onnx", digits.image_shape)
        (folder / "model.preprocessing.json").write_text(json.dumps(preprocessing(digits, classes)))
        files[classes] = path
    return files


@pytest.fixture(scope="session")
def make_registry(tmp_path_factory, mlflow_template):
    def make(label: str) -> Registry:
        return Registry(tmp_path_factory.mktemp(label), mlflow_template)

    return make


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(project_dir, **settings) -> a Server waited on /healthz then /readyz.
    Settings are NHLE_* variables in lower case without the prefix (poll_seconds=0.5). Every
    server is stopped at the end of the session, whatever happened."""
    servers = []

    def start(project_dir: Path, ready: bool = True, **settings) -> Server:
        server = Server(Path(project_dir), tmp_path_factory.mktemp("server-log") / "server.log", **settings)
        servers.append(server)
        server.wait("/healthz")
        if ready:
            server.wait("/readyz")
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def champion_registry(make_registry, onnx_files, digits):
    """A registry whose champion (version 1) is the class-3-masked model; never changed."""
    registry = make_registry("champion-project")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    return registry


@pytest.fixture(scope="session")
def server(champion_registry, start_server):
    """The read-only server of most tests. Small limits, so the limit tests send little."""
    return start_server(
        champion_registry.root,
        max_instances=300,
        max_body_bytes=1024 * 1024,
        max_request_pixels=20_000_000,
        body_timeout_seconds=3,
    )
