"""nhle's Prefect flows: `train-base`, `import`, `forget`, `complete-evidence` (a forget's
follow-up, after its promotion) and `process-forget-requests`. Each flow is
nhle.orchestration.pipeline's function of the same name with every step a Prefect task.

    python -m nhle_flows.pipeline forget --classes 3     # one run now (ephemeral Prefect, no server)
    python -m nhle_flows.pipeline train_base
    python -m nhle_flows.pipeline import_model           # = `nhle import`: the model params.yaml names
    python -m nhle_flows.pipeline process_requests       # = `nhle request process`; `nhle schedule` serves it
    python -m nhle_flows.pipeline complete_evidence --version 2   # what a forget completes after promoting
    prefect deploy flows/pipeline.py:forget -n forget -p <work-pool>      # from the checkout

The flows read params.yaml of `project_dir` unless given `params` (a dict in the shape of
nhle.core.config.Params). What each flow does, step by step: nhle.orchestration.pipeline.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import prefect.artifacts
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nhle.adapters.tracking import configure, version_page
from nhle.core.config import Params, load_params, params_as_dict, params_from_dict
from nhle.orchestration import pipeline, requests, steps
from nhle.orchestration.steps import FlowResult

# Models and tensors pass between tasks in memory: nothing to hash, nothing to cache.
step = task(cache_policy=NO_CACHE)
retried = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)  # idempotent I/O only
TASKS = {
    fn: (
        retried
        if fn in (steps.load_champion, steps.data_of_version, steps.version_data, requests.claim_requests)
        else step
    )(fn)
    for fn in (
        steps.load_champion,
        steps.training_data,
        steps.check_settings,
        steps.data_of_version,
        steps.version_data,
        steps.train_candidate,
        steps.import_candidate,
        steps.forget_candidate,
        steps.export_and_check,
        steps.register_candidate,
        steps.gates_of,
        steps.finish_version,
        steps.start_attempt,
        steps.end_attempt,
        steps.record_attempts,
        steps.clean_up_after_dead_runs,
        steps.versions_with_pending_evidence,
        steps.evidence_work,
        steps.measure_evidence,
        steps.draw_evidence_plots,
        steps.delete_forgotten_samples,
        steps.record_evidence,
        requests.claim_requests,
        requests.recover_batch,
        requests.close_requests,
    )
}


def as_task(fn, *args):
    """nhle.orchestration's engine interface: the step as its Prefect task, in this flow run;
    pipeline.complete_evidence as the complete-evidence flow, a run of its own under this one."""
    if fn is pipeline.complete_evidence:
        params, root, version = args[:3]  # the engine and logger it is given are the flow's own
        return complete_evidence(version=version, params=params_as_dict(params), project_dir=str(root))
    return TASKS[fn](*args)


def resolve(params: dict | None, project_dir: str) -> tuple[Params, Path]:
    root = Path(project_dir).resolve()
    resolved = params_from_dict(params) if params is not None else load_params(root / "params.yaml")
    configure(resolved, root)
    return resolved, root


def mlflow_ui_links(tracking_uri: str, default_ui: str, environ=None) -> tuple[str, str]:
    """(base address of the MLflow UI for links, a note saying which command opens the UI there).

    `default_ui` is nhle.adapters.tracking.version_page's address: the tracking server's own for
    an http(s) tracking URI (used as it is, no note needed), else the address `mlflow ui` takes by
    default. For a local store (SQLite, a folder) the environment variable MLFLOW_UI_URL, when set,
    names where the UI really runs (another port or host); the note gives the `mlflow ui` command
    that serves this store at the linked address."""
    if tracking_uri.startswith(("http://", "https://")):
        return default_ui.rstrip("/"), ""
    env = os.environ if environ is None else environ
    configured = (env.get("MLFLOW_UI_URL") or "").strip().rstrip("/")
    base = configured or default_ui.rstrip("/")
    command = f"mlflow ui --backend-store-uri {tracking_uri}"
    try:
        address = urlsplit(base)
        host, port = address.hostname, address.port
    except ValueError:  # a malformed MLFLOW_UI_URL: links as given, the plain command
        host = port = None
    if host and host not in ("127.0.0.1", "localhost"):
        command += f" --host {host}"
    if port and port != 5000:
        command += f" --port {port}"
    source = (
        "from MLFLOW_UI_URL"
        if configured
        else "the default address of `mlflow ui`; set MLFLOW_UI_URL if yours runs elsewhere"
    )
    return base, f" (links: {base}, {source}; open it with `{command}`)"


def publish_artifacts(params: Params, result: FlowResult) -> None:
    """The outcome where a Prefect user looks (the flow run's Artifacts): the version's own
    description from MLflow (what it forgot, gates, where the evidence is) and the gates as a table."""
    name, version = params.registry.model_name, result.version
    key = re.sub(r"[^a-z0-9-]+", "-", f"{name}-version-{version}".lower())
    description, default_ui = version_page(name, version)
    verdict = "promoted" if result.promoted else "not promoted"
    ui, where = mlflow_ui_links(mlflow.get_tracking_uri(), default_ui)  # the resolved (absolute) store URI
    description = description.replace("](#/", f"]({ui}/#/")  # the description's links are relative to the UI
    prefect.artifacts.create_markdown_artifact(
        key=key,
        markdown=f"# {name} version {version}: {verdict}\n\n[MLflow version page]"
        f"({ui}/#/models/{name}/versions/{version}){where}\n\n{description}",
        description=f"{name} version {version}: {verdict} ({result.reason})",
    )
    prefect.artifacts.create_table_artifact(
        key=f"{key}-gates",
        table=[{k: g[k] for k in ("name", "value", "rule", "bound", "passed")} for g in result.gates],
        description=f"gates of {name} version {version}",
    )
    if len(result.attempts or []) > 1:  # a forget that fell back: why each recipe before it was dropped
        prefect.artifacts.create_table_artifact(
            key=f"{key}-attempts",
            table=[{k: a[k] for k in ("attempt", "recipe", "outcome", "reason", "run_id")} for a in result.attempts],
            description=f"unlearning attempts behind {name} version {version}",
        )


@flow(name="train-base", flow_run_name="train-base")
def train_base(params: dict | None = None, project_dir: str = ".") -> FlowResult:
    """Train a base model on the configured data and register it (champion if its gates hold)."""
    resolved, root = resolve(params, project_dir)
    result = pipeline.train_base(resolved, root, as_task, get_run_logger())
    publish_artifacts(resolved, result)
    return result


@flow(name="import", flow_run_name="import")
def import_model(params: dict | None = None, project_dir: str = ".") -> FlowResult:
    """Register your model (params.yaml's model section: from_mlflow, else arch + weights) as a
    base version of the registered model, champion if its gates hold, like a trained base model."""
    resolved, root = resolve(params, project_dir)
    result = pipeline.import_model(resolved, root, as_task, get_run_logger())
    publish_artifacts(resolved, result)
    return result


@flow(name="forget", flow_run_name="forget-classes-{classes}")
def forget(
    classes: str,
    params: dict | None = None,
    project_dir: str = ".",
    batch: str | None = None,
    request_ids: list[int] | None = None,
    n_samples: int | None = None,
    encoding: str | None = None,
) -> FlowResult:
    """Forget `classes` (indices or names, comma separated) from the current champion.
    `n_samples` and `encoding` are deprecated: set unlearn.n_samples and unlearn.encoding in
    `params` (or params.yaml) instead; given, they still override those settings."""
    resolved, root = resolve(params, project_dir)
    deprecated = {k: v for k, v in (("n_samples", n_samples), ("encoding", encoding)) if v is not None}
    if deprecated:
        get_run_logger().warning(
            "the forget flow's %s parameter(s) are deprecated: set %s in params instead",
            ", ".join(deprecated),
            ", ".join(f"unlearn.{k}" for k in deprecated),
        )
        resolved = replace(resolved, unlearn=replace(resolved.unlearn, **deprecated))
    result = pipeline.forget(resolved, root, classes, batch, request_ids, as_task, get_run_logger())
    publish_artifacts(resolved, result)
    return result


@flow(name="complete-evidence", flow_run_name="complete-evidence-v{version}")
def complete_evidence(version: str, params: dict | None = None, project_dir: str = ".") -> dict:
    """After a forget's promotion, what no gate reads: the retrained reference, the plots and the
    deletion of the forgotten classes' samples from the dataset; the version's report, metrics
    and description are completed then (nothing to do when its evidence is complete)."""
    resolved, root = resolve(params, project_dir)
    return pipeline.complete_evidence(resolved, root, str(version), as_task, get_run_logger())


def forget_subflow(params: Params, root: Path, classes: str, **options) -> FlowResult:
    """The request loop's forget: the `forget` flow, as a subflow of the loop's flow run."""
    return forget(classes=classes, params=params_as_dict(params), project_dir=str(root), **options)


@flow(name="process-forget-requests", flow_run_name="forget-requests")
def process_requests(params: dict | None = None, project_dir: str = ".") -> dict:
    """Take every pending (and abandoned) forget request, unlearn their classes together in one
    `forget` subflow on top of the champion, and close each request with its audit report."""
    resolved, root = resolve(params, project_dir)
    return requests.process_requests(resolved, root, as_task, forget_subflow, get_run_logger())


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Run one nhle flow now, with ephemeral Prefect.")
    cli.add_argument(
        "flow",
        choices=("train_base", "import_model", "forget", "process_requests", "complete_evidence"),
        help="which flow",
    )
    cli.add_argument("--classes", help="forget: class(es) to forget, e.g. 3 or 2,7")
    cli.add_argument("--version", help="complete_evidence: the registered version whose evidence is pending")
    cli.add_argument("--project-dir", default=".", help="folder with params.yaml")
    args = cli.parse_args()
    from nhle.adapters.prefect_server import temporary_prefect_server

    with temporary_prefect_server():  # gone with this process, however it ends
        if args.flow == "forget":
            print(forget(classes=args.classes, project_dir=args.project_dir))
        elif args.flow == "process_requests":
            print(process_requests(project_dir=args.project_dir))
        elif args.flow == "complete_evidence":
            print(complete_evidence(version=args.version, project_dir=args.project_dir))
        elif args.flow == "import_model":
            print(import_model(project_dir=args.project_dir))
        else:
            print(train_base(project_dir=args.project_dir))
