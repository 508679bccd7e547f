"""A class deleted under a completed forget request stays deleted: `nhle rollback`, a hand move
of the champion alias and a new base model cannot bring it back, and the running server refuses
a champion that predicts it, until an operator reopens the request on record. Real parts: the
Prefect harness, MLflow on SQLite, the ledger file, DVC, `nhle serve` as a process over HTTP."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from nhle.adapters.deletions import RECORD_TAG
from nhle.adapters.ledger import Ledger
from nhle.adapters.processes import free_port
from nhle.cli import main
from nhle.core.models import build_network

NAME = "nhle-classifier"
# The imported model below is an untrained network: no accuracy floor, only the forgetting gates.
PARAMS = {
    "train": {"epochs": 6},
    "retrain_baseline": False,
    "forget": "3",
    "serving": {"poll_seconds": 0.5},
    "gates": {"min_retain_test_acc": 0.0},
}


def cli(root: Path, *args: str) -> int:
    return main([*args, "--params", str(root / "params.yaml"), "--project-dir", str(root)])


def submit(root: Path, classes: str, reason: str) -> int:
    """`nhle request submit` of the data protection officer, in this process."""
    return cli(root, "request", "submit", "--classes", classes, "--requester", "dpo@example.com", "--reason", reason)


def client():
    return MlflowClient()


def champion_version() -> str:
    return str(client().get_model_version_by_alias(NAME, "champion").version)


def wait_for(http, condition, what: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = http.get("/model").json()
        if condition(described):
            return described
        time.sleep(0.3)
    pytest.fail(f"server never showed {what}: {described}")


def predictions(http, images) -> np.ndarray:
    response = http.post("/predict", json={"instances": images.tolist(), "top_k": 9})
    assert response.status_code == 200, response.text
    return [[row["index"] for row in p["top_k"]] for p in response.json()["predictions"]]


@pytest.fixture(scope="module")
def project(new_project):
    """Version 1 (base), 2 (forgot 3, `nhle run`: on record as ledger row 1), 3 (forgot 3 and 5
    under request 2, done)."""
    root = new_project("stays-forgotten", PARAMS)
    assert submit(root, "5", "erasure request 1142") == 0
    assert cli(root, "request", "process") == 0
    assert champion_version() == "3"
    return root


def test_rollback_and_a_hand_moved_alias_never_serve_a_deleted_class(project, serve, digits, capsys):
    images = digits.test.float_images()[(digits.test.labels == 5).numpy()][:40].numpy()
    with serve(project) as http:
        wait_for(http, lambda d: d.get("version") == "3", "version 3")
        capsys.readouterr()
        assert cli(project, "rollback") == 2  # version 2 predicts 5, deleted under request 2
        err = capsys.readouterr().err
        assert "predicts class(es) [5], deleted on record by forget request(s) [2]" in err and "--reopen 2" in err
        assert champion_version() == "3"

        client().set_registered_model_alias(NAME, "champion", "2")  # by hand, as another tool would
        described = wait_for(http, lambda d: (d.get("refused") or {}).get("version") == "2", "version 2 refused")
        assert (
            described["version"] == "3"
            and "deleted on record by forget request(s) [2]" in described["refused"]["reason"]
        )
        ready = http.get("/readyz").json()
        assert (
            ready["version"] == "3" and ready["refused_version"] == "2" and "predicts class(es) [5]" in ready["warning"]
        )
        assert not any(5 in top for top in predictions(http, images))
        client().set_registered_model_alias(NAME, "champion", "3")


def test_the_version_page_carries_the_evidence(project):
    """The MLflow model version page (its description) says what was forgotten, from which
    version, each gate's verdict, and where the report and the audit report are."""
    version = client().get_model_version(NAME, "3")
    text = version.description
    assert text.startswith("**Never predicts:** 3, 5 (made from version 2).")
    assert "**Promoted:** every gate held." in text
    assert (
        "| deleted_classes_predicted | 0 | <= 0 | pass |" in text and "| retained_classes | 8 | >= 2 | pass |" in text
    )
    run = f"#/experiments/{client().get_run(version.run_id).info.experiment_id}/runs/{version.run_id}"
    # The MLflow 3 UI's routes: /experiments/:experimentId/runs/:runUuid/artifacts/<path> opens the artifact.
    assert f"[run {version.run_id}]({run})" in text and f"[report.json]({run}/artifacts/report.json)" in text
    assert f"[request 2]({run}/artifacts/audit/request-2.md) (`runs:/{version.run_id}/audit/request-2.md`)" in text


