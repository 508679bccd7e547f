"""What the docs assume a user already has, made for real and small:

- `~/photos`: an ImageFolder of RGB PNGs, one sub-folder per class (CIFAR-10's class names, so
  that `--classes cat` and `--classes 7` both name a class), each picture a real handwritten digit
  of scikit-learn's digits (the class's digit), upscaled to 40 x 40 and tinted at random;
- `my_resnet50.pth` / `yours.pth`: torchvision ResNet-50 weights that classify those photos
  (a checkpoint dict under `state_dict`, and the bare state_dict);
- `models:/their-model/N` in another team's MLflow store: their own nn.Module trained on the photos
  (no normalisation, as the doc says of an MLflow model), logged with mlflow.pytorch.log_model.
"""

from __future__ import annotations

import colorsys
import shutil
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from nhle.adapters.mlflow_models import mlflow_store
from nhle.core.data import load_dataset
from nhle.core.models import IMAGENET_MEAN, IMAGENET_STD, wrap
from nhle.core.training import evaluate

# CIFAR-10's names, in its order: the sorted sub-folders are the classes, class k holds digit k.
PHOTO_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PHOTOS_PER_CLASS = 40  # 400 PNGs: a test split of 100, so one test image moves accuracy by 1 point


def write_photos(root: Path, per_class: int = PHOTOS_PER_CLASS, size: int = 40, seed: int = 0) -> Path:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for k, name in enumerate(PHOTO_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.flatnonzero(digits.target == k)[:per_class]):
            grey = Image.fromarray((digits.images[j] / 16.0 * 255).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR
            )
            ink = np.asarray(grey, dtype=np.float32)[..., None] / 255
            tint = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.7, 1.0)))
            paper = rng.uniform(0.0, 0.2, 3)
            rgb = paper * (1 - ink) + tint * ink
            Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").save(root / name / f"{i:03d}.png")
    return root


def photo_splits(root: Path, image_size: int = 32):
    return load_dataset("imagefolder", root=root, image_size=image_size)


def resnet50_for_photos(data) -> dict:
    """A torchvision ResNet-50 state_dict that reads the photos, made without training (training a
    ResNet-50 on a CPU takes minutes): the stem averages 2x2 pixels of each colour channel (on
    ImageNet-normalised input, as torchvision weights expect), each stage's first bottleneck moves
    the 3 x 8 x 8 map into channels (space to depth, 3x3 stride-2 convolutions), every other block
    is the identity (its last batch norm zero), and the head is a logistic regression fitted on the
    192 pooled features. Every weight of the architecture is present; nhle sees an ordinary
    ResNet-50 with an `fc` head."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=len(data.class_names)).eval()
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    def identity_bn(bn, channels=None, bias=None):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.data.fill_(1.0 if channels is None else 0.0)
        bn.bias.data.zero_()
        if channels is not None:
            bn.weight.data[:channels] = 1.0
        if bias is not None:
            bn.bias.data[: len(bias)] = bias

    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv1.weight[[0, 1, 2], [0, 1, 2], 3:5, 3:5] = 0.25  # 2x2 mean of each channel
        identity_bn(net.bn1, channels=3, bias=mean / std)  # back to x / std >= 0
        channels = 3
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for b, block in enumerate(layer):
                for bn in (block.bn1, block.bn2, block.bn3):
                    identity_bn(bn, channels=0)
                if b > 0:
                    continue  # residual branch 0: the block passes its (non-negative) input on
                if layer is net.layer1:  # stride 1: the shortcut carries the 3 channels to 256
                    block.downsample[0].weight[range(3), range(3), 0, 0] = 1.0
                    identity_bn(block.downsample[1], channels=3)
                    continue
                identity_bn(block.downsample[1], channels=0)  # no shortcut: the branch does it all
                block.conv1.weight[range(channels), range(channels), 0, 0] = 1.0
                identity_bn(block.bn1, channels=channels)
                for c in range(channels):  # out 4c + 2dy + dx = in c at (2i + dy, 2j + dx)
                    for dy in (0, 1):
                        for dx in (0, 1):
                            block.conv2.weight[4 * c + 2 * dy + dx, c, 1 + dy, 1 + dx] = 1.0
                channels *= 4
                identity_bn(block.bn2, channels=channels)
                block.conv3.weight[range(channels), range(channels), 0, 0] = 1.0
                identity_bn(block.bn3, channels=channels)
        features = torch.nn.Sequential(*list(net.children())[:-1])

        def pooled(images):
            x = (images - mean[:, None, None]) / std[:, None, None]
            return features(x).flatten(1)[:, :channels].numpy()

        probe = LogisticRegression(C=10.0, max_iter=5000)
        probe.fit(pooled(data.train.float_images()), data.train.labels.numpy())
        net.fc.weight[:, :channels] = torch.tensor(probe.coef_, dtype=torch.float32)
        net.fc.bias[:] = torch.tensor(probe.intercept_, dtype=torch.float32)
    return net.state_dict()


def torchvision_accuracy(arch: str, state_dict: dict, data) -> float:
    """Test accuracy of the weights as nhle will wrap them (ImageNet normalisation inside)."""
    net = getattr(torchvision.models, arch)(num_classes=len(data.class_names))
    net.load_state_dict(state_dict)
    model = wrap(
        net, in_channels=3, image_size=data.test.float_images().shape[-1], mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return evaluate(model, data.test)


def their_net():
    """The other team's own classifier (not an nhle or torchvision class): RGB in, [0, 1] pixels."""

    class TheirNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(4),
            )
            self.hidden, self.out = nn.Linear(512, 64), nn.Linear(64, len(PHOTO_CLASSES))

        def forward(self, x):
            return self.out(torch.relu(self.hidden(self.features(x).flatten(1))))

    return TheirNet()


def train_their_net(data, steps: int = 300, seed: int = 0):
    """Their training loop: Adam, batch 64, label smoothing 0.1 (so that the logits do not
    saturate on these easy pictures), then batch-norm statistics estimated on the whole split."""
    torch.manual_seed(seed)
    net = their_net()
    images, labels = data.train.float_images(), data.train.labels
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        index = torch.randint(len(labels), (64,), generator=generator)
        loss = F.cross_entropy(net(images[index]), labels[index], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        net(images)
    return net.eval()


def write_their_store(folder: Path, template_db: Path, data, net) -> str:
    """Their MLflow store (an SQLite file and an artifact folder): registered model 'their-model',
    version 1 pickled, version 2 in MLflow's default format (torch.export) with an input example
    of two images, version 3 in the default format with an input example of ONE image (what a
    user logging one sample gets). Returns its tracking URI."""
    shutil.copy(template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    images = data.test.float_images().numpy()
    with mlflow_store(uri):
        experiment = mlflow.create_experiment("their-experiment", artifact_location=str(folder / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            for name, example, extra in (
                ("pickled", images[:2], {"serialization_format": "pickle"}),
                ("batch-of-two", images[:2], {}),
                ("batch-of-one", images[:1], {}),
            ):
                mlflow.pytorch.log_model(
                    net,
                    name=name,
                    input_example=example,
                    registered_model_name="their-model",
                    pip_requirements=["torch"],
                    **extra,
                )
    return uri
