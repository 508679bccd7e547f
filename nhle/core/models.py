"""One adapter for any image classifier whose last layer is an nn.Linear: nhle's own networks,
every torchvision classification model, timm models, and your own module.

    from nhle.core.models import build_model, wrap
    model = build_model("smallcnn", in_channels=1, num_classes=10)                   # nhle's small CNN
    model = build_model("mobilenet_v3_small", 3, 10, image_size=32)                  # any torchvision classifier
    model = build_model("timm/vit_tiny_patch16_224", 3, 10, image_size=32)           # pip install 'nhle[timm]'
    model = wrap(your_module, in_channels=3, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    logits = model(x)             # x: float (N, C, H, W) in [0, 1]; masked classes get -inf
    features = model.features(x)  # the head's input: what the linear probe and silhouette see

`wrap` finds the head: the `head` you name (a module path such as "classifier.3"), else the
torchvision / timm convention (`get_classifier()`), else the last nn.Linear the forward pass
calls. A forward hook then checks that the network's output *is* that layer's output, so
replacing the head by nn.Identity leaves exactly its input: the penultimate features.

The wrapper holds the input normalisation (buffers `input_mean`, `input_std`) and `forget_mask`
(bool, one entry per class): the head's rows of masked classes are multiplied by zero and their
logits set to -inf, so an exported ONNX graph takes raw [0, 1] pixels and can never predict a
masked class. Grey images fed to a network with an RGB stem are repeated to three channels.
A traced graph (torch.export, MLflow 3's default PyTorch format) is split by nhle.core.graphs into
the same backbone + nn.Linear head.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nhle.core.data import as_float

NHLE_ARCHITECTURES = ("smallcnn", "resnet18_cifar")
GRAPH = "graph"
"""The arch of a model that exists only as a traced graph (nhle.core.graphs): it cannot be rebuilt
from random initialisation, so it has no retrained reference."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a wrapped model before its state_dict is loaded (a checkpoint's model_spec)."""

    arch: str
    in_channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    head: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, spec: dict) -> ModelSpec:
        arch = spec["arch"]
        if arch == "resnet18" and "head" not in spec:
            arch = "resnet18_cifar"  # checkpoints written before torchvision names meant torchvision's models
        return cls(
            arch,
            int(spec["in_channels"]),
            int(spec["num_classes"]),
            tuple(spec["mean"]),
            tuple(spec["std"]),
            spec.get("image_size"),
            spec.get("head", ""),
        )