def test_an_imported_model_has_the_deleted_classes_masked_and_gated(project, tmp_path, capsys):
    """`nhle import` of a user's small CNN trained on everything: the classes deleted from the
    versioned data are masked before it is judged, and the gate on deleted classes holds."""
    torch.manual_seed(0)
    torch.save(build_network("smallcnn", 1, 10).state_dict(), tmp_path / "theirs.pt")
    assert cli(project, "import", "--arch", "smallcnn", "--weights", str(tmp_path / "theirs.pt")) == 0
    assert "deleted_classes_predicted: 0 <= 0 -> pass" in capsys.readouterr().out
    version = client().get_model_version(NAME, "4")
    assert json.loads(version.tags["forgotten_classes"]) == [3, 5] and champion_version() == "4"


def test_a_server_started_on_an_unusable_champion_serves_the_newest_good_version(project, serve):
    """Champion pointed by hand at version 1 (predicts 5): a server started now falls back to
    version 4, the newest that passed its gates and forgets every deleted class, and says so."""
    before = champion_version()
    client().set_registered_model_alias(NAME, "champion", "1")
    try:
        with serve(project) as http:
            described = http.get("/model").json()
            assert described["version"] == "4" and described["fallback"]["refused_version"] == "1"
            assert "predicts class(es) [3, 5]" in described["fallback"]["because"]
            assert described["refused"]["version"] == "1"
    finally:
        client().set_registered_model_alias(NAME, "champion", before)


