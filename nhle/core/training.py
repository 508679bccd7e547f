"""One training loop for the base model and for retraining from scratch without some classes.

    from nhle.core.training import train_model, save_checkpoint
    model, seconds = train_model(data, TrainConfig(), seed=0)                  # base model
    retrained, seconds = train_model(data, TrainConfig(), seed=0, exclude=[3])  # without class 3

Checkpoints are plain dicts (weights, model spec, config, class names, forgotten classes, data
fingerprint) written atomically, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from nhle.core.config import AMP_MODES, ModelConfig, TrainConfig
from nhle.core.data import ImageSet, Splits, as_float, split_by_classes
from nhle.core.files import atomic_write
from nhle.core.graphs import graph_from_bytes, is_graph, program_bytes
from nhle.core.models import GRAPH, MaskedClassifier, ModelSpec, build_from_spec, channel_stats


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fused_adam(device: torch.device) -> bool:
    """Whether Adam(W) runs its fused kernel on `device`: one pass over all the weights instead of
    a Python loop over them, ten times faster on ResNet-18 on a CPU, the same update."""
    return device.type in ("cpu", "cuda")


def autocast(device: torch.device, amp: str = "off"):
    """The mixed-precision context of a forward pass: torch.autocast in bf16 or fp16, or nothing.

    Only activations are cast; the weights, their gradients and the optimiser state stay fp32,
    so a model trained this way exports to the same fp32 ONNX graph as any other."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("amp 'bf16' was asked for but this GPU has no bf16 support; use 'fp16' or 'off'")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str = "off") -> torch.amp.GradScaler:
    """A loss scaler for fp16 (whose small gradients would underflow), a pass-through otherwise:
    bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def batches(
    data: ImageSet,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
):
    """(float images in [0, 1], labels) on `device`, in order or in a seeded random order.

    For a GPU the batch travels as stored (uint8 for CIFAR-sized data: a quarter of the bytes of
    float32) from pinned memory, asynchronously, and becomes float on the device."""
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        if device.type == "cuda":
            images = data.images[index].pin_memory().to(device, non_blocking=True)
            yield as_float(images), data.labels[index].pin_memory().to(device, non_blocking=True)
        else:
            yield as_float(data.images[index]).to(device), data.labels[index].to(device)


def train_one_epoch(
    model,
    data: ImageSet,
    optimizer,
    scheduler,
    batch_size: int,
    device,
    generator,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    model.train()
    scaler = scaler or grad_scaler(device, amp)
    total, count = 0.0, 0
    for x, y in batches(data, batch_size, device, shuffle=True, generator=generator):
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)  # autocast computes cross-entropy in fp32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return total / max(count, 1)


@torch.no_grad()
def predict(model, data: ImageSet, device=None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) of every sample, on the CPU."""
    device = device or next(model.parameters()).device
    model.eval()
    logits, features = [], []
    for x, _ in batches(data, batch_size, device):
        h = model.features(x)
        features.append(h.cpu())
        logits.append(model.classify(h).cpu())
    return torch.cat(logits), torch.cat(features)


def evaluate(model, data: ImageSet, device=None) -> float:
    """Top-1 accuracy on `data` (nan when it is empty)."""
    if len(data) == 0:
        return float("nan")
    logits, _ = predict(model, data, device)
    return (logits.argmax(1) == data.labels).float().mean().item()


def training_spec(model: ModelConfig, data: Splits) -> ModelSpec:
    """The spec of a fresh `model.arch` for `data`: its channels, classes and image size, and
    the configured normalisation, else the train split's per-channel statistics."""
    if model.mean is not None and model.std is not None:
        mean, std = model.mean, model.std
    else:
        mean, std = channel_stats(data.train.images)
    channels, height, width = data.image_shape
    return ModelSpec(
        model.arch, channels, data.num_classes, tuple(mean), tuple(std), height if height == width else None, model.head
    )


def check_training(spec: ModelSpec, config: TrainConfig) -> MaskedClassifier:
    """A fresh `spec` network, untrained, once the settings are known to allow training it: what
    training would refuse midway (a device that is not there, an architecture unknown or not
    buildable for the data) is refused here, in well under a second, before any run is logged."""
    resolve_device(config.device)
    if spec.arch == GRAPH:
        raise ValueError(
            "a model imported as a traced graph cannot be trained from scratch (its architecture is "
            "not known by name): import it with --arch and --weights, or set retrain_baseline: false"
        )
    return build_from_spec(spec)


