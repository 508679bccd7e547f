"""The production chain for real: Prefect flows (test harness), MLflow on SQLite, DVC with a local
remote, ONNX Runtime on the registered model. One project is built up step by step."""

import json
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnxruntime
import prefect.artifacts
import pytest
from mlflow import MlflowClient
from prefect.flows import load_flow_from_entrypoint

from nhle.adapters.ledger import Ledger
from nhle.adapters.tracking import download_checkpoint
from nhle.adapters.versioning import DataVersion, open_dataset_version
from nhle.cli import main
from nhle.core.config import Params
from nhle.core.data import load_digits, split_by_classes
from nhle.core.training import load_checkpoint
from nhle.orchestration.steps import FlowResult
from nhle_flows import pipeline
from nhle_flows.pipeline import mlflow_ui_links

REPO = Path(__file__).resolve().parents[2]
NAME = "nhle-classifier"
PARAMS = {"train": {"epochs": 4}, "retrain_baseline": False, "gates": {"min_retain_test_acc": 0.8}}


def flow(name):
    return load_flow_from_entrypoint(f"nhle_flows.pipeline:{name}")


@pytest.fixture(scope="module")
def project(new_project):
    """`nhle run` on a fresh project: base model, then the forget flow for class 3."""
    return new_project("project", PARAMS)


def client():
    return MlflowClient()


def champion():
    return client().get_model_version_by_alias(NAME, "champion")


def test_run_promotes_base_then_unlearned_model_with_evidence(project):
    version = champion()
    assert str(version.version) == "2" and str(client().get_model_version_by_alias(NAME, "previous").version) == "1"
    tags = version.tags
    assert json.loads(tags["forgotten_classes"]) == [3] and tags["parent_version"] == "1"
    assert tags["data.md5"].endswith(".dir") and len(tags["data.git_rev"]) == 40
    assert tags["parity.passed"] == "true" and tags["promoted"] == "true"
    assert all(g["passed"] for g in json.loads(tags["gates"]))
    run = client().get_run(version.run_id)
    assert run.data.metrics["unlearned/forget_test_acc"] == 0.0 and "original/forget_test_acc" in run.data.metrics
    assert run.data.params["unlearn.n_samples"] == "32" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert {"report.json", "parity.json", "gates.json", "preprocessing.json", "plots", "checkpoint"} <= artifacts
    plots = {Path(a.path).name for a in client().list_artifacts(run.info.run_id, "plots")}
    assert plots == {"per_class_accuracy.png", "confusion_matrix.png", "feature_projection.png"}


def test_registered_onnx_model_never_predicts_a_forgotten_class(project):
    model = mlflow.onnx.load_model(f"models:/{NAME}@champion")
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    data = load_digits(seed=0)
    forgotten, _ = split_by_classes(data.test, [3])
    for images in (forgotten.float_images(), data.test.float_images()):
        p = session.run(None, {"images": images.numpy()})[0]
        assert not np.isin(p.argmax(1), [3]).any() and (p[:, 3] == 0).all()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert pyfunc.metadata.signature is not None


def test_model_traces_to_the_exact_data_bytes(project):
    version = champion()
    _, checkpoint = load_checkpoint(download_checkpoint(version))
    data_version = DataVersion(**checkpoint["data_version"])
    assert data_version.md5 == version.tags["data.md5"]
    assert open_dataset_version(data_version).fingerprint() == checkpoint["data_fingerprint"]


def test_failed_gate_registers_but_never_moves_the_champion(project):
    params = {**PARAMS, "export": {"parity_tolerance": 1e-15}}  # below fp32 rounding: no export meets it
    result = flow("forget")(classes="5", params=params, project_dir=str(project))
    assert result.promoted is False and "parity" in result.reason
    # every recipe fails parity: the fallback ran as Prefect tasks too, and only its candidate was registered
    assert [(a["recipe"], a["passed"]) for a in result.attempts] == [
        ("configured", False),
        ("nhle_synthetic_anchor", False),
        ("nhle_conservative", False),
    ]
    rejected = client().get_model_version(NAME, result.version)
    assert rejected.tags["promoted"] == "false" and "parity_max_abs_prob_diff" in rejected.tags["rejection_reason"]
    assert rejected.tags["nhle.recipe"] == "nhle_conservative"
    assert not rejected.aliases
    assert str(champion().version) == "2"


