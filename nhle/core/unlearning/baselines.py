"""Published unlearning methods to compare NHLE against, each with its authors' settings.

    from nhle.core.unlearning.baselines import BASELINES, run_baseline
    result = run_baseline("ssd", model, data, forget_classes=[3], seed=0)   # an UnlearnResult

Every method gets a copy of the trained model and the whole train split (the forget data D_f is
every train sample of the forgotten classes, the retained data D_r the rest), as in the papers,
and returns the model as the method leaves it: no class weight masking, since none of them masks.
(`retrain` is nhle.core.experiment.retrain_without.) Settings, from the public code docs/method.md
section 5 names (if-loops/selective-synaptic-dampening, OPTML-Group/Unlearn-Saliency,
meghdadk/SCRUB):

- finetune:        D_r, 5 epochs, SGD(momentum 0.9, weight decay 5e-4), one-cycle lr up to 0.02
- neggrad:         gradient ascent on D_f, 5 epochs, SGD(momentum 0.9) lr 1e-4
- random_label:    D_f relabelled with random retained classes, plus D_r; 3 epochs, SGD lr 1e-4
                   (SSD's "amnesiac")
- boundary_shrink: each D_f sample's label becomes the class an FGSM step (L-inf bound 0.1)
                   pushes it to; fine-tune on those for 10 epochs, SGD(momentum 0.9) lr 1e-5
- ssd:             diagonal Fisher importance (mean squared gradient over batches) on D_f and D;
                   parameters with imp_f > alpha * imp_D are scaled by min(lambda * imp_D / imp_f, 1);
                   alpha 10, lambda 1
- scrub:           student/teacher, KL at temperature 4; each of 5 epochs does (for the first 2)
                   one max pass on D_f (ascent on KL) then a min pass on D_r
                   (0.99 CE + 0.001 KL); SGD(momentum 0.9, weight decay 5e-4) lr 5e-4
- salun:           saliency mask = the half of the weights with the largest |gradient| of the D_f
                   cross-entropy; then random labels on D_f plus D_r for 10 epochs, SGD(momentum
                   0.9, weight decay 5e-4) lr 0.013, only masked weights updated

Batch size is 64 for every method (the papers use 64 to 256 on CIFAR; digits has ~1,350 train
samples). Batch-norm layers train as in the papers' loops (model.train()).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from nhle.core.data import ImageSet, Splits, split_by_classes
from nhle.core.models import MaskedClassifier
from nhle.core.training import batches, resolve_device
from nhle.core.unlearning.nhle import UnlearnResult

BATCH = 64


def _retained_classes(model: MaskedClassifier, classes) -> list[int]:
    return [c for c in range(model.num_classes) if c not in set(classes) and not bool(model.forget_mask[c])]


def _epochs(
    model, data: ImageSet, epochs: int, optimizer, loss_fn, device, seed: int, scheduler=None, after_step=None
) -> int:
    """Train `model` for `epochs` over `data` minimising loss_fn(model, x, y); returns steps taken."""
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    for _ in range(epochs):
        model.train()
        for x, y in batches(data, BATCH, device, shuffle=True, generator=generator):
            loss = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            steps += 1
    return steps


def _cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def _random_relabel(forget: ImageSet, retained: list[int], seed: int) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(len(retained), (len(forget),), generator=generator)
    return ImageSet(forget.images, torch.tensor(retained)[choice])


def _concat(a: ImageSet, b: ImageSet) -> ImageSet:
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))


def finetune(model, forget, retain, classes, seed, device):
    epochs = 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    total = epochs * -(-len(retain) // BATCH)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=max(total, 1))
    return _epochs(model, retain, epochs, optimizer, _cross_entropy, device, seed, scheduler)


def neggrad(model, forget, retain, classes, seed, device):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return _epochs(model, forget, 5, optimizer, lambda m, x, y: -F.cross_entropy(m(x), y), device, seed)


def random_label(model, forget, retain, classes, seed, device):
    relabelled = _random_relabel(forget, _retained_classes(model, classes), seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return _epochs(model, _concat(relabelled, retain), 3, optimizer, _cross_entropy, device, seed)


def boundary_shrink(model, forget, retain, classes, seed, device, bound: float = 0.1):
    """Chen et al. 2023: move each forget sample's label to its nearest wrong class, found by
    an FGSM step of size `bound` against the original model, then fine-tune on those labels."""
    original = copy.deepcopy(model).eval()
    nearest = []
    for x, y in batches(forget, 256, device):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(original(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            logits = original((x + bound * grad.sign()).clamp(0, 1))
            logits[torch.arange(len(y)), y] = float("-inf")  # the nearest *other* class
            nearest.append(logits.argmax(1).cpu())
    shrunk = ImageSet(forget.images, torch.cat(nearest))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    return _epochs(model, shrunk, 10, optimizer, _cross_entropy, device, seed)


def _importance(model, data: ImageSet, device) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the batch cross-entropy (SSD's calc_importance)."""
    importance = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count = 0
    model.eval()
    for x, y in batches(data, BATCH, device):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                importance[name] += p.grad.detach() ** 2
        count += 1
    return {name: value / max(count, 1) for name, value in importance.items()}


