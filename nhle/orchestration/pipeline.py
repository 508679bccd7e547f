"""The pipeline's flows as plain functions: each puts nhle.orchestration.steps in order and runs
every step through `engine(step, *args)`, the engine it is given: `call` (now, in this process) or,
in flows/pipeline.py, the step's Prefect task. The MLflow run of each flow is opened and closed
here (`tracked`), so a flow that fails leaves its run FAILED and the champion where it was.

    from nhle.orchestration import pipeline
    pipeline.train_base(params, project_dir)                    # data version -> train -> publish
    pipeline.forget(params, project_dir, "3")                   # champion -> NHLE + masking -> publish

publish: export -> parity -> log + register -> gates -> promote -> tell the servers; then, in a
flow run of its own, complete_evidence: the evidence metrics, the retrained reference, the plots and the deletion of
the forgotten classes' samples from the dataset (what no gate reads).

A forget tries recipes (try_recipes): the configured unlearn section, then each of
unlearn.fallbacks, each attempt in an MLflow run nested under the flow's; the first candidate
that holds every gate is published, a failing one is only recorded while a recipe is left, and
the last is published whatever its gates (registered, not promoted). The flow's run keeps
attempts.json, the version the tag nhle.recipe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from nhle.adapters.tracking import finish_run, log_run_files, start_run
from nhle.core.config import Params
from nhle.core.experiment import validate_forget
from nhle.core.files import STEP_SECONDS
from nhle.orchestration import steps
from nhle.orchestration.steps import FlowResult

log = logging.getLogger(__name__)


def call(step, *args):
    """The plain engine: the step, now."""
    return step(*args)


class StepClock:
    """An engine, timed: each step's wall seconds, in the order they ran (the flow's time
    breakdown, logged to its MLflow run as step_seconds.json and printed by the commands)."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, []

    def __call__(self, step, *args):
        started = time.perf_counter()
        try:
            return self.engine(step, *args)
        finally:
            self.seconds.append([step.__name__, round(time.perf_counter() - started, 3)])


def engine_of(engine):
    """The engine under a StepClock: a pipeline function run as one step (complete_evidence) runs
    its own steps through the same engine."""
    return engine.engine if isinstance(engine, StepClock) else engine


def publish(
    params: Params,
    root: Path,
    run_id: str,
    candidate,
    data_version,
    extra_tags: dict | None = None,
    engine=call,
    logger=log,
    checked: tuple | None = None,
) -> FlowResult:
    """export -> parity -> log + register -> gates -> promote.
    `checked`: (onnx path, parity, gates) of a candidate already exported and judged (a forget's
    attempt), which is then registered and settled without doing those again."""
    try:
        onnx_path, parity = checked[:2] if checked else engine(steps.export_and_check, params, candidate)
        version = engine(
            steps.register_candidate, run_id, params, candidate, onnx_path, parity, data_version, extra_tags
        )
        gates = checked[2] if checked else engine(steps.gates_of, params, candidate, parity)
        result = engine(steps.finish_version, params, root, run_id, version, gates, candidate.parent_version)
    finally:  # everything in it is in MLflow, or the step failed and the flow run says why
        steps.discard_work_dir(candidate)
    logger.info("version %s: %s (%s)", version, "promoted" if result.promoted else "not promoted", result.reason)
    for told in result.notified:
        logger.info(
            "server %s told: %s, serving version %s %.2f s after the alias moved%s",
            told["url"],
            told["outcome"],
            told.get("serving_version"),
            told["seconds"],
            f" ({told['error']})" if "error" in told else "",
        )
    return result


def tracked(params: Params, run_name: str, tags: dict, body, clock: StepClock) -> FlowResult:
    """body(run_id) inside a new MLflow run; the run ends FINISHED, or FAILED when body raises,
    with the clock's step times logged."""
    run_id = start_run(params, run_name, tags)
    status = "FAILED"
    try:
        result = body(run_id)
        status = "FINISHED"
    finally:
        try:
            log_run_files(run_id, {STEP_SECONDS: {"steps": clock.seconds}})
        except Exception as err:  # the breakdown is a measurement: never what fails a flow
            log.warning("step times not logged: %s", err)
        finish_run(run_id, status)
    return replace(result, step_seconds=clock.seconds)


