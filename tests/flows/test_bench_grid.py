"""flows/bench_grid.py: the benchmark grid as Prefect tasks on a real local Dask cluster (worker
processes) gives the rows of the sequential run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nhle.adapters.processes import free_port, stop_process
from nhle.cli import main
from nhle.core.config import params_from_dict

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

FLOAT_NOISE = {"forget_silhouette"}  # sklearn's pairwise distances sum in a thread-count-dependent order
TIMES = {"seconds", "seconds_vs_retrain", "seconds_cached_vs_retrain"}


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


def differing(a: dict, b: dict) -> dict:
    """The keys whose values differ, with both values: what a failed comparison shows."""
    return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in TIMES}


GRID = ["bench", "unlearning", "--quick", "--classes", "3,5", "--multi", "none", "--methods", "nhle,neggrad"]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The grid run unit after unit, with one thread per process as Dask's workers have
    (OMP_NUM_THREADS=1 by default): torch's kernels sum in a thread-count-dependent order, and
    1e-8 differences in a base model can flip one probe prediction on another CPU."""
    out = tmp_path_factory.mktemp("grid") / "sequential"
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "nhle.cli.commands", *GRID, "--out", str(out)],
        env=one_thread,
        check=True,
        capture_output=True,
    )
    rows = read_rows(out)
    assert [(r["seed"], r["forget_classes"], r["method"]) for r in rows] == [
        (0, [3], "retrain"),
        (0, [3], "nhle"),
        (0, [3], "neggrad"),
        (0, [5], "retrain"),
        (0, [5], "nhle"),
        (0, [5], "neggrad"),
    ]
    return rows


def run_on_dask(out, dask: dict) -> list[dict]:
    params = out.parent / f"{out.name}-params.yaml"
    params.write_text(yaml.safe_dump({"dask": dask}))
    assert (
        main([*GRID, "--engine", "dask", "--params", str(params), "--project-dir", str(REPO), "--out", str(out)]) == 0
    )
    assert "engine: prefect-dask" in (out / "summary.md").read_text()
    return read_rows(out)


def test_grid_on_a_local_dask_cluster_matches_the_sequential_run(tmp_path, prefect_harness, sequential):
    on_dask = run_on_dask(tmp_path / "local", {"n_workers": 2, "threads_per_worker": 1})
    for a, b in zip(sequential, on_dask, strict=True):
        assert same_results(a, b), differing(a, b)
    assert all(r["forget_test_acc"] == 0.0 for r in on_dask if r["method"] == "nhle")


def test_grid_on_a_running_cluster_by_address_matches_the_sequential_run(tmp_path, prefect_harness, sequential):
    """`dask scheduler` and `dask worker` as separate processes, reached by dask.address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(tmp_path / f"{name}.log", "wb") for name in ("scheduler", "worker")]
    scheduler = subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
        stdout=logs[1],
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        on_cluster = run_on_dask(tmp_path / "cluster", {"address": address})
        for a, b in zip(sequential, on_cluster, strict=True):
            assert same_results(a, b), differing(a, b)
        worker_log = (tmp_path / "worker.log").read_text()
        assert "Starting Worker" in worker_log and scheduler.poll() is None
    finally:
        for process in (worker, scheduler):
            stop_process(process)
        for log in logs:
            log.close()


def test_grid_differences_are_caught(tmp_path):
    row = {"method": "nhle", "forget_test_acc": 0.0, "forget_silhouette": 0.1, "seconds": 1.0, "original": {"x": 1}}
    assert same_results(row, {**row, "seconds": 9.0, "forget_silhouette": 0.100001})
    assert not same_results(row, {**row, "forget_test_acc": 0.01})
    assert not same_results(row, {**row, "original": {"x": 2}})
    assert not same_results(row, {**row, "forget_silhouette": 0.2})


def test_dask_address_in_config_or_environment_wins(monkeypatch):
    params = params_from_dict({"dask": {"address": "tcp://scheduler:8786"}})
    assert params.dask_address() == "tcp://scheduler:8786"
    monkeypatch.setenv("DASK_ADDRESS", "tcp://other:8786")
    assert params.dask_address() == "tcp://other:8786"
