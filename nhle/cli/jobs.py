"""The commands that run flows and say what happened: `nhle run` (run_command) and `nhle import`
(import_command). Each loads its flows from nhle_flows.pipeline, as Prefect deploys them, runs
them on a temporary Prefect server that dies with this process, and prints each version, its
gates and the commands that open the MLflow UI and serve the champion.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from nhle.core.config import Params, params_as_dict
from nhle.core.gates import GateResult, advice

if TYPE_CHECKING:  # torch is imported by the commands that run a model, not by building the CLI
    from nhle.core.models import MaskedClassifier
    from nhle.orchestration.steps import FlowResult

log = logging.getLogger(__name__)


def flows_file(project_dir: Path, name: str = "pipeline.py") -> Path:
    """flows/<name> of the nhle checkout at project_dir: the entrypoint a deployment names."""
    path = Path(project_dir).resolve() / "flows" / name
    if not path.exists():
        raise FileNotFoundError(
            f"no flows/{name} under {Path(project_dir).resolve()}: run nhle from the "
            "nhle checkout or pass --project-dir"
        )
    return path


def load_flow(name: str):
    """A flow of nhle_flows.pipeline (flows/pipeline.py), loaded by entrypoint as Prefect does."""
    from prefect.flows import load_flow_from_entrypoint  # noqa: PLC0415 - lazy: Prefect

    return load_flow_from_entrypoint(f"nhle_flows.pipeline:{name}")


@contextlib.contextmanager
def flows_ready(*names: str):
    """{name: flow} of nhle_flows.pipeline, loaded and warmed up while a temporary Prefect server
    starts (nhle.adapters.prefect_server.prefect_server_starting), yielded once it answers; the
    server stops when the block ends."""
    from nhle.adapters.prefect_server import prefect_server_starting  # noqa: PLC0415 - lazy: Prefect

    with prefect_server_starting() as ready:  # its start-up overlaps the imports below
        flows = {name: load_flow(name) for name in names}
        warm_up()
        ready()
        yield flows


def warm_up() -> None:
    """Import what the first flow would otherwise stop for: torch._dynamo, which every torch
    optimizer imports when it is first made (1-2 s on 2 cores), and MLflow's map of installed
    packages, which logging the first model builds (about 1 s). Called just before waiting for
    the temporary Prefect server, it runs while that server starts. In this thread, never a
    thread of its own: imports racing the main thread's can see half-initialised modules."""
    try:
        import torch._dynamo  # noqa: F401, PLC0415 - the warm-up itself
        from mlflow.utils import requirements_utils  # noqa: PLC0415 - lazy: MLflow

        requirements_utils._init_packages_to_modules_map()
    except Exception as err:  # noqa: BLE001 - a cache not warmed is only slower
        log.debug("warming up: %s", err)


def run_command(params: Params, forget_spec: str | None, project_dir: Path, started: float | None = None) -> int:
    """`nhle run`: base model if no champion, one forget flow, then the registry state. The
    request is checked (against the champion, else the dataset's classes) before anything
    starts, so a typo costs no flow run and no Prefect server. `started`: the command's start
    (time.perf_counter()), for the time in all it prints."""
    from nhle.adapters.tracking import configure  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.data import parse_classes  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.experiment import load_data, validate_forget  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.steps import load_champion  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    started = started or time.perf_counter()
    project_dir = project_dir.resolve()
    uri = configure(params, project_dir)
    forget_spec = forget_spec or params.forget
    champion = load_champion(params)
    if champion is None:
        parse_classes(forget_spec, load_data(params.data).class_names)
    elif not already_forgotten(champion[0], champion[1]["class_names"], forget_spec):
        validate_forget(champion[0], forget_spec, champion[1]["class_names"])
    results = []
    with flows_ready("train_base", "forget") as flows:
        if champion is None:
            results.append(timed(flows["train_base"], params=params_as_dict(params), project_dir=str(project_dir)))
            champion = load_champion(params)
        if champion and already_forgotten(champion[0], champion[1]["class_names"], forget_spec):
            print(
                f"{params.registry.champion_name()} (version {champion[2].version}) has already forgotten "
                f"{forget_spec}; nothing to do. Ask for other classes with `nhle run --classes ...`."
            )
        else:
            results.append(
                timed(flows["forget"], classes=forget_spec, params=params_as_dict(params), project_dir=str(project_dir))
            )
    print_results(params, results, started, uri, "run")
    return 0 if not results or results[-1].promoted else 1