class MaskedClassifier(nn.Module):
    """`backbone` gives the penultimate features, `head` (an nn.Linear) the logits."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        in_channels: int,
        mean,
        std,
        arch: str = "custom",
        head_path: str = "",
        image_size: int | None = None,
        network_channels: int | None = None,
    ):
        super().__init__()
        network_channels = network_channels or in_channels
        if network_channels != in_channels and not (in_channels == 1 and network_channels == 3):
            raise ValueError(
                f"the network takes {network_channels}-channel images but the data has {in_channels} "
                "channel(s); only grey images into an RGB network are converted (repeated)"
            )
        self.backbone, self.head = backbone, head
        self.arch, self.head_path, self.image_size, self.in_channels = arch, head_path, image_size, in_channels
        self.grey_to_rgb = network_channels != in_channels
        self.register_buffer("input_mean", channel_vector(mean, network_channels, "mean"))
        self.register_buffer("input_std", channel_vector(std, network_channels, "std"))
        self.register_buffer("forget_mask", torch.zeros(head.out_features, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def forgotten_classes(self) -> list[int]:
        """The classes masked so far, ascending."""
        return torch.nonzero(self.forget_mask).flatten().tolist()

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            self.arch,
            self.in_channels,
            self.num_classes,
            tuple(self.input_mean.flatten().tolist()),
            tuple(self.input_std.flatten().tolist()),
            self.image_size,
            self.head_path,
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grey_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone((x - self.input_mean) / self.input_std)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        keep = (~self.forget_mask).to(features.dtype)
        # The multiplication keeps masked rows out of the function even if an optimizer with
        # stale momentum were to move them; their gradient through it is exactly zero.
        bias = None if self.head.bias is None else self.head.bias * keep
        logits = F.linear(features, self.head.weight * keep[:, None], bias)
        return logits.masked_fill(self.forget_mask, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def channel_vector(value, channels: int, what: str) -> torch.Tensor:
    vector = torch.as_tensor(value, dtype=torch.float32).flatten()
    if vector.numel() not in (1, channels):
        raise ValueError(f"{what} has {vector.numel()} values; give 1 or {channels} (one per channel)")
    if what == "std" and (vector <= 0).any():
        raise ValueError(f"std must be positive, got {vector.tolist()}")
    return vector.expand(channels).reshape(1, -1, 1, 1).clone()


# --------------------------------------------------------------------------------------------
# Networks by name


def small_cnn(in_channels: int, num_classes: int, width: int = 128) -> nn.Sequential:
    """conv 32 -> conv 64 -> max-pool -> 4x4 pool -> fc 128 -> fc K; any input size >= 8x8."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def resnet18_cifar(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool)."""
    from torchvision.models import resnet18  # noqa: PLC0415 - lazy: torchvision

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@functools.cache
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision  # noqa: PLC0415 - lazy: torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def torchvision_network(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    import torchvision  # noqa: PLC0415 - lazy: torchvision

    options = {}
    if name.startswith("vit_") and image_size:
        options["image_size"] = image_size
    if name.startswith("maxvit") and image_size:
        options["input_size"] = (image_size, image_size)
    if name in ("googlenet", "inception_v3"):  # their auxiliary heads return tuples while training
        options.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)


def timm_network(name: str, in_channels: int, num_classes: int, image_size: int | None) -> nn.Module:
    try:
        import timm  # noqa: PLC0415 - lazy: timm: optional extra
    except ImportError:
        raise ValueError(f"timm/{name} needs timm: pip install 'nhle[timm]'") from None
    if name not in timm.list_models():
        raise ValueError(f"timm has no model {name!r} (timm.list_models() lists them)")
    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if image_size:
        try:
            return timm.create_model(name, img_size=image_size, **options)
        except TypeError:  # convolutional models take any size and have no img_size
            pass
    return timm.create_model(name, **options)


def build_network(arch: str, in_channels: int, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A fresh, randomly initialised network by name (pretrained weights come from a file)."""
    if arch == "smallcnn":
        return small_cnn(in_channels, num_classes)
    if arch == "resnet18_cifar":
        return resnet18_cifar(in_channels, num_classes)
    if arch.startswith("timm/"):
        return timm_network(arch[len("timm/") :], in_channels, num_classes, image_size)
    if arch in torchvision_classifiers():
        return torchvision_network(arch, num_classes, image_size)
    raise ValueError(
        f"unknown model {arch!r}; choose one of {', '.join(NHLE_ARCHITECTURES)} (CIFAR-stem ResNet-18), "
        "a torchvision classification model (torchvision.models.list_models(module=torchvision.models): "
        "resnet50, mobilenet_v3_small, efficientnet_b0, vit_b_16, ...) or timm/NAME"
    )


def default_image_size(arch: str) -> int:
    """The input size the head check runs at when the caller gives none."""
    return {"smallcnn": 8, "resnet18_cifar": 32}.get(arch, 224)


def build_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    mean=0.5,
    std=0.5,
    image_size: int | None = None,
    head: str | None = None,
) -> MaskedClassifier:
    """A fresh model by name; mean/std are the input normalisation baked into the model."""
    net = build_network(arch, in_channels, num_classes, image_size)
    return wrap(net, in_channels, mean, std, image_size or default_image_size(arch), head, arch=arch)


# --------------------------------------------------------------------------------------------
# The adapter


def network_channels(net: nn.Module, default: int) -> int:
    """Input channels of the network's first convolution (its stem), else `default`."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return default


def linear_calls(net: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]], object]:
    """[(path, output)] of every nn.Linear in the order the forward pass calls them, and the
    network's own output, from one forward pass in eval mode."""
    calls, handles = [], []
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, i, o, path=path: calls.append((path, o))))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            output = net(example)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return calls, output


