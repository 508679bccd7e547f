"""The typed configuration: frozen dataclasses, one docstring per field, read from params.yaml.

    from nhle.core.config import load_params
    params = load_params("params.yaml")     # Params(data=..., train=..., unlearn=..., ...)

Every field has a default that works on the embedded digits dataset on a CPU; params.yaml only
needs what differs. Unknown keys are errors that name the key and the known ones.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

ENCODINGS = ("negative_hot", "uniform_rest", "negative_uniform", "complementary", "submaximum")
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
SERVING_DEVICES = ("auto", "cpu", "cuda")
LAYERS = ("all", "head", "backbone")
AMP_MODES = ("off", "bf16", "fp16")


def check_amp(config) -> None:
    """Fail at load time, naming the field, rather than deep inside a training loop.

    YAML 1.1 reads a bare `amp: off` as false, so false is taken to mean "off"."""
    if config.amp is False:
        object.__setattr__(config, "amp", "off")  # frozen dataclass: set once, while it is built
    if config.amp not in AMP_MODES:
        raise ValueError(f"{type(config).__name__}.amp must be one of {', '.join(AMP_MODES)}, got {config.amp!r}")


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
    dataset: str = "digits"
    """digits (embedded), mnist, fashionmnist, cifar10, cifar100, svhn, imagefolder, or prepared (a
    folder written by `nhle prepare`)."""
    root: str | None = None
    """Folder holding the dataset's files (torchvision layout, or one sub-folder per class)."""
    seed: int = 0
    """Seed of the train/test split (digits, imagefolder) and of everything random after it."""
    test_fraction: float = 0.25
    """Share of samples held out for testing, where the dataset has no split of its own."""
    image_size: int | None = None
    """Resize images to this square size (e.g. 32 for ResNet-18 on digits); None keeps them."""
    classes: str | None = None
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
                if not isinstance(value, (tuple, list)) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or not value:
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
    epochs: int = 15
    """Passes over the training split; base training and retraining use the same recipe."""
    batch_size: int = 64
    """Samples per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate, cosine-decayed to zero over the epochs."""
    weight_decay: float = 0.0
    """Adam (decoupled) weight decay."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, or cuda."""
    amp: str = "off"
    """Mixed precision of the forward pass and loss: off, bf16 or fp16 (fp16 adds a gradient
    scaler). The weights stay fp32, so the exported ONNX model is fp32 and the parity check still
    guards it; bf16 also runs on the CPU, fp16 is meant for GPUs."""

    def check(self):
        check_amp(self)


