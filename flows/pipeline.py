"""Prefect flows of nhle: `train_base`, `import_model`, `forget` and `process_requests`. Each task
is one call into nhle.orchestration.pipeline or nhle.orchestration.requests.

    python flows/nhle_flows.py forget --classes 3      # one run now (ephemeral Prefect, no server)
    python flows/nhle_flows.py train_base
    python flows/nhle_flows.py import_model            # = `nhle import`: your model, as params.yaml's model section names it
    python flows/nhle_flows.py process_requests        # = `nhle request process`; `nhle schedule` serves it
    prefect deploy flows/nhle_flows.py:forget -n forget -p <work-pool>   # deployed by file path

Not installed as a package on purpose: Prefect loads flows by path, and a top-level `flows`
module would clash in users' site-packages. The flows read params.yaml of `project_dir` unless
given `params` (a dict in the shape of nhle.core.config.Params).

train_base: data version -> train -> export -> parity -> log + register -> gates -> promote
import:     load your model (refused here if it does not fit the data) -> data version -> export -> parity
            -> log + register -> gates -> promote
forget:     champion -> data version -> NHLE + masking -> evaluate -> export -> parity
            -> log + register -> gates -> delete the forgotten classes' data (new DVC version) -> promote
process_requests: claim requests in the ledger -> settle what a dead run registered -> forget
            (subflow, the union of the classes) -> audit report per request -> close requests
"""
from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nhle import forget_requests, pipeline
from nhle.core.config import Params, load_params, params_from_dict
from nhle.core.experiment import validate_forget
from nhle.adapters.tracking import configure

# Models and tensors pass between tasks in memory: nothing to hash, nothing to cache.
step = task(cache_policy=NO_CACHE)
retried = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)  # idempotent I/O only


@retried
def load_champion(params: Params):
    return pipeline.load_champion(params)


@step
def load_data(params: Params, root: Path):
    return pipeline.with_deletions_on_record(params, root, pipeline.load_params_data(params))


@retried
def data_of_version(params: Params, project_dir: Path, version, checkpoint: dict):
    return pipeline.data_of_version(params, project_dir, version, checkpoint)


@retried
def version_data(params: Params, project_dir: Path, data):
    return pipeline.version_data(params, project_dir, data)


@step
def train(params: Params, data):
    return pipeline.train_candidate(params, data)


@step
def load_import(params: Params, root: Path, data):
    return pipeline.import_candidate(params, root, data)


@step
def unlearn(params: Params, model, checkpoint, classes: str, parent_version: str, data, seed: int):
    return pipeline.forget_candidate(params, model, checkpoint, classes, parent_version, data, seed)


@step
def export_and_check(params: Params, candidate):
    return pipeline.export_and_check(params, candidate)


@step
def log_and_register(run_id: str, params: Params, candidate, onnx_path, parity, data_version, extra_tags) -> str:
    return pipeline.log_candidate(run_id, params, candidate, onnx_path, parity, data_version, extra_tags)


@step
def judge(params: Params, candidate, parity):
    return pipeline.judge(params, candidate, parity)


@step
def settle(params: Params, project_dir: Path, run_id: str, version: str, gates, parent_version, data):
    return pipeline.settle(params, project_dir, run_id, version, gates, parent_version, data)


def resolve(params: dict | None, project_dir: str) -> tuple[Params, Path]:
    root = Path(project_dir).resolve()
    resolved = params_from_dict(params) if params is not None else load_params(root / "params.yaml")
    configure(resolved, root)
    return resolved, root