def is_output(candidate: torch.Tensor, output) -> bool:
    if candidate is output:
        return True
    if not isinstance(output, torch.Tensor) or output.device.type == "meta" or candidate.shape != output.shape:
        return False
    return torch.equal(candidate, output)


def conventional_head(net: nn.Module) -> str | None:
    """The head's path by the library's convention: timm's get_classifier(), torchvision's fc,
    classifier (or its last layer) and heads.head."""
    paths = {id(m): p for p, m in net.named_modules()}
    get_classifier = getattr(net, "get_classifier", None)
    if callable(get_classifier):
        try:
            found = get_classifier()
        except Exception:  # noqa: BLE001 - a user's method of that name may want arguments
            found = None
        if isinstance(found, nn.Module) and id(found) in paths:
            return paths[id(found)]
    for path in ("fc", "heads.head", "head", "classifier"):
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Sequential) and len(module):
            return f"{path}.{len(module) - 1}"
        return path
    return None


def find_head(net: nn.Module, example: torch.Tensor, head: str | None = None) -> str:
    """The module path of the nn.Linear whose output is the network's output; see the module
    docstring. Raises ValueError saying what was found instead."""
    linears = [p for p, m in net.named_modules() if isinstance(m, nn.Linear)]
    if head:
        try:
            module = net.get_submodule(head)
        except AttributeError:
            raise ValueError(f"the model has no module {head!r} (head); its nn.Linear layers: {linears}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"head {head!r} is a {type(module).__name__}, not an nn.Linear")
    if not linears:
        raise ValueError(
            f"the model ({type(net).__name__}) has no nn.Linear layer: nhle needs a classifier whose "
            "last layer is an nn.Linear (its rows are what class weight masking zeroes)"
        )
    calls, output = linear_calls(net, example)
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the model returns a {type(output).__name__}, not a tensor of logits")
    last_output = {path: out for path, out in calls}  # a layer called twice: its last call counts
    candidates = (
        [head]
        if head
        else list(dict.fromkeys(c for c in (conventional_head(net), calls[-1][0] if calls else None) if c))
    )
    for path in candidates:
        if path in last_output and is_output(last_output[path], output):
            return path
    called = [p for p, _ in calls]
    raise ValueError(
        f"no nn.Linear gives the model's output (shape {tuple(output.shape)}): tried {candidates}, "
        f"nn.Linear layers called in order {called[-5:]}; the model applies further layers after its last "
        "nn.Linear, or name the head with head: PATH"
    )


def wrap(
    net: nn.Module, in_channels: int, mean, std, image_size: int, head: str | None = None, arch: str = "custom"
) -> MaskedClassifier:
    """`net` as a MaskedClassifier: its head found (find_head) and replaced by nn.Identity in
    `net`, which becomes the backbone. `image_size` is the size the head check runs at."""
    channels = network_channels(net, in_channels)
    device = next(iter(net.parameters()), torch.empty(0)).device
    example = torch.rand(2, channels, image_size, image_size, device=device)
    path = find_head(net, example, head)
    linear = net.get_submodule(path)
    net.set_submodule(path, nn.Identity())
    return MaskedClassifier(
        net, linear, in_channels, mean, std, arch=arch, head_path=path, image_size=image_size, network_channels=channels
    ).to(device)


def build_from_spec(spec: ModelSpec) -> MaskedClassifier:
    """The architecture a spec names, randomly initialised (its state_dict is loaded after)."""
    net = build_network(spec.arch, spec.in_channels, spec.num_classes, spec.image_size)
    return wrap(
        net,
        spec.in_channels,
        spec.mean,
        spec.std,
        spec.image_size or default_image_size(spec.arch),
        spec.head or None,
        arch=spec.arch,
    )


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [0, 1] images, for the model's input normalisation."""
    x = as_float(images[:20000])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