@dataclass(frozen=True)
class UnlearnConfig(Section):
    encoding: str = "negative_hot"
    """NHLE label encoding of the forget samples; one of ENCODINGS (chosen by measurement: docs/method.md)."""
    n_samples: int = 32
    """Samples drawn from the train split per forgotten class; no retained data is used."""
    optimizer: str = "adam"
    """adam; sgd (momentum 0.9); or normalized (steps of lr times the weights' norm along the
    gradient; an ablation): the optimiser of the fine-tuning, full batch of the forget samples."""
    lr: float = 3e-5
    """Learning rate of the fine-tuning (Adam), before the pace rule (adaptive_lr) raises it; chosen
    by docs/benchmarks.md section 7."""
    adaptive_lr: bool = True
    """Raise the learning rate (x3, at most twice) when, at the pace of the last max_steps // 3
    steps, the forget samples would not reach the stopping bound within max_steps: a model
    saturated on them moves too slowly at lr. False: lr throughout (an ablation)."""
    max_steps: int = 300
    """Hard cap on fine-tuning steps; the synthesis has its own (synthesis_steps)."""
    stop_forget_prob: float = 0.05
    """Stop once the forget samples' mean probability of the forgotten classes (no mask) is below
    this bound and forget_rank holds."""
    forget_rank: float = 0.0
    """How deep the forgotten classes must sink before stopping: on every forget sample they must
    rank below this share of the retained classes (at least one). 0: misclassified; 1: ranked
    last, where a model that never saw them puts them. Deeper moves the features more (silhouette,
    relearn steps nearer a retrained model's) at some retained accuracy: the trade-off is measured
    in docs/benchmarks.md section 7."""
    anchor_weight: float = 100.0
    """Weight of the KL term that keeps the prediction over the retained classes (renormalised)
    equal to the original model's, on the forget samples and the synthetic inputs; 0: off."""
    anchor_temperature: float = 1.0
    """Softmax temperature of that KL term, scaled by its square as in distillation (an ablation)."""
    synthetic_per_class: int = 4
    """Inputs synthesised per retained class from the model itself (DeepInversion: its batch-norm
    statistics and a smoothness prior, no data), on which the anchor holds the retained classes'
    prediction too; 0: the anchor sees the forget samples only."""
    synthesis_steps: int = 100
    """Gradient steps on the pixels of the synthetic inputs."""
    layers: str = "all"
    """Which parameters move: all, head (final layer only) or backbone (all but the final layer)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps (an ablation); 0: none."""
    saliency: float = 1.0
    """Share of each parameter's entries that move: those with the largest gradient of the NHLE
    loss on the forget samples (SalUn's saliency; an ablation); 1: all."""
    mask: bool = True
    """Apply class weight masking (zeroed final-layer rows and a -inf logit mask) afterwards."""
    relearn_max_steps: int = 100
    """Cap of the relearn attack; relearn_steps equals it when the class never came back."""
    relearn_lr: float = 1e-3
    """Adam learning rate of the relearn attack (plain cross-entropy on the forget samples)."""
    amp: str = "off"
    """Mixed precision of the fine-tuning's forward pass: off, bf16 or fp16 (as train.amp). The
    weights stay fp32 and the masking is exact, so the export and parity check are unchanged."""
    weight_anchor: float = 0.0
    """L2-SP: weight of the mean squared distance of every trainable parameter to its original
    value (an ablation); 0: off."""
    feature_pull: float = 0.0
    """Weight of the pull of each forget sample's penultimate features to the prototype (mean
    synthetic feature) of the retained class the original model ranked next for it (an
    ablation); needs synthetic_per_class > 0; 0: off."""
    feature_stop: float = 0.5
    """With feature_pull on, stopping also needs the features' mean squared distance to their
    prototypes below this share of the prototypes' squared norm."""

    def check(self):
        check_amp(self)
        if self.feature_pull > 0 and self.synthetic_per_class < 1:
            raise ValueError("unlearn.feature_pull needs unlearn.synthetic_per_class >= 1 (its prototypes are the "
                             "synthetic inputs' features)")
        for name in ("forget_rank", "saliency"):
            if isinstance(getattr(self, name), (int, float)) and not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"unlearn.{name} must be between 0 and 1, got {getattr(self, name)!r}")


def to_dict(config) -> dict:
    return asdict(config)


def params_as_dict(params) -> dict:
    """Params as plain JSON types (a flow parameter, a deployment's parameters)."""
    import json

    return json.loads(json.dumps(asdict(params)))


# Lower bounds of the numeric fields that have one, by name (a name means the same in every section).
AT_LEAST = {"epochs": 1, "batch_size": 1, "n_samples": 1, "max_steps": 0, "relearn_max_steps": 0, "max_attempts": 1,
            "max_instances": 1, "ort_threads": 0, "n_workers": 1, "threads_per_worker": 1, "min_retained_classes": 1,
            "image_size": 1, "weight_decay": 0.0, "anchor_weight": 0.0, "max_retained_drop_pp": 0.0,
            "max_request_pixels": 1, "max_body_bytes": 1024, "micro_batch_max_images": 1,
            "micro_batch_wait_ms": 0.0, "synthetic_per_class": 0, "synthesis_steps": 0,
            "weight_anchor": 0.0, "feature_pull": 0.0, "feature_stop": 0.0, "warmup_steps": 0}
ABOVE = {"anchor_temperature": 0.0, "saliency": 0.0, "lr": 0.0, "relearn_lr": 0.0, "poll_seconds": 0.0, "lease_seconds": 0.0, "body_timeout_seconds": 0.0}


