"""Forget requests end to end: a real ledger file, the Prefect harness, the MLflow registry, DVC, and
a processing run killed with SIGKILL in a real subprocess. One project is built up test by test."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import prefect.settings
import pytest
import yaml
from flow_support import nhle_argv
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint

from nhle.adapters.ledger import Ledger
from nhle.adapters.tracking import configure, runs_tagged
from nhle.adapters.versioning import DataVersion, open_dataset_version
from nhle.cli import main
from nhle.core.config import load_params
from nhle.core.data import load_digits

REPO = Path(__file__).resolve().parents[2]
NAME = "nhle-classifier"
PARAMS = {"train": {"epochs": 6}, "retrain_baseline": True, "forget": "3"}


@pytest.fixture(scope="module")
def project(new_project):
    """`nhle run`: base model (version 1), then class 3 forgotten (version 2, champion)."""
    return new_project("requests-project", PARAMS)


def cli(root: Path, *args: str) -> int:
    return main([*args, "--params", str(root / "params.yaml"), "--project-dir", str(root)])


def submit(root, classes, requester="dpo@example.com", reason="erasure request") -> int:
    return cli(root, "request", "submit", "--classes", classes, "--requester", requester, "--reason", reason)


def ledger(root):
    return Ledger(f"sqlite:///{root / 'requests.db'}")


def registry_state(root):
    configure(load_params(root / "params.yaml"), root)
    client = MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    champion = client.get_model_version_by_alias(NAME, "champion")
    return versions, champion


def data_head(root) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root / "data-repo", capture_output=True, text=True, check=True
    ).stdout.strip()


def champion_predictions(champion) -> np.ndarray:
    path = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{champion.version}")
    session = ort.InferenceSession(str(Path(path) / "model.onnx"), providers=["CPUExecutionProvider"])
    images = load_digits(seed=0).test.float_images().numpy()
    return session.run(None, {"images": images})[0].argmax(1)


def test_invalid_requests_are_rejected_recorded_and_change_nothing(project, capsys):
    before = (registry_state(project), data_head(project))
    cases = {
        "42": "out of range",
        "3": "already forgotten",
        "cat": "unknown class",
        "0,1,2,4,5,6,7,8,9": "would leave no class to predict",
    }
    for classes, message in cases.items():
        assert submit(project, classes) == 2
        assert message in capsys.readouterr().err
    run_row, *rows = ledger(project).list()  # the first: class 3, forgotten by `nhle run`, on record
    assert (run_row.status, run_row.classes, run_row.model_version_after) == ("done", [3], "2")
    assert [r.status for r in rows] == ["rejected"] * len(cases)
    assert all(r.error and r.model_version_before == "2" for r in rows)
    assert (registry_state(project), data_head(project)) == before
    assert cli(project, "request", "process") == 0  # nothing pending: no new version
    assert registry_state(project) == before[0]


def test_requests_processed_in_sequence_leave_every_class_forgotten(project, capsys):
    assert submit(project, "5", reason="first request") == 0
    assert cli(project, "request", "process") == 0
    assert submit(project, "7", reason="second request") == 0
    assert cli(project, "request", "process") == 0
    _, first, second = ledger(project).list("done")

    assert (first.model_version_before, first.model_version_after) == ("2", "3")
    assert (second.model_version_before, second.model_version_after) == ("3", "4")
    versions, champion = registry_state(project)
    assert versions == [1, 2, 3, 4] and str(champion.version) == "4"
    assert json.loads(champion.tags["forgotten_classes"]) == [3, 5, 7]
    assert not np.isin(champion_predictions(champion), [3, 5, 7]).any()
    # data deletion: the data version after each request lacks every forgotten class's samples
    for request, gone in ((first, [3, 5]), (second, [3, 5, 7])):
        after = DataVersion(**{**request.data_version_after, "remote": str(project / "dvc-remote")})
        labels = np.concatenate([open_dataset_version(after).train.labels, open_dataset_version(after).test.labels])
        assert not np.isin(labels, gone).any() and len(np.unique(labels)) == 10 - len(gone)
        assert champion.tags["data_after.md5"] == second.data_version_after["md5"]
    # the audit report: linked from the version, shown by `nhle request show`
    capsys.readouterr()
    assert cli(project, "request", "show", str(second.id)) == 0
    shown = capsys.readouterr().out
    assert "Forget request" in shown and "**Outcome: done**" in shown and "unmasked_forget_test_acc" in shown
    assert champion.tags[f"audit.request.{second.id}"] == second.report_uri

    audit = mlflow.artifacts.load_dict(second.report_uri.replace(".md", ".json"))
    assert audit["model"]["version_after"] == "4" and audit["model"]["version_before"] == "3"
    assert set(audit["metrics"]) == {"original", "unlearned", "retrained"}
    assert audit["data"]["before"]["md5"] == first.data_version_after["md5"]
    assert {g["name"] for g in audit["gates"]} >= {
        "forget_test_acc",
        "unmasked_forget_test_acc",
        "parity_max_abs_prob_diff",
    }


def test_pending_requests_are_unlearned_together_in_one_version(project):
    before, _ = registry_state(project)
    assert submit(project, "1", requester="alice") == 0
    assert submit(project, "8", requester="bob") == 0
    assert cli(project, "request", "process") == 0
    one, eight = ledger(project).list()[-2:]
    assert one.status == eight.status == "done" and one.model_version_after == eight.model_version_after
    versions, champion = registry_state(project)
    assert versions == before + [before[-1] + 1] and str(champion.version) == one.model_version_after
    assert json.loads(champion.tags["forgotten_classes"]) == [1, 3, 5, 7, 8]
    assert champion.tags["nhle.request_ids"] == f"{one.id},{eight.id}"


def read_lines(stream, lines: list, seen: threading.Event, marker: str):
    for line in iter(stream.readline, ""):
        lines.append(line)
        if marker in line:
            seen.set()


def test_run_killed_mid_unlearning_is_finished_by_the_next_run(project):
    """SIGKILL in the middle of unlearning: nothing moves, nothing is lost; the next run
    completes the request with one new version."""
    slow = yaml.safe_load((project / "params.yaml").read_text())
    # unlearns for hours: no stop, and no drift check to step back and end it
    slow["unlearn"] = {"stop_forget_prob": 0.0, "max_steps": 10_000_000, "max_drift": 0.0}
    (project / "slow.yaml").write_text(yaml.safe_dump(slow))
    assert submit(project, "2", reason="killed mid-way") == 0
    request = ledger(project).list("pending")[0]
    versions, champion = registry_state(project)
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    process = subprocess.Popen(
        nhle_argv(project, "request", "process", params="slow.yaml"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, seen = [], threading.Event()
    threading.Thread(
        target=read_lines, args=(process.stdout, lines, seen, "NHLE unlearning classes [2]"), daemon=True
    ).start()
    try:
        assert seen.wait(240), "".join(lines)
        time.sleep(2)
        held = ledger(project).get(request.id)
        assert held.status == "processing" and held.claimed_by.split(":")[1] == str(process.pid)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert registry_state(project) == (versions, champion)  # no version, no alias moved
    assert ledger(project).get(request.id).status == "processing"  # still owned by the dead run

    assert [run.info.status for run in runs_tagged("nhle.batch", held.batch)] == ["RUNNING"]  # as it was killed
    assert cli(project, "request", "process") == 0
    done = ledger(project).get(request.id)
    assert done.status == "done" and done.model_version_before == str(champion.version)
    after_versions, after_champion = registry_state(project)
    assert after_versions == versions + [versions[-1] + 1] and str(after_champion.version) == done.model_version_after
    assert 2 in json.loads(after_champion.tags["forgotten_classes"])
    killed = runs_tagged("nhle.batch", held.batch)
    assert [run.info.status for run in killed] == ["FAILED"]  # the dead run's MLflow run is closed


# Prepended to the CLI in the killed process: the point where it SIGKILLs itself.
KILLED_AFTER_REGISTRATION = """
import mlflow
registered = mlflow.register_model
def register_then_die(*args, **kwargs):
    version = registered(*args, **kwargs)
    print(f"registered version {version.version}: SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
mlflow.register_model = register_then_die
"""
KILLED_AFTER_PROMOTION = """
from nhle.orchestration import steps
def die(*args):
    print("promoted: SIGKILL before the evidence", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
steps.evidence_work = die
"""


def process_killed(project: Path, killing: str, says: str) -> None:
    """`nhle request process` in a real process that SIGKILLs itself where `killing` says."""
    script = f"import os, signal, sys\n{killing}\nfrom nhle.cli.commands import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "request",
            "process",
            "--params",
            str(project / "params.yaml"),
            "--project-dir",
            str(project),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL and says in killed.stdout, killed.stdout + killed.stderr


def test_a_version_registered_by_a_killed_run_is_promoted_not_made_again(project):
    """SIGKILL right after "Created version N": the version is born with its tags (the batch,
    the request ids), so the next run finds it and settles it from its logged evidence (gates,
    data deletion, promotion) instead of unlearning again, and removes the dead run's scratch."""
    assert submit(project, "4", reason="registered then killed") == 0
    request = ledger(project).list("pending")[0]
    versions, champion = registry_state(project)
    process_killed(project, KILLED_AFTER_REGISTRATION, "registered version")
    registered = str(versions[-1] + 1)
    after_kill, champion_after_kill = registry_state(project)
    assert after_kill == versions + [int(registered)] and champion_after_kill.version == champion.version

    born_with = MlflowClient().get_model_version(NAME, registered).tags
    held = ledger(project).get(request.id)
    assert held.status == "processing" and born_with["nhle.batch"] == held.batch
    assert born_with["nhle.request_ids"] == str(request.id) and "gates" not in born_with
    pid = held.claimed_by.split(":")[1]
    assert list(Path(tempfile.gettempdir()).glob(f"nhle-*-{pid}-*")), "the killed run left no scratch to test"

    assert cli(project, "request", "process") == 0  # same host: the claimant's process is gone
    done = ledger(project).get(request.id)
    assert done.status == "done" and done.model_version_after == registered
    after_versions, after_champion = registry_state(project)
    assert after_versions == after_kill and str(after_champion.version) == registered  # no second version
    assert "data_after.md5" in after_champion.tags
    assert not list(Path(tempfile.gettempdir()).glob(f"nhle-*-{pid}-*"))


def test_a_retrain_after_requests_cannot_relearn_the_deleted_classes(project):
    """train_base from the embedded source honours the deletions on record in the data repo: it
    trains without those classes' samples, on the same DVC version, and masks them."""
    _, before = registry_state(project)
    forgotten = json.loads(before.tags["forgotten_classes"])
    assert len(forgotten) >= 5
    train_base = load_flow_from_entrypoint("nhle_flows.pipeline:train_base")
    result = train_base(project_dir=str(project))
    assert result.promoted is True and result.data_version == before.tags["data_after.md5"]
    _, champion = registry_state(project)
    assert str(champion.version) == result.version and champion.tags["parent_version"] == ""
    assert json.loads(champion.tags["forgotten_classes"]) == forgotten
    assert not np.isin(champion_predictions(champion), forgotten).any()


def test_schedule_serves_a_cron_deployment_limited_to_one_run(project):
    """`nhle schedule` in a real process: the deployment carries params.yaml's cron and a limit
    of one concurrent run, and a run of it processes the pending requests."""
    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["requests"] = {"cron": "17 3 * * *", "timezone": "Europe/Paris", "deployment": "nightly"}
    (project / "schedule.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    server = subprocess.Popen(
        nhle_argv(project, "schedule", params="schedule.yaml"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, seen = [], threading.Event()
    threading.Thread(target=read_lines, args=(server.stdout, lines, seen, "nightly"), daemon=True).start()
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("process-forget-requests/nightly")
                    break
                except Exception:
                    assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
                    time.sleep(1)
        schedule = deployment.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("17 3 * * *", "Europe/Paris")
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert submit(project, "6", reason="scheduled") == 0
        run = run_deployment("process-forget-requests/nightly", timeout=300)
        assert run.state.is_completed(), "".join(lines)
    finally:
        server.terminate()
        server.wait(timeout=60)
    request = ledger(project).list()[-1]
    assert request.class_names == ["6"] and request.status == "done"


def test_a_run_killed_between_promotion_and_evidence_leaves_a_version_the_next_run_completes(new_project):
    """The retrained reference, the plots and the data deletion come after the promotion (no gate
    reads them). SIGKILL right after the promotion: the new version is champion with its evidence
    pending; the next run completes it (the retrained model's metrics in report.json, the plots,
    the DVC version without the class, the version's tag and the audit report) before it closes
    the request. A project of its own: the shared one has few classes left."""
    project = new_project("evidence-project", PARAMS)
    assert submit(project, "9", reason="killed before the evidence") == 0
    request = ledger(project).list("pending")[0]
    versions, _ = registry_state(project)
    process_killed(project, KILLED_AFTER_PROMOTION, "promoted: SIGKILL")
    after_kill, champion = registry_state(project)
    assert after_kill == versions + [versions[-1] + 1] and str(champion.version) == str(after_kill[-1])  # served
    assert champion.tags["evidence"] == "pending" and ledger(project).get(request.id).status == "processing"
    pending = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/report.json")
    assert pending["reference"]["kind"] == "pending" and "retrained" not in pending["metrics"]
    assert "data_after.md5" not in champion.tags
    assert not MlflowClient().list_artifacts(champion.run_id, "plots")

    assert cli(project, "request", "process") == 0
    done = ledger(project).get(request.id)
    assert done.status == "done" and done.model_version_after == str(champion.version)
    completed = MlflowClient().get_model_version(NAME, champion.version).tags
    assert completed["evidence"] == "complete" and "data_after.md5" in completed
    assert done.data_version_after["md5"] == completed["data_after.md5"]
    assert {Path(f.path).name for f in MlflowClient().list_artifacts(champion.run_id, "plots")} == {
        "per_class_accuracy.png",
        "confusion_matrix.png",
        "feature_projection.png",
    }
    report = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/report.json")
    assert report["reference"]["kind"] == "retrained" and "retrained" in report["metrics"]
    audit = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/audit/request-{request.id}.json")
    assert audit["reference"]["kind"] == "retrained" and "retrained" in audit["metrics"]
    assert registry_state(project)[0] == after_kill  # nothing made again
