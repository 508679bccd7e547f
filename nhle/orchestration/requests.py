"""Forget requests as an operation: submit, process (claim, recover, unlearn, audit), show.

    nhle request submit --classes 3 --requester dpo@example.com --reason "GDPR art. 17 request 1142"
    nhle request process          # one pass now: every pending request, unlearned together
    nhle schedule                 # the same pass as a Prefect deployment on params.yaml's cron
    nhle request list | show ID

The ledger (nhle.adapters.ledger) is the record of truth: a request is committed there before anything
else happens, and it ends done or failed only once its model version is settled and its audit
report is logged. Everything here is a plain function; process_requests takes the engine that
runs each step (`engine`) and the forget it calls, which flows/pipeline.py makes Prefect tasks and
the `forget` flow (a subflow).
"""

from __future__ import annotations

import json
from pathlib import Path

from nhle.adapters.deletions import open_ledger
from nhle.adapters.ledger import ForgetRequest, Ledger, LedgerEvent
from nhle.core.audit import audit_markdown, build_audit, terminal_text, with_attempts, with_timeline
from nhle.core.config import Params
from nhle.core.files import ATTEMPTS, GATES, NOTIFIED, PARITY, REPORT, from_tag
from nhle.core.gates import classes_left


class RequestRejected(ValueError):
    """A request refused at submission; it is recorded in the ledger as rejected."""

    def __init__(self, request: ForgetRequest):
        super().__init__(f"forget request {request.id} rejected: {request.error}")
        self.request = request


def submit(params: Params, project_dir: Path, spec: str, requester: str, reason: str) -> ForgetRequest:
    """Validate `spec` against the current champion and record the request: pending, or rejected
    (then RequestRejected is raised) when a class is unknown or already forgotten, or when
    forgetting it with the pending requests would leave no class."""
    from nhle.adapters.tracking import configure  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.data import parse_classes  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.experiment import validate_forget  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.steps import load_champion  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    if not str(spec).strip():
        raise ValueError("--classes is empty: give class indices or names, e.g. 3 or 2,7")
    if not requester.strip() or not reason.strip():
        raise ValueError("a forget request needs --requester (who asks) and --reason (why), both non-empty")
    ledger = open_ledger(params, project_dir)
    configure(params, project_dir)
    champion = load_champion(params)
    if champion is None:
        return _reject(ledger, params, [], [str(spec)], requester, reason, None, params.registry.no_champion())
    model, checkpoint, version = champion
    class_names = checkpoint["class_names"]
    try:
        classes = validate_forget(model, spec, class_names)
    except ValueError as err:
        try:
            classes = parse_classes(spec, class_names)
        except ValueError:
            classes = []
        return _reject(
            ledger,
            params,
            classes,
            [class_names[c] for c in classes] or [str(spec)],
            requester,
            reason,
            str(version.version),
            f"{err} ({params.registry.champion_name()} is version {version.version})",
        )
    model_name = params.registry.model_name
    pending = {
        c
        for status in ("pending", "processing")
        for request in ledger.list(status, model_name)
        for c in request.classes
    }
    if classes_left(model.num_classes, model.forgotten_classes, pending | set(classes)) < 1:
        return _reject(
            ledger,
            params,
            classes,
            [class_names[c] for c in classes],
            requester,
            reason,
            str(version.version),
            f"together with the pending requests for {sorted(pending)} this would leave no class",
        )
    request = ledger.submit(
        classes,
        [class_names[c] for c in classes],
        requester,
        reason,
        model_name=model_name,
        model_version_before=str(version.version),
    )
    tell_servers(
        params,
        ledger,
        request,
        "suppressed",
        f"request {request.id} accepted: its classes are not answered until it is done or withdrawn",
    )
    return request


def withdraw(params: Params, project_dir: Path, request_id: int, operator: str, reason: str) -> LedgerEvent:
    """An operator takes back an accepted request that is not being processed, on record (who,
    why, when); the servers of serving.notify answer its classes again at once."""
    ledger = open_ledger(params, project_dir)
    event = ledger.withdraw(request_id, operator, reason)
    tell_servers(
        params,
        ledger,
        ledger.get(request_id),
        "lifted",
        f"request {request_id} withdrawn: its classes are answered again",
    )
    return event


def tell_servers(params: Params, ledger: Ledger, request: ForgetRequest, kind: str, reason: str) -> list[dict]:
    """Tell the servers of serving.notify to read the ledger now, so that the request's classes
    are suppressed (kind "suppressed") or answered again ("lifted") within a second rather than
    at their next poll; what each answered, and when, is kept as an event of the request (the
    audit report's timeline)."""
    from nhle.adapters.ledger import operator_name  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.adapters.servers import notify_servers  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    if not params.serving.notify:
        return []
    told = notify_servers(params.serving.notify)
    ledger.note(request.id, kind, operator_name(), reason, {"classes": request.classes, "servers": told})
    return told


