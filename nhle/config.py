"""The typed configuration: frozen dataclasses, one docstring per field.

The CLI builds these from its flags; every field has a default that works on the embedded
digits dataset on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ENCODINGS = ("negative_hot", "uniform_rest", "negative_uniform", "complementary", "submaximum")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    """digits (embedded), mnist, fashionmnist, cifar10, cifar100, svhn, or imagefolder."""
    root: str | None = None
    """Folder holding the dataset's files (torchvision layout, or one sub-folder per class)."""
    seed: int = 0
    """Seed of the train/test split (digits, imagefolder) and of everything random after it."""
    test_fraction: float = 0.25
    """Share of samples held out for testing, where the dataset has no split of its own."""
    image_size: int | None = None
    """Resize images to this square size (e.g. 32 for ResNet-18 on digits); None keeps them."""
    download: bool = False
    """Let torchvision download the dataset into root (never done unless asked)."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = "smallcnn"
    """smallcnn (small grey images) or resnet18 (CIFAR stem)."""
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


@dataclass(frozen=True)
class UnlearnConfig:
    encoding: str = "complementary"
    """NHLE label encoding of the forget samples; one of ENCODINGS (chosen by measurement, README)."""
    n_samples: int = 32
    """Samples drawn from the train split per forgotten class; no retained data is used."""
    optimizer: str = "adam"
    """adam, or sgd (momentum 0.9): the optimiser of the fine-tuning (full batch of the forget samples)."""
    lr: float = 1e-4
    """Learning rate of the fine-tuning."""
    max_steps: int = 100
    """Hard cap on fine-tuning steps."""
    stop_forget_prob: float = 0.05
    """Stop once every forget sample is misclassified and their mean probability of the
    forgotten classes (no mask) is below this bound."""
    anchor_weight: float = 1.0
    """Weight of the KL term that keeps the forget samples' prediction over the retained classes
    (renormalised) equal to the original model's; 0 turns the anchoring off."""
    layers: str = "all"
    """Which parameters move: all (the feature extractor too) or head (final layer only)."""
    mask: bool = True
    """Apply class weight masking (zeroed final-layer rows and a -inf logit mask) afterwards."""
    relearn_max_steps: int = 100
    """Cap of the relearn attack; relearn_steps equals it when the class never came back."""
    relearn_lr: float = 1e-3
    """Adam learning rate of the relearn attack (plain cross-entropy on the forget samples)."""


def to_dict(config) -> dict:
    return asdict(config)


def replace_known(config, **overrides):
    """A copy of a frozen config with the given fields changed; unknown names are an error."""
    names = {f.name for f in fields(config)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields: {sorted(unknown)}; known: {sorted(names)}")
    values = {**asdict(config), **{k: v for k, v in overrides.items()}}
    return type(config)(**values)