def test_invalid_request_is_refused_before_anything_is_registered(project):
    before = len(client().search_model_versions(f"name='{NAME}'"))
    for classes, message in (("3", "already forgotten"), ("11", "out of range"), ("cat", "unknown class")):
        with pytest.raises(ValueError, match=message):
            flow("forget")(classes=classes, params=PARAMS, project_dir=str(project))
    assert len(client().search_model_versions(f"name='{NAME}'")) == before
    assert str(champion().version) == "2"


def test_nhle_run_refuses_to_forget_every_class_before_any_flow_starts(project, capsys):
    before = len(client().search_model_versions(f"name='{NAME}'"))
    assert (
        main(
            [
                "run",
                "--classes",
                "0,1,2,4,5,6,7,8,9",
                "--params",
                str(project / "params.yaml"),
                "--project-dir",
                str(project),
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "would leave no class to predict" in captured.err and "Traceback" not in captured.err + captured.out
    assert "Beginning flow run" not in captured.err + captured.out
    assert len(client().search_model_versions(f"name='{NAME}'")) == before


def test_sequential_forgetting_then_rollback(project, caplog):
    # n_samples as a flow parameter is deprecated (unlearn.n_samples in params says it) and still honoured
    result = flow("forget")(classes="5", params=PARAMS, project_dir=str(project), n_samples=16)
    assert "parameter(s) are deprecated: set unlearn.n_samples in params instead" in caplog.text
    assert result.promoted is True
    new = champion()
    assert str(new.version) == str(result.version) and json.loads(new.tags["forgotten_classes"]) == [3, 5]
    report = json.loads(Path(client().download_artifacts(new.run_id, "report.json")).read_text())
    assert report["n_forget_samples"] == 16 and report["previously_forgotten"] == [3]
    cli = ["rollback", "--params", str(project / "params.yaml"), "--project-dir", str(project)]
    assert main(cli) == 2  # class 5 went on record when the flow promoted it: rolling back needs it reopened
    assert str(champion().version) == str(new.version)

    row = Ledger(f"sqlite:///{project / 'requests.db'}").list("done")[-1]
    assert row.classes == [5] and row.model_version_after == str(new.version)
    assert main([*cli, "--reopen", str(row.id), "--reason", "the test takes the forgetting back"]) == 0
    assert str(champion().version) == "2"

    assert client().get_model_version(NAME, new.version).tags["rolled_back"] == "true"


def test_mlflow_ui_links_follow_the_tracking_server_or_mlflow_ui_url():
    default = "http://127.0.0.1:5000"
    store = "sqlite:////work/project/mlflow.db"
    # A tracking server: its own address, whatever MLFLOW_UI_URL says.
    server = "https://mlflow.example.org"
    assert mlflow_ui_links(server + "/", server, {"MLFLOW_UI_URL": "http://x:1"}) == (server, "")
    # A local store: `mlflow ui`'s default address, and the command that serves it there.
    base, note = mlflow_ui_links(store, default, {})
    assert base == default and f"`mlflow ui --backend-store-uri {store}`" in note and "MLFLOW_UI_URL" in note
    # ... or where MLFLOW_UI_URL says the UI runs, with the command that serves it there.
    base, note = mlflow_ui_links(store, default, {"MLFLOW_UI_URL": "http://127.0.0.1:5055/"})
    assert base == "http://127.0.0.1:5055"
    assert f"`mlflow ui --backend-store-uri {store} --port 5055`" in note and "5000" not in note
    base, note = mlflow_ui_links(store, default, {"MLFLOW_UI_URL": "http://10.1.2.3:8080"})
    assert base == "http://10.1.2.3:8080" and "--host 10.1.2.3 --port 8080`" in note
    assert mlflow_ui_links(store, default, {"MLFLOW_UI_URL": "  "})[0] == default  # blank: unset


def test_the_prefect_artifact_links_to_mlflow_ui_url(monkeypatch):
    """publish_artifacts (what every flow ends with) puts its links where MLFLOW_UI_URL says."""
    made = {}
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.setdefault("markdown", kw))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: made.setdefault("table", kw))
    monkeypatch.setattr(
        pipeline, "version_page", lambda name, version: ("[run abc](#/experiments/1/runs/abc)", "http://127.0.0.1:5000")
    )
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "sqlite:////p/mlflow.db")
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5055")
    pipeline.publish_artifacts(Params(), FlowResult("3", True, "ok", "abc"))
    text = made["markdown"]["markdown"]
    assert f"[MLflow version page](http://127.0.0.1:5055/#/models/{NAME}/versions/3)" in text
    assert "[run abc](http://127.0.0.1:5055/#/experiments/1/runs/abc)" in text and ":5000" not in text
    assert "`mlflow ui --backend-store-uri sqlite:////p/mlflow.db --port 5055`" in text
