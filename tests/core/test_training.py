import copy

import pytest
import torch

from nhle.core import training
from nhle.core.config import ExportConfig, ModelConfig, TrainConfig, UnlearnConfig, load_params
from nhle.core.data import ImageSet, resize, sample_per_class
from nhle.core.export import check_parity, export_onnx
from nhle.core.models import build_model
from nhle.core.training import (
    batches,
    evaluate,
    load_checkpoint,
    recipe_of,
    resolve_device,
    save_checkpoint,
    train_model,
    training_spec,
)
from nhle.core.unlearning import apply_class_weight_mask, unlearn


def test_training_is_seeded_and_learns(digits):
    config = TrainConfig(epochs=1)
    a, seconds = train_model(digits, config, seed=3, progress=False)
    b, _ = train_model(digits, config, seed=3, progress=False)
    c, _ = train_model(digits, config, seed=4, progress=False)
    assert seconds > 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_retrain_excludes_the_classes(digits, monkeypatch):
    seen = []
    real = training.train_one_epoch
    monkeypatch.setattr(training, "train_one_epoch", lambda m, data, *a: seen.append(data.labels) or real(m, data, *a))
    train_model(digits, TrainConfig(epochs=1), seed=0, exclude=[2, 9], progress=False)
    assert not torch.isin(torch.cat(seen), torch.tensor([2, 9])).any()


def test_checkpoint_is_a_plain_dict_that_round_trips(trained, tmp_path):
    model = copy.deepcopy(trained)
    apply_class_weight_mask(model, [6])
    path = save_checkpoint(tmp_path / "m" / "model.pt", model, class_names=list("0123456789"), data_fingerprint="abc")
    raw = torch.load(path, weights_only=True)
    assert {"state_dict", "model_spec", "forgotten_classes", "class_names", "data_fingerprint"} <= set(raw)
    assert raw["forgotten_classes"] == [6]
    loaded, checkpoint = load_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x)) and checkpoint["data_fingerprint"] == "abc"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_failed_write_leaves_no_half_written_model(trained, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous good model")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, trained)
    assert path.read_bytes() == b"previous good model" and len(list(tmp_path.iterdir())) == 1


def test_bad_checkpoint_and_device_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable nhle checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_asking_for_cuda_without_a_gpu_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'"
    ):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("section", [TrainConfig, UnlearnConfig])
def test_unknown_amp_mode_is_named(section, tmp_path):
    name = "train" if section is TrainConfig else "unlearn"
    with pytest.raises(ValueError, match=rf"{name}\.amp must be one of off, bf16, fp16, got 'fp8'"):
        section(amp="fp8")
    (tmp_path / "params.yaml").write_text(f"{name}:\n  amp: half\n")
    with pytest.raises(ValueError, match=r"params\.yaml: .*amp must be one of off, bf16, fp16, got 'half'"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(f"{name}:\n  amp: off\n")  # YAML reads a bare off as false
    assert getattr(load_params(tmp_path / "params.yaml"), name).amp == "off"


def test_bf16_training_and_unlearning_on_the_cpu_export_fp32_and_pass_parity(digits, tmp_path):
    """autocast runs on the CPU too, so the mixed-precision path is tested here without a GPU."""
    model, _ = train_model(digits, TrainConfig(epochs=2, device="cpu", amp="bf16"), seed=0, progress=False)
    assert evaluate(model, digits.test) > 0.5  # it learned in bf16
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    result = unlearn(model, samples, [3], UnlearnConfig(amp="bf16", max_steps=30), device="cpu")
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    path = export_onnx(result.model, tmp_path / "model.onnx", digits.image_shape)
    report = check_parity(result.model, path, digits.test, tolerance=ExportConfig().parity_tolerance)
    assert report["passed"], report
    assert report["providers"] == ["CPUExecutionProvider"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batches_come_as_float_on_the_device(digits):
    data = ImageSet((digits.train.images * 255).round().to(torch.uint8), digits.train.labels)
    ((x, y),) = batches(data.subset(range(10)), 64, torch.device("cuda"))
    ((x_cpu, y_cpu),) = batches(data.subset(range(10)), 64, torch.device("cpu"))
    assert x.is_cuda and x.dtype == torch.float32 and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


def test_a_checkpoint_written_before_the_model_section_still_loads(tmp_path):
    """Old checkpoints say arch 'resnet18' for the CIFAR-stem network and keep it in train.model."""
    model = build_model("resnet18_cifar", 3, 10, mean=0.5, std=0.25).eval()
    old = {
        "state_dict": model.state_dict(),
        "forgotten_classes": [],
        "model_spec": {"arch": "resnet18", "in_channels": 3, "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3},
        "config": {
            "train": {
                "model": "resnet18",
                "epochs": 3,
                "batch_size": 64,
                "lr": 1e-3,
                "weight_decay": 0.0,
                "device": "auto",
                "amp": "off",
            }
        },
    }
    torch.save(old, tmp_path / "old.pt")
    loaded, checkpoint = load_checkpoint(tmp_path / "old.pt")
    x = torch.rand(2, 3, 32, 32)
    assert loaded.arch == "resnet18_cifar" and torch.equal(loaded(x), model(x))
    model_config, train_config = recipe_of(checkpoint)
    assert model_config.arch == "resnet18_cifar" and train_config.epochs == 3


def test_batch_norm_statistics_are_estimated_with_the_final_weights(digits):
    """torchvision's MobileNetV3 (BN momentum 0.01) would otherwise answer from near-initial
    running statistics in eval mode after a short training."""
    data = resize(digits, 32)
    spec = training_spec(ModelConfig(arch="mobilenet_v3_small"), data)
    model, _ = train_model(data, TrainConfig(epochs=2, batch_size=32), seed=0, progress=False, spec=spec)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm.momentum == 0.01 and not model.training
    assert evaluate(model, data.test) > 0.5


def test_a_diverging_training_run_fails_with_the_learning_rate_named(digits):
    with pytest.raises(ValueError, match=r"training diverged: the loss is nan in epoch \d+ \(train.lr = 1000000000.0"):
        train_model(digits, TrainConfig(epochs=3, lr=1e9), seed=0, progress=False)
