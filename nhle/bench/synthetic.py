"""The synthetic data of the benchmarks: class patterns with real structure, any size.

    from nhle.bench.synthetic import synthetic_splits
    data = synthetic_splits(2000, seed=0)                       # nhle bench scaling's data
    data = synthetic_splits(5000, size=32, channels=3)          # a CIFAR-shaped stand-in (nhle bench gpu)

Each class is a random smooth pattern (a few Gaussian blobs), and each sample is its class
pattern shifted by up to size/8 pixels, scaled in contrast, plus pixel noise, so a CNN must
learn shift-tolerant shape features; classes overlap enough that accuracy is below 100%.
"""

from __future__ import annotations

import numpy as np
import torch

from nhle.core.data import ImageSet, Splits


def synthetic_patterns(num_classes: int = 10, size: int = 16, blobs: int = 4, seed: int = 0) -> torch.Tensor:
    """(num_classes, size, size) class prototypes in [0, 1], each a sum of a few Gaussian blobs
    (their width grows with the size, so a 32x32 pattern looks like a 16x16 one scaled up)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1).astype(np.float32)
    patterns = np.zeros((num_classes, size, size), np.float32)
    for c in range(num_classes):
        for _ in range(blobs):
            centre, width = rng.uniform(3, size - 3, 2), rng.uniform(1.2, 2.8) * size / 16
            patterns[c] += np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2))
        patterns[c] /= patterns[c].max()
    return torch.from_numpy(patterns)


def synthetic_splits(
    train_size: int, test_size: int = 2000, num_classes: int = 10, seed: int = 0, size: int = 16, channels: int = 1
) -> Splits:
    """Shifted, contrast-scaled, noisy copies of the class patterns, balanced, as uint8 images
    (N, channels, size, size). Each channel of a class has its own pattern; shifts go up to size/8
    pixels. The defaults give exactly the data the scaling benchmark was measured on;
    size=32, channels=3 is a CIFAR-shaped stand-in (nhle.bench.gpu)."""
    patterns = synthetic_patterns(num_classes * channels, size, seed=seed).reshape(num_classes, channels, size, size)
    generator = torch.Generator().manual_seed(seed + 1)
    shift = size // 8

    def make(n: int) -> ImageSet:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        images = patterns[labels]
        shifts = torch.randint(-shift, shift + 1, (n, 2), generator=generator)
        images = torch.stack([torch.roll(img, (int(dy), int(dx)), (1, 2)) for img, (dy, dx) in zip(images, shifts)])
        contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
        noisy = images * contrast + 0.25 * torch.randn(images.shape, generator=generator)
        return ImageSet((noisy.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    name = f"synthetic{train_size}" + ("" if (size, channels) == (16, 1) else f"_{channels}x{size}x{size}")
    return Splits(name, make(train_size), make(test_size), [str(c) for c in range(num_classes)])


__all__ = ["synthetic_patterns", "synthetic_splits"]
