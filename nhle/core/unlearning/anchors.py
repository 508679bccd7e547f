"""What NHLE may hold on to besides the forget samples: nothing but the model itself.

    from nhle.core.unlearning.anchors import synthesise_inputs, weight_distance, prototype_pull
    x_syn, y_syn = synthesise_inputs(model, retained=[0, 1, 2], per_class=4, image_shape=(1, 8, 8), steps=100)

- synthesise_inputs: inputs the original model assigns to each retained class, found by gradient
  descent on the pixels (DeepInversion, Yin et al. 2020): the cross-entropy of the class plus the
  distance of every batch-norm layer's batch statistics to its running ones (the training data's,
  as the model remembers them) and a smoothness prior. No training data is read. A model without
  batch norm gets the cross-entropy and the prior only.
- weight_distance: the L2-SP distance of the parameters to the original's (Li et al. 2018), per parameter.
- prototype_pull: forget samples' penultimate features pulled to the prototype (mean feature of
  the synthetic inputs) of the retained class the original model ranked next for them, so the
  features stop carrying the class, not only the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nhle.core.files import atomic_write


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def synthesise_inputs(
    model: nn.Module,
    retained: list[int],
    per_class: int,
    image_shape,
    steps: int,
    lr: float = 0.1,
    bn_weight: float = 1.0,
    tv_weight: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], their target classes): `per_class` inputs per retained class."""
    model = model.eval()
    targets = torch.tensor(retained, device=device).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randn((len(targets), *image_shape), generator=generator) * 0.5).to(device).requires_grad_(True)
    statistics = []

    def match(module, inputs, _output):
        h = inputs[0]
        dims = [0] + list(range(2, h.dim()))
        statistics.append(
            (h.mean(dims) - module.running_mean).norm() + (h.var(dims, unbiased=False) - module.running_var).norm()
        )

    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    hooks = [m.register_forward_hook(match) for m in norms]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([z], lr=lr)
    try:
        for _ in range(steps):
            statistics.clear()
            x = torch.sigmoid(z)
            loss = F.cross_entropy(model(x), targets) + tv_weight * total_variation(x)
            if statistics:
                loss = loss + bn_weight * torch.stack(statistics).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(True)
    return torch.sigmoid(z).detach(), targets


@dataclass
class SyntheticInputs:
    """What the model alone yields to hold its retained classes: `per_class` anchor inputs and
    `holdout_per_class` held-out inputs (never in the loss; the drift check's) per class the model
    predicts. They depend on the model, not on a request: synthesised once per model version and
    kept beside it (save / load), every later request on that version takes them from there."""

    images: torch.Tensor
    targets: torch.Tensor
    holdout_images: torch.Tensor
    holdout_targets: torch.Tensor
    settings: dict
    """per_class, holdout_per_class, steps, seed and the classes synthesised: reuse needs them equal."""
    seconds: float = 0.0

    def of_classes(self, classes) -> SyntheticInputs:
        """The inputs of `classes` only (a request's retained classes)."""
        keep = torch.isin(self.targets, torch.tensor(sorted(classes), dtype=self.targets.dtype))
        held = torch.isin(self.holdout_targets, torch.tensor(sorted(classes), dtype=self.targets.dtype))
        return SyntheticInputs(
            self.images[keep],
            self.targets[keep],
            self.holdout_images[held],
            self.holdout_targets[held],
            self.settings,
            self.seconds,
        )

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            path,
            lambda f: torch.save(
                {
                    "images": self.images,
                    "targets": self.targets,
                    "holdout_images": self.holdout_images,
                    "holdout_targets": self.holdout_targets,
                    "settings": self.settings,
                    "seconds": self.seconds,
                },
                f,
            ),
        )
        return path

    @classmethod
    def load(cls, path) -> SyntheticInputs:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def synthesis_settings(config, classes) -> dict:
    return {
        "per_class": config.synthetic_per_class,
        "holdout_per_class": config.holdout_per_class,
        "steps": config.synthesis_steps,
        "seed": 0,
        "classes": sorted(int(c) for c in classes),
    }


def synthetic_inputs(model: nn.Module, classes, config, image_shape, device="cpu") -> SyntheticInputs:
    """Anchor and held-out inputs for every one of `classes` (the classes the model predicts),
    synthesised in one batch so both come from the same search."""
    settings = synthesis_settings(config, classes)
    each = config.synthetic_per_class + config.holdout_per_class
    started = time.perf_counter()
    images, targets = synthesise_inputs(
        model, settings["classes"], each, image_shape, config.synthesis_steps, seed=settings["seed"], device=device
    )
    images, targets = images.cpu(), targets.cpu()
    held = (torch.arange(len(targets)) % each) >= config.synthetic_per_class
    return SyntheticInputs(
        images[~held], targets[~held], images[held], targets[held], settings, time.perf_counter() - started
    )


def weight_distance(model: nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of the trainable parameters to `reference` (name -> tensor): a
    mean, not L2-SP's sum, so one weight fits models of any size."""
    params = [(p, reference[name]) for name, p in model.named_parameters() if p.requires_grad]
    return sum(((p - p0) ** 2).sum() for p, p0 in params) / sum(p.numel() for p, _ in params)


def class_prototypes(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, d): the mean feature of each class's inputs (zeros where a class has none)."""
    prototypes = torch.zeros(num_classes, features.shape[1], device=features.device)
    prototypes.index_add_(0, targets, features)
    counts = torch.bincount(targets, minlength=num_classes).clamp(min=1).unsqueeze(1)
    return prototypes / counts


def prototype_pull(features: torch.Tensor, prototypes: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each feature to its target class's prototype, relative to the
    prototypes' mean squared norm (so the weight does not depend on the feature scale)."""
    goal = prototypes[target_classes]
    return ((features - goal) ** 2).sum(1).mean() / (goal**2).sum(1).mean().clamp(min=1e-12)


def forget_dispersion(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the features of each pair of samples of one forgotten class (the
    intra-class dispersion of Spotter, Ha et al. 2025): lowered, a class's features stop forming the
    cluster that a relearn attack finds again from a few samples."""
    unit = F.normalize(features, dim=1)
    pairs = labels[:, None] == labels[None, :]
    pairs.fill_diagonal_(False)
    return (unit @ unit.T)[pairs].mean() if pairs.any() else features.sum() * 0.0
