"""Your own classifier into nhle: a torchvision or timm architecture with your weights, or a
PyTorch model you logged to MLflow. `nhle import` (flows/nhle_flows.py:import_model) registers
the result as a base version after the same evaluation, ONNX export, parity and gates as a model
nhle trained; forgetting, serving and forget requests then work on it unchanged.

    nhle import --arch resnet50 --weights model.pth --dataset imagefolder --data-root photos --image-size 224
    nhle import --from-mlflow models:/their-model/3 --mlflow-tracking-uri http://their-mlflow:5000 ...

    from nhle.core.importing import import_model
    model, source = import_model(params.model, data, tracking_uri)   # a MaskedClassifier, provenance

Weights are read with torch.load(weights_only=True): a state_dict, or a checkpoint dict holding
one under `weights_key`. An MLflow model is either MLflow 3's torch.export program or a pickled
nn.Module (which runs the pickle's code: load only models you trust); both become a traced
graph (nhle.core.graphs), so later steps need neither your code nor your classes. Every refusal is a
ValueError that names the problem, raised before anything is registered.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from nhle.core.config import ModelConfig
from nhle.core.data import Splits
from nhle.core.graphs import export_graph, input_shape, is_graph, split_at_head
from nhle.core.models import (GRAPH, IMAGENET_MEAN, IMAGENET_STD, NHLE_ARCHITECTURES, MaskedClassifier, build_network,
                         channel_stats, find_head, network_channels, wrap)

# Heads torchvision's googlenet / inception_v3 use only while training; nhle builds them without.
AUXILIARY_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def import_model(config: ModelConfig, data: Splits, tracking_uri: str) -> tuple[MaskedClassifier, dict]:
    """The model `config` names (from_mlflow, else arch + weights), wrapped for `data`, and where
    it came from. `tracking_uri` is used for from_mlflow when config has no tracking URI of its own."""
    channels, height, width = data.image_shape
    if height != width:
        raise ValueError(f"the images are {height} x {width}: give --image-size to make them square")
    if config.from_mlflow:
        model, source = from_mlflow(config, data, config.mlflow_tracking_uri or tracking_uri)
    else:
        model, source = from_weights(config, data)
    smoke_test(model, data)
    return model, source


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
            raise ValueError(f"the weights' head {head!r} has {rows.shape[0]} outputs but the {data.name} data has "
                             f"{data.num_classes} classes: the model's outputs must be the dataset's classes")
        load_matching(net, drop_auxiliary(state, config.arch), path, config.arch)
        source = {"kind": "weights", "arch": config.arch, "weights": str(path.resolve()),
                  "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "weights_key": config.weights_key}
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
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True), which loads only tensors and "
                         f"plain containers (save model.state_dict(), not the model): {str(err).splitlines()[0]}") from err
    if key:
        if not isinstance(payload, dict) or key not in payload:
            keys = sorted(map(str, payload))[:12] if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path} has no entry {key!r} (weights_key); it holds {keys}")
        payload = payload[key]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        held = sorted(map(str, payload))[:12] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a state_dict (a dict of tensors): it holds {held}; if it is a checkpoint, "
                         "name the entry holding the state_dict with --weights-key")
    if all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
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
        what = ("missing from the file" if first in missing else "not in the model" if first in unexpected
                else f"shape {list(state[first].shape)} in the file, {list(expected[first].shape)} in the model")
        raise ValueError(f"{path} does not fit {arch}: first mismatched key {first!r} ({what}); {len(missing)} keys "
                         f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape. Are these the weights "
                         "of another architecture? --arch names the one they were saved from")
    net.load_state_dict(state)


@contextmanager
def mlflow_store(tracking_uri: str):
    """MLflow's tracking and registry URIs set to `tracking_uri` for a while (the user's store
    may be another than nhle's), then set back."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def load_mlflow_pytorch(uri: str, tracking_uri: str) -> nn.Module:
    """mlflow.pytorch.load_model of `uri` in the store at `tracking_uri`, on the CPU."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with mlflow_store(tracking_uri):
        try:
            flavours = mlflow.models.get_model_info(uri).flavors
        except (MlflowException, OSError) as err:
            message = getattr(err, "message", None) or str(err)
            raise ValueError(f"no MLflow model at {uri} in {tracking_uri}: {message.splitlines()[0]}") from err
        if "pytorch" not in flavours:
            raise ValueError(f"{uri} is not a PyTorch model: its MLflow flavours are {sorted(flavours)}")
        try:
            return mlflow.pytorch.load_model(uri, map_location="cpu")
        except MlflowException as err:
            raise ValueError(f"mlflow.pytorch.load_model({uri!r}) failed: {err.message.splitlines()[0]}") from err


def from_mlflow(config: ModelConfig, data: Splits, tracking_uri: str) -> tuple[MaskedClassifier, dict]:
    channels, size, _ = data.image_shape
    loaded = load_mlflow_pytorch(config.from_mlflow, tracking_uri)
    if is_graph(loaded):  # MLflow 3's default: a torch.export program
        traced = input_shape(loaded)
        if traced is not None and traced[1:] != (size, size):
            raise ValueError(f"{config.from_mlflow} was traced for {'x'.join(map(str, traced))} images but the data is "
                             f"{'x'.join(map(str, data.image_shape))}: give --image-size {traced[1]}")
        net_channels = traced[0] if traced else channels
        backbone, head = split_at_head(loaded, data.num_classes, config.head or None)
        form = "pt2"
    else:  # pickled: found as any module is, then traced so that later steps need no user code
        net = loaded.cpu().eval()
        net_channels = network_channels(net, channels)
        example = torch.rand(2, net_channels, size, size)
        try:
            path = find_head(net, example, config.head or None)
        except RuntimeError as err:
            raise ValueError(f"{config.from_mlflow} cannot take the data's {'x'.join(map(str, data.image_shape))} "
                             f"images: {str(err).splitlines()[0]}") from err
        head = net.get_submodule(path)
        if head.out_features != data.num_classes:
            raise ValueError(f"the model's head {path!r} has {head.out_features} outputs but the {data.name} data has "
                             f"{data.num_classes} classes: the model's outputs must be the dataset's classes")
        net.set_submodule(path, nn.Identity())
        backbone = export_graph(net, example)
        form = "pickle"
    mean, std = default_normalisation(config, backbone, data)
    model = MaskedClassifier(backbone, head, channels, mean, std, arch=GRAPH, image_size=size,
                             network_channels=net_channels)
    return model, {"kind": "mlflow", "uri": config.from_mlflow, "tracking_uri": tracking_uri, "format": form}


def smoke_test(model: MaskedClassifier, data: Splits) -> None:
    """Two test images through the wrapped model: one row of class scores each."""
    x = data.test.float_images()[:2]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except RuntimeError as err:
        raise ValueError(f"the imported model cannot take the data's {'x'.join(map(str, data.image_shape))} images: "
                         f"{str(err).splitlines()[0]}") from err
    if tuple(logits.shape) != (len(x), data.num_classes):
        raise ValueError(f"the imported model gives output shape {tuple(logits.shape)} for {len(x)} images; expected "
                         f"({len(x)}, {data.num_classes})")
