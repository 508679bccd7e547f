"""MLflow adapter: runs, metrics, artifacts, the ONNX model, the registry and its aliases.

    from nhle.adapters.tracking import configure, record_promotion, rollback
    configure(params)                               # tracking URI + experiment with artifact location
    version = log_version(run_id, name, VersionEvidence(...))   # a registered model version per run
    record_promotion(params.registry, version, *promotion_decision(gates, champion, parent))

The only module of nhle (with nhle.adapters.mlflow_models) that imports mlflow. Alias moves
happen last and only after every gate held, so a failed step never moves `champion`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from nhle.adapters import signing
from nhle.adapters.deletions import RECORD_TAG, encode
from nhle.adapters.ledger import new_owner, owner_is_gone
from nhle.core.audit import relearn_sentence
from nhle.core.config import Params, RegistryConfig, flatten, is_default_model, resolve_uri
from nhle.core.files import ATTEMPTS, GATES, NOTIFIED, PARITY, REPORT, as_tag, from_tag
from nhle.core.gates import GateResult, deleted_but_predicted, report_retained_drop_pp

ONNX_REQUIREMENTS = ["onnx", "onnxruntime", "numpy"]


def configure(params: Params, project_dir: str | Path = ".") -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI in use."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in flow logs
    project_dir = Path(project_dir)
    uri = resolve_uri(params.tracking_uri(), project_dir)
    # MLflow also exports the URI to the environment, where params.tracking_uri() takes it for the
    # user's own choice: another project configured later in this process (a flow worker running
    # several projects' flows) would use this one's store. That variable is put back as it was;
    # MLFLOW_REGISTRY_URI stays exported, so child processes use this project's registry.
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if chosen is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = chosen
    name = params.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        location = artifact_location(params.tracking.artifact_location, uri, project_dir)
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # not a race with another process
                raise
    mlflow.set_experiment(name)
    return uri


def start_run(params: Params, run_name: str, tags: dict) -> str:
    """Create a flow's MLflow run with the resolved params; it stays RUNNING until finish_run."""

    # nhle.owner (host:pid:...) lets a later run see that this one's process died (reap_dead_runs).
    run = mlflow.start_run(run_name=run_name, tags={**tags, "nhle.owner": new_owner()})
    try:
        log_params(params)
    finally:
        mlflow.end_run(status="RUNNING")
    return run.info.run_id


