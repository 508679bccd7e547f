"""In-process checks of the server module: settings, provider choice, the local-file source.

.venv/bin/python -m pytest -q tests/serving/test_settings_and_sources.py
"""

import re
import shutil
import time
from pathlib import Path

import pytest
from serving_support import preprocessing

import nhle_serving.models
import nhle_serving.server
import nhle_serving.settings
from nhle.adapters.deletions import RECORD_TAG, MissingLedger
from nhle.adapters.ledger import Ledger
from nhle.core.config import ORT_OPT_LEVELS
from nhle_serving.settings import OPT_LEVELS
from nhle_serving.sources import RegistrySource


def test_settings_from_env():
    s = nhle_serving.settings.Settings.from_env(
        {
            "NHLE_PARAMS": "p.yaml",
            "NHLE_PROJECT_DIR": "/srv",
            "NHLE_MODEL": "models:/m@prod",
            "NHLE_ADMIN_TOKEN": "t" * 32,
            "NHLE_POLL_SECONDS": "0.5",
            "NHLE_MAX_INSTANCES": "10",
            "NHLE_MAX_BODY_BYTES": "2048",
            "NHLE_ORT_THREADS": "2",
            "NHLE_ORT_OPT_LEVEL": "Basic",
            "NHLE_DEVICE": "cpu",
            "NHLE_VERIFY_KEY": "/etc/Keys/Nhle.pub",
        }
    )
    assert s.verify_key == "/etc/Keys/Nhle.pub"  # a path as given; choices in any case (Basic)
    assert (str(s.params_path), str(s.project_dir), s.model, s.admin_token) == (
        "p.yaml",
        "/srv",
        "models:/m@prod",
        "t" * 32,
    )
    assert (s.poll_seconds, s.max_instances, s.max_body_bytes, s.ort_threads) == (0.5, 10, 2048, 2)
    assert (s.ort_opt_level, s.device) == ("basic", "cpu")
    default = nhle_serving.settings.Settings.from_env({"NHLE_PARAMS": "no-such-params.yaml"})
    assert default.poll_seconds == 5 and default.max_instances == 256 and default.max_body_bytes == 8 * 1024 * 1024
    assert default.model is None and default.admin_token is None and default.ort_opt_level == "all"
    for env, name in (
        ({"NHLE_ORT_OPT_LEVEL": "max"}, "NHLE_ORT_OPT_LEVEL"),
        ({"NHLE_MAX_INSTANCES": "x"}, "NHLE_MAX_INSTANCES"),
        ({"NHLE_POLL_SECONDS": "0"}, "NHLE_POLL_SECONDS"),
        ({"NHLE_DEVICE": "tpu"}, "NHLE_DEVICE"),
    ):
        with pytest.raises(ValueError, match=name):
            nhle_serving.settings.Settings.from_env(env)


