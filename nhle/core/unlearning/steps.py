"""How NHLE's fine-tuning steps are taken: the optimiser, a warm-up, and which entries may move.

    from nhle.core.unlearning.steps import make_optimizer, saliency_masks
    optimizer, warmup = make_optimizer(model.parameters(), config)
    keep = saliency_masks(model, loss)          # {parameter: 0/1 mask}, or None for all entries

The default is plain Adam at a small learning rate. The rest are measured alternatives, kept as
named ablations of `nhle bench unlearning` (docs/benchmarks.md, section 7): a linear warm-up,
normalised-gradient steps of a fixed length relative to the weights' norm, and updates limited
to the entries with the largest forget-loss gradient (SalUn's saliency, from forget samples only).
"""

from __future__ import annotations

import torch

from nhle.core.config import OPTIMIZERS
from nhle.core.training import fused_adam


class NormalizedGradient(torch.optim.Optimizer):
    """Full-batch steps of a fixed length along the whole gradient: each step moves the
    parameters by `relative_step` times their norm at the start."""

    def __init__(self, params, relative_step: float):
        params = list(params)
        with torch.no_grad():
            norm = torch.sqrt(sum((p.float() ** 2).sum() for p in params)).item()
        super().__init__(params, {"lr": relative_step * norm})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).clamp(min=1e-30)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-(group["lr"] / norm).item())


def make_optimizer(parameters, config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser of `config.optimizer` at `config.lr` (for `normalized`, lr is the step
    relative to the weights' norm), and its warm-up schedule (linear over config.warmup_steps)."""
    parameters = [p for p in parameters if p.requires_grad]
    groups = layer_groups(parameters, config.lr, config.lr_depth_ratio)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, fused=bool(parameters) and fused_adam(parameters[0].device))
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    elif config.optimizer == "normalized":
        if len(groups) > 1:
            raise ValueError(
                "unlearn.lr_depth_ratio needs optimizer adam or sgd: normalized steps along the whole gradient"
            )
        optimizer = NormalizedGradient(parameters, config.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    ramp = max(config.warmup_steps, 1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / ramp))


def layer_groups(parameters: list[torch.Tensor], lr: float, depth_ratio: float) -> list[dict]:
    """One parameter group at lr, or (depth_ratio != 1) one per tensor, in the model's order,
    from lr * depth_ratio for the first to lr for the last."""
    if depth_ratio == 1.0 or len(parameters) < 2:
        return [{"params": parameters}]
    last = len(parameters) - 1
    return [{"params": [p], "lr": lr * depth_ratio ** ((last - i) / last)} for i, p in enumerate(parameters)]


def saliency_masks(parameters, loss: torch.Tensor, share: float) -> dict[torch.Tensor, torch.Tensor] | None:
    """For each parameter, 1 on the `share` of its entries with the largest |d loss / d entry|,
    0 elsewhere; None when share >= 1 (every entry moves)."""
    if share >= 1.0:
        return None
    parameters = [p for p in parameters if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    masks = {}
    for p, g in zip(parameters, grads):
        if g is None:
            masks[p] = torch.zeros_like(p)
            continue
        magnitude = g.abs().flatten()
        mask = torch.zeros_like(magnitude)
        top = magnitude.topk(max(1, round(share * magnitude.numel())), sorted=False)  # exactly that share, ties too
        mask[top.indices] = 1.0
        masks[p] = mask.reshape(p.shape).to(p.dtype)
    return masks
