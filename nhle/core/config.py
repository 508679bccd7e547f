"""The typed configuration: frozen dataclasses, one docstring per field, read from params.yaml.

    from nhle.core.config import load_params
    params = load_params("params.yaml")     # Params(data=..., train=..., unlearn=..., ...)

Every field has a default that works on the embedded digits dataset on a CPU; params.yaml only
needs what differs. Unknown keys are errors that name the key and the known ones.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

ENCODINGS = ("negative_hot", "uniform_rest", "negative_uniform", "complementary", "submaximum")
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
SERVING_DEVICES = ("auto", "cpu", "cuda")
DEVICES = ("auto", "cpu", "cuda")
LAYERS = ("all", "head", "backbone")
AMP_MODES = ("off", "bf16", "fp16")
EXPORTERS = ("torchscript", "dynamo")
OPTIMIZERS = ("adam", "sgd", "normalized")
RECIPES = {
    # The default before the relearn-resistant one (docs/benchmarks.md section 9): synthetic anchor,
    # early stop at mean p_F < 0.05, slow pace.
    "nhle_synthetic_anchor": {
        "shipped_weight": 0.0,
        "anchor_weight": 100.0,
        "anchor_temperature": 1.0,
        "forget_batch": 0,
        "anchor_batch": 0,
        "lr": 3e-5,
        "adaptive_lr": True,
        "max_steps": 300,
        "stop_forget_prob": 0.05,
        "feature_pull": 0.0,
        "holdout_per_class": 0,
        "max_drift": 0.0,
        "saliency": 1.0,
        "rows_steps": 0,
        "forget_confusion": 0.0,
    },
    # The fallback: the recipe of sections 1-6 of docs/benchmarks.md, which held every run of
    # every setting measured (no synthetic inputs, stop as soon as the samples are misclassified).
    "nhle_conservative": {
        "shipped_weight": 0.0,
        "anchor_weight": 100.0,
        "anchor_temperature": 1.0,
        "forget_batch": 0,
        "lr": 1e-4,
        "adaptive_lr": False,
        "max_steps": 300,
        "stop_forget_prob": 0.05,
        "synthetic_per_class": 0,
        "holdout_per_class": 0,
        "max_drift": 0.0,
        "forget_rank": 0.0,
        "feature_pull": 0.0,
        "saliency": 1.0,
        "rows_steps": 0,
        "forget_confusion": 0.0,
    },
}
"""Named NHLE recipes: overrides of the unlearn section (unlearn.fallbacks picks from them; `nhle
bench unlearning` measures each as an ablation, docs/benchmarks.md)."""
TORCHVISION_DATASETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn")
DATASETS = ("digits", *TORCHVISION_DATASETS, "imagefolder", "prepared")


def setting(
    default,
    *,
    choices: tuple[str, ...] | None = None,
    also: str | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    default_factory=None,
):
    """A config field with its allowed values on it: one of `choices` (or a text matching the
    regular expression `also`), or a number within the bounds. checked_value enforces them when a
    section is built; the CLI takes its `choices` from here."""
    rules = {
        k: v
        for k, v in (
            ("choices", choices),
            ("also", also),
            ("at_least", at_least),
            ("above", above),
            ("at_most", at_most),
        )
        if v is not None
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class Section:
    """A params.yaml section: every field is checked against its type and bounds when the section
    is built (from params.yaml, a flag, replace() or a constructor call), naming the key."""

    def __post_init__(self):
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Rules across fields, or more than a type and a bound; run after the field checks."""


@dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = setting("digits", choices=DATASETS, also=r"synthetic\d+")
    """digits (embedded), mnist, fashionmnist, cifar10, cifar100, svhn, imagefolder, or prepared (a
    folder written by `nhle prepare`); the benchmarks also take synthetic<N>, the N-sample set of
    `nhle bench scaling`."""
    root: str | None = None
    """Folder holding the dataset's files (torchvision layout, or one sub-folder per class)."""
    seed: int = 0
    """Seed of the train/test split (digits, imagefolder) and of everything random after it."""
    test_fraction: float = setting(0.25, above=0.0, at_most=0.9)
    """Share of samples held out for testing, where the dataset has no split of its own."""
    image_size: int | None = setting(None, at_least=1)
    """Resize images to this square size (e.g. 32 for ResNet-18 on digits); None keeps them."""
    class_names: str | None = None
    """A text file with one class name per line, in the order of the model's outputs (an
    imported model's); the dataset's labels are renumbered to it. None: the dataset's order."""
    skip_bad_images: bool = False
    """imagefolder: leave out files that cannot be decoded (each named in a warning) instead of
    stopping with the list of them."""
    download: bool = False
    """Let torchvision download the dataset into root (never done unless asked)."""


