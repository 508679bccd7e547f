"""A PyTorch model you logged with mlflow.pytorch, as an nhle model: MLflow 3's torch.export
program or a pickled nn.Module, split into backbone and head (nhle.core.graphs).

    from nhle.adapters.mlflow_models import from_mlflow
    model, source = from_mlflow(params.model, data, tracking_uri)   # a MaskedClassifier, provenance

A pickled model runs the pickle's code when loaded: load only models you trust. A torch.export
program logged with a one-image input_example is specialised to batch 1: it is converted to take
any batch (nhle.core.graphs.any_batch, checked image by image; the source then says
"batch_one_converted": true) or refused with a ValueError saying how to log it again.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlflow
import torch
import torch.nn as nn
from mlflow.exceptions import MlflowException

from nhle.core.config import ModelConfig
from nhle.core.data import Splits
from nhle.core.graphs import any_batch, export_graph, input_shape, is_graph, split_at_head, traced_batch
from nhle.core.importing import default_normalisation
from nhle.core.models import GRAPH, MaskedClassifier, find_head, network_channels


@contextmanager
def mlflow_store(tracking_uri: str):
    """MLflow's tracking and registry URIs set to `tracking_uri` for a while (the user's store
    may be another than nhle's), then set back."""
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
    batch = None
    loaded = load_mlflow_pytorch(config.from_mlflow, tracking_uri)
    if is_graph(loaded):  # MLflow 3's default: a torch.export program
        traced = input_shape(loaded)
        if traced is not None and traced[1:] != (size, size):
            raise ValueError(
                f"{config.from_mlflow} was traced for {'x'.join(map(str, traced))} images but the data is "
                f"{'x'.join(map(str, data.image_shape))}: give --image-size {traced[1]}"
            )
        net_channels = traced[0] if traced else channels
        batch = traced_batch(loaded)
        if batch is not None:  # specialised to one batch size, e.g. logged with a one-image input_example
            loaded = fixed_batch_to_any(loaded, batch, config.from_mlflow)
        backbone, head = split_at_head(loaded, data.num_classes, config.head or None)
        form = "pt2"
    else:  # pickled: found as any module is, then traced so that later steps need no user code
        net = loaded.cpu().eval()
        net_channels = network_channels(net, channels)
        example = torch.rand(2, net_channels, size, size)
        try:
            path = find_head(net, example, config.head or None)
        except RuntimeError as err:
            raise ValueError(
                f"{config.from_mlflow} cannot take the data's {'x'.join(map(str, data.image_shape))} "
                f"images: {str(err).splitlines()[0]}"
            ) from err
        head = net.get_submodule(path)
        if head.out_features != data.num_classes:
            raise ValueError(
                f"the model's head {path!r} has {head.out_features} outputs but the {data.name} data has "
                f"{data.num_classes} classes: the model's outputs must be the dataset's classes"
            )
        net.set_submodule(path, nn.Identity())
        backbone = export_graph(net, example)
        form = "pickle"
    mean, std = default_normalisation(config, backbone, data)
    model = MaskedClassifier(
        backbone, head, channels, mean, std, arch=GRAPH, image_size=size, network_channels=net_channels
    )
    source = {"kind": "mlflow", "uri": config.from_mlflow, "tracking_uri": tracking_uri, "format": form}
    if form == "pt2" and batch is not None:
        source["batch_one_converted"] = True
    return model, source


RELOG = (
    "log it again with an input_example of 2 or more images (MLflow then exports a dynamic batch), or with "
    'serialization_format="pickle"'
)


def fixed_batch_to_any(graph: nn.Module, batch: int, uri: str) -> nn.Module:
    """A torch.export program specialised to a batch of one, made to take any batch
    (nhle.core.graphs.any_batch); any other fixed batch size, or a failed conversion, is refused."""
    if batch != 1:
        raise ValueError(
            f"{uri} was exported by torch.export for batches of exactly {batch} images only (its "
            f"input signature fixes the batch size): nhle needs any batch size; {RELOG}"
        )
    try:
        return any_batch(graph)
    except ValueError as err:
        raise ValueError(
            f"{uri} was exported by torch.export for a batch of exactly one image (MLflow's default pt2 "
            f"format fixes the batch size when the input_example is one image) and nhle could not make "
            f"it take other batch sizes ({err}): {RELOG}"
        ) from err
