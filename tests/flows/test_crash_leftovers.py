"""What a killed run leaves behind: nothing outlives its process, and the next run marks the rest.
Real parts: `nhle run` as a process killed with SIGKILL, its temporary Prefect server, MLflow on
SQLite, the Prefect harness for the run after it."""

import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from flow_support import nhle_argv
from mlflow import MlflowClient

from nhle.adapters.ledger import new_owner
from nhle.cli import main
from nhle.core.config import load_params
from nhle.orchestration.steps import clean_up_after_dead_runs

NAME = "nhle-classifier"
PARAMS = {"train": {"epochs": 6}, "retrain_baseline": False, "forget": "3"}


def prefect_servers(prefect_home: Path) -> list[int]:
    """Live (not zombie) Prefect API server processes whose PREFECT_HOME is `prefect_home`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"prefect.server.api.server:create_app" not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"PREFECT_HOME={prefect_home}".encode() in environ and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_nhle_run_leaves_no_server_and_the_next_run_marks_its_leftovers(blank_project, tmp_path, monkeypatch):
    root = blank_project("killed", PARAMS)
    scratch, prefect_home = tmp_path / "tmp", tmp_path / "prefect-home"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(
        {
            "TMPDIR": str(scratch),
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen(
            nhle_argv(root, "run"),
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 240
    while not list(scratch.glob(f"nhle-train-{run.pid}-*")):  # trained; exporting and registering now
        if run.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"nhle run never reached its work folder:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    servers = prefect_servers(prefect_home)
    assert servers, "the run's temporary Prefect server was not found"
    run.send_signal(signal.SIGKILL)
    run.wait()

    deadline = time.monotonic() + 20
    while prefect_servers(prefect_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not prefect_servers(prefect_home), "the temporary Prefect server outlived the killed nhle run"

    client = MlflowClient()
    experiment = client.get_experiment_by_name("nhle")
    [left] = client.search_runs([experiment.experiment_id])
    assert left.info.status == "RUNNING" and left.data.tags["nhle.owner"].split(":")[1] == str(run.pid)
    assert list(scratch.glob(f"nhle-train-{run.pid}-*"))

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the next run's scratch space is the same
    assert main(["run", "--params", str(root / "params.yaml"), "--project-dir", str(root)]) == 0
    killed = client.get_run(left.info.run_id)
    assert killed.info.status == "KILLED" and "died while the run was RUNNING" in killed.data.tags["nhle.abandoned"]
    assert not list(scratch.glob("nhle-*")), "scratch folders were left behind"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"


def test_a_version_registered_by_a_dead_run_is_marked_abandoned(blank_project, dead_owner, caplog):
    root = blank_project("abandoned", PARAMS)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("nhle").experiment_id
    client.create_registered_model(NAME)
    runs = {
        what: client.create_run(experiment_id, tags={"nhle.owner": owner, **extra}).info.run_id
        for what, owner, extra in (
            ("dead", dead_owner, {}),
            ("alive", new_owner(), {}),
            ("dead-request", dead_owner, {"nhle.batch": "b1"}),
        )
    }
    versions = {
        what: client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id).version
        for what, run_id in runs.items()
    }

    left = clean_up_after_dead_runs(load_params(root / "params.yaml"), logging.getLogger("test"))
    assert [r["run_id"] for r in left["runs"]] == [runs["dead"]]
    assert f"MLflow run {runs['dead']} was left RUNNING" in caplog.text
    assert left["runs"][0]["abandoned_versions"] == [str(versions["dead"])]
    abandoned = client.get_model_version(NAME, versions["dead"])
    assert abandoned.tags["nhle.abandoned"] == "true"
    assert "**Abandoned:** run " in abandoned.description
    assert "died before its gates were judged" in abandoned.description
    assert client.get_run(runs["dead"]).info.status == "KILLED"
    # A live run, and a request run (its version is settled by the request path), are left alone.
    for what in ("alive", "dead-request"):
        assert client.get_run(runs[what]).info.status == "RUNNING"
        assert "nhle.abandoned" not in client.get_model_version(NAME, versions[what]).tags
