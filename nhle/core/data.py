"""Datasets as in-memory tensors, and the forget/retain splits that unlearning works on.

    from nhle.core.data import load_dataset
    data = load_dataset("digits", seed=0)          # scikit-learn's digits, ships with the package
    data = load_dataset("cifar10", root="~/data")  # torchvision's files under a local root
    data = load_dataset("imagefolder", root="my_images", image_size=32)  # one folder per class
    data = load_dataset("prepared", root="data/prepared")  # files written by save_splits / `nhle prepare`

Every dataset becomes a `Splits`: a train and a test `ImageSet` of images scaled to [0, 1]
(stored as uint8 where the source is 8-bit, to keep CIFAR-sized data small), the class names and
a fingerprint of the exact bytes, which checkpoints carry so a model can be traced to its data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nhle.core.config import DATASETS, TORCHVISION_DATASETS
from nhle.core.files import atomic_write, write_json


@dataclass
class ImageSet:
    """Images (N, C, H, W), uint8 in [0, 255] or float in [0, 1], and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])

    def float_images(self) -> torch.Tensor:
        return as_float(self.images)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """The model's input scale: float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@dataclass
class Splits:
    name: str
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    removed_classes: list[int] = field(default_factory=list)
    """Classes whose samples a forget request deleted (drop_classes); saved with the splits."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def fingerprint(self) -> str:
        """sha256 over the exact images, labels and class names of both splits."""
        digest = hashlib.sha256()
        for part in (self.train, self.test):
            digest.update(part.images.contiguous().numpy().tobytes())
            digest.update(part.labels.numpy().astype(np.int64).tobytes())
        digest.update("\n".join(self.class_names).encode())
        return digest.hexdigest()


def load_dataset(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    download: bool = False,
    image_size: int | None = None,
    class_names: str | Path | None = None,
    skip_bad_images: bool = False,
) -> Splits:
    """Load a dataset by name; see the module docstring. `image_size` resizes (square);
    `class_names` (a file, one name per line) renumbers the labels to a model's output order."""
    name = name.lower()
    if name == "digits":
        splits = load_digits(seed=seed, test_fraction=test_fraction)
    elif name in TORCHVISION_DATASETS:
        if root is None:
            raise ValueError(
                f"dataset {name!r} needs a root folder (--data-root); add download=True (--download) to fetch it there"
            )
        splits = load_torchvision(name, root, download=download)
    elif name == "prepared":
        if root is None:
            raise ValueError("dataset 'prepared' needs the folder written by `nhle prepare` as its root")
        splits = load_splits(root)
    elif name == "imagefolder":
        if root is None:
            raise ValueError("dataset 'imagefolder' needs a root folder with one sub-folder per class")
        splits = load_image_folder(
            root, seed=seed, test_fraction=test_fraction, image_size=image_size or 32, skip_bad_images=skip_bad_images
        )
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and splits.image_shape[1:] != (image_size, image_size):
        splits = resize(splits, image_size)
    if class_names is not None:
        splits = in_class_order(splits, read_class_names(class_names))
    return splits


def read_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"classes file {path} names {doubled} more than once")
    return names


