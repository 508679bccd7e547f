"""The pipeline's steps, each a plain function over nhle.core and nhle.adapters: one step is
one Prefect task in flows/ (nhle.orchestration.pipeline puts them in order). A forget:

    load_champion -> data_of_version (its DVC version) -> per attempt (unlearning_attempts: the
    configured recipe, then the fallbacks): start_attempt -> forget_candidate (NHLE + masking,
    evaluated) -> export_and_check (ONNX, parity) -> gates_of -> end_attempt -> record_attempts,
    until a candidate holds every gate or none is left -> register_candidate (MLflow) ->
    finish_version (the deleted-classes gate, then promote); after it, the complete-evidence flow:
    evidence_work -> measure_evidence (the retrain) -> draw_evidence_plots ->
    delete_forgotten_samples (a new DVC version) -> record_evidence

Every file is written to a fresh work folder and logged to MLflow; the champion alias moves only
in `promote`, the last step, and only when every gate held.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from nhle.adapters import deletions
from nhle.adapters.deletions import open_ledger, record_forgetting
from nhle.adapters.ledger import operator_name, owner_is_gone
from nhle.adapters.mlflow_models import from_mlflow
from nhle.adapters.servers import notify_servers
from nhle.adapters.signing import create_key_pair
from nhle.adapters.tracking import (
    VersionEvidence,
    complete_report,
    describe_version,
    download_checkpoint,
    download_synthetic_inputs,
    finish_run,
    log_artifacts_to,
    log_attempt,
    log_attempts,
    log_outcome,
    log_version,
    reap_dead_runs,
    record_promotion,
    run_json,
    set_run_tags,
    sign_registered_version,
    signed_versions,
    start_child_run,
    tag_version,
    version_by_alias,
    version_tags,
    versions_tagged,
)
from nhle.adapters.tracking import keep_synthetic_inputs as log_synthetic_inputs
from nhle.adapters.versioning import DATASETS_DIR, DataVersion, open_dataset_version, version_dataset
from nhle.core.config import RECIPES, Params, flatten, is_default_model, resolve_uri
from nhle.core.data import Splits, drop_classes
from nhle.core.experiment import (
    base_meta,
    base_metrics,
    check_base_training,
    completed_report,
    data_for_checkpoint,
    forget_and_measure,
    lineage,
    load_data,
    train_base_model,
)
from nhle.core.export import check_parity, export_onnx
from nhle.core.export import preprocessing as input_preprocessing
from nhle.core.files import PARITY, REPORT, from_tag
from nhle.core.gates import (
    GateResult,
    all_passed,
    base_gates,
    deleted_classes_gate,
    evaluate_gates,
    failure_reason,
    promotion_decision,
)
from nhle.core.importing import check_square, from_weights, smoke_test
from nhle.core.models import MaskedClassifier
from nhle.core.plots import write_evidence_plots
from nhle.core.training import load_checkpoint, resolve_device, save_checkpoint
from nhle.core.unlearning import apply_class_weight_mask
from nhle.core.unlearning.anchors import SyntheticInputs


@dataclass(frozen=True)
class FlowResult:
    """What the train-base, import and forget flows return: the version registered, whether it
    was promoted and why, its gates and the servers told (promote), then what the flow did
    (nhle.orchestration.pipeline) and, from the CLI, how long it took."""

    version: str
    promoted: bool
    reason: str
    run_id: str
    gates: list[dict] = field(default_factory=list)
    """GateResult.as_dict() of every gate judged."""
    notified: list[dict] = field(default_factory=list)
    """Each server of serving.notify told of the promotion: url, outcome, seconds, serving_version."""
    summary: str = ""
    data_version: str | None = None
    """md5 of the DVC version of the data the flow read."""
    class_names: list[str] | None = None
    """An import's: the classes of the imported model."""
    forgotten: list[str] | None = None
    """A forget's: the names of the classes it forgot."""
    report: dict | None = None
    """A forget's report.json (nhle.core.experiment.forget_and_measure)."""
    attempts: list[dict] | None = None
    """A forget's recipes tried (attempts.json)."""
    compute_seconds: dict[str, float] = field(default_factory=dict)
    """Training, import or unlearning seconds, the part of the flow that is the method's."""
    step_seconds: list = field(default_factory=list)
    """[step, seconds] of every step, in order (nhle.orchestration.pipeline.StepClock)."""
    flow_seconds: float | None = None
    """The whole flow as the CLI timed it."""


