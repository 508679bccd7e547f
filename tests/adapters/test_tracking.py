"""nhle.adapters.tracking: where a new experiment keeps its artifacts."""

import json
import os
from pathlib import Path

import mlflow

from nhle.adapters.tracking import artifact_location, configure, relearn_metrics, version_description
from nhle.core.config import Params


def test_artifact_location_is_local_for_a_local_store_and_the_servers_for_a_tracking_server(tmp_path):
    assert artifact_location("mlartifacts", "sqlite:///x.db", tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()
    assert artifact_location("mlartifacts", "http://mlflow:5000", tmp_path) is None
    assert artifact_location("mlartifacts", "https://mlflow.example.com", Path(".")) is None
    for uri in ("s3://bucket/nhle", "mlflow-artifacts:/nhle", "gs://bucket/x"):
        assert artifact_location(uri, "http://mlflow:5000", tmp_path) == uri
        assert artifact_location(uri, "sqlite:///x.db", tmp_path) == uri


RELEARN = {
    "reference": "mask_only",
    "reference_steps": 6,
    "shipped": 8.0,
    "restored": 5.0,
    "mask_only": 1.0,
    "steps": {"shipped": 48, "restored": 30, "mask_only": 6},
    "why": "no retrained model",
}


def test_the_relearn_shares_are_logged_as_metrics_and_shown_on_the_version_page_with_their_steps():
    assert relearn_metrics(RELEARN) == {
        "relearn/share_shipped": 8.0,
        "relearn/share_restored": 5.0,
        "relearn/share_mask_only": 1.0,
        "relearn/reference_steps": 6.0,
    }
    assert relearn_metrics(None) == {}  # a report written before the relearn share
    text = version_description({"relearn": json.dumps(RELEARN)}, "run1", "0")
    assert (
        "**Relearn share** (the relearn attack's steps over the mask-only model's 6; 1 = no harder than the "
        "mask alone): shipped 8 (48 steps), restored 5 (30 steps), mask-only 1 (6 steps)."
    ) in text
    assert "Relearn share" not in version_description({}, "run1", "0")
    assert "Evidence: pending" in version_description({"evidence": "pending"}, "run1", "0")
    assert "Evidence: pending" not in version_description({"evidence": "complete"}, "run1", "0")


def test_the_version_page_names_the_recipe_that_made_it_and_links_every_attempt():
    text = version_description({"nhle.recipe": "nhle_conservative", "nhle.attempt": "2"}, "run1", "0")
    assert (
        "**Recipe:** nhle_conservative (attempt 2; every attempt and why it failed: "
        "[attempts.json](#/experiments/0/runs/run1/artifacts/attempts.json))."
    ) in text
    assert "Recipe" not in version_description({}, "run1", "0")


def test_configuring_one_project_does_not_send_the_next_to_its_store(tmp_path, monkeypatch):
    """MLflow exports the URI it is given to the environment; configure puts MLFLOW_TRACKING_URI
    back, so a second project configured in the same process (a flow worker) uses its own store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        root.mkdir()
        uri = configure(Params(), root)
        assert uri == f"sqlite:///{root / 'mlflow.db'}" and mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and os.environ["MLFLOW_REGISTRY_URI"] == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'chosen.db'}")  # the user's choice wins
    assert configure(Params(), first) == f"sqlite:///{tmp_path / 'chosen.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'chosen.db'}"