def test_settings_come_from_params_yaml_and_env_wins(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("serving:\n  poll_seconds: 0.25\n  max_instances: 7\n  ort_opt_level: basic\n")
    s = nhle_serving.settings.Settings.from_env({"NHLE_PARAMS": str(params)})
    assert (s.poll_seconds, s.max_instances, s.ort_opt_level, s.max_body_bytes) == (0.25, 7, "basic", 8 * 1024 * 1024)
    s = nhle_serving.settings.Settings.from_env({"NHLE_PARAMS": str(params), "NHLE_MAX_INSTANCES": "3"})
    assert s.max_instances == 3 and s.poll_seconds == 0.25


def test_cuda_is_asked_for_only_with_a_gpu(monkeypatch):
    monkeypatch.setattr(
        nhle_serving.models.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(nhle_serving.models, "gpu_present", lambda: False)
    assert nhle_serving.models.choose_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(nhle_serving.models.ort, "preload_dlls", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(nhle_serving.models, "gpu_present", lambda: True)
    assert nhle_serving.models.choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert nhle_serving.models.choose_providers("cpu") == ["CPUExecutionProvider"]
    assert nhle_serving.models.choose_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(nhle_serving.models, "gpu_present", lambda: False)
    with pytest.raises(ValueError, match="no GPU is visible"):
        nhle_serving.models.choose_providers("cuda")
    monkeypatch.setattr(nhle_serving.models.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert nhle_serving.models.choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
        nhle_serving.models.choose_providers("cuda")


def test_local_file_is_reloaded_when_it_changes(onnx_files, tmp_path):
    """NHLE_MODEL=<file>.onnx: a new file is smoke-tested and swapped in, a broken one is not."""
    for name in ("model.onnx", "model.preprocessing.json"):
        shutil.copy(onnx_files[(3,)].parent / name, tmp_path / name)
    manager = nhle_serving.models.ModelManager(
        nhle_serving.settings.Settings(model=str(tmp_path / "model.onnx"), ort_threads=1, ort_opt_level="basic")
    )
    assert manager.refresh()["outcome"] == "swapped" and manager.current.forgotten == (3,)
    assert manager.refresh()["outcome"] == "unchanged"
    for name in ("model.onnx", "model.preprocessing.json"):
        shutil.copy(onnx_files[(3, 5)].parent / name, tmp_path / name)
    assert manager.refresh()["outcome"] == "swapped" and manager.current.forgotten == (3, 5)
    serving = manager.current
    (tmp_path / "model.onnx").write_bytes(b"\x00" * 100)
    outcome = manager.refresh()
    assert outcome["outcome"] == "failed" and manager.current is serving
    assert manager.last_error["message"] == outcome["error"]
    assert manager.refresh()["outcome"] == "skipped"  # not retried every poll
    assert manager.refresh(force=True)["outcome"] == "failed"
    (tmp_path / "model.onnx").unlink()
    assert manager.refresh()["outcome"] == "check_failed" and manager.current is serving


def test_every_optimisation_level_the_config_accepts_maps_to_onnx_runtime():
    assert tuple(OPT_LEVELS) == ORT_OPT_LEVELS


def test_a_server_in_an_empty_folder_creates_no_store_and_says_what_is_missing(tmp_path, start_server):
    """The server started where there is no project: it must not create mlflow.db (MLflow's SQLite
    store is created on first connection) nor requests.db; it stays unready and says why."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty, ready=False, poll_seconds=0.5)
    deadline, ready = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        ready = server.http.get("/readyz")
        if "does not exist" in ready.text:
            break
        time.sleep(0.2)
    assert ready.status_code == 503, ready.text
    reason = ready.json()["reason"]
    assert str(empty / "mlflow.db") in reason and "nhle run" in reason and "nhle import" in reason, reason
    assert "--project-dir" in reason and "NHLE_PROJECT_DIR" in reason, reason
    time.sleep(1.5)  # a few more polls
    assert server.http.get("/v2/health/ready").status_code == 503
    assert "/v2/models/{name}/infer" in server.http.get("/openapi.json").json()["paths"]  # schema without a model
    assert str(empty / "mlflow.db") in server.log()
    assert sorted(p.name for p in empty.iterdir()) == []  # no mlflow.db, no requests.db, nothing


def test_registry_source_never_creates_a_missing_store_or_ledger(tmp_path, champion_registry):
    missing = tmp_path / "mlflow.db"
    ledger = f"sqlite:///{tmp_path / 'r.db'}"
    source = RegistrySource("models:/nhle-classifier@champion", f"sqlite:///{missing}", ledger)
    for call in (source.current, lambda: source.fallbacks(exclude=None), source.deleted_classes):
        with pytest.raises(LookupError, match=f"MLflow store {missing} does not exist"):
            call()
    assert list(tmp_path.iterdir()) == []
    # The ledger missing, or its folder: the registered model's own record (empty) answers, and says so.
    for url in (ledger, f"sqlite:///{tmp_path / 'no-such-folder' / 'r.db'}"):
        source = RegistrySource("models:/nhle-classifier@champion", champion_registry.uri, url)
        assert source.current().version == "1" and source.deleted_classes() == {}
        assert (
            source.record.startswith("the registered model's record (the ledger") and "does not exist" in source.record
        )
    assert list(tmp_path.iterdir()) == []


def test_a_missing_ledger_that_no_record_covers_is_an_error_not_an_empty_ledger(
    tmp_path, make_registry, onnx_files, digits
):
    """A registered model without its own record (made before there was one) and no ledger file:
    what was deleted cannot be known, so the source refuses rather than answer 'nothing'."""
    registry = make_registry("no-record")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    registry.client().delete_registered_model_tag("nhle-classifier", RECORD_TAG)
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    source = RegistrySource("models:/nhle-classifier@champion", registry.uri, url)
    with pytest.raises(MissingLedger, match=f"ledger {tmp_path / 'requests.db'} does not exist .* `nhle request init`"):
        source.deleted_classes()
    assert list(tmp_path.iterdir()) == []
    Ledger(url).submit(
        [5], ["5"], "dpo@example.com", "erasure", model_name="nhle-classifier", status="done", model_version_after="1"
    )
    assert source.deleted_classes() == {5: [1]} and source.record == "the ledger"


def test_every_nhle_variable_the_server_reads_is_in_the_readme_table_and_the_server_docstring_with_its_default():
    """serving/README.md's table of NHLE_* variables and serving/server.py's list are written by
    hand: each must name exactly the variables the server reads, the table with their defaults."""
    read = nhle_serving.settings.environment_variables()
    readme = (Path(nhle_serving.server.__file__).parent / "README.md").read_text()
    table = dict(re.findall(r"^\| `(NHLE_[A-Z_]+)` \| ([^|]+) \|", readme, flags=re.MULTILINE))
    assert set(table) == set(read), set(table) ^ set(read)
    for name, default in read.items():
        shown = table[name].strip().strip("`").split()[0].strip("`")
        if default is None or name in ("NHLE_PARAMS", "NHLE_PROJECT_DIR"):
            continue  # unset / where the server runs: said in words
        expected = (
            str(default).lower()
            if isinstance(default, bool)
            else f"{default:g}"
            if isinstance(default, float)
            else str(default)
        )
        assert shown == expected, f"serving/README.md gives {name} the default {shown!r}; the server's is {expected!r}"
    listed = set(re.findall(r"NHLE_[A-Z_]+", nhle_serving.server.__doc__.split("Hot swap")[0]))
    assert listed == set(read), listed ^ set(read)
