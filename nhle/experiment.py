"""The jobs the CLI and the flows run: train a base model, and forget classes with a report.

    from nhle.experiment import train_base, forget
    model, checkpoint = train_base(DataConfig(), TrainConfig())
    outcome = forget(model, checkpoint, "3", seed=0, retrain_baseline=True)
    outcome.report    # the report.json contract: metrics of original / unlearned / retrained

Plain library code: no tracking, orchestration or data-versioning imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nhle.config import DataConfig, TrainConfig, UnlearnConfig, to_dict
from nhle.data import Splits, drop_classes, load_dataset, parse_classes, sample_per_class, split_by_classes
from nhle.metrics import evaluate_forgetting
from nhle.models import MaskedClassifier
from nhle.training import evaluate, train_model
from nhle.unlearning import UnlearnResult, apply_class_weight_mask, unlearn, without_mask


def load_data(config: DataConfig) -> Splits:
    return load_dataset(config.dataset, root=config.root, seed=config.seed, test_fraction=config.test_fraction,
                        download=config.download, image_size=config.image_size)


def train_base(data_config: DataConfig, train_config: TrainConfig, data: Splits | None = None,
               progress: bool = True) -> tuple[MaskedClassifier, dict]:
    """Train the base model; returns it and the checkpoint metadata to save with it."""
    data = data or load_data(data_config)
    model, seconds = train_model(data, train_config, seed=data_config.seed, progress=progress)
    meta = {"config": {"data": to_dict(data_config), "train": to_dict(train_config)},
            "dataset": data.name, "class_names": data.class_names, "data_fingerprint": data.fingerprint(),
            "metrics": {"train_acc": evaluate(model, data.train), "test_acc": evaluate(model, data.test),
                        "train_seconds": seconds}}
    return model, meta


def data_for_checkpoint(checkpoint: dict) -> Splits:
    """Reload the exact data a checkpoint was trained on, or fail saying what differs."""
    data = load_data(DataConfig(**checkpoint["config"]["data"]))
    if data.fingerprint() != checkpoint["data_fingerprint"]:
        raise ValueError(f"the {data.name} data found now differs from the data this model was trained on "
                         f"(fingerprint {data.fingerprint()[:12]} != {checkpoint['data_fingerprint'][:12]})")
    return data


def validate_forget(model: MaskedClassifier, spec, class_names: list[str]) -> list[int]:
    """Parse a forget request against a model: unknown, already-forgotten, or all classes -> error."""
    classes = parse_classes(spec, class_names)
    already = [c for c in classes if bool(model.forget_mask[c])]
    if already:
        raise ValueError(f"class(es) {[class_names[c] for c in already]} are already forgotten by this model")
    left = model.num_classes - int(model.forget_mask.sum()) - len(classes)
    if left < 1:
        raise ValueError(f"forgetting {[class_names[c] for c in classes]} would leave no class to predict")
    return classes


@dataclass
class ForgetOutcome:
    report: dict
    result: UnlearnResult
    retrained: MaskedClassifier | None


def retrain_without(data: Splits, train_config: TrainConfig, classes, seed: int, progress: bool = True,
                    masked=()):
    """The gold standard: the same recipe from scratch without `classes` (and without the
    already-forgotten `masked` classes, which are masked too), then masked.
    Returns (model, snapshot of the `classes` rows as trained, seconds)."""
    model, seconds = train_model(data, train_config, seed=seed, exclude=sorted({*classes, *masked}),
                                 progress=progress)
    if masked:
        apply_class_weight_mask(model, masked)
    return model, apply_class_weight_mask(model, classes), seconds


def forget(model: MaskedClassifier, checkpoint: dict, spec, seed: int = 0, config: UnlearnConfig = UnlearnConfig(),
           retrain_baseline: bool = False, data: Splits | None = None, device: str = "auto",
           progress: bool = True, retrained=None) -> ForgetOutcome:
    """Unlearn the classes in `spec` from `model` with NHLE + masking, and measure the result
    against the original (and, if asked, a model retrained without them). `retrained` may pass a
    (model, snapshot, seconds) computed before, to share one retrain between several methods."""
    data = data or data_for_checkpoint(checkpoint)
    classes = validate_forget(model, spec, data.class_names)
    earlier = torch.nonzero(model.forget_mask).flatten().tolist()
    # Classes forgotten before are neither forget nor retained classes now: the model no longer
    # serves them, so they stay out of every metric and out of the retrained reference.
    data = drop_classes(data, earlier)
    samples = sample_per_class(data.train, classes, config.n_samples, seed)
    result = unlearn(model, samples, classes, config, device=device)

    def measure(candidate, attack):
        return evaluate_forgetting(candidate, data, classes, samples, attack, config.relearn_max_steps,
                                   config.relearn_lr, seed)

    attacked = without_mask(result.model, result.snapshot) if result.snapshot else None
    metrics = {"original": measure(model, None), "unlearned": measure(result.model, attacked)}
    seconds = {"unlearn": result.seconds}
    if retrain_baseline or retrained is not None:
        train_config = TrainConfig(**checkpoint["config"]["train"])
        retrained = retrained or retrain_without(data, train_config, classes, seed, progress, masked=earlier)
        metrics["retrained"] = measure(retrained[0], without_mask(retrained[0], retrained[1]))
        seconds["retrain"] = retrained[2]
    report = {"dataset": data.name, "model": checkpoint["model_spec"]["arch"], "forget_classes": classes,
              "forget_class_names": [data.class_names[c] for c in classes], "seed": seed,
              "n_forget_samples": len(samples), "encoding": config.encoding, "metrics": metrics,
              "seconds": seconds, "unlearn_steps": result.steps, "stopped_early": result.stopped_early,
              "unlearn_config": to_dict(config), "data_fingerprint": checkpoint["data_fingerprint"],
              "previously_forgotten": earlier}
    return ForgetOutcome(report, result, retrained[0] if retrained else None)


def save_unlearned(folder, outcome: ForgetOutcome, checkpoint: dict, parent: str) -> Path:
    """Write folder/model.pt (the unlearned model, mask set) and folder/report.json."""
    from nhle.training import save_checkpoint, write_json

    folder = Path(folder)
    meta = {k: checkpoint[k] for k in ("config", "dataset", "class_names", "data_fingerprint")}
    save_checkpoint(folder / "model.pt", outcome.result.model, parent=parent,
                    unlearn=outcome.report["unlearn_config"], **meta)
    write_json(folder / "report.json", outcome.report)
    return folder


def summary_lines(report: dict) -> list[str]:
    """The report as a small table for the terminal."""
    metrics = report["metrics"]
    columns = [c for c in ("original", "unlearned", "retrained") if c in metrics]
    lines = [f"forget {report['forget_class_names']} from {report['model']} on {report['dataset']} "
             f"(seed {report['seed']}, {report['n_forget_samples']} samples, encoding {report['encoding']})",
             f"{'metric':<26}" + "".join(f"{c:>12}" for c in columns)]
    for key in metrics["original"]:
        lines.append(f"{key:<26}" + "".join(f"{metrics[c][key]:>12.4g}" for c in columns))
    seconds = report["seconds"]
    line = f"unlearn {seconds['unlearn']:.2f} s"
    if "retrain" in seconds:
        line += f", retrain {seconds['retrain']:.2f} s, ratio {seconds['unlearn'] / seconds['retrain']:.3f}"
    return lines + [line]


def retained_drop_pp(report: dict, which: str = "unlearned") -> float:
    """Retained test accuracy drop against the original, in percentage points."""
    metrics = report["metrics"]
    return 100 * (metrics["original"]["retain_test_acc"] - metrics[which]["retain_test_acc"])


__all__ = ["ForgetOutcome", "data_for_checkpoint", "forget", "load_data", "retrain_without", "retained_drop_pp",
           "save_unlearned", "split_by_classes", "summary_lines", "train_base", "validate_forget"]
