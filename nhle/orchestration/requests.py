"""Forget requests as an operation: submit, process (claim, recover, unlearn, audit), show.

    nhle request submit --classes 3 --requester dpo@example.com --reason "GDPR art. 17 request 1142"
    nhle request process          # one pass now: every pending request, unlearned together
    nhle schedule                 # the same pass as a Prefect deployment on params.yaml's cron
    nhle request list | show ID

The ledger (nhle.adapters.ledger) is the record of truth: a request is committed there before anything
else happens, and it ends done or failed only once its model version is settled and its audit
report is logged. The steps here are plain functions; flows/nhle_flows.py:process_requests runs
them as Prefect tasks and the `forget` flow as a subflow.
"""
from __future__ import annotations

import json
from pathlib import Path

from nhle.core.config import Params, resolve_uri
from nhle.core.gates import classes_left
from nhle.adapters.ledger import ForgetRequest, Ledger


class RequestRejected(ValueError):
    """A request refused at submission; it is recorded in the ledger as rejected."""

    def __init__(self, request: ForgetRequest):
        super().__init__(f"forget request {request.id} rejected: {request.error}")
        self.request = request


def open_ledger(params: Params, project_dir: str | Path = ".") -> Ledger:
    return Ledger(resolve_uri(params.requests_database(), Path(project_dir)))


def submit(params: Params, project_dir: Path, spec: str, requester: str, reason: str) -> ForgetRequest:
    """Validate `spec` against the current champion and record the request: pending, or rejected
    (then RequestRejected is raised) when a class is unknown or already forgotten, or when
    forgetting it with the pending requests would leave no class."""
    from nhle.core.data import parse_classes
    from nhle.core.experiment import validate_forget
    from nhle.orchestration.pipeline import load_champion
    from nhle.adapters.tracking import configure

    if not str(spec).strip():
        raise ValueError("--classes is empty: give class indices or names, e.g. 3 or 2,7")
    if not requester.strip() or not reason.strip():
        raise ValueError("a forget request needs --requester (who asks) and --reason (why), both non-empty")
    ledger = open_ledger(params, project_dir)
    configure(params, project_dir)
    champion = load_champion(params)
    name = f"{params.registry.model_name}@{params.registry.champion_alias}"
    if champion is None:
        return _reject(ledger, [], [str(spec)], requester, reason, None,
                       f"there is no {name} to forget from: run `nhle run` (or the train_base flow) first")
    model, checkpoint, version = champion
    class_names = checkpoint["class_names"]
    try:
        classes = validate_forget(model, spec, class_names, params.retrain_baseline)
    except ValueError as err:
        try:
            classes = parse_classes(spec, class_names)
        except ValueError:
            classes = []
        return _reject(ledger, classes, [class_names[c] for c in classes] or [str(spec)], requester, reason,
                       str(version.version), f"{err} ({name} is version {version.version})")
    pending = {c for request in ledger.list("pending") + ledger.list("processing") for c in request.classes}
    if classes_left(model.num_classes, model.forgotten_classes, pending | set(classes)) < 1:
        return _reject(ledger, classes, [class_names[c] for c in classes], requester, reason, str(version.version),
                       f"together with the pending requests for {sorted(pending)} this would leave no class")
    return ledger.submit(classes, [class_names[c] for c in classes], requester, reason,
                         model_version_before=str(version.version))


def _reject(ledger: Ledger, classes, names, requester, reason, version, error) -> ForgetRequest:
    raise RequestRejected(ledger.submit(classes, names, requester, reason, status="rejected", error=error,
                                        model_version_before=version))


def batch_version(params: Params, batch: str):
    """The model version a run of `batch` registered, if it got that far."""
    from nhle.adapters.tracking import versions_tagged

    found = versions_tagged(params.registry.model_name, "nhle.batch", batch)
    return found[-1] if found else None


def fail_orphan_runs(batch: str) -> list[str]:
    """Mark the MLflow runs of a `batch` that died before registering a version FAILED (a killed
    run is left RUNNING); returns their ids."""
    from mlflow import MlflowClient

    from nhle.adapters.tracking import runs_tagged

    client = MlflowClient()
    orphans = [run.info.run_id for run in runs_tagged("nhle.batch", batch)]
    for run_id in orphans:
        client.set_tag(run_id, "nhle.abandoned", "true")
        client.set_terminated(run_id, "FAILED")
    return orphans


def close_requests(ledger: Ledger, owner: str, params: Params, requests: list[ForgetRequest], version: str,
                   note: str | None = None) -> list[ForgetRequest]:
    """Write each request's audit report (JSON + Markdown, logged to the version's run and linked
    from the version) and end it done (version promoted) or failed (it was not)."""
    from mlflow import MlflowClient

    from nhle.core.audit import audit_markdown, build_audit
    from nhle.adapters.tracking import describe_version, run_json, tag_version

    client = MlflowClient()
    name = params.registry.model_name
    model_version = client.get_model_version(name, str(version))
    tags, run_id = dict(model_version.tags), model_version.run_id
    report, parity, gates = (run_json(run_id, f) for f in ("report.json", "parity.json", "gates.json"))
    promoted = tags.get("promoted") == "true"
    closed = []
    for request in requests:
        audit = build_audit({**request.as_dict(), "claimed_by": None}, name, str(version), tags, run_id, report,
                            parity, gates, note)
        base = f"audit/request-{request.id}"
        client.log_dict(run_id, audit, f"{base}.json")
        client.log_text(run_id, audit_markdown(audit), f"{base}.md")
        uri = f"runs:/{run_id}/{base}.md"
        tag_version(name, str(version), {f"audit.request.{request.id}": uri})
        ledger.record(request.id, owner, data_version_before=audit["data"]["before"],
                      model_version_before=audit["model"]["version_before"])
        closed.append(ledger.finish(request.id, owner, "done" if promoted else "failed",
                                    model_version_after=str(version), data_version_after=audit["data"]["after"],
                                    report_uri=uri, error=None if promoted else audit["outcome"]["reason"]))
    describe_version(name, str(version))  # now with the audit reports
    return closed


def read_report(uri: str) -> str:
    """The Markdown audit report a ledger row points to."""
    import mlflow

    return mlflow.artifacts.load_text(uri)


def describe(request: ForgetRequest) -> str:
    """One line per request for `nhle request list`."""
    from nhle.core.audit import terminal_text

    after = f" -> v{request.model_version_after}" if request.model_version_after else ""
    return terminal_text(f"{request.id:>5}  {request.status:<10}  classes {request.class_names}  "
                         f"v{request.model_version_before or '-'}{after}  {request.requester}  "
                         f"{request.submitted_at:%Y-%m-%d %H:%M:%S}Z" + (f"  error: {request.error}" if request.error else ""))


def as_json(request: ForgetRequest) -> str:
    return json.dumps(request.as_dict(), indent=2)


__all__ = ["RequestRejected", "as_json", "batch_version", "close_requests", "describe", "fail_orphan_runs",
           "open_ledger", "read_report", "submit"]