def train_model(
    data: Splits, config: TrainConfig, seed: int, exclude=(), progress: bool = True, spec: ModelSpec | None = None
) -> tuple[MaskedClassifier, float]:
    """Train a fresh model (`spec`, default: the default ModelConfig's for `data`) on the train
    split less the `exclude` classes (not masked here).

    Returns the model (on the CPU, eval mode) and the wall-clock seconds of training."""
    spec = spec or training_spec(ModelConfig(), data)
    seed_everything(seed)  # before the network's initialisation
    model = check_training(spec, config)
    device = resolve_device(config.device)
    train = split_by_classes(data.train, exclude)[1] if exclude else data.train
    model = model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused_adam(device)
    )
    steps = config.epochs * -(-len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    scaler = grad_scaler(device, config.amp)  # one for the whole run: it adapts its scale as it goes
    start = time.perf_counter()
    label = f"retrain without {list(exclude)}" if exclude else "train"
    with tqdm(range(config.epochs), desc=label, disable=None if progress else True, leave=False) as bar:
        for epoch in bar:
            loss = train_one_epoch(
                model, train, optimizer, scheduler, config.batch_size, device, generator, config.amp, scaler
            )
            if not math.isfinite(loss):  # fail here: a NaN model would pass on to export and gates
                raise ValueError(
                    f"training diverged: the loss is {loss} in epoch {epoch + 1} (train.lr = "
                    f"{config.lr}; a smaller learning rate usually fixes it)"
                )
            bar.set_postfix(loss=f"{loss:.4f}")
    recalibrate_batch_norm(model, train, config.batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return model.cpu().eval(), seconds


@torch.no_grad()
def recalibrate_batch_norm(model, data: ImageSet, batch_size: int, device) -> None:
    """Batch-norm running statistics estimated afresh over `data` with the final weights (one
    forward pass, equal weight per batch). Their moving averages lag the weights that moved
    under them: with MobileNetV3's momentum of 0.01, eval mode fell far below train mode
    (docs/benchmarks.md section 6)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    for x, _ in batches(data, batch_size, device):
        if len(x) > 1:  # batch norm needs two samples per channel in train mode
            model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def save_checkpoint(path: str | Path, model: MaskedClassifier, **meta) -> Path:
    """Write {"state_dict", "model_spec", "forgotten_classes", **meta} atomically to path; a
    traced-graph backbone also goes in, as a torch.export archive ("backbone_program")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_spec": model.spec.as_dict(),
        "forgotten_classes": model.forgotten_classes,
        **meta,
    }
    if is_graph(model.backbone):
        size = model.image_size
        example = torch.rand(2, model.input_mean.shape[1], size, size)
        checkpoint["backbone_program"] = program_bytes(copy.deepcopy(model.backbone).cpu(), example)
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    return path


def load_checkpoint(path: str | Path) -> tuple[MaskedClassifier, dict]:
    """(model in eval mode on the CPU, the checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable nhle checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "model_spec" not in checkpoint:
        raise ValueError(f"{path} is not an nhle checkpoint (no state_dict/model_spec)")
    model = restore_model(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def restore_model(checkpoint: dict) -> MaskedClassifier:
    """The checkpoint's architecture, before its state_dict is loaded."""
    spec = ModelSpec.from_dict(checkpoint["model_spec"])
    if spec.arch != GRAPH:
        return build_from_spec(spec)

    weight = checkpoint["state_dict"]["head.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="head.bias" in checkpoint["state_dict"])
    return MaskedClassifier(
        graph_from_bytes(checkpoint["backbone_program"]),
        head,
        spec.in_channels,
        spec.mean,
        spec.std,
        arch=GRAPH,
        image_size=spec.image_size,
        network_channels=len(spec.mean),
    )


def recipe_of(checkpoint: dict) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings a checkpoint records (for its retrained reference).
    Checkpoints written before the model section existed kept the architecture in train.model."""
    train = dict(checkpoint["config"]["train"])
    legacy_arch = train.pop("model", None)
    model = checkpoint["config"].get("model")
    if model is None:
        model = {"arch": ModelSpec.from_dict(checkpoint["model_spec"]).arch if legacy_arch else "smallcnn"}
    return ModelConfig(**model), TrainConfig(**train)