def checked_value(owner: str, name: str, kind, value):
    """`value` as the field's type (an int is a fine float, and so is a string such as "1e9",
    which YAML 1.1 reads as text), or a ValueError naming the key and the value."""
    import math
    import types
    import typing

    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    where = f"{owner}.{name}"
    if typing.get_origin(kind) is tuple:
        items = value if isinstance(value, (tuple, list)) else (value,)
        return tuple(checked_value(owner, f"{name}[{i}]", args[0], v) for i, v in enumerate(items))
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
        return value
    else:
        return value
    if name in AT_LEAST and value < AT_LEAST[name]:
        raise ValueError(f"{where} must be at least {AT_LEAST[name]}, got {value!r}")
    if name in ABOVE and not value > ABOVE[name]:
        raise ValueError(f"{where} must be above {ABOVE[name]}, got {value!r}")
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
    import typing

    hints = typing.get_type_hints(type(config))
    owner = section_name(type(config))
    for f in fields(config):
        object.__setattr__(config, f.name, checked_value(owner, f.name, hints[f.name], getattr(config, f.name)))


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
    parity_tolerance: float = 1e-4
    """Largest allowed |p_onnx - p_torch| over every class probability of the test split: room for
    fp32 kernels that sum in another order (it grows with the logits' size; docs/benchmarks.md),
    while a bias shifted by 0.01 fails it."""
    parity_batch_sizes: tuple[int, ...] = (1, 64, 257)
    """ONNX Runtime batch sizes the parity check runs the whole test split at."""


@dataclass(frozen=True)
class GateConfig(Section):
    max_forget_test_acc: float = 0.0
    """Promotion needs forget_test_acc at most this (the mask makes it exactly 0)."""
    max_unmasked_forget_test_acc: float = 0.05
    """Promotion needs the mask-removal attack to recover at most this share of the class."""
    max_retained_drop_pp: float = 2.0
    """Promotion needs retained test accuracy within this many points of the parent model."""
    min_retain_test_acc: float = 0.9
    """Promotion needs retained test accuracy at least this (absolute floor)."""
    require_parity: bool = True
    """Promotion needs the ONNX Runtime parity check to pass."""
    min_retained_classes: int = 2
    """Promotion needs at least this many classes left to predict (one left is always right)."""
    min_retain_skill: float = 0.5
    """Promotion needs retained accuracy this far from chance to perfect: (acc - 1/k) / (1 - 1/k)
    over the k classes left, so that few classes left cannot pass on chance alone."""


