"""nhle.adapters.tracking: where a new experiment keeps its artifacts."""
from pathlib import Path

from nhle.adapters.tracking import artifact_location


def test_artifact_location_is_local_for_a_local_store_and_the_servers_for_a_tracking_server(tmp_path):
    assert artifact_location("mlartifacts", "sqlite:///x.db", tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()
    assert artifact_location("mlartifacts", "http://mlflow:5000", tmp_path) is None
    assert artifact_location("mlartifacts", "https://mlflow.example.com", Path(".")) is None
    for uri in ("s3://bucket/nhle", "mlflow-artifacts:/nhle", "gs://bucket/x"):
        assert artifact_location(uri, "http://mlflow:5000", tmp_path) == uri
        assert artifact_location(uri, "sqlite:///x.db", tmp_path) == uri