def test_rollback_goes_only_as_far_as_the_record_allows_and_a_reopen_is_recorded(project, serve, capsys):
    with serve(project) as http:
        wait_for(http, lambda d: d.get("version") == "4", "version 4")
        assert cli(project, "rollback") == 0  # 4 -> 3: version 3 forgets 5 too
        assert champion_version() == "3"
        assert cli(project, "rollback") == 2  # 3 -> 2 would bring 5 back
        assert "--reopen 2" in capsys.readouterr().err and champion_version() == "3"
        assert cli(project, "rollback", "--reopen", "2") == 2  # a reopen needs a reason on record
        assert "--reopen needs --reason" in capsys.readouterr().err and champion_version() == "3"
        assert (
            cli(
                project,
                "rollback",
                "--reopen",
                "2",
                "--reason",
                "erasure withdrawn by the data subject",
                "--operator",
                "ops@example.com",
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "moved from version 3 to 2" in out and "forget request 2 reopened by ops@example.com" in out
        assert champion_version() == "2"
        wait_for(http, lambda d: d.get("version") == "2" and not d.get("refused"), "version 2 served")
        # Class 3 was forgotten by `nhle run --classes 3`, with no request: it is on record all the same.
        assert cli(project, "rollback") == 2
        err = capsys.readouterr().err
        assert "version 1 predicts class(es) [3], deleted on record by forget request(s) [1]" in err, err
        assert champion_version() == "2"

    ledger = Ledger(f"sqlite:///{project / 'requests.db'}")
    assert ledger.get(2).status == "reopened" and ledger.deleted_classes("nhle-classifier") == {3: [1]}
    run_row = ledger.get(1)
    assert (run_row.status, run_row.classes, run_row.model_version_after) == ("done", [3], "2")
    assert "promoted without a forget request" in run_row.reason
    assert json.loads(client().get_registered_model(NAME).tags["deleted_classes"]) == {"3": [1]}
    [event] = ledger.events(2)
    assert (event.kind, event.operator, event.reason) == (
        "reopened",
        "ops@example.com",
        "erasure withdrawn by the data subject",
    )
    assert event.detail == {"action": "rollback", "model_version_from": "3", "model_version_to": "2"}
    assert client().get_model_version(NAME, "2").tags["reopened.request.2"] == "true"
    assert cli(project, "request", "show", "2", "--no-report") == 0

    shown = capsys.readouterr().out
    assert '"status": "reopened"' in shown and "REOPENED" in shown and "ops@example.com" in shown
    assert cli(project, "request", "list") == 0
    assert "reopened" in capsys.readouterr().out


def top_classes(http, images: np.ndarray) -> np.ndarray:
    """The argmax class of each image over the V2 protocol, binary and JSON (250 images a request),
    which must agree."""
    as_json, from_binary = answers(http, images)
    assert np.array_equal(as_json, from_binary)
    return as_json


def answers(http, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax class of each image over V2 JSON and over V2 binary (250 images a request)."""
    found = []
    for start in range(0, len(images), 250):
        batch = images[start : start + 250]
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": list(batch.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": batch.nbytes},
                    }
                ]
            }
        ).encode()
        binary = http.post(
            f"/v2/models/{NAME}/infer",
            content=header + batch.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        as_json = http.post(
            f"/v2/models/{NAME}/infer",
            json={
                "inputs": [
                    {"name": "images", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}
                ]
            },
        )
        assert binary.status_code == 200 and as_json.status_code == 200, (binary.text, as_json.text)
        p = np.asarray(as_json.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(batch), -1)
        from_binary = np.asarray(binary.json()["outputs"][0]["data"]).reshape(len(batch), -1)
        found.append((p.argmax(1), from_binary.argmax(1)))
    return np.concatenate([j for j, _ in found]), np.concatenate([b for _, b in found])


def answered_while(http, images: np.ndarray, action) -> dict:
    """What the server answered (version, top class of every image over V2 JSON and over V2
    binary: a swap may fall between the two), round after round from another connection, for as
    long as `action()` ran."""
    seen, stop = {"rounds": [], "errors": []}, threading.Event()

    def watch():
        with httpx.Client(base_url=http.base_url, timeout=60) as own:
            while not stop.is_set():
                try:
                    version = own.get("/model").json()["version"]
                    seen["rounds"].append((version, np.concatenate(answers(own, images))))
                except Exception as err:  # noqa: BLE001 - reported by the test
                    seen["errors"].append(repr(err))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        seen["outcome"] = action()
    finally:
        stop.set()
        watcher.join(timeout=120)
    return seen


def test_a_promotion_tells_the_running_servers_at_once(project, serve, digits, capsys, monkeypatch):
    """A server that polls only every 10 minutes stops answering class 7 as soon as `nhle request
    submit` returns (it was told to read the ledger), never answers it while `nhle request
    process` runs (1,000 digits, round after round, from another connection), and answers with
    the new version as soon as it returns: the flow called its /admin/reload right after the
    alias move. The audit report's timeline has both times."""
    token = "notify-test-token-of-at-least-32-characters"
    images = np.concatenate([digits.train.float_images().numpy(), digits.test.float_images().numpy()])[:1000]
    with serve(project, NHLE_ADMIN_TOKEN=token, NHLE_POLL_SECONDS="600") as http:
        before = http.get("/model").json()["version"]
        assert (top_classes(http, images) == 7).sum() > 50
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["serving"]["notify"] = [str(http.base_url).rstrip("/"), "http://127.0.0.1:9"]  # the second is down
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.setenv("NHLE_ADMIN_TOKEN", token)
        capsys.readouterr()
        assert submit(project, "7", "erasure request 1143") == 0
        assert f"{http.base_url}".rstrip("/") + ": suppressing [7]" in capsys.readouterr().out
        assert not (top_classes(http, images) == 7).any()  # no poll happened: it was told
        assert http.get("/model").json()["suppressed_pending_deletion"]["7"]["requests"] == [3]
        seen = answered_while(http, images, lambda: cli(project, "request", "process"))
        assert seen["outcome"] == 0 and not seen["errors"], seen["errors"]
        assert len(seen["rounds"]) >= 2 and not any((classes == 7).any() for _, classes in seen["rounds"])
        assert not (top_classes(http, images) == 7).any()
        new = champion_version()
        assert new != before and http.get("/model").json()["version"] == new  # no poll happened in between
        digits_7 = http.post("/predict", json={"instances": [[[0.0] * 8] * 8], "top_k": 9}).json()
        assert all(row["index"] != 7 for row in digits_7["predictions"][0]["top_k"])

    run_id = client().get_model_version(NAME, new).run_id
    [told, down] = mlflow.artifacts.load_dict(f"runs:/{run_id}/notified_servers.json")
    assert told["outcome"] == "swapped" and told["serving_version"] == new and told["serving_new_version"]
    assert 0 < told["seconds"] < 60
    assert down["outcome"] == "not_told" and "ConnectError" in down["error"]
    audit = mlflow.artifacts.load_dict(f"runs:/{run_id}/audit/request-3.json")
    timeline = audit["timeline"]
    assert timeline["accepted_at"] < timeline["suppressed"][0]["at"] < timeline["new_version_served"][0]["at"]
    assert timeline["suppressed"][0]["suppressed_classes"] == [7] and timeline["suppressed"][1]["outcome"] == "not_told"
    assert "## Timeline" in mlflow.artifacts.load_text(f"runs:/{run_id}/audit/request-3.md")


def test_a_withdrawn_request_is_answered_again_on_record_and_a_rejected_one_suppresses_nothing(
    project, serve, capsys, monkeypatch
):
    token = "notify-test-token-of-at-least-32-characters"
    with serve(project, NHLE_ADMIN_TOKEN=token, NHLE_POLL_SECONDS="600") as http:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["serving"]["notify"] = [str(http.base_url).rstrip("/")]
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.setenv("NHLE_ADMIN_TOKEN", token)
        assert (
            cli(project, "request", "submit", "--classes", "3", "--requester", "dpo@example.com", "--reason", "again")
            == 2
        )  # rejected: already forgotten
        assert "rejected and recorded" in capsys.readouterr().out
        assert http.get("/model").json()["suppressed_classes"] == []
        assert submit(project, "9", "erasure request 1144") == 0
        request_id = int(capsys.readouterr().out.split("accepted: ")[1].split()[0])
        assert http.get("/model").json()["suppressed_classes"] == [9]
        assert (
            cli(
                project,
                "request",
                "withdraw",
                str(request_id),
                "--reason",
                "sent in error",
                "--operator",
                "ops@example.com",
            )
            == 0
        )
        assert http.get("/model").json()["suppressed_classes"] == []

    events = Ledger(f"sqlite:///{project / 'requests.db'}").events(request_id)
    assert [e.kind for e in events] == ["suppressed", "withdrawn", "lifted"]
    assert events[1].operator == "ops@example.com" and events[1].reason == "sent in error"


def test_the_flow_run_publishes_the_outcome_as_prefect_artifacts(project):
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["nhle-classifier-version-3", "nhle-classifier-version-3-gates"])
            )
        )
    by_type = {artifact.type: artifact for artifact in found}
    assert set(by_type) == {"markdown", "table"}
    assert by_type["markdown"].data.startswith("# nhle-classifier version 3: promoted")
    assert "**Never predicts:** 3, 5" in by_type["markdown"].data
    # Links name the MLflow UI (here: `mlflow ui` on its default address, the store being SQLite).
    assert (
        "[MLflow version page](http://127.0.0.1:5000/#/models/nhle-classifier/versions/3)" in by_type["markdown"].data
    )
    assert (
        "](http://127.0.0.1:5000/#/experiments/" in by_type["markdown"].data and "](#/" not in by_type["markdown"].data
    )
    gates = json.loads(by_type["table"].data) if isinstance(by_type["table"].data, str) else by_type["table"].data
    assert {"name": "deleted_classes_predicted", "value": 0.0, "rule": "<=", "bound": 0.0, "passed": True} in gates