@dataclass(frozen=True)
class ModelConfig(Section):
    arch: str = "smallcnn"
    """The classifier: smallcnn (small grey images), resnet18_cifar (ResNet-18 with the CIFAR
    stem), any torchvision classification model by its torchvision name (resnet18, resnet50,
    mobilenet_v3_small, efficientnet_b0, vit_b_16, ...), or timm/NAME (pip install 'nhle[timm]').
    `nhle train` trains it from random initialisation; `nhle import --weights` loads yours into it."""
    weights: str = "none"
    """`nhle import`: none (random initialisation), or a file holding a state_dict (or a
    checkpoint dict holding one under weights_key), read with torch.load(weights_only=True)."""
    weights_key: str = ""
    """`nhle import`: the key of the state_dict inside a checkpoint dict (state_dict, model, ...);
    empty when the file is the state_dict itself."""
    from_mlflow: str = ""
    """`nhle import`: a PyTorch model logged with mlflow.pytorch (models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/PATH), in MLflow 3's torch.export format or pickled;
    taken instead of arch + weights."""
    mlflow_tracking_uri: str = ""
    """`nhle import`: the MLflow tracking server or store from_mlflow is in (it may be another
    than nhle's); empty: nhle's own (tracking.tracking_uri)."""
    head: str = ""
    """Module path of the final nn.Linear (fc, classifier.3, heads.head, ...); empty: found by
    the torchvision/timm convention, else as the last nn.Linear the forward pass calls."""
    mean: tuple[float, ...] | None = None
    """Input normalisation inside the model, per channel (the exported graph takes [0, 1] pixels).
    None: the training data's statistics for a model nhle trains; for `nhle import`, ImageNet's
    for torchvision weights, the model's pretrained config for timm, 0 for an MLflow model."""
    std: tuple[float, ...] | None = None
    """Per-channel std of the input normalisation; None as for mean (1 for an MLflow model)."""

    def check(self):
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value,)
            if value is not None:
                if (
                    not isinstance(value, (tuple, list))
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                    or not value
                ):
                    raise ValueError(f"ModelConfig.{name} must be a number or a list of numbers, got {value!r}")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.mean is None) != (self.std is None):
            raise ValueError("ModelConfig: give mean and std together, or neither")
        if self.weights != "none" and self.from_mlflow:
            raise ValueError("ModelConfig: weights and from_mlflow are two sources of the model; give one")
        for name in ("arch", "weights", "weights_key", "from_mlflow", "mlflow_tracking_uri", "head"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"ModelConfig.{name} must be a string, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int = setting(15, at_least=1)
    """Passes over the training split; base training and retraining use the same recipe."""
    batch_size: int = setting(64, at_least=1)
    """Samples per optimisation step."""
    lr: float = setting(1e-3, above=0.0)
    """Adam learning rate, cosine-decayed to zero over the epochs."""
    weight_decay: float = setting(0.0, at_least=0.0)
    """Adam (decoupled) weight decay."""
    device: str = setting("auto", choices=DEVICES, also=r"cuda:\d+")
    """auto (CUDA when present, else CPU), cpu, cuda, or cuda:N (the GPU of index N)."""
    amp: str = setting("off", choices=AMP_MODES)
    """Mixed precision of the forward pass and loss: off, bf16 or fp16 (fp16 adds a gradient
    scaler). The weights stay fp32, so the exported ONNX model is fp32 and the parity check still
    guards it; bf16 also runs on the CPU, fp16 is meant for GPUs."""


@dataclass(frozen=True)
class UnlearnConfig(Section):
    encoding: str = setting("negative_hot", choices=ENCODINGS)
    """NHLE label encoding of the forget samples; one of ENCODINGS (chosen by measurement: docs/method.md)."""
    n_samples: int = setting(32, at_least=1)
    """Samples drawn from the train split per forgotten class; no retained data is used."""
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    """adam; sgd (momentum 0.9); or normalized (steps of lr times the weights' norm along the
    gradient; an ablation): the optimiser of the fine-tuning, on forget_batch forget samples a step."""
    forget_batch: int = setting(8, at_least=0)
    """Forget samples per step, drawn afresh every step from the n_samples of each forgotten class,
    so a step costs the same whatever the number of classes; 0: all of them every step. With
    anchor_batch, what a request costs (docs/benchmarks.md section 9: 8 and 1 kept what 16 and 2
    held on four settings of five, at 0.6-0.8 of their cost)."""
    lr: float = setting(3e-4, above=0.0)
    """Learning rate of the fine-tuning (Adam), before the pace rule (adaptive_lr) raises it; chosen
    by docs/benchmarks.md section 9."""
    lr_depth_ratio: float = setting(1.0, above=0.0)
    """Layer-wise learning rates: the first moving tensor's over the last's, geometric in between
    (10: the input layers at 10 lr, the head at lr). 1: lr everywhere (the default; screen.md,
    eleventh round)."""
    adaptive_lr: bool = False
    """Raise the learning rate (x3, at most twice) when, at the pace of the last max_steps // 3
    steps, the forget samples would not reach the stopping bound within max_steps: a model
    saturated on them moves too slowly at lr. False: lr throughout (an ablation)."""
    max_steps: int = setting(60, at_least=0)
    """Cap on the fine-tuning steps a run keeps; steps the drift check takes back (at most
    drift_retries x check_every) are taken again. The synthesis has its own (synthesis_steps)."""
    stop_forget_prob: float = setting(0.0, at_least=0.0, at_most=1.0)
    """Stop once the forget samples' mean probability of the forgotten classes (no mask) is below
    this bound and forget_rank holds. 0: never; the run takes all max_steps (the default: stopping
    as soon as the samples are misclassified leaves the class in the features, where a relearn
    attack finds it, docs/benchmarks.md section 9)."""
    forget_rank: float = setting(0.0, at_least=0.0, at_most=1.0)
    """How deep the forgotten classes must sink before stopping: on every forget sample they must
    rank below this share of the retained classes (at least one). 0: misclassified; 1: ranked
    last, where a model that never saw them puts them. Deeper moves the features more (silhouette,
    relearn steps nearer a retrained model's) at some retained accuracy: the trade-off is measured
    in docs/benchmarks.md section 7."""
    anchor_weight: float = setting(200.0, at_least=0.0)
    """Weight of the KL term that keeps the prediction over the retained classes (renormalised)
    equal to the original model's, on the forget samples and the synthetic inputs; 0: off. 200
    held the retained drop within the mask alone's + 0.3 pp where 100 did not (docs/benchmarks.md
    section 9); a heavier anchor keeps more of the features, a lighter one moves them more."""
    anchor_temperature: float = setting(4.0, above=0.0)
    """Softmax temperature of that KL term, scaled by its square as in distillation: above 1 it
    also holds inputs the model is sure of (the synthetic ones), whose KL at 1 is flat."""
    synthetic_per_class: int = setting(4, at_least=0)
    """Inputs synthesised per retained class from the model itself (DeepInversion: its batch-norm
    statistics and a smoothness prior, no data), on which the anchor holds the retained classes'
    prediction too; 0: the anchor sees the forget samples only."""
    anchor_batch: int = setting(1, at_least=0)
    """Synthetic inputs per retained class a step trains on, drawn afresh every step from the
    synthetic_per_class kept (so every one is seen, at a lower cost a step); 0: all of them."""
    synthesis_steps: int = setting(100, at_least=0)
    """Gradient steps on the pixels of the synthetic inputs."""
    layers: str = setting("all", choices=LAYERS)
    """Which parameters move: all, head (final layer only) or backbone (all but the final layer)."""
    warmup_steps: int = setting(0, at_least=0)
    """Linear learning-rate warm-up over this many steps (an ablation); 0: none."""
    saliency: float = setting(0.3, above=0.0, at_most=1.0)
    """Share of each parameter's entries that move, per forgotten class: those with the largest
    gradient of the NHLE loss on that class's samples (SalUn's saliency), united over the classes;
    the rest stay as trained, which is most of what holds retained accuracy; 1: all."""
    mask: bool = True
    """Apply class weight masking (zeroed final-layer rows and a -inf logit mask) afterwards."""
    relearn_max_steps: int = setting(300, at_least=0)
    """Cap of the relearn attack (steps); a model the attack never brings back scores the cap."""
    relearn_lr: float = setting(1e-4, above=0.0)
    """Adam learning rate of the relearn attack (plain cross-entropy on the forget samples, full batch)."""
    relearn_target: float = setting(0.95, above=0.0, at_most=1.0)
    """The relearn attack stops once the forget test accuracy is back to this share of the
    original model's (docs/method.md: the relearn share)."""
    holdout_per_class: int = setting(4, at_least=0)
    """Synthetic inputs per retained class that the loss never sees: the fine-tuning's drift is
    measured on them (max_drift); 0: no drift check."""
    max_drift: float = setting(0.05, at_least=0.0)
    """Largest drift allowed: the mean KL divergence of the prediction over the retained classes
    on the held-out synthetic inputs from the original model's, checked every check_every steps;
    past it the fine-tuning steps back to its last state within the bound and carries on more
    slowly (drift_retries), or stops there. 0: off."""
    drift_retries: int = setting(2, at_least=0)
    """Times a run past max_drift goes back to its last state within it and carries on at a third
    of the learning rate, before it stops there; 0: it stops at the first."""
    check_every: int = setting(10, at_least=1)
    """Steps between two drift checks (and the states they may step back to)."""
    fallbacks: tuple[str, ...] = setting(("nhle_synthetic_anchor", "nhle_conservative"), choices=tuple(RECIPES))
    """Recipes (RECIPES in nhle/core/config.py) a forget tries in this order when the candidate of
    the configured one fails a gate, each over the settings above; empty: no second try."""
    amp: str = setting("off", choices=AMP_MODES)
    """Mixed precision of the fine-tuning's forward pass: off, bf16 or fp16 (as train.amp). The
    weights stay fp32 and the masking is exact, so the export and parity check are unchanged."""
    weight_anchor: float = setting(0.0, at_least=0.0)
    """L2-SP: weight of the mean squared distance of every trainable parameter to its original
    value (an ablation); 0: off."""
    feature_pull: float = setting(1.0, at_least=0.0)
    """Weight of the pull of each forget sample's penultimate features to the prototype (mean
    synthetic feature) of the retained class the original model ranked next for it, so that the
    features stop carrying the class; needs synthetic_per_class > 0; 0: off."""
    rows_steps: int = setting(50, at_least=0)
    """After the fine-tuning, the forgotten classes' final-layer rows are learnt afresh (a new
    initialisation, then this many Adam steps at 1e-2, everything else fixed) on the retained
    synthetic inputs and on the forget samples labelled as the retained class the original model
    ranked next: the rows a model trained without the classes has, not the fine-tuning's, which
    still point at them; masking then removes them (with mask off, nothing is learnt afresh).
    Needs synthetic_per_class > 0; 0: the rows stay as the fine-tuning left them."""
    forget_confusion: float = setting(10.0, at_least=0.0)
    """Weight of the KL from uniform of the prediction among the forgotten classes on their
    samples, read through the final layer's rows as they stand and moving the features only (a
    request of two or more classes): the features stop telling the forgotten classes apart, as
    a model that never saw them cannot; 0: off."""
    forget_dispersion: float = setting(0.0, at_least=0.0)
    """Weight of the mean cosine similarity between the features of samples of one forgotten class
    (Spotter's intra-class dispersion): their features stop forming a cluster; 0: off (an ablation,
    docs/bench/issue25/screen.md)."""
    shipped_weight: float = setting(5.0, at_least=0.0)
    """Weight of the forgotten classes' log-probability on the forget samples as the shipped
    weights give it once the mask is taken off (the forgotten rows zero, as masking leaves them):
    lowering it makes the features, not the row masking removes, stop carrying the class, which
    is what a relearn attack on the shipped weights meets (docs/benchmarks.md section 9); 0: off."""
    shipped_floor: float = setting(1e-6, above=0.0, at_most=1.0)
    """That term leaves a sample alone once its forgotten classes' probability, rows zero, is
    below this: deep enough, without pushing the retained logits on further."""
    feature_stop: float = setting(0.5, at_least=0.0)
    """With feature_pull on, stopping also needs the features' mean squared distance to their
    prototypes below this share of the prototypes' squared norm."""

    def check(self):
        if self.feature_pull > 0 and self.synthetic_per_class < 1:
            raise ValueError(
                "unlearn.feature_pull needs unlearn.synthetic_per_class >= 1 (its prototypes are the "
                "synthetic inputs' features)"
            )
        if self.rows_steps > 0 and self.synthetic_per_class < 1:
            raise ValueError(
                "unlearn.rows_steps needs unlearn.synthetic_per_class >= 1 (the rows are learnt on the "
                "synthetic inputs); set unlearn.rows_steps to 0 without them"
            )


def to_dict(config) -> dict:
    return asdict(config)


def flatten(payload: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} as {"train.epochs": 3} (MLflow params, a grid's settings)."""
    flat = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_as_dict(params) -> dict:
    """Params as plain JSON types (a flow parameter, a deployment's parameters)."""
    return json.loads(json.dumps(asdict(params)))


def checked_value(owner: str, name: str, kind, value, rules: dict | None = None):
    """`value` as the field's type (an int is a fine float, and so is a string such as "1e9",
    which YAML 1.1 reads as text) and within the field's rules (setting()), or a ValueError
    naming the key, the value and what is allowed."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    where = f"{owner}.{name}"
    if typing.get_origin(kind) is tuple:
        items = value if isinstance(value, (tuple, list)) else (value,)
        return tuple(checked_value(owner, f"{name}[{i}]", args[0], v, rules) for i, v in enumerate(items))
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    elif kind is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (no/yes) as a boolean
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        choices, also = (rules or {}).get("choices"), (rules or {}).get("also")
        if choices and value not in choices and not (also and re.fullmatch(also, value)):
            other = f" (or {also.replace(chr(92) + 'd+', 'N')})" if also else ""
            raise ValueError(f"{where} must be one of {', '.join(choices)}{other}, got {value!r}")
        return value
    else:
        return value
    rules = rules or {}
    if "at_least" in rules and value < rules["at_least"]:
        raise ValueError(f"{where} must be at least {rules['at_least']}, got {value!r}")
    if "above" in rules and not value > rules["above"]:
        raise ValueError(f"{where} must be above {rules['above']}, got {value!r}")
    if "at_most" in rules and value > rules["at_most"]:
        raise ValueError(f"{where} must be at most {rules['at_most']}, got {value!r}")
    return value


def section_name(cls) -> str:
    """The params.yaml section a config class (or a subclass of one) is read from."""
    for base in cls.__mro__:
        for section, kind in SECTIONS.items():
            if kind is base:
                return section
    return cls.__name__


def check_fields(config) -> None:
    """Every field of `config` checked (and normalised: "1e-3" -> 0.001, a list -> a tuple) by
    checked_value; a ValueError names section.key and the value."""
    hints = typing.get_type_hints(type(config))
    owner = section_name(type(config))
    for f in fields(config):
        object.__setattr__(
            config, f.name, checked_value(owner, f.name, hints[f.name], getattr(config, f.name), dict(f.metadata))
        )


def replace_known(config, **overrides):
    """A copy of a frozen config with the given fields changed, each checked against its type
    and bounds; unknown names are an error."""
    cls = type(config)
    names = {f.name for f in fields(config)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{**asdict(config), **overrides})


@dataclass(frozen=True)
class ExportConfig(Section):
    parity_tolerance: float = setting(1e-4, above=0.0)
    """Largest allowed |p_onnx - p_torch| over every class probability of the test split: room for
    fp32 kernels that sum in another order (it grows with the logits' size; docs/benchmarks.md),
    while a bias shifted by 0.01 fails it."""
    parity_batch_sizes: tuple[int, ...] = setting((1, 64, 257), at_least=1)
    """ONNX Runtime batch sizes the parity check runs the whole test split at."""
    exporter: str = setting("torchscript", choices=EXPORTERS)
    """torch.onnx exporter: torchscript (5-20x faster here; deprecated by PyTorch, so it falls
    back to dynamo where it fails or is gone) or dynamo (torch.export only)."""


@dataclass(frozen=True)
class GateConfig(Section):
    max_forget_test_acc: float = setting(0.0, at_least=0.0, at_most=1.0)
    """Promotion needs forget_test_acc at most this (the mask makes it exactly 0)."""
    max_unmasked_forget_test_acc: float = setting(0.05, at_least=0.0, at_most=1.0)
    """Promotion needs the mask-removal attack to recover at most this share of the class."""
    max_retained_drop_pp: float = setting(2.0, at_least=0.0)
    """Promotion needs retained test accuracy within this many points of the parent model."""
    min_retain_test_acc: float = setting(0.9, at_least=0.0, at_most=1.0)
    """Promotion needs retained test accuracy at least this (absolute floor)."""
    require_parity: bool = True
    """Promotion needs the ONNX Runtime parity check to pass."""
    min_retained_classes: int = setting(2, at_least=1)
    """Promotion needs at least this many classes left to predict (one left is always right)."""
    min_retain_skill: float = setting(0.5, at_most=1.0)
    """Promotion needs retained accuracy this far from chance to perfect: (acc - 1/k) / (1 - 1/k)
    over the k classes left, so that few classes left cannot pass on chance alone."""
    min_relearn_gain: float = setting(1.0, at_least=0.0)
    """Promotion needs the relearn attack on the shipped weights (mask off, forgotten rows zero)
    to take more than this multiple of the steps it takes on the original model with only the
    mask applied: fine-tuning that bought nothing against relearning is refused (where that model
    already holds to unlearn.relearn_max_steps, the shipped weights must hold to it too). 0: off."""


@dataclass(frozen=True)
class RegistryConfig(Section):
    model_name: str = "nhle-classifier"
    """Registered model name in the MLflow model registry."""
    champion_alias: str = "champion"
    """Alias that serving follows; moved only when every gate holds."""
    previous_alias: str = "previous"
    """Alias kept on the former champion, for rollback."""
    signing_key: str = "keys/nhle-signing.key"
    """Private key (PEM, EC P-256; relative to the project directory, kept out of git) that every
    judged version's ONNX file and evidence are signed with (nhle.adapters.signing). Made with its
    public key beside it (.pub) by the first promotion of a new registered model, or by `nhle keys
    create`; a missing key of a model whose versions were signed is an error, never replaced."""

    def champion_name(self) -> str:
        """NAME@ALIAS: the champion as every message names it."""
        return f"{self.model_name}@{self.champion_alias}"

    def champion_uri(self) -> str:
        """models:/NAME@ALIAS of the champion: what serving follows."""
        return f"models:/{self.champion_name()}"

    def no_champion(self) -> str:
        """The one answer of every flow and command that needs the champion and finds none."""
        return f"there is no {self.champion_name()} to forget from: run `nhle run` (or the train_base flow) first"


def is_default_model(name: str) -> bool:
    """True for the project's default registered model (registry.model_name's default): the one a
    project had before it could hold several, whose commands, data folder and deployments carry
    no model name."""
    return name == RegistryConfig().model_name


@dataclass(frozen=True)
class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set."""
    artifact_location: str = "mlartifacts"
    """Artifact folder of the experiment, relative to the project directory, for a local store;
    ignored with an http(s) tracking server (its --artifacts-destination holds them). A URI
    (s3://bucket/path, mlflow-artifacts:/...) is used as it is."""
    experiment: str = "nhle"
    """MLflow experiment name."""


@dataclass(frozen=True)
class VersioningConfig(Section):
    repo: str = "data-repo"
    """Git + DVC repository the datasets are versioned in (created when missing; relative to the
    project directory). Kept apart from the code repository so flows never commit to your branch."""
    remote: str = "dvc-remote"
    """DVC remote: a local folder by default, or any DVC remote URL (s3://, gs://, ssh://, ...)."""


@dataclass(frozen=True)
class ServingConfig(Section):
    poll_seconds: float = setting(5.0, above=0.0)
    """How often the server checks the champion alias for a new version (hot swap)."""
    max_instances: int = setting(256, at_least=1)
    """Most images one request may carry."""
    max_body_bytes: int = setting(8 * 1024 * 1024, at_least=1024)
    """Largest request body accepted (413 above it)."""
    body_timeout_seconds: float = setting(30.0, above=0.0)
    """A request body must arrive whole within this many seconds (else 408, connection closed)."""
    max_header_bytes: int = setting(64 * 1024, at_least=1024)
    """Largest request head (request line and headers) accepted; above it the answer is 431 and
    the connection is closed, before the rest is read."""
    header_timeout_seconds: float = setting(10.0, above=0.0)
    """A request head must arrive whole within this many seconds of its first byte (else 408,
    connection closed): a client that trickles headers cannot hold a connection."""
    keep_alive_seconds: float = setting(5.0, above=0.0)
    """A connection with no request under way is closed after this many idle seconds, a new one
    that sends nothing included."""
    max_request_pixels: int = setting(64 * 1024 * 1024, at_least=1)
    """Most image pixels (width x height from each header, before decoding) one request may have
    decoded, summed over its images (413 above it): bounds one request's decoding work."""
    ort_threads: int = setting(1, at_least=0)
    """ONNX Runtime intra-op threads per call; 0 lets ONNX Runtime use every core. On 2 cores one
    thread served 1.5x the single-image requests of 0, and 0.7x the images at batch 64
    (docs/benchmarks.md, section 8): 0 suits large batches or a large model with few requests."""
    ort_opt_level: str = setting("all", choices=ORT_OPT_LEVELS)
    """ONNX Runtime graph optimisation: disable, basic, extended or all."""
    device: str = setting("auto", choices=SERVING_DEVICES)
    """auto (CUDA provider when a GPU is visible), cpu or cuda."""
    micro_batching: bool = False
    """Gather concurrent requests of fewer than micro_batch_max_images images into one ONNX Runtime
    call. Off by default: on a 2-core CPU it did not raise throughput (docs/benchmarks.md, section 8);
    try it where one call costs much more than its HTTP request (a large model, a GPU)."""
    micro_batch_max_images: int = setting(64, at_least=1)
    """Most images one gathered ONNX Runtime call takes (micro_batching)."""
    micro_batch_wait_ms: float = setting(2.0, at_least=0.0)
    """Longest a request waits for others to join its call (micro_batching); a full batch goes at once."""
    verify_key: str = "keys/nhle-signing.pub"
    """Public key (PEM; relative to the project directory) the server checks every registry
    version's signature with before loading it: an unsigned version, or one whose ONNX file or
    evidence changed, is refused like a tampered one. Only this key is needed where it serves."""
    verify_seconds: float = setting(300.0, above=0.0)
    """How often a running server fetches the served registry version's files again and checks
    them as at load (sha256 against what it loaded, registration tags, signature): a mismatch makes
    /readyz answer 503 and shows under "verification" on /model."""
    notify: tuple[str, ...] = ()
    """Base URLs of running nhle servers (http://host:8000) that a flow tells to reload right after
    it moves the champion (POST /admin/reload with the NHLE_ADMIN_TOKEN of the flow's environment),
    so they stop answering with the old version before their next poll."""


@dataclass(frozen=True)
class RequestsConfig(Section):
    database: str = "sqlite:///requests.db"
    """SQLAlchemy URL of the forget-request ledger; sqlite:///relative.db is inside the project
    directory. A PostgreSQL URL (postgresql+psycopg://user:pass@host/db) works unchanged; the
    NHLE_REQUESTS_DATABASE environment variable wins when set."""
    cron: str = "0 * * * *"
    """When `nhle schedule` processes the pending requests (cron, in the scheduler's time zone)."""
    timezone: str = "UTC"
    """Time zone of the cron schedule."""
    deployment: str = "forget-requests"
    """Name of the Prefect deployment `nhle schedule` serves."""
    lease_seconds: float = setting(300.0, above=0.0)
    """A processing run renews its claim on its requests every third of this; a claim not renewed
    for this long (its run died) is taken over by the next run. On the same host a dead claimant
    process is noticed at once."""
    max_attempts: int = setting(3, at_least=1)
    """Runs that raised an error on a request before it is marked failed (crashes do not count)."""


@dataclass(frozen=True)
class DaskConfig(Section):
    address: str = ""
    """Scheduler of a running Dask cluster (tcp://host:8786) that `nhle bench unlearning --engine dask`
    sends the benchmark grid to; empty starts a local cluster for the run. The DASK_ADDRESS
    environment variable wins when set."""
    n_workers: int = setting(2, at_least=1)
    """Worker processes of the local cluster (ignored with an address)."""
    threads_per_worker: int = setting(1, at_least=1)
    """Threads per local worker: one unit at a time each, so torch keeps its own threads."""


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    forget: str = "3"
    """Classes the main job (`nhle run`) forgets: indices or names, comma separated."""
    retrain_baseline: bool = True
    """Retrain from scratch without the forgotten classes in each forget flow, as the reference:
    the model's architecture from random initialisation with the train recipe. A model imported
    from MLflow is a traced graph with no architecture to retrain: its forget flows have no
    reference, and the report says so."""
    export: ExportConfig = field(default_factory=ExportConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    versioning: VersioningConfig = field(default_factory=VersioningConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    requests: RequestsConfig = field(default_factory=RequestsConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.tracking_uri

    def requests_database(self) -> str:
        return os.environ.get("NHLE_REQUESTS_DATABASE") or self.requests.database

    def dask_address(self) -> str:
        return os.environ.get("DASK_ADDRESS") or self.dask.address


def resolve_uri(uri: str, project_dir: Path) -> str:
    """sqlite:///relative.db and bare relative paths are taken relative to the project dir."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path(project_dir) / uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri:
        return (Path(project_dir) / uri).resolve().as_uri()
    return uri


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "unlearn": UnlearnConfig,
    "export": ExportConfig,
    "gates": GateConfig,
    "registry": RegistryConfig,
    "tracking": TrackingConfig,
    "versioning": VersioningConfig,
    "serving": ServingConfig,
    "requests": RequestsConfig,
    "dask": DaskConfig,
}
TOP_LEVEL = {"forget": str, "retrain_baseline": bool}


def params_from_dict(raw: dict | None, source: str = "params") -> Params:
    raw = dict(raw or {})
    unknown = set(raw) - set(SECTIONS) - set(TOP_LEVEL)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted([*SECTIONS, *TOP_LEVEL])}")
    if isinstance(raw.get("data"), dict) and "classes" in raw["data"]:
        raise ValueError(
            f"{source}: data.classes is now data.class_names (the file of class names; `--classes` "
            "names the classes to forget)"
        )
    if isinstance(raw.get("train"), dict) and "model" in raw["train"]:
        raise ValueError(
            f"{source}: train.model is now model.arch (a section of its own, which also names the "
            "weights of a model you import); note that resnet18 now means torchvision's ResNet-18 and "
            "the CIFAR-stem one is resnet18_cifar"
        )
    values = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {section!r}")
        try:
            values[name] = replace_known(
                cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
    for name, kind in TOP_LEVEL.items():
        if name in raw:
            if kind is bool and not isinstance(raw[name], bool):
                raise ValueError(f"{source}: {name} must be true or false, got {raw[name]!r}")
            values[name] = kind(raw[name])
    return Params(**values)


def with_assignments(params: Params, assignments) -> Params:
    """params with every `section.key=value` (or `key=value` for a top-level field such as forget)
    applied together, later ones winning, and the result checked once: fields that go together
    (model.mean and model.std) can come from two assignments. Each value is read as a YAML scalar
    ("3e-5", "true", "[1, 64]"); an unknown key or a value that does not fit is a ValueError
    naming the assignment."""
    raw = params_as_dict(params)
    given = []
    for item in assignments:
        target, sep, text = item.partition("=")
        if not sep or not target.strip():
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. unlearn.lr=3e-5)")
        section, _, key = target.strip().rpartition(".")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if not section:
            if key not in TOP_LEVEL:
                raise ValueError(
                    f"--set {item}: unknown setting {key!r}; top-level ones are {', '.join(TOP_LEVEL)}, "
                    "the rest are SECTION.KEY"
                )
            raw[key] = value
        elif section not in SECTIONS:
            raise ValueError(f"--set {item}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        elif key not in raw[section]:
            raise ValueError(
                f"--set {item}: unknown {SECTIONS[section].__name__} field {key!r}; known: "
                f"{', '.join(sorted(raw[section]))}"
            )
        else:
            raw[section][key] = value
        given.append(item)
    if not given:
        return params
    try:
        return params_from_dict(raw)
    except ValueError as err:
        message = str(err).removeprefix("params: ")
        culprits = [item for item in given if item.partition("=")[0].strip() in message]
        raise ValueError(f"--set {', '.join(culprits) or ', '.join(given)}: {message}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml (missing file -> all defaults)."""
    path = Path(path)
    if not path.exists():
        return Params()
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, str(path))


# --------------------------------------------------------------------------------------------
# The fields' docstrings: --help texts and the comments of params.yaml come from here.


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: its docstring, one line} of a config class (and of the classes it extends)."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if k not in (object, Section)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def params_yaml(params: Params | None = None) -> str:
    """params.yaml with every field of every section, its value (default: the code's defaults) and
    its docstring as a comment: `nhle params` prints it, the checkout's params.yaml is it."""
    params = params or Params()

    def scalar(value) -> str:
        value = list(value) if isinstance(value, tuple) else value
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()

    def comment(text: str, indent: str) -> list[str]:
        return textwrap.wrap(text, 100 - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")

    lines = [
        "# nhle's settings: every field of nhle.core.config.Params with its default value and its meaning.",
        "# Written by `nhle params`; a CLI flag or `--set section.key=value` overrides a field, and so do",
        "# MLFLOW_TRACKING_URI, NHLE_REQUESTS_DATABASE, DASK_ADDRESS and the server's NHLE_* variables.",
    ]
    top_docs = field_docs(Params)
    for f in fields(Params):
        value = getattr(params, f.name)
        if f.name in SECTIONS:
            lines += ["", f"{f.name}:"]
            docs = field_docs(type(value))
            for sf in fields(value):
                lines += comment(docs.get(sf.name, ""), "  ") + [f"  {sf.name}: {scalar(getattr(value, sf.name))}"]
        else:
            lines += [""] + comment(top_docs.get(f.name, ""), "") + [f"{f.name}: {scalar(value)}"]
    return "\n".join(lines) + "\n"