def timed(flow, **parameters) -> FlowResult:
    """A flow run's result with its wall-clock seconds as `flow_seconds`."""
    started = time.perf_counter()
    return replace(flow(**parameters), flow_seconds=time.perf_counter() - started)


def print_results(params: Params, results: list[FlowResult], started: float, uri: str, command: str) -> None:
    """What `nhle run` and `nhle import` print: each flow's report, version, gates and timing."""
    from nhle.adapters.tracking import aliases_of, name_flag  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.experiment import summary_lines  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    name = params.registry.model_name
    for result in results:
        if result.report:
            print("\n" + "\n".join(summary_lines(result.report)))
        print(
            f"\n{name} version {result.version} ({result.summary}): "
            f"{'promoted' if result.promoted else 'not promoted'} - {result.reason}"
        )
        for line in attempt_lines(result.attempts or []):
            print(f"  {line}")
        gates = [GateResult(**gate) for gate in result.gates]
        for gate in gates:
            print(f"  {gate.describe()}")
        for line in advice(gates):
            print(f"  what to try - {line}")
        print(f"  aliases now: {aliases_of(name, result.version) or 'none'}")
        for told in result.notified:
            print(
                f"  server {told['url']}: {told['outcome']}, serving version {told.get('serving_version')} "
                f"{told['seconds']:.2f} s after the alias moved" + (f" ({told['error']})" if "error" in told else "")
            )
        compute = result.compute_seconds
        print(
            f"  flow {result.flow_seconds:.1f} s, of which "
            + ", ".join(f"{k} {v:.1f} s" for k, v in compute.items())
            + f"; evaluation, export, tracking and orchestration {result.flow_seconds - sum(compute.values()):.1f} s"
        )
        if result.step_seconds:
            print("  steps: " + ", ".join(f"{step} {seconds:.2f} s" for step, seconds in result.step_seconds))
    print(
        f"\nnhle {command}: {time.perf_counter() - started:.1f} s in all "
        f"({time.perf_counter() - started - sum(r.flow_seconds for r in results):.1f} s outside the flows)"
    )
    mlflow_command = Path(sys.executable).parent / "mlflow"  # the environment nhle runs in, activated or not
    print(f"\nMLflow UI:   {mlflow_command} ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    flag = name_flag(name)
    print(
        f"Serve it:    .venv/bin/nhle serve{flag} --host 127.0.0.1 --port 8000   "
        f"(ONNX Runtime, follows {params.registry.champion_name()})"
    )


def attempt_lines(attempts: list[dict]) -> list[str]:
    """One line per unlearning attempt whose candidate failed a gate: its recipe, what became of
    it and the failed gates with their values and bounds."""
    return [
        f"attempt {a['attempt']} ({a['recipe']}): {a['outcome']}"
        + (f" as version {a['version']}" if a.get("version") else "")
        + f" - {a['reason']}"
        for a in attempts
        if not a["passed"]
    ]


def import_command(params: Params, project_dir: Path, started: float | None = None) -> int:
    """`nhle import`: the import flow (evaluate, export, parity, register, gates, promote), then
    the registry state. Exit 0 when the imported version became champion."""
    started = started or time.perf_counter()
    with flows_ready("import_model") as flows:
        from nhle.adapters.tracking import configure, name_flag  # noqa: PLC0415 - lazy: MLflow

        project_dir = project_dir.resolve()
        uri = configure(params, project_dir)
        result = timed(flows["import_model"], params=params_as_dict(params), project_dir=str(project_dir))
    print_results(params, [result], started, uri, "import")
    if result.promoted:
        flag = name_flag(params.registry.model_name)
        print(
            f"Forget:      .venv/bin/nhle run{flag} --classes {result.class_names[0]}   (or `nhle request submit"
            f"{flag} --classes ...`; its classes: {', '.join(result.class_names)})"
        )
    return 0 if result.promoted else 1


def already_forgotten(model: MaskedClassifier, class_names: list[str], spec) -> bool:
    from nhle.core.data import parse_classes  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    return all(bool(model.forget_mask[c]) for c in parse_classes(spec, class_names))