def test_each_run_records_its_dvc_dataset_as_an_mlflow_input(project):
    version = client().get_model_version(NAME, "3")
    run = client().get_run(version.run_id)
    [entry] = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in entry.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["dvc.md5"] == version.tags["data.md5"] and tags["dvc.git_rev"] == version.tags["data.git_rev"]
    assert entry.dataset.name == f"digits@{version.tags['data.git_rev'][:8]}"
    assert entry.dataset.digest == version.tags["data.md5"].removesuffix(".dir")[:36]
    assert version.tags["data.path"] in entry.dataset.source


def test_mlflow_models_serve_gives_finite_probabilities_and_nhle_serves_the_same(project, serve, digits):
    """`mlflow models serve` on the champion (a real process) answers strict JSON: the graph's
    named output "probabilities", forgotten classes exactly 0, the same body as nhle serve's
    /invocations. The logged model is named after what it is."""

    def strict(text: str):  # a strict parser: -Infinity and NaN are not JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the answer"))

    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.outputs.input_names() == ["probabilities"]
    champion = client().get_model_version_by_alias(NAME, "champion")  # earlier tests may have moved it
    forgotten = json.loads(champion.tags["forgotten_classes"])
    assert forgotten, champion.tags
    name = "smallcnn-digits-forgets-" + "-".join(map(str, forgotten))  # champion.source: models:/m-<logged model id>
    assert mlflow.get_logged_model(champion.source.removeprefix("models:/")).name == name

    images = digits.test.float_images()[:50].numpy()
    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
    }
    log_path = project / "mlflow-serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(Path(bin_dir) / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{NAME}@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            cwd=project,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve not up:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if http.get("/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        r = http.post("/invocations", json={"inputs": images.tolist()})
        assert r.status_code == 200, r.text
        theirs = strict(r.text)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    p = np.array(theirs["predictions"]["probabilities"])
    assert p.shape == (50, 10) and np.isfinite(p).all() and (p[:, forgotten] == 0).all()
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    with serve(project) as nhle_http:
        ours = strict(nhle_http.post("/invocations", json={"inputs": images.tolist()}).text)
    assert set(ours) == set(theirs) == {"predictions"} and set(ours["predictions"]) == {"probabilities"}
    np.testing.assert_allclose(np.array(ours["predictions"]["probabilities"]), p, atol=1e-6)


