"""The unlearning benchmark grid (seeds x cases x methods) as a Prefect flow on a Dask cluster.

    nhle bench unlearning --engine dask --quick --out /tmp/grid      # a local Dask cluster (dask.n_workers)
    DASK_ADDRESS=tcp://scheduler:8786 nhle bench unlearning --engine dask --seeds 0,1,2,3,4

Each base model (one per seed) and each (seed, case, method) run is one Prefect task on
prefect-dask's DaskTaskRunner; nhle.bench.unlearning decides what runs and assembles the rows, so the files
written are those of the sequential run (`--engine sequential`), unit for unit. With a real
cluster the workers need nhle installed; the flow itself (and the files) stay on this machine.
Times are still ratios to a retrain, but measured on whichever worker ran each unit: compare
them only on a cluster of identical workers.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from nhle.bench.unlearning import Grid, bench_unlearning, run_unit, train_seed
from nhle.core.config import DaskConfig

TASKS = {
    train_seed: task(
        train_seed, name="train-base-model", task_run_name="base-model-seed-{seed}", cache_policy=NO_CACHE
    ),
    run_unit: task(
        run_unit, name="unlearning-run", task_run_name="{method}-seed-{seed}-classes-{classes}", cache_policy=NO_CACHE
    ),
}


def submit(fn, *args):
    """nhle.bench.unlearning's engine interface: the unit as a Prefect task on the flow's task runner."""
    return TASKS[fn].submit(*args)


@flow(name="benchmark-grid", validate_parameters=False)
def benchmark_grid(grid: Grid, out: str) -> list[dict]:
    return bench_unlearning(grid, Path(out), submit=submit, engine="prefect-dask")


def dask_runner(config: DaskConfig, address: str = "") -> DaskTaskRunner:
    """A runner on the cluster at `address`, or on a local cluster of worker processes."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.n_workers,
            "threads_per_worker": config.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        }
    )


def run_on_dask(grid: Grid, out: Path, config: DaskConfig, address: str = "") -> list[dict]:
    return benchmark_grid.with_options(task_runner=dask_runner(config, address))(grid, str(out))
