"""Server mode for real: `mlflow server` (SQLite backend, artifacts served over HTTP), `prefect
server start`, a process work pool and `prefect worker start`, all on loopback as child
processes. `nhle deploy` registers the flows; the worker trains the base model and then processes
a forget request from the ledger; the ONNX Runtime server loads the champion from the MLflow
server and never answers the forgotten class. Only params.yaml and environment variables differ
from the embedded set-up."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from nhle.adapters.ledger import Ledger
from nhle.adapters.processes import free_port, stop_process
from nhle.cli.commands import QUIET_DEFAULTS
from nhle.core.data import load_digits

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "nhle-test-pool"
QUIET = {**QUIET_DEFAULTS, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class Process:
    """A child process with its output in a log file; `wait_http` polls a URL until it answers 200."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path, logs: Path):
        self.name, self.log_path = name, logs / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_http(self, url: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.name} not answering on {url} after {timeout} s:\n{self.log()}")

    def stop(self):
        if self.name == "prefect-worker" and self.proc.poll() is None:
            # A worker's first SIGTERM only stops it taking runs, and it did not exit in 15 s with
            # none running; Prefect's documented second SIGTERM makes it kill itself.
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            self.proc.terminate()
        stop_process(self.proc)
        self._log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Both servers, a work pool, a project pointing at them, and one worker."""
    root = tmp_path_factory.mktemp("server-mode")
    logs = root / "logs"
    logs.mkdir()
    mlflow_url, prefect_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "NHLE_"))}
    env.update(QUIET, PREFECT_HOME=str(root / "prefect-home"), PREFECT_API_URL=f"{prefect_url}/api")
    started = []
    try:
        mlflow = Process(
            "mlflow-server",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow-server.db'}",
                "--artifacts-destination",
                str(root / "mlflow-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                mlflow_url.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            env,
            root,
            logs,
        )
        started.append(mlflow)
        server_env = {
            **env,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_UI_ENABLED": "false",
        }
        prefect = Process(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", prefect_url.rsplit(":", 1)[1]],
            server_env,
            root,
            logs,
        )
        started.append(prefect)
        mlflow.wait_http(f"{mlflow_url}/health")
        prefect.wait_http(f"{prefect_url}/api/health")

        project = root / "project"
        project.mkdir()
        for folder in ("flows", "serving"):  # the checkout the worker and the server run from
            (project / folder).symlink_to(REPO / folder)
        (project / "params.yaml").write_text(
            yaml.safe_dump(
                {
                    "train": {"epochs": 6},
                    "tracking": {"tracking_uri": mlflow_url},
                    "requests": {"cron": "17 3 * * *", "timezone": "Europe/Paris"},
                }
            )
        )
        run(["prefect", "work-pool", "create", POOL, "--type", "process"], env, project)
        worker = Process(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"],
            env,
            project,
            logs,
        )
        started.append(worker)
        yield {
            "root": root,
            "project": project,
            "env": env,
            "mlflow_url": mlflow_url,
            "prefect_url": prefect_url,
            "processes": {p.name: p for p in started},
        }
    finally:
        for process in reversed(started):
            process.stop()


def run(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> str:
    """A command line (prefect or nhle from this environment); fails the test with its output."""
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def run_deployment(stack, name: str) -> dict:
    """`prefect deployment run NAME --watch`, then the flow run as the Prefect API reports it."""
    out = run(
        ["prefect", "deployment", "run", name, "--watch", "--watch-timeout", "600"],
        stack["env"],
        stack["project"],
        timeout=660,
    )
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    flow_run = httpx.get(f"{stack['prefect_url']}/api/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run["state"]["type"] == "COMPLETED", (out, stack["processes"]["prefect-worker"].log())
    return flow_run


def test_deploy_names_what_is_missing(stack):
    def deploy(env, pool):
        return subprocess.run(
            [str(BIN / "nhle"), "deploy", "--pool", pool],
            env=env,
            cwd=stack["project"],
            capture_output=True,
            text=True,
            timeout=300,
        )

    no_server = deploy({k: v for k, v in stack["env"].items() if k != "PREFECT_API_URL"}, POOL)
    assert no_server.returncode == 2 and "set PREFECT_API_URL" in no_server.stderr
    no_pool = deploy(stack["env"], "no-such-pool")
    assert no_pool.returncode == 2 and "no-such-pool" in no_pool.stderr, no_pool.stderr
    assert httpx.post(f"{stack['prefect_url']}/api/deployments/filter", json={}, timeout=10).json() == []


def test_deploy_registers_the_flows_for_the_work_pool(stack):
    out = run(["nhle", "deploy", "--pool", POOL], stack["env"], stack["project"])
    assert "deployed process-forget-requests/forget-requests" in out
    deployments = httpx.post(f"{stack['prefect_url']}/api/deployments/filter", json={}, timeout=10).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {"train-base", "forget", "forget-requests"}
    assert all(d["work_pool_name"] == POOL for d in deployments)
    requests = by_name["forget-requests"]
    assert requests["schedules"][0]["schedule"]["cron"] == "17 3 * * *"
    assert requests["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
    assert requests["global_concurrency_limit"]["limit"] == 1
    assert requests["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    # The project's own params.yaml is read at each run, not frozen into the deployment.
    assert requests["parameters"] == {"project_dir": str(stack["project"])}


def test_worker_runs_a_forget_request_against_the_mlflow_server(stack, tmp_path):
    project, env = stack["project"], stack["env"]
    run_deployment(stack, "train-base/train-base")
    run(
        [
            "nhle",
            "request",
            "submit",
            "--classes",
            "5",
            "--requester",
            "dpo@example.com",
            "--reason",
            "server-mode test",
        ],
        env,
        project,
    )
    flow_run = run_deployment(stack, "process-forget-requests/forget-requests")
    assert flow_run["deployment_id"] and flow_run["work_pool_name"] == POOL

    (request,) = Ledger(f"sqlite:///{project / 'requests.db'}").list()
    assert request.status == "done", request.error

    # Everything went through the MLflow server: runs, registry and artifacts (served over HTTP).
    client = MlflowClient(tracking_uri=stack["mlflow_url"], registry_uri=stack["mlflow_url"])
    champion = client.get_model_version_by_alias("nhle-classifier", "champion")
    assert str(champion.version) == "2" and str(request.model_version_after) == "2"
    run_info = client.get_run(champion.run_id).info
    assert run_info.artifact_uri.startswith("mlflow-artifacts:/")
    assert any(a.path == "report.json" for a in client.list_artifacts(champion.run_id))
    assert any((stack["root"] / "mlflow-artifacts").rglob("model.onnx"))
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()

    # The ONNX Runtime server follows the champion on the MLflow server and never answers class 5.

    port = free_port()
    server = Process(
        "nhle-serve", [str(BIN / "nhle"), "serve", "--port", str(port)], env, project, stack["root"] / "logs"
    )
    try:
        server.wait_http(f"http://127.0.0.1:{port}/readyz")
        images = load_digits(seed=0).test.float_images().squeeze(1).numpy()
        predicted = []
        for start in range(0, len(images), 150):
            response = httpx.post(
                f"http://127.0.0.1:{port}/predict",
                timeout=60,
                json={"instances": images[start : start + 150].tolist(), "top_k": 1},
            )
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "2"
            predicted += [p["top_k"][0]["index"] for p in response.json()["predictions"]]
        predicted = np.array(predicted)
        # A CPU machine with onnxruntime-gpu: the CPU provider, chosen without a failed CUDA load.
        assert httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()["providers"] == ["CPUExecutionProvider"]
        assert "Failed to" not in server.log() and "provider_bridge" not in server.log()
        assert 5 not in predicted and len(np.unique(predicted)) == 9
    finally:
        server.stop()