def onnx_file_of(version: str) -> Path:
    """The stored model.onnx of a registered version (its logged model's artifact folder)."""
    model_id = client().get_model_version(NAME, version).source.removeprefix("models:/")
    location = mlflow.get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://"), "model.onnx")


def unready_because(http, text: str, timeout: float = 30.0) -> str:
    """/readyz's reason once it holds `text` (a server that serves nothing says why)."""
    deadline = time.monotonic() + timeout
    while text not in (reason := http.get("/readyz").json().get("reason", "")):
        assert time.monotonic() < deadline, reason
        time.sleep(0.3)
    return reason


def test_a_replaced_champion_file_gets_503_never_an_older_model(project, serve, digits):
    """The champion's ONNX file replaced on disk, a fresh server: the champion is refused (its
    sha256 differs) and no other version forgets every class on record (3 by `nhle run`, 7 by
    request 3), so the server answers 503 with the reason instead of serving one that predicts them."""
    champion = champion_version()
    stored = onnx_file_of(champion)
    saved = stored.read_bytes()
    stored.write_bytes(onnx_file_of("1").read_bytes())  # version 1: predicts 3 and 7
    images = digits.test.float_images()[(digits.test.labels == 3).numpy()][:20].numpy()
    try:
        with serve(project, ready=False) as http:
            reason = unready_because(http, "no other version")
            assert f"version {champion}'s ONNX file has sha256" in reason and "[3, 7]" in reason, reason
            assert http.get("/readyz").status_code == 503
            answer = http.post("/predict", json={"instances": images.tolist()})
            assert answer.status_code == 503 and "no other version" in answer.text, answer.text
            v2 = http.post(
                f"/v2/models/{NAME}/infer",
                json={
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(images[:1].shape),
                            "datatype": "FP32",
                            "data": images[:1].ravel().tolist(),
                        }
                    ]
                },
            )
            assert v2.status_code == 503, v2.text
    finally:
        stored.write_bytes(saved)


def test_a_lost_ledger_is_covered_by_the_registered_models_record(project, serve):
    """The ledger file gone and the alias moved by hand to version 4 (predicts 7, deleted under
    request 3): a fresh server reads the registered model's own record, refuses version 4, serves
    the newest version that forgets every class on record, says which record it used, and creates
    no ledger. Without that record too, nothing is served or promoted until an operator acts."""
    ledger, aside = project / "requests.db", project / "requests.db.aside"
    champion = champion_version()
    ledger.rename(aside)
    client().set_registered_model_alias(NAME, "champion", "4")
    try:
        with serve(project) as http:
            described = http.get("/model").json()
            assert described["version"] == champion and described["fallback"]["refused_version"] == "4"
            assert "predicts class(es) [7]" in described["fallback"]["because"]
            record = described["deleted_on_record"]
            assert record["classes"] == {"3": [1], "7": [3]}, record
            assert record["record"].startswith("the registered model's record (the ledger") and not ledger.exists()

        saved = client().get_registered_model(NAME).tags[RECORD_TAG]
        client().delete_registered_model_tag(NAME, RECORD_TAG)  # a model from before there was a record
        try:
            with serve(project, ready=False) as http:
                reason = unready_because(http, "does not exist")
                assert "carries no record of its own" in reason and "nhle request init" in reason, reason
            assert cli(project, "request", "process") == 2 and not ledger.exists()
        finally:
            client().set_registered_model_tag(NAME, RECORD_TAG, saved)
    finally:
        aside.rename(ledger)
        client().set_registered_model_alias(NAME, "champion", champion)