def in_class_order(splits: Splits, names: list[str]) -> Splits:
    """The splits with label k meaning names[k] (a model's output order). A dataset whose classes
    are bare indices ('0', '1', ...) takes the names in order; one with names is renumbered."""
    if len(names) != splits.num_classes:
        raise ValueError(
            f"the classes file lists {len(names)} classes but the {splits.name} data has "
            f"{splits.num_classes}: {splits.class_names}"
        )
    if splits.class_names == [str(k) for k in range(splits.num_classes)] and set(names) != set(splits.class_names):
        return Splits(splits.name, splits.train, splits.test, list(names), splits.removed_classes)
    missing = [n for n in names if n not in splits.class_names]
    if missing:
        raise ValueError(
            f"the classes file names {missing}, which the {splits.name} data does not have "
            f"(its classes: {splits.class_names})"
        )
    new_index = torch.tensor([names.index(n) for n in splits.class_names])

    def relabel(part: ImageSet) -> ImageSet:
        return ImageSet(part.images, new_index[part.labels])

    removed = sorted(names.index(splits.class_names[c]) for c in splits.removed_classes)
    return Splits(splits.name, relabel(splits.train), relabel(splits.test), list(names), removed)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Splits:
    """scikit-learn's 1,797 8x8 handwritten digits, stratified split per seed, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415 - lazy: scikit-learn
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - lazy: scikit-learn

    bunch = sk_load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    data = ImageSet(images, labels)
    return Splits(
        "digits", data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx)), [str(k) for k in range(10)]
    )


def load_torchvision(name: str, root: str | Path, download: bool = False) -> Splits:
    """torchvision's MNIST, FashionMNIST, CIFAR10, CIFAR100 or SVHN from their files under root."""
    from torchvision import datasets  # noqa: PLC0415 - lazy: torchvision

    root = str(Path(root).expanduser())
    if name == "svhn":
        parts = [datasets.SVHN(root, split=s, download=download) for s in ("train", "test")]
        sets = [ImageSet(torch.from_numpy(p.data), torch.from_numpy(p.labels.astype(np.int64))) for p in parts]
        return Splits(name, sets[0], sets[1], [str(k) for k in range(10)])
    cls = {
        "mnist": datasets.MNIST,
        "fashionmnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    try:
        parts = [cls(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as err:
        raise FileNotFoundError(f"{name} not found under {root}: {err}") from err
    sets = []
    for part in parts:
        data = torch.as_tensor(np.asarray(part.data))
        data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # grey or HWC
        sets.append(ImageSet(data.contiguous(), torch.as_tensor(np.asarray(part.targets))))
    return Splits(name, sets[0], sets[1], list(parts[0].classes))


def load_image_folder(
    root: str | Path, seed: int = 0, test_fraction: float = 0.25, image_size: int = 32, skip_bad_images: bool = False
) -> Splits:
    """A user's images, one sub-folder per class, resized to image_size and split per seed.

    Grey if every image is single-channel, else RGB. Each file is opened, decoded and closed
    in turn (one open file at a time, whatever the folder's size); files that do not decode
    are listed by name, or left out with `skip_bad_images`."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - lazy: scikit-learn
    from torchvision.datasets import ImageFolder  # noqa: PLC0415 - lazy: torchvision

    folder = ImageFolder(str(root))
    if len(folder) == 0:
        raise ValueError(f"no images found under {root}")
    arrays, grey, samples, bad = [], True, [], []
    for path, label in folder.samples:
        try:
            with Image.open(path) as picture:
                picture.load()  # decode now: a truncated file fails here, with its name
                grey = grey and picture.mode in ("L", "1", "I;16")
                rgb = picture.convert("L" if picture.mode.startswith("I") else picture.mode).convert("RGB")
                arrays.append(np.asarray(rgb.resize((image_size, image_size), Image.BILINEAR)))
                samples.append((path, label))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append(f"{path}: {err}")
    if bad and not skip_bad_images:
        raise ValueError(
            f"{len(bad)} of {len(folder)} files under {root} could not be read as images (set "
            "data.skip_bad_images: true to leave them out): " + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        )
    if bad:
        logging.getLogger(__name__).warning(
            "left out %d unreadable image(s) under %s: %s", len(bad), root, "; ".join(bad)
        )
    if not samples:
        raise ValueError(f"none of the {len(folder)} files under {root} could be read as an image")
    stacked = np.stack(arrays)
    images = torch.from_numpy(stacked[..., :1].copy() if grey else stacked)
    images = images.permute(0, 3, 1, 2)
    labels = np.array([label for _, label in samples])
    counts = np.bincount(labels)
    stratify = labels if counts.min() >= 2 else None
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    data = ImageSet(images.contiguous(), torch.from_numpy(labels))
    return Splits("imagefolder", data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx)), list(folder.classes))


def resize(splits: Splits, size: int) -> Splits:
    """Bilinear resize of both splits to size x size (kept in [0, 1] floats)."""

    def scale(part: ImageSet) -> ImageSet:
        images = F.interpolate(part.float_images(), size=(size, size), mode="bilinear", align_corners=False)
        return ImageSet(images.clamp_(0, 1), part.labels)

    return Splits(splits.name, scale(splits.train), scale(splits.test), splits.class_names, splits.removed_classes)


def parse_classes(spec: str | list, class_names: list[str]) -> list[int]:
    """'3' or '2,7' or 'cat,dog' (indices or class names) -> sorted class indices."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    classes = []
    for item in (str(i).strip() for i in items):
        if item in class_names:
            classes.append(class_names.index(item))
        elif item.lstrip("-").isdigit():
            index = int(item)
            if not 0 <= index < len(class_names):
                raise ValueError(f"class {index} is out of range: this model has classes 0..{len(class_names) - 1}")
            classes.append(index)
        else:
            raise ValueError(
                f"unknown class {item!r}: give an index 0..{len(class_names) - 1} or a name from {class_names}"
            )
    if not classes:
        raise ValueError("no class given to forget")
    return sorted(set(classes))


def split_by_classes(data: ImageSet, classes) -> tuple[ImageSet, ImageSet]:
    """(samples of `classes`, the rest)."""
    in_forget = torch.isin(data.labels, torch.as_tensor(list(classes), dtype=torch.long))
    return data.subset(torch.nonzero(in_forget).flatten()), data.subset(torch.nonzero(~in_forget).flatten())


def drop_classes(splits: Splits, classes) -> Splits:
    """The splits without any sample of `classes` (class names and indices unchanged), which
    are added to `removed_classes`: what remains once a forget request deletes their data."""
    classes = sorted({int(c) for c in classes})
    if not classes:
        return splits
    return Splits(
        splits.name,
        split_by_classes(splits.train, classes)[1],
        split_by_classes(splits.test, classes)[1],
        list(splits.class_names),
        sorted({*splits.removed_classes, *classes}),
    )


def sample_per_class(data: ImageSet, classes, n: int, seed: int) -> ImageSet:
    """n seeded samples of each class in `classes` (all of them when a class has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for cls in classes:
        index = torch.nonzero(data.labels == cls).flatten()
        if len(index) == 0:
            raise ValueError(f"class {cls} has no samples in the train split")
        picks.append(index[torch.randperm(len(index), generator=generator)[:n]])
    return data.subset(torch.cat(picks))


def save_splits(splits: Splits, folder: str | Path) -> Path:
    """Write splits as folder/train.npz, folder/test.npz and folder/classes.json; returns folder.

    The .npz files hold `images` (their own dtype) and `labels` (int64), uncompressed, with every
    zip entry stamped 1980-01-01: the same arrays always give the same bytes, so a content hash
    (DVC's md5) changes only when the data does. Each file is written atomically."""

    def write_npz(part: ImageSet):
        arrays = {"images": part.images.contiguous().numpy(), "labels": part.labels.numpy().astype(np.int64)}

        def write(f):
            # np.savez's layout, but with a fixed entry timestamp: the stamp ZipFile.open('w')
            # gives a str name is an implementation detail of the Python version.
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, value in arrays.items():
                    info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    with archive.open(info, "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, value, allow_pickle=False)

        return write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "train.npz", write_npz(splits.train))
    atomic_write(folder / "test.npz", write_npz(splits.test))
    meta = {"name": splits.name, "class_names": list(splits.class_names)}
    if splits.removed_classes:  # absent for untouched data, so its bytes (and DVC hash) stay the same
        meta["removed_classes"] = [int(c) for c in splits.removed_classes]
    write_json(folder / "classes.json", meta)
    return folder


def load_splits(folder: str | Path) -> Splits:
    """The Splits that save_splits wrote to folder (same bytes, same fingerprint)."""
    folder = Path(folder)
    for name in ("train.npz", "test.npz", "classes.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist: {folder} is not a folder written by save_splits")

    def read_npz(path: Path) -> ImageSet:
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"images", "labels"} - set(arrays.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}")
            return ImageSet(torch.from_numpy(arrays["images"].copy()), torch.from_numpy(arrays["labels"].copy()))

    meta = json.loads((folder / "classes.json").read_text())
    return Splits(
        meta["name"],
        read_npz(folder / "train.npz"),
        read_npz(folder / "test.npz"),
        [str(c) for c in meta["class_names"]],
        [int(c) for c in meta.get("removed_classes", [])],
    )