def settle_earlier_runs(params: Params, root: Path, engine=call, logger=log) -> None:
    """What earlier runs left, settled before anything reads the registry or the data: dead
    runs of this host marked and their scratch removed (steps.clean_up_after_dead_runs), and the
    evidence a crash left pending completed (a complete-evidence run per version), so that the
    data deleted after a promotion is deleted before the next flow reads the dataset."""
    engine(steps.clean_up_after_dead_runs, params, logger)
    for version in engine(steps.versions_with_pending_evidence, params):
        logger.warning("version %s was left with its evidence pending: completing it", version)
        engine(complete_evidence, params, root, version, engine_of(engine), logger)


def complete_evidence(params: Params, root: Path, version: str, engine=call, logger=log) -> dict:
    """After the promotion, what no gate reads, for registered `version` (flows/pipeline.py runs
    it as its own flow run, `complete-evidence`): the evidence metrics (membership inference,
    linear probe, silhouette, train accuracies), the retrained reference, the before/after plots
    and, when promoted, the deletion of the forgotten classes' samples from the dataset; then
    report.json, the metrics, the relearn tag and the description are completed and the tag
    `evidence` becomes complete. A version with nothing pending is left as it is. Everything is
    read from the registry, so a run killed before it leaves a version the next flow completes.
    Returns {"report": the report (None: none pending), "step_seconds": its steps' times}."""
    engine = StepClock(engine)
    work = engine(steps.evidence_work, params, version)
    if work is None:
        return {"report": None, "step_seconds": engine.seconds}
    report = engine(steps.measure_evidence, work)
    plots = engine(steps.draw_evidence_plots, work)
    engine(steps.delete_forgotten_samples, params, root, work)
    engine(steps.record_evidence, params, work, report, plots)
    logger.info("version %s: evidence complete", version)
    return {"report": report, "step_seconds": engine.seconds}


def train_base(params: Params, root: Path, engine=call, logger=log) -> FlowResult:
    """Train a base model on the configured data and register it (champion if its gates hold)."""
    engine = StepClock(engine)
    settle_earlier_runs(params, root, engine, logger)
    data = engine(steps.training_data, params, root)
    engine(steps.check_settings, params, data)
    data_version = engine(steps.version_data, params, root, data)

    def body(run_id):
        candidate = engine(steps.train_candidate, params, data)
        result = publish(params, root, run_id, candidate, data_version, engine=engine, logger=logger)
        return replace(
            result,
            summary=f"base {params.model.arch} on {data.name}",
            data_version=data_version.md5,
            compute_seconds={"train": candidate.checkpoint_meta["metrics"]["train_seconds"]},
        )

    return tracked(params, f"train-base-{params.data.dataset}", {"nhle.flow": "train_base"}, body, engine)


def import_model(params: Params, root: Path, engine=call, logger=log) -> FlowResult:
    """Register your model (params.model: from_mlflow, else arch + weights) as a base version,
    champion if its gates hold, like a trained base model."""
    engine = StepClock(engine)
    settle_earlier_runs(params, root, engine, logger)
    data = engine(steps.training_data, params, root)
    candidate = engine(steps.import_candidate, params, root, data)  # refused before anything is versioned, logged
    data_version = engine(steps.version_data, params, root, data)
    source = candidate.checkpoint_meta["source"]
    weights = Path(source["weights"]).name if "weights" in source else "random"
    what = source.get("uri") or f"{source['arch']} ({weights})"

    def body(run_id):
        result = publish(params, root, run_id, candidate, data_version, {"nhle.source": source["kind"]}, engine, logger)
        return replace(
            result,
            summary=f"imported {what} on {data.name}",
            data_version=data_version.md5,
            class_names=data.class_names,
            compute_seconds={"import": candidate.checkpoint_meta["metrics"]["import_seconds"]},
        )

    return tracked(
        params,
        f"import-{candidate.model.arch}-{data.name}",
        {"nhle.flow": "import", "nhle.source": source["kind"]},
        body,
        engine,
    )