def ssd(model, forget, retain, classes, seed, device, alpha: float = 10.0, dampening: float = 1.0):
    full = _concat(forget, retain)
    forget_importance, full_importance = _importance(model, forget, device), _importance(model, full, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            selected = forget_importance[name] > alpha * full_importance[name]
            scale = (dampening * full_importance[name] / forget_importance[name]).clamp(max=1.0)
            p[selected] = p[selected] * scale[selected]
    return 0


def _kl(student_logits, teacher_logits, temperature: float = 4.0):
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, 1),
            F.softmax(teacher_logits / temperature, 1),
            reduction="batchmean",
        )
        * temperature**2
    )


def scrub(model, forget, retain, classes, seed, device, epochs: int = 5, max_epochs: int = 2):
    teacher = copy.deepcopy(model).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-4, momentum=0.9, weight_decay=5e-4)

    def away(m, x, y):
        with torch.no_grad():
            target = teacher(x)
        return -_kl(m(x), target)

    def near(m, x, y):
        with torch.no_grad():
            target = teacher(x)
        logits = m(x)
        return 0.99 * F.cross_entropy(logits, y) + 0.001 * _kl(logits, target)

    steps = 0
    for epoch in range(epochs):
        if epoch < max_epochs:
            steps += _epochs(model, forget, 1, optimizer, away, device, seed + epoch)
        steps += _epochs(model, retain, 1, optimizer, near, device, seed + epoch)
    return steps


def salun(model, forget, retain, classes, seed, device, threshold: float = 0.5):
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches(forget, BATCH, device):
        F.cross_entropy(model(x), y).backward()  # gradients accumulate over D_f, as generate_mask.py does
    parameters = [p for p in model.parameters() if p.grad is not None]
    magnitudes = torch.cat([p.grad.abs().flatten() for p in parameters]).float().cpu()
    cut = torch.sort(magnitudes).values[int(len(magnitudes) * (1 - threshold))]
    frozen = [(p, p.grad.abs() < cut.to(p.grad.device), p.detach().clone()) for p in parameters]
    model.zero_grad(set_to_none=True)

    def hold_non_salient():
        # Exactly the non-salient weights stay put: no weight decay or momentum may move them
        # (the bug OPTML-Group/Unlearn-Saliency issue 32 reports, fixed in its PR 33).
        with torch.no_grad():
            for p, keep, value in frozen:
                p[keep] = value[keep]

    relabelled = _random_relabel(forget, _retained_classes(model, classes), seed)
    optimizer = torch.optim.SGD(parameters, lr=0.013, momentum=0.9, weight_decay=5e-4)
    return _epochs(
        model, _concat(relabelled, retain), 10, optimizer, _cross_entropy, device, seed, after_step=hold_non_salient
    )


BASELINES = {
    "finetune": finetune,
    "neggrad": neggrad,
    "random_label": random_label,
    "boundary_shrink": boundary_shrink,
    "ssd": ssd,
    "scrub": scrub,
    "salun": salun,
}


def run_baseline(
    name: str, model: MaskedClassifier, data: Splits, forget_classes, seed: int = 0, device: str = "auto"
) -> UnlearnResult:
    """Unlearn `forget_classes` from a copy of `model` with baseline `name` (see BASELINES)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    classes = sorted(int(c) for c in forget_classes)
    torch_device = resolve_device(device)
    forget, retain = split_by_classes(data.train, classes)
    if len(forget) == 0:
        raise ValueError(f"the train split has no sample of classes {classes}")
    torch.manual_seed(seed)
    model = copy.deepcopy(model).to(torch_device)
    start = time.perf_counter()
    steps = BASELINES[name](model, forget, retain, classes, seed, torch_device)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return UnlearnResult(model.cpu().eval(), None, steps, seconds, False)


__all__ = ["BASELINES", "run_baseline"]
