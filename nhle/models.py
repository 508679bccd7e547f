"""Classifiers that expose their penultimate features and carry a forgotten-class mask.

    from nhle.models import build_model
    model = build_model("smallcnn", in_channels=1, num_classes=10)
    logits = model(x)            # x: float (N, C, H, W) in [0, 1]; masked classes get -inf
    features = model.features(x) # penultimate features, what the linear probe and silhouette see

Each model normalises its own input (buffers `input_mean`, `input_std`) so that an exported
ONNX graph takes raw [0, 1] pixels, and holds `forget_mask` (bool, one entry per class): the
final layer's rows of masked classes are multiplied by zero and their logits set to -inf, so a
masked class can never win the argmax, in PyTorch and in the exported graph alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("smallcnn", "resnet18")


class MaskedClassifier(nn.Module):
    """Base: `backbone` gives penultimate features, `head` is the final nn.Linear."""

    backbone: nn.Module
    head: nn.Linear

    def _init_buffers(self, in_channels: int, num_classes: int, mean, std):
        mean = torch.as_tensor(mean, dtype=torch.float32).expand(in_channels).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).expand(in_channels).reshape(1, -1, 1, 1)
        self.register_buffer("input_mean", mean.clone())
        self.register_buffer("input_std", std.clone())
        self.register_buffer("forget_mask", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.input_mean) / self.input_std)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        keep = (~self.forget_mask).to(features.dtype)
        # The multiplication keeps masked rows out of the function even if an optimizer with
        # stale momentum were to move them; their gradient through it is exactly zero.
        logits = F.linear(features, self.head.weight * keep[:, None], self.head.bias * keep)
        return logits.masked_fill(self.forget_mask, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class SmallCNN(MaskedClassifier):
    """conv 32 -> conv 64 -> max-pool -> 4x4 pool -> fc 128 -> fc K; any input size >= 8x8."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, mean=0.5, std=0.5, width: int = 128):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 4 * 4, width), nn.ReLU(),
        )
        self.head = nn.Linear(width, num_classes)
        self._init_buffers(in_channels, num_classes, mean, std)


class ResNet18(MaskedClassifier):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, mean=0.5, std=0.25):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.backbone = net
        self._init_buffers(in_channels, num_classes, mean, std)


def build_model(arch: str, in_channels: int, num_classes: int, mean=0.5, std=0.5) -> MaskedClassifier:
    """A fresh model by name; mean/std are the input normalisation baked into the model."""
    if arch == "smallcnn":
        return SmallCNN(in_channels, num_classes, mean, std)
    if arch == "resnet18":
        return ResNet18(in_channels, num_classes, mean, std)
    raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [0, 1] images, for the model's input normalisation."""
    from nhle.data import as_float

    x = as_float(images[: 20000])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
