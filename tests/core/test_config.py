from pathlib import Path

import pytest

from nhle.cli import main
from nhle.core.config import Params, UnlearnConfig, load_params, params_from_dict, params_yaml, resolve_uri

REPO = Path(__file__).resolve().parents[2]


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
    assert resolve_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("mlartifacts", tmp_path) == (tmp_path / "mlartifacts").as_uri()
    assert resolve_uri("s3://bucket/a", tmp_path) == "s3://bucket/a"


def test_model_section_validates_and_old_train_model_is_explained():
    params = params_from_dict({"model": {"arch": "resnet50", "mean": [0.5, 0.4, 0.3], "std": 0.25}})
    assert params.model.arch == "resnet50" and params.model.mean == (0.5, 0.4, 0.3) and params.model.std == (0.25,)
    with pytest.raises(ValueError, match="mean and std together"):
        params_from_dict({"model": {"mean": [0.5]}})
    with pytest.raises(ValueError, match=r"model.mean\[0\] must be a number, got .imagenet."):
        params_from_dict({"model": {"mean": "imagenet", "std": 1}})
    with pytest.raises(ValueError, match="give one"):
        params_from_dict({"model": {"weights": "a.pth", "from_mlflow": "models:/m/1"}})
    with pytest.raises(ValueError, match="train.model is now model.arch"):
        params_from_dict({"train": {"model": "resnet18"}})


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs must be a whole number, got 'ten'"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1, got 0"),
        ({"train": {"epochs": -1}}, "train.epochs must be at least 1, got -1"),
        ({"train": {"lr": 0}}, "train.lr must be above 0.0, got 0.0"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number, got 'fast'"),
        ({"unlearn": {"n_samples": -4}}, "unlearn.n_samples must be at least 1, got -4"),
        ({"unlearn": {"max_steps": -5}}, "unlearn.max_steps must be at least 0, got -5"),
        ({"unlearn": {"mask": "yes"}}, "unlearn.mask must be true or false, got 'yes'"),
        ({"unlearn": {"anchor_weight": float("nan")}}, "unlearn.anchor_weight must be a finite number, got nan"),
        ({"serving": {"notify": [8000]}}, "serving.notify[0] must be a string, got 8000"),
        ({"data": {"image_size": 0}}, "data.image_size must be at least 1, got 0"),
    ],
)
def test_wrong_types_and_out_of_range_values_name_the_key_and_the_value(raw, message):
    with pytest.raises(ValueError) as err:
        params_from_dict(raw)
    assert message in str(err.value)


def test_numbers_yaml_reads_as_text_are_taken_as_numbers(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 2\nunlearn:\n  lr: 5e-5\n")  # YAML 1.1: '1e-3' is a string
    params = load_params(path)
    assert params.train.lr == 1e-3 and params.unlearn.lr == 5e-5 and params.data.image_size is None


def test_a_params_file_named_on_the_command_line_must_exist(tmp_path, capsys):
    assert main(["run", "--params", str(tmp_path / "missing.yaml"), "--project-dir", str(tmp_path)]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_params_yaml_is_the_code_defaults_with_their_docstrings():
    """One home per default: the checkout's params.yaml is `nhle params` of the code's defaults,
    so running from another folder (no params.yaml: the defaults) changes nothing."""
    regenerate = "regenerate it from the defaults: rm params.yaml; nhle params --write params.yaml"
    assert (REPO / "params.yaml").read_text() == params_yaml(Params()), regenerate
    assert load_params(REPO / "params.yaml") == Params()


def test_the_old_data_classes_key_is_refused_with_its_new_name(tmp_path):
    """`--classes` names the classes to forget everywhere; the class-names file is data.class_names
    (--class-names). A params.yaml written before says so instead of failing on an unknown key."""
    (tmp_path / "params.yaml").write_text("data:\n  classes: names.txt\n")
    with pytest.raises(ValueError, match="data.classes is now data.class_names"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data:\n  class_names: names.txt\n")
    assert load_params(tmp_path / "params.yaml").data.class_names == "names.txt"