@dataclass
class Candidate:
    """A model produced by a flow, with everything needed to log, check and promote it."""

    model: MaskedClassifier
    checkpoint_meta: dict
    report: dict | None
    data: Splits
    work_dir: Path
    parent_version: str | None = None


def project_path(params_dir: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else (params_dir / path).resolve()


def dataset_folder(params: Params, data: Splits) -> Path:
    """Where the registered model's dataset lives in the data repo: datasets/<dataset> for the
    project's default model (where it always was), datasets/<model>/<dataset> for another, so
    that a deletion for one model never removes another model's training data."""
    model = params.registry.model_name
    return Path(DATASETS_DIR) / (data.name if is_default_model(model) else Path(model) / data.name)


def version_data(params: Params, project_dir: Path, data: Splits, message: str | None = None):
    """Materialise `data` into the DVC data repository (created when missing) and return its
    DataVersion."""
    repo = project_path(project_dir, params.versioning.repo)
    remote = params.versioning.remote
    remote = remote if "://" in remote else str(project_path(project_dir, remote))
    return version_dataset(data, repo, remote, dataset_path=dataset_folder(params, data), message=message)


@dataclass
class EvidenceWork:
    """What a registered version's evidence is completed from, after its promotion (the
    complete-evidence flow: nhle.orchestration.pipeline.complete_evidence)."""

    version: object
    """The registered ModelVersion (its tags say what is pending)."""
    report: dict
    model: MaskedClassifier
    checkpoint: dict
    original: MaskedClassifier
    """Its parent version's model: the "before" of the plots."""
    data: Splits
    """The data its forget started from (DVC version `data.*`), before any deletion."""
    work_dir: Path


def evidence_work(params: Params, version: str) -> EvidenceWork | None:
    """What the evidence of registered `version` is completed from, downloaded from the registry
    (its checkpoint, its parent's, its report and its DVC data), or None when it has no evidence
    pending (tag `evidence`: a base or imported model, or completed already)."""
    client, name = MlflowClient(), params.registry.model_name
    mv = client.get_model_version(name, str(version))
    report = run_json(mv.run_id, REPORT)
    if mv.tags.get("evidence") != "pending" or report is None:
        return None
    work_dir = new_work_dir("evidence")
    model, checkpoint = load_checkpoint(download_checkpoint(mv, work_dir / "model"))
    parent = client.get_model_version(name, mv.tags["parent_version"])
    original, _ = load_checkpoint(download_checkpoint(parent, work_dir / "parent"))
    data = open_dataset_version(DataVersion.from_tags(mv.tags, params.versioning.remote, prefix="data."))
    return EvidenceWork(mv, report, model, checkpoint, original, data, work_dir)


def measure_evidence(work: EvidenceWork) -> dict:
    """The version's report with what it left pending measured now (the evidence metrics of the
    original and the unlearned model, the retrained reference: the retrain;
    nhle.core.experiment.completed_report); as it is when nothing is pending."""
    if not work.report.get("pending") and work.report.get("reference", {}).get("kind") != "pending":
        return work.report
    return completed_report(work.report, work.checkpoint, work.original, work.model, work.data)


def draw_evidence_plots(work: EvidenceWork) -> dict[str, Path]:
    """The before/after plots of the version (nhle.core.plots.write_evidence_plots)."""
    return write_evidence_plots(
        work.original, work.model, work.data, work.report["forget_classes"], work.work_dir / "plots"
    )


def delete_forgotten_samples(params: Params, project_dir: Path, work: EvidenceWork):
    """When the version was promoted and forgets classes, its forget's data without their
    samples as a new DVC version, tagged `data_after.*` on the version and its run; returns that
    DataVersion (None: not promoted, or deleted already by a run that died after it)."""
    tags, name = work.version.tags, params.registry.model_name
    forgotten = from_tag(tags, "forgotten_classes", [])
    if tags.get("promoted") != "true" or not forgotten or "data_after.md5" in tags:
        return None
    data_after = delete_forgotten_data(
        params, project_dir, work.data, forgotten, f"{name} version {work.version.version}"
    )
    tag_version(name, str(work.version.version), data_after.as_tags("data_after."))
    set_run_tags(work.version.run_id, data_after.as_tags("data_after."))
    return data_after


def record_evidence(params: Params, work: EvidenceWork, report: dict, plots: dict[str, Path]) -> dict:
    """The plots logged to the version's run, its report.json and metrics completed, its tag
    `evidence` made complete and its description rewritten (tracking.complete_report); the work
    folder removed. Returns the report."""
    try:
        log_artifacts_to(work.version.run_id, list(plots.values()), "plots")
        complete_report(params.registry.model_name, str(work.version.version), report)
    finally:
        shutil.rmtree(work.work_dir, ignore_errors=True)
    return report


def versions_with_pending_evidence(params: Params) -> list[str]:
    """Versions whose flow ended (a crash between promotion and evidence) with evidence pending."""
    client = MlflowClient()
    return [
        str(mv.version)
        for mv in versions_tagged(params.registry.model_name, "evidence", "pending")
        if client.get_run(mv.run_id).info.status != "RUNNING"
    ]  # RUNNING: its flow is still at it


def recorded_data_version(params: Params, version):
    """The DVC version a forget from `version` starts from, as the registry recorded it: the one
    the forget that made `version` left behind (its forgotten classes' samples deleted), else the
    one `version` was made from; None for a model registered without one."""
    for prefix in ("data_after.", "data."):
        recorded = DataVersion.from_tags(version.tags, params.versioning.remote, prefix=prefix)
        if recorded is not None:
            return recorded
    return None


def data_of_version(params: Params, project_dir: Path, version, checkpoint: dict) -> tuple[Splits, object]:
    """(the data a forget flow starts from, its DataVersion): the recorded DVC version
    (recorded_data_version), or (a model registered without one) the data its checkpoint was
    trained on, versioned now."""
    recorded = recorded_data_version(params, version)
    if recorded is not None:  # already versioned: versioning the same bytes again would change nothing
        return open_dataset_version(recorded), recorded
    data = data_for_checkpoint(checkpoint)
    return data, version_data(params, project_dir, data)


def delete_forgotten_data(params: Params, project_dir: Path, data: Splits, forgotten: list[int], why: str):
    """A new DVC version of `data` without any sample of the `forgotten` classes (committed and
    pushed like every version); returns its DataVersion."""
    names = [data.class_names[c] for c in forgotten]
    return version_data(
        params, project_dir, drop_classes(data, forgotten), message=f"Delete the samples of classes {names} ({why})"
    )


def training_data(params: Params, project_dir: Path) -> Splits:
    """The configured dataset less the classes forget requests deleted from it on record."""
    return with_deletions_on_record(params, project_dir, load_data(params.data))


def with_deletions_on_record(params: Params, project_dir: Path, data: Splits) -> Splits:
    """`data` less the classes forget requests deleted from this dataset in the data repo, so
    that a retrain from the source cannot relearn them."""
    record = project_path(project_dir, params.versioning.repo) / dataset_folder(params, data) / "classes.json"
    if not record.is_file():
        return data
    recorded = json.loads(record.read_text())
    # By name: a model imported with its own class order numbers the same classes differently.
    names = [recorded["class_names"][c] for c in recorded.get("removed_classes", [])]
    return drop_classes(data, [data.class_names.index(n) for n in names if n in data.class_names])


def check_settings(params: Params, data: Splits | None = None) -> None:
    """What a flow would refuse midway, refused before its MLflow run starts (so a typo leaves
    no FAILED run): the device and, given the training data, the base model to train on it."""
    resolve_device(params.train.device)
    if data is not None:
        check_base_training(params.model, params.train, data)


def train_candidate(params: Params, data: Splits) -> Candidate:
    """Train a base model; classes without training samples (deleted by forget requests) are
    masked, so the model can never predict them."""
    model, meta = train_base_model(params.data, params.train, data=data, model_config=params.model)
    if data.removed_classes:
        apply_class_weight_mask(model, data.removed_classes)
    return Candidate(model, meta, None, data, new_work_dir("train"))


def load_user_model(config, data: Splits, tracking_uri: str) -> tuple[MaskedClassifier, dict]:
    """The model `config` names (from_mlflow, else arch + weights), wrapped for `data`, and where
    it came from. `tracking_uri` is used for from_mlflow when config has no tracking URI of its own."""
    check_square(data)
    if config.from_mlflow:
        model, source = from_mlflow(config, data, config.mlflow_tracking_uri or tracking_uri)
    else:
        model, source = from_weights(config, data)
    smoke_test(model, data)
    return model, source


def import_candidate(params: Params, project_dir: Path, data: Splits) -> Candidate:
    """The user's model (params.model: from_mlflow, else arch + weights) for `data`, evaluated
    like a trained base model; classes deleted on record are masked. Raises ValueError naming
    what does not fit, before anything is logged or registered."""
    started = time.perf_counter()
    tracking_uri = resolve_uri(params.model.mlflow_tracking_uri or params.tracking_uri(), project_dir)
    model, source = load_user_model(params.model, data, tracking_uri)
    if data.removed_classes:
        apply_class_weight_mask(model, data.removed_classes)
    meta = {**base_meta(params.data, params.model, params.train, data), "source": source}
    meta["metrics"] = {**base_metrics(model, data), "import_seconds": time.perf_counter() - started}
    return Candidate(model, meta, None, data, new_work_dir("import"))


def load_champion(params: Params):
    """(model, checkpoint dict, ModelVersion) of the current champion, or None when there is none."""
    version = version_by_alias(params.registry.model_name, params.registry.champion_alias)
    if version is None:
        return None
    with tempfile.TemporaryDirectory(prefix="nhle-champion-") as folder:
        model, checkpoint = load_checkpoint(download_checkpoint(version, folder))
    return model, checkpoint, version


def forget_candidate(
    params: Params, model, checkpoint: dict, classes: list[int], parent_version: str, data: Splits, seed: int = 0
) -> Candidate:
    """NHLE + masking of `classes` (indices, validated where the request came in), with the report
    that measures it against the original and the retrained reference."""
    work_dir = new_work_dir("forget")
    cached = synthetic_inputs_of(params, parent_version, work_dir)
    # What no gate reads (the retrained reference, the evidence metrics) waits until after the
    # promotion: pipeline.complete_evidence.
    outcome = forget_and_measure(
        model,
        checkpoint,
        classes,
        seed=seed,
        config=params.unlearn,
        retrain_baseline=params.retrain_baseline,
        data=data,
        device=params.train.device,
        synthetic=cached,
        defer_evidence=True,
    )
    if outcome.report["synthetic_inputs"] == "synthesised":
        keep_synthetic_inputs(params, parent_version, outcome.result.synthetic, work_dir)
    meta = lineage(checkpoint)
    meta["unlearn"] = outcome.report["unlearn_config"]
    meta["parent_version"] = parent_version
    return Candidate(outcome.result.model, meta, outcome.report, data, work_dir, parent_version)


def synthetic_inputs_of(params: Params, version: str, folder: Path):
    """The synthetic inputs an earlier request kept with registered version `version`, or None."""
    (folder / "cached").mkdir(parents=True, exist_ok=True)
    path = download_synthetic_inputs(params.registry.model_name, version, folder / "cached")
    return SyntheticInputs.load(path) if path is not None else None


def keep_synthetic_inputs(params: Params, version: str, synthetic, folder: Path) -> None:
    """Keep the synthetic inputs of `version`'s model beside its checkpoint: they depend on the
    model only, so every later request on that version reuses them instead of synthesising."""
    log_synthetic_inputs(params.registry.model_name, version, synthetic.save(folder / "synthetic.pt"))


def export_and_check(params: Params, candidate: Candidate) -> tuple[Path, dict]:
    path = export_onnx(
        candidate.model, candidate.work_dir / "model.onnx", candidate.data.image_shape, params.export.exporter
    )
    parity = check_parity(
        candidate.model, path, candidate.data.test, params.export.parity_batch_sizes, params.export.parity_tolerance
    )
    return path, parity


def register_candidate(
    run_id: str,
    params: Params,
    candidate: Candidate,
    onnx_path: Path,
    parity: dict,
    data_version,
    extra_tags: dict | None = None,
) -> str:
    """Log report, checkpoint, parity and the ONNX model; returns the new registered version. A
    forget's version is born with the tag evidence=pending: its plots, its retrained reference
    and its data deletion come after the promotion (pipeline.complete_evidence)."""
    checkpoint_path = save_checkpoint(
        candidate.work_dir / "model.pt", candidate.model, data_version=asdict(data_version), **candidate.checkpoint_meta
    )
    class_names = candidate.data.class_names
    preprocessing = input_preprocessing(candidate.model, candidate.data.image_shape, class_names)
    forgotten = preprocessing["forgotten_classes"]
    report = candidate.report
    base_metrics = (
        None if report is not None else {k: candidate.checkpoint_meta["metrics"][k] for k in ("test_acc", "train_acc")}
    )
    tags = {
        "forgotten_classes": forgotten,
        "forgotten_class_names": [class_names[c] for c in forgotten],
        "parent_version": candidate.parent_version or "",
        **data_version.as_tags(),
        "parity.passed": str(parity["passed"]).lower(),
        "parity.argmax_agreement": parity["argmax_agreement"],
        "parity.max_abs_prob_diff": parity["max_abs_prob_diff"],
        "onnx_sha256": sha256(onnx_path),
        **({"evidence": "pending"} if report is not None else {}),
        **(extra_tags or {}),
    }
    example = candidate.data.test.float_images()[:4].numpy().astype(np.float32)
    evidence = VersionEvidence(
        onnx_path,
        example,
        logged_model_name(candidate.model.arch, candidate.data.name, forgotten),
        checkpoint_path,
        preprocessing,
        candidate.data,
        data_version,
        parity,
        report,
        base_metrics,
        tags,
    )
    version = log_version(run_id, params.registry.model_name, evidence)
    return version


def logged_model_name(arch: str, dataset: str, forgotten: list[int]) -> str:
    """What the logged model is, as MLflow's model list shows it: "resnet18-digits-forgets-3-5"
    (MLflow refuses / : . % and quotes in the name)."""
    name = f"{arch}-{dataset}" + (f"-forgets-{'-'.join(map(str, forgotten))}" if forgotten else "")
    return re.sub(r"""[/:.%"']""", "_", name)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def gates_of(params: Params, candidate: Candidate, parity: dict) -> list[GateResult]:
    """The gates a candidate must pass (nhle.core.gates): a base model's, or every gate of an
    unlearned one's report."""
    if candidate.report is None:
        return base_gates(candidate.checkpoint_meta["metrics"]["test_acc"], parity, params.gates)
    return evaluate_gates(candidate.report, parity, params.gates)


CONFIGURED = "configured"
"""The recipe name of a forget's first attempt: the unlearn section as configured."""


def unlearning_attempts(params: Params) -> list[tuple[str, dict, Params]]:
    """What a forget tries, in order, as (recipe name, its overrides, the params it runs with):
    the configured unlearn section first (CONFIGURED, no overrides), then each recipe of
    unlearn.fallbacks (nhle.core.config.RECIPES) applied over it. A recipe that would give a
    section already tried is left out: the same settings and seed make the same candidate."""
    attempts = [(CONFIGURED, {}, params)]
    for name in params.unlearn.fallbacks:
        unlearn = replace(params.unlearn, **RECIPES[name])
        if all(unlearn != tried.unlearn for _, _, tried in attempts):
            attempts.append((name, dict(RECIPES[name]), replace(params, unlearn=unlearn)))
    return attempts


def start_attempt(params: Params, run_id: str, number: int, recipe: str, overrides: dict) -> str:
    """The MLflow run of a forget's attempt `number`, nested under the flow's run `run_id`: the
    recipe and every unlearn setting it runs with as params, the recipe's overrides as a tag."""
    tags = {"nhle.attempt": str(number), "nhle.recipe": recipe, "nhle.recipe.overrides": json.dumps(overrides)}
    return start_child_run(
        run_id, f"attempt-{number}-{recipe}", tags, {"recipe": recipe, **flatten(asdict(params.unlearn), "unlearn.")}
    )


def end_attempt(
    attempt_run_id: str,
    number: int,
    recipe: str,
    overrides: dict,
    candidate: Candidate,
    parity: dict,
    gates: list[GateResult],
    last: bool,
) -> dict:
    """Log an attempt's report, parity and gates on its run and close it (FINISHED: the attempt
    ran; its tags say whether its candidate held every gate). Returns the attempt's record, as
    attempts.json lists it: the candidate is published when it held every gate or is the last
    one; else nothing of it is registered and the forget goes on with the next recipe."""
    passed = all_passed(gates)
    published = passed or last
    record = {
        "attempt": number,
        "recipe": recipe,
        "overrides": overrides,
        "run_id": attempt_run_id,
        "passed": passed,
        "reason": "every gate held" if passed else f"gate failed: {failure_reason(gates)}",
        "failed_gates": [g.as_dict() for g in gates if not g.passed],
        "gates": [g.as_dict() for g in gates],
        "unlearn_steps": candidate.report["unlearn_steps"],
        "seconds": candidate.report["seconds"],
        "outcome": "registered" if published else "not registered: the next recipe was tried",
    }
    log_attempt(
        attempt_run_id,
        candidate.report,
        parity,
        gates,
        {
            "nhle.attempt.passed": str(passed).lower(),
            "nhle.attempt.outcome": record["outcome"],
            "nhle.attempt.reason": record["reason"][:5000],
        },
    )
    finish_run(attempt_run_id, "FINISHED")
    return record


def abort_attempt(attempt_run_id: str) -> None:
    """An attempt whose step raised: its run ends FAILED (the flow's run says why)."""
    finish_run(attempt_run_id, "FAILED")


def record_attempts(run_id: str, attempts: list[dict]) -> None:
    """Every attempt so far as attempts.json on the flow's run, tagged with their count and the
    recipe of the one registered (once there is one)."""
    registered = [a["recipe"] for a in attempts if a["outcome"] == "registered"]
    log_attempts(
        run_id,
        attempts,
        {"nhle.attempts": str(len(attempts)), **({"nhle.recipe": registered[-1]} if registered else {})},
    )


def finish_version(
    params: Params, project_dir: Path, run_id: str, version: str, gates: list[GateResult], parent_version: str | None
) -> FlowResult:
    """The end of every flow's critical path: the gates plus one on the classes deleted on record
    (the ledger), then promote. The alias moves last, so a failure anywhere before leaves
    `champion` alone. The forgotten classes' samples are deleted from the dataset after it, with
    the rest of the evidence (nhle.orchestration.pipeline.complete_evidence)."""
    name = params.registry.model_name
    forgotten = from_tag(version_tags(name, version)[0], "forgotten_classes", [])
    # Whatever made this version (training, an import, unlearning), it may not bring back a
    # class deleted on record (a forget request's, or an earlier promotion's).
    gates = [*gates, deleted_classes_gate(forgotten, deleted_on_record(params, project_dir)[0])]
    return promote(params, project_dir, run_id, version, gates, parent_version)


def resume_version(params: Params, project_dir: Path, version) -> FlowResult:
    """Finish a registered version whose flow died before settling it (a crashed forget-request
    run): judge it from its logged report and parity and promote, without
    unlearning or registering anything again. A version already settled is left as it is."""
    name, number = params.registry.model_name, str(version.version)
    champion = champion_version(params)
    if champion is not None and str(champion.version) == number:
        result = FlowResult(number, True, "promoted by the run that registered it", version.run_id)
    elif version.tags.get("promoted") == "false":
        result = FlowResult(number, False, version.tags.get("rejection_reason", ""), version.run_id)
    else:
        report, parity = run_json(version.run_id, REPORT), run_json(version.run_id, PARITY)
        if report is None or parity is None:
            raise RuntimeError(
                f"{name} version {number} has no report.json or parity.json in run "
                f"{version.run_id}: it cannot be judged; register a new one"
            )
        gates = evaluate_gates(report, parity, params.gates)
        result = finish_version(
            params, project_dir, version.run_id, number, gates, version.tags.get("parent_version") or None
        )
    finish_run(version.run_id, "FINISHED")
    return result


def deleted_on_record(params: Params, project_dir: Path) -> tuple[dict[int, list[int]], str]:
    """The classes of the registered model deleted on record (the ledger and the model's own
    record united; nhle.adapters.deletions), the ledger made when the model's record covers it."""
    return deletions.deleted_on_record(
        MlflowClient(),
        params.registry.model_name,
        resolve_uri(params.requests_database(), Path(project_dir)),
        create=True,
    )


def signing_key(params: Params, project_dir: Path) -> Path:
    """The private key versions are signed with (registry.signing_key). A new registered model,
    none of whose versions is signed yet, gets a new pair (the public one at serving.verify_key);
    a missing key of a model whose versions were signed is an error: a new key would not be theirs."""
    key, public = (
        project_path(Path(project_dir), params.registry.signing_key),
        project_path(Path(project_dir), params.serving.verify_key),
    )
    if key.exists():
        return key
    signed = signed_versions(params.registry.model_name)
    if signed or public.exists():
        raise FileNotFoundError(
            f"the signing key {key} is missing, but {params.registry.model_name} has signed versions "
            f"{signed} (or a public key at {public}): restore the key (a new one would not verify "
            "them), or set registry.signing_key to where it is"
        )
    create_key_pair(key, public)
    logging.getLogger(__name__).warning(
        "created the signing key pair %s and %s for %s: keep the private key out of "
        "git and safe; servers need only the public one",
        key,
        public,
        params.registry.model_name,
    )
    return key


def promote(
    params: Params, project_dir: Path, run_id: str, version: str, gates: list[GateResult], parent_version: str | None
) -> FlowResult:
    """nhle.core.gates.promotion_decision on the registry's champion; MLflow carries it out. The
    classes a promoted version forgets go on record (ledger and registered model) before the
    alias moves, so no later rollback, fallback or hand move can bring them back unrecorded."""
    name = params.registry.model_name
    tag_version(name, version, {"gates": [g.as_dict() for g in gates]})
    sign_registered_version(name, str(version), [g.as_dict() for g in gates], signing_key(params, project_dir))
    current = champion_version(params)
    promoted, reason = promotion_decision(gates, current.version if current else None, parent_version)
    if promoted:
        tags = MlflowClient().get_model_version(name, str(version)).tags
        request_ids = [int(i) for i in (tags.get("nhle.request_ids") or "").split(",") if i]
        record_forgetting(
            MlflowClient(),
            open_ledger(params, project_dir),
            name,
            str(version),
            from_tag(tags, "forgotten_classes", []),
            from_tag(tags, "forgotten_class_names", []),
            request_ids,
            operator_name(),
        )
    record_promotion(params.registry, version, promoted, reason)
    describe_version(params.registry.model_name, str(version))
    notified = notify_servers(params.serving.notify, str(version)) if promoted else []
    log_outcome(run_id, gates, promoted, reason, version, notified)
    return FlowResult(str(version), promoted, reason, run_id, [g.as_dict() for g in gates], notified)


WORK_DIR = re.compile(r"^nhle-(?:train|import|forget|evidence)-(?P<pid>\d+)-")


def new_work_dir(kind: str) -> Path:
    """A flow's scratch folder, named after the process that owns it (nhle-forget-<pid>-...), so
    that the next run can remove what a killed one left (sweep_work_dirs)."""
    return Path(tempfile.mkdtemp(prefix=f"nhle-{kind}-{os.getpid()}-"))


def sweep_work_dirs() -> list[Path]:
    """Remove the scratch folders of processes of this host that no longer exist; returns them."""
    swept = []
    for folder in Path(tempfile.gettempdir()).glob("nhle-*-*-*"):
        match = WORK_DIR.match(folder.name)
        if match and folder.is_dir() and owner_is_gone(f"{socket.gethostname()}:{match['pid']}:"):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def clean_up_after_dead_runs(params: Params, logger) -> dict:
    """What runs killed on this host left (at the start of every flow's run and of every
    request processing): their MLflow runs still RUNNING are marked KILLED, a version one
    registered before judging its gates is marked abandoned, and their scratch folders are
    removed; each is logged as a warning."""
    left = {"runs": reap_dead_runs(params.registry.model_name), "work_dirs": [str(p) for p in sweep_work_dirs()]}
    for dead in left["runs"]:
        logger.warning(
            "MLflow run %s was left RUNNING by %s, a process that is gone: marked KILLED%s",
            dead["run_id"],
            dead["owner"],
            f"; version(s) {dead['abandoned_versions']} it registered before judging their gates marked abandoned"
            if dead["abandoned_versions"]
            else "",
        )
    if left["work_dirs"]:
        logger.warning("removed %d scratch folder(s) of dead runs: %s", len(left["work_dirs"]), left["work_dirs"])
    return left


def discard_work_dir(candidate: Candidate) -> None:
    """Everything in the work folder is in MLflow once the version is registered."""
    shutil.rmtree(candidate.work_dir, ignore_errors=True)


def champion_version(params: Params):
    """The registry's champion ModelVersion, or None."""
    return version_by_alias(params.registry.model_name, params.registry.champion_alias)
