"""The jobs the CLI and the flows run: train a base model, and forget classes with a report.

    from nhle.core.experiment import train_base_model, forget_and_measure, validate_forget
    model, checkpoint = train_base_model(DataConfig(), TrainConfig())
    classes = validate_forget(model, "3", checkpoint["class_names"])   # the request, parsed once
    outcome = forget_and_measure(model, checkpoint, classes, seed=0, retrain_baseline=True)
    outcome.report    # the report.json contract: metrics of original / unlearned / retrained, relearn shares

Plain library code: no tracking, orchestration or data-versioning imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nhle.core.audit import relearn_sentence
from nhle.core.config import DataConfig, ModelConfig, TrainConfig, UnlearnConfig, replace_known, to_dict
from nhle.core.data import Splits, drop_classes, load_dataset, parse_classes, sample_per_class, split_by_classes
from nhle.core.files import REPORT, write_json
from nhle.core.gates import check_a_class_is_left
from nhle.core.metrics import (
    METRIC_KEYS,
    evidence_metrics,
    forget_metrics,
    measure_case,
    relearn_shares,
    relearn_target_accuracy,
)
from nhle.core.models import GRAPH, MaskedClassifier, ModelSpec
from nhle.core.training import check_training, evaluate, recipe_of, save_checkpoint, train_model, training_spec
from nhle.core.unlearning import UnlearnResult, apply_class_weight_mask, unlearn, without_mask


def load_data(config: DataConfig) -> Splits:
    return load_dataset(
        config.dataset,
        root=config.root,
        seed=config.seed,
        test_fraction=config.test_fraction,
        download=config.download,
        image_size=config.image_size,
        class_names=config.class_names,
        skip_bad_images=config.skip_bad_images,
    )


def train_base_model(
    data_config: DataConfig,
    train_config: TrainConfig,
    data: Splits | None = None,
    progress: bool = True,
    model_config: ModelConfig = ModelConfig(),
) -> tuple[MaskedClassifier, dict]:
    """Train the base model (model_config.arch from random initialisation); returns it and the
    checkpoint metadata to save with it."""
    data = data or load_data(data_config)
    model, seconds = train_model(
        data, train_config, seed=data_config.seed, progress=progress, spec=base_spec(model_config, data)
    )
    meta = base_meta(data_config, model_config, train_config, data)
    meta["metrics"] = {**base_metrics(model, data), "train_seconds": seconds}
    return model, meta


def base_spec(model_config: ModelConfig, data: Splits) -> ModelSpec:
    """The network a base model of `data` is trained as, refusing settings that ask for another."""
    if model_config.weights != "none" or model_config.from_mlflow:
        raise ValueError(
            "model.weights / model.from_mlflow are set: `nhle import` registers your model as it is "
            "(training starts from random initialisation, so it would ignore them)"
        )
    return training_spec(model_config, data)


def check_base_training(model_config: ModelConfig, train_config: TrainConfig, data: Splits) -> None:
    """Refuses at once the settings that train_base_model would refuse midway."""
    check_training(base_spec(model_config, data), train_config)


def base_meta(data_config: DataConfig, model_config: ModelConfig, train_config: TrainConfig, data: Splits) -> dict:
    """What a base model's checkpoint records besides its weights: the settings (train is the
    recipe of its retrained reference) and the exact data."""
    return {
        "config": {"data": to_dict(data_config), "model": to_dict(model_config), "train": to_dict(train_config)},
        "dataset": data.name,
        "class_names": data.class_names,
        "data_fingerprint": data.fingerprint(),
    }


def base_metrics(model: MaskedClassifier, data: Splits) -> dict:
    return {"train_acc": evaluate(model, data.train), "test_acc": evaluate(model, data.test)}


def data_for_checkpoint(checkpoint: dict) -> Splits:
    """Reload the exact data a checkpoint was trained on, or fail saying what differs."""
    data = load_data(replace_known(DataConfig(), **checkpoint["config"]["data"]))
    if data.fingerprint() != checkpoint["data_fingerprint"]:
        raise ValueError(
            f"the {data.name} data found now differs from the data this model was trained on "
            f"(fingerprint {data.fingerprint()[:12]} != {checkpoint['data_fingerprint'][:12]})"
        )
    return data


def validate_forget(model: MaskedClassifier, spec, class_names: list[str]) -> list[int]:
    """Parse a forget request against a model: unknown, already-forgotten, or all classes -> error."""
    classes = parse_classes(spec, class_names)
    already = [c for c in classes if bool(model.forget_mask[c])]
    if already:
        raise ValueError(f"class(es) {[class_names[c] for c in already]} are already forgotten by this model")
    check_a_class_is_left(model.num_classes, model.forgotten_classes, classes, str([class_names[c] for c in classes]))
    return classes


class Retrained(NamedTuple):
    """The model retrained without the classes (the reference of a forget)."""

    model: MaskedClassifier
    """Masked on the classes, as shipped."""
    snapshot: object
    """Its rows of the classes as trained, before masking (masking.MaskSnapshot): the attack's."""
    seconds: float


