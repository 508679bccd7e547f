"""Your own classifier into nhle: a torchvision or timm architecture with your weights, or a
PyTorch model you logged to MLflow. `nhle import` (the import flow) registers
the result as a base version after the same evaluation, ONNX export, parity and gates as a model
nhle trained; forgetting, serving and forget requests then work on it unchanged.

    nhle import --arch resnet50 --weights model.pth --dataset imagefolder --data-root photos --image-size 224
    nhle import --from-mlflow models:/their-model/3 --mlflow-tracking-uri http://their-mlflow:5000 ...

    from nhle.core.importing import from_weights, smoke_test
    model, source = from_weights(params.model, data)   # a MaskedClassifier, and where it came from
    smoke_test(model, data)

An MLflow model comes in through nhle.adapters.mlflow_models.from_mlflow (it needs mlflow).

Weights are read with torch.load(weights_only=True): a state_dict, or a checkpoint dict holding
one under `weights_key`. An MLflow model is either MLflow 3's torch.export program or a pickled
nn.Module (which runs the pickle's code: load only models you trust); both become a traced
graph (nhle.core.graphs), so later steps need neither your code nor your classes. Every refusal is a
ValueError that names the problem, raised before anything is registered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from nhle.core.config import ModelConfig
from nhle.core.data import Splits
from nhle.core.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NHLE_ARCHITECTURES,
    MaskedClassifier,
    build_network,
    channel_stats,
    find_head,
    network_channels,
    wrap,
)

# Heads torchvision's googlenet / inception_v3 use only while training; nhle builds them without.
AUXILIARY_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def check_square(data: Splits) -> None:
    channels, height, width = data.image_shape
    if height != width:
        raise ValueError(f"the images are {height} x {width}: give --image-size to make them square")


def default_normalisation(config: ModelConfig, net: nn.Module, data: Splits):
    """mean/std when the config gives none: what the weights were trained with by convention."""
    if config.mean is not None:
        return config.mean, config.std
    if config.from_mlflow:
        return 0.0, 1.0
    if config.arch.startswith("timm/"):
        pretrained = getattr(net, "pretrained_cfg", None) or {}
        return pretrained.get("mean", IMAGENET_MEAN), pretrained.get("std", IMAGENET_STD)
    if config.arch in NHLE_ARCHITECTURES:
        return channel_stats(data.train.images)
    return IMAGENET_MEAN, IMAGENET_STD


def from_weights(config: ModelConfig, data: Splits) -> tuple[MaskedClassifier, dict]:
    channels, size, _ = data.image_shape
    net = build_network(config.arch, channels, data.num_classes, size)
    source = {"kind": "random", "arch": config.arch}
    if config.weights != "none":
        path = Path(config.weights).expanduser()
        state = read_state_dict(path, config.weights_key)
        example = torch.rand(2, network_channels(net, channels), size, size)
        head = find_head(net, example, config.head or None)
        rows = state.get(f"{head}.weight")
        if rows is not None and rows.ndim == 2 and rows.shape[0] != data.num_classes:
            raise ValueError(
                f"the weights' head {head!r} has {rows.shape[0]} outputs but the {data.name} data has "
                f"{data.num_classes} classes: the model's outputs must be the dataset's classes"
            )
        load_matching(net, drop_auxiliary(state, config.arch), path, config.arch)
        source = {
            "kind": "weights",
            "arch": config.arch,
            "weights": str(path.resolve()),
            "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "weights_key": config.weights_key,
        }
    mean, std = default_normalisation(config, net, data)
    return wrap(net, channels, mean, std, size, config.head or None, arch=config.arch), source


def read_state_dict(path: Path, key: str = "") -> dict[str, torch.Tensor]:
    """A state_dict from a file: the file itself, or its entry `key`; a DataParallel 'module.'
    prefix is taken off."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file it cannot read
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True), which loads only tensors and "
            f"plain containers (save model.state_dict(), not the model): {str(err).splitlines()[0]}"
        ) from err
    if key:
        if not isinstance(payload, dict) or key not in payload:
            keys = sorted(map(str, payload))[:12] if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path} has no entry {key!r} (weights_key); it holds {keys}")
        payload = payload[key]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        held = sorted(map(str, payload))[:12] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a state_dict (a dict of tensors): it holds {held}; if it is a checkpoint, "
            "name the entry holding the state_dict with --weights-key"
        )
    if all(k.startswith("module.") for k in payload):
        payload = {k[len("module.") :]: v for k, v in payload.items()}
    return payload


def drop_auxiliary(state: dict, arch: str) -> dict:
    prefixes = AUXILIARY_PREFIXES.get(arch, ())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def load_matching(net: nn.Module, state: dict, path: Path, arch: str) -> None:
    """load_state_dict, with a refusal that names the first key that does not fit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        first = next(k for k in [*expected, *state] if k in {*missing, *unexpected, *reshaped})
        what = (
            "missing from the file"
            if first in missing
            else "not in the model"
            if first in unexpected
            else f"shape {list(state[first].shape)} in the file, {list(expected[first].shape)} in the model"
        )
        raise ValueError(
            f"{path} does not fit {arch}: first mismatched key {first!r} ({what}); {len(missing)} keys "
            f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape. Are these the weights "
            "of another architecture? --arch names the one they were saved from"
        )
    net.load_state_dict(state)


def smoke_test(model: MaskedClassifier, data: Splits) -> None:
    """Two test images through the wrapped model: one row of class scores each."""
    x = data.test.float_images()[:2]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except (RuntimeError, AssertionError) as err:  # a torch.export guard fails with AssertionError
        raise ValueError(
            f"the imported model cannot take the data's {'x'.join(map(str, data.image_shape))} images: "
            f"{str(err).splitlines()[0]}"
        ) from err
    if tuple(logits.shape) != (len(x), data.num_classes):
        raise ValueError(
            f"the imported model gives output shape {tuple(logits.shape)} for {len(x)} images; expected "
            f"({len(x)}, {data.num_classes})"
        )