def publish_artifacts(params: Params, version: str, result: dict) -> None:
    """The outcome where a Prefect user looks (the flow run's Artifacts): the version's own
    description from MLflow (what it forgot, gates, where the evidence is) and the gates as a table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name = params.registry.model_name
    key = re.sub(r"[^a-z0-9-]+", "-", f"{name}-version-{version}".lower())
    description = MlflowClient().get_model_version(name, version).description or ""
    verdict = "promoted" if result["promoted"] else "not promoted"
    uri = mlflow.get_tracking_uri()
    # The description's links are relative to the MLflow UI; here they must name it.
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    where = "" if ui == uri.rstrip("/") else f" (links: `mlflow ui --backend-store-uri {uri}` on its default address)"
    description = description.replace("](#/", f"]({ui}/#/")
    create_markdown_artifact(key=key, markdown=f"# {name} version {version}: {verdict}\n\n[MLflow version page]"
                             f"({ui}/#/models/{name}/versions/{version}){where}\n\n{description}",
                             description=f"{name} version {version}: {verdict} ({result['reason']})")
    create_table_artifact(key=f"{key}-gates", table=[{k: g[k] for k in ("name", "value", "rule", "bound", "passed")}
                                                      for g in result["gates"]],
                          description=f"gates of {name} version {version}")


def publish(params: Params, root: Path, run_id: str, candidate, data_version, extra_tags: dict | None = None) -> dict:
    """export -> parity -> log + register -> gates -> delete forgotten data -> promote."""
    try:
        onnx_path, parity = export_and_check(params, candidate)
        version = log_and_register(run_id, params, candidate, onnx_path, parity, data_version, extra_tags)
        gates = judge(params, candidate, parity)
        forgot = candidate.report is not None
        result = settle(params, root, run_id, version, gates, candidate.parent_version, candidate.data if forgot else None)
    finally:  # everything in it is in MLflow, or the step failed and the flow run says why
        pipeline.discard_work_dir(candidate)
    publish_artifacts(params, version, result)
    logger = get_run_logger()
    logger.info("version %s: %s (%s)", version, "promoted" if result["promoted"] else "not promoted", result["reason"])
    for told in result["notified"]:
        logger.info("server %s told: %s, serving version %s %.2f s after the alias moved%s", told["url"],
                    told["outcome"], told.get("serving_version"), told["seconds"], f" ({told['error']})" if "error" in told else "")
    return result


def tracked(params: Params, run_name: str, tags: dict, body) -> dict:
    left = pipeline.clean_up_after_dead_runs(params)
    for run in left["runs"]:
        get_run_logger().warning("MLflow run %s was left RUNNING by %s, a process that is gone: marked KILLED%s",
                                 run["run_id"], run["owner"], f"; version(s) {run['abandoned_versions']} it registered "
                                 "before judging their gates marked abandoned" if run["abandoned_versions"] else "")
    if left["work_dirs"]:
        get_run_logger().warning("removed %d scratch folder(s) of dead runs: %s", len(left["work_dirs"]), left["work_dirs"])
    run_id = pipeline.start_run(params, run_name, tags)
    try:
        result = body(run_id)
    except BaseException:
        MlflowClient().set_terminated(run_id, "FAILED")
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")
    return result


@flow(name="train-base", flow_run_name="train-base")
def train_base(params: dict | None = None, project_dir: str = ".") -> dict:
    """Train a base model on the configured data and register it (champion if its gates hold)."""
    resolved, root = resolve(params, project_dir)
    data = load_data(resolved, root)
    data_version = version_data(resolved, root, data)

    def body(run_id):
        candidate = train(resolved, data)
        result = publish(resolved, root, run_id, candidate, data_version)
        return {**result, "summary": f"base {resolved.model.arch} on {data.name}", "data_version": data_version.md5,
                "compute_seconds": {"train": candidate.checkpoint_meta["metrics"]["train_seconds"]}}

    return tracked(resolved, f"train-base-{resolved.data.dataset}", {"nhle.flow": "train_base"}, body)


@flow(name="import", flow_run_name="import")
def import_model(params: dict | None = None, project_dir: str = ".") -> dict:
    """Register your model (params.yaml's model section: from_mlflow, else arch + weights) as a
    base version of the registered model, champion if its gates hold, like a trained base model."""
    resolved, root = resolve(params, project_dir)
    data = load_data(resolved, root)
    candidate = load_import(resolved, root, data)  # refused before anything is versioned or logged
    data_version = version_data(resolved, root, data)
    source = candidate.checkpoint_meta["source"]
    what = source.get("uri") or f"{source['arch']} ({Path(source['weights']).name if 'weights' in source else 'random'})"

    def body(run_id):
        result = publish(resolved, root, run_id, candidate, data_version, {"nhle.source": source["kind"]})
        return {**result, "summary": f"imported {what} on {data.name}", "data_version": data_version.md5,
                "class_names": data.class_names,
                "compute_seconds": {"import": candidate.checkpoint_meta["metrics"]["import_seconds"]}}

    return tracked(resolved, f"import-{candidate.model.arch}-{data.name}", {"nhle.flow": "import",
                                                                            "nhle.source": source["kind"]}, body)


@flow(name="forget", flow_run_name="forget-classes-{classes}")
def forget(classes: str, params: dict | None = None, project_dir: str = ".", seed: int = 0,
           n_samples: int | None = None, encoding: str | None = None, batch: str | None = None,
           request_ids: list[int] | None = None) -> dict:
    """Forget `classes` (indices or names, comma separated) from the current champion.

    `batch` and `request_ids` (set by process_requests) tag the MLflow run and the model version,
    so a later run can find the version a crashed run registered."""
    resolved, root = resolve(params, project_dir)
    overrides = {k: v for k, v in (("n_samples", n_samples), ("encoding", encoding)) if v is not None}
    resolved = replace(resolved, unlearn=replace(resolved.unlearn, **overrides))
    champion = load_champion(resolved)
    if champion is None:
        raise ValueError(f"no {resolved.registry.model_name}@{resolved.registry.champion_alias} to forget from: "
                         "run the train_base flow (or `nhle run`) first")
    model, checkpoint, parent = champion
    parent_version = str(parent.version)
    validate_forget(model, classes, checkpoint["class_names"], resolved.retrain_baseline)  # before anything is logged
    data = data_of_version(resolved, root, parent, checkpoint)
    data_version = version_data(resolved, root, data)
    batch_tags = {"nhle.batch": batch, "nhle.request_ids": ",".join(map(str, request_ids or []))} if batch else {}

    def body(run_id):
        candidate = unlearn(resolved, model, checkpoint, classes, parent_version, data, seed)
        result = publish(resolved, root, run_id, candidate, data_version, batch_tags)
        names = candidate.report["forget_class_names"]
        return {**result, "summary": f"forgot {names} from version {parent_version}", "forgotten": names,
                "data_version": data_version.md5, "report": candidate.report,
                "compute_seconds": candidate.report["seconds"]}

    return tracked(resolved, f"forget-{classes.replace(',', '-')}-from-v{parent_version}",
                   {"nhle.flow": "forget", "nhle.forget": classes, "nhle.parent_version": parent_version,
                    **batch_tags}, body)


@retried
def claim_requests(ledger, owner: str, lease_seconds: float):
    return ledger.claim(owner, lease_seconds)


@step
def recover_batch(params: Params, root: Path, batch: str):
    """A crashed run's batch: settle the version it registered, or fail its orphaned runs."""
    version = forget_requests.batch_version(params, batch)
    if version is None:
        forget_requests.fail_orphan_runs(batch)
        return None
    return pipeline.resume_version(params, root, version)


@step
def close_requests(ledger, owner: str, params: Params, requests, version: str, note: str | None = None):
    return forget_requests.close_requests(ledger, owner, params, requests, version, note)


def held(ledger, owner: str, requests) -> list:
    still = {r.id for r in ledger.list("processing") if r.claimed_by == owner}
    return [r for r in requests if r.id in still]


@flow(name="process-forget-requests", flow_run_name="forget-requests")
def process_requests(params: dict | None = None, project_dir: str = ".") -> dict:
    """Take every pending (and abandoned) forget request, unlearn their classes together in one
    `forget` subflow on top of the champion, and close each request with its audit report."""
    from nhle.adapters.ledger import LeaseKeeper, new_owner

    resolved, root = resolve(params, project_dir)
    ledger = forget_requests.open_ledger(resolved, root)
    owner = new_owner()
    claimed = claim_requests(ledger, owner, resolved.requests.lease_seconds)
    logger = get_run_logger()
    logger.info("claimed forget requests %s as %s", [r.id for r in claimed], owner)
    versions = []
    with LeaseKeeper(ledger, owner, resolved.requests.lease_seconds):
        try:
            for batch in sorted({r.batch for r in claimed if r.batch}):
                result = recover_batch(resolved, root, batch)
                if result is not None:
                    group = [r for r in held(ledger, owner, claimed) if r.batch == batch]
                    close_requests(ledger, owner, resolved, group, result["version"],
                                   f"version registered by an earlier run of batch {batch} that stopped")
                    versions.append(result["version"])
            versions += process_fresh(ledger, owner, resolved, root, held(ledger, owner, claimed))
        except Exception as err:
            for request in held(ledger, owner, claimed):
                ledger.release(request.id, owner, f"{type(err).__name__}: {err}", resolved.requests.max_attempts)
            raise
    closed = [ledger.get(r.id) for r in claimed]
    return {"requests": [r.as_dict() for r in closed], "versions": versions}


def process_fresh(ledger, owner: str, params: Params, root: Path, requests) -> list[str]:
    """Requests no earlier run got to: already forgotten by the champion -> done; the rest are
    unlearned together in one forget subflow."""
    if not requests:
        return []
    champion = load_champion(params)
    if champion is None:
        raise ValueError(f"no {params.registry.model_name}@{params.registry.champion_alias}: run train_base first")
    model, checkpoint, version = champion
    masked = set(model.forgotten_classes)
    satisfied = [r for r in requests if set(r.classes) <= masked]
    if satisfied:
        close_requests(ledger, owner, params, satisfied, str(version.version),
                       f"already forgotten by version {version.version}")
    todo = [r for r in requests if r not in satisfied]
    if not todo:
        return [str(version.version)]
    classes = ",".join(str(c) for c in sorted({c for r in todo for c in r.classes} - masked))
    for request in todo:
        ledger.record(request.id, owner, batch=owner, model_version_before=str(version.version))
    result = forget(classes=classes, params=pipeline.params_as_dict(params), project_dir=str(root), batch=owner,
                    request_ids=[r.id for r in todo])
    close_requests(ledger, owner, params, held(ledger, owner, todo), result["version"])
    return [result["version"]]


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Run one nhle flow now, with ephemeral Prefect.")
    cli.add_argument("flow", choices=("train_base", "import_model", "forget", "process_requests"), help="which flow")
    cli.add_argument("--classes", help="forget: class(es) to forget, e.g. 3 or 2,7")
    cli.add_argument("--project-dir", default=".", help="folder with params.yaml")
    args = cli.parse_args()
    from nhle.adapters.prefect_server import temporary_prefect_server

    with temporary_prefect_server():  # gone with this process, however it ends
        if args.flow == "forget":
            print(forget(classes=args.classes, project_dir=args.project_dir))
        elif args.flow == "process_requests":
            print(process_requests(project_dir=args.project_dir))
        elif args.flow == "import_model":
            print(import_model(project_dir=args.project_dir))
        else:
            print(train_base(project_dir=args.project_dir))