@dataclass
class ForgetOutcome:
    report: dict
    result: UnlearnResult
    retrained: Retrained | None
    """The retrained reference, for another recipe on the same request."""


def retrain_without(
    data: Splits,
    train_config: TrainConfig,
    classes,
    seed: int,
    progress: bool = True,
    masked=(),
    spec: ModelSpec | None = None,
) -> Retrained:
    """The gold standard: the same recipe (architecture `spec`, default smallcnn) from scratch
    without `classes` (and without the already-forgotten `masked` classes, which are masked too),
    then masked."""
    model, seconds = train_model(
        data, train_config, seed=seed, exclude=sorted({*classes, *masked}), progress=progress, spec=spec
    )
    if masked:
        apply_class_weight_mask(model, masked)
    return Retrained(model, apply_class_weight_mask(model, classes), seconds)


def forget_and_measure(
    model: MaskedClassifier,
    checkpoint: dict,
    classes: list[int],
    seed: int = 0,
    config: UnlearnConfig = UnlearnConfig(),
    retrain_baseline: bool = False,
    data: Splits | None = None,
    device: str = "auto",
    progress: bool = True,
    retrained: Retrained | None = None,
    synthetic=None,
    defer_evidence: bool = False,
) -> ForgetOutcome:
    """Unlearn `classes` (indices, as validate_forget returns them) from `model` with NHLE +
    masking, and measure the result against the original (and, if asked, a model retrained
    without them). `retrained` may pass a Retrained computed before, to share
    one retrain between several methods. `synthetic`: the model's synthetic inputs kept from an
    earlier request (anchors.SyntheticInputs), reused when they match the recipe.
    defer_evidence: what no gate reads is left for completed_report to add later (the pipeline
    promotes first): the evidence metrics of the original and unlearned models
    (metrics.evidence_metrics) and the retrained reference; report["pending"] names them."""
    data = data or data_for_checkpoint(checkpoint)
    earlier = model.forgotten_classes
    # Classes forgotten before are neither forget nor retained classes now: the model no longer
    # serves them, so they stay out of every metric and out of the retrained reference.
    data = drop_classes(data, earlier)
    samples = sample_per_class(data.train, classes, config.n_samples, seed)
    result = unlearn(model, samples, classes, config, device=device, synthetic=synthetic)
    target_acc = relearn_target_accuracy(model, data, classes, config.relearn_target)

    measure = measure_case(data, classes, samples, config.relearn_max_steps, config.relearn_lr, seed, target_acc)

    def measure_now(candidate, attack):  # the pre-mask rows (`attack`) exist only now: never deferred
        if not defer_evidence:
            return measure(candidate, attack)
        return forget_metrics(
            candidate,
            data,
            classes,
            samples,
            attack,
            config.relearn_max_steps,
            config.relearn_lr,
            relearn_target_acc=target_acc,
        )

    attacked = without_mask(result.model, result.snapshot) if result.snapshot else None
    metrics = {"original": measure_now(model, None), "unlearned": measure_now(result.model, attacked)}
    seconds = {"unlearn": result.seconds, "synthesis": result.synthesis_seconds}
    reference = {"kind": "none", "why": "retrain_baseline is false"}
    if retrain_baseline and retrained is None and model.arch == GRAPH:
        reference = {
            "kind": "none",
            "why": "the model is a traced graph (imported from MLflow): it has no "
            "architecture to retrain from scratch; import it with --arch and --weights to get one",
        }
    elif defer_evidence and retrain_baseline and retrained is None:
        reference = {
            "kind": "pending",
            "why": "the model retrained without the classes is computed after promotion "
            "(no gate reads it); the report is completed then",
        }
    elif retrain_baseline or retrained is not None:
        reference, metrics["retrained"], seconds["retrain"], retrained = retrained_reference(
            model.arch, checkpoint, data, classes, seed, earlier, measure, progress, retrained
        )
    report = {
        "dataset": data.name,
        "model": model.arch,
        "forget_classes": classes,
        "reference": reference,
        "forget_class_names": [data.class_names[c] for c in classes],
        "seed": seed,
        "n_forget_samples": len(samples),
        "encoding": config.encoding,
        "metrics": metrics,
        "relearn": relearn_shares(metrics),
        "seconds": seconds,
        "unlearn_steps": result.steps,
        "stopped_early": result.stopped_early,
        "stepped_back": result.stepped_back,
        "drift": result.drift,
        "synthetic_inputs": "none"
        if result.synthetic is None
        else "synthesised"
        if result.synthesis_seconds
        else "reused",
        "unlearn_config": to_dict(config),
        "data_fingerprint": checkpoint["data_fingerprint"],
        "previously_forgotten": earlier,
        "relearn_target_acc": target_acc,
        "num_classes": len(data.class_names),
        "pending": (["evidence_metrics"] + (["reference"] if reference["kind"] == "pending" else []))
        if defer_evidence
        else [],
    }
    return ForgetOutcome(report, result, retrained if reference["kind"] == "retrained" else None)