def _reject(ledger: Ledger, params: Params, classes, names, requester, reason, version, error) -> ForgetRequest:
    raise RequestRejected(
        ledger.submit(
            classes,
            names,
            requester,
            reason,
            status="rejected",
            error=error,
            model_version_before=version,
            model_name=params.registry.model_name,
        )
    )


def batch_version(params: Params, batch: str):
    """The model version a run of `batch` registered, if it got that far."""
    from nhle.adapters.tracking import versions_tagged  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    found = versions_tagged(params.registry.model_name, "nhle.batch", batch)
    return found[-1] if found else None


def fail_orphan_runs(batch: str) -> list[str]:
    """Mark the MLflow runs of a `batch` that died before registering a version FAILED (a killed
    run is left RUNNING); returns their ids."""
    from nhle.adapters.tracking import fail_runs, runs_tagged  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    orphans = [run.info.run_id for run in runs_tagged("nhle.batch", batch)]
    fail_runs(orphans)
    return orphans


def close_requests(
    ledger: Ledger, owner: str, params: Params, requests: list[ForgetRequest], version: str, note: str | None = None
) -> list[ForgetRequest]:
    """Write each request's audit report (JSON + Markdown, logged to the version's run and linked
    from the version) and end it done (version promoted) or failed (it was not)."""
    from nhle.adapters.tracking import (  # noqa: PLC0415 - lazy: MLflow
        describe_version,
        log_run_files,
        run_json,
        tag_version,
        version_tags,
    )

    name = params.registry.model_name
    tags, run_id = version_tags(name, str(version))
    report, parity, gates, attempts, notified = (
        run_json(run_id, f) for f in (REPORT, PARITY, GATES, ATTEMPTS, NOTIFIED)
    )
    promoted = tags.get("promoted") == "true"
    closed = []
    for request in requests:
        audit = with_attempts(
            build_audit(
                {**request.as_dict(), "claimed_by": None}, name, str(version), tags, run_id, report, parity, gates, note
            ),
            attempts,
        )
        audit = with_timeline(audit, [e.as_dict() for e in ledger.events(request.id)], notified)
        base = f"audit/request-{request.id}"
        log_run_files(run_id, {f"{base}.json": audit, f"{base}.md": audit_markdown(audit)})
        uri = f"runs:/{run_id}/{base}.md"
        tag_version(name, str(version), {f"audit.request.{request.id}": uri})
        ledger.record(
            request.id,
            owner,
            data_version_before=audit["data"]["before"],
            model_version_before=audit["model"]["version_before"],
        )
        closed.append(
            ledger.finish(
                request.id,
                owner,
                "done" if promoted else "failed",
                model_version_after=str(version),
                data_version_after=audit["data"]["after"],
                report_uri=uri,
                error=None if promoted else audit["outcome"]["reason"],
            )
        )
    describe_version(name, str(version))  # now with the audit reports
    return closed


def recover_batch(params: Params, root: Path, batch: str):
    """A crashed run's batch: settle the version it registered (judged and promoted from its
    logged evidence; the caller completes the rest of its evidence), or fail its orphaned runs."""
    from nhle.orchestration.steps import resume_version  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    version = batch_version(params, batch)
    if version is None:
        fail_orphan_runs(batch)
        return None
    return resume_version(params, root, version)


def claim_requests(ledger: Ledger, owner: str, lease_seconds: float, model_name: str) -> list[ForgetRequest]:
    return ledger.claim(owner, lease_seconds, model_name)


def held(ledger: Ledger, owner: str, requests) -> list[ForgetRequest]:
    """The requests of `requests` that `owner` still holds."""
    still = {r.id for r in ledger.list("processing") if r.claimed_by == owner}
    return [r for r in requests if r.id in still]


