"""flows/bench_grid.py: the benchmark grid as Prefect tasks on a real local Dask cluster (worker
processes) gives the rows of the sequential run."""
import json
import math
from pathlib import Path

import yaml

from nhle.cli import main

REPO = Path(__file__).resolve().parents[2]

FLOAT_NOISE = {"forget_silhouette"}  # sklearn's pairwise distances sum in a thread-count-dependent order
TIMES = {"seconds", "seconds_vs_retrain"}


def read_rows(folder):
    return [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]


def same_results(a: dict, b: dict) -> bool:
    for key in a.keys() - TIMES:
        if key in FLOAT_NOISE:
            if not math.isclose(a[key], b[key], abs_tol=1e-5):
                return False
        elif key == "original":
            if not same_results(a[key], b[key]):
                return False
        elif a[key] != b[key]:
            return False
    return a.keys() == b.keys()


def test_grid_on_a_local_dask_cluster_matches_the_sequential_run(tmp_path, prefect_harness):
    grid = ["bench", "unlearning", "--quick", "--classes", "3,5", "--multi", "none", "--methods", "nhle,neggrad"]
    assert main([*grid, "--out", str(tmp_path / "sequential")]) == 0

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dask": {"n_workers": 2, "threads_per_worker": 1}}))
    assert main([*grid, "--engine", "dask", "--params", str(params), "--project-dir", str(REPO),
                 "--out", str(tmp_path / "dask")]) == 0

    sequential, on_dask = read_rows(tmp_path / "sequential"), read_rows(tmp_path / "dask")
    assert [(r["seed"], r["forget_classes"], r["method"]) for r in sequential] == \
           [(0, [3], "retrain"), (0, [3], "nhle"), (0, [3], "neggrad"),
            (0, [5], "retrain"), (0, [5], "nhle"), (0, [5], "neggrad")]
    for a, b in zip(sequential, on_dask, strict=True):
        assert same_results(a, b), (a, b)
    assert all(r["forget_test_acc"] == 0.0 for r in on_dask if r["method"] == "nhle")
    assert "engine: prefect-dask" in (tmp_path / "dask" / "summary.md").read_text()


def test_grid_differences_are_caught(tmp_path):
    row = {"method": "nhle", "forget_test_acc": 0.0, "forget_silhouette": 0.1, "seconds": 1.0, "original": {"x": 1}}
    assert same_results(row, {**row, "seconds": 9.0, "forget_silhouette": 0.100001})
    assert not same_results(row, {**row, "forget_test_acc": 0.01})
    assert not same_results(row, {**row, "original": {"x": 2}})
    assert not same_results(row, {**row, "forget_silhouette": 0.2})


def test_dask_address_in_config_or_environment_wins(monkeypatch):
    from nhle.config import params_from_dict

    params = params_from_dict({"dask": {"address": "tcp://scheduler:8786"}})
    assert params.dask_address() == "tcp://scheduler:8786"
    monkeypatch.setenv("DASK_ADDRESS", "tcp://other:8786")
    assert params.dask_address() == "tcp://other:8786"