def finish_run(run_id: str, status: str) -> None:
    """FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status)


def start_child_run(parent_run_id: str, run_name: str, tags: dict, params: dict) -> str:
    """A RUNNING run nested under `parent_run_id` (tag mlflow.parentRunId, in its experiment)
    with `params`; it carries nhle.owner, so a later run can see that its process died."""

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={**tags, MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: run_name, "nhle.owner": new_owner()},
    )
    with logging_to(run.info.run_id):
        mlflow.log_params({k: str(v) for k, v in params.items()})
    return run.info.run_id


def log_attempt(run_id: str, report: dict, parity: dict, gates: list[GateResult], tags: dict) -> None:
    """One unlearning attempt's evidence on its own run: report.json (and its metrics),
    parity.json, gates.json (and gate/* metrics) and `tags` (its outcome)."""
    with logging_to(run_id):
        log_report(report)
        log_parity(parity)
        log_gates(gates)
        mlflow.set_tags(tags)


def log_attempts(run_id: str, attempts: list[dict], tags: dict) -> None:
    """A flow run's unlearning attempts as attempts.json, and `tags`, on the run."""
    with logging_to(run_id):
        mlflow.log_dict(attempts, ATTEMPTS)
        mlflow.set_tags(tags)


@contextmanager
def logging_to(run_id: str):
    """Make `run_id` the active run for fluent mlflow calls, leaving it RUNNING afterwards
    (`with mlflow.start_run(run_id=...)` would mark it FINISHED between the flow's steps)."""
    active = mlflow.active_run()
    started = active is None or active.info.run_id != run_id
    if started:
        mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        if started:
            mlflow.end_run(status="RUNNING")


@dataclass(frozen=True)
class VersionEvidence:
    """What a new model version carries into MLflow (log_version)."""

    onnx_path: Path
    example: np.ndarray
    """A few input images (float32 N, C, H, W): the logged model's input example and signature."""
    logged_name: str
    """The logged model's name (what it is: smallcnn-digits-forgets-3)."""
    checkpoint_path: Path
    preprocessing: dict
    data: object
    """The training data (Splits), logged as the run's dataset input."""
    data_version: object
    """Its DVC version (nhle.adapters.versioning.DataVersion)."""
    parity: dict
    report: dict | None
    """A forget's report; None for a base model."""
    base_metrics: dict | None
    """A base model's accuracies; None for a forget."""
    tags: dict
    """The version's tags, set at registration."""


def log_version(run_id: str, model_name: str, evidence: VersionEvidence) -> str:
    """Everything a new version carries, logged to its run (dataset input, checkpoint,
    preprocessing, parity, report or a base model's accuracy), then the ONNX model
    registered as a new version of `model_name`, born with its tags (and `relearn`, the report's
    relearn shares, for the version page): a process killed right after the registration leaves
    a version the next run can find by its tags (nhle.batch) and judge from its logged evidence.
    A new registered model is born with an empty record of deleted classes. Returns the version."""
    e = evidence
    with logging_to(run_id):
        mlflow.set_tags(e.data_version.as_tags())
        log_dataset(e.data, e.data_version)
        mlflow.log_artifact(str(e.checkpoint_path), "checkpoint")
        mlflow.log_dict(e.preprocessing, "preprocessing.json")
        log_parity(e.parity)
        if e.report is not None:
            log_report(e.report)
        if e.base_metrics is not None:
            mlflow.log_metrics(e.base_metrics)
        model_uri = log_onnx_model(e.onnx_path, e.example, e.preprocessing, name=e.logged_name)
    relearn = (e.report or {}).get("relearn")
    tags = {**e.tags, **({"relearn": relearn} if relearn else {})}
    ensure_registered_model(model_name)
    version = mlflow.register_model(model_uri, model_name, tags={k: as_tag(v) for k, v in tags.items()})
    return str(version.version)


def ensure_registered_model(name: str) -> None:
    """Makes the registered model `name` when there is none, born with its own (empty) record of
    deleted classes (nhle.adapters.deletions), so no version of it exists without that record."""

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={RECORD_TAG: encode({})})


def log_outcome(
    run_id: str, gates: list[GateResult], promoted: bool, reason: str, version: str, notified: list[dict]
) -> None:
    """The gates (gates.json, gate/* metrics) and the promotion on the run."""
    with logging_to(run_id):
        log_gates(gates)
        mlflow.set_tags({"promoted": str(promoted).lower(), "promotion_reason": reason, "model_version": str(version)})
        if notified:
            mlflow.log_dict(notified, NOTIFIED)


def set_run_tags(run_id: str, tags: dict) -> None:
    """Tags on run `run_id`, whatever its state (its status stays as it is)."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_artifacts_to(run_id: str, paths: list[Path], folder: str) -> None:
    """Files logged to run `run_id` under `folder`, whatever its state."""
    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), folder)


def version_tags(name: str, version: str) -> tuple[dict, str]:
    """(tags, run id) of a registered version."""
    mv = MlflowClient().get_model_version(name, str(version))
    return dict(mv.tags), mv.run_id


def log_run_files(run_id: str, files: dict[str, dict | str]) -> None:
    """Artifacts written into a finished or running run: a dict as JSON, a str as text."""
    client = MlflowClient()
    for path, content in files.items():
        if isinstance(content, dict):
            client.log_dict(run_id, content, path)
        else:
            client.log_text(run_id, content, path)


def sign_registered_version(name: str, version: str, gates: list[dict], private_key: Path) -> None:
    """Sign the registered version's ONNX file, as the registry stores it, with its evidence (its
    preprocessing metadata, forgotten classes and `gates`; nhle.adapters.signing), log both to the
    version's run under signature/ and tag the version with where they are."""

    mv = MlflowClient().get_model_version(name, str(version))
    with tempfile.TemporaryDirectory(prefix="nhle-sign-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
        onnx_file = local / mlmodel["flavors"]["onnx"].get("data", "model.onnx")
        doc = signing.evidence(
            name,
            str(version),
            hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
            dict(mlmodel.get("metadata") or {}),
            from_tag(mv.tags, "forgotten_classes", []),
            gates,
        )
        evidence_bytes, signature = signing.sign_version(onnx_file, doc, private_key)
    log_run_files(
        mv.run_id,
        {
            f"{signing.ARTIFACT_DIR}/{signing.EVIDENCE}": evidence_bytes.decode(),
            f"{signing.ARTIFACT_DIR}/{signing.SIGNATURE}": signature.decode(),
        },
    )
    tag_version(name, str(version), {"signature": f"runs:/{mv.run_id}/{signing.ARTIFACT_DIR}"})


def signed_versions(name: str) -> list[str]:
    """The versions of `name` that carry a signature."""
    return [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'") if "signature" in v.tags]


def fail_runs(run_ids: list[str]) -> None:
    """Runs that died before registering anything: tagged nhle.abandoned and marked FAILED."""
    client = MlflowClient()
    for run_id in run_ids:
        client.set_tag(run_id, "nhle.abandoned", "true")
        client.set_terminated(run_id, "FAILED")


def read_text(uri: str) -> str:
    return mlflow.artifacts.load_text(uri)


def version_page(name: str, version: str) -> tuple[str, str]:
    """(the version's description, the MLflow UI's address for links: the tracking server's, or
    the address `mlflow ui` takes by default for a local store)."""
    uri = mlflow.get_tracking_uri()
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return MlflowClient().get_model_version(name, version).description or "", ui


def artifact_location(configured: str, tracking_uri: str, project_dir: Path) -> str | None:
    """Where a new experiment keeps its artifacts. A folder name is inside the project dir for a
    local store; with a tracking server (http/https) it is ignored, so that the server's own
    --artifacts-destination holds them and every client up- and downloads through the server.
    A URI with a scheme (s3://, gs://, mlflow-artifacts:/...) is used as it is."""
    if "://" in configured or configured.startswith("mlflow-artifacts:"):
        return configured
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return resolve_uri(configured, project_dir)


def log_params(params: Params) -> None:
    mlflow.log_params({k: str(v) for k, v in flatten(asdict(params)).items()})


def log_report(report: dict) -> None:
    """report.json, and its metrics (report_metrics) on the active run."""
    mlflow.log_metrics(report_metrics(report))
    mlflow.log_dict(report, REPORT)


def complete_report(name: str, version: str, report: dict) -> None:
    """The version's report.json replaced by `report` (its retrained reference added after
    promotion) and its metrics logged, whatever its run's state; the version's relearn tag and
    description follow, and its tag `evidence` becomes complete."""
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in report_metrics(report).items()])
    client.log_dict(run_id, report, REPORT)
    tag_version(name, version, {"relearn": report["relearn"], "evidence": "complete"})
    describe_version(name, version)


def report_metrics(report: dict) -> dict:
    """Every metric block of report.json as `<block>/<metric>`, plus seconds, the drop and the
    relearn shares (their raw steps are the blocks' relearn_steps_*)."""
    metrics = {
        f"{block}/{key}": float(value) for block, values in report["metrics"].items() for key, value in values.items()
    }
    metrics.update({f"seconds/{key}": float(value) for key, value in report["seconds"].items()})
    metrics["unlearned/retained_drop_pp"] = report_retained_drop_pp(report)
    metrics.update(relearn_metrics(report.get("relearn")))
    return metrics


def relearn_metrics(relearn: dict | None) -> dict:
    """report.json's relearn shares as `relearn/share_<attacker>` and `relearn/reference_steps`;
    nothing for a report written before them."""
    if not relearn:
        return {}
    return {
        **{f"relearn/share_{who}": float(relearn[who]) for who in ("shipped", "restored", "mask_only")},
        "relearn/reference_steps": float(relearn["reference_steps"]),
    }


def log_parity(parity: dict) -> None:
    mlflow.log_metrics(
        {"parity/argmax_agreement": parity["argmax_agreement"], "parity/max_abs_prob_diff": parity["max_abs_prob_diff"]}
    )
    mlflow.log_dict(parity, PARITY)


def log_gates(gates: list[GateResult]) -> None:
    mlflow.log_dict([g.as_dict() for g in gates], GATES)
    mlflow.log_metrics({f"gate/{g.name}": float(g.passed) for g in gates})


def log_dataset(data, data_version, context: str = "training") -> None:
    """The DVC-versioned dataset as the run's MLflow dataset input (the run's Datasets column):
    source = the DVC-tracked folder, digest = its DVC md5, tags = path, md5, git revision, remote."""
    source = str(Path(data_version.repo) / data_version.path)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the local folder
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(
            data.train.images.numpy(),
            targets=data.train.labels.numpy(),
            source=source,
            name=f"{data.name}@{data_version.git_rev[:8]}",
            digest=data_version.md5.removesuffix(".dir")[:36],
        )
    tags = {**data_version.as_tags("dvc."), "dvc.remote": data_version.remote}
    mlflow.log_input(dataset, context=context, tags=tags)


def log_onnx_model(onnx_path: Path, example: np.ndarray, metadata: dict, name: str) -> str:
    """Log the ONNX model as logged model `name` with a signature (its named output) and an input
    example; returns its URI (registered by the caller, with its tags)."""
    from nhle.core.export import make_session  # noqa: PLC0415 - lazy: torch, only when a model is logged

    session = make_session(onnx_path)
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: example}))
    )
    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=name,
        signature=infer_signature(example, outputs),
        input_example=example,
        pip_requirements=ONNX_REQUIREMENTS,
        save_as_external_data=False,
        metadata=metadata,
        onnx_execution_providers=["CPUExecutionProvider"],
    )
    return info.model_uri


def tag_version(name: str, version: str, tags: dict) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, as_tag(value))


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def record_promotion(registry: RegistryConfig, version: str, promoted: bool, reason: str) -> None:
    """Carry out nhle.core.gates.promotion_decision's verdict: when promoted, `previous` moves to the
    former champion and `champion` to `version`; either way the version is tagged with it."""
    name = registry.model_name
    if not promoted:
        tag_version(name, version, {"promoted": "false", "rejection_reason": reason})
        return
    client = MlflowClient()
    current = version_by_alias(name, registry.champion_alias)
    if current is not None:
        client.set_registered_model_alias(name, registry.previous_alias, current.version)
    client.set_registered_model_alias(name, registry.champion_alias, version)
    tag_version(name, version, {"promoted": "true", "replaced_version": str(current.version if current else "")})


def name_flag(name: str) -> str:
    """` --name NAME` for a registered model other than the project's default, else nothing: what
    the commands printed for a user must carry to act on the same model."""
    return "" if is_default_model(name) else f" --name {name}"


def rollback(registry: RegistryConfig, deleted: dict[int, list[int]], reopen=None) -> tuple[str, str]:
    """Move `champion` back to `previous`; `previous` moves one step further back when known.
    Returns (from_version, to_version).

    `deleted` is the ledger's classes deleted on record (class -> done request ids). The target
    must forget every one of them; otherwise nothing moves, unless `reopen` (a callable taking
    the request ids to reopen and the two versions) records first that an operator takes those
    requests back."""
    name = registry.model_name
    client = MlflowClient()
    champion = version_by_alias(name, registry.champion_alias)
    previous = version_by_alias(name, registry.previous_alias)
    if previous is None:
        raise ValueError(f"model {name!r} has no {registry.previous_alias!r} alias to roll back to")
    before, after = (str(champion.version) if champion else ""), str(previous.version)
    missing, requests = deleted_but_predicted(from_tag(previous.tags, "forgotten_classes", []), deleted)
    if missing:
        if reopen is None:
            raise ValueError(
                f"version {previous.version} predicts class(es) {missing}, deleted on record by forget request(s) "
                f"{requests}: rolling back would bring them back. Nothing was moved. To do it anyway, reopen "
                f"those requests on record: nhle rollback{name_flag(name)} "
                f"--reopen {' --reopen '.join(map(str, requests))} --reason '...'"
            )
        reopen(requests, before, after)
        tag_version(name, after, {f"reopened.request.{r}": "true" for r in requests})
    client.set_registered_model_alias(name, registry.champion_alias, after)
    earlier = previous.tags.get("replaced_version")
    if earlier:
        client.set_registered_model_alias(name, registry.previous_alias, earlier)
    else:
        client.delete_registered_model_alias(name, registry.previous_alias)
    if champion is not None:
        tag_version(name, before, {"rolled_back": "true"})
    return before, after


def version_description(tags: dict, run_id: str, experiment_id: str) -> str:
    """The model version page's text (Markdown, as the MLflow UI renders it), made from the
    version's tags: what it forgot and from which version, its gates, its relearn shares, and
    where the evidence is."""
    run = f"#/experiments/{experiment_id}/runs/{run_id}"

    def artifact(path: str, text: str | None = None) -> str:
        # The MLflow UI's run page with that artifact open (hash routes, relative to the UI's root).
        return f"[{text or path}]({run}/artifacts/{path})"

    forgotten = from_tag(tags, "forgotten_class_names", [])
    parent = tags.get("parent_version")
    lines = [
        f"**Never predicts:** {', '.join(map(str, forgotten)) or 'nothing forgotten'}"
        + (f" (made from version {parent})" if parent else "")
        + ".",
        "",
    ]
    if tags.get("nhle.abandoned") == "true":
        lines.append(f"**Abandoned:** {tags.get('nhle.abandoned_reason', 'the run that made it died')}")
    if tags.get("promoted") == "true":
        lines.append("**Promoted:** every gate held.")
    elif tags.get("promoted") == "false":
        lines.append(f"**Not promoted:** {tags.get('rejection_reason', '')}")
    gates = from_tag(tags, "gates", [])
    if gates:
        lines += ["", "| gate | value | bound | result |", "|---|---|---|---|"]
        lines += [
            f"| {g['name']} | {g['value']:.4g} | {g['rule']} {g['bound']:.4g} | {'pass' if g['passed'] else 'FAIL'} |"
            for g in gates
        ]
    lines += relearn_description(tags.get("relearn"))
    if tags.get("evidence") == "pending":
        lines += [
            "",
            "**Evidence: pending.** The retrained reference, the plots and the deletion of the forgotten "
            "classes' samples from the dataset come after the promotion (no gate reads them); report.json, "
            "the relearn shares and this description are completed then.",
        ]
    if "nhle.recipe" in tags:
        lines += [
            "",
            f"**Recipe:** {tags['nhle.recipe']} (attempt {tags.get('nhle.attempt', '1')}; every attempt "
            f"and why it failed: {artifact(ATTEMPTS)}).",
        ]

    lines += [
        "",
        f"**Evidence** ([run {run_id}]({run})): {artifact(REPORT)} (every metric against the "
        f"original and the retrained reference), {artifact(GATES)}, {artifact(PARITY)}, "
        f"{artifact('plots')}, {artifact('preprocessing.json')}, {artifact('checkpoint/model.pt')}.",
    ]
    audits = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tags.items() if k.startswith("audit.request."))
    if audits:
        lines += [
            "",
            "**Audit reports:** "
            + ", ".join(
                artifact(uri.removeprefix(f"runs:/{run_id}/"), f"request {i}") + f" (`{uri}`)" for i, uri in audits
            ),
        ]
    return "\n".join(lines)


def relearn_description(tag: str | None) -> list[str]:
    """The version's relearn shares (its `relearn` tag, report.json's) with their raw steps."""
    return ["", f"**Relearn share** {relearn_sentence(json.loads(tag))}."] if tag else []


def describe_version(name: str, version: str) -> None:
    """Write version_description onto the registered version (again whenever its tags grow)."""
    client = MlflowClient()
    mv = client.get_model_version(name, version)
    experiment_id = client.get_run(mv.run_id).info.experiment_id
    client.update_model_version(name, version, description=version_description(dict(mv.tags), mv.run_id, experiment_id))


def download_checkpoint(version: ModelVersion, folder: str | Path | None = None) -> Path:
    """The PyTorch checkpoint logged beside a registered version (artifact checkpoint/model.pt)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="nhle-champion-"))
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path="checkpoint/model.pt", dst_path=str(folder)
        )
    )


SYNTHETIC_ARTIFACT = "checkpoint/synthetic.pt"
"""Where a version keeps its model's synthetic inputs, beside its checkpoint (anchors.SyntheticInputs)."""


def download_synthetic_inputs(name: str, version: str, folder: str | Path) -> Path | None:
    """The synthetic inputs kept beside registered version `version`, or None when it has none yet."""
    run_id = MlflowClient().get_model_version(name, version).run_id
    try:
        return Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SYNTHETIC_ARTIFACT, dst_path=str(folder))
        )
    except (MlflowException, OSError):
        return None


def keep_synthetic_inputs(name: str, version: str, path: Path) -> None:
    """Log `path` as the synthetic inputs of version `version` (to the run that registered it,
    finished or not), for every later request on that version."""
    run_id = MlflowClient().get_model_version(name, version).run_id
    MlflowClient().log_artifact(run_id, str(path), str(Path(SYNTHETIC_ARTIFACT).parent))


def versions_tagged(name: str, key: str, value: str) -> list[ModelVersion]:
    """Versions of registered model `name` whose tag `key` equals `value`, oldest first."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    return sorted(found, key=lambda v: int(v.version))


def runs_tagged(key: str, value: str) -> list:
    """Runs of the current experiment whose tag `key` equals `value`."""
    return mlflow.search_runs(filter_string=f"tags.`{key}` = '{value}'", output_format="list")


def reap_dead_runs(name: str) -> list[dict]:
    """Runs of the current experiment left RUNNING by a process of this host that no longer
    exists (tag nhle.owner; a SIGKILL leaves them so) are marked KILLED and tagged
    nhle.abandoned. A version such a run registered before its gates were judged is tagged
    nhle.abandoned with the reason in its description; it was never promoted, and the server
    never serves a version without passed gates. Runs of forget requests (tag nhle.batch) are
    left to the request path, which settles what they registered. Returns what was marked."""

    client = MlflowClient()
    reaped = []
    for run in mlflow.search_runs(filter_string="attributes.status = 'RUNNING'", output_format="list"):
        tags = run.data.tags
        if "nhle.batch" in tags or not owner_is_gone(tags.get("nhle.owner")):
            continue
        reason = f"its process ({tags['nhle.owner']}) died while the run was RUNNING"
        # Promotion comes after the gates tag: a version without one never was promoted.
        abandoned = [
            str(mv.version)
            for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
            if "gates" not in mv.tags
        ]
        for version in abandoned:
            tag_version(
                name,
                version,
                {
                    "nhle.abandoned": "true",
                    "nhle.abandoned_reason": f"run {run.info.run_id} registered it and died before its gates "
                    f"were judged ({reason}); never promoted, never served.",
                },
            )
            describe_version(name, version)
        client.set_tag(run.info.run_id, "nhle.abandoned", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append({"run_id": run.info.run_id, "owner": tags["nhle.owner"], "abandoned_versions": abandoned})
    return reaped


def run_json(run_id: str, path: str):
    """A JSON artifact of a run (report.json, parity.json, gates.json), or None when it is absent."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError):
        return None


def aliases_of(name: str, version: str) -> list[str]:
    return list(MlflowClient().get_model_version(name, version).aliases)
