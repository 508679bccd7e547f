"""Class weight masking (CWM): the forgotten classes' final-layer rows and biases are zeroed and
their logits fixed at -inf, so they can never be predicted again.

    from nhle.core.unlearning.masking import apply_class_weight_mask, without_mask
    snapshot = apply_class_weight_mask(model, [3])   # in place; returns the rows it zeroed
    attacked = without_mask(model, snapshot)         # the mask-removal attack's model

The mask is hard: masked rows are zero, the model multiplies them by zero again in its forward
pass and overrides their logits, so their gradient is exactly zero and no optimizer step, weight
decay or momentum moves them (the SalUn bug, OPTML-Group/Unlearn-Saliency issue 32).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from nhle.core.models import MaskedClassifier


@dataclass
class MaskSnapshot:
    """What masking removed: the classes and their final-layer rows and biases just before."""

    classes: list[int]
    weight_rows: torch.Tensor
    bias: torch.Tensor | None
    """None for a head without a bias (e.g. torchvision's MaxViT)."""


@torch.no_grad()
def apply_class_weight_mask(model: MaskedClassifier, classes) -> MaskSnapshot:
    classes = sorted(int(c) for c in classes)
    if not classes:
        raise ValueError("no class to mask")
    if max(classes) >= model.num_classes or min(classes) < 0:
        raise ValueError(f"classes {classes} out of range 0..{model.num_classes - 1}")
    index = torch.tensor(classes, device=model.forget_mask.device)
    bias = model.head.bias
    snapshot = MaskSnapshot(
        classes,
        model.head.weight[index].detach().clone().cpu(),
        None if bias is None else bias[index].detach().clone().cpu(),
    )
    model.head.weight[index] = 0.0
    if bias is not None:
        bias[index] = 0.0
    model.forget_mask[index] = True
    return snapshot


@torch.no_grad()
def without_mask(model: MaskedClassifier, snapshot: MaskSnapshot | None = None, classes=None) -> MaskedClassifier:
    """A copy of `model` with the mask of `classes` (default: the snapshot's) taken off and, when
    a snapshot is given, their rows restored to the values they had before masking.

    This is the mask-removal attack of docs/method.md section 3: it is given more than the shipped
    weights (the pre-mask rows), so a low score here means the network itself no longer
    recognises the class, not merely that its output row was deleted."""
    attacked = copy.deepcopy(model)
    classes = snapshot.classes if classes is None else sorted(int(c) for c in classes)
    index = torch.tensor(classes, dtype=torch.long, device=attacked.forget_mask.device)
    attacked.forget_mask[index] = False
    if snapshot is not None:
        attacked.head.weight[index] = snapshot.weight_rows.to(attacked.head.weight)
        if snapshot.bias is not None:
            attacked.head.bias[index] = snapshot.bias.to(attacked.head.bias)
    return attacked