def retrained_reference(
    arch: str,
    checkpoint: dict,
    data: Splits,
    classes: list[int],
    seed: int,
    earlier,
    measure,
    progress: bool = True,
    retrained: Retrained | None = None,
) -> tuple[dict, dict, float, Retrained]:
    """(reference description, its metrics, retrain seconds, the Retrained) of the
    model's recipe retrained on `data` without `classes` and the `earlier` forgotten ones;
    `measure(model, attack_model)` gives a model's metrics."""
    model_config, train_config = recipe_of(checkpoint)
    reference = {"kind": "retrained", "arch": arch, "recipe": to_dict(train_config)}
    spec = training_spec(replace_known(model_config, arch=arch), data)
    retrained = retrained or retrain_without(data, train_config, classes, seed, progress, masked=earlier, spec=spec)
    return (
        reference,
        measure(retrained.model, without_mask(retrained.model, retrained.snapshot)),
        retrained.seconds,
        retrained,
    )


def completed_report(
    report: dict,
    checkpoint: dict,
    original: MaskedClassifier,
    unlearned: MaskedClassifier,
    data: Splits,
    progress: bool = False,
) -> dict:
    """`report` (forget_and_measure's, with defer_evidence) with what it left pending added, as
    forget_and_measure would have measured it at once: the evidence metrics of `original` and
    `unlearned` (the shipped model) and the retrained reference. `data` is the data the forget
    started from (before its classes' samples were deleted), `checkpoint` any checkpoint of the
    lineage (it carries the training recipe)."""
    pending = report.get("pending", ["reference"] if report["reference"]["kind"] == "pending" else [])
    classes, seed, earlier = report["forget_classes"], report["seed"], report["previously_forgotten"]
    config = report["unlearn_config"]
    data = drop_classes(data, earlier)
    metrics, seconds, reference = dict(report["metrics"]), dict(report["seconds"]), report["reference"]
    if "evidence_metrics" in pending:
        for name, model in (("original", original), ("unlearned", unlearned)):
            measured = {**metrics[name], **evidence_metrics(model, data, classes, seed)}
            metrics[name] = {key: measured[key] for key in METRIC_KEYS}
    if "reference" in pending:
        samples = sample_per_class(data.train, classes, config["n_samples"], seed)

        measure = measure_case(
            data,
            classes,
            samples,
            config["relearn_max_steps"],
            config["relearn_lr"],
            seed,
            report["relearn_target_acc"],
        )

        reference, metrics["retrained"], seconds["retrain"], _ = retrained_reference(
            report["model"], checkpoint, data, classes, seed, earlier, measure, progress
        )
    return {
        **report,
        "reference": reference,
        "metrics": metrics,
        "relearn": relearn_shares(metrics),
        "seconds": seconds,
        "pending": [],
    }


def lineage(checkpoint: dict) -> dict:
    """What every model made from `checkpoint` inherits: settings, data and where it came from."""
    return {
        k: checkpoint[k] for k in ("config", "dataset", "class_names", "data_fingerprint", "source") if k in checkpoint
    }


def save_unlearned(folder, outcome: ForgetOutcome, checkpoint: dict, parent: str) -> Path:
    """Write folder/model.pt (the unlearned model, mask set) and folder/report.json."""
    folder = Path(folder)
    save_checkpoint(
        folder / "model.pt",
        outcome.result.model,
        parent=parent,
        unlearn=outcome.report["unlearn_config"],
        **lineage(checkpoint),
    )
    write_json(folder / REPORT, outcome.report)
    return folder


def summary_lines(report: dict) -> list[str]:
    """The report as a small table for the terminal."""
    metrics = report["metrics"]
    columns = [c for c in ("original", "unlearned", "retrained") if c in metrics]
    lines = [
        f"forget {report['forget_class_names']} from {report['model']} on {report['dataset']} "
        f"(seed {report['seed']}, {report['n_forget_samples']} samples, encoding {report['encoding']})",
        f"{'metric':<26}" + "".join(f"{c:>12}" for c in columns),
    ]
    for key in metrics["original"]:
        lines.append(f"{key:<26}" + "".join(f"{metrics[c][key]:>12.4g}" for c in columns))
    if "relearn" in report:
        lines.append(f"relearn share {relearn_sentence(report['relearn'])}")
    seconds = report["seconds"]
    line = f"unlearn {seconds['unlearn']:.2f} s"
    if "retrain" in seconds:
        line += f", retrain {seconds['retrain']:.2f} s, ratio {seconds['unlearn'] / seconds['retrain']:.3f}"
    return lines + [line]


__all__ = [
    "ForgetOutcome",
    "Retrained",
    "completed_report",
    "data_for_checkpoint",
    "forget_and_measure",
    "load_data",
    "retrain_without",
    "save_unlearned",
    "split_by_classes",
    "summary_lines",
    "train_base_model",
    "validate_forget",
]
