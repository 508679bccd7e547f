"""Helpers of the serving tests (the fixtures are in conftest.py): masked models, throwaway
MLflow registries, and the server as a real uvicorn child process."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import mlflow.onnx
import onnx
import pytest
from mlflow import MlflowClient

from nhle.adapters import signing
from nhle.adapters.deletions import RECORD_TAG
from nhle.adapters.processes import free_port, stop_process
from nhle.adapters.signing import create_key_pair
from nhle.bench.serving import uvicorn_command
from nhle.core.export import preprocessing as metadata
from nhle.core.models import build_model
from nhle.core.unlearning import apply_class_weight_mask

REPO = Path(__file__).resolve().parents[2]
NAME = "nhle-classifier"
ADMIN_TOKEN = "test-admin-token-of-at-least-32-characters"
# No telemetry and no progress bars in the server process either.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def preprocessing(digits, forgotten) -> dict:
    """The metadata a real version carries (nhle.core.export.preprocessing, what the export flow
    logs as preprocessing.json), saying that `forgotten` is masked (true or not: some tests lie)."""
    model = masked(build_model("smallcnn", *digits.image_shape[:1], digits.num_classes), forgotten)
    return metadata(model, digits.image_shape, digits.class_names)


def masked(model, classes):
    model = copy.deepcopy(model).cpu().eval()
    apply_class_weight_mask(model, classes)
    return model


class Registry:
    """A project folder with its own MLflow SQLite store (copied from the migrated template)."""

    def __init__(self, root: Path, template: Path):
        self.root = root
        shutil.copy(template, root / "mlflow.db")
        (root / "params.yaml").write_text("tracking:\n  tracking_uri: sqlite:///mlflow.db\n")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

        # The project's key pair, where nhle makes it: the server finds the public one by default.
        self.signing_key = root / "keys" / "nhle-signing.key"
        create_key_pair(self.signing_key, root / "keys" / "nhle-signing.pub")
        with self.current():
            self.experiment_id = mlflow.create_experiment("nhle", artifact_location=str(root / "mlartifacts"))

    @contextlib.contextmanager
    def current(self):
        """MLflow's fluent API pointed at this store, and put back afterwards: set_tracking_uri
        also sets MLFLOW_TRACKING_URI, which would otherwise leak into every later test."""
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)

    def client(self):
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def register(
        self,
        onnx_model,
        metadata: dict,
        champion: bool = True,
        corrupt: bool = False,
        gates_passed: bool = True,
        tamper_with: Path | None = None,
        sign: bool = True,
    ) -> str:
        """Log `onnx_model` (a path or ModelProto) as a new version, tag it as nhle does (forgotten
        classes, the stored file's sha256, its gates) and (by default) point `champion` at it.
        `corrupt` overwrites the stored model.onnx with garbage bytes (the sha256 tag is theirs:
        an export that went wrong, not a file changed afterwards). `tamper_with` replaces the
        stored file by another one after it was registered, tagged and signed; `sign` False leaves
        the version unsigned."""
        proto = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
        with self.current():
            with mlflow.start_run(experiment_id=self.experiment_id):
                mlflow.log_dict(metadata, "preprocessing.json")
                info = mlflow.onnx.log_model(
                    proto,
                    name="model",
                    registered_model_name=NAME,
                    metadata=metadata,
                    save_as_external_data=False,
                    pip_requirements=["onnx", "onnxruntime"],
                )
            location = mlflow.get_logged_model(info.model_id).artifact_location
        version = str(info.registered_model_version)
        if corrupt:
            Path(location.removeprefix("file://"), "model.onnx").write_bytes(b"this is not an onnx model")
        client = self.client()
        stored = Path(location.removeprefix("file://"), "model.onnx")
        gates = [{"name": "test_acc", "value": 1.0, "bound": 0.9, "passed": gates_passed, "rule": ">="}]
        for key, value in {
            "forgotten_classes": json.dumps(metadata["forgotten_classes"]),
            "onnx_sha256": hashlib.sha256(stored.read_bytes()).hexdigest(),
            "gates": json.dumps(gates),
        }.items():
            client.set_model_version_tag(NAME, version, key, value)

        if RECORD_TAG not in (client.get_registered_model(NAME).tags or {}):  # nhle's promotions keep one
            client.set_registered_model_tag(NAME, RECORD_TAG, "{}")
        if sign:  # as nhle's promote does: the stored file and its evidence, signed, in the version's run
            doc = signing.evidence(
                NAME,
                version,
                hashlib.sha256(stored.read_bytes()).hexdigest(),
                metadata,
                metadata["forgotten_classes"],
                gates,
            )
            evidence_bytes, signature = signing.sign_version(stored, doc, self.signing_key)
            run_id = client.get_model_version(NAME, version).run_id
            client.log_text(run_id, evidence_bytes.decode(), f"{signing.ARTIFACT_DIR}/{signing.EVIDENCE}")
            client.log_text(run_id, signature.decode(), f"{signing.ARTIFACT_DIR}/{signing.SIGNATURE}")
        if tamper_with is not None:
            stored.write_bytes(Path(tamper_with).read_bytes())
        if champion:
            client.set_registered_model_alias(NAME, "champion", version)
        return version


class Server:
    """`uvicorn nhle_serving.server:create_app --factory` as a child process, talked to over HTTP."""

    def __init__(self, project_dir: Path, log_path: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = env = self.environment(project_dir, **settings)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            uvicorn_command(self.port),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=project_dir,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @staticmethod
    def environment(project_dir: Path, **settings) -> dict:
        """This process's environment without NHLE_* and MLflow's URI, plus the project's and
        `settings` as NHLE_* variables (max_body_bytes=1024 -> NHLE_MAX_BODY_BYTES=1024)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NHLE_") and k != "MLFLOW_TRACKING_URI"}
        env.update(QUIET_ENV)
        env.update(
            {
                "NHLE_PROJECT_DIR": str(project_dir),
                "NHLE_PARAMS": str(Path(project_dir) / "params.yaml"),
                "NHLE_ADMIN_TOKEN": ADMIN_TOKEN,
            }
        )
        env.update({f"NHLE_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def wait(self, path: str = "/readyz", timeout: float = 60.0):
        """Wait until `path` answers 200; fail with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get(path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not answering 200 on {path} after {timeout} s:\n{self.log()}")

    def wait_for(self, condition, what: str, timeout: float = 30.0) -> dict:
        """/model once condition(it) holds; fail with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            described = self.http.get("/model").json()
            if condition(described):
                return described
            time.sleep(0.2)
        pytest.fail(f"server never showed {what}: {described}\n{self.log()}")

    def wait_for_503(self, text: str, timeout: float = 30.0) -> str:
        """/readyz's reason once it is a 503 whose reason holds `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.http.get("/readyz")
            if ready.status_code == 503 and text in ready.json().get("reason", ""):
                return ready.json()["reason"]
            time.sleep(0.2)
        pytest.fail(f"/readyz never said {text!r}: {ready.status_code} {ready.text}\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self):
        self.http.close()
        stop_process(self.proc)
        self._log.close()
