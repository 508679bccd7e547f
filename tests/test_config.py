from pathlib import Path

import pytest

from nhle.config import Params, UnlearnConfig, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_project_params_yaml_reads_into_the_typed_schema():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "digits" and params.unlearn.n_samples == 32
    assert params.unlearn.encoding == UnlearnConfig().encoding  # the file states the measured default
    assert params.export.parity_batch_sizes == (1, 64, 257) and params.registry.champion_alias == "champion"


def test_missing_file_means_defaults(tmp_path):
    assert load_params(tmp_path / "none.yaml") == Params()


def test_unknown_keys_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown UnlearnConfig fields: \['nsamples'\]"):
        params_from_dict({"unlearn": {"nsamples": 3}})
    with pytest.raises(ValueError, match="unknown section"):
        params_from_dict({"trainig": {}})
    with pytest.raises(ValueError, match="retrain_baseline must be true or false"):
        params_from_dict({"retrain_baseline": "yes"})
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(bad)


def test_tracking_uri_environment_variable_wins(monkeypatch):
    params = params_from_dict({"tracking": {"tracking_uri": "sqlite:///x.db"}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert params.tracking_uri() == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert params.tracking_uri() == "http://127.0.0.1:5000"


def test_relative_store_paths_resolve_inside_the_project(tmp_path):
    from nhle.config import resolve_uri

    assert resolve_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("mlartifacts", tmp_path) == (tmp_path / "mlartifacts").as_uri()
    assert resolve_uri("s3://bucket/a", tmp_path) == "s3://bucket/a"


def test_model_section_validates_and_old_train_model_is_explained():
    params = params_from_dict({"model": {"arch": "resnet50", "mean": [0.5, 0.4, 0.3], "std": 0.25}})
    assert params.model.arch == "resnet50" and params.model.mean == (0.5, 0.4, 0.3) and params.model.std == (0.25,)
    with pytest.raises(ValueError, match="mean and std together"):
        params_from_dict({"model": {"mean": [0.5]}})
    with pytest.raises(ValueError, match="must be a number or a list of numbers"):
        params_from_dict({"model": {"mean": "imagenet", "std": 1}})
    with pytest.raises(ValueError, match="give one"):
        params_from_dict({"model": {"weights": "a.pth", "from_mlflow": "models:/m/1"}})
    with pytest.raises(ValueError, match="train.model is now model.arch"):
        params_from_dict({"train": {"model": "resnet18"}})