def process_requests(params: Params, root: Path, engine, forget, logger) -> dict:
    """Take every pending (and abandoned) forget request, unlearn their classes together with one
    call of `forget` (nhle.orchestration.pipeline.forget's signature) on top of the champion, and
    close each request with its audit report. `engine(step, *args)` runs each step. Returns the
    requests as they ended, the versions that settled them, the forget's unlearning attempts and
    the time breakdown (this run's steps, the forget's as forget.<step>)."""
    from nhle.adapters.ledger import LeaseKeeper, new_owner  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.pipeline import (  # noqa: PLC0415 - lazy: torch, MLflow
        StepClock,
        complete_evidence,
        engine_of,
        settle_earlier_runs,
    )

    attempts = []
    engine = StepClock(engine)

    def forget_recording_attempts(*args, **options):
        started = len(engine.seconds)
        result = forget(*args, **options)
        attempts.extend(result.attempts or [])
        engine.seconds[started:started] = [[f"forget.{step}", s] for step, s in result.step_seconds]
        return result

    ledger = open_ledger(params, root)
    settle_earlier_runs(params, root, engine, logger)  # a recovery below may need no forget to do it
    owner = new_owner()
    claimed = engine(claim_requests, ledger, owner, params.requests.lease_seconds, params.registry.model_name)
    logger.info("claimed forget requests %s as %s", [r.id for r in claimed], owner)
    versions = []
    with LeaseKeeper(ledger, owner, params.requests.lease_seconds):
        try:
            for batch in sorted({r.batch for r in claimed if r.batch}):
                result = engine(recover_batch, params, root, batch)
                if result is not None:
                    # before the audit reports read it
                    engine(complete_evidence, params, root, result.version, engine_of(engine), logger)
                    group = [r for r in held(ledger, owner, claimed) if r.batch == batch]
                    engine(
                        close_requests,
                        ledger,
                        owner,
                        params,
                        group,
                        result.version,
                        f"version registered by an earlier run of batch {batch} that stopped",
                    )
                    versions.append(result.version)
            versions += process_fresh(
                ledger, owner, params, root, held(ledger, owner, claimed), engine, forget_recording_attempts
            )
        except Exception as err:
            for request in held(ledger, owner, claimed):
                ledger.release(request.id, owner, f"{type(err).__name__}: {err}", params.requests.max_attempts)
            raise
    closed = [ledger.get(r.id) for r in claimed]
    return {
        "requests": [r.as_dict() for r in closed],
        "versions": versions,
        "attempts": attempts,
        "step_seconds": engine.seconds,
    }


def process_fresh(ledger: Ledger, owner: str, params: Params, root: Path, requests, engine, forget) -> list[str]:
    """Requests no earlier run got to: already forgotten by the champion -> done; the rest are
    unlearned together in one forget."""
    from nhle.orchestration.steps import champion_version  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    if not requests:
        return []
    # The registry's record of what the champion forgets: its checkpoint is downloaded once, by the forget.
    version = champion_version(params)
    if version is None:
        raise ValueError(params.registry.no_champion())
    masked = set(from_tag(version.tags, "forgotten_classes", []))
    satisfied = [r for r in requests if set(r.classes) <= masked]
    if satisfied:
        engine(
            close_requests,
            ledger,
            owner,
            params,
            satisfied,
            str(version.version),
            f"already forgotten by version {version.version}",
        )
    todo = [r for r in requests if r not in satisfied]
    if not todo:
        return [str(version.version)]
    classes = ",".join(str(c) for c in sorted({c for r in todo for c in r.classes} - masked))
    for request in todo:
        ledger.record(request.id, owner, batch=owner, model_version_before=str(version.version))
    result = forget(params, root, classes, batch=owner, request_ids=[r.id for r in todo])
    engine(close_requests, ledger, owner, params, held(ledger, owner, todo), result.version)
    return [result.version]


def read_report(uri: str) -> str:
    """The Markdown audit report a ledger row points to."""
    from nhle.adapters.tracking import read_text  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    return read_text(uri)


REQUEST_COLUMNS = "{:>5}  {:<10}  {:<20}  {:<10}  {:<26}  {}"
REQUEST_HEADER = REQUEST_COLUMNS.format("id", "status", "classes", "versions", "requester", "submitted (UTC)")


def request_line(request: ForgetRequest) -> str:
    """One line per request for `nhle request list`, under REQUEST_HEADER."""
    after = f"->v{request.model_version_after}" if request.model_version_after else ""
    return terminal_text(
        REQUEST_COLUMNS.format(
            request.id,
            request.status,
            ",".join(map(str, request.class_names)),
            f"v{request.model_version_before or '-'}{after}",
            request.requester,
            f"{request.submitted_at:%Y-%m-%d %H:%M:%S}",
        )
        + (f"  error: {request.error}" if request.error else "")
    )


def as_json(request: ForgetRequest) -> str:
    return json.dumps(request.as_dict(), indent=2)


__all__ = [
    "RequestRejected",
    "as_json",
    "batch_version",
    "claim_requests",
    "close_requests",
    "fail_orphan_runs",
    "held",
    "process_requests",
    "read_report",
    "recover_batch",
    "submit",
]