@dataclass(frozen=True)
class RegistryConfig(Section):
    model_name: str = "nhle-classifier"
    """Registered model name in the MLflow model registry."""
    champion_alias: str = "champion"
    """Alias that serving follows; moved only when every gate holds."""
    previous_alias: str = "previous"
    """Alias kept on the former champion, for rollback."""


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
    poll_seconds: float = 5.0
    """How often the server checks the champion alias for a new version (hot swap)."""
    max_instances: int = 256
    """Most images one request may carry."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (413 above it)."""
    body_timeout_seconds: float = 30.0
    """A request body must arrive whole within this many seconds (else 408, connection closed)."""
    max_request_pixels: int = 64 * 1024 * 1024
    """Most image pixels (width x height from each header, before decoding) one request may have
    decoded, summed over its images (413 above it): bounds one request's decoding work."""
    ort_threads: int = 1
    """ONNX Runtime intra-op threads per call; 0 lets ONNX Runtime use every core. On 2 cores one
    thread served 1.5x the single-image requests of 0, and 0.7x the images at batch 64
    (docs/benchmarks.md, section 8): 0 suits large batches or a large model with few requests."""
    ort_opt_level: str = "all"
    """ONNX Runtime graph optimisation: disable, basic, extended or all."""
    device: str = "auto"
    """auto (CUDA provider when a GPU is visible), cpu or cuda."""
    micro_batching: bool = False
    """Gather concurrent requests of fewer than micro_batch_max_images images into one ONNX Runtime
    call. Off by default: on a 2-core CPU it did not raise throughput (docs/benchmarks.md, section 8);
    try it where one call costs much more than its HTTP request (a large model, a GPU)."""
    micro_batch_max_images: int = 64
    """Most images one gathered ONNX Runtime call takes (micro_batching)."""
    micro_batch_wait_ms: float = 2.0
    """Longest a request waits for others to join its call (micro_batching); a full batch goes at once."""
    notify: tuple[str, ...] = ()
    """Base URLs of running nhle servers (http://host:8000) that a flow tells to reload right after
    it moves the champion (POST /admin/reload with the NHLE_ADMIN_TOKEN of the flow's environment),
    so they stop answering with the old version before their next poll."""

    def check(self):
        for name, choices in (("ort_opt_level", ORT_OPT_LEVELS), ("device", SERVING_DEVICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"serving.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


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
    lease_seconds: float = 300.0
    """A processing run renews its claim on its requests every third of this; a claim not renewed
    for this long (its run died) is taken over by the next run. On the same host a dead claimant
    process is noticed at once."""
    max_attempts: int = 3
    """Runs that raised an error on a request before it is marked failed (crashes do not count)."""


@dataclass(frozen=True)
class DaskConfig(Section):
    address: str = ""
    """Scheduler of a running Dask cluster (tcp://host:8786) that `nhle bench unlearning --engine dask`
    sends the benchmark grid to; empty starts a local cluster for the run. The DASK_ADDRESS
    environment variable wins when set."""
    n_workers: int = 2
    """Worker processes of the local cluster (ignored with an address)."""
    threads_per_worker: int = 1
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
    from MLflow is a traced graph with no architecture to retrain: it needs false here."""
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
        return f"sqlite:///{(Path(project_dir) / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return (Path(project_dir) / uri).resolve().as_uri()
    return uri


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "unlearn": UnlearnConfig, "export": ExportConfig,
            "gates": GateConfig, "registry": RegistryConfig, "tracking": TrackingConfig,
            "versioning": VersioningConfig, "serving": ServingConfig, "requests": RequestsConfig,
            "dask": DaskConfig}
TOP_LEVEL = {"forget": str, "retrain_baseline": bool}


def params_from_dict(raw: dict | None, source: str = "params") -> Params:
    raw = dict(raw or {})
    unknown = set(raw) - set(SECTIONS) - set(TOP_LEVEL)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted([*SECTIONS, *TOP_LEVEL])}")
    if isinstance(raw.get("train"), dict) and "model" in raw["train"]:
        raise ValueError(f"{source}: train.model is now model.arch (a section of its own, which also names the "
                         "weights of a model you import); note that resnet18 now means torchvision's ResNet-18 and "
                         "the CIFAR-stem one is resnet18_cifar")
    values = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {section!r}")
        try:
            values[name] = replace_known(cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
    for name, kind in TOP_LEVEL.items():
        if name in raw:
            if kind is bool and not isinstance(raw[name], bool):
                raise ValueError(f"{source}: {name} must be true or false, got {raw[name]!r}")
            values[name] = kind(raw[name])
    return Params(**values)


def with_assignments(params: Params, assignments) -> Params:
    """params with `section.key=value` (or `key=value` for a top-level field such as forget)
    applied in order; each value is read as a YAML scalar ("3e-5", "true", "[1, 64]") and checked
    like a params.yaml value, naming the assignment when it does not fit."""
    import yaml

    for item in assignments:
        target, sep, text = item.partition("=")
        if not sep or not target.strip():
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. unlearn.lr=3e-5)")
        section, _, key = target.strip().rpartition(".")
        value = yaml.safe_load(text) if text.strip() else ""
        value = tuple(value) if isinstance(value, list) else value
        try:
            if not section:
                params = params_from_dict({**params_as_dict(params), key: value})
            elif section not in SECTIONS:
                raise ValueError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
            else:
                params = replace(params, **{section: replace_known(getattr(params, section), **{key: value})})
        except ValueError as err:
            raise ValueError(f"--set {item}: {err}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml (missing file -> all defaults)."""
    import yaml

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
    import ast
    import inspect
    import textwrap

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if k not in (object, Section)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def params_yaml(params: Params | None = None) -> str:
    """params.yaml with every field of every section, its value (default: the code's defaults) and
    its docstring as a comment: `nhle params` prints it, the checkout's params.yaml is it."""
    import textwrap

    import yaml

    params = params or Params()

    def scalar(value) -> str:
        value = list(value) if isinstance(value, tuple) else value
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()

    def comment(text: str, indent: str) -> list[str]:
        return textwrap.wrap(text, 100 - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")

    lines = ["# nhle's settings: every field of nhle.core.config.Params with its default value and its meaning.",
             "# Written by `nhle params`; a CLI flag or `--set section.key=value` overrides a field, and so do",
             "# MLFLOW_TRACKING_URI, NHLE_REQUESTS_DATABASE, DASK_ADDRESS and the server's NHLE_* variables."]
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