def forget(
    params: Params,
    root: Path,
    classes: str,
    batch: str | None = None,
    request_ids: list[int] | None = None,
    engine=call,
    logger=log,
) -> FlowResult:
    """Forget `classes` (indices or names, comma separated: parsed and checked here, once) from
    the current champion, as `params` say (its unlearn section: --set unlearn.n_samples=16, ...).
    `batch` and `request_ids` (set by the request loop) tag the MLflow run and the model version,
    so a later run can find the version a crashed run registered."""
    engine = StepClock(engine)
    settle_earlier_runs(params, root, engine, logger)
    champion = engine(steps.load_champion, params)
    if champion is None:
        raise ValueError(params.registry.no_champion())
    model, checkpoint, parent = champion
    parent_version = str(parent.version)
    indices = validate_forget(model, classes, checkpoint["class_names"])  # before any log
    engine(steps.check_settings, params)
    data, data_version = engine(steps.data_of_version, params, root, parent, checkpoint)
    batch_tags = {"nhle.batch": batch, "nhle.request_ids": ",".join(map(str, request_ids or []))} if batch else {}

    def body(run_id):
        candidate, attempts, checked, tried = try_recipes(
            params, run_id, model, checkpoint, indices, parent_version, data, engine, logger
        )
        result = publish(
            tried,
            root,
            run_id,
            candidate,
            data_version,
            {**batch_tags, "nhle.recipe": attempts[-1]["recipe"], "nhle.attempt": str(len(attempts))},
            engine,
            logger,
            checked,
        )
        attempts[-1].update(version=result.version, promoted=result.promoted, promotion_reason=result.reason)
        engine(steps.record_attempts, run_id, attempts)
        # After the promotion and the servers' notification: what no gate reads.
        started = len(engine.seconds)
        evidence = engine(complete_evidence, tried, root, result.version, engine_of(engine), logger)
        engine.seconds[started:started] = [[f"complete_evidence.{step}", s] for step, s in evidence["step_seconds"]]
        report = evidence["report"] or candidate.report
        names = report["forget_class_names"]
        return replace(
            result,
            summary=f"forgot {names} from version {parent_version}"
            + (f" (recipe {attempts[-1]['recipe']}, attempt {len(attempts)})" if len(attempts) > 1 else ""),
            forgotten=names,
            data_version=data_version.md5,
            report=report,
            compute_seconds=report["seconds"],
            attempts=attempts,
        )

    return tracked(
        params,
        f"forget-{classes.replace(',', '-')}-from-v{parent_version}",
        {"nhle.flow": "forget", "nhle.forget": classes, "nhle.parent_version": parent_version, **batch_tags},
        body,
        engine,
    )


def try_recipes(
    params: Params,
    run_id: str,
    model,
    checkpoint: dict,
    indices: list[int],
    parent_version: str,
    data,
    engine=call,
    logger=log,
) -> tuple:
    """A forget's attempts (steps.unlearning_attempts: the configured unlearn section, then each
    recipe of unlearn.fallbacks), each in its own MLflow run nested under `run_id`: unlearn,
    export, parity, gates. The first candidate that holds every gate ends it; a failing one is
    recorded (its run, attempts.json) and dropped, nothing of it registered, while a recipe is
    left; the last one is kept whatever its gates, so that its failure is registered on record.
    Returns (candidate, attempt records, (onnx path, parity, gates), the params it ran with)."""
    tries = steps.unlearning_attempts(params)
    attempts = []
    for number, (recipe, overrides, tried) in enumerate(tries, 1):
        attempt_run = engine(steps.start_attempt, tried, run_id, number, recipe, overrides)
        candidate = None
        try:
            candidate = engine(steps.forget_candidate, tried, model, checkpoint, indices, parent_version, data)
            onnx_path, parity = engine(steps.export_and_check, tried, candidate)
            gates = engine(steps.gates_of, tried, candidate, parity)
            attempt = engine(
                steps.end_attempt,
                attempt_run,
                number,
                recipe,
                overrides,
                candidate,
                parity,
                gates,
                number == len(tries),
            )
        except BaseException:
            steps.abort_attempt(attempt_run)
            if candidate is not None:
                steps.discard_work_dir(candidate)
            raise
        attempts.append(attempt)
        engine(steps.record_attempts, run_id, attempts)
        if attempt["outcome"] == "registered":
            return candidate, attempts, (onnx_path, parity, gates), tried
        steps.discard_work_dir(candidate)
        logger.warning(
            "attempt %d (recipe %s) not registered, trying recipe %s: %s",
            number,
            recipe,
            tries[number][0],
            attempt["reason"],
        )
    raise AssertionError("the last attempt is always registered")  # end_attempt(last=True) says "registered"
