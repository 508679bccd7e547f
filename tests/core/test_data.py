"""Loaders on the embedded digits and on small files written in each dataset's real format."""

import hashlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision.datasets import CIFAR10, SVHN

from nhle.core.data import (
    drop_classes,
    in_class_order,
    load_dataset,
    load_splits,
    parse_classes,
    read_class_names,
    sample_per_class,
    save_splits,
    split_by_classes,
)


def test_digits_split_is_stratified_deterministic_and_scaled():
    a, b, other = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert a.class_names == [str(k) for k in range(10)]
    assert a.image_shape == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.train.images, b.train.images)
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
    assert 0.0 <= a.train.images.min() and a.train.images.max() <= 1.0 and a.train.images.max() > 0.9
    shares = torch.bincount(a.test.labels) / len(a.test)
    assert shares.min() > 0.09 and shares.max() < 0.11


def test_forget_retain_split_and_seeded_samples(digits):
    forget, retain = split_by_classes(digits.train, [2, 7])
    assert set(forget.labels.tolist()) == {2, 7} and not set(retain.labels.tolist()) & {2, 7}
    assert len(forget) + len(retain) == len(digits.train)
    s1, s2 = (sample_per_class(digits.train, [2, 7], 32, seed=5) for _ in range(2))
    assert len(s1) == 64 and torch.equal(s1.images, s2.images)
    assert torch.bincount(s1.labels, minlength=10)[[2, 7]].tolist() == [32, 32]
    assert not torch.equal(sample_per_class(digits.train, [2, 7], 32, seed=6).images, s1.images)


def test_parse_classes_by_index_and_name_with_clear_errors():
    names = ["cat", "dog", "bird"]
    assert parse_classes("2,0", names) == [0, 2]
    assert parse_classes("dog", names) == [1]
    with pytest.raises(ValueError, match="out of range"):
        parse_classes("3", names)
    with pytest.raises(ValueError, match="unknown class 'fish'"):
        parse_classes("fish", names)


def write_idx(path, array: np.ndarray):
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_family_from_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_dataset(name, root=tmp_path)
    assert (len(data.train), len(data.test), data.image_shape, data.num_classes) == (20, 10, (1, 28, 28), 10)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.tolist()[:3] == [0, 1, 2]


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_from_python_pickles(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for file in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 3, 9, 1]}
        (folder / file).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    # torchvision checks the md5 of the published files; point it at these small ones instead.
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(folder / n)] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(
        CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5(folder / "batches.meta")}
    )
    data = load_dataset("cifar10", root=tmp_path)
    assert (len(data.train), len(data.test), data.image_shape) == (20, 4, (3, 32, 32))
    assert data.class_names[3] == "c3"
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].tobytes(), np.uint8)
    assert torch.equal(data.train.images[0].flatten(), torch.from_numpy(first.copy()))


def test_svhn_from_mat_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    split_list = {}
    for split, n in (("train", 12), ("test", 6)):
        file = tmp_path / f"{split}_32x32.mat"
        savemat(
            file,
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8),
            },
        )
        split_list[split] = ["", file.name, md5(file)]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    data = load_dataset("svhn", root=tmp_path)
    assert (len(data.train), len(data.test), data.image_shape) == (12, 6, (3, 32, 32))
    assert data.train.labels.tolist()[:3] == [1, 2, 3] and data.train.labels.max() <= 9


def test_missing_root_and_unknown_dataset_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="needs a root"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises((FileNotFoundError, RuntimeError)):
        load_dataset("cifar10", root=tmp_path)


def test_image_folder_of_pngs_and_jpegs(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("apple", "pear"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            picture = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
            picture.save(tmp_path / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    data = load_dataset("imagefolder", root=tmp_path, image_size=16, test_fraction=0.5)
    assert data.class_names == ["apple", "pear"]
    assert data.image_shape == (3, 16, 16) and len(data.train) == len(data.test) == 6
    assert torch.bincount(data.test.labels).tolist() == [3, 3]


def test_resize_for_resnet(digits):
    data = load_dataset("digits", image_size=32)
    assert data.image_shape == (1, 32, 32) and data.train.images.max() <= 1.0


def test_drop_classes_records_what_was_removed_and_saves_it(digits, tmp_path):
    once = drop_classes(digits, [3])
    twice = drop_classes(once, [5, 3])
    assert twice.removed_classes == [3, 5] and twice.class_names == digits.class_names
    for part in (twice.train, twice.test):
        assert not set(part.labels.tolist()) & {3, 5}
    kept = sum(int((~((p.labels == 3) | (p.labels == 5))).sum()) for p in (digits.train, digits.test))
    assert len(twice.train) + len(twice.test) == kept
    back = load_splits(save_splits(twice, tmp_path / "deleted"))
    assert back.removed_classes == [3, 5] and back.fingerprint() == twice.fingerprint()
    untouched = save_splits(digits, tmp_path / "full")
    assert "removed_classes" not in (untouched / "classes.json").read_text()  # same bytes as before deletions existed
    assert drop_classes(digits, []) is digits


def test_a_classes_file_renames_or_renumbers_to_the_models_output_order(digits, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"digit {k}" for k in range(10)) + "\n")
    renamed = in_class_order(digits, read_class_names(names))
    assert renamed.class_names[3] == "digit 3" and torch.equal(renamed.train.labels, digits.train.labels)
    order = [str(k) for k in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    flipped = in_class_order(digits, order)
    assert flipped.class_names == order and torch.equal(flipped.test.labels, 9 - digits.test.labels)
    with pytest.raises(ValueError, match="lists 3 classes but the digits data has 10"):
        in_class_order(digits, ["a", "b", "c"])
    names.write_text("a\na\n")
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        read_class_names(names)


def grey_folder(root, n_per_class: int):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8), "L").save(root / name / f"{i:04d}.png")
    return root


def test_an_image_folder_larger_than_the_open_file_limit_loads(tmp_path):
    """600 PNGs under a limit of 128 open files (a child process, so the limit is its own)."""
    root = grey_folder(tmp_path / "many", 300)
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); "
        f"from nhle.core.data import load_dataset; d = load_dataset('imagefolder', root={str(root)!r}, image_size=8); "
        "print(len(d.train.labels) + len(d.test.labels), tuple(d.train.images.shape[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["600", "(1,", "8,", "8)"]


def test_unreadable_images_are_named_or_left_out_on_request(tmp_path, caplog):
    root = grey_folder(tmp_path / "some-bad", 4)
    (root / "a" / "0001.png").write_bytes(b"not a png")
    good = (root / "b" / "0002.png").read_bytes()
    (root / "b" / "0002.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", root=root, image_size=8)
    message = str(err.value)
    assert "2 of 8 files" in message and "data.skip_bad_images: true" in message
    assert "a/0001.png" in message and "b/0002.png" in message
    data = load_dataset("imagefolder", root=root, image_size=8, skip_bad_images=True)
    assert len(data.train.labels) + len(data.test.labels) == 6 and data.class_names == ["a", "b"]
    assert "left out 2 unreadable image(s)" in caplog.text
